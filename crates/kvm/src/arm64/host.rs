//! The KVM system handle and the capability checks done before any VM exists.

use kvm_bindings::{
    kvm_vcpu_init, KVM_CAP_ARM_PSCI_0_2, KVM_CAP_ARM_SYSTEM_SUSPEND, KVM_CAP_DEVICE_CTRL,
    KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_MP_STATE, KVM_CAP_ONE_REG,
};
use kvm_ioctls::{Cap, Kvm};

use super::vm::{KvmVm, VmSpec};
use crate::KvmError;

/// An open `/dev/kvm` that was checked to be arm64 KVM with everything vpsci needs.
#[derive(Debug)]
pub struct KvmHost {
    kvm: Kvm,
}

/// Capabilities vpsci cannot run without, with the first Linux that has them.
const REQUIRED: &[(u32, &str, &str)] = &[
    (KVM_CAP_ONE_REG, "KVM_CAP_ONE_REG", "3.8"),
    (KVM_CAP_MP_STATE, "KVM_CAP_MP_STATE", "4.1"),
    (KVM_CAP_DEVICE_CTRL, "KVM_CAP_DEVICE_CTRL", "3.10"),
    (KVM_CAP_ARM_PSCI_0_2, "KVM_CAP_ARM_PSCI_0_2", "3.18"),
    (KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT", "4.11"),
    // Comes with KVM_MP_STATE_SUSPENDED and KVM_SYSTEM_EVENT_WAKEUP.
    (
        KVM_CAP_ARM_SYSTEM_SUSPEND,
        "KVM_MP_STATE_SUSPENDED (KVM_CAP_ARM_SYSTEM_SUSPEND)",
        "5.19",
    ),
];

impl KvmHost {
    /// Opens `/dev/kvm` and checks it is arm64 KVM recent enough for vpsci.
    /// Whether the SMCCC filter exists is checked per VM, in [`KvmHost::create_vm`].
    pub fn open() -> Result<KvmHost, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::NoDevice {
            reason: std::io::Error::from_raw_os_error(e.errno()).to_string(),
        })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(KvmError::NotArm64 {
                reason: format!("KVM API version {api}, expected 12"),
            });
        }
        for &(cap, name, needs) in REQUIRED {
            if kvm.check_extension_raw(libc::c_ulong::from(cap)) <= 0 {
                return Err(KvmError::KernelTooOld {
                    missing: name,
                    needs,
                });
            }
        }
        // An arm64 KVM always has a preferred vCPU target.
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;
        let mut kvi = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut kvi)
            .map_err(|e| KvmError::NotArm64 {
                reason: format!(
                    "KVM_ARM_PREFERRED_TARGET: {}",
                    std::io::Error::from_raw_os_error(e.errno())
                ),
            })?;
        Ok(KvmHost { kvm })
    }

    /// Most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        if self.kvm.check_extension(Cap::MaxVcpus) {
            self.kvm.get_max_vcpus()
        } else {
            self.kvm.get_nr_vcpus()
        }
    }

    /// Creates a VM as `spec` describes: installs the SMCCC filter, creates and
    /// initialises every vCPU with the preferred target (secondaries powered
    /// off), then the vGICv3.
    pub fn create_vm(&self, spec: &VmSpec) -> Result<KvmVm, KvmError> {
        KvmVm::create(&self.kvm, spec)
    }
}
