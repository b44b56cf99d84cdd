//! Judging a run: the guest's line protocol (`guests/rt/src/report.rs`) read exactly, the
//! way the run ended, and calls that end the VM judged from the VMM's side (vpsci's exit
//! status and event log, KVM's reported function, QEMU's exit).
//!
//! One judge serves `cargo xtask conformance` and the conformance groups of `cargo xtask
//! test`; inside the machine a job only runs the VMM and prints what it saw (see
//! [`super::vpsci`]).
//!
//! Rules, for every scenario of a run:
//! - the guest reports it exactly once (`VG-CHECK <name> PASS|FAIL|SKIP`); a second
//!   report, even an identical one, fails it, and so does a report of a scenario the run
//!   does not plan;
//! - a run that does not end in a VM-ending call must print `VG-START` once, end with
//!   `VG-DONE` (once, after every other protocol line), have no `VG-FATAL`, exit with status
//!   0, and (vpsci) leave exactly the expected system events in its event log (`off`, or a
//!   refused hibernate then `off`); otherwise every scenario of the run that did not
//!   already fail fails with that reason;
//! - a VM-ending call must be announced once (`VG-CALL`), never return, and end the VM
//!   with the implementation's exit status and, for vpsci, exactly its event (type and
//!   cookie included) in the event log; no `VG-DONE` may follow;
//! - a SKIP is accepted only where the plan documents that the implementation does not
//!   offer the scenario ([`super::plan::documented_skip`]); vpsci has no such entry, so
//!   every SKIP on vpsci fails.

use std::time::Duration;

use super::hostile::{self, LogEntry, Sample};
use super::plan::{documented_skip, Run, Terminal, VENDOR_COOKIE, VENDOR_TYPE, WARM_COOKIE};
use super::Against;

/// Outcome of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Behaved as the specification requires.
    Pass,
    /// Did not; the text says how.
    Fail(String),
    /// Not offered by this implementation (documented); the text says why.
    Skip(String),
}

/// What one VMM run produced, for judging.
#[derive(Debug, Clone, Default)]
pub(super) struct RunOutput {
    /// Guest console (UART) lines.
    pub(super) lines: Vec<String>,
    /// VMM exit status, if it exited by itself.
    pub(super) exit: Option<i32>,
    /// vpsci's own messages (its stderr), in order.
    pub(super) vmm_messages: Vec<String>,
    /// Why the run did not complete normally (timeout, machine failure, garbled markers).
    pub(super) problem: Option<String>,
    /// `system_event` lines of vpsci's event log.
    pub(super) events: Vec<serde_json::Value>,
    /// The whole event log, in order (hostile runs only, [`super::hostile`]).
    pub(super) log: Vec<LogEntry>,
    /// vpsci's resources sampled during the run (the reset-cycle run only).
    pub(super) samples: Vec<Sample>,
    pub(super) elapsed: Duration,
}

/// A guest status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    Skip,
}

/// One `VG-CHECK` line.
#[derive(Debug, Clone)]
struct Report {
    status: Status,
    detail: String,
}

/// The protocol lines of one run, read exactly.
#[derive(Debug, Default)]
struct Transcript {
    starts: usize,
    reports: Vec<(String, Report)>,
    calls: Vec<String>,
    returned: Vec<String>,
    fatal: Vec<String>,
    /// Index (in protocol lines) of each `VG-DONE`.
    done: Vec<usize>,
    protocol_lines: usize,
    garbled: Vec<String>,
}

impl Transcript {
    fn parse(lines: &[String]) -> Transcript {
        let mut t = Transcript::default();
        for line in lines {
            let line = line.trim_end_matches(['\r', '\n']);
            if !line.starts_with("VG-") {
                continue;
            }
            let index = t.protocol_lines;
            t.protocol_lines += 1;
            let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
            match keyword {
                "VG-START" => t.starts += 1,
                "VG-INFO" => {}
                "VG-DONE" if rest.is_empty() => t.done.push(index),
                "VG-FATAL" => t.fatal.push(rest.to_string()),
                "VG-CALL" if !rest.is_empty() && !rest.contains(' ') => {
                    t.calls.push(rest.to_string())
                }
                "VG-RETURNED" => t.returned.push(rest.to_string()),
                "VG-CHECK" => match parse_check(rest) {
                    Some((name, report)) => t.reports.push((name, report)),
                    None => t.garbled.push(line.to_string()),
                },
                _ => t.garbled.push(line.to_string()),
            }
        }
        t
    }

