//! The generic timer: the virtual counter, the EL1 virtual timer (PPI 27) and the
//! EL1 physical timer (PPI 30).

/// INTID of the EL1 virtual timer interrupt.
pub const VIRTUAL_TIMER_INTID: u32 = 27;
/// INTID of the EL1 physical timer interrupt.
pub const PHYSICAL_TIMER_INTID: u32 = 30;

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

/// Arms the EL1 physical timer to fire `ms` milliseconds from now (a second wake-up
/// source next to the virtual timer).
pub fn arm_physical_in_ms(ms: u64) {
    // SAFETY: programs this CPU's own physical timer through its down-counter view;
    // ENABLE=1, IMASK=0.
    unsafe {
        core::arch::asm!(
            "msr cntp_tval_el0, {t}",
            "msr cntp_ctl_el0, {c}",
            "isb",
            t = in(reg) ms_to_ticks(ms),
            c = in(reg) 1u64,
            options(nomem, nostack)
        )
    };
}

/// Disables the physical timer (its interrupt line drops).
pub fn disarm_physical() {
    // SAFETY: writes this CPU's own timer control register.
    unsafe { core::arch::asm!("msr cntp_ctl_el0, xzr", "isb", options(nomem, nostack)) };
}

/// Busy-waits for `ms` milliseconds.
pub fn delay_ms(ms: u64) {
    let end = now() + ms_to_ticks(ms);
    while now() < end {
        core::hint::spin_loop();
    }
}
