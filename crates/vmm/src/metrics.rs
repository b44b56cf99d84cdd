//! Process-wide counters of vCPU exits to userspace, by kind.
//!
//! Every `KVM_RUN` that returns to a vCPU thread is one exit; the thread counts
//! it here before handling it (one relaxed atomic increment, the way
//! Firecracker keeps its vCPU exit metrics). `cargo xtask bench` reads the
//! counters around a workload to count the userspace exits it cost, for
//! example that an idle Linux guest costs none while `CPU_SUSPEND` stays in
//! the kernel. The counters cover every VM in the process: read them around a
//! workload that runs alone.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use vpsci_kvm::{SystemEventKind, VcpuExit};

/// Live counters (see [`VCPU_EXITS`]).
#[derive(Debug)]
pub struct ExitCounters {
    hypercall: AtomicU64,
    trng: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    wakeup: AtomicU64,
    system_event: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
}

/// The exits of every vCPU thread in this process.
pub static VCPU_EXITS: ExitCounters = ExitCounters::new();

impl ExitCounters {
    /// All zero.
    pub const fn new() -> ExitCounters {
        ExitCounters {
            hypercall: AtomicU64::new(0),
            trng: AtomicU64::new(0),
            mmio_read: AtomicU64::new(0),
            mmio_write: AtomicU64::new(0),
            wakeup: AtomicU64::new(0),
            system_event: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
            other: AtomicU64::new(0),
        }
    }

    /// Counts one exit.
    pub fn record(&self, exit: &VcpuExit) {
        if let VcpuExit::Hypercall { function_id, .. } = exit {
            if is_trng(*function_id) {
                self.trng.fetch_add(1, Ordering::Relaxed);
            }
        }
        let counter = match exit {
            VcpuExit::Hypercall { .. } => &self.hypercall,
            VcpuExit::MmioRead { .. } => &self.mmio_read,
            VcpuExit::MmioWrite { .. } => &self.mmio_write,
            VcpuExit::SystemEvent {
                kind: SystemEventKind::Wakeup,
                ..
            } => &self.wakeup,
            VcpuExit::SystemEvent { .. } => &self.system_event,
            VcpuExit::Interrupted => &self.interrupted,
            VcpuExit::FailEntry { .. } | VcpuExit::Unhandled { .. } => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> ExitCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            hypercall: get(&self.hypercall),
            trng: get(&self.trng),
            mmio_read: get(&self.mmio_read),
            mmio_write: get(&self.mmio_write),
            wakeup: get(&self.wakeup),
            system_event: get(&self.system_event),
            interrupted: get(&self.interrupted),
            other: get(&self.other),
        }
    }
}

impl Default for ExitCounters {
    fn default() -> ExitCounters {
        ExitCounters::new()
    }
}

/// Exit counts at one moment, or the difference between two moments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// `KVM_EXIT_HYPERCALL`: SMCCC calls the filter forwards (PSCI, TRNG).
    pub hypercall: u64,
    /// Of the hypercalls, TRNG calls (DEN0098; Linux asks TRNG_RND64 for seed entropy).
    pub trng: u64,
    /// MMIO loads (device registers).
    pub mmio_read: u64,
    /// MMIO stores.
    pub mmio_write: u64,
    /// `KVM_SYSTEM_EVENT_WAKEUP`: a suspended vCPU saw its wake-up interrupt.
    pub wakeup: u64,
    /// Other system events (in-kernel PSCI SYSTEM_OFF, SYSTEM_RESET, ...).
    pub system_event: u64,
    /// `EINTR`: the VMM kicked the vCPU out of `KVM_RUN`.
    pub interrupted: u64,
    /// Failed entries and exit reasons vpsci does not handle.
    pub other: u64,
}

impl ExitCounts {
    /// Every exit counted (TRNG calls are already among the hypercalls).
    pub fn total(&self) -> u64 {
        self.hypercall
            + self.mmio_read
            + self.mmio_write
            + self.wakeup
            + self.system_event
            + self.interrupted
            + self.other
    }

    /// The exits counted after `earlier` was taken.
    pub fn since(&self, earlier: &ExitCounts) -> ExitCounts {
        ExitCounts {
            hypercall: self.hypercall.saturating_sub(earlier.hypercall),
            trng: self.trng.saturating_sub(earlier.trng),
            mmio_read: self.mmio_read.saturating_sub(earlier.mmio_read),
            mmio_write: self.mmio_write.saturating_sub(earlier.mmio_write),
            wakeup: self.wakeup.saturating_sub(earlier.wakeup),
            system_event: self.system_event.saturating_sub(earlier.system_event),
            interrupted: self.interrupted.saturating_sub(earlier.interrupted),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

/// TRNG function IDs (DEN0098 §2: 0x50..=0x53 of the standard service, SMC32 and SMC64).
fn is_trng(function_id: u32) -> bool {
    matches!(function_id & !0x4000_0000, 0x8400_0050..=0x8400_0053)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_exit_kind_lands_in_its_own_counter_and_differences_isolate_a_window() {
        let counters = ExitCounters::new();
        counters.record(&VcpuExit::Hypercall {
            function_id: 0x8400_0000,
            smc: false,
        });
        let before = counters.snapshot();
        counters.record(&VcpuExit::Hypercall {
            function_id: 0xC400_0053,
            smc: false,
        });
        counters.record(&VcpuExit::MmioRead { addr: 0, len: 4 });
        counters.record(&VcpuExit::MmioWrite {
            addr: 0,
            data: [0; 8],
            len: 4,
        });
        counters.record(&VcpuExit::SystemEvent {
            kind: SystemEventKind::Wakeup,
            flags: 0,
        });
        counters.record(&VcpuExit::SystemEvent {
            kind: SystemEventKind::Reset,
            flags: 0,
        });
        counters.record(&VcpuExit::Interrupted);
        counters.record(&VcpuExit::Unhandled { reason: 99 });
        let window = counters.snapshot().since(&before);
        assert_eq!(
            window,
            ExitCounts {
                hypercall: 1,
                trng: 1,
                mmio_read: 1,
                mmio_write: 1,
                wakeup: 1,
                system_event: 1,
                interrupted: 1,
                other: 1,
            }
        );
        assert_eq!(window.total(), 7);
        assert_eq!(counters.snapshot().total(), 8);
        assert_eq!(counters.snapshot().trng, 1);
    }
}
