//! Suspend to RAM with a real Linux guest on vpsci, woken by the PL031
//! RTC's alarm (nested harness): 10 cycles at 4 vCPUs. Each cycle Linux
//! takes the secondaries offline (CPU_OFF), calls SYSTEM_SUSPEND, which
//! vpsci commits only with every other vCPU off; the alarm's interrupt wakes
//! the VM through the vGIC, the caller resumes at its entry, and Linux
//! brings every CPU back with CPU_ON. A tmpfs file written before is intact
//! after, and `/sys/power/suspend_stats` counts 10 successes. The test
//! prints the suspend-to-resume latencies it reads from the event log.
//!
//! Needs the harness's arm64 Linux `Image` (see `nested_linux.rs`):
//! `VPSCI_LINUX_IMAGE=/path/Image VPSCI_NESTED_FILES=/path/Image cargo test -p vpsci
//! --target aarch64-unknown-linux-musl --test nested_linux_suspend -- --ignored --nocapture`.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::collections::HashMap;

use nested_common::linux::{boot, LinuxGuest};
use serde_json::Value;

const CYCLES: usize = 10;
/// Attempts the guest may make: an alarm that comes due while Linux is still
/// freezing tasks and suspending devices (1-2 s on the nested machine, more
/// when the host is busy) is a wake-up event that aborts that attempt (the
/// `wakeup_count` protocol), and the guest tries again. Such attempts never
/// reach SYSTEM_SUSPEND (the test checks every SYSTEM_SUSPEND committed).
/// Measured: 0 to 5 aborted attempts per 10 cycles.
const MAX_ATTEMPTS: usize = 3 * CYCLES;
const CPUS: u32 = 4;

fn init_script() -> String {
    format!(
        "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
echo \"GUEST rtc: $(cat /sys/class/rtc/rtc0/name)\"
echo deep > /sys/power/mem_sleep
echo \"GUEST mem_sleep: $(cat /sys/power/mem_sleep)\"
dd if=/dev/urandom of=/tmp/marker bs=1024 count=64 2>/dev/null
before=$(md5sum < /tmp/marker)
ok=0
attempt=0
while [ $ok -lt {CYCLES} ] && [ $attempt -lt {MAX_ATTEMPTS} ]; do
  attempt=$((attempt+1))
  echo 0 > /sys/class/rtc/rtc0/wakealarm
  count=$(cat /sys/power/wakeup_count)
  echo +2 > /sys/class/rtc/rtc0/wakealarm
  if echo $count > /sys/power/wakeup_count && echo mem > /sys/power/state; then
    ok=$((ok+1))
    echo \"GUEST cycle $ok: resumed online=$(cat /sys/devices/system/cpu/online)\"
  else
    echo \"GUEST attempt $attempt: aborted by a wake-up event before the suspend\"
  fi
done
after=$(md5sum < /tmp/marker)
if [ \"$before\" = \"$after\" ]; then echo \"GUEST marker intact\"; else echo \"GUEST marker changed\"; fi
echo \"GUEST suspend_stats success=$(cat /sys/power/suspend_stats/success) fail=$(cat /sys/power/suspend_stats/fail)\"
poweroff -f
"
    )
}

fn str_of<'a>(e: &'a Value, key: &str) -> &'a str {
    e[key].as_str().unwrap_or("")
}

fn t_ns(e: &Value) -> u64 {
    e["t_ns"].as_u64().unwrap_or(0)
}

/// One suspend/resume cycle as the event log shows it.
struct Cycle {
    caller: u64,
    suspend_ns: u64,
    wakeup_ns: Option<u64>,
    resume_ns: Option<u64>,
    sources: Vec<String>,
    /// From the RTC line's rise to the wakeup line.
    raised_ns_ago: u64,
    /// vCPUs that were not off (by their last power_state line) when the
    /// caller's on -> suspended_system line was written.
    not_off: Vec<u64>,
    /// Secondaries that came back on after the resume.
    back_on: Vec<u64>,
}

