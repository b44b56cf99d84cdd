//! The PL011 on the MMIO bus, and the operator's input feeding its receive
//! FIFO.
//!
//! Input arrives in a [`ConsoleInput`] (a bounded byte queue; `vpsci run`
//! fills it from its standard input on a thread of its own). The queue
//! outlives any one VM: a restarted VM's UART attaches to it and carries on.
//! Bytes move from the queue into the UART's 16-byte FIFO whenever there is
//! room: when input arrives and after every guest read of `UARTDR`. A full
//! queue makes the producer wait (back-pressure, nothing dropped).
//!
//! Lock order: the UART's lock, then the queue's; [`ConsoleInput::push`]
//! never holds the queue's lock while it takes the UART's.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};

use super::irq::IrqLine;
use super::MmioDevice;
use crate::uart::{Pl011, Pl011State};

/// Bytes the queue holds before a producer waits.
pub const INPUT_QUEUE_BYTES: usize = 4096;

/// Console input waiting for the guest's UART.
#[derive(Debug, Default)]
pub struct ConsoleInput {
    queue: Mutex<Queue>,
    space: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    bytes: VecDeque<u8>,
    uart: Option<Weak<UartDevice>>,
}

impl ConsoleInput {
    /// An empty queue, attached to no UART yet.
    pub fn new() -> ConsoleInput {
        ConsoleInput::default()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `bytes` for the guest, waiting while the queue is full, and
    /// moves what fits into the attached UART's FIFO.
    pub fn push(&self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let uart = {
                let mut queue = self.lock();
                while queue.bytes.len() >= INPUT_QUEUE_BYTES {
                    queue = self
                        .space
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                let room = INPUT_QUEUE_BYTES - queue.bytes.len();
                let (now, later) = bytes.split_at(bytes.len().min(room));
                queue.bytes.extend(now);
                bytes = later;
                queue.uart.as_ref().and_then(Weak::upgrade)
            };
            if let Some(uart) = uart {
                uart.refill();
            }
        }
    }

    /// Bytes waiting (not yet in a UART FIFO).
    pub fn pending(&self) -> usize {
        self.lock().bytes.len()
    }

    fn attach(&self, uart: &Arc<UartDevice>) {
        self.lock().uart = Some(Arc::downgrade(uart));
    }

    /// Hands `uart` as many queued bytes as it takes.
    fn feed(&self, uart: &mut Pl011) {
        let mut queue = self.lock();
        let (front, _) = queue.bytes.as_slices();
        let mut taken = uart.enqueue_rx(front);
        if taken == front.len() {
            let (_, back) = queue.bytes.as_slices();
            taken += uart.enqueue_rx(back);
        }
        if taken > 0 {
            queue.bytes.drain(..taken);
            self.space.notify_all();
        }
    }
}

/// A PL011 on the bus, optionally fed from a [`ConsoleInput`].
pub struct UartDevice {
    uart: Mutex<Pl011>,
    input: Option<Arc<ConsoleInput>>,
}

impl std::fmt::Debug for UartDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UartDevice").finish_non_exhaustive()
    }
}

impl UartDevice {
    /// A UART writing to `out`, interrupting on `irq`, reading from `input`
    /// (attached here; input already queued is delivered at once).
    pub fn new(
        out: Box<dyn Write + Send>,
        irq: Box<dyn IrqLine>,
        input: Option<Arc<ConsoleInput>>,
    ) -> Arc<UartDevice> {
        UartDevice::from_state(Pl011State::default(), out, irq, input)
    }

    /// [`UartDevice::new`] continuing from a saved state (a restored VM).
    pub fn from_state(
        state: Pl011State,
        out: Box<dyn Write + Send>,
        irq: Box<dyn IrqLine>,
        input: Option<Arc<ConsoleInput>>,
    ) -> Arc<UartDevice> {
        let device = Arc::new(UartDevice {
            uart: Mutex::new(Pl011::from_state(state, out, irq)),
            input,
        });
        if let Some(input) = &device.input {
            input.attach(&device);
        }
        device.refill();
        device
    }

    /// The UART's registers and receive FIFO (for a snapshot).
    pub fn state(&self) -> Pl011State {
        self.lock().state()
    }

    fn lock(&self) -> MutexGuard<'_, Pl011> {
        self.uart.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refill(&self) {
        if let Some(input) = &self.input {
            input.feed(&mut self.lock());
        }
    }
}

impl MmioDevice for UartDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut uart = self.lock();
        uart.read(offset, data);
        // A data register read may have made room in the FIFO.
        if offset == 0 {
            if let Some(input) = &self.input {
                input.feed(&mut uart);
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut uart = self.lock();
        uart.write(offset, data);
        // Enabling the FIFOs (UARTLCR_H) makes room for 15 more bytes.
        if let Some(input) = &self.input {
            input.feed(&mut uart);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uart::NoIrq;

    const DR: u64 = 0x000;
    const FR: u64 = 0x018;
    const LCR_H: u64 = 0x02C;

    fn read32(dev: &UartDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn drain(dev: &UartDevice) -> Vec<u8> {
        let mut got = Vec::new();
        while read32(dev, FR) & crate::uart::FR_RXFE == 0 {
            got.push(read32(dev, DR) as u8);
        }
        got
    }

    #[test]
    fn input_longer_than_the_fifo_reaches_the_guest_in_order() {
        let input = Arc::new(ConsoleInput::new());
        let dev = UartDevice::new(
            Box::new(std::io::sink()),
            Box::new(NoIrq),
            Some(input.clone()),
        );
        dev.write(LCR_H, &0x70u32.to_le_bytes());
        let text: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        input.push(&text);
        assert_eq!(drain(&dev), text);
        assert_eq!(input.pending(), 0);
    }

    #[test]
    fn input_queued_before_the_uart_exists_is_delivered_when_it_attaches() {
        let input = Arc::new(ConsoleInput::new());
        input.push(b"ls\n");
        let dev = UartDevice::new(
            Box::new(std::io::sink()),
            Box::new(NoIrq),
            Some(input.clone()),
        );
        dev.write(LCR_H, &0x70u32.to_le_bytes());
        assert_eq!(drain(&dev), b"ls\n");
    }

    #[test]
    fn a_full_queue_makes_the_producer_wait_until_the_guest_reads() {
        let input = Arc::new(ConsoleInput::new());
        let dev = UartDevice::new(
            Box::new(std::io::sink()),
            Box::new(NoIrq),
            Some(input.clone()),
        );
        dev.write(LCR_H, &0x70u32.to_le_bytes());
        let total = INPUT_QUEUE_BYTES * 2;
        let producer = {
            let input = Arc::clone(&input);
            std::thread::spawn(move || input.push(&vec![b'x'; total]))
        };
        let mut got = 0;
        while got < total {
            got += drain(&dev).len();
            std::thread::yield_now();
        }
        producer.join().unwrap();
        assert_eq!(got, total);
    }

    #[test]
    fn a_uart_without_input_reads_an_empty_fifo() {
        let dev = UartDevice::new(Box::new(std::io::sink()), Box::new(NoIrq), None);
        assert_eq!(read32(&dev, DR), 0);
        assert_ne!(read32(&dev, FR) & crate::uart::FR_RXFE, 0);
    }
}
