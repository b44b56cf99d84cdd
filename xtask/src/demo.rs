//! `cargo xtask demo` (being written).
use std::process::ExitCode;
pub fn run(_args: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`cargo xtask demo` is not written yet")
}
