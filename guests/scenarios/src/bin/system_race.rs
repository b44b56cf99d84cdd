//! Scenario group `system-race`: hostile guests whose boot CPU makes system-scoped calls
//! while the other CPUs storm CPU_ON / AFFINITY_INFO / CPU_OFF on each other (targets
//! drawn at random), and the reset-cycle leak run. `action` picks the run:
//!
//! 1. `system-suspend-race-<N>`: rounds of: the boot CPU seeds a storm, stops feeding it
//!    after a random few ms and meanwhile calls SYSTEM_SUSPEND (virtual timer armed as the
//!    wake-up) until one commits. Every answer is DENIED (another CPU is not OFF) or a
//!    resume at the entry point with the round's context id, after which every other CPU
//!    must be OFF.
//! 2. `system-reset-race-<N>` (`vpsci run --on-reset restart`): every boot starts a storm
//!    and calls SYSTEM_RESET in the middle of it; the VM must restart `iterations` times
//!    (a count kept in RAM, which a reset keeps). A reset that returns must say DENIED or
//!    INTERNAL_FAILURE (and is counted).
//! 3. `system-off2-refused-race-<N>` (`--on-hibernate refuse`): during the storm the boot
//!    CPU calls SYSTEM_OFF2: HIBERNATE_OFF and type 0 must answer INTERNAL_FAILURE (the
//!    VMM refuses, nothing changes), a non-zero cookie or a reserved type
//!    INVALID_PARAMETERS; the storm carries on.
//! 4. `system-off2-commit-race-<N>`: as 3 with only the invalid variants, then one
//!    SYSTEM_OFF2(HIBERNATE_OFF) in the middle of the storm, which must end the VM.
//! 5. `reset-cycles-<N>` (`--on-reset restart`): every boot brings all CPUs up and calls
//!    SYSTEM_RESET, `iterations` times; at the first boot (a warm-up) and after the first
//!    and the last reset the guest prints `VG-INFO reset-cycles sample=<k>` and waits for
//!    one byte on the UART: the host reads vpsci's threads, file descriptors and resident
//!    memory meanwhile.
//!
//! Runs 1, 3 and 4 last `iterations` seconds. Each prints its counts per answer as
//! `VG-INFO system-race ...`; the host checks them against the event log (every other
//! vCPU OFF at a committed suspend, nothing from another vCPU between a committed reset or
//! hibernate and the VM's restart or end, one refused `hibernate` event per
//! INTERNAL_FAILURE).

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::cpu::{self, SuspendOutcome};
use vguest::psci::{self, *};
use vguest::report::{check, CheckResult, Detail};
use vguest::{config, fail, println, timer};
use vpsci_guest_scenarios::{
    gic_setup, send_event, take_timer_interrupt, wait_affinity, wait_event, wait_until, Rng,
};

vguest::guest_main!("system-race", main);

const SUSPEND_RACE: u32 = 1;
const RESET_RACE: u32 = 2;
const OFF2_REFUSED_RACE: u32 = 3;
const OFF2_COMMIT_RACE: u32 = 4;
const RESET_CYCLES: u32 = 5;

const DEFAULT_SECONDS: u32 = 30;
const DEFAULT_RESETS: u32 = 20;
const LIVENESS_MS: u64 = 60_000;
/// How long the reset-cycle guest waits for the host to sample vpsci.
const SAMPLE_WAIT_MS: u64 = 300_000;

/// 1 while storm CPUs may keep calling CPU_ON; 0 once they should power off.
static STORM: AtomicU32 = AtomicU32::new(0);
static ENTRIES: AtomicU32 = AtomicU32::new(0);
static EXITS: AtomicU32 = AtomicU32::new(0);
static STORM_CALLS: AtomicU32 = AtomicU32::new(0);
static ON_SUCCESS: AtomicU32 = AtomicU32::new(0);
static STORM_BAD: AtomicU32 = AtomicU32::new(0);
static STORM_BAD_ANSWER: AtomicU32 = AtomicU32::new(0);
static RELEASE: AtomicU32 = AtomicU32::new(0);
static UP: AtomicU32 = AtomicU32::new(0);

