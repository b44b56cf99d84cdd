//! `cargo xtask bench [--quick] [--rounds N] [--filter PATTERN] [--compare OLD.json]
//! [--from RESULT.json] [--markdown FILE]`: userspace PSCI against the empty-handler
//! floor and against KVM's in-kernel PSCI, in one boot of the arm64 KVM machine.
//!
//! Builds the workload runner (`crates/bench`, `vpsci-bench`, release build for
//! `aarch64-unknown-linux-musl`: debug builds distort the ratios) and runs it in one boot of
//! the machine of [`crate::machine`] (nested under QEMU on x86_64, natively on an arm64 host
//! with `/dev/kvm`), with the provisioned Linux kernel for the Linux workloads. The runner
//! takes every sample side by side in interleaved rounds and prints each as a JSON line;
//! this module collects them ([`results`]), adds the machine, its versions and the host's
//! load average before and after, saves everything as `target/bench/bench-<date>.json`,
//! prints the tables ([`table`]: medians, spreads, ratios against issue 12's targets,
//! [`analysis`]), draws the charts ([`chart`]) and, with `--compare`, the change against an
//! earlier result. `--from` analyses a saved result again without running anything.
//!
//! `cargo xtask test` runs `vpsci-bench --quick` as one group of its nested session
//! ([`nested_groups`]): its numbers are printed, never asserted; only a failed check or a
//! case without numbers fails the group.

mod analysis;
mod chart;
mod results;
mod table;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::cargo::{self, cargo};
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer};
use crate::provision::{self, Host, KVM_TEST_TARGET};
use results::{load_average, utc, BenchResult, Machine, FORMAT};

/// Command-line options.
#[derive(Debug, Clone, Default)]
struct Options {
    quick: bool,
    rounds: Option<u32>,
    filter: Option<String>,
    compare: Option<PathBuf>,
    from: Option<PathBuf>,
    markdown: Option<PathBuf>,
}

const USAGE: &str = "usage: cargo xtask bench [--quick] [--rounds N] [--filter PATTERN] \
                     [--compare OLD.json] [--from RESULT.json] [--markdown FILE]";

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--rounds" => {
                let text = value("--rounds")?;
                options.rounds = Some(
                    text.parse()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .with_context(|| format!("--rounds {text}: expected 1..1000"))?,
                );
            }
            "--filter" => options.filter = Some(value("--filter")?),
            "--compare" => options.compare = Some(value("--compare")?.into()),
            "--from" => options.from = Some(value("--from")?.into()),
            "--markdown" => options.markdown = Some(value("--markdown")?.into()),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(options)
}

/// Largest Linux guest booted on the nested machine (4 emulated cores on one TCG
/// thread): at 64 vCPUs Linux hit soft lockups and did not reach init within 600 s.
const NESTED_MAX_LINUX_CPUS: u32 = 8;

/// `target/bench`.
fn bench_dir() -> PathBuf {
    crate::paths::target_dir().join("bench")
}

/// Builds `vpsci-bench` (release, for the KVM target).
fn build_runner() -> Result<PathBuf> {
    eprintln!("bench: building vpsci-bench (release) for {KVM_TEST_TARGET}");
    let (built, _) = cargo::build_executables(cargo().args([
        "build",
        "--release",
        "--package",
        "vpsci-bench",
        "--target",
        KVM_TEST_TARGET,
    ]))?;
    built
        .into_iter()
        .find(|e| e.target == "vpsci-bench" && !e.test)
        .map(|e| e.path)
        .context("cargo built no vpsci-bench binary")
}

/// The runner's command line, and the files it needs in the machine.
fn runner_job(
    runner: &Path,
    quick: bool,
    extra: &[String],
) -> (Vec<String>, Vec<GuestFile>, Option<String>) {
    let runner_path = runner.to_string_lossy().into_owned();
    let mut argv = vec![runner_path.clone()];
    if quick {
        argv.push("--quick".into());
    }
    argv.extend(extra.iter().cloned());
    let mut files = vec![GuestFile {
        host: runner.to_path_buf(),
        guest: runner_path,
    }];
    let image = provision::cached_linux_image();
    if let Some(image) = &image {
        let guest = image.to_string_lossy().into_owned();
        files.push(GuestFile {
            host: image.clone(),
            guest: guest.clone(),
        });
        argv.extend(["--linux-image".into(), guest]);
    }
    let guest_kernel = image.and_then(|_| {
        std::fs::read_to_string(provision::assets_dir().join("kernel-version"))
            .ok()
            .map(|v| v.trim().to_string())
    });
    (argv, files, guest_kernel)
}

