//! Scenario group `power-storm`: a hostile guest. Every vCPU (the boot CPU included) loops
//! CPU_ON, AFFINITY_INFO and (secondaries only) CPU_OFF on pseudo-random targets for the
//! run's duration (`iterations` seconds), then the boot CPU checks that nothing was lost:
//!
//! - only spec answers were seen: CPU_ON of a present CPU is SUCCESS or ALREADY_ON
//!   (ON_PENDING only when the run accepts it, `action` 1), AFFINITY_INFO is ON, OFF or
//!   ON_PENDING, and a CPU_OFF never returns;
//! - every CPU_ON SUCCESS started its target exactly once: entries at the entry point
//!   equal successes, per target;
//! - once the storm stopped every secondary is OFF, and the boot CPU can bring every
//!   secondary up again (one SUCCESS each, each runs, AFFINITY_INFO ON for all), then
//!   off again.
//!
//! The scenario is `power-storm-<N>`; the counts are printed as `VG-INFO storm ...`.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use vguest::cpu::MAX_CPUS;
use vguest::psci::{self, *};
use vguest::report::{check, CheckResult, Detail};
use vguest::{config, cpu, fail, println, timer};
use vpsci_guest_scenarios::{send_event, wait_affinity, wait_event, wait_until, Rng};

vguest::guest_main!("power-storm", main);

const DEFAULT_SECONDS: u32 = 60;
/// Limit for steps that only prove the guest is alive (64 vCPUs under nested TCG are slow).
const LIVENESS_MS: u64 = 60_000;
const ACTION_ON_PENDING_ACCEPTED: u32 = 1;

/// 0 while the storm runs; 1 once the boot CPU stopped it.
static STOP: AtomicU32 = AtomicU32::new(0);
/// Per-target CPU_ON SUCCESS answers and entries at the entry point (storm phase).
static ON_SUCCESS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static ENTRIES: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Storm tasks that have finished (returned to power off), cumulative.
static EXITS: AtomicU32 = AtomicU32::new(0);
static CALLS: AtomicU32 = AtomicU32::new(0);
static ON_ALREADY: AtomicU32 = AtomicU32::new(0);
static ON_PENDING_ANSWERS: AtomicU32 = AtomicU32::new(0);
static OFF_CALLS: AtomicU32 = AtomicU32::new(0);
static AFF_ON: AtomicU32 = AtomicU32::new(0);
static AFF_OFF: AtomicU32 = AtomicU32::new(0);
static AFF_PENDING: AtomicU32 = AtomicU32::new(0);
/// Answers outside the spec's list for the call (the first one is kept).
static BAD: AtomicU32 = AtomicU32::new(0);
static BAD_WHAT: AtomicU32 = AtomicU32::new(0);
static BAD_ANSWER: AtomicU32 = AtomicU32::new(0);
/// Final phase: secondaries that ran the final task, and the release flag.
static FINAL_UP: AtomicU32 = AtomicU32::new(0);
static FINAL_RELEASE: AtomicU32 = AtomicU32::new(0);

const WHAT_CPU_ON: u32 = 1;
const WHAT_AFFINITY: u32 = 2;

fn bad(what: u32, answer: i32) {
    if BAD.fetch_add(1, Ordering::AcqRel) == 0 {
        BAD_WHAT.store(what, Ordering::Relaxed);
        BAD_ANSWER.store(answer as u32, Ordering::Relaxed);
    }
}

