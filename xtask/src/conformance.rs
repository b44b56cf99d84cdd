//! `cargo xtask conformance [--long] [--filter NAME] [--against vpsci|qemu]`: the guest
//! conformance suite.
//!
//! Builds the bare-metal guests in `guests/` (aarch64-unknown-none), turns each ELF into a
//! flat image linked at 0x4008_0000, and boots one image per planned run, with the run's
//! parameters patched into the image's `VPSCICF1` block (see `guests/rt/src/config.rs`).
//! Each guest prints `VG-CHECK <scenario> PASS|FAIL|SKIP ...` lines; calls that end the VM
//! (SYSTEM_OFF, SYSTEM_OFF2, SYSTEM_RESET2) are judged here from the VMM's side: vpsci's
//! exit status and `--events` log, or QEMU's exit.
//!
//! `--against vpsci` (default) runs every guest under `vpsci run` on arm64 KVM: inside the
//! nested machine of [`crate::machine`] on x86_64 (one boot for the whole suite), natively
//! on an arm64 host with `/dev/kvm`. `--against qemu` runs the same guests on QEMU's own
//! PSCI (TCG, `-machine virt,gic-version=3`; `virtualization=on` for the SMC conduit,
//! because QEMU then makes SMC its PSCI conduit). A scenario QEMU fails is a result; only a
//! suite that cannot run is an error there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cargo::{self, cargo};
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Outcome, Session};
use crate::paths;
use crate::process::run_captured;
use crate::provision::{self, Host};

/// Where the guests are linked and loaded (RAM base + 0x8_0000).
pub const LOAD_ADDRESS: u64 = 0x4008_0000;
/// Magic of the parameter block in every guest image.
const CONFIG_MAGIC: &[u8; 8] = b"VPSCICF1";
/// vCPU counts of the CPU_ON race.
const RACE_SIZES: [u32; 5] = [2, 4, 8, 16, 64];
/// PSCI versions vpsci can be configured with.
const VERSIONS: [&str; 5] = ["0.2", "1.0", "1.1", "1.2", "1.3"];
/// Cookie and vendor reset type the system-event guest passes (see its source).
const WARM_COOKIE: u64 = 0x1234_5678_9abc_def0;
const VENDOR_TYPE: u64 = 0x8000_0001;
const VENDOR_COOKIE: u64 = 0xC0FF_EE00_0000_0042;

/// Which implementation the guests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// vpsci on arm64 KVM (nested or native).
    Vpsci,
    /// QEMU's built-in PSCI under TCG.
    Qemu,
}

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    /// 1000 race rounds and 200 system-suspend rounds instead of 100 and 20.
    pub long: bool,
    /// Only scenarios whose name contains this.
    pub filter: Option<String>,
    /// The implementation under test.
    pub against: Against,
    /// Also write the results as a Markdown table to this file.
    pub markdown: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        long: false,
        filter: None,
        against: Against::Vpsci,
        markdown: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--long" => options.long = true,
            "--filter" => {
                options.filter = Some(args.next().context("--filter needs a NAME")?.clone())
            }
            "--markdown" => {
                options.markdown = Some(PathBuf::from(
                    args.next().context("--markdown needs a FILE")?,
                ))
            }
            "--against" => {
                options.against = match args.next().map(String::as_str) {
                    Some("vpsci") => Against::Vpsci,
                    Some("qemu") => Against::Qemu,
                    other => bail!("--against {}: expected vpsci or qemu", other.unwrap_or("")),
                }
            }
            other => bail!(
                "unknown argument {other}\nusage: cargo xtask conformance [--long] \
                 [--filter NAME] [--against vpsci|qemu] [--markdown FILE]"
            ),
        }
    }
    Ok(options)
}

/// A call that ends the VM, judged from the VMM's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    Off,
    Hibernate,
    WarmReset,
    VendorReset,
}

/// What to do with an expected scenario the guest did not report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unreported {
    Fail,
    Skip(String),
}

/// One boot of one guest program.
#[derive(Debug, Clone)]
struct Run {
    /// Unique name, also the image file name.
    id: String,
    /// Binary in `guests/scenarios/src/bin`.
    program: &'static str,
    cpus: u32,
    /// `--psci-version` for vpsci; `None` = the implementation's default (not checked).
    psci_version: Option<&'static str>,
    smc: bool,
    iterations: u32,
    action: u32,
    /// Scenarios this run must report (in order).
    scenarios: Vec<String>,
    terminal: Option<(String, Terminal)>,
    unreported: Unreported,
    /// Wall-time limit for the VMM.
    timeout: Duration,
}

impl Run {
    fn new(id: impl Into<String>, program: &'static str, cpus: u32, scenarios: &[&str]) -> Run {
        Run {
            id: id.into(),
            program,
            cpus,
            psci_version: None,
            smc: false,
            iterations: 0,
            action: 0,
            scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
            terminal: None,
            unreported: Unreported::Fail,
            timeout: Duration::from_secs(60),
        }
    }
}

