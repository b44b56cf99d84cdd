//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), around a
//! [`VirtioDevice`], with split virtqueues from rust-vmm's `virtio-queue`.
//!
//! The driver negotiates features (only `VIRTIO_F_VERSION_1` plus what the
//! device offers; anything else makes `FEATURES_OK` not stick, as §3.1.1
//! requires), sets up each queue while it is not ready, and notifies by
//! writing `QueueNotify`; the device then serves every available chain on
//! the notifying vCPU's thread and raises its interrupt. The interrupt is
//! level-triggered: the line is high exactly while `InterruptStatus` is
//! non-zero, and the driver lowers it by acknowledging.
//!
//! Guest-controlled input never panics: unknown registers read as zero and
//! ignore writes, queue registers are ignored once the queue is ready, an
//! invalid queue configuration is not used, and a writing `Status` of 0
//! resets the device. The registers a snapshot needs are in
//! [`VirtioMmioState`], one plain serialisable struct.
//!
//! A snapshot can be taken whenever the vCPUs are paused: requests are
//! served synchronously inside the notifying vCPU's MMIO exit (under the
//! transport's lock), so a paused VM has no request half-served; every chain
//! the device took is in the used ring, every chain it did not take is still
//! in the available ring, and `next_avail`/`next_used` say which is which.
//! A restored transport ([`VirtioMmioState::check`], [`VirtioMmio::restore`])
//! serves the remaining chains at the driver's next notification.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::irq::IrqLine;
use crate::migrate::VmmWrites;

/// "virt" in little-endian ASCII.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
const VERSION: u32 = 2;
/// Vendor ID reported to the driver ("VPSC").
const VENDOR_ID: u32 = 0x4353_5056;

/// Register offsets (§4.2.2).
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Bytes in the register window.
pub const MMIO_SIZE: u64 = 0x200;

/// What a device behind the transport provides. Small on purpose: the
/// transport owns negotiation, queues and interrupts.
pub trait VirtioDevice: Send {
    /// The virtio device ID (§5).
    fn device_type(&self) -> u32;
    /// Device-specific feature bits offered (the transport adds
    /// `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// A read of the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves one chain from queue `queue`; returns the used length.
    fn serve(
        &mut self,
        queue: usize,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32;
    /// The driver reset the device (or the VM is going away).
    fn flush_on_reset(&mut self);
}

/// The transport's registers (what a snapshot saves; queue contents live in
/// guest memory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features the driver accepted so far.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `Status`.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Each queue's registers and ring positions.
    pub queues: Vec<QueueRegs>,
}

/// One virtqueue's configuration and positions (mirrors `virtio-queue`'s
/// `QueueState`, with serde).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Largest size offered.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use on this queue (our devices do not
    /// offer it today; saved so a device that does keeps it).
    pub event_idx: bool,
}

