//! Invoking cargo and reading what it built (`--message-format=json`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::{exit_text, run_captured, Finished};

/// Cargo builds get this long before we give up on them.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(3600);

/// A `cargo` command run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(paths::workspace_root());
    cmd
}

/// An executable cargo built.
#[derive(Debug, Clone)]
pub struct Executable {
    /// Package name.
    pub package: String,
    /// Target name (crate or binary name).
    pub target: String,
    /// Target kind: `lib`, `bin`, `test`, ...
    pub kind: String,
    /// True for test harness binaries (`cargo test --no-run`).
    pub test: bool,
    /// Path on the host.
    pub path: PathBuf,
    /// Directory of the package's `Cargo.toml` (cargo runs tests from there).
    pub manifest_dir: PathBuf,
}

impl Executable {
    /// `vpsci-kvm (lib)`, `vpsci (test "boot")`.
    pub fn label(&self) -> String {
        match self.kind.as_str() {
            "lib" | "bin" if self.test => format!("{} ({} unit tests)", self.package, self.kind),
            "test" => format!("{} (test {})", self.package, self.target),
            kind => format!("{} ({kind} {})", self.package, self.target),
        }
    }
}

/// Runs `cmd` (a cargo build/test command without message-format) with
/// `--message-format=json-render-diagnostics` and returns the executables it produced.
/// On failure, the error carries cargo's rendered diagnostics.
pub fn build_executables(cmd: &mut Command) -> Result<(Vec<Executable>, Finished)> {
    cmd.arg("--message-format=json-render-diagnostics");
    let shown = crate::process::describe(cmd);
    let finished = run_captured(cmd, BUILD_TIMEOUT)?;
    if !finished.success() {
        let diagnostics: Vec<&str> = finished
            .stderr
            .lines()
            .filter(|l| !crate::process::is_cargo_progress(l))
            .collect();
        let start = diagnostics.len().saturating_sub(60);
        bail!(
            "`{shown}` failed ({}):\n{}",
            if finished.timed_out {
                format!("killed after {} s", BUILD_TIMEOUT.as_secs())
            } else {
                exit_text(finished.code)
            },
            diagnostics[start..].join("\n")
        );
    }
    let mut found = Vec::new();
    for line in finished.stdout.lines().filter(|l| l.starts_with('{')) {
        let message: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("unreadable cargo message: {line}"))?;
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(path) = message["executable"].as_str() else {
            continue;
        };
        let target = &message["target"];
        found.push(Executable {
            package: package_name(message["package_id"].as_str().unwrap_or_default()),
            target: target["name"].as_str().unwrap_or_default().to_string(),
            kind: target["kind"][0].as_str().unwrap_or_default().to_string(),
            test: message["profile"]["test"].as_bool().unwrap_or(false),
            path: PathBuf::from(path),
            manifest_dir: message["manifest_path"]
                .as_str()
                .and_then(|m| std::path::Path::new(m).parent())
                .map(PathBuf::from)
                .unwrap_or_else(paths::workspace_root),
        });
    }
    Ok((found, finished))
}

/// Package name from a package id (`path+file:///x/crates/kvm#vpsci-kvm@0.1.0` or the
/// older `vpsci-kvm 0.1.0 (path+file://...)`).
fn package_name(id: &str) -> String {
    if let Some((_, rest)) = id.rsplit_once('#') {
        let name = rest.split('@').next().unwrap_or(rest);
        // `...#0.1.0` (name omitted when it equals the directory name).
        if name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let dir = id.rsplit_once('#').map(|(p, _)| p).unwrap_or(id);
            return dir.rsplit('/').next().unwrap_or(dir).to_string();
        }
        return name.to_string();
    }
    id.split_whitespace().next().unwrap_or(id).to_string()
}

#[cfg(test)]
mod tests {
    use super::package_name;

    #[test]
    fn package_names_come_from_every_id_format() {
        assert_eq!(
            package_name("path+file:///w/crates/kvm#vpsci-kvm@0.1.0"),
            "vpsci-kvm"
        );
        assert_eq!(package_name("path+file:///w/xtask#0.1.0"), "xtask");
        assert_eq!(package_name("vpsci 0.1.0 (path+file:///w)"), "vpsci");
    }
}