fn encode_version(text: &str) -> u32 {
    match text.split_once('.') {
        Some((major, minor)) => {
            (major.parse::<u32>().unwrap_or(0) << 16) | minor.parse::<u32>().unwrap_or(0)
        }
        None => 0,
    }
}

/// Every run of the suite, in the order they execute.
fn plan(options: &Options) -> Vec<Run> {
    let qemu = options.against == Against::Qemu;
    let (race_rounds, suspend_rounds) = if options.long { (1000, 200) } else { (100, 20) };
    let mut runs = vec![Run::new(
        "psci-basic",
        "psci-basic",
        4,
        &[
            "psci-version",
            "unknown-function-not-supported",
            "features-invalid-id-not-supported",
            "affinity-info-boot-cpu-on",
            "affinity-info-never-started-off",
            "affinity-info-levels",
            "cpu-on-context-id",
            "cpu-on-already-on",
            "cpu-on-invalid-mpidr",
            "migrate-info-type",
            "migrate-not-supported",
            "cpu-off-secondaries",
            "cpu-on-invalid-address",
            "cpu-on-misaligned-entry",
        ],
    )];
    for n in RACE_SIZES {
        let name = format!("cpu-on-race-{n}");
        let mut run = Run::new(name.clone(), "cpu-on-race", n, &[&name]);
        run.iterations = race_rounds;
        // Generous: the limit only stops a hung run; 64 vCPUs under TCG are slow.
        run.timeout = Duration::from_secs(u64::from(n) * race_rounds as u64 / 10 + 120);
        runs.push(run);
    }
    runs.push(Run::new(
        "cpu-suspend",
        "cpu-suspend",
        1,
        &["cpu-suspend-standby", "cpu-suspend-powerdown"],
    ));
    let mut suspend = Run::new(
        "system-suspend",
        "system-suspend",
        2,
        &[
            "system-suspend-features",
            "system-suspend-denied-other-on",
            "system-suspend-denied-other-suspended",
            "system-suspend-invalid-address",
            "system-suspend-timer-wake-repeated",
            "system-suspend-pending-interrupt",
        ],
    );
    suspend.iterations = suspend_rounds;
    suspend.timeout = Duration::from_secs(120 + u64::from(suspend_rounds));
    runs.push(suspend);
    let mut checks = Run::new(
        "system-event-checks",
        "system-event",
        1,
        &[
            "system-off2-features",
            "system-off2-nonzero-cookie",
            "system-reset2-features",
            "system-reset2-invalid-type",
            "system-off",
        ],
    );
    checks.terminal = Some(("system-off".into(), Terminal::Off));
    runs.push(checks);
    for (action, name, terminal) in [
        (1, "system-off2-hibernate", Terminal::Hibernate),
        (2, "system-reset2-warm", Terminal::WarmReset),
        (3, "system-reset2-vendor", Terminal::VendorReset),
    ] {
        let mut run = Run::new(name, "system-event", 1, &[name]);
        run.action = action;
        run.terminal = Some((name.to_string(), terminal));
        runs.push(run);
    }
    if qemu {
        // QEMU's PSCI version is fixed: one run, reported under the version it has.
        let names: Vec<String> = VERSIONS
            .iter()
            .map(|v| format!("version-gating-{v}"))
            .collect();
        let mut run = Run::new("version-gating", "version-gating", 1, &[]);
        run.scenarios = names;
        run.unreported = Unreported::Skip("QEMU's PSCI version cannot be selected".into());
        runs.push(run);
    } else {
        for v in VERSIONS {
            let name = format!("version-gating-{v}");
            let mut run = Run::new(name.clone(), "version-gating", 1, &[&name]);
            run.psci_version = Some(v);
            runs.push(run);
        }
    }
    for smc in [false, true] {
        let name = if smc { "conduit-smc" } else { "conduit-hvc" };
        let mut run = Run::new(name, "conduit", 2, &[name]);
        run.smc = smc;
        runs.push(run);
    }
    if let Some(filter) = &options.filter {
        for run in &mut runs {
            run.scenarios.retain(|s| s.contains(filter.as_str()));
        }
        runs.retain(|r| !r.scenarios.is_empty());
    }
    runs
}

/// Outcome of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Behaved as the specification requires.
    Pass,
    /// Did not; the text says how.
    Fail(String),
    /// Not applicable to this implementation or configuration; the text says why.
    Skip(String),
}

/// What one VMM run produced, for judging.
#[derive(Debug, Clone, Default)]
struct RunOutput {
    /// Console lines (guest UART and VMM messages).
    lines: Vec<String>,
    /// VMM exit status, if it exited by itself.
    exit: Option<i32>,
    /// Why the run did not complete normally (timeout, machine failure).
    problem: Option<String>,
    /// `system_event` lines of the vpsci event log.
    events: Vec<serde_json::Value>,
    elapsed: Duration,
}

