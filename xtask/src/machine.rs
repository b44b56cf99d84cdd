//! The arm64 KVM machine that jobs run on: a nested VM under QEMU, or the host itself.
//!
//! A [`Session`] is one boot: files to place in the machine and jobs to run one after
//! another, each with its own time limit. In the nested case the files and a busybox `/init`
//! go into an initramfs; `/init` brackets every job's console output with marker lines that
//! carry a per-boot random tag, the job's index and its exit status, then powers off. The
//! host parses the console stream, hands each job's lines to an [`Observer`] as they arrive,
//! and kills QEMU when a deadline passes (boot, each job, shutdown), so no run waits forever.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::initramfs::Initramfs;
use crate::paths;
use crate::process::wait_bounded;
use crate::provision::{Host, NestedAssets};

/// Size of the nested machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// vCPUs of the nested machine (the KVM host).
    pub smp: u32,
    /// RAM of the nested machine in MiB.
    pub memory_mib: u64,
    /// How long the nested machine may take from QEMU start to running `/init`.
    pub boot_timeout: Duration,
}

impl Default for MachineConfig {
    /// 4 vCPUs, 2 GiB, 120 s to boot (`VPSCI_NESTED_BOOT_TIMEOUT` seconds overrides).
    fn default() -> Self {
        let boot_secs = std::env::var("VPSCI_NESTED_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(120);
        MachineConfig {
            smp: 4,
            memory_mib: 2048,
            boot_timeout: Duration::from_secs(boot_secs),
        }
    }
}

/// Sizes the machine's RAM for the cargo runner and `cargo xtask nested` (whose `--memory`
/// wins): `2048`, `2048M`, `8G`, as [`parse_memory`] reads them.
pub const MEMORY_ENV: &str = "VPSCI_NESTED_MEMORY";

impl MachineConfig {
    /// [`MachineConfig::default`] with its RAM from [`MEMORY_ENV`] when that is set; a value
    /// that is not a size is an error, never ignored.
    pub fn from_env() -> Result<MachineConfig> {
        let memory = std::env::var_os(MEMORY_ENV).map(|v| v.to_string_lossy().into_owned());
        MachineConfig::default().with_memory(memory.as_deref())
    }

    /// The same machine with `memory` (a [`MEMORY_ENV`] value) as its RAM, if given.
    fn with_memory(mut self, memory: Option<&str>) -> Result<MachineConfig> {
        if let Some(text) = memory {
            self.memory_mib = parse_memory(text).with_context(|| format!("{MEMORY_ENV}={text}"))?;
        }
        Ok(self)
    }
}

/// `2048`, `2048M`, `2G`, `512MiB` -> MiB (128 MiB to 64 GiB).
pub fn parse_memory(text: &str) -> Result<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (digits, scale) = match lower.strip_suffix('g') {
        Some(digits) => (digits, 1024),
        None => (lower.strip_suffix('m').unwrap_or(lower), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|m| (128..=65536).contains(m))
        .with_context(|| format!("expected a size of 128M..64G (e.g. 2048M, 4G), got {text:?}"))
}

/// A host file to place in the machine.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Where it is on the host.
    pub host: PathBuf,
    /// Absolute path inside the machine.
    pub guest: String,
}

/// One command to run in the machine.
#[derive(Debug, Clone)]
pub struct Job {
    /// Program and arguments; the program is looked up on the machine's PATH.
    pub argv: Vec<String>,
    /// Working directory inside the machine (created if missing).
    pub cwd: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Killed after this long.
    pub timeout: Duration,
}

/// Everything for one boot.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Files copied in before any job runs.
    pub files: Vec<GuestFile>,
    /// Directories put in front of PATH.
    pub path: Vec<String>,
    /// Jobs, run in order.
    pub jobs: Vec<Job>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Ran to completion with this status (128 + N for signal N).
    Exited(i32),
    /// Killed at its time limit.
    TimedOut,
    /// The machine died or hung while the job was running.
    Lost(String),
    /// Never started, for the reason given.
    NotRun(String),
}

/// A job's outcome and duration.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time between its start and end markers.
    pub elapsed: Duration,
}

