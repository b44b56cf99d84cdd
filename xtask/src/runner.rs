//! `cargo xtask runner BINARY [ARGS...]`: the cargo runner for `aarch64-unknown-linux-musl`.
//!
//! `.cargo/config.toml` names this as the target's runner, so `cargo test --target
//! aarch64-unknown-linux-musl` and `cargo run --target ...` execute each binary inside the
//! nested VM (natively on arm64 + `/dev/kvm`) and get its output and exit status back.
//! One boot per binary; `cargo xtask test` shares one boot between all test binaries.
//!
//! The binary keeps its host path inside the VM, and so do the executables cargo put next
//! to it (`target/<triple>/<profile>/*`, e.g. `vpsci`, which `CARGO_BIN_EXE_*` point at);
//! that directory is on PATH. Environment: `RUST_*` and `VPSCI_*` are passed in.
//! `VPSCI_NESTED_FILES` (a PATH-style list) names more host files to copy in at their host
//! paths; `VPSCI_NESTED_TIMEOUT` (seconds, default 600) bounds the run;
//! `VPSCI_NESTED_MEMORY` (`8G`, `4096M`, ...; default 2 GiB) sizes the machine's RAM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::machine::{self, GuestFile, Job, MachineConfig, Session};
use crate::nested::{exit_code, forwarded_env, Stream, DEFAULT_TIMEOUT};
use crate::provision;

/// Entry point of `cargo xtask runner`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let Some((binary, rest)) = args.split_first() else {
        anyhow::bail!("usage: cargo xtask runner BINARY [ARGS...] (normally invoked by cargo)");
    };
    let binary =
        fs::canonicalize(binary).with_context(|| format!("runner: {binary} does not exist"))?;
    let timeout = timeout_from_env()?;
    let host = provision::prepare_machine()?;
    let session = session_for(&binary, rest, timeout)?;
    let results = machine::run(&host, &MachineConfig::from_env()?, &session, &mut Stream)?;
    match results.first() {
        Some(result) => Ok(exit_code(result, timeout)),
        None => anyhow::bail!("the machine returned no result"),
    }
}

/// `VPSCI_NESTED_TIMEOUT` or the default.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("VPSCI_NESTED_TIMEOUT") {
        Ok(text) => text
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .with_context(|| format!("VPSCI_NESTED_TIMEOUT={text}: expected seconds > 0")),
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}

fn session_for(binary: &Path, args: &[String], timeout: Duration) -> Result<Session> {
    let (mut files, bin_dir) = with_sibling_executables(binary)?;
    files.extend(extra_files_from_env()?);
    let mut argv = vec![binary.to_string_lossy().into_owned()];
    argv.extend(args.iter().cloned());
    Ok(Session {
        files,
        path: vec![bin_dir],
        jobs: vec![Job {
            argv,
            cwd: std::env::current_dir()?.to_string_lossy().into_owned(),
            env: forwarded_env(),
            timeout,
        }],
    })
}

/// `binary` plus the executables in its profile directory (the parent of `deps/`), all at
/// their host paths; returns them and the profile directory.
pub fn with_sibling_executables(binary: &Path) -> Result<(Vec<GuestFile>, String)> {
    let dir = binary.parent().unwrap_or(Path::new("/"));
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let mut files = vec![at_host_path(binary.to_path_buf())];
    for entry in fs::read_dir(profile_dir)
        .with_context(|| format!("could not list {}", profile_dir.display()))?
        .flatten()
    {
        let path = entry.path();
        if path != binary && is_plain_executable(&path) {
            files.push(at_host_path(path));
        }
    }
    Ok((files, profile_dir.to_string_lossy().into_owned()))
}

fn extra_files_from_env() -> Result<Vec<GuestFile>> {
    let Some(list) = std::env::var_os("VPSCI_NESTED_FILES") else {
        return Ok(Vec::new());
    };
    std::env::split_paths(&list)
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| {
            let host = fs::canonicalize(&p).with_context(|| {
                format!(
                    "VPSCI_NESTED_FILES names {}, which does not exist",
                    p.display()
                )
            })?;
            Ok(at_host_path(host))
        })
        .collect()
}

fn at_host_path(host: PathBuf) -> GuestFile {
    GuestFile {
        guest: host.to_string_lossy().into_owned(),
        host,
    }
}

/// A regular file with an execute bit and no extension (skips `.d`, `.rlib`, ...).
fn is_plain_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.extension().is_none()
            && fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.extension().is_some_and(|e| e == "exe")
    }
}
