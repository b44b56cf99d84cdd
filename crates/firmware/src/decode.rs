//! Decoding at the edge: guest registers become a typed call, once.
//!
//! Register usage follows DEN0028 §2 and DEN0022 F.b §5.2: W0 holds the function ID,
//! x1..x3 the arguments. For SMC32/HVC32 functions only the low 32 bits of each argument
//! count, so they are masked here; parameters the spec types as `uint32` are truncated for
//! SMC64 functions too. Every malformed argument becomes a [`PsciError`] (never a panic);
//! the dispatch code only ever matches on the types below.

use crate::config::{FirmwareConfig, PowerStateFormat};
use crate::error::PsciError;
use crate::ids::{AffinityLevel, FunctionId, Mpidr};

/// An entry point and context ID as passed by the guest, not yet validated against RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawEntry {
    pub(crate) pc: u64,
    pub(crate) context_id: u64,
}

/// The two CPU_SUSPEND power states the VM offers (see [`crate::SuspendStates`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuPowerState {
    /// The configured standby (retention) state.
    Standby,
    /// The configured powerdown state.
    Powerdown,
}

impl CpuPowerState {
    pub(crate) const fn index(self) -> usize {
        match self {
            Self::Standby => 0,
            Self::Powerdown => 1,
        }
    }
}

/// SYSTEM_OFF2 type (DEN0022 F.b §5.1.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Off2Type {
    /// Type 0: no type given, which selects the default off type, HIBERNATE_OFF (the only
    /// one defined). Linux 6.13+ passes 0 at the end of hibernation for hypervisors that
    /// reject an explicit type; KVM takes 0 as HIBERNATE_OFF too.
    Default,
    /// HIBERNATE_OFF (type 1).
    Hibernate,
}

/// SYSTEM_RESET2 reset type (DEN0022 F.b §5.1.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reset2Type {
    /// SYSTEM_WARM_RESET (architectural type 0).
    Warm,
    /// A vendor-specific type (bit 31 set); the full value.
    Vendor(u32),
}

impl Reset2Type {
    /// The type for a guest's `reset_type` argument; `None` for a reserved architectural
    /// type (INVALID_PARAMETERS).
    pub(crate) const fn from_raw(raw: u32) -> Option<Reset2Type> {
        if raw & 0x8000_0000 != 0 {
            Some(Reset2Type::Vendor(raw))
        } else if raw == 0 {
            Some(Reset2Type::Warm)
        } else {
            None
        }
    }
}

/// PSCI_SET_SUSPEND_MODE mode (DEN0022 F.b §5.1.20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspendMode {
    /// Platform-coordinated (the default after boot).
    PlatformCoordinated,
    /// OS-initiated.
    OsInitiated,
}

/// A decoded PSCI call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PsciCall {
    Version,
    CpuSuspend {
        state: CpuPowerState,
        entry: RawEntry,
    },
    CpuOff,
    CpuOn {
        target: Mpidr,
        entry: RawEntry,
    },
    AffinityInfo {
        target: Mpidr,
        level: AffinityLevel,
    },
    MigrateInfoType,
    MemProtect {
        enable: bool,
    },
    MemProtectCheckRange {
        base: u64,
        length: u64,
    },
    Features {
        queried: u32,
    },
    CpuFreeze,
    CpuDefaultSuspend {
        entry: RawEntry,
    },
    NodeHwState {
        target: Mpidr,
        level: AffinityLevel,
    },
    /// PSCI_STAT_RESIDENCY / PSCI_STAT_COUNT: invalid arguments are not errors for these
    /// (the spec has them return 0), so they decode to `None`.
    Stat {
        count: bool,
        wide: bool,
        target: Option<Mpidr>,
        state: Option<CpuPowerState>,
    },
}

/// A decoded system-scoped PSCI call: it quiesces the VM and takes the exclusive lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SystemCall {
    Off,
    Off2 { off_type: Off2Type },
    Reset,
    Reset2 { reset_type: Reset2Type, cookie: u64 },
    Suspend { entry: RawEntry },
    SetSuspendMode { mode: SuspendMode },
}

/// A decoded SMCCC architecture call (DEN0028 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArchCall {
    Version,
    Features { queried: u32 },
    SocId { soc_id_type: u32 },
    Workaround,
}

