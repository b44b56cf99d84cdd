//! virtio block devices with a real Linux guest on vpsci (nested harness):
//! `vpsci run --disk a.img --disk b.img,readonly`; the guest loads the
//! kernel package's `virtio_mmio` and `virtio_blk` modules, finds both disks
//! with their sizes, reads what the host wrote, writes and flushes a sector
//! that is in the image file when vpsci has exited, and cannot write the
//! read-only disk. Bad `--disk` input fails with one line, the documented
//! exit status and the image untouched.
//!
//! The Linux test needs the harness's `Image` and modules:
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_LINUX_MODULES=/path/modules
//! VPSCI_NESTED_FILES=/path/Image:/path/modules/virtio_mmio.ko:/path/modules/virtio_blk.ko
//! cargo test -p vpsci --target aarch64-unknown-linux-musl --test nested_linux_disk --
//! --include-ignored --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nested_common::disk::{disk_init, sparse_image as image};
use nested_common::linux::{initramfs, linux_image};
use nested_common::*;
use vpsci_firmware::Conduit;

const MIB: u64 = 1 << 20;
const HOST_MARKER: &[u8] = b"written-by-the-host";
const GUEST_MARKER: &[u8] = b"written-by-the-guest";
const GUEST_SECTOR: u64 = 100;

/// Run by `/init` once the virtio drivers are loaded.
const SCRIPT: &str =
    "echo \"GUEST vda sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)\"
echo \"GUEST vdb sectors=$(cat /sys/block/vdb/size) ro=$(cat /sys/block/vdb/ro)\"
echo \"GUEST vda starts with: $(dd if=/dev/vda bs=19 count=1 2>/dev/null)\"
if echo -n written-by-the-guest | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null; then
  echo GUEST wrote vda
fi
if echo -n x | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null; then
  echo GUEST vdb write accepted
else
  echo GUEST vdb write refused
fi
poweroff -f
";

fn vpsci(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn module(name: &str) -> Vec<u8> {
    let dir = std::env::var_os("VPSCI_LINUX_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("set VPSCI_LINUX_MODULES to the kernel's module directory"));
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE and VPSCI_LINUX_MODULES (copied in with VPSCI_NESTED_FILES)"]
fn linux_reads_and_flushes_a_virtio_disk_and_cannot_write_a_readonly_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("a.img");
    let readonly = dir.path().join("b.img");
    image(&disk, 64 * MIB, HOST_MARKER);
    image(&readonly, 8 * MIB, b"");
    let initrd = dir.path().join("initrd.cpio");
    let files = vec![
        (
            "virtio_mmio.ko".to_owned(),
            0o100644,
            module("virtio_mmio.ko"),
        ),
        (
            "virtio_blk.ko".to_owned(),
            0o100644,
            module("virtio_blk.ko"),
        ),
    ];
    std::fs::write(&initrd, initramfs(&disk_init(SCRIPT), &files))
        .unwrap_or_else(|e| panic!("{e}"));
    let kernel = linux_image();
    let disk_arg = disk.to_string_lossy().into_owned();
    let ro_arg = format!("{},readonly", readonly.display());
    let out = vpsci(&[
        "run",
        "--kernel",
        &kernel.to_string_lossy(),
        "--initrd",
        &initrd.to_string_lossy(),
        "--cpus",
        "2",
        "--memory",
        "512M",
        "--timeout",
        "300",
        "--cmdline",
        "console=ttyAMA0 panic=-1 quiet",
        "--disk",
        &disk_arg,
        "--disk",
        &ro_arg,
    ]);
    let console = text(&out.stdout);
    for line in console
        .lines()
        .filter(|l| l.contains("GUEST") || l.contains("virtio"))
    {
        println!("{line}");
    }
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        console.contains("GUEST modules loaded"),
        "modules did not load"
    );
    assert!(console.contains("GUEST vda sectors=131072 ro=0"), "vda");
    assert!(console.contains("GUEST vdb sectors=16384 ro=1"), "vdb");
    assert!(
        console.contains("GUEST vda starts with: written-by-the-host"),
        "the guest did not read the host's data"
    );
    assert!(
        console.contains("GUEST wrote vda"),
        "the guest's write failed"
    );
    assert!(
        console.contains("GUEST vdb write refused"),
        "read-only disk written"
    );
    let on_disk = std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}"));
    let at = (GUEST_SECTOR * 512) as usize;
    assert_eq!(
        &on_disk[at..at + GUEST_MARKER.len()],
        GUEST_MARKER,
        "not on disk after exit"
    );
    assert!(on_disk[at + GUEST_MARKER.len()..at + 512]
        .iter()
        .all(|&b| b == 0));
    let ro = std::fs::read(&readonly).unwrap_or_else(|e| panic!("{e}"));
    assert!(ro.iter().all(|&b| b == 0), "the read-only image changed");
}

