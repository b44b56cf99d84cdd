//! The whole-VM snapshot reader (`vpsci::snapshot::open_parts`, the checks `vpsci restore`
//! runs before it creates anything): a snapshot directory arrives from another host, so any
//! manifest and section bytes must be refused with one line or accepted, never panic.
//!
//! Input: five parts, each a little-endian u32 length then its bytes, in the order
//! manifest.json, vm.json, firmware.bin, devices.json, memory.bin (missing parts are absent
//! files).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpsci::snapshot::{self, SectionName};

const FILES: [&str; 5] = [
    "manifest.json",
    "vm.json",
    "firmware.bin",
    "devices.json",
    "memory.bin",
];

fuzz_target!(|data: &[u8]| {
    let mut parts: Vec<(&str, &[u8])> = Vec::new();
    let mut rest = data;
    for name in FILES {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
        let (part, tail) = tail.split_at(len);
        parts.push((name, part));
        rest = tail;
    }
    match snapshot::open_parts(&parts) {
        Err(e) => {
            let line = e.to_string();
            assert!(!line.is_empty() && !line.contains('\n'), "not one line: {line:?}");
        }
        Ok(snap) => {
            // Accepted: the parts agree with each other.
            assert_eq!(snap.vm.vcpus.len(), snap.layout.cpus() as usize);
            let memory = parts
                .iter()
                .find(|(n, _)| *n == SectionName::Memory.file())
                .map_or(0, |(_, b)| b.len() as u64);
            assert_eq!(memory, snap.layout.ram_size());
        }
    }
});
