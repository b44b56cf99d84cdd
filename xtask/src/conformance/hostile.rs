//! Host-side checks of the hostile runs (docs/reliability.md): the counts a hostile guest
//! prints (`VG-INFO`) against vpsci's event log, which the job prints in full and in order
//! ([`super::vpsci`]: every `psci_call` compacted, every other line as JSON), and the
//! reset-cycle run's resource samples of the vpsci process.
//!
//! What each run must show is in [`check_log`]; the judge fails every scenario of a run
//! whose check fails, with the check's one-line reason.

use std::collections::BTreeMap;

use super::judge::RunOutput;
use super::plan::{Hostile, Run};

/// One line of the event log as the job printed it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum LogEntry {
    /// A `psci_call` line, compacted.
    Call {
        vcpu: u32,
        function: String,
        outcome: String,
        /// `result.x0` when the call returned.
        x0: Option<i64>,
    },
    /// Any other line (`power_state`, `system_event`, `wakeup`, `vm_restart`, `vm_end`).
    Line(serde_json::Value),
}

impl LogEntry {
    /// `vcpu function outcome [x0]`.
    pub(super) fn from_call(text: &str) -> Option<LogEntry> {
        let mut words = text.split_whitespace();
        let vcpu = words.next()?.parse().ok()?;
        let function = words.next()?.to_string();
        let outcome = words.next()?.to_string();
        let x0 = match words.next() {
            Some(v) => Some(v.parse().ok()?),
            None => None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(LogEntry::Call {
            vcpu,
            function,
            outcome,
            x0,
        })
    }

    fn kind(&self) -> &str {
        match self {
            LogEntry::Call { .. } => "psci_call",
            LogEntry::Line(v) => v["kind"].as_str().unwrap_or("?"),
        }
    }

    fn vcpu(&self) -> Option<u32> {
        match self {
            LogEntry::Call { vcpu, .. } => Some(*vcpu),
            LogEntry::Line(v) => v["vcpu"].as_u64().map(|v| v as u32),
        }
    }
}

/// vpsci's resources read from /proc while the reset-cycle guest waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sample {
    /// Which sample (1: the first boot, a warm-up; 2: after the first reset; 3: after the
    /// last).
    pub(super) index: u32,
    pub(super) threads: u64,
    pub(super) fds: u64,
    /// `VmRSS`, and its anonymous (`RssAnon`: heap, stacks, guest RAM) and file-backed
    /// (`RssFile`: pages of the binary's code and data read so far) parts.
    pub(super) rss_kb: u64,
    pub(super) anon_kb: u64,
    pub(super) file_kb: u64,
}

impl Sample {
    /// `k threads fds rss_kb anon_kb file_kb`.
    pub(super) fn parse(text: &str) -> Option<Sample> {
        let v: Vec<u64> = text
            .split_whitespace()
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        match v.as_slice() {
            [index, threads, fds, rss_kb, anon_kb, file_kb] => Some(Sample {
                index: u32::try_from(*index).ok()?,
                threads: *threads,
                fds: *fds,
                rss_kb: *rss_kb,
                anon_kb: *anon_kb,
                file_kb: *file_kb,
            }),
            _ => None,
        }
    }

    /// For reports.
    fn describe(&self) -> String {
        let after = match self.index {
            1 => "the first boot (warm-up)".to_string(),
            2 => "the first reset".to_string(),
            3 => "the last reset".to_string(),
            k => format!("sample {k}"),
        };
        format!(
            "vpsci after {after}: threads={} fds={} rss_kb={} (anon {}, file {})",
            self.threads, self.fds, self.rss_kb, self.anon_kb, self.file_kb
        )
    }
}

/// What the host measured during a run, as report lines (the resource samples).
pub(super) fn host_info(out: &RunOutput) -> Vec<String> {
    out.samples.iter().map(Sample::describe).collect()
}

/// `key=value` counts of the guest's `VG-INFO <prefix> ...` line.
fn guest_counts(out: &RunOutput, prefix: &str) -> Result<BTreeMap<String, i64>, String> {
    let line = out
        .lines
        .iter()
        .filter_map(|l| l.trim_end().strip_prefix("VG-INFO "))
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| format!("the guest printed no `VG-INFO {prefix}` line"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect())
}

fn count(counts: &BTreeMap<String, i64>, key: &str) -> Result<i64, String> {
    counts
        .get(key)
        .copied()
        .ok_or_else(|| format!("the guest's counts lack `{key}`"))
}

