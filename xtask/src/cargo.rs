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

/// Workspace packages that can reach KVM on `target`: those whose dependency closure (for
/// that target, dev-dependencies included) contains `kvm-ioctls`. Their tests are the ones
/// that need the arm64 KVM machine; the rest run natively only.
pub fn packages_using_kvm(target: &str) -> Result<Vec<String>> {
    let mut cmd = cargo();
    cmd.args([
        "metadata",
        "--format-version",
        "1",
        "--filter-platform",
        target,
    ]);
    let done = run_captured(&mut cmd, Duration::from_secs(300))?;
    if !done.success() {
        bail!("`cargo metadata` failed:\n{}", done.tail(30));
    }
    let metadata: serde_json::Value =
        serde_json::from_str(&done.stdout).context("unreadable `cargo metadata` output")?;
    packages_reaching(&metadata, "kvm-ioctls")
}

/// Workspace members whose resolved dependency closure contains a package named `wanted`.
fn packages_reaching(metadata: &serde_json::Value, wanted: &str) -> Result<Vec<String>> {
    use std::collections::{BTreeMap, BTreeSet};
    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .context("cargo metadata has no packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let deps: BTreeMap<&str, Vec<&str>> = metadata["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata has no resolve graph")?
        .iter()
        .filter_map(|node| {
            let id = node["id"].as_str()?;
            let deps = node["deps"]
                .as_array()?
                .iter()
                .filter_map(|d| d["pkg"].as_str())
                .collect();
            Some((id, deps))
        })
        .collect();
    let mut found = Vec::new();
    for member in metadata["workspace_members"]
        .as_array()
        .context("cargo metadata has no workspace members")?
        .iter()
        .filter_map(|m| m.as_str())
    {
        let mut seen = BTreeSet::new();
        let mut stack = vec![member];
        let mut reaches = false;
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            if id != member && names.get(id) == Some(&wanted) {
                reaches = true;
                break;
            }
            stack.extend(deps.get(id).into_iter().flatten().copied());
        }
        if reaches {
            if let Some(name) = names.get(member) {
                found.push((*name).to_string());
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod metadata_tests {
    use super::packages_reaching;

    #[test]
    fn only_members_that_reach_the_crate_are_selected() {
        let metadata = serde_json::json!({
            "packages": [
                {"id": "a", "name": "vmm"}, {"id": "b", "name": "kvm"},
                {"id": "c", "name": "firmware"}, {"id": "k", "name": "kvm-ioctls"}
            ],
            "workspace_members": ["a", "b", "c"],
            "resolve": {"nodes": [
                {"id": "a", "deps": [{"pkg": "b"}, {"pkg": "c"}]},
                {"id": "b", "deps": [{"pkg": "k"}]},
                {"id": "c", "deps": []},
                {"id": "k", "deps": []}
            ]}
        });
        assert_eq!(
            packages_reaching(&metadata, "kvm-ioctls").unwrap(),
            ["vmm", "kvm"]
        );
    }
}
