//! Live migration and `vpsci restore --api-socket` through the `vpsci` binary on real
//! arm64 KVM (nested harness). Two vpsci processes in the nested machine: the source
//! (`vpsci run --api-socket`), the destination (`vpsci restore --listen`), and `vpsci ctl
//! migrate` between them, over a Unix socket and over loopback TCP. The failure cases
//! (a destination that refuses, one that dies mid-copy, a corrupted frame) each show the
//! source still running afterwards: its API answers `running`, its guest keeps printing,
//! and a second migration of the same VM then succeeds. The test-only fault injection
//! (`VPSCI_MIGRATE_FAULT`) is described in docs/migration.md.
#![cfg(target_arch = "aarch64")]

mod nested_common;
mod process_common;

use std::path::Path;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nested_common::*;
use process_common::*;
use vpsci::api::types::{MigrationPhase, PowerState, RunState, VmInfo};
use vpsci_firmware::{encode_power_state, Conduit, CpuPowerState, FirmwareConfig};

/// Counts x5 down from `n` (a pause between rounds, so the logs stay small).
fn delay(a: &mut Asm, n: u64) {
    a.mov(5, n);
    let top = a.here();
    a.word(0xF100_04A5).bne_back(top); // subs x5, x5, #1; b.ne top
}

/// vCPU 0 storms CPU_ON on every other vCPU, which CPU_OFF at once; each round it checks
/// that its counter in memory still equals its copy in x20 (a page lost by a migration
/// prints MISMATCH and stops), bumps both and prints a dot.
fn storm_guest(cpus: u64) -> Asm {
    let secondary = ENTRY + 0x800;
    let counter = RESULTS;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.mov(19, counter).mov(20, 0);
    let top = a.here();
    for k in 1..cpus {
        a.smccc(CPU_ON, [mpidr(k as usize), secondary, 0]);
    }
    a.ldr(21, 19, 0);
    a.word(0xCB14_02B6); // sub x22, x21, x20
    let lost = a.cbnz_fwd(22);
    a.add_imm(20, 20, 1).str(20, 19, 0);
    a.print(".");
    delay(&mut a, 20_000);
    a.b_back(top);
    a.bind(lost);
    a.print("MISMATCH\n").spin();
    assert!(
        a.here() <= secondary,
        "the main loop overlaps the secondary entry"
    );
    while a.here() < secondary {
        a.word(0xD503_201F); // nop
    }
    a.smccc(CPU_OFF, [0; 3]).spin();
    a
}

/// Where [`writer_guest`] rewrites its pages.
const WRITTEN: u64 = RAM + (4 << 20);

/// vCPU 0 sweeps over `pages` pages from [`WRITTEN`] forever, waiting `pause` loop
/// iterations after each page: it checks that each page still holds the previous
/// sweep's number (a page the migration sent stale prints MISMATCH and stops), writes
/// the next one, and prints a dot per sweep.
fn writer_guest(pages: u64, pause: u64) -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.mov(20, 0);
    let sweep = a.here();
    a.mov(21, WRITTEN).mov(22, pages).add_imm(25, 20, 1);
    let page = a.here();
    a.ldr(23, 21, 0);
    a.word(0xCB14_02F8); // sub x24, x23, x20
    let stale = a.cbnz_fwd(24);
    a.str(25, 21, 0);
    if pause > 0 {
        delay(&mut a, pause);
    }
    a.word(0x9140_06B5); // add x21, x21, #1, lsl #12 (next page)
    a.word(0xF100_06D6); // subs x22, x22, #1
    a.bne_back(page);
    a.add_imm(20, 20, 1);
    a.print(".");
    a.b_back(sweep);
    a.bind(stale);
    a.print("MISMATCH\n").spin();
    a
}

