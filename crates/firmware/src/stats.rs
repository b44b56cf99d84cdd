//! Per-vCPU, per-power-state accounting for PSCI_STAT_RESIDENCY and PSCI_STAT_COUNT
//! (DEN0022 F.b §5.1.21, §5.1.22).
//!
//! A suspension counts once it ends (the vCPU is woken): the count goes up by one and its
//! duration is added to the residency. Counters are atomics so the STAT queries never lock.

use crate::decode::CpuPowerState;
use crate::sync::{AtomicU64, Ordering};

/// Counters of one vCPU, indexed by [`CpuPowerState::index`].
pub(crate) struct VcpuStats {
    count: [AtomicU64; 2],
    residency_ns: [AtomicU64; 2],
}

impl VcpuStats {
    pub(crate) fn new() -> Self {
        Self {
            count: [AtomicU64::new(0), AtomicU64::new(0)],
            residency_ns: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Records one completed suspension in `state` lasting `elapsed_ns` (unknown after a
    /// restore: then only the count changes). The caller holds the vCPU's detail mutex.
    pub(crate) fn record(&self, state: CpuPowerState, elapsed_ns: Option<u64>) {
        // Writers hold the vCPU's detail mutex, so load + store cannot lose an update;
        // readers only load. Saturate: a counter must never go backwards.
        let i = state.index();
        let count = self.count[i].load(Ordering::Relaxed);
        self.count[i].store(count.saturating_add(1), Ordering::Relaxed);
        if let Some(ns) = elapsed_ns {
            let total = self.residency_ns[i].load(Ordering::Relaxed);
            self.residency_ns[i].store(total.saturating_add(ns), Ordering::Relaxed);
        }
    }

    /// Completed suspensions in `state`.
    pub(crate) fn count(&self, state: CpuPowerState) -> u64 {
        self.count[state.index()].load(Ordering::Relaxed)
    }

    /// Total time in `state`, in nanoseconds.
    pub(crate) fn residency_ns(&self, state: CpuPowerState) -> u64 {
        self.residency_ns[state.index()].load(Ordering::Relaxed)
    }

    /// Overwrites the counters (restore).
    pub(crate) fn set(&self, count: [u64; 2], residency_ns: [u64; 2]) {
        for i in 0..2 {
            self.count[i].store(count[i], Ordering::Relaxed);
            self.residency_ns[i].store(residency_ns[i], Ordering::Relaxed);
        }
    }

    /// Zeroes the counters (VM reset).
    pub(crate) fn clear(&self) {
        self.set([0; 2], [0; 2]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_and_accumulates_per_state() {
        let s = VcpuStats::new();
        s.record(CpuPowerState::Standby, Some(1_000));
        s.record(CpuPowerState::Standby, Some(500));
        s.record(CpuPowerState::Powerdown, None);
        assert_eq!(s.count(CpuPowerState::Standby), 2);
        assert_eq!(s.residency_ns(CpuPowerState::Standby), 1_500);
        assert_eq!(s.count(CpuPowerState::Powerdown), 1);
        assert_eq!(s.residency_ns(CpuPowerState::Powerdown), 0);
    }

    #[test]
    fn residency_saturates_instead_of_wrapping() {
        let s = VcpuStats::new();
        s.record(CpuPowerState::Standby, Some(u64::MAX));
        s.record(CpuPowerState::Standby, Some(10));
        assert_eq!(s.residency_ns(CpuPowerState::Standby), u64::MAX);
    }
}
