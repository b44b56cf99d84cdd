//! Booting the harness's real Linux kernel on vpsci with a busybox
//! initramfs whose `/init` is a test's shell script, with the console and
//! the JSON event log kept for checks.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use vpsci::cli::{HibernateAction, ResetAction};
use vpsci::events::JsonLinesFile;
use vpsci::layout::GuestLayout;
use vpsci::run::{run_session, RunOutcome, Session, EXIT_POWERED_OFF};
use vpsci::vm::{DeviceOptions, ImageSource, VmOptions};
use vpsci_firmware::FirmwareConfig;
use vpsci_kvm::{KvmHost, SmcccRouting};

/// A `newc` cpio archive (what Linux unpacks as an initramfs).
pub fn cpio(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
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

/// Console output kept in memory, with when each piece arrived.
#[derive(Clone, Default)]
pub struct Console {
    pub bytes: Arc<Mutex<Vec<u8>>>,
    /// (arrival, length of the output after this write), one per write.
    arrivals: Arc<Mutex<Vec<(Instant, usize)>>>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        bytes.extend_from_slice(buf);
        self.arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), bytes.len()));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// When the end of the first `marker` in the output reached the console
    /// (the UART writes byte by byte, so this is the marker's last byte).
    pub fn arrival_of(&self, marker: &str) -> Option<Instant> {
        let bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let end = bytes
            .windows(marker.len())
            .position(|w| w == marker.as_bytes())?
            + marker.len();
        let arrivals = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        arrivals
            .iter()
            .find(|(_, len)| *len >= end)
            .map(|(at, _)| *at)
    }
}

/// The kernel `VPSCI_LINUX_IMAGE` names.
pub fn linux_image() -> PathBuf {
    match std::env::var_os("VPSCI_LINUX_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => panic!("set VPSCI_LINUX_IMAGE to an arm64 Linux Image"),
    }
}

/// What to boot.
pub struct LinuxGuest {
    pub cpus: u32,
    pub memory_mib: u64,
    /// The `/init` shell script (run by busybox `sh`).
    pub init: String,
    /// More initramfs entries (name, mode, contents).
    pub files: Vec<(String, u32, Vec<u8>)>,
    pub cmdline: String,
    pub timeout: Duration,
    pub devices: DeviceOptions,
    pub on_reset: ResetAction,
    pub on_hibernate: HibernateAction,
    /// KVM answers PSCI itself (`--in-kernel-psci`): no PSCI lines in the log.
    pub in_kernel_psci: bool,
}

impl Default for LinuxGuest {
    fn default() -> LinuxGuest {
        LinuxGuest {
            cpus: 4,
            memory_mib: 512,
            init: String::new(),
            files: Vec::new(),
            cmdline: "console=ttyAMA0 panic=-1".to_owned(),
            timeout: Duration::from_secs(300),
            devices: DeviceOptions::default(),
            on_reset: ResetAction::Exit,
            on_hibernate: HibernateAction::PowerOff,
            in_kernel_psci: false,
        }
    }
}

/// What a Linux run left.
pub struct LinuxRan {
    pub outcome: RunOutcome,
    pub console: String,
    /// The event log, one JSON object per line.
    pub events: Vec<Value>,
    /// The same lines as written.
    pub lines: Vec<String>,
    pub wall: Duration,
    /// When the session started (before the VM was built).
    pub started: Instant,
    /// The console with arrival times.
    pub console_log: Console,
}

/// The first lines of a test's `/init`: busybox's applets installed, /proc,
/// /sys, /dev and a tmpfs on /tmp mounted.
pub const INIT_PREAMBLE: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
";

impl LinuxRan {
    /// Prints the console lines that contain `GUEST` or one of `also`, then
    /// how vpsci ended.
    pub fn show(&self, also: &[&str]) {
        for line in self
            .console
            .lines()
            .filter(|l| l.contains("GUEST") || also.iter().any(|a| l.contains(a)))
        {
            println!("{line}");
        }
        println!(
            "vpsci: {} (exit status {}, {:.1} s)",
            self.outcome.message,
            self.outcome.status,
            self.wall.as_secs_f64()
        );
    }

