//! `--on-hibernate refuse` on real arm64 KVM (nested harness): a guest's
//! SYSTEM_OFF2(HIBERNATE_OFF) is logged as refused, the VM keeps running
//! (the caller gets INTERNAL_FAILURE, the other vCPU resumes) and a later
//! SYSTEM_OFF still powers it off with status 0.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::process::Command;
use std::time::Duration;

use nested_common::*;
use serde_json::Value;
use vpsci::cli::HibernateAction;
use vpsci_firmware::Conduit;

/// vCPU 1 counts up here for as long as it runs (its CPU_ON context id).
const COUNTER: u64 = RESULTS + 0x1000;
/// Where vCPU 1's code sits in the image.
const SECONDARY: u64 = ENTRY + 0x4_0000;
/// Boot vCPU's records: SYSTEM_OFF2's x0, then AFFINITY_INFO(vCPU 1) after it.
const OFF2_X0: u64 = RESULTS;
const AFF_AFTER: u64 = RESULTS + 8;
/// The counter as the boot vCPU read it right after the refused call, and
/// the later value it waited for.
const COUNT_AT_REFUSAL: u64 = RESULTS + 16;
const COUNT_LATER: u64 = RESULTS + 24;

/// Boot vCPU: start vCPU 1 and wait until it counts, ask to hibernate, keep
/// what came back, wait until vCPU 1 counts again (so it resumed after the
/// quiesce), check vCPU 1 is still ON, print, SYSTEM_OFF. vCPU 1: count in
/// [x0] forever.
fn hibernate_then_off_guest() -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_ON, [mpidr(1), SECONDARY, COUNTER]);
    a.mov(19, COUNTER);
    let started = a.here();
    a.ldr(20, 19, 0).cbz_back(20, started);
    a.smccc(SYSTEM_OFF2, [1, 0, 0]).store_at(0, OFF2_X0);
    a.mov(19, COUNTER)
        .ldr(21, 19, 0)
        .store_at(21, COUNT_AT_REFUSAL);
    let again = a.here();
    a.ldr(22, 19, 0).cmp(22, 21).beq_back(again);
    a.store_at(22, COUNT_LATER);
    a.smccc(AFFINITY_INFO, [mpidr(1), 0, 0])
        .store_at(0, AFF_AFTER)
        .print("still running\n")
        .smccc(SYSTEM_OFF, [0; 3])
        .print("SYSTEM_OFF returned\n")
        .spin();
    assert!(a.here() <= SECONDARY, "boot code too long");
    while a.here() < SECONDARY {
        a.spin();
    }
    let mut s = Asm::new(SECONDARY, Conduit::Hvc);
    let count = s.here();
    s.ldr(5, 0, 0).add_imm(5, 5, 1).str(5, 0, 0).b_back(count);
    a.append(&s);
    a
}

#[test]
fn refused_hibernate_returns_internal_failure_and_every_vcpu_runs_on_until_system_off() {
    let ran = run(
        &hibernate_then_off_guest(),
        Setup {
            cpus: 2,
            on_hibernate: HibernateAction::Refuse,
            timeout: Duration::from_secs(30),
            ..Setup::default()
        },
    );
    ran.assert_powered_off();
    assert!(
        ran.outcome.message.contains("vCPU 0 called SYSTEM_OFF:"),
        "the run ends on the later SYSTEM_OFF: {}",
        ran.outcome.message
    );
    assert_eq!(ran.u64_at(OFF2_X0), INTERNAL_FAILURE, "SYSTEM_OFF2's x0");
    assert_eq!(
        ran.u64_at(AFF_AFTER),
        0,
        "vCPU 1 still ON after the refusal"
    );
    assert!(
        ran.u64_at(COUNT_LATER) > ran.u64_at(COUNT_AT_REFUSAL),
        "vCPU 1 ran again after the refusal"
    );
    assert_eq!(ran.console, "still running\n");
    let hibernates: Vec<&String> = ran
        .events
        .iter()
        .filter(|e| e.contains("event: Hibernate"))
        .collect();
    assert_eq!(hibernates.len(), 1, "{:#?}", ran.events);
    assert!(hibernates[0].contains("refused: true"), "{:#?}", ran.events);
    assert!(
        ran.events
            .iter()
            .any(|e| e.contains("SYSTEM_OFF2") && e.contains("Return { x0: -6 }")),
        "{:#?}",
        ran.events
    );
    assert!(
        ran.events
            .iter()
            .any(|e| e.contains("event: Off") && e.contains("refused: false")),
        "{:#?}",
        ran.events
    );
    // Only vCPU 1's start changed a power state: the refusal changed none.
    let transitions: Vec<&String> = ran
        .events
        .iter()
        .filter(|e| e.starts_with("PowerState"))
        .collect();
    assert_eq!(transitions.len(), 2, "{transitions:#?}");
    assert!(
        transitions.iter().all(|e| e.contains("vcpu: 1,")),
        "{transitions:#?}"
    );
}

#[test]
fn vpsci_run_with_on_hibernate_refuse_logs_the_refusal_and_exits_0_on_system_off() {
    let image = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = std::fs::write(image.path(), hibernate_then_off_guest().bytes()) {
        panic!("{e}");
    }
    let events = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    let out = match Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .arg("run")
        .arg("--image")
        .arg(image.path())
        .args(["--cpus", "2", "--on-hibernate", "refuse", "--timeout", "30"])
        .arg("--events")
        .arg(events.path())
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("cannot run vpsci: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still running\n");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        stderr.contains("vCPU 0 called SYSTEM_OFF: VM powered off"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(events.path()).unwrap_or_default();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(v) => v,
            Err(e) => panic!("{e}: {l}"),
        })
        .collect();
    let system_events: Vec<&Value> = lines
        .iter()
        .filter(|v| v["kind"] == "system_event")
        .collect();
    assert_eq!(system_events.len(), 2, "{log}");
    assert_eq!(system_events[0]["event"], "hibernate", "{log}");
    assert_eq!(system_events[0]["refused"], true, "{log}");
    assert_eq!(system_events[1]["event"], "off", "{log}");
    assert!(system_events[1].get("refused").is_none(), "{log}");
    let off2 = lines
        .iter()
        .find(|v| v["function_id"] == "0xc4000015")
        .unwrap_or_else(|| panic!("no SYSTEM_OFF2 call logged: {log}"));
    assert_eq!(off2["result"]["outcome"], "return", "{log}");
    assert_eq!(off2["result"]["x0"], -6, "{log}");
}