/// vCPU 1 counts in memory (ON), vCPU 2 stays OFF, vCPU 3 waits in CPU_SUSPEND standby
/// with nothing to wake it; vCPU 0 calls PSCI_VERSION and prints `v` forever.
fn steady_guest() -> Asm {
    let count_at = ENTRY + 0x800;
    let standby_at = ENTRY + 0x900;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_ON, [mpidr(1), count_at, 0]);
    a.smccc(CPU_ON, [mpidr(3), standby_at, 0]);
    let top = a.here();
    a.smccc(PSCI_VERSION, [0; 3]);
    a.print("v");
    delay(&mut a, 200_000);
    a.b_back(top);
    while a.here() < count_at {
        a.word(0xD503_201F);
    }
    a.mov(16, RESULTS + 0x100);
    let count = a.here();
    a.add_imm(0, 0, 1).str(0, 16, 0).b_back(count);
    while a.here() < standby_at {
        a.word(0xD503_201F);
    }
    let standby = u64::from(encode_power_state(
        &FirmwareConfig::default(),
        CpuPowerState::Standby,
    ));
    let again = a.here();
    a.smccc(CPU_SUSPEND, [standby, 0, 0]);
    a.b_back(again);
    a
}

/// A storming guest migrates to `endpoint` and carries on there: every vCPU answers
/// (CPU_OFF from each secondary after the migration), its counter in memory never
/// disagrees with its register copy, and the source exits 0 with `migrated to`.
fn storm_migrates_over(endpoint: &str) {
    const CPUS: u32 = 4;
    let bench = Bench::new();
    let image = bench.file("storm.bin", &storm_guest(u64::from(CPUS)).bytes());
    let source = bench.source(&image, CPUS, &[], &[]);
    source.keeps_printing();
    let dest = bench.destination("dest", endpoint, &[], &[]);
    let done = migrated(&migrate(&source.socket, endpoint, &[]));
    assert!(done.confirmed, "{done:?}");
    assert_eq!(done.to, endpoint);
    assert_eq!(done.run_state, RunState::Stopping);
    assert!(
        done.rounds.len() >= 2,
        "a full copy and a paused round: {done:?}"
    );
    assert!(done.rounds[0].pages_sent > 0, "{done:?}");
    for r in &done.rounds {
        println!(
            "{endpoint} round {}: {} pages, {:.1} ms, {} dirty, expected downtime {:.1} ms",
            r.round, r.pages_sent, r.ms, r.dirty_pages, r.expected_downtime_ms
        );
    }
    println!(
        "{endpoint}: total {:.1} ms, downtime {:.1} ms, {} bytes",
        done.total_ms, done.downtime_ms, done.bytes_sent
    );
    let src = source.wait();
    assert_eq!(src.status, Some(0), "{}", src.stderr);
    assert!(
        src.stderr.contains(&format!("migrated to {endpoint}")),
        "{}",
        src.stderr
    );
    assert_eq!(
        phases(&src.events).last().map(String::as_str),
        Some("running"),
        "{:?}",
        phases(&src.events)
    );
    let dest = dest.serving();
    let after = info(&dest.socket);
    assert_eq!(after.run_state, RunState::Running, "{after:?}");
    let secondaries: Vec<u64> = (1..u64::from(CPUS)).collect();
    until(
        "every secondary vCPU has called CPU_OFF on the destination",
        || callers(&read(&dest.events), "CPU_OFF") == secondaries,
    );
    dest.keeps_printing();
    let out = ctl(&dest.socket, &["poweroff"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let dst = dest.wait();
    assert_eq!(dst.status, Some(0), "{}", dst.stderr);
    assert!(
        !dst.console.contains("MISMATCH"),
        "a page was lost: {}",
        dst.console
    );
    assert!(!src.console.contains("MISMATCH"), "{}", src.console);
    assert!(
        dst.console.contains('.'),
        "the guest printed on the destination"
    );
    let dphases = phases(&dst.events);
    for phase in ["started", "accepted", "round", "ready", "running"] {
        assert!(
            dphases.iter().any(|p| p == phase),
            "{phase} missing: {dphases:?}"
        );
    }
}

#[test]
fn a_guest_storming_cpu_on_and_off_migrates_over_a_unix_socket_and_keeps_going() {
    let endpoint = "unix:/tmp/vpsci-migrate-storm.sock";
    storm_migrates_over(endpoint);
}

#[test]
fn a_guest_storming_cpu_on_and_off_migrates_over_loopback_tcp_and_keeps_going() {
    storm_migrates_over("tcp:127.0.0.1:47011");
}

#[test]
fn a_guest_rewriting_megabytes_migrates_through_dirty_rounds_without_a_stale_page() {
    let bench = Bench::new();
    let image = bench.file("writer.bin", &writer_guest(2048, 0).bytes());
    let source = bench.source(&image, 1, &[], &[]);
    source.keeps_printing();
    let endpoint = "unix:/tmp/vpsci-migrate-writer.sock";
    let dest = bench.destination("dest", endpoint, &[], &[]);
    // A target no round can meet: pre-copy runs its three dirty rounds.
    let done = migrated(&migrate(
        &source.socket,
        endpoint,
        &["--max-rounds", "3", "--downtime-ms", "0"],
    ));
    for r in &done.rounds {
        println!(
            "writer round {}: {} pages, {:.1} ms, {} dirty ({:.0}/s), expected downtime {:.1} ms",
            r.round, r.pages_sent, r.ms, r.dirty_pages, r.dirty_pages_per_s, r.expected_downtime_ms
        );
    }
    assert_eq!(
        done.rounds.len(),
        5,
        "full copy, 3 dirty rounds, paused: {done:?}"
    );
    assert!(
        done.rounds[1..4].iter().all(|r| r.pages_sent > 0),
        "every dirty round resent pages: {done:?}"
    );
    assert_eq!(source.wait().status, Some(0));
    let dest = dest.serving();
    // Two more sweeps on the destination: every page checked after the migration.
    dest.keeps_printing();
    dest.keeps_printing();
    let dst = dest.power_off();
    assert!(!dst.console.contains("MISMATCH"), "a page arrived stale");
}

/// What `vpsci ctl info --json` answered while a migration ran.
struct Polled {
    /// Each answer, with how long its `vpsci ctl` process took.
    answers: Vec<(VmInfo, Duration)>,
    /// Requests that got no answer, each after every answer (the source had ended).
    unanswered_at_the_end: usize,
}

/// Polls `vpsci ctl SOCKET info --json` (100 ms apart) until `until_done` has ended, calling `each`
/// with every answer. A request without an answer is only counted after the answers,
/// as the source process ends when its VM migrated away.
fn poll_info(
    socket: &Path,
    until_done: &JoinHandle<Output>,
    mut each: impl FnMut(&VmInfo),
) -> Polled {
    let mut polled = Polled {
        answers: Vec::new(),
        unanswered_at_the_end: 0,
    };
    while !until_done.is_finished() {
        let sent = Instant::now();
        let out = ctl(socket, &["info", "--json"]);
        let took = sent.elapsed();
        if out.status.code() == Some(0) {
            assert_eq!(
                polled.unanswered_at_the_end, 0,
                "an answer came after a request without one"
            );
            let info: VmInfo = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("info --json does not decode: {e}"));
            each(&info);
            polled.answers.push((info, took));
        } else {
            polled.unanswered_at_the_end += 1;
        }
        // A breath between requests: the other tests of this binary share the
        // nested machine's CPUs.
        std::thread::sleep(Duration::from_millis(100));
    }
    polled
}

/// Issue 11/14: while a writer guest migrates through many dirty rounds, `vpsci ctl
/// info` keeps answering with run state `migrating` and advancing rounds, a pause in
/// the middle is refused with `409 migrating` and changes nothing, and the migration
/// completes. Latencies are printed (p50/p99 of each `vpsci ctl` process), not asserted.
#[test]
fn info_answers_with_advancing_rounds_during_a_slow_migration_and_a_pause_gets_409() {
    const ROUNDS: &str = "12";
    let bench = Bench::new();
    let image = bench.file("writer.bin", &writer_guest(512, 0).bytes());
    let source = bench.source(&image, 1, &[], &[]);
    source.keeps_printing();
    let endpoint = "unix:/tmp/vpsci-migrate-polled.sock";
    // The same requests before the migration, for comparison.
    let mut before: Vec<Duration> = (0..10)
        .map(|_| {
            let sent = Instant::now();
            assert_eq!(info(&source.socket).run_state, RunState::Running);
            sent.elapsed()
        })
        .collect();
    before.sort();
    let dest = bench.destination("dest", endpoint, &[], &[]);
    let migrating = {
        let socket = source.socket.clone();
        // A target no round can meet: pre-copy runs every dirty round.
        std::thread::spawn(move || {
            migrate(
                &socket,
                endpoint,
                &["--max-rounds", ROUNDS, "--downtime-ms", "0"],
            )
        })
    };
    let mut pause = None;
    let mut stream = None;
    let streamed = bench.path("streamed.jsonl");
    let polled = poll_info(&source.socket, &migrating, |info| {
        let in_precopy = info
            .migration
            .as_ref()
            .is_some_and(|m| m.phase == MigrationPhase::Precopy);
        if pause.is_none() && in_precopy {
            // An event stream opened in the middle, until the source ends.
            let file = std::fs::File::create(&streamed).unwrap_or_else(|e| panic!("{e}"));
            stream = Some(
                vpsci()
                    .arg("ctl")
                    .arg(&source.socket)
                    .arg("events")
                    .stdout(file)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run vpsci ctl events: {e}")),
            );
            print!("{}", text(&ctl(&source.socket, &["info"]).stdout));
            pause = Some(ctl(&source.socket, &["pause"]));
        }
    });
    let done = migrated(&migrating.join().expect("migrate thread"));
    assert_eq!(
        done.rounds.len(),
        14,
        "full copy, 12 dirty rounds, paused: {done:?}"
    );

    let pause = pause.expect("no answer showed pre-copy");
    assert_eq!(pause.status.code(), Some(1), "{}", text(&pause.stdout));
    assert!(
        text(&pause.stderr).starts_with("vpsci ctl: migrating (409): "),
        "{}",
        text(&pause.stderr)
    );
    let states: Vec<RunState> = polled.answers.iter().map(|(i, _)| i.run_state).collect();
    let rounds: Vec<u32> = polled
        .answers
        .iter()
        .filter_map(|(i, _)| i.migration.as_ref().and_then(|m| m.round))
        .collect();
    assert!(
        rounds.windows(2).all(|w| w[0] <= w[1]),
        "rounds went back: {rounds:?}"
    );
    let mut distinct = rounds.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "the rounds did not advance: {rounds:?}"
    );
    assert!(
        states
            .iter()
            .all(|s| [RunState::Running, RunState::Migrating, RunState::Stopping].contains(s)),
        "{states:?}"
    );
    assert!(states.contains(&RunState::Migrating), "{states:?}");
    let migrating_answers = states.iter().filter(|&&s| s == RunState::Migrating).count();
    let mut latencies: Vec<Duration> = polled.answers.iter().map(|(_, t)| *t).collect();
    latencies.sort();
    println!(
        "vpsci ctl info during a {}-round migration ({:.0} ms): {} answers ({} migrating, \
         rounds seen {distinct:?}), {} unanswered after the source ended; latency p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        done.rounds.len(),
        done.total_ms,
        polled.answers.len(),
        migrating_answers,
        polled.unanswered_at_the_end,
        percentile(&latencies, 50).as_secs_f64() * 1e3,
        percentile(&latencies, 99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "vpsci ctl info before it: {} answers, latency p50 {:.1} ms, max {:.1} ms",
        before.len(),
        percentile(&before, 50).as_secs_f64() * 1e3,
        before.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    let src = source.wait();
    assert_eq!(src.status, Some(0), "{}", src.stderr);
    let ended = stream.expect("a stream was opened").wait();
    assert!(ended.as_ref().is_ok_and(|s| s.success()), "{ended:?}");
    // The stream carried the rounds after it opened and every phase up to the
    // destination's confirmation: `running` is logged before the VM stops, and the
    // session closes its streams only once it has stopped.
    let streamed = phases(&read(&streamed));
    let rounds = streamed.iter().filter(|p| *p == "round").count();
    assert!(rounds >= 2, "{streamed:?}");
    assert_eq!(
        streamed.iter().rev().take(3).rev().collect::<Vec<_>>(),
        ["ready", "committed", "running"],
        "{streamed:?}"
    );
    // The source's log ends with its migration's `running`, then `vm_end`.
    let kinds: Vec<String> = src
        .events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| format!("{} {}", v["kind"], v["phase"]))
        .collect();
    assert_eq!(
        kinds.iter().rev().take(2).rev().collect::<Vec<_>>(),
        ["\"migration\" \"running\"", "\"vm_end\" null"],
        "the source's log ends: {:?}",
        &kinds[kinds.len().saturating_sub(5)..]
    );
    println!("the event stream opened during the migration carried {rounds} round lines");
    assert!(
        !src.events.contains("\"operator\""),
        "the refused pause was carried out: {}",
        src.events
    );
    let dest = dest.serving();
    dest.keeps_printing();
    let dst = dest.power_off();
    assert!(!dst.console.contains("MISMATCH"), "a page arrived stale");
}

#[test]
fn a_vm_pinned_to_psci_1_0_keeps_its_version_and_power_states_after_migrating() {
    let bench = Bench::new();
    let image = bench.file("steady.bin", &steady_guest().bytes());
    let source = bench.source(&image, 4, &["--psci-version", "1.0"], &[]);
    let settled = |i: &VmInfo| {
        i.vcpus.iter().map(|v| v.power_state).collect::<Vec<_>>()
            == vec![
                Some(PowerState::On),
                Some(PowerState::On),
                Some(PowerState::Off),
                Some(PowerState::SuspendedStandby),
            ]
    };
    until("vCPU 1 counts and vCPU 3 is in standby", || {
        settled(&info(&source.socket))
    });
    let endpoint = "unix:/tmp/vpsci-migrate-pinned.sock";
    let dest = bench.destination("dest", endpoint, &[], &[]);
    migrated(&migrate(&source.socket, endpoint, &[]));
    assert_eq!(source.wait().status, Some(0));
    let dest = dest.serving();
    let after = info(&dest.socket);
    assert_eq!(after.firmware.psci_version, "1.0", "{after:?}");
    assert!(settled(&after), "power states changed: {after:?}");
    until("the guest asks PSCI_VERSION on the destination", || {
        info(&dest.socket)
            .psci_calls
            .get("PSCI_VERSION")
            .copied()
            .unwrap_or(0)
            > 0
    });
    let versions: Vec<i64> = read(&dest.events)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "psci_call" && v["function"] == "PSCI_VERSION")
        .filter_map(|v| v["result"]["x0"].as_i64())
        .collect();
    assert!(
        !versions.is_empty() && versions.iter().all(|&v| v == 0x1_0000),
        "{versions:?}"
    );
    dest.power_off();
}

