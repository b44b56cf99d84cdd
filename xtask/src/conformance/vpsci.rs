//! The vpsci and KVM backends: every run under `vpsci run` (with `--in-kernel-psci` for
//! KVM's own PSCI) in one boot of the KVM machine, and the same runs as nested groups of
//! `cargo xtask test`.
//!
//! Inside the machine a job only collects: it runs vpsci, then prints vpsci's exit status,
//! its stderr and the `system_event` lines of its event log, each line marked with a tag
//! the guest cannot know (a per-session nonce). [`super::judge::judge()`] judges on the host, for
//! both commands.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use super::hostile::{LogEntry, Sample};
use super::image::prepare_images;
use super::judge::{judge, RunOutput, Verdict};
use super::plan::{plan, Hostile, Run};
use super::{Against, Options};
use crate::machine::{self, GuestFile, Job, JobResult, MachineConfig, Observer, Outcome, Session};
use crate::provision;
use crate::report::Counts;

/// The directory of `binary`, to put on the machine's `PATH`.
pub(crate) fn path_entry(binary: &Path) -> String {
    binary
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Where the images, event logs and stderr files live in the machine (not under /tmp:
/// the machine mounts a fresh tmpfs there after unpacking the files).
const WORK: &str = "/conformance";

/// A tag for this session's collection markers: the guest's output cannot contain it.
pub(super) fn session_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("VMM-{:x}{:x}", std::process::id(), nanos)
}

/// `vpsci run` with the run's image, vCPUs, conduit, timeout and options, and
/// `--in-kernel-psci` against KVM.
fn vpsci_command(run: &Run, image: &str, events: &str, against: Against) -> String {
    let q = machine::shell_quote;
    let mut cmd = format!(
        "vpsci run --image {} --cpus {} --conduit {} --on-reset {} --timeout {} --events {}",
        q(image),
        run.cpus,
        if run.smc { "smc" } else { "hvc" },
        if run.restarts.is_some() {
            "restart"
        } else {
            "exit"
        },
        run.timeout.as_secs(),
        q(events),
    );
    if let Some(v) = run.psci_version {
        let _ = write!(cmd, " --psci-version {v}");
    }
    if run.refuse_hibernate {
        cmd.push_str(" --on-hibernate refuse");
    }
    if run.report_on_pending {
        cmd.push_str(" --report-on-pending");
    }
    if against == Against::Kvm {
        cmd.push_str(" --in-kernel-psci");
    }
    cmd
}

/// vpsci behind a FIFO for its console input, sampled from /proc each time the guest asks
/// (busybox sh; `@...@` are filled in by [`collect_shell`]). Ends with `rc` set and the
/// console printed.
const SAMPLED_LAUNCH: &str = r#"rm -f @FIFO@ @CONSOLE@; mkfifo @FIFO@; @VPSCI@ <@FIFO@ >@CONSOLE@ 2>@STDERR@ & pid=$!; exec 3>@FIFO@; n=0; while kill -0 $pid 2>/dev/null; do k=$(grep -c 'VG-INFO reset-cycles sample=' @CONSOLE@); while [ $n -lt $k ]; do n=$((n+1)); t=$(sed -n 's/^Threads:[[:space:]]*//p' /proc/$pid/status); r=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$pid/status); a=$(sed -n 's/^RssAnon:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$pid/status); m=$(sed -n 's/^RssFile:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$pid/status); f=$(ls /proc/$pid/fd | wc -l); echo "@TAG@-PROC $n $t $f $r $a $m"; printf x >&3; done; sleep 1; done; wait $pid; rc=$?; exec 3>&-; cat @CONSOLE@"#;

/// The whole event log, in order: each `psci_call` compacted to `vcpu function outcome
/// [x0]`, every other line as it is (POSIX sed, as busybox has it).
const COMPACT_LOG: &str = r#"sed -n -e 's/^.*"kind":"psci_call","vcpu":\([0-9]*\),"function":"\([A-Z0-9_]*\)".*"outcome":"\([a-z_]*\)","x0":\(-\{0,1\}[0-9]*\)}}$/@TAG@-CALL \1 \2 \3 \4/p' -e t -e 's/^.*"kind":"psci_call","vcpu":\([0-9]*\),"function":"\([A-Z0-9_]*\)".*"outcome":"\([a-z_]*\)".*$/@TAG@-CALL \1 \2 \3/p' -e t -e 's/^/@TAG@-LOG /p' @LOG@"#;

/// The job's shell command: run vpsci with the guest console on stdout, then print the
/// exit status, vpsci's stderr and the log's system events behind `tag` markers. A hostile
/// run also prints its whole event log, each call compacted to `vcpu function outcome
/// [x0]` (`-CALL`) and every other line as it is (`-LOG`); the reset-cycle run's vpsci reads
/// its console input from a FIFO, and each time the guest prints a sample request the
/// script reads vpsci's threads, open descriptors and resident memory from /proc (`-PROC
/// k threads fds rss_kb anon_kb file_kb`), then sends the guest one byte.
fn collect_shell(run: &Run, against: Against, tag: &str) -> String {
    let q = machine::shell_quote;
    let image = format!("{WORK}/{}.bin", run.id);
    let events = format!("{WORK}/{}.jsonl", run.id);
    let stderr = format!("{WORK}/{}.stderr", run.id);
    let e = q(&events);
    let s = q(&stderr);
    let vpsci = vpsci_command(run, &image, &events, against);
    let launch = if run.hostile == Some(Hostile::ResetCycles) {
        SAMPLED_LAUNCH
            .replace("@FIFO@", &q(&format!("{WORK}/{}.input", run.id)))
            .replace("@CONSOLE@", &q(&format!("{WORK}/{}.console", run.id)))
            .replace("@STDERR@", &s)
            .replace("@TAG@", tag)
            .replace("@VPSCI@", &vpsci)
    } else {
        format!("{vpsci} 2>{s}; rc=$?")
    };
    let log = if run.hostile.is_some() {
        format!(
            "; {}",
            COMPACT_LOG.replace("@TAG@", tag).replace("@LOG@", &e)
        )
    } else {
        String::new()
    };
    format!(
        "rm -f {e} {s}; {launch}; echo; echo \"{tag}-EXIT $rc\"; \
         sed 's/^/{tag}-ERR /' {s}; \
         grep -F '\"kind\":\"system_event\"' {e} | sed 's/^/{tag}-EVENT /'{log}; exit 0"
    )
}

/// Separates the markers [`collect_shell`] prints from the guest console.
fn split_output(lines: &[String], result: &JobResult, tag: &str) -> RunOutput {
    let mut out = RunOutput {
        elapsed: result.elapsed,
        ..RunOutput::default()
    };
    let mut problems = Vec::new();
    let mut exits = 0;
    for line in lines {
        let (console, marker) = match line.find(tag) {
            Some(at) => (&line[..at], Some(&line[at + tag.len()..])),
            None => (line.as_str(), None),
        };
        if marker.is_none() || !console.is_empty() {
            out.lines.push(console.to_string());
        }
        let Some(marker) = marker else { continue };
        if let Some(status) = marker.strip_prefix("-EXIT ") {
            exits += 1;
            out.exit = status.trim().parse().ok();
        } else if let Some(message) = marker.strip_prefix("-ERR ") {
            out.vmm_messages.push(message.to_string());
        } else if let Some(call) = marker.strip_prefix("-CALL ") {
            match LogEntry::from_call(call) {
                Some(entry) => out.log.push(entry),
                None => problems.push(format!("unreadable compacted call `{call}`")),
            }
        } else if let Some(line) = marker.strip_prefix("-LOG ") {
            match serde_json::from_str(line.trim()) {
                Ok(value) => out.log.push(LogEntry::Line(value)),
                Err(e) => problems.push(format!("unreadable event log line `{line}`: {e}")),
            }
        } else if let Some(sample) = marker.strip_prefix("-PROC ") {
            match Sample::parse(sample) {
                Some(sample) => out.samples.push(sample),
                None => problems.push(format!("unreadable resource sample `{sample}`")),
            }
        } else if let Some(event) = marker.strip_prefix("-EVENT ") {
            match serde_json::from_str(event.trim()) {
                Ok(value) => out.events.push(value),
                Err(e) => problems.push(format!("unreadable event log line `{event}`: {e}")),
            }
        } else {
            problems.push(format!("unknown collection marker `{marker}`"));
        }
    }
    if exits != 1 {
        problems.push(format!("vpsci's exit status was reported {exits} times"));
    }
    out.problem = match &result.outcome {
        Outcome::Exited(0) => problems.first().cloned(),
        other => Some(format!("the job did not complete: {other:?}")),
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

/// The machine's job for `run`.
fn job(run: &Run, against: Against, tag: &str) -> Job {
    Job {
        argv: vec!["sh".into(), "-c".into(), collect_shell(run, against, tag)],
        cwd: WORK.into(),
        env: Vec::new(),
        timeout: run.timeout + Duration::from_secs(30),
    }
}

/// The image and vpsci files a run needs in the machine.
fn files(run: &Run, images: &BTreeMap<String, PathBuf>, vpsci: &Path) -> Vec<GuestFile> {
    vec![
        GuestFile {
            host: images[&run.id].clone(),
            guest: format!("{WORK}/{}.bin", run.id),
        },
        GuestFile {
            guest: vpsci.to_string_lossy().into_owned(),
            host: vpsci.to_path_buf(),
        },
    ]
}

/// Runs every booted run on arm64 KVM, under vpsci's engine or (`Against::Kvm`) KVM's
/// own PSCI; returns one output per run (empty for runs not offered).
pub(super) fn run_on_vpsci(
    runs: &[Run],
    images: &BTreeMap<String, PathBuf>,
    against: Against,
) -> Result<Vec<RunOutput>> {
    let host = provision::prepare_machine()?;
    let vpsci = crate::nested::build_vpsci()?;
    let tag = session_tag();
    let booted: Vec<&Run> = runs.iter().filter(|r| r.not_offered.is_none()).collect();
    let mut session_files: BTreeMap<String, GuestFile> = BTreeMap::new();
    for run in &booted {
        for file in files(run, images, &vpsci) {
            session_files.insert(file.guest.clone(), file);
        }
    }
    eprintln!(
        "conformance: running {} guests on {} ({})",
        booted.len(),
        host.describe(),
        against.label()
    );
    let session = Session {
        files: session_files.into_values().collect(),
        path: vec![path_entry(&vpsci)],
        jobs: booted.iter().map(|r| job(r, against, &tag)).collect(),
    };
    let mut collect = Collect {
        lines: vec![Vec::new(); booted.len()],
    };
    let results = machine::run(&host, &MachineConfig::default(), &session, &mut collect)?;
    let mut outputs = BTreeMap::new();
    for (i, (run, lines)) in booted.iter().zip(&collect.lines).enumerate() {
        let result = results.get(i).cloned().unwrap_or(JobResult {
            outcome: Outcome::NotRun("the machine returned no result".into()),
            elapsed: Duration::ZERO,
        });
        outputs.insert(run.id.clone(), split_output(lines, &result, &tag));
    }
    Ok(runs
        .iter()
        .map(|r| outputs.remove(&r.id).unwrap_or_default())
        .collect())
}

/// Turns verdicts into the counts `cargo xtask test` reports (skips with their reasons,
/// failures by name with their reasons in `detail`).
fn count(verdicts: &[(String, Verdict)]) -> (Counts, String) {
    let mut counts = Counts::default();
    let mut detail = String::new();
    for (name, verdict) in verdicts {
        match verdict {
            Verdict::Pass => counts.passed += 1,
            Verdict::Fail(why) => {
                counts.failed += 1;
                counts.failed_names.push(name.clone());
                let _ = writeln!(detail, "FAIL {name}: {why}");
            }
            Verdict::Skip(why) => counts.ignored.push((name.clone(), why.clone())),
        }
    }
    (counts, detail)
}

/// The suite against vpsci as nested groups of `cargo xtask test` (one group per run),
/// sharing the test binaries' boot of the KVM machine and judged on the host by
/// [`judge`]. `long` gives the race and suspend runs their `--long` sizes.
pub fn nested_groups(long: bool) -> Result<Vec<crate::test::NestedGroup>> {
    let options = Options {
        long,
        ..Options::default()
    };
    let runs = plan(&options);
    let images = prepare_images(&runs, long)?;
    let vpsci = crate::nested::build_vpsci()?;
    let tag = session_tag();
    let mut groups = Vec::new();
    for run in runs {
        let judge_run = run.clone();
        let tag_for_judge = tag.clone();
        let judged: crate::test::Judge = Arc::new(move |lines: &[String], result: &JobResult| {
            let out = split_output(lines, result, &tag_for_judge);
            let verdicts = judge(&judge_run, &out, Against::Vpsci);
            let (counts, mut detail) = count(&verdicts);
            let mut info: Vec<String> = out
                .lines
                .iter()
                .filter_map(|l| l.strip_prefix("VG-INFO "))
                .map(str::to_string)
                .collect();
            info.extend(super::hostile::host_info(&out));
            if counts.failed > 0 {
                let _ = writeln!(detail, "{}", last_lines(&out, 20));
            }
            crate::test::Judged {
                counts,
                expected: judge_run.scenarios.len() as u64,
                info,
                detail,
            }
        });
        groups.push(crate::test::NestedGroup {
            name: format!("conformance: {} ({} vCPUs)", run.id, run.cpus),
            files: files(&run, &images, &vpsci),
            path: vec![path_entry(&vpsci)],
            job: job(&run, Against::Vpsci, &tag),
            style: crate::test::CountStyle::Scenarios(judged),
            show_output: false,
        });
    }
    Ok(groups)
}

/// The end of a run's console and vpsci's messages, for a failure's detail.
fn last_lines(out: &RunOutput, n: usize) -> String {
    let console: Vec<&str> = out.lines.iter().map(String::as_str).collect();
    let start = console.len().saturating_sub(n);
    let mut text = format!("last console lines:\n{}", console[start..].join("\n"));
    for message in &out.vmm_messages {
        let _ = write!(text, "\n{message}");
    }
    text
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::conformance::judge::tests::{cases, first_verdict, Case};
    use crate::conformance::plan::tests::planned;

    /// Runs [`collect_shell`] against a fake `vpsci` that prints `console` on stdout, a
    /// message on stderr, writes `events` (and a psci_call line) to its `--events` file
    /// and exits with `status`; returns the job's lines as the machine would hand them over.
    fn collect_in_shell(
        run: &Run,
        console: &[&str],
        events: &[String],
        status: i32,
    ) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!(
            "xtask-conf-{}-{}-{}",
            std::process::id(),
            run.id,
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = events.to_vec();
        log.insert(
            0,
            r#"{"t_ns":1,"kind":"psci_call","vcpu":0,"function":"SYSTEM_OFF","result":{"outcome":"system_event"}}"#
                .to_string(),
        );
        let fake = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = --events ]; then ev=$2; fi; shift; done\n\
             printf '%s\\n' {} >\"$ev\"\nprintf '%s' {}\necho 'vpsci: the end' >&2\nexit {status}\n",
            machine::shell_quote(&log.join("\n")),
            machine::shell_quote(&console.join("\n")),
        );
        let vpsci = dir.join("vpsci");
        std::fs::write(&vpsci, fake).unwrap();
        let mut perms = std::fs::metadata(&vpsci).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&vpsci, perms).unwrap();
        let d = dir.to_string_lossy().into_owned();
        let script = collect_shell(run, Against::Vpsci, "VMM-test").replace(WORK, &d);
        let path = format!("{d}:{}", std::env::var("PATH").unwrap_or_default());
        let output = Command::new("sh")
            .args(["-c", &script])
            .current_dir(&dir)
            .env("PATH", path)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn through_the_machine(case: &Case) -> Verdict {
        let events: Vec<String> = case.events.iter().map(|e| e.to_string()).collect();
        let lines = collect_in_shell(&case.run, &case.console, &events, case.exit);
        let result = JobResult {
            outcome: Outcome::Exited(0),
            elapsed: Duration::ZERO,
        };
        let out = split_output(&lines, &result, "VMM-test");
        assert_eq!(out.exit, Some(case.exit), "{}: {lines:?}", case.what);
        assert_eq!(out.vmm_messages, ["vpsci: the end"], "{}", case.what);
        assert_eq!(out.events, case.events, "{}", case.what);
        judge(&case.run, &out, Against::Vpsci).remove(0).1
    }

    #[test]
    fn the_in_machine_collection_and_judge_get_every_case_right() {
        for case in cases() {
            let verdict = through_the_machine(&case);
            assert_eq!(
                std::mem::discriminant(&verdict),
                std::mem::discriminant(&first_verdict(&case)),
                "{}: {verdict:?}",
                case.what
            );
            assert_eq!(
                verdict == Verdict::Pass,
                case.pass,
                "{}: {verdict:?}",
                case.what
            );
        }
    }

    #[test]
    fn a_hostile_runs_whole_log_comes_back_in_order_with_calls_compacted() {
        let run = planned(Against::Vpsci, "cpu-on-edges");
        let events = [
            r#"{"t_ns":2,"kind":"psci_call","vcpu":0,"function":"CPU_ON","function_id":"0xc4000003","args":["0x1","0x0","0x0"],"result":{"outcome":"return","x0":-9}}"#,
            r#"{"t_ns":3,"kind":"power_state","vcpu":1,"from":"off","to":"on_pending"}"#,
            r#"{"t_ns":4,"kind":"psci_call","vcpu":1,"function":"CPU_OFF","function_id":"0x84000002","args":["0x0","0x0","0x0"],"result":{"outcome":"power_off"}}"#,
            r#"{"t_ns":5,"kind":"system_event","vcpu":0,"event":"off"}"#,
        ]
        .map(str::to_string);
        let lines = collect_in_shell(&run, &["VG-START cpu-on-edges"], &events, 0);
        let result = JobResult {
            outcome: Outcome::Exited(0),
            elapsed: Duration::ZERO,
        };
        let out = split_output(&lines, &result, "VMM-test");
        assert_eq!(out.problem, None);
        let call = |text| LogEntry::from_call(text).unwrap();
        assert_eq!(out.log.len(), 5, "{:?}", out.log);
        assert_eq!(out.log[0], call("0 SYSTEM_OFF system_event"));
        assert_eq!(out.log[1], call("0 CPU_ON return -9"));
        assert!(matches!(&out.log[2], LogEntry::Line(v) if v["to"] == "on_pending"));
        assert_eq!(out.log[3], call("1 CPU_OFF power_off"));
        assert!(matches!(&out.log[4], LogEntry::Line(v) if v["event"] == "off"));
        assert_eq!(out.events.len(), 1);
        assert_eq!(
            out.lines.first().map(String::as_str),
            Some("VG-START cpu-on-edges")
        );
    }

    #[test]
    fn collection_markers_need_the_sessions_tag_and_come_exactly_once() {
        let result = JobResult {
            outcome: Outcome::Exited(0),
            elapsed: Duration::ZERO,
        };
        let forged = vec![
            "VG-START x".to_string(),
            "VMM-other-EXIT 0".to_string(),
            "VG-DONE".to_string(),
        ];
        let out = split_output(&forged, &result, "VMM-real");
        assert!(out.problem.is_some());
        let twice = vec!["VMM-real-EXIT 0".to_string(), "VMM-real-EXIT 0".to_string()];
        assert!(split_output(&twice, &result, "VMM-real").problem.is_some());
        let glued = vec!["VG-DONEVMM-real-EXIT 0".to_string()];
        let out = split_output(&glued, &result, "VMM-real");
        assert_eq!(out.lines, ["VG-DONE"]);
        assert_eq!(out.exit, Some(0));
        assert!(out.problem.is_none());
        let killed = JobResult {
            outcome: Outcome::TimedOut,
            elapsed: Duration::ZERO,
        };
        assert!(split_output(&glued, &killed, "VMM-real").problem.is_some());
    }

    #[test]
    fn the_command_line_pins_what_the_run_needs() {
        let run = planned(Against::Vpsci, "cpu-on-race-8-report-on-pending");
        let cmd = vpsci_command(&run, "i.bin", "e.jsonl", Against::Vpsci);
        assert!(cmd.contains(" --report-on-pending"), "{cmd}");
        assert!(!cmd.contains("--in-kernel-psci"));
        let run = planned(Against::Vpsci, "system-off2-hibernate");
        let cmd = vpsci_command(&run, "i.bin", "e.jsonl", Against::Vpsci);
        assert!(cmd.contains(" --psci-version 1.3"), "{cmd}");
        let run = planned(Against::Kvm, "system-off2-hibernate");
        let cmd = vpsci_command(&run, "i.bin", "e.jsonl", Against::Kvm);
        assert!(cmd.ends_with(" --in-kernel-psci"), "{cmd}");
        assert!(!cmd.contains("--psci-version"), "{cmd}");
    }
}
