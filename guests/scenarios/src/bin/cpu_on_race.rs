//! Scenario group `cpu-on-race`: every CPU but the last races CPU_ON on the
//! last CPU, many times. Each round must give exactly one SUCCESS (the rest
//! ALREADY_ON or ON_PENDING), the target must run its entry point exactly once
//! with that round's context id within 1 s of the last racer's answer, and
//! power itself off once every racer has its answer (the next round starts when
//! AFFINITY_INFO says OFF). Reports the check `cpu-on-race-<N>` and the counts
//! per answer.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use vguest::psci::{self, *};
use vguest::report::{check, CheckResult};
use vguest::{config, cpu, fail, println, timer};
use vpsci_guest_scenarios::{send_event, wait_affinity, wait_event};

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

fn target() -> usize {
    cpu::count() - 1
}

fn race_once(round: u32) {
    let r = psci::cpu_on(
        cpu::mpidr(target()),
        cpu::secondary_entry(),
        u64::from(round),
    );
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
    DONE.fetch_add(1, Ordering::AcqRel);
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

struct Tally {
    bad_rounds: u32,
    max_up_ticks: u64,
}

fn main() {
    let n = cpu::count();
    let name_buf = {
        let mut d = vguest::report::Detail::new();
        let _ = core::fmt::Write::write_fmt(&mut d, format_args!("cpu-on-race-{}", n));
        d
    };
    let name = name_buf.as_str();
    if n < 2 {
        check(name, fail!("needs at least 2 CPUs"));
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
        "VG-INFO race cpus={} rounds={} success={} already_on={} on_pending={} other={} bad_rounds={} max_up_us={} total_ms={}",
        n,
        rounds,
        SUCCESS_COUNT.load(Ordering::Relaxed),
        ALREADY_ON_COUNT.load(Ordering::Relaxed),
        ON_PENDING_COUNT.load(Ordering::Relaxed),
        OTHER_COUNT.load(Ordering::Relaxed),
        tally.bad_rounds,
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
        let entries = TARGET_ENTRIES.load(Ordering::Acquire) - entries_before;
        let context = TARGET_CONTEXT.load(Ordering::Relaxed);
        if successes != 1 || others != 0 || entries != 1 || context != round {
            tally.bad_rounds += 1;
            if first_failure.is_none() {
                first_failure = Some((round, successes, others, entries, context));
            }
        }
    }
    if let Some((round, successes, others, entries, context)) = first_failure {
        return fail!(
            "{} of {} rounds wrong; first: round {} gave {} SUCCESS, {} other answers (last {}), target entered {} times, context {}",
            tally.bad_rounds,
            rounds,
            round,
            successes,
            others,
            LAST_OTHER.load(Ordering::Relaxed) as i32,
            entries,
            context
        );
    }
    Ok(())
}