    /// Prints the last `n` console lines and the last `n` event log lines: what
    /// Linux and vpsci said last, to tell where a run that did not end hung.
    pub fn show_end(&self, n: usize) {
        let tail = |what: &str, lines: &[&str]| {
            let from = lines.len().saturating_sub(n);
            println!(
                "{what}, last {} of {} lines:",
                lines.len() - from,
                lines.len()
            );
            for line in &lines[from..] {
                println!("  {line}");
            }
        };
        tail("console", &self.console.lines().collect::<Vec<_>>());
        tail(
            "event log",
            &self.lines.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    /// The run ended with the guest powering off (exit status 0).
    pub fn assert_powered_off(&self) {
        assert_eq!(
            self.outcome.status, EXIT_POWERED_OFF,
            "{}",
            self.outcome.message
        );
    }

    /// The `event` of each `system_event` line of the event log, in order.
    pub fn system_events(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter(|e| e["kind"] == "system_event")
            .filter_map(|e| e["event"].as_str())
            .collect()
    }
}

/// The kernel module `name` from `VPSCI_LINUX_MODULES`.
pub fn module(name: &str) -> Vec<u8> {
    let dir = std::env::var_os("VPSCI_LINUX_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("set VPSCI_LINUX_MODULES to the kernel's module directory"));
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

/// Initramfs entries for the virtio disk drivers (`insmod /virtio_mmio.ko
/// && insmod /virtio_blk.ko` loads them).
pub fn virtio_modules() -> Vec<(String, u32, Vec<u8>)> {
    ["virtio_mmio.ko", "virtio_blk.ko"]
        .into_iter()
        .map(|name| (name.to_owned(), 0o100644, module(name)))
        .collect()
}

/// An initramfs with the machine's busybox, `init` as `/init` and `files`.
pub fn initramfs(init: &str, files: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|e| panic!("/bin/busybox: {e}"));
    let mut entries: Vec<(&str, u32, Vec<u8>)> = vec![
        ("bin", 0o040755, Vec::new()),
        ("proc", 0o040755, Vec::new()),
        ("sys", 0o040755, Vec::new()),
        ("dev", 0o040755, Vec::new()),
        ("tmp", 0o040755, Vec::new()),
        ("bin/busybox", 0o100755, busybox),
        ("init", 0o100755, init.as_bytes().to_vec()),
    ];
    for (name, mode, data) in files {
        entries.push((name, *mode, data.clone()));
    }
    cpio(&entries)
}

/// Boots the kernel with busybox and `guest.init` as `/init`, to the end.
pub fn boot(guest: LinuxGuest) -> LinuxRan {
    let image = linux_image();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs(&guest.init, &guest.files)).unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("events.jsonl");

    let host = KvmHost::open().unwrap_or_else(|e| panic!("{e}"));
    let layout =
        GuestLayout::new(guest.cpus, guest.memory_mib << 20).unwrap_or_else(|e| panic!("{e}"));
    let memory = layout.create_memory().unwrap_or_else(|e| panic!("{e}"));
    let console = Console::default();
    let sink = console.clone();
    let started = Instant::now();
    let events = Arc::new(JsonLinesFile::create(&log, started).unwrap_or_else(|e| panic!("{e}")));
    let session = Session {
        vm: VmOptions {
            layout,
            image: ImageSource::File(image),
            initrd: Some(initrd),
            cmdline: guest.cmdline,
            firmware: FirmwareConfig::default(),
            routing: if guest.in_kernel_psci {
                SmcccRouting::kernel_psci()
            } else {
                SmcccRouting::userspace_psci()
            },
            idle_states: Vec::new(),
            devices: guest.devices,
        },
        on_reset: guest.on_reset,
        on_hibernate: guest.on_hibernate,
        timeout: Some(guest.timeout),
        empty_handler: false,
        console: Arc::new(move || Box::new(sink.clone()) as Box<dyn Write + Send>),
        events,
    };
    let outcome = run_session(&host, &session, &memory);
    let wall = started.elapsed();
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
        .lines()
        .map(str::to_owned)
        .collect();
    let events = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    LinuxRan {
        outcome,
        console: console.text(),
        events,
        lines,
        wall,
        started,
        console_log: console,
    }
}
