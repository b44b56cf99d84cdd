//! The boundary between the engine and the VMM: what a call decides ([`CallOutcome`],
//! [`WakeOutcome`]) and the effects the VMM carries out ([`Platform`]).

use crate::error::EntropyError;
use crate::ids::{Conduit, VcpuId};

/// One SMCCC call as the guest made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCall {
    /// The calling vCPU.
    pub vcpu: VcpuId,
    /// The instruction used (HVC or SMC).
    pub conduit: Conduit,
    /// x0..x3 exactly as the guest left them (W0 = function ID).
    pub regs: [u64; 4],
    /// True if the caller runs in AArch32 (it then cannot make SMC64 calls).
    pub caller_aarch32: bool,
}

/// Where and how a vCPU starts (CPU_ON) or resumes (powerdown suspend), DEN0022 F.b §5.1.4 and §5.1.2.
///
/// The vCPU starts with the MMU and caches off, at the caller's exception level and in the
/// caller's execution state, with x0 (r0) = `context_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryPoint {
    /// Entry address (for an AArch32 entry, bit 0 set selects T32).
    pub pc: u64,
    /// Value for x0 at entry.
    pub context_id: u64,
    /// Start in AArch32 (the caller was AArch32).
    pub aarch32: bool,
}

/// Kinds of suspension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuspendKind {
    /// CPU_SUSPEND standby/retention: returns SUCCESS to the caller on wake-up.
    Standby,
    /// CPU_SUSPEND / CPU_DEFAULT_SUSPEND powerdown: resumes at the entry point on wake-up.
    Powerdown,
    /// SYSTEM_SUSPEND: the whole system is suspended; only the caller resumes, at its entry.
    System,
}

/// A per-vCPU power state as the coordinator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    /// Off (never started, or CPU_OFF).
    Off,
    /// A CPU_ON for it succeeded; it has not started running guest code yet.
    OnPending,
    /// Running (or runnable) guest code.
    On,
    /// Suspended by CPU_SUSPEND, CPU_DEFAULT_SUSPEND or SYSTEM_SUSPEND.
    Suspended {
        /// Which kind of suspension.
        kind: SuspendKind,
    },
    /// CPU_FREEZE: stopped until the VM is reset; counts as ON for AFFINITY_INFO.
    Frozen,
}

/// A whole-VM event committed by a system-scoped call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemEvent {
    /// SYSTEM_OFF.
    Off,
    /// SYSTEM_OFF2 with HIBERNATE_OFF, or with type 0 (no type: the default type, which is
    /// HIBERNATE_OFF): power off, keep the VM's storage for a resume.
    Hibernate,
    /// SYSTEM_RESET (cold reset).
    Reset,
    /// SYSTEM_RESET2 with WARM_RESET (type 0).
    WarmReset {
        /// Implementation-defined cookie from the guest.
        cookie: u64,
    },
    /// SYSTEM_RESET2 with a vendor-specific type (bit 31 set).
    VendorReset {
        /// The full reset_type, bit 31 included.
        reset_type: u32,
        /// Implementation-defined cookie from the guest.
        cookie: u64,
    },
}

impl SystemEvent {
    /// The event a SYSTEM_RESET2 with these arguments asks for (DEN0022 F.b §5.1.12), as the
    /// engine decodes it; `None` for a reserved reset type. For a VMM that learns of a reset
    /// from elsewhere (KVM's own PSCI) and wants to name it the same way.
    pub fn from_reset2(reset_type: u32, cookie: u64) -> Option<SystemEvent> {
        Some(match crate::decode::Reset2Type::from_raw(reset_type)? {
            crate::decode::Reset2Type::Warm => SystemEvent::WarmReset { cookie },
            crate::decode::Reset2Type::Vendor(reset_type) => {
                SystemEvent::VendorReset { reset_type, cookie }
            }
        })
    }
}

/// What the VMM must do with the calling vCPU after [`Firmware::handle_call`](crate::Firmware::handle_call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Write x0..x3 (x1..x3 are the guest's own values where the function defines no
    /// result) and continue the caller.
    Return {
        /// New x0..x3.
        regs: [u64; 4],
    },
    /// CPU_OFF or CPU_FREEZE committed: stop the caller; it runs again only after a
    /// [`Platform::start_vcpu`] for it (a frozen vCPU only after a VM reset).
    PowerOff,
    /// CPU_SUSPEND, CPU_DEFAULT_SUSPEND or SYSTEM_SUSPEND committed: park the caller until
    /// an interrupt wakes it, then call [`Firmware::vcpu_woken`](crate::Firmware::vcpu_woken).
    Suspend {
        /// The kind of suspension.
        kind: SuspendKind,
    },
    /// A system event committed: [`Platform::system_event`] answered
    /// [`SystemVerdict::Commit`] while the VM was quiesced. The caller must not run guest
    /// code again. (A refused event is a [`CallOutcome::Return`] with INTERNAL_FAILURE.)
    SystemEvent {
        /// The event.
        event: SystemEvent,
    },
}