/// A failed migration: a 2-vCPU storming source (with `source_env`) sends to a
/// destination started with `dest_args` and `dest_env`; `vpsci ctl migrate` exits 1.
struct Failed {
    bench: Bench,
    source: Vmm,
    dest: Vmm,
    /// `vpsci ctl migrate`'s one line.
    err: String,
}

fn failed_migration(
    endpoint: &str,
    dest_args: &[&str],
    dest_env: &[(&str, &str)],
    source_env: &[(&str, &str)],
) -> Failed {
    let bench = Bench::new();
    let image = bench.file("storm.bin", &storm_guest(2).bytes());
    let source = bench.source(&image, 2, &[], source_env);
    source.keeps_printing();
    let dest = bench.destination("dest", endpoint, dest_args, dest_env);
    let out = migrate(&source.socket, endpoint, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    Failed {
        bench,
        source,
        dest,
        err,
    }
}

/// After a failure the same VM migrates to a sound destination and runs there.
fn migrates_after_all(bench: &Bench, source: Vmm, endpoint: &str) {
    let dest = bench.destination("dest2", endpoint, &[], &[]);
    migrated(&migrate(&source.socket, endpoint, &[]));
    assert_eq!(source.wait().status, Some(0));
    let dest = dest.serving();
    dest.keeps_printing();
    let dst = dest.power_off();
    assert!(!dst.console.contains("MISMATCH"), "{}", dst.console);
}

#[test]
fn a_destination_that_cannot_honour_the_firmware_refuses_before_any_memory_and_the_source_runs_on()
{
    let f = failed_migration(
        "unix:/tmp/vpsci-migrate-refused.sock",
        &["--in-kernel-psci"],
        &[],
        &[],
    );
    assert!(
        f.err.contains("migration_failed (502)") && f.err.contains("--in-kernel-psci"),
        "{}",
        f.err
    );
    let dst = f.dest.wait();
    assert_eq!(dst.status, Some(1), "{}", dst.stderr);
    assert!(
        dst.stderr.contains("refused, the VM did not run here"),
        "{}",
        dst.stderr
    );
    assert_eq!(
        phases(&dst.events),
        vec!["started", "failed"],
        "no memory was taken"
    );
    assert_eq!(
        phases(&read(&f.source.events)),
        vec!["started", "refused", "failed"],
        "no round was sent"
    );
    still_running(&f.source);
    migrates_after_all(&f.bench, f.source, "unix:/tmp/vpsci-migrate-refused2.sock");
}

#[test]
fn a_destination_that_dies_mid_copy_leaves_the_source_running() {
    let endpoint = "tcp:127.0.0.1:47012";
    let f = failed_migration(
        endpoint,
        &[],
        &[("VPSCI_MIGRATE_FAULT", "die-after-pages:1")],
        &[],
    );
    assert!(f.err.contains("the VM runs on here"), "{}", f.err);
    let dst = f.dest.wait();
    assert_eq!(dst.status, Some(101), "the fault killed it: {}", dst.stderr);
    still_running(&f.source);
    let log = read(&f.source.events);
    assert_eq!(
        phases(&log).last().map(String::as_str),
        Some("failed"),
        "{log}"
    );
    migrates_after_all(&f.bench, f.source, endpoint);
}

#[test]
fn a_destination_that_hangs_times_out_and_the_source_runs_on() {
    let f = failed_migration(
        "unix:/tmp/vpsci-migrate-hang.sock",
        &[],
        &[("VPSCI_MIGRATE_FAULT", "hang-after-accept")],
        &[],
    );
    assert!(
        f.err.contains("made no progress") && f.err.contains("the VM runs on here"),
        "{}",
        f.err
    );
    still_running(&f.source);
    assert_eq!(
        phases(&read(&f.source.events)).last().map(String::as_str),
        Some("failed")
    );
}

#[test]
fn a_corrupted_frame_is_refused_and_the_source_runs_on() {
    let f = failed_migration(
        "unix:/tmp/vpsci-migrate-corrupt.sock",
        &[],
        &[],
        &[("VPSCI_MIGRATE_FAULT", "corrupt-pages")],
    );
    let dst = f.dest.wait();
    assert_eq!(dst.status, Some(1), "{}", dst.stderr);
    assert!(dst.stderr.contains("corrupted"), "{}", dst.stderr);
    assert!(!dst.events.contains("\"running\""), "{}", dst.events);
    still_running(&f.source);
}

/// The source after an unconfirmed migration: its API says paused, its log ends with
/// `committed` and `unconfirmed`, and its guest neither prints nor calls PSCI.
fn held_paused(source: &Vmm) {
    let now = info(&source.socket);
    assert_eq!(now.run_state, RunState::Paused, "{now:?}");
    let log = read(&source.events);
    let phases = phases(&log);
    assert_eq!(
        phases[phases.len().saturating_sub(2)..],
        ["committed", "unconfirmed"],
        "{log}"
    );
    let console = read(&source.console).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        info(&source.socket).psci_calls,
        now.psci_calls,
        "a paused guest made calls"
    );
    assert_eq!(
        read(&source.console).len(),
        console,
        "a paused guest printed"
    );
}