/// Judges one run: the guest's own checks plus terminal calls from the VMM's side.
fn judge(run: &Run, out: &RunOutput, against: Against) -> Vec<(String, Verdict)> {
    let mut reported: BTreeMap<String, Verdict> = BTreeMap::new();
    let mut called: Option<String> = None;
    let mut returned: Option<String> = None;
    let mut fatal: Option<String> = None;
    for line in &out.lines {
        let line = line.trim_end_matches('\r');
        let Some(start) = line.find("VG-") else {
            continue;
        };
        let line = &line[start..];
        let mut words = line.splitn(4, ' ');
        match words.next() {
            Some("VG-CHECK") => {
                let name = words.next().unwrap_or_default().to_string();
                let status = words.next().unwrap_or_default();
                let detail = words.next().unwrap_or_default().to_string();
                let verdict = match status {
                    "PASS" => Verdict::Pass,
                    "SKIP" => Verdict::Skip(detail),
                    _ => Verdict::Fail(detail),
                };
                reported.insert(name, verdict);
            }
            Some("VG-CALL") => called = words.next().map(str::to_string),
            Some("VG-RETURNED") => {
                returned = Some(line.trim_start_matches("VG-RETURNED ").to_string())
            }
            Some("VG-FATAL") => {
                fatal.get_or_insert_with(|| line.trim_start_matches("VG-FATAL ").to_string());
            }
            _ => {}
        }
    }
    if let Some((name, terminal)) = &run.terminal {
        if !reported.contains_key(name) && called.as_deref() == Some(name.as_str()) {
            let verdict = match &returned {
                Some(r) => Verdict::Fail(format!("the call returned ({r})")),
                None => judge_terminal(*terminal, out, against),
            };
            reported.insert(name.clone(), verdict);
        }
    }
    let why_missing = fatal
        .map(|f| format!("guest died: {f}"))
        .or_else(|| out.problem.clone())
        .unwrap_or_else(|| "the guest never reported it".to_string());
    run.scenarios
        .iter()
        .map(|name| {
            let verdict = match (reported.remove(name), &run.unreported) {
                (Some(v), _) => v,
                (None, Unreported::Skip(why)) => Verdict::Skip(why.clone()),
                (None, Unreported::Fail) => Verdict::Fail(why_missing.clone()),
            };
            (name.clone(), verdict)
        })
        .collect()
}

fn hex(value: &serde_json::Value) -> Option<u64> {
    value
        .as_str()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
}

/// A terminal call that did not return: did the VMM end the VM the right way?
fn judge_terminal(terminal: Terminal, out: &RunOutput, against: Against) -> Verdict {
    if let Some(problem) = &out.problem {
        return Verdict::Fail(problem.clone());
    }
    match against {
        Against::Qemu => match (terminal, out.exit) {
            (Terminal::Off, Some(0)) => Verdict::Pass,
            (Terminal::Off, other) => Verdict::Fail(format!("QEMU exit status {other:?}")),
            (_, Some(0)) => Verdict::Skip(
                "QEMU ended the VM but reports no event type or cookie to check".into(),
            ),
            (_, other) => Verdict::Fail(format!("QEMU exit status {other:?}")),
        },
        Against::Vpsci => {
            let (want_exit, want_event) = match terminal {
                Terminal::Off => (0, "off"),
                Terminal::Hibernate => (0, "hibernate"),
                Terminal::WarmReset => (3, "warm_reset"),
                Terminal::VendorReset => (3, "vendor_reset"),
            };
            let Some(event) = out.events.iter().find(|e| e["kind"] == "system_event") else {
                return Verdict::Fail(format!(
                    "no system_event in the event log (vpsci exit status {:?})",
                    out.exit
                ));
            };
            if event["event"] != want_event {
                return Verdict::Fail(format!("event log shows {event}, expected {want_event}"));
            }
            let cookie_ok = match terminal {
                Terminal::WarmReset => hex(&event["cookie"]) == Some(WARM_COOKIE),
                Terminal::VendorReset => {
                    hex(&event["cookie"]) == Some(VENDOR_COOKIE)
                        && hex(&event["reset_type"]) == Some(VENDOR_TYPE)
                }
                _ => true,
            };
            if !cookie_ok {
                return Verdict::Fail(format!("event log shows {event}: wrong type or cookie"));
            }
            if out.exit != Some(want_exit) {
                return Verdict::Fail(format!(
                    "vpsci exit status {:?}, expected {want_exit}",
                    out.exit
                ));
            }
            Verdict::Pass
        }
    }
}

