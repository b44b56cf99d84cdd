//! Scenario group `system-suspend`: PSCI_FEATURES, DENIED while another CPU
//! is on or only CPU_SUSPENDed, INVALID_ADDRESS for a bad entry point, and
//! with every other CPU off: suspend, wake by the virtual timer, resume at the
//! entry point with the context id and RAM intact, many times; then once
//! more with the timer interrupt already pending, which must end the suspend
//! at once. Needs 2 CPUs.
//!
//! "RAM intact" covers three kinds of memory, each filled with a pattern that
//! depends on the round: initialised data (`.data`, which reloading the image
//! would put back), zero-initialised data (`.bss`), and one word in every page
//! of RAM above the image (but the device tree). Before each suspend the guest
//! proves the check can fail: it changes one word of each kind and the check
//! must name that kind.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::cpu::{self, SuspendOutcome};
use vguest::psci::{self, *};
use vguest::report::{check, run, CheckResult};
use vguest::{config, ensure, fail, println, timer};
use vpsci_guest_scenarios::{
    drain_interrupts, effective_version, gic_setup, power_state, send_event, take_timer_interrupt,
    wait_affinity, wait_event, wait_flag,
};

vguest::guest_main!("system-suspend", main);

const DEFAULT_ROUNDS: u32 = 20;
const SAFETY_NET_MS: u64 = 50;
const BAD_ENTRY: u64 = 0xFFFF_FFFF_FFFF_F000;
const BSS_WORDS: usize = 8192;
const DATA_WORDS: usize = 512;
const PAGE: u64 = 4096;
/// The timer of the control suspend in `system-suspend-pending-interrupt`.
const CONTROL_MS: u64 = 20;
/// "At once": a suspend woken by an interrupt that was already pending must end
/// within this (guest time; the rounds of `timer-wake-repeated` take a few ms).
const IMMEDIATE_MS: u64 = 100;
/// A second wake-up source (physical timer), so an implementation that ignores
/// the pending interrupt fails with a measured delay instead of hanging.
const LATE_WAKE_MS: u64 = 1000;

static RELEASE: AtomicU32 = AtomicU32::new(0);
static SUSPENDING: AtomicU32 = AtomicU32::new(0);
/// In `.bss`.
static BSS_PATTERN: [AtomicU64; BSS_WORDS] = [const { AtomicU64::new(0) }; BSS_WORDS];
/// In `.data` (a non-zero initialiser).
static DATA_PATTERN: [AtomicU64; DATA_WORDS] =
    [const { AtomicU64::new(0xDA7A_DA7A_DA7A_DA7A) }; DATA_WORDS];

const NAMES: [&str; 6] = [
    "system-suspend-features",
    "system-suspend-denied-other-on",
    "system-suspend-denied-other-suspended",
    "system-suspend-invalid-address",
    "system-suspend-timer-wake-repeated",
    "system-suspend-pending-interrupt",
];

fn main() {
    if effective_version() < 0x1_0000 {
        for name in NAMES {
            println!("VG-CHECK {} SKIP SYSTEM_SUSPEND needs PSCI 1.0", name);
        }
        return;
    }
    if let Err(e) = gic_setup(true) {
        for name in NAMES {
            println!("VG-CHECK {} FAIL {}", name, e.as_str());
        }
        return;
    }
    run(NAMES[0], || {
        let a = psci::features(PSCI_SYSTEM_SUSPEND_32);
        let b = psci::features(PSCI_SYSTEM_SUSPEND_64);
        ensure!(
            a >= 0 && b >= 0,
            "PSCI_FEATURES(SYSTEM_SUSPEND) = {} (32-bit), {} (64-bit)",
            a,
            b
        );
        Ok(())
    });
    if psci::features(PSCI_SYSTEM_SUSPEND_64) < 0 {
        for name in &NAMES[1..] {
            println!(
                "VG-CHECK {} SKIP SYSTEM_SUSPEND (optional) is not implemented",
                name
            );
        }
        return;
    }
    run(NAMES[1], denied_other_on);
    run(NAMES[2], denied_other_suspended);
    run(NAMES[3], || {
        let r = suspend_expecting_error(BAD_ENTRY)?;
        ensure!(
            r == INVALID_ADDRESS,
            "SYSTEM_SUSPEND(entry {:#x}) = {}",
            BAD_ENTRY,
            status_name(r)
        );
        Ok(())
    });
    check(NAMES[4], timer_wake_repeated());
    run(NAMES[5], pending_interrupt);
}

