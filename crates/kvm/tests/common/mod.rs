//! Pieces shared by the KVM backend's nested tests: a few A64 instruction
//! encodings for hand-written guests, guest RAM as an anonymous mapping, and
//! a VM with the standard vGICv3 layout and that RAM mapped.
// Each test binary uses its own subset.
#![allow(dead_code)]

use vpsci_kvm::{KvmHost, KvmVcpu, KvmVm, SmcccRouting, VgicLayout, VmSpec};

/// Guest physical address of RAM.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Bytes of guest RAM.
pub const RAM_SIZE: usize = 2 << 20;
/// Where guests' code is placed, from the start of RAM.
pub const ENTRY_OFFSET: usize = 0x8_0000;
/// The guests' entry point.
pub const ENTRY: u64 = RAM_BASE + ENTRY_OFFSET as u64;
/// The first redistributor frame.
pub const REDIST_BASE: u64 = 0x080A_0000;
/// `hvc #0`.
pub const HVC: u32 = 0xD400_0002;
/// `smc #0`.
pub const SMC: u32 = 0xD400_0003;

// A64 encodings (Arm ARM C6).

/// `movz xd, #imm, lsl #(16 * hw)`.
pub fn movz(rd: u32, imm: u16, hw: u32) -> u32 {
    0xD280_0000 | (hw << 21) | (u32::from(imm) << 5) | rd
}
/// `movk xd, #imm, lsl #(16 * hw)`.
pub fn movk(rd: u32, imm: u16, hw: u32) -> u32 {
    0xF280_0000 | (hw << 21) | (u32::from(imm) << 5) | rd
}
/// A 32-bit constant into `xd`.
pub fn mov32(rd: u32, v: u32) -> [u32; 2] {
    [movz(rd, v as u16, 0), movk(rd, (v >> 16) as u16, 1)]
}
/// `mov xd, xm`.
pub fn mov_reg(rd: u32, rm: u32) -> u32 {
    0xAA00_03E0 | (rm << 16) | rd
}
/// `lsl xd, xn, #shift` (UBFM).
pub fn lsl(rd: u32, rn: u32, shift: u32) -> u32 {
    0xD340_0000 | (((64 - shift) % 64) << 16) | ((63 - shift) << 10) | (rn << 5) | rd
}
/// `add xd, xn, xm`.
pub fn add(rd: u32, rn: u32, rm: u32) -> u32 {
    0x8B00_0000 | (rm << 16) | (rn << 5) | rd
}
/// `sub xd, xn, xm`.
pub fn sub(rd: u32, rn: u32, rm: u32) -> u32 {
    0xCB00_0000 | (rm << 16) | (rn << 5) | rd
}
/// `add xd, xn, #imm`.
pub fn add_imm(rd: u32, rn: u32, imm: u32) -> u32 {
    0x9100_0000 | (imm << 10) | (rn << 5) | rd
}
/// `lsl xd, xn, xm` (LSLV).
pub fn lslv(rd: u32, rn: u32, rm: u32) -> u32 {
    0x9AC0_2000 | (rm << 16) | (rn << 5) | rd
}
/// `str wt, [xn]`.
pub fn str_w(rt: u32, rn: u32) -> u32 {
    0xB900_0000 | (rn << 5) | rt
}
/// `str xt, [xn, #off]`.
pub fn str_x(rt: u32, rn: u32, off: u32) -> u32 {
    0xF900_0000 | ((off / 8) << 10) | (rn << 5) | rt
}

/// The value of a result, or the test fails with its error.
pub fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Guest RAM: an anonymous mapping of [`RAM_SIZE`] bytes, leaked for the
/// test's life (a VM may still have it mapped).
pub struct Memory(pub *mut u8);
// SAFETY: the mapping is plain memory shared with the guest; the tests only
// read words the guest writes with aligned 64-bit stores.
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Memory {
    /// Fresh zeroed RAM.
    pub fn new() -> Memory {
        // SAFETY: anonymous private mapping, checked below, never unmapped.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        Memory(mem.cast())
    }
    /// Fresh RAM with `code` at [`ENTRY_OFFSET`].
    pub fn with_code(code: &[u32]) -> Memory {
        let mem = Memory::new();
        for (i, word) in code.iter().enumerate() {
            let offset = ENTRY_OFFSET + 4 * i;
            assert!(offset + 4 <= RAM_SIZE);
            // SAFETY: in bounds (checked); no vCPU of this memory runs yet.
            unsafe { (mem.0.add(offset) as *mut u32).write_unaligned(*word) };
        }
        mem
    }
    /// The 64-bit word at `offset` from the start of RAM.
    pub fn word(&self, offset: u64) -> u64 {
        assert!(offset as usize + 8 <= RAM_SIZE);
        // SAFETY: in bounds (checked), aligned, the mapping is never unmapped.
        unsafe { std::ptr::read_volatile(self.0.add(offset as usize) as *const u64) }
    }
    /// Writes the 64-bit word at `offset` (before any vCPU runs).
    pub fn set_word(&self, offset: u64, value: u64) {
        assert!(offset as usize + 8 <= RAM_SIZE);
        // SAFETY: as in `word`.
        unsafe { std::ptr::write_volatile(self.0.add(offset as usize) as *mut u64, value) }
    }
    /// All of RAM.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is RAM_SIZE bytes and lives as long as the test.
        unsafe { std::slice::from_raw_parts(self.0, RAM_SIZE) }
    }
    /// Overwrites all of RAM with `bytes`.
    pub fn copy_from(&self, bytes: &[u8]) {
        assert_eq!(bytes.len(), RAM_SIZE);
        // SAFETY: both ranges are RAM_SIZE bytes and distinct mappings.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0, RAM_SIZE) }
    }
}

/// A VM of `cpus` vCPUs with the usual vGICv3 layout, `mem` mapped at
/// [`RAM_BASE`], and its vCPUs (index order; all but vCPU 0 stopped).
pub fn new_vm(cpus: usize, routing: SmcccRouting, mem: &Memory) -> (KvmVm, Vec<KvmVcpu>) {
    let host = ok(KvmHost::open());
    let spec = VmSpec {
        vcpus: cpus,
        routing,
        vgic: VgicLayout {
            distributor: 0x0800_0000,
            redistributor_regions: vec![(REDIST_BASE, cpus as u32)],
        },
    };
    let mut vm = ok(host.create_vm(&spec));
    // SAFETY: the mapping is never unmapped.
    ok(unsafe { vm.map_memory(RAM_BASE, mem.0, RAM_SIZE as u64) });
    let vcpus = vm.take_vcpus();
    (vm, vcpus)
}
