//! The generic timer: the virtual counter and the EL1 virtual timer (PPI 27).

/// INTID of the EL1 virtual timer interrupt.
pub const VIRTUAL_TIMER_INTID: u32 = 27;

/// Virtual counter value.
pub fn now() -> u64 {
    let v: u64;
    // SAFETY: reads a counter register; the isb orders it after earlier instructions.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Counter frequency in Hz (never 0).
pub fn frequency() -> u64 {
    let v: u64;
    // SAFETY: reads a read-only register.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) v, options(nomem, nostack)) };
    v.max(1)
}

/// Counter ticks in `ms` milliseconds.
pub fn ms_to_ticks(ms: u64) -> u64 {
    frequency() / 1000 * ms
}

/// Milliseconds in `ticks` counter ticks.
pub fn ticks_to_ms(ticks: u64) -> u64 {
    ticks / (frequency() / 1000).max(1)
}

/// Arms the virtual timer to fire `ms` milliseconds from now; returns the deadline.
pub fn arm_virtual_in_ms(ms: u64) -> u64 {
    let deadline = now() + ms_to_ticks(ms);
    // SAFETY: programs this CPU's own virtual timer; ENABLE=1, IMASK=0.
    unsafe {
        core::arch::asm!(
            "msr cntv_cval_el0, {d}",
            "msr cntv_ctl_el0, {c}",
            "isb",
            d = in(reg) deadline,
            c = in(reg) 1u64,
            options(nomem, nostack)
        )
    };
    deadline
}

/// Disables the virtual timer (its interrupt line drops).
pub fn disarm_virtual() {
    // SAFETY: writes this CPU's own timer control register.
    unsafe { core::arch::asm!("msr cntv_ctl_el0, xzr", "isb", options(nomem, nostack)) };
}

/// Busy-waits for `ms` milliseconds.
pub fn delay_ms(ms: u64) {
    let end = now() + ms_to_ticks(ms);
    while now() < end {
        core::hint::spin_loop();
    }
}
