//! System-scoped PSCI functions and PSCI_FEATURES: every function and error code.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use vpsci_firmware::{
    CallOutcome, EntryPoint, FeatureSet, FirmwareConfig, FunctionId as F, Mpidr, PowerState,
    PsciError, PsciVersion, SuspendKind, SuspendMode, SystemEvent, VcpuId, WakeOutcome,
};

fn mpidr(i: u32) -> u64 {
    Mpidr::from_index(i).raw()
}

fn quiesced_and_resumed(p: &vpsci_firmware::testing::FakePlatform, times: usize) {
    assert_eq!(
        p.quiesce_calls.load(Ordering::SeqCst),
        times,
        "quiesce calls"
    );
    assert_eq!(
        p.quiesce_depth.load(Ordering::SeqCst),
        0,
        "every quiesce resumed"
    );
}

// ---- SYSTEM_OFF (§5.1.9) / SYSTEM_RESET (§5.1.11) ----

#[test]
fn system_off_quiesces_reports_off_and_resumes() {
    let (fw, p) = fw(2);
    let out = fw.handle_call(&call(0, F::SystemOff, 1, 2, 3), &p);
    assert_eq!(
        out,
        CallOutcome::SystemEvent {
            event: SystemEvent::Off,
        }
    );
    assert_eq!(p.events(), vec![(VcpuId::new(0), SystemEvent::Off)]);
    quiesced_and_resumed(&p, 1);
}

#[test]
fn a_system_call_whose_quiesce_fails_answers_internal_failure_and_changes_nothing() {
    for (fid, x1) in [
        (F::SystemOff, 0),
        (F::SystemReset, 0),
        (F::SystemSuspend64, RAM),
    ] {
        let (fw, p) = fw(2);
        p.quiesce_fails.store(true, Ordering::SeqCst);
        let out = fw.handle_call(&call(0, fid, x1, 0, 0), &p);
        assert_eq!(
            out,
            CallOutcome::Return {
                regs: [PsciError::InternalFailure.to_register(), x1, 0, 0]
            },
            "{fid:?}"
        );
        assert!(p.events().is_empty(), "{fid:?}: no event put to the VMM");
        assert!(p.transitions().is_empty(), "{fid:?}");
        assert_eq!(p.quiesce_depth.load(Ordering::SeqCst), 0, "nothing held");
        assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
    }
}

#[test]
fn a_refused_system_event_answers_internal_failure_and_changes_nothing() {
    for (fid, x1, event) in [
        (F::SystemOff2_64, 1, SystemEvent::Hibernate),
        (F::SystemOff, 0, SystemEvent::Off),
        (F::SystemReset, 0, SystemEvent::Reset),
    ] {
        let (fw, p) = fw(2);
        p.refuse_system_events.store(true, Ordering::SeqCst);
        let states = |fw: &vpsci_firmware::Firmware| {
            [
                fw.power_state(VcpuId::new(0)),
                fw.power_state(VcpuId::new(1)),
            ]
        };
        let before = states(&fw);
        let out = fw.handle_call(&call(0, fid, x1, 0, 8), &p);
        assert_eq!(
            out,
            CallOutcome::Return {
                regs: [PsciError::InternalFailure.to_register(), x1, 0, 8]
            },
            "{fid:?}"
        );
        assert_eq!(p.events(), vec![(VcpuId::new(0), event)], "asked once");
        assert_eq!(states(&fw), before, "{fid:?}");
        assert!(p.transitions().is_empty(), "{fid:?}");
        quiesced_and_resumed(&p, 1);
        // The VM carries on: the caller can still make calls.
        assert_eq!(x0(&fw, &p, 0, F::PsciVersion, 0, 0, 0), 0x1_0003);
    }
}

#[test]
fn system_reset_reports_cold_reset() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::SystemReset, 0, 0, 0), &p);
    assert!(matches!(
        out,
        CallOutcome::SystemEvent {
            event: SystemEvent::Reset,
            ..
        }
    ));
    assert_eq!(p.events(), vec![(VcpuId::new(0), SystemEvent::Reset)]);
    quiesced_and_resumed(&p, 1);
}

