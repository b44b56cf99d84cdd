//! A PL011 UART (Arm PrimeCell UART, DDI0183) transmit model, enough for
//! bare-metal console output and for Linux's `amba-pl011` driver (early
//! console `earlycon=pl011,...` and the interrupt-driven tty console).
//!
//! Written here because rust-vmm's `vm-superio` offers a 16550 serial port,
//! an i8042 and a PL031 RTC, but no PL011.
//!
//! What is modelled:
//! - `UARTDR` writes go straight to the output sink (the transmitter is
//!   infinitely fast: the TX FIFO is always empty and never busy);
//! - `UARTFR` reports the TX FIFO always empty, and the RX FIFO state;
//! - reception: the VMM pushes input with [`Pl011::enqueue_rx`] into a
//!   16-entry FIFO (1 entry when `UARTLCR_H.FEN` is clear), which `UARTDR`
//!   reads drain;
//! - interrupts: `UARTRIS.TXRIS` is set after each character is sent (Linux's
//!   tty path sends a few characters, then waits for it); `RXRIS` is set while
//!   the RX FIFO holds at least the `UARTIFLS` trigger level and `RTRIS` (the
//!   receive timeout) while it holds anything, the timeout being taken as
//!   already expired. `UARTICR` clears, `UARTIMSC` masks; the interrupt line
//!   ([`IrqLine`]) is high while `RIS & IMSC` is non-zero.
//! - the PrimeCell identification registers at 0xFE0..0xFFC;
//! - the other registers (baud divisors, line and control registers, FIFO
//!   level, DMA control) keep what is written and read it back.
//!
//! Everything the device remembers is in [`Pl011State`], one plain
//! serialisable struct, so a snapshot can save and restore it.
//!
//! Not modelled: modem lines, DMA, break/framing/parity/overrun errors
//! (input that finds the FIFO full is refused, not overrun). Any offset and access size is accepted; offsets
//! outside the register map read as zero and ignore writes. Nothing here panics.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};

/// Data register.
const DR: u64 = 0x000;
/// Receive status / error clear register.
const RSR_ECR: u64 = 0x004;
/// Flag register.
const FR: u64 = 0x018;
/// IrDA low-power counter register.
const ILPR: u64 = 0x020;
/// Integer baud rate divisor.
const IBRD: u64 = 0x024;
/// Fractional baud rate divisor.
const FBRD: u64 = 0x028;
/// Line control register.
const LCR_H: u64 = 0x02C;
/// Control register.
const CR: u64 = 0x030;
/// Interrupt FIFO level select.
const IFLS: u64 = 0x034;
/// Interrupt mask set/clear.
const IMSC: u64 = 0x038;
/// Raw interrupt status.
const RIS: u64 = 0x03C;
/// Masked interrupt status.
const MIS: u64 = 0x040;
/// Interrupt clear (write only).
const ICR: u64 = 0x044;
/// DMA control.
const DMACR: u64 = 0x048;
/// First identification register.
const ID_BASE: u64 = 0xFE0;

/// `UARTFR.RXFE`: receive FIFO empty.
pub const FR_RXFE: u32 = 1 << 4;
/// `UARTFR.RXFF`: receive FIFO full.
pub const FR_RXFF: u32 = 1 << 6;
/// `UARTFR.TXFE`: transmit FIFO empty.
pub const FR_TXFE: u32 = 1 << 7;
/// `UARTRIS.RXRIS`: receive interrupt.
pub const INT_RX: u32 = 1 << 4;
/// `UARTRIS.TXRIS`: transmit interrupt.
pub const INT_TX: u32 = 1 << 5;
/// `UARTRIS.RTRIS`: receive timeout interrupt.
pub const INT_RT: u32 = 1 << 6;
/// `UARTLCR_H.FEN`: FIFOs enabled.
const LCR_H_FEN: u32 = 1 << 4;
/// Receive FIFO depth: 16, what a PL011 of the revision our ID registers
/// report (PeriphID2 revision 1) has, and what Linux then assumes.
pub const RX_FIFO_DEPTH: usize = 16;
/// Interrupt bits that exist in RIS/IMSC/ICR (bits 0..=10).
const INT_MASK: u32 = 0x7FF;

/// PeriphID0..3 then PCellID0..3 (DDI0183): part 0x011 (PL011), designer
/// 0x41 (Arm), revision 1; the PrimeCell ID 0xB105F00D.
pub const ID_REGISTERS: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;

/// The UART's interrupt output. The VMM implements it (e.g. with
/// `KVM_IRQ_LINE` on the UART's SPI); the line is level-triggered.
pub trait IrqLine: Send {
    /// Drive the line high (`true`) or low (`false`).
    fn set_level(&self, high: bool);
}

