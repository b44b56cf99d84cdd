//! Judging a run: the guest's `VG-CHECK` lines, and calls that end the VM judged from the
//! VMM's side (vpsci's exit status and event log, or QEMU's exit).

use std::collections::BTreeMap;
use std::time::Duration;

use super::plan::{Run, Terminal, Unreported, VENDOR_COOKIE, VENDOR_TYPE, WARM_COOKIE};
use super::Against;

/// Outcome of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Behaved as the specification requires.
    Pass,
    /// Did not; the text says how.
    Fail(String),
    /// Not applicable to this implementation or configuration; the text says why.
    Skip(String),
}

/// What one VMM run produced, for judging.
#[derive(Debug, Clone, Default)]
pub(super) struct RunOutput {
    /// Console lines (guest UART and VMM messages).
    pub(super) lines: Vec<String>,
    /// VMM exit status, if it exited by itself.
    pub(super) exit: Option<i32>,
    /// Why the run did not complete normally (timeout, machine failure).
    pub(super) problem: Option<String>,
    /// `system_event` lines of the vpsci event log.
    pub(super) events: Vec<serde_json::Value>,
    pub(super) elapsed: Duration,
}

/// Judges one run: the guest's own checks plus terminal calls from the VMM's side.
pub(super) fn judge(run: &Run, out: &RunOutput, against: Against) -> Vec<(String, Verdict)> {
    let mut reported: BTreeMap<String, Verdict> = BTreeMap::new();
    let mut called: Option<String> = None;
    let mut returned: Option<String> = None;
    let mut fatal: Option<String> = None;
    for line in &out.lines {
        let line = line.trim_end_matches('\r');
        let Some(start) = line.find("VG-") else {
            continue;
        };
        let line = &line[start..];
        let mut words = line.splitn(4, ' ');
        match words.next() {
            Some("VG-CHECK") => {
                let name = words.next().unwrap_or_default().to_string();
                let status = words.next().unwrap_or_default();
                let detail = words.next().unwrap_or_default().to_string();
                let verdict = match status {
                    "PASS" => Verdict::Pass,
                    "SKIP" => Verdict::Skip(detail),
                    _ => Verdict::Fail(detail),
                };
                reported.insert(name, verdict);
            }
            Some("VG-CALL") => called = words.next().map(str::to_string),
            Some("VG-RETURNED") => {
                returned = Some(line.trim_start_matches("VG-RETURNED ").to_string())
            }
            Some("VG-FATAL") => {
                fatal.get_or_insert_with(|| line.trim_start_matches("VG-FATAL ").to_string());
            }
            _ => {}
        }
    }
    if let Some((name, Terminal::RefusedHibernate)) = &run.terminal {
        let was_called = called.as_deref() == Some(name.as_str());
        if let Some(verdict) = judge_refused(reported.get(name), was_called, out, against) {
            reported.insert(name.clone(), verdict);
        }
    } else if let Some((name, terminal)) = &run.terminal {
        if !reported.contains_key(name) && called.as_deref() == Some(name.as_str()) {
            let verdict = match &returned {
                Some(r) => Verdict::Fail(format!("the call returned ({r})")),
                None => judge_terminal(*terminal, out, against),
            };
            reported.insert(name.clone(), verdict);
        }
    }
    let why_missing = fatal
        .map(|f| format!("guest died: {f}"))
        .or_else(|| out.problem.clone())
        .unwrap_or_else(|| "the guest never reported it".to_string());
    run.scenarios
        .iter()
        .map(|name| {
            let verdict = match (reported.remove(name), &run.unreported) {
                (Some(v), _) => v,
                (None, Unreported::Skip(why)) => Verdict::Skip(why.clone()),
                (None, Unreported::Fail) => Verdict::Fail(why_missing.clone()),
            };
            (name.clone(), verdict)
        })
        .collect()
}

fn hex(value: &serde_json::Value) -> Option<u64> {
    value
        .as_str()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
}

