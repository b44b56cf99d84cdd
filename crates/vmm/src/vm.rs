//! VM assembly on KVM: guest RAM, the KVM VM with its vGICv3 and SMCCC
//! filter, the loaded image, initrd and device tree, the boot vCPU's entry
//! registers, and the MMIO bus the vCPU threads dispatch to.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};
use vpsci_kvm::{
    CoreReg, KvmError, KvmHost, KvmVcpu, KvmVm, SmcccRouting, SpiLine, VgicLayout, VmSpec,
};

use crate::fdt::{self, FdtConfig, FdtError};
use crate::layout::{GuestLayout, LayoutError, GICD_BASE, PL011_BASE, PL011_SIZE, PL011_SPI};
use crate::loader::{self, LoadError, LoadedImage};
use crate::uart::{IrqLine, Pl011};
use vpsci_firmware::{FirmwareConfig, Mpidr};

/// The guest image, from a file or already in memory (tests, built-in guests).
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// Read and detect the format from this file.
    File(PathBuf),
    /// These bytes (format detected the same way).
    Bytes(Vec<u8>),
}

/// Everything needed to assemble one VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// vCPUs, RAM and device placement.
    pub layout: GuestLayout,
    /// What to boot.
    pub image: ImageSource,
    /// Optional initrd file.
    pub initrd: Option<PathBuf>,
    /// Kernel command line for `/chosen/bootargs`.
    pub cmdline: String,
    /// The guest's firmware: the engine's configuration (PSCI version, conduit, CPU_ON
    /// answers, ...); the device tree advertises its version and conduit.
    pub firmware: FirmwareConfig,
    /// Which SMCCC calls KVM forwards to vpsci.
    pub routing: SmcccRouting,
}

/// Why a VM could not be assembled.
#[derive(Debug, Error)]
pub enum VmError {
    /// KVM refused something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The image or initrd could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The device tree could not be built or placed.
    #[error(transparent)]
    Fdt(#[from] FdtError),
}

/// Where guest MMIO goes: today one PL011 at [`PL011_BASE`].
pub struct MmioBus {
    uart: Mutex<Pl011>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioBus").finish_non_exhaustive()
    }
}

impl MmioBus {
    /// A bus whose UART writes to `console` and interrupts through `irq`.
    pub fn new(console: Box<dyn Write + Send>, irq: Box<dyn IrqLine>) -> MmioBus {
        MmioBus {
            uart: Mutex::new(Pl011::new(console, irq)),
        }
    }

    /// Whether `addr` belongs to a device.
    pub fn claims(&self, addr: u64) -> bool {
        uart_offset(addr).is_some()
    }

    /// A load of `data.len()` bytes at `addr`; unclaimed addresses read as zero.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match uart_offset(addr) {
            Some(off) => self
                .uart
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(off, data),
            None => data.fill(0),
        }
    }

    /// A store of `data` at `addr`; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some(off) = uart_offset(addr) {
            self.uart
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(off, data);
        }
    }
}

fn uart_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(PL011_BASE.0)
        .filter(|&off| off < PL011_SIZE)
}

/// The UART's interrupt wired to its SPI on the vGIC.
struct UartIrq(SpiLine);

impl IrqLine for UartIrq {
    fn set_level(&self, high: bool) {
        // A failed KVM_IRQ_LINE only loses an interrupt; the guest's polling
        // paths still see the UART state, so there is nothing better to do.
        let _ = self.0.set_level(high);
    }
}

/// An assembled VM, ready for its vCPU threads.
#[derive(Debug)]
pub struct Vm {
    /// The KVM VM (kept alive while vCPUs run).
    pub kvm: KvmVm,
    /// vCPUs in index order; vCPU 0 is set up to boot the image.
    pub vcpus: Vec<KvmVcpu>,
    /// MPIDR affinity of each vCPU.
    pub mpidrs: Vec<Mpidr>,
    /// Where the image went.
    pub image: LoadedImage,
    /// The devices.
    pub mmio: Arc<MmioBus>,
}

/// Builds the VM: RAM, KVM VM and vCPUs, image, initrd, device tree and the
/// boot vCPU's registers (Linux arm64 boot protocol: x0 = device tree,
/// x1..x3 = 0, MMU off, at the image entry).
///
/// `memory` is the guest RAM (from [`GuestLayout::create_memory`]); it must
/// outlive the returned VM and every thread running its vCPUs.
pub fn build(
    host: &KvmHost,
    options: &VmOptions,
    memory: &GuestMemoryMmap,
    console: Box<dyn Write + Send>,
) -> Result<Vm, VmError> {
    let layout = &options.layout;
    let spec = VmSpec {
        vcpus: layout.cpus() as usize,
        routing: options.routing.clone(),
        vgic: VgicLayout {
            distributor: GICD_BASE.0,
            redistributor_regions: layout
                .redistributor_regions()
                .iter()
                .map(|r| (r.base.0, r.count))
                .collect(),
        },
    };
    let mut kvm = host.create_vm(&spec)?;
    for region in memory.iter() {
        map_region(&mut kvm, region)?;
    }
    let image = match &options.image {
        ImageSource::File(path) => loader::load_image(memory, layout, path)?,
        ImageSource::Bytes(bytes) => loader::load_image_bytes(memory, layout, bytes)?,
    };
    let initrd = match &options.initrd {
        Some(path) => Some(loader::load_initrd(memory, layout, path, image.end)?),
        None => None,
    };
    let mpidrs = kvm.mpidrs().to_vec();
    let blob = fdt::build(&FdtConfig {
        layout: *layout,
        cpus: mpidrs.clone(),
        psci_version: options.firmware.psci_version,
        conduit: options.firmware.conduit,
        cmdline: options.cmdline.clone(),
        initrd,
    })?;
    let fdt_addr = fdt::write_to_memory(memory, layout, &blob)?;
    let vcpus = kvm.take_vcpus();
    if let Some(boot) = vcpus.first() {
        boot.set_core(CoreReg::Pc, image.entry.0)?;
        boot.set_core(CoreReg::X(0), fdt_addr.0)?;
    }
    let mmio = Arc::new(MmioBus::new(
        console,
        Box::new(UartIrq(kvm.spi_line(PL011_SPI))),
    ));
    Ok(Vm {
        kvm,
        vcpus,
        mpidrs,
        image,
        mmio,
    })
}

fn map_region(kvm: &mut KvmVm, region: &GuestRegionMmap) -> Result<(), KvmError> {
    let host = region.as_ptr();
    // SAFETY: `build`'s caller keeps the guest memory alive for as long as
    // the VM and its vCPU threads exist; the region is RAM for the guest only.
    unsafe { kvm.map_memory(region.start_addr().0, host, region.len()) }
}

impl crate::vcpu::Mmio for MmioBus {
    fn read(&self, addr: u64, data: &mut [u8]) {
        MmioBus::read(self, addr, data);
    }

    fn write(&self, addr: u64, data: &[u8]) {
        MmioBus::write(self, addr, data);
    }
}