/// An interrupt line connected to nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

/// Everything a PL011 remembers (what a snapshot saves): its registers and
/// the bytes waiting in its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pl011State {
    /// `UARTILPR`.
    pub ilpr: u32,
    /// `UARTIBRD`.
    pub ibrd: u32,
    /// `UARTFBRD`.
    pub fbrd: u32,
    /// `UARTLCR_H`.
    pub lcr_h: u32,
    /// `UARTCR`.
    pub cr: u32,
    /// `UARTIFLS`.
    pub ifls: u32,
    /// `UARTIMSC`.
    pub imsc: u32,
    /// `UARTRIS`.
    pub ris: u32,
    /// `UARTDMACR`.
    pub dmacr: u32,
    /// The receive FIFO, oldest byte first.
    pub rx: VecDeque<u8>,
}

impl Default for Pl011State {
    /// The DDI0183 reset values.
    fn default() -> Pl011State {
        Pl011State {
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: 0x300, // TXE | RXE
            ifls: 0x12,
            imsc: 0,
            ris: 0,
            dmacr: 0,
            rx: VecDeque::with_capacity(RX_FIFO_DEPTH),
        }
    }
}

/// A PL011 whose transmitter writes to `out`.
pub struct Pl011 {
    out: Box<dyn Write + Send>,
    irq: Box<dyn IrqLine>,
    irq_high: bool,
    state: Pl011State,
    dropped: u64,
}

