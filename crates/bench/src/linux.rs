//! The Linux guest's side of the Linux workloads: its initramfs (busybox and
//! an `/init` script per workload) and the marker lines the script prints,
//! which the host times as they arrive on the console.
//!
//! Markers (each on a line of its own):
//! - `BENCH-INIT`: init runs (the end of boot); then `BENCH-UPTIME <s>` (the
//!   kernel's own clock: boot time as the guest saw it) and `BENCH-ONLINE <list>`;
//! - `BENCH-HOTPLUG-START` / `BENCH-HOTPLUG-END ok=<n> online=<list>`;
//! - `BENCH-IDLE-START`, then after the idle sleep
//!   `BENCH-IDLE-END state0=<n> state1=<n> psci_state=yes|no` (cpuidle usage
//!   summed over every CPU; `psci_state` says whether a PSCI idle state exists),
//!   then the kernel's PSCI and cpuidle messages, each line prefixed `BENCH-LOG `.

/// Kernel command line: no boot messages (each console character is an
/// emulated MMIO exit, which would drown what is measured).
pub const CMDLINE: &str = "console=ttyAMA0 panic=-1 quiet";

/// Marker: init runs.
pub const INIT: &str = "BENCH-INIT";
/// Marker prefix: the guest's own uptime (s) just after init started.
pub const UPTIME: &str = "BENCH-UPTIME ";
/// Marker prefix: the online CPU list after boot.
pub const ONLINE: &str = "BENCH-ONLINE ";
/// Marker: hotplug cycles start.
pub const HOTPLUG_START: &str = "BENCH-HOTPLUG-START";
/// Marker prefix: hotplug cycles ended.
pub const HOTPLUG_END: &str = "BENCH-HOTPLUG-END ";
/// Marker: the guest is about to sit idle.
pub const IDLE_START: &str = "BENCH-IDLE-START";
/// Marker prefix: the idle sleep ended.
pub const IDLE_END: &str = "BENCH-IDLE-END ";
/// Prefix of the kernel's PSCI and cpuidle messages, printed after the idle window.
pub const LOG: &str = "BENCH-LOG ";

const PREAMBLE: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
export PATH=/bin
/bin/busybox --install -s /bin
";

/// `/init` for the boot workload: print the marker at once, then the online CPUs.
pub fn boot_script() -> String {
    // The marker comes before mounting anything: init's first act.
    format!(
        "#!/bin/busybox sh\n/bin/busybox echo {INIT}\n{}\
         echo \"{UPTIME}$(cut -d ' ' -f 1 /proc/uptime)\"\n\
         echo \"{ONLINE}$(cat /sys/devices/system/cpu/online)\"\npoweroff -f\n",
        PREAMBLE.trim_start_matches("#!/bin/busybox sh\n")
    )
}

/// `/init` for the hotplug workload: `cycles` times CPU 1 offline and online.
pub fn hotplug_script(cycles: u32) -> String {
    format!(
        "{PREAMBLE}echo {HOTPLUG_START}
n=0; ok=0
while [ $n -lt {cycles} ]; do
  if echo 0 > /sys/devices/system/cpu/cpu1/online && echo 1 > /sys/devices/system/cpu/cpu1/online; then ok=$((ok+1)); fi
  n=$((n+1))
done
echo \"{HOTPLUG_END}ok=$ok online=$(cat /sys/devices/system/cpu/online)\"
poweroff -f
"
    )
}

/// `/init` for the idle workload: sleep `sleep_s` seconds, then report the
/// cpuidle usage.
pub fn idle_script(sleep_s: u32) -> String {
    format!(
        "{PREAMBLE}echo {IDLE_START}
sleep {sleep_s}
s0=0; s1=0; psci=no
for c in /sys/devices/system/cpu/cpu[0-9]*; do
  if [ -r $c/cpuidle/state0/usage ]; then s0=$((s0 + $(cat $c/cpuidle/state0/usage))); fi
  if [ -r $c/cpuidle/state1/usage ]; then psci=yes; s1=$((s1 + $(cat $c/cpuidle/state1/usage))); fi
done
echo \"{IDLE_END}state0=$s0 state1=$s1 psci_state=$psci\"
dmesg | grep -i -E 'psci|idle' | sed 's/^/{LOG}/'
poweroff -f
"
    )
}

