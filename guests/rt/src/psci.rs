//! PSCI (DEN0022) and SMCCC (DEN0028) calls over the conduit the device tree names.
//!
//! Calls go through Google's `smccc` crate's raw `hvc64`/`smc64`; the helpers
//! return the raw status (low 32 bits of x0, sign-extended) because the
//! conformance checks need the exact code, not a mapped error.

use core::sync::atomic::{AtomicU8, Ordering};

pub use smccc::psci::error::{
    ALREADY_ON, DENIED, INTERNAL_FAILURE, INVALID_ADDRESS, INVALID_PARAMETERS, NOT_SUPPORTED,
    ON_PENDING,
};
pub use smccc::psci::*;

/// PSCI SUCCESS.
pub const SUCCESS: i32 = 0;
/// SYSTEM_OFF2 (PSCI 1.3), SMC32 id.
pub const PSCI_SYSTEM_OFF2_32: u32 = 0x8400_0015;
/// SYSTEM_OFF2 (PSCI 1.3), SMC64 id.
pub const PSCI_SYSTEM_OFF2_64: u32 = 0xC400_0015;
/// SYSTEM_OFF2 type HIBERNATE_OFF (DEN0022 F.b 5.11).
pub const HIBERNATE_OFF: u64 = 1;
/// AFFINITY_INFO: ON.
pub const AFFINITY_ON: i32 = 0;
/// AFFINITY_INFO: OFF.
pub const AFFINITY_OFF: i32 = 1;
/// AFFINITY_INFO: ON_PENDING.
pub const AFFINITY_ON_PENDING: i32 = 2;

/// How the guest reaches the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// `hvc #0`
    Hvc,
    /// `smc #0`
    Smc,
}

static CONDUIT: AtomicU8 = AtomicU8::new(0);

/// Selects the conduit every later call uses.
pub fn set_conduit(conduit: Conduit) {
    CONDUIT.store(u8::from(conduit == Conduit::Smc), Ordering::Relaxed);
}

/// The conduit in use.
pub fn conduit() -> Conduit {
    if CONDUIT.load(Ordering::Relaxed) == 1 {
        Conduit::Smc
    } else {
        Conduit::Hvc
    }
}

/// Makes one SMCCC call with x1..x3 and returns x0..x3.
pub fn call(fid: u32, a1: u64, a2: u64, a3: u64) -> [u64; 4] {
    let mut args = [0u64; 17];
    args[0] = a1;
    args[1] = a2;
    args[2] = a3;
    let r = match conduit() {
        Conduit::Hvc => smccc::hvc64(fid, args),
        Conduit::Smc => smccc::smc64(fid, args),
    };
    [r[0], r[1], r[2], r[3]]
}

/// Makes one SMCCC call over `conduit` with every register the convention
/// uses (x0..x17, including x0's upper half, which is not part of the function
/// ID) and returns x0..x17 as the call left them. For hostile guests that
/// probe what a firmware does with garbage; `smccc`'s helpers always pass a
/// clean 32-bit function ID.
pub fn call_raw(conduit: Conduit, regs: [u64; 18]) -> [u64; 18] {
    let mut r = regs;
    macro_rules! smccc_asm {
        ($insn:literal) => {
            // SAFETY: an SMCCC call only reads and writes x0..x17 (declared
            // here) and touches no guest memory the compiler knows about.
            unsafe {
                core::arch::asm!(
                    $insn,
                    inout("x0") r[0], inout("x1") r[1], inout("x2") r[2],
                    inout("x3") r[3], inout("x4") r[4], inout("x5") r[5],
                    inout("x6") r[6], inout("x7") r[7], inout("x8") r[8],
                    inout("x9") r[9], inout("x10") r[10], inout("x11") r[11],
                    inout("x12") r[12], inout("x13") r[13], inout("x14") r[14],
                    inout("x15") r[15], inout("x16") r[16], inout("x17") r[17],
                    options(nostack)
                )
            }
        };
    }
    match conduit {
        Conduit::Hvc => smccc_asm!("hvc #0"),
        Conduit::Smc => smccc_asm!("smc #0"),
    }
    r
}

/// Makes a call and returns its status (w0 as a signed value).
pub fn status(fid: u32, a1: u64, a2: u64, a3: u64) -> i32 {
    call(fid, a1, a2, a3)[0] as u32 as i32
}

/// PSCI_VERSION: (major << 16) | minor.
pub fn version() -> u32 {
    call(PSCI_VERSION, 0, 0, 0)[0] as u32
}

/// PSCI_FEATURES for `fid`.
pub fn features(fid: u32) -> i32 {
    status(PSCI_FEATURES, u64::from(fid), 0, 0)
}

/// CPU_ON (SMC64).
pub fn cpu_on(target: u64, entry: u64, context_id: u64) -> i32 {
    status(PSCI_CPU_ON_64, target, entry, context_id)
}

/// AFFINITY_INFO (SMC64).
pub fn affinity_info(target: u64, level: u64) -> i32 {
    status(PSCI_AFFINITY_INFO_64, target, level, 0)
}

/// CPU_OFF; returns only if the call failed.
pub fn cpu_off() -> i32 {
    status(PSCI_CPU_OFF, 0, 0, 0)
}

/// SYSTEM_OFF; if it returns, parks the CPU.
pub fn system_off() -> ! {
    loop {
        call(PSCI_SYSTEM_OFF, 0, 0, 0);
        // SAFETY: wfi only waits for an interrupt.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack)) };
    }
}

/// Human-readable name of a PSCI status, for reports.
pub fn status_name(status: i32) -> &'static str {
    match status {
        0 => "SUCCESS",
        -1 => "NOT_SUPPORTED",
        -2 => "INVALID_PARAMETERS",
        -3 => "DENIED",
        -4 => "ALREADY_ON",
        -5 => "ON_PENDING",
        -6 => "INTERNAL_FAILURE",
        -7 => "NOT_PRESENT",
        -8 => "DISABLED",
        -9 => "INVALID_ADDRESS",
        _ => "other",
    }
}
