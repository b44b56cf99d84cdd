//! The guest physical memory map: where RAM, the devices, the interrupt
//! controller, the image, the device tree and the initrd live.
//!
//! Below RAM the map follows QEMU's `virt` machine, so guests written for it
//! find the UART and the interrupt controller where they expect them:
//!
//! | range | what |
//! |---|---|
//! | `0x0800_0000..0x0801_0000` | GICv3 distributor |
//! | `0x080A_0000..0x0900_0000` | GICv3 redistributors of vCPUs 0..=122 (128 KiB each) |
//! | `0x0900_0000..0x0900_1000` | PL011 UART, SPI 1 (INTID 33) |
//! | `0x0901_0000..0x0901_1000` | PL031 RTC, SPI 2 (INTID 34) |
//! | `0x0A00_0000..0x0D0A_0000` | GICv3 redistributors of vCPUs 123..=511 (only with more than 123 vCPUs) |
//! | `0x0E00_0000..0x0E00_1000` | virtio-mmio devices 0..=7 (0x200 each), SPIs 16..=23 |
//! | `0x4000_0000..` | RAM |
//!
//! The first redistributor region is QEMU's: it ends where the UART starts,
//! so it holds 123 redistributors. A VM with more vCPUs gets a second,
//! contiguous region at `0x0A00_0000` (QEMU puts its second region in high
//! memory instead; ours stays below 4 GiB and below RAM). Both regions are
//! described in the device tree (`#redistributor-regions`) and must be given
//! to KVM as `KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION` entries in the order of
//! [`GuestLayout::redistributor_regions`].
//!
//! Inside RAM:
//! - a raw image is loaded at RAM + 0x8_0000 (as QEMU does), a Linux arm64
//!   `Image` at RAM (2 MiB aligned) + its `text_offset`, an ELF where its
//!   program headers say;
//! - the device tree sits in the last 2 MiB of RAM ([`GuestLayout::fdt_addr`],
//!   2 MiB aligned; Linux accepts at most 2 MiB and needs 8-byte alignment);
//! - the initrd sits directly below the device tree, its start aligned down
//!   to 4 KiB ([`GuestLayout::initrd_addr`]).

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest physical address where RAM starts.
pub const RAM_BASE: GuestAddress = GuestAddress(0x4000_0000);
/// Offset from [`RAM_BASE`] at which a raw (headerless) image is loaded.
pub const RAW_IMAGE_OFFSET: u64 = 0x8_0000;
/// Smallest RAM size a VM may have (room for an image, initrd and device tree).
pub const MIN_RAM_SIZE: u64 = 16 << 20;
/// RAM must end at or below 1 TiB, the smallest IPA space (40 bits) KVM
/// gives a VM by default.
pub const MAX_RAM_END: u64 = 1 << 40;
/// Largest RAM size: everything from [`RAM_BASE`] to [`MAX_RAM_END`].
pub const MAX_RAM_SIZE: u64 = MAX_RAM_END - RAM_BASE.0;
/// RAM sizes must be a multiple of this (2 MiB: the Linux image alignment,
/// and a multiple of every host page size KVM supports).
pub const RAM_ALIGN: u64 = 2 << 20;

/// PL011 UART base address.
pub const PL011_BASE: GuestAddress = GuestAddress(0x0900_0000);
/// Size of the PL011 register window.
pub const PL011_SIZE: u64 = 0x1000;
/// PL011 interrupt, as an SPI number (INTID = 32 + SPI).
pub const PL011_SPI: u32 = 1;

/// PL031 RTC base address (where QEMU's `virt` machine has its RTC).
pub const PL031_BASE: GuestAddress = GuestAddress(0x0901_0000);
/// Size of the PL031 register window.
pub const PL031_SIZE: u64 = 0x1000;
/// PL031 interrupt, as an SPI number (INTID = 32 + SPI).
pub const PL031_SPI: u32 = 2;