/// The storming guest's CPU_ON count in the API.
fn cpu_ons(source: &Vmm) -> u64 {
    info(&source.socket)
        .psci_calls
        .get("CPU_ON")
        .copied()
        .unwrap_or(0)
}

/// A Go the destination cannot take (the source runs with `fault`): the destination
/// exits 1 with one line and an empty console, the source answers `confirmed: false`
/// and holds the VM paused; resumed by the operator, the guest storms on with its
/// counter intact and powers off with status 0. `detail` names what the destination's
/// line must say about the Go it got.
fn go_lost_on_the_way(fault: &str, endpoint: &str, detail: &str) {
    let bench = Bench::new();
    let image = bench.file("storm.bin", &storm_guest(2).bytes());
    let source = bench.source(&image, 2, &[], &[("VPSCI_MIGRATE_FAULT", fault)]);
    source.keeps_printing();
    let dest = bench.destination("dest", endpoint, &[], &[]);
    let out = migrate(&source.socket, endpoint, &[]);
    let done = unconfirmed(&out);
    let err = text(&out.stderr);
    assert!(
        err.contains("unconfirmed") && err.contains("resume") && err.lines().count() == 1,
        "{err}"
    );
    // The destination never held a whole, checked Go: it exits 1, the guest never ran.
    let dst = dest.wait();
    assert_eq!(dst.status, Some(1), "{}", dst.stderr);
    assert!(
        dst.stderr.contains("the VM did not run here")
            && dst.stderr.contains(detail)
            && dst.stderr.lines().count() == 1,
        "{}",
        dst.stderr
    );
    assert_eq!(dst.console, "", "the guest ran on the destination");
    assert_eq!(
        phases(&dst.events).last().map(String::as_str),
        Some("failed"),
        "{}",
        dst.events
    );
    held_paused(&source);
    println!(
        "{fault}: {} rounds, paused {:.1} ms until the wait ended",
        done.rounds.len(),
        done.downtime_ms
    );
    // Nothing was lost: the operator resumes the VM here and the storm goes on.
    let ons = cpu_ons(&source);
    let out = ctl(&source.socket, &["resume"]);
    assert_eq!(
        text(&out.stdout),
        "resume: done, the VM is running\n",
        "{}",
        text(&out.stderr)
    );
    source.keeps_printing();
    until("the guest storms CPU_ON again", || cpu_ons(&source) > ons);
    let src = source.power_off();
    assert!(!src.console.contains("MISMATCH"), "{}", src.console);
    assert!(!src.stderr.contains("migrated to"), "{}", src.stderr);
}

