//! Reads a `vpsci run --events` log (schema in `docs/event-log.md`) and summarises it for a
//! person: each vCPU's power-state timeline, PSCI call counts by function and result, every
//! contested CPU_ON (a "race": more than one CPU_ON aimed at one target), the system
//! events, the wake-ups of suspended vCPUs with their sources, restarts and how the run
//! ended.
//!
//! vpsci logs a vCPU's transitions from the vCPU's own thread, so the OFF -> ON_PENDING step
//! a CPU_ON makes on its target has no `power_state` line; the timeline shows it from the
//! successful CPU_ON call instead (marked with the caller, without a time of its own).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use serde_json::Value;

/// One power-state transition of a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Nanoseconds since the VM started; `None` for a step the log shows only through the
    /// CPU_ON that caused it.
    pub t_ns: Option<u64>,
    /// For an OFF -> ON_PENDING step taken from a successful CPU_ON: its caller.
    pub started_by: Option<u32>,
    /// State before (`off`, `on_pending`, `on`, ...).
    pub from: String,
    /// State after.
    pub to: String,
}

/// One CPU_ON call aimed at a contested target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaceCall {
    /// The calling vCPU.
    pub caller: u32,
    /// Its answer (`SUCCESS`, `ALREADY_ON`, ...).
    pub answer: String,
}

/// Every CPU_ON aimed at one target that more than one call went to while the target was
/// not taken OFF in between (one "episode" of the target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Race {
    /// The target's MPIDR affinity, as the callers passed it.
    pub target_mpidr: u64,
    /// The calls, in log order.
    pub calls: Vec<RaceCall>,
}

impl Race {
    /// Callers that were told SUCCESS.
    pub fn winners(&self) -> Vec<u32> {
        self.calls
            .iter()
            .filter(|c| c.answer == "SUCCESS")
            .map(|c| c.caller)
            .collect()
    }
}

/// A committed system event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemEventLine {
    /// Nanoseconds since the VM started.
    pub t_ns: u64,
    /// The vCPU that made the call.
    pub vcpu: u32,
    /// `off`, `hibernate`, `reset`, ...
    pub event: String,
}

/// A suspended vCPU woken by KVM (a `wakeup` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeupLine {
    /// Nanoseconds since the VM started.
    pub t_ns: u64,
    /// The vCPU that was woken.
    pub vcpu: u32,
    /// The devices whose interrupt lines woke it (`pl031`, ...).
    pub sources: Vec<String>,
}

/// What an event log says, digested.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Every vCPU named in the log, with its transitions in time order.
    pub timelines: BTreeMap<u32, Vec<Transition>>,
    /// (function, result) -> number of calls.
    pub calls: BTreeMap<String, BTreeMap<String, usize>>,
    /// Contested CPU_ON targets, in order of their first call.
    pub races: Vec<Race>,
    /// System events, in log order.
    pub system_events: Vec<SystemEventLine>,
    /// Wake-ups from suspension, in log order.
    pub wakeups: Vec<WakeupLine>,
    /// `vm_restart` lines (`--on-reset restart`).
    pub restarts: usize,
    /// The `vm_end` line: exit status and reason.
    pub end: Option<(u64, String)>,
    /// Lines that were not events of the documented schema.
    pub unreadable: usize,
}

/// A function's name without the SMC64 suffix the log gives 64-bit calling-convention IDs
/// (`CPU_ON64` -> `CPU_ON`).
fn base_name(function: &str) -> &str {
    function.strip_suffix("64").unwrap_or(function)
}

/// PSCI return code names (DEN0022 F.b table 5.2).
fn status_name(code: i64) -> Option<&'static str> {
    Some(match code {
        0 => "SUCCESS",
        -1 => "NOT_SUPPORTED",
        -2 => "INVALID_PARAMETERS",
        -3 => "DENIED",
        -4 => "ALREADY_ON",
        -5 => "ON_PENDING",
        -6 => "INTERNAL_FAILURE",
        -7 => "NOT_PRESENT",
        -8 => "DISABLED",
        -9 => "INVALID_ADDRESS",
        _ => return None,
    })
}

