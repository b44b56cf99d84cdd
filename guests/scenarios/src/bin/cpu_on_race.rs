//! Scenario group `cpu-on-race`: every CPU but the last calls CPU_ON on the
//! last CPU at the same time, many rounds. Each round must give exactly one
//! SUCCESS and ALREADY_ON for every other caller (a target is ON for every
//! observer from the moment one CPU_ON succeeded, as KVM and guests written
//! for it expect); the target must run its entry point exactly once with that
//! round's context id within 1 s of the last caller's answer, and power itself
//! off once every caller has its answer (the next round starts when
//! AFFINITY_INFO says OFF). The run's `action` picks the scenario:
//!
//! - 0: `cpu-on-race-<N>`, strict answers; with 2 CPUs there is a single
//!   caller and no race, so the check is `cpu-on-after-off-repeated` (a
//!   target is started again after each power-off, with the new context id);
//! - 1: `cpu-on-race-<N>-report-on-pending`, for a VMM that reports ON_PENDING
//!   (TF-A's reading of DEN0022): ON_PENDING is accepted besides ALREADY_ON;
//! - 2: `affinity-info-on-after-cpu-on-<N>`, strict answers, and right after
//!   the winner's SUCCESS has returned every CPU (the callers and the target)
//!   checks that AFFINITY_INFO(target) is ON, never ON_PENDING or OFF.
//!
//! Prints the counts per answer (`VG-INFO race ...`).

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use vguest::psci::{self, *};
use vguest::report::{check, CheckResult};
use vguest::{config, cpu, fail, println, timer};
use vpsci_guest_scenarios::{affinity_name, send_event, wait_affinity, wait_event};

vguest::guest_main!("cpu-on-race", main);

const DEFAULT_ROUNDS: u32 = 100;
const ABORT: u32 = u32::MAX;
/// Limit for steps that only prove the guest is alive (not spec timing): 64 vCPUs
/// on an emulated host can take seconds to reach a barrier.
const LIVENESS_MS: u64 = 30_000;

/// Round the racers may start (0 = none yet, ABORT = stop).
static GO: AtomicU32 = AtomicU32::new(0);
/// Racers (other than the boot CPU) that reached the start line, cumulative.
static READY: AtomicU32 = AtomicU32::new(0);
/// Racers (all) that finished their CPU_ON, cumulative.
static DONE: AtomicU32 = AtomicU32::new(0);
static SUCCESS_COUNT: AtomicU32 = AtomicU32::new(0);
static ALREADY_ON_COUNT: AtomicU32 = AtomicU32::new(0);
static ON_PENDING_COUNT: AtomicU32 = AtomicU32::new(0);
static OTHER_COUNT: AtomicU32 = AtomicU32::new(0);
static LAST_OTHER: AtomicU32 = AtomicU32::new(0);
/// Times the target ran its entry point, and the context id it last saw.
static TARGET_ENTRIES: AtomicU32 = AtomicU32::new(0);
static TARGET_CONTEXT: AtomicU32 = AtomicU32::new(0);
/// The round whose winner's SUCCESS has returned.
static WON: AtomicU32 = AtomicU32::new(0);
/// AFFINITY_INFO(target) checks made after a round's SUCCESS, and those not ON.
static AFFINITY_CHECKS: AtomicU32 = AtomicU32::new(0);
static AFFINITY_NOT_ON: AtomicU32 = AtomicU32::new(0);
static LAST_AFFINITY: AtomicU32 = AtomicU32::new(0);

const ACTION_STRICT: u32 = 0;
const ACTION_ON_PENDING_ACCEPTED: u32 = 1;
const ACTION_AFFINITY_AFTER_SUCCESS: u32 = 2;

fn action() -> u32 {
    config::get().action
}

fn target() -> usize {
    cpu::count() - 1
}

fn race_once(round: u32) {
    let r = psci::cpu_on(
        cpu::mpidr(target()),
        cpu::secondary_entry(),
        u64::from(round),
    );
    if r == SUCCESS {
        WON.store(round, Ordering::Release);
        send_event();
    }
    let counter = match r {
        SUCCESS => &SUCCESS_COUNT,
        ALREADY_ON => &ALREADY_ON_COUNT,
        ON_PENDING => &ON_PENDING_COUNT,
        other => {
            LAST_OTHER.store(other as u32, Ordering::Relaxed);
            &OTHER_COUNT
        }
    };
    counter.fetch_add(1, Ordering::AcqRel);
    if action() == ACTION_AFFINITY_AFTER_SUCCESS {
        // Every caller waits for the winner's SUCCESS to have returned, then asks.
        if wait_count(&WON, round, LIVENESS_MS) {
            check_affinity_on();
        } else {
            note_affinity(AFFINITY_OFF + 100);
        }
    }
    DONE.fetch_add(1, Ordering::AcqRel);
}

