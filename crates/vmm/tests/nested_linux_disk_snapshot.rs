//! A Linux guest with a virtio disk survives a whole-VM snapshot (nested
//! harness): `vpsci run --disk a.img --snapshot-on-console MARKER` stops the
//! VM after the guest wrote and flushed a block and printed the marker, the
//! guest then waiting for a line on its console that only the restored
//! process is given. A restore onto an image changed since the snapshot is
//! refused with one line, the guest never running; `vpsci restore DIR` onto
//! the unchanged image resumes it: with its page cache dropped, the guest
//! reads back from the disk what it wrote before the snapshot, writes and
//! flushes more through the same virtqueue, and powers off. The host then
//! finds both writes in the image, and only the first one after the source
//! process stopped.
//!
//! The second test follows the procedure docs/snapshot.md gives an operator
//! whose VM carries on after a snapshot: `vpsci ctl pause`, `snapshot`, a
//! copy of the image keeping its time, `resume`; the guest then writes more
//! and powers off. A restore onto the image the guest went on writing is
//! refused; with the copy put back it succeeds, and the restored guest finds
//! the disk as it was at the snapshot.
//!
//! Needs the harness's `Image` and virtio modules, like `nested_linux_disk`:
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_LINUX_MODULES=/path/modules
//! VPSCI_NESTED_FILES=/path/Image:/path/modules/virtio_mmio.ko:/path/modules/virtio_blk.ko
//! cargo test -p vpsci --target aarch64-unknown-linux-musl --test nested_linux_disk_snapshot --
//! --include-ignored --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nested_common::disk::{copy_keeping_time, disk_init, sector_bytes, sparse_image};
use nested_common::linux::{initramfs, linux_image, virtio_modules};

const MIB: u64 = 1 << 20;
const BEFORE: &[u8] = b"written-before-the-snapshot";
const AFTER: &[u8] = b"written-after-the-restore";
const BEFORE_SECTOR: u64 = 10;
const AFTER_SECTOR: u64 = 20;
const MARKER: &str = "GUEST-SNAPSHOT-NOW";

/// The guest, once its virtio drivers are loaded: write and flush a block,
/// print the marker, wait for a console line (the source process has no
/// input, so it is stopped in that wait), then check the disk with the page
/// cache dropped, write more and power off.
const SCRIPT: &str = "if echo -n written-before-the-snapshot | dd of=/dev/vda bs=512 seek=10 conv=sync,fsync 2>/dev/null; then
  echo GUEST wrote before
fi
sync
echo GUEST-SNAPSHOT-NOW
read line
echo \"GUEST resumed with: $line\"
echo 3 > /proc/sys/vm/drop_caches
echo \"GUEST read back: $(dd if=/dev/vda bs=512 skip=10 count=1 2>/dev/null | head -c 27)\"
if echo -n written-after-the-restore | dd of=/dev/vda bs=512 seek=20 conv=sync,fsync 2>/dev/null; then
  echo GUEST wrote after
fi
poweroff -f
";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `vpsci args`, with `input` on its standard input (then closed).
fn vpsci(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
    stdin.write_all(input).unwrap_or_else(|e| panic!("{e}"));
    drop(stdin);
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("vpsci: {e}"))
}

fn guest_lines(console: &str) -> impl Iterator<Item = &str> {
    console.lines().filter(|l| l.contains("GUEST"))
}

