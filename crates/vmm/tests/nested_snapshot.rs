//! Whole-VM snapshot and restore through the `vpsci` binary on real arm64 KVM
//! (nested harness): `vpsci run --snapshot-on-console` pauses the VM at a
//! point the guest chose, writes the snapshot and stops; `vpsci restore` in a
//! new process resumes it. The guest's vCPUs are ON, OFF and in CPU_SUSPEND
//! standby when it is saved, and it was given PSCI 1.0: after the restore the
//! engine answers as if nothing happened (AFFINITY_INFO, CPU_ON, PSCI_VERSION),
//! from the restored process's event log.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::path::Path;
use std::process::{Command, Output};

use nested_common::*;
use vpsci_firmware::{encode_power_state, Conduit, CpuPowerState, FirmwareConfig};

const CPUS: usize = 5;
/// NODE_HW_STATE, SMC64, and two of its answers (PSCI §5.1.18).
const NODE_HW_STATE: u32 = 0xC400_000D;
const HW_OFF: u64 = 1;
const HW_STANDBY: u64 = 2;

fn vpsci(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Spins until CNTFRQ_EL0 ticks (one second of guest time) have passed on the
/// virtual counter: the snapshot (taken within milliseconds of the marker)
/// lands inside this wait, so what follows runs in the restored VM.
fn wait_one_second(a: &mut Asm) {
    a.mrs(3, 3, 14, 0, 0, 23); // x23 = CNTFRQ_EL0
    a.counter(20);
    let again = a.here();
    a.counter(21);
    a.word(0xCB14_02B6); // sub x22, x21, x20
    a.cmp(22, 23);
    let off = ((again as i64 - a.here() as i64) / 4) as u32 & 0x7FFFF;
    a.word(0x5400_0003 | (off << 5)); // b.lo again
}

/// vCPU 0 starts vCPU 1 (counts in memory: ON), vCPU 3 (CPU_SUSPEND standby) and vCPU 4
/// (CPU_SUSPEND powerdown), with nothing to wake either; leaves vCPU 2 OFF;
/// once vCPU 1 counts and NODE_HW_STATE shows vCPU 3 in standby and vCPU 4
/// off, prints the marker, waits, then (restored) asks AFFINITY_INFO of 1..4,
/// PSCI_VERSION, CPU_ON of 2 and of 1, and powers off once vCPU 1's counter
/// moved and vCPU 2 ran.
fn guest() -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    let spin_at = ENTRY + 0x800;
    let suspend_at = ENTRY + 0x900;
    let powerdown_at = ENTRY + 0xA00;
    let flag = RESULTS + 0x100;
    let counter = RESULTS + 0x108;
    a.smccc(CPU_ON, [mpidr(1), spin_at, 0]);
    a.smccc(CPU_ON, [mpidr(3), suspend_at, 0]);
    a.smccc(CPU_ON, [mpidr(4), powerdown_at, 0]);
    // The marker only once every secondary is where the test wants it, as
    // the engine sees it: vCPU 1 counting, vCPU 3 in standby and vCPU 4
    // powered down (NODE_HW_STATE). Printed right after the CPU_ONs, the
    // snapshot could catch a start not yet run or a CPU_SUSPEND not yet made.
    a.mov(16, counter);
    let counting = a.here();
    a.ldr(17, 16, 0).cbz_back(17, counting);
    for (cpu, state) in [(3, HW_STANDBY), (4, HW_OFF)] {
        let poll = a.here();
        a.smccc(NODE_HW_STATE, [mpidr(cpu), 0, 0]);
        a.mov(9, state).cmp(0, 9).bne_back(poll);
    }
    a.print("SNAP\n");
    wait_one_second(&mut a);
    a.smccc(AFFINITY_INFO, [mpidr(1), 0, 0]);
    a.smccc(AFFINITY_INFO, [mpidr(2), 0, 0]);
    a.smccc(AFFINITY_INFO, [mpidr(3), 0, 0]);
    a.smccc(AFFINITY_INFO, [mpidr(4), 0, 0]);
    a.smccc(PSCI_VERSION, [0; 3]);
    a.smccc(CPU_ON, [mpidr(2), spin_at + 0x40, 0]);
    a.smccc(CPU_ON, [mpidr(1), spin_at, 0]);
    // vCPU 1 still counts: wait for its counter to move.
    a.mov(16, counter).ldr(18, 16, 0);
    let moving = a.here();
    a.ldr(17, 16, 0).cmp(17, 18).beq_back(moving);
    // Wait for vCPU 2 to write its flag.
    a.mov(16, flag);
    let wait = a.here();
    a.ldr(17, 16, 0);
    a.cbz_back(17, wait);
    a.print("after\n");
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    assert!(a.here() <= spin_at, "main program overlaps the secondaries");
    while a.here() < spin_at {
        a.word(0xD503_201F); // nop
    }
    // vCPU 1: count.
    let mut s = Asm::new(spin_at, Conduit::Hvc);
    s.mov(16, counter);
    let count = s.here();
    s.add_imm(0, 0, 1).str(0, 16, 0).b_back(count);
    while s.here() < spin_at + 0x40 {
        s.word(0xD503_201F); // nop
    }
    // vCPU 2 (after the restore): set the flag, spin.
    s.mov(17, 1).store_at(17, flag).spin();
    while s.here() < suspend_at {
        s.word(0xD503_201F);
    }
    // vCPU 3: standby forever.
    let standby = u64::from(encode_power_state(
        &FirmwareConfig::default(),
        CpuPowerState::Standby,
    ));
    let again = s.here();
    s.smccc(CPU_SUSPEND, [standby, 0, 0]);
    s.b_back(again);
    while s.here() < powerdown_at {
        s.word(0xD503_201F);
    }
    // vCPU 4: powerdown (its resume entry would be here again).
    let powerdown = u64::from(encode_power_state(
        &FirmwareConfig::default(),
        CpuPowerState::Powerdown,
    ));
    s.smccc(CPU_SUSPEND, [powerdown, powerdown_at, 0]);
    s.spin();
    a.append(&s);
    a
}

