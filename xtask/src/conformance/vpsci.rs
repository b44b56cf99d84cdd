//! The vpsci backend: every run under `vpsci run` in one boot of the KVM machine, and the
//! same runs as nested groups of `cargo xtask test`, judged by a shell script inside the
//! machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::image::prepare_images;
use super::judge::RunOutput;
use super::plan::{plan, Run, Terminal, VENDOR_COOKIE, VENDOR_TYPE, WARM_COOKIE};
use super::Options;
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Outcome, Session};
use crate::provision;

/// The directory of `binary`, to put on the machine's `PATH`.
pub(crate) fn path_entry(binary: &Path) -> String {
    binary
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `vpsci run` with the run's image, vCPUs, conduit, timeout and PSCI version; the shell
/// scripts below add `--events` and what happens after vpsci exits.
fn vpsci_command(run: &Run, image: &str) -> String {
    let mut cmd = format!(
        "vpsci run --image {} --cpus {} --conduit {} --on-reset exit --timeout {}",
        machine::shell_quote(image),
        run.cpus,
        if run.smc { "smc" } else { "hvc" },
        run.timeout.as_secs()
    );
    if let Some(v) = run.psci_version {
        let _ = write!(cmd, " --psci-version {v}");
    }
    if run.refuse_hibernate {
        cmd.push_str(" --on-hibernate refuse");
    }
    cmd
}

/// The `system_event` lines of `events` as one line of words: the event name, with
/// `+refused` when the VMM refused it (e.g. `hibernate+refused off `).
fn event_sequence_shell(events: &str) -> String {
    let name = r#"s/.*"event":"\([a-z_]*\)".*/\1"#;
    format!(
        r#"grep -F '"kind":"system_event"' {events} | sed -n -e '/"refused":true/{name}+refused/p' -e '/"refused":true/!{name}/p' | tr '\n' ' '"#,
        events = machine::shell_quote(events)
    )
}

/// The shell command that runs one guest under vpsci and prints its exit status and the
/// system events of its log, bracketed so [`split_vpsci_output`] can find them.
fn vpsci_shell(run: &Run, image: &str, events: &str) -> String {
    let q = machine::shell_quote;
    let mut cmd = vpsci_command(run, image);
    if run.terminal.is_some() {
        let _ = write!(
            cmd,
            " --events {e}; rc=$?; echo VG-VMM-EXIT $rc; grep -F '\"system_event\"' {e} \
             | sed 's/^/VG-EVENT /'; exit 0",
            e = q(events)
        );
    } else {
        cmd.push_str("; echo VG-VMM-EXIT $?; exit 0");
    }
    cmd
}

/// Separates the markers [`vpsci_shell`] prints from the console lines.
fn split_vpsci_output(lines: Vec<String>, result: &JobResult) -> RunOutput {
    let mut out = RunOutput {
        elapsed: result.elapsed,
        ..RunOutput::default()
    };
    for line in lines {
        if let Some(rest) = line.strip_prefix("VG-VMM-EXIT ") {
            out.exit = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("VG-EVENT ") {
            if let Ok(value) = serde_json::from_str(rest.trim()) {
                out.events.push(value);
            }
        } else {
            out.lines.push(line);
        }
    }
    out.problem = match &result.outcome {
        Outcome::Exited(_) if out.exit == Some(1) => Some(format!(
            "vpsci failed: {}",
            out.lines
                .iter()
                .rev()
                .find(|l| l.starts_with("vpsci:"))
                .cloned()
                .unwrap_or_else(|| "exit status 1".into())
        )),
        Outcome::Exited(_) => None,
        other => Some(format!("{other:?}")),
    };
    out
}

/// Collects each job's lines.
struct Collect {
    lines: Vec<Vec<String>>,
}

impl Observer for Collect {
    fn line(&mut self, job: usize, line: &str) {
        if let Some(slot) = self.lines.get_mut(job) {
            slot.push(line.to_string());
        }
    }
}

pub(super) fn run_on_vpsci(
    runs: &[Run],
    images: &BTreeMap<String, PathBuf>,
) -> Result<Vec<RunOutput>> {
    let host = provision::prepare_machine()?;
    let vpsci = crate::nested::build_vpsci()?;
    let vpsci_dir = path_entry(&vpsci);
    // Not under /tmp: the machine mounts a fresh tmpfs there after unpacking the files.
    let work = "/conformance";
    let mut files = vec![GuestFile {
        guest: vpsci.to_string_lossy().into_owned(),
        host: vpsci.clone(),
    }];
    let mut jobs = Vec::new();
    for run in runs {
        let guest_image = format!("{work}/{}.bin", run.id);
        files.push(GuestFile {
            host: images[&run.id].clone(),
            guest: guest_image.clone(),
        });
        let events = format!("{work}/{}.jsonl", run.id);
        jobs.push(Job {
            argv: vec![
                "sh".into(),
                "-c".into(),
                vpsci_shell(run, &guest_image, &events),
            ],
            cwd: work.into(),
            env: Vec::new(),
            timeout: run.timeout + Duration::from_secs(30),
        });
    }
    eprintln!(
        "conformance: running {} guests on {}",
        runs.len(),
        host.describe()
    );
    let session = Session {
        files,
        path: vec![vpsci_dir],
        jobs,
    };
    let mut collect = Collect {
        lines: vec![Vec::new(); runs.len()],
    };
    let results = machine::run(&host, &MachineConfig::default(), &session, &mut collect)?;
    let mut outputs = Vec::new();
    for (i, lines) in collect.lines.into_iter().enumerate() {
        let result = results.get(i).cloned().unwrap_or(JobResult {
            outcome: Outcome::NotRun("the machine returned no result".into()),
            elapsed: Duration::ZERO,
        });
        outputs.push(split_vpsci_output(lines, &result));
    }
    Ok(outputs)
}

/// A shell test that judges one run inside the machine, for `cargo xtask test` (whose
/// nested groups pass on exit status 0): every non-terminal scenario must report PASS or
/// SKIP, a terminal call must not return, must end vpsci with the right status and
/// must leave its `system_event` (with type and cookie) in the event log, and a refused
/// hibernate must pass in the guest and leave the refused event then `off`. Mirrors
/// [`judge`](super::judge::judge) for vpsci.
fn judging_shell(run: &Run, image: &str, events: &str, log: &str) -> String {
    let q = machine::shell_quote;
    let vpsci = format!("{} --events {}", vpsci_command(run, image), q(events));
    let log = q(log);
    let mut script = format!("{vpsci} >{log} 2>&1; rc=$?; cat {log}; fail=0\n");
    let terminal = run.terminal.as_ref().map(|(name, _)| name.as_str());
    for name in run
        .scenarios
        .iter()
        .filter(|s| Some(s.as_str()) != terminal)
    {
        let _ = writeln!(
            script,
            "grep -Eq {pattern} {log} || {{ echo {msg}; fail=1; }}",
            pattern = q(&format!("VG-CHECK {name} (PASS|SKIP)")),
            msg = q(&format!("conformance: {name} did not pass")),
        );
    }
    if let Some((name, kind)) = &run.terminal {
        match kind.ending() {
            None => refused_check(&mut script, name, &log, events),
            Some((status, event)) => {
                ending_check(&mut script, name, *kind, status, event, &log, events)
            }
        }
    }
    script.push_str("exit $fail\n");
    script
}

/// The shell check of a call that must end the VM: it must not return, vpsci must exit
/// with `status` and the log must hold its `system_event` (with type and cookie).
fn ending_check(
    script: &mut String,
    name: &str,
    kind: Terminal,
    status: i32,
    event: &str,
    log: &str,
    events: &str,
) {
    let q = machine::shell_quote;
    let extra = match kind {
        Terminal::WarmReset => format!("\"cookie\":\"{WARM_COOKIE:#x}\""),
        Terminal::VendorReset => format!("\"cookie\":\"{VENDOR_COOKIE:#x}\""),
        _ => "system_event".to_string(),
    };
    let type_check = if kind == Terminal::VendorReset {
        format!(
            " | grep -F {}",
            q(&format!("\"reset_type\":\"{VENDOR_TYPE:#x}\""))
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        script,
        "if ! grep -q {skip} {log}; then \
         grep -q {call} {log} && ! grep -q VG-RETURNED {log} && [ \"$rc\" = {status} ] \
         && grep -F {event_q} {events} | grep -F {extra}{type_check} >/dev/null \
         || {{ echo {msg} \"(vpsci exit $rc)\"; fail=1; }}; fi",
        skip = q(&format!("VG-CHECK {name} SKIP")),
        call = q(&format!("VG-CALL {name}")),
        event_q = q(&format!("\"event\":\"{event}\"")),
        extra = q(&extra),
        events = q(events),
        msg = q(&format!(
            "conformance: {name}: no {event} event with the expected status, type and cookie"
        )),
    );
}

/// The shell check of a refused hibernate: unless the guest skipped it, the guest must
/// report PASS (the call returned INTERNAL_FAILURE), vpsci must exit 0 and the log's
/// system events must be exactly the refused hibernate, then `off`.
fn refused_check(script: &mut String, name: &str, log: &str, events: &str) {
    let q = machine::shell_quote;
    let _ = writeln!(
        script,
        "if ! grep -q {skip} {log}; then \
         grep -q {pass} {log} && [ \"$rc\" = 0 ] \
         && [ \"$({sequence})\" = 'hibernate+refused off ' ] \
         || {{ echo {msg} \"(vpsci exit $rc)\"; grep -F {kind} {events_q}; fail=1; }}; fi",
        kind = q("\"kind\":\"system_event\""),
        skip = q(&format!("VG-CHECK {name} SKIP")),
        pass = q(&format!("VG-CHECK {name} PASS")),
        sequence = event_sequence_shell(events),
        events_q = q(events),
        msg = q(&format!(
            "conformance: {name}: expected PASS, vpsci exit 0 and a refused hibernate \
             then off in the event log"
        )),
    );
}

/// The suite as nested groups of `cargo xtask test` (one group per run, default sizes),
/// sharing the test binaries' boot of the KVM machine.
pub fn nested_groups() -> Result<Vec<crate::test::NestedGroup>> {
    let runs = plan(&Options::default());
    let images = prepare_images(&runs, false)?;
    let vpsci = crate::nested::build_vpsci()?;
    let vpsci_dir = path_entry(&vpsci);
    let work = "/conformance";
    let mut groups = Vec::new();
    for run in &runs {
        let image = format!("{work}/{}.bin", run.id);
        let events = format!("{work}/{}.jsonl", run.id);
        let log = format!("{work}/{}.log", run.id);
        groups.push(crate::test::NestedGroup {
            name: format!("conformance: {} ({} vCPUs)", run.id, run.cpus),
            files: vec![
                GuestFile {
                    host: images[&run.id].clone(),
                    guest: image.clone(),
                },
                GuestFile {
                    guest: vpsci.to_string_lossy().into_owned(),
                    host: vpsci.clone(),
                },
            ],
            path: vec![vpsci_dir.clone()],
            job: Job {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    judging_shell(run, &image, &events, &log),
                ],
                cwd: work.into(),
                env: Vec::new(),
                timeout: run.timeout + Duration::from_secs(30),
            },
            style: crate::test::CountStyle::Check,
            show_output: false,
        });
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::conformance::plan::tests::{refused_run, reset_run};

    /// Runs [`judging_shell`] against a fake `vpsci` that prints `console`, writes
    /// `event` to its `--events` file and exits with `status`; returns the script's status.
    fn judge_in_shell(run: &Run, console: &str, event: &str, status: i32) -> i32 {
        let dir =
            std::env::temp_dir().join(format!("xtask-conf-{}-{}", std::process::id(), run.id));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = --events ]; then ev=$2; fi; shift; done\n\
             printf '%s\\n' {} >\"$ev\"\nprintf '%s\\n' {}\nexit {status}\n",
            machine::shell_quote(event),
            machine::shell_quote(console)
        );
        let vpsci = dir.join("vpsci");
        std::fs::write(&vpsci, fake).unwrap();
        let mut perms = std::fs::metadata(&vpsci).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&vpsci, perms).unwrap();
        let d = dir.to_string_lossy().into_owned();
        let script = judging_shell(
            run,
            "img.bin",
            &format!("{d}/ev.jsonl"),
            &format!("{d}/log"),
        );
        let path = format!("{d}:{}", std::env::var("PATH").unwrap_or_default());
        let code = Command::new("sh")
            .args(["-c", &script])
            .env("PATH", path)
            .output()
            .unwrap()
            .status
            .code()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        code
    }

    #[test]
    fn in_machine_judge_checks_status_event_and_cookie_of_a_warm_reset() {
        let run = reset_run();
        let good = r#"{"kind":"system_event","vcpu":0,"event":"warm_reset","cookie":"0x123456789abcdef0"}"#;
        let bad = r#"{"kind":"system_event","vcpu":0,"event":"warm_reset","cookie":"0x1"}"#;
        assert_eq!(
            judge_in_shell(&run, "VG-CALL system-reset2-warm", good, 3),
            0
        );
        assert_ne!(
            judge_in_shell(&run, "VG-CALL system-reset2-warm", bad, 3),
            0
        );
        assert_ne!(
            judge_in_shell(&run, "VG-CALL system-reset2-warm", good, 0),
            0
        );
    }

    #[test]
    fn in_machine_judge_wants_guest_pass_exit_0_and_refused_hibernate_then_off() {
        let run = refused_run();
        let call = "VG-CALL system-off2-refused-internal-failure";
        let pass = format!("{call}\nVG-CHECK system-off2-refused-internal-failure PASS");
        let refused =
            r#"{"t_ns":1,"kind":"system_event","vcpu":0,"event":"hibernate","refused":true}"#;
        let hibernated = r#"{"t_ns":1,"kind":"system_event","vcpu":0,"event":"hibernate"}"#;
        let call_line = r#"{"t_ns":2,"kind":"psci_call","vcpu":0,"function":"SYSTEM_OFF2_64","result":{"outcome":"return","x0":-6}}"#;
        let off = r#"{"t_ns":3,"kind":"system_event","vcpu":0,"event":"off"}"#;
        let good = format!("{refused}\n{call_line}\n{off}");
        assert_eq!(judge_in_shell(&run, &pass, &good, 0), 0);
        assert_ne!(judge_in_shell(&run, &pass, &good, 1), 0);
        assert_ne!(
            judge_in_shell(&run, &pass, &format!("{hibernated}\n{off}"), 0),
            0
        );
        assert_ne!(judge_in_shell(&run, &pass, refused, 0), 0);
        assert_ne!(
            judge_in_shell(&run, &pass, &format!("{off}\n{refused}"), 0),
            0
        );
        let guest_fail = format!("{call}\nVG-CHECK system-off2-refused-internal-failure FAIL x");
        assert_ne!(judge_in_shell(&run, &guest_fail, &good, 0), 0);
        assert_ne!(judge_in_shell(&run, call, hibernated, 0), 0);
    }

    #[test]
    fn in_machine_judge_fails_a_failed_or_missing_check() {
        let run = Run::new("basic", "psci-basic", 4, &["a", "b"]);
        assert_eq!(
            judge_in_shell(&run, "VG-CHECK a PASS\nVG-CHECK b SKIP n/a", "", 0),
            0
        );
        assert_ne!(
            judge_in_shell(&run, "VG-CHECK a PASS\nVG-CHECK b FAIL x", "", 0),
            0
        );
        assert_ne!(judge_in_shell(&run, "VG-CHECK a PASS", "", 0), 0);
    }
}
