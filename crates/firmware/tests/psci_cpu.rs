//! Per-CPU PSCI functions: every function and every error code it can return.

mod common;

use common::*;
use vpsci_firmware::{
    encode_power_state, CallOutcome, Conduit, CpuPowerState, EntryPoint, FirmwareConfig,
    FunctionId as F, GuestCall, Mpidr, OnPending, PowerState, PowerStateFormat, PsciError,
    PsciVersion, SuspendKind, Transition, VcpuId, WakeOutcome,
};

fn mpidr(i: u32) -> u64 {
    Mpidr::from_index(i).raw()
}

const STANDBY: u64 = 0;
const POWERDOWN: u64 = 1 << 30;

// ---- PSCI_VERSION (§5.1.1) ----

#[test]
fn psci_version_reports_the_configured_version() {
    for version in PsciVersion::ALL {
        let (fw, p) = fw_with(
            FirmwareConfig {
                psci_version: version,
                ..FirmwareConfig::default()
            },
            1,
        );
        assert_eq!(
            x0(&fw, &p, 0, F::PsciVersion, 0, 0, 0),
            u64::from(version.encoded())
        );
    }
}

#[test]
fn default_version_is_1_3() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::PsciVersion, 0, 0, 0), 0x1_0003);
}

// ---- decoding at the edge ----

#[test]
fn unknown_function_id_is_not_supported_and_keeps_x1_to_x3() {
    let (fw, p) = fw(1);
    let r = regs(&fw, &p, 0, F::PsciVersion, 0, 0, 0);
    assert_eq!(r[0], 0x1_0003);
    let unknown = fw.handle_call(
        &vpsci_firmware::testing::call(0, [0x8400_00FF, 7, 8, 9]),
        &p,
    );
    assert_eq!(
        unknown,
        CallOutcome::Return {
            regs: [u64::MAX, 7, 8, 9]
        }
    );
}

#[test]
fn upper_half_of_x0_is_ignored_for_the_function_id() {
    let (fw, p) = fw(1);
    let c = vpsci_firmware::testing::call(0, [0xDEAD_BEEF_8400_0000, 0, 0, 0]);
    assert_eq!(
        fw.handle_call(&c, &p),
        CallOutcome::Return {
            regs: [0x1_0003, 0, 0, 0]
        }
    );
}

#[test]
fn call_through_the_wrong_conduit_is_not_supported() {
    let (fw, p) = fw(1);
    let c = GuestCall {
        conduit: Conduit::Smc,
        ..call(0, F::PsciVersion, 0, 0, 0)
    };
    assert_eq!(
        fw.handle_call(&c, &p),
        CallOutcome::Return {
            regs: [u64::MAX, 0, 0, 0]
        }
    );
}

#[test]
fn smc64_call_from_aarch32_caller_is_not_supported() {
    let (fw, p) = fw(2);
    let c = GuestCall {
        caller_aarch32: true,
        ..call(0, F::CpuOn64, mpidr(1), RAM, 0)
    };
    assert_eq!(
        fw.handle_call(&c, &p),
        CallOutcome::Return {
            regs: [u64::MAX, mpidr(1), RAM, 0]
        }
    );
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
}

#[test]
fn functions_newer_than_the_offered_version_are_not_supported() {
    let (fw, p) = fw_with(
        FirmwareConfig {
            psci_version: PsciVersion::V0_2,
            ..FirmwareConfig::default()
        },
        1,
    );
    assert_eq!(
        x0(&fw, &p, 0, F::PsciFeatures, 0x8400_0000, 0, 0),
        err(PsciError::NotSupported)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SystemSuspend64, RAM, 0, 0),
        err(PsciError::NotSupported)
    );
    let (fw, p) = fw_with(
        FirmwareConfig {
            psci_version: PsciVersion::V1_1,
            ..FirmwareConfig::default()
        },
        1,
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SystemOff2_64, 1, 0, 0),
        err(PsciError::NotSupported)
    );
    assert_eq!(
        x0(
            &fw,
            &p,
            0,
            F::PsciFeatures,
            u64::from(F::SystemOff2_64.raw()),
            0,
            0
        ),
        err(PsciError::NotSupported)
    );
    assert!(p.events().is_empty());
}