/// Kept in RAM across resets (a reset reloads the image, not the RAM around it): below
/// the image, above the first page (which other guests use for code at RAM's edge).
#[repr(C)]
struct Persistent {
    magic: AtomicU64,
    resets: AtomicU64,
    returned: AtomicU64,
    last_returned: AtomicU64,
    storm_calls: AtomicU64,
    storm_bad: AtomicU64,
}

const PERSISTENT_MAGIC: u64 = 0x5253_5452_4143_4531;

fn persistent() -> &'static Persistent {
    let at = vguest::platform().ram.0 + 0x1000;
    // SAFETY: RAM base + 4 KiB lies between RAM's first page and the image (loaded at
    // base + 512 KiB); nothing else in this program or the loader uses it, and every
    // field is an atomic, so shared references are sound.
    let p = unsafe { &*(at as *const Persistent) };
    if p.magic.load(Ordering::Acquire) != PERSISTENT_MAGIC {
        for f in [
            &p.resets,
            &p.returned,
            &p.last_returned,
            &p.storm_calls,
            &p.storm_bad,
        ] {
            f.store(0, Ordering::Relaxed);
        }
        p.magic.store(PERSISTENT_MAGIC, Ordering::Release);
    }
    p
}

fn storm_bad(answer: i32) {
    if STORM_BAD.fetch_add(1, Ordering::AcqRel) == 0 {
        STORM_BAD_ANSWER.store(answer as u32, Ordering::Relaxed);
    }
}

/// One storm step of a storm CPU on another storm CPU (never the boot CPU); false when
/// the CPU should power itself off.
fn storm_step(rng: &mut Rng) -> bool {
    let n = cpu::count();
    let target = 1 + rng.below(n as u64 - 1) as usize;
    STORM_CALLS.fetch_add(1, Ordering::Relaxed);
    match rng.below(8) {
        0..=3 => match psci::cpu_on(cpu::mpidr(target), cpu::secondary_entry(), target as u64) {
            SUCCESS => {
                ON_SUCCESS.fetch_add(1, Ordering::Relaxed);
            }
            ALREADY_ON => {}
            other => storm_bad(other),
        },
        4..=6 => match psci::affinity_info(cpu::mpidr(target), 0) {
            AFFINITY_ON | AFFINITY_OFF | AFFINITY_ON_PENDING => {}
            other => storm_bad(other),
        },
        _ => return false,
    }
    true
}

fn storm_task(index: usize, _context: u64) {
    cpu::set_task(index, storm_task);
    ENTRIES.fetch_add(1, Ordering::AcqRel);
    let mut rng = Rng::new(index);
    while STORM.load(Ordering::Acquire) != 0 && storm_step(&mut rng) {}
    EXITS.fetch_add(1, Ordering::AcqRel);
    send_event();
}

fn set_storm_tasks() {
    for i in 1..cpu::count() {
        cpu::set_task(i, storm_task);
    }
}

/// CPU_ON of a random storm CPU by the boot CPU (SUCCESS or ALREADY_ON).
fn seed(rng: &mut Rng) {
    let target = 1 + rng.below(cpu::count() as u64 - 1) as usize;
    STORM_CALLS.fetch_add(1, Ordering::Relaxed);
    match psci::cpu_on(cpu::mpidr(target), cpu::secondary_entry(), target as u64) {
        SUCCESS => {
            ON_SUCCESS.fetch_add(1, Ordering::Relaxed);
        }
        ALREADY_ON => {}
        other => storm_bad(other),
    }
}

/// Stops the storm and waits until every storm CPU that entered has left and all are OFF.
fn settle() -> CheckResult {
    STORM.store(0, Ordering::Release);
    send_event();
    let settled = wait_until(
        || {
            let entries = ENTRIES.load(Ordering::Acquire);
            EXITS.load(Ordering::Acquire) == entries
                && entries == ON_SUCCESS.load(Ordering::Acquire)
        },
        LIVENESS_MS,
    );
    if !settled {
        return fail!(
            "the storm did not settle: {} CPU_ON SUCCESS, {} entries, {} exits",
            ON_SUCCESS.load(Ordering::Acquire),
            ENTRIES.load(Ordering::Acquire),
            EXITS.load(Ordering::Acquire)
        );
    }
    for i in 1..cpu::count() {
        wait_affinity(i, AFFINITY_OFF, LIVENESS_MS)?;
    }
    Ok(())
}

