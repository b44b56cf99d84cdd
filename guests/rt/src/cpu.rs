//! CPU topology, secondary start-up and suspend with resume-at-entry.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::entry::{vg_resume_entry, vg_secondary_entry, vg_suspend_call, RESUMED_MARKER};
use crate::psci::{self, Conduit};

/// Most CPUs a guest handles (matches `MAX_CPUS` in `link.ld`).
pub const MAX_CPUS: usize = 64;
/// Bytes of stack per CPU (matches `STACK_SIZE` in `link.ld` and `vg_set_stack`).
pub const STACK_SIZE: usize = 0x2000;

/// MPIDR affinity of each CPU, in device-tree order; index 0 is the boot CPU.
/// Read by the entry code to find a CPU's index and stack.
#[no_mangle]
pub static MPIDR_TABLE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];
/// Number of valid entries in [`MPIDR_TABLE`].
#[no_mangle]
pub static CPU_COUNT: AtomicU64 = AtomicU64::new(0);

/// What a started secondary runs: `fn(cpu_index, context_id)`. When it
/// returns, the CPU calls CPU_OFF.
pub type Task = fn(usize, u64);

static TASKS: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

/// Callee-saved state kept across a powerdown suspend; written by
/// `vg_suspend_call`, read back by `vg_resume_entry`.
#[repr(C)]
pub struct SavedContext {
    regs: [u64; 13],
    fp: [u64; 8],
    /// x0 the CPU arrived with at the resume entry point.
    pub received_context_id: u64,
    /// Non-zero once the CPU came back through the resume entry point.
    pub resumed: u64,
}

/// One [`SavedContext`] per CPU, indexed by CPU index.
#[no_mangle]
pub static mut SAVED_CONTEXTS: [SavedContext; MAX_CPUS] = [const {
    SavedContext {
        regs: [0; 13],
        fp: [0; 8],
        received_context_id: 0,
        resumed: 0,
    }
}; MAX_CPUS];

/// Number of CPUs in the device tree.
pub fn count() -> usize {
    CPU_COUNT.load(Ordering::Relaxed) as usize
}

/// MPIDR affinity value of CPU `index`.
pub fn mpidr(index: usize) -> u64 {
    MPIDR_TABLE[index % MAX_CPUS].load(Ordering::Relaxed)
}

/// Index of the calling CPU.
pub fn current_index() -> usize {
    let mpidr: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack)) };
    let aff = mpidr & 0xff_00ff_ffff;
    (0..count()).find(|&i| self::mpidr(i) == aff).unwrap_or(0)
}

pub(crate) fn set_topology(mpidrs: &[u64]) {
    for (slot, value) in MPIDR_TABLE.iter().zip(mpidrs) {
        slot.store(*value, Ordering::Relaxed);
    }
    CPU_COUNT.store(mpidrs.len().min(MAX_CPUS) as u64, Ordering::Release);
}

/// Address of the CPU_ON entry point.
pub fn secondary_entry() -> u64 {
    vg_secondary_entry as *const () as u64
}

/// Address of the resume entry point used for powerdown and system suspend.
pub fn resume_entry() -> u64 {
    vg_resume_entry as *const () as u64
}

/// Sets the task CPU `index` runs next time it enters at [`secondary_entry`].
pub fn set_task(index: usize, task: Task) {
    TASKS[index % MAX_CPUS].store(task as usize, Ordering::Release);
}

/// CPU_ON for CPU `index` running `task`, with `context_id` in x0 at entry.
/// Returns the PSCI status.
pub fn start(index: usize, task: Task, context_id: u64) -> i32 {
    set_task(index, task);
    psci::cpu_on(mpidr(index), secondary_entry(), context_id)
}

#[no_mangle]
extern "C" fn vg_rust_secondary(index: usize, context_id: u64) -> ! {
    let raw = TASKS[index % MAX_CPUS].load(Ordering::Acquire);
    if raw != 0 {
        // SAFETY: TASKS only ever holds 0 or a value stored from a `Task` by `set_task`.
        let task: Task = unsafe { core::mem::transmute::<usize, Task>(raw) };
        task(index, context_id);
    }
    loop {
        psci::cpu_off();
    }
}

/// How a suspend call that may lose the CPU context ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspendOutcome {
    /// The call returned to its caller with this status.
    Returned(i32),
    /// The CPU came back at the resume entry point with this x0.
    Resumed {
        /// x0 at the entry point.
        context_id: u64,
    },
}

/// Makes a suspend call (`fid` with x1..x3) whose entry point argument is
/// expected to be [`resume_entry`], surviving a resume at that entry point.
pub fn suspend_call(fid: u32, a1: u64, a2: u64, a3: u64) -> SuspendOutcome {
    let index = current_index();
    // SAFETY: each CPU only touches its own slot, and only here and in the
    // resume entry code running on the same CPU.
    let slot = unsafe { &raw mut SAVED_CONTEXTS[index] };
    // SAFETY: as above; the slot is this CPU's.
    unsafe {
        (*slot).resumed = 0;
        (*slot).received_context_id = 0;
    }
    let use_smc = u64::from(psci::conduit() == Conduit::Smc);
    // SAFETY: `slot` is valid for writes; the assembly saves and restores every
    // callee-saved register and the stack pointer, so whichever way the call
    // ends, execution continues here with the Rust state intact.
    let ret = unsafe { vg_suspend_call(slot, u64::from(fid), a1, a2, a3, use_smc) };
    // SAFETY: as above.
    let (resumed, received) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*slot).resumed),
            core::ptr::read_volatile(&raw const (*slot).received_context_id),
        )
    };
    if ret == RESUMED_MARKER && resumed != 0 {
        SuspendOutcome::Resumed {
            context_id: received,
        }
    } else {
        SuspendOutcome::Returned(ret as u32 as i32)
    }
}
