//! vCPU threads and the VM-wide control they share.
//!
//! Each vCPU runs on its own thread, which owns its `KvmVcpu`. A thread is
//! either *in guest* (inside `KVM_RUN`) or *out*. [`VmControl`] keeps, under
//! one mutex, which threads are in guest, the quiesce hold counter, pending
//! start requests and the reason the VM stops, and wakes waiters through one
//! condition variable — no sleep-polling anywhere:
//!
//! - a thread enters the guest only while nothing holds the VM and the VM is
//!   not stopping; it marks itself out (and wakes quiescers) as soon as
//!   `KVM_RUN` returns;
//! - [`VmControl::quiesce`] bumps the hold counter, kicks every other thread
//!   that is in guest, and waits until none is; a thread blocked in the engine
//!   or parked powered off already counts as held;
//! - CPU_ON hands the target's thread a start request; the target applies it
//!   itself (vCPU ioctls stay on their own thread), tells the engine it started
//!   and enters the guest;
//! - [`VmControl::pause`] (the operator's pause) kicks every thread out of
//!   the guest and waits until each is parked, none busy with an exit or a
//!   start; no thread enters or applies a start until
//!   [`VmControl::unpause`]; power states stay as they were;
//! - a suspended vCPU sits in `KVM_RUN` with `KVM_MP_STATE_SUSPENDED`; a kick
//!   comes back as `VcpuExit::Interrupted` and leaves it suspended, only
//!   `KVM_SYSTEM_EVENT_WAKEUP` resumes it through the engine.

mod calls;
mod control;
mod ops;
mod runner;
mod shared;

pub use calls::CallCounts;
pub use control::{
    KernelEvent, Kick, Next, NotPaused, OperatorStop, PauseError, StopReason, VmControl,
};
pub use ops::{Mmio, VcpuOps};
pub use runner::{PsciBackend, VcpuRunner, VmPlatform};
pub use shared::SharedVcpu;
