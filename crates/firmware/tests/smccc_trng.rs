//! SMCCC architecture calls (DEN0028 §7) and TRNG (DEN0098).

mod common;

use common::*;
use std::sync::atomic::Ordering;
use vpsci_firmware::smccc::{TRNG_UUID, TRNG_VERSION_1_0};
use vpsci_firmware::{
    CallOutcome, FeatureSet, FirmwareConfig, FunctionId as F, GuestCall, PsciVersion, SocId,
    WorkaroundState, Workarounds,
};

const NOT_SUPPORTED: u64 = -1i64 as u64;
const NOT_REQUIRED: u64 = -2i64 as u64;
const INVALID_PARAMETER: u64 = -3i64 as u64;
const TRNG_INVALID_PARAMETERS: u64 = -2i64 as u64;
const TRNG_NO_ENTROPY: u64 = -3i64 as u64;

fn config_with_workarounds(
    wa1: WorkaroundState,
    wa2: WorkaroundState,
    wa3: WorkaroundState,
) -> FirmwareConfig {
    FirmwareConfig {
        workarounds: Workarounds { wa1, wa2, wa3 },
        ..FirmwareConfig::default()
    }
}

#[test]
fn smccc_version_reports_1_2() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::SmcccVersion, 0, 0, 0), 0x1_0002);
}

#[test]
fn smccc_calls_are_not_supported_with_psci_0_2() {
    let cfg = FirmwareConfig {
        psci_version: PsciVersion::V0_2,
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(x0(&fw, &p, 0, F::SmcccVersion, 0, 0, 0), NOT_SUPPORTED);
    assert_eq!(x0(&fw, &p, 0, F::TrngVersion, 0, 0, 0), NOT_SUPPORTED);
}

#[test]
fn arch_features_reports_available_architecture_calls() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_0001, 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_0002, 0, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_8000, 0, 0),
        NOT_SUPPORTED
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8400_0000, 0, 0),
        NOT_SUPPORTED
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_1234, 0, 0),
        NOT_SUPPORTED
    );
}

#[test]
fn arch_features_reports_configured_workaround_answers() {
    use WorkaroundState::*;
    let (fw, p) = fw_with(
        config_with_workarounds(Mitigated, NotRequired, Unaffected),
        1,
    );
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_8000, 0, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_7FFF, 0, 0),
        NOT_REQUIRED
    );
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_3FFF, 0, 0), 1);
}

#[test]
fn workaround_call_succeeds_only_when_available() {
    use WorkaroundState::*;
    let (fw, p) = fw_with(
        config_with_workarounds(Mitigated, Unavailable, Unaffected),
        1,
    );
    assert_eq!(
        regs(&fw, &p, 0, F::SmcccArchWorkaround1, 5, 6, 7),
        [0, 5, 6, 7]
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchWorkaround2, 1, 0, 0),
        NOT_SUPPORTED
    );
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchWorkaround3, 0, 0, 0), 0);
}

#[test]
fn soc_id_returns_configured_version_and_revision() {
    let cfg = FirmwareConfig {
        soc_id: SocId {
            version: 0x3B04_1234,
            revision: 7,
        },
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchSocId, 0, 0, 0), 0x3B04_1234);
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchSocId, 1, 0, 0), 7);
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchSocId, 2, 0, 0),
        INVALID_PARAMETER
    );
}

#[test]
fn soc_id_is_not_supported_when_disabled() {
    let cfg = FirmwareConfig {
        features: FeatureSet {
            soc_id: false,
            ..FeatureSet::ALL
        },
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(x0(&fw, &p, 0, F::SmcccArchSocId, 0, 0, 0), NOT_SUPPORTED);
    assert_eq!(
        x0(&fw, &p, 0, F::SmcccArchFeatures, 0x8000_0002, 0, 0),
        NOT_SUPPORTED
    );
}

#[test]
fn trng_version_features_and_uuid() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::TrngVersion, 0, 0, 0),
        u64::from(TRNG_VERSION_1_0)
    );
    for id in [
        0x8400_0050u64,
        0x8400_0051,
        0x8400_0052,
        0x8400_0053,
        0xC400_0053,
    ] {
        assert_eq!(x0(&fw, &p, 0, F::TrngFeatures, id, 0, 0), 0, "{id:#x}");
    }
    assert_eq!(
        x0(&fw, &p, 0, F::TrngFeatures, 0x8400_0054, 0, 0),
        NOT_SUPPORTED
    );
    assert_eq!(
        x0(&fw, &p, 0, F::TrngFeatures, 0x8400_0000, 0, 0),
        NOT_SUPPORTED
    );
    let uuid = regs(&fw, &p, 0, F::TrngGetUuid, 0, 0, 0);
    assert_eq!(uuid, TRNG_UUID.map(u64::from));
    assert_ne!(uuid[0], 0xFFFF_FFFF);
}

