//! Saving a running guest's KVM state (vCPU registers, MP state, vGICv3,
//! counter) and restoring it into a fresh VM on real arm64 KVM (run inside
//! the nested VM). Each vCPU leaves its own marks in the vGIC (its
//! redistributor and CPU interface), so a save or restore that mixes vCPUs
//! up is caught.
#![cfg(target_arch = "aarch64")]

use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::*;
use vpsci_kvm::{install_kick_handler, CoreReg, KvmVcpu, SmcccRouting, VcpuExit, VmState};

const COUNTERS: u64 = 0x1000;
const PMR_SEEN: u64 = COUNTERS + 0x100;
const CPUS: usize = 2;

const MRS_X2_MPIDR: u32 = 0xD538_00A2;
const AND_X2_X2_FF: u32 = 0x9240_1C42;
const MSR_ICC_PMR_X3: u32 = 0xD518_4603;
const MRS_X10_ICC_PMR: u32 = 0xD538_460A;

/// Every vCPU: index = MPIDR.Aff0; PMR = 0xF0 - 16 * index; enables PPI
/// 20 + index in its own redistributor; then forever: count in x0, store it at
/// `COUNTERS + 8 * index`, read its PMR back and store it at `PMR_SEEN + 8 * index`.
fn guest() -> Vec<u32> {
    let mut c = vec![MRS_X2_MPIDR, AND_X2_X2_FF];
    c.push(movz(3, 0xF0, 0));
    c.push(lsl(8, 2, 4));
    c.push(sub(3, 3, 8));
    c.push(MSR_ICC_PMR_X3);
    c.extend(mov32(4, (REDIST_BASE + 0x1_0100) as u32));
    c.push(lsl(6, 2, 17));
    c.push(add(4, 4, 6));
    c.push(movz(5, 1, 0));
    c.push(add_imm(7, 2, 20));
    c.push(lslv(5, 5, 7));
    c.push(str_w(5, 4));
    c.extend(mov32(1, (RAM_BASE + COUNTERS) as u32));
    c.push(lsl(9, 2, 3));
    c.push(add(1, 1, 9));
    // loop:
    c.push(add_imm(0, 0, 1));
    c.push(str_x(0, 1, 0));
    c.push(MRS_X10_ICC_PMR);
    c.push(str_x(10, 1, 0x100));
    c.push(0x17FF_FFFC); // b loop (4 instructions back)
    c
}

fn new_two_vcpu_vm(mem: &Memory) -> (vpsci_kvm::KvmVm, Vec<KvmVcpu>) {
    new_vm(CPUS, SmcccRouting::userspace_psci(), mem)
}

