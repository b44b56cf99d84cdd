//! Multi-vCPU tests on real arm64 KVM (nested harness): CPU_ON of every
//! vCPU, CPU_OFF, AFFINITY_INFO, error codes, a CPU_ON race decided once,
//! SYSTEM_SUSPEND refused while others are on.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use nested_common::*;
use vpsci_firmware::Conduit;

const MARK: u64 = 0xC0DE;
/// Where vCPU i writes MARK when it starts (its CPU_ON context id).
fn slot(i: usize) -> u64 {
    RESULTS + 0x1000 + 8 * i as u64
}
/// Where the boot vCPU keeps CPU_ON's return code for vCPU i.
fn on_ret(i: usize) -> u64 {
    RESULTS + 0x2000 + 8 * i as u64
}
/// Where the boot vCPU keeps AFFINITY_INFO's answer for vCPU i.
fn aff(i: usize) -> u64 {
    RESULTS + 0x3000 + 8 * i as u64
}

/// Boot code: CPU_ON every secondary at `secondary` with context = its
/// slot, wait for each to write MARK. `then` runs afterwards.
fn bring_up(cpus: usize, secondary_entry: u64, a: &mut Asm) {
    for i in 1..cpus {
        a.smccc(CPU_ON, [mpidr(i), secondary_entry, slot(i)])
            .store_at(0, on_ret(i));
    }
    for i in 1..cpus {
        a.mov(5, slot(i));
        let poll = a.here();
        a.ldr(6, 5, 0).cbz_back(6, poll);
    }
}

/// Secondary code at a fixed address: write MARK to [x0], then `tail`.
fn secondary(at: u64, conduit: Conduit, off: bool) -> Asm {
    let mut s = Asm::new(at, conduit);
    s.mov(5, MARK).str(5, 0, 0);
    if off {
        s.smccc(CPU_OFF, [0; 3]);
        // Never reached if CPU_OFF worked.
        s.mov(5, 0xBAD).store_at(5, RESULTS + 0x800);
    }
    // Idle in WFI so spinning secondaries do not starve the boot vCPU on
    // the nested harness's few emulated CPUs.
    let idle = s.here();
    s.wfi().b_back(idle);
    s
}

const SECONDARY: u64 = ENTRY + 0x4_0000;

fn program(boot: Asm, sec: &Asm) -> Asm {
    let mut a = boot;
    assert!(a.here() <= SECONDARY, "boot code too long");
    while a.here() < SECONDARY {
        a.spin();
    }
    a.append(sec);
    a
}

fn all_vcpus_come_up_with_their_context_id(cpus: usize, timeout_secs: u64) {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    bring_up(cpus, SECONDARY, &mut a);
    for i in 0..cpus {
        a.smccc(AFFINITY_INFO, [mpidr(i), 0, 0]).store_at(0, aff(i));
    }
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(
        &program(a, &secondary(SECONDARY, Conduit::Hvc, false)),
        Setup {
            cpus: cpus as u32,
            timeout: std::time::Duration::from_secs(timeout_secs),
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    for i in 1..cpus {
        assert_eq!(ran.u64_at(on_ret(i)), SUCCESS, "CPU_ON vCPU {i}");
        assert_eq!(
            ran.u64_at(slot(i)),
            MARK,
            "vCPU {i} ran with x0 = its context id"
        );
    }
    for i in 0..cpus {
        assert_eq!(ran.u64_at(aff(i)), 0, "AFFINITY_INFO vCPU {i} is ON");
    }
}

#[test]
fn cpu_on_brings_up_2_vcpus() {
    all_vcpus_come_up_with_their_context_id(2, 20);
}

#[test]
fn cpu_on_brings_up_8_vcpus_and_system_off_stops_them_while_they_run() {
    all_vcpus_come_up_with_their_context_id(8, 30);
}

#[test]
fn cpu_on_brings_up_64_vcpus() {
    all_vcpus_come_up_with_their_context_id(64, 120);
}

#[test]
fn cpu_off_secondaries_never_return_and_read_as_off() {
    let cpus = 4;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    bring_up(cpus, SECONDARY, &mut a);
    for i in 1..cpus {
        // Poll AFFINITY_INFO until OFF (1).
        let poll = a.here();
        a.smccc(AFFINITY_INFO, [mpidr(i), 0, 0])
            .mov(7, 1)
            .cmp(0, 7)
            .bne_back(poll);
        a.store_at(0, aff(i));
    }
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(
        &program(a, &secondary(SECONDARY, Conduit::Hvc, true)),
        Setup {
            cpus: cpus as u32,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS + 0x800), 0, "a CPU_OFF returned");
    for i in 1..cpus {
        assert_eq!(ran.u64_at(aff(i)), 1, "vCPU {i} OFF");
    }
}

#[test]
fn cpu_on_errors_already_on_invalid_parameters_invalid_address() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_ON, [mpidr(0), SECONDARY, 0])
        .store_at(0, RESULTS);
    a.smccc(CPU_ON, [0xFFFF_FFFF, SECONDARY, 0])
        .store_at(0, RESULTS + 8);
    a.smccc(CPU_ON, [mpidr(1), 0x10, 0])
        .store_at(0, RESULTS + 16);
    a.smccc(AFFINITY_INFO, [mpidr(1), 0, 0])
        .store_at(0, RESULTS + 24);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(
        &program(a, &secondary(SECONDARY, Conduit::Hvc, false)),
        Setup {
            cpus: 2,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS), ALREADY_ON);
    assert_eq!(ran.u64_at(RESULTS + 8), INVALID_PARAMETERS);
    assert_eq!(ran.u64_at(RESULTS + 16), INVALID_ADDRESS);
    assert_eq!(ran.u64_at(RESULTS + 24), 1, "never-started vCPU is OFF");
}

