//! Counting and printing test results: one line per group, a plain summary at the end.
//!
//! A check (fmt, clippy, doc, the harness self-test) counts as one test. A libtest binary
//! counts its own tests; if it failed without reporting a failed test (build error, crash,
//! time limit), the group counts one failure more, so nothing that did not run can pass.
//! Ignored tests are skipped tests, each named with its reason. Every libtest group has an
//! expected minimum number of tests ([`minimum_tests`]); fewer fail it. Conformance
//! scenario groups count their scenarios and must judge every scenario they plan.

use std::time::Duration;

use crate::minimums::minimum_tests;

/// Tests counted from libtest output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Ignored tests: (name, reason).
    pub ignored: Vec<(String, String)>,
    /// Names of failed tests.
    pub failed_names: Vec<String>,
    /// How many `test result:` lines were seen.
    pub summaries: u64,
}

/// Adds up every libtest summary in `output` and names the ignored and failed tests.
pub fn parse_libtest(output: &str) -> Counts {
    let mut counts = Counts::default();
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            counts.summaries += 1;
            for part in rest.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let number = |w: &str| w.parse::<u64>().unwrap_or(0);
                match words.as_slice() {
                    [.., n, "passed"] => counts.passed += number(n),
                    [n, "failed"] => counts.failed += number(n),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, outcome)) = rest.split_once(" ... ") {
                if let Some(reason) = outcome.strip_prefix("ignored") {
                    let reason = reason.trim_start_matches(',').trim();
                    let reason = if reason.is_empty() {
                        "#[ignore] without a reason"
                    } else {
                        reason
                    };
                    counts.ignored.push((name.to_string(), reason.to_string()));
                } else if outcome == "FAILED" {
                    counts.failed_names.push(name.to_string());
                }
            }
        }
    }
    counts
}

/// The `failures:` sections libtest prints (each failed test's output and panic message),
/// with the `Running` line naming the binary; empty when there are none.
pub fn failure_sections(output: &str) -> String {
    let mut sections = Vec::new();
    let mut running = "";
    let mut inside = false;
    for line in output.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("Running ") {
            running = trimmed;
        } else if trimmed == "failures:" && !inside {
            inside = true;
            sections.push(running.to_string());
        } else if trimmed.starts_with("test result:") {
            inside = false;
        }
        if inside {
            sections.push(line.to_string());
        }
    }
    sections.join("\n")
}

/// How a group ended.
#[derive(Debug)]
pub enum GroupOutcome {
    /// Conformance scenarios judged on the host (`crate::conformance`): passed, failed and
    /// skipped (with reasons) scenarios, and how many the run plans.
    Scenarios {
        /// Judged scenarios (`ignored` holds the skipped ones).
        counts: Counts,
        /// Scenarios the run plans; fewer verdicts fail the group.
        expected: u64,
    },
    /// A single check that passed or failed.
    Check {
        /// Whether it passed.
        passed: bool,
    },
    /// A libtest run: its counts and whether the process succeeded.
    Tests {
        /// Counted tests.
        counts: Counts,
        /// Exit status 0.
        success: bool,
    },
}

/// Conformance scenarios per outcome, over every scenario group.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioTally {
    /// Scenarios that passed.
    pub passed: u64,
    /// Scenarios that failed.
    pub failed: u64,
    /// Scenarios skipped (each also listed with its reason).
    pub skipped: u64,
    /// Groups (runs) they came from.
    pub groups: u64,
}

/// The running tally.
#[derive(Debug, Default)]
pub struct Report {
    passed: u64,
    failed: u64,
    skipped: Vec<String>,
    failed_groups: Vec<String>,
    scenarios: ScenarioTally,
}

/// `counts` as `: N passed, M failed[, K skipped][ (failed names)]`.
fn counts_text(counts: &Counts, failed: u64) -> String {
    let mut text = format!(": {} passed, {} failed", counts.passed, failed);
    if !counts.ignored.is_empty() {
        text.push_str(&format!(", {} skipped", counts.ignored.len()));
    }
    if !counts.failed_names.is_empty() {
        text.push_str(&format!(" ({})", counts.failed_names.join(", ")));
    }
    text
}

