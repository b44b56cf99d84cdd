//! Hibernation to a virtio disk and resume, with a real Linux guest on
//! vpsci (nested harness). Run 1: the guest puts swap on its virtio disk,
//! writes a marker to tmpfs and hibernates (`echo disk > /sys/power/state`);
//! Linux writes its image, flushes the disk and powers off with
//! SYSTEM_OFF2 from Linux 6.13 on (SYSTEM_OFF before), which ends the run
//! with exit status 0. Linux passes SYSTEM_OFF2 type 0 (no type, which selects
//! the default type, HIBERNATE_OFF; KVM takes 0 that way too), and vpsci's
//! event log says `hibernate`. Run 2: a fresh vpsci with the same
//! disk boots the same kernel, whose initramfs asks it to resume from the
//! disk (`/sys/power/resume`, what `resume=` does once the disk exists);
//! the hibernated system continues where it stopped: same boot id, marker
//! intact, every CPU online.
//!
//! A refused hibernation as Linux sees it (`--on-hibernate refuse`): the
//! same guest writes its image and calls SYSTEM_OFF2; vpsci refuses it
//! (INTERNAL_FAILURE to the caller, no power state changed), the calling CPU
//! runs on, and Linux, whose hibernation power-off handler ignores the
//! answer, falls back to its next power-off handler, plain SYSTEM_OFF, which
//! ends the run with exit status 0. The image Linux wrote is on the disk
//! (its swap signature says `S1SUSPEND`).
//!
//! Needs the harness's `Image` and modules (see `nested_linux_disk.rs`).
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::path::Path;
use std::time::Duration;

use nested_common::binary::str_of;
use nested_common::disk::{disk_init, one_disk, sparse_image};
use nested_common::linux::{boot, virtio_modules, LinuxGuest, LinuxRan};
use serde_json::Value;
use vpsci::cli::HibernateAction;

/// `/init` after the disk drivers are loaded ([`disk_init`]).
const INIT: &str = "echo \"GUEST kernel $(uname -r)\"
# Resumes the hibernated system if the disk holds its image (no return).
cat /sys/block/vda/dev > /sys/power/resume
echo \"GUEST fresh boot $(cat /proc/sys/kernel/random/boot_id)\"
mkswap /dev/vda > /dev/null && swapon /dev/vda && echo GUEST swap on vda
echo \"marker-$(cat /proc/sys/kernel/random/boot_id)\" > /tmp/marker
echo \"GUEST hibernating boot_id=$(cat /proc/sys/kernel/random/boot_id)\"
echo disk > /sys/power/state
echo \"GUEST resumed boot_id=$(cat /proc/sys/kernel/random/boot_id) marker=$(cat /tmp/marker) online=$(cat /sys/devices/system/cpu/online)\"
poweroff -f
";

fn run(disk: &Path, on_hibernate: HibernateAction) -> LinuxRan {
    let ran = boot(LinuxGuest {
        cpus: 4,
        init: disk_init(INIT),
        files: virtio_modules(),
        cmdline: "console=ttyAMA0 panic=-1 quiet".to_owned(),
        timeout: Duration::from_secs(240),
        devices: one_disk(disk),
        on_hibernate,
        ..LinuxGuest::default()
    });
    ran.show(&["PM:"]);
    ran
}

/// The value after `key=` on the console text from `prefix` to the end of
/// its line (`prefix` may follow other output on the same line: a kernel
/// that resumes a hibernated one leaves its last line unterminated).
fn field(console: &str, prefix: &str, key: &str) -> String {
    let start = console
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} on the console"));
    let line = console[start..].lines().next().unwrap_or_default();
    // The value ends at whitespace, or where a kernel message ran into it
    // ("online=0-3[   23.78] reboot: Power down": `poweroff -f` leaves the
    // echo's newline in the tty).
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .split('[')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// (major, minor) of the kernel release the guest printed after `GUEST kernel`.
fn kernel_version(console: &str) -> (u32, u32) {
    let release = console
        .find("GUEST kernel ")
        .map(|at| &console[at + "GUEST kernel ".len()..])
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no kernel line"));
    // The token may run into the next output ("6.17.13+deb13-cloud-arm64GUEST ...").
    let mut parts = release
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE (Linux 6.13+; cargo xtask test passes the 6.17 kernel from setup, none when it is missing) and VPSCI_LINUX_MODULES"]
fn linux_hibernates_to_a_virtio_disk_and_a_second_vpsci_resumes_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("swap.img");
    sparse_image(&disk, 512 << 20, &[]);

    println!("run 1: hibernate");
    let first = run(&disk, HibernateAction::PowerOff);
    first.assert_powered_off();
    assert!(first.console.contains("GUEST swap on vda"), "no swap");
    let boot_id = field(&first.console, "GUEST hibernating", "boot_id");
    assert!(
        !first.console.contains("GUEST resumed"),
        "run 1 did not power off when it hibernated"
    );
    // How the guest powered off, as the event log has it.
    let off_call = first
        .events
        .iter()
        .rev()
        .find(|e| e["kind"] == "psci_call" && e["result"]["outcome"] == "system_event")
        .unwrap_or_else(|| panic!("no committed system call in the event log"));
    let system_events = first.system_events();
    println!(
        "run 1 ended with {} type {} (system_event {:?})",
        off_call["function"], off_call["args"][0], system_events
    );
    let version = kernel_version(&first.console);
    if version >= (6, 13) {
        // Linux 6.13+ powers off a hibernated system with SYSTEM_OFF2; it
        // passes type 0 ("an acceptable alternative to HIBERNATE_OFF",
        // drivers/firmware/psci/psci.c), which KVM also takes as
        // HIBERNATE_OFF.
        assert_eq!(off_call["function"], "SYSTEM_OFF2", "Linux {version:?}");
    } else {
        assert_eq!(off_call["function"], "SYSTEM_OFF", "Linux {version:?}");
    }
    if version >= (6, 13) {
        assert_eq!(system_events, ["hibernate"], "Linux {version:?}");
    } else {
        assert_eq!(system_events, ["off"], "Linux {version:?}");
    }

    println!("run 2: resume");
    let second = run(&disk, HibernateAction::PowerOff);
    second.assert_powered_off();
    assert!(
        !second.console.contains("GUEST fresh boot"),
        "run 2 booted afresh instead of resuming"
    );
    assert_eq!(
        field(&second.console, "GUEST resumed", "boot_id"),
        boot_id,
        "boot id changed"
    );
    assert_eq!(
        field(&second.console, "GUEST resumed", "marker"),
        format!("marker-{boot_id}"),
        "tmpfs marker changed"
    );
    assert_eq!(field(&second.console, "GUEST resumed", "online"), "0-3");
}

