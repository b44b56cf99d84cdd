//! What the tests that drive `vpsci` processes share (`nested_api`, `nested_migration`,
//! `nested_linux_migration`, `nested_linux_disk_migration`): processes with their console, stderr, event log and API
//! socket in files, `vpsci ctl` calls, and the event log's migration lines.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vpsci::api::client::Client;
use vpsci::api::types::{MigrateDone, RunState, VmInfo};

pub fn vpsci() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpsci"))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    vpsci()
        .arg("ctl")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run vpsci ctl: {e}"))
}

pub fn info(socket: &Path) -> VmInfo {
    let out = ctl(socket, &["info", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("info --json does not decode: {e}: {}", text(&out.stdout)))
}

/// Waits (bounded) until `cond` holds.
pub fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A vpsci process with its console, stderr, event log and API socket in files.
pub struct Vmm {
    pub child: Child,
    pub socket: PathBuf,
    pub events: PathBuf,
    pub console: PathBuf,
    pub stderr: PathBuf,
}

/// How a vpsci process ended.
#[derive(Debug)]
pub struct Ended {
    pub status: Option<i32>,
    pub console: String,
    pub stderr: String,
    pub events: String,
}

impl Vmm {
    /// Starts `vpsci ARGS --api-socket .. --events ..` with files in `dir/name.*`.
    pub fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Vmm {
        let socket = dir.join(format!("{name}.sock"));
        let events = dir.join(format!("{name}.jsonl"));
        let console = dir.join(format!("{name}.console"));
        let stderr = dir.join(format!("{name}.stderr"));
        // Files, not pipes: a full pipe would block the guest's UART writes.
        let file = |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("{e}"));
        let child = vpsci()
            .args(args)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--events")
            .arg(&events)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file(&console))
            .stderr(file(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vpsci {args:?}: {e}"));
        Vmm {
            child,
            socket,
            events,
            console,
            stderr,
        }
    }

    /// Waits until its API socket answers.
    pub fn serving(self) -> Vmm {
        let socket = self.socket.clone();
        until("the API socket answers", || {
            Client::new(&socket, Some(Duration::from_secs(5)))
                .info()
                .is_ok()
        });
        self
    }

    /// Waits (bounded) until the guest's console satisfies `cond`; the panic shows
    /// the console's end.
    pub fn until_console(&self, what: &str, cond: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let console = read(&self.console);
            if cond(&console) {
                return;
            }
            if Instant::now() >= deadline {
                let tail: String = console
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("timed out waiting until {what}; the console ends with:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest has printed more than it has now.
    pub fn keeps_printing(&self) {
        let before = read(&self.console).len();
        until("the guest prints more", || {
            read(&self.console).len() > before
        });
    }

    /// `vpsci ctl SOCKET poweroff`, then waits for the process, which must
    /// end with status 0.
    pub fn power_off(self) -> Ended {
        let out = ctl(&self.socket, &["poweroff"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "poweroff: {}",
            text(&out.stderr)
        );
        let ended = self.wait();
        assert_eq!(ended.status, Some(0), "{}", ended.stderr);
        ended
    }

    /// Waits (bounded) for the process to end.
    pub fn wait(mut self) -> Ended {
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(None) => panic!("vpsci did not end within 180 s: {}", read(&self.stderr)),
                Err(e) => panic!("{e}"),
            }
        };
        Ended {
            status: status.code(),
            console: read(&self.console),
            stderr: read(&self.stderr),
            events: read(&self.events),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // A test that failed half-way leaves no VM running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percentile `p` (0..=100) of sorted `v`.
pub fn percentile(v: &[Duration], p: usize) -> Duration {
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The `phase` of every `migration` line of an event log, in order.
pub fn phases(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "migration")
        .filter_map(|v| v["phase"].as_str().map(str::to_owned))
        .collect()
}

/// The vCPUs that made a `function` call in an event log.
pub fn callers(log: &str, function: &str) -> Vec<u64> {
    let mut v: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "psci_call" && v["function"] == function)
        .filter_map(|v| v["vcpu"].as_u64())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}
pub struct Bench {
    pub dir: tempfile::TempDir,
}

impl Default for Bench {
    fn default() -> Bench {
        Bench::new()
    }
}

impl Bench {
    pub fn new() -> Bench {
        Bench {
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `bytes` into the bench's directory as `name`; returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{e}"));
        p.to_string_lossy().into_owned()
    }

    /// `vpsci run IMAGE --cpus N EXTRA...` (128 MiB unless EXTRA says `--memory`),
    /// serving its API.
    pub fn source(&self, image: &str, cpus: u32, extra: &[&str], env: &[(&str, &str)]) -> Vmm {
        let cpus = cpus.to_string();
        let mut args = vec!["run", "--image", image, "--cpus", &cpus, "--timeout", "600"];
        if !extra.contains(&"--memory") {
            args.extend(["--memory", "128M"]);
        }
        args.extend_from_slice(extra);
        Vmm::start(self.dir.path(), "source", &args, env).serving()
    }

    /// `vpsci restore --listen ENDPOINT EXTRA...` (its API only answers once a VM runs).
    pub fn destination(
        &self,
        name: &str,
        endpoint: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Vmm {
        let mut args = vec!["restore", "--listen", endpoint, "--timeout", "600"];
        args.extend_from_slice(extra);
        let vmm = Vmm::start(self.dir.path(), name, &args, env);
        if let Some(path) = endpoint.strip_prefix("unix:") {
            until("the destination listens", || Path::new(path).exists());
        } else {
            loopback_up();
            // A TCP listener shows no file: give the process its moment to bind.
            let addr = endpoint.trim_start_matches("tcp:").to_owned();
            until("the destination listens", || listening(&addr));
        }
        vmm
    }
}

/// Brings the loopback interface up: the nested machine's init leaves it down (on an
/// ordinary host it is up already and this changes nothing).
pub fn loopback_up() {
    for cmd in [
        &["ifconfig", "lo", "127.0.0.1", "up"][..],
        &["ip", "link", "set", "lo", "up"],
    ] {
        if Command::new(cmd[0])
            .args(&cmd[1..])
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
    }
}

/// Whether a TCP port on this machine is in the LISTEN state (from /proc, without
/// connecting: a connection would be taken as the migration).
pub fn listening(addr: &str) -> bool {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else {
        return false;
    };
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        read(Path::new(f))
            .lines()
            .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
    })
}

/// `vpsci ctl SOURCE migrate --to ENDPOINT --json`.
pub fn migrate(socket: &Path, endpoint: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", "--to", endpoint, "--json"];
    args.extend_from_slice(extra);
    ctl(socket, &args)
}

pub fn migrated(out: &Output) -> MigrateDone {
    assert_eq!(
        out.status.code(),
        Some(0),
        "migrate failed: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("migrate --json does not decode: {e}: {}", text(&out.stdout)))
}

/// An unconfirmed migration (Go sent, no Running back): `vpsci ctl migrate` exits 4
/// and still prints its answer, `confirmed: false` with the VM paused at the source.
pub fn unconfirmed(out: &Output) -> MigrateDone {
    assert_eq!(
        out.status.code(),
        Some(4),
        "not an unconfirmed migration: {}",
        text(&out.stderr)
    );
    let done: MigrateDone = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("migrate --json does not decode: {e}: {}", text(&out.stdout)));
    assert!(!done.confirmed, "{done:?}");
    assert_eq!(done.run_state, RunState::Paused, "{done:?}");
    done
}

/// Prints a migration's totals: `LABEL: N rounds, M MiB, total T ms, downtime D ms`.
pub fn print_migration(label: &str, done: &MigrateDone) {
    println!(
        "{label}: {} rounds, {:.1} MiB, total {:.0} ms, downtime {:.0} ms",
        done.rounds.len(),
        done.bytes_sent as f64 / f64::from(1 << 20),
        done.total_ms,
        done.downtime_ms
    );
}

/// A counter the guest prints goes on across a migration: the destination's first
/// value follows `last`, the source's (a line cut by the pause may be lost, never
/// a restart from 1 or a jump), and `after`, the destination's, are consecutive.
pub fn counter_goes_on(last: u64, after: &[u64]) {
    let first = after.first().copied().unwrap_or(0);
    assert!(
        first > last && first <= last + 2,
        "the source stopped at {last}, the destination went on at {first}"
    );
    for pair in after.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{after:?}");
    }
}

/// The source after a failed migration: its API says running and its guest prints on.
pub fn still_running(source: &Vmm) {
    let now = info(&source.socket);
    assert_eq!(now.run_state, RunState::Running, "{now:?}");
    source.keeps_printing();
}
