//! A Linux guest with a virtio disk migrates between two vpsci processes (nested
//! harness) while it reads its disk: the host writes two known patterns into a
//! sparse image before boot; in a loop the guest drops its page cache, reads one
//! pattern into it through virtio-blk and prints the CRC-32 of it read again from
//! the page cache, with a counter, so the device keeps writing guest RAM (data
//! buffers, used ring: writes KVM's dirty log does not see) during pre-copy. After `vpsci ctl migrate` over a Unix socket every sum the
//! destination's console shows is the host's, and the counter carries on from the
//! source's. The host then flags a sector of the image; the guest, reading the disk
//! on the destination, sees the flag, writes and flushes a marker block, and
//! `vpsci ctl poweroff` ends it with status 0; the host finds the marker in the image.
//!
//! Needs the harness's `Image` and virtio modules, like `nested_linux_disk`:
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_LINUX_MODULES=/path/modules
//! VPSCI_NESTED_FILES=/path/Image:/path/modules/virtio_mmio.ko:/path/modules/virtio_blk.ko
//! cargo test -p vpsci --target aarch64-unknown-linux-musl --test
//! nested_linux_disk_migration -- --include-ignored --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;
mod process_common;

use std::os::unix::fs::FileExt;

use nested_common::disk::{disk_init, sector_bytes, sparse_image};
use nested_common::linux::{initramfs, linux_image, virtio_modules};
use process_common::*;

const MIB: u64 = 1 << 20;
/// Where the two patterns lie (1 and 2 MiB in) and how long each is: what the
/// guest's `dd` reads (64 KiB blocks, skip 16 or 32, count 16). Sum `N` is of
/// pattern `N % 2`: a page the device filled that reached the destination stale
/// would most likely hold the other pattern (freed page cache is reused).
const PATTERN_AT: [u64; 2] = [MIB, 2 * MIB];
const PATTERN_LEN: usize = 1 << 20;
/// The sector the host flags after the migration, and the one the guest then writes.
const FLAG_SECTOR: u64 = 16384;
const FLAG: &[u8] = b"write-the-marker";
const MARKER_SECTOR: u64 = 16385;
const MARKER: &[u8] = b"marker-written-on-the-destination";

