//! Measurements with a real Linux guest (nested harness), run on demand; the
//! numbers are printed, never asserted:
//! `VPSCI_LINUX_IMAGE=$PWD/target/nested/assets/Image VPSCI_NESTED_FILES=$PWD/target/nested/assets/Image
//! cargo test --release -p vpsci --target aarch64-unknown-linux-musl --test nested_measure_linux -- --ignored --nocapture`
//! (`VPSCI_MEASURE_RUNS=N` repeats each case N times, default 3;
//! `VPSCI_MEASURE_CPUS=8,64` picks the vCPU counts, default 1,8,64;
//! `VPSCI_MEASURE_TIMEOUT=SECS` is each boot's limit, default 900; raise
//! `VPSCI_NESTED_TIMEOUT` to cover the whole run).
//!
//! - boot to init: from the start of the session (before the VM is built) to
//!   the first line `/init` prints reaching vpsci's console, at 1, 8 and 64
//!   vCPUs, with vpsci's PSCI and with KVM's (`--in-kernel-psci`), the two
//!   interleaved in the same run;
//! - one hotplug cycle (`echo 0`, then `echo 1` to cpu1's `online`), timed
//!   on the host from the console line before 20 cycles to the one after
//!   (8 and 64 vCPUs; the guest runs with `rcupdate.rcu_expedited=1`, as
//!   `nested_linux_hotplug` does).
//!
//! On the nested harness the "hardware" is QEMU's TCG emulator: absolute
//! numbers are those of emulation; the comparison between the two ways,
//! measured in the same run, is what carries over.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::time::Duration;

use nested_common::linux::{boot, LinuxGuest};

const HOTPLUG_CYCLES: u32 = 20;

fn runs() -> usize {
    std::env::var("VPSCI_MEASURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

/// Each boot's limit: `VPSCI_MEASURE_TIMEOUT` seconds, default 900 (a
/// 64-vCPU boot did not finish within 900 s with the host's load average at
/// 12-15).
fn boot_timeout() -> Duration {
    let secs = std::env::var("VPSCI_MEASURE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(900);
    Duration::from_secs(secs)
}

/// The vCPU counts to measure: `VPSCI_MEASURE_CPUS` (comma-separated), default 1, 8, 64.
fn cpu_counts() -> Vec<u32> {
    std::env::var("VPSCI_MEASURE_CPUS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<u32>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 8, 64])
}

fn init_script(cpus: u32) -> String {
    let hotplug = if cpus > 1 {
        format!(
            "echo GUEST hotplug start
i=0
while [ $i -lt {HOTPLUG_CYCLES} ]; do
  i=$((i+1))
  echo 0 > /sys/devices/system/cpu/cpu1/online
  echo 1 > /sys/devices/system/cpu/cpu1/online
done
echo GUEST hotplug end
"
        )
    } else {
        String::new()
    };
    format!(
        "#!/bin/busybox sh
echo GUEST init
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo \"GUEST online=$(/bin/busybox cat /sys/devices/system/cpu/online)\"
{hotplug}/bin/busybox poweroff -f
"
    )
}

/// One boot: (boot to init, one hotplug cycle) in milliseconds.
fn measure(cpus: u32, in_kernel_psci: bool) -> (f64, Option<f64>) {
    let ran = boot(LinuxGuest {
        cpus,
        init: init_script(cpus),
        // As in nested_linux_hotplug: expedited RCU keeps grace periods from
        // dominating a hotplug cycle under emulation, for both ways alike.
        cmdline: "console=ttyAMA0 panic=-1 quiet rcupdate.rcu_expedited=1".to_owned(),
        timeout: boot_timeout(),
        in_kernel_psci,
        ..LinuxGuest::default()
    });
    // What the guest got to, before any check can stop the measurement.
    eprintln!(
        "  {cpus} vCPUs, in-kernel PSCI {in_kernel_psci}: init's first line after {}, ended: {}",
        ran.console_log
            .arrival_of("GUEST init")
            .map_or("-".to_owned(), |at| format!(
                "{:.0} ms",
                (at - ran.started).as_secs_f64() * 1e3
            )),
        ran.outcome.message
    );
    assert_eq!(
        ran.outcome.status,
        vpsci::run::EXIT_POWERED_OFF,
        "{cpus} vCPUs, in-kernel PSCI {in_kernel_psci}: {}",
        ran.outcome.message
    );
    let want = if cpus == 1 {
        "GUEST online=0".to_owned()
    } else {
        format!("GUEST online=0-{}", cpus - 1)
    };
    assert!(ran.console.contains(&want), "missing {want:?}");
    let console = &ran.console_log;
    let init = console
        .arrival_of("GUEST init")
        .unwrap_or_else(|| panic!("no init line"));
    let boot_ms = (init - ran.started).as_secs_f64() * 1e3;
    let hotplug_ms = match (
        console.arrival_of("GUEST hotplug start"),
        console.arrival_of("GUEST hotplug end"),
    ) {
        (Some(start), Some(end)) => {
            Some((end - start).as_secs_f64() * 1e3 / f64::from(HOTPLUG_CYCLES))
        }
        _ => None,
    };
    (boot_ms, hotplug_ms)
}

/// "median (min-max, n)" of `values`, with `decimals` digits.
fn describe(values: &mut [f64], decimals: usize) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    values.sort_by(f64::total_cmp);
    let d = decimals;
    format!(
        "{:.d$} ms ({:.d$}-{:.d$}, n={})",
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
        values.len()
    )
}

#[test]
#[ignore = "measurement: needs VPSCI_LINUX_IMAGE; run with --ignored --nocapture"]
fn linux_boot_to_init_and_hotplug_cycle_with_vpsci_and_in_kernel_psci() {
    let runs = runs();
    println!("| vCPUs | PSCI | boot to init: median (min-max, n) | one hotplug cycle: median (min-max, n) |");
    println!("|---|---|---|---|");
    for cpus in cpu_counts() {
        // [vpsci, kernel] x (boot, hotplug)
        let mut boot_ms: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut hotplug_ms: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for run in 0..runs {
            // Alternate which way goes first, so drift in the host's load
            // does not favour one.
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for way in order {
                let (b, h) = measure(cpus, way == 1);
                eprintln!(
                    "  {cpus} vCPUs, {}: boot to init {b:.0} ms, hotplug cycle {}",
                    ["vpsci", "in-kernel"][way],
                    h.map_or("-".to_owned(), |h| format!("{h:.1} ms"))
                );
                boot_ms[way].push(b);
                hotplug_ms[way].extend(h);
            }
        }
        for way in 0..2 {
            println!(
                "| {cpus} | {} | {} | {} |",
                ["vpsci", "in-kernel (`--in-kernel-psci`)"][way],
                describe(&mut boot_ms[way], 0),
                describe(&mut hotplug_ms[way], 1)
            );
        }
    }
}
