//! `demo`: the guest `cargo xtask demo` boots. It narrates, on the UART, one
//! tour of the power-management slice (DEN0022 F.b, PSCI 1.3):
//!
//! 1. the boot CPU starts every secondary but the last with CPU_ON (5.6), one
//!    at a time, and each reports in with the context id it found in x0;
//! 2. every CPU that is on races CPU_ON on the last CPU at once: exactly one
//!    SUCCESS, the others ALREADY_ON or ON_PENDING, and the target enters its
//!    entry point once with the context id;
//! 3. SYSTEM_SUSPEND (5.20) while the secondaries are on is DENIED;
//! 4. the secondaries call CPU_OFF (5.5) and AFFINITY_INFO (5.7) shows each
//!    one OFF;
//! 5. SYSTEM_OFF (5.10) ends the VM.
//!
//! Needs at least 3 CPUs (8 in the demo). Only the boot CPU prints (a UART
//! lock held by a descheduled vCPU would garble concurrent lines); the others
//! report through shared memory: the x0 they entered with and when they
//! entered and called CPU_OFF. Every line starts with the guest time since
//! `main` started. The last line before SYSTEM_OFF is `VG-CHECK demo PASS` or
//! `VG-CHECK demo FAIL <first problem>`.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::cpu::{self, SuspendOutcome, MAX_CPUS};
use vguest::psci::{self, *};
use vguest::report::{check, CheckResult};
use vguest::{ensure, fail, println, timer};
use vpsci_guest_scenarios::{send_event, version_parts, wait_event};

vguest::guest_main!("demo", main);

/// Limit for steps that only prove the guest is alive (not spec timing): 8
/// vCPUs under nested KVM on an emulated host can take a while to run.
const LIVENESS_MS: u64 = 10_000;
/// Context id the boot CPU gives secondary `i` at bring-up: `BRING_UP_CONTEXT + i`.
const BRING_UP_CONTEXT: u64 = 0xC0DE_0000;
/// How long the racers spin at the start line before GO.
const ARMED_MS: u64 = 30;
/// Context id every racer passes to CPU_ON of the race target.
const RACE_CONTEXT: u64 = 0x7ACE;
/// Context id of the SYSTEM_SUSPEND that must be refused.
const SUSPEND_CONTEXT: u64 = 0x5_1EE9;
/// Marks an answer slot as not yet written (no PSCI status has this value).
const NO_ANSWER: u32 = u32::MAX;

/// Counter value when `main` started.
static START: AtomicU64 = AtomicU64::new(0);
/// Context id each CPU found in x0 at its entry point (0 = not entered).
static ARRIVED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Counter value when each CPU entered.
static ENTERED_AT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Counter value when each CPU was about to call CPU_OFF.
static OFF_AT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Secondaries waiting at the race's start line.
static READY: AtomicU32 = AtomicU32::new(0);
/// Set by the boot CPU shortly before GO: the racers stop sleeping and spin.
static ARMED: AtomicU32 = AtomicU32::new(0);
/// Set by the boot CPU to start the race.
static GO: AtomicU32 = AtomicU32::new(0);
/// Racers whose CPU_ON returned.
static DONE: AtomicU32 = AtomicU32::new(0);
/// Each racer's CPU_ON answer (as u32), indexed by CPU.
static ANSWERS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(NO_ANSWER) }; MAX_CPUS];
/// Times the race target ran its entry point.
static TARGET_ENTRIES: AtomicU32 = AtomicU32::new(0);
/// Set by the boot CPU when the secondaries may power off.
static RELEASE: AtomicU32 = AtomicU32::new(0);

/// Guest time of counter value `ticks`, in microseconds since `main` started.
fn us_at(ticks: u64) -> u64 {
    let ticks = ticks.saturating_sub(START.load(Ordering::Relaxed));
    ticks.saturating_mul(1_000_000) / timer::frequency()
}

/// `ticks` as milliseconds since `main` started, for printing.
struct Ms(u64);

impl core::fmt::Display for Ms {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let us = us_at(self.0);
        write!(f, "{}.{:03} ms", us / 1000, us % 1000)
    }
}

/// Prints one narrated line with the guest time in front.
macro_rules! say {
    ($($arg:tt)*) => {{
        let us = us_at(timer::now());
        println!("[{:4}.{:03} ms] {}", us / 1000, us % 1000, format_args!($($arg)*));
    }};
}

/// Records that the calling CPU entered with `context_id`.
fn report_in(index: usize, context_id: u64) {
    ENTERED_AT[index].store(timer::now(), Ordering::Relaxed);
    ARRIVED[index].store(context_id, Ordering::Release);
    send_event();
}