// ---- CPU_ON (§5.1.4) ----

#[test]
fn cpu_on_of_off_cpu_succeeds_and_requests_start_at_entry_with_context() {
    let (fw, p) = fw(2);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(1), RAM + 0x100, 0xC0FFEE),
        0
    );
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::OnPending);
    let entry = EntryPoint {
        pc: RAM + 0x100,
        context_id: 0xC0FFEE,
        aarch32: false,
    };
    assert_eq!(p.starts(), vec![(VcpuId::new(1), entry)]);
    assert_eq!(fw.pending_start(VcpuId::new(1)), Some(entry));
    fw.vcpu_started(VcpuId::new(1), &p);
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::On);
    assert_eq!(fw.pending_start(VcpuId::new(1)), None);
}

fn reporting_on_pending() -> FirmwareConfig {
    FirmwareConfig {
        on_pending: OnPending::Reported,
        ..FirmwareConfig::default()
    }
}

#[test]
fn cpu_on_while_start_in_flight_returns_already_on_by_default() {
    let (fw, p) = fw(3);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0),
        err(PsciError::AlreadyOn)
    );
    assert_eq!(p.starts().len(), 1);
    assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::OnPending);
}

#[test]
fn cpu_on_while_start_in_flight_returns_on_pending_when_reported() {
    let (fw, p) = fw_with(reporting_on_pending(), 3);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0),
        err(PsciError::OnPending)
    );
    assert_eq!(p.starts().len(), 1);
}

#[test]
fn cpu_on_reports_the_targets_transitions() {
    let (fw, p) = fw(2);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(1), RAM, 0), 0);
    assert!(fw.vcpu_started(VcpuId::new(1), &p));
    assert!(
        !fw.vcpu_started(VcpuId::new(1), &p),
        "a second start changes nothing"
    );
    let t = |from, to| Transition {
        vcpu: VcpuId::new(1),
        from,
        to,
    };
    assert_eq!(
        p.transitions(),
        vec![
            t(PowerState::Off, PowerState::OnPending),
            t(PowerState::OnPending, PowerState::On)
        ]
    );
}

#[test]
fn cpu_on_of_running_cpu_returns_already_on() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(1), RAM, 0),
        err(PsciError::AlreadyOn)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(0), RAM, 0),
        err(PsciError::AlreadyOn)
    );
    assert_eq!(p.starts().len(), 1);
}

#[test]
fn cpu_on_with_bad_mpidr_is_invalid_parameters() {
    let (fw, p) = fw(2);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, 0xFFFF_FFFF, RAM, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(7), RAM, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, 1 << 63 | 1, RAM, 0),
        err(PsciError::InvalidParameters)
    );
    assert!(p.starts().is_empty());
}

#[test]
fn cpu_on_with_entry_outside_ram_or_misaligned_is_invalid_address() {
    let (fw, p) = fw(2);
    for pc in [0, RAM - 4, RAM_END, RAM + 2, u64::MAX - 3] {
        assert_eq!(
            x0(&fw, &p, 0, F::CpuOn64, mpidr(1), pc, 0),
            err(PsciError::InvalidAddress),
            "pc {pc:#x}"
        );
    }
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
    assert!(p.starts().is_empty());
}

#[test]
fn cpu_on_smc32_uses_low_32_bits_of_each_argument() {
    let (fw, p) = fw(2);
    let hi = 0xFFFF_FFFF_0000_0000;
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn32, hi | mpidr(1), hi | RAM, hi | 5),
        0
    );
    assert_eq!(p.starts()[0].1.pc, RAM);
    assert_eq!(p.starts()[0].1.context_id, 5);
}

