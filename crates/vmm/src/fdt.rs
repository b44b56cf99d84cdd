//! The flattened device tree the guest receives in x0 at boot.
//!
//! Nodes (all addresses from [`crate::layout`]):
//! - `/`: `#address-cells = #size-cells = 2`, `compatible = "linux,dummy-virt"`,
//!   `interrupt-parent` = the GIC;
//! - `/cpus/cpu@<mpidr>`: one per vCPU, `reg` = its MPIDR affinity bits
//!   (`/cpus` has 2 address cells: Aff3 in the first, Aff2..Aff0 in the
//!   second), `enable-method = "psci"`, and `cpu-idle-states` when the VM
//!   offers PSCI idle states;
//! - `/cpus/idle-states` (only when [`FdtConfig::idle_states`] lists some):
//!   `entry-method = "psci"` and one `arm,idle-state` node per state, whose
//!   `arm,psci-suspend-param` is the CPU_SUSPEND `power_state` the guest's
//!   idle driver passes;
//! - `/memory@40000000`;
//! - `/psci`: `compatible` = `"arm,psci-1.0", "arm,psci-0.2"` for PSCI 1.x,
//!   `"arm,psci-0.2"` for 0.2; `method` = `"hvc"` or `"smc"`. No per-function
//!   ID properties (`cpu_on`, ...): Linux's PSCI binding
//!   (`Documentation/devicetree/bindings/arm/psci.yaml`) requires them only
//!   for the pre-0.2 `"arm,psci"` compatible, which we never claim, and says an
//!   OS with PSCI 0.2 support ignores them;
//! - `/intc@8000000`: GICv3 distributor plus one `reg` entry per
//!   redistributor region (`#redistributor-regions`);
//! - `/timer`: `arm,armv8-timer` with its four PPIs, `always-on`;
//! - `/apb-pclk`: a 24 MHz fixed clock feeding the UART;
//! - `/pl011@9000000`: the UART on SPI 1;
//! - `/pl031@9010000`: the RTC on SPI 2, a `wakeup-source` (its alarm can
//!   wake a system-suspended guest);
//! - `/virtio_mmio@e000000`, ...: one `virtio,mmio` node per virtio device
//!   (`--disk`), SPI 16 up;
//! - `/chosen`: `bootargs`, `stdout-path`, and `linux,initrd-start/-end`
//!   when there is an initrd.

use std::collections::HashSet;

use thiserror::Error;
use vm_fdt::FdtWriter;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    timer_ppi, GuestLayout, FDT_MAX_SIZE, GICD_BASE, GICD_SIZE, PL011_BASE, PL011_SIZE, PL011_SPI,
    PL031_BASE, PL031_SIZE, PL031_SPI, VIRTIO_MMIO_SIZE,
};
use crate::loader::InitrdRange;
use vpsci_firmware::{Conduit, Mpidr, PsciVersion};

const PHANDLE_GIC: u32 = 1;
const PHANDLE_APB_PCLK: u32 = 2;
/// Phandle of the first idle state; the others follow.
const PHANDLE_IDLE_STATE_BASE: u32 = 0x100;
/// Interrupt specifier type cell: shared peripheral interrupt.
const GIC_SPI: u32 = 0;
/// Interrupt specifier type cell: private peripheral interrupt.
const GIC_PPI: u32 = 1;
/// Interrupt specifier flags cell: level-triggered, active high.
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// The UART reference clock, as QEMU's `virt` board gives it.
const APB_PCLK_HZ: u32 = 24_000_000;

/// What the device tree describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdtConfig {
    /// RAM size, vCPU count and interrupt controller layout.
    pub layout: GuestLayout,
    /// MPIDR affinity of each vCPU, in vCPU order (one per vCPU).
    pub cpus: Vec<Mpidr>,
    /// PSCI version the firmware reports.
    pub psci_version: PsciVersion,
    /// Conduit the guest must use.
    pub conduit: Conduit,
    /// Kernel command line (`/chosen/bootargs`).
    pub cmdline: String,
    /// Where the initrd was loaded, if any.
    pub initrd: Option<InitrdRange>,
    /// virtio-mmio devices present (slots 0.. of [`crate::layout::virtio_mmio_slot`]).
    pub virtio_devices: usize,
    /// CPU idle states entered with PSCI CPU_SUSPEND (none: the guest idles
    /// with WFI only).
    pub idle_states: Vec<IdleState>,
}

/// A CPU idle state the guest enters with PSCI CPU_SUSPEND (the `arm,idle-state`
/// device-tree binding, Linux `Documentation/devicetree/bindings/cpu/idle-states.yaml`;
/// the `power_state` parameter is DEN0022 F.b §5.4.2). Linux's PSCI cpuidle
/// driver picks a state when the expected idle time exceeds `min_residency_us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleState {
    /// Node name under `/cpus/idle-states` (`cpu-...`).
    pub name: String,
    /// The CPU_SUSPEND `power_state` value (`arm,psci-suspend-param`).
    pub psci_suspend_param: u32,
    /// Worst-case time to enter the state (`entry-latency-us`).
    pub entry_latency_us: u32,
    /// Worst-case time to leave it (`exit-latency-us`).
    pub exit_latency_us: u32,
    /// Shortest stay that pays off (`min-residency-us`).
    pub min_residency_us: u32,
}

