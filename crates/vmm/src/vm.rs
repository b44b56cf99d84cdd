//! VM assembly on KVM: guest RAM, the KVM VM with its vGICv3 and SMCCC
//! filter, the loaded image, initrd and device tree, the boot vCPU's entry
//! registers, and the MMIO bus the vCPU threads dispatch to.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};
use vpsci_kvm::{
    CoreReg, KvmError, KvmHost, KvmVcpu, KvmVm, SmcccRouting, SpiLine, VgicLayout, VmSpec,
};

use crate::devices::console::{ConsoleInput, UartDevice};
use crate::devices::irq::{InterruptLines, IrqLine, LineInfo, TrackedLine};
use crate::devices::pl031::{HostClock, Pl031, WallClock};
use crate::devices::rtc::RtcDevice;
use crate::devices::virtio_blk::{Block, DiskError, DiskSpec};
use crate::devices::virtio_mmio::VirtioMmio;
use crate::devices::{MmioDevice, MmioRange};
use crate::fdt::{self, FdtConfig, FdtError};
use crate::layout::{
    virtio_mmio_slot, GuestLayout, LayoutError, GICD_BASE, PL011_BASE, PL011_SIZE, PL011_SPI,
    PL031_BASE, PL031_SIZE, PL031_SPI, VIRTIO_MMIO_SIZE,
};
use crate::loader::{self, LoadError, LoadedImage};
use crate::snapshot::{CheckedSnapshot, DevicesState, DiskSnapshot, RestoredDisk, SnapshotError};
use vpsci_firmware::{FirmwareConfig, Mpidr};

pub use crate::devices::MmioBus;

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
    /// CPU idle states the device tree offers (entered with CPU_SUSPEND; see
    /// [`crate::fdt::IdleState::psci_standby`]); empty: the guest idles with WFI.
    pub idle_states: Vec<crate::fdt::IdleState>,
    /// What the devices connect to on the host.
    pub devices: DeviceOptions,
}

/// Host-side connections of the guest's devices.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// Input for the PL011's receive FIFO (none: the guest reads nothing).
    pub console_input: Option<Arc<ConsoleInput>>,
    /// Raw disk images, each a virtio block device on virtio-mmio slot 0, 1, ...
    pub disks: Vec<DiskSpec>,
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
    /// A `--disk` image could not be opened (nothing was written to it).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A snapshot's disk cannot be used again (nothing was written to it).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A device's host side could not be set up.
    #[error("cannot set up the {device}: {reason}")]
    Device {
        /// Which device.
        device: &'static str,
        /// What the host said.
        reason: String,
    },
}

/// A device interrupt wired to its SPI on the vGIC.
struct SpiIrq(SpiLine);