/// Sets the image's modification time (keeping its bytes).
fn set_modified(path: &Path, at: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(at))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE and VPSCI_LINUX_MODULES (copied in with VPSCI_NESTED_FILES)"]
fn linux_reads_back_after_a_restore_what_it_wrote_before_the_snapshot_and_writes_on() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("a.img");
    sparse_image(&disk, 32 * MIB, b"");
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs(&disk_init(SCRIPT), &virtio_modules()))
        .unwrap_or_else(|e| panic!("{e}"));
    let snap = dir.path().join("snap");
    let (kernel, initrd_arg, disk_arg, snap_arg) = (
        linux_image().to_string_lossy().into_owned(),
        initrd.to_string_lossy().into_owned(),
        disk.to_string_lossy().into_owned(),
        snap.to_string_lossy().into_owned(),
    );

    let started = Instant::now();
    let source = vpsci(
        &[
            "run",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd_arg,
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--timeout",
            "300",
            "--cmdline",
            "console=ttyAMA0 panic=-1 quiet",
            "--disk",
            &disk_arg,
            "--snapshot-on-console",
            MARKER,
            "--snapshot-dir",
            &snap_arg,
        ],
        b"",
    );
    let console = text(&source.stdout);
    guest_lines(&console).for_each(|l| println!("source: {l}"));
    println!(
        "source: {} ({:.1} s)",
        text(&source.stderr).trim_end(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(source.status.code(), Some(0), "{}", text(&source.stderr));
    assert!(text(&source.stderr).contains("snapshot written to"));
    assert!(
        console.contains("GUEST wrote before"),
        "the first write failed"
    );
    assert!(
        !console.contains("GUEST resumed"),
        "the source guest went on"
    );
    assert_eq!(
        sector_bytes(&disk, BEFORE_SECTOR, BEFORE.len()),
        BEFORE,
        "the guest's flushed write is not in the image when the source stopped"
    );
    assert!(
        sector_bytes(&disk, AFTER_SECTOR, 512)
            .iter()
            .all(|&b| b == 0),
        "the second write happened before the snapshot"
    );

    // An image changed after the snapshot (here only its time: the bytes
    // are kept) is refused before the guest runs, and is left as it was.
    let saved_time = std::fs::metadata(&disk)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{e}"));
    let later = saved_time + Duration::from_secs(3600);
    set_modified(&disk, later);
    let image_before = std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}"));
    let refused = vpsci(&["restore", &snap_arg, "--timeout", "300"], b"go\n");
    let err = text(&refused.stderr);
    println!("changed image: {}", err.trim_end());
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("virtio disk 0") && err.contains("changed after the snapshot"),
        "{err}"
    );
    assert!(refused.stdout.is_empty(), "the guest ran: {refused:?}");
    assert_eq!(
        std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}")),
        image_before
    );
    assert_eq!(
        std::fs::metadata(&disk)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("{e}")),
        later
    );
    set_modified(&disk, saved_time);

    let started = Instant::now();
    let restored = vpsci(&["restore", &snap_arg, "--timeout", "300"], b"go\n");
    let console = text(&restored.stdout);
    guest_lines(&console).for_each(|l| println!("restored: {l}"));
    println!(
        "restored: {} ({:.1} s)",
        text(&restored.stderr).trim_end(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{}",
        text(&restored.stderr)
    );
    assert!(console.contains("GUEST resumed with: go"), "no resume");
    assert!(
        !console.contains("modules loaded"),
        "the restored guest booted again"
    );
    assert!(
        console.contains("GUEST read back: written-before-the-snapshot"),
        "the restored guest did not read its write back from the disk"
    );
    assert!(
        console.contains("GUEST wrote after"),
        "the second write failed"
    );
    assert_eq!(sector_bytes(&disk, BEFORE_SECTOR, BEFORE.len()), BEFORE);
    let after = sector_bytes(&disk, AFTER_SECTOR, 512);
    assert_eq!(&after[..AFTER.len()], AFTER, "the restored guest's write");
    assert!(after[AFTER.len()..].iter().all(|&b| b == 0));
}

/// The guest for the control API test: after the marker it waits for a
/// console line, then reports what sector 20 holds (read from the disk, its
/// page cache dropped), writes it and powers off.
const RUN_ON_SCRIPT: &str = "if echo -n written-before-the-snapshot | dd of=/dev/vda bs=512 seek=10 conv=sync,fsync 2>/dev/null; then
  echo GUEST wrote before
fi
echo GUEST-SNAPSHOT-NOW
read line
echo 3 > /proc/sys/vm/drop_caches
echo \"GUEST sector 20 holds: [$(dd if=/dev/vda bs=512 skip=20 count=1 2>/dev/null | tr -d '\\000' | head -c 25)]\"
if echo -n written-after-the-restore | dd of=/dev/vda bs=512 seek=20 conv=sync,fsync 2>/dev/null; then
  echo GUEST wrote after
