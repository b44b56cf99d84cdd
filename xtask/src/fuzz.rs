//! Bounded fuzzing: every cargo-fuzz target in `fuzz/` runs for a few seconds on every
//! `cargo xtask test`, from the seed corpus kept in the repository (`fuzz/corpus/<target>/`),
//! and `cargo xtask fuzz` runs the same for as long as asked (the long campaign).
//!
//! Only a stable toolchain is assumed, so cargo-fuzz's nightly flags (sanitizers,
//! `-Zbuild-std`-free coverage) are enabled with `RUSTC_BOOTSTRAP=1`. New inputs libFuzzer
//! finds go to a scratch corpus under the target directory (`<target>/fuzz-corpus/<target>`),
//! never into the repository; crashes go to `fuzz/artifacts/<target>/`.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::{run_captured, run_checked};

/// Seconds each target runs on every `cargo xtask test`.
pub const CI_SECONDS: u64 = 15;
/// The cargo-fuzz version installed when it is missing (the one the targets were written with).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What one bounded run did.
#[derive(Debug, Clone, PartialEq)]
pub struct FuzzRun {
    /// Target name (`fuzz/fuzz_targets/<name>.rs`).
    pub target: String,
    /// Whether libFuzzer finished without a finding.
    pub passed: bool,
    /// Inputs executed, from libFuzzer's `Done N runs in S second(s)`.
    pub runs: Option<u64>,
    /// Seconds libFuzzer reported.
    pub seconds: Option<u64>,
    /// Output tail (the finding, when there is one).
    pub detail: String,
}

impl FuzzRun {
    /// `N runs, R/s` for the report.
    pub fn summary(&self) -> String {
        match (self.runs, self.seconds) {
            (Some(runs), Some(secs)) => {
                format!("{runs} runs in {secs} s, {}/s", runs / secs.max(1))
            }
            _ => "no libFuzzer summary".to_owned(),
        }
    }
}

/// Installs cargo-fuzz with `cargo install` when `cargo fuzz` is missing; an error says why
/// it could not (fuzzing then fails, it is never skipped).
pub fn ensure_cargo_fuzz() -> Result<()> {
    let have = run_captured(
        crate::cargo::cargo().args(["fuzz", "--version"]),
        Duration::from_secs(60),
    );
    if matches!(&have, Ok(done) if done.success()) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install)");
    run_checked(
        crate::cargo::cargo().args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ]),
        Duration::from_secs(1800),
        "`cargo install cargo-fuzz` failed (no access to crates.io?); the bounded fuzz runs \
         of `cargo xtask test` cannot run without it",
    )?;
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    paths::workspace_root().join("fuzz")
}

fn cargo_fuzz() -> Command {
    let mut cmd = crate::cargo::cargo();
    cmd.current_dir(fuzz_dir())
        .arg("fuzz")
        .env("RUSTC_BOOTSTRAP", "1")
        // The sanitizer flags are cargo-fuzz's own; ours would rebuild everything.
        .env_remove("RUSTFLAGS");
    cmd
}

/// The targets `cargo fuzz list` names; each must have a seed corpus in the repository.
pub fn targets() -> Result<Vec<String>> {
    let done = run_captured(cargo_fuzz().arg("list"), Duration::from_secs(120))?;
    if !done.success() {
        bail!("`cargo fuzz list` failed:\n{}", done.tail(20));
    }
    let targets: Vec<String> = done
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` names no target");
    }
    for t in &targets {
        let corpus = fuzz_dir().join("corpus").join(t);
        if !corpus.is_dir() {
            bail!(
                "fuzz target {t} has no seed corpus at {} (keep a small one in the repository)",
                corpus.display()
            );
        }
    }
    Ok(targets)
}

/// Builds every target once (so the timed runs time fuzzing, not compiling).
pub fn build() -> Result<()> {
    let done = run_captured(
        cargo_fuzz().args(["build", "--release"]),
        crate::cargo::BUILD_TIMEOUT,
    )?;
    if !done.success() {
        bail!("`cargo fuzz build` failed:\n{}", done.tail(60));
    }
    Ok(())
}

/// Runs `target` for `seconds` from its repository corpus.
pub fn run_target(target: &str, seconds: u64) -> Result<FuzzRun> {
    let scratch = paths::target_dir().join("fuzz-corpus").join(target);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "--release", target])
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1");
    let limit = Duration::from_secs(seconds + 600);
    let done = run_captured(&mut cmd, limit)?;
    let (runs, secs) = parse_done(&done.output).unzip();
    Ok(FuzzRun {
        target: target.to_owned(),
        passed: done.success() && runs.is_some(),
        runs,
        seconds: secs,
        detail: done.tail(40),
    })
}

/// `(runs, seconds)` from libFuzzer's closing `Done N runs in S second(s)` line.
pub fn parse_done(output: &str) -> Option<(u64, u64)> {
    output.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("Done ")?;
        let (runs, rest) = rest.split_once(" runs in ")?;
        let secs = rest.split_whitespace().next()?;
        Some((runs.parse().ok()?, secs.parse().ok()?))
    })
}

/// `cargo xtask fuzz [--seconds N] [TARGET...]`: the long campaign (default one hour per
/// target) or a chosen few.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut seconds = 3600;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--seconds" {
            let value = it.next().context("--seconds needs a number")?;
            seconds = value
                .parse()
                .with_context(|| format!("--seconds {value}: not a number"))?;
        } else if arg.starts_with('-') {
            bail!("usage: cargo xtask fuzz [--seconds N] [TARGET...] (got `{arg}`)");
        } else {
            chosen.push(arg.clone());
        }
    }
    ensure_cargo_fuzz()?;
    let all = targets()?;
    for t in &chosen {
        if !all.contains(t) {
            bail!("no fuzz target `{t}` (targets: {})", all.join(", "));
        }
    }
    let targets = if chosen.is_empty() { all } else { chosen };
    build()?;
    let mut failed = false;
    for t in &targets {
        let started = Instant::now();
        let run = run_target(t, seconds)?;
        let status = if run.passed { "ok" } else { "FAILED" };
        println!(
            "fuzz {t} ... {status}: {} [{:.0} s]",
            run.summary(),
            started.elapsed().as_secs_f64()
        );
        if !run.passed {
            failed = true;
            for line in run.detail.lines() {
                println!("    | {line}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_closing_line() {
        let out = "#1024\tpulse  cov: 1\n#5000\tDONE   cov: 2 ft: 3\nDone 5000 runs in 16 second(s)\nstat::number_of_executed_units: 5000\n";
        assert_eq!(parse_done(out), Some((5000, 16)));
    }

    #[test]
    fn a_run_without_the_closing_line_has_no_counts() {
        assert_eq!(
            parse_done("==1==ERROR: AddressSanitizer: heap-buffer-overflow"),
            None
        );
    }
}
