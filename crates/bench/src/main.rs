//! `vpsci-bench`: the workloads of `cargo xtask bench`, run on arm64 KVM.
//!
//! Each workload runs under vpsci (every PSCI call forwarded to the engine),
//! under the empty-handler floor where a single call is timed, and under KVM's
//! in-kernel PSCI, side by side in rounds ([`plan`]). Bare-metal guests
//! ([`guests`]) time themselves with the virtual counter and check every
//! answer; Linux guests ([`linux`]) are timed on the host from their console
//! markers; guest idle is counted in userspace exits ([`vpsci::metrics`]).
//! Every sample is printed as a JSON line ([`report`]) for the host to
//! analyse, and a summary line per case ends the run.
//!
//! ```text
//! vpsci-bench [--quick] [--rounds N] [--filter PATTERN] [--linux-image FILE]
//!             [--busybox FILE] [--max-linux-cpus N] [--summary-only] [--list]
//! ```
//!
//! Exit status: 0 when every sample was taken and checked; 1 when a sample
//! failed or a case produced none (a case that cannot run here, such as the
//! Linux workloads without `--linux-image`, or Linux guests with more vCPUs than
//! `--max-linux-cpus`, is reported as skipped with its reason); 2 for a bad
//! command line.

// Off arm64 only the plan, the guests' assembly and the report formats are
// built (and unit-tested); the code that runs them is arm64-only.
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

mod asm;
mod guests;
mod linux;
mod plan;
mod report;
#[cfg(target_arch = "aarch64")]
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use plan::{Case, Sizing};

const USAGE: &str = "usage: vpsci-bench [--quick] [--rounds N] [--filter PATTERN] \
[--linux-image FILE] [--busybox FILE] [--max-linux-cpus N] [--summary-only] [--list]";

/// Command-line options.
#[derive(Debug, Default)]
struct Options {
    sizing: Sizing,
    linux_image: Option<PathBuf>,
    busybox: Option<PathBuf>,
    max_linux_cpus: Option<u32>,
    summary_only: bool,
    list: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--quick" => options.sizing.quick = true,
            "--rounds" => {
                let text = value("--rounds")?;
                options.sizing.rounds = Some(
                    text.parse()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .with_context(|| format!("--rounds {text}: expected 1..1000"))?,
                );
            }
            "--filter" => options.sizing.filter = Some(value("--filter")?),
            "--linux-image" => options.linux_image = Some(value("--linux-image")?.into()),
            "--busybox" => options.busybox = Some(value("--busybox")?.into()),
            "--max-linux-cpus" => {
                let text = value("--max-linux-cpus")?;
                options.max_linux_cpus = Some(
                    text.parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .with_context(|| format!("--max-linux-cpus {text}: expected 1 or more"))?,
                );
            }
            "--summary-only" => options.summary_only = true,
            "--list" => options.list = true,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match parse(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("vpsci-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cases = plan::cases(&options.sizing);
    if cases.is_empty() {
        eprintln!("vpsci-bench: no case matches the filter");
        return ExitCode::from(2);
    }
    if options.list {
        for step in plan::schedule(&cases) {
            println!(
                "round {} {} {}",
                step.round,
                cases[step.case].id(),
                step.variant
            );
        }
        return ExitCode::SUCCESS;
    }
    match execute(&options, &cases) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vpsci-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn execute(_options: &Options, _cases: &[Case]) -> Result<bool> {
    bail!("the workloads need arm64 KVM: run them with `cargo xtask bench`")
}

/// Runs every step; true when every case produced checked samples.
#[cfg(target_arch = "aarch64")]
fn execute(options: &Options, cases: &[Case]) -> Result<bool> {
    use report::{emit, End, PlannedCase, Skip};

    let host = vpsci_kvm::KvmHost::open().context("opening /dev/kvm")?;
    let steps = plan::schedule(cases);
    let linux = match &options.linux_image {
        Some(image) => {
            let busybox_path = options
                .busybox
                .clone()
                .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
            let busybox = std::fs::read(&busybox_path)
                .with_context(|| format!("reading busybox {}", busybox_path.display()))?;
            if !image.is_file() {
                bail!("--linux-image {}: no such file", image.display());
            }
            Some(run::LinuxAssets {
                image: image.clone(),
                busybox,
            })
        }
        None => None,
    };
    let machine = !options.summary_only;
    if machine {
        let planned: Vec<PlannedCase> = cases.iter().map(PlannedCase::from).collect();
        emit(
            report::PLAN,
            &serde_json::json!({ "cases": planned, "samples": steps.len() }),
        );
    }
    let mut skipped = vec![false; cases.len()];
    let mut skips = 0;
    for (index, case) in cases.iter().enumerate() {
        let reason = match options.max_linux_cpus {
            _ if !case.workload.needs_linux() => None,
            _ if linux.is_none() => Some(
                "no Linux image (--linux-image; `cargo xtask bench` passes the provisioned \
                 kernel when it has one)"
                    .to_owned(),
            ),
            Some(max) if case.cpus > max => Some(format!(
                "a Linux guest of {} vCPUs is more than this machine boots in reasonable time \
                 (--max-linux-cpus {max}; `cargo xtask bench` sets it on the nested, emulated \
                 machine: docs/bench.md)",
                case.cpus
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            skipped[index] = true;
            skips += 1;
            let skip = Skip {
                workload: case.workload,
                cpus: case.cpus,
                reason,
            };
            if machine {
                emit(report::SKIP, &skip);
            } else {
                println!("skipped: {} ({})", case.id(), skip.reason);
            }
        }
    }
    let mut samples = Vec::new();
    let mut failures = 0;
    for step in steps.iter().filter(|s| !skipped[s.case]) {
        let case = &cases[step.case];
        match run::sample(&host, case, step, linux.as_ref()) {
            Ok(sample) => {
                if machine {
                    emit(report::SAMPLE, &sample);
                }
                samples.push(sample);
            }
            Err(failure) => {
                failures += 1;
                if machine {
                    emit(report::FAIL, &failure);
                } else {
                    println!(
                        "FAILED: {} {} round {}: {}",
                        case.id(),
                        step.variant,
                        step.round,
                        failure.error
                    );
                }
            }
        }
    }
    let mut empty = 0;
    for (index, case) in cases.iter().enumerate() {
        if skipped[index] {
            continue;
        }
        let per_variant = case.variants.iter().all(|v| {
            samples
                .iter()
                .any(|s| s.workload == case.workload && s.cpus == case.cpus && s.variant == *v)
        });
        if !per_variant {
            empty += 1;
        }
        println!("summary: {}", report::summary_line(case, &samples));
    }
    if machine {
        emit(
            report::END,
            &End {
                samples: samples.len(),
                failures,
                skipped: skips,
                empty,
            },
        );
    }
    Ok(failures == 0 && empty == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_bad_ones_are_refused() {
        let options = parse(&strings(&[
            "--quick",
            "--rounds",
            "4",
            "--filter",
            "linux",
            "--linux-image",
            "/x/Image",
            "--max-linux-cpus",
            "8",
            "--summary-only",
        ]))
        .unwrap();
        assert_eq!(options.max_linux_cpus, Some(8));
        assert!(options.sizing.quick && options.summary_only);
        assert_eq!(options.sizing.rounds, Some(4));
        assert_eq!(options.sizing.filter.as_deref(), Some("linux"));
        assert_eq!(options.linux_image, Some(PathBuf::from("/x/Image")));
        assert!(parse(&strings(&["--rounds", "0"])).is_err());
        assert!(parse(&strings(&["--rounds"])).is_err());
        assert!(parse(&strings(&["--fast"])).is_err());
    }
}
