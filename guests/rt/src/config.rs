//! The per-run parameter block. `cargo xtask conformance` finds it in the flat
//! image by its magic and overwrites the fields before each run, so one image
//! serves every parameter set on any VMM without a command line.

/// Magic that starts the block (8 bytes) followed by a layout version (u32).
pub const MAGIC: [u8; 8] = *b"VPSCICF1";

/// Run parameters (layout shared with `xtask/src/conformance.rs`: magic, then
/// little-endian u32 fields in this order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    magic: [u8; 8],
    /// PSCI version the VMM was configured with, encoded (major << 16 | minor); 0 = not known.
    pub psci_version: u32,
    /// Conduit the VMM was configured with: 0 = not known, 1 = HVC, 2 = SMC.
    pub conduit: u32,
    /// Repetitions for repeated scenarios (0 = program default).
    pub iterations: u32,
    /// Program-specific selector (e.g. which system event to raise).
    pub action: u32,
    /// Bit 0: long mode.
    pub flags: u32,
}

#[no_mangle]
#[used]
#[link_section = ".data.vpsci_config"]
static VPSCI_CONFIG: Config = Config {
    magic: MAGIC,
    psci_version: 0,
    conduit: 0,
    iterations: 0,
    action: 0,
    flags: 0,
};

/// The block as the host left it in memory.
pub fn get() -> Config {
    // SAFETY: a volatile read stops the compiler from folding the initial
    // values; the host patches the bytes in the image before boot.
    unsafe { core::ptr::read_volatile(&raw const VPSCI_CONFIG) }
}