/// A call's result as a person reads it: status names, AFFINITY_INFO states, versions.
fn result_label(function: &str, result: &Value) -> String {
    let outcome = result["outcome"].as_str().unwrap_or("?");
    match outcome {
        "return" => {
            let Some(x0) = result["x0"].as_i64() else {
                return "return ?".to_string();
            };
            match base_name(function) {
                "AFFINITY_INFO" => match x0 {
                    0 => "ON".to_string(),
                    1 => "OFF".to_string(),
                    2 => "ON_PENDING".to_string(),
                    other => status_name(other).map_or(other.to_string(), str::to_string),
                },
                "PSCI_VERSION" if x0 >= 0 => format!("{}.{}", x0 >> 16, x0 & 0xffff),
                "PSCI_FEATURES" if x0 >= 0 => format!("supported (flags {x0:#x})"),
                _ if x0 < 0 => status_name(x0).map_or(x0.to_string(), str::to_string),
                _ if x0 == 0 => "SUCCESS".to_string(),
                _ => format!("{x0:#x}"),
            }
        }
        "suspend" => format!("suspended ({})", result["suspend"].as_str().unwrap_or("?")),
        "power_off" => "powered off".to_string(),
        "system_event" => "system event".to_string(),
        other => other.to_string(),
    }
}

fn hex(value: &Value) -> Option<u64> {
    u64::from_str_radix(value.as_str()?.strip_prefix("0x")?, 16).ok()
}