#[test]
fn system_call_from_a_vcpu_that_is_not_on_is_denied_without_event() {
    let (fw, p) = fw(2);
    assert_eq!(
        x0(&fw, &p, 1, F::SystemOff, 0, 0, 0),
        err(PsciError::Denied)
    );
    assert!(p.events().is_empty());
    quiesced_and_resumed(&p, 1);
}

// ---- SYSTEM_OFF2 (§5.1.10) ----

#[test]
fn system_off2_hibernate_reports_hibernate() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::SystemOff2_64, 1, 0, 0), &p);
    assert_eq!(
        out,
        CallOutcome::SystemEvent {
            event: SystemEvent::Hibernate,
        }
    );
    assert_eq!(p.events(), vec![(VcpuId::new(0), SystemEvent::Hibernate)]);
}

#[test]
fn system_off2_type_0_selects_the_default_type_hibernate_off() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::SystemOff2_32, 0, 0, 0), &p);
    assert_eq!(
        out,
        CallOutcome::SystemEvent {
            event: SystemEvent::Hibernate,
        }
    );
    assert_eq!(p.events(), vec![(VcpuId::new(0), SystemEvent::Hibernate)]);
}

#[test]
fn system_off2_with_unknown_type_or_nonzero_cookie_is_invalid_parameters_without_quiesce() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::SystemOff2_64, 2, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SystemOff2_64, 1, 1, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SystemOff2_64, 1 << 31 | 1, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert!(p.events().is_empty());
    quiesced_and_resumed(&p, 0);
}

#[test]
fn system_off2_smc32_ignores_upper_cookie_bits() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::SystemOff2_32, 1, 0xFFFF_FFFF_0000_0000, 0), &p);
    assert!(matches!(
        out,
        CallOutcome::SystemEvent {
            event: SystemEvent::Hibernate,
            ..
        }
    ));
}

#[test]
fn system_off2_is_not_supported_when_disabled() {
    let cfg = FirmwareConfig {
        features: FeatureSet {
            system_off2: false,
            ..FeatureSet::ALL
        },
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(
        x0(&fw, &p, 0, F::SystemOff2_64, 1, 0, 0),
        err(PsciError::NotSupported)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::PsciFeatures, 0xC400_0015, 0, 0),
        err(PsciError::NotSupported)
    );
}

// ---- SYSTEM_RESET2 (§5.1.12) ----

#[test]
fn system_reset2_warm_reset_passes_the_cookie() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(&call(0, F::SystemReset2_64, 0, 0x1234_5678_9ABC, 0), &p);
    assert!(matches!(
        out,
        CallOutcome::SystemEvent {
            event: SystemEvent::WarmReset {
                cookie: 0x1234_5678_9ABC
            },
            ..
        }
    ));
}

#[test]
fn system_reset2_vendor_type_passes_type_and_cookie() {
    let (fw, p) = fw(1);
    let out = fw.handle_call(
        &call(0, F::SystemReset2_32, 0x8000_0007, 0xFFFF_FFFF_0000_0042, 0),
        &p,
    );
    let event = SystemEvent::VendorReset {
        reset_type: 0x8000_0007,
        cookie: 0x42,
    };
    assert!(matches!(out, CallOutcome::SystemEvent { event: e, .. } if e == event));
    assert_eq!(p.events(), vec![(VcpuId::new(0), event)]);
}

#[test]
fn system_reset2_unknown_architectural_type_is_invalid_parameters() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::SystemReset2_64, 1, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::SystemReset2_64, 0x7FFF_FFFF, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert!(p.events().is_empty());
}

// ---- SYSTEM_SUSPEND (§5.1.19) ----

#[test]
fn system_suspend_with_other_cpus_off_suspends_and_only_caller_resumes() {
    let (fw, p) = fw(3);
    let out = fw.handle_call(&call(0, F::SystemSuspend64, RAM + 0x80, 0x55, 0), &p);
    assert_eq!(
        out,
        CallOutcome::Suspend {
            kind: SuspendKind::System
        }
    );
    quiesced_and_resumed(&p, 1);
    assert_eq!(
        fw.vcpu_woken(VcpuId::new(0), &p),
        WakeOutcome::ResumeAt {
            entry: EntryPoint {
                pc: RAM + 0x80,
                context_id: 0x55,
                aarch32: false
            }
        }
    );
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
    assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::Off);
    assert!(p.starts().is_empty());
}