fn main() {
    START.store(timer::now(), Ordering::Relaxed);
    let result = tour();
    if let Err(e) = &result {
        say!("demo: FAILED: {}", e.as_str());
    }
    check("demo", result);
    say!("5. cpu0: SYSTEM_OFF (the VMM ends the VM)");
}

fn tour() -> CheckResult {
    let n = cpu::count();
    let (major, minor) = version_parts(psci::version());
    let conduit = match psci::conduit() {
        psci::Conduit::Hvc => "HVC",
        psci::Conduit::Smc => "SMC",
    };
    say!("demo: PSCI {major}.{minor} over {conduit}, {n} CPUs; cpu0 is the boot CPU");
    ensure!(n >= 3, "the demo needs at least 3 CPUs, the VM has {}", n);
    bring_up(n)?;
    race(n)?;
    suspend_refused()?;
    power_off_secondaries(n)
}

/// Phase 1: CPU_ON each secondary but the last, one at a time.
fn bring_up(n: usize) -> CheckResult {
    say!(
        "1. cpu0 starts cpu1..cpu{} with CPU_ON, one at a time",
        n - 2
    );
    for (i, arrived) in ARRIVED.iter().enumerate().take(n - 1).skip(1) {
        let context = BRING_UP_CONTEXT + i as u64;
        let r = cpu::start(i, secondary, context);
        say!(
            "   cpu0: CPU_ON(cpu{i}, context {context:#x}) = {}",
            status_name(r)
        );
        ensure!(r == SUCCESS, "CPU_ON(cpu{}) = {}", i, status_name(r));
        ensure!(
            wait_nonzero(arrived, LIVENESS_MS),
            "cpu{} did not report in within {} ms",
            i,
            LIVENESS_MS
        );
        let got = arrived.load(Ordering::Acquire);
        say!(
            "   cpu{i}: reported in: entered at {} with x0 = {got:#x}",
            Ms(ENTERED_AT[i].load(Ordering::Relaxed))
        );
        ensure!(
            got == context,
            "cpu{} entered with x0 = {:#x}, expected {:#x}",
            i,
            got,
            context
        );
    }
    Ok(())
}

/// What a secondary started in phase 1 runs: report in, race, wait, power off.
fn secondary(index: usize, context_id: u64) {
    report_in(index, context_id);
    READY.fetch_add(1, Ordering::AcqRel);
    send_event();
    while ARMED.load(Ordering::Acquire) == 0 {
        wait_event();
    }
    // Spin rather than WFE once armed, so a racer that is running sees GO at once and the
    // boot CPU (already running) does not win every time.
    while GO.load(Ordering::Acquire) == 0 {
        core::hint::spin_loop();
    }
    race_once(index);
    wait_release(index);
}

/// What the race target runs: count the entry, then wait like the others.
fn race_target(index: usize, context_id: u64) {
    TARGET_ENTRIES.fetch_add(1, Ordering::AcqRel);
    report_in(index, context_id);
    wait_release(index);
}

/// Waits for phase 4, then returns, which makes the runtime call CPU_OFF.
fn wait_release(index: usize) {
    while RELEASE.load(Ordering::Acquire) == 0 {
        wait_event();
    }
    OFF_AT[index].store(timer::now(), Ordering::Release);
}

fn race_once(index: usize) {
    let target = cpu::count() - 1;
    let r = psci::cpu_on(cpu::mpidr(target), cpu::secondary_entry(), RACE_CONTEXT);
    ANSWERS[index].store(r as u32, Ordering::Release);
    DONE.fetch_add(1, Ordering::AcqRel);
    send_event();
}

