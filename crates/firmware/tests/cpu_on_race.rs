//! Concurrent CPU_ON on one target from real threads: exactly one SUCCESS per OFF -> ON
//! transition and exactly one start request; every other caller is told ALREADY_ON in the
//! default mode, and ALREADY_ON or ON_PENDING when ON_PENDING is reported.

mod common;

use common::*;
use std::sync::{Arc, Barrier};
use vpsci_firmware::{FirmwareConfig, FunctionId, Mpidr, OnPending, PowerState, PsciError, VcpuId};

fn race_once(mode: OnPending, cpus: u32, target: u32) {
    let (fw, p) = fw_with(
        FirmwareConfig {
            on_pending: mode,
            ..FirmwareConfig::default()
        },
        cpus,
    );
    for v in 1..cpus {
        if v != target {
            bring_up(&fw, &p, v);
        }
    }
    let before = p.starts().len();
    let fw = Arc::new(fw);
    let p = Arc::new(p);
    let callers: Vec<u32> = (0..cpus).filter(|&v| v != target).collect();
    let barrier = Arc::new(Barrier::new(callers.len()));
    let handles: Vec<_> = callers
        .into_iter()
        .map(|caller| {
            let (fw, p, barrier) = (Arc::clone(&fw), Arc::clone(&p), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                let mpidr = Mpidr::from_index(target).raw();
                let r = x0(
                    &fw,
                    &p,
                    caller,
                    FunctionId::CpuOn64,
                    mpidr,
                    RAM,
                    u64::from(caller),
                );
                // The target's thread may start as soon as the request is out.
                if r == 0 {
                    fw.vcpu_started(VcpuId::new(target), &*p);
                }
                r
            })
        })
        .collect();
    let results: Vec<u64> = handles
        .into_iter()
        .map(|h| h.join().expect("caller thread"))
        .collect();
    let successes = results.iter().filter(|&&r| r == 0).count();
    assert_eq!(successes, 1, "results {results:?}");
    for r in &results {
        let pending_ok = mode == OnPending::Reported && *r == PsciError::OnPending.to_register();
        assert!(
            *r == 0 || *r == PsciError::AlreadyOn.to_register() || pending_ok,
            "{mode:?}: unexpected {r:#x} in {results:?}"
        );
    }
    assert_eq!(p.starts().len() - before, 1);
    assert_eq!(fw.power_state(VcpuId::new(target)), PowerState::On);
}

#[test]
fn racing_cpu_on_gives_one_success_and_only_already_on_for_2_to_16_vcpus() {
    for cpus in [2, 3, 4, 8, 16] {
        for round in 0..20 {
            race_once(OnPending::Hidden, cpus, 1 + round % (cpus - 1));
        }
    }
}

#[test]
fn racing_cpu_on_gives_exactly_one_success_when_on_pending_is_reported() {
    for cpus in [2, 3, 4, 8, 16] {
        for round in 0..20 {
            race_once(OnPending::Reported, cpus, 1 + round % (cpus - 1));
        }
    }
}
