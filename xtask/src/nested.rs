//! `cargo xtask nested [OPTIONS] -- COMMAND...`: run a command on arm64 KVM.
//!
//! COMMAND runs inside the nested VM (natively on an arm64 host with `/dev/kvm`), with a
//! freshly built `vpsci` on PATH, in the same working directory path as on the host. Files
//! named with `--file HOST[:GUEST]` are copied in (GUEST defaults to HOST's absolute path;
//! a relative GUEST is taken from the working directory). Output streams back; the exit
//! status is COMMAND's (124 when it timed out, 125 when the machine failed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cargo::{self, cargo};
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Outcome, Session};
use crate::provision::{self, KVM_TEST_TARGET};

/// Exit status when COMMAND hit its time limit (as coreutils `timeout`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit status when the machine itself failed (did not boot, died).
pub const EXIT_MACHINE_FAILED: u8 = 125;

/// Default time limit for one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Options {
    config: MachineConfig,
    timeout: Duration,
    files: Vec<String>,
    command: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        config: MachineConfig::from_env()?,
        timeout: DEFAULT_TIMEOUT,
        files: Vec::new(),
        command: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--" => {
                options.command = args.cloned().collect();
                break;
            }
            "--smp" => {
                let text = value("--smp")?;
                options.config.smp = text
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .with_context(|| format!("--smp {text}: expected 1..64 vCPUs"))?;
            }
            "--memory" => {
                let text = value("--memory")?;
                options.config.memory_mib =
                    machine::parse_memory(&text).with_context(|| format!("--memory {text}"))?;
            }
            "--timeout" => {
                let text = value("--timeout")?;
                let secs: u64 = text
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .with_context(|| format!("--timeout {text}: expected seconds > 0"))?;
                options.timeout = Duration::from_secs(secs);
            }
            "--file" => options.files.push(value("--file")?),
            other if other.starts_with('-') => bail!("unknown option {other}"),
            _ => {
                options.command = std::iter::once(arg).chain(args).cloned().collect();
                break;
            }
        }
    }
    if options.command.is_empty() {
        bail!(
            "no command given\nusage: cargo xtask nested [--smp N] [--memory SIZE] \
             [--timeout SECS] [--file HOST[:GUEST]]... -- COMMAND..."
        );
    }
    Ok(options)
}

/// Resolves `HOST[:GUEST]` against `cwd`.
fn guest_file(spec: &str, cwd: &Path) -> Result<GuestFile> {
    let (host, guest) = match spec.split_once(':') {
        Some((host, guest)) if !guest.is_empty() => (host, Some(guest)),
        _ => (spec, None),
    };
    let host = std::fs::canonicalize(host)
        .with_context(|| format!("--file {spec}: {host} does not exist"))?;
    if !host.is_file() {
        bail!("--file {spec}: {} is not a regular file", host.display());
    }
    let guest = match guest {
        Some(guest) => cwd.join(guest),
        None => host.clone(),
    };
    Ok(GuestFile {
        host,
        guest: guest.to_string_lossy().into_owned(),
    })
}

/// Environment variables passed from the host into the machine.
pub fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(key, _)| {
            (key.starts_with("RUST_") || key.starts_with("VPSCI_"))
                && !key.starts_with("VPSCI_NESTED")
                && key != "VPSCI_TCG_THREAD"
        })
        .collect()
}

/// Builds `vpsci` for the KVM target; returns the binary.
pub fn build_vpsci() -> Result<PathBuf> {
    eprintln!("nested: building vpsci for {KVM_TEST_TARGET}");
    let (built, _) = cargo::build_executables(cargo().args([
        "build",
        "--package",
        "vpsci",
        "--bin",
        "vpsci",
        "--target",
        KVM_TEST_TARGET,
    ]))?;
    built
        .into_iter()
        .find(|e| e.target == "vpsci")
        .map(|e| e.path)
        .context("cargo built no `vpsci` binary")
}

