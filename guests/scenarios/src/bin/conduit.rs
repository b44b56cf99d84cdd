//! Scenario group `conduit`: the calls work over the conduit the device tree
//! names (and that the VMM was configured with): PSCI_VERSION, SMCCC_VERSION,
//! CPU_ON with a context id, AFFINITY_INFO and CPU_OFF. Reports
//! `conduit-hvc` or `conduit-smc`. Needs 2 CPUs.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::psci::{self, *};
use vguest::report::{check, CheckResult};
use vguest::{config, cpu, ensure, println};
use vpsci_guest_scenarios::{send_event, wait_affinity, wait_flag};

vguest::guest_main!("conduit", main);

const SMCCC_VERSION: u32 = 0x8000_0000;
const CONTEXT_ID: u64 = 0xC0DD_0017_0000_0001;

static ARRIVED: AtomicU32 = AtomicU32::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);

fn main() {
    let name = match psci::conduit() {
        Conduit::Hvc => "conduit-hvc",
        Conduit::Smc => "conduit-smc",
    };
    check(name, exercise());
}

fn arrive(_index: usize, context: u64) {
    SEEN.store(context, Ordering::Relaxed);
    ARRIVED.store(1, Ordering::Release);
    send_event();
}

fn exercise() -> CheckResult {
    let want = match config::get().conduit {
        1 => Some(Conduit::Hvc),
        2 => Some(Conduit::Smc),
        _ => None,
    };
    if let Some(want) = want {
        ensure!(
            psci::conduit() == want,
            "device tree names {:?}, the VMM was configured for {:?}",
            psci::conduit(),
            want
        );
    }
    let v = psci::version();
    ensure!(v >= 0x2 && v & 0x8000_0000 == 0, "PSCI_VERSION = {:#x}", v);
    let smccc = psci::status(SMCCC_VERSION, 0, 0, 0);
    ensure!(
        smccc == NOT_SUPPORTED || smccc >= 0x1_0000,
        "SMCCC_VERSION = {:#x}",
        smccc
    );
    println!(
        "VG-INFO conduit {:?}: PSCI {}.{}, SMCCC_VERSION {:#x}",
        psci::conduit(),
        v >> 16,
        v & 0xffff,
        smccc
    );
    ensure!(cpu::count() >= 2, "needs 2 CPUs");
    let r = cpu::start(1, arrive, CONTEXT_ID);
    ensure!(r == SUCCESS, "CPU_ON(cpu 1) = {}", status_name(r));
    ensure!(
        wait_flag(&ARRIVED, 1, 1000),
        "cpu 1 never ran its entry point within 1 s"
    );
    let seen = SEEN.load(Ordering::Relaxed);
    ensure!(
        seen == CONTEXT_ID,
        "x0 at entry {:#x}, context id was {:#x}",
        seen,
        CONTEXT_ID
    );
    wait_affinity(1, AFFINITY_OFF, 1000)
}