/// The guest once its virtio drivers are loaded, in a loop: drop the page cache,
/// read pattern `i % 2` from the disk into it (the device writes those pages; no
/// vCPU does), wait a moment, then print the CRC-32 of the pattern read again from
/// the page cache with the counter `i`. A page the device filled that reached the
/// destination stale gives a wrong sum there. Once the flag sector says so, write
/// and flush the marker and idle.
const SCRIPT: &str = "i=0
while true; do
  i=$((i+1))
  at=$((16 + 16 * (i % 2)))
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/dev/null bs=64k skip=$at count=16 2>/dev/null
  sleep 0.3
  echo \"sum $i $(dd if=/dev/vda bs=64k skip=$at count=16 2>/dev/null | crc32)\"
  flag=$(dd if=/dev/vda bs=512 skip=16384 count=1 2>/dev/null | tr -d '\\000' | head -c 16)
  if [ \"$flag\" = write-the-marker ]; then
    if echo -n marker-written-on-the-destination | dd of=/dev/vda bs=512 seek=16385 conv=sync,fsync 2>/dev/null; then
      echo \"marker written after sum $i\"
    fi
    break
  fi
done
while true; do sleep 1; done
";

/// A deterministic pattern from `seed` (xorshift64).
fn pattern(seed: u64) -> Vec<u8> {
    let mut x: u64 = seed;
    (0..PATTERN_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Every whole `sum N CRC` line of a console, in order (a last line without its
/// newline may still be being written: it is left out).
fn sums(console: &str) -> Vec<(u64, String)> {
    let whole = console.rfind('\n').map_or("", |end| &console[..end]);
    whole
        .lines()
        .filter_map(|l| {
            let rest = l.trim_end_matches('\r').strip_prefix("sum ")?;
            let (n, sum) = rest.split_once(' ')?;
            Some((n.parse().ok()?, sum.trim().to_owned()))
        })
        .collect()
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE and VPSCI_LINUX_MODULES (copied in with VPSCI_NESTED_FILES)"]
fn a_linux_guest_reading_its_disk_migrates_and_every_sum_after_the_move_is_right() {
    let bench = Bench::new();
    let disk = bench.path("a.img");
    sparse_image(&disk, 32 * MIB, b"");
    let patterns = [
        pattern(0x9e37_79b9_7f4a_7c15),
        pattern(0x2545_f491_4f6c_dd1d),
    ];
    let image = std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    for (bytes, at) in patterns.iter().zip(PATTERN_AT) {
        image
            .write_all_at(bytes, at)
            .unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    }
    drop(image);
    let expected = patterns
        .each_ref()
        .map(|p| format!("{:08x}", crc32fast::hash(p)));
    assert_ne!(expected[0], expected[1]);
    let kernel = linux_image().to_string_lossy().into_owned();
    let initrd = bench.file(
        "initrd.cpio",
        &initramfs(&disk_init(SCRIPT), &virtio_modules()),
    );
    let disk_arg = disk.to_string_lossy().into_owned();
    let source = bench.source(
        &kernel,
        2,
        &[
            "--initrd",
            &initrd,
            "--memory",
            "128M",
            // init_on_alloc=0: a kernel that zeroes each page it allocates (Debian's
            // default) writes every page-cache page from a vCPU just before the
            // device fills it, so KVM's own log would hide a missing device log.
            "--cmdline",
            "console=ttyAMA0 panic=-1 quiet init_on_alloc=0",
            "--disk",
            &disk_arg,
        ],
        &[],
    );
    source.until_console("the guest prints 3 sums", |c| sums(c).len() >= 3);
    // Before any migration the guest reads what the host wrote.
    for (n, sum) in sums(&read(&source.console)) {
        assert_eq!(sum, expected[(n % 2) as usize], "sum {n} on the source");
    }
    let endpoint = "unix:/tmp/vpsci-migrate-linux-disk.sock";
    let dest = bench.destination("dest", endpoint, &[], &[]);
    let before = sums(&read(&source.console)).last().map_or(0, |(n, _)| *n);
    // At most six dirty rounds: a guest re-reading its disk can dirty about as
    // fast as a debug build sends in the nested machine, and 30 rounds would then
    // take most of a minute; the paused round ends it as `--max-rounds` does.
    let done = migrated(&migrate(&source.socket, endpoint, &["--max-rounds", "6"]));
    print_migration("Linux with a disk", &done);
    for r in &done.rounds {
        println!(
            "  round {}: {} pages sent, {} dirty, {} written by the device, {:.0} ms",
            r.round, r.pages_sent, r.dirty_pages, r.device_pages, r.ms
        );
    }
    // The pages the device filled were logged and merged into the rounds (KVM's
    // log never sees them; without them the destination got stale used-ring
    // entries: "virtio_blk virtio0: req.0:id 33 is not a head!").
    let device_pages: u64 = done.rounds.iter().map(|r| r.device_pages).sum();
    assert!(
        device_pages > 0,
        "the guest read its disk during the migration, yet no round counted a page the device wrote: {:?}",
        done.rounds
    );
    let src = source.wait();
    assert_eq!(src.status, Some(0), "{}", src.stderr);
    let last = sums(&src.console).last().map_or(0, |(n, _)| *n);
    // The guest read its disk while pre-copy ran: the device wrote guest RAM then.
    assert!(
        last > before,
        "no sum printed during the migration (sum {before} before, {last} at the end)"
    );
    let dest = dest.serving();
    dest.until_console("the guest prints 3 sums on the destination", |c| {
        sums(c).len() >= 3
    });
    // The host flags the image (shared storage: the destination has it open).
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .and_then(|f| f.write_all_at(FLAG, FLAG_SECTOR * 512))
        .unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    dest.until_console("the guest writes its marker on the destination", |c| {
        c.contains("marker written after sum")
    });
    let after = sums(&read(&dest.console));
    println!(
        "source: {last} sums; destination: sums {}..={}, {expected:?} in turn",
        after[0].0,
        after[after.len() - 1].0
    );
    counter_goes_on(last, &after.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    for (n, sum) in &after {
        assert_eq!(
            sum,
            &expected[(n % 2) as usize],
            "sum {n} on the destination: the guest read stale or wrong data"
        );
    }
    dest.power_off();
    let marker = sector_bytes(&disk, MARKER_SECTOR, 512);
    assert_eq!(
        &marker[..MARKER.len()],
        MARKER,
        "the marker is not in the image"
    );
    assert!(marker[MARKER.len()..].iter().all(|&b| b == 0));
    for (bytes, at) in patterns.iter().zip(PATTERN_AT) {
        assert_eq!(
            &sector_bytes(&disk, at / 512, PATTERN_LEN),
            bytes,
            "a pattern changed"
        );
    }
}