/// Reads the log's lines (blank lines are skipped; anything else that is not an event is
/// counted in [`Summary::unreadable`]).
pub fn summarise<'a>(lines: impl IntoIterator<Item = &'a str>) -> Summary {
    let mut summary = Summary::default();
    let mut events: Vec<Value> = Vec::new();
    for line in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            // vm_restart and vm_end belong to the VM, not to a vCPU.
            Ok(v) if v["t_ns"].is_u64() && v["kind"].is_string() => {
                match v["kind"].as_str().unwrap_or_default() {
                    "vm_restart" => summary.restarts += 1,
                    "vm_end" => {
                        summary.end = Some((
                            v["exit_status"].as_u64().unwrap_or(u64::MAX),
                            v["reason"].as_str().unwrap_or_default().to_string(),
                        ))
                    }
                    _ if v["vcpu"].is_u64() => events.push(v),
                    _ => summary.unreadable += 1,
                }
            }
            _ => summary.unreadable += 1,
        }
    }
    // Lines are written in order under one lock, but sort anyway: the timeline is by time.
    events.sort_by_key(|v| v["t_ns"].as_u64().unwrap_or(0));
    // CPU_ONs are grouped by (target MPIDR, episode): a target's episode ends each time it
    // goes OFF, so a guest that starts a CPU again after taking it down (Linux hotplug,
    // suspend) makes a new episode, not a race.
    let mut race_calls: BTreeMap<(u64, u32), Vec<RaceCall>> = BTreeMap::new();
    let mut race_order: Vec<(u64, u32)> = Vec::new();
    let mut episodes: BTreeMap<u64, u32> = BTreeMap::new();
    // vCPU -> callers of its successful CPU_ONs, in log order.
    let mut started_by: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for v in &events {
        let t_ns = v["t_ns"].as_u64().unwrap_or(0);
        let vcpu = v["vcpu"].as_u64().unwrap_or(0) as u32;
        summary.timelines.entry(vcpu).or_default();
        match v["kind"].as_str().unwrap_or_default() {
            "power_state" => {
                let (Some(from), Some(to)) = (v["from"].as_str(), v["to"].as_str()) else {
                    summary.unreadable += 1;
                    continue;
                };
                if to == "off" {
                    *episodes.entry(u64::from(vcpu)).or_default() += 1;
                }
                summary.timelines.entry(vcpu).or_default().push(Transition {
                    t_ns: Some(t_ns),
                    started_by: None,
                    from: from.to_string(),
                    to: to.to_string(),
                });
            }
            "psci_call" => {
                let function = v["function"].as_str().unwrap_or("?").to_string();
                let label = result_label(&function, &v["result"]);
                if base_name(&function) == "CPU_ON" {
                    if let Some(target) = hex(&v["args"][0]) {
                        if label == "SUCCESS" {
                            started_by
                                .entry(vcpu_of_mpidr(target) as u32)
                                .or_default()
                                .push(vcpu);
                        }
                        let episode = episodes.get(&vcpu_of_mpidr(target)).copied().unwrap_or(0);
                        let key = (target, episode);
                        if !race_calls.contains_key(&key) {
                            race_order.push(key);
                        }
                        race_calls.entry(key).or_default().push(RaceCall {
                            caller: vcpu,
                            answer: label.clone(),
                        });
                    }
                }
                *summary
                    .calls
                    .entry(function)
                    .or_default()
                    .entry(label)
                    .or_default() += 1;
            }
            "system_event" => summary.system_events.push(SystemEventLine {
                t_ns,
                vcpu,
                event: match v["refused"].as_bool() {
                    Some(true) => format!("{} (refused)", v["event"].as_str().unwrap_or("?")),
                    _ => v["event"].as_str().unwrap_or("?").to_string(),
                },
            }),
            "wakeup" => summary.wakeups.push(WakeupLine {
                t_ns,
                vcpu,
                sources: v["sources"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| s["device"].as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            _ => summary.unreadable += 1,
        }
    }
    for (vcpu, callers) in started_by {
        add_cpu_on_steps(summary.timelines.entry(vcpu).or_default(), &callers);
    }
    for key @ (target, _) in race_order {
        if let Some(calls) = race_calls.remove(&key) {
            if calls.len() > 1 {
                summary.races.push(Race {
                    target_mpidr: target,
                    calls,
                });
            }
        }
    }
    summary
}

/// Puts an OFF -> ON_PENDING step, caused by the n-th successful CPU_ON, before the n-th
/// transition out of ON_PENDING that the log does not already show entered.
fn add_cpu_on_steps(timeline: &mut Vec<Transition>, callers: &[u32]) {
    let mut callers = callers.iter();
    let mut i = 0;
    while i < timeline.len() {
        let entered_before = i > 0 && timeline[i - 1].to == "on_pending";
        if timeline[i].from == "on_pending" && !entered_before {
            let Some(&caller) = callers.next() else {
                break;
            };
            timeline.insert(
                i,
                Transition {
                    t_ns: None,
                    started_by: Some(caller),
                    from: "off".to_string(),
                    to: "on_pending".to_string(),
                },
            );
            i += 1;
        }
        i += 1;
    }
}

/// Milliseconds since VM start, as `+1.23 ms`.
fn at(t_ns: u64) -> String {
    format!("+{:.2} ms", t_ns as f64 / 1e6)
}

/// vCPU index of an MPIDR under vpsci's linear layout (Aff0 = index % 16, then 8 bits per
/// level above; `Mpidr::from_index` in `crates/firmware`).
fn vcpu_of_mpidr(mpidr: u64) -> u64 {
    let aff = |shift: u32| (mpidr >> shift) & 0xff;
    (mpidr & 0xf) | (aff(8) << 4) | (aff(16) << 12) | (aff(32) << 20)
}

/// Lists vCPU numbers compactly: `vcpu0, vcpu2`.
fn vcpu_list(vcpus: &[u32]) -> String {
    let names: Vec<String> = vcpus.iter().map(|v| format!("vcpu{v}")).collect();
    names.join(", ")
}

impl Summary {
    /// Problems a correct VMM and demo guest never produce: a race decided more or less
    /// than once, no system event, unreadable lines.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for race in &self.races {
            let winners = race.winners().len();
            if winners != 1 {
                problems.push(format!(
                    "CPU_ON race on MPIDR {:#x} gave {winners} SUCCESS answers (exactly one is \
                     allowed)",
                    race.target_mpidr
                ));
            }
        }
        if self.system_events.is_empty() {
            problems.push("the event log has no system event".to_string());
        }
        if self.unreadable > 0 {
            problems.push(format!(
                "{} event-log lines could not be read",
                self.unreadable
            ));
        }
        problems
    }
}