impl IrqLine for SpiIrq {
    fn set_level(&self, high: bool) {
        // A failed KVM_IRQ_LINE only loses an interrupt; the guest's polling
        // paths still see the device state, so there is nothing better to do.
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
    /// Where the image went (none for a restored VM).
    pub image: Option<LoadedImage>,
    /// The devices.
    pub mmio: Arc<MmioBus>,
    /// The devices by type (for a snapshot).
    pub devices: Devices,
}

/// The VM's devices by type, beside the bus that dispatches to them.
#[derive(Debug, Clone)]
pub struct Devices {
    /// The PL011.
    pub uart: Arc<UartDevice>,
    /// The PL031.
    pub rtc: Arc<RtcDevice>,
    /// The virtio block devices, in slot order.
    pub disks: Vec<Arc<DiskSlot>>,
    /// The devices' own writes into guest RAM, for a migration's dirty rounds.
    pub vmm_writes: Arc<crate::migrate::VmmWrites>,
}

impl Devices {
    /// Every device's state for a snapshot. Call only while the VM is paused
    /// (so no disk request runs: they are served inside vCPU exits); each
    /// writable disk image is flushed to the host's disk first, so the
    /// snapshot and the image form a consistent pair once it is written.
    pub fn state(&self) -> Result<DevicesState, String> {
        Ok(DevicesState {
            pl011: self.uart.state(),
            pl031: self.rtc.state(),
            disks: self
                .disks
                .iter()
                .map(|d| d.snapshot())
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A virtio block device on its virtio-mmio slot (its own lock: requests
/// are served on the notifying vCPU's thread).
#[derive(Debug)]
pub struct DiskSlot {
    index: usize,
    transport: std::sync::Mutex<VirtioMmio<Block>>,
}

impl DiskSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, VirtioMmio<Block>> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Flushes the image and saves the device (see [`Devices::state`]).
    fn snapshot(&self) -> Result<DiskSnapshot, String> {
        let transport = self.lock();
        let block = transport.device();
        let image = block.sync_and_stamp().map_err(|e| {
            format!(
                "cannot flush virtio disk {} ({}) for the snapshot: {e}",
                self.index,
                block.state().path.display()
            )
        })?;
        let (base, spi) = virtio_mmio_slot(self.index);
        Ok(DiskSnapshot {
            mmio_base: base.0,
            spi,
            transport: transport.state(),
            block: block.state().clone(),
            image,
        })
    }
}

impl MmioDevice for DiskSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock().read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.lock().write(offset, data);
    }
}

/// A disk for [`build_devices`]: a `--disk` image just opened, or a
/// snapshot's disk with its transport state.
enum NewDisk {
    Fresh(Block),
    Restored(RestoredDisk),
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
    // Opened before the VM exists: an image that cannot be opened fails the
    // build with nothing created and nothing written to it.
    let disks = options
        .devices
        .disks
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            Block::open(&disk.path, disk.readonly, &format!("vpsci-disk{index}"))
                .map(NewDisk::Fresh)
        })
        .collect::<Result<Vec<_>, _>>()?;
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
        virtio_devices: options.devices.disks.len(),
        idle_states: options.idle_states.clone(),
    })?;
    let fdt_addr = fdt::write_to_memory(memory, layout, &blob)?;
    let vcpus = kvm.take_vcpus();
    if let Some(boot) = vcpus.first() {
        boot.set_core(CoreReg::Pc, image.entry.0)?;
        boot.set_core(CoreReg::X(0), fdt_addr.0)?;
    }
    let (bus, devices) = build_devices(&kvm, &options.devices, disks, memory, console, None)?;
    Ok(Vm {
        kvm,
        vcpus,
        mpidrs,
        image: Some(image),
        mmio: Arc::new(bus),
        devices,
    })
}

