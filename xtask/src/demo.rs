//! `cargo xtask demo [--cpus N]`: vpsci at work on real arm64 KVM. (`cargo xtask demo
//! --linux` shows a Linux guest's power lifecycle instead: [`linux`].)
//!
//! Builds the guest workspace, turns the `demo` guest (`guests/scenarios/src/bin/demo.rs`)
//! into a flat image and boots it with `vpsci run --cpus 8 --events ...` on arm64 KVM: in
//! the nested machine of [`crate::machine`] on x86_64, natively on an arm64 host with
//! `/dev/kvm`. The guest's narration streams to the terminal as it happens; afterwards the
//! event log comes back (printed on the console with a prefix, as the conformance suite
//! does) and [`summary`] turns it into per-vCPU timelines, call counts, the race outcome
//! and the system event, and `vpsci timeline` draws it (`target/demo/timeline.svg`). The exit
//! status is non-zero if vpsci or the guest failed or the picture could not be drawn.

mod linux;
mod summary;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::conformance::{build_guests, flat_image, path_entry};
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Session};
use crate::nested::build_vpsci;
use crate::paths;
use crate::provision;

/// vCPUs the demo VM gets unless `--cpus` says otherwise.
const DEFAULT_CPUS: u32 = 8;
/// `vpsci run --timeout`: ends a guest that hangs.
const VPSCI_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of the event-log lines the job prints after vpsci exits.
const EVENT_PREFIX: &str = "DEMO-EVENT ";
/// Prefix of the line carrying vpsci's exit status.
const EXIT_PREFIX: &str = "DEMO-VPSCI-EXIT ";
/// The guest's verdict line (see the guest's module docs).
const GUEST_PASS: &str = "VG-CHECK demo PASS";

/// Which demo to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Demo {
    /// The bare-metal demo guest on this many vCPUs.
    Guest { cpus: u32 },
    /// A Linux guest's lifecycle (`--linux`).
    Linux,
}

fn parse(args: &[String]) -> Result<Demo> {
    match args {
        [] => Ok(Demo::Guest { cpus: DEFAULT_CPUS }),
        [flag] if flag == "--linux" => Ok(Demo::Linux),
        [flag, n] if flag == "--cpus" => n
            .parse()
            .ok()
            .filter(|n| (3..=64).contains(n))
            .map(|cpus| Demo::Guest { cpus })
            .with_context(|| format!("--cpus {n}: the demo needs 3..64 vCPUs")),
        _ => bail!("usage: cargo xtask demo [--cpus N] | cargo xtask demo --linux"),
    }
}

/// The job: run the guest, then print vpsci's status and its event log, prefixed.
fn job_script(image: &str, events: &str, cpus: u32) -> String {
    let q = machine::shell_quote;
    format!(
        "rm -f {ev}; vpsci run --image {img} --cpus {cpus} --events {ev} --timeout {secs}; \
         rc=$?; echo {EXIT_PREFIX}$rc; [ -f {ev} ] && sed 's/^/{EVENT_PREFIX}/' {ev}; exit $rc",
        img = q(image),
        ev = q(events),
        secs = VPSCI_TIMEOUT.as_secs(),
    )
}

/// Streams the console, keeps the event-log lines and the markers aside.
#[derive(Default)]
struct DemoConsole {
    events: Vec<String>,
    vpsci_exit: Option<i32>,
    guest_passed: bool,
    guest_verdict: Option<String>,
    vpsci_message: Option<String>,
}

impl Observer for DemoConsole {
    fn line(&mut self, _job: usize, line: &str) {
        let line = line.trim_end_matches('\r');
        if let Some(event) = line.strip_prefix(EVENT_PREFIX) {
            self.events.push(event.to_string());
            return;
        }
        if let Some(code) = line.strip_prefix(EXIT_PREFIX) {
            self.vpsci_exit = code.trim().parse().ok();
            return;
        }
        if let Some(at) = line.find("VG-CHECK demo ") {
            self.guest_passed = line[at..].starts_with(GUEST_PASS);
            self.guest_verdict = Some(line[at..].to_string());
        }
        if line.starts_with("vpsci: ") {
            self.vpsci_message = Some(line.to_string());
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "  | {line}");
        let _ = out.flush();
    }
}

