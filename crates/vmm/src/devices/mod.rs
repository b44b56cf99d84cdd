//! The guest's devices and the MMIO bus that routes vCPU loads and stores to
//! them.
//!
//! | device | module | where (see [`crate::layout`]) |
//! |---|---|---|
//! | PL011 UART, with console input | [`console`] over [`crate::uart`] | `0x0900_0000`, SPI 1 |
//! | PL031 RTC with alarm | [`rtc`] over [`pl031`] | `0x0901_0000`, SPI 2, a wake-up source |
//! | virtio block devices (`--disk`) | [`virtio_mmio`] over [`virtio_blk`] | from `0x0E00_0000`, 0x200 apart, SPI 16 up |
//!
//! Devices never see KVM: each raises its interrupt through an
//! [`irq::IrqLine`] the VMM gives it, and the VMM notes every level in
//! [`irq::InterruptLines`] (for the event log's wake-up sources). Each
//! device keeps its state in one plain serialisable struct
//! ([`pl031::Pl031State`], ...) so a snapshot can save it.

pub mod console;
pub mod irq;
pub mod pl031;
pub mod rtc;
pub mod virtio_blk;
pub mod virtio_blk_image;
pub mod virtio_mmio;

use std::sync::Arc;

use vm_memory::GuestAddress;

use irq::{InterruptLines, Raised, RiseMark};

/// A device's register window as the bus sees it. Implementations lock
/// what they need; offsets are relative to the window's base.
pub trait MmioDevice: Send + Sync {
    /// A load of `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A store of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// One device on the bus.
#[derive(Clone)]
pub struct MmioRange {
    /// First byte of the window.
    pub base: GuestAddress,
    /// Bytes in the window.
    pub size: u64,
    /// The device.
    pub device: Arc<dyn MmioDevice>,
}

impl std::fmt::Debug for MmioRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioRange")
            .field("base", &self.base)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Where guest MMIO goes: a fixed set of non-overlapping device windows.
#[derive(Debug)]
pub struct MmioBus {
    ranges: Vec<MmioRange>,
    interrupts: Arc<InterruptLines>,
}

impl MmioBus {
    /// A bus over `ranges` (which must not overlap; the first match wins)
    /// whose devices' interrupt lines are `interrupts`.
    pub fn new(ranges: Vec<MmioRange>, interrupts: Arc<InterruptLines>) -> MmioBus {
        MmioBus { ranges, interrupts }
    }

    /// The device interrupt lines.
    pub fn interrupts(&self) -> &InterruptLines {
        &self.interrupts
    }

    fn find(&self, addr: u64) -> Option<(&MmioRange, u64)> {
        self.ranges.iter().find_map(|r| {
            addr.checked_sub(r.base.0)
                .filter(|&off| off < r.size)
                .map(|off| (r, off))
        })
    }

    /// Whether `addr` belongs to a device.
    pub fn claims(&self, addr: u64) -> bool {
        self.find(addr).is_some()
    }

    /// A load of `data.len()` bytes at `addr`; unclaimed addresses read as zero.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((range, off)) => range.device.read(off, data),
            None => data.fill(0),
        }
    }

    /// A store of `data` at `addr`; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((range, off)) = self.find(addr) {
            range.device.write(off, data);
        }
    }
}

/// What the vCPU threads see of the bus.
impl crate::vcpu::Mmio for MmioBus {
    fn read(&self, addr: u64, data: &mut [u8]) {
        MmioBus::read(self, addr, data);
    }

    fn write(&self, addr: u64, data: &[u8]) {
        MmioBus::write(self, addr, data);
    }

    fn interrupt_mark(&self) -> RiseMark {
        self.interrupts.mark()
    }

    fn wake_sources(&self, mark: &RiseMark) -> Vec<Raised> {
        self.interrupts.wake_sources(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_whose_window_holds_the_address_as_offsets() {
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let bus = MmioBus::new(
            vec![
                MmioRange {
                    base: GuestAddress(0x1000),
                    size: 0x100,
                    device: a.clone(),
                },
                MmioRange {
                    base: GuestAddress(0x2000),
                    size: 0x100,
                    device: b.clone(),
                },
            ],
            Arc::new(InterruptLines::default()),
        );
        bus.write(0x1004, &[1]);
        bus.write(0x20FF, &[2]);
        bus.write(0x2100, &[3]); // just past b
        let mut data = [0u8; 2];
        bus.read(0x1010, &mut data);
        assert_eq!(data, [0x10, 0x10]);
        bus.read(0x3000, &mut data);
        assert_eq!(data, [0, 0], "unclaimed reads as zero");
        assert_eq!(*a.0.lock().unwrap(), vec![(4, vec![1])]);
        assert_eq!(*b.0.lock().unwrap(), vec![(0xFF, vec![2])]);
        assert!(bus.claims(0x1000) && !bus.claims(0x1100) && !bus.claims(u64::MAX));
    }
}