/// AFFINITY_INFO(target, level 0) must say ON.
fn check_affinity_on() {
    let answer = psci::affinity_info(cpu::mpidr(target()), 0);
    note_affinity(answer);
}

fn note_affinity(answer: i32) {
    AFFINITY_CHECKS.fetch_add(1, Ordering::AcqRel);
    if answer != AFFINITY_ON {
        LAST_AFFINITY.store(answer as u32, Ordering::Relaxed);
        AFFINITY_NOT_ON.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether `answer` is one a caller that lost the race may get in this run.
fn losing_answer_accepted(answer_is_on_pending: bool) -> bool {
    !answer_is_on_pending || action() == ACTION_ON_PENDING_ACCEPTED
}

fn racer(_index: usize, _context_id: u64) {
    let mut round = 1;
    loop {
        READY.fetch_add(1, Ordering::AcqRel);
        send_event();
        let go = loop {
            let g = GO.load(Ordering::Acquire);
            if g == round || g == ABORT {
                break g;
            }
            wait_event();
        };
        if go == ABORT {
            return;
        }
        race_once(round);
        round += 1;
    }
}

fn target_entry(_index: usize, context_id: u64) {
    TARGET_CONTEXT.store(context_id as u32, Ordering::Relaxed);
    TARGET_ENTRIES.fetch_add(1, Ordering::AcqRel);
    send_event();
    if action() == ACTION_AFFINITY_AFTER_SUCCESS {
        check_affinity_on();
    }
    // Stay on until every racer's CPU_ON of this round has returned: a racer that
    // called after the target was off again could rightly get a second SUCCESS.
    let racers = (cpu::count() - 1) as u32;
    wait_count(
        &DONE,
        (context_id as u32).saturating_mul(racers),
        LIVENESS_MS,
    );
    // Returning powers this CPU off (CPU_OFF).
}

fn wait_count(counter: &AtomicU32, want: u32, timeout_ms: u64) -> bool {
    let end = timer::now() + timer::ms_to_ticks(timeout_ms);
    while counter.load(Ordering::Acquire) < want {
        if timer::now() > end {
            return false;
        }
        wait_event();
    }
    true
}

/// What went wrong in the first bad round.
struct RoundFailure {
    round: u32,
    successes: u32,
    others: u32,
    on_pending: u32,
    not_on: u32,
    entries: u32,
    context: u32,
}

struct Tally {
    bad_rounds: u32,
    max_up_ticks: u64,
}

fn main() {
    let n = cpu::count();
    let name_buf = {
        let mut d = vguest::report::Detail::new();
        let _ = match action() {
            ACTION_STRICT if n == 2 => {
                core::fmt::Write::write_str(&mut d, "cpu-on-after-off-repeated")
            }
            ACTION_STRICT => core::fmt::Write::write_fmt(&mut d, format_args!("cpu-on-race-{}", n)),
            ACTION_ON_PENDING_ACCEPTED => core::fmt::Write::write_fmt(
                &mut d,
                format_args!("cpu-on-race-{}-report-on-pending", n),
            ),
            ACTION_AFFINITY_AFTER_SUCCESS => core::fmt::Write::write_fmt(
                &mut d,
                format_args!("affinity-info-on-after-cpu-on-{}", n),
            ),
            other => {
                core::fmt::Write::write_fmt(&mut d, format_args!("cpu-on-race-action-{}", other))
            }
        };
        d
    };
    let name = name_buf.as_str();
    if n < 2 || action() > ACTION_AFFINITY_AFTER_SUCCESS {
        check(name, fail!("needs at least 2 CPUs and a known action"));
        return;
    }
    let cfg = config::get();
    let rounds = if cfg.iterations == 0 {
        DEFAULT_ROUNDS
    } else {
        cfg.iterations
    };
    let started = timer::now();
    let mut tally = Tally {
        bad_rounds: 0,
        max_up_ticks: 0,
    };
    let result = run_rounds(rounds, &mut tally);
    GO.store(ABORT, Ordering::Release);
    send_event();
    println!(
        "VG-INFO race {} cpus={} rounds={} success={} already_on={} on_pending={} other={} bad_rounds={} affinity_checks={} affinity_not_on={} max_up_us={} total_ms={}",
        name,
        n,
        rounds,
        SUCCESS_COUNT.load(Ordering::Relaxed),
        ALREADY_ON_COUNT.load(Ordering::Relaxed),
        ON_PENDING_COUNT.load(Ordering::Relaxed),
        OTHER_COUNT.load(Ordering::Relaxed),
        tally.bad_rounds,
        AFFINITY_CHECKS.load(Ordering::Relaxed),
        AFFINITY_NOT_ON.load(Ordering::Relaxed),
        tally.max_up_ticks * 1000 / (timer::ms_to_ticks(1)).max(1),
        timer::ticks_to_ms(timer::now() - started)
    );
    check(name, result);
    // Let the racers power off before SYSTEM_OFF (not required, but tidy).
    for i in 1..n.saturating_sub(1) {
        let _ = wait_affinity(i, AFFINITY_OFF, 1000);
    }
}

fn run_rounds(rounds: u32, tally: &mut Tally) -> CheckResult {
    let n = cpu::count();
    let racers = (n - 1) as u32; // boot CPU included
    let t = target();
    for i in 1..(n - 1) {
        let r = cpu::start(i, racer, 0);
        if r != SUCCESS {
            return fail!("CPU_ON(racer cpu {}) = {}", i, status_name(r));
        }
    }
    cpu::set_task(t, target_entry);
    let mut first_failure = None;
    for round in 1..=rounds {
        if !wait_count(&READY, round * (racers - 1), LIVENESS_MS) {
            return fail!(
                "round {}: racers not at the start line within {} s",
                round,
                LIVENESS_MS / 1000
            );
        }
        let before = [
            SUCCESS_COUNT.load(Ordering::Acquire),
            OTHER_COUNT.load(Ordering::Acquire),
            ON_PENDING_COUNT.load(Ordering::Acquire),
            AFFINITY_NOT_ON.load(Ordering::Acquire),
        ];
        let entries_before = TARGET_ENTRIES.load(Ordering::Acquire);
        let t0 = timer::now();
        GO.store(round, Ordering::Release);
        send_event();
        race_once(round);
        if !wait_count(&DONE, round * racers, LIVENESS_MS) {
            return fail!(
                "round {}: racers' CPU_ON calls did not finish within {} s",
                round,
                LIVENESS_MS / 1000
            );
        }
        if !wait_count(&TARGET_ENTRIES, entries_before + 1, 1000) {
            return fail!(
                "round {}: target never ran its entry point within 1 s",
                round
            );
        }
        tally.max_up_ticks = tally.max_up_ticks.max(timer::now() - t0);
        // Not a spec deadline: the target first waits for every racer, which takes a
        // while with 64 vCPUs on an emulated host.
        wait_affinity(t, AFFINITY_OFF, LIVENESS_MS)?;
        let successes = SUCCESS_COUNT.load(Ordering::Acquire) - before[0];
        let others = OTHER_COUNT.load(Ordering::Acquire) - before[1];
        let on_pending = ON_PENDING_COUNT.load(Ordering::Acquire) - before[2];
        let not_on = AFFINITY_NOT_ON.load(Ordering::Acquire) - before[3];
        let entries = TARGET_ENTRIES.load(Ordering::Acquire) - entries_before;
        let context = TARGET_CONTEXT.load(Ordering::Relaxed);
        let round_ok = successes == 1
            && others == 0
            && losing_answer_accepted(on_pending > 0)
            && not_on == 0
            && entries == 1
            && context == round;
        if !round_ok {
            tally.bad_rounds += 1;
            if first_failure.is_none() {
                first_failure = Some(RoundFailure {
                    round,
                    successes,
                    others,
                    on_pending,
                    not_on,
                    entries,
                    context,
                });
            }
        }
    }
    if let Some(f) = first_failure {
        return fail!(
            "{} of {} rounds wrong; first: round {} gave {} SUCCESS, {} ON_PENDING, {} other answers (last {}), {} AFFINITY_INFO not ON (last {}), target entered {} times, context {}",
            tally.bad_rounds,
            rounds,
            f.round,
            f.successes,
            f.on_pending,
            f.others,
            LAST_OTHER.load(Ordering::Relaxed) as i32,
            f.not_on,
            affinity_name(LAST_AFFINITY.load(Ordering::Relaxed) as i32),
            f.entries,
            f.context
        );
    }
    Ok(())
}
