//! Scenario group `version-gating`: for the PSCI version the VMM was
//! configured with, PSCI_VERSION must match and PSCI_FEATURES must answer
//! NOT_SUPPORTED for every function introduced later (also checked by calling
//! harmless forms of those functions), must report the mandatory functions of
//! that version, and must agree with the functions' own answers for the
//! optional ones. Reports `version-gating-<major>.<minor>`.

#![no_std]
#![no_main]

use vguest::psci::{self, *};
use vguest::report::{check, CheckResult, Detail};
use vguest::{config, ensure, fail, println};
use vpsci_guest_scenarios::version_parts;

vguest::guest_main!("version-gating", main);

/// (function id, version that introduced it, mandatory from that version on)
const FUNCTIONS: [(u32, u32, bool); 28] = [
    (PSCI_VERSION, 0x2, true),
    (PSCI_CPU_SUSPEND_32, 0x2, true),
    (PSCI_CPU_SUSPEND_64, 0x2, true),
    (PSCI_CPU_OFF, 0x2, true),
    (PSCI_CPU_ON_32, 0x2, true),
    (PSCI_CPU_ON_64, 0x2, true),
    (PSCI_AFFINITY_INFO_32, 0x2, true),
    (PSCI_AFFINITY_INFO_64, 0x2, true),
    (PSCI_MIGRATE_32, 0x2, false),
    (PSCI_MIGRATE_64, 0x2, false),
    (PSCI_MIGRATE_INFO_TYPE, 0x2, false),
    (PSCI_SYSTEM_OFF, 0x2, true),
    (PSCI_SYSTEM_RESET, 0x2, true),
    (PSCI_FEATURES, 0x1_0000, true),
    (PSCI_CPU_FREEZE, 0x1_0000, false),
    (PSCI_CPU_DEFAULT_SUSPEND_64, 0x1_0000, false),
    (PSCI_NODE_HW_STATE_64, 0x1_0000, false),
    (PSCI_SYSTEM_SUSPEND_32, 0x1_0000, false),
    (PSCI_SYSTEM_SUSPEND_64, 0x1_0000, false),
    (PSCI_SET_SUSPEND_MODE, 0x1_0000, false),
    (PSCI_STAT_RESIDENCY_64, 0x1_0000, false),
    (PSCI_STAT_COUNT_64, 0x1_0000, false),
    (PSCI_SYSTEM_RESET2_32, 0x1_0001, false),
    (PSCI_SYSTEM_RESET2_64, 0x1_0001, false),
    (PSCI_MEM_PROTECT, 0x1_0001, false),
    (PSCI_MEM_PROTECT_CHECK_RANGE_64, 0x1_0001, false),
    (PSCI_SYSTEM_OFF2_32, 0x1_0003, false),
    (PSCI_SYSTEM_OFF2_64, 0x1_0003, false),
];

fn main() {
    let configured = config::get().psci_version;
    let reported = psci::version();
    let version = if configured != 0 {
        configured
    } else {
        reported
    };
    let (major, minor) = version_parts(version);
    let mut name = Detail::new();
    let _ = core::fmt::Write::write_fmt(
        &mut name,
        format_args!("version-gating-{}.{}", major, minor),
    );
    check(name.as_str(), gating(version, reported));
}

/// A direct call that is harmless whether or not the function exists, and
/// the answer it gives when it does exist (None: no such probe).
fn probe(fid: u32) -> Option<(i32, i32)> {
    let bad_entry = 0xFFFF_FFFF_FFFF_F000;
    match fid {
        PSCI_SYSTEM_RESET2_64 => Some((psci::status(fid, 1, 0, 0), INVALID_PARAMETERS)),
        PSCI_SYSTEM_OFF2_64 => Some((psci::status(fid, 0x80, 1, 0), INVALID_PARAMETERS)),
        PSCI_SYSTEM_SUSPEND_64 => Some((psci::status(fid, bad_entry, 0, 0), INVALID_ADDRESS)),
        PSCI_FEATURES => Some((psci::features(PSCI_VERSION), SUCCESS)),
        _ => None,
    }
}

fn gating(version: u32, reported: u32) -> CheckResult {
    let (major, minor) = version_parts(reported);
    ensure!(reported == version, "PSCI_VERSION is {}.{}", major, minor);
    let mut unsupported_mask = 0u32;
    for (i, &(fid, since, mandatory)) in FUNCTIONS.iter().enumerate() {
        let answer = psci::features(fid);
        if answer == NOT_SUPPORTED {
            unsupported_mask |= 1 << i;
        }
        if since > version {
            ensure!(
                answer == NOT_SUPPORTED,
                "PSCI_FEATURES({:#x}) = {} but it arrived after this version",
                fid,
                answer
            );
            if let Some((got, _)) = probe(fid) {
                ensure!(
                    got == NOT_SUPPORTED,
                    "calling {:#x} (not in this version) gave {}",
                    fid,
                    status_name(got)
                );
            }
        } else if version >= 0x1_0000 {
            ensure!(
                !mandatory || answer >= 0,
                "PSCI_FEATURES({:#x}) = {} for a mandatory function",
                fid,
                answer
            );
            if let Some((got, when_present)) = probe(fid) {
                let expected = if answer >= 0 {
                    when_present
                } else {
                    NOT_SUPPORTED
                };
                ensure!(
                    got == expected,
                    "PSCI_FEATURES({:#x}) = {} but a call gave {} (expected {})",
                    fid,
                    answer,
                    status_name(got),
                    status_name(expected)
                );
            }
        } else if fid == PSCI_FEATURES {
            return fail!("unreachable: PSCI_FEATURES arrived in 1.0");
        }
    }
    println!(
        "VG-INFO version-gating NOT_SUPPORTED mask {:#010x} over the function table",
        unsupported_mask
    );
    Ok(())
}
