//! Scenario group `psci-basic`: version, unknown functions, AFFINITY_INFO,
//! CPU_ON argument checks and context id, MIGRATE*, and CPU_OFF of every
//! secondary. Needs at least 4 CPUs.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::psci::{self, *};
use vguest::report::{run, CheckResult};
use vguest::{cpu, ensure, fail, println, timer};
use vpsci_guest_scenarios::{send_event, version_parts, wait_affinity, wait_event, wait_flag};

vguest::guest_main!("psci-basic", main);

const UNKNOWN_PSCI_32: u32 = 0x8400_001F;
const UNKNOWN_PSCI_64: u32 = 0xC400_001F;
const CONTEXT_ID: u64 = 0x1234_5678_9abc_def0;

static ARRIVED: AtomicU32 = AtomicU32::new(0);
static SEEN_CONTEXT: AtomicU64 = AtomicU64::new(0);
static HOLD: AtomicU32 = AtomicU32::new(0);
static OFF_RETURNED: AtomicU32 = AtomicU32::new(0);

fn record_and_hold(_index: usize, context_id: u64) {
    SEEN_CONTEXT.store(context_id, Ordering::Relaxed);
    ARRIVED.store(1, Ordering::Release);
    send_event();
    while HOLD.load(Ordering::Acquire) != 0 {
        wait_event();
    }
}

fn off_and_flag(_index: usize, _context_id: u64) {
    let status = psci::cpu_off();
    OFF_RETURNED.store(status as u32 | 0x8000_0000, Ordering::Release);
}

fn main() {
    if cpu::count() < 4 {
        println!(
            "VG-FATAL psci-basic needs 4 CPUs, device tree lists {}",
            cpu::count()
        );
        return;
    }
    run("psci-version", check_version);
    run("unknown-function-not-supported", || {
        let a = psci::status(UNKNOWN_PSCI_32, 0, 0, 0);
        let b = psci::status(UNKNOWN_PSCI_64, 0, 0, 0);
        ensure!(
            a == NOT_SUPPORTED && b == NOT_SUPPORTED,
            "{:#x} -> {}, {:#x} -> {}",
            UNKNOWN_PSCI_32,
            a,
            UNKNOWN_PSCI_64,
            b
        );
        Ok(())
    });
    run("features-invalid-id-not-supported", || {
        let r = psci::features(UNKNOWN_PSCI_32);
        ensure!(
            r == NOT_SUPPORTED,
            "PSCI_FEATURES({:#x}) = {}",
            UNKNOWN_PSCI_32,
            r
        );
        Ok(())
    });
    let last = cpu::count() - 1;
    run("affinity-info-boot-cpu-on", || {
        let r = psci::affinity_info(cpu::mpidr(0), 0);
        ensure!(r == AFFINITY_ON, "AFFINITY_INFO(boot) = {}", r);
        Ok(())
    });
    run("affinity-info-never-started-off", || {
        let r = psci::affinity_info(cpu::mpidr(last), 0);
        ensure!(r == AFFINITY_OFF, "AFFINITY_INFO(cpu {}) = {}", last, r);
        Ok(())
    });
    run("affinity-info-levels", check_affinity_levels);
    HOLD.store(1, Ordering::Release);
    run("cpu-on-context-id", check_context_id);
    run("cpu-on-already-on", || {
        let other = psci::cpu_on(cpu::mpidr(1), cpu::secondary_entry(), 0);
        let own = psci::cpu_on(cpu::mpidr(0), cpu::secondary_entry(), 0);
        ensure!(
            other == ALREADY_ON && own == ALREADY_ON,
            "CPU_ON(on cpu 1) = {}, CPU_ON(self) = {}",
            status_name(other),
            status_name(own)
        );
        Ok(())
    });
    run("cpu-on-invalid-mpidr", || {
        let bad_bits = psci::cpu_on(0xFFFF_FFFF, cpu::secondary_entry(), 0);
        let absent = psci::cpu_on(0x00FE_0000, cpu::secondary_entry(), 0);
        ensure!(
            bad_bits == INVALID_PARAMETERS && absent == INVALID_PARAMETERS,
            "CPU_ON(0xFFFFFFFF) = {}, CPU_ON(absent 0xFE0000) = {}",
            status_name(bad_bits),
            status_name(absent)
        );
        Ok(())
    });
    run("migrate-info-type", || {
        let r = psci::status(PSCI_MIGRATE_INFO_TYPE, 0, 0, 0);
        ensure!(r == 2 || r == NOT_SUPPORTED, "MIGRATE_INFO_TYPE = {}", r);
        Ok(())
    });
    run("migrate-not-supported", || {
        let r = psci::status(PSCI_MIGRATE_64, cpu::mpidr(1), 0, 0);
        ensure!(r == NOT_SUPPORTED, "MIGRATE(cpu 1) = {}", status_name(r));
        Ok(())
    });
    run("cpu-off-secondaries", check_all_off);
    // Last: an implementation that wrongly accepts these leaves the target CPU lost.
    run("cpu-on-invalid-address", || {
        let r = psci::cpu_on(cpu::mpidr(1), 0xFFFF_FFFF_FFFF_F000, 0);
        ensure!(
            r == INVALID_ADDRESS,
            "CPU_ON(entry 0xFFFFFFFFFFFFF000) = {}",
            status_name(r)
        );
        Ok(())
    });
    run("cpu-on-misaligned-entry", || {
        let r = psci::cpu_on(cpu::mpidr(2), cpu::secondary_entry() + 2, 0);
        ensure!(
            r == INVALID_ADDRESS,
            "CPU_ON(entry {:#x}) = {}",
            cpu::secondary_entry() + 2,
            status_name(r)
        );
        Ok(())
    });
}