/// First virtio-mmio device's base address (after the second redistributor
/// region, below RAM).
pub const VIRTIO_MMIO_BASE: GuestAddress = GuestAddress(0x0E00_0000);
/// Size of one virtio-mmio register window, and the distance between two.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// The first virtio-mmio device's interrupt, as an SPI number (QEMU's `virt`
/// machine starts its virtio-mmio interrupts at the same SPI).
pub const VIRTIO_MMIO_SPI_BASE: u32 = 16;
/// Most virtio-mmio devices a VM may have.
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// Where virtio-mmio device `index` (below [`MAX_VIRTIO_DEVICES`]) lives and
/// which SPI it interrupts on.
pub fn virtio_mmio_slot(index: usize) -> (GuestAddress, u32) {
    let index = index.min(MAX_VIRTIO_DEVICES - 1);
    (
        GuestAddress(VIRTIO_MMIO_BASE.0 + index as u64 * VIRTIO_MMIO_SIZE),
        VIRTIO_MMIO_SPI_BASE + index as u32,
    )
}

/// GICv3 distributor base address.
pub const GICD_BASE: GuestAddress = GuestAddress(0x0800_0000);
/// Size of the GICv3 distributor register window.
pub const GICD_SIZE: u64 = 0x1_0000;
/// Size of one vCPU's redistributor (RD_base + SGI_base frames).
pub const GICR_STRIDE: u64 = 0x2_0000;
/// Base of the first (QEMU-compatible) redistributor region.
pub const GICR_REGION0_BASE: GuestAddress = GuestAddress(0x080A_0000);
/// Redistributors that fit in the first region before the UART.
pub const GICR_REGION0_CPUS: u32 = ((PL011_BASE.0 - GICR_REGION0_BASE.0) / GICR_STRIDE) as u32;
/// Base of the second redistributor region, used above [`GICR_REGION0_CPUS`] vCPUs.
pub const GICR_REGION1_BASE: GuestAddress = GuestAddress(0x0A00_0000);
/// Most vCPUs a VM may have (KVM's arm64 limit, `KVM_MAX_VCPUS`).
pub const MAX_VCPUS: u32 = 512;

/// Architected timer interrupts, as PPI numbers (INTID = 16 + PPI), in the
/// order the `arm,armv8-timer` binding lists them.
pub mod timer_ppi {
    /// Secure physical timer.
    pub const SECURE_PHYS: u32 = 13;
    /// Non-secure physical timer.
    pub const NONSECURE_PHYS: u32 = 14;
    /// Virtual timer.
    pub const VIRT: u32 = 11;
    /// Hypervisor (EL2) physical timer.
    pub const HYP_PHYS: u32 = 10;
}

/// Most bytes the device tree may take (Linux arm64 boot protocol).
pub const FDT_MAX_SIZE: u64 = 2 << 20;
/// Alignment of the initrd start.
pub const INITRD_ALIGN: u64 = 0x1000;

/// A guest layout the operator asked for that cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than the interrupt controller layout (and KVM) allow.
    #[error("{cpus} vCPUs requested, at most {max} are supported")]
    TooManyCpus {
        /// vCPUs requested.
        cpus: u32,
        /// The limit.
        max: u32,
    },
    /// RAM smaller than [`MIN_RAM_SIZE`].
    #[error("memory size {size:#x} is below the minimum {min:#x}")]
    RamTooSmall {
        /// Size requested.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// RAM larger than [`MAX_RAM_SIZE`].
    #[error("memory size {size:#x} exceeds the maximum {max:#x}")]
    RamTooLarge {
        /// Size requested.
        size: u64,
        /// The maximum.
        max: u64,
    },
    /// RAM size not a multiple of [`RAM_ALIGN`].
    #[error("memory size {size:#x} is not a multiple of {align:#x} (2 MiB)")]
    RamMisaligned {
        /// Size requested.
        size: u64,
        /// Required alignment.
        align: u64,
    },
    /// The host could not map guest RAM.
    #[error("cannot allocate {size:#x} bytes of guest memory: {reason}")]
    Allocation {
        /// Size requested.
        size: u64,
        /// What the host said.
        reason: String,
    },
}

/// One contiguous run of GICv3 redistributors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedistributorRegion {
    /// Guest address of the first redistributor.
    pub base: GuestAddress,
    /// How many consecutive redistributors ([`GICR_STRIDE`] bytes each).
    pub count: u32,
}