impl JobResult {
    /// Exit status 0.
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Exited(0)
    }

    /// "exit status 1", "timed out after 600 s", ...
    pub fn describe(&self, timeout: Duration) -> String {
        match &self.outcome {
            Outcome::Exited(0) => "ok".to_string(),
            Outcome::Exited(code) if *code > 128 => {
                format!("exit status {code} (signal {})", code - 128)
            }
            Outcome::Exited(code) => format!("exit status {code}"),
            Outcome::TimedOut => format!("timed out after {} s and was killed", timeout.as_secs()),
            Outcome::Lost(why) | Outcome::NotRun(why) => why.clone(),
        }
    }
}

/// Receives the jobs' console output as it arrives.
pub trait Observer {
    /// Job `job` is starting.
    fn started(&mut self, _job: usize) {}
    /// A line of output (without the line ending).
    fn line(&mut self, job: usize, line: &str);
    /// Job `job` ended.
    fn finished(&mut self, _job: usize, _result: &JobResult) {}
}

/// Runs `session` on `host`; host-side failures (cannot start QEMU) are errors, everything
/// that happens in the machine is in the per-job results.
pub fn run(
    host: &Host,
    config: &MachineConfig,
    session: &Session,
    observer: &mut dyn Observer,
) -> Result<Vec<JobResult>> {
    match host {
        Host::Native => native::run(session, observer),
        Host::Nested(assets) => nested_run(assets, config, session, observer),
    }
}

/// Quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

const BASE_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// How much longer than a job's own limit the host waits before declaring the machine hung.
const HOST_GRACE: Duration = Duration::from_secs(30);

fn nested_run(
    assets: &NestedAssets,
    config: &MachineConfig,
    session: &Session,
    observer: &mut dyn Observer,
) -> Result<Vec<JobResult>> {
    let tag = format!("VPSCI-{:x}{:x}", std::process::id(), nanos());
    let work = TempDir::new(paths::nested_dir().join(format!("run-{}", std::process::id())))?;
    let initrd = work.path.join("initrd.cpio");
    write_initramfs(&initrd, assets, session, &tag)?;

    let mut qemu = Command::new(&assets.qemu);
    qemu.args(["-machine", "virt,virtualization=on,gic-version=3"])
        .args(["-cpu", "max,pauth-impdef=on"])
        .args(["-accel", &format!("tcg,thread={}", tcg_threading())])
        .args(["-smp", &config.smp.to_string()])
        .args(["-m", &config.memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyAMA0 panic=-1 quiet rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = qemu.spawn().with_context(|| {
        format!(
            "could not start {} (run `cargo xtask setup`)",
            assets.qemu.display()
        )
    })?;
    let events = console_events(&mut child);
    let results = follow_console(&events, config, session, &tag, observer);
    let _ = child.kill();
    let _ = wait_bounded(&mut child, Duration::from_secs(10));
    Ok(results)
}

/// `thread=single` measured as fast as `multi` on 2 host cores and is deterministic;
/// `VPSCI_TCG_THREAD=multi` overrides.
fn tcg_threading() -> String {
    match std::env::var("VPSCI_TCG_THREAD") {
        Ok(mode) if mode == "multi" || mode == "single" => mode,
        _ => "single".to_string(),
    }
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn write_initramfs(path: &Path, assets: &NestedAssets, session: &Session, tag: &str) -> Result<()> {
    let out = std::io::BufWriter::new(
        fs::File::create(path).with_context(|| format!("could not create {}", path.display()))?,
    );
    let mut cpio = Initramfs::new(out);
    for dir in [
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/root",
        "/usr/bin",
        "/usr/sbin",
        "/sbin",
    ] {
        cpio.dir(dir)?;
    }
    cpio.char_device("/dev/console", 5, 1)?;
    // The root file system is already in RAM; no tmpfs goes over /tmp, which may hold the
    // files themselves (they keep their host paths).
    cpio.copy("/bin/busybox", &assets.busybox)?;
    for file in &session.files {
        cpio.copy(&file.guest, &file.host)?;
    }
    cpio.file("/init", 0o755, init_script(session, tag).as_bytes())?;
    cpio.finish()?;
    Ok(())
}

/// The machine's `/init`. The root file system (tmpfs) gets its size limit at mount time,
/// when the initramfs still occupies RAM: by default half of what is left, so a session's
/// own files would leave the tests almost no room (a 634 MiB initramfs on 2 GiB left 21 MiB).
/// Remounting with 80% of RAM (a limit, not an allocation) gives the tests room for their
/// initrds and disk images.
fn init_script(session: &Session, tag: &str) -> String {
    let mut path: Vec<&str> = session.path.iter().map(String::as_str).collect();
    path.push(BASE_PATH);
    let mut script = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -o remount,size=80% /\n\
         /bin/busybox --install -s\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         mount -t sysfs sys /sys\n\
         export PATH={path} HOME=/root TERM=dumb\n\
         echo '{tag}:up'\n",
        path = shell_quote(&path.join(":")),
    );
    for (index, job) in session.jobs.iter().enumerate() {
        let mut command = String::from("exec env");
        for (key, value) in &job.env {
            command.push(' ');
            command.push_str(&shell_quote(&format!("{key}={value}")));
        }
        command.push_str(&format!(
            " timeout -s KILL {}",
            job.timeout.as_secs().max(1)
        ));
        for arg in &job.argv {
            command.push(' ');
            command.push_str(&shell_quote(arg));
        }
        let cwd = shell_quote(&job.cwd);
        // `timeout` kills only the job's first process: whatever it started lives on and
        // would write into the next job's output (a timed-out conformance job's log dump
        // did). The script is PID 1, so `kill -KILL -1` ends every other process.
        script.push_str(&format!(
            "echo '{tag}:begin:{index}'\n\
             mkdir -p {cwd}; (cd {cwd} && {command}) </dev/null\n\
             rc=$?; kill -KILL -1 2>/dev/null\n\
             echo \"{tag}:end:{index}:$rc\"\n"
        ));
    }
    script.push_str(&format!("echo '{tag}:done'\npoweroff -f\n"));
    script
}

/// What the console reader threads report.
enum ConsoleEvent {
    /// A console line (QEMU stdout).
    Line(String),
    /// A line QEMU printed on stderr.
    QemuError(String),
    /// QEMU closed its stdout: it exited.
    Closed,
}

fn console_events(child: &mut Child) -> Receiver<ConsoleEvent> {
    let (tx, rx) = mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(ConsoleEvent::QemuError(line)).is_err() {
                    break;
                }
            }
        });
    }
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.by_ref().read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        while matches!(buf.last(), Some(b'\n' | b'\r')) {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).replace('\r', "");
                        if tx.send(ConsoleEvent::Line(line)).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx.send(ConsoleEvent::Closed);
        });
    }
    rx
}