/// Makes a SYSTEM_SUSPEND that should be refused; a timer is armed so a VMM
/// that wrongly suspends still wakes the guest, and that is reported.
fn suspend_expecting_error(entry: u64) -> Result<i32, vguest::report::Detail> {
    drain_interrupts();
    timer::arm_virtual_in_ms(SAFETY_NET_MS);
    let outcome = cpu::suspend_call(PSCI_SYSTEM_SUSPEND_64, entry, 0x5AFE, 0);
    let _ = gic_setup(false);
    take_timer_interrupt();
    match outcome {
        SuspendOutcome::Returned(r) => Ok(r),
        SuspendOutcome::Resumed { .. } => {
            fail!("the VM was suspended (and resumed) although the call should fail")
        }
    }
}

fn hold(_index: usize, _context: u64) {
    while RELEASE.load(Ordering::Acquire) == 0 {
        wait_event();
    }
}

fn denied_other_on() -> CheckResult {
    RELEASE.store(0, Ordering::Release);
    let r = cpu::start(1, hold, 0);
    ensure!(r == SUCCESS, "CPU_ON(cpu 1) = {}", status_name(r));
    wait_affinity(1, AFFINITY_ON, 1000)?;
    let result = suspend_expecting_error(cpu::resume_entry());
    RELEASE.store(1, Ordering::Release);
    send_event();
    wait_affinity(1, AFFINITY_OFF, 1000)?;
    let r = result?;
    ensure!(
        r == DENIED,
        "SYSTEM_SUSPEND with cpu 1 on = {}",
        status_name(r)
    );
    Ok(())
}

fn standby_until_released(_index: usize, _context: u64) {
    if gic_setup(false).is_err() {
        return;
    }
    while RELEASE.load(Ordering::Acquire) == 0 {
        SUSPENDING.store(1, Ordering::Release);
        psci::status(PSCI_CPU_SUSPEND_64, power_state(false), 0, 0);
        drain_interrupts();
    }
}

fn denied_other_suspended() -> CheckResult {
    RELEASE.store(0, Ordering::Release);
    SUSPENDING.store(0, Ordering::Release);
    let r = cpu::start(1, standby_until_released, 0);
    ensure!(r == SUCCESS, "CPU_ON(cpu 1) = {}", status_name(r));
    ensure!(
        wait_flag(&SUSPENDING, 1, 1000),
        "cpu 1 never reached CPU_SUSPEND"
    );
    timer::delay_ms(5);
    let result = suspend_expecting_error(cpu::resume_entry());
    RELEASE.store(1, Ordering::Release);
    send_event();
    vguest::gic::send_sgi(cpu::mpidr(1), 1);
    wait_affinity(1, AFFINITY_OFF, 1000)?;
    let r = result?;
    ensure!(
        r == DENIED,
        "SYSTEM_SUSPEND with cpu 1 in CPU_SUSPEND = {}",
        status_name(r)
    );
    Ok(())
}

/// The word expected at index `i` of a pattern for `seed` (never the `.data`
/// initialiser, never zero for a non-zero seed's first word).
fn pattern(seed: u64, i: u64) -> u64 {
    seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The first word of every page of RAM above the image, but the device tree's.
fn free_pages() -> impl Iterator<Item = u64> {
    let p = vguest::platform();
    let start = vguest::image_end().div_ceil(PAGE) * PAGE;
    let end = p.ram.0 + p.ram.1;
    let (dtb, dtb_size) = p.dtb;
    let dtb_first = dtb / PAGE * PAGE;
    let dtb_end = dtb + dtb_size;
    (start..end)
        .step_by(PAGE as usize)
        .filter(move |&page| page + PAGE <= dtb_first || page >= dtb_end)
}

fn page_word(page: u64) -> &'static AtomicU64 {
    // SAFETY: `page` is a page of guest RAM above the image and outside the device
    // tree (see `free_pages`): nothing else in the program uses it, and it is 8-byte
    // aligned.
    unsafe { &*(page as *const AtomicU64) }
}