/// One line of a command's output, or empty.
fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine_facts(host: &Host, config: &MachineConfig, guest_kernel: Option<String>) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let root = crate::paths::workspace_root();
    let root = root.to_string_lossy();
    let mut commit = command_line("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    if !command_line("git", &["-C", &root, "status", "--porcelain"]).is_empty() {
        commit.push_str("-dirty");
    }
    let (qemu, kvm_kernel, nested_machine) = match host {
        Host::Nested(assets) => (
            Some(assets.qemu_version.clone()),
            Some(assets.kernel_version.clone()),
            Some((config.smp, config.memory_mib)),
        ),
        Host::Native => (None, Some(command_line("uname", &["-r"])), None),
    };
    Machine {
        host: command_line("uname", &["-srm"]),
        cpu_model,
        host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kvm: host.describe(),
        qemu,
        kvm_kernel,
        nested_machine,
        guest_kernel,
        commit,
    }
}

/// Streams the runner's progress and collects its lines.
struct Collector {
    result: BenchResult,
    planned: usize,
    unreadable: Vec<String>,
}

impl Observer for Collector {
    fn line(&mut self, _job: usize, text: &str) {
        let before = (self.result.samples.len(), self.result.failures.len());
        match self.result.absorb(text) {
            Ok(true) => {}
            Ok(false) => {
                // vpsci's note on each guest reset is expected; everything else is shown.
                if !text.contains("restarting the VM") {
                    println!("  | {text}");
                }
                return;
            }
            Err(e) => {
                self.unreadable.push(format!("{e:#}"));
                return;
            }
        }
        if self.planned == 0 {
            // Skip lines come before the first sample.
            let result = &self.result;
            self.planned = result
                .cases
                .iter()
                .filter(|c| {
                    !result
                        .skips
                        .iter()
                        .any(|s| s.workload == c.workload && s.cpus == c.cpus)
                })
                .map(|c| c.rounds as usize * c.variants.len())
                .sum();
        }
        let done = self.result.samples.len() + self.result.failures.len();
        let mut out = std::io::stdout().lock();
        if self.result.samples.len() > before.0 {
            if let Some(s) = self.result.samples.last() {
                let _ = writeln!(
                    out,
                    "[{done}/{}] {}/{} {} round {}: {} {} (sample took {:.1} s)",
                    self.planned,
                    s.workload,
                    s.cpus,
                    s.variant,
                    s.round,
                    table::num(s.value),
                    s.unit,
                    s.wall_ms / 1e3
                );
            }
        } else if self.result.failures.len() > before.1 {
            if let Some(f) = self.result.failures.last() {
                let _ = writeln!(
                    out,
                    "[{done}/{}] {}/{} {} round {}: FAILED: {}",
                    self.planned, f.workload, f.cpus, f.variant, f.round, f.error
                );
            }
        } else if let Some(skip) = self
            .result
            .skips
            .last()
            .filter(|_| text.starts_with(results::line::SKIP))
        {
            let _ = writeln!(
                out,
                "skipped: {}/{}: {}",
                skip.workload, skip.cpus, skip.reason
            );
        }
        let _ = out.flush();
    }
}