/// Builds the demo guest's flat image under `<target>/demo`; returns its path.
fn build_image(dir: &Path) -> Result<PathBuf> {
    let elves = build_guests()?;
    let elf_path = elves
        .get("demo")
        .context("the guest workspace built no `demo` program")?;
    let image = flat_image(elf_path)?;
    let path = dir.join("demo.bin");
    std::fs::write(&path, image).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What vpsci's exit status means (crates/vmm/src/run.rs).
fn describe_exit(code: Option<i32>) -> String {
    match code {
        Some(0) => "0 (the guest powered off)".to_string(),
        Some(1) => "1 (the VM failed or timed out)".to_string(),
        Some(2) => "2 (invalid command line)".to_string(),
        Some(3) => "3 (the guest asked for a reset)".to_string(),
        Some(other) => other.to_string(),
        None => "unknown (vpsci did not finish)".to_string(),
    }
}

/// Entry point of `cargo xtask demo`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let cpus = match parse(args)? {
        Demo::Guest { cpus } => cpus,
        Demo::Linux => return linux::run(),
    };
    let started = Instant::now();
    let host = provision::prepare()?;
    let dir = paths::target_dir().join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = build_image(&dir)?;
    let vpsci = build_vpsci()?;
    let vpsci_dir = path_entry(&vpsci);
    let events_path = dir.join("events.jsonl");
    // A log left by an earlier run must not pass for this run's.
    let _ = std::fs::remove_file(&events_path);
    let image_guest = image.to_string_lossy().into_owned();
    let events_guest = events_path.to_string_lossy().into_owned();
    let session = Session {
        files: vec![
            GuestFile {
                host: image.clone(),
                guest: image_guest.clone(),
            },
            GuestFile {
                guest: vpsci.to_string_lossy().into_owned(),
                host: vpsci.clone(),
            },
        ],
        path: vec![vpsci_dir],
        jobs: vec![Job {
            argv: vec![
                "sh".into(),
                "-c".into(),
                job_script(&image_guest, &events_guest, cpus),
            ],
            cwd: dir.to_string_lossy().into_owned(),
            env: Vec::new(),
            timeout: VPSCI_TIMEOUT + Duration::from_secs(60),
        }],
    };
    println!(
        "demo: booting the demo guest with `vpsci run --cpus {cpus}` on {} \
         (guest console below; its times are guest time since boot)",
        host.describe()
    );
    let mut console = DemoConsole::default();
    let results = machine::run(&host, &MachineConfig::default(), &session, &mut console)?;
    let result = results
        .first()
        .cloned()
        .context("the machine returned no result")?;
    report(&console, &result, &events_path, started)
}

/// Draws the saved event log with the host's `vpsci timeline` (next to it, `timeline.svg`).
fn draw_timeline(events_path: &Path) -> Result<PathBuf> {
    let svg = events_path.with_file_name("timeline.svg");
    let mut cmd = crate::cargo::cargo();
    cmd.args(["run", "--quiet", "--package", "vpsci", "--", "timeline"])
        .arg(events_path)
        .arg("--output")
        .arg(&svg);
    crate::process::run_checked(
        &mut cmd,
        Duration::from_secs(600),
        "`vpsci timeline` builds and runs on the host",
    )?;
    Ok(svg)
}