#[test]
fn a_go_frame_cut_on_the_way_runs_the_vm_nowhere_and_the_paused_source_resumes_it() {
    go_lost_on_the_way("cut-go", "tcp:127.0.0.1:47013", "the source did not commit");
}

#[test]
fn a_corrupted_go_frame_runs_the_vm_nowhere_and_the_paused_source_resumes_it() {
    go_lost_on_the_way(
        "corrupt-go",
        "unix:/tmp/vpsci-migrate-corrupt-go.sock",
        "Go frame is corrupted",
    );
}

#[test]
fn a_lost_confirmation_leaves_the_vm_running_on_the_destination_and_paused_on_the_source() {
    let endpoint = "unix:/tmp/vpsci-migrate-withheld.sock";
    let bench = Bench::new();
    let image = bench.file("storm.bin", &storm_guest(2).bytes());
    let source = bench.source(&image, 2, &[], &[]);
    source.keeps_printing();
    let dest = bench.destination(
        "dest",
        endpoint,
        &[],
        &[("VPSCI_MIGRATE_FAULT", "withhold-running")],
    );
    unconfirmed(&migrate(&source.socket, endpoint, &[]));
    // The destination runs the guest: its counter goes on, checked on every round.
    let dest = dest.serving();
    assert_eq!(info(&dest.socket).run_state, RunState::Running);
    dest.keeps_printing();
    dest.keeps_printing();
    let stderr = read(&dest.stderr);
    assert!(
        stderr.contains("could not be sent to the source"),
        "{stderr}"
    );
    held_paused(&source);
    // The destination kept the connection open: the source's wait timed out.
    let log = read(&source.events);
    assert!(log.contains("did not confirm within 10 s"), "{log}");
    // The operator discards the source's paused copy; the destination runs on.
    let src = source.power_off();
    dest.keeps_printing();
    let dst = dest.power_off();
    assert!(!dst.console.contains("MISMATCH"), "{}", dst.console);
    assert!(!src.console.contains("MISMATCH"), "{}", src.console);
}