impl IdleState {
    /// The firmware's core standby state (retention: no context is lost, the
    /// call returns on a wake-up interrupt), with latencies of a few
    /// microseconds like a real core's retention state.
    pub fn psci_standby(firmware: &vpsci_firmware::FirmwareConfig) -> IdleState {
        IdleState {
            name: "cpu-standby".to_owned(),
            psci_suspend_param: vpsci_firmware::encode_power_state(
                firmware,
                vpsci_firmware::CpuPowerState::Standby,
            ),
            entry_latency_us: 10,
            exit_latency_us: 10,
            min_residency_us: 100,
        }
    }
}

/// Why a device tree could not be built or placed.
#[derive(Debug, Error)]
pub enum FdtError {
    /// `cpus` does not list one MPIDR per vCPU of the layout.
    #[error("{got} MPIDRs given for {expected} vCPUs")]
    CpuCountMismatch {
        /// vCPUs in the layout.
        expected: u32,
        /// MPIDRs given.
        got: usize,
    },
    /// Two vCPUs with the same MPIDR.
    #[error("MPIDR {mpidr} is given to two vCPUs")]
    DuplicateMpidr {
        /// The value.
        mpidr: Mpidr,
    },
    /// The device tree writer failed.
    #[error("building the device tree failed: {0}")]
    Build(#[from] vm_fdt::Error),
    /// The blob exceeds the space reserved for it.
    #[error("device tree of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Blob size.
        size: usize,
        /// The limit ([`FDT_MAX_SIZE`]).
        max: u64,
    },
    /// Writing it to guest memory failed.
    #[error("cannot write the device tree to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// `compatible` strings of the `/psci` node for a version.
pub fn psci_compatible(version: PsciVersion) -> Vec<String> {
    let mut list = Vec::new();
    if version.encoded() >= 1 << 16 {
        list.push("arm,psci-1.0".to_owned());
    }
    list.push("arm,psci-0.2".to_owned());
    list
}

/// Builds the device tree blob.
pub fn build(config: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    check_cpus(config)?;
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    write_cpus(&mut fdt, &config.cpus, &config.idle_states)?;
    write_memory(&mut fdt, &config.layout)?;
    write_psci(&mut fdt, config.psci_version, config.conduit)?;
    write_gic(&mut fdt, &config.layout)?;
    write_timer(&mut fdt)?;
    write_uart(&mut fdt)?;
    write_rtc(&mut fdt)?;
    for index in 0..config.virtio_devices.min(crate::layout::MAX_VIRTIO_DEVICES) {
        write_virtio_mmio(&mut fdt, index)?;
    }
    write_chosen(&mut fdt, config)?;

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge {
            size: blob.len(),
            max: FDT_MAX_SIZE,
        });
    }
    Ok(blob)
}

/// Writes `blob` at [`GuestLayout::fdt_addr`] and returns that address
/// (the value for the boot vCPU's x0).
pub fn write_to_memory(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    blob: &[u8],
) -> Result<GuestAddress, FdtError> {
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge {
            size: blob.len(),
            max: FDT_MAX_SIZE,
        });
    }
    let addr = layout.fdt_addr();
    mem.write_slice(blob, addr)?;
    Ok(addr)
}

fn check_cpus(config: &FdtConfig) -> Result<(), FdtError> {
    if config.cpus.len() != config.layout.cpus() as usize {
        return Err(FdtError::CpuCountMismatch {
            expected: config.layout.cpus(),
            got: config.cpus.len(),
        });
    }
    let mut seen = HashSet::new();
    for &mpidr in &config.cpus {
        if !seen.insert(mpidr) {
            return Err(FdtError::DuplicateMpidr { mpidr });
        }
    }
    Ok(())
}

fn write_cpus(fdt: &mut FdtWriter, cpus: &[Mpidr], idle: &[IdleState]) -> Result<(), FdtError> {
    let node = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    let idle_phandles: Vec<u32> = (0..idle.len() as u32)
        .map(|i| PHANDLE_IDLE_STATE_BASE + i)
        .collect();
    if !idle.is_empty() {
        write_idle_states(fdt, idle, &idle_phandles)?;
    }
    for mpidr in cpus.iter().map(|m| m.raw()) {
        let cpu = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", mpidr)?;
        if !idle_phandles.is_empty() {
            fdt.property_array_u32("cpu-idle-states", &idle_phandles)?;
        }
        fdt.end_node(cpu)?;
    }
    fdt.end_node(node)?;
    Ok(())
}

