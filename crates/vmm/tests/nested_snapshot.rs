//! Whole-VM snapshot and restore through the `vpsci` binary on real arm64 KVM
//! (nested harness): `vpsci run --snapshot-on-console` pauses the VM at a
//! point the guest chose, writes the snapshot and stops; `vpsci restore` in a
//! new process resumes it. The guest's vCPUs are ON, OFF and in CPU_SUSPEND
//! standby when it is saved, and it was given PSCI 1.0: after the restore the
//! engine answers as if nothing happened (AFFINITY_INFO, CPU_ON, PSCI_VERSION),
//! from the restored process's event log. Also: a VM saved system-suspended,
//! a start committed but not yet run (`--hold-starts`), a snapshot through
//! the control API, and the refusal of KVM's PSCI.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nested_common::binary::{
    arg, reported_ms, results, snapshot_round_trip, text, transition, transitions, vpsci,
    RoundTrip, RoundTripArgs,
};
use nested_common::*;
use serde_json::Value;
use vpsci_firmware::{
    encode_power_state, Conduit, CpuPowerState, EntryPoint, FirmwareConfig, PowerState, VcpuId,
};

const CPUS: usize = 5;
/// NODE_HW_STATE, SMC64, and two of its answers (PSCI §5.1.18).
const NODE_HW_STATE: u32 = 0xC400_000D;
const HW_OFF: u64 = 1;
const HW_STANDBY: u64 = 2;

/// A guest image file (and the directory that holds it).
fn image_file(a: &Asm) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = dir.path().join("guest.bin");
    std::fs::write(&image, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    let path = arg(&image);
    (dir, path)
}

/// Snapshots the raw image `a` (16 MiB of RAM unless `more` says otherwise)
/// when `trigger` fires, with `more` run arguments, and restores it; each
/// process gets `timeout` seconds.
fn round_trip(a: &Asm, trigger: &[&str], more: &[&str], timeout: &str) -> RoundTrip {
    let (_dir, image) = image_file(a);
    let mut run = vec!["--image", &image, "--timeout", timeout];
    if !more.contains(&"--memory") {
        run.extend(["--memory", "16"]);
    }
    run.extend_from_slice(trigger);
    run.extend_from_slice(more);
    snapshot_round_trip(RoundTripArgs {
        run: &run,
        restore: &["--timeout", timeout],
        ..RoundTripArgs::default()
    })
}

/// What vCPU `vcpu` called, as `"FUNCTION":"outcome"`.
fn calls_of(log: &[Value], vcpu: u64) -> Vec<String> {
    log.iter()
        .filter(|v| v["kind"] == "psci_call" && v["vcpu"] == vcpu)
        .map(|v| format!("{}:{}", v["function"], v["result"]["outcome"]))
        .collect()
}