impl std::fmt::Debug for Pl011 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl011")
            .field("state", &self.state)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl Pl011 {
    /// A UART in its reset state (DDI0183 register reset values) writing to
    /// `out` and signalling on `irq`.
    pub fn new(out: Box<dyn Write + Send>, irq: Box<dyn IrqLine>) -> Self {
        Self::from_state(Pl011State::default(), out, irq)
    }

    /// A UART continuing from a saved `state` (its interrupt line is driven
    /// to the level the state implies; FIFO contents beyond the depth the
    /// state's `UARTLCR_H` allows are dropped).
    pub fn from_state(
        mut state: Pl011State,
        out: Box<dyn Write + Send>,
        irq: Box<dyn IrqLine>,
    ) -> Self {
        state.rx.truncate(RX_FIFO_DEPTH);
        let mut uart = Self {
            out,
            irq,
            irq_high: false,
            state,
            dropped: 0,
        };
        let capacity = uart.rx_capacity();
        uart.state.rx.truncate(capacity);
        uart.update_irq();
        uart
    }

    /// What a snapshot saves.
    pub fn state(&self) -> Pl011State {
        self.state.clone()
    }

    /// Characters the output sink refused (write or flush errors).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Input for the guest: queues as many of `bytes` as the RX FIFO has room
    /// for and returns how many it took.
    pub fn enqueue_rx(&mut self, bytes: &[u8]) -> usize {
        let room = self.rx_capacity().saturating_sub(self.state.rx.len());
        let taken = bytes.len().min(room);
        self.state.rx.extend(&bytes[..taken]);
        if taken > 0 {
            self.update_rx_interrupts();
            self.update_irq();
        }
        taken
    }

    /// An MMIO read of `data.len()` bytes at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == DR {
            self.receive()
        } else {
            self.read_register(offset & !3)
        };
        let shifted = u64::from(value) >> ((offset & 3) * 8);
        let bytes = shifted.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// An MMIO write of `data` at `offset` within the window. Writes that do
    /// not start at a register's first byte are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.is_empty() {
            return;
        }
        let mut bytes = [0u8; 4];
        for (dst, src) in bytes.iter_mut().zip(data) {
            *dst = *src;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }

    fn read_register(&self, reg: u64) -> u32 {
        match reg {
            DR | RSR_ECR | ICR => 0,
            FR => self.flags(),
            ILPR => self.state.ilpr,
            IBRD => self.state.ibrd,
            FBRD => self.state.fbrd,
            LCR_H => self.state.lcr_h,
            CR => self.state.cr,
            IFLS => self.state.ifls,
            IMSC => self.state.imsc,
            RIS => self.state.ris,
            MIS => self.state.ris & self.state.imsc,
            DMACR => self.state.dmacr,
            ID_BASE..=0xFFC => {
                let index = ((reg - ID_BASE) / 4) as usize;
                ID_REGISTERS.get(index).copied().map_or(0, u32::from)
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, reg: u64, value: u32) {
        match reg {
            DR => self.transmit(value as u8),
            ILPR => self.state.ilpr = value & 0xFF,
            IBRD => self.state.ibrd = value & 0xFFFF,
            FBRD => self.state.fbrd = value & 0x3F,
            LCR_H => self.state.lcr_h = value & 0xFF,
            CR => self.state.cr = value & 0xFFFF,
            IFLS => self.state.ifls = value & 0x3F,
            IMSC => self.state.imsc = value & INT_MASK,
            ICR => self.state.ris &= !value,
            DMACR => self.state.dmacr = value & 0x7,
            // RSR/ECR clears receive errors, of which there are none;
            // FR, RIS, MIS and the ID registers are read only.
            _ => {}
        }
        self.update_irq();
    }

    fn flags(&self) -> u32 {
        let mut fr = FR_TXFE;
        if self.state.rx.is_empty() {
            fr |= FR_RXFE;
        }
        if self.state.rx.len() >= self.rx_capacity() {
            fr |= FR_RXFF;
        }
        fr
    }

    fn rx_capacity(&self) -> usize {
        if self.state.lcr_h & LCR_H_FEN != 0 {
            RX_FIFO_DEPTH
        } else {
            1
        }
    }

    /// RX FIFO level at which RXRIS asserts (`UARTIFLS.RXIFLSEL`, bits 5:3).
    fn rx_trigger(&self) -> usize {
        if self.state.lcr_h & LCR_H_FEN == 0 {
            return 1;
        }
        match (self.state.ifls >> 3) & 0x7 {
            0 => RX_FIFO_DEPTH / 8,
            1 => RX_FIFO_DEPTH / 4,
            2 => RX_FIFO_DEPTH / 2,
            3 => RX_FIFO_DEPTH * 3 / 4,
            _ => RX_FIFO_DEPTH * 7 / 8,
        }
    }

    fn update_rx_interrupts(&mut self) {
        self.state.ris &= !(INT_RX | INT_RT);
        if self.state.rx.len() >= self.rx_trigger() {
            self.state.ris |= INT_RX;
        }
        if !self.state.rx.is_empty() {
            self.state.ris |= INT_RT;
        }
    }

    /// A `UARTDR` read: the oldest received byte (0 if none).
    fn receive(&mut self) -> u32 {
        let byte = self.state.rx.pop_front();
        self.update_rx_interrupts();
        self.update_irq();
        byte.map_or(0, u32::from)
    }

    fn transmit(&mut self, byte: u8) {
        let ok = self.out.write_all(&[byte]).and_then(|()| self.out.flush());
        if ok.is_err() {
            self.dropped += 1;
        }
        self.state.ris |= INT_TX;
    }

    fn update_irq(&mut self) {
        let high = self.state.ris & self.state.imsc != 0;
        if high != self.irq_high {
            self.irq_high = high;
            self.irq.set_level(high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Line(Arc<Mutex<Vec<bool>>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Pl011, Sink, Line) {
        let sink = Sink::default();
        let line = Line::default();
        (
            Pl011::new(Box::new(sink.clone()), Box::new(line.clone())),
            sink,
            line,
        )
    }

    fn read32(u: &mut Pl011, off: u64) -> u32 {
        let mut b = [0u8; 4];
        u.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn data_register_writes_reach_the_sink_in_order() {
        let (mut u, sink, _) = uart();
        for &c in b"hi\n" {
            u.write(DR, &u32::from(c).to_le_bytes());
        }
        u.write(DR, b"!"); // byte-wide access, as some early consoles do
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n!");
    }

    #[test]
    fn flag_register_says_tx_empty_rx_empty_not_busy() {
        let (mut u, _, _) = uart();
        let fr = read32(&mut u, FR);
        assert_eq!(fr & FR_TXFE, FR_TXFE);
        assert_eq!(fr & FR_RXFE, FR_RXFE);
        assert_eq!(fr & (1 << 5), 0, "TXFF must be clear");
        assert_eq!(fr & (1 << 3), 0, "BUSY must be clear");
    }

    #[test]
    fn id_registers_identify_a_pl011_primecell() {
        let (mut u, _, _) = uart();
        let ids: Vec<u32> = (0..8).map(|i| read32(&mut u, ID_BASE + 4 * i)).collect();
        assert_eq!(ids, vec![0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn control_registers_read_back_what_was_written() {
        let (mut u, _, _) = uart();
        for (reg, val) in [
            (IBRD, 0x27),
            (FBRD, 0x4),
            (LCR_H, 0x70),
            (CR, 0x301),
            (IFLS, 0x9),
        ] {
            u.write(reg, &u32::to_le_bytes(val));
            assert_eq!(read32(&mut u, reg), val, "register {reg:#x}");
        }
    }

    #[test]
    fn tx_interrupt_follows_mask_and_clear() {
        let (mut u, _, line) = uart();
        u.write(DR, b"a");
        assert_eq!(read32(&mut u, RIS) & INT_TX, INT_TX);
        assert_eq!(read32(&mut u, MIS), 0);
        assert!(
            line.0.lock().unwrap().is_empty(),
            "masked interrupt must not fire"
        );
        u.write(IMSC, &INT_TX.to_le_bytes());
        assert_eq!(read32(&mut u, MIS), INT_TX);
        u.write(ICR, &INT_TX.to_le_bytes());
        assert_eq!(read32(&mut u, RIS), 0);
        u.write(DR, b"b");
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true]);
    }

    #[test]
    fn any_offset_and_size_is_harmless() {
        let (mut u, sink, _) = uart();
        for off in (0..0x1010u64).step_by(1) {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut buf = vec![0xAAu8; len];
                u.read(off, &mut buf);
                if off != DR && off != ICR && off != IMSC {
                    u.write(off, &buf);
                }
            }
        }
        u.read(u64::MAX, &mut [0u8; 8]);
        u.write(u64::MAX - 3, &[1, 2, 3, 4]);
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn wide_reads_zero_extend_and_sub_word_reads_shift() {
        let (mut u, _, _) = uart();
        let mut wide = [0xFFu8; 8];
        u.read(FR, &mut wide);
        assert_eq!(u64::from_le_bytes(wide), u64::from(FR_TXFE | FR_RXFE));
        let mut hi = [0u8; 1];
        u.read(ID_BASE + 28 + 1, &mut hi);
        assert_eq!(hi[0], 0);
    }

    #[test]
    fn received_bytes_are_read_in_order_and_flags_follow_the_fifo() {
        let (mut u, _, _) = uart();
        u.write(LCR_H, &0x70u32.to_le_bytes()); // 8N1, FIFOs on
        assert_eq!(u.enqueue_rx(b"ok"), 2);
        assert_eq!(read32(&mut u, FR) & FR_RXFE, 0);
        assert_eq!(read32(&mut u, DR), u32::from(b'o'));
        assert_eq!(read32(&mut u, DR), u32::from(b'k'));
        assert_eq!(read32(&mut u, FR) & FR_RXFE, FR_RXFE);
        assert_eq!(read32(&mut u, DR), 0, "empty FIFO reads 0");
    }

    #[test]
    fn rx_fifo_refuses_input_beyond_its_depth() {
        let (mut u, _, _) = uart();
        assert_eq!(u.enqueue_rx(b"ab"), 1, "FIFO disabled holds one byte");
        assert_eq!(read32(&mut u, FR) & FR_RXFF, FR_RXFF);
        u.write(LCR_H, &0x70u32.to_le_bytes());
        assert_eq!(u.enqueue_rx(&[b'x'; 40]), RX_FIFO_DEPTH - 1);
        assert_eq!(read32(&mut u, FR) & FR_RXFF, FR_RXFF);
        assert_eq!(u.enqueue_rx(b"y"), 0);
    }

    #[test]
    fn rx_interrupts_follow_trigger_level_and_drain() {
        let (mut u, _, line) = uart();
        u.write(LCR_H, &0x70u32.to_le_bytes());
        u.write(IFLS, &(2u32 << 3).to_le_bytes()); // RX at 1/2 full = 8 bytes
        u.write(IMSC, &(INT_RX | INT_RT).to_le_bytes());
        u.enqueue_rx(b"a");
        assert_eq!(read32(&mut u, RIS) & (INT_RX | INT_RT), INT_RT);
        u.enqueue_rx(b"bcdefgh");
        assert_eq!(read32(&mut u, MIS), INT_RX | INT_RT);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        for _ in 0..8 {
            read32(&mut u, DR);
        }
        assert_eq!(read32(&mut u, RIS) & (INT_RX | INT_RT), 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn state_round_trips_with_the_fifo_and_a_restored_pending_interrupt_raises_the_line() {
        let (mut u, _, _) = uart();
        u.write(LCR_H, &0x70u32.to_le_bytes());
        u.write(IMSC, &(INT_RX | INT_RT).to_le_bytes());
        u.enqueue_rx(b"hi");
        let saved = u.state();
        let json = serde_json::to_string(&saved).unwrap();
        let back: Pl011State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let line = Line::default();
        let mut restored =
            Pl011::from_state(back, Box::new(std::io::sink()), Box::new(line.clone()));
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        assert_eq!(read32(&mut restored, DR), u32::from(b'h'));
        assert_eq!(read32(&mut restored, DR), u32::from(b'i'));
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn broken_sink_counts_drops_and_keeps_going() {
        let mut u = Pl011::new(Box::new(Broken), Box::new(NoIrq));
        u.write(DR, b"x");
        u.write(DR, b"y");
        assert_eq!(u.dropped(), 2);
        assert_eq!(read32(&mut u, FR) & FR_TXFE, FR_TXFE);
    }
}
