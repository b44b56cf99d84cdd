//! A KVM VM: guest memory slots, the SMCCC filter, the vCPUs and the vGICv3.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_smccc_filter,
    kvm_smccc_filter_action_KVM_SMCCC_FILTER_DENY,
    kvm_smccc_filter_action_KVM_SMCCC_FILTER_FWD_TO_USER,
    kvm_smccc_filter_action_KVM_SMCCC_FILTER_HANDLE, kvm_userspace_memory_region, kvm_vcpu_init,
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION,
};
use std::sync::Arc;

use kvm_ioctls::{DeviceFd, Kvm, VmFd};

use super::regs::MPIDR_EL1;
use super::save;
use super::vcpu::KvmVcpu;
use crate::{DirtyLog, FilterAction, KvmError, SmcccRouting, VmState};
use vpsci_firmware::Mpidr;

/// Where the vGICv3 lives in guest physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgicLayout {
    /// Distributor base (64 KiB aligned).
    pub distributor: u64,
    /// Redistributor regions in order: (base, number of redistributors).
    /// Together they must hold one redistributor per vCPU.
    pub redistributor_regions: Vec<(u64, u32)>,
}

/// What [`KvmHost::create_vm`](crate::KvmHost::create_vm) builds.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Number of vCPUs; vCPU 0 starts powered on, the others powered off.
    pub vcpus: usize,
    /// Which SMCCC calls come to userspace.
    pub routing: SmcccRouting,
    /// Interrupt controller placement.
    pub vgic: VgicLayout,
}

/// A created VM. Its vCPUs are handed out once with [`KvmVm::take_vcpus`].
#[derive(Debug)]
pub struct KvmVm {
    vm: Arc<VmFd>,
    vgic: DeviceFd,
    vcpus: Vec<KvmVcpu>,
    mpidrs: Vec<Mpidr>,
    next_slot: u32,
    /// Every slot mapped, in slot order (slot `n` is `regions[n]`).
    regions: Vec<kvm_userspace_memory_region>,
}

impl KvmVm {
    /// Creates the VM: installs the SMCCC filter, creates and initialises every
    /// vCPU with the preferred target (secondaries powered off, PSCI 0.2+
    /// enabled so calls kept in the kernel still work), then the vGICv3 with
    /// the architected timer's default PPIs.
    pub(crate) fn create(kvm: &Kvm, spec: &VmSpec) -> Result<KvmVm, KvmError> {
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::ioctl("KVM_CREATE_VM", e))?;
        install_filter(&vm, &spec.routing)?;

