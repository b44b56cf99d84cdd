//! Which functions a VM offers: one decision shared by dispatch and PSCI_FEATURES.
//!
//! [`function_flags`] returns `Some(flags)` for exactly the functions that dispatch executes
//! and `None` for those it answers NOT_SUPPORTED, so PSCI_FEATURES (DEN0022 F.b §5.1.15) can
//! never disagree with what a call actually does.

use crate::config::{FirmwareConfig, PowerStateFormat, PsciVersion, WorkaroundState};
use crate::ids::FunctionId;

/// PSCI_FEATURES flag for CPU_SUSPEND: OS-initiated mode supported (§5.1.15, table 11).
pub const CPU_SUSPEND_OS_INITIATED: u32 = 1 << 0;
/// PSCI_FEATURES flag for CPU_SUSPEND: power_state uses the extended StateID format.
pub const CPU_SUSPEND_EXTENDED_STATE_ID: u32 = 1 << 1;
/// PSCI_FEATURES flag for SYSTEM_OFF2: HIBERNATE_OFF (type 1) supported (§5.1.15).
pub const SYSTEM_OFF2_HIBERNATE_OFF: u32 = 1 << 0;

/// The PSCI_FEATURES answer for `fid` when `fid` is available to the caller, or `None`
/// when calling it returns NOT_SUPPORTED.
///
/// A function is available when the VM's PSCI version defines it, its optional group is
/// enabled, and the caller can make it (an AArch32 caller cannot make SMC64 calls,
/// DEN0028 §2). MIGRATE and MIGRATE_INFO_UP_CPU are never available: a VM has no Trusted
/// OS, so MIGRATE_INFO_TYPE answers 2 and the spec lets both report NOT_SUPPORTED (§5.1.6).
pub fn function_flags(
    config: &FirmwareConfig,
    fid: FunctionId,
    caller_aarch32: bool,
) -> Option<u32> {
    if config.psci_version < fid.since() || (caller_aarch32 && fid.is_smc64()) {
        return None;
    }
    let f = &config.features;
    let enabled = match fid {
        FunctionId::PsciVersion
        | FunctionId::CpuSuspend32
        | FunctionId::CpuSuspend64
        | FunctionId::CpuOff
        | FunctionId::CpuOn32
        | FunctionId::CpuOn64
        | FunctionId::AffinityInfo32
        | FunctionId::AffinityInfo64
        | FunctionId::MigrateInfoType
        | FunctionId::SystemOff
        | FunctionId::SystemReset
        | FunctionId::PsciFeatures => true,
        FunctionId::Migrate32
        | FunctionId::Migrate64
        | FunctionId::MigrateInfoUpCpu32
        | FunctionId::MigrateInfoUpCpu64 => false,
        FunctionId::CpuFreeze => f.cpu_freeze,
        FunctionId::CpuDefaultSuspend32 | FunctionId::CpuDefaultSuspend64 => f.cpu_default_suspend,
        FunctionId::NodeHwState32 | FunctionId::NodeHwState64 => f.node_hw_state,
        FunctionId::SystemSuspend32 | FunctionId::SystemSuspend64 => f.system_suspend,
        FunctionId::SetSuspendMode => f.os_initiated,
        FunctionId::StatResidency32
        | FunctionId::StatResidency64
        | FunctionId::StatCount32
        | FunctionId::StatCount64 => f.stats,
        FunctionId::SystemReset2_32 | FunctionId::SystemReset2_64 => f.system_reset2,
        FunctionId::MemProtect
        | FunctionId::MemProtectCheckRange32
        | FunctionId::MemProtectCheckRange64 => f.mem_protect,
        FunctionId::SystemOff2_32 | FunctionId::SystemOff2_64 => f.system_off2,
        FunctionId::SmcccVersion | FunctionId::SmcccArchFeatures => true,
        FunctionId::SmcccArchSocId => f.soc_id,
        FunctionId::SmcccArchWorkaround1 => config.workarounds.wa1 != WorkaroundState::Unavailable,
        FunctionId::SmcccArchWorkaround2 => config.workarounds.wa2 != WorkaroundState::Unavailable,
        FunctionId::SmcccArchWorkaround3 => config.workarounds.wa3 != WorkaroundState::Unavailable,
        FunctionId::TrngVersion
        | FunctionId::TrngFeatures
        | FunctionId::TrngGetUuid
        | FunctionId::TrngRnd32
        | FunctionId::TrngRnd64 => f.trng,
    };
    if !enabled {
        return None;
    }
    Some(match fid {
        FunctionId::CpuSuspend32 | FunctionId::CpuSuspend64 => cpu_suspend_flags(config),
        FunctionId::SystemOff2_32 | FunctionId::SystemOff2_64 => SYSTEM_OFF2_HIBERNATE_OFF,
        _ => 0,
    })
}

fn cpu_suspend_flags(config: &FirmwareConfig) -> u32 {
    let mut flags = 0;
    if config.effective_format() == PowerStateFormat::Extended {
        flags |= CPU_SUSPEND_EXTENDED_STATE_ID;
    }
    if config.features.os_initiated && config.psci_version >= PsciVersion::V1_0 {
        flags |= CPU_SUSPEND_OS_INITIATED;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FeatureSet;

    #[test]
    fn version_gating_hides_functions_newer_than_the_offered_version() {
        let mut cfg = FirmwareConfig::default();
        for version in PsciVersion::ALL {
            cfg.psci_version = version;
            for &fid in FunctionId::ALL {
                if fid.since() > version {
                    assert_eq!(function_flags(&cfg, fid, false), None, "{fid} at {version}");
                }
            }
        }
        cfg.psci_version = PsciVersion::V1_2;
        assert_eq!(function_flags(&cfg, FunctionId::SystemOff2_64, false), None);
        assert_eq!(
            function_flags(&cfg, FunctionId::SystemReset2_64, false),
            Some(0)
        );
    }

    #[test]
    fn smc64_functions_are_unavailable_to_aarch32_callers() {
        let cfg = FirmwareConfig::default();
        assert_eq!(function_flags(&cfg, FunctionId::CpuOn64, true), None);
        assert_eq!(function_flags(&cfg, FunctionId::CpuOn32, true), Some(0));
    }

    #[test]
    fn disabled_groups_are_unavailable() {
        let cfg = FirmwareConfig {
            features: FeatureSet::NONE,
            ..FirmwareConfig::default()
        };
        assert_eq!(
            function_flags(&cfg, FunctionId::SystemSuspend64, false),
            None
        );
        assert_eq!(function_flags(&cfg, FunctionId::TrngRnd64, false), None);
        assert_eq!(function_flags(&cfg, FunctionId::CpuOn64, false), Some(0));
    }

    #[test]
    fn cpu_suspend_flags_report_format_and_os_initiated_mode() {
        let mut cfg = FirmwareConfig::default();
        assert_eq!(
            function_flags(&cfg, FunctionId::CpuSuspend64, false),
            Some(0b11)
        );
        cfg.suspend_states.format = PowerStateFormat::Original;
        cfg.features.os_initiated = false;
        assert_eq!(
            function_flags(&cfg, FunctionId::CpuSuspend64, false),
            Some(0)
        );
    }

    #[test]
    fn system_off2_flags_report_hibernate_off() {
        let cfg = FirmwareConfig::default();
        assert_eq!(
            function_flags(&cfg, FunctionId::SystemOff2_32, false),
            Some(1)
        );
    }
}