/// Phase 2: every CPU that is on calls CPU_ON on the last CPU at the same time.
fn race(n: usize) -> CheckResult {
    let target = n - 1;
    let racers = n - 1;
    say!(
        "2. cpu0..cpu{} race CPU_ON(cpu{target}, context {RACE_CONTEXT:#x}) at the same time",
        n - 2
    );
    cpu::set_task(target, race_target);
    ensure!(
        wait_count(&READY, (racers - 1) as u32, LIVENESS_MS),
        "secondaries not at the start line within {} ms",
        LIVENESS_MS
    );
    ARMED.store(1, Ordering::Release);
    send_event();
    timer::delay_ms(ARMED_MS);
    GO.store(1, Ordering::Release);
    send_event();
    race_once(0);
    ensure!(
        wait_count(&DONE, racers as u32, LIVENESS_MS),
        "racers' CPU_ON calls did not all return within {} ms",
        LIVENESS_MS
    );
    ensure!(
        wait_count(&TARGET_ENTRIES, 1, 1000),
        "cpu{} never ran its entry point within 1 s of the last answer",
        target
    );
    let mut winners = 0;
    let mut winner = 0;
    for (i, slot) in ANSWERS.iter().enumerate().take(racers) {
        let r = slot.load(Ordering::Acquire) as i32;
        say!("   cpu{i}: CPU_ON(cpu{target}) = {}", status_name(r));
        match r {
            SUCCESS => {
                winners += 1;
                winner = i;
            }
            ALREADY_ON | ON_PENDING => {}
            other => return fail!("cpu{} got {} from the race", i, status_name(other)),
        }
    }
    ensure!(
        winners == 1,
        "{} racers got SUCCESS, exactly one must",
        winners
    );
    let entries = TARGET_ENTRIES.load(Ordering::Acquire);
    let context = ARRIVED[target].load(Ordering::Acquire);
    ensure!(
        entries == 1 && context == RACE_CONTEXT,
        "cpu{} entered {} times, last with x0 = {:#x}",
        target,
        entries,
        context
    );
    say!(
        "   decided once: cpu{winner} won, the {} others were told ALREADY_ON/ON_PENDING",
        racers - 1
    );
    say!(
        "   cpu{target}: entered once, at {} with x0 = {context:#x}",
        Ms(ENTERED_AT[target].load(Ordering::Relaxed))
    );
    Ok(())
}

/// Phase 3: SYSTEM_SUSPEND while the secondaries are on must be DENIED.
fn suspend_refused() -> CheckResult {
    say!("3. cpu0: SYSTEM_SUSPEND while the others are on");
    if psci::features(PSCI_SYSTEM_SUSPEND_64) < 0 {
        say!("   skipped: PSCI_FEATURES says SYSTEM_SUSPEND is not implemented");
        return Ok(());
    }
    match cpu::suspend_call(
        PSCI_SYSTEM_SUSPEND_64,
        cpu::resume_entry(),
        SUSPEND_CONTEXT,
        0,
    ) {
        SuspendOutcome::Returned(r) => {
            say!(
                "   cpu0: SYSTEM_SUSPEND = {} (the VM is unchanged)",
                status_name(r)
            );
            ensure!(
                r == DENIED,
                "SYSTEM_SUSPEND with others on = {}",
                status_name(r)
            );
            Ok(())
        }
        SuspendOutcome::Resumed { context_id } => fail!(
            "SYSTEM_SUSPEND with others on suspended the VM (resumed with x0 = {:#x})",
            context_id
        ),
    }
}

/// Phase 4: the secondaries call CPU_OFF; AFFINITY_INFO must show each OFF.
fn power_off_secondaries(n: usize) -> CheckResult {
    say!("4. cpu1..cpu{} call CPU_OFF", n - 1);
    RELEASE.store(1, Ordering::Release);
    send_event();
    for (i, off_at) in OFF_AT.iter().enumerate().take(n).skip(1) {
        wait_off(i)?;
        say!(
            "   cpu0: AFFINITY_INFO(cpu{i}) = OFF (cpu{i} called CPU_OFF at {})",
            Ms(off_at.load(Ordering::Acquire))
        );
    }
    Ok(())
}

/// Polls AFFINITY_INFO(cpu `index`, level 0) every 200 us until it says OFF
/// (gently, so the event log is not flooded with polls).
fn wait_off(index: usize) -> CheckResult {
    let end = timer::now() + timer::ms_to_ticks(LIVENESS_MS);
    loop {
        let r = psci::affinity_info(cpu::mpidr(index), 0);
        match r {
            AFFINITY_OFF => return Ok(()),
            AFFINITY_ON | AFFINITY_ON_PENDING => {}
            other => return fail!("AFFINITY_INFO(cpu{}) = {}", index, status_name(other)),
        }
        ensure!(
            timer::now() <= end,
            "cpu{} not OFF within {} ms",
            index,
            LIVENESS_MS
        );
        let pause = timer::now() + timer::frequency() / 5000;
        while timer::now() < pause {
            core::hint::spin_loop();
        }
    }
}

/// Waits until `value` is non-zero; true if it became so within `timeout_ms`.
fn wait_nonzero(value: &AtomicU64, timeout_ms: u64) -> bool {
    let end = timer::now() + timer::ms_to_ticks(timeout_ms);
    while value.load(Ordering::Acquire) == 0 {
        if timer::now() > end {
            return false;
        }
        wait_event();
    }
    true
}

/// Waits until `counter` reaches `want`; true if it did within `timeout_ms`.
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
