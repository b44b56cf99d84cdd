//! Scenario group `cpu-suspend`: CPU_SUSPEND to a standby and to a powerdown
//! state, each woken by the CPU's own virtual timer interrupt. Standby returns
//! SUCCESS; powerdown resumes at the entry point with the context id.

#![no_std]
#![no_main]

use vguest::cpu::{self, SuspendOutcome};
use vguest::psci::{self, *};
use vguest::report::{run, CheckResult};
use vguest::{ensure, fail, println, timer};
use vpsci_guest_scenarios::{drain_interrupts, gic_setup, power_state, take_timer_interrupt};

vguest::guest_main!("cpu-suspend", main);

const CONTEXT_ID: u64 = 0xC0DE_0001_5EED_0042;

fn main() {
    if let Err(e) = gic_setup(true) {
        for name in ["cpu-suspend-standby", "cpu-suspend-powerdown"] {
            vguest::report::check(name, Err(e.clone_detail()));
        }
        return;
    }
    run("cpu-suspend-standby", standby);
    run("cpu-suspend-powerdown", powerdown);
}

trait CloneDetail {
    fn clone_detail(&self) -> vguest::report::Detail;
}

impl CloneDetail for vguest::report::Detail {
    fn clone_detail(&self) -> vguest::report::Detail {
        let mut d = vguest::report::Detail::new();
        let _ = core::fmt::Write::write_str(&mut d, self.as_str());
        d
    }
}

/// How long the standby check waits for its timer.
const STANDBY_MS: u64 = 200;
/// Early returns a standby state may have (it is entered like WFI, which may end
/// spuriously); a CPU_SUSPEND that does not wait at all returns hundreds of times
/// in [`STANDBY_MS`].
const MAX_EARLY_RETURNS: u32 = 2;

fn standby() -> CheckResult {
    drain_interrupts();
    let started = timer::now();
    let deadline = timer::arm_virtual_in_ms(STANDBY_MS);
    let mut early = 0;
    loop {
        let r = psci::status(PSCI_CPU_SUSPEND_64, power_state(false), 0, 0);
        if r != SUCCESS {
            timer::disarm_virtual();
            return fail!("CPU_SUSPEND(standby) = {}", status_name(r));
        }
        if timer::now() >= deadline {
            break;
        }
        early += 1;
        if early > MAX_EARLY_RETURNS {
            timer::disarm_virtual();
            return fail!(
                "CPU_SUSPEND(standby) returned {} times before its timer fired ({} of {} ms passed): it does not wait for a wake-up",
                early,
                timer::ticks_to_ms(timer::now() - started),
                STANDBY_MS
            );
        }
    }
    let intid = take_timer_interrupt();
    println!(
        "VG-INFO cpu-suspend-standby early returns before the timer: {}",
        early
    );
    ensure!(
        intid == timer::VIRTUAL_TIMER_INTID,
        "woke with INTID {} pending, expected the virtual timer (27)",
        intid
    );
    Ok(())
}

fn powerdown() -> CheckResult {
    drain_interrupts();
    let deadline = timer::arm_virtual_in_ms(10);
    let outcome = cpu::suspend_call(
        PSCI_CPU_SUSPEND_64,
        power_state(true),
        cpu::resume_entry(),
        CONTEXT_ID,
    );
    let now = timer::now();
    // The CPU interface may have been reset with the CPU: set it up again.
    let _ = gic_setup(false);
    take_timer_interrupt();
    match outcome {
        SuspendOutcome::Resumed { context_id } => {
            ensure!(
                context_id == CONTEXT_ID,
                "resumed with x0 {:#x}, context id was {:#x}",
                context_id,
                CONTEXT_ID
            );
            ensure!(now >= deadline, "resumed before the timer deadline");
            Ok(())
        }
        SuspendOutcome::Returned(r) => fail!(
            "CPU_SUSPEND(powerdown) returned {} instead of resuming at the entry point",
            status_name(r)
        ),
    }
}
