//! Reboot with a real Linux guest on vpsci (nested harness): under
//! `--on-reset restart` the guest runs `reboot` three times and then
//! `poweroff`, and the session ends with exit status 0. Each boot counts
//! itself on a virtio disk (RAM is kept across a reset, but a disk is what a
//! rebooted system reads back for sure), so the test knows the guest really
//! booted four times: four boot counts in order, four different boot ids,
//! the count on the image after vpsci exits, and in the event log three
//! `reset` system events, three `vm_restart` lines and every secondary
//! started by CPU_ON once per boot.
//!
//! Needs the harness's `Image` and modules (see `nested_linux_disk.rs`):
//! `VPSCI_LINUX_IMAGE=$PWD/target/nested/assets/Image
//! VPSCI_LINUX_MODULES=$PWD/target/nested/assets/modules
//! VPSCI_NESTED_FILES=$PWD/target/nested/assets/Image:$PWD/target/nested/assets/modules/virtio_mmio.ko:$PWD/target/nested/assets/modules/virtio_blk.ko
//! cargo test -p vpsci --target aarch64-unknown-linux-musl --test nested_linux_reboot -- --include-ignored --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::collections::BTreeSet;
use std::time::Duration;

use nested_common::binary::{assert_log_ends_powered_off, str_of};
use nested_common::disk::{disk_init, one_disk, sparse_image};
use nested_common::linux::{boot, virtio_modules, LinuxGuest};
use vpsci::cli::ResetAction;

/// Boots in all: three reboots, then the power-off.
const BOOTS: u32 = 4;
const CPUS: u32 = 2;

/// Reads the boot count from the disk's first bytes (`boots=N;`, nothing on
/// a fresh image), writes N+1 back with a flush, and reboots until the
/// count reaches [`BOOTS`].
fn init_script() -> String {
    disk_init(&format!(
        "n=$(dd if=/dev/vda bs=16 count=1 2>/dev/null | tr -d '\\000' | sed -n 's/^boots=\\([0-9]*\\);.*/\\1/p')
n=$((${{n:-0}} + 1))
printf 'boots=%d;' $n | dd of=/dev/vda conv=notrunc 2>/dev/null
sync
echo \"GUEST boot $n boot_id=$(cat /proc/sys/kernel/random/boot_id) online=$(cat /sys/devices/system/cpu/online)\"
if [ $n -lt {BOOTS} ]; then reboot -f; else poweroff -f; fi
echo GUEST still running after reboot/poweroff
"
    ))
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE and VPSCI_LINUX_MODULES (copied in with VPSCI_NESTED_FILES)"]
fn linux_reboots_three_times_under_on_reset_restart_then_powers_off_with_status_0() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("boots.img");
    sparse_image(&disk, 1 << 20, &[]);

    let ran = boot(LinuxGuest {
        cpus: CPUS,
        init: init_script(),
        files: virtio_modules(),
        cmdline: "console=ttyAMA0 panic=-1 quiet".to_owned(),
        timeout: Duration::from_secs(280),
        devices: one_disk(&disk),
        on_reset: ResetAction::Restart,
        ..LinuxGuest::default()
    });
    ran.show(&["reboot:"]);
    ran.assert_powered_off();
    assert!(
        ran.outcome.message.contains("SYSTEM_OFF"),
        "{}",
        ran.outcome.message
    );
    assert!(
        !ran.console.contains("GUEST still running"),
        "a reboot or power-off returned to the shell"
    );

    // The guest's own view: boots 1..=4 in order, each a fresh kernel with
    // every CPU online.
    let boots: Vec<(u32, String, String)> = ran
        .console
        .lines()
        .filter_map(|l| {
            l.find("GUEST boot ")
                .map(|at| &l[at + "GUEST boot ".len()..])
        })
        .map(|rest| {
            let mut words = rest.split_whitespace();
            let n = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let field = |key: &str, words: &[&str]| {
                words
                    .iter()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_default()
                    .split('[')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            };
            let words: Vec<&str> = words.collect();
            (n, field("boot_id=", &words), field("online=", &words))
        })
        .collect();
    let counts: Vec<u32> = boots.iter().map(|b| b.0).collect();
    assert_eq!(counts, (1..=BOOTS).collect::<Vec<_>>(), "boot counts");
    let ids: BTreeSet<&str> = boots.iter().map(|b| b.1.as_str()).collect();
    assert_eq!(
        ids.len(),
        BOOTS as usize,
        "boot ids not all different: {boots:?}"
    );
    for (n, _, online) in &boots {
        assert_eq!(online, &format!("0-{}", CPUS - 1), "boot {n}: CPUs online");
    }
    let image = std::fs::read(&disk).unwrap_or_else(|e| panic!("{e}"));
    let want = format!("boots={BOOTS};");
    assert_eq!(
        &image[..want.len()],
        want.as_bytes(),
        "boot count on the image after exit"
    );

    // The VMM's view.
    let system_events = ran.system_events();
    let mut want_events = vec!["reset"; BOOTS as usize - 1];
    want_events.push("off");
    assert_eq!(system_events, want_events, "system events in order");
    let restarts: Vec<u64> = ran
        .events
        .iter()
        .filter(|e| str_of(e, "kind") == "vm_restart")
        .filter_map(|e| e["restart"].as_u64())
        .collect();
    assert_eq!(restarts, [1, 2, 3], "vm_restart lines");
    let resets = ran
        .events
        .iter()
        .filter(|e| {
            str_of(e, "function") == "SYSTEM_RESET" && e["result"]["outcome"] == "system_event"
        })
        .count();
    assert_eq!(resets, BOOTS as usize - 1, "committed SYSTEM_RESET calls");
    // Every boot starts each secondary once: CPU_ON successes counted
    // between the restarts.
    let mut per_boot = vec![0u32; 1];
    for e in &ran.events {
        match str_of(e, "kind") {
            "vm_restart" => per_boot.push(0),
            "psci_call" if str_of(e, "function") == "CPU_ON" && e["result"]["x0"] == 0 => {
                if let Some(n) = per_boot.last_mut() {
                    *n += 1;
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        per_boot,
        vec![CPUS - 1; BOOTS as usize],
        "CPU_ON successes per boot"
    );
    assert_log_ends_powered_off(&ran.events);
    println!(
        "event log: system events {system_events:?}, restarts {restarts:?}, CPU_ON successes per boot {per_boot:?}"
    );
}
