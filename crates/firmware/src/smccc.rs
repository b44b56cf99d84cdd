//! SMCCC architecture calls (DEN0028 §7) and the TRNG service (DEN0098).
//!
//! Both are offered only from PSCI 1.0 on: a guest discovers SMCCC 1.1+ through
//! PSCI_FEATURES(SMCCC_VERSION), which PSCI 0.2 lacks, so a 0.2 VM looks like an SMCCC 1.0
//! platform (see [`FunctionId::since`]).

use crate::config::{FirmwareConfig, WorkaroundState};
use crate::decode::{ArchCall, TrngCall};
use crate::error::SUCCESS;
use crate::features;
use crate::ids::{FunctionId, Service};
use crate::platform::{CallOutcome, GuestCall, Platform};
use crate::psci::reply;

/// SMCCC_VERSION answer: SMCCC 1.2 (major in bits 30:16, minor in 15:0), the first version
/// with SMCCC_ARCH_SOC_ID.
pub const SMCCC_VERSION_1_2: u32 = 0x1_0002;
/// SMCCC NOT_SUPPORTED (DEN0028 §7.1).
pub const SMCCC_NOT_SUPPORTED: i64 = -1;
/// SMCCC INVALID_PARAMETER (DEN0028 §7.1).
pub const SMCCC_INVALID_PARAMETER: i64 = -3;

/// TRNG_VERSION answer: TRNG 1.0 (DEN0098).
pub const TRNG_VERSION_1_0: u32 = 0x1_0000;
/// TRNG NOT_SUPPORTED.
pub const TRNG_NOT_SUPPORTED: i64 = -1;
/// TRNG INVALID_PARAMETERS.
pub const TRNG_INVALID_PARAMETERS: i64 = -2;
/// TRNG NO_ENTROPY.
pub const TRNG_NO_ENTROPY: i64 = -3;
/// This implementation's TRNG UUID, 1b98248f-bbe3-491a-8ab9-961835ea2134, packed into
/// w0..w3 as DEN0098 specifies (little-endian 32-bit words of the RFC 4122 bytes).
pub const TRNG_UUID: [u32; 4] = [0x8f24_981b, 0x1a49_e3bb, 0x1896_b98a, 0x3421_ea35];

fn x0(v: i64) -> u64 {
    v as u64
}

/// Handles an SMCCC architecture call (availability was already checked).
pub(crate) fn arch_call(config: &FirmwareConfig, call: &GuestCall, arch: ArchCall) -> CallOutcome {
    let regs = &call.regs;
    let result = match arch {
        ArchCall::Version => i64::from(SMCCC_VERSION_1_2),
        ArchCall::Features { queried } => arch_features(config, queried, call.caller_aarch32),
        ArchCall::SocId { soc_id_type } => match soc_id_type {
            0 => i64::from(config.soc_id.version),
            1 => i64::from(config.soc_id.revision),
            _ => SMCCC_INVALID_PARAMETER,
        },
        // The mitigation is the trap into the hypervisor itself; nothing else to do.
        ArchCall::Workaround => 0,
    };
    reply(regs, x0(result))
}

/// SMCCC_ARCH_FEATURES (DEN0028 §7.3): 0 for available architecture calls, the configured
/// answer for the workaround calls, NOT_SUPPORTED otherwise.
fn arch_features(config: &FirmwareConfig, queried: u32, caller_aarch32: bool) -> i64 {
    let Ok(fid) = FunctionId::try_from(queried) else {
        return SMCCC_NOT_SUPPORTED;
    };
    if fid.service() != Service::Arch
        || features::function_flags(config, fid, caller_aarch32).is_none()
    {
        return SMCCC_NOT_SUPPORTED;
    }
    let state = match fid {
        FunctionId::SmcccArchWorkaround1 => config.workarounds.wa1,
        FunctionId::SmcccArchWorkaround2 => config.workarounds.wa2,
        FunctionId::SmcccArchWorkaround3 => config.workarounds.wa3,
        _ => return 0,
    };
    match state {
        WorkaroundState::Unavailable => SMCCC_NOT_SUPPORTED,
        other => i64::from(other.features_answer()),
    }
}

/// Handles a TRNG call (availability was already checked).
pub(crate) fn trng_call(
    config: &FirmwareConfig,
    call: &GuestCall,
    trng: TrngCall,
    platform: &dyn Platform,
) -> CallOutcome {
    let regs = &call.regs;
    match trng {
        TrngCall::Version => reply(regs, u64::from(TRNG_VERSION_1_0)),
        TrngCall::Features { queried } => {
            let available = FunctionId::try_from(queried).is_ok_and(|fid| {
                fid.service() == Service::Trng
                    && features::function_flags(config, fid, call.caller_aarch32).is_some()
            });
            reply(
                regs,
                if available {
                    SUCCESS
                } else {
                    x0(TRNG_NOT_SUPPORTED)
                },
            )
        }
        TrngCall::GetUuid => CallOutcome::Return {
            regs: TRNG_UUID.map(u64::from),
        },
        TrngCall::Rnd { bits, wide } => CallOutcome::Return {
            regs: rnd(bits, wide, platform),
        },
    }
}

/// TRNG_RND32 / TRNG_RND64 (DEN0098): `bits` of entropy right-aligned across x1..x3
/// (x3 holds the least significant word). On error x1..x3 are zero.
fn rnd(bits: u32, wide: bool, platform: &dyn Platform) -> [u64; 4] {
    let (word_bits, max_bits) = if wide { (64u32, 192u32) } else { (32, 96) };
    if bits == 0 || bits > max_bits {
        return [x0(TRNG_INVALID_PARAMETERS), 0, 0, 0];
    }
    let mut buf = [0u8; 24];
    let needed = bits.div_ceil(8) as usize;
    if platform.fill_random(&mut buf[..needed]).is_err() {
        return [x0(TRNG_NO_ENTROPY), 0, 0, 0];
    }
    let word_bytes = (word_bits / 8) as usize;
    let mut words = [0u64; 3];
    for (i, w) in words.iter_mut().enumerate() {
        let mut bytes = [0u8; 8];
        bytes[..word_bytes].copy_from_slice(&buf[i * word_bytes..(i + 1) * word_bytes]);
        let value = u64::from_le_bytes(bytes);
        let avail = bits.saturating_sub(word_bits * i as u32).min(word_bits);
        *w = if avail == 64 {
            value
        } else {
            value & ((1u64 << avail) - 1)
        };
    }
    [SUCCESS, words[2], words[1], words[0]]
}