impl RedistributorRegion {
    /// Bytes the region spans.
    pub fn size(&self) -> u64 {
        u64::from(self.count) * GICR_STRIDE
    }
}

/// A validated guest memory map for a given vCPU count and RAM size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLayout {
    cpus: u32,
    ram_size: u64,
}

impl GuestLayout {
    /// Checks `cpus` and `ram_size` against the limits of this map.
    pub fn new(cpus: u32, ram_size: u64) -> Result<Self, LayoutError> {
        if cpus == 0 {
            return Err(LayoutError::NoCpus);
        }
        if cpus > MAX_VCPUS {
            return Err(LayoutError::TooManyCpus {
                cpus,
                max: MAX_VCPUS,
            });
        }
        if ram_size < MIN_RAM_SIZE {
            return Err(LayoutError::RamTooSmall {
                size: ram_size,
                min: MIN_RAM_SIZE,
            });
        }
        if ram_size > MAX_RAM_SIZE {
            return Err(LayoutError::RamTooLarge {
                size: ram_size,
                max: MAX_RAM_SIZE,
            });
        }
        if ram_size % RAM_ALIGN != 0 {
            return Err(LayoutError::RamMisaligned {
                size: ram_size,
                align: RAM_ALIGN,
            });
        }
        Ok(Self { cpus, ram_size })
    }

    /// Number of vCPUs.
    pub fn cpus(&self) -> u32 {
        self.cpus
    }

    /// First byte of RAM.
    pub fn ram_base(&self) -> GuestAddress {
        RAM_BASE
    }

    /// RAM size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// One past the last byte of RAM.
    pub fn ram_end(&self) -> GuestAddress {
        GuestAddress(RAM_BASE.0 + self.ram_size)
    }

    /// Where a raw image is loaded.
    pub fn raw_image_addr(&self) -> GuestAddress {
        GuestAddress(RAM_BASE.0 + RAW_IMAGE_OFFSET)
    }

    /// Where the device tree is written: the last [`FDT_MAX_SIZE`] bytes of RAM.
    pub fn fdt_addr(&self) -> GuestAddress {
        // new() guarantees ram_size >= MIN_RAM_SIZE > FDT_MAX_SIZE and 2 MiB alignment.
        GuestAddress(self.ram_end().0 - FDT_MAX_SIZE)
    }

    /// Where an initrd of `size` bytes goes: just below the device tree,
    /// start aligned down to [`INITRD_ALIGN`]. `None` if it cannot fit in RAM.
    pub fn initrd_addr(&self, size: u64) -> Option<GuestAddress> {
        let start = self.fdt_addr().0.checked_sub(size)? & !(INITRD_ALIGN - 1);
        (start >= RAM_BASE.0).then_some(GuestAddress(start))
    }

    /// The redistributor regions for this VM's vCPUs, in vCPU order: vCPU `i`
    /// uses the `i`-th redistributor counting through the regions in order.
    pub fn redistributor_regions(&self) -> Vec<RedistributorRegion> {
        let first = self.cpus.min(GICR_REGION0_CPUS);
        let mut regions = vec![RedistributorRegion {
            base: GICR_REGION0_BASE,
            count: first,
        }];
        if self.cpus > first {
            regions.push(RedistributorRegion {
                base: GICR_REGION1_BASE,
                count: self.cpus - first,
            });
        }
        regions
    }