/// Prints job output as it arrives.
pub struct Stream;

impl Observer for Stream {
    fn line(&mut self, _job: usize, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Exit code for a single command's result, printing why when it is not its own status.
pub fn exit_code(result: &JobResult, timeout: Duration) -> ExitCode {
    match &result.outcome {
        Outcome::Exited(code) => ExitCode::from(u8::try_from(*code).unwrap_or(1)),
        Outcome::TimedOut => {
            eprintln!(
                "nested: the command timed out after {} s and was killed (raise --timeout or \
                 VPSCI_NESTED_TIMEOUT if it is just slow)",
                timeout.as_secs()
            );
            ExitCode::from(EXIT_TIMED_OUT)
        }
        Outcome::Lost(why) | Outcome::NotRun(why) => {
            eprintln!("nested: {why}");
            ExitCode::from(EXIT_MACHINE_FAILED)
        }
    }
}

/// Entry point of `cargo xtask nested`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let options = parse(args)?;
    let cwd = std::env::current_dir()?;
    let mut files = options
        .files
        .iter()
        .map(|spec| guest_file(spec, &cwd))
        .collect::<Result<Vec<_>>>()?;
    let host = provision::prepare_machine()?;
    let vpsci = build_vpsci()?;
    let vpsci_dir = vpsci
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    files.push(GuestFile {
        guest: vpsci.to_string_lossy().into_owned(),
        host: vpsci,
    });
    let session = Session {
        files,
        path: vec![vpsci_dir],
        jobs: vec![Job {
            argv: options.command,
            cwd: cwd.to_string_lossy().into_owned(),
            env: forwarded_env(),
            timeout: options.timeout,
        }],
    };
    eprintln!("nested: running on {}", host.describe());
    let results = machine::run(&host, &options.config, &session, &mut Stream)?;
    match results.first() {
        Some(result) => Ok(exit_code(result, options.timeout)),
        None => bail!("the machine returned no result"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::strings;

    #[test]
    fn options_before_the_double_dash_configure_the_machine() {
        let options = parse(&strings(&[
            "--smp",
            "2",
            "--memory",
            "1G",
            "--timeout",
            "9",
            "--",
            "uname",
            "-a",
        ]))
        .unwrap();
        assert_eq!(options.config.smp, 2);
        assert_eq!(options.config.memory_mib, 1024);
        assert_eq!(options.timeout, Duration::from_secs(9));
        assert_eq!(options.command, ["uname", "-a"]);
    }

    #[test]
    fn arguments_after_the_double_dash_are_never_options() {
        let options = parse(&strings(&["--", "ls", "--smp"])).unwrap();
        assert_eq!(options.command, ["ls", "--smp"]);
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let err = parse(&strings(&["--smp", "0", "--", "x"])).unwrap_err();
        assert!(err.to_string().contains("1..64"), "{err}");
        assert!(parse(&strings(&["--smp", "2"])).is_err(), "no command");
        assert!(parse(&strings(&["--bogus", "--", "x"])).is_err());
        let err = parse(&strings(&["--memory", "12Q", "--", "x"])).unwrap_err();
        assert!(format!("{err:#}").contains("--memory 12Q"), "{err:#}");
    }

    #[test]
    fn files_default_to_their_host_path_and_relative_guests_follow_cwd() {
        let dir = std::env::temp_dir().join(format!("xtask-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("guest.bin");
        std::fs::write(&file, b"x").unwrap();
        let spec = file.to_string_lossy().into_owned();
        let same = guest_file(&spec, Path::new("/w")).unwrap();
        assert_eq!(
            same.guest,
            std::fs::canonicalize(&file).unwrap().to_string_lossy()
        );
        let moved = guest_file(&format!("{spec}:img/g.bin"), Path::new("/w")).unwrap();
        assert_eq!(moved.guest, "/w/img/g.bin");
        assert!(guest_file("/definitely/not/here", Path::new("/")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
