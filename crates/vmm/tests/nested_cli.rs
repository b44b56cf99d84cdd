//! The `vpsci` binary end to end on real arm64 KVM (nested harness): the
//! command line, the UART on stdout, the final message and exit status, and
//! the event log.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::process::{Command, Output};

use nested_common::*;
use vpsci_firmware::Conduit;

fn vpsci(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("cannot run vpsci: {e}"),
    }
}

fn image(program: &Asm) -> tempfile::NamedTempFile {
    let file = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = std::fs::write(file.path(), program.bytes()) {
        panic!("{e}");
    }
    file
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_boots_a_raw_image_prints_the_uart_and_exits_0_on_system_off() {
    let mut a = Asm::new(ENTRY, Conduit::Smc);
    a.print("hello\n").smccc(SYSTEM_OFF, [0; 3]).spin();
    let img = image(&a);
    let events = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    let path = img.path().to_string_lossy().into_owned();
    let ev = events.path().to_string_lossy().into_owned();
    let out = vpsci(&[
        "run",
        "--image",
        &path,
        "--cpus",
        "2",
        "--conduit",
        "smc",
        "--psci-version",
        "1.1",
        "--events",
        &ev,
        "--timeout",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("vCPU 0 called SYSTEM_OFF"), "{stderr}");
    let log = std::fs::read_to_string(events.path()).unwrap_or_default();
    assert!(log.contains("\"SYSTEM_OFF\""), "{log}");
    assert!(log.contains("system_event"), "{log}");
}

#[test]
fn run_exits_3_and_names_the_reset_with_on_reset_exit() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(SYSTEM_RESET2, [0x8000_0002, 0xABCD, 0]).spin();
    let img = image(&a);
    let path = img.path().to_string_lossy().into_owned();
    let out = vpsci(&[
        "run",
        "--image",
        &path,
        "--on-reset",
        "exit",
        "--timeout",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("SYSTEM_RESET2 (vendor type 0x80000002, cookie 0xabcd)"),
        "{stderr}"
    );
}

#[test]
fn run_times_out_with_status_1() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.spin();
    let img = image(&a);
    let path = img.path().to_string_lossy().into_owned();
    let out = vpsci(&["run", "--image", &path, "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("timeout after"), "{stderr}");
}

#[test]
fn a_missing_image_is_a_one_line_error() {
    let out = vpsci(&["run", "--image", "/nonexistent/image"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("vpsci: "), "{stderr}");
    assert!(stderr.contains("/nonexistent/image"), "{stderr}");
}

#[test]
fn in_kernel_psci_says_what_is_lost_and_still_powers_off() {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let img = image(&a);
    let path = img.path().to_string_lossy().into_owned();
    let out = vpsci(&[
        "run",
        "--image",
        &path,
        "--in-kernel-psci",
        "--timeout",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("lost:"), "{stderr}");
    assert!(stderr.contains("KVM's PSCI"), "{stderr}");
}

#[test]
fn no_dev_kvm_is_a_one_line_error() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpsci"));
    cmd.args(["run", "--image", "/dev/null"]);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls: a private mount namespace with
    // an empty tmpfs over /dev, so /dev/kvm is gone for vpsci alone.
    unsafe {
        cmd.pre_exec(|| {
            let none = c"none".as_ptr();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    none,
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    none,
                    c"/dev".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}
