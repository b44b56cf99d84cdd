//! Running jobs directly on an arm64 host with `/dev/kvm`: no QEMU, same results.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Job, JobResult, Observer, Outcome, Session, BASE_PATH};
use crate::process::wait_bounded;

pub(super) fn run(session: &Session, observer: &mut dyn Observer) -> Result<Vec<JobResult>> {
    for file in &session.files {
        let guest = Path::new(&file.guest);
        let same = fs::canonicalize(&file.host).ok() == fs::canonicalize(guest).ok();
        if !same {
            if let Some(parent) = guest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy(&file.host, guest).with_context(|| {
                format!("could not copy {} to {}", file.host.display(), file.guest)
            })?;
        }
    }
    let mut path: Vec<String> = session.path.clone();
    path.push(std::env::var("PATH").unwrap_or_else(|_| BASE_PATH.to_string()));
    let path = path.join(":");
    let mut results = Vec::new();
    for (index, job) in session.jobs.iter().enumerate() {
        observer.started(index);
        let result = run_job(index, job, &path, observer);
        observer.finished(index, &result);
        results.push(result);
    }
    Ok(results)
}

fn run_job(index: usize, job: &Job, path: &str, observer: &mut dyn Observer) -> JobResult {
    let started = Instant::now();
    let Some((program, args)) = job.argv.split_first() else {
        return JobResult {
            outcome: Outcome::NotRun("empty command".to_string()),
            elapsed: Duration::ZERO,
        };
    };
    let _ = fs::create_dir_all(&job.cwd);
    let spawned = Command::new(program)
        .args(args)
        .current_dir(&job.cwd)
        .env("PATH", path)
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            return JobResult {
                outcome: Outcome::NotRun(format!("could not start {program}: {err}")),
                elapsed: started.elapsed(),
            }
        }
    };
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let pipes: Vec<Box<dyn Read + Send>> = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let open = pipes.len();
    for pipe in pipes {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
    }
    drop(tx);
    let deadline = started + job.timeout;
    let mut closed = 0;
    let mut timed_out = false;
    while closed < open {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(Some(line)) => observer.line(index, &line),
            Ok(None) => closed += 1,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }
    if timed_out {
        let _ = child.kill();
    }
    let status = wait_bounded(&mut child, Duration::from_secs(10));
    let outcome = match (timed_out, status) {
        (true, _) => Outcome::TimedOut,
        (false, Ok(status)) => Outcome::Exited(exit_code(status)),
        (false, Err(err)) => Outcome::Lost(format!("could not wait for {program}: {err}")),
    };
    JobResult {
        outcome,
        elapsed: started.elapsed(),
    }
}

#[cfg(unix)]
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(not(unix))]
fn exit_code(status: std::process::ExitStatus) -> i32 {
    status.code().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lines(Vec<(usize, String)>);
    impl Observer for Lines {
        fn line(&mut self, job: usize, line: &str) {
            self.0.push((job, line.to_string()));
        }
    }

    fn job(script: &str, timeout: Duration) -> Job {
        Job {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir().to_string_lossy().into_owned(),
            env: vec![("VPSCI_X".into(), "42".into())],
            timeout,
        }
    }

    #[test]
    fn jobs_run_in_order_with_their_output_environment_and_status() {
        let session = Session {
            jobs: vec![
                job(
                    "echo out $VPSCI_X; echo err >&2; exit 3",
                    Duration::from_secs(30),
                ),
                job("kill -9 $$", Duration::from_secs(30)),
            ],
            ..Session::default()
        };
        let mut lines = Lines(Vec::new());
        let results = run(&session, &mut lines).unwrap();
        assert_eq!(results[0].outcome, Outcome::Exited(3));
        assert_eq!(results[1].outcome, Outcome::Exited(128 + 9));
        let mut first: Vec<&str> = lines
            .0
            .iter()
            .filter(|(j, _)| *j == 0)
            .map(|(_, l)| l.as_str())
            .collect();
        first.sort();
        assert_eq!(first, ["err", "out 42"]);
    }

    #[test]
    fn a_job_past_its_time_limit_is_killed_and_reported_timed_out() {
        let session = Session {
            jobs: vec![job("sleep 30", Duration::from_millis(300))],
            ..Session::default()
        };
        let started = Instant::now();
        let results = run(&session, &mut Lines(Vec::new())).unwrap();
        assert_eq!(results[0].outcome, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}
