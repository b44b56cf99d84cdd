//! The event log reader (`vpsci timeline`, `cargo xtask demo`) reads files a VM run wrote,
//! possibly truncated or edited: any bytes must give a timeline or a typed error, never a
//! panic, and a timeline it accepts must render.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(timeline) = vpsci::timeline::parse(data) {
        let _ = format!("{timeline:?}");
    }
});
