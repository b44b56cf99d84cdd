//! A fake [`Platform`] and clock for tests (unit, property, loom, stress, bench, fuzz and
//! the VMM's own). Hidden from the docs; not part of the supported API.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::{FirmwareConfig, MemoryRegion};
use crate::coordinator::Firmware;
use crate::error::EntropyError;
use crate::ids::{Conduit, Mpidr, VcpuId};
use crate::platform::{
    Clock, EntryPoint, GuestCall, Platform, QuiesceError, SystemEvent, SystemVerdict, Transition,
};

/// Guest RAM used by [`firmware`]: 16 MiB at 0x4000_0000.
pub const TEST_RAM: MemoryRegion = MemoryRegion {
    base: 0x4000_0000,
    size: 0x100_0000,
};

/// A clock the test advances by hand.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// Advances the clock by `ns`.
    pub fn advance(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// Records every effect the engine asks for.
#[derive(Debug, Default)]
pub struct FakePlatform {
    /// Start requests, in order.
    pub starts: Mutex<Vec<(VcpuId, EntryPoint)>>,
    /// System events, in order (committed or refused).
    pub events: Mutex<Vec<(VcpuId, SystemEvent)>>,
    /// When set, `quiesce` gives up (naming vCPU 0) and holds nothing.
    pub quiesce_fails: AtomicBool,
    /// When set, `system_event` answers [`SystemVerdict::Refuse`].
    pub refuse_system_events: AtomicBool,
    /// Power-state transitions the engine reported, in order.
    pub transitions: Mutex<Vec<Transition>>,
    /// Current quiesce depth (quiesce minus resume).
    pub quiesce_depth: AtomicUsize,
    /// Total quiesce calls.
    pub quiesce_calls: AtomicUsize,
    /// When set, `fill_random` fails.
    pub entropy_fails: AtomicBool,
    /// Next byte `fill_random` produces (bytes count up from here).
    pub next_random: AtomicU64,
    /// The clock `now_ns` reads.
    pub clock: ManualClock,
}

impl FakePlatform {
    /// A fake with an empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// The start requests so far.
    pub fn starts(&self) -> Vec<(VcpuId, EntryPoint)> {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The transitions reported so far.
    pub fn transitions(&self) -> Vec<Transition> {
        self.transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The system events so far.
    pub fn events(&self) -> Vec<(VcpuId, SystemEvent)> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Platform for FakePlatform {
    fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint) {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((vcpu, entry));
    }

    fn quiesce(&self, _caller: VcpuId) -> Result<(), QuiesceError> {
        self.quiesce_calls.fetch_add(1, Ordering::SeqCst);
        if self.quiesce_fails.load(Ordering::SeqCst) {
            return Err(QuiesceError {
                vcpu: VcpuId::new(0),
            });
        }
        self.quiesce_depth.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self, _caller: VcpuId) {
        self.quiesce_depth.fetch_sub(1, Ordering::SeqCst);
    }

    fn system_event(&self, caller: VcpuId, event: &SystemEvent) -> SystemVerdict {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((caller, *event));
        if self.refuse_system_events.load(Ordering::SeqCst) {
            SystemVerdict::Refuse
        } else {
            SystemVerdict::Commit
        }
    }

    fn power_transition(&self, transition: &Transition) {
        self.transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(*transition);
    }

    fn fill_random(&self, buf: &mut [u8]) -> Result<(), EntropyError> {
        if self.entropy_fails.load(Ordering::SeqCst) {
            return Err(EntropyError {
                reason: "fake entropy source switched off".to_owned(),
            });
        }
        for b in buf {
            *b = self.next_random.fetch_add(1, Ordering::SeqCst) as u8;
        }
        Ok(())
    }

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }
}

/// A firmware with `cpus` vCPUs (MPIDRs from [`Mpidr::from_index`]), [`TEST_RAM`], and a
/// fake platform whose clock the firmware also uses.
pub fn firmware(
    config: FirmwareConfig,
    cpus: u32,
) -> Result<(Firmware, FakePlatform), crate::ConfigError> {
    let platform = FakePlatform::new();
    let fw = Firmware::with_clock(
        config,
        (0..cpus).map(Mpidr::from_index).collect(),
        vec![TEST_RAM],
        Box::new(platform.clock.clone()),
    )?;
    Ok((fw, platform))
}

/// A call from `vcpu` over HVC by an AArch64 caller.
pub fn call(vcpu: u32, regs: [u64; 4]) -> GuestCall {
    GuestCall {
        vcpu: VcpuId::new(vcpu),
        conduit: Conduit::Hvc,
        regs,
        caller_aarch32: false,
    }
}