/// The result (x0) of every `function` call in an event log, in order.
fn results(log: &str, function: &str) -> Vec<i64> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "psci_call" && v["function"] == function)
        .filter_map(|v| v["result"]["x0"].as_i64())
        .collect()
}

#[test]
fn a_vm_snapshotted_at_a_console_marker_resumes_in_a_new_process_with_its_power_states_and_psci_version(
) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = tmp.path().join("guest.bin");
    std::fs::write(&image, guest().bytes()).unwrap_or_else(|e| panic!("{e}"));
    let snap = tmp.path().join("snap");
    let before_log = tmp.path().join("before.jsonl");
    let after_log = tmp.path().join("after.jsonl");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let cpus = CPUS.to_string();
    let out = vpsci(&[
        "run",
        "--image",
        &path(&image),
        "--cpus",
        &cpus,
        "--memory",
        "16",
        "--psci-version",
        "1.0",
        "--events",
        &path(&before_log),
        "--snapshot-on-console",
        "SNAP",
        "--snapshot-dir",
        &path(&snap),
        "--timeout",
        "120",
    ]);
    let stderr = text(&out.stderr);
    eprintln!("run: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("snapshot written to"), "{stderr}");
    // The marker is seen at its last byte: the newline after it comes from
    // the source or the restored VM, depending on when the pause landed.
    let source_output = text(&out.stdout);
    assert!(
        source_output == "SNAP" || source_output == "SNAP\n",
        "the source VM stopped inside the wait: {source_output:?}"
    );
    assert!(snap.join("manifest.json").exists());

    // The new process's defaults are PSCI 1.3: the guest keeps its 1.0.
    let out = vpsci(&[
        "restore",
        &path(&snap),
        "--events",
        &path(&after_log),
        "--timeout",
        "120",
    ]);
    let stderr = text(&out.stderr);
    eprintln!("restore: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        source_output + &text(&out.stdout),
        "SNAP\nafter\n",
        "the restored VM printed the rest"
    );
    assert!(stderr.contains("vCPU 0 called SYSTEM_OFF"), "{stderr}");
    let log = std::fs::read_to_string(&after_log).unwrap_or_default();
    assert_eq!(
        results(&log, "AFFINITY_INFO"),
        vec![0, 1, 0, 0],
        "vCPU 1 ON, vCPU 2 OFF, vCPU 3 (standby) and 4 (powerdown) ON:\n{log}"
    );
    // vCPUs 3 and 4 suspended in the source VM and stayed suspended in the
    // restored one: they made no call there.
    let calls_of = |log: &str, vcpu: u64| -> Vec<String> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "psci_call" && v["vcpu"] == vcpu)
            .map(|v| format!("{}:{}", v["function"], v["result"]["outcome"]))
            .collect()
    };
    let before = std::fs::read_to_string(&before_log).unwrap_or_default();
    for vcpu in [3, 4] {
        assert_eq!(
            calls_of(&before, vcpu),
            vec!["\"CPU_SUSPEND\":\"suspend\"".to_owned()],
            "{before}"
        );
        assert!(calls_of(&log, vcpu).is_empty(), "vCPU {vcpu}: {log}");
    }
    assert_eq!(results(&log, "PSCI_VERSION"), vec![0x1_0000], "{log}");
    assert_eq!(
        results(&log, "CPU_ON"),
        vec![SUCCESS as i64, ALREADY_ON as i64],
        "vCPU 2 starts, vCPU 1 is already on:\n{log}"
    );
    // Nothing of this ran in the source VM.
    assert!(results(&before, "AFFINITY_INFO").is_empty(), "{before}");
}