#[test]
fn a_restored_vm_serves_the_control_api() {
    let bench = Bench::new();
    let image = bench.file("steady.bin", &steady_guest().bytes());
    let snap = bench.path("snap");
    let snap_s = snap.to_string_lossy().into_owned();
    // Snapshot through the API of a running VM, then power the source off.
    let source = bench.source(&image, 4, &[], &[]);
    source.keeps_printing();
    let out = ctl(&source.socket, &["snapshot", &snap_s, "--timeout", "300"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    source.power_off();

    let restored = Vmm::start(
        bench.dir.path(),
        "restored",
        &["restore", &snap_s, "--timeout", "600"],
        &[],
    )
    .serving();
    let s = restored.socket.clone();
    let now = info(&s);
    assert_eq!(now.run_state, RunState::Running, "{now:?}");
    assert_eq!(now.vcpus.len(), 4);
    assert_eq!(now.vcpus[2].power_state, Some(PowerState::Off), "{now:?}");
    let out = ctl(&s, &["pause"]);
    assert_eq!(
        text(&out.stdout),
        "pause: done, the VM is paused\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(info(&s).run_state, RunState::Paused);
    let calls = info(&s).psci_calls.get("PSCI_VERSION").copied();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        info(&s).psci_calls.get("PSCI_VERSION").copied(),
        calls,
        "a paused guest made calls"
    );
    let out = ctl(&s, &["resume"]);
    assert_eq!(
        text(&out.stdout),
        "resume: done, the VM is running\n",
        "{}",
        text(&out.stderr)
    );
    restored.keeps_printing();
    let out = ctl(&s, &["poweroff"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ended = restored.wait();
    assert_eq!(ended.status, Some(0), "{}", ended.stderr);
    let operator: Vec<String> = ended
        .events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "operator")
        .filter_map(|v| v["action"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(operator, vec!["pause", "resume", "poweroff"]);
}

/// Migration time, rounds and downtime of a guest idle and rewriting memory at
/// increasing rates (measurement; printed, not asserted). Guest RAM from
/// `VPSCI_MIGRATE_MEMORY` (default 512M), runs per case from `VPSCI_MIGRATE_RUNS`
/// (default 3). Run: `cargo test --release -p vpsci --target
/// aarch64-unknown-linux-musl --test nested_migration -- --ignored --nocapture measure`.
#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn measure_migration_time_rounds_and_downtime() {
    let memory = std::env::var("VPSCI_MIGRATE_MEMORY").unwrap_or_else(|_| "512M".to_owned());
    let runs: usize = std::env::var("VPSCI_MIGRATE_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let mut idle = Asm::new(ENTRY, Conduit::Hvc);
    let top = idle.here();
    idle.print(".");
    delay(&mut idle, 5_000_000);
    idle.b_back(top);
    // (name, guest, pages per sweep): the writers sweep 8192 pages (32 MiB), pausing
    // between pages; their write rate is measured from their dots before each migration.
    let cases = [
        ("idle", idle, 0u64),
        ("writer, pause 1000000", writer_guest(8192, 1_000_000), 8192),
        ("writer, pause 100000", writer_guest(8192, 100_000), 8192),
        ("writer, pause 10000", writer_guest(8192, 10_000), 8192),
        ("writer, no pause", writer_guest(8192, 0), 8192),
    ];
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    for (name, guest, sweep) in &cases {
        let (mut totals, mut downtimes, mut rounds, mut rates) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let bench = Bench::new();
            let image = bench.file("guest.bin", &guest.bytes());
            let source = Vmm::start(
                bench.dir.path(),
                "source",
                &[
                    "run",
                    "--image",
                    &image,
                    "--memory",
                    &memory,
                    "--timeout",
                    "600",
                ],
                &[],
            )
            .serving();
            source.keeps_printing();
            // The writer's rate: its dots (one per sweep) over 2 s.
            let before = read(&source.console).len();
            std::thread::sleep(Duration::from_secs(2));
            let written = (read(&source.console).len() - before) as f64 * *sweep as f64 / 2.0;
            let endpoint = format!("unix:/tmp/vpsci-migrate-measure-{run}.sock");
            let dest = bench.destination("dest", &endpoint, &[], &[]);
            let done = migrated(&migrate(&source.socket, &endpoint, &[]));
            assert_eq!(source.wait().status, Some(0));
            let dest = dest.serving();
            dest.keeps_printing();
            let dst = dest.power_off();
            assert!(!dst.console.contains("MISMATCH"));
            let dirty: Vec<f64> = done.rounds.iter().map(|r| r.dirty_pages_per_s).collect();
            println!(
                "{memory} {name} run {run}: writes {written:.0} pages/s, total {:.0} ms, \
                 downtime {:.0} ms, {} rounds, {:.1} MiB sent, dirty pages/s by round \
                 {dirty:.0?}",
                done.total_ms,
                done.downtime_ms,
                done.rounds.len(),
                done.bytes_sent as f64 / f64::from(1 << 20)
            );
            totals.push(done.total_ms);
            downtimes.push(done.downtime_ms);
            rounds.push(done.rounds.len() as f64);
            rates.push(written);
        }
        let (t, tmin, tmax) = stats(&mut totals);
        let (d, dmin, dmax) = stats(&mut downtimes);
        let (r, rmin, rmax) = stats(&mut rounds);
        let (w, _, _) = stats(&mut rates);
        println!(
            "migration {memory} {name}: total median {t:.0} ms ({tmin:.0}-{tmax:.0}); downtime \
             median {d:.0} ms ({dmin:.0}-{dmax:.0}); rounds median {r} ({rmin}-{rmax}); guest \
             writes median {w:.0} pages/s; {runs} runs"
        );
    }
}
