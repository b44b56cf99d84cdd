//! Scenario group `system-event`: SYSTEM_OFF2 and SYSTEM_RESET2 argument
//! checks, then at most one call that ends the VM, chosen by the run's
//! `action` (0: SYSTEM_OFF, 1: SYSTEM_OFF2 hibernate, 2: SYSTEM_RESET2 warm,
//! 3: SYSTEM_RESET2 vendor, 4: SYSTEM_OFF2 hibernate that the VMM is set to
//! refuse). The host judges a terminal call from the VMM's side (event log /
//! exit status); the guest announces it with `VG-CALL` and reports
//! `VG-RETURNED` if the call comes back. Action 4 expects the call to come
//! back with INTERNAL_FAILURE (what a VMM that lets the caller continue
//! hands back), reports that as a check and then ends with SYSTEM_OFF, which the host
//! also checks in the event log.

#![no_std]
#![no_main]

use vguest::psci::{self, *};
use vguest::report::run;
use vguest::{config, ensure, println};
use vpsci_guest_scenarios::effective_version;

vguest::guest_main!("system-event", main);

/// Cookie passed with SYSTEM_RESET2 warm reset (the host looks for it).
const WARM_COOKIE: u64 = 0x1234_5678_9abc_def0;
/// Vendor reset type (bit 31 set) and cookie (the host looks for both).
const VENDOR_TYPE: u64 = 0x8000_0001;
const VENDOR_COOKIE: u64 = 0xC0FF_EE00_0000_0042;

fn main() {
    let version = effective_version();
    match config::get().action {
        0 => {
            checks(version);
            println!("VG-CALL system-off");
            psci::call(PSCI_SYSTEM_OFF, 0, 0, 0);
            println!("VG-RETURNED system-off");
        }
        1 if version < 0x1_0003 => {
            println!("VG-CHECK system-off2-hibernate SKIP SYSTEM_OFF2 needs PSCI 1.3")
        }
        1 => terminal(
            "system-off2-hibernate",
            PSCI_SYSTEM_OFF2_64,
            HIBERNATE_OFF,
            0,
        ),
        4 if version < 0x1_0003 => {
            println!("VG-CHECK {} SKIP SYSTEM_OFF2 needs PSCI 1.3", REFUSED)
        }
        4 if psci::features(PSCI_SYSTEM_OFF2_64) < 0 => {
            println!(
                "VG-CHECK {} SKIP SYSTEM_OFF2 (optional) is not implemented",
                REFUSED
            )
        }
        4 => refused_hibernate(),
        2 | 3 if version < 0x1_0001 => {
            let name = if config::get().action == 2 {
                "system-reset2-warm"
            } else {
                "system-reset2-vendor"
            };
            println!("VG-CHECK {} SKIP SYSTEM_RESET2 needs PSCI 1.1", name);
        }
        2 | 3 if psci::features(PSCI_SYSTEM_RESET2_64) < 0 => {
            let name = if config::get().action == 2 {
                "system-reset2-warm"
            } else {
                "system-reset2-vendor"
            };
            println!(
                "VG-CHECK {} SKIP SYSTEM_RESET2 (optional) is not implemented",
                name
            );
        }
        2 => terminal("system-reset2-warm", PSCI_SYSTEM_RESET2_64, 0, WARM_COOKIE),
        3 => terminal(
            "system-reset2-vendor",
            PSCI_SYSTEM_RESET2_64,
            VENDOR_TYPE,
            VENDOR_COOKIE,
        ),
        other => println!("VG-FATAL unknown action {}", other),
    }
}

/// Scenario of action 4.
const REFUSED: &str = "system-off2-refused-internal-failure";

/// SYSTEM_OFF2(HIBERNATE_OFF, cookie 0) on a VMM told to refuse it: the call
/// must return INTERNAL_FAILURE; the runtime then powers off with SYSTEM_OFF.
fn refused_hibernate() {
    println!("VG-CALL {}", REFUSED);
    let r = psci::status(PSCI_SYSTEM_OFF2_64, HIBERNATE_OFF, 0, 0);
    run(REFUSED, || {
        ensure!(
            r == INTERNAL_FAILURE,
            "SYSTEM_OFF2(HIBERNATE_OFF, cookie 0) returned {} ({}), expected INTERNAL_FAILURE",
            status_name(r),
            r
        );
        Ok(())
    });
}

fn terminal(name: &str, fid: u32, a1: u64, a2: u64) {
    println!("VG-CALL {}", name);
    let r = psci::status(fid, a1, a2, 0);
    println!("VG-RETURNED {} {}", name, r);
}

fn checks(version: u32) {
    if version >= 0x1_0003 {
        run("system-off2-features", || {
            let a = psci::features(PSCI_SYSTEM_OFF2_32);
            let b = psci::features(PSCI_SYSTEM_OFF2_64);
            ensure!(a >= 0 && a & 1 != 0 && b >= 0 && b & 1 != 0, "PSCI_FEATURES(SYSTEM_OFF2) = {:#x} (32-bit), {:#x} (64-bit); HIBERNATE_OFF bit expected", a, b);
            Ok(())
        });
        if psci::features(PSCI_SYSTEM_OFF2_64) < 0 {
            println!("VG-CHECK system-off2-nonzero-cookie SKIP SYSTEM_OFF2 (optional) is not implemented");
        } else {
            run("system-off2-nonzero-cookie", || {
                let r = psci::status(PSCI_SYSTEM_OFF2_64, HIBERNATE_OFF, 1, 0);
                ensure!(
                    r == INVALID_PARAMETERS,
                    "SYSTEM_OFF2(HIBERNATE_OFF, cookie 1) = {}",
                    status_name(r)
                );
                Ok(())
            });
        }
    } else {
        println!("VG-CHECK system-off2-features SKIP SYSTEM_OFF2 needs PSCI 1.3");
        println!("VG-CHECK system-off2-nonzero-cookie SKIP SYSTEM_OFF2 needs PSCI 1.3");
    }
    if version >= 0x1_0001 {
        run("system-reset2-features", || {
            let a = psci::features(PSCI_SYSTEM_RESET2_32);
            let b = psci::features(PSCI_SYSTEM_RESET2_64);
            ensure!(
                a >= 0 && b >= 0,
                "PSCI_FEATURES(SYSTEM_RESET2) = {} (32-bit), {} (64-bit)",
                a,
                b
            );
            Ok(())
        });
        if psci::features(PSCI_SYSTEM_RESET2_64) < 0 {
            println!("VG-CHECK system-reset2-invalid-type SKIP SYSTEM_RESET2 (optional) is not implemented");
            return;
        }
        run("system-reset2-invalid-type", || {
            let r = psci::status(PSCI_SYSTEM_RESET2_64, 1, 0, 0);
            ensure!(
                r == INVALID_PARAMETERS,
                "SYSTEM_RESET2(type 1) = {}",
                status_name(r)
            );
            Ok(())
        });
    } else {
        println!("VG-CHECK system-reset2-features SKIP SYSTEM_RESET2 needs PSCI 1.1");
        println!("VG-CHECK system-reset2-invalid-type SKIP SYSTEM_RESET2 needs PSCI 1.1");
    }
}
