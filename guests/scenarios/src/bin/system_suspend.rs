//! Scenario group `system-suspend`: PSCI_FEATURES, DENIED while another CPU
//! is on or only CPU_SUSPENDed, INVALID_ADDRESS for a bad entry point, and
//! with every other CPU off: suspend, wake by the virtual timer, resume at the
//! entry point with the context id and RAM intact, many times; then once
//! more with the timer interrupt already pending. Needs 2 CPUs.

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
const RAM_WORDS: usize = 8192;

static RELEASE: AtomicU32 = AtomicU32::new(0);
static SUSPENDING: AtomicU32 = AtomicU32::new(0);
static RAM_PATTERN: [AtomicU64; RAM_WORDS] = [const { AtomicU64::new(0) }; RAM_WORDS];

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

fn fill_ram(seed: u64) {
    for (i, w) in RAM_PATTERN.iter().enumerate() {
        w.store(
            seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            Ordering::Relaxed,
        );
    }
}

fn ram_intact(seed: u64) -> bool {
    RAM_PATTERN.iter().enumerate().all(|(i, w)| {
        w.load(Ordering::Relaxed) == seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
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
        fill_ram(context);
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
        ensure!(
            ram_intact(context),
            "round {}: RAM changed across the suspend",
            round
        );
    }
    println!(
        "VG-INFO system-suspend {} rounds in {} ms",
        rounds,
        timer::ticks_to_ms(timer::now() - start)
    );
    Ok(())
}

fn pending_interrupt() -> CheckResult {
    let context = 0x5_FFFF_0000;
    fill_ram(context);
    drain_interrupts();
    let deadline = timer::arm_virtual_in_ms(0);
    while timer::now() <= deadline {}
    let outcome = cpu::suspend_call(PSCI_SYSTEM_SUSPEND_64, cpu::resume_entry(), context, 0);
    let _ = gic_setup(false);
    take_timer_interrupt();
    match outcome {
        SuspendOutcome::Resumed { context_id } => {
            ensure!(
                context_id == context,
                "resumed with x0 {:#x}, context id was {:#x}",
                context_id,
                context
            );
            println!("VG-INFO system-suspend-pending-interrupt resumed at the entry point");
        }
        SuspendOutcome::Returned(r) => {
            ensure!(
                r == SUCCESS,
                "SYSTEM_SUSPEND with an interrupt pending = {}",
                status_name(r)
            );
            println!("VG-INFO system-suspend-pending-interrupt returned SUCCESS");
        }
    }
    ensure!(ram_intact(context), "RAM changed across the suspend");
    Ok(())
}
