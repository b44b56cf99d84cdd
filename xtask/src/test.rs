//! `cargo xtask test` (being written).
use std::process::ExitCode;
pub fn run(_args: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`cargo xtask test` is not written yet")
}