/// A guest that powers off at once (the bad-input cases never boot it).
fn raw_guest(dir: &Path) -> String {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.smccc(SYSTEM_OFF, [0; 3]).spin();
    let path = dir.join("guest.bin");
    std::fs::write(&path, a.bytes()).unwrap_or_else(|e| panic!("{e}"));
    path.to_string_lossy().into_owned()
}

#[test]
fn a_missing_disk_fails_with_one_line_and_status_1() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let guest = raw_guest(dir.path());
    let missing = dir.path().join("missing.img");
    let out = vpsci(&[
        "run",
        "--image",
        &guest,
        "--disk",
        &missing.to_string_lossy(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot open disk") && err.contains("missing.img"),
        "{err}"
    );
    assert!(!missing.exists(), "vpsci created the missing disk");
}

#[test]
fn an_unreadable_disk_fails_with_status_1_and_stays_unchanged() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let guest = raw_guest(dir.path());
    // A directory can be opened but is no disk image.
    let out = vpsci(&[
        "run",
        "--image",
        &guest,
        "--disk",
        &dir.path().to_string_lossy(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open disk"), "{err}");
    // The first disk opens, the second does not: the first is not written.
    let good = dir.path().join("good.img");
    image(&good, MIB, HOST_MARKER);
    let before = std::fs::read(&good).unwrap_or_else(|e| panic!("{e}"));
    let out = vpsci(&[
        "run",
        "--image",
        &guest,
        "--disk",
        &good.to_string_lossy(),
        "--disk",
        &dir.path().join("absent.img").to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(&good).unwrap_or_else(|e| panic!("{e}")),
        before
    );
}

#[test]
fn a_disk_given_twice_or_an_unknown_option_is_a_command_line_error_with_status_2() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let guest = raw_guest(dir.path());
    let disk = dir.path().join("d.img");
    image(&disk, MIB, HOST_MARKER);
    let before = std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}"));
    let path = disk.to_string_lossy().into_owned();
    let unknown = format!("{path},writeback");
    for args in [
        ["--disk", path.as_str(), "--disk", path.as_str()].as_slice(),
        ["--disk", unknown.as_str()].as_slice(),
    ] {
        let mut full = vec!["run", "--image", guest.as_str()];
        full.extend_from_slice(args);
        let out = vpsci(&full);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--disk"), "{err}");
    }
    assert_eq!(
        std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}")),
        before
    );
}

/// Runs vpsci as root but without the capabilities that let root read and
/// write files regardless of their mode (dropped from the bounding set in
/// the child, so the exec'd vpsci never has them), as an operator's
/// unprivileged vpsci would meet a disk it may not open.
fn vpsci_without_file_override(args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpsci"));
    cmd.args(args);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (geteuid, prctl).
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() != 0 {
                return Ok(());
            }
            // CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2).
            for cap in [1, 2] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"))
}

#[test]
fn a_disk_without_permission_to_open_it_fails_with_status_1_and_is_not_written() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let guest = raw_guest(dir.path());
    // Mode 000: neither readable nor writable. Mode 444 without `,readonly`:
    // vpsci must not fall back to a read-only device the guest did not ask
    // for, nor write it.
    for mode in [0o000, 0o444] {
        let disk = dir.path().join(format!("mode{mode:o}.img"));
        image(&disk, MIB, HOST_MARKER);
        let before = std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = vpsci_without_file_override(&[
            "run",
            "--image",
            &guest,
            "--disk",
            &disk.to_string_lossy(),
            "--timeout",
            "30",
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "mode {mode:o}: {err}");
        assert_eq!(err.lines().count(), 1, "mode {mode:o}: {err}");
        assert!(
            err.starts_with("vpsci: ") && err.contains("cannot open disk"),
            "mode {mode:o}: {err}"
        );
        assert!(err.contains(&*disk.to_string_lossy()), "{err}");
        assert!(
            err.contains("Permission denied"),
            "mode {mode:o}: not a permission error: {err}"
        );
        assert!(text(&out.stdout).is_empty(), "the guest ran: {out:?}");
        assert_eq!(
            std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}")),
            before,
            "mode {mode:o}: image changed"
        );
    }
    // The same mode-444 image given `,readonly` is usable: the refusal above
    // was about permission, not the image.
    let disk = dir.path().join("mode444.img");
    let arg = format!("{},readonly", disk.to_string_lossy());
    let out =
        vpsci_without_file_override(&["run", "--image", &guest, "--disk", &arg, "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