impl Report {
    /// Records a group and prints its line; `detail` explains a failure (printed indented).
    pub fn group(&mut self, name: &str, outcome: GroupOutcome, elapsed: Duration, detail: &str) {
        let secs = elapsed.as_secs_f64();
        let (ok, text) = match outcome {
            GroupOutcome::Check { passed } => {
                if passed {
                    self.passed += 1;
                } else {
                    self.failed += 1;
                }
                (passed, String::new())
            }
            GroupOutcome::Tests {
                mut counts,
                success,
            } => {
                if success && counts.summaries == 0 {
                    // A binary with its own harness: it ran and exited 0.
                    counts.passed = 1;
                }
                self.passed += counts.passed;
                let mut failed = counts.failed;
                if !success && failed == 0 {
                    // It failed without naming a failed test: count the group itself.
                    failed = 1;
                }
                let total = counts.passed + counts.failed + counts.ignored.len() as u64;
                let minimum = minimum_tests(name);
                let too_few = total < minimum;
                if too_few && failed == 0 {
                    // Tests that silently stopped existing or running (a cfg, a filter, an
                    // overridden RUSTFLAGS) fail the group.
                    failed = 1;
                }
                self.failed += failed;
                for (test, reason) in &counts.ignored {
                    self.skipped.push(format!("{name}: {test}: {reason}"));
                }
                let mut text = counts_text(&counts, failed);
                if too_few {
                    text.push_str(&format!(
                        " [{total} tests, expected at least {minimum}: see xtask/src/minimums.rs]"
                    ));
                }
                (success && failed == 0, text)
            }
            GroupOutcome::Scenarios { counts, expected } => {
                let skipped = counts.ignored.len() as u64;
                let total = counts.passed + counts.failed + skipped;
                let mut failed = counts.failed;
                if total < expected {
                    failed += expected - total;
                }
                self.passed += counts.passed;
                self.failed += failed;
                self.scenarios.passed += counts.passed;
                self.scenarios.failed += failed;
                self.scenarios.skipped += skipped;
                self.scenarios.groups += 1;
                for (scenario, reason) in &counts.ignored {
                    self.skipped.push(format!("{name}: {scenario}: {reason}"));
                }
                let mut text = counts_text(&counts, failed);
                if total < expected {
                    text.push_str(&format!(" [{total} scenarios judged, {expected} planned]"));
                }
                (failed == 0, text)
            }
        };
        let status = if ok { "ok" } else { "FAILED" };
        println!("{name} ... {status}{text} [{secs:.1} s]");
        if !ok {
            self.failed_groups.push(name.to_string());
            for line in detail.lines() {
                println!("    | {line}");
            }
        }
    }

    /// True when nothing failed.
    pub fn all_passed(&self) -> bool {
        self.failed == 0 && self.failed_groups.is_empty()
    }

    /// Prints the skipped tests, the failed groups and the closing summary line.
    pub fn finish(&self, total: Duration) {
        for skipped in &self.skipped {
            println!("skipped: {skipped}");
        }
        if !self.failed_groups.is_empty() {
            println!("failed groups: {}", self.failed_groups.join("; "));
        }
        println!("{}", self.scenario_line());
        println!("total time {:.0} s", total.as_secs_f64());
        println!("{}", self.summary());
    }

    /// Conformance scenarios per outcome, so a drop in how many ran shows from one run to
    /// the next.
    pub fn scenario_line(&self) -> String {
        let t = self.scenarios;
        format!(
            "conformance scenarios: {} passed, {} failed, {} skipped ({} runs)",
            t.passed, t.failed, t.skipped, t.groups
        )
    }