/// Where Linux keeps its swap signature: the last 10 bytes of the swap
/// area's first 4 KiB page (`SWAPSPACE2` from mkswap, `S1SUSPEND` once a
/// hibernation image has been written behind it).
const SWAP_SIGNATURE: std::ops::Range<usize> = 4086..4096;

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE (Linux 6.13+; cargo xtask test passes the 6.17 kernel from setup, none when it is missing) and VPSCI_LINUX_MODULES"]
fn a_refused_hibernation_leaves_linux_running_and_it_falls_back_to_system_off() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("swap.img");
    sparse_image(&disk, 512 << 20, &[]);

    let ran = run(&disk, HibernateAction::Refuse);
    let version = kernel_version(&ran.console);
    assert!(
        version >= (6, 13),
        "Linux {version:?} hibernates with SYSTEM_OFF, which is not a hibernate request"
    );
    assert!(ran.console.contains("GUEST swap on vda"), "no swap");
    assert!(
        ran.console.contains("GUEST hibernating"),
        "the guest never asked to hibernate"
    );
    let events: Vec<(&str, &Value)> = ran.events.iter().map(|e| (str_of(e, "kind"), e)).collect();
    for (line, e) in ran.lines.iter().zip(&ran.events) {
        if str_of(e, "kind") == "system_event"
            || str_of(e, "function").starts_with("SYSTEM_")
            || str_of(e, "kind") == "vm_end"
        {
            println!("  {line}");
        }
    }
    // The refusal: a hibernate system event marked refused, answered -6.
    let refused_at = events
        .iter()
        .position(|(k, e)| *k == "system_event" && e["refused"] == true)
        .unwrap_or_else(|| panic!("no refused system event in the log"));
    assert_eq!(events[refused_at].1["event"], "hibernate");
    let caller = events[refused_at].1["vcpu"].clone();
    let off2_at = events[refused_at..]
        .iter()
        .position(|(k, e)| *k == "psci_call" && str_of(e, "function") == "SYSTEM_OFF2")
        .map(|i| i + refused_at)
        .unwrap_or_else(|| panic!("no SYSTEM_OFF2 call after the refusal"));
    let off2 = events[off2_at].1;
    assert_eq!(off2["vcpu"], caller);
    assert_eq!(off2["result"]["outcome"], "return", "{off2}");
    assert_eq!(off2["result"]["x0"], -6, "SYSTEM_OFF2 not INTERNAL_FAILURE");
    // The caller ran on: its next call is Linux's fallback, SYSTEM_OFF,
    // which vpsci carries out; no power state changed in between.
    let off_at = events[off2_at..]
        .iter()
        .position(|(k, e)| *k == "psci_call" && str_of(e, "function") == "SYSTEM_OFF")
        .map(|i| i + off2_at)
        .unwrap_or_else(|| panic!("the refused caller never called SYSTEM_OFF"));
    let off = events[off_at].1;
    assert_eq!(off["vcpu"], caller, "SYSTEM_OFF from another vCPU");
    assert_eq!(off["result"]["outcome"], "system_event");
    let between: Vec<&String> = ran.lines[refused_at..off_at]
        .iter()
        .zip(&events[refused_at..off_at])
        .filter(|(_, (k, _))| *k == "power_state")
        .map(|(l, _)| l)
        .collect();
    assert!(
        between.is_empty(),
        "power states changed by a refused hibernate: {between:?}"
    );
    assert_eq!(ran.system_events(), ["hibernate", "off"]);
    ran.assert_powered_off();
    assert!(
        ran.outcome.message.contains("called SYSTEM_OFF:"),
        "{}",
        ran.outcome.message
    );
    // Linux had written its image before it asked to power off.
    let image = std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}"));
    let signature = &image[SWAP_SIGNATURE];
    println!(
        "swap signature after the run: {:?}",
        String::from_utf8_lossy(signature)
    );
    assert!(
        signature.starts_with(b"S1SUSPEND"),
        "no hibernation image on the disk"
    );
}
