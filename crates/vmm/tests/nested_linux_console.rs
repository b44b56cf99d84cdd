//! `vpsci run`'s console is interactive (nested harness): a real Linux
//! guest's shell on the PL011 reads what is typed on vpsci's standard input
//! (receive FIFO and its interrupt) and its answers come back on standard
//! output; `--kernel` names the image.
//!
//! Needs the harness's arm64 Linux `Image` (see `nested_linux.rs`):
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_NESTED_FILES=/path/Image cargo test -p vpsci
//! --target aarch64-unknown-linux-musl --test nested_linux_console -- --ignored --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nested_common::linux::{initramfs, linux_image};

const INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo GUEST shell ready
exec /bin/sh
";

/// Everything vpsci printed so far, growing as chunks arrive.
struct Output {
    rx: mpsc::Receiver<Vec<u8>>,
    text: String,
}

impl Output {
    /// Waits until the output contains `needle` (after byte `from`); returns
    /// where it ends. Panics with the output so far after `limit`.
    fn wait_for(&mut self, needle: &str, from: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.text.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!("no {needle:?} within {limit:?}; output:\n{}", self.text),
            }
        }
    }
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE (an arm64 Linux Image, copied in with VPSCI_NESTED_FILES)"]
fn commands_typed_on_stdin_reach_the_guest_shell_and_its_answers_come_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs(INIT, &[])).unwrap_or_else(|e| panic!("{e}"));
    let kernel = linux_image();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cpus", "2", "--memory", "512M", "--timeout", "300"])
        .args(["--cmdline", "console=ttyAMA0 panic=-1 quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
    let mut stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Output {
        rx,
        text: String::new(),
    };
    let limit = Duration::from_secs(240);
    let mut at = out.wait_for("GUEST shell ready", 0, limit);
    // Typed like a person at a prompt: one line at a time, each answer awaited.
    for (command, answer) in [
        ("echo answer-$((6*7))\n", "answer-42"),
        ("echo cpus=$(grep -c ^processor /proc/cpuinfo)\n", "cpus=2"),
        ("cat /sys/class/rtc/rtc0/name\n", "rtc-pl031"),
    ] {
        stdin
            .write_all(command.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        stdin.flush().unwrap_or_else(|e| panic!("{e}"));
        // The echo of the typed line first, then the shell's answer after it.
        at = out.wait_for(command.trim_end(), at, limit);
        at = out.wait_for(answer, at, limit);
        println!(
            "typed {:?}, the guest answered {answer:?}",
            command.trim_end()
        );
    }
    stdin
        .write_all(b"poweroff -f\n")
        .unwrap_or_else(|e| panic!("{e}"));
    drop(stdin);
    let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(0), "vpsci: {err}");
    assert!(err.contains("VM powered off"), "{err}");
}