/// Walks the log keeping each vCPU's last logged state.
fn cycles(events: &[Value]) -> Vec<Cycle> {
    let mut state: HashMap<u64, String> = (0..u64::from(CPUS)).map(|v| (v, "off".into())).collect();
    state.insert(0, "on".into());
    let mut out: Vec<Cycle> = Vec::new();
    for e in events {
        let vcpu = e["vcpu"].as_u64().unwrap_or(u64::MAX);
        match str_of(e, "kind") {
            "power_state" => {
                let to = str_of(e, "to").to_owned();
                if to == "suspended_system" {
                    // The engine reports this transition when it commits
                    // SYSTEM_SUSPEND, after every other vCPU's CPU_OFF.
                    let mut not_off: Vec<u64> = state
                        .iter()
                        .filter(|(v, s)| **v != vcpu && s.as_str() != "off")
                        .map(|(v, _)| *v)
                        .collect();
                    not_off.sort_unstable();
                    out.push(Cycle {
                        caller: vcpu,
                        suspend_ns: t_ns(e),
                        wakeup_ns: None,
                        resume_ns: None,
                        sources: Vec::new(),
                        raised_ns_ago: 0,
                        not_off,
                        back_on: Vec::new(),
                    });
                } else if let Some(c) = out.last_mut() {
                    if c.caller == vcpu && str_of(e, "from") == "suspended_system" && to == "on" {
                        c.resume_ns = Some(t_ns(e));
                    }
                    if c.resume_ns.is_some() && vcpu != c.caller && to == "on" {
                        c.back_on.push(vcpu);
                    }
                }
                state.insert(vcpu, to);
            }
            "wakeup" => {
                if let Some(c) = out.last_mut().filter(|c| c.caller == vcpu) {
                    c.wakeup_ns = Some(t_ns(e));
                    c.sources = e["sources"]
                        .as_array()
                        .map(|a| a.iter().map(|s| str_of(s, "device").to_owned()).collect())
                        .unwrap_or_default();
                    c.raised_ns_ago = e["sources"][0]["raised_ns_ago"].as_u64().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    out
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn summary(name: &str, mut values: Vec<u64>) {
    values.sort_unstable();
    if let (Some(min), Some(max)) = (values.first(), values.last()) {
        let median = values[values.len() / 2];
        println!(
            "latency {name}: min {:.1} ms, median {:.1} ms, max {:.1} ms ({} cycles)",
            ms(*min),
            ms(median),
            ms(*max),
            values.len()
        );
    }
}

#[test]
#[ignore = "needs VPSCI_LINUX_IMAGE (an arm64 Linux Image, copied in with VPSCI_NESTED_FILES)"]
fn linux_suspends_to_ram_ten_times_and_the_rtc_alarm_wakes_it_with_every_cpu_back() {
    let ran = boot(LinuxGuest {
        cpus: CPUS,
        init: init_script(),
        // quiet: every console character is an MMIO exit, and a cycle's
        // suspend and resume messages would slow the suspend path by
        // seconds on the nested machine.
        cmdline: "console=ttyAMA0 panic=-1 quiet".to_owned(),
        timeout: std::time::Duration::from_secs(280),
        ..LinuxGuest::default()
    });
    for line in ran
        .console
        .lines()
        .filter(|l| l.contains("GUEST") || l.contains("rtc-pl031") || l.contains("PM: suspend"))
    {
        println!("{line}");
    }
    println!("wall time: {:.1} s", ran.wall.as_secs_f64());
    if ran.outcome.status != vpsci::run::EXIT_POWERED_OFF {
        let lines: Vec<&str> = ran.console.lines().collect();
        println!("last console lines:");
        for line in &lines[lines.len().saturating_sub(40)..] {
            println!("  {line}");
        }
    }
    assert_eq!(
        ran.outcome.status,
        vpsci::run::EXIT_POWERED_OFF,
        "{}",
        ran.outcome.message
    );
    assert!(ran.console.contains("GUEST rtc: rtc-pl031"), "no PL031 RTC");
    for i in 1..=CYCLES {
        let want = format!("GUEST cycle {i}: resumed online=0-3");
        assert!(ran.console.contains(&want), "missing {want:?}");
    }
    assert!(
        ran.console.contains("GUEST marker intact"),
        "tmpfs file changed"
    );
    assert!(
        ran.console
            .contains(&format!("GUEST suspend_stats success={CYCLES} fail=")),
        "suspend_stats do not count {CYCLES} successes"
    );

    let aborted = ran.console.matches("aborted by a wake-up event").count();
    println!("attempts aborted by an alarm that came before the suspend: {aborted}");
    let refused: Vec<&Value> = ran
        .events
        .iter()
        .filter(|e| {
            str_of(e, "function").starts_with("SYSTEM_SUSPEND")
                && e["result"]["outcome"] != "suspend"
        })
        .collect();
    assert!(
        refused.is_empty(),
        "SYSTEM_SUSPEND not committed: {refused:?}"
    );
    let cycles = cycles(&ran.events);
    assert_eq!(cycles.len(), CYCLES, "SYSTEM_SUSPEND commits in the log");
    for (i, c) in cycles.iter().enumerate() {
        assert!(
            c.not_off.is_empty(),
            "cycle {i}: vCPUs {:?} not off at SYSTEM_SUSPEND",
            c.not_off
        );
        assert_eq!(c.sources, ["pl031"], "cycle {i}: wake-up sources");
        assert!(
            c.wakeup_ns.is_some() && c.resume_ns.is_some(),
            "cycle {i}: no wake-up/resume"
        );
        let mut back = c.back_on.clone();
        back.sort_unstable();
        back.dedup();
        let secondaries: Vec<u64> = (0..u64::from(CPUS)).filter(|&v| v != c.caller).collect();
        assert_eq!(back, secondaries, "cycle {i}: secondaries back on");
    }
    for (i, c) in cycles.iter().enumerate() {
        let (w, r) = (c.wakeup_ns.unwrap_or(0), c.resume_ns.unwrap_or(0));
        println!(
            "cycle {}: vCPU {} SYSTEM_SUSPEND at {:.1} ms; RTC interrupt +{:.1} ms; resumed at its entry {:.3} ms after the interrupt, {:.1} ms after the call",
            i + 1,
            c.caller,
            ms(c.suspend_ns),
            ms((w.saturating_sub(c.raised_ns_ago)).saturating_sub(c.suspend_ns)),
            ms(r.saturating_sub(w) + c.raised_ns_ago),
            ms(r.saturating_sub(c.suspend_ns)),
        );
    }
    if let Some(first) = cycles.first() {
        println!("event log of cycle 1, from the suspension to the resume:");
        for (line, e) in ran.lines.iter().zip(&ran.events) {
            let t = t_ns(e);
            if t >= first.suspend_ns && Some(t) <= first.resume_ns {
                println!("  {line}");
            }
        }
    }
    summary(
        "SYSTEM_SUSPEND -> resume at entry",
        cycles
            .iter()
            .map(|c| c.resume_ns.unwrap_or(0) - c.suspend_ns)
            .collect(),
    );
    summary(
        "RTC interrupt raised -> resume at entry",
        cycles
            .iter()
            .map(|c| c.resume_ns.unwrap_or(0) - c.wakeup_ns.unwrap_or(0) + c.raised_ns_ago)
            .collect(),
    );
}