/// A `newc` cpio archive (what Linux unpacks as an initramfs) of
/// `(path, mode, contents)` entries.
pub fn cpio(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer: (&str, u32, &[u8]) = ("TRAILER!!!", 0, &[]);
    for (ino, (name, mode, data)) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let fields = [
            ino as u32 + 1,
            *mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for field in fields {
            out.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    out
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// An initramfs with busybox at `/bin/busybox` and `init` as `/init`.
pub fn initramfs(busybox: &[u8], init: &str) -> Vec<u8> {
    cpio(&[
        ("bin", 0o040755, &[]),
        ("proc", 0o040755, &[]),
        ("sys", 0o040755, &[]),
        ("dev", 0o040755, &[]),
        ("bin/busybox", 0o100755, busybox),
        ("init", 0o100755, init.as_bytes()),
    ])
}

/// What follows `marker` on a console line, if the line has it. The kernel
/// may print on the same line (its console writes do not wait for the tty's
/// newline, e.g. `reboot: Power down` right after the last marker), so the
/// marker is searched anywhere.
pub fn after_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|at| &line[at + marker.len()..])
}

/// The value of a `key=value` field of a marker line's rest, up to the
/// first character no value of ours has (the start of a kernel message).
pub fn field<'a>(rest: &'a str, key: &str) -> Option<&'a str> {
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map(value_prefix)
}

/// The leading run of characters a value may have: ASCII letters, digits,
/// `-` and `,` (numbers, `yes`/`no`, CPU lists).
pub fn value_prefix(text: &str) -> &str {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == ','))
        .unwrap_or(text.len());
    &text[..end]
}

/// The CPU list Linux prints for CPUs `0..cpus` (`0`, `0-7`).
pub fn all_online(cpus: u32) -> String {
    if cpus <= 1 {
        "0".to_owned()
    } else {
        format!("0-{}", cpus - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_four_byte_aligned() {
        let archive = cpio(&[("init", 0o100755, b"hi")]);
        assert!(archive.starts_with(b"070701"));
        assert_eq!(archive.len() % 4, 0);
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
        // Second field: the mode, in hex.
        assert_eq!(&archive[14..22], b"000081ED");
    }

    #[test]
    fn scripts_print_their_markers_and_power_off() {
        let boot = boot_script();
        assert!(boot.starts_with("#!/bin/busybox sh\n/bin/busybox echo BENCH-INIT\n"));
        assert!(boot.contains("BENCH-ONLINE ") && boot.contains("BENCH-UPTIME "));
        let hotplug = hotplug_script(100);
        assert!(hotplug.contains("-lt 100"));
        assert!(hotplug.contains(HOTPLUG_START) && hotplug.contains(HOTPLUG_END));
        let idle = idle_script(13);
        assert!(idle.contains("sleep 13"));
        for script in [boot, hotplug, idle] {
            assert!(script.trim_end().ends_with("poweroff -f"));
        }
    }

    #[test]
    fn marker_fields_and_cpu_lists_parse() {
        let rest = "ok=100 online=0-1";
        assert_eq!(field(rest, "ok"), Some("100"));
        assert_eq!(field(rest, "online"), Some("0-1"));
        assert_eq!(field(rest, "o"), None);
        // A kernel message glued to the line does not become part of a value.
        let glued = "BENCH-HOTPLUG-END ok=100 online=0-1[   24.7] reboot: Power down";
        let rest = after_marker(glued, HOTPLUG_END).unwrap();
        assert_eq!(field(rest, "online"), Some("0-1"));
        assert_eq!(value_prefix(" 0-7[   24.726057] reboot"), "0-7");
        assert_eq!(
            after_marker("[ 1.0] msgBENCH-ONLINE 0-3", ONLINE),
            Some("0-3")
        );
        assert_eq!(after_marker("nothing here", INIT), None);
        assert_eq!(all_online(1), "0");
        assert_eq!(all_online(64), "0-63");
    }
}