        let mut kvi = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut kvi)
            .map_err(|e| KvmError::ioctl("KVM_ARM_PREFERRED_TARGET", e))?;
        kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;

        let mut vcpus = Vec::with_capacity(spec.vcpus);
        let mut mpidrs = Vec::with_capacity(spec.vcpus);
        for index in 0..spec.vcpus {
            let fd = vm
                .create_vcpu(index as u64)
                .map_err(|e| KvmError::ioctl("KVM_CREATE_VCPU", e))?;
            let vcpu = KvmVcpu::new(fd, index, kvi);
            vcpu.init(index == 0)?;
            let mpidr = Mpidr::from_mpidr_el1(vcpu.get_sysreg(MPIDR_EL1)?);
            mpidrs.push(mpidr);
            vcpus.push(vcpu.with_mpidr(mpidr));
        }
        let vgic = create_vgic(&vm, &spec.vgic)?;
        Ok(KvmVm {
            vm: Arc::new(vm),
            vgic,
            vcpus,
            mpidrs,
            next_slot: 0,
            regions: Vec::new(),
        })
    }

    /// MPIDR affinity of each vCPU, as KVM assigned it (for the device tree and
    /// the firmware topology).
    pub fn mpidrs(&self) -> &[Mpidr] {
        &self.mpidrs
    }

    /// Maps `size` bytes of host memory at `host_addr` as guest RAM at `guest_addr`.
    ///
    /// # Safety
    /// The host range must stay mapped, readable and writable, for as long as
    /// the VM exists, and must not be used for anything the guest must not see.
    pub unsafe fn map_memory(
        &mut self,
        guest_addr: u64,
        host_addr: *mut u8,
        size: u64,
    ) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: self.next_slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| KvmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        self.next_slot += 1;
        self.regions.push(region);
        Ok(())
    }

    /// Turns dirty page logging on or off for every RAM slot
    /// (`KVM_MEM_LOG_DIRTY_PAGES`, set by mapping each slot again with the
    /// flag). Turning it on starts every log clean; [`KvmVm::take_dirty_log`]
    /// then reports the pages the guest wrote since the previous fetch.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), KvmError> {
        for region in &self.regions {
            let region = kvm_userspace_memory_region {
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                ..*region
            };
            // SAFETY: the same host range `map_memory` mapped for this slot,
            // whose caller guaranteed it outlives the VM; only the flags change.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(|e| KvmError::ioctl("KVM_SET_USER_MEMORY_REGION(dirty log)", e))?;
        }
        Ok(())
    }

    /// Fetches and clears each RAM slot's dirty bitmap (`KVM_GET_DIRTY_LOG`),
    /// one [`DirtyLog`] per slot in slot order. Logging must be on.
    pub fn take_dirty_log(&self) -> Result<Vec<DirtyLog>, KvmError> {
        let page_size = host_page_size();
        self.regions
            .iter()
            .map(|r| {
                let bitmap = self
                    .vm
                    .get_dirty_log(r.slot, r.memory_size as usize)
                    .map_err(|e| KvmError::ioctl("KVM_GET_DIRTY_LOG", e))?;
                Ok(DirtyLog {
                    guest_addr: r.guest_phys_addr,
                    page_size,
                    pages: r.memory_size.div_ceil(page_size),
                    bitmap,
                })
            })
            .collect()
    }

    /// A clean log for each RAM slot (the shape [`KvmVm::take_dirty_log`]
    /// returns), for writes the VMM makes itself.
    pub fn clean_dirty_log(&self) -> Vec<DirtyLog> {
        let page_size = host_page_size();
        self.regions
            .iter()
            .map(|r| {
                DirtyLog::clean(
                    r.guest_phys_addr,
                    page_size,
                    r.memory_size.div_ceil(page_size),
                )
            })
            .collect()
    }

    /// A handle that drives shared peripheral interrupt `spi` (INTID 32 + `spi`).
    pub fn spi_line(&self, spi: u32) -> SpiLine {
        SpiLine {
            vm: Arc::clone(&self.vm),
            spi,
        }
    }

    /// Saves the VM's KVM state: LPI pending tables into guest RAM first,
    /// then every vCPU (registers, MP state), the counter and the vGICv3.
    /// Every vCPU of `vcpus` (all of the VM's, index order) must be out of
    /// `KVM_RUN`; save guest RAM after this returns.
    pub fn save_state(&self, vcpus: &[&KvmVcpu]) -> Result<VmState, KvmError> {
        save::save_vm(&save::Vgic { fd: &self.vgic }, vcpus)
    }

    /// Applies a saved state to this VM, created with the same number of
    /// vCPUs, none of which has run yet. The state is checked against the VM
    /// (counter frequency, vCPU count, MPIDRs) before anything is written.
    pub fn restore_state(&self, vcpus: &[&KvmVcpu], state: &VmState) -> Result<(), KvmError> {
        save::restore_vm(&save::Vgic { fd: &self.vgic }, vcpus, state)
    }

    /// Hands out the vCPUs (index order); later calls return an empty vector.
    pub fn take_vcpus(&mut self) -> Vec<KvmVcpu> {
        std::mem::take(&mut self.vcpus)
    }
}

/// The page size KVM's dirty bitmaps count in.
fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