#[test]
fn system_suspend_is_denied_while_another_vcpu_is_on() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    bring_up(2, SECONDARY, &mut a);
    a.smccc(SYSTEM_SUSPEND, [ENTRY, 0, 0]).store_at(0, RESULTS);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(
        &program(a, &secondary(SECONDARY, Conduit::Hvc, false)),
        Setup {
            cpus: 2,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert_eq!(ran.u64_at(RESULTS), DENIED);
}

/// vCPUs 1..n-1 all CPU_ON vCPU n at once: exactly one SUCCESS.
#[test]
fn concurrent_cpu_on_of_one_target_succeeds_exactly_once() {
    let cpus = 6;
    let target = cpus - 1;
    let racers = 1..target;
    // Racer: x0 = its result slot; CPU_ON(target), store result, then mark done.
    let racer_at = SECONDARY;
    let mut r = Asm::new(racer_at, Conduit::Hvc);
    r.mov_reg(19, 0)
        .smccc(CPU_ON, [mpidr(target), racer_at + 0x1000, slot(target)])
        .str(0, 19, 0);
    let idle = r.here();
    r.wfi().b_back(idle);
    let mut t = Asm::new(racer_at + 0x1000, Conduit::Hvc);
    t.mov(5, MARK).str(5, 0, 0);
    let idle = t.here();
    t.wfi().b_back(idle);
    while r.here() < racer_at + 0x1000 {
        r.spin();
    }
    r.append(&t);

    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    // Pre-fill result slots with a sentinel so "not yet" is visible.
    a.mov(6, 0x5EED);
    for i in racers.clone() {
        a.store_at(6, on_ret(i));
    }
    for i in racers.clone() {
        a.smccc(CPU_ON, [mpidr(i), racer_at, on_ret(i)]);
    }
    for i in racers.clone() {
        a.mov(5, on_ret(i));
        let poll = a.here();
        a.ldr(6, 5, 0).mov(7, 0x5EED).cmp(6, 7).beq_back(poll);
    }
    a.mov(5, slot(target));
    let poll = a.here();
    a.ldr(6, 5, 0).cbz_back(6, poll);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let ran = run(
        &program(a, &r),
        Setup {
            cpus: cpus as u32,
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    let results: Vec<u64> = racers.map(|i| ran.u64_at(on_ret(i))).collect();
    assert_eq!(
        results.iter().filter(|&&r| r == SUCCESS).count(),
        1,
        "{results:x?}"
    );
    assert!(
        results
            .iter()
            .all(|&r| r == SUCCESS || r == ALREADY_ON || r == ON_PENDING),
        "{results:x?}"
    );
    assert_eq!(ran.u64_at(slot(target)), MARK);
}