#[test]
fn system_suspend_with_another_cpu_on_pending_or_suspended_is_denied_and_changes_nothing() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert_eq!(
        x0(&fw, &p, 0, F::SystemSuspend64, RAM, 0, 0),
        err(PsciError::Denied)
    );
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, 0, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(
        x0(&fw, &p, 0, F::SystemSuspend64, RAM, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);

    let (fw2, p2) = common::fw(2);
    assert_eq!(x0(&fw2, &p2, 0, F::CpuOn64, mpidr(1), RAM, 0), 0);
    assert_eq!(
        x0(&fw2, &p2, 0, F::SystemSuspend32, RAM, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(fw2.power_state(VcpuId::new(1)), PowerState::OnPending);
}

#[test]
fn system_suspend_with_bad_entry_is_invalid_address_and_changes_nothing() {
    let (fw, p) = fw(2);
    for pc in [0, RAM + 1, RAM_END] {
        assert_eq!(
            x0(&fw, &p, 0, F::SystemSuspend64, pc, 0, 0),
            err(PsciError::InvalidAddress)
        );
    }
    assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
}

#[test]
fn system_suspend_can_repeat_many_times() {
    let (fw, p) = fw(2);
    for i in 0..100 {
        let out = fw.handle_call(&call(0, F::SystemSuspend64, RAM, i, 0), &p);
        assert_eq!(
            out,
            CallOutcome::Suspend {
                kind: SuspendKind::System
            }
        );
        assert!(
            matches!(fw.vcpu_woken(VcpuId::new(0), &p), WakeOutcome::ResumeAt { entry } if entry.context_id == i)
        );
    }
    quiesced_and_resumed(&p, 100);
}

// ---- PSCI_SET_SUSPEND_MODE (§5.1.20) ----

#[test]
fn set_suspend_mode_switches_between_platform_coordinated_and_os_initiated() {
    let (fw, p) = fw(2);
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0), 0);
    assert_eq!(fw.suspend_mode(), SuspendMode::OsInitiated);
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 0, 0, 0), 0);
    assert_eq!(fw.suspend_mode(), SuspendMode::PlatformCoordinated);
    quiesced_and_resumed(&p, 2);
}

#[test]
fn set_suspend_mode_with_unknown_mode_is_invalid_parameters() {
    let (fw, p) = fw(1);
    assert_eq!(
        x0(&fw, &p, 0, F::SetSuspendMode, 2, 0, 0),
        err(PsciError::InvalidParameters)
    );
    assert_eq!(fw.suspend_mode(), SuspendMode::PlatformCoordinated);
}

#[test]
fn set_suspend_mode_while_another_cpu_is_suspended_is_denied() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, 0, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(
        x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(fw.suspend_mode(), SuspendMode::PlatformCoordinated);
}

#[test]
fn set_suspend_mode_to_os_initiated_allows_a_core_in_cpu_default_suspend() {
    let (fw, p) = fw(3);
    bring_up(&fw, &p, 1);
    bring_up(&fw, &p, 2);
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuDefaultSuspend64, RAM, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(
        x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0),
        0,
        "others ON or default-suspended"
    );
    assert_eq!(fw.suspend_mode(), SuspendMode::OsInitiated);
}

#[test]
fn set_suspend_mode_back_to_platform_coordinated_needs_every_other_core_off() {
    let (fw, p) = fw(2);
    bring_up(&fw, &p, 1);
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::SetSuspendMode, 0, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(fw.suspend_mode(), SuspendMode::OsInitiated);
    assert_eq!(
        fw.handle_call(&call(1, F::CpuOff, 0, 0, 0), &p),
        CallOutcome::PowerOff
    );
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 0, 0, 0), 0);
    assert_eq!(fw.suspend_mode(), SuspendMode::PlatformCoordinated);
}

