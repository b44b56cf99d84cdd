//! A Linux guest migrates between two vpsci processes (nested harness): a shell loop in
//! the guest counts in memory and prints its count with the online CPUs; after `vpsci ctl
//! migrate` the destination's console carries the count on from where the source's
//! stopped, with all four CPUs online, and the source exited 0. Every 6 s the guest also
//! takes CPU 3 offline and online again and suspends to RAM, woken by its RTC alarm;
//! a whole such cycle runs on the destination after the migration.
//!
//! Needs the harness's arm64 Linux `Image` (see `nested_linux.rs`):
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_NESTED_FILES=/path/Image cargo test -p vpsci
//! --target aarch64-unknown-linux-musl --test nested_linux_migration -- --ignored
//! --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;
mod process_common;

use nested_common::linux::{initramfs, linux_image};
use process_common::*;
use vpsci::api::types::{PowerState, RunState};

const INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo deep > /sys/power/mem_sleep
(
  cycle=0
  while true; do
    sleep 6
    cycle=$((cycle+1))
    echo 0 > /sys/devices/system/cpu/cpu3/online && echo \"cycle $cycle cpu3 offline: $(cat /sys/devices/system/cpu/online)\"
    echo 1 > /sys/devices/system/cpu/cpu3/online && echo \"cycle $cycle cpu3 back: $(cat /sys/devices/system/cpu/online)\"
    echo 0 > /sys/class/rtc/rtc0/wakealarm
    n=$(cat /sys/power/wakeup_count)
    echo +2 > /sys/class/rtc/rtc0/wakealarm
    if echo $n > /sys/power/wakeup_count && echo mem > /sys/power/state; then
      echo \"cycle $cycle resumed: $(cat /sys/devices/system/cpu/online)\"
    fi
  done
) &
i=0
while true; do
  i=$((i+1))
  echo \"count $i online $(cat /sys/devices/system/cpu/online)\"
  sleep 0.2
done
";

/// The part of `text` from the first `what` on.
fn from<'a>(text: &'a str, what: &str) -> Option<&'a str> {
    text.find(what).map(|at| &text[at..])
}

/// Every whole `count N online CPUS` line of a console, in order.
fn counts(console: &str) -> Vec<(u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim_end_matches('\r').strip_prefix("count ")?;
            let (n, online) = rest.split_once(" online ")?;
            Some((n.parse().ok()?, online.to_owned()))
        })
        .collect()
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE (an arm64 Linux Image, copied in with VPSCI_NESTED_FILES)"]
fn a_linux_guest_counting_in_memory_migrates_and_keeps_counting_with_every_cpu_online() {
    let bench = Bench::new();
    let kernel = linux_image().to_string_lossy().into_owned();
    let initrd = bench.file("initrd.cpio", &initramfs(INIT, &[]));
    let source = bench.source(
        &kernel,
        4,
        &[
            "--initrd",
            &initrd,
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyAMA0 panic=-1 quiet",
        ],
        &[],
    );
    until("the guest counts with 4 CPUs online", || {
        counts(&read(&source.console))
            .last()
            .is_some_and(|(n, online)| *n >= 3 && online == "0-3")
    });
    let endpoint = "unix:/tmp/vpsci-migrate-linux.sock";
    let dest = bench.destination("dest", endpoint, &[], &[]);
    let done = migrated(&migrate(&source.socket, endpoint, &[]));
    print_migration("Linux", &done);
    let src = source.wait();
    assert_eq!(src.status, Some(0), "{}", src.stderr);
    let last = counts(&src.console).last().map_or(0, |(n, _)| *n);
    let dest = dest.serving();
    until("the guest counts on the destination", || {
        counts(&read(&dest.console)).len() >= 5
    });
    let after = counts(&read(&dest.console));
    counter_goes_on(last, &after.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    // Hotplug and suspend to RAM on the destination: a whole cycle it started.
    let start = read(&dest.console).len();
    dest.until_console(
        "a hotplug and suspend cycle completes on the destination",
        |c| {
            let fresh = c.get(start..).unwrap_or("");
            from(fresh, "cpu3 offline: 0-2")
                .and_then(|rest| from(rest, "cpu3 back: 0-3"))
                .and_then(|rest| from(rest, "resumed: 0-3"))
                .is_some()
        },
    );
    // After the resume the count goes on with every CPU back (the next cycle may
    // already have started when the console is read, so the line after the resume
    // is the one checked).
    dest.until_console(
        "the guest counts after its resume with every CPU online",
        |c| {
            from(c.get(start..).unwrap_or(""), "resumed: 0-3")
                .is_some_and(|rest| rest.contains(" online 0-3"))
        },
    );
    let all = counts(&read(&dest.console));
    for pair in all.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{all:?}");
    }
    let events = read(&dest.events);
    assert!(
        events.contains("\"kind\":\"wakeup\""),
        "no wake-up logged: {events}"
    );
    let now = info(&dest.socket);
    assert_eq!(now.run_state, RunState::Running, "{now:?}");
    assert!(
        now.vcpus
            .iter()
            .all(|v| v.power_state == Some(PowerState::On)),
        "{now:?}"
    );
    dest.power_off();
}
