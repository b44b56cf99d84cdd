//! `vguest`: a minimal bare-metal runtime for vpsci's conformance guests
//! (aarch64, EL1, MMU off).
//!
//! It provides the image header and entry points (boot CPU, CPU_ON target,
//! resume after powerdown or system suspend) with per-CPU stacks, PL011
//! output, fatal exception vectors, PSCI/SMCCC calls over HVC or SMC (the
//! device tree's `psci` node decides), the generic timer, a minimal GICv3 and
//! the line protocol the host parses. A program supplies `guest_main` with
//! [`guest_main!`]; when it returns the runtime prints `VG-DONE` and calls
//! SYSTEM_OFF.
//!
//! Shared data lives in device memory (the MMU is off), so cross-CPU state
//! must use atomics; exclusives on such memory work on QEMU TCG and on KVM
//! nested in it, which is where this suite runs.

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

pub mod config;
pub mod cpu;
pub mod entry;
pub mod gic;
pub mod psci;
pub mod report;
pub mod timer;
pub mod uart;

use core::sync::atomic::{AtomicBool, Ordering};

/// Most redistributor regions the runtime records.
pub const MAX_GICR_REGIONS: usize = 4;

/// Facts about the machine, from the device tree.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// GIC distributor base (0 if the tree has no GICv3).
    pub gicd: usize,
    /// Redistributor regions (base, size).
    pub gicr: [(usize, usize); MAX_GICR_REGIONS],
    /// Valid entries in `gicr`.
    pub gicr_count: usize,
    /// First RAM region (base, size).
    pub ram: (u64, u64),
    /// Conduit named by `/psci/method`.
    pub conduit: psci::Conduit,
    /// `/psci` lists "arm,psci-1.0".
    pub psci_1_0_compatible: bool,
    /// Where the device tree blob lies (address, total size), so RAM checks leave it alone.
    pub dtb: (u64, u64),
}

struct PlatformCell(core::cell::UnsafeCell<Platform>);

// SAFETY: written once by the boot CPU before any other CPU runs, read-only after.
unsafe impl Sync for PlatformCell {}

static PLATFORM: PlatformCell = PlatformCell(core::cell::UnsafeCell::new(Platform {
    gicd: 0,
    gicr: [(0, 0); MAX_GICR_REGIONS],
    gicr_count: 0,
    ram: (0x4000_0000, 0),
    conduit: psci::Conduit::Hvc,
    psci_1_0_compatible: false,
    dtb: (0, 0),
}));
static PLATFORM_READY: AtomicBool = AtomicBool::new(false);

/// The platform description (valid once the boot CPU parsed the device tree,
/// before any program code runs).
pub fn platform() -> &'static Platform {
    // SAFETY: PLATFORM is written only by the boot CPU before PLATFORM_READY is
    // set and before any other CPU is started; afterwards it is only read.
    unsafe { &*PLATFORM.0.get() }
}

extern "C" {
    /// End of the image, its bss and its stacks (`link.ld`).
    static __image_end: u8;
}

/// The first address after the image, its bss and every CPU's stack: RAM above it (but
/// the device tree) belongs to the program.
pub fn image_end() -> u64 {
    // Only the address of the linker symbol is taken, never its contents.
    &raw const __image_end as u64
}

const FDT_MAGIC: u32 = 0xd00d_feed;

fn looks_like_fdt(addr: usize) -> bool {
    if addr == 0 || !addr.is_multiple_of(8) {
        return false;
    }
    // SAFETY: the address is either x0 from the loader or the start of RAM; a
    // 4-byte aligned read there is harmless.
    let magic = unsafe { core::ptr::read_volatile(addr as *const u32) };
    u32::from_be(magic) == FDT_MAGIC
}

