//! Backend tests on real arm64 KVM (run them inside the nested VM): a tiny
//! hand-encoded guest makes SMCCC calls that the SMCCC filter forwards to this
//! test, which answers them without the firmware engine.
#![cfg(target_arch = "aarch64")]

mod common;

use common::*;
use vpsci_kvm::{CoreReg, KvmVcpu, MpState, SmcccRouting, VcpuExit};

struct Guest {
    mem: Memory,
    vcpus: Vec<KvmVcpu>,
    vm: vpsci_kvm::KvmVm,
}

/// A VM of `cpus` vCPUs running `code` on vCPU 0.
fn boot(code: &[u32], cpus: usize, routing: SmcccRouting) -> Guest {
    let mem = Memory::with_code(code);
    let (vm, vcpus) = new_vm(cpus, routing, &mem);
    ok(vcpus[0].set_core(CoreReg::Pc, ENTRY));
    Guest { mem, vcpus, vm }
}

/// PSCI_VERSION then SYSTEM_OFF through `insn`; returns (exits seen, x5 at OFF).
fn version_then_off(insn: u32) -> (Vec<(u32, bool, u64)>, u64) {
    let mut code = Vec::new();
    code.extend(mov32(0, 0x8400_0000));
    code.push(insn);
    code.push(mov_reg(5, 0));
    code.extend(mov32(0, 0x8400_0008));
    code.push(insn);
    code.push(0x1400_0000); // b .
    let mut g = boot(&code, 1, SmcccRouting::userspace_psci());
    let vcpu = &mut g.vcpus[0];
    let mut seen = Vec::new();
    for _ in 0..10 {
        match ok(vcpu.run()) {
            VcpuExit::Hypercall { function_id, smc } => {
                let pc = ok(vcpu.get_core(CoreReg::Pc));
                seen.push((function_id, smc, pc));
                match function_id {
                    0x8400_0000 => ok(vcpu.set_smccc_result([0x1_0003, 0, 0, 0])),
                    0x8400_0008 => return (seen, ok(vcpu.get_core(CoreReg::X(5)))),
                    other => panic!("unexpected call {other:#x}"),
                }
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("guest never called SYSTEM_OFF: {seen:x?}");
}

#[test]
fn hvc_psci_calls_reach_userspace_with_pc_past_the_instruction() {
    let (seen, x5) = version_then_off(HVC);
    assert_eq!(x5, 0x1_0003, "the guest saw the version we wrote");
    assert_eq!(seen[0], (0x8400_0000, false, ENTRY + 12));
    assert_eq!(seen[1], (0x8400_0008, false, ENTRY + 28));
}

#[test]
fn smc_psci_calls_reach_userspace_with_pc_past_the_instruction() {
    let (seen, x5) = version_then_off(SMC);
    assert_eq!(x5, 0x1_0003, "the guest saw the version we wrote");
    assert_eq!(seen[0], (0x8400_0000, true, ENTRY + 12));
    assert_eq!(seen[1], (0x8400_0008, true, ENTRY + 28));
}

#[test]
fn secondary_vcpus_start_stopped_and_have_distinct_mpidrs() {
    let g = boot(&[0x1400_0000], 4, SmcccRouting::userspace_psci());
    assert_eq!(ok(g.vcpus[0].mp_state()), MpState::Runnable);
    for v in &g.vcpus[1..] {
        assert_eq!(ok(v.mp_state()), MpState::Stopped);
    }
    let mut ids: Vec<u64> = g.vcpus.iter().map(|v| v.mpidr().raw()).collect();
    // dedup() only drops adjacent repeats: sort first so any repeat is adjacent.
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "MPIDRs {:x?}", ids);
}

/// A guest that counts up at `RAM_BASE + COUNTER` forever:
/// `x1 = &counter; loop { x0 += 1; str x0, [x1] }`.
const COUNTER: u64 = 0x1000;
fn counting_loop() -> Vec<u32> {
    let mut code = Vec::new();
    code.extend(mov32(1, (RAM_BASE + COUNTER) as u32));
    code.push(0x9100_0400); // add x0, x0, #1
    code.push(0xF900_0020); // str x0, [x1]
    code.push(0x17FF_FFFE); // b (back to the add)
    code
}

#[test]
fn the_dirty_log_holds_the_page_the_guest_wrote_and_not_a_clean_one() {
    // x1 = RAM + 3 pages; str x0, [x1]; PSCI_VERSION over HVC (to userspace); b .
    const WRITTEN: u64 = RAM_BASE + 0x3000;
    const UNTOUCHED: u64 = RAM_BASE + 0x5000;
    let mut code = Vec::new();
    code.extend(mov32(1, WRITTEN as u32));
    code.push(0xF900_0020); // str x0, [x1]
    code.extend(mov32(0, 0x8400_0000));
    code.push(HVC);
    code.push(0x1400_0000); // b .
    let mut g = boot(&code, 1, SmcccRouting::userspace_psci());
    ok(g.vm.set_dirty_logging(true));
    // SAFETY: inside the test's mapping (never unmapped); the guest has not run yet.
    unsafe { g.mem.0.add((UNTOUCHED - RAM_BASE) as usize).write(0xAA) };
    let before = ok(g.vm.take_dirty_log());
    assert_eq!(before.len(), 1, "one RAM slot");
    assert_eq!(
        before[0].count(),
        0,
        "a write by the VMM is not in KVM's log"
    );
    match ok(g.vcpus[0].run()) {
        VcpuExit::Hypercall { function_id, .. } => assert_eq!(function_id, 0x8400_0000),
        other => panic!("unexpected exit {other:?}"),
    }
    let log = ok(g.vm.take_dirty_log());
    assert!(log[0].is_dirty(WRITTEN), "the stored-to page is dirty");
    assert!(!log[0].is_dirty(UNTOUCHED), "an untouched page is clean");
    assert!(!log[0].is_dirty(ENTRY), "the code page was only read");
    assert_eq!(log[0].dirty_pages().collect::<Vec<_>>(), vec![WRITTEN]);
    let again = ok(g.vm.take_dirty_log());
    assert_eq!(again[0].count(), 0, "fetching clears the log");
    ok(g.vm.set_dirty_logging(false));
}

#[test]
fn kicked_vcpu_returns_interrupted() {
    vpsci_kvm::install_kick_handler().unwrap_or_else(|e| panic!("{e}"));
    let g = boot(&counting_loop(), 1, SmcccRouting::userspace_psci());
    let mem = g.mem;
    let read_counter = move || mem.word(COUNTER);
    let mut vcpu = g
        .vcpus
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no vcpu"));
    let kicker = vcpu.kicker();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        vcpu.bind_current_thread();
        let exit = vcpu.run().map_err(|e| e.to_string());
        let _ = tx.send(exit);
        // Keep the vCPU (and its kvm_run) alive until the test is done with it.
        std::thread::park();
    });
    // Kick only once the guest is running inside KVM_RUN (its counter moves), so
    // this proves a kick interrupts a running vCPU, not only one that has yet to enter
    // (immediate_exit covers that case).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while read_counter() < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never ran (counter {})",
            read_counter()
        );
        std::thread::yield_now();
    }
    assert!(kicker.kick());
    let exit = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("KVM_RUN did not return within 10 s of the kick: {e}"));
    assert_eq!(exit, Ok(VcpuExit::Interrupted));
    let stopped_at = read_counter();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        read_counter(),
        stopped_at,
        "the guest kept running after the kick"
    );
}

#[test]
fn kernel_psci_mode_answers_psci_version_in_kernel() {
    let mut code = Vec::new();
    code.extend(mov32(0, 0x8400_0000));
    code.push(HVC);
    code.push(mov_reg(5, 0));
    code.extend(mov32(0, 0x8400_0008));
    code.push(HVC);
    code.push(0x1400_0000);
    let mut g = boot(&code, 1, SmcccRouting::kernel_psci());
    let vcpu = &mut g.vcpus[0];
    match ok(vcpu.run()) {
        VcpuExit::SystemEvent { kind, .. } => {
            assert_eq!(kind, vpsci_kvm::SystemEventKind::Shutdown);
        }
        other => panic!("unexpected exit {other:?}"),
    }
    // KVM's own PSCI is 1.x on a 6.x kernel.
    assert_eq!(ok(vcpu.get_core(CoreReg::X(5))) >> 16, 1);
}
