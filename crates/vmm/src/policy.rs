//! The run policy: how the reason a VM stopped becomes a restart or an exit
//! status and a one-line message (`vpsci run`'s statuses, `--on-reset`). Pure
//! data in, decision out, so it is tested natively; the KVM run loop
//! (`run.rs`) only carries the decision out.

use vpsci_firmware::{Firmware, PowerState, SystemEvent, VcpuId};

use crate::cli::ResetAction;
use crate::run::{RunOutcome, EXIT_FAILURE, EXIT_POWERED_OFF, EXIT_RESET};
use crate::vcpu::{KernelEvent, OperatorStop, StopReason};

/// What to do once a VM has stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reset the VM and run it again; the text says why (for the operator).
    Restart(String),
    /// End `vpsci run` with this status and message.
    Exit(RunOutcome),
}

fn describe(event: &SystemEvent) -> String {
    match event {
        SystemEvent::Off => "SYSTEM_OFF".to_owned(),
        SystemEvent::Hibernate => "SYSTEM_OFF2 (HIBERNATE_OFF)".to_owned(),
        SystemEvent::Reset => "SYSTEM_RESET".to_owned(),
        SystemEvent::WarmReset { cookie } => {
            format!("SYSTEM_RESET2 (WARM_RESET, cookie {cookie:#x})")
        }
        SystemEvent::VendorReset { reset_type, cookie } => {
            format!("SYSTEM_RESET2 (vendor type {reset_type:#x}, cookie {cookie:#x})")
        }
    }
}

fn reset_or_exit(what: String, on_reset: ResetAction) -> Decision {
    match on_reset {
        ResetAction::Restart => Decision::Restart(what),
        ResetAction::Exit => Decision::Exit(RunOutcome {
            status: EXIT_RESET,
            message: format!("{what}: VM reset requested; exiting (--on-reset exit)"),
        }),
    }
}

