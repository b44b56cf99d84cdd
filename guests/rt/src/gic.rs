//! Just enough GICv3 to take the virtual timer PPI and SGIs: distributor
//! enable, this CPU's redistributor (found by affinity in the regions the
//! device tree lists) and the system-register CPU interface. Interrupts stay
//! masked in PSTATE; a suspended CPU wakes on a pending interrupt anyway and
//! the guest acknowledges it by reading ICC_IAR1_EL1.

use crate::platform;

const GICD_CTLR: usize = 0x0;
const GICR_WAKER: usize = 0x14;
const GICR_TYPER: usize = 0x8;
const SGI_BASE: usize = 0x1_0000;
const GICR_IGROUPR0: usize = SGI_BASE + 0x80;
const GICR_ISENABLER0: usize = SGI_BASE + 0x100;
const GICR_ICPENDR0: usize = SGI_BASE + 0x280;
const GICR_IPRIORITYR: usize = SGI_BASE + 0x400;

fn read32(addr: usize) -> u32 {
    // SAFETY: callers pass aligned GIC register addresses taken from the device tree.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write32(addr: usize, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

fn read64(addr: usize) -> u64 {
    // SAFETY: as in `read32`; GICR_TYPER is a 64-bit register.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Enables the distributor (affinity routing, both groups). Boot CPU, once.
pub fn init_distributor() {
    let d = platform().gicd;
    if d == 0 {
        return;
    }
    write32(d + GICD_CTLR, (1 << 4) | (1 << 1) | 1);
    while read32(d + GICD_CTLR) & (1 << 31) != 0 {}
}

fn redistributor() -> Option<usize> {
    let p = platform();
    let mut mpidr: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack)) };
    mpidr &= 0xff_00ff_ffff;
    let want = ((mpidr >> 32) << 24) | (mpidr & 0xff_ffff);
    for &(base, size) in p.gicr.iter().take(p.gicr_count) {
        let mut frame = base;
        while frame < base + size {
            let typer = read64(frame + GICR_TYPER);
            if typer >> 32 == want {
                return Some(frame);
            }
            if typer & (1 << 4) != 0 {
                break;
            }
            frame += if typer & (1 << 1) != 0 {
                0x4_0000
            } else {
                0x2_0000
            };
        }
    }
    None
}

/// Wakes this CPU's redistributor, makes `intids` (SGIs/PPIs) group 1 and
/// enabled, and enables the CPU interface. Returns false if no redistributor
/// matches this CPU.
pub fn init_cpu(intids: &[u32]) -> bool {
    let Some(r) = redistributor() else {
        return false;
    };
    let waker = read32(r + GICR_WAKER);
    write32(r + GICR_WAKER, waker & !(1 << 1));
    while read32(r + GICR_WAKER) & (1 << 2) != 0 {}
    let mut mask = 0u32;
    for &id in intids {
        if id < 32 {
            mask |= 1 << id;
            let prio = r + GICR_IPRIORITYR + id as usize;
            // SAFETY: byte access to a priority register of this CPU's redistributor.
            unsafe { core::ptr::write_volatile(prio as *mut u8, 0x80) };
        }
    }
    write32(r + GICR_IGROUPR0, read32(r + GICR_IGROUPR0) | mask);
    write32(r + GICR_ISENABLER0, mask);
    // SAFETY: ICC_* accesses configure this CPU's own GIC CPU interface.
    unsafe {
        core::arch::asm!(
            "mrs {t}, icc_sre_el1",
            "orr {t}, {t}, #1",
            "msr icc_sre_el1, {t}",
            "isb",
            "msr icc_pmr_el1, {pmr}",
            "msr icc_bpr1_el1, xzr",
            "msr icc_igrpen1_el1, {one}",
            "isb",
            t = out(reg) _,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            options(nomem, nostack)
        )
    };
    true
}

/// Clears a pending SGI/PPI on this CPU's redistributor.
pub fn clear_pending(intid: u32) {
    if let (Some(r), true) = (redistributor(), intid < 32) {
        write32(r + GICR_ICPENDR0, 1 << intid);
    }
}

/// Acknowledges the highest-priority pending interrupt; 1023 if none.
pub fn acknowledge() -> u32 {
    let v: u64;
    // SAFETY: reading ICC_IAR1_EL1 acknowledges an interrupt of this CPU.
    unsafe {
        core::arch::asm!("mrs {}, icc_iar1_el1", "dsb sy", out(reg) v, options(nomem, nostack))
    };
    v as u32 & 0xff_ffff
}

/// Ends (and deactivates) interrupt `intid`.
pub fn end_of_interrupt(intid: u32) {
    // SAFETY: writes this CPU's own EOI register.
    unsafe {
        core::arch::asm!("msr icc_eoir1_el1, {}", "isb", in(reg) u64::from(intid), options(nomem, nostack))
    };
}

/// Sends SGI `intid` (0..15) to CPU with affinity `mpidr`.
pub fn send_sgi(mpidr: u64, intid: u32) {
    let aff0 = mpidr & 0xff;
    let value = ((mpidr >> 32 & 0xff) << 48)
        | ((mpidr >> 16 & 0xff) << 32)
        | (u64::from(intid & 0xf) << 24)
        | ((mpidr >> 8 & 0xff) << 16)
        | (1u64 << (aff0 & 0xf));
    // Aff0 above 15 needs the range selector (RS = aff0 / 16).
    let value = value | ((aff0 >> 4) << 44);
    // SAFETY: generating an SGI only affects interrupt state.
    unsafe {
        core::arch::asm!("msr icc_sgi1r_el1, {}", "isb", in(reg) value, options(nomem, nostack))
    };
}
