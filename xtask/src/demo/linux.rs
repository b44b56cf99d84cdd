//! `cargo xtask demo --linux`: a real Linux guest's power lifecycle on vpsci.
//!
//! Boots the newer guest kernel from setup (Linux 6.17, which ends a hibernation with
//! SYSTEM_OFF2; `crate::hibernate_kernel`) with a busybox initramfs and a 512 MiB virtio
//! swap disk, twice, in the nested machine (natively on an arm64 host with `/dev/kvm`):
//!
//! 1. `vpsci run --cpus 4 --disk swap.img --events ...`: the guest suspends to RAM twice,
//!    each time woken by a 2 s PL031 RTC alarm (Linux takes the secondaries off with
//!    CPU_OFF, calls SYSTEM_SUSPEND, vpsci parks it until the alarm's interrupt, resumes it
//!    at its entry and Linux brings the CPUs back with CPU_ON), then hibernates to the disk
//!    (`echo disk > /sys/power/state`) and powers off with SYSTEM_OFF2;
//! 2. the same command again: the guest's initramfs points Linux at the disk, which
//!    restores the hibernated system: same boot id, its tmpfs marker intact.
//!
//! The guest narrates on the console (streamed); afterwards each run's event log comes back,
//! is saved to `target/demo-linux/events-{hibernate,resume}.jsonl`, summarised (per-vCPU
//! power-state timeline, calls, wake-ups and their sources, system events) and drawn with
//! `vpsci timeline` as `timeline-{hibernate,resume}.svg` next to it. The exit status is
//! non-zero unless both runs exited 0, the first shows a suspend woken by the RTC and a
//! hibernate system event, and the second resumed the same system.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::summary;
use crate::conformance::path_entry;
use crate::hibernate_kernel;
use crate::initramfs::Initramfs;
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Session};
use crate::nested::build_vpsci;
use crate::paths;
use crate::provision;

/// vCPUs of the demo VM.
const CPUS: u32 = 4;
/// Suspend-to-RAM cycles before the hibernation.
const SUSPENDS: u32 = 2;
/// `vpsci run --timeout` for each run.
const VPSCI_TIMEOUT: Duration = Duration::from_secs(600);
/// The two runs, in order: (name, what it shows).
const RUNS: [(&str, &str); 2] = [
    ("hibernate", "suspend to RAM, RTC alarm wake-up, hibernate"),
    ("resume", "resume from the hibernation image"),
];
const EVENT_PREFIX: &str = "DEMO-EVENT ";
const EXIT_PREFIX: &str = "DEMO-VPSCI-EXIT ";
const RUN_PREFIX: &str = "DEMO-RUN ";

/// The guest's `/init`: resume if the disk holds an image, else suspend, wake, hibernate.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
insmod /virtio_mmio.ko && insmod /virtio_blk.ko
# Restores the hibernated system if the disk holds its image (does not return then).
cat /sys/block/vda/dev > /sys/power/resume
id=$(cat /proc/sys/kernel/random/boot_id)
echo "guest: Linux $(uname -r) booted afresh: CPUs $(cat /sys/devices/system/cpu/online) online, boot id $id"
echo deep > /sys/power/mem_sleep
ok=0
attempt=0
while [ $ok -lt {SUSPENDS} ] && [ $attempt -lt 10 ]; do
  attempt=$((attempt+1))
  echo 0 > /sys/class/rtc/rtc0/wakealarm
  count=$(cat /sys/power/wakeup_count)
  echo +2 > /sys/class/rtc/rtc0/wakealarm
  echo "guest: suspend to RAM (echo mem > /sys/power/state), RTC alarm in 2 s"
  if echo $count > /sys/power/wakeup_count && echo mem > /sys/power/state; then
    ok=$((ok+1))
    echo "guest: woken by the alarm, CPUs $(cat /sys/devices/system/cpu/online) online again"
  else
    echo "guest: the alarm came before the suspend finished; trying again"
  fi
done
echo "guest: $(cat /sys/power/suspend_stats/success) suspend(s) completed"
mkswap /dev/vda > /dev/null && swapon /dev/vda
echo "marker-$id" > /tmp/marker
echo "guest: hibernating to the virtio disk (echo disk > /sys/power/state)"
echo disk > /sys/power/state
echo "guest: RESUMED from hibernation: boot id $(cat /proc/sys/kernel/random/boot_id), tmpfs $(cat /tmp/marker), CPUs $(cat /sys/devices/system/cpu/online) online"
poweroff -f
"#
    )
}