fn fill_ram(seed: u64) {
    for (i, w) in DATA_PATTERN.iter().enumerate() {
        w.store(pattern(seed, i as u64), Ordering::Relaxed);
    }
    for (i, w) in BSS_PATTERN.iter().enumerate() {
        w.store(pattern(seed, i as u64), Ordering::Relaxed);
    }
    for page in free_pages() {
        page_word(page).store(pattern(seed, page), Ordering::Relaxed);
    }
}

/// The first word that does not hold `seed`'s pattern: (which memory, address).
fn ram_difference(seed: u64) -> Option<(&'static str, u64)> {
    let in_array = |words: &'static [AtomicU64]| {
        words
            .iter()
            .enumerate()
            .find(|(i, w)| w.load(Ordering::Relaxed) != pattern(seed, *i as u64))
            .map(|(_, w)| w as *const AtomicU64 as u64)
    };
    if let Some(at) = in_array(&DATA_PATTERN) {
        return Some((".data", at));
    }
    if let Some(at) = in_array(&BSS_PATTERN) {
        return Some((".bss", at));
    }
    free_pages()
        .find(|&page| page_word(page).load(Ordering::Relaxed) != pattern(seed, page))
        .map(|page| ("RAM above the image", page))
}

/// Fills RAM for `seed` and proves the check sees a change in each kind of memory.
fn fill_ram_and_prove_the_check(seed: u64) -> CheckResult {
    fill_ram(seed);
    let last_page = free_pages().last().unwrap_or(0);
    ensure!(last_page != 0, "no free RAM above the image to check");
    let probes: [(&str, &AtomicU64); 3] = [
        (".data", &DATA_PATTERN[DATA_WORDS / 2]),
        (".bss", &BSS_PATTERN[BSS_WORDS - 1]),
        ("RAM above the image", page_word(last_page)),
    ];
    for (kind, word) in probes {
        let good = word.load(Ordering::Relaxed);
        word.store(!good, Ordering::Relaxed);
        let seen = ram_difference(seed);
        word.store(good, Ordering::Relaxed);
        ensure!(
            seen.map(|(k, _)| k) == Some(kind),
            "the RAM check missed a changed word in {}",
            kind
        );
    }
    match ram_difference(seed) {
        None => Ok(()),
        Some((kind, at)) => fail!("{} at {:#x} changed while filling it", kind, at),
    }
}

/// Fails if RAM no longer holds `seed`'s pattern.
fn ram_intact(seed: u64, when: &str) -> CheckResult {
    match ram_difference(seed) {
        None => Ok(()),
        Some((kind, at)) => fail!(
            "{}: {} changed across the suspend (first at {:#x})",
            when,
            kind,
            at
        ),
    }
}