/// Calls of `function` in the log that returned `x0`.
fn returned(log: &[LogEntry], function: &str, value: i64) -> i64 {
    log.iter()
        .filter(|e| {
            matches!(e, LogEntry::Call { function: f, outcome, x0, .. }
                if f == function && outcome == "return" && *x0 == Some(value))
        })
        .count() as i64
}

/// Calls of `function` in the log, any outcome.
fn calls(log: &[LogEntry], function: &str) -> i64 {
    log.iter()
        .filter(|e| matches!(e, LogEntry::Call { function: f, .. } if f == function))
        .count() as i64
}

/// `power_state` lines of `vcpu` as (from, to).
fn transitions(log: &[LogEntry], vcpu: u32) -> Vec<(String, String)> {
    log.iter()
        .filter_map(|e| match e {
            LogEntry::Line(v) if v["kind"] == "power_state" && e.vcpu() == Some(vcpu) => Some((
                v["from"].as_str().unwrap_or("?").to_string(),
                v["to"].as_str().unwrap_or("?").to_string(),
            )),
            _ => None,
        })
        .collect()
}

fn expect_equal(what: &str, guest: i64, log: i64) -> Result<(), String> {
    if guest != log {
        return Err(format!(
            "{what}: the guest counted {guest}, the event log shows {log}"
        ));
    }
    Ok(())
}

/// The system events a clean run of `run` must leave, as the judge names them (`None`:
/// the judge's default).
pub(super) fn expected_events(run: &Run, out: &RunOutput) -> Option<String> {
    if run.restarts.is_none() && run.hostile != Some(Hostile::Off2Refused) {
        return None;
    }
    let mut events = match run.hostile {
        Some(Hostile::Off2Refused) => {
            let refused = guest_counts(out, "system-race off2-refused")
                .and_then(|c| count(&c, "internal_failure"))
                .unwrap_or(0);
            vec!["hibernate+refused"; refused.max(0) as usize]
        }
        _ => Vec::new(),
    };
    events.extend(vec!["reset"; run.restarts.unwrap_or(0) as usize]);
    events.push("off");
    Some(events.join(" "))
}

/// Checks a hostile run's event log (and samples) against the guest's counts; the reason
/// if they disagree or the log shows a rule broken.
pub(super) fn check_log(run: &Run, out: &RunOutput) -> Option<String> {
    let hostile = run.hostile?;
    if out.log.is_empty() {
        return Some("the job printed no event log".into());
    }
    let result = match hostile {
        Hostile::SmcccFuzz => smccc_fuzz(run, out),
        Hostile::CpuOnEdges => cpu_on_edges(out),
        Hostile::SuspendRace => suspend_race(run, out),
        Hostile::ResetRace => resets(run, out, "system-race reset "),
        Hostile::Off2Refused => off2_refused(out),
        Hostile::Off2Commit => off2_commit(out),
        Hostile::ResetCycles => {
            resets(run, out, "system-race reset-cycles").and_then(|()| samples_equal(out))
        }
    };
    result.err()
}