/// The initramfs: the harness's static busybox, `/init` and the kernel's virtio modules.
fn build_initramfs(path: &Path, modules: &Path) -> Result<()> {
    let busybox = provision::assets_dir().join("busybox");
    let mut cpio = Initramfs::new(Vec::new());
    for dir in ["/bin", "/proc", "/sys", "/dev", "/tmp"] {
        cpio.dir(dir)?;
    }
    cpio.copy("/bin/busybox", &busybox)?;
    cpio.file("/init", 0o755, init_script().as_bytes())?;
    for module in provision::module_files(modules) {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .context("module without a name")?
            .to_string();
        cpio.copy(&format!("/{name}"), &module)?;
    }
    let bytes = cpio.finish()?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The job: make the swap disk, run vpsci twice, print each run's status and event log.
fn job_script(kernel: &str, initrd: &str) -> String {
    let q = machine::shell_quote;
    let mut script = String::from("rm -f swap.img; truncate -s 512M swap.img || exit 1\n");
    for (i, (name, _)) in RUNS.iter().enumerate() {
        let events = format!("events-{name}.jsonl");
        script.push_str(&format!(
            "echo {RUN_PREFIX}{i}; rm -f {events}\n\
             vpsci run --kernel {kernel} --initrd {initrd} --cpus {CPUS} --memory 512M \
             --cmdline 'console=ttyAMA0 panic=-1 quiet' --disk swap.img --events {events} \
             --timeout {secs}\n\
             echo {EXIT_PREFIX}{i} $?\n\
             [ -f {events} ] && sed 's/^/{EVENT_PREFIX}{i} /' {events}\n",
            kernel = q(kernel),
            initrd = q(initrd),
            secs = VPSCI_TIMEOUT.as_secs(),
        ));
    }
    script
}

/// Streams the guest's narration, keeps each run's event log and exit status aside.
#[derive(Default)]
struct LinuxConsole {
    events: [Vec<String>; 2],
    exits: [Option<i32>; 2],
    console: [Vec<String>; 2],
    run: usize,
}

impl Observer for LinuxConsole {
    fn line(&mut self, _job: usize, line: &str) {
        let line = line.trim_end_matches('\r');
        let run_of = |rest: &str| -> Option<(usize, String)> {
            let (run, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let run: usize = run.trim().parse().ok()?;
            (run < RUNS.len()).then(|| (run, tail.to_string()))
        };
        if let Some((run, event)) = line.strip_prefix(EVENT_PREFIX).and_then(run_of) {
            self.events[run].push(event);
            return;
        }
        if let Some((run, code)) = line.strip_prefix(EXIT_PREFIX).and_then(run_of) {
            self.exits[run] = code.trim().parse().ok();
            return;
        }
        if let Some((run, _)) = line.strip_prefix(RUN_PREFIX).and_then(run_of) {
            self.run = run;
            let (name, what) = RUNS[run];
            println!(
                "demo: run {} ({name}): `vpsci run --kernel Image --initrd initrd.cpio --cpus {CPUS} \
                 --disk swap.img --events events-{name}.jsonl`: {what}",
                run + 1
            );
            return;
        }
        self.console[self.run].push(line.to_string());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "  | {line}");
        let _ = out.flush();
    }
}

/// What went wrong in the runs, judged from the consoles and the event logs.
fn problems(console: &LinuxConsole, summaries: &[summary::Summary]) -> Vec<String> {
    let mut problems = Vec::new();
    for (run, (name, _)) in RUNS.iter().enumerate() {
        if console.exits[run] != Some(0) {
            problems.push(format!(
                "run {} ({name}): vpsci exit status {:?}, expected 0",
                run + 1,
                console.exits[run]
            ));
        }
        if console.events[run].is_empty() {
            problems.push(format!("run {} ({name}): no event log came back", run + 1));
        }
    }
    let text = |run: usize| console.console[run].join("\n");
    let boot_id = text(0)
        .split("boot id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string);
    if let Some(first) = summaries.first() {
        let rtc_wakes = first
            .wakeups
            .iter()
            .filter(|w| w.sources.iter().any(|s| s == "pl031"))
            .count();
        if rtc_wakes == 0 {
            problems.push("run 1: no wake-up from suspension by the RTC alarm".to_string());
        }
        if !first.system_events.iter().any(|e| e.event == "hibernate") {
            problems.push("run 1: no hibernate system event (SYSTEM_OFF2)".to_string());
        }
        problems.extend(first.problems().into_iter().map(|p| format!("run 1: {p}")));
    }
    match (&boot_id, summaries.get(1)) {
        (Some(id), Some(second)) => {
            let resumed = text(1);
            if !resumed.contains(&format!("RESUMED from hibernation: boot id {id}")) {
                problems.push(format!(
                    "run 2 did not resume the hibernated system (boot id {id})"
                ));
            }
            if !resumed.contains(&format!("tmpfs marker-{id}")) {
                problems.push("run 2: the tmpfs marker did not survive".to_string());
            }
            problems.extend(second.problems().into_iter().map(|p| format!("run 2: {p}")));
        }
        _ => problems.push("run 1 never printed its boot id".to_string()),
    }
    problems
}

/// Draws `events` with the host's `vpsci timeline` as `svg`.
fn draw_timeline(events: &Path, svg: &Path) -> Result<()> {
    let mut cmd = crate::cargo::cargo();
    cmd.args(["run", "--quiet", "--package", "vpsci", "--", "timeline"])
        .arg(events)
        .arg("--output")
        .arg(svg);
    crate::process::run_checked(
        &mut cmd,
        Duration::from_secs(600),
        "`vpsci timeline` builds and runs on the host",
    )?;
    Ok(())
}

/// Entry point of `cargo xtask demo --linux`.
pub fn run() -> Result<ExitCode> {
    let started = Instant::now();
    let host = provision::prepare()?;
    let Some((kernel, modules)) = hibernate_kernel::cached() else {
        bail!(
            "the Linux demo needs a guest kernel that hibernates with SYSTEM_OFF2 (Linux 6.13+); \
             `cargo xtask setup` downloads Linux 6.17 from Debian trixie-backports into {}, \
             and it is not there (see setup's warning)",
            hibernate_kernel::dir().display()
        );
    };
    let dir = paths::target_dir().join("demo-linux");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initrd = dir.join("initrd.cpio");
    build_initramfs(&initrd, &modules)?;
    let vpsci = build_vpsci()?;
    for (name, _) in RUNS {
        for file in [
            format!("events-{name}.jsonl"),
            format!("timeline-{name}.svg"),
        ] {
            // Files left by an earlier run must not pass for this run's.
            let _ = std::fs::remove_file(dir.join(file));
        }
    }
    let as_guest = |p: &Path| p.to_string_lossy().into_owned();
    let session = Session {
        files: [&kernel, &initrd, &vpsci]
            .into_iter()
            .map(|p| GuestFile {
                host: p.clone(),
                guest: as_guest(p),
            })
            .collect(),
        path: vec![path_entry(&vpsci)],
        jobs: vec![Job {
            argv: vec![
                "sh".into(),
                "-c".into(),
                job_script(&as_guest(&kernel), &as_guest(&initrd)),
            ],
            cwd: as_guest(&dir),
            env: Vec::new(),
            timeout: 2 * VPSCI_TIMEOUT + Duration::from_secs(60),
        }],
    };
    println!(
        "demo --linux: Linux {} on vpsci ({CPUS} vCPUs) on {}; guest console below",
        std::fs::read_to_string(hibernate_kernel::dir().join("kernel-version"))
            .unwrap_or_default()
            .trim(),
        host.describe()
    );
    let mut console = LinuxConsole::default();
    let results = machine::run(&host, &MachineConfig::default(), &session, &mut console)?;
    let result = results
        .first()
        .cloned()
        .context("the machine returned no result")?;
    report(&console, &result, &dir, started)
}

fn report(
    console: &LinuxConsole,
    result: &JobResult,
    dir: &Path,
    started: Instant,
) -> Result<ExitCode> {
    let mut summaries = Vec::new();
    let mut pictures: Vec<(PathBuf, Result<()>)> = Vec::new();
    for (run, (name, what)) in RUNS.iter().enumerate() {
        let lines = &console.events[run];
        let summary = summary::summarise(lines.iter().map(String::as_str));
        println!();
        println!(
            "demo: run {} ({what}): event log summary ({} lines, {})",
            run + 1,
            lines.len(),
            dir.join(format!("events-{name}.jsonl")).display()
        );
        print!("{summary}");
        if !lines.is_empty() {
            let events = dir.join(format!("events-{name}.jsonl"));
            let mut text = lines.join("\n");
            text.push('\n');
            std::fs::write(&events, text)
                .with_context(|| format!("writing {}", events.display()))?;
            let svg = dir.join(format!("timeline-{name}.svg"));
            let drawn = draw_timeline(&events, &svg);
            if drawn.is_ok() {
                println!("power-state timeline picture: {}", svg.display());
            }
            pictures.push((svg, drawn));
        }
        summaries.push(summary);
    }
    let mut problems = problems(console, &summaries);
    if !result.passed() {
        problems.push(format!(
            "the demo job ended badly: {}",
            result.describe(2 * VPSCI_TIMEOUT + Duration::from_secs(60))
        ));
    }
    for (svg, drawn) in pictures {
        if let Err(e) = drawn {
            problems.push(format!("drawing {} failed: {e:#}", svg.display()));
        }
    }
    let took = started.elapsed().as_secs_f64();
    if problems.is_empty() {
        println!("demo --linux: OK in {took:.1} s (builds and machine boot included)");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &problems {
            println!("demo --linux: FAILED: {problem}");
        }
        println!("demo --linux: failed after {took:.1} s");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(console: &mut LinuxConsole, lines: &[&str]) {
        for line in lines {
            console.line(0, line);
        }
    }

    const OFF2: &str = r#"{"t_ns":9,"kind":"system_event","vcpu":0,"event":"hibernate"}"#;
    const WAKE: &str = r#"{"t_ns":5,"kind":"wakeup","vcpu":0,"sources":[{"device":"pl031","spi":2,"intid":34,"raised_ns_ago":1}]}"#;
    const OFF: &str = r#"{"t_ns":9,"kind":"system_event","vcpu":0,"event":"off"}"#;

    fn both_runs(resumed_id: &str) -> LinuxConsole {
        let mut console = LinuxConsole::default();
        let resumed = format!(
            "guest: RESUMED from hibernation: boot id {resumed_id}, tmpfs marker-{resumed_id}, CPUs 0-3 online"
        );
        feed(
            &mut console,
            &[
                "DEMO-RUN 0",
                "guest: Linux 6.17 booted afresh: CPUs 0-3 online, boot id abc-1",
                &format!("DEMO-EVENT 0 {WAKE}"),
                &format!("DEMO-EVENT 0 {OFF2}"),
                "DEMO-VPSCI-EXIT 0 0",
                "DEMO-RUN 1",
                &resumed,
                &format!("DEMO-EVENT 1 {OFF}"),
                "DEMO-VPSCI-EXIT 1 0",
            ],
        );
        console
    }

    fn judge(console: &LinuxConsole) -> Vec<String> {
        let summaries: Vec<summary::Summary> = console
            .events
            .iter()
            .map(|e| summary::summarise(e.iter().map(String::as_str)))
            .collect();
        problems(console, &summaries)
    }

    #[test]
    fn the_console_sorts_events_and_statuses_by_run() {
        let console = both_runs("abc-1");
        assert_eq!(console.events[0].len(), 2);
        assert_eq!(console.events[1].len(), 1);
        assert_eq!(console.exits, [Some(0), Some(0)]);
        assert_eq!(console.console[0].len(), 1);
        assert_eq!(console.console[1].len(), 1);
    }

    #[test]
    fn a_resume_of_the_same_system_after_an_rtc_wake_and_a_hibernate_passes() {
        assert_eq!(judge(&both_runs("abc-1")), Vec::<String>::new());
    }

    #[test]
    fn a_fresh_boot_instead_of_a_resume_or_a_failed_run_fails() {
        let problems = judge(&both_runs("other-id")).join("\n");
        assert!(problems.contains("did not resume"), "{problems}");
        let mut console = both_runs("abc-1");
        console.exits[1] = Some(1);
        assert!(judge(&console).join("\n").contains("run 2 (resume)"));
        let mut console = both_runs("abc-1");
        console.events[0].retain(|e| !e.contains("wakeup"));
        assert!(judge(&console).join("\n").contains("RTC alarm"));
    }

    #[test]
    fn the_job_runs_vpsci_twice_on_one_disk_and_prints_both_logs() {
        let script = job_script("/k/Image", "/d/initrd.cpio");
        assert_eq!(script.matches("vpsci run --kernel '/k/Image'").count(), 2);
        assert_eq!(script.matches("--disk swap.img").count(), 2);
        assert!(script.contains("--events events-hibernate.jsonl"));
        assert!(script.contains("--events events-resume.jsonl"));
        assert!(script.contains("sed 's/^/DEMO-EVENT 1 /' events-resume.jsonl"));
        assert!(script.starts_with("rm -f swap.img; truncate -s 512M swap.img"));
    }
}