fn storm_verdict() -> CheckResult {
    let bad = STORM_BAD.load(Ordering::Acquire);
    if bad != 0 {
        let answer = STORM_BAD_ANSWER.load(Ordering::Relaxed) as i32;
        return fail!(
            "{} storm answers outside the spec's list; first {} ({})",
            bad,
            answer,
            status_name(answer)
        );
    }
    Ok(())
}

fn hold(_index: usize, _context: u64) {
    UP.fetch_add(1, Ordering::AcqRel);
    send_event();
    while RELEASE.load(Ordering::Acquire) == 0 {
        wait_event();
    }
}

/// Brings every other CPU up (each must answer SUCCESS and run), then lets them power off.
fn everyone_still_there() -> CheckResult {
    let n = cpu::count();
    UP.store(0, Ordering::Release);
    RELEASE.store(0, Ordering::Release);
    for i in 1..n {
        let r = cpu::start(i, hold, i as u64);
        if r != SUCCESS {
            return fail!("afterwards CPU_ON(cpu {}) = {}", i, status_name(r));
        }
    }
    if !wait_until(|| UP.load(Ordering::Acquire) == (n - 1) as u32, LIVENESS_MS) {
        return fail!(
            "afterwards only {} of {} CPUs came up",
            UP.load(Ordering::Acquire),
            n - 1
        );
    }
    RELEASE.store(1, Ordering::Release);
    send_event();
    for i in 1..n {
        wait_affinity(i, AFFINITY_OFF, LIVENESS_MS)?;
    }
    Ok(())
}

fn seconds() -> u32 {
    match config::get().iterations {
        0 => DEFAULT_SECONDS,
        s => s,
    }
}

fn suspend_race() -> CheckResult {
    gic_setup(true)?;
    set_storm_tasks();
    let end = timer::now() + timer::ms_to_ticks(u64::from(seconds()) * 1000);
    let mut rng = Rng::new(0);
    let (mut rounds, mut denied, mut committed) = (0u64, 0u64, 0u64);
    while timer::now() < end {
        rounds += 1;
        let context = 0x5A_0000_0000 | rounds;
        STORM.store(1, Ordering::Release);
        seed(&mut rng);
        let quench = timer::now() + timer::ms_to_ticks(rng.below(20));
        let give_up = timer::now() + timer::ms_to_ticks(LIVENESS_MS);
        loop {
            if timer::now() >= quench {
                STORM.store(0, Ordering::Release);
            }
            timer::arm_virtual_in_ms(1);
            let outcome =
                cpu::suspend_call(PSCI_SYSTEM_SUSPEND_64, cpu::resume_entry(), context, 0);
            gic_setup(false)?;
            take_timer_interrupt();
            match outcome {
                SuspendOutcome::Resumed { context_id } if context_id == context => {
                    committed += 1;
                    break;
                }
                SuspendOutcome::Resumed { context_id } => {
                    return fail!(
                        "round {}: resumed with x0 {:#x}, expected {:#x}",
                        rounds,
                        context_id,
                        context
                    )
                }
                SuspendOutcome::Returned(DENIED) => denied += 1,
                SuspendOutcome::Returned(r) => {
                    return fail!(
                        "round {}: SYSTEM_SUSPEND = {} ({})",
                        rounds,
                        r,
                        status_name(r)
                    )
                }
            }
            if timer::now() > give_up {
                return fail!("round {}: SYSTEM_SUSPEND never committed", rounds);
            }
        }
        // The suspend committed: nobody else may be on.
        for i in 1..cpu::count() {
            let a = psci::affinity_info(cpu::mpidr(i), 0);
            if a != AFFINITY_OFF {
                return fail!(
                    "round {}: after a committed SYSTEM_SUSPEND cpu {} is {}",
                    rounds,
                    i,
                    a
                );
            }
        }
    }
    settle()?;
    println!(
        "VG-INFO system-race suspend rounds={} committed={} denied={} storm_calls={} storm_cpu_on_success={}",
        rounds,
        committed,
        denied,
        STORM_CALLS.load(Ordering::Relaxed),
        ON_SUCCESS.load(Ordering::Relaxed)
    );
    storm_verdict()?;
    everyone_still_there()
}

