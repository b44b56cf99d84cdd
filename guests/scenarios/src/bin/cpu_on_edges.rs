//! Scenario group `cpu-on-edges`: a hostile guest. The boot CPU calls CPU_ON on the
//! second CPU with entry points at every edge of RAM and MPIDRs with every non-affinity
//! bit set, over and over for the run's duration (`iterations` seconds), and checks each
//! answer against DEN0022 F.b §5.1.4 and SMCCC's 32-bit convention:
//!
//! - INVALID_ADDRESS, and the target stays OFF, for an entry point below RAM, one past
//!   its end, at the last byte and the other misaligned addresses of its last word, in
//!   the UART and GIC MMIO, misaligned inside the image, with a high address bit set, at
//!   0 and at the top of the address space;
//! - INVALID_PARAMETERS, and the target stays OFF, for the target's MPIDR with any one of
//!   bits 24..31 or 40..63 set, with all of them, for all ones, and for an Aff3 no CPU
//!   has; over SMC32 for bits 24..31 too;
//! - SUCCESS, and the target runs once with the context id, for the first byte of RAM,
//!   its last 4-byte word (the guest puts a branch to its entry code at both), the
//!   image's entry point, and an SMC32 CPU_ON whose MPIDR, entry and context id carry
//!   garbage in bits 32..63 (only the low 32 bits count for SMC32).
//!
//! The counts are printed as `VG-INFO cpu-on-edges ...`; the host compares them with the
//! event log's CPU_ON answers and the target's power transitions.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::psci::{self, *};
use vguest::report::{check, CheckResult};
use vguest::{config, cpu, fail, println, timer};
use vpsci_guest_scenarios::{send_event, wait_affinity, wait_until};

vguest::guest_main!("cpu-on-edges", main);

const NAME: &str = "cpu-on-edges";
const DEFAULT_SECONDS: u32 = 20;
const LIVENESS_MS: u64 = 10_000;
/// The target CPU (index).
const TARGET: usize = 1;
/// Where the guest puts the long trampoline the branch in RAM's last word jumps to.
const TOP_TRAMPOLINE_BELOW_END: u64 = 0x1000;

static ENTERED: AtomicU32 = AtomicU32::new(0);
static LAST_CONTEXT: AtomicU64 = AtomicU64::new(0);
static SUCCESS_ANSWERS: AtomicU32 = AtomicU32::new(0);
static INVALID_ADDRESS_ANSWERS: AtomicU32 = AtomicU32::new(0);
static INVALID_PARAMETERS_ANSWERS: AtomicU32 = AtomicU32::new(0);

fn arrive(_index: usize, context: u64) {
    LAST_CONTEXT.store(context, Ordering::Release);
    ENTERED.fetch_add(1, Ordering::AcqRel);
    send_event();
}