impl From<QueueState> for QueueRegs {
    fn from(s: QueueState) -> QueueRegs {
        QueueRegs {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl From<QueueRegs> for QueueState {
    fn from(r: QueueRegs) -> QueueState {
        QueueState {
            max_size: r.max_size,
            next_avail: r.next_avail,
            next_used: r.next_used,
            event_idx_enabled: r.event_idx,
            size: r.size,
            ready: r.ready,
            desc_table: r.desc_table,
            avail_ring: r.avail_ring,
            used_ring: r.used_ring,
        }
    }
}

/// Why a saved transport state cannot be used (it is not one this
/// transport could have been in with this device and guest memory).
#[derive(Debug, Error)]
#[error("virtio-mmio state: {0}")]
pub struct BadTransportState(String);

/// A saved transport state checked against its device and guest memory
/// ([`VirtioMmioState::check`]); [`VirtioMmio::restore`] cannot fail.
#[derive(Debug)]
pub struct CheckedTransport {
    regs: VirtioMmioState,
    queues: Vec<Queue>,
}

impl VirtioMmioState {
    /// Checks that this state fits `device` and `mem`: the device's queues
    /// with their maximum sizes, sizes and ring alignments virtio-queue
    /// accepts, ready queues whose rings lie in guest RAM, event indices only
    /// where negotiated, negotiated features the device offers, known
    /// interrupt bits. A state saved from a
    /// running transport always passes.
    pub fn check(
        &self,
        device: &dyn VirtioDevice,
        mem: &GuestMemoryMmap,
    ) -> Result<CheckedTransport, BadTransportState> {
        let bad = |reason: String| Err(BadTransportState(reason));
        let maxima = device.queue_max_sizes();
        if self.queues.len() != maxima.len() {
            return bad(format!(
                "{} queues saved, the device has {}",
                self.queues.len(),
                maxima.len()
            ));
        }
        let mut queues = Vec::with_capacity(maxima.len());
        for (index, (saved, &max)) in self.queues.iter().zip(maxima).enumerate() {
            if saved.max_size != max {
                return bad(format!(
                    "queue {index} was offered {} entries, the device offers {max}",
                    saved.max_size
                ));
            }
            let queue = match Queue::try_from(QueueState::from(*saved)) {
                Ok(q) => q,
                Err(e) => return bad(format!("queue {index}: {e}")),
            };
            if saved.ready && !queue.is_valid(mem) {
                return bad(format!("queue {index}'s rings are not in guest RAM"));
            }
            if saved.event_idx && self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) == 0 {
                return bad(format!(
                    "queue {index} uses event indices, which were not negotiated"
                ));
            }
            queues.push(queue);
        }
        let offered = device.features() | (1 << VIRTIO_F_VERSION_1);
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.driver_features & !offered != 0 {
            return bad(format!(
                "negotiated features {:#x} include some the device does not offer ({offered:#x})",
                self.driver_features
            ));
        }
        if self.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return bad(format!(
                "interrupt status {:#x} has unknown bits",
                self.interrupt_status
            ));
        }
        Ok(CheckedTransport {
            regs: VirtioMmioState {
                queues: Vec::new(),
                ..self.clone()
            },
            queues,
        })
    }
}

/// A virtio device on the virtio-mmio transport.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Box<dyn IrqLine>,
    irq_high: bool,
    regs: VirtioMmioState,
    queues: Vec<Queue>,
    /// Where this transport's writes into guest RAM are logged for a migration.
    writes: Option<Arc<VmmWrites>>,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("regs", &self.state())
            .finish_non_exhaustive()
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `device` on the transport, reading and writing guest memory `mem`
    /// (a cheap clone sharing the same mappings) and interrupting on `irq`.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Box<dyn IrqLine>) -> Self {
        let queues = fresh_queues(&device);
        VirtioMmio {
            device,
            mem,
            irq,
            irq_high: false,
            regs: VirtioMmioState::default(),
            queues,
            writes: None,
        }
    }

    /// Logs the buffers and used-ring entries it writes into `writes`.
    pub fn with_write_log(mut self, writes: Arc<VmmWrites>) -> Self {
        self.writes = Some(writes);
        self
    }

    /// `device` on a transport in a saved state (checked against the same
    /// device and memory); the interrupt line is raised if the saved
    /// interrupt status is not zero. The driver carries on where it was:
    /// chains it made available and the device had not taken are served at
    /// its next notification.
    pub fn restore(
        device: D,
        mem: GuestMemoryMmap,
        irq: Box<dyn IrqLine>,
        saved: CheckedTransport,
    ) -> Self {
        let mut transport = VirtioMmio {
            device,
            mem,
            irq,
            irq_high: false,
            regs: saved.regs,
            queues: saved.queues,
            writes: None,
        };
        transport.update_irq();
        transport
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The registers and queue positions (for a snapshot).
    pub fn state(&self) -> VirtioMmioState {
        VirtioMmioState {
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            ..self.regs.clone()
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.regs.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// An MMIO read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers below the configuration space are 32 bits wide and
        // must be read whole (§4.2.2.2); anything else reads as zero.
        let value = if data.len() == 4 && offset % 4 == 0 {
            self.read_register(offset)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.regs.interrupt_status,
            reg::STATUS => self.regs.status,
            // No shared memory regions: length reads as all ones (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.regs.config_generation,
            _ => 0,
        }
    }

    /// An MMIO write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        // Configuration space: our devices have no writable fields.
        if offset >= reg::CONFIG || data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.regs.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.regs.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.set_driver_features(value),
            reg::QUEUE_SEL => self.regs.queue_sel = value,
            reg::QUEUE_NUM => self.configure_queue(|q| q.set_size(value as u16)),
            reg::QUEUE_DESC_LOW => {
                self.configure_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.configure_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.configure_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.configure_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.configure_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.configure_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_READY => self.set_queue_ready(value == 1),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => {
                self.regs.interrupt_status &= !value;
                self.update_irq();
            }
            reg::STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        // Features are fixed once FEATURES_OK is set (§3.1.1).
        if self.regs.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        let value = u64::from(value);
        match self.regs.driver_features_sel {
            0 => self.regs.driver_features = (self.regs.driver_features & !0xFFFF_FFFF) | value,
            1 => {
                self.regs.driver_features =
                    (self.regs.driver_features & 0xFFFF_FFFF) | (value << 32)
            }
            _ => {}
        }
    }

    /// Applies a queue setting, only while the queue is not ready and the
    /// driver has not finished (§4.2.2.3).
    fn configure_queue(&mut self, set: impl FnOnce(&mut Queue)) {
        if self.regs.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.selected_queue() {
            if !q.ready() {
                set(q);
            }
        }
    }

    fn set_queue_ready(&mut self, ready: bool) {
        let mem = self.mem.clone();
        if let Some(q) = self.selected_queue() {
            // A queue whose rings do not fit in guest RAM is never used
            // (is_valid only judges a queue marked ready).
            q.set_ready(ready);
            if ready && !q.is_valid(&mem) {
                q.set_ready(false);
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut status = value;
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.regs.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            let offered = self.offered_features();
            let accepted = self.regs.driver_features;
            // §3.1.1: FEATURES_OK only sticks for a subset of what was
            // offered; the modern transport needs VIRTIO_F_VERSION_1.
            if accepted & !offered != 0 || accepted & (1 << VIRTIO_F_VERSION_1) == 0 {
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        self.regs.status = status;
    }

    fn reset(&mut self) {
        self.device.flush_on_reset();
        self.queues = fresh_queues(&self.device);
        self.regs = VirtioMmioState {
            config_generation: self.regs.config_generation,
            ..VirtioMmioState::default()
        };
        self.update_irq();
    }

    /// Serves every available chain of queue `index`.
    fn notify(&mut self, index: u32) {
        if self.regs.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return;
        }
        let Ok(index) = usize::try_from(index) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let mem = &self.mem;
        let mut served = false;
        // One chain at a time: the iterator re-reads the ring's index (a
        // malformed index ends the loop: virtio-queue refuses it).
        while let Some(chain) = queue.iter(mem).ok().and_then(|mut chains| chains.next()) {
            let head = chain.head_index();
            // Marked after the writes, so a round that fetched the log in
            // between sees them in the next one.
            let written: Vec<(u64, u32)> = match &self.writes {
                Some(_) => chain
                    .clone()
                    .writable()
                    .map(|d| (d.addr().0, d.len()))
                    .collect(),
                None => Vec::new(),
            };
            let len = self.device.serve(index, mem, chain);
            let used = queue.add_used(mem, head, len);
            if let Some(writes) = &self.writes {
                for (addr, len) in written {
                    writes.mark(addr, u64::from(len));
                }
                // The used ring: flags, index, entries, avail_event.
                writes.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()));
            }
            if used.is_err() {
                break;
            }
            served = true;
        }
        if served && queue.needs_notification(mem).unwrap_or(true) {
            self.regs.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            self.update_irq();
        }
    }

    fn update_irq(&mut self) {
        let high = self.regs.interrupt_status != 0;
        if high != self.irq_high {
            self.irq_high = high;
            self.irq.set_level(high);
        }
    }
}

impl<D: VirtioDevice> Drop for VirtioMmio<D> {
    fn drop(&mut self) {
        self.device.flush_on_reset();
    }
}

#[cfg(test)]
mod tests {
    use super::super::pl031::tests::Line;
    use super::super::virtio_blk::{Block, QUEUE_SIZE};
    use super::*;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    type Dev = VirtioMmio<Block>;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn rd(dev: &mut Dev, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(dev: &mut Dev, off: u64, v: u32) {
        dev.write(off, &v.to_le_bytes());
    }

    fn setup() -> (tempfile::NamedTempFile, GuestMemoryMmap, Dev, Line) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![0u8; 4096]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let line = Line::default();
        let block = Block::open(file.path(), false, "t").unwrap();
        let dev = Dev::new(block, mem.clone(), Box::new(line.clone()));
        (file, mem, dev, line)
    }

    /// The Linux driver's sequence up to DRIVER_OK with one queue of 16.
    fn bring_up(dev: &mut Dev) {
        wr(dev, reg::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(
            dev,
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(dev, reg::DRIVER_FEATURES_SEL, 0);
        wr(dev, reg::DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
        wr(dev, reg::DRIVER_FEATURES_SEL, 1);
        wr(dev, reg::DRIVER_FEATURES, 1);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        wr(dev, reg::STATUS, s);
        assert_eq!(rd(dev, reg::STATUS), s, "features accepted");
        wr(dev, reg::QUEUE_SEL, 0);
        assert_eq!(rd(dev, reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        wr(dev, reg::QUEUE_NUM, 16);
        wr(dev, reg::QUEUE_DESC_LOW, DESC as u32);
        wr(dev, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        wr(dev, reg::QUEUE_DEVICE_LOW, USED as u32);
        wr(dev, reg::QUEUE_READY, 1);
        assert_eq!(rd(dev, reg::QUEUE_READY), 1);
        wr(dev, reg::STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Puts a 3-descriptor write request of one sector at avail slot `slot`.
    fn post_write(mem: &GuestMemoryMmap, slot: u16, sector: u64) {
        let hdr = 0x8000u64;
        let data = 0x9000u64;
        let status = 0xA000u64;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_slice(&[0x5A; 512], GuestAddress(data)).unwrap();
        let descs = [
            (hdr, 16u32, VRING_DESC_F_NEXT as u16, 1u16),
            (data, 512, VRING_DESC_F_NEXT as u16, 2),
            (status, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let at = GuestAddress(DESC + 16 * i as u64);
            mem.write_obj(*addr, at).unwrap();
            mem.write_obj(*len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(*flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(*next, GuestAddress(at.0 + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot % 16)))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn identifies_as_a_modern_virtio_block_device() {
        let (_f, _m, mut dev, _l) = setup();
        assert_eq!(rd(&mut dev, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut dev, reg::VERSION), 2);
        assert_eq!(rd(&mut dev, reg::DEVICE_ID), 2);
        wr(&mut dev, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut dev, reg::DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
        wr(&mut dev, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut dev, reg::DEVICE_FEATURES), 1 << VIRTIO_BLK_F_FLUSH);
        let mut cap = [0u8; 8];
        dev.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
    }

    #[test]
    fn a_notified_request_completes_with_a_used_entry_and_a_level_interrupt() {
        let (f, mem, mut dev, line) = setup();
        bring_up(&mut dev);
        post_write(&mem, 0, 3);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 1);
        let used_len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(used_len, 1);
        let status: u8 = mem.read_obj(GuestAddress(0xA000)).unwrap();
        assert_eq!(status, 0);
        assert_eq!(rd(&mut dev, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        wr(&mut dev, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        assert!(std::fs::read(f.path()).unwrap()[3 * 512..4 * 512]
            .iter()
            .all(|&b| b == 0x5A));
    }

    #[test]
    fn a_migration_sees_the_pages_the_device_wrote_and_not_those_it_only_read() {
        let (_f, mem, dev, _l) = setup();
        let writes = Arc::new(VmmWrites::default());
        let mut dev = dev.with_write_log(Arc::clone(&writes));
        writes.start(vec![vpsci_kvm::DirtyLog::clean(0, 4096, 256)]);
        bring_up(&mut dev);
        post_write(&mem, 0, 1);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        let logs = writes.take().expect("logging");
        let pages: Vec<u64> = logs.iter().flat_map(|l| l.dirty_pages()).collect();
        // The status byte and the used ring; not the header, data or descriptors.
        assert_eq!(pages, vec![USED, 0xA000]);
        assert_eq!(
            writes.take().expect("logging")[0].count(),
            0,
            "taking clears the log"
        );
        writes.stop();
        assert!(writes.take().is_none(), "stopped: nothing is logged");
    }

    #[test]
    fn features_not_offered_or_without_version_1_do_not_stick() {
        let (_f, _m, mut dev, _l) = setup();
        wr(&mut dev, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut dev, reg::DRIVER_FEATURES, 1 << 2); // not offered
        wr(&mut dev, reg::STATUS, VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(rd(&mut dev, reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        wr(&mut dev, reg::STATUS, 0);
        wr(&mut dev, reg::DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH); // no VERSION_1
        wr(&mut dev, reg::STATUS, VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(rd(&mut dev, reg::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_never_becomes_ready_and_notify_does_nothing() {
        let (f, mem, mut dev, line) = setup();
        wr(&mut dev, reg::QUEUE_NUM, 16);
        wr(&mut dev, reg::QUEUE_DESC_LOW, 0xFFFF_0000);
        wr(&mut dev, reg::QUEUE_DESC_HIGH, 0xFFFF);
        wr(&mut dev, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        wr(&mut dev, reg::QUEUE_DEVICE_LOW, USED as u32);
        wr(&mut dev, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut dev, reg::QUEUE_READY), 0);
        wr(&mut dev, reg::STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
        post_write(&mem, 0, 0);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        wr(&mut dev, reg::QUEUE_NOTIFY, 7);
        assert!(line.0.lock().unwrap().is_empty());
        assert!(std::fs::read(f.path()).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn status_zero_resets_queues_and_interrupt() {
        let (_f, mem, mut dev, line) = setup();
        bring_up(&mut dev);
        post_write(&mem, 0, 0);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        wr(&mut dev, reg::STATUS, 0);
        assert_eq!(rd(&mut dev, reg::STATUS), 0);
        assert_eq!(rd(&mut dev, reg::QUEUE_READY), 0);
        assert_eq!(rd(&mut dev, reg::INTERRUPT_STATUS), 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        assert_eq!(
            dev.state().queues[0].size,
            QUEUE_SIZE,
            "back to the default size"
        );
    }

    #[test]
    fn state_records_queue_positions_and_serialises() {
        let (_f, mem, mut dev, _l) = setup();
        bring_up(&mut dev);
        post_write(&mem, 0, 0);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        let state = dev.state();
        assert_eq!(state.queues[0].next_avail, 1);
        assert_eq!(state.queues[0].next_used, 1);
        assert_eq!(state.queues[0].desc_table, DESC);
        let json = serde_json::to_string(&state).unwrap();
        let back: VirtioMmioState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn a_restored_transport_serves_the_chain_the_driver_posted_before_the_snapshot() {
        let (f, mem, mut dev, _line) = setup();
        bring_up(&mut dev);
        post_write(&mem, 0, 3);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        // A second request is made available but not yet notified, and the
        // first one's interrupt is not acknowledged: the queue is in use.
        post_write(&mem, 1, 5);
        let json = serde_json::to_string(&dev.state()).unwrap();
        drop(dev);

        let saved: VirtioMmioState = serde_json::from_str(&json).unwrap();
        let block = Block::open(f.path(), false, "t").unwrap();
        let checked = saved.check(&block, &mem).unwrap();
        let line = Line::default();
        let mut dev = Dev::restore(block, mem.clone(), Box::new(line.clone()), checked);
        assert_eq!(dev.state(), saved, "the registers come back as saved");
        assert_eq!(
            *line.0.lock().unwrap(),
            vec![true],
            "the unacknowledged interrupt is raised again"
        );
        assert_eq!(rd(&mut dev, reg::STATUS), saved.status);
        assert_eq!(rd(&mut dev, reg::QUEUE_READY), 1);
        wr(&mut dev, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        wr(&mut dev, reg::QUEUE_NOTIFY, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(
            used_idx, 2,
            "only the second chain was served after the restore"
        );
        assert_eq!(dev.state().queues[0].next_avail, 2);
        assert_eq!(rd(&mut dev, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true]);
        let image = std::fs::read(f.path()).unwrap();
        assert!(image[3 * 512..4 * 512].iter().all(|&b| b == 0x5A));
        assert!(image[5 * 512..6 * 512].iter().all(|&b| b == 0x5A));
        assert!(image[4 * 512..5 * 512].iter().all(|&b| b == 0));
    }

    #[test]
    fn saved_states_this_device_and_memory_could_not_have_are_refused() {
        let (f, mem, mut dev, _line) = setup();
        bring_up(&mut dev);
        let good = dev.state();
        let block = Block::open(f.path(), false, "t").unwrap();
        assert!(good.check(&block, &mem).is_ok());
        type Edit = fn(&mut VirtioMmioState);
        let cases: [(&str, Edit, &str); 8] = [
            ("no queue", |s| s.queues.clear(), "0 queues saved"),
            (
                "another maximum",
                |s| s.queues[0].max_size = 128,
                "offered 128",
            ),
            (
                "a size that is not a power of two",
                |s| s.queues[0].size = 12,
                "queue 0",
            ),
            (
                "a misaligned descriptor table",
                |s| s.queues[0].desc_table = DESC + 1,
                "queue 0",
            ),
            (
                "rings outside guest RAM",
                |s| s.queues[0].used_ring = 0x10_0000,
                "not in guest RAM",
            ),
            (
                "event indices never negotiated",
                |s| s.queues[0].event_idx = true,
                "event indices",
            ),
            (
                "features never offered",
                |s| s.driver_features |= 1 << 2,
                "does not offer",
            ),
            (
                "unknown interrupt bits",
                |s| s.interrupt_status = 4,
                "unknown bits",
            ),
        ];
        for (name, edit, expected) in cases {
            let mut state = good.clone();
            edit(&mut state);
            let err = state.check(&block, &mem).expect_err(name);
            assert!(err.to_string().contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn any_register_access_is_harmless() {
        let (_f, _m, mut dev, _l) = setup();
        for off in 0..0x220u64 {
            for len in [0usize, 1, 2, 4, 8] {
                let mut buf = vec![0xFFu8; len];
                dev.read(off, &mut buf);
                if off != reg::STATUS {
                    dev.write(off, &buf);
                }
            }
        }
        dev.read(u64::MAX, &mut [0u8; 8]);
        dev.write(u64::MAX - 3, &[1, 2, 3, 4]);
    }
}
