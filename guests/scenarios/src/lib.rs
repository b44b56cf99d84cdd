//! Helpers shared by the conformance guest programs (one binary per scenario
//! group, in `src/bin/`).

#![no_std]
#![deny(missing_docs)]

use core::sync::atomic::{AtomicU32, Ordering};

use vguest::psci::{self, AFFINITY_OFF, AFFINITY_ON, AFFINITY_ON_PENDING};
use vguest::{cpu, fail, report::CheckResult, timer};

/// Polls AFFINITY_INFO(level 0) for CPU `index` until it answers `want` or
/// `timeout_ms` pass. Every answer seen must be ON, OFF or ON_PENDING.
pub fn wait_affinity(index: usize, want: i32, timeout_ms: u64) -> CheckResult {
    let end = timer::now() + timer::ms_to_ticks(timeout_ms);
    let mut last;
    loop {
        last = psci::affinity_info(cpu::mpidr(index), 0);
        if last == want {
            return Ok(());
        }
        if ![AFFINITY_ON, AFFINITY_OFF, AFFINITY_ON_PENDING].contains(&last) {
            return fail!(
                "AFFINITY_INFO(cpu {}) returned {} while waiting for {}",
                index,
                last,
                want
            );
        }
        if timer::now() > end {
            return fail!(
                "cpu {} not {} within {} ms (last AFFINITY_INFO {})",
                index,
                affinity_name(want),
                timeout_ms,
                affinity_name(last)
            );
        }
        core::hint::spin_loop();
    }
}

/// xorshift64: a cheap pseudo-random stream (one per CPU; hostile guests draw
/// targets, function IDs and register values from it).
pub struct Rng(u64);

impl Rng {
    /// A stream seeded from the counter and `index` (never zero).
    pub fn new(index: usize) -> Rng {
        Rng((timer::now() ^ ((index as u64 + 1) * 0x9E37_79B9_7F4A_7C15)) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Spins until `cond` holds or `timeout_ms` pass; true if it held.
pub fn wait_until(cond: impl Fn() -> bool, timeout_ms: u64) -> bool {
    let end = timer::now() + timer::ms_to_ticks(timeout_ms);
    while !cond() {
        if timer::now() > end {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Name of an AFFINITY_INFO answer.
pub fn affinity_name(v: i32) -> &'static str {
    match v {
        AFFINITY_ON => "ON",
        AFFINITY_OFF => "OFF",
        AFFINITY_ON_PENDING => "ON_PENDING",
        _ => psci::status_name(v),
    }
}

/// Waits until `flag` holds `want` or `timeout_ms` pass; true if it did.
pub fn wait_flag(flag: &AtomicU32, want: u32, timeout_ms: u64) -> bool {
    let end = timer::now() + timer::ms_to_ticks(timeout_ms);
    while flag.load(Ordering::Acquire) != want {
        if timer::now() > end {
            return false;
        }
        wait_event();
    }
    true
}

/// A low-power hint inside spin loops (WFE yields the vCPU on KVM and TCG).
pub fn wait_event() {
    // SAFETY: wfe only waits for an event; a timeout-free wake is fine because
    // every caller re-checks its condition.
    unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
}

/// Wakes CPUs waiting in [`wait_event`].
pub fn send_event() {
    // SAFETY: sev only signals an event.
    unsafe { core::arch::asm!("dsb sy", "sev", options(nomem, nostack)) };
}

/// Formats a PSCI version as "major.minor" parts.
pub fn version_parts(v: u32) -> (u32, u32) {
    (v >> 16, v & 0xffff)
}

/// The PSCI version the host configured, or the one the firmware reports
/// when the host did not say.
pub fn effective_version() -> u32 {
    let configured = vguest::config::get().psci_version;
    if configured != 0 {
        configured
    } else {
        psci::version()
    }
}

/// CPU_SUSPEND power_state parameter for a core standby or powerdown state
/// at power level 0, in the format PSCI_FEATURES(CPU_SUSPEND) announces
/// (DEN0022 F.b 5.4.2: original format StateType bit 16, extended format bit 30).
pub fn power_state(powerdown: bool) -> u64 {
    let extended = effective_version() >= 0x1_0000
        && psci::features(psci::PSCI_CPU_SUSPEND_64) > 0
        && psci::features(psci::PSCI_CPU_SUSPEND_64) & 0b10 != 0;
    match (powerdown, extended) {
        (false, _) => 0,
        (true, false) => 1 << 16,
        (true, true) => 1 << 30,
    }
}

/// Enables the GIC (distributor once, then this CPU) for the virtual and
/// physical timer PPIs and SGI 1; fails if this CPU has no redistributor.
pub fn gic_setup(distributor: bool) -> CheckResult {
    if vguest::platform().gicd == 0 {
        return fail!("device tree has no arm,gic-v3 node");
    }
    if distributor {
        vguest::gic::init_distributor();
    }
    if !vguest::gic::init_cpu(&[timer::VIRTUAL_TIMER_INTID, timer::PHYSICAL_TIMER_INTID, 1]) {
        return fail!(
            "no GICv3 redistributor matches cpu {}",
            cpu::current_index()
        );
    }
    Ok(())
}

/// Acknowledges and ends pending interrupts (at most 16, so a level
/// interrupt that is still asserted cannot keep this looping); returns the
/// first INTID seen (1023 if none was pending). Disarm the source first to
/// leave nothing pending.
pub fn drain_interrupts() -> u32 {
    let mut first = 1023;
    for _ in 0..16 {
        let id = vguest::gic::acknowledge();
        if id >= 1020 {
            break;
        }
        if first == 1023 {
            first = id;
        }
        vguest::gic::end_of_interrupt(id);
    }
    first
}

/// Disarms the virtual timer and returns the INTID that was pending first
/// (1023 if none), leaving no interrupt pending or active.
pub fn take_timer_interrupt() -> u32 {
    let id = vguest::gic::acknowledge();
    if id < 1020 {
        vguest::gic::end_of_interrupt(id);
    }
    timer::disarm_virtual();
    drain_interrupts();
    id
}
