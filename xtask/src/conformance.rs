//! `cargo xtask conformance [--long] [--filter NAME] [--against vpsci|kvm|qemu]`: the guest
//! conformance suite.
//!
//! Builds the bare-metal guests in `guests/` (aarch64-unknown-none), turns each ELF into a
//! flat image linked at 0x4008_0000, and boots one image per planned run, with the run's
//! parameters patched into the image's `VPSCICF1` block (see `guests/rt/src/config.rs`).
//! Each guest prints `VG-CHECK <scenario> PASS|FAIL|SKIP ...` lines; [`judge()`] reads them
//! exactly, checks how the run ended (`VG-DONE`, exit status, vpsci's event log) and judges
//! calls that end the VM (SYSTEM_OFF, SYSTEM_OFF2, SYSTEM_RESET2) from the VMM's side.
//!
//! `--against vpsci` (default) runs every guest under `vpsci run` on arm64 KVM: inside the
//! nested machine of [`crate::machine`] on x86_64 (one boot for the whole suite), natively
//! on an arm64 host with `/dev/kvm`. `--against kvm` runs the same guests the same way under
//! `vpsci run --in-kernel-psci`, so KVM's own PSCI answers. `--against qemu` runs them on
//! QEMU's own PSCI (TCG, `-machine virt,gic-version=3`; `virtualization=on` for the SMC
//! conduit, because QEMU then makes SMC its PSCI conduit). A skip is accepted only where
//! [`plan()`] documents that the implementation does not offer the scenario. A scenario KVM
//! or QEMU fails is a result; only a suite that cannot run is an error there.

mod hostile;
mod image;
mod judge;
mod plan;
mod qemu;
mod vpsci;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use image::prepare_images;
pub(crate) use image::{build_guests, flat_image};
use judge::{judge, RunOutput, Verdict};
use plan::plan;
use qemu::run_on_qemu;
pub use vpsci::nested_groups;
pub(crate) use vpsci::path_entry;
use vpsci::run_on_vpsci;

/// Which implementation the guests run against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Against {
    /// vpsci's engine on arm64 KVM (nested or native).
    #[default]
    Vpsci,
    /// KVM's own PSCI, under `vpsci run --in-kernel-psci`.
    Kvm,
    /// QEMU's built-in PSCI under TCG.
    Qemu,
}

impl Against {
    /// The name `--against` takes.
    pub fn label(self) -> &'static str {
        match self {
            Against::Vpsci => "vpsci",
            Against::Kvm => "kvm",
            Against::Qemu => "qemu",
        }
    }
}

impl Options {
    /// Whether `--filter` keeps scenario `name`.
    pub(crate) fn matches(&self, name: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| f.split(',').any(|part| name.contains(part)))
    }
}

/// Command-line options; the default is the whole suite, default sizes, against vpsci.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// 1000 CPU_ON race rounds and 200 system-suspend rounds instead of 100 and 20.
    pub long: bool,
    /// Only scenarios whose name contains this (or, comma-separated, any of these).
    pub filter: Option<String>,
    /// The implementation under test.
    pub against: Against,
    /// Also write the results as a Markdown table to this file.
    pub markdown: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options::default();
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
                    Some("kvm") => Against::Kvm,
                    Some("qemu") => Against::Qemu,
                    other => bail!(
                        "--against {}: expected vpsci, kvm or qemu",
                        other.unwrap_or("")
                    ),
                }
            }
            other => bail!(
                "unknown argument {other}\nusage: cargo xtask conformance [--long] \
                 [--filter NAME] [--against vpsci|kvm|qemu] [--markdown FILE]"
            ),
        }
    }
    Ok(options)
}

/// Counts of a finished suite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Scenarios that passed.
    pub passed: usize,
    /// Scenarios that failed.
    pub failed: usize,
    /// Scenarios the implementation is documented not to offer.
    pub skipped: usize,
}

impl Summary {
    /// `N passed, M failed[, K skipped]`.
    pub fn line(&self) -> String {
        let mut line = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            line.push_str(&format!(", {} skipped", self.skipped));
        }
        line
    }
}

/// Runs the suite and prints one line per scenario, each skip's reason, the race counts
/// and the summary line.
pub fn run_suite(options: &Options) -> Result<Summary> {
    let runs = plan(options);
    if runs.is_empty() {
        bail!("no scenario matches the filter");
    }
    let started = Instant::now();
    let images = prepare_images(&runs, options.long)?;
    let outputs = match options.against {
        Against::Qemu => run_on_qemu(&runs, &images)?,
        against => run_on_vpsci(&runs, &images, against)?,
    };
    let label = options.against.label();
    let mut summary = Summary::default();
    let mut table = String::from("| scenario | result | detail |\n|---|---|---|\n");
    let selected = |name: &str| options.matches(name);
    for (run, out) in runs.iter().zip(&outputs) {
        print_info(run, out, label);
        for (name, verdict) in judge(run, out, options.against) {
            if !selected(&name) {
                continue;
            }
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
    println!("{}", summary.line());
    Ok(summary)
}

/// Prints a run's measurement lines (`VG-INFO`), e.g. the race's counts per answer.
fn print_info(run: &plan::Run, out: &RunOutput, label: &str) {
    for line in &out.lines {
        if let Some(info) = line.strip_prefix("VG-INFO ") {
            println!("        [{label}] {}: {}", run.id, info.trim_end());
        }
    }
    for info in hostile::host_info(out) {
        println!("        [{label}] {}: {info}", run.id);
    }
}

/// Entry point of `cargo xtask conformance`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let options = parse(args)?;
    let summary = run_suite(&options)?;
    // Against KVM or QEMU a failing scenario is a finding about them, not a broken suite.
    if summary.failed > 0 && options.against == Against::Vpsci {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let kvm = parse(&["--against".to_string(), "kvm".to_string()]).unwrap();
        assert_eq!(kvm.against, Against::Kvm);
        assert!(parse(&["--against".to_string(), "tcg".to_string()]).is_err());
        assert!(parse(&["--bogus".to_string()]).is_err());
    }
}
