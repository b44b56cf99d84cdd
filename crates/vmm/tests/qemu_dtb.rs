//! Boots a real arm64 Linux kernel under QEMU's `virt` board (TCG) with our
//! device tree instead of QEMU's (`-dtb`). Below RAM our memory map is the
//! `virt` board's, so this checks the tree against a real kernel without KVM:
//! PSCI probing, SMP bring-up of every CPU through PSCI CPU_ON, the GICv3
//! redistributors, the timer, the PL011 console, and an initrd found through
//! `/chosen/linux,initrd-*` at the address our layout chose (QEMU's generic
//! loader puts the bytes there; QEMU itself is not told about an initrd).
//!
//! Needs `qemu-system-aarch64` and an uncompressed arm64 kernel `Image`
//! (e.g. Debian's `vmlinuz-*-cloud-arm64`) named by `VPSCI_TEST_KERNEL`;
//! ignored by default because those are not part of the repository (the
//! boot itself took 5.4 s here):
//! `VPSCI_TEST_KERNEL=/path/to/Image cargo test -p vpsci --test qemu_dtb -- --ignored`.
//! `cargo xtask test` runs it this way with the kernel it provisioned
//! (`target/nested/assets/Image`).

use std::process::Command;

use vpsci::fdt::{build, FdtConfig};
use vpsci::layout::GuestLayout;
use vpsci::loader::{load_image, ImageKind, InitrdRange};
use vpsci_firmware::{Conduit, Mpidr, PsciVersion};

#[test]
#[ignore = "needs qemu-system-aarch64 and an arm64 kernel in VPSCI_TEST_KERNEL"]
fn linux_boots_all_cpus_with_our_device_tree_under_qemu() {
    let kernel = std::env::var("VPSCI_TEST_KERNEL")
        .expect("set VPSCI_TEST_KERNEL to an arm64 Linux Image to run this test");
    let cpus = 4u32;
    let layout = GuestLayout::new(cpus, 256 << 20).unwrap();
    // Our loader must recognise the kernel too.
    let mem = layout.create_memory().unwrap();
    let image = load_image(&mem, &layout, kernel.as_ref()).unwrap();
    assert_eq!(image.kind, ImageKind::LinuxImage);

    let initrd = newc_archive("hello.txt", b"hello from the initrd\n");
    let initrd_range = InitrdRange {
        start: layout.initrd_addr(initrd.len() as u64).unwrap(),
        size: initrd.len() as u64,
    };
    let blob = build(&FdtConfig {
        layout,
        cpus: (0..cpus).map(Mpidr::from_index).collect(),
        // QEMU's own PSCI (1.1 under TCG) answers; the tree says 1.0-compatible.
        psci_version: PsciVersion::V1_0,
        conduit: Conduit::Hvc,
        cmdline: "console=ttyAMA0 panic=-1 rdinit=/hello.txt".to_owned(),
        initrd: Some(initrd_range),
        virtio_devices: 0,
        idle_states: Vec::new(),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dtb = dir.path().join("vpsci.dtb");
    std::fs::write(&dtb, blob).unwrap();
    let initrd_file = dir.path().join("initrd.cpio");
    std::fs::write(&initrd_file, &initrd).unwrap();
    let loader_arg = format!(
        "loader,file={},addr={:#x},force-raw=on",
        initrd_file.display(),
        initrd_range.start.0
    );

    let out = Command::new("timeout")
        .arg("300")
        .arg("qemu-system-aarch64")
        .args(["-machine", "virt,gic-version=3", "-cpu", "cortex-a57"])
        .args(["-smp", &cpus.to_string(), "-m", "256M"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-dtb")
        .arg(&dtb)
        .args(["-device", &loader_arg])
        .output()
        .expect("qemu-system-aarch64 (and timeout) must be installed");
    let log = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "psci: probing for conduit method from DT.",
        "smp: Brought up 1 node, 4 CPUs",
        "GICv3: CPU3: found redistributor 3 region 0:0x0000000008100000",
        "arch_timer: cp15 timer(s) running",
        "ttyAMA0 at MMIO 0x9000000",
        "Kernel command line: console=ttyAMA0 panic=-1 rdinit=/hello.txt",
        "Trying to unpack rootfs image as initramfs...",
        // The file from our initrd exists (ENOEXEC, not ENOENT): the kernel
        // found and unpacked the archive where /chosen said it was.
        "Failed to execute /hello.txt (error -8)",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    assert!(!log.contains("Initramfs unpacking failed"), "{log}");
}

/// A `newc` cpio archive holding one regular file.
fn newc_archive(name: &str, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(format!("{:08x}{:08x}", name.len() + 1, 0).as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, 0o100755, name, data);
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    out
}