/// Installs the routing table as SMCCC filter entries.
fn install_filter(vm: &VmFd, routing: &SmcccRouting) -> Result<(), KvmError> {
    if routing.is_kernel_psci() {
        return Ok(());
    }
    let probe = kvm_device_attr {
        group: KVM_ARM_VM_SMCCC_CTRL,
        attr: u64::from(KVM_ARM_VM_SMCCC_FILTER),
        ..Default::default()
    };
    if vm.has_device_attr(&probe).is_err() {
        return Err(KvmError::NoSmcccFilter);
    }
    for range in routing.filter_ranges() {
        let action = match range.action {
            FilterAction::Handle => kvm_smccc_filter_action_KVM_SMCCC_FILTER_HANDLE,
            FilterAction::Deny => kvm_smccc_filter_action_KVM_SMCCC_FILTER_DENY,
            FilterAction::ForwardToUser => kvm_smccc_filter_action_KVM_SMCCC_FILTER_FWD_TO_USER,
        };
        let filter = kvm_smccc_filter {
            base: range.base,
            nr_functions: range.count,
            action: action as u8,
            pad: [0; 15],
        };
        let attr = kvm_device_attr {
            group: KVM_ARM_VM_SMCCC_CTRL,
            attr: u64::from(KVM_ARM_VM_SMCCC_FILTER),
            addr: &filter as *const kvm_smccc_filter as u64,
            flags: 0,
        };
        vm.set_device_attr(&attr)
            .map_err(|e| KvmError::ioctl("KVM_ARM_VM_SMCCC_FILTER", e))?;
    }
    Ok(())
}

/// Creates and initialises the in-kernel vGICv3 (after all vCPUs exist).
fn create_vgic(vm: &VmFd, layout: &VgicLayout) -> Result<DeviceFd, KvmError> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut dev)
        .map_err(|e| KvmError::ioctl("KVM_CREATE_DEVICE(vGICv3)", e))?;
    let dist = layout.distributor;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
        &dist as *const u64 as u64,
        "vGIC distributor address",
    )?;
    for (index, &(base, count)) in layout.redistributor_regions.iter().enumerate() {
        // Documentation/virt/kvm/devices/arm-vgic-v3.rst: count in bits 63:52,
        // base in 51:16, region index in 11:0.
        let value: u64 = (u64::from(count) << 52) | base | index as u64;
        set_attr(
            &gic,
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION),
            &value as *const u64 as u64,
            "vGIC redistributor region",
        )?;
    }
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
        "vGIC init",
    )?;
    Ok(gic)
}

fn set_attr(
    dev: &DeviceFd,
    group: u32,
    attr: u64,
    addr: u64,
    op: &'static str,
) -> Result<(), KvmError> {
    let a = kvm_device_attr {
        group,
        attr,
        addr,
        flags: 0,
    };
    dev.set_device_attr(&a).map_err(|e| KvmError::ioctl(op, e))
}

/// Marks a feature bit for vCPUs that start powered off.
pub(crate) const POWER_OFF_BIT: u32 = 1 << KVM_ARM_VCPU_POWER_OFF;

/// One level-triggered shared peripheral interrupt of the vGIC.
#[derive(Debug, Clone)]
pub struct SpiLine {
    vm: Arc<VmFd>,
    spi: u32,
}

impl SpiLine {
    /// Raises (`true`) or lowers the line with `KVM_IRQ_LINE`.
    pub fn set_level(&self, high: bool) -> Result<(), KvmError> {
        // Documentation/virt/kvm/api.rst, KVM_IRQ_LINE on arm64: irq_type in
        // bits 31:24 (1 = SPI), vcpu index 23:16 (unused for SPIs), INTID 15:0.
        let irq = (1u32 << 24) | (32 + self.spi);
        self.vm
            .set_irq_line(irq, high)
            .map_err(|e| KvmError::ioctl("KVM_IRQ_LINE", e))
    }
}