/// How long the whole runner may take: `VPSCI_NESTED_TIMEOUT` seconds if set, else 30 min
/// for `--quick` and 6 h for the full bench (each sample has its own, shorter limit).
fn job_timeout(quick: bool) -> Duration {
    std::env::var("VPSCI_NESTED_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(if quick { 1800 } else { 6 * 3600 }))
}

/// Runs the bench in the machine and returns its result; the job's own result too.
fn measure(options: &Options, args: &[String]) -> Result<(BenchResult, JobResult)> {
    let host = provision::prepare()?;
    let runner = build_runner()?;
    let mut extra = Vec::new();
    if let Some(rounds) = options.rounds {
        extra.extend(["--rounds".to_string(), rounds.to_string()]);
    }
    if let Some(filter) = &options.filter {
        extra.extend(["--filter".to_string(), filter.clone()]);
    }
    if matches!(host, Host::Nested(_)) {
        // A 64-vCPU Linux guest does not reach init in 600 s on the emulated machine.
        extra.extend([
            "--max-linux-cpus".to_string(),
            NESTED_MAX_LINUX_CPUS.to_string(),
        ]);
    }
    let (argv, files, guest_kernel) = runner_job(&runner, options.quick, &extra);
    if guest_kernel.is_none() {
        eprintln!(
            "bench: no Linux kernel in {} (an arm64 host with /dev/kvm downloads none): \
             the Linux workloads are skipped",
            provision::assets_dir().display()
        );
    }
    let config = MachineConfig::default();
    let timeout = job_timeout(options.quick);
    let session = machine::Session {
        files,
        path: Vec::new(),
        jobs: vec![Job {
            argv,
            cwd: "/".into(),
            env: crate::nested::forwarded_env(),
            timeout,
        }],
    };
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut collector = Collector {
        result: BenchResult {
            format: FORMAT,
            date: utc(started_at),
            quick: options.quick,
            args: args.to_vec(),
            machine: machine_facts(&host, &config, guest_kernel),
            load_before: load_average(),
            ..BenchResult::default()
        },
        planned: 0,
        unreadable: Vec::new(),
    };
    println!(
        "bench: {} on {} (host load average {:.2} {:.2} {:.2})",
        if options.quick {
            "quick run"
        } else {
            "full run"
        },
        host.describe(),
        collector.result.load_before[0],
        collector.result.load_before[1],
        collector.result.load_before[2]
    );
    let started = Instant::now();
    let results = machine::run(&host, &config, &session, &mut collector)?;
    collector.result.elapsed_s = started.elapsed().as_secs_f64();
    collector.result.load_after = load_average();
    for line in &collector.unreadable {
        eprintln!("bench: {line}");
    }
    let job = results
        .into_iter()
        .next()
        .context("the machine returned no result")?;
    Ok((collector.result, job))
}

/// Prints the tables; writes the charts (and the Markdown tables) next to `json`.
fn report(result: &BenchResult, json: Option<&Path>, options: &Options) -> Result<()> {
    let stamp = format!(
        "{} on {}, host load average {:.1}/{:.1}/{:.1} before, {:.1}/{:.1}/{:.1} after",
        result.date,
        result.machine.kvm,
        result.load_before[0],
        result.load_before[1],
        result.load_before[2],
        result.load_after[0],
        result.load_after[1],
        result.load_after[2]
    );
    let measurements = table::measurements(result);
    let ratios = table::ratio_table(result);
    println!("\nmeasurements ({stamp}):\n{}", measurements.text());
    println!("ratios (side by side in one run):\n{}", ratios.text());
    let idle = table::idle_exits(result);
    if let Some(idle) = &idle {
        println!(
            "guest idle: userspace exits in the windows, by kind (all rounds):\n{}",
            idle.text()
        );
    }
    let (met, missed) = table::target_counts(result);
    println!("targets: {met} met, {missed} missed");
    for skip in &result.skips {
        println!("skipped: {}/{}: {}", skip.workload, skip.cpus, skip.reason);
    }
    for failure in &result.failures {
        println!(
            "failed: {}/{} {} round {}: {}",
            failure.workload, failure.cpus, failure.variant, failure.round, failure.error
        );
    }
    let mut compared = None;
    if let Some(old_path) = &options.compare {
        let old = BenchResult::load(old_path)?;
        let (medians, ratio_changes) = table::comparison(&old, result);
        println!(
            "\nchange against {} ({}, load {:.1} before):\n{}",
            old_path.display(),
            old.date,
            old.load_before[0],
            medians.text()
        );
        println!("{}", ratio_changes.text());
        compared = Some((old_path.clone(), medians, ratio_changes));
    }
    if let Some(json) = json {
        let stem = json.with_extension("");
        let title = format!("vpsci bench {}", result.date);
        for (suffix, doc) in [
            (
                "cases",
                chart::cases_chart(result, &format!("{title}: medians, min..max and samples")),
            ),
            (
                "ratios",
                chart::ratios_chart(result, &format!("{title}: ratios against the targets")),
            ),
        ] {
            if let Some(doc) = doc {
                let path = PathBuf::from(format!("{}-{suffix}.svg", stem.display()));
                svg::save(&path, &doc).with_context(|| format!("writing {}", path.display()))?;
                println!("chart: {}", path.display());
            }
        }
    }
    if let Some(path) = &options.markdown {
        let mut text = format!(
            "Measured {stamp}.\n\n{}\n{}",
            measurements.markdown(),
            ratios.markdown()
        );
        if let Some(idle) = &idle {
            text.push('\n');
            text.push_str(&idle.markdown());
        }
        if let Some((old_path, medians, ratio_changes)) = &compared {
            text.push_str(&format!(
                "\nChange against {}:\n\n{}\n{}",
                old_path.display(),
                medians.markdown(),
                ratio_changes.markdown()
            ));
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("markdown: {}", path.display());
    }
    Ok(())
}

/// Entry point of `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let options = parse(args)?;
    if let Some(from) = &options.from {
        let result = BenchResult::load(from)?;
        report(&result, Some(from), &options)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (result, job) = measure(&options, args)?;
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!(
        "bench-{}{}.json",
        result.date.replace([':', '-'], ""),
        if options.quick { "-quick" } else { "" }
    );
    let json = dir.join(name);
    result.save(&json)?;
    println!("results: {}", json.display());
    report(&result, Some(&json), &options)?;
    let empty = result.empty_cases();
    let mut problems = Vec::new();
    if !job.passed() {
        problems.push(format!(
            "the runner: {}",
            job.describe(job_timeout(options.quick))
        ));
    }
    if !result.completed {
        problems.push("the runner did not finish".to_string());
    }
    if !result.failures.is_empty() {
        problems.push(format!(
            "{} samples failed their checks",
            result.failures.len()
        ));
    }
    if !empty.is_empty() {
        problems.push(format!("no numbers for {}", empty.join(", ")));
    }
    println!(
        "bench: {:.0} s in total (host load average {:.2} after)",
        result.elapsed_s, result.load_after[0]
    );
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("bench: FAILED: {}", problems.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

/// `vpsci-bench --quick` as one group of `cargo xtask test`'s nested session: a summary line
/// per case (medians, the ratios between variants) under the group's line. The group
/// passes when every case produced checked samples; the numbers themselves are never
/// judged (the machine is shared and emulated).
pub fn nested_groups() -> Result<Vec<crate::test::NestedGroup>> {
    let runner = build_runner()?;
    let (argv, files, _) = runner_job(&runner, true, &["--summary-only".to_string()]);
    // vpsci notes every guest reset on stderr; the summary is what this group shows.
    let command: Vec<String> = argv.iter().map(|a| machine::shell_quote(a)).collect();
    let script = format!(
        "({} 2>&1; echo $? > /tmp/vpsci-bench.status) | grep -v 'restarting the VM'; \
         exit $(cat /tmp/vpsci-bench.status)",
        command.join(" ")
    );
    Ok(vec![crate::test::NestedGroup {
        name: "bench --quick (numbers reported, never asserted)".to_string(),
        files,
        path: Vec::new(),
        job: Job {
            argv: vec!["sh".into(), "-c".into(), script],
            cwd: "/".into(),
            env: crate::nested::forwarded_env(),
            timeout: job_timeout(true),
        },
        style: crate::test::CountStyle::Check,
        show_output: true,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::strings;

    #[test]
    fn options_parse_and_bad_ones_are_refused() {
        let options = parse(&strings(&[
            "--quick",
            "--rounds",
            "3",
            "--filter",
            "linux",
            "--compare",
            "old.json",
            "--markdown",
            "t.md",
        ]))
        .unwrap();
        assert!(options.quick);
        assert_eq!(options.rounds, Some(3));
        assert_eq!(options.filter.as_deref(), Some("linux"));
        assert_eq!(options.compare, Some(PathBuf::from("old.json")));
        assert_eq!(options.markdown, Some(PathBuf::from("t.md")));
        assert!(parse(&strings(&["--rounds", "0"])).is_err());
        assert!(parse(&strings(&["--compare"])).is_err());
        assert!(parse(&strings(&["--slow"])).is_err());
    }
}
