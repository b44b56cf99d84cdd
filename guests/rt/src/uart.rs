//! Output on the PL011 UART at 0x0900_0000 (the address vpsci and QEMU's
//! `virt` machine share), and a polled receive for the few guests that wait
//! for the host (a byte on the VMM's console input). No initialisation is
//! needed on either VMM.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

const PL011_BASE: usize = 0x0900_0000;
const UARTDR: usize = 0x000;
const UARTFR: usize = 0x018;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;

static LOCK: AtomicBool = AtomicBool::new(false);

fn put_byte(byte: u8) {
    // SAFETY: PL011 registers are device memory at a fixed address that
    // nothing else in the guest maps or owns; the accesses are aligned.
    unsafe {
        while core::ptr::read_volatile((PL011_BASE + UARTFR) as *const u32) & FR_TXFF != 0 {}
        core::ptr::write_volatile((PL011_BASE + UARTDR) as *mut u32, u32::from(byte));
    }
}

/// The next received byte, if the receive FIFO holds one.
pub fn try_read_byte() -> Option<u8> {
    // SAFETY: as in `put_byte`: fixed, aligned PL011 registers nothing else owns.
    unsafe {
        if core::ptr::read_volatile((PL011_BASE + UARTFR) as *const u32) & FR_RXFE != 0 {
            return None;
        }
        Some(core::ptr::read_volatile((PL011_BASE + UARTDR) as *const u32) as u8)
    }
}

/// A writer for one line of output; holds the UART lock while alive so lines
/// from different CPUs do not interleave.
pub struct Writer(());

impl Writer {
    /// Takes the UART lock (gives up waiting after a few million tries, so a
    /// CPU that died holding it cannot silence a fatal report).
    pub fn lock() -> Writer {
        let mut tries = 0u32;
        while LOCK
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
            && tries < 5_000_000
        {
            tries += 1;
            core::hint::spin_loop();
        }
        Writer(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

/// Prints formatted text followed by a newline, as one line.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut w = $crate::uart::Writer::lock();
        let _ = w.write_fmt(format_args!($($arg)*));
        let _ = w.write_str("\n");
    }};
}
