//! What `--on-hibernate refuse` relies on from the firmware engine, checked
//! natively with the engine's fake platform giving the verdict the policy
//! gives: SYSTEM_OFF2(HIBERNATE_OFF) is put to the platform once with the VM
//! quiesced; refused, it changes no power state, resumes every quiesce, and
//! the engine itself answers INTERNAL_FAILURE, so the VM is exactly as it was.

use std::sync::atomic::Ordering;

use vpsci::cli::HibernateAction;
use vpsci_firmware::testing::{self, FakePlatform};
use vpsci_firmware::{
    CallOutcome, Firmware, FirmwareConfig, Mpidr, PowerState, SystemEvent, VcpuId,
};

const CPU_ON: u64 = 0xC400_0003;
const SYSTEM_OFF: u64 = 0x8400_0008;
const SYSTEM_OFF2: u64 = 0xC400_0015;
const INTERNAL_FAILURE: u64 = -6i64 as u64;
const ENTRY: u64 = testing::TEST_RAM.base + 0x1000;

fn states(fw: &Firmware, cpus: u32) -> Vec<PowerState> {
    (0..cpus).map(|i| fw.power_state(VcpuId::new(i))).collect()
}

/// Three vCPUs: 0 ON (boot), 1 ON (started through CPU_ON), 2 OFF.
fn vm() -> (Firmware, FakePlatform) {
    let (fw, p) = match testing::firmware(FirmwareConfig::default(), 3) {
        Ok(pair) => pair,
        Err(e) => panic!("{e}"),
    };
    let on = fw.handle_call(
        &testing::call(0, [CPU_ON, Mpidr::from_index(1).raw(), ENTRY, 7]),
        &p,
    );
    assert_eq!(
        on,
        CallOutcome::Return {
            regs: [0, 1, ENTRY, 7]
        }
    );
    assert!(fw.vcpu_started(VcpuId::new(1), &p));
    p.refuse_system_events.store(
        HibernateAction::Refuse.refuses(&SystemEvent::Hibernate),
        Ordering::SeqCst,
    );
    (fw, p)
}

#[test]
fn a_refused_hibernate_request_changes_no_power_state_and_answers_internal_failure() {
    let (fw, p) = vm();
    let before = states(&fw, 3);
    assert_eq!(before, [PowerState::On, PowerState::On, PowerState::Off]);
    let quiesces = p.quiesce_calls.load(Ordering::SeqCst);

    let out = fw.handle_call(&testing::call(0, [SYSTEM_OFF2, 1, 0, 0xABC]), &p);
    assert_eq!(
        out,
        CallOutcome::Return {
            regs: [INTERNAL_FAILURE, 1, 0, 0xABC]
        }
    );
    assert_eq!(p.events(), vec![(VcpuId::new(0), SystemEvent::Hibernate)]);
    assert_eq!(states(&fw, 3), before, "no power state changed");
    assert_eq!(p.quiesce_calls.load(Ordering::SeqCst), quiesces + 1);
    assert_eq!(
        p.quiesce_depth.load(Ordering::SeqCst),
        0,
        "the quiesce was undone"
    );
}

#[test]
fn after_a_refused_hibernate_the_vm_still_starts_cpus_and_powers_off() {
    let (fw, p) = vm();
    let out = fw.handle_call(&testing::call(0, [SYSTEM_OFF2, 1, 0, 0]), &p);
    assert_eq!(
        out,
        CallOutcome::Return {
            regs: [INTERNAL_FAILURE, 1, 0, 0]
        }
    );
    // Refused: the caller runs on, as does every other vCPU.
    let on = fw.handle_call(
        &testing::call(1, [CPU_ON, Mpidr::from_index(2).raw(), ENTRY, 9]),
        &p,
    );
    assert_eq!(
        on,
        CallOutcome::Return {
            regs: [0, 2, ENTRY, 9]
        }
    );
    p.refuse_system_events.store(
        HibernateAction::Refuse.refuses(&SystemEvent::Off),
        Ordering::SeqCst,
    );
    let off = fw.handle_call(&testing::call(0, [SYSTEM_OFF, 0, 0, 0]), &p);
    let CallOutcome::SystemEvent { event, .. } = off else {
        panic!("SYSTEM_OFF after the refusal gave {off:?}");
    };
    assert_eq!(event, SystemEvent::Off);
    assert!(!HibernateAction::Refuse.refuses(&event));
}
