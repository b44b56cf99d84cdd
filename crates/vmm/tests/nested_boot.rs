//! Boot, version and conduit tests on real arm64 KVM (nested harness): each
//! guest is a hand-encoded A64 program run through the whole VMM.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use nested_common::*;
use vpsci::run::{EXIT_FAILURE, EXIT_POWERED_OFF};
use vpsci_firmware::{Conduit, PsciVersion};

/// PSCI_VERSION, store it, print "ok", SYSTEM_OFF.
fn version_guest(conduit: Conduit) -> Asm {
    let mut a = Asm::new(ENTRY, conduit);
    a.smccc(PSCI_VERSION, [0; 3])
        .store_at(0, RESULTS)
        .print("ok\n")
        .smccc(SYSTEM_OFF, [0; 3])
        .print("SYSTEM_OFF returned\n")
        .spin();
    a
}

#[test]
fn every_psci_version_is_reported_over_both_conduits_then_system_off_exits_0() {
    for version in [
        PsciVersion::V0_2,
        PsciVersion::V1_0,
        PsciVersion::V1_1,
        PsciVersion::V1_2,
        PsciVersion::V1_3,
    ] {
        for conduit in [Conduit::Hvc, Conduit::Smc] {
            let ran = run(
                &version_guest(conduit),
                Setup {
                    version,
                    conduit,
                    ..Setup::default()
                },
            );
            let what = format!("PSCI {version} over {conduit}");
            assert_eq!(
                ran.outcome.status, EXIT_POWERED_OFF,
                "{what}: {}",
                ran.outcome.message
            );
            assert!(
                ran.outcome.message.contains("SYSTEM_OFF"),
                "{what}: {}",
                ran.outcome.message
            );
            assert_eq!(ran.u64_at(RESULTS), u64::from(version.encoded()), "{what}");
            assert_eq!(ran.console, "ok\n", "{what}");
        }
    }
}

#[test]
fn unknown_function_ids_return_not_supported() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    // Unallocated PSCI IDs (forwarded to the engine), SMC32 and SMC64, and
    // an unallocated standard-service ID outside the forwarded ranges (KVM).
    a.smccc(0x8400_001F, [0; 3]).store_at(0, RESULTS);
    a.smccc(0xC400_001E, [0; 3]).store_at(0, RESULTS + 8);
    a.smccc(0x8400_0100, [0; 3]).store_at(0, RESULTS + 16);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(&a, Setup::default());
    ran.assert_powered_off();
    for off in [0, 8, 16] {
        assert_eq!(
            ran.u64_at(RESULTS + off) as u32,
            NOT_SUPPORTED as u32,
            "result {off}"
        );
    }
}

#[test]
fn a_call_through_the_other_conduit_is_not_supported() {
    // The firmware is configured for HVC; the guest uses SMC.
    let mut a = Asm::new(ENTRY, Conduit::Smc);
    a.smccc(PSCI_VERSION, [0; 3]).store_at(0, RESULTS);
    let mut hvc = Asm::new(a.here(), Conduit::Hvc);
    hvc.smccc(SYSTEM_OFF, [0; 3]).spin();
    a.append(&hvc);
    let ran = run(&a, Setup::default());
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS) as u32, NOT_SUPPORTED as u32);
}

#[test]
fn system_off2_hibernate_powers_off_and_says_so() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(PSCI_FEATURES, [u64::from(SYSTEM_OFF2), 0, 0])
        .store_at(0, RESULTS)
        .smccc(SYSTEM_OFF2, [1, 1, 0]) // non-zero cookie: INVALID_PARAMETERS
        .store_at(0, RESULTS + 8)
        .smccc(SYSTEM_OFF2, [1, 0, 0])
        .spin();
    let ran = run(&a, Setup::default());
    ran.assert_powered_off();
    assert!(
        ran.outcome.message.contains("HIBERNATE_OFF"),
        "{}",
        ran.outcome.message
    );
    assert_eq!(ran.u64_at(RESULTS) & 1, 1, "FEATURES lists HIBERNATE_OFF");
    assert_eq!(ran.u64_at(RESULTS + 8), INVALID_PARAMETERS);
}

#[test]
fn uart_output_reaches_the_console() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.print("hello from the guest\n")
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    let ran = run(&a, Setup::default());
    assert_eq!(ran.console, "hello from the guest\n");
}

#[test]
fn a_guest_that_never_stops_times_out_with_a_failure_naming_the_vcpu() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.spin();
    let ran = run(
        &a,
        Setup {
            timeout: std::time::Duration::from_secs(5),
            ..Setup::default()
        },
    );
    assert_eq!(ran.outcome.status, EXIT_FAILURE);
    assert!(
        ran.outcome.message.contains("timeout"),
        "{}",
        ran.outcome.message
    );
    assert!(
        ran.outcome.message.contains("vCPU 0"),
        "{}",
        ran.outcome.message
    );
}

#[test]
fn a_vcpu_whose_access_kvm_cannot_emulate_fails_the_vm_naming_it() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    // ldp x0, x1, [x2] to an address with no memory: no syndrome, KVM_RUN fails.
    a.mov(2, 0x0A00_0000).word(0xA940_0440).spin();
    let ran = run(&a, Setup::default());
    assert_eq!(ran.outcome.status, EXIT_FAILURE);
    assert!(
        ran.outcome.message.contains("vCPU 0 failed"),
        "{}",
        ran.outcome.message
    );
}

#[test]
fn in_kernel_psci_boots_and_powers_off_through_kvm() {
    let ran = run(
        &version_guest(Conduit::Hvc),
        Setup {
            kernel_psci: true,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert!(
        ran.outcome.message.contains("KVM's PSCI"),
        "{}",
        ran.outcome.message
    );
    assert_eq!(ran.u64_at(RESULTS) >> 16, 1, "KVM reports PSCI 1.x");
}