#[test]
fn trng_rnd64_fills_requested_bits_from_x3_upwards() {
    let (fw, p) = fw(1);
    // The fake yields bytes 0, 1, 2, ...; 72 bits = 9 bytes.
    let r = regs(&fw, &p, 0, F::TrngRnd64, 72, 0, 0);
    assert_eq!(r[0], 0);
    assert_eq!(r[3], u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]));
    assert_eq!(r[2], 8);
    assert_eq!(r[1], 0);
    let r = regs(&fw, &p, 0, F::TrngRnd64, 192, 0, 0);
    assert_ne!(r[1], 0, "all three registers used for 192 bits");
}

#[test]
fn trng_rnd32_masks_to_requested_bits() {
    let (fw, p) = fw(1);
    p.next_random.store(0xFF, Ordering::SeqCst);
    // Bytes 0xFF, 0x00, 0x01 ...: 12 bits keep 0xFF and the low nibble of 0x00.
    let r = regs(&fw, &p, 0, F::TrngRnd32, 12, 0, 0);
    assert_eq!(r, [0, 0, 0, 0x0FF]);
    let r = regs(&fw, &p, 0, F::TrngRnd32, 96, 0, 0);
    assert!(r[1] <= 0xFFFF_FFFF && r[2] <= 0xFFFF_FFFF && r[3] <= 0xFFFF_FFFF);
    assert_ne!(r[1], 0);
}

#[test]
fn trng_rnd_with_zero_or_too_many_bits_is_invalid_parameters() {
    let (fw, p) = fw(1);
    assert_eq!(
        regs(&fw, &p, 0, F::TrngRnd32, 0, 9, 9),
        [TRNG_INVALID_PARAMETERS, 0, 0, 0]
    );
    assert_eq!(
        regs(&fw, &p, 0, F::TrngRnd32, 97, 0, 0)[0],
        TRNG_INVALID_PARAMETERS
    );
    assert_eq!(
        regs(&fw, &p, 0, F::TrngRnd64, 193, 0, 0)[0],
        TRNG_INVALID_PARAMETERS
    );
}

#[test]
fn trng_rnd_without_host_entropy_is_no_entropy() {
    let (fw, p) = fw(1);
    p.entropy_fails.store(true, Ordering::SeqCst);
    assert_eq!(
        regs(&fw, &p, 0, F::TrngRnd64, 64, 1, 1),
        [TRNG_NO_ENTROPY, 0, 0, 0]
    );
}

#[test]
fn trng_rnd64_from_aarch32_caller_is_not_supported() {
    let (fw, p) = fw(1);
    let c = GuestCall {
        caller_aarch32: true,
        ..call(0, F::TrngRnd64, 64, 0, 0)
    };
    assert!(
        matches!(fw.handle_call(&c, &p), CallOutcome::Return { regs } if regs[0] == NOT_SUPPORTED)
    );
    let c = GuestCall {
        caller_aarch32: true,
        ..call(0, F::TrngFeatures, 0xC400_0053, 0, 0)
    };
    assert!(
        matches!(fw.handle_call(&c, &p), CallOutcome::Return { regs } if regs[0] == NOT_SUPPORTED)
    );
}

#[test]
fn trng_is_not_supported_when_disabled() {
    let cfg = FirmwareConfig {
        features: FeatureSet {
            trng: false,
            ..FeatureSet::ALL
        },
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(x0(&fw, &p, 0, F::TrngVersion, 0, 0, 0), NOT_SUPPORTED);
    assert_eq!(x0(&fw, &p, 0, F::TrngRnd64, 64, 0, 0), NOT_SUPPORTED);
}