#[test]
fn set_suspend_mode_to_the_current_mode_always_succeeds() {
    let (fw, p) = fw(2);
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(1), RAM, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 0, 0, 0), 0);
    assert_eq!(
        x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0),
        err(PsciError::Denied),
        "a core is starting"
    );
}

#[test]
fn reset_returns_suspend_mode_to_platform_coordinated() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0), 0);
    fw.reset();
    assert_eq!(fw.suspend_mode(), SuspendMode::PlatformCoordinated);
}

// ---- PSCI_FEATURES (§5.1.15) ----

#[test]
fn psci_features_reports_cpu_suspend_flags() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0x8400_0001, 0, 0), 0b11);
    let cfg = FirmwareConfig {
        features: FeatureSet {
            os_initiated: false,
            ..FeatureSet::ALL
        },
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0xC400_0001, 0, 0), 0b10);
    assert_eq!(
        x0(&fw, &p, 0, F::PsciFeatures, 0x8400_000F, 0, 0),
        err(PsciError::NotSupported)
    );
}

#[test]
fn psci_features_reports_hibernate_off_for_system_off2() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0x8400_0015, 0, 0), 1);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0xC400_0015, 0, 0), 1);
}

#[test]
fn psci_features_of_unknown_or_non_psci_ids_is_not_supported() {
    let (fw, p) = fw(1);
    for id in [0x8400_00FF, 0xFFFF_FFFF, 0, 0x8400_0050, 0x8000_0001] {
        assert_eq!(
            x0(&fw, &p, 0, F::PsciFeatures, id, 0, 0),
            err(PsciError::NotSupported),
            "{id:#x}"
        );
    }
}

#[test]
fn psci_features_reports_smccc_version_and_system_suspend() {
    let (fw, p) = fw(1);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0x8000_0000, 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0x8400_000E, 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0xC400_000E, 0, 0), 0);
}

#[test]
fn psci_features_follows_version_gating() {
    let cfg = FirmwareConfig {
        psci_version: PsciVersion::V1_0,
        ..FirmwareConfig::default()
    };
    let (fw, p) = fw_with(cfg, 1);
    assert_eq!(
        x0(&fw, &p, 0, F::PsciFeatures, 0xC400_0012, 0, 0),
        err(PsciError::NotSupported)
    );
    assert_eq!(
        x0(&fw, &p, 0, F::PsciFeatures, 0x8400_0013, 0, 0),
        err(PsciError::NotSupported)
    );
    assert_eq!(x0(&fw, &p, 0, F::PsciFeatures, 0x8400_0010, 0, 0), 0);
}

// ---- optional groups ----

#[test]
fn every_disabled_group_answers_not_supported_for_its_functions() {
    type Toggle = fn(&mut FeatureSet);
    let groups: [(Toggle, &[F]); 9] = [
        (
            |f| f.system_suspend = false,
            &[F::SystemSuspend32, F::SystemSuspend64],
        ),
        (
            |f| f.system_off2 = false,
            &[F::SystemOff2_32, F::SystemOff2_64],
        ),
        (
            |f| f.system_reset2 = false,
            &[F::SystemReset2_32, F::SystemReset2_64],
        ),
        (
            |f| f.mem_protect = false,
            &[
                F::MemProtect,
                F::MemProtectCheckRange32,
                F::MemProtectCheckRange64,
            ],
        ),
        (|f| f.cpu_freeze = false, &[F::CpuFreeze]),
        (
            |f| f.cpu_default_suspend = false,
            &[F::CpuDefaultSuspend32, F::CpuDefaultSuspend64],
        ),
        (
            |f| f.node_hw_state = false,
            &[F::NodeHwState32, F::NodeHwState64],
        ),
        (|f| f.os_initiated = false, &[F::SetSuspendMode]),
        (
            |f| f.stats = false,
            &[
                F::StatResidency32,
                F::StatResidency64,
                F::StatCount32,
                F::StatCount64,
            ],
        ),
    ];
    for (disable, fids) in groups {
        let mut features = FeatureSet::ALL;
        disable(&mut features);
        let cfg = FirmwareConfig {
            features,
            ..FirmwareConfig::default()
        };
        let (fw, p) = fw_with(cfg, 1);
        for &fid in fids {
            assert_eq!(
                x0(&fw, &p, 0, fid, 0, RAM, 0),
                err(PsciError::NotSupported),
                "{fid}"
            );
            assert_eq!(
                x0(&fw, &p, 0, F::PsciFeatures, u64::from(fid.raw()), 0, 0),
                err(PsciError::NotSupported),
                "{fid}"
            );
        }
        assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
        assert!(p.events().is_empty());
    }
}