fn write_idle_states(
    fdt: &mut FdtWriter,
    states: &[IdleState],
    phandles: &[u32],
) -> Result<(), FdtError> {
    let node = fdt.begin_node("idle-states")?;
    fdt.property_string("entry-method", "psci")?;
    for (state, &phandle) in states.iter().zip(phandles) {
        let child = fdt.begin_node(&state.name)?;
        fdt.property_string("compatible", "arm,idle-state")?;
        fdt.property_u32("arm,psci-suspend-param", state.psci_suspend_param)?;
        fdt.property_u32("entry-latency-us", state.entry_latency_us)?;
        fdt.property_u32("exit-latency-us", state.exit_latency_us)?;
        fdt.property_u32("min-residency-us", state.min_residency_us)?;
        fdt.property_phandle(phandle)?;
        fdt.end_node(child)?;
    }
    fdt.end_node(node)?;
    Ok(())
}

fn write_memory(fdt: &mut FdtWriter, layout: &GuestLayout) -> Result<(), FdtError> {
    let base = layout.ram_base().0;
    let node = fdt.begin_node(&format!("memory@{base:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[base, layout.ram_size()])?;
    fdt.end_node(node)?;
    Ok(())
}

fn write_psci(fdt: &mut FdtWriter, version: PsciVersion, conduit: Conduit) -> Result<(), FdtError> {
    let node = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", psci_compatible(version))?;
    fdt.property_string(
        "method",
        match conduit {
            Conduit::Hvc => "hvc",
            Conduit::Smc => "smc",
        },
    )?;
    fdt.end_node(node)?;
    Ok(())
}

fn write_gic(fdt: &mut FdtWriter, layout: &GuestLayout) -> Result<(), FdtError> {
    let regions = layout.redistributor_regions();
    let mut reg = vec![GICD_BASE.0, GICD_SIZE];
    for r in &regions {
        reg.extend([r.base.0, r.size()]);
    }
    let node = fdt.begin_node(&format!("intc@{:x}", GICD_BASE.0))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64("reg", &reg)?;
    fdt.property_u32("#redistributor-regions", regions.len() as u32)?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(node)?;
    Ok(())
}

fn write_timer(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let mut interrupts = Vec::new();
    for ppi in [
        timer_ppi::SECURE_PHYS,
        timer_ppi::NONSECURE_PHYS,
        timer_ppi::VIRT,
        timer_ppi::HYP_PHYS,
    ] {
        interrupts.extend([GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH]);
    }
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_array_u32("interrupts", &interrupts)?;
    fdt.property_null("always-on")?;
    fdt.end_node(node)?;
    Ok(())
}

fn write_uart(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_PCLK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_APB_PCLK)?;
    fdt.end_node(clock)?;

    let node = fdt.begin_node(&uart_node_name())?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl011".to_owned(), "arm,primecell".to_owned()],
    )?;
    fdt.property_array_u64("reg", &[PL011_BASE.0, PL011_SIZE])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, PL011_SPI, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_array_u32("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
    fdt.property_string_list(
        "clock-names",
        vec!["uartclk".to_owned(), "apb_pclk".to_owned()],
    )?;
    fdt.end_node(node)?;
    Ok(())
}

/// The PL031 (`arm,pl031` binding): an AMBA PrimeCell, so it needs the
/// `apb_pclk` clock; `wakeup-source` lets Linux arm its interrupt as a
/// wake-up interrupt across suspend to RAM.
fn write_rtc(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("pl031@{:x}", PL031_BASE.0))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl031".to_owned(), "arm,primecell".to_owned()],
    )?;
    fdt.property_array_u64("reg", &[PL031_BASE.0, PL031_SIZE])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, PL031_SPI, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_u32("clocks", PHANDLE_APB_PCLK)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.property_null("wakeup-source")?;
    fdt.end_node(node)?;
    Ok(())
}

/// A `virtio,mmio` transport (Linux binding `virtio/mmio.yaml`); guest
/// memory is coherent for the device (`dma-coherent`).
fn write_virtio_mmio(fdt: &mut FdtWriter, index: usize) -> Result<(), FdtError> {
    let (base, spi) = crate::layout::virtio_mmio_slot(index);
    let node = fdt.begin_node(&format!("virtio_mmio@{:x}", base.0))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[base.0, VIRTIO_MMIO_SIZE])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, spi, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_null("dma-coherent")?;
    fdt.end_node(node)?;
    Ok(())
}

fn uart_node_name() -> String {
    format!("pl011@{:x}", PL011_BASE.0)
}

fn write_chosen(fdt: &mut FdtWriter, config: &FdtConfig) -> Result<(), FdtError> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &config.cmdline)?;
    fdt.property_string("stdout-path", &format!("/{}", uart_node_name()))?;
    if let Some(initrd) = config.initrd {
        fdt.property_u64("linux,initrd-start", initrd.start.0)?;
        fdt.property_u64("linux,initrd-end", initrd.end().0)?;
    }
    fdt.end_node(node)?;
    Ok(())
}