/// The SYSTEM_OFF2 variants the refused/commit races make, with the answer each must get.
fn off2_variant(rng: &mut Rng, refused: bool) -> (u64, u64, i32) {
    match rng.below(if refused { 4 } else { 2 }) {
        0 => (
            HIBERNATE_OFF,
            1 + rng.below(u64::MAX - 1),
            INVALID_PARAMETERS,
        ),
        1 => (2 + rng.below(0xFFFF_FFFD), 0, INVALID_PARAMETERS),
        2 => (HIBERNATE_OFF, 0, INTERNAL_FAILURE),
        _ => (0, 0, INTERNAL_FAILURE),
    }
}

/// Storm plus SYSTEM_OFF2 calls for the run's duration; returns (calls, refused, invalid).
fn off2_storm(refused: bool) -> Result<(u64, u64, u64), Detail> {
    set_storm_tasks();
    STORM.store(1, Ordering::Release);
    let end = timer::now() + timer::ms_to_ticks(u64::from(seconds()) * 1000);
    let mut rng = Rng::new(0);
    let (mut calls, mut refusals, mut invalid) = (0u64, 0u64, 0u64);
    while timer::now() < end {
        seed(&mut rng);
        let (off_type, cookie, want) = off2_variant(&mut rng, refused);
        let r = psci::status(PSCI_SYSTEM_OFF2_64, off_type, cookie, 0);
        calls += 1;
        if r != want {
            return fail!(
                "SYSTEM_OFF2(type {:#x}, cookie {:#x}) = {} ({}), expected {}",
                off_type,
                cookie,
                r,
                status_name(r),
                status_name(want)
            );
        }
        if r == INTERNAL_FAILURE {
            refusals += 1;
        } else {
            invalid += 1;
        }
    }
    Ok((calls, refusals, invalid))
}

fn off2_refused_race() -> CheckResult {
    let (calls, refused, invalid) = off2_storm(true)?;
    settle()?;
    println!(
        "VG-INFO system-race off2-refused calls={} internal_failure={} invalid_parameters={} storm_calls={} storm_cpu_on_success={}",
        calls,
        refused,
        invalid,
        STORM_CALLS.load(Ordering::Relaxed),
        ON_SUCCESS.load(Ordering::Relaxed)
    );
    storm_verdict()?;
    everyone_still_there()
}

fn off2_commit_race(name: &str) -> CheckResult {
    let (calls, _, invalid) = off2_storm(false)?;
    storm_verdict()?;
    println!(
        "VG-INFO system-race off2-commit calls={} invalid_parameters={} storm_calls={} storm_cpu_on_success={}",
        calls,
        invalid,
        STORM_CALLS.load(Ordering::Relaxed),
        ON_SUCCESS.load(Ordering::Relaxed)
    );
    println!("VG-CALL {}", name);
    let r = psci::status(PSCI_SYSTEM_OFF2_64, HIBERNATE_OFF, 0, 0);
    println!("VG-RETURNED {} ({})", r, status_name(r));
    Ok(())
}

/// A SYSTEM_RESET that should not return; counts one that does (it must have changed
/// nothing and said so).
fn reset_once(p: &Persistent) -> CheckResult {
    let r = psci::status(PSCI_SYSTEM_RESET, 0, 0, 0);
    p.returned.fetch_add(1, Ordering::AcqRel);
    p.last_returned.store(r as u32 as u64, Ordering::Release);
    p.resets.fetch_sub(1, Ordering::AcqRel);
    if r != DENIED && r != INTERNAL_FAILURE {
        return fail!("SYSTEM_RESET returned {} ({})", r, status_name(r));
    }
    Ok(())
}

