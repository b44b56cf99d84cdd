//! Reset tests on real arm64 KVM (nested harness).
#![cfg(target_arch = "aarch64")]

mod nested_common;

use nested_common::*;
use vpsci::cli::ResetAction;
use vpsci::run::EXIT_RESET;
use vpsci_firmware::Conduit;

/// Counts boots in RAM (which survives a reset): reset on the first boot,
/// power off on the second.
fn reset_once(reset: u32, args: [u64; 3]) -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.mov(5, RESULTS).ldr(6, 5, 0).add_imm(7, 6, 1).str(7, 5, 0);
    let second_boot = a.cbnz_fwd(6);
    a.print("boot 1\n").smccc(reset, args).spin();
    a.bind(second_boot);
    a.print("boot 2\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    a
}

#[test]
fn system_reset_restarts_the_vm_with_on_reset_restart() {
    let ran = run(
        &reset_once(SYSTEM_RESET, [0; 3]),
        Setup {
            on_reset: ResetAction::Restart,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS), 2, "booted twice");
    assert_eq!(ran.console, "boot 1\nboot 2\n");
}

#[test]
fn system_reset_exits_with_status_3_with_on_reset_exit() {
    let ran = run(&reset_once(SYSTEM_RESET, [0; 3]), Setup::default());
    assert_eq!(ran.outcome.status, EXIT_RESET, "{}", ran.outcome.message);
    assert!(
        ran.outcome.message.contains("SYSTEM_RESET"),
        "{}",
        ran.outcome.message
    );
    assert_eq!(ran.u64_at(RESULTS), 1);
}

#[test]
fn system_reset2_warm_reports_type_and_cookie() {
    let ran = run(&reset_once(SYSTEM_RESET2, [0, 0x1234, 0]), Setup::default());
    assert_eq!(ran.outcome.status, EXIT_RESET, "{}", ran.outcome.message);
    assert!(
        ran.outcome
            .message
            .contains("SYSTEM_RESET2 (WARM_RESET, cookie 0x1234)"),
        "{}",
        ran.outcome.message
    );
}

#[test]
fn system_reset2_vendor_type_restarts_with_on_reset_restart() {
    let ran = run(
        &reset_once(SYSTEM_RESET2, [0x8000_0001, 7, 0]),
        Setup {
            on_reset: ResetAction::Restart,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS), 2);
}