    /// Maps anonymous host memory for the guest's RAM.
    pub fn create_memory(&self) -> Result<GuestMemoryMmap, LayoutError> {
        let alloc_err = |reason: String| LayoutError::Allocation {
            size: self.ram_size,
            reason,
        };
        let len = usize::try_from(self.ram_size).map_err(|e| alloc_err(e.to_string()))?;
        GuestMemoryMmap::from_ranges(&[(RAM_BASE, len)]).map_err(|e| alloc_err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn first_redistributor_region_ends_at_the_uart() {
        let end = GICR_REGION0_BASE.0 + u64::from(GICR_REGION0_CPUS) * GICR_STRIDE;
        assert!(end <= PL011_BASE.0);
        assert!(
            end + GICR_STRIDE > PL011_BASE.0,
            "region 0 leaves a whole slot unused"
        );
        assert_eq!(GICR_REGION0_CPUS, 123);
    }

    #[test]
    fn up_to_123_cpus_use_one_qemu_compatible_region() {
        let l = GuestLayout::new(123, 256 * MIB).unwrap();
        assert_eq!(
            l.redistributor_regions(),
            vec![RedistributorRegion {
                base: GuestAddress(0x080A_0000),
                count: 123
            }]
        );
    }

    #[test]
    fn max_cpus_fit_in_two_regions_overlapping_nothing() {
        let l = GuestLayout::new(MAX_VCPUS, 256 * MIB).unwrap();
        let regions = l.redistributor_regions();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions.iter().map(|r| r.count).sum::<u32>(), MAX_VCPUS);
        let mut windows = vec![
            (GICD_BASE.0, GICD_SIZE),
            (PL011_BASE.0, PL011_SIZE),
            (PL031_BASE.0, PL031_SIZE),
            (
                VIRTIO_MMIO_BASE.0,
                VIRTIO_MMIO_SIZE * MAX_VIRTIO_DEVICES as u64,
            ),
            (RAM_BASE.0, l.ram_size()),
        ];
        windows.extend(regions.iter().map(|r| (r.base.0, r.size())));
        for (i, a) in windows.iter().enumerate() {
            for b in &windows[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }

    #[test]
    fn cpu_count_limits_are_enforced() {
        assert_eq!(GuestLayout::new(0, 256 * MIB), Err(LayoutError::NoCpus));
        assert_eq!(
            GuestLayout::new(513, 256 * MIB),
            Err(LayoutError::TooManyCpus {
                cpus: 513,
                max: 512
            })
        );
    }

    #[test]
    fn ram_size_limits_are_enforced() {
        assert!(matches!(
            GuestLayout::new(1, 8 * MIB),
            Err(LayoutError::RamTooSmall { .. })
        ));
        assert!(matches!(
            GuestLayout::new(1, 1 << 40),
            Err(LayoutError::RamTooLarge { .. })
        ));
        assert!(matches!(
            GuestLayout::new(1, 255 * MIB),
            Err(LayoutError::RamMisaligned { .. })
        ));
        assert!(GuestLayout::new(1, MAX_RAM_SIZE).is_ok());
    }

    #[test]
    fn fdt_takes_the_last_two_mib_and_initrd_sits_below_it() {
        let l = GuestLayout::new(1, 256 * MIB).unwrap();
        assert_eq!(l.fdt_addr(), GuestAddress(0x4000_0000 + 254 * MIB));
        assert_eq!(l.fdt_addr().0 % (2 * MIB), 0);
        let initrd = l.initrd_addr(0x1234).unwrap();
        assert_eq!(initrd.0 % INITRD_ALIGN, 0);
        assert!(initrd.0 + 0x1234 <= l.fdt_addr().0);
        assert!(l.fdt_addr().0 - initrd.0 < 0x1234 + INITRD_ALIGN);
    }

    #[test]
    fn initrd_larger_than_ram_has_no_place() {
        let l = GuestLayout::new(1, 16 * MIB).unwrap();
        assert_eq!(l.initrd_addr(15 * MIB), None);
        assert_eq!(l.initrd_addr(u64::MAX), None);
        assert_eq!(l.initrd_addr(14 * MIB), Some(RAM_BASE));
    }

    #[test]
    fn guest_memory_covers_exactly_ram() {
        use vm_memory::{Bytes, GuestMemoryBackend};
        let l = GuestLayout::new(1, 16 * MIB).unwrap();
        let mem = l.create_memory().unwrap();
        assert_eq!(mem.last_addr(), GuestAddress(l.ram_end().0 - 1));
        assert!(mem.write_slice(&[1], RAM_BASE).is_ok());
        assert!(mem.write_slice(&[1], l.ram_end()).is_err());
        assert!(mem.write_slice(&[1], GuestAddress(RAM_BASE.0 - 1)).is_err());
    }
}
