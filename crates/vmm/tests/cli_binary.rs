//! The `vpsci` binary's behaviour on bad command lines: exit status 2 and
//! exactly one `vpsci: ...` line on stderr, before anything else happens.

use std::process::Command;

fn vpsci(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_command_lines_exit_2_with_one_stderr_line() {
    let cases: &[&[&str]] = &[
        &[],
        &["run"],
        &["frobnicate"],
        &["run", "--image", "g.bin", "--cpus", "0"],
        &["run", "--image", "g.bin", "--cpus", "100000"],
        &["run", "--image", "g.bin", "--memory", "12Q"],
        &["run", "--image", "g.bin", "--memory", "1M"],
        &["run", "--image", "g.bin", "--psci-version", "0.1"],
        &["run", "--image", "g.bin", "--conduit", "svc"],
        &["run", "--image", "g.bin", "--on-reset", "panic"],
        &["run", "--image", "g.bin", "--timeout", "0"],
        &["run", "--image", "g.bin", "--disk", "d.img,writeback"],
        &["run", "--image", "g.bin", "--disk", ",readonly"],
        &[
            "run", "--image", "g.bin", "--disk", "d.img", "--disk", "d.img",
        ],
        &["run", "--kernel", "a", "--image", "b"],
    ];
    for args in cases {
        let (code, stdout, stderr) = vpsci(args);
        assert_eq!(code, Some(2), "{args:?}: stderr {stderr:?}");
        assert!(stdout.is_empty(), "{args:?}: stdout {stdout:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: stderr {stderr:?}");
        assert!(stderr.starts_with("vpsci: "), "{args:?}: stderr {stderr:?}");
    }
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    let (code, stdout, _) = vpsci(&["run", "--help"]);
    assert_eq!(code, Some(0));
    for flag in [
        "--image",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--psci-version",
        "--conduit",
        "--events",
        "--on-reset",
        "--timeout",
        "--in-kernel-psci",
        "--disk",
        "FILE[,readonly]",
        "--kernel",
    ] {
        assert!(stdout.contains(flag), "help lacks {flag}");
    }
}