    /// `N passed, M failed[, K skipped]`.
    pub fn summary(&self) -> String {
        let mut line = format!("{} passed, {} failed", self.passed, self.failed);
        if !self.skipped.is_empty() {
            line.push_str(&format!(", {} skipped", self.skipped.len()));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
running 4 tests
test a::one ... ok
test a::two ... ignored, needs /dev/kvm
test a::three ... ignored
test a::four ... FAILED

test result: FAILED. 1 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s

running 2 tests
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    #[test]
    fn libtest_summaries_are_added_up_and_tests_named() {
        let counts = parse_libtest(OUTPUT);
        assert_eq!(counts.passed, 3);
        assert_eq!(counts.failed, 1);
        assert_eq!(counts.summaries, 2);
        assert_eq!(counts.failed_names, ["a::four"]);
        assert_eq!(
            counts.ignored,
            [
                ("a::two".to_string(), "needs /dev/kvm".to_string()),
                (
                    "a::three".to_string(),
                    "#[ignore] without a reason".to_string()
                )
            ]
        );
    }

    #[test]
    fn failure_sections_keep_the_panic_message_and_the_binary() {
        let output = "\
     Running tests/a.rs (target/debug/deps/a-1)
test ok_one ... ok
test bad ... FAILED

failures:

---- bad stdout ----
thread 'bad' panicked at tests/a.rs:3:5: boom

failures:
    bad

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out
";
        let sections = failure_sections(output);
        assert!(sections.starts_with("Running tests/a.rs"), "{sections}");
        assert!(sections.contains("panicked at tests/a.rs:3:5: boom"));
        assert!(!sections.contains("ok_one"));
        assert_eq!(failure_sections("test result: ok. 1 passed; 0 failed"), "");
    }

    #[test]
    fn a_failed_run_without_failed_tests_still_counts_as_a_failure() {
        let mut report = Report::default();
        report.group(
            "crashed",
            GroupOutcome::Tests {
                counts: Counts::default(),
                success: false,
            },
            Duration::ZERO,
            "segfault",
        );
        assert!(!report.all_passed());
        assert_eq!(report.summary(), "0 passed, 1 failed");
    }

    #[test]
    fn summary_names_skips_only_when_there_are_some() {
        let mut report = Report::default();
        report.group(
            "fmt",
            GroupOutcome::Check { passed: true },
            Duration::ZERO,
            "",
        );
        assert_eq!(report.summary(), "1 passed, 0 failed");
        report.group(
            "tests",
            GroupOutcome::Tests {
                counts: parse_libtest(OUTPUT),
                success: false,
            },
            Duration::ZERO,
            "",
        );
        assert_eq!(report.summary(), "4 passed, 1 failed, 2 skipped");
    }

    #[test]
    fn a_group_with_fewer_tests_than_its_minimum_fails_even_when_green() {
        let mut report = Report::default();
        let zero = "running 0 tests\ntest result: ok. 0 passed; 0 failed; 0 ignored\n";
        report.group(
            "loom model checks (firmware)",
            GroupOutcome::Tests {
                counts: parse_libtest(zero),
                success: true,
            },
            Duration::ZERO,
            "",
        );
        assert!(!report.all_passed());
        assert_eq!(report.summary(), "0 passed, 1 failed");
        let mut report = Report::default();
        report.group(
            "an unlisted group",
            GroupOutcome::Tests {
                counts: parse_libtest(zero),
                success: true,
            },
            Duration::ZERO,
            "",
        );
        assert!(!report.all_passed(), "unlisted groups still need one test");
    }

    #[test]
    fn scenario_groups_count_scenarios_list_skips_and_fail_when_verdicts_are_missing() {
        let mut report = Report::default();
        let counts = Counts {
            passed: 2,
            ignored: vec![("s3".into(), "not offered".into())],
            ..Counts::default()
        };
        report.group(
            "conformance: r",
            GroupOutcome::Scenarios {
                counts: counts.clone(),
                expected: 3,
            },
            Duration::ZERO,
            "",
        );
        assert!(report.all_passed());
        assert_eq!(report.skipped, ["conformance: r: s3: not offered"]);
        assert_eq!(
            report.scenario_line(),
            "conformance scenarios: 2 passed, 0 failed, 1 skipped (1 runs)"
        );
        report.group(
            "conformance: short",
            GroupOutcome::Scenarios {
                counts,
                expected: 5,
            },
            Duration::ZERO,
            "",
        );
        assert!(!report.all_passed());
        assert_eq!(
            report.scenario_line(),
            "conformance scenarios: 4 passed, 2 failed, 2 skipped (2 runs)"
        );
    }
}