/// A terminal call that did not return: did the VMM end the VM the right way?
fn judge_terminal(terminal: Terminal, out: &RunOutput, against: Against) -> Verdict {
    if let Some(problem) = &out.problem {
        return Verdict::Fail(problem.clone());
    }
    match against {
        Against::Qemu => match (terminal, out.exit) {
            (Terminal::Off, Some(0)) => Verdict::Pass,
            (Terminal::Off, other) => Verdict::Fail(format!("QEMU exit status {other:?}")),
            (_, Some(0)) => Verdict::Skip(
                "QEMU ended the VM but reports no event type or cookie to check".into(),
            ),
            (_, other) => Verdict::Fail(format!("QEMU exit status {other:?}")),
        },
        Against::Vpsci => {
            let Some((want_exit, want_event)) = terminal.ending() else {
                return Verdict::Fail("a refused hibernate is not judged as a VM end".into());
            };
            let Some(event) = out.events.iter().find(|e| e["kind"] == "system_event") else {
                return Verdict::Fail(format!(
                    "no system_event in the event log (vpsci exit status {:?})",
                    out.exit
                ));
            };
            if event["event"] != want_event {
                return Verdict::Fail(format!("event log shows {event}, expected {want_event}"));
            }
            let cookie_ok = match terminal {
                Terminal::WarmReset => hex(&event["cookie"]) == Some(WARM_COOKIE),
                Terminal::VendorReset => {
                    hex(&event["cookie"]) == Some(VENDOR_COOKIE)
                        && hex(&event["reset_type"]) == Some(VENDOR_TYPE)
                }
                _ => true,
            };
            if !cookie_ok {
                return Verdict::Fail(format!("event log shows {event}: wrong type or cookie"));
            }
            if out.exit != Some(want_exit) {
                return Verdict::Fail(format!(
                    "vpsci exit status {:?}, expected {want_exit}",
                    out.exit
                ));
            }
            Verdict::Pass
        }
    }
}

/// A refused hibernate: the guest's own verdict (the call returned INTERNAL_FAILURE), and
/// against vpsci the VMM's side: exit status 0 and the log's system events exactly the
/// hibernate marked `"refused": true`, then `off`. `None` leaves an unreported scenario
/// to the usual "never reported" verdict.
fn judge_refused(
    guest: Option<&Verdict>,
    called: bool,
    out: &RunOutput,
    against: Against,
) -> Option<Verdict> {
    let qemu_skip =
        || Verdict::Skip("QEMU has no operator policy to refuse a hibernate request".into());
    match (guest, against) {
        (Some(Verdict::Pass), Against::Vpsci) => Some(refused_from_vmm_side(out)),
        (Some(Verdict::Pass), Against::Qemu) => Some(qemu_skip()),
        (Some(other), _) => Some(other.clone()),
        (None, _) if !called => None,
        (None, Against::Qemu) => Some(qemu_skip()),
        (None, Against::Vpsci) => Some(Verdict::Fail(format!(
            "SYSTEM_OFF2(HIBERNATE_OFF) did not return (vpsci exit status {:?}, events {})",
            out.exit,
            event_names(out)
        ))),
    }
}

