//! `cargo xtask`: developer and CI tasks for vpsci.
//!
//! Commands (one module each):
//! - `test`: the whole gate (fmt, clippy, doc, native tests, KVM tests in the nested VM).
//! - `bench`: vpsci against the empty-handler floor and KVM's in-kernel PSCI, with charts.
//! - `demo`: show vpsci at work on real arm64 KVM.
//! - `nested`: run a command inside the nested arm64 KVM machine.
//! - `runner`: the cargo runner for `aarch64-unknown-linux-musl` (see `.cargo/config.toml`).
//! - `fuzz`: the long fuzzing campaign (every `test` runs each target briefly).
//! - `setup`: install and cache what the nested machine needs, then stop.
//!
//! The nested machine itself lives in [`machine`]; what it needs from the host in
//! [`provision`].

mod bench;
mod cargo;
mod conformance;
mod demo;
mod fuzz;
mod hibernate_kernel;
mod initramfs;
mod machine;
mod minimums;
mod nested;
mod paths;
mod process;
mod provision;
mod report;
mod runner;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  test      [--long]
            fmt, clippy, doc, native tests and every KVM test inside the nested VM
            (--long: the conformance suite's long sizes, the Linux hotplug storm at 64 vCPUs)
  bench     [--quick] [--rounds N] [--filter PATTERN] [--compare OLD.json] [--from RESULT.json]
            [--markdown FILE]
            workloads under vpsci, the empty-handler floor and in-kernel PSCI, side by side
            (docs/bench.md); results and charts in target/bench/
  demo      [--cpus N] | --linux
            boot the built-in demo guest on vpsci (nested on x86_64, native on arm64 + /dev/kvm);
            --linux: a Linux guest's suspend, alarm wake, hibernate and resume instead
  conformance [--long] [--filter NAME] [--against vpsci|kvm|qemu]
            run the guest conformance suite (docs/conformance.md)
  fuzz      [--seconds N] [TARGET...]
            run the cargo-fuzz targets (default: all, 3600 s each; docs/reliability.md)
  nested    [--smp N] [--memory SIZE] [--timeout SECS] [--file HOST[:GUEST]]... -- COMMAND...
            run COMMAND inside the nested arm64 KVM machine with vpsci on PATH
  runner    BINARY [ARGS...]   cargo runner for aarch64-unknown-linux-musl
  setup     install and cache QEMU, the arm64 kernel, busybox, rustup targets and cargo-fuzz
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    let result = match command.as_deref() {
        Some("test") => test::run(&rest),
        Some("bench") => bench::run(&rest),
        Some("demo") => demo::run(&rest),
        Some("conformance") => conformance::run(&rest),
        Some("fuzz") => fuzz::run(&rest),
        Some("nested") => nested::run(&rest),
        Some("runner") => runner::run(&rest),
        Some("setup") => setup(&rest),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask setup`: provisioning only, so a developer can warm the cache once.
fn setup(args: &[String]) -> anyhow::Result<ExitCode> {
    if let Some(arg) = args.first() {
        anyhow::bail!("`setup` takes no arguments (got `{arg}`)");
    }
    let host = provision::prepare()?;
    println!("setup: ready ({})", host.describe());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod test_util {
    /// Owned command-line arguments, as the option parsers take them.
    pub fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }
}
