//! Suspend and wake-up on real arm64 KVM (nested harness): CPU_SUSPEND and
//! SYSTEM_SUSPEND park the vCPU in KVM_MP_STATE_SUSPENDED, the guest's own
//! timer interrupt wakes it, and a VMM kick does not.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use nested_common::*;
use vpsci::events::{Event, PowerState};
use vpsci::run::EXIT_FAILURE;
use vpsci_firmware::Conduit;
use vpsci_firmware::{encode_power_state, CpuPowerState, FirmwareConfig};

const TICKS: u64 = 0x4_0000;

fn power_state(state: CpuPowerState) -> u64 {
    u64::from(encode_power_state(&FirmwareConfig::default(), state))
}

#[test]
fn cpu_suspend_standby_returns_success_once_the_timer_fires() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.arm_timer_wakeup(TICKS)
        .smccc(CPU_SUSPEND, [power_state(CpuPowerState::Standby), 0, 0])
        .store_at(0, RESULTS)
        .counter(21)
        .store_at(20, RESULTS + 8)
        .store_at(21, RESULTS + 16)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    let ran = run(&a, Setup::default());
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS), SUCCESS);
    let slept = ran
        .u64_at(RESULTS + 16)
        .wrapping_sub(ran.u64_at(RESULTS + 8));
    assert!(
        slept >= TICKS,
        "woke after {slept:#x} ticks, timer was {TICKS:#x}"
    );
    assert!(
        ran.events.iter().any(|e| e.contains("SuspendedStandby")),
        "{:?}",
        ran.events
    );
}

#[test]
fn cpu_suspend_powerdown_resumes_at_the_entry_with_the_context_id() {
    let resume = ENTRY + 0x1000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.arm_timer_wakeup(TICKS)
        .smccc(
            CPU_SUSPEND,
            [power_state(CpuPowerState::Powerdown), resume, 0x55AA],
        )
        .store_at(0, RESULTS + 0x100) // only if CPU_SUSPEND returned
        .spin();
    while a.here() < resume {
        a.spin();
    }
    a.store_at(0, RESULTS).smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(&a, Setup::default());
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS), 0x55AA, "x0 at the resume entry");
    assert_eq!(ran.u64_at(RESULTS + 0x100), 0, "CPU_SUSPEND returned");
}

#[test]
fn system_suspend_with_no_other_vcpu_on_resumes_at_the_entry_after_the_wakeup() {
    let resume = ENTRY + 0x1000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(PSCI_FEATURES, [u64::from(SYSTEM_SUSPEND), 0, 0])
        .store_at(0, RESULTS + 0x200)
        .arm_timer_wakeup(TICKS)
        .store_at(20, RESULTS + 8)
        .smccc(SYSTEM_SUSPEND, [resume, 0x77, 0])
        .store_at(0, RESULTS + 0x100)
        .spin();
    while a.here() < resume {
        a.spin();
    }
    a.counter(21)
        .store_at(0, RESULTS)
        .store_at(21, RESULTS + 16)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    let ran = run(
        &a,
        Setup {
            cpus: 2,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert_eq!(
        ran.u64_at(RESULTS + 0x200),
        SUCCESS,
        "PSCI_FEATURES(SYSTEM_SUSPEND)"
    );
    assert_eq!(ran.u64_at(RESULTS + 0x100), 0, "SYSTEM_SUSPEND returned");
    assert_eq!(ran.u64_at(RESULTS), 0x77, "x0 at the resume entry");
    let slept = ran
        .u64_at(RESULTS + 16)
        .wrapping_sub(ran.u64_at(RESULTS + 8));
    assert!(
        slept >= TICKS,
        "resumed after {slept:#x} ticks, timer was {TICKS:#x}"
    );
}

#[test]
fn a_kick_does_not_wake_a_suspended_vcpu() {
    // vCPU 1 suspends with no interrupt source; once the VMM has committed that suspend
    // (the test's event observer writes a flag into guest RAM when it sees vCPU 1 go to
    // SuspendedStandby), vCPU 0 makes system-scoped calls (SYSTEM_SUSPEND, denied
    // because vCPU 1 is not off), each of which quiesces the VM and so kicks vCPU 1.
    // vCPU 1 must stay suspended: its code after CPU_SUSPEND never runs.
    const SUSPENDED_FLAG: u64 = RESULTS + 0x310;
    let secondary = ENTRY + 0x2000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_ON, [mpidr(1), secondary, 0]);
    // Wait until the VMM has vCPU 1 suspended.
    a.mov(5, SUSPENDED_FLAG);
    let poll = a.here();
    a.ldr(6, 5, 0).cbz_back(6, poll);
    for _ in 0..3 {
        a.smccc(SYSTEM_SUSPEND, [ENTRY, 0, 0]).store_at(0, RESULTS);
    }
    a.smccc(AFFINITY_INFO, [mpidr(1), 0, 0])
        .store_at(0, RESULTS + 8);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    while a.here() < secondary {
        a.spin();
    }
    a.smccc(CPU_SUSPEND, [power_state(CpuPowerState::Standby), 0, 0])
        .mov(5, 0xBAD)
        .store_at(5, RESULTS + 0x308)
        .spin();
    let observer: EventObserver = std::sync::Arc::new(|event, memory| {
        if let Event::PowerState {
            vcpu: 1,
            to: PowerState::SuspendedStandby,
            ..
        } = event
        {
            use vm_memory::Bytes;
            memory
                .write_obj(1u64, vm_memory::GuestAddress(SUSPENDED_FLAG))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    let ran = run_observed(
        &a,
        Setup {
            cpus: 2,
            ..Setup::default()
        },
        Some(observer),
    );
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(SUSPENDED_FLAG), 1, "vCPU 1 never suspended");
    assert_eq!(ran.u64_at(RESULTS), DENIED);
    assert_eq!(ran.u64_at(RESULTS + 8), 0, "a suspended vCPU reads as ON");
    assert_eq!(
        ran.u64_at(RESULTS + 0x308),
        0,
        "vCPU 1 resumed without an interrupt"
    );
    // The kicks came after the suspend: every SYSTEM_SUSPEND call is logged after it.
    let suspended_at = ran
        .events
        .iter()
        .position(|e| e.contains("SuspendedStandby"))
        .unwrap_or_else(|| panic!("no suspend in {:?}", ran.events));
    let calls: Vec<usize> = ran
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.contains("SYSTEM_SUSPEND"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(calls.len(), 3, "{:?}", ran.events);
    assert!(calls.iter().all(|&i| i > suspended_at), "{:?}", ran.events);
}

#[test]
fn a_vcpu_suspended_forever_ends_in_a_timeout_that_names_it() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_SUSPEND, [power_state(CpuPowerState::Standby), 0, 0])
        .spin();
    let ran = run(
        &a,
        Setup {
            timeout: std::time::Duration::from_secs(5),
            ..Setup::default()
        },
    );
    assert_eq!(ran.outcome.status, EXIT_FAILURE);
    assert!(
        ran.outcome.message.contains("vCPU 0 Suspended"),
        "{}",
        ran.outcome.message
    );
}
