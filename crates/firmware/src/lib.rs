//! vpsci firmware engine: a userspace implementation of the Arm Power State Coordination
//! Interface and the SMCCC architecture calls for one virtual machine, with an atomic vCPU
//! power-state coordinator. No hypervisor dependency: effects go through [`Platform`].
//!
//! # Specifications
//!
//! * Arm DEN0022 issue F.b, *Power State Coordination Interface*, PSCI 1.3. Section numbers
//!   in this crate (§5.1.x for functions, §5.2.2 return codes) refer to
//!   that issue.
//! * Arm DEN0028, *SMC Calling Convention* (register usage §2, architecture calls §7).
//! * Arm DEN0098, *True Random Number Generator Firmware Interface* 1.0.
//!
//! # Functions
//!
//! | function | status |
//! |---|---|
//! | PSCI_VERSION §5.1.1 | the configured version |
//! | CPU_SUSPEND §5.1.2 | one standby + one powerdown state, original or extended format |
//! | CPU_OFF §5.1.3, CPU_ON §5.1.4 | full state machine, one SUCCESS per OFF -> ON; a starting core is ON to other callers unless [`OnPending::Reported`] |
//! | AFFINITY_INFO §5.1.5 | levels 0..3 |
//! | MIGRATE §5.1.6, MIGRATE_INFO_UP_CPU §5.1.8 | NOT_SUPPORTED: a VM has no Trusted OS |
//! | MIGRATE_INFO_TYPE §5.1.7 | 2 (no Trusted OS migration needed) |
//! | SYSTEM_OFF §5.1.9, SYSTEM_OFF2 §5.1.10, SYSTEM_RESET §5.1.11, SYSTEM_RESET2 §5.1.12 | system events |
//! | MEM_PROTECT §5.1.13, MEM_PROTECT_CHECK_RANGE §5.1.14 | flag for the VMM; RAM ranges |
//! | PSCI_FEATURES §5.1.15 | derived from the same table as dispatch |
//! | CPU_FREEZE §5.1.16, CPU_DEFAULT_SUSPEND §5.1.17, NODE_HW_STATE §5.1.18 | implemented |
//! | SYSTEM_SUSPEND §5.1.19 | all others OFF else DENIED; only the caller resumes |
//! | PSCI_SET_SUSPEND_MODE §5.1.20 | platform-coordinated and OS-initiated (see below) |
//! | PSCI_STAT_RESIDENCY §5.1.21, PSCI_STAT_COUNT §5.1.22 | per vCPU, per state |
//! | SMCCC_VERSION, SMCCC_ARCH_FEATURES, SMCCC_ARCH_SOC_ID, ARCH_WORKAROUND_1/2/3 | DEN0028 §7 |
//! | TRNG_VERSION, TRNG_FEATURES, TRNG_GET_UUID, TRNG_RND32/64 | DEN0098, host entropy |
//!
//! The VM's power states are core-level only (no cluster or system power domains are
//! modelled), so OS-initiated mode has no composite states and no last-core rule to
//! enforce: CPU_SUSPEND behaves the same in both modes. The mode is still tracked,
//! reported, snapshotted and switched with the spec's DENIED rule.
//!
//! # Why not the `arm-psci` crate
//!
//! `arm-psci` 0.2.0 (which implements the same F.b issue) was evaluated for the wire types.
//! It does not fit: its `SystemOff2Type` rejects type 0, which this engine must accept; it
//! refuses AFFINITY_INFO level 3 for SMC32 calls; and several conversions assert or panic
//! (`From<Version> for u32`, `From<PowerState> for u32`, `Function::function_id` for mixed
//! CPU_ON arguments), which a guest-facing decoder must not contain. It also decodes
//! power_state in one fixed format, while ours depends on the VM's configuration. The
//! engine therefore has its own types in [`ids`] and a decoder in `decode`.
//!
//! # Example
//!
//! ```
//! use vpsci_firmware::testing::{self, FakePlatform};
//! use vpsci_firmware::{CallOutcome, FirmwareConfig, Mpidr, PowerState, VcpuId};
//!
//! let (fw, platform): (_, FakePlatform) = testing::firmware(FirmwareConfig::default(), 2)?;
//! // vCPU 0 starts vCPU 1 at 0x4000_0000 with context id 42 (CPU_ON, SMC64).
//! let on = testing::call(0, [0xC400_0003, Mpidr::from_index(1).raw(), 0x4000_0000, 42]);
//! assert!(matches!(fw.handle_call(&on, &platform), CallOutcome::Return { regs } if regs[0] == 0));
//! assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::OnPending);
//! // The VMM's thread for vCPU 1 is about to enter the guest.
//! assert!(fw.vcpu_started(VcpuId::new(1), &platform));
//! assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::On);
//! # Ok::<(), vpsci_firmware::ConfigError>(())
//! ```
//!
//! # Panic policy
//!
//! Nothing a guest passes can reach a panic: every register value decodes to a typed call
//! or a spec return code. Host misuse gets typed errors ([`ConfigError`],
//! [`SnapshotError`]) or a documented harmless answer.

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod config;
mod coordinator;
mod decode;
mod error;
pub mod features;
pub mod ids;
mod platform;
pub mod psci;
pub mod smccc;
mod snapshot;
mod stats;
mod sync;
mod system;
#[doc(hidden)]
pub mod testing;

pub use config::{
    FeatureSet, FirmwareConfig, MemoryRegion, OnPending, PowerStateFormat, PsciVersion, SocId,
    SuspendStates, WorkaroundState, Workarounds,
};
pub use coordinator::Firmware;
pub use decode::{encode_power_state, CpuPowerState, SuspendMode};
pub use error::{
    ConfigError, EntropyError, InvalidMpidr, ParseConduitError, ParseVersionError, PsciError,
    SnapshotError, SUCCESS,
};
pub use ids::{AffinityLevel, Conduit, FunctionId, Mpidr, Service, VcpuId};
pub use platform::{
    CallOutcome, Clock, EntryPoint, GuestCall, MonotonicClock, Platform, PowerState, QuiesceError,
    SuspendKind, SystemEvent, SystemVerdict, Transition, WakeOutcome,
};
pub use snapshot::SNAPSHOT_FORMAT_VERSION;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Firmware>();
    }
}