/// Where the machine is in its script.
enum Phase {
    Booting,
    Idle { next: usize },
    Running { job: usize, since: Instant },
    ShuttingDown,
}

fn follow_console(
    events: &Receiver<ConsoleEvent>,
    config: &MachineConfig,
    session: &Session,
    tag: &str,
    observer: &mut dyn Observer,
) -> Vec<JobResult> {
    let jobs = session.jobs.len();
    let mut results: Vec<Option<JobResult>> = vec![None; jobs];
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut qemu_errors = Vec::new();
    let started = Instant::now();
    let mut phase = Phase::Booting;
    let mut idle_since = started;
    let prefix = format!("{tag}:");
    let failure: Option<String> = loop {
        let deadline = match &phase {
            Phase::Booting => started + config.boot_timeout,
            Phase::Idle { .. } | Phase::ShuttingDown => idle_since + HOST_GRACE,
            Phase::Running { job, since } => *since + session.jobs[*job].timeout + HOST_GRACE,
        };
        let now = Instant::now();
        let event = if now >= deadline {
            Err(RecvTimeoutError::Timeout)
        } else {
            events.recv_timeout(deadline - now)
        };
        let line = match event {
            Ok(ConsoleEvent::Line(line)) => line,
            Ok(ConsoleEvent::QemuError(line)) => {
                qemu_errors.push(line);
                continue;
            }
            Ok(ConsoleEvent::Closed) | Err(RecvTimeoutError::Disconnected) => {
                break match phase {
                    Phase::ShuttingDown => None,
                    _ => Some(
                        "the nested VM stopped unexpectedly (QEMU exited; its messages and \
                         the console are above)"
                            .to_string(),
                    ),
                };
            }
            Err(RecvTimeoutError::Timeout) => {
                break match &phase {
                    Phase::Booting => Some(format!(
                        "the nested VM did not boot within {} s and was killed (a slow or \
                         busy host: raise VPSCI_NESTED_BOOT_TIMEOUT; a bad kernel: delete \
                         {} to download it again)",
                        config.boot_timeout.as_secs(),
                        crate::provision::assets_dir().display()
                    )),
                    Phase::Running { .. } => Some(format!(
                        "the nested VM stopped responding (no end of the job {} s past its \
                         time limit) and was killed",
                        HOST_GRACE.as_secs()
                    )),
                    Phase::Idle { .. } => Some(format!(
                        "the nested VM did not start the next job within {} s and was killed",
                        HOST_GRACE.as_secs()
                    )),
                    // Everything ran; a slow power-off is not a test failure.
                    Phase::ShuttingDown => None,
                };
            }
        };
        let (output, marker) = match line.find(&prefix) {
            Some(at) => (&line[..at], Some(&line[at + prefix.len()..])),
            None => (line.as_str(), None),
        };
        if let Phase::Running { job, .. } = phase {
            if marker.is_none() || !output.is_empty() {
                observer.line(job, output);
            }
        } else if !output.is_empty() {
            tail.push_back(output.to_string());
            if tail.len() > 40 {
                tail.pop_front();
            }
        }
        let Some(marker) = marker else { continue };
        let fields: Vec<&str> = marker.trim().split(':').collect();
        match (fields.as_slice(), &phase) {
            (["up"], Phase::Booting) => {
                phase = next_phase(0, jobs);
                idle_since = Instant::now();
            }
            (["begin", index], Phase::Idle { next }) if index.parse() == Ok(*next) => {
                observer.started(*next);
                phase = Phase::Running {
                    job: *next,
                    since: Instant::now(),
                };
            }
            (["end", index, status], Phase::Running { job, since })
                if index.parse() == Ok(*job) =>
            {
                let elapsed = since.elapsed();
                let timeout = session.jobs[*job].timeout;
                let outcome = match status.parse::<i32>() {
                    // busybox `timeout -s KILL` leaves the job killed by SIGKILL.
                    Ok(137) if elapsed + Duration::from_secs(1) >= timeout => Outcome::TimedOut,
                    Ok(code) => Outcome::Exited(code),
                    Err(_) => Outcome::Lost(format!("unreadable exit status `{status}`")),
                };
                let result = JobResult { outcome, elapsed };
                observer.finished(*job, &result);
                let job = *job;
                results[job] = Some(result);
                phase = next_phase(job + 1, jobs);
                idle_since = Instant::now();
            }
            (["done"], Phase::Idle { .. } | Phase::ShuttingDown) => {
                phase = Phase::ShuttingDown;
                idle_since = Instant::now();
            }
            _ => {}
        }
    };
    if let Some(failure) = &failure {
        let mut context = String::new();
        if !qemu_errors.is_empty() {
            context.push_str(&format!("QEMU said:\n{}\n", qemu_errors.join("\n")));
        }
        if !tail.is_empty() {
            let lines: Vec<String> = tail.into_iter().collect();
            context.push_str(&format!("last console lines:\n{}\n", lines.join("\n")));
        }
        if !context.is_empty() {
            eprintln!("nested: {context}");
        }
        let running = match phase {
            Phase::Running { job, since } => Some((job, since)),
            _ => None,
        };
        for (index, slot) in results.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let result = match running {
                Some((job, since)) if job == index => JobResult {
                    outcome: Outcome::Lost(failure.clone()),
                    elapsed: since.elapsed(),
                },
                _ => JobResult {
                    outcome: Outcome::NotRun(format!("not run: {failure}")),
                    elapsed: Duration::ZERO,
                },
            };
            observer.finished(index, &result);
            *slot = Some(result);
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or(JobResult {
                outcome: Outcome::NotRun("not run: the VM skipped it".to_string()),
                elapsed: Duration::ZERO,
            })
        })
        .collect()
}