#[test]
fn restoring_onto_kvm_psci_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = tmp.path().join("guest.bin");
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.print("SNAP\n");
    wait_one_second(&mut a);
    a.print("after\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    std::fs::write(&image, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    let snap = tmp.path().join("snap");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let out = vpsci(&[
        "run",
        "--image",
        &path(&image),
        "--memory",
        "16",
        "--snapshot-on-console",
        "SNAP",
        "--snapshot-dir",
        &path(&snap),
        "--timeout",
        "120",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let source_output = text(&out.stdout);
    let out = vpsci(&["restore", &path(&snap), "--in-kernel-psci"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot offer it: restore refused"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "", "the guest ran");
    // The same snapshot restores without the flag.
    let out = vpsci(&["restore", &path(&snap), "--timeout", "120"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(source_output + &text(&out.stdout), "SNAP\nafter\n");
}

#[test]
fn a_system_suspended_vm_is_snapshotted_suspended_and_wakes_at_its_entry_after_the_restore() {
    // vCPU 0 arms its timer well into the future and suspends the VM; the
    // snapshot is taken once the engine committed the suspension; after the
    // restore the timer (its counter continuing) wakes the VM at the entry
    // point with the context id.
    let resume = ENTRY + 0x1000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.arm_timer_wakeup(0x1000_0000)
        .smccc(SYSTEM_SUSPEND, [resume, 0x77, 0])
        .print("returned\n")
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    let bad = a.here();
    a.print("bad context id\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    while a.here() < resume {
        a.spin();
    }
    a.mov(18, 0x77).cmp(0, 18).bne_back(bad);
    a.print("woken\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = tmp.path().join("guest.bin");
    std::fs::write(&image, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    let snap = tmp.path().join("snap");
    let before_log = tmp.path().join("before.jsonl");
    let after_log = tmp.path().join("after.jsonl");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let out = vpsci(&[
        "run",
        "--image",
        &path(&image),
        "--cpus",
        "2",
        "--memory",
        "16",
        "--events",
        &path(&before_log),
        "--snapshot-on-system-suspend",
        "--snapshot-dir",
        &path(&snap),
        "--timeout",
        "120",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("snapshot written to"), "{stderr}");
    assert_eq!(text(&out.stdout), "");
    let kinds = |log: &str, kind: &str| -> usize {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == kind)
            .count()
    };
    let before = std::fs::read_to_string(&before_log).unwrap_or_default();
    assert_eq!(
        kinds(&before, "wakeup"),
        0,
        "woke before the snapshot: {before}"
    );
    assert!(before.contains("\"suspended_system\""), "{before}");

    let out = vpsci(&[
        "restore",
        &path(&snap),
        "--events",
        &path(&after_log),
        "--timeout",
        "120",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "woken\n", "{stderr}");
    let after = std::fs::read_to_string(&after_log).unwrap_or_default();
    assert_eq!(kinds(&after, "wakeup"), 1, "{after}");
    assert!(
        after.contains("\"from\":\"suspended_system\",\"to\":\"on\""),
        "{after}"
    );
}

/// Spins until `secs` seconds of guest time have passed on the virtual counter.
fn wait_seconds(a: &mut Asm, secs: u32) {
    a.mrs(3, 3, 14, 0, 0, 23); // x23 = CNTFRQ_EL0
    a.mov(24, u64::from(secs));
    a.word(0x9B18_7EF7); // mul x23, x23, x24
    a.counter(20);
    let again = a.here();
    a.counter(21);
    a.word(0xCB14_02B6); // sub x22, x21, x20
    a.cmp(22, 23);
    let off = ((again as i64 - a.here() as i64) / 4) as u32 & 0x7FFFF;
    a.word(0x5400_0003 | (off << 5)); // b.lo again
}

#[test]
fn a_snapshot_through_the_control_api_lets_the_vm_run_on_and_restores_in_a_new_process() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.print("ready\n");
    wait_seconds(&mut a, 30);
    a.print("after\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = tmp.path().join("guest.bin");
    std::fs::write(&image, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    let socket = tmp.path().join("api.sock");
    let snap = tmp.path().join("snap");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let child = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args([
            "run",
            "--image",
            &path(&image),
            "--memory",
            "16",
            "--api-socket",
            &path(&socket),
            "--timeout",
            "120",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The socket answers before the VM runs ("starting"): wait for "running".
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM did not run within 60 s"
        );
        if socket.exists() {
            let info = vpsci(&["ctl", &path(&socket), "info"]);
            if text(&info.stdout).contains("run state: running") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = vpsci(&["ctl", &path(&socket), "snapshot", &path(&snap)]);
    let said = text(&out.stdout);
    eprintln!("ctl snapshot: {said}{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(said.contains("the VM is running"), "{said}");
    // A second snapshot into the same directory is refused and changes nothing.
    let again = vpsci(&["ctl", &path(&socket), "snapshot", &path(&snap)]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again.stdout));
    let out = vpsci(&["ctl", &path(&socket), "poweroff"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let source = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("vpsci run: {e}"));
    assert_eq!(source.status.code(), Some(0), "{}", text(&source.stderr));
    let source_output = text(&source.stdout);
    assert!(!source_output.contains("after"), "{source_output}");

    let out = vpsci(&["restore", &path(&snap), "--timeout", "120"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        source_output + &text(&out.stdout),
        "ready\nafter\n",
        "{stderr}"
    );
}

/// Snapshot and restore time by guest RAM size (measurement; numbers are
/// printed, not asserted). Sizes from `VPSCI_SNAPSHOT_SIZES` (default
/// `64M,512M`), runs per size from `VPSCI_SNAPSHOT_RUNS` (default 3). Run:
/// `cargo test --release -p vpsci --target aarch64-unknown-linux-musl --test
/// nested_snapshot -- --ignored --nocapture measure`.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_snapshot_and_restore_time_by_memory_size() {
    let sizes = std::env::var("VPSCI_SNAPSHOT_SIZES").unwrap_or_else(|_| "64M,512M".to_owned());
    let runs: usize = std::env::var("VPSCI_SNAPSHOT_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.print("SNAP\n");
    wait_one_second(&mut a);
    a.print("after\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = tmp.path().join("guest.bin");
    std::fs::write(&image, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    let path = |p: &Path| p.to_string_lossy().into_owned();
    // "... (pause P ms, state S ms, write W ms)" and "... in R ms (PSCI ...)".
    let ms_after = |line: &str, key: &str| -> f64 {
        line.split(key)
            .nth(1)
            .and_then(|rest| rest.trim_start().split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN)
    };
    for size in sizes.split(',') {
        let mut saves = Vec::new();
        let mut restores = Vec::new();
        for run in 0..runs {
            let snap = tmp.path().join(format!("snap-{size}-{run}"));
            let out = vpsci(&[
                "run",
                "--image",
                &path(&image),
                "--memory",
                size,
                "--snapshot-on-console",
                "SNAP",
                "--snapshot-dir",
                &path(&snap),
                "--timeout",
                "600",
            ]);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{stderr}");
            let total = ms_after(&stderr, "pause")
                + ms_after(&stderr, "state")
                + ms_after(&stderr, "write");
            saves.push(total);
            let out = vpsci(&["restore", &path(&snap), "--timeout", "600"]);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{stderr}");
            assert!(text(&out.stdout).ends_with("after\n"));
            restores.push(ms_after(&stderr, " in "));
            let _ = std::fs::remove_dir_all(&snap);
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (sm, smin, smax) = stats(&mut saves);
        let (rm, rmin, rmax) = stats(&mut restores);
        println!(
            "snapshot {size}: save median {sm:.0} ms (min {smin:.0}, max {smax:.0}); \
             restore median {rm:.0} ms (min {rmin:.0}, max {rmax:.0}); {runs} runs"
        );
    }
}