#[test]
fn cpu_suspend_from_a_vcpu_that_is_not_on_is_denied() {
    let (fw, p) = fw(2);
    assert_eq!(
        x0(&fw, &p, 1, F::CpuSuspend64, 0, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(
        x0(&fw, &p, 1, F::CpuDefaultSuspend64, RAM, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(
        x0(&fw, &p, 1, F::SystemSuspend64, RAM, 0, 0),
        err(PsciError::Denied)
    );
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
}

// ---- Nothing is decided after a committed system event (until the VM is reset) ----

/// Found by the hostile guest `system-reset-race-8`: a vCPU thread on its way into the
/// engine when SYSTEM_RESET quiesced the VM (out of the guest, not out of the engine) had
/// its CPU_ON decided after the reset had committed.
#[test]
fn calls_and_starts_after_a_committed_reset_change_nothing_until_the_vm_is_reset() {
    for event_call in [
        F::SystemReset,
        F::SystemOff,
        F::SystemOff2_64,
        F::SystemReset2_64,
    ] {
        let (fw, p) = fw(4);
        bring_up(&fw, &p, 1);
        // A start committed before the reset whose target has not run yet.
        assert_eq!(x0(&fw, &p, 1, F::CpuOn64, mpidr(2), RAM, 7), 0);
        let out = fw.handle_call(&call(0, event_call, 0, 0, 0), &p);
        assert!(
            matches!(out, CallOutcome::SystemEvent { .. }),
            "{event_call:?}: {out:?}"
        );
        assert!(fw.is_halted(), "{event_call:?}");
        let before = p.transitions().len();
        // vCPU 1 was on its way in with a CPU_ON, a CPU_OFF and a system call.
        for (fid, x1, x2) in [
            (F::CpuOn64, mpidr(3), RAM),
            (F::CpuOff, 0, 0),
            (F::SystemOff, 0, 0),
            (F::AffinityInfo64, mpidr(3), 0),
        ] {
            assert_eq!(
                x0(&fw, &p, 1, fid, x1, x2, 0),
                err(PsciError::InternalFailure),
                "{event_call:?} then {fid:?}"
            );
        }
        assert!(
            !fw.vcpu_started(VcpuId::new(2), &p),
            "{event_call:?}: the pending start is dropped"
        );
        assert_eq!(
            p.transitions().len(),
            before,
            "{event_call:?}: no transition"
        );
        assert_eq!(p.events().len(), 1, "{event_call:?}: one system event");
        assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::On);
        assert_eq!(fw.power_state(VcpuId::new(3)), PowerState::Off);
        // The VMM resets the VM: the engine decides again.
        fw.reset();
        assert!(!fw.is_halted());
        assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(3), RAM, 0), 0);
        assert!(fw.vcpu_started(VcpuId::new(3), &p));
    }
}

#[test]
fn a_refused_hibernate_or_a_suspend_does_not_halt_the_engine() {
    let (fw, p) = fw(2);
    p.refuse_system_events.store(true, Ordering::SeqCst);
    assert_eq!(
        x0(&fw, &p, 0, F::SystemOff2_64, 1, 0, 0),
        err(PsciError::InternalFailure)
    );
    assert!(!fw.is_halted());
    p.refuse_system_events.store(false, Ordering::SeqCst);
    let out = fw.handle_call(&call(0, F::SystemSuspend64, RAM, 0, 0), &p);
    assert!(matches!(out, CallOutcome::Suspend { .. }), "{out:?}");
    assert!(!fw.is_halted());
}
