//! A real Linux guest on vpsci, on real arm64 KVM (nested harness): the
//! kernel finds PSCI 1.3 in the device tree, brings up every CPU with
//! CPU_ON, takes one offline (CPU_OFF, AFFINITY_INFO) and back online, and
//! powers off with SYSTEM_OFF.
//!
//! Needs an arm64 Linux `Image` (e.g. Debian's cloud kernel, whose vmlinuz
//! is an uncompressed Image) and busybox inside the VM:
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_NESTED_FILES=/path/Image cargo test -p vpsci
//! --target aarch64-unknown-linux-musl --test nested_linux -- --ignored --nocapture`.
//! `cargo xtask test` runs it in its one nested boot with the kernel it
//! provisioned (`target/nested/assets/Image`).
#![cfg(target_arch = "aarch64")]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vpsci::cli::ResetAction;
use vpsci::layout::GuestLayout;
use vpsci::run::{run_session, Session, EXIT_POWERED_OFF};
use vpsci::vm::{ImageSource, VmOptions};
use vpsci_firmware::{Conduit, FirmwareConfig, PsciVersion};
use vpsci_kvm::{KvmHost, SmcccRouting};

const INIT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo \"GUEST online: $(/bin/busybox cat /sys/devices/system/cpu/online)\"
echo 0 > /sys/devices/system/cpu/cpu1/online
echo \"GUEST after offline: $(/bin/busybox cat /sys/devices/system/cpu/online)\"
echo 1 > /sys/devices/system/cpu/cpu1/online
echo \"GUEST after online: $(/bin/busybox cat /sys/devices/system/cpu/online)\"
/bin/busybox poweroff -f
";

/// A `newc` cpio archive (what Linux unpacks as an initramfs).
fn cpio(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer = ("TRAILER!!!", 0, Vec::new());
    for (ino, (name, mode, data)) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            ino + 1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
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
    out
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE (an arm64 Linux Image, copied in with VPSCI_NESTED_FILES)"]
fn linux_brings_up_every_cpu_hotplugs_one_and_powers_off() {
    let image = match std::env::var_os("VPSCI_LINUX_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => panic!("set VPSCI_LINUX_IMAGE to an arm64 Linux Image"),
    };
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|e| panic!("/bin/busybox: {e}"));
    let initrd = cpio(&[
        ("bin", 0o040755, Vec::new()),
        ("proc", 0o040755, Vec::new()),
        ("sys", 0o040755, Vec::new()),
        ("dev", 0o040755, Vec::new()),
        ("bin/busybox", 0o100755, busybox),
        ("init", 0o100755, INIT.as_bytes().to_vec()),
    ]);
    let initrd_file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(initrd_file.path(), initrd).unwrap_or_else(|e| panic!("{e}"));

    let host = KvmHost::open().unwrap_or_else(|e| panic!("{e}"));
    let layout = GuestLayout::new(4, 512 << 20).unwrap_or_else(|e| panic!("{e}"));
    let memory = layout.create_memory().unwrap_or_else(|e| panic!("{e}"));
    let console = Console::default();
    let sink = console.clone();
    let session = Session {
        vm: VmOptions {
            layout,
            image: ImageSource::File(image),
            initrd: Some(initrd_file.path().to_path_buf()),
            cmdline: "console=ttyAMA0 panic=-1".to_owned(),
            firmware: FirmwareConfig {
                psci_version: PsciVersion::V1_3,
                conduit: Conduit::Hvc,
                ..FirmwareConfig::default()
            },
            routing: SmcccRouting::userspace_psci(),
            devices: Default::default(),
            idle_states: Vec::new(),
        },
        on_reset: ResetAction::Exit,
        on_hibernate: vpsci::cli::HibernateAction::PowerOff,
        timeout: Some(Duration::from_secs(300)),
        empty_handler: false,
        console: Arc::new(move || Box::new(sink.clone()) as Box<dyn Write + Send>),
        events: Arc::new(vpsci::events::NoEvents),
    };
    let outcome = run_session(&host, &session, &memory);
    let text = String::from_utf8_lossy(&console.0.lock().unwrap_or_else(PoisonError::into_inner))
        .into_owned();
    for line in text
        .lines()
        .filter(|l| l.contains("psci") || l.contains("GUEST") || l.contains("smp"))
    {
        println!("{line}");
    }
    assert_eq!(outcome.status, EXIT_POWERED_OFF, "{}", outcome.message);
    assert!(
        outcome.message.contains("SYSTEM_OFF"),
        "{}",
        outcome.message
    );
    assert!(
        text.contains("psci: PSCIv1.3 detected in firmware."),
        "no PSCI 1.3"
    );
    assert!(text.contains("GUEST online: 0-3"), "not every CPU came up");
    assert!(
        text.contains("GUEST after offline: 0,2-3"),
        "cpu1 did not go offline"
    );
    assert!(
        text.contains("GUEST after online: 0-3"),
        "cpu1 did not come back"
    );
}
