//! `cargo xtask demo`: show what vpsci does on real arm64 KVM.
//!
//! The VMM does not boot the built-in guest yet, so the demo runs the harness self-test on
//! the same machine the real demo will use (the nested VM on x86_64, the host on arm64 with
//! `/dev/kvm`) and says so: a tiny guest's PSCI calls reach userspace through the SMCCC
//! filter and userspace answers them.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cargo::{self, cargo};
use crate::machine::{self, Job, MachineConfig, Session};
use crate::nested::{exit_code, forwarded_env, Stream};
use crate::provision::{self, KVM_TEST_TARGET};
use crate::runner::{timeout_from_env, with_sibling_executables};

/// Entry point of `cargo xtask demo`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    if let Some(arg) = args.first() {
        bail!("`cargo xtask demo` takes no arguments (got `{arg}`)");
    }
    println!(
        "demo: the vpsci VMM cannot boot its default guest yet; showing the harness \
         self-test instead (a tiny guest whose PSCI calls KVM forwards to userspace)"
    );
    let host = provision::prepare()?;
    let (built, _) = cargo::build_executables(cargo().args([
        "build",
        "--package",
        "vpsci-harness-selftest",
        "--target",
        KVM_TEST_TARGET,
    ]))?;
    let selftest = built
        .into_iter()
        .find(|e| e.target == "vpsci-harness-selftest" && !e.test)
        .context("cargo built no vpsci-harness-selftest binary")?;
    let (files, bin_dir) = with_sibling_executables(&selftest.path)?;
    let timeout = timeout_from_env()?;
    let session = Session {
        files,
        path: vec![bin_dir],
        jobs: vec![Job {
            argv: vec![selftest.path.to_string_lossy().into_owned()],
            cwd: "/".to_string(),
            env: forwarded_env(),
            timeout,
        }],
    };
    println!("demo: running on {}", host.describe());
    let results = machine::run(&host, &MachineConfig::default(), &session, &mut Stream)?;
    match results.first() {
        Some(result) => Ok(exit_code(result, timeout)),
        None => bail!("the machine returned no result"),
    }
}