impl fmt::Display for Summary {
    /// The human summary `cargo xtask demo` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Logs from vpsci before it recorded the CPU_ON target's OFF -> ON_PENDING step
        // get that step inferred from the successful CPU_ON, without a time.
        let inferred = self
            .timelines
            .values()
            .flatten()
            .any(|t| t.t_ns.is_none() && t.started_by.is_some());
        if inferred {
            writeln!(
                f,
                "power-state timeline (time since VM start; OFF -> ON_PENDING is shown from the \
                 successful CPU_ON, the log has no time for it):"
            )?;
        } else {
            writeln!(f, "power-state timeline (time since VM start):")?;
        }
        for (vcpu, transitions) in &self.timelines {
            let mut line = format!("  vcpu{vcpu}: ");
            match transitions.first() {
                Some(first) => line.push_str(&first.from),
                None if *vcpu == 0 => line.push_str("on (boot CPU), no transitions"),
                None => line.push_str("no transitions"),
            }
            for t in transitions {
                match (t.t_ns, t.started_by) {
                    (Some(t_ns), _) => write!(line, " -> {} ({})", t.to, at(t_ns))?,
                    (None, Some(caller)) => write!(line, " -> {} (CPU_ON by vcpu{caller})", t.to)?,
                    (None, None) => write!(line, " -> {}", t.to)?,
                }
            }
            writeln!(f, "{line}")?;
        }
        let total: usize = self.calls.values().flat_map(|r| r.values()).sum();
        writeln!(f, "PSCI calls handled in userspace: {total}")?;
        let width = self.calls.keys().map(String::len).max().unwrap_or(0);
        for (function, results) in &self.calls {
            let results: Vec<String> = results
                .iter()
                .map(|(label, n)| format!("{label} x{n}"))
                .collect();
            writeln!(f, "  {function:width$}  {}", results.join(", "))?;
        }
        if self.races.is_empty() {
            writeln!(
                f,
                "CPU_ON races: none (no target got a second CPU_ON before it went off again)"
            )?;
        }
        for race in &self.races {
            let mut answers: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for call in &race.calls {
                answers.entry(&call.answer).or_default().push(call.caller);
            }
            let callers: BTreeSet<u32> = race.calls.iter().map(|c| c.caller).collect();
            writeln!(
                f,
                "CPU_ON race on vcpu{} (MPIDR {:#x}): {} calls from {} vCPUs",
                vcpu_of_mpidr(race.target_mpidr),
                race.target_mpidr,
                race.calls.len(),
                callers.len()
            )?;
            for (answer, vcpus) in &mut answers {
                vcpus.sort_unstable();
                writeln!(f, "  {answer:12} {}", vcpu_list(vcpus))?;
            }
            let verdict = match race.winners().len() {
                1 => "decided once: exactly one SUCCESS".to_string(),
                n => format!("NOT decided once: {n} SUCCESS answers"),
            };
            writeln!(f, "  {verdict}")?;
        }
        if self.system_events.is_empty() {
            writeln!(f, "system event: none")?;
        }
        for e in &self.system_events {
            writeln!(
                f,
                "system event: {} (called by vcpu{} at {})",
                e.event,
                e.vcpu,
                at(e.t_ns)
            )?;
        }
        for w in &self.wakeups {
            let sources = if w.sources.is_empty() {
                "no device line".to_string()
            } else {
                w.sources.join(", ")
            };
            writeln!(
                f,
                "wake-up: vcpu{} woken from suspension at {} by {sources}",
                w.vcpu,
                at(w.t_ns)
            )?;
        }
        if self.restarts > 0 {
            writeln!(f, "VM restarts: {}", self.restarts)?;
        }
        if let Some((status, reason)) = &self.end {
            writeln!(f, "end of run: exit status {status} ({reason})")?;
        }
        if self.unreadable > 0 {
            writeln!(f, "unreadable event-log lines: {}", self.unreadable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event log of a real `cargo xtask demo` run (8 vCPUs, nested KVM).
    const RECORDED: &str = include_str!("../../fixtures/demo-events.jsonl");

    #[test]
    fn recorded_demo_run_has_one_race_decided_once_and_ends_in_system_off() {
        let s = summarise(RECORDED.lines());
        assert_eq!(s.unreadable, 0);
        assert_eq!(s.races.len(), 1, "{:?}", s.races);
        let race = &s.races[0];
        assert_eq!(vcpu_of_mpidr(race.target_mpidr), 7);
        assert_eq!(race.calls.len(), 7);
        assert_eq!(race.winners().len(), 1);
        assert!(race
            .calls
            .iter()
            .all(|c| ["SUCCESS", "ALREADY_ON", "ON_PENDING"].contains(&c.answer.as_str())));
        assert_eq!(s.system_events.len(), 1);
        assert_eq!(s.system_events[0].event, "off");
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    #[test]
    fn recorded_demo_run_gives_every_secondary_an_off_on_off_timeline() {
        let s = summarise(RECORDED.lines());
        assert_eq!(s.timelines.len(), 8);
        for vcpu in 1..8 {
            let states: Vec<&str> = std::iter::once(s.timelines[&vcpu][0].from.as_str())
                .chain(s.timelines[&vcpu].iter().map(|t| t.to.as_str()))
                .collect();
            assert_eq!(states, ["off", "on_pending", "on", "off"], "vcpu{vcpu}");
            assert_eq!(
                s.timelines[&vcpu][0].t_ns, None,
                "off -> on_pending is inferred"
            );
            assert!(s.timelines[&vcpu][0].started_by.is_some());
            let times: Vec<u64> = s.timelines[&vcpu].iter().filter_map(|t| t.t_ns).collect();
            assert_eq!(times.len(), 2, "vcpu{vcpu}");
            assert!(
                times.windows(2).all(|w| w[0] <= w[1]),
                "vcpu{vcpu} {times:?}"
            );
        }
        assert!(
            s.timelines[&0].is_empty(),
            "the boot CPU never changes state"
        );
    }

    #[test]
    fn recorded_demo_run_counts_the_calls_the_guest_made() {
        let s = summarise(RECORDED.lines());
        let cpu_on = &s.calls["CPU_ON64"];
        // 6 bring-up calls plus the race's single winner.
        assert_eq!(cpu_on["SUCCESS"], 7);
        assert_eq!(cpu_on.values().sum::<usize>(), 6 + 7);
        // This run's race: the losers were told ON_PENDING 4 times and ALREADY_ON twice.
        assert_eq!((cpu_on["ON_PENDING"], cpu_on["ALREADY_ON"]), (4, 2));
        assert_eq!(s.calls["SYSTEM_SUSPEND64"]["DENIED"], 1);
        assert_eq!(s.calls["CPU_OFF"]["powered off"], 7);
        assert_eq!(s.calls["SYSTEM_OFF"]["system event"], 1);
        assert_eq!(s.calls["AFFINITY_INFO64"]["OFF"], 7);
        assert_eq!(s.calls["PSCI_VERSION"]["1.3"], 1);
    }

    #[test]
    fn recorded_demo_summary_reads_as_timeline_counts_race_and_event() {
        let text = summarise(RECORDED.lines()).to_string();
        assert!(
            text.contains("  vcpu7: off -> on_pending (CPU_ON by vcpu"),
            "{text}"
        );
        assert!(
            text.contains("  vcpu0: on (boot CPU), no transitions"),
            "{text}"
        );
        assert!(
            text.contains("CPU_ON race on vcpu7 (MPIDR 0x7): 7 calls from 7 vCPUs"),
            "{text}"
        );
        assert!(text.contains("decided once: exactly one SUCCESS"), "{text}");
        assert!(
            text.contains("system event: off (called by vcpu0 at +"),
            "{text}"
        );
    }

    #[test]
    fn a_cpu_started_again_after_going_off_is_no_race_but_two_successes_without_off_are() {
        let on = |t: u64, caller: u32, x0: i64| {
            format!(
                r#"{{"t_ns":{t},"kind":"psci_call","vcpu":{caller},"function":"CPU_ON","function_id":"0xc4000003","args":["0x1","0x40080000","0x0"],"result":{{"outcome":"return","x0":{x0}}}}}"#
            )
        };
        let off = |t: u64| {
            format!(r#"{{"t_ns":{t},"kind":"power_state","vcpu":1,"from":"on","to":"off"}}"#)
        };
        let end = r#"{"t_ns":99,"kind":"system_event","vcpu":0,"event":"off"}"#.to_string();
        // Linux hotplug: start, off, start again, off, start again.
        let hotplug = [
            on(1, 0, 0),
            off(2),
            on(3, 0, 0),
            off(4),
            on(5, 0, 0),
            end.clone(),
        ];
        let s = summarise(hotplug.iter().map(String::as_str));
        assert!(s.races.is_empty(), "{:?}", s.races);
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        // A real race after an off: two callers, one winner, is one race decided once.
        let race = [on(1, 0, 0), off(2), on(3, 0, 0), on(4, 2, -4), end.clone()];
        let s = summarise(race.iter().map(String::as_str));
        assert_eq!(s.races.len(), 1);
        assert_eq!(s.races[0].winners(), [0]);
        // Two successes with no off between them is a race decided twice.
        let broken = [on(1, 0, 0), on(2, 2, 0), end];
        let s = summarise(broken.iter().map(String::as_str));
        assert_eq!(s.races[0].winners(), [0, 2]);
        assert!(!s.problems().is_empty());
    }

    #[test]
    fn wakeups_refusals_restarts_and_the_end_line_are_read_not_unreadable() {
        let log = [
            r#"{"t_ns":100,"kind":"power_state","vcpu":0,"from":"on","to":"suspended_system"}"#,
            r#"{"t_ns":200,"kind":"wakeup","vcpu":0,"sources":[{"device":"pl031","spi":2,"intid":34,"raised_ns_ago":5}]}"#,
            r#"{"t_ns":210,"kind":"power_state","vcpu":0,"from":"suspended_system","to":"on"}"#,
            r#"{"t_ns":300,"kind":"system_event","vcpu":0,"event":"hibernate","refused":true}"#,
            r#"{"t_ns":400,"kind":"system_event","vcpu":0,"event":"reset"}"#,
            r#"{"t_ns":500,"kind":"vm_restart","reason":"vCPU 0 called SYSTEM_RESET","restart":1}"#,
            r#"{"t_ns":600,"kind":"system_event","vcpu":0,"event":"off"}"#,
            r#"{"t_ns":700,"kind":"vm_end","exit_status":0,"reason":"vCPU 0 called SYSTEM_OFF: VM powered off"}"#,
        ];
        let s = summarise(log);
        assert_eq!(s.unreadable, 0);
        assert!(s.problems().is_empty(), "{:?}", s.problems());
        assert_eq!(
            s.wakeups,
            [WakeupLine {
                t_ns: 200,
                vcpu: 0,
                sources: vec!["pl031".to_string()]
            }]
        );
        assert_eq!(s.restarts, 1);
        assert_eq!(s.end.as_ref().map(|e| e.0), Some(0));
        let events: Vec<&str> = s.system_events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(events, ["hibernate (refused)", "reset", "off"]);
        let text = s.to_string();
        assert!(
            text.contains("wake-up: vcpu0 woken from suspension at +0.00 ms by pl031"),
            "{text}"
        );
        assert!(
            text.contains("end of run: exit status 0 (vCPU 0 called SYSTEM_OFF"),
            "{text}"
        );
        assert!(
            text.contains("vcpu0: on -> suspended_system (+0.00 ms) -> on (+0.00 ms)"),
            "{text}"
        );
    }

    #[test]
    fn a_race_with_two_winners_and_a_log_without_system_event_are_problems() {
        let log = [
            r#"{"t_ns":10,"kind":"psci_call","vcpu":1,"function":"CPU_ON","function_id":"0xc4000003","args":["0x3","0x40080000","0x0"],"result":{"outcome":"return","x0":0}}"#,
            r#"{"t_ns":11,"kind":"psci_call","vcpu":2,"function":"CPU_ON","function_id":"0xc4000003","args":["0x3","0x40080000","0x0"],"result":{"outcome":"return","x0":0}}"#,
            r#"{"t_ns":12,"kind":"psci_call","vcpu":0,"function":"CPU_ON","function_id":"0xc4000003","args":["0x3","0x40080000","0x0"],"result":{"outcome":"return","x0":-4}}"#,
            "not json",
        ];
        let s = summarise(log);
        assert_eq!(s.races[0].winners(), [1, 2]);
        assert_eq!(s.unreadable, 1);
        let problems = s.problems().join("\n");
        assert!(problems.contains("2 SUCCESS answers"), "{problems}");
        assert!(problems.contains("no system event"), "{problems}");
        assert!(problems.contains("1 event-log lines"), "{problems}");
        assert!(s.to_string().contains("NOT decided once"));
    }

    #[test]
    fn a_logged_off_to_on_pending_step_keeps_its_time_and_is_not_inferred_again() {
        // vpsci logs the CPU_ON target's OFF -> ON_PENDING step from the caller's thread.
        let log = [
            r#"{"t_ns":1000,"kind":"psci_call","vcpu":0,"function":"CPU_ON64","function_id":"0xc4000003","args":["0x1","0x40080000","0x0"],"result":{"outcome":"return","x0":0}}"#,
            r#"{"t_ns":900,"kind":"power_state","vcpu":1,"from":"off","to":"on_pending"}"#,
            r#"{"t_ns":2000,"kind":"power_state","vcpu":1,"from":"on_pending","to":"on"}"#,
            r#"{"t_ns":3000,"kind":"system_event","vcpu":0,"event":"off"}"#,
        ];
        let s = summarise(log);
        let steps: Vec<(&str, &str, Option<u64>)> = s.timelines[&1]
            .iter()
            .map(|t| (t.from.as_str(), t.to.as_str(), t.t_ns))
            .collect();
        assert_eq!(
            steps,
            [
                ("off", "on_pending", Some(900)),
                ("on_pending", "on", Some(2000))
            ]
        );
        let text = s.to_string();
        assert!(
            text.contains("power-state timeline (time since VM start):"),
            "{text}"
        );
        assert!(!text.contains("CPU_ON by vcpu0"), "{text}");
    }

    #[test]
    fn results_are_named_by_function() {
        let ret = |x0: i64| serde_json::json!({"outcome": "return", "x0": x0});
        assert_eq!(result_label("AFFINITY_INFO64", &ret(2)), "ON_PENDING");
        assert_eq!(result_label("AFFINITY_INFO", &ret(1)), "OFF");
        assert_eq!(result_label("PSCI_VERSION", &ret(0x1_0003)), "1.3");
        assert_eq!(result_label("CPU_ON64", &ret(-5)), "ON_PENDING");
        assert_eq!(
            result_label("PSCI_FEATURES", &ret(2)),
            "supported (flags 0x2)"
        );
        assert_eq!(result_label("SMCCC_VERSION", &ret(0x1_0001)), "0x10001");
        assert_eq!(result_label("SYSTEM_SUSPEND", &ret(-3)), "DENIED");
        let suspend = serde_json::json!({"outcome": "suspend", "suspend": "system"});
        assert_eq!(
            result_label("SYSTEM_SUSPEND", &suspend),
            "suspended (system)"
        );
    }

    #[test]
    fn mpidrs_map_back_to_vcpu_indices() {
        assert_eq!(vcpu_of_mpidr(0x7), 7);
        assert_eq!(vcpu_of_mpidr(0x10f), 31);
        assert_eq!(vcpu_of_mpidr(0x1_0000), 1 << 12);
    }
}
