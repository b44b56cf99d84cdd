//! The PL031 RTC's alarm on real arm64 KVM (nested harness): an alarm the
//! guest left enabled wakes it from SYSTEM_SUSPEND through the vGIC, vpsci
//! resumes the caller at its entry with the context id, and the event log
//! names the RTC as the wake-up source; a masked alarm wakes nothing.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::time::Duration;

use nested_common::*;
use vpsci::run::EXIT_FAILURE;
use vpsci_firmware::Conduit;

/// PL031 registers (`crates/vmm/src/devices/pl031.rs`).
const RTC: u64 = 0x0901_0000;
const RTC_DR: u64 = 0x000;
const RTC_MR: u64 = 0x004;
const RTC_IMSC: u64 = 0x010;
const RTC_RIS: u64 = 0x014;
const RTC_MIS: u64 = 0x018;
const RTC_ICR: u64 = 0x01C;
/// The RTC's interrupt: SPI 2.
const RTC_INTID: u32 = 34;

/// Enables the distributor and CPU interface for group 1 and the RTC's SPI,
/// routed to vCPU 0. Interrupts stay masked in PSTATE: they only wake.
fn enable_rtc_interrupt(a: &mut Asm) {
    let n = u64::from(RTC_INTID / 32);
    let bit = 1u32 << (RTC_INTID % 32);
    a.mmio_write32(0x0800_0000, 0x13) // GICD_CTLR: ARE, Grp1, Grp0
        .mmio_write32(0x0800_0080 + 4 * n, 0xFFFF_FFFF) // GICD_IGROUPRn: group 1
        .mmio_write32(0x0800_6000 + 8 * u64::from(RTC_INTID), 0) // GICD_IROUTER: Aff 0.0.0.0
        .mmio_write32(0x0800_6004 + 8 * u64::from(RTC_INTID), 0)
        .mmio_write32(0x0800_0100 + 4 * n, bit) // GICD_ISENABLERn
        .mmio_write32(0x080A_0014, 0); // GICR_WAKER: awake
    a.mov(17, 0xFF).msr(3, 0, 4, 6, 0, 17); // ICC_PMR_EL1
    a.mov(17, 1).msr(3, 0, 12, 12, 7, 17); // ICC_IGRPEN1_EL1
    a.isb();
}

/// RTCMR = RTCDR + `seconds` (clobbers x16, x17).
fn set_alarm_in(a: &mut Asm, seconds: u32) {
    a.mov(16, RTC)
        .ldr32(17, 16, RTC_DR)
        .add_imm(17, 17, seconds)
        .str32(17, 16, RTC_MR);
}

/// A guest that arms the alarm (masked or not), SYSTEM_SUSPENDs with
/// context 0x99 and, at its resume entry, records x0, RTCMIS, then clears
/// the interrupt and records RTCRIS, and powers off.
fn alarm_guest(unmask: bool) -> Asm {
    let resume = ENTRY + 0x1000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    enable_rtc_interrupt(&mut a);
    set_alarm_in(&mut a, 1);
    a.mmio_write32(RTC + RTC_IMSC, u32::from(unmask))
        .smccc(SYSTEM_SUSPEND, [resume, 0x99, 0])
        .store_at(0, RESULTS + 0x100) // only if SYSTEM_SUSPEND returned
        .spin();
    while a.here() < resume {
        a.spin();
    }
    a.store_at(0, RESULTS)
        .mov(16, RTC)
        .ldr32(1, 16, RTC_MIS)
        .store_at(1, RESULTS + 8)
        .mmio_write32(RTC + RTC_ICR, 1)
        .mov(16, RTC)
        .ldr32(1, 16, RTC_RIS)
        .store_at(1, RESULTS + 16)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    a
}

#[test]
fn an_rtc_alarm_wakes_system_suspend_and_the_log_names_the_rtc() {
    let ran = run(&alarm_guest(true), Setup::default());
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS + 0x100), 0, "SYSTEM_SUSPEND returned");
    assert_eq!(ran.u64_at(RESULTS), 0x99, "x0 at the resume entry");
    assert_eq!(ran.u64_at(RESULTS + 8), 1, "RTCMIS at resume");
    assert_eq!(ran.u64_at(RESULTS + 16), 0, "RTCRIS after RTCICR");
    let suspended = ran
        .events
        .iter()
        .position(|e| e.contains("to: SuspendedSystem"))
        .unwrap_or_else(|| panic!("no system suspend in {:#?}", ran.events));
    let woken = ran
        .events
        .iter()
        .position(|e| e.starts_with("Wakeup"))
        .unwrap_or_else(|| panic!("no wakeup in {:#?}", ran.events));
    let resumed = ran
        .events
        .iter()
        .position(|e| e.contains("from: SuspendedSystem, to: On"))
        .unwrap_or_else(|| panic!("no resume in {:#?}", ran.events));
    assert!(suspended < woken && woken < resumed, "{:#?}", ran.events);
    assert!(
        ran.events[woken]
            .starts_with("Wakeup { vcpu: 0, sources: [WakeSource { device: \"pl031\", spi: 2, intid: 34, raised_ns_ago: "),
        "{}",
        ran.events[woken]
    );
    assert_eq!(ran.events[woken].matches("WakeSource").count(), 1);
}

#[test]
fn a_masked_rtc_alarm_leaves_the_vm_suspended() {
    let ran = run(
        &alarm_guest(false),
        Setup {
            timeout: Duration::from_secs(4),
            ..Setup::default()
        },
    );
    assert_eq!(ran.outcome.status, EXIT_FAILURE, "{}", ran.outcome.message);
    assert!(
        ran.outcome.message.contains("vCPU 0 Suspended"),
        "{}",
        ran.outcome.message
    );
    assert!(
        !ran.events.iter().any(|e| e.starts_with("Wakeup")),
        "{:#?}",
        ran.events
    );
}