/// Builds the guest programs; returns program name -> ELF path.
pub(crate) fn build_guests() -> Result<BTreeMap<String, PathBuf>> {
    let dir = paths::workspace_root().join("guests");
    eprintln!("conformance: building guests (aarch64-unknown-none)");
    let mut cmd = cargo();
    cmd.current_dir(&dir)
        .args(["build", "--release", "--bins"])
        .env_remove("RUSTFLAGS");
    let (built, _) = cargo::build_executables(&mut cmd)?;
    let map: BTreeMap<String, PathBuf> = built
        .into_iter()
        .filter(|e| e.kind == "bin")
        .map(|e| (e.target, e.path))
        .collect();
    if map.is_empty() {
        bail!("building {} produced no guest programs", dir.display());
    }
    Ok(map)
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Turns a little-endian ELF64 into the flat image a loader places at `base`: every
/// PT_LOAD segment's file bytes at `p_paddr - base`, gaps zero-filled (what
/// `objcopy -O binary` does, without needing binutils).
pub fn elf_to_flat(elf: &[u8], base: u64) -> Result<Vec<u8>> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        bail!("not a little-endian ELF64 file");
    }
    let field = |v: Option<u64>| v.context("ELF file truncated");
    let phoff = field(read_u64(elf, 0x20))? as usize;
    let phentsize = field(read_u16(elf, 0x36).map(u64::from))? as usize;
    let phnum = field(read_u16(elf, 0x38).map(u64::from))? as usize;
    let mut image: Vec<u8> = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if field(read_u32(elf, ph).map(u64::from))? != 1 {
            continue; // not PT_LOAD
        }
        let offset = field(read_u64(elf, ph + 0x08))? as usize;
        let paddr = field(read_u64(elf, ph + 0x18))?;
        let filesz = field(read_u64(elf, ph + 0x20))? as usize;
        if filesz == 0 {
            continue;
        }
        let at = paddr.checked_sub(base).with_context(|| {
            format!("segment at {paddr:#x} lies below the load address {base:#x}")
        })? as usize;
        if at > 64 << 20 {
            bail!("segment at {paddr:#x} is too far above {base:#x} for a flat image");
        }
        let bytes = elf
            .get(offset..offset + filesz)
            .context("segment extends past the end of the ELF file")?;
        if image.len() < at + filesz {
            image.resize(at + filesz, 0);
        }
        image[at..at + filesz].copy_from_slice(bytes);
    }
    if image.is_empty() {
        bail!("ELF file has no loadable bytes");
    }
    Ok(image)
}

