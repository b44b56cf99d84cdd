//! The image loader reads the operator's kernel file (ELF, Linux Image or raw): any bytes
//! must load inside RAM below the device tree or be refused with a typed error, never panic
//! or write outside guest memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vpsci::layout::GuestLayout;

/// 64 MiB of guest RAM, made once (mapping it per input would dominate the run).
fn guest() -> &'static (GuestLayout, GuestMemoryMmap) {
    static GUEST: OnceLock<(GuestLayout, GuestMemoryMmap)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let layout = GuestLayout::new(1, 64 << 20).expect("a valid layout");
        let mem = layout.create_memory().expect("guest memory");
        (layout, mem)
    })
}

fuzz_target!(|data: &[u8]| {
    let (layout, mem) = guest();
    if let Ok(image) = vpsci::loader::load_image_bytes(mem, layout, data) {
        let text = format!("{image:?}");
        assert!(!text.is_empty());
    }
});