/// Runs every vCPU on its own thread until `until` says stop, then kicks them
/// all out of the guest and hands them back.
fn run_then_stop(vcpus: Vec<KvmVcpu>, until: impl Fn() -> bool) -> Vec<KvmVcpu> {
    ok(install_kick_handler());
    let kickers: Vec<_> = vcpus.iter().map(KvmVcpu::kicker).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut rxs = Vec::new();
    for mut vcpu in vcpus {
        let (tx, rx) = mpsc::channel();
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            vcpu.bind_current_thread();
            loop {
                match vcpu.run() {
                    Ok(VcpuExit::Interrupted) if stop.load(std::sync::atomic::Ordering::SeqCst) => {
                        break
                    }
                    Ok(VcpuExit::Interrupted) => {}
                    other => {
                        let _ = tx.send(Err(format!("vCPU {}: {other:?}", vcpu.index())));
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(vcpu));
        });
        rxs.push(rx);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !until() {
        assert!(
            Instant::now() < deadline,
            "the guest did not get there in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rxs.into_iter()
        .zip(&kickers)
        .map(|(rx, kicker)| {
            kicker.kick();
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(vcpu)) => vcpu,
                Ok(Err(e)) => panic!("{e}"),
                Err(e) => panic!("a vCPU did not stop within 10 s of its kick: {e}"),
            }
        })
        .collect()
}

fn redist_reg(state: &VmState, vcpu: usize, offset: u32) -> u32 {
    state.gic.redistributors[vcpu]
        .regs
        .iter()
        .find(|r| r.offset == offset)
        .map(|r| r.value)
        .unwrap_or_else(|| panic!("offset {offset:#x} not saved"))
}

fn pmr(state: &VmState, vcpu: usize) -> u64 {
    const ICC_PMR_EL1: u16 = (3 << 14) | (4 << 7) | (6 << 3);
    state.gic.redistributors[vcpu]
        .sysregs
        .iter()
        .find(|r| r.encoding == ICC_PMR_EL1)
        .map(|r| r.value)
        .unwrap_or_else(|| panic!("ICC_PMR_EL1 not saved"))
}

const GICR_ISENABLER0: u32 = 0x1_0100;

#[test]
fn a_running_two_vcpu_guest_continues_in_a_fresh_vm_with_its_own_per_vcpu_gic_state() {
    let code = guest();
    let source_mem = Memory::with_code(&code);
    let (source, vcpus) = new_two_vcpu_vm(&source_mem);
    for vcpu in &vcpus {
        ok(vcpu.start_at(ENTRY, 0));
    }
    let started = Instant::now();
    let vcpus = run_then_stop(vcpus, || {
        started.elapsed() > Duration::from_millis(300)
            && (0..CPUS as u64).all(|i| source_mem.word(COUNTERS + 8 * i) > 10_000)
    });
    let refs: Vec<&KvmVcpu> = vcpus.iter().collect();
    let saved = ok(source.save_state(&refs));
    let image = source_mem.bytes().to_vec();
    let counted: Vec<u64> = (0..CPUS as u64)
        .map(|i| source_mem.word(COUNTERS + 8 * i))
        .collect();

    // The save read each vCPU's own redistributor and CPU interface.
    for i in 0..CPUS {
        assert_eq!(
            redist_reg(&saved, i, GICR_ISENABLER0) & (0b11 << 20),
            1 << (20 + i),
            "vCPU {i} enabled PPI {}",
            20 + i
        );
        assert_eq!(pmr(&saved, i), 0xF0 - 16 * i as u64, "vCPU {i}'s PMR");
    }

    // A fresh VM gets the memory and the state, then reads back the same.
    let target_mem = Memory::new();
    target_mem.copy_from(&image);
    for i in 0..CPUS as u64 {
        target_mem.set_word(PMR_SEEN + 8 * i, 0);
    }
    let (target, vcpus) = new_two_vcpu_vm(&target_mem);
    let refs: Vec<&KvmVcpu> = vcpus.iter().collect();
    ok(target.restore_state(&refs, &saved));
    let reread = ok(target.save_state(&refs));
    assert_eq!(reread.gic, saved.gic, "vGIC state after restore");
    assert_eq!(reread.vcpus, saved.vcpus, "vCPU registers after restore");
    assert!(
        reread.counter >= saved.counter,
        "the counter continues from {} (a fresh VM's would restart near 0), read {}",
        saved.counter,
        reread.counter
    );
    for (i, vcpu) in vcpus.iter().enumerate() {
        assert_eq!(
            ok(vcpu.get_core(CoreReg::X(0))),
            counted[i],
            "vCPU {i}'s x0"
        );
    }

    // It runs on: both counters move past where they were, and each vCPU reads
    // its own PMR.
    let vcpus = run_then_stop(vcpus, || {
        (0..CPUS as u64).all(|i| {
            target_mem.word(COUNTERS + 8 * i) > counted[i as usize] + 10_000
                && target_mem.word(PMR_SEEN + 8 * i) != 0
        })
    });
    for i in 0..CPUS {
        assert_eq!(
            target_mem.word(PMR_SEEN + 8 * i as u64),
            0xF0 - 16 * i as u64,
            "vCPU {i} reads its PMR after the restore"
        );
        let x0 = ok(vcpus[i].get_core(CoreReg::X(0)));
        assert!(
            x0 > counted[i],
            "vCPU {i} counts on from {} (x0 {x0})",
            counted[i]
        );
    }
}

#[test]
fn a_state_for_another_vcpu_count_is_refused_before_anything_is_written() {
    let mem = Memory::new();
    let (vm, vcpus) = new_two_vcpu_vm(&mem);
    let refs: Vec<&KvmVcpu> = vcpus.iter().collect();
    let mut state = ok(vm.save_state(&refs));
    let before = state.clone();
    state.vcpus.pop();
    let err = vm.restore_state(&refs, &state).map(|_| ()).unwrap_err();
    assert!(
        err.to_string().contains("2 vCPUs") || err.to_string().contains("1 vCPUs"),
        "{err}"
    );
    assert_eq!(ok(vm.save_state(&refs)).gic, before.gic);
}

#[test]
fn a_vcpu_saved_after_an_mmio_exit_has_its_access_finished_first() {
    // `str w5, [x4]` to an address no memory slot covers: an MMIO write exit
    // with PC still on the store until the access is finished.
    let mut code = Vec::new();
    code.extend(mov32(4, 0x0A00_0000));
    code.push(movz(5, 0x42, 0));
    code.push(str_w(5, 4));
    code.push(0x1400_0000); // b .
    let mem = Memory::with_code(&code);
    let (_vm, mut vcpus) = new_two_vcpu_vm(&mem);
    let vcpu = &mut vcpus[0];
    ok(vcpu.start_at(ENTRY, 0));
    let store_at = ENTRY + 12;
    match ok(vcpu.run()) {
        VcpuExit::MmioWrite { addr, .. } => assert_eq!(addr, 0x0A00_0000),
        other => panic!("expected the MMIO write, got {other:?}"),
    }
    assert_eq!(
        ok(vcpu.get_core(CoreReg::Pc)),
        store_at,
        "KVM leaves PC on the store until the next KVM_RUN"
    );
    ok(vcpu.complete_pending_io());
    assert_eq!(
        ok(vcpu.get_core(CoreReg::Pc)),
        store_at + 4,
        "finished: PC past the store, and nothing else ran"
    );
}