/// Writes the run's parameters into the image's `VPSCICF1` block.
fn patch_config(image: &mut [u8], run: &Run, long: bool) -> Result<()> {
    let at = image
        .windows(CONFIG_MAGIC.len())
        .position(|w| w == CONFIG_MAGIC)
        .context("guest image has no VPSCICF1 parameter block")?;
    let fields = [
        run.psci_version.map(encode_version).unwrap_or(0),
        match (run.psci_version.is_some(), run.smc) {
            (_, true) => 2,
            (true, false) => 1,
            (false, false) => 0,
        },
        run.iterations,
        run.action,
        u32::from(long),
    ];
    for (i, value) in fields.iter().enumerate() {
        let start = at + 8 + 4 * i;
        image
            .get_mut(start..start + 4)
            .context("parameter block truncated")?
            .copy_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

/// Builds every image the plan needs under `<target>/conformance`.
fn prepare_images(runs: &[Run], long: bool) -> Result<BTreeMap<String, PathBuf>> {
    let elves = build_guests()?;
    let dir = paths::target_dir().join("conformance");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut images = BTreeMap::new();
    for run in runs {
        let elf_path = elves
            .get(run.program)
            .with_context(|| format!("guest program {} was not built", run.program))?;
        let elf =
            std::fs::read(elf_path).with_context(|| format!("reading {}", elf_path.display()))?;
        let mut image = elf_to_flat(&elf, LOAD_ADDRESS)
            .with_context(|| format!("converting {}", elf_path.display()))?;
        patch_config(&mut image, run, long)?;
        let path = dir.join(format!("{}.bin", run.id));
        std::fs::write(&path, &image).with_context(|| format!("writing {}", path.display()))?;
        images.insert(run.id.clone(), path);
    }
    Ok(images)
}

/// QEMU's command line for one run.
fn qemu_command(qemu: &Path, run: &Run, image: &Path) -> Command {
    let machine = if run.smc {
        "virt,gic-version=3,virtualization=on"
    } else {
        "virt,gic-version=3"
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", machine, "-cpu", "max"])
        .args(["-smp", &run.cpus.to_string(), "-m", "256M"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-nic", "none", "-kernel"])
        .arg(image);
    cmd
}

fn run_on_qemu(runs: &[Run], images: &BTreeMap<String, PathBuf>) -> Result<Vec<RunOutput>> {
    let qemu = match provision::prepare_machine()? {
        Host::Nested(assets) => assets.qemu,
        Host::Native => PathBuf::from("qemu-system-aarch64"),
    };
    let mut outputs = Vec::new();
    for run in runs {
        let image = &images[&run.id];
        let started = Instant::now();
        let finished = run_captured(&mut qemu_command(&qemu, run, image), run.timeout)?;
        let problem = if finished.timed_out {
            Some(format!("QEMU killed after {} s", run.timeout.as_secs()))
        } else {
            None
        };
        outputs.push(RunOutput {
            lines: finished.output.lines().map(str::to_string).collect(),
            exit: finished.code,
            problem,
            events: Vec::new(),
            elapsed: started.elapsed(),
        });
    }
    Ok(outputs)
}

/// The shell command that runs one guest under vpsci and prints its exit status and the
/// system events of its log, bracketed so [`split_vpsci_output`] can find them.
fn vpsci_shell(run: &Run, image: &str, events: &str) -> String {
    let q = machine::shell_quote;
    let mut cmd = format!(
        "vpsci run --image {} --cpus {} --conduit {} --on-reset exit --timeout {}",
        q(image),
        run.cpus,
        if run.smc { "smc" } else { "hvc" },
        run.timeout.as_secs()
    );
    if let Some(v) = run.psci_version {
        let _ = write!(cmd, " --psci-version {v}");
    }
    if run.terminal.is_some() {
        let _ = write!(
            cmd,
            " --events {e}; rc=$?; echo VG-VMM-EXIT $rc; grep -F '\"system_event\"' {e} \
             | sed 's/^/VG-EVENT /'; exit 0",
            e = q(events)
        );
    } else {
        cmd.push_str("; echo VG-VMM-EXIT $?; exit 0");
    }
    cmd
}

/// Separates the markers [`vpsci_shell`] prints from the console lines.
fn split_vpsci_output(lines: Vec<String>, result: &JobResult) -> RunOutput {
    let mut out = RunOutput {
        elapsed: result.elapsed,
        ..RunOutput::default()
    };
    for line in lines {
        if let Some(rest) = line.strip_prefix("VG-VMM-EXIT ") {
            out.exit = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("VG-EVENT ") {
            if let Ok(value) = serde_json::from_str(rest.trim()) {
                out.events.push(value);
            }
        } else {
            out.lines.push(line);
        }
    }
    out.problem = match &result.outcome {
        Outcome::Exited(_) if out.exit == Some(1) => Some(format!(
            "vpsci failed: {}",
            out.lines
                .iter()
                .rev()
                .find(|l| l.starts_with("vpsci:"))
                .cloned()
                .unwrap_or_else(|| "exit status 1".into())
        )),
        Outcome::Exited(_) => None,
        other => Some(format!("{other:?}")),
    };
    out
}

/// Collects each job's lines.
struct Collect {
    lines: Vec<Vec<String>>,
}

impl Observer for Collect {
    fn line(&mut self, job: usize, line: &str) {
        if let Some(slot) = self.lines.get_mut(job) {
            slot.push(line.to_string());
        }
    }
}

fn run_on_vpsci(runs: &[Run], images: &BTreeMap<String, PathBuf>) -> Result<Vec<RunOutput>> {
    let host = provision::prepare_machine()?;
    let vpsci = crate::nested::build_vpsci()?;
    let vpsci_dir = vpsci
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Not under /tmp: the machine mounts a fresh tmpfs there after unpacking the files.
    let work = "/conformance";
    let mut files = vec![GuestFile {
        guest: vpsci.to_string_lossy().into_owned(),
        host: vpsci.clone(),
    }];
    let mut jobs = Vec::new();
    for run in runs {
        let guest_image = format!("{work}/{}.bin", run.id);
        files.push(GuestFile {
            host: images[&run.id].clone(),
            guest: guest_image.clone(),
        });
        let events = format!("{work}/{}.jsonl", run.id);
        jobs.push(Job {
            argv: vec![
                "sh".into(),
                "-c".into(),
                vpsci_shell(run, &guest_image, &events),
            ],
            cwd: work.into(),
            env: Vec::new(),
            timeout: run.timeout + Duration::from_secs(30),
        });
    }
    eprintln!(
        "conformance: running {} guests on {}",
        runs.len(),
        host.describe()
    );
    let session = Session {
        files,
        path: vec![vpsci_dir],
        jobs,
    };
    let mut collect = Collect {
        lines: vec![Vec::new(); runs.len()],
    };
    let results = machine::run(&host, &MachineConfig::default(), &session, &mut collect)?;
    let mut outputs = Vec::new();
    for (i, lines) in collect.lines.into_iter().enumerate() {
        let result = results.get(i).cloned().unwrap_or(JobResult {
            outcome: Outcome::NotRun("the machine returned no result".into()),
            elapsed: Duration::ZERO,
        });
        outputs.push(split_vpsci_output(lines, &result));
    }
    Ok(outputs)
}

/// A shell test that judges one run inside the machine, for `cargo xtask test` (whose
/// nested groups pass on exit status 0): every non-terminal scenario must report PASS or
/// SKIP, and a terminal call must not return, must end vpsci with the right status and
/// must leave its `system_event` (with type and cookie) in the event log. Mirrors
/// [`judge`] for vpsci.
fn judging_shell(run: &Run, image: &str, events: &str, log: &str) -> String {
    let q = machine::shell_quote;
    let mut vpsci = format!(
        "vpsci run --image {} --cpus {} --conduit {} --on-reset exit --timeout {} --events {}",
        q(image),
        run.cpus,
        if run.smc { "smc" } else { "hvc" },
        run.timeout.as_secs(),
        q(events)
    );
    if let Some(v) = run.psci_version {
        let _ = write!(vpsci, " --psci-version {v}");
    }
    let log = q(log);
    let mut script = format!("{vpsci} >{log} 2>&1; rc=$?; cat {log}; fail=0\n");
    let terminal = run.terminal.as_ref().map(|(name, _)| name.as_str());
    for name in run
        .scenarios
        .iter()
        .filter(|s| Some(s.as_str()) != terminal)
    {
        let _ = writeln!(
            script,
            "grep -Eq {pattern} {log} || {{ echo {msg}; fail=1; }}",
            pattern = q(&format!("VG-CHECK {name} (PASS|SKIP)")),
            msg = q(&format!("conformance: {name} did not pass")),
        );
    }
    if let Some((name, kind)) = &run.terminal {
        let (status, event, extra) = match kind {
            Terminal::Off => (0, "off", String::new()),
            Terminal::Hibernate => (0, "hibernate", String::new()),
            Terminal::WarmReset => (3, "warm_reset", format!("\"cookie\":\"{WARM_COOKIE:#x}\"")),
            Terminal::VendorReset => (
                3,
                "vendor_reset",
                format!("\"cookie\":\"{VENDOR_COOKIE:#x}\""),
            ),
        };
        let type_check = if *kind == Terminal::VendorReset {
            format!(
                " | grep -F {}",
                q(&format!("\"reset_type\":\"{VENDOR_TYPE:#x}\""))
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            script,
            "if ! grep -q {skip} {log}; then \
             grep -q {call} {log} && ! grep -q VG-RETURNED {log} && [ \"$rc\" = {status} ] \
             && grep -F {event} {events} | grep -F {extra}{type_check} >/dev/null \
             || {{ echo {msg} \"(vpsci exit $rc)\"; fail=1; }}; fi",
            skip = q(&format!("VG-CHECK {name} SKIP")),
            call = q(&format!("VG-CALL {name}")),
            event = q(&format!("\"event\":\"{event}\"")),
            extra = q(if extra.is_empty() {
                "system_event"
            } else {
                &extra
            }),
            events = q(events),
            msg = q(&format!(
                "conformance: {name}: no {event} event with the expected status, type and cookie"
            )),
        );
    }
    script.push_str("exit $fail\n");
    script
}

/// The suite as nested groups of `cargo xtask test` (one group per run, default sizes),
/// sharing the test binaries' boot of the KVM machine.
pub fn nested_groups() -> Result<Vec<crate::test::NestedGroup>> {
    let options = Options {
        long: false,
        filter: None,
        against: Against::Vpsci,
        markdown: None,
    };
    let runs = plan(&options);
    let images = prepare_images(&runs, false)?;
    let vpsci = crate::nested::build_vpsci()?;
    let vpsci_dir = vpsci
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let work = "/conformance";
    let mut groups = Vec::new();
    for run in &runs {
        let image = format!("{work}/{}.bin", run.id);
        let events = format!("{work}/{}.jsonl", run.id);
        let log = format!("{work}/{}.log", run.id);
        groups.push(crate::test::NestedGroup {
            name: format!("conformance: {} ({} vCPUs)", run.id, run.cpus),
            files: vec![
                GuestFile {
                    host: images[&run.id].clone(),
                    guest: image.clone(),
                },
                GuestFile {
                    guest: vpsci.to_string_lossy().into_owned(),
                    host: vpsci.clone(),
                },
            ],
            path: vec![vpsci_dir.clone()],
            job: Job {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    judging_shell(run, &image, &events, &log),
                ],
                cwd: work.into(),
                env: Vec::new(),
                timeout: run.timeout + Duration::from_secs(30),
            },
            style: crate::test::CountStyle::Check,
            show_output: false,
        });
    }
    Ok(groups)
}

/// Counts of a finished suite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Scenarios that passed.
    pub passed: usize,
    /// Scenarios that failed.
    pub failed: usize,
    /// Scenarios not applicable to the implementation.
    pub skipped: usize,
}

/// Runs the suite and prints one line per scenario and the summary line.
pub fn run_suite(options: &Options) -> Result<Summary> {
    let runs = plan(options);
    if runs.is_empty() {
        bail!("no scenario matches the filter");
    }
    let started = Instant::now();
    let images = prepare_images(&runs, options.long)?;
    let outputs = match options.against {
        Against::Qemu => run_on_qemu(&runs, &images)?,
        Against::Vpsci => run_on_vpsci(&runs, &images)?,
    };
    let label = match options.against {
        Against::Qemu => "qemu",
        Against::Vpsci => "vpsci",
    };
    let mut summary = Summary::default();
    let mut table = String::from("| scenario | result | detail |\n|---|---|---|\n");
    for (run, out) in runs.iter().zip(&outputs) {
        for line in out.lines.iter().filter(|l| l.contains("VG-INFO")) {
            let info = &line[line.find("VG-INFO").unwrap_or(0) + 8..];
            println!("        [{label}] {}: {}", run.id, info.trim_end());
        }
        for (name, verdict) in judge(run, out, options.against) {
            let (word, detail) = match &verdict {
                Verdict::Pass => {
                    summary.passed += 1;
                    ("PASS", String::new())
                }
                Verdict::Fail(d) => {
                    summary.failed += 1;
                    ("FAIL", d.clone())
                }
                Verdict::Skip(d) => {
                    summary.skipped += 1;
                    ("SKIP", d.clone())
                }
            };
            println!(
                "{word:4}  {name:40} {:>6.1} s  {detail}",
                out.elapsed.as_secs_f64()
            );
            let _ = writeln!(table, "| {name} | {word} | {} |", detail.replace('|', "/"));
        }
    }
    eprintln!(
        "conformance: {} runs against {label} in {:.1} s",
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &options.markdown {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    if summary.skipped > 0 {
        println!(
            "{} passed, {} failed, {} skipped",
            summary.passed, summary.failed, summary.skipped
        );
    } else {
        println!("{} passed, {} failed", summary.passed, summary.failed);
    }
    Ok(summary)
}

/// Entry point of `cargo xtask conformance`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let options = parse(args)?;
    let summary = run_suite(&options)?;
    // Against QEMU a failing scenario is a finding about QEMU, not a broken suite.
    if summary.failed > 0 && options.against == Against::Vpsci {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with the given PT_LOAD segments (paddr, bytes).
    fn elf(segments: &[(u64, &[u8])]) -> Vec<u8> {
        let phoff = 64usize;
        let data_start = phoff + 56 * segments.len();
        let mut out = vec![0u8; data_start];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (paddr, bytes)) in segments.iter().enumerate() {
            let ph = phoff + 56 * i;
            let offset = out.len() as u64;
            out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            out[ph + 0x08..ph + 0x10].copy_from_slice(&offset.to_le_bytes());
            out[ph + 0x18..ph + 0x20].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 0x20..ph + 0x28].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    #[test]
    fn flat_image_places_segments_at_their_physical_offsets_and_fills_gaps() {
        let image = elf(&[(LOAD_ADDRESS, b"abcd"), (LOAD_ADDRESS + 8, b"xy")]);
        let flat = elf_to_flat(&image, LOAD_ADDRESS).unwrap();
        assert_eq!(flat, b"abcd\0\0\0\0xy");
    }

    #[test]
    fn flat_image_refuses_segments_below_the_load_address_and_non_elf_input() {
        let image = elf(&[(LOAD_ADDRESS - 4, b"abcd")]);
        assert!(elf_to_flat(&image, LOAD_ADDRESS).is_err());
        assert!(elf_to_flat(b"MZ not an elf file", LOAD_ADDRESS).is_err());
        let mut truncated = elf(&[(LOAD_ADDRESS, b"abcd")]);
        truncated.truncate(70);
        assert!(elf_to_flat(&truncated, LOAD_ADDRESS).is_err());
    }

    #[test]
    fn parameters_are_written_after_the_magic_in_field_order() {
        let mut image = b"....VPSCICF1".to_vec();
        image.extend_from_slice(&[0xAA; 20]);
        let mut run = Run::new("r", "version-gating", 1, &["x"]);
        run.psci_version = Some("1.2");
        run.iterations = 7;
        run.action = 3;
        patch_config(&mut image, &run, true).unwrap();
        let field =
            |i: usize| u32::from_le_bytes(image[12 + 4 * i..16 + 4 * i].try_into().unwrap());
        assert_eq!(
            [field(0), field(1), field(2), field(3), field(4)],
            [0x1_0002, 1, 7, 3, 1]
        );
        assert!(patch_config(&mut b"no magic here".to_vec(), &run, false).is_err());
    }

    fn output(lines: &[&str]) -> RunOutput {
        RunOutput {
            lines: lines.iter().map(|l| l.to_string()).collect(),
            exit: Some(0),
            ..RunOutput::default()
        }
    }

    #[test]
    fn unreported_scenarios_fail_with_the_guests_last_words() {
        let run = Run::new("r", "psci-basic", 4, &["a", "b"]);
        let out = output(&[
            "VG-CHECK a PASS",
            "VG-FATAL exception kind=4 esr=0x96000000",
        ]);
        let verdicts = judge(&run, &out, Against::Vpsci);
        assert_eq!(verdicts[0], ("a".to_string(), Verdict::Pass));
        match &verdicts[1].1 {
            Verdict::Fail(why) => assert!(why.contains("esr=0x96000000"), "{why}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn check_lines_keep_failure_details_and_skip_reasons() {
        let run = Run::new("r", "x", 1, &["a", "b"]);
        let out = output(&[
            "noise VG-CHECK a FAIL got DENIED\r",
            "VG-CHECK b SKIP needs 1.3",
        ]);
        let verdicts = judge(&run, &out, Against::Qemu);
        assert_eq!(verdicts[0].1, Verdict::Fail("got DENIED".into()));
        assert_eq!(verdicts[1].1, Verdict::Skip("needs 1.3".into()));
    }

    fn reset_run() -> Run {
        let mut run = Run::new("w", "system-event", 1, &["system-reset2-warm"]);
        run.terminal = Some(("system-reset2-warm".into(), Terminal::WarmReset));
        run
    }

    #[test]
    fn warm_reset_passes_only_with_the_event_and_cookie_in_the_vpsci_log() {
        let run = reset_run();
        let mut out = output(&["VG-CALL system-reset2-warm"]);
        out.exit = Some(3);
        out.events = vec![serde_json::json!({
            "kind": "system_event", "event": "warm_reset", "cookie": "0x123456789abcdef0"
        })];
        assert_eq!(judge(&run, &out, Against::Vpsci)[0].1, Verdict::Pass);
        out.events[0]["cookie"] = "0x1".into();
        assert!(matches!(
            judge(&run, &out, Against::Vpsci)[0].1,
            Verdict::Fail(_)
        ));
        out.events.clear();
        assert!(matches!(
            judge(&run, &out, Against::Vpsci)[0].1,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn a_terminal_call_that_returns_fails() {
        let run = reset_run();
        let out = output(&[
            "VG-CALL system-reset2-warm",
            "VG-RETURNED system-reset2-warm -1",
        ]);
        assert!(matches!(
            judge(&run, &out, Against::Vpsci)[0].1,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn the_filter_keeps_only_matching_scenarios_and_their_runs() {
        let options = Options {
            long: false,
            filter: Some("race-64".into()),
            against: Against::Vpsci,
            markdown: None,
        };
        let runs = plan(&options);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].scenarios, ["cpu-on-race-64"]);
        assert_eq!(runs[0].cpus, 64);
        assert_eq!(runs[0].iterations, 100);
    }

    #[test]
    fn qemu_reports_version_gating_once_and_skips_versions_it_cannot_select() {
        let options = Options {
            long: true,
            filter: Some("version-gating".into()),
            against: Against::Qemu,
            markdown: None,
        };
        let runs = plan(&options);
        assert_eq!(runs.len(), 1);
        let out = output(&["VG-CHECK version-gating-1.1 PASS"]);
        let verdicts = judge(&runs[0], &out, Against::Qemu);
        assert_eq!(verdicts.len(), 5);
        assert_eq!(
            verdicts.iter().filter(|(_, v)| *v == Verdict::Pass).count(),
            1
        );
        assert!(verdicts.iter().all(|(_, v)| !matches!(v, Verdict::Fail(_))));
    }

    #[test]
    fn options_parse_and_reject_unknown_input() {
        let args: Vec<String> = ["--long", "--against", "qemu", "--filter", "race"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let options = parse(&args).unwrap();
        assert!(options.long);
        assert_eq!(options.against, Against::Qemu);
        assert_eq!(options.filter.as_deref(), Some("race"));
        assert!(parse(&["--against".to_string(), "kvm".to_string()]).is_err());
        assert!(parse(&["--bogus".to_string()]).is_err());
    }

    /// Runs [`judging_shell`] against a fake `vpsci` that prints `console`, writes
    /// `event` to its `--events` file and exits with `status`; returns the script's status.
    fn judge_in_shell(run: &Run, console: &str, event: &str, status: i32) -> i32 {
        let dir =
            std::env::temp_dir().join(format!("xtask-conf-{}-{}", std::process::id(), run.id));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = --events ]; then ev=$2; fi; shift; done\n\
             printf '%s\\n' {} >\"$ev\"\nprintf '%s\\n' {}\nexit {status}\n",
            machine::shell_quote(event),
            machine::shell_quote(console)
        );
        let vpsci = dir.join("vpsci");
        std::fs::write(&vpsci, fake).unwrap();
        let mut perms = std::fs::metadata(&vpsci).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&vpsci, perms).unwrap();
        let d = dir.to_string_lossy().into_owned();
        let script = judging_shell(
            run,
            "img.bin",
            &format!("{d}/ev.jsonl"),
            &format!("{d}/log"),
        );
        let path = format!("{d}:{}", std::env::var("PATH").unwrap_or_default());
        let code = Command::new("sh")
            .args(["-c", &script])
            .env("PATH", path)
            .output()
            .unwrap()
            .status
            .code()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        code
    }

    #[test]
    fn in_machine_judge_checks_status_event_and_cookie_of_a_warm_reset() {
        let run = reset_run();
        let good = r#"{"kind":"system_event","vcpu":0,"event":"warm_reset","cookie":"0x123456789abcdef0"}"#;
        let bad = r#"{"kind":"system_event","vcpu":0,"event":"warm_reset","cookie":"0x1"}"#;
        assert_eq!(
            judge_in_shell(&run, "VG-CALL system-reset2-warm", good, 3),
            0
        );
        assert_ne!(
            judge_in_shell(&run, "VG-CALL system-reset2-warm", bad, 3),
            0
        );
        assert_ne!(
            judge_in_shell(&run, "VG-CALL system-reset2-warm", good, 0),
            0
        );
    }

    #[test]
    fn in_machine_judge_fails_a_failed_or_missing_check() {
        let run = Run::new("basic", "psci-basic", 4, &["a", "b"]);
        assert_eq!(
            judge_in_shell(&run, "VG-CHECK a PASS\nVG-CHECK b SKIP n/a", "", 0),
            0
        );
        assert_ne!(
            judge_in_shell(&run, "VG-CHECK a PASS\nVG-CHECK b FAIL x", "", 0),
            0
        );
        assert_ne!(judge_in_shell(&run, "VG-CHECK a PASS", "", 0), 0);
    }
}