#[test]
fn cpu_on_from_aarch32_caller_starts_target_in_aarch32() {
    let (fw, p) = fw(2);
    let c = GuestCall {
        caller_aarch32: true,
        ..call(0, F::CpuOn32, mpidr(1), RAM + 1, 3)
    };
    assert_eq!(
        fw.handle_call(&c, &p),
        CallOutcome::Return {
            regs: [0, mpidr(1), RAM + 1, 3]
        }
    );
    assert!(p.starts()[0].1.aarch32);
}

// ---- CPU_OFF (§5.1.3) ----

#[test]
fn cpu_off_stops_caller_and_affinity_info_reports_off() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert_eq!(
        fw.handle_call(&call(1, F::CpuOff, 0, 0, 0), &p),
        CallOutcome::PowerOff
    );
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(1), 0, 0), 1);
    // It can be started again: exactly one SUCCESS per OFF -> ON transition.
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(1), RAM, 0), 0);
}

#[test]
fn cpu_off_from_a_vcpu_that_is_not_on_is_denied() {
    let (fw, p) = fw(2);
    assert_eq!(x0(&fw, &p, 1, F::CpuOff, 0, 0, 0), err(PsciError::Denied));
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
}

// ---- CPU_SUSPEND (§5.1.2) ----

#[test]
fn cpu_suspend_standby_returns_success_to_the_caller_on_wake() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::CpuSuspend64, STANDBY, 0x11, 0x22), &p);
    assert_eq!(
        out,
        CallOutcome::Suspend {
            kind: SuspendKind::Standby
        }
    );
    assert_eq!(
        fw.power_state(VcpuId::new(0)),
        PowerState::Suspended {
            kind: SuspendKind::Standby
        }
    );
    assert_eq!(
        fw.vcpu_woken(VcpuId::new(0), &p),
        WakeOutcome::Return {
            regs: [0, STANDBY, 0x11, 0x22]
        }
    );
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
}

#[test]
fn cpu_suspend_powerdown_resumes_at_entry_with_context_id() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::CpuSuspend64, POWERDOWN, RAM + 0x40, 0xABC), &p);
    assert_eq!(
        out,
        CallOutcome::Suspend {
            kind: SuspendKind::Powerdown
        }
    );
    assert_eq!(
        fw.vcpu_woken(VcpuId::new(0), &p),
        WakeOutcome::ResumeAt {
            entry: EntryPoint {
                pc: RAM + 0x40,
                context_id: 0xABC,
                aarch32: false
            }
        }
    );
    assert_eq!(fw.vcpu_woken(VcpuId::new(0), &p), WakeOutcome::NotSuspended);
}

#[test]
fn cpu_suspend_powerdown_with_bad_entry_is_invalid_address_and_changes_nothing() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuSuspend64, POWERDOWN, RAM_END, 0),
        err(PsciError::InvalidAddress)
    );
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
}

#[test]
fn cpu_suspend_standby_ignores_the_entry_point() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::CpuSuspend64, STANDBY, 0x3, 0), &p);
    assert!(matches!(out, CallOutcome::Suspend { .. }));
}

#[test]
fn cpu_suspend_with_unknown_power_state_is_invalid_parameters() {
    let (fw, p) = fw(1);
    for ps in [1, POWERDOWN | 1, 1 << 31, 1 << 28, 1 << 16] {
        assert_eq!(
            x0(&fw, &p, 0, F::CpuSuspend64, ps, RAM, 0),
            err(PsciError::InvalidParameters),
            "{ps:#x}"
        );
    }
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
}