/// How many events of `kind` an event log has.
fn kinds(log: &[Value], kind: &str) -> usize {
    log.iter().filter(|v| v["kind"] == kind).count()
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
    a.wait_seconds(1);
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

#[test]
fn a_vm_snapshotted_at_a_console_marker_resumes_in_a_new_process_with_its_power_states_and_psci_version(
) {
    let cpus = CPUS.to_string();
    let trip = round_trip(
        &guest(),
        &["--snapshot-on-console", "SNAP"],
        &["--cpus", &cpus, "--psci-version", "1.0"],
        "120",
    );
    // The marker is seen at its last byte: the newline after it comes from
    // the source or the restored VM, depending on when the pause landed.
    let source_output = trip.source.stdout.clone();
    assert!(
        source_output == "SNAP" || source_output == "SNAP\n",
        "the source VM stopped inside the wait: {source_output:?}"
    );
    // The new process's defaults are PSCI 1.3: the guest keeps its 1.0.
    let restored = &trip.restored;
    assert_eq!(restored.status, Some(0), "{}", restored.stderr);
    assert_eq!(
        source_output + &restored.stdout,
        "SNAP\nafter\n",
        "the restored VM printed the rest"
    );
    assert!(
        restored.stderr.contains("vCPU 0 called SYSTEM_OFF"),
        "{}",
        restored.stderr
    );
    let (before, after) = (&trip.before, &trip.after);
    assert_eq!(
        results(after, "AFFINITY_INFO"),
        vec![0, 1, 0, 0],
        "vCPU 1 ON, vCPU 2 OFF, vCPU 3 (standby) and 4 (powerdown) ON:\n{after:?}"
    );
    // vCPUs 3 and 4 suspended in the source VM and stayed suspended in the
    // restored one: they made no call there.
    for vcpu in [3, 4] {
        assert_eq!(
            calls_of(before, vcpu),
            vec!["\"CPU_SUSPEND\":\"suspend\"".to_owned()],
            "{before:?}"
        );
        assert!(calls_of(after, vcpu).is_empty(), "vCPU {vcpu}: {after:?}");
    }
    assert_eq!(results(after, "PSCI_VERSION"), vec![0x1_0000], "{after:?}");
    assert_eq!(
        results(after, "CPU_ON"),
        vec![SUCCESS as i64, ALREADY_ON as i64],
        "vCPU 2 starts, vCPU 1 is already on:\n{after:?}"
    );
    // Nothing of this ran in the source VM.
    assert!(results(before, "AFFINITY_INFO").is_empty(), "{before:?}");
}

/// Prints `SNAP`, waits a second of guest time, prints `after` and powers off.
fn snap_then_after() -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.print("SNAP\n");
    a.wait_seconds(1);
    a.print("after\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    a
}

#[test]
fn restoring_onto_kvm_psci_is_refused_before_anything_runs() {
    let trip = round_trip(
        &snap_then_after(),
        &["--snapshot-on-console", "SNAP"],
        &[],
        "120",
    );
    let out = vpsci(&["restore", &arg(&trip.snap), "--in-kernel-psci"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot offer it: restore refused"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "", "the guest ran");
    // The same snapshot restores without the flag (the round trip's restore).
    assert_eq!(trip.restored.status, Some(0), "{}", trip.restored.stderr);
    assert_eq!(
        trip.source.stdout.clone() + &trip.restored.stdout,
        "SNAP\nafter\n"
    );
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
    let trip = round_trip(
        &a,
        &["--snapshot-on-system-suspend"],
        &["--cpus", "2"],
        "120",
    );
    assert_eq!(trip.source.stdout, "");
    let (before, after) = (&trip.before, &trip.after);
    assert_eq!(
        kinds(before, "wakeup"),
        0,
        "woke before the snapshot: {before:?}"
    );
    assert!(
        transitions(before, 0).contains(&transition("on", "suspended_system")),
        "{before:?}"
    );
    let restored = &trip.restored;
    assert_eq!(restored.status, Some(0), "{}", restored.stderr);
    assert_eq!(restored.stdout, "woken\n", "{}", restored.stderr);
    assert_eq!(kinds(after, "wakeup"), 1, "{after:?}");
    assert!(
        transitions(after, 0).contains(&transition("suspended_system", "on")),
        "{after:?}"
    );
}

/// The context id vCPU 0 gives vCPU 1's start in [`held_start`].
const CONTEXT: u64 = 0x5EED_C0DE;

/// vCPU 0 starts vCPU 1 (which `--hold-starts` keeps ON_PENDING), asks
/// AFFINITY_INFO and CPU_ON of it again, prints the marker and waits;
/// restored, it polls AFFINITY_INFO until vCPU 1 is ON, waits for vCPU 1's
/// flag and prints `after`. vCPU 1 sets the flag only if it started at its
/// entry with x0 = [`CONTEXT`] (else it prints `bad context id` and powers
/// off). Returns the program and vCPU 1's entry point.
fn held_start() -> (Asm, u64) {
    let target_at = ENTRY + 0x800;
    let flag = RESULTS + 0x200;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_ON, [mpidr(1), target_at, CONTEXT]);
    a.smccc(AFFINITY_INFO, [mpidr(1), 0, 0]);
    a.smccc(CPU_ON, [mpidr(1), target_at, CONTEXT]);
    a.print("SNAP\n");
    a.wait_seconds(1);
    let poll = a.here();
    a.smccc(AFFINITY_INFO, [mpidr(1), 0, 0]);
    a.mov(18, 0).cmp(0, 18).bne_back(poll);
    a.mov(16, flag);
    let wait = a.here();
    a.ldr(17, 16, 0).cbz_back(17, wait);
    a.print("after\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    let bad = a.here();
    a.print("bad context id\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    assert!(a.here() <= target_at, "vCPU 0's code overlaps vCPU 1's");
    while a.here() < target_at {
        a.word(0xD503_201F); // nop
    }
    a.mov(18, CONTEXT).cmp(0, 18).bne_back(bad);
    a.mov(17, 1).store_at(17, flag).spin();
    (a, target_at)
}

/// A snapshot taken while vCPU 1's start is committed (ON_PENDING) but not
/// run, restored: vCPU 1 starts at its entry with its context id, without a
/// new CPU_ON; `report_on_pending` chooses the engine's answers.
fn a_held_start_survives_the_round_trip(report_on_pending: bool) {
    let (a, target_at) = held_start();
    let mut more = vec!["--cpus", "2", "--hold-starts"];
    if report_on_pending {
        more.push("--report-on-pending");
    }
    let trip = round_trip(&a, &["--snapshot-on-console", "SNAP"], &more, "120");
    let (before, after) = (&trip.before, &trip.after);
    // The snapshot holds the pending start: its firmware section, read back
    // by an engine the way `vpsci restore` does, has vCPU 1 ON_PENDING with
    // the entry point and context id of the CPU_ON.
    let snap = vpsci::snapshot::open(&trip.snap).unwrap_or_else(|e| panic!("{e}"));
    let fw = vpsci::restore::check_firmware(&snap, false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::OnPending);
    assert_eq!(
        fw.pending_start(VcpuId::new(1)),
        Some(EntryPoint {
            pc: target_at,
            context_id: CONTEXT,
            aarch32: false,
        })
    );
    assert_eq!(
        transitions(before, 1),
        [transition("off", "on_pending")],
        "vCPU 1 in the source: {before:?}"
    );
    // As before the snapshot: KVM's answers (ON, ALREADY_ON) or TF-A's
    // (ON_PENDING twice).
    let (affinity, again) = if report_on_pending {
        (2, ON_PENDING as i64)
    } else {
        (0, ALREADY_ON as i64)
    };
    assert_eq!(results(before, "AFFINITY_INFO"), [affinity]);
    assert_eq!(results(before, "CPU_ON"), [SUCCESS as i64, again]);

    let restored = &trip.restored;
    assert_eq!(restored.status, Some(0), "{}", restored.stderr);
    assert_eq!(
        trip.source.stdout.clone() + &restored.stdout,
        "SNAP\nafter\n",
        "vCPU 1 did not start at its entry with its context id"
    );
    assert_eq!(
        transitions(after, 1),
        [transition("on_pending", "on")],
        "vCPU 1 after the restore: {after:?}"
    );
    assert!(results(after, "CPU_ON").is_empty(), "{after:?}");
    // Until vCPU 1 runs, AFFINITY_INFO answers as it did before; then ON.
    let answers = results(after, "AFFINITY_INFO");
    assert_eq!(answers.last(), Some(&0), "{answers:?}");
    assert!(
        answers.iter().all(|&x| x == 0 || x == affinity),
        "{answers:?}"
    );
    println!(
        "AFFINITY_INFO of vCPU 1 after the restore (on_pending {}): {answers:?}",
        if report_on_pending {
            "reported"
        } else {
            "hidden"
        }
    );
}

#[test]
fn a_start_committed_but_not_run_at_the_snapshot_runs_at_its_entry_after_the_restore() {
    a_held_start_survives_the_round_trip(false);
}

#[test]
fn a_start_committed_but_not_run_stays_on_pending_until_it_runs_after_the_restore() {
    a_held_start_survives_the_round_trip(true);
}

#[test]
fn a_snapshot_through_the_control_api_lets_the_vm_run_on_and_restores_in_a_new_process() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.print("ready\n");
    a.wait_seconds(30);
    a.print("after\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    let (dir, image) = image_file(&a);
    let socket = arg(&dir.path().join("api.sock"));
    let snap = arg(&dir.path().join("snap"));
    let child = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args([
            "run",
            "--image",
            &image,
            "--memory",
            "16",
            "--api-socket",
            &socket,
            "--timeout",
            "120",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // The socket answers before the VM runs ("starting"): wait for "running".
    loop {
        assert!(Instant::now() < deadline, "the VM did not run within 60 s");
        if std::path::Path::new(&socket).exists() {
            let info = vpsci(&["ctl", &socket, "info"]);
            if text(&info.stdout).contains("run state: running") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vpsci(&["ctl", &socket, "snapshot", &snap]);
    let said = text(&out.stdout);
    eprintln!("ctl snapshot: {said}{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(said.contains("the VM is running"), "{said}");
    // `snapshot: R MiB of RAM (S MiB stored) written to ...`: this small guest touched
    // a few MiB of its RAM, and memory.bin holds blocks for about that much only.
    let mib = |after: &str, before: &str| -> u64 {
        said.split_once(after)
            .and_then(|(_, rest)| rest.split_once(before))
            .and_then(|(n, _)| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{after}N{before}` in {said:?}"))
    };
    let (ram, stored) = (mib("snapshot: ", " MiB of RAM"), mib("(", " MiB stored)"));
    assert!(stored < ram, "{said}");
    let on_disk = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(std::path::Path::new(&snap).join("memory.bin"))
            .unwrap_or_else(|e| panic!("memory.bin: {e}")),
    ) * 512;
    assert!(
        on_disk <= (stored + 1) << 20 && on_disk < ram << 20,
        "memory.bin takes {on_disk} bytes on disk for {stored} MiB stored of {ram} MiB: {said}"
    );
    // A second snapshot into the same directory is refused and changes nothing.
    let again = vpsci(&["ctl", &socket, "snapshot", &snap]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again.stdout));
    let out = vpsci(&["ctl", &socket, "poweroff"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let source = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("vpsci run: {e}"));
    assert_eq!(source.status.code(), Some(0), "{}", text(&source.stderr));
    let source_output = text(&source.stdout);
    assert!(!source_output.contains("after"), "{source_output}");

    let out = vpsci(&["restore", &snap, "--timeout", "120"]);
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
/// nested_snapshot -- --ignored --nocapture measure`; a 2 GiB guest needs a
/// bigger nested machine (`VPSCI_NESTED_MEMORY=8G`): its RAM, its snapshot in
/// the machine's RAM-backed /tmp and the restored RAM are there at once.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_snapshot_and_restore_time_by_memory_size() {
    let sizes = std::env::var("VPSCI_SNAPSHOT_SIZES").unwrap_or_else(|_| "64M,512M".to_owned());
    let runs: usize = std::env::var("VPSCI_SNAPSHOT_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let guest = snap_then_after();
    let ms_after = |stderr: &str, key: &str| reported_ms(stderr, key).unwrap_or(f64::NAN);
    for size in sizes.split(',') {
        let mut saves = Vec::new();
        let mut restores = Vec::new();
        let mut on_disk = Vec::new();
        for _ in 0..runs {
            let trip = round_trip(
                &guest,
                &["--snapshot-on-console", "SNAP"],
                &["--memory", size],
                "600",
            );
            let stderr = &trip.source.stderr;
            saves.push(
                ms_after(stderr, "pause") + ms_after(stderr, "state") + ms_after(stderr, "write"),
            );
            let restored = &trip.restored;
            assert_eq!(restored.status, Some(0), "{}", restored.stderr);
            assert!(restored.stdout.ends_with("after\n"));
            restores.push(ms_after(&restored.stderr, " in "));
            // memory.bin's length and the bytes its blocks take (`du`).
            let meta = std::fs::metadata(trip.snap.join("memory.bin"))
                .unwrap_or_else(|e| panic!("memory.bin: {e}"));
            on_disk.push((meta.len(), meta.blocks() * 512, restored.max_rss_kib));
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
        for (len, blocks, rss_kib) in on_disk {
            println!(
                "snapshot {size}: memory.bin {} MiB long, {:.1} MiB on disk; \
                 restored process's peak RSS {:.1} MiB",
                len >> 20,
                blocks as f64 / f64::from(1 << 20),
                rss_kib as f64 / 1024.0
            );
        }
    }
}
