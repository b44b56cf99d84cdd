//! Errors of the KVM backend.

use thiserror::Error;

/// Something KVM or the host refused. Every variant names the operation that
/// failed so a one-line message tells the operator what went wrong.
#[derive(Debug, Error)]
pub enum KvmError {
    /// This binary was built for a host architecture without arm64 KVM.
    #[error(
        "this is an {arch} host: arm64 KVM is not available here; run vpsci inside the nested \
         arm64 VM with `cargo xtask nested -- CMD`, or on an arm64 Linux host"
    )]
    UnsupportedHostArch {
        /// The architecture the binary was built for.
        arch: &'static str,
    },
    /// `/dev/kvm` does not exist or cannot be opened.
    #[error("cannot open /dev/kvm ({reason}): is KVM enabled and do you have access to it?")]
    NoDevice {
        /// What `open` said.
        reason: String,
    },
    /// `/dev/kvm` is there but is not arm64 KVM (no preferred vCPU target).
    #[error("/dev/kvm is not an arm64 KVM ({reason})")]
    NotArm64 {
        /// What the probe said.
        reason: String,
    },
    /// The kernel lacks something vpsci needs.
    #[error(
        "host kernel too old: {missing} is not supported (vpsci needs Linux {needs} or later)"
    )]
    KernelTooOld {
        /// The missing capability.
        missing: &'static str,
        /// The first Linux version that has it.
        needs: &'static str,
    },
    /// The kernel has no SMCCC filter, so PSCI cannot be forwarded to userspace.
    #[error(
        "host kernel has no SMCCC filter (KVM_ARM_VM_SMCCC_FILTER, Linux 6.4+): PSCI cannot be \
         handled by vpsci; pass --in-kernel-psci to use KVM's in-kernel PSCI instead"
    )]
    NoSmcccFilter,
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation that failed.
        op: &'static str,
        /// The error number KVM returned.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU index outside the VM.
    #[error("vCPU {index} does not exist (the VM has {count})")]
    NoSuchVcpu {
        /// Requested index.
        index: usize,
        /// vCPUs in the VM.
        count: usize,
    },
    /// A ONE_REG access to one register failed.
    #[error("{op} of register {id:#x} failed: {source}")]
    Register {
        /// The operation.
        op: &'static str,
        /// The register's ONE_REG id.
        id: u64,
        /// The error number KVM returned.
        #[source]
        source: std::io::Error,
    },
    /// KVM listed a register wider than any arm64 register.
    #[error("KVM lists register {id:#x} with a size vpsci cannot save")]
    RegisterTooLarge {
        /// Its ONE_REG id.
        id: u64,
    },
    /// A buffer for saved state could not be allocated.
    #[error("the {what} is too large to allocate")]
    StateTooLarge {
        /// What.
        what: &'static str,
    },
    /// A saved state does not fit this VM or host.
    #[error("the saved VM state does not fit: {reason}")]
    StateMismatch {
        /// Why.
        reason: String,
    },
    /// A register number outside x0..x30.
    #[error("x{0} is not a general purpose register")]
    BadRegister(u8),
    /// The routing table asked for a range KVM cannot filter.
    #[error("SMCCC function range {base:#x}+{count} is invalid: {reason}")]
    BadRoute {
        /// First function ID.
        base: u32,
        /// Number of functions.
        count: u32,
        /// Why it was refused.
        reason: &'static str,
    },
}

impl KvmError {
    /// Wraps an errno from an ioctl with the name of the operation.
    #[cfg(target_arch = "aarch64")]
    pub(crate) fn ioctl(op: &'static str, e: kvm_ioctls::Error) -> KvmError {
        KvmError::Ioctl {
            op,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }

    /// Wraps an errno from a ONE_REG access with the register's id.
    #[cfg(target_arch = "aarch64")]
    pub(crate) fn register(op: &'static str, id: u64, e: kvm_ioctls::Error) -> KvmError {
        KvmError::Register {
            op,
            id,
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    }
}
