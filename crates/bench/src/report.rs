//! What the bench prints: one machine-readable line per event, which
//! `cargo xtask bench` reads back from the console, and a human summary.
//!
//! | line | JSON payload |
//! |---|---|
//! | `BENCH-PLAN {..}` | the cases and the number of samples |
//! | `BENCH-SAMPLE {..}` | one [`Sample`] |
//! | `BENCH-FAIL {..}` | one [`Failure`]: a check failed or the VM did not end as it should |
//! | `BENCH-SKIP {..}` | a case that cannot run here, with the reason ([`Skip`]) |
//! | `BENCH-END {..}` | counts ([`End`]) |

use serde::Serialize;
use vpsci::metrics::ExitCounts;

use crate::plan::{Case, Variant, Workload};

/// Prefix of a plan line.
pub const PLAN: &str = "BENCH-PLAN ";
/// Prefix of a sample line.
pub const SAMPLE: &str = "BENCH-SAMPLE ";
/// Prefix of a failure line.
pub const FAIL: &str = "BENCH-FAIL ";
/// Prefix of a skip line.
pub const SKIP: &str = "BENCH-SKIP ";
/// Prefix of the last line.
pub const END: &str = "BENCH-END ";

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The work.
    pub workload: Workload,
    /// vCPUs of the VM.
    pub cpus: u32,
    /// Who answered PSCI.
    pub variant: Variant,
    /// Round, from 0.
    pub round: u32,
    /// The measurement, in `unit`.
    pub value: f64,
    /// `us/call`, `ms`, `exits`, ...
    pub unit: &'static str,
    /// Calls, cycles or resets the sample did (idle: window seconds).
    pub work: u32,
    /// Wall time of the whole sample (VM built, run, stopped), in ms.
    pub wall_ms: f64,
    /// Userspace exits during the whole sample, by kind.
    pub exits: ExitCounts,
    /// Workload-specific facts (per-reset times, checked answers, ...).
    pub detail: serde_json::Value,
}

/// A sample that failed.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The work.
    pub workload: Workload,
    /// vCPUs of the VM.
    pub cpus: u32,
    /// Who answered PSCI.
    pub variant: Variant,
    /// Round, from 0.
    pub round: u32,
    /// What went wrong.
    pub error: String,
}

/// A case that cannot run on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    /// The work.
    pub workload: Workload,
    /// vCPUs of the VM.
    pub cpus: u32,
    /// Why.
    pub reason: String,
}

/// The run's counts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct End {
    /// Samples taken.
    pub samples: usize,
    /// Samples that failed.
    pub failures: usize,
    /// Cases skipped.
    pub skipped: usize,
    /// Cases that ran but produced no sample.
    pub empty: usize,
}

/// A case as the plan line lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedCase {
    /// The work.
    pub workload: Workload,
    /// vCPUs.
    pub cpus: u32,
    /// Work per sample.
    pub work: u32,
    /// Rounds.
    pub rounds: u32,
    /// Variants.
    pub variants: Vec<Variant>,
    /// Unit of the values.
    pub unit: &'static str,
}

impl From<&Case> for PlannedCase {
    fn from(case: &Case) -> PlannedCase {
        PlannedCase {
            workload: case.workload,
            cpus: case.cpus,
            work: case.work,
            rounds: case.rounds,
            variants: case.variants.clone(),
            unit: case.workload.unit(),
        }
    }
}

/// Prints `prefix` and `value` as one JSON line.
pub fn emit(prefix: &str, value: &impl Serialize) {
    match serde_json::to_string(value) {
        Ok(json) => println!("{prefix}{json}"),
        Err(e) => println!("{FAIL}{{\"error\":\"cannot encode a record: {e}\"}}"),
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// One line per case: each variant's median and sample count, then the first
/// variant's median over each other's (no targets here: `cargo xtask bench`
/// judges them).
pub fn summary_line(case: &Case, samples: &[Sample]) -> String {
    let mut parts = Vec::new();
    let mut medians = Vec::new();
    for variant in &case.variants {
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.workload == case.workload && s.cpus == case.cpus && s.variant == *variant)
            .map(|s| s.value)
            .collect();
        let m = median(&values);
        match m {
            Some(m) => parts.push(format!(
                "{variant} {} (n={})",
                format_value(m),
                values.len()
            )),
            None => parts.push(format!("{variant} -")),
        }
        medians.push((variant, m));
    }
    let mut ratios = Vec::new();
    // Idle exit counts are compared with zero, not with each other.
    let counts = case.workload.unit() == "exits";
    if let Some((first, Some(a))) = medians.first().filter(|_| !counts) {
        for (other, b) in &medians[1..] {
            if let Some(b) = b.filter(|b| *b > 0.0) {
                ratios.push(format!("{first}/{other} {:.2}", a / b));
            }
        }
    }
    let mut line = format!(
        "{:<14} {:>3} vCPUs [{}] {}",
        case.workload.name(),
        case.cpus,
        case.workload.unit(),
        parts.join(", ")
    );
    if !ratios.is_empty() {
        line.push_str(&format!("; {}", ratios.join(", ")));
    }
    line
}

/// A value with three significant digits or so.
pub fn format_value(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn sample_lines_carry_kebab_case_names() {
        let sample = Sample {
            workload: Workload::BringUp,
            cpus: 8,
            variant: Variant::InKernel,
            round: 1,
            value: 7.5,
            unit: "ms",
            work: 1,
            wall_ms: 90.0,
            exits: ExitCounts::default(),
            detail: serde_json::json!({}),
        };
        let json = serde_json::to_string(&sample).unwrap();
        assert!(json.contains("\"workload\":\"bring-up\""), "{json}");
        assert!(json.contains("\"variant\":\"in-kernel\""), "{json}");
        assert!(json.contains("\"hypercall\":0"), "{json}");
    }
}