/// The platform's one decision on a system event (see [`Platform::system_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemVerdict {
    /// The VMM carries the event out (powers off, resets, ...): the caller never runs again
    /// and the engine answers [`CallOutcome::SystemEvent`].
    Commit,
    /// The VMM will not carry it out (for example a hibernate request it cannot honour): the
    /// engine changes nothing and answers the caller INTERNAL_FAILURE, as DEN0022 F.b
    /// §5.1.10 specifies for a SYSTEM_OFF2 that returns.
    Refuse,
}

/// [`Platform::quiesce`] gave up: `vcpu` could not be held out of guest execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{vcpu} could not be held out of guest execution")]
pub struct QuiesceError {
    /// The vCPU that did not stop.
    pub vcpu: VcpuId,
}

/// A power-state change the engine committed, reported through
/// [`Platform::power_transition`] in the order it happened for that vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transition {
    /// The vCPU whose state changed.
    pub vcpu: VcpuId,
    /// Its state before.
    pub from: PowerState,
    /// Its state after.
    pub to: PowerState,
}

/// What a vCPU must do after [`Firmware::vcpu_woken`](crate::Firmware::vcpu_woken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// Standby wake-up: write x0..x3 (x0 = SUCCESS) and continue after the call.
    Return {
        /// New x0..x3.
        regs: [u64; 4],
    },
    /// Powerdown or system wake-up: reset the vCPU and start it at `entry`.
    ResumeAt {
        /// Where to resume.
        entry: EntryPoint,
    },
    /// The vCPU was not suspended (for example a wake-up raced with a VM reset): nothing
    /// changed; the VMM should not alter the vCPU.
    NotSuspended,
}

/// Effects on other vCPUs and on the whole VM, implemented by the VMM.
///
/// The engine calls these while it holds its VM lock (shared for `start_vcpu`, exclusive
/// for `system_event`; `power_transition` also under the vCPU's own lock), so an
/// implementation must not call back into the [`Firmware`](crate::Firmware) from them
/// except [`Firmware::power_state`](crate::Firmware::power_state) (which is lock-free) and,
/// from `start_vcpu` only, [`Firmware::vcpu_started`](crate::Firmware::vcpu_started).
pub trait Platform {
    /// Ask the VMM to start `vcpu` at `entry` (asynchronous). The target's thread must call
    /// [`Firmware::vcpu_started`](crate::Firmware::vcpu_started) before it runs guest code.
    fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint);
    /// Hold every vCPU except `caller` out of guest execution; returns once all are held.
    /// Called before the engine takes its exclusive lock (a vCPU blocked in the engine is
    /// "held": it is not executing guest code).
    ///
    /// A platform that cannot hold them all in bounded time (a vCPU that does not leave the
    /// guest) returns [`QuiesceError`] with nothing held; the engine then changes nothing,
    /// does not call [`resume`](Platform::resume), and answers the caller INTERNAL_FAILURE.
    fn quiesce(&self, caller: VcpuId) -> Result<(), QuiesceError>;
    /// Undo one [`quiesce`](Platform::quiesce).
    fn resume(&self, caller: VcpuId);
    /// A system event the guest asked for and the engine accepted, reported while the VM is
    /// still quiesced. The answer is final: on [`SystemVerdict::Commit`] the VMM carries the
    /// event out (nobody re-enters the guest); on [`SystemVerdict::Refuse`] the engine
    /// answers the caller INTERNAL_FAILURE and the VM carries on unchanged.
    fn system_event(&self, caller: VcpuId, event: &SystemEvent) -> SystemVerdict;
    /// The engine committed a change of a vCPU's power state (CPU_ON's target going
    /// ON_PENDING, a start or wake-up, CPU_OFF, a suspension, a reset). Called with that
    /// vCPU's lock held, so the calls for one vCPU arrive in commit order; keep it short.
    /// Not called by [`Firmware::restore`](crate::Firmware::restore), which replaces the
    /// whole state at once.
    fn power_transition(&self, transition: &Transition);
    /// Fill `buf` with entropy from the host (TRNG). `Err` makes TRNG answer NO_ENTROPY.
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), EntropyError>;
    /// Monotonic nanoseconds. The engine times suspensions with its own [`Clock`]
    /// (because [`Firmware::vcpu_woken`](crate::Firmware::vcpu_woken) has no platform at
    /// hand); a VMM that wants both to agree passes a clock reading the same source to
    /// [`Firmware::with_clock`](crate::Firmware::with_clock).
    fn now_ns(&self) -> u64;
}

/// A monotonic clock for PSCI_STAT_RESIDENCY accounting.
pub trait Clock: Send + Sync {
    /// Monotonic nanoseconds since an arbitrary origin.
    fn now_ns(&self) -> u64;
}

/// [`Clock`] over `std::time::Instant`, origin at creation.
#[derive(Debug)]
pub struct MonotonicClock {
    origin: std::time::Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