fi
poweroff -f
";

/// Waits until the file (a process's redirected output) holds `needle`.
fn wait_for_output(path: &Path, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = std::fs::read(path).unwrap_or_default();
        if text(&now).contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {limit:?}; output:\n{}",
            text(&now)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE and VPSCI_LINUX_MODULES (copied in with VPSCI_NESTED_FILES)"]
fn a_snapshot_of_a_vm_that_runs_on_restores_only_onto_the_image_copied_while_it_was_paused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("a.img");
    sparse_image(&disk, 32 * MIB, b"");
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(
        &initrd,
        initramfs(&disk_init(RUN_ON_SCRIPT), &virtio_modules()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let snap = dir.path().join("snap");
    let copy = dir.path().join("a-at-the-snapshot.img");
    let socket = dir.path().join("api.sock");
    let console = dir.path().join("console.txt");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl".to_owned(), path(&socket)];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all.extend(["--timeout".to_owned(), "300".to_owned()]);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = vpsci(&all, b"");
        println!("ctl {args:?}: {}", text(&out.stdout).trim_end());
        assert_eq!(
            out.status.code(),
            Some(0),
            "ctl {args:?}: {}",
            text(&out.stderr)
        );
    };

    let mut source = Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .args([
            "run",
            "--kernel",
            &path(&linux_image()),
            "--initrd",
            &path(&initrd),
        ])
        .args(["--cpus", "2", "--memory", "128M", "--timeout", "300"])
        .args(["--cmdline", "console=ttyAMA0 panic=-1 quiet"])
        .args(["--disk", &path(&disk), "--api-socket", &path(&socket)])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&console).unwrap_or_else(|e| panic!("{e}")))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run vpsci: {e}"));
    wait_for_output(&console, MARKER, Duration::from_secs(240));
    ctl(&["pause"]);
    ctl(&["snapshot", &path(&snap)]);
    copy_keeping_time(&disk, &copy);
    ctl(&["resume"]);
    let mut stdin = source.stdin.take().unwrap_or_else(|| panic!("no stdin"));
    stdin.write_all(b"go\n").unwrap_or_else(|e| panic!("{e}"));
    drop(stdin);
    let ended = source
        .wait_with_output()
        .unwrap_or_else(|e| panic!("vpsci run: {e}"));
    let said = text(&std::fs::read(&console).unwrap_or_default());
    guest_lines(&said).for_each(|l| println!("source: {l}"));
    assert_eq!(ended.status.code(), Some(0), "{}", text(&ended.stderr));
    assert!(said.contains("GUEST sector 20 holds: []"), "{said}");
    assert!(said.contains("GUEST wrote after"), "{said}");
    assert_eq!(&sector_bytes(&disk, AFTER_SECTOR, AFTER.len()), AFTER);

    let refused = vpsci(&["restore", &path(&snap), "--timeout", "300"], b"go\n");
    let err = text(&refused.stderr);
    println!(
        "onto the image written after the snapshot: {}",
        err.trim_end()
    );
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("changed after the snapshot"), "{err}");
    assert!(refused.stdout.is_empty(), "the guest ran: {refused:?}");

    copy_keeping_time(&copy, &disk);
    let restored = vpsci(&["restore", &path(&snap), "--timeout", "300"], b"go\n");
    let said = text(&restored.stdout);
    guest_lines(&said).for_each(|l| println!("restored: {l}"));
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{}",
        text(&restored.stderr)
    );
    assert!(
        said.contains("GUEST sector 20 holds: []"),
        "the restored guest saw a disk that is not the snapshot's: {said}"
    );
    assert!(said.contains("GUEST wrote after"), "{said}");
    assert_eq!(sector_bytes(&disk, BEFORE_SECTOR, BEFORE.len()), BEFORE);
    assert_eq!(&sector_bytes(&disk, AFTER_SECTOR, AFTER.len()), AFTER);
}
