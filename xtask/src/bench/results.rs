//! A bench run as data: what the in-machine runner (`crates/bench`, binary
//! `vpsci-bench`) printed, parsed from its console lines, plus the facts about
//! the machine and its load that make the numbers comparable. Saved as JSON
//! in `target/bench/`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Version of the JSON layout below.
pub const FORMAT: u32 = 1;

/// Prefixes of the runner's machine lines (see `crates/bench/src/report.rs`).
pub mod line {
    /// The plan.
    pub const PLAN: &str = "BENCH-PLAN ";
    /// One sample.
    pub const SAMPLE: &str = "BENCH-SAMPLE ";
    /// A failed sample.
    pub const FAIL: &str = "BENCH-FAIL ";
    /// A case that cannot run.
    pub const SKIP: &str = "BENCH-SKIP ";
    /// The counts at the end.
    pub const END: &str = "BENCH-END ";
}

/// One measurement (the runner's `Sample`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// `psci-version`, `bring-up`, ...
    pub workload: String,
    /// vCPUs of the VM.
    pub cpus: u32,
    /// `vpsci`, `floor`, `in-kernel`, ...
    pub variant: String,
    /// Round, from 0.
    pub round: u32,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// Calls, cycles or resets in the sample (idle: window seconds).
    pub work: u32,
    /// Wall time of the whole sample, ms.
    pub wall_ms: f64,
    /// Userspace exits during the sample, by kind.
    pub exits: BTreeMap<String, u64>,
    /// Workload-specific facts.
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// A sample that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Workload.
    pub workload: String,
    /// vCPUs.
    pub cpus: u32,
    /// Variant.
    pub variant: String,
    /// Round.
    pub round: u32,
    /// What went wrong.
    pub error: String,
}

/// A case that could not run here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skip {
    /// Workload.
    pub workload: String,
    /// vCPUs.
    pub cpus: u32,
    /// Why.
    pub reason: String,
}

/// A case of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// Workload.
    pub workload: String,
    /// vCPUs.
    pub cpus: u32,
    /// Work per sample.
    pub work: u32,
    /// Rounds.
    pub rounds: u32,
    /// Variants.
    pub variants: Vec<String>,
    /// Unit of its values.
    pub unit: String,
}

impl Case {
    /// `bring-up/64`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.workload, self.cpus)
    }
}

/// What the numbers were measured on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -srm` of the host.
    pub host: String,
    /// The host CPU's model name.
    pub cpu_model: String,
    /// CPUs the host offers (shared with other work).
    pub host_cpus: usize,
    /// Where KVM ran: native, or nested under QEMU.
    pub kvm: String,
    /// QEMU version (nested only).
    pub qemu: Option<String>,
    /// The KVM host kernel (nested: the kernel inside QEMU).
    pub kvm_kernel: Option<String>,
    /// vCPUs and MiB of the nested machine (nested only).
    pub nested_machine: Option<(u32, u64)>,
    /// The Linux guest kernel of the Linux workloads.
    pub guest_kernel: Option<String>,
    /// vpsci's git commit (`-dirty` with uncommitted changes).
    pub commit: String,
}

/// One run of `cargo xtask bench`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// [`FORMAT`].
    pub format: u32,
    /// When it started, UTC (`2026-12-01T02:30:00Z`).
    pub date: String,
    /// `--quick` sizes.
    pub quick: bool,
    /// The command's arguments.
    pub args: Vec<String>,
    /// The machine.
    pub machine: Machine,
    /// Host load average (1, 5, 15 min) before the run.
    pub load_before: [f64; 3],
    /// ... and after it.
    pub load_after: [f64; 3],
    /// Wall time of the whole run (machine boot included), s.
    pub elapsed_s: f64,
    /// The plan.
    pub cases: Vec<Case>,
    /// Every sample, in the order taken.
    pub samples: Vec<Sample>,
    /// Failed samples.
    pub failures: Vec<Failure>,
    /// Skipped cases.
    pub skips: Vec<Skip>,
    /// The runner's last line arrived (it did not die or time out).
    pub completed: bool,
}