/// Turns the reason a VM stopped into what `vpsci run` does next. `engine`
/// (absent under KVM's PSCI) names the vCPUs still running on a timeout.
pub fn decide(
    reason: &StopReason,
    on_reset: ResetAction,
    engine: Option<&Firmware>,
    cpus: u32,
) -> Decision {
    match reason {
        StopReason::Firmware { vcpu, event } => {
            let what = format!("vCPU {vcpu} called {}", describe(event));
            match event {
                SystemEvent::Off | SystemEvent::Hibernate => Decision::Exit(RunOutcome {
                    status: EXIT_POWERED_OFF,
                    message: format!("{what}: VM powered off"),
                }),
                _ => reset_or_exit(what, on_reset),
            }
        }
        StopReason::Kernel { vcpu, event, flags } => {
            let psci2 = *flags & 1 != 0;
            match event {
                KernelEvent::Shutdown => Decision::Exit(RunOutcome {
                    status: EXIT_POWERED_OFF,
                    message: format!(
                        "vCPU {vcpu} called {} (KVM's PSCI): VM powered off",
                        if psci2 { "SYSTEM_OFF2" } else { "SYSTEM_OFF" }
                    ),
                }),
                KernelEvent::Reset => reset_or_exit(
                    format!(
                        "vCPU {vcpu} called {} (KVM's PSCI)",
                        if psci2 {
                            "SYSTEM_RESET2"
                        } else {
                            "SYSTEM_RESET"
                        }
                    ),
                    on_reset,
                ),
                other => Decision::Exit(RunOutcome {
                    status: EXIT_FAILURE,
                    message: format!("vCPU {vcpu}: unexpected KVM system event {other:?}"),
                }),
            }
        }
        // The operator's reboot restarts whatever --on-reset says (that option is about the
        // guest's resets); the operator's power off ends the run like SYSTEM_OFF.
        StopReason::Operator {
            action: OperatorStop::Reboot,
        } => Decision::Restart("the operator rebooted the VM (control API)".to_owned()),
        StopReason::Operator {
            action: OperatorStop::PowerOff,
        } => Decision::Exit(RunOutcome {
            status: EXIT_POWERED_OFF,
            message: "the operator powered the VM off (control API)".to_owned(),
        }),
        StopReason::VcpuFailed { vcpu, reason } => Decision::Exit(RunOutcome {
            status: EXIT_FAILURE,
            message: format!("vCPU {vcpu} failed: {reason}"),
        }),
        StopReason::Snapshotted { dir } => Decision::Exit(RunOutcome {
            status: EXIT_POWERED_OFF,
            message: format!("snapshot written to {}; the VM stopped", dir.display()),
        }),
        StopReason::Migrated { to } => Decision::Exit(RunOutcome {
            status: EXIT_POWERED_OFF,
            message: format!("migrated to {to}"),
        }),
        StopReason::Timeout { after } => {
            let running = match engine {
                Some(fw) => (0..cpus)
                    .filter(|&i| !matches!(fw.power_state(VcpuId::new(i)), PowerState::Off))
                    .map(|i| format!("vCPU {i} {:?}", fw.power_state(VcpuId::new(i))))
                    .collect::<Vec<_>>()
                    .join(", "),
                None => format!("{cpus} vCPU(s) under KVM's PSCI"),
            };
            Decision::Exit(RunOutcome {
                status: EXIT_FAILURE,
                message: format!(
                    "timeout after {:.1} s with the guest still running ({running})",
                    after.as_secs_f64()
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vpsci_firmware::{FirmwareConfig, MemoryRegion, Mpidr};

    fn firmware_stop(event: SystemEvent) -> StopReason {
        StopReason::Firmware { vcpu: 1, event }
    }

    fn exit_status(d: &Decision) -> Option<u8> {
        match d {
            Decision::Exit(o) => Some(o.status),
            Decision::Restart(_) => None,
        }
    }

    #[test]
    fn power_off_and_hibernate_exit_zero_whatever_the_reset_policy() {
        for on_reset in [ResetAction::Exit, ResetAction::Restart] {
            for event in [SystemEvent::Off, SystemEvent::Hibernate] {
                let d = decide(&firmware_stop(event), on_reset, None, 2);
                assert_eq!(exit_status(&d), Some(EXIT_POWERED_OFF), "{event:?}");
            }
        }
    }

    #[test]
    fn every_reset_kind_exits_three_or_restarts_as_the_operator_chose() {
        for event in [
            SystemEvent::Reset,
            SystemEvent::WarmReset { cookie: 7 },
            SystemEvent::VendorReset {
                reset_type: 0x8000_0001,
                cookie: 9,
            },
        ] {
            let exit = decide(&firmware_stop(event), ResetAction::Exit, None, 2);
            assert_eq!(exit_status(&exit), Some(EXIT_RESET), "{event:?}");
            let restart = decide(&firmware_stop(event), ResetAction::Restart, None, 2);
            assert!(
                matches!(&restart, Decision::Restart(why) if why.contains("vCPU 1")),
                "{restart:?}"
            );
        }
        let Decision::Exit(o) = decide(
            &firmware_stop(SystemEvent::VendorReset {
                reset_type: 0x8000_0001,
                cookie: 9,
            }),
            ResetAction::Exit,
            None,
            2,
        ) else {
            panic!("exit expected");
        };
        assert!(
            o.message.contains("0x80000001") && o.message.contains("cookie 0x9"),
            "{}",
            o.message
        );
    }

    #[test]
    fn kvm_psci_events_map_to_the_same_statuses() {
        let off = StopReason::Kernel {
            vcpu: 0,
            event: KernelEvent::Shutdown,
            flags: 1,
        };
        let d = decide(&off, ResetAction::Exit, None, 1);
        assert!(
            matches!(&d, Decision::Exit(o) if o.status == EXIT_POWERED_OFF && o.message.contains("SYSTEM_OFF2"))
        );
        let reset = StopReason::Kernel {
            vcpu: 0,
            event: KernelEvent::Reset,
            flags: 0,
        };
        assert_eq!(
            exit_status(&decide(&reset, ResetAction::Exit, None, 1)),
            Some(EXIT_RESET)
        );
        let odd = StopReason::Kernel {
            vcpu: 0,
            event: KernelEvent::Other(9),
            flags: 0,
        };
        assert_eq!(
            exit_status(&decide(&odd, ResetAction::Restart, None, 1)),
            Some(EXIT_FAILURE)
        );
    }

    #[test]
    fn a_failed_vcpu_or_a_timeout_is_status_one_and_names_what_ran() {
        let failed = StopReason::VcpuFailed {
            vcpu: 3,
            reason: "KVM_RUN: EFAULT".to_owned(),
        };
        let Decision::Exit(o) = decide(&failed, ResetAction::Restart, None, 4) else {
            panic!("a failure never restarts");
        };
        assert_eq!(o.status, EXIT_FAILURE);
        assert!(o.message.contains("vCPU 3") && o.message.contains("EFAULT"));

        let fw = Firmware::new(
            FirmwareConfig::default(),
            (0..3).map(Mpidr::from_index).collect(),
            vec![MemoryRegion {
                base: 0x4000_0000,
                size: 0x100_0000,
            }],
        )
        .expect("valid firmware");
        let timeout = StopReason::Timeout {
            after: Duration::from_secs(5),
        };
        let Decision::Exit(o) = decide(&timeout, ResetAction::Restart, Some(&fw), 3) else {
            panic!("a timeout never restarts");
        };
        assert_eq!(o.status, EXIT_FAILURE);
        assert!(
            o.message.contains("vCPU 0 On") && !o.message.contains("vCPU 1"),
            "{}",
            o.message
        );
    }

    #[test]
    fn an_operator_reboot_restarts_even_with_on_reset_exit_and_a_power_off_exits_zero() {
        let reboot = StopReason::Operator {
            action: OperatorStop::Reboot,
        };
        assert!(matches!(
            decide(&reboot, ResetAction::Exit, None, 1),
            Decision::Restart(why) if why.contains("operator")
        ));
        let off = StopReason::Operator {
            action: OperatorStop::PowerOff,
        };
        match decide(&off, ResetAction::Restart, None, 1) {
            Decision::Exit(outcome) => {
                assert_eq!(outcome.status, EXIT_POWERED_OFF);
                assert!(outcome.message.contains("operator powered the VM off"));
            }
            other => panic!("{other:?}"),
        }
    }
}