/// `ldr x9, 8; br x9; .quad target` at `at`: x0 (the context id) is left alone.
fn write_trampoline(at: u64, target: u64) {
    // SAFETY: `at` is guest RAM the program owns (checked by the caller: outside the
    // image, its stacks and the device tree), 8-byte aligned.
    unsafe {
        core::ptr::write_volatile(at as *mut u32, 0x5800_0049);
        core::ptr::write_volatile((at + 4) as *mut u32, 0xD61F_0120);
        core::ptr::write_volatile((at + 8) as *mut u64, target);
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// Puts code at RAM's first byte and last word that continues at the entry code.
fn install_edge_code() -> CheckResult {
    let (base, size) = vguest::platform().ram;
    let end = base + size;
    let top = end - TOP_TRAMPOLINE_BELOW_END;
    for region in [(base, 16), (top, 16), (end - 4, 4)] {
        if overlaps(region, vguest::platform().dtb)
            || overlaps(region, (0x4008_0000, vguest::image_end() - 0x4008_0000))
        {
            return fail!(
                "RAM edge {:#x} holds the device tree or the image",
                region.0
            );
        }
    }
    write_trampoline(base, cpu::secondary_entry());
    write_trampoline(top, cpu::secondary_entry());
    let words = -(((end - 4) - top) as i64 / 4);
    let branch = 0x1400_0000 | (words as u32 & 0x03FF_FFFF);
    // SAFETY: RAM's last word, checked above to be the program's.
    unsafe { core::ptr::write_volatile((end - 4) as *mut u32, branch) };
    // SAFETY: barriers and instruction-cache invalidation only.
    unsafe { core::arch::asm!("dsb sy", "ic ialluis", "dsb sy", "isb", options(nostack)) };
    Ok(())
}

/// A CPU_ON that must be refused with `want`, leaving the target OFF.
fn refused(fid: u32, mpidr: u64, entry: u64, want: i32, what: &str) -> CheckResult {
    let r = psci::status(fid, mpidr, entry, 0x0BAD);
    if r != want {
        return fail!(
            "CPU_ON({:#x}, entry {:#x}) [{}] = {}, expected {}",
            mpidr,
            entry,
            what,
            status_name(r),
            status_name(want)
        );
    }
    let counter = if want == INVALID_ADDRESS {
        &INVALID_ADDRESS_ANSWERS
    } else {
        &INVALID_PARAMETERS_ANSWERS
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let a = psci::affinity_info(cpu::mpidr(TARGET), 0);
    if a != AFFINITY_OFF {
        return fail!(
            "after the refused CPU_ON [{}] AFFINITY_INFO(target) = {}",
            what,
            a
        );
    }
    Ok(())
}

/// A CPU_ON that must start the target at `entry` with `context` (as it arrives).
fn started(
    fid: u32,
    mpidr: u64,
    entry: u64,
    context: u64,
    arrives: u64,
    what: &str,
) -> CheckResult {
    cpu::set_task(TARGET, arrive);
    let before = ENTERED.load(Ordering::Acquire);
    let r = psci::status(fid, mpidr, entry, context);
    if r != SUCCESS {
        return fail!(
            "CPU_ON({:#x}, entry {:#x}) [{}] = {}, expected SUCCESS",
            mpidr,
            entry,
            what,
            status_name(r)
        );
    }
    SUCCESS_ANSWERS.fetch_add(1, Ordering::Relaxed);
    if !wait_until(|| ENTERED.load(Ordering::Acquire) != before, LIVENESS_MS) {
        return fail!("CPU_ON [{}] succeeded but the target never ran", what);
    }
    let got = LAST_CONTEXT.load(Ordering::Acquire);
    if got != arrives {
        return fail!(
            "CPU_ON [{}]: the target arrived with x0 {:#x}, expected {:#x}",
            what,
            got,
            arrives
        );
    }
    wait_affinity(TARGET, AFFINITY_OFF, LIVENESS_MS)
}

fn round(n: u64) -> CheckResult {
    let p = vguest::platform();
    let (base, size) = p.ram;
    let end = base + size;
    let target = cpu::mpidr(TARGET);
    let entry = cpu::secondary_entry();
    let ctx = |case: u64| 0xC0DE_0000_0000 | n << 8 | case;
    started(
        PSCI_CPU_ON_64,
        target,
        base,
        ctx(1),
        ctx(1),
        "first byte of RAM",
    )?;
    started(
        PSCI_CPU_ON_64,
        target,
        end - 4,
        ctx(2),
        ctx(2),
        "last word of RAM",
    )?;
    started(PSCI_CPU_ON_64, target, entry, ctx(3), ctx(3), "image entry")?;
    let garbage = 0xABCD_EF01_0000_0000u64;
    started(
        PSCI_CPU_ON_32,
        target | garbage,
        entry | garbage,
        ctx(4) | garbage,
        ctx(4) & 0xFFFF_FFFF,
        "SMC32, garbage in bits 32..63",
    )?;
    let bad_entries: [(u64, &str); 20] = [
        (base - 4, "below RAM"),
        (base - 1, "last byte below RAM"),
        (0, "address 0"),
        (4, "address 4"),
        (end, "one past the end of RAM"),
        (end - 1, "last byte of RAM"),
        (end - 2, "last word + 2"),
        (end - 3, "last word + 1"),
        (end + 4, "above RAM"),
        (u64::MAX - 3, "top of the address space"),
        (u64::MAX, "all ones"),
        (0x0900_0000, "PL011 MMIO"),
        (p.gicd as u64, "GIC distributor MMIO"),
        (p.gicr[0].0 as u64, "GIC redistributor MMIO"),
        (entry + 1, "image entry + 1"),
        (entry + 2, "image entry + 2"),
        (entry + 3, "image entry + 3"),
        (entry | 1 << 63, "image entry with bit 63"),
        (entry + (1 << 32), "image entry + 4 GiB"),
        (base + 2, "first byte of RAM + 2"),
    ];
    for (at, what) in bad_entries {
        refused(PSCI_CPU_ON_64, target, at, INVALID_ADDRESS, what)?;
    }
    for bit in (24..=31).chain(40..=63) {
        refused(
            PSCI_CPU_ON_64,
            target | 1 << bit,
            entry,
            INVALID_PARAMETERS,
            "one non-affinity bit",
        )?;
    }
    for bit in 24..=31 {
        refused(
            PSCI_CPU_ON_32,
            target | 1 << bit,
            entry,
            INVALID_PARAMETERS,
            "SMC32, bits 24..31",
        )?;
    }
    let patterns: [(u64, &str); 5] = [
        (target | 0xFF00_0000, "bits 24..31"),
        (target | 0xFFFF_FF00_0000_0000, "bits 40..63"),
        (target | 0xFFFF_FF00_FF00_0000, "every non-affinity bit"),
        (u64::MAX, "all ones"),
        (target | 0xFF << 32, "an Aff3 no CPU has"),
    ];
    for (mpidr, what) in patterns {
        refused(PSCI_CPU_ON_64, mpidr, entry, INVALID_PARAMETERS, what)?;
    }
    Ok(())
}

fn main() {
    if cpu::count() < 2 {
        check(NAME, fail!("needs 2 CPUs"));
        return;
    }
    let cfg = config::get();
    let seconds = if cfg.iterations == 0 {
        DEFAULT_SECONDS
    } else {
        cfg.iterations
    };
    let started_at = timer::now();
    let result = install_edge_code().and_then(|()| {
        let end = started_at + timer::ms_to_ticks(u64::from(seconds) * 1000);
        let mut rounds = 0u64;
        while timer::now() < end {
            rounds += 1;
            round(rounds)?;
        }
        println!(
            "VG-INFO cpu-on-edges rounds={} success={} invalid_address={} invalid_parameters={} entries={} total_ms={}",
            rounds,
            SUCCESS_ANSWERS.load(Ordering::Relaxed),
            INVALID_ADDRESS_ANSWERS.load(Ordering::Relaxed),
            INVALID_PARAMETERS_ANSWERS.load(Ordering::Relaxed),
            ENTERED.load(Ordering::Relaxed),
            timer::ticks_to_ms(timer::now() - started_at)
        );
        Ok(())
    });
    check(NAME, result);
}
