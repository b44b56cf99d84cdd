//! Linux KVM backend of vpsci for arm64 hosts.
//!
//! This crate owns everything that talks to `/dev/kvm`: the VM with its
//! in-kernel vGICv3 and architected timer, the SMCCC filter that forwards
//! PSCI and TRNG calls to userspace, the vCPUs (initialisation with the
//! preferred target, `KVM_RUN`, ONE_REG access, MP state) and the kick that
//! pulls a vCPU thread out of `KVM_RUN`. It knows nothing of PSCI semantics:
//! the firmware engine decides, the VMM carries the decisions out through
//! the types here.
//!
//! Everything that needs KVM only exists when building for `aarch64`; on other
//! hosts [`KvmHost::open`] reports [`KvmError::UnsupportedHostArch`] so a
//! binary can still build, parse its arguments and fail with a clear message.
//! The routing table ([`SmcccRouting`]) is plain data and builds everywhere.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod dirty;
mod error;
mod exit;
mod routing;
mod state;

#[cfg(target_arch = "aarch64")]
mod arm64;

pub use dirty::DirtyLog;
pub use error::KvmError;
pub use exit::{CoreReg, MpState, SystemEventKind, VcpuExit};
pub use routing::{FilterAction, FilterRange, SmcccRouting};
pub use state::{
    GicReg, GicState, GicSysreg, RedistributorState, RegValue, StateMismatch, VcpuState, VmState,
};

#[cfg(target_arch = "aarch64")]
pub use arm64::{
    host_cntfrq, install_kick_handler, KvmHost, KvmVcpu, KvmVm, SpiLine, VcpuKicker, VgicLayout,
    VmSpec,
};

/// Stand-in for the KVM host handle on architectures without arm64 KVM.
#[cfg(not(target_arch = "aarch64"))]
#[derive(Debug)]
pub struct KvmHost {
    _private: (),
}

#[cfg(not(target_arch = "aarch64"))]
impl KvmHost {
    /// Always fails: arm64 KVM only exists on arm64 hosts.
    pub fn open() -> Result<KvmHost, KvmError> {
        Err(KvmError::UnsupportedHostArch {
            arch: std::env::consts::ARCH,
        })
    }
}