    fn reports_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Report> + 'a {
        self.reports
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, r)| r)
    }
}

/// `<name> PASS [detail]`, `<name> FAIL <detail>` or `<name> SKIP <reason>`.
fn parse_check(rest: &str) -> Option<(String, Report)> {
    let mut words = rest.splitn(3, ' ');
    let name = words.next().filter(|n| !n.is_empty())?;
    let status = match words.next()? {
        "PASS" => Status::Pass,
        "FAIL" => Status::Fail,
        "SKIP" => Status::Skip,
        _ => return None,
    };
    let detail = words.next().unwrap_or_default().to_string();
    if status != Status::Pass && detail.is_empty() {
        return None;
    }
    Some((name.to_string(), Report { status, detail }))
}

/// Judges one run: a verdict for every scenario it plans, then one failure for every
/// scenario the guest reported that the run does not plan.
pub(super) fn judge(run: &Run, out: &RunOutput, against: Against) -> Vec<(String, Verdict)> {
    if let Some(why) = run.not_offered {
        return run
            .scenarios
            .iter()
            .map(|name| (name.clone(), Verdict::Skip(why.to_string())))
            .collect();
    }
    let transcript = Transcript::parse(&out.lines);
    let terminal = run
        .terminal
        .as_ref()
        .filter(|(name, kind)| {
            *kind != Terminal::RefusedHibernate && transcript.calls.iter().any(|c| c == name)
        })
        .map(|(name, kind)| (name.as_str(), *kind));
    let fault = match terminal {
        Some((name, _)) => ended_by_call_fault(run, &transcript, out, name),
        None => clean_end_fault(run, &transcript, out, against),
    }
    .or_else(|| hostile::check_log(run, out));
    let mut verdicts: Vec<(String, Verdict)> = Vec::new();
    for name in &run.scenarios {
        let reports: Vec<&Report> = transcript.reports_of(name).collect();
        let verdict = match (reports.as_slice(), terminal) {
            ([], Some((called, kind))) if called == name => {
                vmm_side(kind, &transcript, out, against, name)
            }
            ([], _) => Verdict::Fail(
                fault
                    .clone()
                    .unwrap_or_else(|| why_missing(&transcript, out)),
            ),
            ([report], _) => guest_verdict(report, name, against),
            (many, _) => Verdict::Fail(format!(
                "reported {} times ({})",
                many.len(),
                many.iter()
                    .map(|r| format!("{:?}", r.status).to_uppercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        verdicts.push((name.clone(), verdict));
    }
    if let Some(why) = run.one_of {
        one_of(&mut verdicts, &transcript, why);
    }
    if let Some(fault) = fault {
        for (_, verdict) in &mut verdicts {
            if !matches!(verdict, Verdict::Fail(_)) {
                *verdict = Verdict::Fail(fault.clone());
            }
        }
    }
    for (name, _) in &transcript.reports {
        if !run.scenarios.contains(name) && !verdicts.iter().any(|(n, _)| n == name) {
            verdicts.push((
                name.clone(),
                Verdict::Fail(format!(
                    "reported by run {}, which does not plan it",
                    run.id
                )),
            ));
        }
    }
    verdicts
}

/// A run whose guest reports one scenario of several: the unreported ones are skipped for
/// `why` when exactly one was reported; none reported fails them all.
fn one_of(verdicts: &mut [(String, Verdict)], transcript: &Transcript, why: &str) {
    let reported: Vec<bool> = verdicts
        .iter()
        .map(|(name, _)| transcript.reports_of(name).next().is_some())
        .collect();
    let count = reported.iter().filter(|r| **r).count();
    for ((_, verdict), reported) in verdicts.iter_mut().zip(reported) {
        match (reported, count) {
            (false, 1) => *verdict = Verdict::Skip(why.to_string()),
            (true, 1) | (false, _) => {}
            (true, _) => {
                *verdict =
                    Verdict::Fail(format!("the guest reported {count} of these, expected one"))
            }
        }
    }
}

/// The guest's own verdict, with the skip rule applied.
fn guest_verdict(report: &Report, name: &str, against: Against) -> Verdict {
    match report.status {
        Status::Pass => Verdict::Pass,
        Status::Fail => Verdict::Fail(report.detail.clone()),
        Status::Skip => match documented_skip(against, name) {
            Some(_) => Verdict::Skip(report.detail.clone()),
            None => Verdict::Fail(format!(
                "skipped ({}), but {} is expected to run it",
                report.detail,
                against.label()
            )),
        },
    }
}

/// Why a planned scenario has no verdict of its own.
fn why_missing(transcript: &Transcript, out: &RunOutput) -> String {
    if let Some(fatal) = transcript.fatal.first() {
        format!("guest died: {fatal}")
    } else if let Some(problem) = &out.problem {
        problem.clone()
    } else {
        "the guest never reported it".to_string()
    }
}

/// Faults every run shares: the job did not complete, the guest died, garbled lines, a
/// guest that started more than once.
fn common_fault(run: &Run, transcript: &Transcript, out: &RunOutput) -> Option<String> {
    if let Some(problem) = &out.problem {
        return Some(problem.clone());
    }
    if let Some(fatal) = transcript.fatal.first() {
        return Some(format!("guest died: {fatal}"));
    }
    if let Some(line) = transcript.garbled.first() {
        return Some(format!("unreadable protocol line `{line}`"));
    }
    // Under `--on-reset restart` every reset boots the guest again.
    let boots = run.restarts.map_or(1, |r| r as usize + 1);
    if transcript.starts != boots {
        return Some(format!(
            "the guest started {} times, expected {boots} (exit status {}, {})",
            transcript.starts,
            show_exit(out.exit),
            last_message(out)
        ));
    }
    None
}

/// The last thing vpsci said, for failure details.
fn last_message(out: &RunOutput) -> String {
    out.vmm_messages
        .iter()
        .rev()
        .find(|m| m.starts_with("vpsci: "))
        .cloned()
        .unwrap_or_else(|| "no message".to_string())
}

/// A run that must end with `VG-DONE` and the runtime's own SYSTEM_OFF.
fn clean_end_fault(
    run: &Run,
    transcript: &Transcript,
    out: &RunOutput,
    against: Against,
) -> Option<String> {
    if let Some(fault) = common_fault(run, transcript, out) {
        return Some(fault);
    }
    let refused = match &run.terminal {
        Some((name, Terminal::RefusedHibernate)) => Some(name.as_str()),
        _ => None,
    };
    let expected_calls = usize::from(refused.is_some());
    if transcript.calls.len() > expected_calls
        || transcript.calls.iter().any(|c| Some(c.as_str()) != refused)
    {
        return Some(format!(
            "unexpected VG-CALL ({})",
            transcript.calls.join(", ")
        ));
    }
    match transcript.done.as_slice() {
        [] => return Some("the guest never printed VG-DONE".to_string()),
        [at] if *at + 1 == transcript.protocol_lines => {}
        [_] => return Some("protocol lines after VG-DONE".to_string()),
        many => return Some(format!("VG-DONE printed {} times", many.len())),
    }
    if out.exit != Some(0) {
        return Some(format!(
            "{} exit status {}, expected 0 ({})",
            against.label(),
            show_exit(out.exit),
            last_message(out)
        ));
    }
    if against == Against::Vpsci {
        let expected = match run.terminal {
            Some((_, Terminal::RefusedHibernate)) => "hibernate+refused off".to_string(),
            _ => hostile::expected_events(run, out).unwrap_or_else(|| "off".to_string()),
        };
        let seen = event_names(out);
        if seen != expected {
            return Some(format!(
                "vpsci's event log shows system events {seen}, expected {expected}"
            ));
        }
    }
    None
}

/// A run that must end in the VM-ending call `name`.
fn ended_by_call_fault(
    run: &Run,
    transcript: &Transcript,
    out: &RunOutput,
    name: &str,
) -> Option<String> {
    if let Some(fault) = common_fault(run, transcript, out) {
        return Some(fault);
    }
    if transcript.calls.len() != 1 {
        return Some(format!(
            "VG-CALL printed {} times ({})",
            transcript.calls.len(),
            transcript.calls.join(", ")
        ));
    }
    if let Some(returned) = transcript.returned.first() {
        return Some(format!("{name}: the call returned ({returned})"));
    }
    if !transcript.done.is_empty() {
        return Some(format!(
            "VG-DONE after {name}, which should have ended the VM"
        ));
    }
    None
}

fn show_exit(exit: Option<i32>) -> String {
    exit.map_or_else(|| "none".to_string(), |e| e.to_string())
}

fn hex(value: &serde_json::Value) -> Option<u64> {
    value
        .as_str()
        .and_then(|s| s.strip_prefix("0x"))
        .and_then(|s| u64::from_str_radix(s, 16).ok())
}

/// A VM-ending call that did not return: did the VMM end the VM the right way?
fn vmm_side(
    terminal: Terminal,
    transcript: &Transcript,
    out: &RunOutput,
    against: Against,
    name: &str,
) -> Verdict {
    if let Some(problem) = &out.problem {
        return Verdict::Fail(problem.clone());
    }
    if let Some(returned) = transcript.returned.first() {
        return Verdict::Fail(format!("the call returned ({returned})"));
    }
    let Some(ending) = terminal.ending() else {
        return Verdict::Fail("a refused hibernate is not judged as a VM end".into());
    };
    let unverifiable = super::plan::unverifiable_ending(against, terminal);
    match against {
        Against::Qemu => match out.exit {
            Some(0) => unverifiable.map_or(Verdict::Pass, |why| Verdict::Skip(why.into())),
            other => Verdict::Fail(format!("QEMU exit status {}", show_exit(other))),
        },
        Against::Kvm => {
            let wanted = format!("called {} (KVM's PSCI)", ending.function);
            let said = last_message(out);
            if out.exit != Some(ending.status) || !said.contains(&wanted) {
                return Verdict::Fail(format!(
                    "vpsci exit status {} ({said}), expected {} and `{wanted}`",
                    show_exit(out.exit),
                    ending.status
                ));
            }
            // vpsci logs the event KVM reported, with the guest's arguments.
            if let Some(fail) = logged_event_mismatch(terminal, out, &ending, name) {
                return fail;
            }
            unverifiable.map_or(Verdict::Pass, |why| Verdict::Skip(why.into()))
        }
        Against::Vpsci => {
            if let Some(fail) = logged_event_mismatch(terminal, out, &ending, name) {
                return fail;
            }
            if out.exit != Some(ending.status) {
                return Verdict::Fail(format!(
                    "vpsci exit status {}, expected {} ({})",
                    show_exit(out.exit),
                    ending.status,
                    last_message(out)
                ));
            }
            Verdict::Pass
        }
    }
}

/// Whether vpsci's event log shows exactly the one system event `terminal` must end the
/// VM with, with its fields; the failing verdict if not.
fn logged_event_mismatch(
    terminal: Terminal,
    out: &RunOutput,
    ending: &super::plan::Ending,
    name: &str,
) -> Option<Verdict> {
    let events: Vec<&serde_json::Value> = out.events.iter().collect();
    let [event] = events.as_slice() else {
        return Some(Verdict::Fail(format!(
            "vpsci's event log shows system events {}, expected one {} (exit status {})",
            event_names(out),
            ending.event,
            show_exit(out.exit)
        )));
    };
    let fields_ok = event["event"] == ending.event
        && event.get("refused").is_none()
        && match terminal {
            Terminal::WarmReset => hex(&event["cookie"]) == Some(WARM_COOKIE),
            Terminal::VendorReset => {
                hex(&event["cookie"]) == Some(VENDOR_COOKIE)
                    && hex(&event["reset_type"]) == Some(VENDOR_TYPE)
            }
            _ => true,
        };
    if !fields_ok {
        return Some(Verdict::Fail(format!(
            "vpsci's event log shows {event}, expected {} (for {name})",
            ending.event
        )));
    }
    None
}

/// The log's system events as `name[+refused] ...`, or `none`.
fn event_names(out: &RunOutput) -> String {
    let names: Vec<String> = out
        .events
        .iter()
        .map(|e| {
            let name = e["event"].as_str().unwrap_or("?");
            match e.get("refused") {
                None => name.to_string(),
                Some(serde_json::Value::Bool(true)) => format!("{name}+refused"),
                Some(other) => format!("{name}+refused={other}"),
            }
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! Every case here also goes through the in-machine collection script and the same
    //! judge in `vpsci.rs`'s tests ([`cases`] is shared).
    use super::*;
    use crate::conformance::plan::tests::{planned, refused_run, reset_run};

    /// A judge case: a run, what the guest printed, vpsci's exit status and system
    /// events, and the verdict expected for the run's first scenario.
    pub(in crate::conformance) struct Case {
        pub(in crate::conformance) what: &'static str,
        pub(in crate::conformance) run: Run,
        pub(in crate::conformance) console: Vec<&'static str>,
        pub(in crate::conformance) exit: i32,
        pub(in crate::conformance) events: Vec<serde_json::Value>,
        pub(in crate::conformance) pass: bool,
    }

    fn off() -> serde_json::Value {
        serde_json::json!({"kind": "system_event", "vcpu": 0, "event": "off"})
    }

    fn basic() -> Run {
        Run::new("r", "psci-basic", 4, &["a", "b"])
    }

    fn case(what: &'static str, run: Run, console: &[&'static str], pass: bool) -> Case {
        Case {
            what,
            run,
            console: console.to_vec(),
            exit: 0,
            events: vec![off()],
            pass,
        }
    }

    /// The cases both judges must get right (vpsci).
    pub(in crate::conformance) fn cases() -> Vec<Case> {
        let warm = serde_json::json!({
            "kind": "system_event", "vcpu": 0, "event": "warm_reset", "cookie": "0x123456789abcdef0"
        });
        let refused = serde_json::json!({
            "kind": "system_event", "vcpu": 0, "event": "hibernate", "refused": true
        });
        let hibernated =
            serde_json::json!({"kind": "system_event", "vcpu": 0, "event": "hibernate"});
        let refused_pass = "VG-CHECK system-off2-refused-internal-failure PASS";
        let refused_call = "VG-CALL system-off2-refused-internal-failure";
        let mut cases = vec![
            case(
                "clean run",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK a PASS",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                true,
            ),
            case(
                "no VG-DONE",
                basic(),
                &["VG-START x", "VG-CHECK a PASS", "VG-CHECK b PASS"],
                false,
            ),
            case(
                "VG-FATAL after the checks",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK a PASS",
                    "VG-CHECK b PASS",
                    "VG-FATAL exception kind=4 esr=0x96000000",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "FAIL then PASS for one scenario",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK a FAIL got DENIED",
                    "VG-CHECK a PASS",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "the same PASS twice",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK a PASS",
                    "VG-CHECK a PASS",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "a name that only matches as a pattern",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK aa PASS",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "a PASS inside other text",
                basic(),
                &[
                    "VG-START x",
                    "noise VG-CHECK a PASS",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "a SKIP on vpsci",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK a SKIP needs 1.3",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "the guest started twice",
                basic(),
                &[
                    "VG-START x",
                    "VG-START x",
                    "VG-CHECK a PASS",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
            case(
                "an unknown status word",
                basic(),
                &[
                    "VG-START x",
                    "VG-CHECK a PASSED",
                    "VG-CHECK b PASS",
                    "VG-DONE",
                ],
                false,
            ),
        ];
        let mut failed_exit = case(
            "vpsci exits 1 after every PASS",
            basic(),
            &[
                "VG-START x",
                "VG-CHECK a PASS",
                "VG-CHECK b PASS",
                "VG-DONE",
            ],
            false,
        );
        failed_exit.exit = 1;
        cases.push(failed_exit);
        let mut no_off = case(
            "no off event after VG-DONE",
            basic(),
            &[
                "VG-START x",
                "VG-CHECK a PASS",
                "VG-CHECK b PASS",
                "VG-DONE",
            ],
            false,
        );
        no_off.events.clear();
        cases.push(no_off);
        let reset = |console: &[&'static str], exit: i32, events: Vec<serde_json::Value>| {
            let mut c = case("", reset_run(), console, false);
            c.exit = exit;
            c.events = events;
            c
        };
        let mut good = reset(
            &["VG-START x", "VG-CALL system-reset2-warm"],
            3,
            vec![warm.clone()],
        );
        good.what = "warm reset with its event, cookie and status";
        good.pass = true;
        cases.push(good);
        let mut c = reset(
            &["VG-START x", "VG-CALL system-reset2-warm"],
            0,
            vec![warm.clone()],
        );
        c.what = "warm reset with exit status 0";
        cases.push(c);
        let mut wrong_cookie = warm.clone();
        wrong_cookie["cookie"] = "0x1".into();
        let mut c = reset(
            &["VG-START x", "VG-CALL system-reset2-warm"],
            3,
            vec![wrong_cookie],
        );
        c.what = "warm reset with the wrong cookie";
        cases.push(c);
        let mut c = reset(&["VG-START x", "VG-CALL system-reset2-warm"], 3, vec![]);
        c.what = "warm reset without an event";
        cases.push(c);
        let mut c = reset(
            &["VG-START x", "VG-CALL system-reset2-warm"],
            3,
            vec![warm.clone(), warm.clone()],
        );
        c.what = "warm reset logged twice";
        cases.push(c);
        let mut c = reset(
            &[
                "VG-START x",
                "VG-CALL system-reset2-warm",
                "VG-RETURNED system-reset2-warm -1",
            ],
            3,
            vec![warm.clone()],
        );
        c.what = "a VM-ending call that returns";
        cases.push(c);
        let mut c = reset(
            &["VG-START x", "VG-CALL system-reset2-warm", "VG-DONE"],
            3,
            vec![warm.clone()],
        );
        c.what = "VG-DONE after a VM-ending call";
        cases.push(c);
        let mut c = reset(
            &[
                "VG-START x",
                "VG-CALL system-reset2-warm",
                "VG-FATAL exception kind=0",
            ],
            3,
            vec![warm],
        );
        c.what = "VG-FATAL after a VM-ending call";
        cases.push(c);
        let refused_case = |what, console: &[&'static str], exit, events, pass| {
            let mut c = case(what, refused_run(), console, pass);
            c.exit = exit;
            c.events = events;
            c
        };
        cases.push(refused_case(
            "refused hibernate: PASS, exit 0, refused then off",
            &["VG-START x", refused_call, refused_pass, "VG-DONE"],
            0,
            vec![refused.clone(), off()],
            true,
        ));
        cases.push(refused_case(
            "refused hibernate logged as a real one",
            &["VG-START x", refused_call, refused_pass, "VG-DONE"],
            0,
            vec![hibernated.clone(), off()],
            false,
        ));
        cases.push(refused_case(
            "refused hibernate without the final off",
            &["VG-START x", refused_call, refused_pass, "VG-DONE"],
            0,
            vec![refused.clone()],
            false,
        ));
        cases.push(refused_case(
            "refused hibernate after off",
            &["VG-START x", refused_call, refused_pass, "VG-DONE"],
            0,
            vec![off(), refused.clone()],
            false,
        ));
        cases.push(refused_case(
            "refused hibernate with exit status 1",
            &["VG-START x", refused_call, refused_pass, "VG-DONE"],
            1,
            vec![refused.clone(), off()],
            false,
        ));
        cases.push(refused_case(
            "refused hibernate that ended the VM",
            &["VG-START x", refused_call],
            0,
            vec![hibernated],
            false,
        ));
        cases.push(refused_case(
            "refused hibernate the guest failed",
            &[
                "VG-START x",
                refused_call,
                "VG-CHECK system-off2-refused-internal-failure FAIL returned SUCCESS",
                "VG-DONE",
            ],
            0,
            vec![refused, off()],
            false,
        ));
        cases
    }

    pub(in crate::conformance) fn first_verdict(case: &Case) -> Verdict {
        let out = RunOutput {
            lines: case.console.iter().map(|l| l.to_string()).collect(),
            exit: Some(case.exit),
            events: case.events.clone(),
            ..RunOutput::default()
        };
        judge(&case.run, &out, Against::Vpsci).remove(0).1
    }

    #[test]
    fn the_host_judge_gets_every_case_right() {
        for case in cases() {
            let verdict = first_verdict(&case);
            assert_eq!(
                verdict == Verdict::Pass,
                case.pass,
                "{}: {verdict:?}",
                case.what
            );
        }
    }

    fn output(lines: &[&str]) -> RunOutput {
        RunOutput {
            lines: lines.iter().map(|l| l.to_string()).collect(),
            exit: Some(0),
            events: vec![off()],
            ..RunOutput::default()
        }
    }

    #[test]
    fn unreported_scenarios_fail_with_the_guests_last_words() {
        let out = output(&[
            "VG-START x",
            "VG-CHECK a PASS",
            "VG-FATAL exception kind=4 esr=0x96000000",
        ]);
        let verdicts = judge(&basic(), &out, Against::Vpsci);
        for (_, verdict) in &verdicts {
            match verdict {
                Verdict::Fail(why) => assert!(why.contains("esr=0x96000000"), "{why}"),
                other => panic!("expected a failure, got {other:?}"),
            }
        }
    }

    #[test]
    fn failure_details_and_documented_skip_reasons_are_kept() {
        let run = planned(Against::Qemu, "system-suspend-denied-other-on");
        let mut lines = vec![
            "VG-START system-suspend".to_string(),
            "VG-CHECK system-suspend-features FAIL PSCI_FEATURES(SYSTEM_SUSPEND) = -1".into(),
        ];
        for name in &run.scenarios[1..] {
            lines.push(format!(
                "VG-CHECK {name} SKIP SYSTEM_SUSPEND (optional) is not implemented"
            ));
        }
        lines.push("VG-DONE".into());
        let out = RunOutput {
            lines,
            exit: Some(0),
            ..RunOutput::default()
        };
        let verdicts = judge(&run, &out, Against::Qemu);
        assert_eq!(
            verdicts[0].1,
            Verdict::Fail("PSCI_FEATURES(SYSTEM_SUSPEND) = -1".into())
        );
        for (_, verdict) in &verdicts[1..] {
            assert_eq!(
                *verdict,
                Verdict::Skip("SYSTEM_SUSPEND (optional) is not implemented".into())
            );
        }
    }

    #[test]
    fn an_undocumented_skip_fails_on_qemu_and_kvm_too() {
        for against in [Against::Qemu, Against::Kvm] {
            let run = planned(against, "cpu-on-race-4");
            let out = output(&[
                "VG-START x",
                "VG-CHECK cpu-on-race-4 SKIP not today",
                "VG-DONE",
            ]);
            assert!(
                matches!(judge(&run, &out, against)[0].1, Verdict::Fail(_)),
                "{against:?}"
            );
        }
    }

    #[test]
    fn a_scenario_qemu_never_reported_fails_unless_it_is_not_offered() {
        let run = planned(Against::Qemu, "cpu-on-invalid-address");
        let out = output(&["VG-START x", "VG-DONE"]);
        assert!(judge(&run, &out, Against::Qemu)
            .iter()
            .all(|(_, v)| matches!(v, Verdict::Fail(_))));
        let run = planned(Against::Qemu, "system-off2-refused-internal-failure");
        assert!(matches!(
            judge(&run, &RunOutput::default(), Against::Qemu)[0].1,
            Verdict::Skip(_)
        ));
    }

    #[test]
    fn one_of_skips_the_versions_not_reported_only_when_one_was() {
        let run = planned(Against::Qemu, "version-gating-1.1");
        let verdicts = judge(
            &run,
            &output(&["VG-START x", "VG-CHECK version-gating-1.1 PASS", "VG-DONE"]),
            Against::Qemu,
        );
        assert_eq!(verdicts.len(), 5);
        assert_eq!(
            verdicts.iter().filter(|(_, v)| *v == Verdict::Pass).count(),
            1
        );
        assert_eq!(
            verdicts
                .iter()
                .filter(|(_, v)| matches!(v, Verdict::Skip(_)))
                .count(),
            4
        );
        let none = judge(&run, &output(&["VG-START x", "VG-DONE"]), Against::Qemu);
        assert!(none.iter().all(|(_, v)| matches!(v, Verdict::Fail(_))));
        let crashed = judge(
            &run,
            &output(&["VG-START x", "VG-CHECK version-gating-1.1 PASS"]),
            Against::Qemu,
        );
        assert!(crashed.iter().all(|(_, v)| matches!(v, Verdict::Fail(_))));
    }

    #[test]
    fn a_scenario_reported_by_the_wrong_run_fails() {
        let verdicts = judge(
            &basic(),
            &output(&[
                "VG-START x",
                "VG-CHECK a PASS",
                "VG-CHECK b PASS",
                "VG-CHECK c PASS",
                "VG-DONE",
            ]),
            Against::Vpsci,
        );
        assert_eq!(verdicts.len(), 3);
        assert!(matches!(verdicts[2], (ref n, Verdict::Fail(_)) if n == "c"));
    }

    #[test]
    fn kvm_ends_are_judged_from_vpscis_message_and_the_logged_event_with_its_details() {
        let run = planned(Against::Kvm, "system-off");
        let mut out = output(&[
            "VG-START system-event",
            "VG-CHECK system-off2-features PASS",
            "VG-CHECK system-off2-nonzero-cookie PASS",
            "VG-CHECK system-reset2-features PASS",
            "VG-CHECK system-reset2-invalid-type PASS",
            "VG-CALL system-off",
        ]);
        out.events = vec![serde_json::json!({"kind": "system_event", "vcpu": 0, "event": "off"})];
        out.vmm_messages =
            vec!["vpsci: vCPU 0 called SYSTEM_OFF (KVM's PSCI): VM powered off".into()];
        let verdicts = judge(&run, &out, Against::Kvm);
        assert!(
            verdicts.iter().all(|(_, v)| *v == Verdict::Pass),
            "{verdicts:?}"
        );
        out.vmm_messages =
            vec!["vpsci: vCPU 0 called SYSTEM_OFF2 (KVM's PSCI): VM powered off".into()];
        assert!(matches!(
            judge(&run, &out, Against::Kvm)[4].1,
            Verdict::Fail(_)
        ));
        let run = planned(Against::Kvm, "system-reset2-warm");
        let mut out = output(&["VG-START system-event", "VG-CALL system-reset2-warm"]);
        out.exit = Some(3);
        out.vmm_messages = vec!["vpsci: vCPU 0 called SYSTEM_RESET2 (KVM's PSCI): exiting".into()];
        out.events = vec![serde_json::json!({
            "kind": "system_event", "vcpu": 0, "event": "warm_reset", "cookie": format!("{WARM_COOKIE:#x}")
        })];
        assert_eq!(judge(&run, &out, Against::Kvm)[0].1, Verdict::Pass);
        // A plain reset logged instead (the details lost) fails.
        out.events = vec![serde_json::json!({"kind": "system_event", "vcpu": 0, "event": "reset"})];
        assert!(matches!(
            judge(&run, &out, Against::Kvm)[0].1,
            Verdict::Fail(_)
        ));
        out.events = vec![serde_json::json!({
            "kind": "system_event", "vcpu": 0, "event": "warm_reset", "cookie": format!("{WARM_COOKIE:#x}")
        })];
        out.exit = Some(0);
        assert!(matches!(
            judge(&run, &out, Against::Kvm)[0].1,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn runs_not_offered_are_skipped_without_output() {
        let run = planned(Against::Kvm, "system-suspend-features");
        let verdicts = judge(&run, &RunOutput::default(), Against::Kvm);
        assert_eq!(verdicts.len(), 6);
        assert!(verdicts.iter().all(|(_, v)| matches!(v, Verdict::Skip(_))));
    }
}