/// The log's system events as `name[+refused] ...`.
fn event_names(out: &RunOutput) -> String {
    let names: Vec<String> = out
        .events
        .iter()
        .filter(|e| e["kind"] == "system_event")
        .map(|e| {
            let name = e["event"].as_str().unwrap_or("?");
            if e["refused"] == true {
                format!("{name}+refused")
            } else {
                name.to_string()
            }
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

fn refused_from_vmm_side(out: &RunOutput) -> Verdict {
    if let Some(problem) = &out.problem {
        return Verdict::Fail(problem.clone());
    }
    let events = event_names(out);
    if events != "hibernate+refused off" {
        return Verdict::Fail(format!(
            "event log shows system events {events}, expected hibernate+refused off"
        ));
    }
    if out.exit != Some(0) {
        return Verdict::Fail(format!("vpsci exit status {:?}, expected 0", out.exit));
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::plan::{
        plan,
        tests::{refused_run, reset_run},
    };
    use crate::conformance::Options;

    fn output(lines: &[&str]) -> RunOutput {
        RunOutput {
            lines: lines.iter().map(|l| l.to_string()).collect(),
            exit: Some(0),
            ..RunOutput::default()
        }
    }

    #[test]
    fn unreported_scenarios_fail_with_the_guests_last_words() {
        let run = Run::new("r", "psci-basic", 4, &["a", "b"]);
        let out = output(&[
            "VG-CHECK a PASS",
            "VG-FATAL exception kind=4 esr=0x96000000",
        ]);
        let verdicts = judge(&run, &out, Against::Vpsci);
        assert_eq!(verdicts[0], ("a".to_string(), Verdict::Pass));
        match &verdicts[1].1 {
            Verdict::Fail(why) => assert!(why.contains("esr=0x96000000"), "{why}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn check_lines_keep_failure_details_and_skip_reasons() {
        let run = Run::new("r", "x", 1, &["a", "b"]);
        let out = output(&[
            "noise VG-CHECK a FAIL got DENIED\r",
            "VG-CHECK b SKIP needs 1.3",
        ]);
        let verdicts = judge(&run, &out, Against::Qemu);
        assert_eq!(verdicts[0].1, Verdict::Fail("got DENIED".into()));
        assert_eq!(verdicts[1].1, Verdict::Skip("needs 1.3".into()));
    }

    #[test]
    fn warm_reset_passes_only_with_the_event_and_cookie_in_the_vpsci_log() {
        let run = reset_run();
        let mut out = output(&["VG-CALL system-reset2-warm"]);
        out.exit = Some(3);
        out.events = vec![serde_json::json!({
            "kind": "system_event", "event": "warm_reset", "cookie": "0x123456789abcdef0"
        })];
        assert_eq!(judge(&run, &out, Against::Vpsci)[0].1, Verdict::Pass);
        out.events[0]["cookie"] = "0x1".into();
        assert!(matches!(
            judge(&run, &out, Against::Vpsci)[0].1,
            Verdict::Fail(_)
        ));
        out.events.clear();
        assert!(matches!(
            judge(&run, &out, Against::Vpsci)[0].1,
            Verdict::Fail(_)
        ));
    }

    fn refused_output(guest: &str, exit: i32, events: &[serde_json::Value]) -> RunOutput {
        let mut out = output(&["VG-CALL system-off2-refused-internal-failure", guest]);
        out.exit = Some(exit);
        out.events = events.to_vec();
        out
    }

    #[test]
    fn refused_hibernate_passes_only_with_guest_pass_exit_0_and_refused_then_off_logged() {
        let run = refused_run();
        let pass = "VG-CHECK system-off2-refused-internal-failure PASS";
        let refused = serde_json::json!({
            "kind": "system_event", "vcpu": 0, "event": "hibernate", "refused": true
        });
        let hibernated = serde_json::json!({
            "kind": "system_event", "vcpu": 0, "event": "hibernate"
        });
        let off = serde_json::json!({"kind": "system_event", "vcpu": 0, "event": "off"});
        let verdict = |out: &RunOutput| judge(&run, out, Against::Vpsci)[0].1.clone();
        let good = refused_output(pass, 0, &[refused.clone(), off.clone()]);
        assert_eq!(verdict(&good), Verdict::Pass);
        for bad in [
            refused_output(pass, 0, &[hibernated, off.clone()]),
            refused_output(pass, 0, std::slice::from_ref(&refused)),
            refused_output(pass, 0, &[off.clone(), refused.clone()]),
            refused_output(pass, 1, &[refused.clone(), off.clone()]),
        ] {
            assert!(matches!(verdict(&bad), Verdict::Fail(_)), "{bad:?}");
        }
        let guest_fail = refused_output(
            "VG-CHECK system-off2-refused-internal-failure FAIL returned SUCCESS",
            0,
            &[refused, off],
        );
        assert_eq!(
            verdict(&guest_fail),
            Verdict::Fail("returned SUCCESS".into())
        );
    }

    #[test]
    fn refused_hibernate_that_ends_the_vm_fails_on_vpsci_and_skips_on_qemu() {
        let run = refused_run();
        let out = refused_output(
            "",
            0,
            &[serde_json::json!({"kind": "system_event", "event": "hibernate"})],
        );
        match &judge(&run, &out, Against::Vpsci)[0].1 {
            Verdict::Fail(why) => assert!(why.contains("did not return"), "{why}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(matches!(
            judge(&run, &out, Against::Qemu)[0].1,
            Verdict::Skip(_)
        ));
        let skipped = output(&["VG-CHECK system-off2-refused-internal-failure SKIP needs 1.3"]);
        assert_eq!(
            judge(&run, &skipped, Against::Qemu)[0].1,
            Verdict::Skip("needs 1.3".into())
        );
    }

    #[test]
    fn a_terminal_call_that_returns_fails() {
        let run = reset_run();
        let out = output(&[
            "VG-CALL system-reset2-warm",
            "VG-RETURNED system-reset2-warm -1",
        ]);
        assert!(matches!(
            judge(&run, &out, Against::Vpsci)[0].1,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn qemu_reports_version_gating_once_and_skips_versions_it_cannot_select() {
        let options = Options {
            long: true,
            filter: Some("version-gating".into()),
            against: Against::Qemu,
            ..Options::default()
        };
        let runs = plan(&options);
        assert_eq!(runs.len(), 1);
        let out = output(&["VG-CHECK version-gating-1.1 PASS"]);
        let verdicts = judge(&runs[0], &out, Against::Qemu);
        assert_eq!(verdicts.len(), 5);
        assert_eq!(
            verdicts.iter().filter(|(_, v)| *v == Verdict::Pass).count(),
            1
        );
        assert!(verdicts.iter().all(|(_, v)| !matches!(v, Verdict::Fail(_))));
    }
}