/// Builds a VM from a checked snapshot whose memory is already in `memory`
/// (from [`CheckedSnapshot::load_memory`]): the same vCPUs and vGIC, the
/// saved KVM state written before any vCPU runs, the devices from their saved
/// states. Nothing is loaded and no device tree is built: the guest has them
/// in its memory. `routing` must forward PSCI to the engine (the caller
/// checks, before calling, that it can honour the guest's firmware).
///
/// The disks come from the snapshot (`devices.disks` must be empty): each
/// image is opened again at its saved path and checked, and each transport
/// state checked against guest memory, before the KVM VM is created
/// ([`CheckedSnapshot::restore_disks`]); they return to the same slots and
/// interrupt lines.
pub fn build_restored(
    host: &KvmHost,
    snapshot: &CheckedSnapshot,
    routing: &SmcccRouting,
    memory: &GuestMemoryMmap,
    devices: &DeviceOptions,
    console: Box<dyn Write + Send>,
) -> Result<Vm, VmError> {
    let layout = &snapshot.layout;
    if !devices.disks.is_empty() {
        return Err(VmError::Device {
            device: "virtio block device",
            reason: "a restored VM's disks are the snapshot's; no others can be added".to_owned(),
        });
    }
    let disks = snapshot
        .restore_disks(memory)?
        .into_iter()
        .map(NewDisk::Restored)
        .collect();
    let spec = VmSpec {
        vcpus: layout.cpus() as usize,
        routing: routing.clone(),
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
    let vcpus = kvm.take_vcpus();
    let refs: Vec<&KvmVcpu> = vcpus.iter().collect();
    kvm.restore_state(&refs, &snapshot.vm)?;
    let mpidrs = kvm.mpidrs().to_vec();
    let (bus, devices) = build_devices(
        &kvm,
        devices,
        disks,
        memory,
        console,
        Some(&snapshot.devices),
    )?;
    Ok(Vm {
        kvm,
        vcpus,
        mpidrs,
        image: None,
        mmio: Arc::new(bus),
        devices,
    })
}

/// Device names as the event log spells them.
const UART_NAME: &str = "pl011";
const RTC_NAME: &str = "pl031";
const BLOCK_NAME: &str = "virtio-blk";

/// The devices at their [`crate::layout`] places, their interrupts on the
/// vGIC through [`TrackedLine`]s; disk `i` on virtio-mmio slot `i`.
fn build_devices(
    kvm: &KvmVm,
    options: &DeviceOptions,
    disks: Vec<NewDisk>,
    memory: &GuestMemoryMmap,
    console: Box<dyn Write + Send>,
    saved: Option<&DevicesState>,
) -> Result<(MmioBus, Devices), VmError> {
    let mut infos = vec![
        LineInfo {
            device: UART_NAME,
            spi: PL011_SPI,
        },
        LineInfo {
            device: RTC_NAME,
            spi: PL031_SPI,
        },
    ];
    for index in 0..disks.len() {
        infos.push(LineInfo {
            device: BLOCK_NAME,
            spi: virtio_mmio_slot(index).1,
        });
    }
    let lines = Arc::new(InterruptLines::new(&infos));
    let irq = |index: usize| -> Box<dyn IrqLine> {
        let spi = infos.get(index).map_or(0, |i| i.spi);
        Box::new(TrackedLine::new(
            Arc::clone(&lines),
            index,
            Box::new(SpiIrq(kvm.spi_line(spi))),
        ))
    };
    let mut ranges = Vec::new();
    let vmm_writes = Arc::new(crate::migrate::VmmWrites::default());
    let mut slots = Vec::with_capacity(disks.len());
    for (index, disk) in disks.into_iter().enumerate() {
        let transport = match disk {
            NewDisk::Fresh(block) => VirtioMmio::new(block, memory.clone(), irq(2 + index)),
            NewDisk::Restored(saved) => {
                VirtioMmio::restore(saved.block, memory.clone(), irq(2 + index), saved.transport)
            }
        }
        .with_write_log(Arc::clone(&vmm_writes));
        let slot = Arc::new(DiskSlot {
            index,
            transport: std::sync::Mutex::new(transport),
        });
        ranges.push(MmioRange {
            base: virtio_mmio_slot(index).0,
            size: VIRTIO_MMIO_SIZE,
            device: Arc::clone(&slot) as Arc<dyn MmioDevice>,
        });
        slots.push(slot);
    }
    let uart = UartDevice::from_state(
        saved.map(|d| d.pl011.clone()).unwrap_or_default(),
        console,
        irq(0),
        options.console_input.clone(),
    );
    let clock: Arc<dyn WallClock> = Arc::new(HostClock);
    let pl031 = Pl031::from_state(
        saved.map(|d| d.pl031).unwrap_or_default(),
        Arc::clone(&clock),
        irq(1),
    );
    let rtc = Arc::new(RtcDevice::new(pl031, clock).map_err(|e| VmError::Device {
        device: "PL031 RTC alarm thread",
        reason: e.to_string(),
    })?);
    ranges.push(MmioRange {
        base: PL011_BASE,
        size: PL011_SIZE,
        device: Arc::clone(&uart) as Arc<dyn MmioDevice>,
    });
    ranges.push(MmioRange {
        base: PL031_BASE,
        size: PL031_SIZE,
        device: Arc::clone(&rtc) as Arc<dyn MmioDevice>,
    });
    let devices = Devices {
        uart,
        rtc,
        disks: slots,
        vmm_writes,
    };
    Ok((MmioBus::new(ranges, lines), devices))
}

fn map_region(kvm: &mut KvmVm, region: &GuestRegionMmap) -> Result<(), KvmError> {
    let host = region.as_ptr();
    // SAFETY: `build`'s caller keeps the guest memory alive for as long as
    // the VM and its vCPU threads exist; the region is RAM for the guest only.
    unsafe { kvm.map_memory(region.start_addr().0, host, region.len()) }
}