fn timer_wake_repeated() -> CheckResult {
    let cfg = config::get();
    let rounds = if cfg.iterations == 0 {
        DEFAULT_ROUNDS
    } else {
        cfg.iterations
    };
    let start = timer::now();
    for round in 1..=u64::from(rounds) {
        let context = 0x5_0000_0000 | round;
        fill_ram_and_prove_the_check(context)?;
        drain_interrupts();
        let deadline = timer::arm_virtual_in_ms(5);
        let outcome = cpu::suspend_call(PSCI_SYSTEM_SUSPEND_64, cpu::resume_entry(), context, 0);
        let now = timer::now();
        let _ = gic_setup(false);
        take_timer_interrupt();
        match outcome {
            SuspendOutcome::Resumed { context_id } => {
                ensure!(
                    context_id == context,
                    "round {}: resumed with x0 {:#x}, context id was {:#x}",
                    round,
                    context_id,
                    context
                );
            }
            SuspendOutcome::Returned(r) => {
                return fail!(
                    "round {}: SYSTEM_SUSPEND returned {} instead of suspending",
                    round,
                    status_name(r)
                );
            }
        }
        ensure!(
            now >= deadline,
            "round {}: resumed before the timer deadline",
            round
        );
        let mut when = vguest::report::Detail::new();
        let _ = core::fmt::Write::write_fmt(&mut when, format_args!("round {}", round));
        ram_intact(context, when.as_str())?;
    }
    println!(
        "VG-INFO system-suspend {} rounds in {} ms, {} pages of RAM above the image checked each round",
        rounds,
        timer::ticks_to_ms(timer::now() - start),
        free_pages().count()
    );
    Ok(())
}

/// SYSTEM_SUSPEND with every other CPU off and the virtual timer armed to fire
/// `timer_ms` from now (0: already pending when the call is made), the physical
/// timer as a late second wake-up; returns the outcome, how long the call took
/// (ms) and whether it came back at or after the virtual timer's deadline.
fn suspend_with_timer(context: u64, timer_ms: u64) -> (SuspendOutcome, u64, bool) {
    drain_interrupts();
    let deadline = timer::arm_virtual_in_ms(timer_ms);
    if timer_ms == 0 {
        while timer::now() <= deadline {}
    }
    timer::arm_physical_in_ms(LATE_WAKE_MS);
    let called = timer::now();
    let outcome = cpu::suspend_call(PSCI_SYSTEM_SUSPEND_64, cpu::resume_entry(), context, 0);
    let back = timer::now();
    let _ = gic_setup(false);
    timer::disarm_physical();
    take_timer_interrupt();
    (outcome, timer::ticks_to_ms(back - called), back >= deadline)
}

fn pending_interrupt() -> CheckResult {
    // Control: without a pending interrupt the same call suspends until the timer.
    let context = 0x5_FFFF_0001;
    fill_ram_and_prove_the_check(context)?;
    let (outcome, took_ms, after_deadline) = suspend_with_timer(context, CONTROL_MS);
    match outcome {
        SuspendOutcome::Resumed { context_id } if context_id == context => {}
        other => {
            return fail!(
                "control suspend (timer in {} ms) ended with {:?}",
                CONTROL_MS,
                other
            )
        }
    }
    ensure!(
        after_deadline,
        "control suspend (timer in {} ms) came back before its timer, after {} ms",
        CONTROL_MS,
        took_ms
    );
    ram_intact(context, "control suspend")?;
    // Now with the timer interrupt already pending: the suspend must end at once,
    // either by resuming at the entry point or by returning SUCCESS (DEN0022 lets a
    // powerdown request return when a wake-up event is pending).
    let context = 0x5_FFFF_0002;
    fill_ram_and_prove_the_check(context)?;
    let (outcome, took_ms, _) = suspend_with_timer(context, 0);
    ensure!(
        took_ms < IMMEDIATE_MS,
        "with the timer interrupt pending the suspend lasted {} ms (woken late, not by the pending interrupt)",
        took_ms
    );
    match outcome {
        SuspendOutcome::Resumed { context_id } => {
            ensure!(
                context_id == context,
                "resumed with x0 {:#x}, context id was {:#x}",
                context_id,
                context
            );
            println!(
                "VG-INFO system-suspend-pending-interrupt resumed at the entry point after {} ms",
                took_ms
            );
        }
        SuspendOutcome::Returned(r) => {
            ensure!(
                r == SUCCESS,
                "SYSTEM_SUSPEND with an interrupt pending = {}",
                status_name(r)
            );
            println!(
                "VG-INFO system-suspend-pending-interrupt returned SUCCESS after {} ms",
                took_ms
            );
        }
    }
    ram_intact(context, "pending-interrupt suspend")
}