/// Prints the summary and decides the exit status.
fn report(
    console: &DemoConsole,
    result: &JobResult,
    events_path: &Path,
    started: Instant,
) -> Result<ExitCode> {
    let summary = summary::summarise(console.events.iter().map(String::as_str));
    if !console.events.is_empty() {
        let mut text = console.events.join("\n");
        text.push('\n');
        std::fs::write(events_path, text)
            .with_context(|| format!("writing {}", events_path.display()))?;
    }
    println!();
    println!(
        "demo: event log summary ({} lines, saved to {})",
        console.events.len(),
        events_path.display()
    );
    print!("{summary}");
    let timeline = if console.events.is_empty() {
        None
    } else {
        Some(draw_timeline(events_path))
    };
    if let Some(Ok(svg)) = &timeline {
        println!("power-state timeline picture: {}", svg.display());
    }
    println!("vpsci exit status: {}", describe_exit(console.vpsci_exit));
    if let Some(message) = &console.vpsci_message {
        println!("  {message}");
    }
    let mut problems = Vec::new();
    if !result.passed() {
        problems.push(format!(
            "the demo job ended badly: {}",
            result.describe(VPSCI_TIMEOUT + Duration::from_secs(60))
        ));
    }
    if console.vpsci_exit != Some(0) {
        problems.push(format!(
            "vpsci exit status {}",
            describe_exit(console.vpsci_exit)
        ));
    }
    if !console.guest_passed {
        problems.push(match &console.guest_verdict {
            Some(verdict) => format!("the guest reported `{verdict}`"),
            None => "the guest never reported its verdict".to_string(),
        });
    }
    if console.events.is_empty() {
        problems.push("no event log came back".to_string());
    } else {
        problems.extend(summary.problems());
    }
    if let Some(Err(e)) = timeline {
        problems.push(format!("drawing the timeline failed: {e:#}"));
    }
    let took = started.elapsed().as_secs_f64();
    if problems.is_empty() {
        println!("demo: OK in {took:.1} s (builds and machine boot included)");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &problems {
            println!("demo: FAILED: {problem}");
        }
        println!("demo: failed after {took:.1} s");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Outcome;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn eight_vcpus_by_default_and_cpus_is_bounded() {
        assert_eq!(parse(&[]).unwrap(), Demo::Guest { cpus: 8 });
        assert_eq!(
            parse(&strings(&["--cpus", "16"])).unwrap(),
            Demo::Guest { cpus: 16 }
        );
        assert!(parse(&strings(&["--cpus", "2"])).is_err());
        assert!(parse(&strings(&["--cpus", "65"])).is_err());
        assert!(parse(&strings(&["--bogus"])).is_err());
        assert_eq!(parse(&strings(&["--linux"])).unwrap(), Demo::Linux);
        assert!(parse(&strings(&["--linux", "--cpus", "4"])).is_err());
    }

    #[test]
    fn console_sets_aside_events_and_status_and_reads_the_guest_verdict() {
        let mut console = DemoConsole::default();
        for line in [
            "[   0.1 ms] demo: PSCI 1.3 over HVC, 8 CPUs\r",
            "VG-CHECK demo PASS",
            "vpsci: the guest powered off (SYSTEM_OFF)",
            "DEMO-VPSCI-EXIT 0",
            r#"DEMO-EVENT {"t_ns":1,"kind":"system_event","vcpu":0,"event":"off"}"#,
        ] {
            console.line(0, line);
        }
        assert!(console.guest_passed);
        assert_eq!(console.vpsci_exit, Some(0));
        assert_eq!(console.events.len(), 1);
        assert!(console.vpsci_message.is_some());
        console.line(0, "VG-CHECK demo FAIL 4 racers got SUCCESS");
        assert!(!console.guest_passed);
    }

    #[test]
    fn a_failed_guest_or_vpsci_makes_the_demo_fail() {
        let dir = std::env::temp_dir().join(format!("xtask-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = dir.join("events.jsonl");
        let ok = JobResult {
            outcome: Outcome::Exited(0),
            elapsed: Duration::ZERO,
        };
        let mut console = DemoConsole {
            events: vec![r#"{"t_ns":1,"kind":"system_event","vcpu":0,"event":"off"}"#.into()],
            vpsci_exit: Some(0),
            guest_passed: true,
            ..DemoConsole::default()
        };
        assert_eq!(
            report(&console, &ok, &events, Instant::now()).unwrap(),
            ExitCode::SUCCESS
        );
        assert!(std::fs::read_to_string(&events)
            .unwrap()
            .contains("system_event"));
        console.guest_passed = false;
        assert_eq!(
            report(&console, &ok, &events, Instant::now()).unwrap(),
            ExitCode::FAILURE
        );
        console.guest_passed = true;
        console.vpsci_exit = Some(1);
        assert_eq!(
            report(&console, &ok, &events, Instant::now()).unwrap(),
            ExitCode::FAILURE
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_job_prints_status_and_prefixed_events_after_vpsci_exits() {
        let script = job_script("/d/demo.bin", "/d/events.jsonl", 8);
        assert!(script.contains("vpsci run --image '/d/demo.bin' --cpus 8 --events"));
        assert!(script.contains("--timeout 60"));
        assert!(script.contains("echo DEMO-VPSCI-EXIT $rc"));
        assert!(script.contains("sed 's/^/DEMO-EVENT /'"));
        assert!(script.ends_with("exit $rc"));
    }
}
