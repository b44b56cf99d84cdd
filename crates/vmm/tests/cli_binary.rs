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
        &["run", "--image", "g.bin", "--on-hibernate", "ignore"],
        &["run", "--image", "g.bin", "--on-hibernate", ""],
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

#[test]
fn a_disk_given_twice_by_other_names_exits_2_and_the_image_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, b"the image's own bytes").unwrap();
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&disk, &hard).unwrap();
    let path = disk.to_string_lossy().into_owned();
    let readonly = format!("{path},readonly");
    let via_link = link.to_string_lossy().into_owned();
    let via_dots = format!("{}/./d.img", dir.path().display());
    let via_hard = hard.to_string_lossy().into_owned();
    for second in [&readonly, &via_link, &via_dots, &via_hard] {
        let (code, stdout, stderr) =
            vpsci(&["run", "--image", "g.bin", "--disk", &path, "--disk", second]);
        assert_eq!(code, Some(2), "{second}: stderr {stderr:?}");
        assert!(stdout.is_empty(), "{second}: stdout {stdout:?}");
        assert_eq!(stderr.lines().count(), 1, "{second}: stderr {stderr:?}");
        assert!(
            stderr.starts_with("vpsci: --disk: ") && stderr.contains("given twice"),
            "{second}: stderr {stderr:?}"
        );
    }
    assert_eq!(std::fs::read(&disk).unwrap(), b"the image's own bytes");
}