/// One storm step of CPU `me`; returns false when the CPU should power itself off.
fn step(me: usize, rng: &mut Rng) -> bool {
    let n = cpu::count();
    let r = rng.next_u64();
    let target = (r >> 8) as usize % n;
    CALLS.fetch_add(1, Ordering::Relaxed);
    match r % 16 {
        0..=7 => {
            let answer = psci::cpu_on(cpu::mpidr(target), cpu::secondary_entry(), target as u64);
            match answer {
                SUCCESS => {
                    ON_SUCCESS[target].fetch_add(1, Ordering::AcqRel);
                }
                ALREADY_ON => {
                    ON_ALREADY.fetch_add(1, Ordering::Relaxed);
                }
                ON_PENDING if config::get().action == ACTION_ON_PENDING_ACCEPTED => {
                    ON_PENDING_ANSWERS.fetch_add(1, Ordering::Relaxed);
                }
                other => bad(WHAT_CPU_ON, other),
            }
        }
        8..=14 => match psci::affinity_info(cpu::mpidr(target), 0) {
            AFFINITY_ON => {
                AFF_ON.fetch_add(1, Ordering::Relaxed);
            }
            AFFINITY_OFF => {
                AFF_OFF.fetch_add(1, Ordering::Relaxed);
            }
            AFFINITY_ON_PENDING => {
                AFF_PENDING.fetch_add(1, Ordering::Relaxed);
            }
            other => bad(WHAT_AFFINITY, other),
        },
        _ => {
            if me != 0 {
                OFF_CALLS.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
    }
    true
}

/// What a secondary runs at its entry point during the storm; returning calls CPU_OFF.
fn storm_task(index: usize, context_id: u64) {
    if context_id as usize != index {
        // A CPU_ON's context id names its target: arriving with another is a lost start.
        bad(WHAT_CPU_ON, 1000 + context_id as i32);
    }
    ENTRIES[index % MAX_CPUS].fetch_add(1, Ordering::AcqRel);
    let mut rng = Rng::new(index);
    while STOP.load(Ordering::Acquire) == 0 {
        if !step(index, &mut rng) {
            break;
        }
    }
    EXITS.fetch_add(1, Ordering::AcqRel);
    send_event();
}

fn final_task(_index: usize, _context_id: u64) {
    FINAL_UP.fetch_add(1, Ordering::AcqRel);
    send_event();
    while FINAL_RELEASE.load(Ordering::Acquire) == 0 {
        wait_event();
    }
}

fn sum(counters: &[AtomicU32]) -> u32 {
    counters.iter().map(|c| c.load(Ordering::Acquire)).sum()
}

fn main() {
    let n = cpu::count();
    let mut name = Detail::new();
    let _ = core::fmt::Write::write_fmt(&mut name, format_args!("power-storm-{}", n));
    let name = name.as_str();
    if n < 2 {
        check(name, fail!("needs at least 2 CPUs"));
        return;
    }
    let cfg = config::get();
    let seconds = if cfg.iterations == 0 {
        DEFAULT_SECONDS
    } else {
        cfg.iterations
    };
    let started = timer::now();
    let result = storm(seconds);
    println!(
        "VG-INFO storm {} cpus={} seconds={} calls={} cpu_on_success={} cpu_on_already_on={} cpu_on_on_pending={} entries={} cpu_off={} affinity_on={} affinity_off={} affinity_on_pending={} bad_answers={} total_ms={}",
        name,
        n,
        seconds,
        CALLS.load(Ordering::Relaxed),
        sum(&ON_SUCCESS),
        ON_ALREADY.load(Ordering::Relaxed),
        ON_PENDING_ANSWERS.load(Ordering::Relaxed),
        sum(&ENTRIES),
        OFF_CALLS.load(Ordering::Relaxed),
        AFF_ON.load(Ordering::Relaxed),
        AFF_OFF.load(Ordering::Relaxed),
        AFF_PENDING.load(Ordering::Relaxed),
        BAD.load(Ordering::Relaxed),
        timer::ticks_to_ms(timer::now() - started)
    );
    check(name, result);
}

fn storm(seconds: u32) -> CheckResult {
    let n = cpu::count();
    for i in 1..n {
        cpu::set_task(i, storm_task);
    }
    let end = timer::now() + timer::ms_to_ticks(u64::from(seconds) * 1000);
    let mut rng = Rng::new(0);
    while timer::now() < end {
        step(0, &mut rng);
    }
    STOP.store(1, Ordering::Release);
    send_event();
    // Quiescent once every start has arrived and every arrival has left.
    let settled = wait_until(
        || {
            let entries = sum(&ENTRIES);
            EXITS.load(Ordering::Acquire) == entries && entries == sum(&ON_SUCCESS)
        },
        LIVENESS_MS,
    );
    for i in 1..n {
        wait_affinity(i, AFFINITY_OFF, LIVENESS_MS)?;
    }
    if !settled {
        return fail!(
            "storm did not settle within {} s: {} CPU_ON SUCCESS, {} entries, {} exits",
            LIVENESS_MS / 1000,
            sum(&ON_SUCCESS),
            sum(&ENTRIES),
            EXITS.load(Ordering::Acquire)
        );
    }
    if BAD.load(Ordering::Acquire) != 0 {
        let what = match BAD_WHAT.load(Ordering::Relaxed) {
            WHAT_CPU_ON => "CPU_ON",
            _ => "AFFINITY_INFO",
        };
        let answer = BAD_ANSWER.load(Ordering::Relaxed) as i32;
        return fail!(
            "{} answers outside the spec's list; first: {} gave {} ({})",
            BAD.load(Ordering::Relaxed),
            what,
            answer,
            status_name(answer)
        );
    }
    for i in 0..n {
        let (on, entries) = (
            ON_SUCCESS[i].load(Ordering::Acquire),
            ENTRIES[i].load(Ordering::Acquire),
        );
        if on != entries {
            return fail!(
                "cpu {}: {} CPU_ON SUCCESS but {} entries at the entry point",
                i,
                on,
                entries
            );
        }
    }
    if ON_SUCCESS[0].load(Ordering::Acquire) != 0 {
        return fail!("CPU_ON of the running boot CPU succeeded");
    }
    // Everyone is still there: bring every secondary up once more.
    for i in 1..n {
        let r = cpu::start(i, final_task, i as u64);
        if r != SUCCESS {
            return fail!("after the storm CPU_ON(cpu {}) = {}", i, status_name(r));
        }
    }
    let up = wait_until(
        || FINAL_UP.load(Ordering::Acquire) == (n - 1) as u32,
        LIVENESS_MS,
    );
    if !up {
        return fail!(
            "after the storm only {} of {} secondaries came up",
            FINAL_UP.load(Ordering::Acquire),
            n - 1
        );
    }
    for i in 1..n {
        let a = psci::affinity_info(cpu::mpidr(i), 0);
        if a != AFFINITY_ON {
            return fail!("after the storm cpu {} is up but AFFINITY_INFO = {}", i, a);
        }
    }
    FINAL_RELEASE.store(1, Ordering::Release);
    send_event();
    for i in 1..n {
        wait_affinity(i, AFFINITY_OFF, LIVENESS_MS)?;
    }
    Ok(())
}
