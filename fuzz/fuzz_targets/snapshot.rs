//! The firmware snapshot reader: a snapshot arrives from another host (migration), so any
//! bytes must be refused with a typed error or accepted, never panic; a refused restore
//! changes nothing, and an accepted one round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpsci_firmware::testing;
use vpsci_firmware::Firmware;

fuzz_target!(|data: &[u8]| {
    let config = Firmware::snapshot_config(data);
    let cpus = u32::from(data.first().copied().unwrap_or(0) % 8) + 1;
    let Ok((fw, _platform)) = testing::firmware(config.unwrap_or_default(), cpus) else {
        return;
    };
    let before = fw.snapshot();
    match fw.restore(data) {
        Err(_) => assert_eq!(fw.snapshot(), before, "a refused restore changed state"),
        Ok(()) => {
            let again = fw.snapshot();
            assert_eq!(fw.restore(&again), Ok(()), "a restored state does not restore");
            assert_eq!(fw.snapshot(), again, "snapshot/restore does not round-trip");
            assert!(
                Firmware::snapshot_config(&again).is_ok(),
                "a fresh snapshot's configuration is unreadable"
            );
        }
    }
});