fn next_phase(next: usize, jobs: usize) -> Phase {
    if next < jobs {
        Phase::Idle { next }
    } else {
        Phase::ShuttingDown
    }
}

/// A directory removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(path: PathBuf) -> Result<TempDir> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .with_context(|| format!("could not create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

mod native;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_accept_common_units() {
        assert_eq!(parse_memory("2048").unwrap(), 2048);
        assert_eq!(parse_memory("512M").unwrap(), 512);
        assert_eq!(parse_memory("512MiB").unwrap(), 512);
        assert_eq!(parse_memory("4G").unwrap(), 4096);
        assert!(parse_memory("12Q").is_err());
        assert!(parse_memory("64").is_err(), "below 128 MiB");
    }

    #[test]
    fn the_memory_setting_sizes_the_machine_and_a_bad_one_is_an_error() {
        let default = MachineConfig::default();
        assert_eq!(default.clone().with_memory(None).unwrap().memory_mib, 2048);
        assert_eq!(
            default.clone().with_memory(Some("8G")).unwrap().memory_mib,
            8192
        );
        let err = default.with_memory(Some("lots")).unwrap_err();
        assert!(
            format!("{err:#}").contains("VPSCI_NESTED_MEMORY=lots"),
            "{err:#}"
        );
    }

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("a b"), "'a b'");
    }

    #[test]
    fn init_script_brackets_every_job_and_powers_off() {
        let session = Session {
            files: vec![],
            path: vec!["/opt/x".into()],
            jobs: vec![Job {
                argv: vec!["echo".into(), "hi there".into()],
                cwd: "/work".into(),
                env: vec![("A".into(), "1".into())],
                timeout: Duration::from_secs(5),
            }],
        };
        let script = init_script(&session, "TAG");
        assert!(script.contains("export PATH='/opt/x:/bin:/sbin:/usr/bin:/usr/sbin'"));
        assert!(script.contains("echo 'TAG:begin:0'"));
        assert!(script.contains("exec env 'A=1' timeout -s KILL 5 'echo' 'hi there'"));
        assert!(script.contains("rc=$?; kill -KILL -1 2>/dev/null\necho \"TAG:end:0:$rc\""));
        assert!(script.trim_end().ends_with("poweroff -f"));
    }

    struct Collect(Vec<(usize, String)>);
    impl Observer for Collect {
        fn line(&mut self, job: usize, line: &str) {
            self.0.push((job, line.to_string()));
        }
    }

    fn replay(lines: &[&str], jobs: usize) -> (Vec<JobResult>, Vec<(usize, String)>) {
        let (tx, rx) = mpsc::channel();
        for line in lines {
            tx.send(ConsoleEvent::Line(line.to_string())).unwrap();
        }
        tx.send(ConsoleEvent::Closed).unwrap();
        let session = Session {
            jobs: (0..jobs)
                .map(|_| Job {
                    argv: vec!["x".into()],
                    cwd: "/".into(),
                    env: vec![],
                    timeout: Duration::from_secs(60),
                })
                .collect(),
            ..Session::default()
        };
        let mut seen = Collect(Vec::new());
        let results = follow_console(&rx, &MachineConfig::default(), &session, "T", &mut seen);
        (results, seen.0)
    }

    #[test]
    fn console_lines_are_attributed_to_jobs_and_statuses_parsed() {
        let (results, lines) = replay(
            &[
                "[ 1.0] kernel noise",
                "T:up",
                "T:begin:0",
                "hello",
                "no newlineT:end:0:0",
                "T:begin:1",
                "T:end:1:3",
                "T:done",
            ],
            2,
        );
        assert_eq!(results[0].outcome, Outcome::Exited(0));
        assert_eq!(results[1].outcome, Outcome::Exited(3));
        assert_eq!(
            lines,
            vec![(0, "hello".to_string()), (0, "no newline".to_string())]
        );
    }

    #[test]
    fn a_vm_that_dies_mid_job_loses_that_job_and_skips_the_rest() {
        let (results, _) = replay(&["T:up", "T:begin:0", "Kernel panic"], 2);
        assert!(matches!(results[0].outcome, Outcome::Lost(_)));
        assert!(matches!(results[1].outcome, Outcome::NotRun(_)));
        assert!(!results[0].passed());
    }

    #[test]
    fn a_vm_that_never_boots_runs_nothing() {
        let (results, _) = replay(&["garbage"], 1);
        assert!(matches!(results[0].outcome, Outcome::NotRun(_)));
    }
}
