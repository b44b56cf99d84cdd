//! Running host commands with a time limit and a clear account of what failed.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a finished command left behind.
#[derive(Debug)]
pub struct Finished {
    /// Exit code; `None` when the command was killed by a signal or by our time limit.
    pub code: Option<i32>,
    /// True when the time limit expired and we killed the command.
    pub timed_out: bool,
    /// stdout and stderr, interleaved in arrival order (lossy UTF-8).
    pub output: String,
    /// stdout alone.
    pub stdout: String,
    /// stderr alone.
    pub stderr: String,
}

impl Finished {
    /// Exit code 0 within the time limit.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// The last `lines` lines of the output, for error messages, without cargo's progress
    /// lines ("Compiling x", "Checking y", ...).
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self
            .output
            .lines()
            .filter(|l| !is_cargo_progress(l))
            .collect();
        let start = all.len().saturating_sub(lines);
        all[start..].join("\n")
    }
}

/// Runs `cmd` to completion (stdin closed), capturing its output, killing it after `limit`.
pub fn run_captured(cmd: &mut Command, limit: Duration) -> Result<Finished> {
    let shown = describe(cmd);
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}` (is it installed and on PATH?)"))?;
    let (tx, rx) = mpsc::channel::<(usize, Vec<u8>)>();
    let mut readers = Vec::new();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    for (stream, pipe) in pipes.into_iter().enumerate() {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 || tx.send((stream, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let deadline = started + limit;
    let mut output = Vec::new();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((stream, chunk)) => {
                output.extend_from_slice(&chunk);
                if stream == 0 {
                    stdout.extend_from_slice(&chunk);
                } else {
                    stderr.extend_from_slice(&chunk);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }
    if timed_out {
        // The pipes may be held open by grandchildren; do not join the readers.
        let _ = child.kill();
    } else {
        for reader in readers {
            let _ = reader.join();
        }
    }
    let status = wait_bounded(&mut child, Duration::from_secs(10))
        .with_context(|| format!("`{shown}` did not exit after its output closed"))?;
    Ok(Finished {
        code: if timed_out { None } else { status.code() },
        timed_out,
        output: String::from_utf8_lossy(&output).into_owned(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Cargo's progress chatter, which says nothing about a failure.
pub fn is_cargo_progress(line: &str) -> bool {
    const WORDS: [&str; 11] = [
        "Compiling ",
        "Checking ",
        "Documenting ",
        "Downloading ",
        "Downloaded ",
        "Updating ",
        "Locking ",
        "Adding ",
        "Fresh ",
        "Finished ",
        "Blocking ",
    ];
    let line = line.trim_start();
    WORDS.iter().any(|w| line.starts_with(w))
}

/// Like [`run_captured`] but fails with `advice` (what to do) unless the command succeeds.
pub fn run_checked(cmd: &mut Command, limit: Duration, advice: &str) -> Result<Finished> {
    let shown = describe(cmd);
    let finished = run_captured(cmd, limit)?;
    if finished.timed_out {
        bail!(
            "`{shown}` did not finish within {} s and was killed; {advice}\n--- last output ---\n{}",
            limit.as_secs(),
            finished.tail(20)
        );
    }
    if !finished.success() {
        bail!(
            "`{shown}` failed ({}); {advice}\n--- last output ---\n{}",
            exit_text(finished.code),
            finished.tail(20)
        );
    }
    Ok(finished)
}

/// Waits for `child` for at most `limit`, killing it if it is still there.
pub fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// "exit status 3" / "killed by a signal".
pub fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    }
}

/// The command line as a user would type it (for messages).
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}