fn check_version() -> CheckResult {
    let v = psci::version();
    let (major, minor) = version_parts(v);
    println!("VG-INFO psci-version {}.{}", major, minor);
    let configured = vguest::config::get().psci_version;
    if configured != 0 {
        let (cm, cn) = version_parts(configured);
        ensure!(
            v == configured,
            "PSCI_VERSION {}.{} but the VMM was configured for {}.{}",
            major,
            minor,
            cm,
            cn
        );
    }
    ensure!(
        v & 0x8000_0000 == 0 && (v >= 0x2),
        "PSCI_VERSION returned {:#x}",
        v
    );
    Ok(())
}

fn check_affinity_levels() -> CheckResult {
    let off = cpu::count() - 1;
    let same_group = |level: u64| {
        let mask = match level {
            0 => !0u64,
            1 => !0xffu64,
            2 => !0xffffu64,
            _ => !0xff_ffffu64,
        };
        cpu::mpidr(0) & mask == cpu::mpidr(off) & mask
    };
    let mut invalid_levels = 0;
    for level in 0..=3u64 {
        let on = psci::affinity_info(cpu::mpidr(0), level);
        if level > 0 && on == INVALID_PARAMETERS {
            invalid_levels += 1;
        } else if on != AFFINITY_ON {
            return fail!("AFFINITY_INFO(boot, level {}) = {}", level, on);
        }
        let r = psci::affinity_info(cpu::mpidr(off), level);
        let want = if same_group(level) {
            AFFINITY_ON
        } else {
            AFFINITY_OFF
        };
        let ok = r == want || (level > 0 && r == INVALID_PARAMETERS);
        ensure!(
            ok,
            "AFFINITY_INFO(off cpu {}, level {}) = {} (want {})",
            off,
            level,
            r,
            want
        );
    }
    println!(
        "VG-INFO affinity-info levels>0 answered INVALID_PARAMETERS for the boot CPU {} of 3 times",
        invalid_levels
    );
    Ok(())
}

fn check_context_id() -> CheckResult {
    ARRIVED.store(0, Ordering::Release);
    let r = cpu::start(1, record_and_hold, CONTEXT_ID);
    ensure!(r == SUCCESS, "CPU_ON(cpu 1) = {}", status_name(r));
    wait_affinity(1, AFFINITY_ON, 1000)?;
    ensure!(
        wait_flag(&ARRIVED, 1, 1000),
        "cpu 1 is ON but never ran its entry point within 1 s"
    );
    let seen = SEEN_CONTEXT.load(Ordering::Relaxed);
    ensure!(
        seen == CONTEXT_ID,
        "x0 at entry {:#x}, context id was {:#x}",
        seen,
        CONTEXT_ID
    );
    Ok(())
}

fn check_all_off() -> CheckResult {
    HOLD.store(0, Ordering::Release);
    send_event();
    for i in 2..cpu::count() {
        let r = cpu::start(i, off_and_flag, i as u64);
        ensure!(r == SUCCESS, "CPU_ON(cpu {}) = {}", i, status_name(r));
    }
    let start = timer::now();
    for i in 1..cpu::count() {
        wait_affinity(i, AFFINITY_OFF, 1000)?;
    }
    let ms = timer::ticks_to_ms(timer::now() - start);
    timer::delay_ms(10);
    let returned = OFF_RETURNED.load(Ordering::Acquire);
    ensure!(
        returned == 0,
        "CPU_OFF returned {} to a secondary",
        (returned & 0x7fff_ffff) as i32
    );
    println!(
        "VG-INFO cpu-off-secondaries all {} OFF after {} ms",
        cpu::count() - 1,
        ms
    );
    Ok(())
}