#[test]
fn cpu_suspend_original_format_is_used_by_psci_0_2() {
    let cfg = FirmwareConfig {
        psci_version: PsciVersion::V0_2,
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(encode_power_state(&cfg, CpuPowerState::Powerdown), 1 << 16);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuSuspend64, POWERDOWN, RAM, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::CpuSuspend64, 1 << 24 | 1 << 16, RAM, 0),
        err(PsciError::InvalidParameters)
    );
    let out = fw.handle_call(&call(0, F::CpuSuspend64, 1 << 16, RAM, 0), &p);
    assert_eq!(
        out,
        CallOutcome::Suspend {
            kind: SuspendKind::Powerdown
        }
    );
}

#[test]
fn cpu_suspend_with_configured_state_ids() {
    let mut cfg = FirmwareConfig::default();
    cfg.suspend_states.format = PowerStateFormat::Original;
    cfg.suspend_states.standby_id = 0x11;
    cfg.suspend_states.powerdown_id = 0x22;
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuSuspend32, 0, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::CpuSuspend32, 0x22, 0, 0),
        err(PsciError::InvalidParameters)
    );
    let out = fw.handle_call(&call(0, F::CpuSuspend32, 0x1_0022, RAM, 0), &p);
    assert!(matches!(
        out,
        CallOutcome::Suspend {
            kind: SuspendKind::Powerdown
        }
    ));
}

// ---- CPU_DEFAULT_SUSPEND (§5.1.17) ----

#[test]
fn cpu_default_suspend_powers_down_and_resumes_at_entry() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::CpuDefaultSuspend64, RAM + 8, 9, 0), &p);
    assert_eq!(
        out,
        CallOutcome::Suspend {
            kind: SuspendKind::Powerdown
        }
    );
    assert!(matches!(
        fw.vcpu_woken(VcpuId::new(0), &p),
        WakeOutcome::ResumeAt { entry } if entry.pc == RAM + 8 && entry.context_id == 9
    ));
}

#[test]
fn cpu_default_suspend_with_bad_entry_is_invalid_address() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuDefaultSuspend64, 4, 0, 0),
        err(PsciError::InvalidAddress)
    );
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
}

// ---- CPU_FREEZE (§5.1.16) ----

#[test]
fn cpu_freeze_stops_caller_until_reset_and_it_stays_on_for_affinity_info() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert_eq!(
        fw.handle_call(&call(1, F::CpuFreeze, 0, 0, 0), &p),
        CallOutcome::PowerOff
    );
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Frozen);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(1), 0, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::CpuOn64, mpidr(1), RAM, 0),
        err(PsciError::AlreadyOn)
    );
    fw.reset();
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
}

#[test]
fn cpu_freeze_from_a_vcpu_that_is_not_on_is_denied() {
    let (fw, p) = fw(2);
    assert_eq!(
        x0(&fw, &p, 1, F::CpuFreeze, 0, 0, 0),
        err(PsciError::Denied)
    );
}

// ---- AFFINITY_INFO (§5.1.5) ----

#[test]
fn affinity_info_reports_a_starting_cpu_as_on_by_default() {
    let (fw, p) = fw(3);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(0), 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(1), 0, 0), 1);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo32, mpidr(2), 0, 0), 0);
    assert_eq!(x0(&fw, &p, 1, F::AffinityInfo64, mpidr(2), 0, 0), 0);
}

#[test]
fn affinity_info_reports_on_off_and_on_pending_when_reported() {
    let (fw, p) = fw_with(reporting_on_pending(), 3);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(0), 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(1), 0, 0), 1);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo32, mpidr(2), 0, 0), 2);
}

#[test]
fn affinity_info_counts_suspended_cpus_as_on() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, POWERDOWN, RAM, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(1), 0, 0), 0);
}