fn reset_race() -> CheckResult {
    let p = persistent();
    let target = match config::get().iterations {
        0 => DEFAULT_RESETS,
        r => r,
    };
    let mut rng = Rng::new(0);
    loop {
        let done = p.resets.load(Ordering::Acquire);
        if done >= u64::from(target) {
            break;
        }
        set_storm_tasks();
        STORM.store(1, Ordering::Release);
        for _ in 1..cpu::count() {
            seed(&mut rng);
        }
        let until = timer::now() + timer::ms_to_ticks(rng.below(30));
        while timer::now() < until {
            seed(&mut rng);
        }
        p.storm_calls.fetch_add(
            u64::from(STORM_CALLS.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        p.storm_bad.fetch_add(
            u64::from(STORM_BAD.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        p.resets.store(done + 1, Ordering::Release);
        reset_once(p)?;
        // It returned: nothing changed, so the storm is still going; stop it and go again.
        settle()?;
    }
    println!(
        "VG-INFO system-race reset resets={} returned={} storm_calls={} storm_bad={}",
        p.resets.load(Ordering::Acquire),
        p.returned.load(Ordering::Acquire),
        p.storm_calls.load(Ordering::Acquire),
        p.storm_bad.load(Ordering::Acquire)
    );
    if p.storm_bad.load(Ordering::Acquire) != 0 {
        return fail!(
            "{} storm answers outside the spec's list over all boots",
            p.storm_bad.load(Ordering::Acquire)
        );
    }
    everyone_still_there()
}

fn wait_for_host_byte() -> bool {
    let end = timer::now() + timer::ms_to_ticks(SAMPLE_WAIT_MS);
    while timer::now() < end {
        if vguest::uart::try_read_byte().is_some() {
            return true;
        }
        timer::delay_ms(1);
    }
    false
}

fn reset_cycles() -> CheckResult {
    let p = persistent();
    let target = u64::from(match config::get().iterations {
        0 => DEFAULT_RESETS,
        r => r,
    });
    if target < 2 {
        return fail!("needs at least 2 resets");
    }
    let n = cpu::count();
    UP.store(0, Ordering::Release);
    for i in 1..n {
        let r = cpu::start(i, hold, i as u64);
        if r != SUCCESS {
            return fail!(
                "after {} resets CPU_ON(cpu {}) = {}",
                p.resets.load(Ordering::Acquire),
                i,
                status_name(r)
            );
        }
    }
    if !wait_until(|| UP.load(Ordering::Acquire) == (n - 1) as u32, LIVENESS_MS) {
        return fail!(
            "after {} resets only {} CPUs came up",
            p.resets.load(Ordering::Acquire),
            UP.load(Ordering::Acquire)
        );
    }
    let done = p.resets.load(Ordering::Acquire);
    // The first boot's handshake is a warm-up: the first byte on the console input makes
    // vpsci allocate its input buffer, which must not count as growth between the samples
    // the host compares (after the first and after the last reset).
    if done == 0 || done == 1 || done == target {
        println!("VG-INFO reset-cycles sample={}", done);
        if !wait_for_host_byte() {
            return fail!("the host did not answer sample {}", done);
        }
    }
    if done < target {
        p.resets.store(done + 1, Ordering::Release);
        return reset_once(p);
    }
    RELEASE.store(1, Ordering::Release);
    send_event();
    for i in 1..n {
        wait_affinity(i, AFFINITY_OFF, LIVENESS_MS)?;
    }
    println!(
        "VG-INFO system-race reset-cycles resets={} returned={}",
        done,
        p.returned.load(Ordering::Acquire)
    );
    Ok(())
}

fn main() {
    let n = cpu::count();
    let action = config::get().action;
    let kind = match action {
        SUSPEND_RACE => "system-suspend-race",
        RESET_RACE => "system-reset-race",
        OFF2_REFUSED_RACE => "system-off2-refused-race",
        OFF2_COMMIT_RACE => "system-off2-commit-race",
        RESET_CYCLES => "reset-cycles",
        _ => "system-race-unknown-action",
    };
    let mut name = Detail::new();
    let _ = core::fmt::Write::write_fmt(&mut name, format_args!("{}-{}", kind, n));
    let name = name.as_str();
    if n < 3 {
        check(name, fail!("needs at least 3 CPUs"));
        return;
    }
    let result = match action {
        SUSPEND_RACE => suspend_race(),
        RESET_RACE => reset_race(),
        OFF2_REFUSED_RACE => off2_refused_race(),
        OFF2_COMMIT_RACE => match off2_commit_race(name) {
            // The call returned (VG-RETURNED says how): the host fails the run.
            Ok(()) => return,
            Err(e) => Err(e),
        },
        RESET_CYCLES => reset_cycles(),
        other => fail!("unknown action {}", other),
    };
    check(name, result);
}
