//! The control API on real arm64 KVM (nested harness): `vpsci run --api-socket` with a
//! bare-metal guest, driven by `vpsci ctl` as an operator would (a separate process per
//! command): info, pause, resume, wrong-state refusals, power off, and the event log's
//! operator lines. With `VPSCI_STORM_GUEST` (the `power_storm` guest's ELF, which
//! `cargo xtask test` builds and passes in), the API's latency is measured while every
//! vCPU storms CPU_ON/CPU_OFF (reported, not asserted).
#![cfg(target_arch = "aarch64")]

mod nested_common;
mod process_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use std::time::{Duration, Instant};
use vpsci::api::types::PowerState;

use nested_common::*;
use process_common::{ctl, info, percentile, text, vpsci};
use vpsci::api::client::Client;
use vpsci::api::types::{RunState, VmInfo};
use vpsci_firmware::Conduit;

/// Waits (bounded) until `cond` holds for the VM's info.
fn until(socket: &Path, what: &str, cond: impl Fn(&VmInfo) -> bool) -> VmInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = info(socket);
        if cond(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Running {
    child: Child,
    socket: PathBuf,
    events: PathBuf,
    console: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a `vpsci run` ended.
struct Ended {
    status: Option<i32>,
    console: String,
    stderr: String,
    events: String,
}

impl Running {
    /// Waits for `vpsci run` to end and reads what it left (before the temporary
    /// directory goes).
    fn wait(mut self) -> Ended {
        let status = self.child.wait().unwrap_or_else(|e| panic!("{e}"));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        Ended {
            status: status.code(),
            console: read(&self.console),
            stderr: read(&self.stderr),
            events: read(&self.events),
        }
    }
}

/// Starts `vpsci run` on `image` with an API socket and an event log, and waits for the
/// socket to answer.
fn start(image: &Path, cpus: u32, extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let socket = dir.path().join("api.sock");
    let events = dir.path().join("events.jsonl");
    let console = dir.path().join("console.txt");
    let stderr = dir.path().join("stderr.txt");
    // Files, not pipes: a full pipe would block the guest's UART writes.
    let file = |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("{e}"));
    let child = vpsci()
        .args(["run", "--image"])
        .arg(image)
        .args([
            "--cpus",
            &cpus.to_string(),
            "--timeout",
            "300",
            "--api-socket",
        ])
        .arg(&socket)
        .arg("--events")
        .arg(&events)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(file(&console))
        .stderr(file(&stderr))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start vpsci run: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while Client::new(&socket, Some(Duration::from_secs(5)))
        .info()
        .is_err()
    {
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    Running {
        child,
        socket,
        events,
        console,
        stderr,
        _dir: dir,
    }
}

/// Counts x5 down from `n` (a pause between calls, so the event log stays small).
fn delay(a: &mut Asm, n: u64) {
    a.mov(5, n);
    let top = a.here();
    a.word(0xF100_04A5).bne_back(top); // subs x5, x5, #1; b.ne top
}

/// A guest whose boot vCPU starts vCPU 1, then both call PSCI_VERSION forever (with a
/// short delay between calls): the engine's call counter shows whether the guest runs.
fn busy_guest() -> Asm {
    let secondary = ENTRY + 0x800;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(CPU_ON, [mpidr(1), secondary, 0]);
    let top = a.here();
    a.smccc(PSCI_VERSION, [0; 3]);
    delay(&mut a, 200_000);
    a.b_back(top);
    while a.here() < secondary {
        a.spin();
    }
    let top = a.here();
    a.smccc(PSCI_VERSION, [0; 3]);
    delay(&mut a, 200_000);
    a.b_back(top);
    a
}

fn version_calls(i: &VmInfo) -> u64 {
    i.psci_calls.get("PSCI_VERSION").copied().unwrap_or(0)
}

#[test]
fn ctl_pauses_resumes_and_powers_off_a_running_guest_and_the_log_records_the_operator() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = dir.path().join("busy.bin");
    std::fs::write(&image, busy_guest().bytes()).unwrap_or_else(|e| panic!("{e}"));
    let vm = start(&image, 2, &[]);
    let socket_path = vm.socket.clone();
    let s = socket_path.as_path();

    let starting = info(s);
    assert!(
        matches!(starting.run_state, RunState::Starting | RunState::Running),
        "{starting:?}"
    );
    let running = until(s, "both vCPUs are on and calling", |i| {
        version_calls(i) > 0
            && i.vcpus
                .iter()
                .all(|v| v.power_state == Some(PowerState::On))
    });
    assert_eq!(running.run_state, RunState::Running);
    assert_eq!(running.firmware.psci_version, "1.3");
    assert_eq!(running.psci_calls.get("CPU_ON"), Some(&1));

    let out = ctl(s, &["pause"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "pause: done, the VM is paused\n");
    let held = info(s);
    std::thread::sleep(Duration::from_millis(500));
    let later = info(s);
    assert_eq!(later.run_state, RunState::Paused);
    assert_eq!(
        version_calls(&later),
        version_calls(&held),
        "the guest made calls while paused"
    );
    assert!(
        later
            .vcpus
            .iter()
            .all(|v| v.power_state == Some(PowerState::On)),
        "a pause changed power states: {later:?}"
    );

    let again = ctl(s, &["pause"]);
    assert_eq!(again.status.code(), Some(1));
    let line = text(&again.stderr);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.starts_with("vpsci ctl: wrong_state (409): "), "{line}");

    let out = ctl(s, &["resume"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let paused_at = version_calls(&later);
    until(s, "the guest calls again", |i| version_calls(i) > paused_at);
    let again = ctl(s, &["resume"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again.stderr));
    let wake = ctl(s, &["wake"]);
    assert_eq!(wake.status.code(), Some(1));
    assert!(text(&wake.stderr).contains("wrong_state"));

    let out = ctl(s, &["poweroff", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let done: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done["action"], "poweroff");

    let socket = vm.socket.clone();
    let Ended {
        status,
        stderr,
        events: log,
        ..
    } = vm.wait();
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stderr.contains("the operator powered the VM off"),
        "{stderr}"
    );
    assert!(!socket.exists(), "the socket outlived vpsci");
    let gone = ctl(&socket, &["info"]);
    assert_eq!(gone.status.code(), Some(3), "{}", text(&gone.stderr));

    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let operator: Vec<&str> = lines
        .iter()
        .filter(|v| v["kind"] == "operator")
        .filter_map(|v| v["action"].as_str())
        .collect();
    assert_eq!(operator, ["pause", "resume", "poweroff"]);
    let last = lines.last().unwrap_or_else(|| panic!("empty log"));
    assert_eq!(last["kind"], "vm_end");
    assert_eq!(last["exit_status"], 0);
}

/// `GET /vm` latencies (sorted) of 50 requests while an idle guest (vCPU 0 in
/// SYSTEM_SUSPEND, the others off) is up; then powers it off through the API.
fn idle_latency(cpus: u32) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let image = dir.path().join("idle.bin");
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(SYSTEM_SUSPEND, [ENTRY, 0, 0]).spin();
    std::fs::write(&image, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    let vm = start(&image, cpus, &[]);
    until(&vm.socket, "the guest is suspended", |i| {
        i.run_state == RunState::Suspended
    });
    let client = Client::new(&vm.socket, Some(Duration::from_secs(30)));
    let mut latencies: Vec<Duration> = (0..50)
        .map(|_| {
            let sent = Instant::now();
            let answer = client.info();
            let took = sent.elapsed();
            assert!(answer.is_ok(), "{answer:?}");
            std::thread::sleep(Duration::from_millis(20));
            took
        })
        .collect();
    let off = client.act(vpsci::api::types::Action::Poweroff);
    assert!(off.is_ok(), "{off:?}");
    let ended = vm.wait();
    assert_eq!(ended.status, Some(0), "{}", ended.stderr);
    latencies.sort();
    latencies
}

#[test]
fn the_api_answers_while_the_guest_storms_cpu_on_and_cpu_off() {
    let Some(elf) = std::env::var_os("VPSCI_STORM_GUEST") else {
        println!(
            "SKIPPED: VPSCI_STORM_GUEST is not set (cargo xtask test sets it to the \
             power_storm guest)"
        );
        return;
    };
    const CPUS: u32 = 8;
    const STORM_SECONDS: u32 = 10;
    let baseline = idle_latency(CPUS);
    // The storm's length goes into the guest's VPSCICF1 parameter block (iterations).
    let mut image = std::fs::read(&elf).unwrap_or_else(|e| panic!("{e}"));
    let at = image
        .windows(8)
        .position(|w| w == b"VPSCICF1")
        .unwrap_or_else(|| panic!("no parameter block in the storm guest"));
    // Block layout (guests/rt/src/config.rs): magic, psci_version, conduit (1: HVC),
    // iterations, action, flags.
    image[at + 12..at + 16].copy_from_slice(&1u32.to_le_bytes());
    image[at + 16..at + 20].copy_from_slice(&STORM_SECONDS.to_le_bytes());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("power_storm.elf");
    std::fs::write(&path, &image).unwrap_or_else(|e| panic!("{e}"));
    let vm = start(&path, CPUS, &[]);
    let client = Client::new(&vm.socket, Some(Duration::from_secs(30)));
    until(&vm.socket, "the VM runs", |i| {
        i.run_state != RunState::Starting
    });
    let mut latencies = Vec::new();
    let mut failed = 0usize;
    let mut most_on = 0usize;
    loop {
        let sent = Instant::now();
        match client.info() {
            Ok(i) => {
                latencies.push(sent.elapsed());
                let on = i
                    .vcpus
                    .iter()
                    .filter(|v| v.power_state != Some(PowerState::Off))
                    .count();
                most_on = most_on.max(on);
                if i.run_state == RunState::Stopping {
                    break;
                }
            }
            // The VM ended and the socket went away.
            Err(_) if latencies.len() > 10 => break,
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ended {
        status,
        console,
        stderr,
        events,
    } = vm.wait();
    let calls = events
        .lines()
        .filter(|l| l.contains("\"psci_call\""))
        .count();
    latencies.sort();
    println!(
        "API latency (GET /vm through vpsci::api::client, one request per connection) during \
         a {STORM_SECONDS} s power storm at {CPUS} vCPUs: {} requests, p50 {:.3} ms, p99 {:.3} ms, \
         max {:.3} ms",
        latencies.len(),
        percentile(&latencies, 50).as_secs_f64() * 1e3,
        percentile(&latencies, 99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "baseline, same requests while the guest sits in SYSTEM_SUSPEND ({CPUS} vCPUs, the \
         others off): {} requests, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        baseline.len(),
        percentile(&baseline, 50).as_secs_f64() * 1e3,
        percentile(&baseline, 99).as_secs_f64() * 1e3,
        baseline.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "at most {most_on} vCPUs seen not off by one request; {calls} PSCI calls in the event log"
    );
    for line in console.lines().filter(|l| l.contains("VG-INFO storm")) {
        println!("{line}");
    }
    assert_eq!(status, Some(0), "{stderr}\n{console}");
    assert!(!console.contains("FAIL"), "{console}");
    assert!(console.contains("VG-DONE"), "{console}");
    assert_eq!(failed, 0, "requests failed while the VM ran");
    assert!(
        most_on > 1,
        "no request saw more than one vCPU on:\n{console}"
    );
}