#[test]
fn affinity_info_aggregates_levels_1_to_3() {
    // 18 vCPUs: cluster 0 = vCPUs 0..15, cluster 1 (Aff1 = 1) = vCPUs 16, 17.
    let (fw, p) = fw_with(reporting_on_pending(), 18);
    let cluster1 = mpidr(16);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, cluster1, 1, 0), 1);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, mpidr(17), 1, 0), 1);
    assert_eq!(
        x0(&fw, &p, 0, F::AffinityInfo64, cluster1, 2, 0),
        0,
        "level 2 includes the boot CPU"
    );
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, 0, 3, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::AffinityInfo32, cluster1 | 0xF, 1, 0),
        1,
        "Aff0 ignored at level 1"
    );
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(17), RAM, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, cluster1, 1, 0), 2);
    fw.vcpu_started(VcpuId::new(17), &p);
    assert_eq!(x0(&fw, &p, 0, F::AffinityInfo64, cluster1, 1, 0), 0);
}

#[test]
fn affinity_info_with_bad_level_or_mpidr_is_invalid_parameters() {
    let (fw, p) = fw(2);
    assert_eq!(
        x0(&fw, &p, 0, F::AffinityInfo64, 0, 4, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::AffinityInfo64, 0xFFFF_FFFF, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::AffinityInfo64, mpidr(5), 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::AffinityInfo64, 1 << 8, 1, 0),
        err(PsciError::InvalidParameters)
    );
}

// ---- MIGRATE family (§5.1.6-5.1.8) ----

#[test]
fn migrate_info_type_reports_no_migration_needed() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::MigrateInfoType, 0, 0, 0), 2);
}

#[test]
fn migrate_and_migrate_info_up_cpu_are_not_supported() {
    let (fw, p) = fw(2);
    for fid in [
        F::Migrate32,
        F::Migrate64,
        F::MigrateInfoUpCpu32,
        F::MigrateInfoUpCpu64,
    ] {
        assert_eq!(
            x0(&fw, &p, 0, fid, mpidr(1), 0, 0),
            err(PsciError::NotSupported),
            "{fid}"
        );
        assert_eq!(
            x0(&fw, &p, 0, F::PsciFeatures, u64::from(fid.raw()), 0, 0),
            err(PsciError::NotSupported)
        );
    }
}

// ---- NODE_HW_STATE (§5.1.18) ----

#[test]
fn node_hw_state_reports_on_off_and_standby() {
    let (fw, p) = fw(3);
    bring_up(&fw, &p, 2);
    assert_eq!(x0(&fw, &p, 0, F::NodeHwState64, mpidr(0), 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::NodeHwState64, mpidr(1), 0, 0), 1);
    assert!(matches!(
        fw.handle_call(&call(2, F::CpuSuspend64, STANDBY, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(x0(&fw, &p, 0, F::NodeHwState32, mpidr(2), 0, 0), 2);
    assert_eq!(
        x0(&fw, &p, 0, F::NodeHwState64, mpidr(1), 1, 0),
        0,
        "cluster has an ON core"
    );
}

#[test]
fn node_hw_state_reports_powered_down_cpu_as_off() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, POWERDOWN, RAM, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(x0(&fw, &p, 0, F::NodeHwState64, mpidr(1), 0, 0), 1);
}

#[test]
fn node_hw_state_with_bad_level_or_mpidr_is_invalid_parameters() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::NodeHwState64, 0, 4, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::NodeHwState64, mpidr(3), 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::NodeHwState64, 1 << 24, 0, 0),
        err(PsciError::InvalidParameters)
    );
}

// ---- PSCI_STAT_RESIDENCY / PSCI_STAT_COUNT (§5.1.21, §5.1.22) ----