impl BenchResult {
    /// Takes one runner line; false if it is not a bench line.
    pub fn absorb(&mut self, text: &str) -> Result<bool> {
        let parse = |rest: &str| -> Result<serde_json::Value> {
            serde_json::from_str(rest).with_context(|| format!("unreadable bench line: {text}"))
        };
        if let Some(rest) = text.strip_prefix(line::SAMPLE) {
            self.samples.push(serde_json::from_value(parse(rest)?)?);
        } else if let Some(rest) = text.strip_prefix(line::FAIL) {
            self.failures.push(serde_json::from_value(parse(rest)?)?);
        } else if let Some(rest) = text.strip_prefix(line::SKIP) {
            self.skips.push(serde_json::from_value(parse(rest)?)?);
        } else if let Some(rest) = text.strip_prefix(line::PLAN) {
            self.cases = serde_json::from_value(parse(rest)?["cases"].clone())?;
        } else if text.starts_with(line::END) {
            self.completed = true;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// The samples of one case and variant, in round order.
    pub fn values(&self, workload: &str, cpus: u32, variant: &str) -> Vec<(u32, f64)> {
        let mut values: Vec<(u32, f64)> = self
            .samples
            .iter()
            .filter(|s| s.workload == workload && s.cpus == cpus && s.variant == variant)
            .map(|s| (s.round, s.value))
            .collect();
        values.sort_by_key(|v| v.0);
        values
    }

    /// Cases that ran (not skipped) and lack samples of some variant.
    pub fn empty_cases(&self) -> Vec<String> {
        self.cases
            .iter()
            .filter(|c| {
                !self
                    .skips
                    .iter()
                    .any(|s| s.workload == c.workload && s.cpus == c.cpus)
            })
            .filter(|c| {
                c.variants
                    .iter()
                    .any(|v| self.values(&c.workload, c.cpus, v).is_empty())
            })
            .map(Case::id)
            .collect()
    }

    /// Reads a saved result.
    pub fn load(path: &Path) -> Result<BenchResult> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let result: BenchResult = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench result", path.display()))?;
        if result.format != FORMAT {
            anyhow::bail!(
                "{} has bench format {}, this xtask reads {FORMAT}",
                path.display(),
                result.format
            );
        }
        Ok(result)
    }

    /// Writes it as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// The host's load average (1, 5, 15 min); zeros where `/proc/loadavg` is missing.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    out
}

/// UTC date and time of `secs` since the Unix epoch, `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"BENCH-SAMPLE {"workload":"bring-up","cpus":8,"variant":"vpsci","round":0,"value":79.04,"unit":"ms","work":1,"wall_ms":349.6,"exits":{"hypercall":8,"mmio_read":0,"mmio_write":0,"wakeup":0,"system_event":0,"interrupted":7,"other":0},"detail":{"started":7}}"#;

    #[test]
    fn runner_lines_are_absorbed_and_other_lines_left_alone() {
        let mut result = BenchResult::default();
        let plan = r#"BENCH-PLAN {"cases":[{"cpus":8,"rounds":1,"unit":"ms","variants":["vpsci","in-kernel"],"work":1,"workload":"bring-up"}],"samples":2}"#;
        assert!(result.absorb(plan).unwrap());
        assert!(result.absorb(SAMPLE).unwrap());
        assert!(result
            .absorb(r#"BENCH-FAIL {"workload":"bring-up","cpus":8,"variant":"in-kernel","round":0,"error":"x"}"#)
            .unwrap());
        assert!(!result.absorb("vpsci: restarting the VM").unwrap());
        assert!(!result.completed);
        assert!(result
            .absorb(r#"BENCH-END {"samples":1,"failures":1,"skipped":0,"empty":1}"#)
            .unwrap());
        assert!(result.completed);
        assert_eq!(result.cases[0].id(), "bring-up/8");
        assert_eq!(result.samples[0].exits["interrupted"], 7);
        assert_eq!(result.values("bring-up", 8, "vpsci"), [(0, 79.04)]);
        assert_eq!(result.empty_cases(), ["bring-up/8"]);
        assert!(result.absorb("BENCH-SAMPLE {broken").is_err());
    }

    #[test]
    fn results_round_trip_through_json() {
        let mut result = BenchResult {
            format: FORMAT,
            date: utc(0),
            ..BenchResult::default()
        };
        result.absorb(SAMPLE).unwrap();
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.json");
        result.save(&path).unwrap();
        assert_eq!(BenchResult::load(&path).unwrap(), result);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_dates_are_civil() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_085_045), "2026-12-01T00:30:45Z");
    }
}
