//! Disk images for the nested tests that give a guest a virtio disk: sparse
//! raw images made on the host side, and what a guest left in one.

use std::os::unix::fs::FileExt;
use std::path::Path;

use vpsci::devices::virtio_blk::DiskSpec;
use vpsci::vm::DeviceOptions;

use super::linux::INIT_PREAMBLE;

/// A sparse raw image of `size` bytes starting with `head`.
pub fn sparse_image(path: &Path, size: u64, head: &[u8]) {
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.set_len(size).unwrap_or_else(|e| panic!("{e}"));
    file.write_all_at(head, 0).unwrap_or_else(|e| panic!("{e}"));
}

/// `len` bytes of the image at sector `sector` (512-byte sectors).
pub fn sector_bytes(path: &Path, sector: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, sector * 512)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    buf
}

/// Loads the virtio disk drivers (the initramfs holds them:
/// [`super::linux::virtio_modules`]) and prints `GUEST modules loaded`.
const LOAD_DISK_DRIVERS: &str =
    "insmod /virtio_mmio.ko && insmod /virtio_blk.ko && echo GUEST modules loaded\n";

/// A guest `/init` ([`INIT_PREAMBLE`]) that loads the virtio disk drivers,
/// then runs `script`.
pub fn disk_init(script: &str) -> String {
    format!("{INIT_PREAMBLE}{LOAD_DISK_DRIVERS}{script}")
}

/// Devices with one writable virtio disk backed by `image`.
pub fn one_disk(image: &Path) -> DeviceOptions {
    DeviceOptions {
        console_input: None,
        disks: vec![DiskSpec {
            path: image.to_path_buf(),
            readonly: false,
        }],
    }
}

/// Copies an image to `to` with its modification time, as
/// `cp --preserve=timestamps` does (what docs/snapshot.md tells an operator
/// who keeps a copy of a disk with a snapshot).
pub fn copy_keeping_time(from: &Path, to: &Path) {
    let modified = std::fs::metadata(from)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
    std::fs::File::options()
        .write(true)
        .open(to)
        .and_then(|f| f.set_modified(modified))
        .unwrap_or_else(|e| panic!("{}: {e}", to.display()));
}