/// Every secondary started once and powered off once; the boot CPU never changed state.
fn each_secondary_started_and_stopped_once(run: &Run, log: &[LogEntry]) -> Result<(), String> {
    let once = [("off", "on_pending"), ("on_pending", "on"), ("on", "off")];
    for vcpu in 0..run.cpus {
        let seen = transitions(log, vcpu);
        let want: Vec<(String, String)> = if vcpu == 0 {
            Vec::new()
        } else {
            once.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        if seen != want {
            return Err(format!(
                "vCPU {vcpu}'s power transitions were {seen:?}, expected {want:?}"
            ));
        }
    }
    Ok(())
}

fn smccc_fuzz(run: &Run, out: &RunOutput) -> Result<(), String> {
    let guest = guest_counts(out, "smccc-fuzz-engine")?;
    let log = &out.log;
    let with_x0 = |pred: &dyn Fn(i64) -> bool| {
        log.iter()
            .filter(|e| matches!(e, LogEntry::Call { x0: Some(v), .. } if pred(*v)))
            .count() as i64
    };
    expect_equal(
        "calls of IDs the engine does not know",
        count(&guest, "unknown")?,
        calls(log, "UNKNOWN"),
    )?;
    for (key, value) in [("m1", -1), ("m2", -2), ("m3", -3), ("m9", -9)] {
        expect_equal(
            &format!("engine answers {value}"),
            count(&guest, key)?,
            with_x0(&|v| v == value),
        )?;
    }
    expect_equal(
        "other negative engine answers",
        count(&guest, "other_negative")?,
        with_x0(&|v| v < 0 && ![-1, -2, -3, -9].contains(&v)),
    )?;
    each_secondary_started_and_stopped_once(run, log)
}

fn cpu_on_edges(out: &RunOutput) -> Result<(), String> {
    let guest = guest_counts(out, "cpu-on-edges")?;
    let log = &out.log;
    let success = count(&guest, "success")?;
    expect_equal("CPU_ON SUCCESS", success, returned(log, "CPU_ON", 0))?;
    expect_equal(
        "CPU_ON INVALID_ADDRESS",
        count(&guest, "invalid_address")?,
        returned(log, "CPU_ON", -9),
    )?;
    expect_equal(
        "CPU_ON INVALID_PARAMETERS",
        count(&guest, "invalid_parameters")?,
        returned(log, "CPU_ON", -2),
    )?;
    expect_equal(
        "CPU_ON calls",
        success + count(&guest, "invalid_address")? + count(&guest, "invalid_parameters")?,
        calls(log, "CPU_ON"),
    )?;
    let target = transitions(log, 1);
    let starts = target
        .iter()
        .filter(|(a, b)| a == "off" && b == "on_pending")
        .count() as i64;
    let stops = target
        .iter()
        .filter(|(a, b)| a == "on" && b == "off")
        .count() as i64;
    expect_equal("the target's starts (off -> on_pending)", success, starts)?;
    expect_equal("the target's power-offs", success, stops)?;
    if !transitions(log, 0).is_empty() {
        return Err("the boot CPU changed power state".into());
    }
    Ok(())
}

/// Replays the `power_state` lines: at every `on -> suspended_system` of the boot CPU
/// every other vCPU must be `off`.
fn suspend_race(run: &Run, out: &RunOutput) -> Result<(), String> {
    let guest = guest_counts(out, "system-race suspend")?;
    let log = &out.log;
    let mut state: Vec<String> = (0..run.cpus)
        .map(|i| if i == 0 { "on" } else { "off" }.to_string())
        .collect();
    let mut commits = 0i64;
    for entry in log {
        let LogEntry::Line(v) = entry else { continue };
        if v["kind"] != "power_state" {
            continue;
        }
        let vcpu = entry.vcpu().unwrap_or(u32::MAX) as usize;
        let (Some(from), Some(to)) = (v["from"].as_str(), v["to"].as_str()) else {
            return Err(format!("unreadable power_state line {v}"));
        };
        let Some(slot) = state.get_mut(vcpu) else {
            return Err(format!("power_state line of an unknown vCPU: {v}"));
        };
        if slot != from {
            return Err(format!("vCPU {vcpu} went {from} -> {to} but was {slot}"));
        }
        *slot = to.to_string();
        if vcpu == 0 && to == "suspended_system" {
            commits += 1;
            if let Some((other, s)) = state.iter().enumerate().skip(1).find(|(_, s)| *s != "off") {
                return Err(format!(
                    "SYSTEM_SUSPEND committed (#{commits}) while vCPU {other} was {s}"
                ));
            }
        }
    }
    let committed = count(&guest, "committed")?;
    expect_equal(
        "committed SYSTEM_SUSPENDs (power_state)",
        committed,
        commits,
    )?;
    expect_equal(
        "committed SYSTEM_SUSPENDs (calls)",
        committed,
        log.iter()
            .filter(|e| {
                matches!(e, LogEntry::Call { function, outcome, .. }
                if function == "SYSTEM_SUSPEND" && outcome == "suspend")
            })
            .count() as i64,
    )?;
    expect_equal(
        "SYSTEM_SUSPEND DENIED",
        count(&guest, "denied")?,
        returned(log, "SYSTEM_SUSPEND", -3),
    )?;
    expect_equal(
        "SYSTEM_SUSPEND calls",
        committed + count(&guest, "denied")?,
        calls(log, "SYSTEM_SUSPEND"),
    )
}

/// After a committed system event of vCPU `caller`, no power transition (nor wake-up) of
/// another vCPU until `until` (a `vm_restart` or `vm_end` line): the engine writes those
/// while it holds the state it changes, so their place in the log is the order of the
/// decisions. (A `psci_call` line is written by the vCPU thread after the engine answered,
/// outside its locks: a call decided before the commit may be logged after it, so call
/// lines prove nothing about order.)
fn quiet_after_commit(log: &[LogEntry], event: &str, until: &str) -> Result<i64, String> {
    let mut commits = 0;
    let mut held: Option<u32> = None;
    for entry in log {
        match entry {
            LogEntry::Line(v)
                if v["kind"] == "system_event"
                    && v["event"] == event
                    && v.get("refused").is_none() =>
            {
                commits += 1;
                held = entry.vcpu();
            }
            LogEntry::Line(v) if v["kind"] == until => held = None,
            LogEntry::Line(v) if v["kind"] == "power_state" || v["kind"] == "wakeup" => {
                if let (Some(caller), Some(vcpu)) = (held, entry.vcpu()) {
                    if vcpu != caller {
                        return Err(format!(
                            "after the committed {event} #{commits} of vCPU {caller}, vCPU {vcpu} changed state: {}",
                            describe(entry)
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(commits)
}

fn describe(entry: &LogEntry) -> String {
    match entry {
        LogEntry::Call {
            function,
            outcome,
            x0,
            ..
        } => format!(
            "{function} {outcome} {}",
            x0.map_or(String::new(), |v| v.to_string())
        ),
        LogEntry::Line(v) => v.to_string(),
    }
}

fn resets(run: &Run, out: &RunOutput, prefix: &str) -> Result<(), String> {
    let guest = guest_counts(out, prefix)?;
    let log = &out.log;
    let commits = quiet_after_commit(log, "reset", "vm_restart")?;
    let restarts = log.iter().filter(|e| e.kind() == "vm_restart").count() as i64;
    let wanted = i64::from(run.restarts.unwrap_or(0));
    expect_equal("resets", count(&guest, "resets")?, commits)?;
    expect_equal("restarts", wanted, restarts)?;
    let returned_calls = log
        .iter()
        .filter(|e| {
            matches!(e, LogEntry::Call { function, outcome, .. }
            if function == "SYSTEM_RESET" && outcome == "return")
        })
        .count() as i64;
    expect_equal(
        "SYSTEM_RESET calls that returned",
        count(&guest, "returned")?,
        returned_calls,
    )
}

fn off2_refused(out: &RunOutput) -> Result<(), String> {
    let guest = guest_counts(out, "system-race off2-refused")?;
    let log = &out.log;
    let refused_events = log
        .iter()
        .filter(|e| {
            matches!(e, LogEntry::Line(v)
            if v["kind"] == "system_event" && v["event"] == "hibernate" && v["refused"] == true)
        })
        .count() as i64;
    let refusals = count(&guest, "internal_failure")?;
    expect_equal("refused hibernate events", refusals, refused_events)?;
    expect_equal(
        "SYSTEM_OFF2 INTERNAL_FAILURE",
        refusals,
        returned(log, "SYSTEM_OFF2", -6),
    )?;
    expect_equal(
        "SYSTEM_OFF2 INVALID_PARAMETERS",
        count(&guest, "invalid_parameters")?,
        returned(log, "SYSTEM_OFF2", -2),
    )?;
    if !transitions(log, 0).is_empty() {
        return Err("a refused SYSTEM_OFF2 changed the caller's power state".into());
    }
    Ok(())
}

fn off2_commit(out: &RunOutput) -> Result<(), String> {
    let guest = guest_counts(out, "system-race off2-commit")?;
    let log = &out.log;
    expect_equal(
        "SYSTEM_OFF2 INVALID_PARAMETERS",
        count(&guest, "invalid_parameters")?,
        returned(log, "SYSTEM_OFF2", -2),
    )?;
    let commits = quiet_after_commit(log, "hibernate", "vm_end")?;
    expect_equal("committed hibernate events", 1, commits)
}

/// How much the anonymous resident memory may differ between the two compared samples: one
/// page. The heap's high-water mark moves by a page now and then without anything leaking
/// (1000 cycles measured +4 KiB, 20 cycles +0 and +4 KiB); a leak of more than
/// `PAGE_KB * 1024 / (cycles - 1)` bytes per cycle (4 bytes over 1000 cycles, 215 over 20)
/// still shows.
const PAGE_KB: u64 = 4;

/// The samples after the first and the last reset have the same threads and open
/// descriptors, and anonymous resident memory within [`PAGE_KB`] (the first boot's sample
/// is a warm-up: its handshake byte is the first console input vpsci buffers). The
/// file-backed part is reported, not compared: it grows as code first runs, which is no
/// leak.
fn samples_equal(out: &RunOutput) -> Result<(), String> {
    let [_warm_up, first, last] = out.samples.as_slice() else {
        return Err(format!(
            "{} resource samples of vpsci, expected 3",
            out.samples.len()
        ));
    };
    if (first.threads, first.fds) != (last.threads, last.fds)
        || last.anon_kb > first.anon_kb + PAGE_KB
    {
        return Err(format!(
            "vpsci's resources grew: after the first reset threads={} fds={} anon_kb={}, after the last threads={} fds={} anon_kb={} (at most {PAGE_KB} kB more allowed)",
            first.threads, first.fds, first.anon_kb, last.threads, last.fds, last.anon_kb
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::plan::tests::planned;
    use crate::conformance::Against;
    use serde_json::json;

    fn call(vcpu: u32, function: &str, outcome: &str, x0: Option<i64>) -> LogEntry {
        LogEntry::Call {
            vcpu,
            function: function.into(),
            outcome: outcome.into(),
            x0,
        }
    }

    fn power(vcpu: u32, from: &str, to: &str) -> LogEntry {
        LogEntry::Line(json!({"kind": "power_state", "vcpu": vcpu, "from": from, "to": to}))
    }

    fn event(vcpu: u32, name: &str) -> LogEntry {
        LogEntry::Line(json!({"kind": "system_event", "vcpu": vcpu, "event": name}))
    }

    fn line(kind: &str) -> LogEntry {
        LogEntry::Line(json!({"kind": kind}))
    }

    fn output(info: &str, log: Vec<LogEntry>) -> RunOutput {
        RunOutput {
            lines: vec![format!("VG-INFO {info}")],
            log,
            ..RunOutput::default()
        }
    }

    #[test]
    fn compacted_calls_parse_and_anything_else_is_refused() {
        assert_eq!(
            LogEntry::from_call("3 CPU_ON return -9"),
            Some(call(3, "CPU_ON", "return", Some(-9)))
        );
        assert_eq!(
            LogEntry::from_call("0 SYSTEM_SUSPEND suspend"),
            Some(call(0, "SYSTEM_SUSPEND", "suspend", None))
        );
        for bad in [
            "",
            "x CPU_ON return 0",
            "0 CPU_ON",
            "0 CPU_ON return zero",
            "0 A b 1 2",
        ] {
            assert_eq!(LogEntry::from_call(bad), None, "{bad:?}");
        }
        assert_eq!(
            Sample::parse("2 11 9 2048 1024 1024"),
            Some(Sample {
                index: 2,
                threads: 11,
                fds: 9,
                rss_kb: 2048,
                anon_kb: 1024,
                file_kb: 1024,
            })
        );
        assert_eq!(Sample::parse("2 11 9 2048 1024"), None);
        assert_eq!(Sample::parse("2 11 9 2048 1024 x"), None);
    }

    #[test]
    fn a_system_suspend_committed_while_another_vcpu_is_on_fails_the_race() {
        let run = planned(Against::Vpsci, "system-suspend-race-8");
        let clean = vec![
            power(1, "off", "on_pending"),
            power(1, "on_pending", "on"),
            call(0, "SYSTEM_SUSPEND", "return", Some(-3)),
            power(1, "on", "off"),
            power(0, "on", "suspended_system"),
            call(0, "SYSTEM_SUSPEND", "suspend", None),
            power(0, "suspended_system", "on"),
        ];
        let info = "system-race suspend rounds=1 committed=1 denied=1";
        assert_eq!(check_log(&run, &output(info, clean.clone())), None);
        // The same log with vCPU 1's power-off after the commit.
        let mut late = clean.clone();
        late.swap(3, 4);
        let why = check_log(&run, &output(info, late)).unwrap();
        assert!(why.contains("while vCPU 1 was on"), "{why}");
        // A DENIED the guest did not count.
        let why = check_log(
            &run,
            &output("system-race suspend committed=1 denied=0", clean),
        )
        .unwrap();
        assert!(why.contains("DENIED"), "{why}");
    }

    #[test]
    fn a_transition_of_another_vcpu_between_a_reset_and_the_restart_fails_the_race() {
        let run = planned(Against::Vpsci, "system-reset-race-8");
        let resets = run.restarts.unwrap();
        let mut log = Vec::new();
        for _ in 0..resets {
            log.push(call(3, "CPU_ON", "return", Some(0)));
            log.push(event(0, "reset"));
            log.push(call(0, "SYSTEM_RESET", "system_event", None));
            log.push(line("vm_restart"));
            log.push(power(3, "on", "off"));
        }
        log.push(event(0, "off"));
        let info = format!("system-race reset resets={resets} returned=0");
        assert_eq!(check_log(&run, &output(&info, log.clone())), None);
        // A call line after the event: written after its decision, so no proof of order.
        log.insert(2, call(5, "CPU_ON", "return", Some(-4)));
        assert_eq!(check_log(&run, &output(&info, log.clone())), None);
        // A transition after the event: decided after the commit.
        log.insert(2, power(6, "off", "on_pending"));
        let why = check_log(&run, &output(&info, log)).unwrap();
        assert!(why.contains("vCPU 6 changed state"), "{why}");
    }

    #[test]
    fn the_fuzzers_engine_answers_must_match_the_log() {
        let run = planned(Against::Vpsci, "smccc-fuzz-hvc");
        let mut log = vec![
            call(0, "UNKNOWN", "return", Some(-1)),
            call(1, "CPU_ON", "return", Some(-2)),
            call(0, "PSCI_FEATURES", "return", Some(-1)),
        ];
        for vcpu in 1..run.cpus {
            log.push(power(vcpu, "off", "on_pending"));
            log.push(power(vcpu, "on_pending", "on"));
            log.push(power(vcpu, "on", "off"));
        }
        let info = "smccc-fuzz-engine unknown=1 m1=2 m2=1 m3=0 m9=0 other_negative=0";
        assert_eq!(check_log(&run, &output(info, log.clone())), None);
        let why = check_log(
            &run,
            &output(
                "smccc-fuzz-engine unknown=1 m1=1 m2=1 m3=0 m9=0 other_negative=0",
                log.clone(),
            ),
        )
        .unwrap();
        assert!(why.contains("engine answers -1"), "{why}");
        // A CPU_OFF over the wrong conduit that took effect shows as a second power-off.
        log.push(power(2, "on", "off"));
        let why = check_log(&run, &output(info, log)).unwrap();
        assert!(why.contains("vCPU 2's power transitions"), "{why}");
    }

    #[test]
    fn reset_cycles_compare_the_samples_after_the_first_and_the_last_reset() {
        let run = planned(Against::Vpsci, "reset-cycles-8");
        let resets = run.restarts.unwrap();
        let mut log = Vec::new();
        for _ in 0..resets {
            log.push(event(0, "reset"));
            log.push(line("vm_restart"));
        }
        let info = format!("system-race reset-cycles resets={resets} returned=0");
        let sample = |index, anon_kb, file_kb| Sample {
            index,
            threads: 11,
            fds: 9,
            rss_kb: anon_kb + file_kb,
            anon_kb,
            file_kb,
        };
        let mut out = output(&info, log);
        // More of the binary read by the last sample: reported, not a leak.
        out.samples = vec![
            sample(1, 3996, 2000),
            sample(2, 4000, 2000),
            sample(3, 4004, 2008),
        ];
        assert_eq!(check_log(&run, &out), None);
        out.samples = vec![
            sample(1, 4000, 2000),
            sample(2, 4000, 2000),
            sample(3, 4008, 2000),
        ];
        let why = check_log(&run, &out).unwrap();
        assert!(why.contains("anon_kb=4008"), "{why}");
        let mut more_threads = sample(3, 4000, 2000);
        more_threads.threads += 1;
        out.samples = vec![sample(1, 4000, 2000), sample(2, 4000, 2000), more_threads];
        let why = check_log(&run, &out).unwrap();
        assert!(why.contains("threads=12"), "{why}");
        out.samples.pop();
        assert!(check_log(&run, &out)
            .unwrap()
            .contains("2 resource samples"));
    }

    #[test]
    fn refused_hibernates_set_the_expected_system_events() {
        let run = planned(Against::Vpsci, "system-off2-refused-race-8");
        let out = output(
            "system-race off2-refused calls=3 internal_failure=2 invalid_parameters=1",
            Vec::new(),
        );
        assert_eq!(
            expected_events(&run, &out).as_deref(),
            Some("hibernate+refused hibernate+refused off")
        );
        let run = planned(Against::Vpsci, "reset-cycles-8");
        let expected = expected_events(&run, &out).unwrap();
        assert_eq!(
            expected.matches("reset").count(),
            run.restarts.unwrap() as usize
        );
        assert!(expected.ends_with(" off"));
        assert_eq!(
            expected_events(&planned(Against::Vpsci, "cpu-on-edges"), &out),
            None
        );
    }
}