/// A decoded TRNG call (DEN0098).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrngCall {
    Version,
    Features { queried: u32 },
    GetUuid,
    Rnd { bits: u32, wide: bool },
}

/// A decoded call of any service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Psci(PsciCall),
    System(SystemCall),
    Arch(ArchCall),
    Trng(TrngCall),
}

/// x1..x3 with SMC32 masking applied.
#[derive(Debug, Clone, Copy)]
struct Args {
    x: [u64; 4],
}

impl Args {
    fn new(fid: FunctionId, regs: &[u64; 4]) -> Self {
        let mut x = *regs;
        if !fid.is_smc64() {
            for r in &mut x[1..] {
                *r &= 0xFFFF_FFFF;
            }
        }
        Self { x }
    }

    fn u64(&self, i: usize) -> u64 {
        self.x[i]
    }

    /// A parameter the spec types as `uint32`.
    fn u32(&self, i: usize) -> u32 {
        self.x[i] as u32
    }

    fn entry(&self, pc: usize, ctx: usize) -> RawEntry {
        RawEntry {
            pc: self.u64(pc),
            context_id: self.u64(ctx),
        }
    }

    fn mpidr(&self, i: usize) -> Result<Mpidr, PsciError> {
        Mpidr::try_from(self.u64(i)).map_err(|_| PsciError::InvalidParameters)
    }

    fn level(&self, i: usize) -> Result<AffinityLevel, PsciError> {
        AffinityLevel::from_raw(u64::from(self.u32(i))).ok_or(PsciError::InvalidParameters)
    }
}

/// Parses a CPU_SUSPEND `power_state` (DEN0022 F.b §5.1.2; table 8 for the extended format) against
/// the VM's states. Reserved bits, non-zero power levels and unknown StateIDs are rejected.
pub(crate) fn parse_power_state(
    config: &FirmwareConfig,
    raw: u32,
) -> Result<CpuPowerState, PsciError> {
    let (powerdown, state_id) = match config.effective_format() {
        PowerStateFormat::Original => {
            // Bits 23:17 and 31:26 are reserved; PowerLevel (25:24) must be 0: the VM only
            // has core-level power states.
            if raw & 0xFFFE_0000 != 0 {
                return Err(PsciError::InvalidParameters);
            }
            (raw & (1 << 16) != 0, raw & 0xFFFF)
        }
        PowerStateFormat::Extended => {
            if raw & 0xB000_0000 != 0 {
                return Err(PsciError::InvalidParameters);
            }
            (raw & (1 << 30) != 0, raw & 0x0FFF_FFFF)
        }
    };
    let states = &config.suspend_states;
    match (powerdown, state_id) {
        (false, id) if id == states.standby_id => Ok(CpuPowerState::Standby),
        (true, id) if id == states.powerdown_id => Ok(CpuPowerState::Powerdown),
        _ => Err(PsciError::InvalidParameters),
    }
}

/// The `power_state` value that names `state` under `config` (for guests and tests).
pub fn encode_power_state(config: &FirmwareConfig, state: CpuPowerState) -> u32 {
    let states = &config.suspend_states;
    match (config.effective_format(), state) {
        (PowerStateFormat::Original, CpuPowerState::Standby) => states.standby_id,
        (PowerStateFormat::Original, CpuPowerState::Powerdown) => states.powerdown_id | 1 << 16,
        (PowerStateFormat::Extended, CpuPowerState::Standby) => states.standby_id,
        (PowerStateFormat::Extended, CpuPowerState::Powerdown) => states.powerdown_id | 1 << 30,
    }
}

