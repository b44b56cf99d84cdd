//! The firmware snapshot reader: a snapshot arrives from another host (migration), so any
//! bytes must be refused with a typed error or accepted, never panic; a refused restore
//! changes nothing, and an accepted one round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpsci_firmware::testing;
use vpsci_firmware::Firmware;

fuzz_target!(|data: &[u8]| {
    let config = Firmware::snapshot_config(data).unwrap_or_default();
    // The snapshot's topology is not known before it is read: try the small ones.
    for cpus in 1..=4 {
        if let Ok((fw, _platform)) = testing::firmware(config.clone(), cpus) {
            check(&fw, data);
        }
    }
});

fn check(fw: &Firmware, data: &[u8]) {
    let before = fw.snapshot();
    match fw.restore(data) {
        Err(_) => assert_eq!(fw.snapshot(), before, "a refused restore changed state"),
        Ok(()) => {
            let again = fw.snapshot();
            assert_eq!(
                fw.restore(&again),
                Ok(()),
                "a restored state does not restore"
            );
            assert_eq!(fw.snapshot(), again, "snapshot/restore does not round-trip");
            assert!(
                Firmware::snapshot_config(&again).is_ok(),
                "a fresh snapshot's configuration is unreadable"
            );
        }
    }
}
