//! Running the `vpsci` binary itself (`vpsci run`, `vpsci restore`,
//! `vpsci ctl`) from a nested test, with its console lines timed as they
//! arrive, and reading the JSON event logs it writes.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::Value;

/// Runs `vpsci ARGS` to the end.
pub fn vpsci(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"))
}

/// Bytes as text (lossy).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A path as an argument.
pub fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A finished `vpsci` process whose standard output was read as it came.
pub struct Timed {
    /// Exit status (None: killed by a signal).
    pub status: Option<i32>,
    /// Standard output, whole.
    pub stdout: String,
    /// Standard error, whole.
    pub stderr: String,
    /// When each standard output line was complete (text without its line end).
    pub lines: Vec<(Instant, String)>,
    /// When the process was started and when it ended.
    pub started: Instant,
    pub ended: Instant,
    /// Its peak resident set in KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
}

impl Timed {
    /// When the first line containing `needle` arrived.
    pub fn arrival_of(&self, needle: &str) -> Option<Instant> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(at, _)| *at)
    }
}

/// Runs `vpsci ARGS` to the end, timing its output lines.
// The child is reaped by `wait4` (wait_with_peak_rss), which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub fn vpsci_timed(args: &[&str]) -> Timed {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    let mut stderr_pipe = child
        .stderr
        .take()
        .unwrap_or_else(|| panic!("no stderr pipe"));
    let stderr_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut all);
        all
    });
    let stdout_pipe = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("no stdout pipe"));
    let mut reader = BufReader::new(stdout_pipe);
    let mut stdout = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                stdout.extend_from_slice(&line);
                let l = text(&line);
                lines.push((Instant::now(), l.trim_end_matches(['\r', '\n']).to_owned()));
            }
        }
    }
    let (status, max_rss_kib) = wait_with_peak_rss(&child);
    let ended = Instant::now();
    let stderr = stderr_reader.join().unwrap_or_default();
    Timed {
        status,
        stdout: text(&stdout),
        stderr: text(&stderr),
        lines,
        started,
        ended,
        max_rss_kib,
    }
}

/// Waits for `child` to end: its exit code (None: killed by a signal) and
/// its peak resident set in KiB. `wait4` reaps it (std's `Child::wait`
/// does not report resource usage), so it must not be waited for again.
fn wait_with_peak_rss(child: &std::process::Child) -> (Option<i32>, u64) {
    let pid = libc::pid_t::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; both pointers are to locals that
        // outlive the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::Interrupted,
            "vpsci did not end: {e}"
        );
    }
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, u64::try_from(usage.ru_maxrss).unwrap_or(0))
}

/// The milliseconds vpsci reports after `key` on its standard error:
/// `pause`, `state` and `write` in "snapshot of N MiB (D MiB stored) written
/// to DIR (pause P ms, state S ms, write W ms)", ` in ` in "restored ... in R
/// ms (PSCI ...)".
pub fn reported_ms(stderr: &str, key: &str) -> Option<f64> {
    stderr
        .split(key)
        .nth(1)
        .and_then(|rest| rest.trim_start().split(' ').next())
        .and_then(|n| n.parse().ok())
}

/// The event log at `path`, one JSON object per line (empty if there is none).
pub fn event_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The event log ends with the `vm_end` line of a VM that powered off (exit status 0).
pub fn assert_log_ends_powered_off(log: &[Value]) {
    let end = log.last().unwrap_or_else(|| panic!("empty event log"));
    assert_eq!(str_of(end, "kind"), "vm_end", "{end}");
    assert_eq!(end["exit_status"], 0, "{end}");
}

/// A string field of an event (empty when absent).
pub fn str_of<'a>(e: &'a Value, key: &str) -> &'a str {
    e[key].as_str().unwrap_or("")
}

/// The result (x0) of every `function` call in an event log, in order.
pub fn results(log: &[Value], function: &str) -> Vec<i64> {
    log.iter()
        .filter(|v| v["kind"] == "psci_call" && v["function"] == function)
        .filter_map(|v| v["result"]["x0"].as_i64())
        .collect()
}

/// (from, to) of every power-state transition of `vcpu` in an event log.
pub fn transitions(log: &[Value], vcpu: u64) -> Vec<(String, String)> {
    log.iter()
        .filter(|e| e["kind"] == "power_state" && e["vcpu"] == vcpu)
        .map(|e| (str_of(e, "from").to_owned(), str_of(e, "to").to_owned()))
        .collect()
}

/// A power-state transition as [`transitions`] lists them.
pub fn transition(from: &str, to: &str) -> (String, String) {
    (from.to_owned(), to.to_owned())
}

/// A VM run by `vpsci run ... --snapshot-dir` until it stopped after its
/// snapshot, then resumed by `vpsci restore` in a new process.
pub struct RoundTrip {
    /// Holds the snapshot and the logs.
    pub dir: tempfile::TempDir,
    /// The snapshot directory.
    pub snap: PathBuf,
    /// The source process (`vpsci run`).
    pub source: Timed,
    /// Its event log.
    pub before: Vec<Value>,
    /// The restoring process (`vpsci restore`).
    pub restored: Timed,
    /// Its event log.
    pub after: Vec<Value>,
}

/// How [`snapshot_round_trip`] runs.
#[derive(Default)]
pub struct RoundTripArgs<'a> {
    /// `vpsci run` arguments with the snapshot trigger (`--snapshot-on-console
    /// M`, ...); the snapshot directory and the event log are added.
    pub run: &'a [&'a str],
    /// More `vpsci restore` arguments (the directory and the event log are added).
    pub restore: &'a [&'a str],
    /// Waited between the source's end and the restore (time the VM spends on disk).
    pub gap: std::time::Duration,
}

/// Runs `vpsci run` with `args.run` (snapshot into a new directory, event log
/// `before.jsonl`), asserts that it wrote its snapshot and stopped with
/// status 0, then runs `vpsci restore` (event log `after.jsonl`) in a new
/// process. The restore's status is the caller's to check.
pub fn snapshot_round_trip(args: RoundTripArgs<'_>) -> RoundTrip {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let snap = dir.path().join("snap");
    let before_log = dir.path().join("before.jsonl");
    let after_log = dir.path().join("after.jsonl");
    let (snap_arg, before_arg, after_arg) = (arg(&snap), arg(&before_log), arg(&after_log));
    let mut run = vec!["run"];
    run.extend_from_slice(args.run);
    run.extend(["--snapshot-dir", &snap_arg, "--events", &before_arg]);
    let source = vpsci_timed(&run);
    eprintln!("run: {}", source.stderr);
    assert_eq!(source.status, Some(0), "vpsci run: {}", source.stderr);
    assert!(
        source.stderr.contains("snapshot written to") && snap.join("manifest.json").exists(),
        "no snapshot: {}",
        source.stderr
    );
    let before = event_log(&before_log);
    std::thread::sleep(args.gap);
    let mut restore = vec!["restore", &snap_arg, "--events", &after_arg];
    restore.extend_from_slice(args.restore);
    let restored = vpsci_timed(&restore);
    eprintln!("restore: {}", restored.stderr);
    let after = event_log(&after_log);
    RoundTrip {
        dir,
        snap,
        source,
        before,
        restored,
        after,
    }
}