/// Decodes the arguments of an available function `fid`.
pub(crate) fn decode(
    config: &FirmwareConfig,
    fid: FunctionId,
    regs: &[u64; 4],
) -> Result<Call, PsciError> {
    use FunctionId as F;
    let a = Args::new(fid, regs);
    let psci = match fid {
        F::PsciVersion => PsciCall::Version,
        F::CpuSuspend32 | F::CpuSuspend64 => PsciCall::CpuSuspend {
            state: parse_power_state(config, a.u32(1))?,
            entry: a.entry(2, 3),
        },
        F::CpuOff => PsciCall::CpuOff,
        F::CpuOn32 | F::CpuOn64 => PsciCall::CpuOn {
            target: a.mpidr(1)?,
            entry: a.entry(2, 3),
        },
        F::AffinityInfo32 | F::AffinityInfo64 => PsciCall::AffinityInfo {
            target: a.mpidr(1)?,
            level: a.level(2)?,
        },
        F::MigrateInfoType => PsciCall::MigrateInfoType,
        F::SystemOff => return Ok(Call::System(SystemCall::Off)),
        F::SystemOff2_32 | F::SystemOff2_64 => {
            let off_type = match a.u32(1) {
                0 => Off2Type::Default,
                1 => Off2Type::Hibernate,
                _ => return Err(PsciError::InvalidParameters),
            };
            if a.u64(2) != 0 {
                return Err(PsciError::InvalidParameters);
            }
            return Ok(Call::System(SystemCall::Off2 { off_type }));
        }
        F::SystemReset => return Ok(Call::System(SystemCall::Reset)),
        F::SystemReset2_32 | F::SystemReset2_64 => {
            let reset_type = Reset2Type::from_raw(a.u32(1)).ok_or(PsciError::InvalidParameters)?;
            return Ok(Call::System(SystemCall::Reset2 {
                reset_type,
                cookie: a.u64(2),
            }));
        }
        F::MemProtect => PsciCall::MemProtect {
            enable: a.u32(1) != 0,
        },
        F::MemProtectCheckRange32 | F::MemProtectCheckRange64 => PsciCall::MemProtectCheckRange {
            base: a.u64(1),
            length: a.u64(2),
        },
        F::PsciFeatures => PsciCall::Features { queried: a.u32(1) },
        F::CpuFreeze => PsciCall::CpuFreeze,
        F::CpuDefaultSuspend32 | F::CpuDefaultSuspend64 => PsciCall::CpuDefaultSuspend {
            entry: a.entry(1, 2),
        },
        F::NodeHwState32 | F::NodeHwState64 => PsciCall::NodeHwState {
            target: a.mpidr(1)?,
            level: a.level(2)?,
        },
        F::SystemSuspend32 | F::SystemSuspend64 => {
            return Ok(Call::System(SystemCall::Suspend {
                entry: a.entry(1, 2),
            }))
        }
        F::SetSuspendMode => {
            let mode = match a.u32(1) {
                0 => SuspendMode::PlatformCoordinated,
                1 => SuspendMode::OsInitiated,
                _ => return Err(PsciError::InvalidParameters),
            };
            return Ok(Call::System(SystemCall::SetSuspendMode { mode }));
        }
        F::StatResidency32 | F::StatResidency64 | F::StatCount32 | F::StatCount64 => {
            PsciCall::Stat {
                count: matches!(fid, F::StatCount32 | F::StatCount64),
                wide: fid.is_smc64(),
                target: a.mpidr(1).ok(),
                state: parse_power_state(config, a.u32(2)).ok(),
            }
        }
        // Never available (see `features::function_flags`); kept total for safety.
        F::Migrate32 | F::Migrate64 | F::MigrateInfoUpCpu32 | F::MigrateInfoUpCpu64 => {
            return Err(PsciError::NotSupported)
        }
        F::SmcccVersion => return Ok(Call::Arch(ArchCall::Version)),
        F::SmcccArchFeatures => return Ok(Call::Arch(ArchCall::Features { queried: a.u32(1) })),
        F::SmcccArchSocId => {
            return Ok(Call::Arch(ArchCall::SocId {
                soc_id_type: a.u32(1),
            }))
        }
        F::SmcccArchWorkaround1 | F::SmcccArchWorkaround2 | F::SmcccArchWorkaround3 => {
            return Ok(Call::Arch(ArchCall::Workaround))
        }
        F::TrngVersion => return Ok(Call::Trng(TrngCall::Version)),
        F::TrngFeatures => return Ok(Call::Trng(TrngCall::Features { queried: a.u32(1) })),
        F::TrngGetUuid => return Ok(Call::Trng(TrngCall::GetUuid)),
        F::TrngRnd32 | F::TrngRnd64 => {
            return Ok(Call::Trng(TrngCall::Rnd {
                bits: a.u32(1),
                wide: fid == F::TrngRnd64,
            }))
        }
    };
    Ok(Call::Psci(psci))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smc32_arguments_use_only_the_low_32_bits() {
        let cfg = FirmwareConfig::default();
        let regs = [
            0x8400_0003,
            0xFFFF_FFFF_0000_0001,
            0xAAAA_AAAA_4000_0000,
            0x5555_5555_0000_0007,
        ];
        let call = decode(&cfg, FunctionId::CpuOn32, &regs);
        let expected = Call::Psci(PsciCall::CpuOn {
            target: Mpidr::from_index(1),
            entry: RawEntry {
                pc: 0x4000_0000,
                context_id: 7,
            },
        });
        assert_eq!(call, Ok(expected));
    }

    #[test]
    fn smc64_arguments_keep_all_64_bits() {
        let cfg = FirmwareConfig::default();
        let regs = [
            0xC400_0003,
            0x1_0000_0000,
            0x4000_0000,
            0xDEAD_BEEF_0000_0001,
        ];
        let Ok(Call::Psci(PsciCall::CpuOn { target, entry })) =
            decode(&cfg, FunctionId::CpuOn64, &regs)
        else {
            panic!("CPU_ON did not decode");
        };
        assert_eq!(target.raw(), 1 << 32);
        assert_eq!(entry.context_id, 0xDEAD_BEEF_0000_0001);
    }

    #[test]
    fn power_state_original_format_rejects_reserved_bits_and_levels() {
        let mut cfg = FirmwareConfig::default();
        cfg.suspend_states.format = PowerStateFormat::Original;
        assert_eq!(parse_power_state(&cfg, 0), Ok(CpuPowerState::Standby));
        assert_eq!(
            parse_power_state(&cfg, 1 << 16),
            Ok(CpuPowerState::Powerdown)
        );
        assert_eq!(
            parse_power_state(&cfg, 1 << 24),
            Err(PsciError::InvalidParameters)
        );
        assert_eq!(
            parse_power_state(&cfg, 1 << 17),
            Err(PsciError::InvalidParameters)
        );
        assert_eq!(
            parse_power_state(&cfg, 5),
            Err(PsciError::InvalidParameters)
        );
    }

    #[test]
    fn power_state_extended_format_uses_bit_30_for_powerdown() {
        let cfg = FirmwareConfig::default();
        assert_eq!(parse_power_state(&cfg, 0), Ok(CpuPowerState::Standby));
        assert_eq!(
            parse_power_state(&cfg, 1 << 30),
            Ok(CpuPowerState::Powerdown)
        );
        assert_eq!(
            parse_power_state(&cfg, 1 << 16),
            Err(PsciError::InvalidParameters)
        );
        assert_eq!(
            parse_power_state(&cfg, 1 << 31),
            Err(PsciError::InvalidParameters)
        );
        for state in [CpuPowerState::Standby, CpuPowerState::Powerdown] {
            assert_eq!(
                parse_power_state(&cfg, encode_power_state(&cfg, state)),
                Ok(state)
            );
        }
    }

    #[test]
    fn system_off2_accepts_type_0_and_hibernate_with_zero_cookie_only() {
        let cfg = FirmwareConfig::default();
        let off2 =
            |t: u64, c: u64| decode(&cfg, FunctionId::SystemOff2_64, &[0xC400_0015, t, c, 0]);
        assert!(matches!(
            off2(0, 0),
            Ok(Call::System(SystemCall::Off2 {
                off_type: Off2Type::Default
            }))
        ));
        assert!(matches!(
            off2(1, 0),
            Ok(Call::System(SystemCall::Off2 {
                off_type: Off2Type::Hibernate
            }))
        ));
        assert_eq!(off2(2, 0), Err(PsciError::InvalidParameters));
        assert_eq!(off2(1, 1), Err(PsciError::InvalidParameters));
    }

    #[test]
    fn affinity_level_above_three_is_invalid() {
        let cfg = FirmwareConfig::default();
        let regs = [0x8400_0004, 0, 4, 0];
        assert_eq!(
            decode(&cfg, FunctionId::AffinityInfo32, &regs),
            Err(PsciError::InvalidParameters)
        );
    }
}