fn parse_device_tree(dtb: usize) -> Result<(), &'static str> {
    // QEMU passes no x0 for some image kinds but places the tree at RAM start.
    let addr = if looks_like_fdt(dtb) {
        dtb
    } else if looks_like_fdt(0x4000_0000) {
        0x4000_0000
    } else {
        return Err("no device tree in x0 or at RAM start");
    };
    // SAFETY: the magic matched; the loader placed a whole blob there and the
    // guest never writes to it.
    let fdt = unsafe { fdt::Fdt::from_ptr(addr as *const u8) }.map_err(|_| "bad device tree")?;
    if fdt.find_node("/cpus").is_none() || fdt.find_node("/memory").is_none() {
        return Err("device tree lacks /cpus or /memory");
    }
    let mut mpidrs = [0u64; cpu::MAX_CPUS];
    let mut n = 0;
    for c in fdt.cpus() {
        if n < cpu::MAX_CPUS {
            mpidrs[n] = c.ids().first() as u64;
            n += 1;
        }
    }
    if n == 0 {
        return Err("device tree lists no CPUs");
    }
    cpu::set_topology(&mpidrs[..n]);
    let mut p = *platform();
    p.dtb = (addr as u64, fdt.total_size() as u64);
    if let Some(node) = fdt.find_node("/psci") {
        p.conduit = match node.property("method").and_then(|m| m.as_str()) {
            Some("smc") => psci::Conduit::Smc,
            _ => psci::Conduit::Hvc,
        };
        p.psci_1_0_compatible = node
            .compatible()
            .map(|c| c.all().any(|s| s == "arm,psci-1.0"))
            .unwrap_or(false);
    } else {
        return Err("device tree has no /psci node");
    }
    if let Some(gic) = fdt.find_compatible(&["arm,gic-v3"]) {
        if let Some(mut regs) = gic.reg() {
            if let Some(d) = regs.next() {
                p.gicd = d.starting_address as usize;
            }
            let wanted = gic
                .property("#redistributor-regions")
                .and_then(|r| r.as_usize())
                .unwrap_or(1);
            for r in regs.take(wanted.min(MAX_GICR_REGIONS)) {
                p.gicr[p.gicr_count] = (r.starting_address as usize, r.size.unwrap_or(0));
                p.gicr_count += 1;
            }
        }
    }
    if let Some(region) = fdt.memory().regions().next() {
        p.ram = (
            region.starting_address as u64,
            region.size.unwrap_or(0) as u64,
        );
    }
    // SAFETY: only the boot CPU runs now (no CPU_ON has been made yet).
    unsafe { *PLATFORM.0.get() = p };
    psci::set_conduit(p.conduit);
    PLATFORM_READY.store(true, Ordering::Release);
    Ok(())
}

extern "Rust" {
    fn vg_guest_main();
    static VG_PROGRAM_NAME: &'static str;
}

/// Declares the program's main function and name.
#[macro_export]
macro_rules! guest_main {
    ($name:literal, $main:path) => {
        #[no_mangle]
        fn vg_guest_main() {
            $main()
        }
        #[no_mangle]
        static VG_PROGRAM_NAME: &str = $name;
    };
}

/// Ends the run: prints `VG-DONE` and powers the VM off.
pub fn finish() -> ! {
    println!("VG-DONE");
    psci::system_off()
}

#[no_mangle]
extern "C" fn vg_rust_primary(dtb: usize) -> ! {
    // SAFETY: defined by the program through `guest_main!`.
    let name = unsafe { VG_PROGRAM_NAME };
    if let Err(e) = parse_device_tree(dtb) {
        println!("VG-START {}", name);
        println!("VG-FATAL {} (x0={:#x})", e, dtb);
        // Guess HVC: the best a guest without a device tree can do.
        psci::system_off();
    }
    println!("VG-START {}", name);
    // SAFETY: defined by the program through `guest_main!`.
    unsafe { vg_guest_main() };
    finish()
}

#[no_mangle]
extern "C" fn vg_rust_exception(kind: u64, esr: u64, elr: u64, far: u64) -> ! {
    println!(
        "VG-FATAL exception kind={} esr={:#x} elr={:#x} far={:#x} cpu={}",
        kind,
        esr,
        elr,
        far,
        cpu::current_index()
    );
    psci::system_off()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("VG-FATAL panic: {}", info);
    psci::system_off()
}