#[test]
fn stat_count_and_residency_account_per_vcpu_and_per_state() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    for _ in 0..3 {
        assert!(matches!(
            fw.handle_call(&call(1, F::CpuSuspend64, STANDBY, 0, 0), &p),
            CallOutcome::Suspend { .. }
        ));
        p.clock.advance(2_000_000); // 2 ms
        assert!(matches!(
            fw.vcpu_woken(VcpuId::new(1), &p),
            WakeOutcome::Return { .. }
        ));
    }
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, POWERDOWN, RAM, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    p.clock.advance(5_000);
    fw.vcpu_woken(VcpuId::new(1), &p);
    assert_eq!(x0(&fw, &p, 0, F::StatCount64, mpidr(1), STANDBY, 0), 3);
    assert_eq!(
        x0(&fw, &p, 0, F::StatResidency64, mpidr(1), STANDBY, 0),
        6_000
    );
    assert_eq!(x0(&fw, &p, 0, F::StatCount32, mpidr(1), POWERDOWN, 0), 1);
    assert_eq!(
        x0(&fw, &p, 0, F::StatResidency32, mpidr(1), POWERDOWN, 0),
        5
    );
    assert_eq!(
        x0(&fw, &p, 0, F::StatCount64, mpidr(0), STANDBY, 0),
        0,
        "per vCPU"
    );
}

#[test]
fn stat_of_unknown_cpu_or_power_state_is_zero() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::StatCount64, mpidr(9), STANDBY, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::StatCount64, u64::MAX, STANDBY, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::StatResidency64, 0, 0xFFFF_FFFF, 0), 0);
}

#[test]
fn stat_residency_smc32_saturates_at_32_bits() {
    let (fw, p) = fw(1);
    assert!(matches!(
        fw.handle_call(&call(0, F::CpuSuspend64, STANDBY, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    p.clock.advance(5_000_000_000_000_000); // 5e15 ns = 5e12 us
    fw.vcpu_woken(VcpuId::new(0), &p);
    assert_eq!(
        x0(&fw, &p, 0, F::StatResidency32, 0, STANDBY, 0),
        u64::from(u32::MAX)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::StatResidency64, 0, STANDBY, 0),
        5_000_000_000_000
    );
}

// ---- MEM_PROTECT / MEM_PROTECT_CHECK_RANGE (§5.1.13, §5.1.14) ----

#[test]
fn mem_protect_returns_previous_state_and_reset_clears_it() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::MemProtect, 1, 0, 0), 0);
    assert!(fw.mem_protect_enabled());
    assert_eq!(x0(&fw, &p, 0, F::MemProtect, 1, 0, 0), 1);
    assert_eq!(x0(&fw, &p, 0, F::MemProtect, 0, 0, 0), 1);
    assert!(!fw.mem_protect_enabled());
    assert_eq!(x0(&fw, &p, 0, F::MemProtect, 1, 0, 0), 0);
    fw.reset();
    assert!(!fw.mem_protect_enabled());
}

#[test]
fn mem_protect_check_range_succeeds_inside_ram_and_is_denied_elsewhere() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::MemProtectCheckRange64, RAM, 0x1000, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::MemProtectCheckRange64, RAM_END - 1, 2, 0),
        err(PsciError::Denied)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::MemProtectCheckRange64, 0, 0x1000, 0),
        err(PsciError::Denied)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::MemProtectCheckRange64, RAM, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::MemProtectCheckRange64, u64::MAX, 2, 0),
        err(PsciError::Denied)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::MemProtectCheckRange32, 1 << 32 | RAM, 16, 0),
        0
    );
}

// ---- host-facing lifecycle ----

#[test]
fn vcpu_started_is_a_no_op_unless_on_pending() {
    let (fw, p) = fw(2);
    fw.vcpu_started(VcpuId::new(1), &p);
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
    fw.vcpu_started(VcpuId::new(9), &p);
}

#[test]
fn reset_returns_to_boot_state() {
    let (fw, p) = fw(3);
    bring_up(&fw, &p, 1);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(2), RAM, 0), 0);
    assert!(matches!(
        fw.handle_call(&call(0, F::CpuSuspend64, STANDBY, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    fw.reset();
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
    assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::Off);
    assert_eq!(fw.vcpu_woken(VcpuId::new(0), &p), WakeOutcome::NotSuspended);
}

#[test]
fn call_from_vcpu_outside_topology_is_internal_failure() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 5, F::PsciVersion, 0, 0, 0),
        err(PsciError::InternalFailure)
    );
}
