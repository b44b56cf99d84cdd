//! The PL031 as the VM holds it: the register model behind a lock, and the
//! thread that latches its alarm on time while nobody touches the device
//! (a suspended guest does not poll its RTC).
//!
//! The alarm thread sleeps on a condition variable until the wall-clock
//! second [`Pl031::alarm_at`] names; every guest write notifies it so a new
//! or moved alarm is seen at once. [`RtcDevice`]'s `Drop` stops and joins
//! it, so the thread lives exactly as long as the VM's device.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::pl031::{AlarmMasked, Pl031, Pl031State, WallClock};
use super::MmioDevice;

struct Cell {
    rtc: Pl031,
    stop: bool,
}

struct Shared {
    cell: Mutex<Cell>,
    changed: Condvar,
    clock: Arc<dyn WallClock>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cell> {
        // A panic while holding the lock cannot leave the register model
        // half-updated in a way that matters more than losing the device.
        self.cell.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A PL031 on the MMIO bus with its alarm thread.
pub struct RtcDevice {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RtcDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcDevice")
            .field("rtc", &self.shared.lock().rtc)
            .finish_non_exhaustive()
    }
}

impl RtcDevice {
    /// Wraps `rtc` (which counts from `clock`) and starts its alarm thread.
    pub fn new(rtc: Pl031, clock: Arc<dyn WallClock>) -> std::io::Result<RtcDevice> {
        let shared = Arc::new(Shared {
            cell: Mutex::new(Cell { rtc, stop: false }),
            changed: Condvar::new(),
            clock,
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("rtc-alarm".to_owned())
            .spawn(move || alarm_loop(&for_thread))?;
        Ok(RtcDevice {
            shared,
            thread: Some(thread),
        })
    }

    /// Raises the alarm interrupt now ([`Pl031::raise_alarm`]).
    pub fn raise_alarm(&self) -> Result<(), AlarmMasked> {
        let mut cell = self.shared.lock();
        cell.rtc.raise_alarm()?;
        // The pending match is used up: the alarm thread recomputes its sleep.
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The register state (for a snapshot).
    pub fn state(&self) -> Pl031State {
        self.shared.lock().rtc.state()
    }
}

impl MmioDevice for RtcDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.shared.lock().rtc.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut cell = self.shared.lock();
        let before = cell.rtc.alarm_at();
        cell.rtc.write(offset, data);
        if cell.rtc.alarm_at() != before {
            self.shared.changed.notify_all();
        }
    }
}

impl Drop for RtcDevice {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sleeps until the armed alarm's second, latches it, repeats; leaves when
/// the device is dropped.
fn alarm_loop(shared: &Shared) {
    let mut cell = shared.lock();
    while !cell.stop {
        cell.rtc.update();
        cell = match cell.rtc.alarm_at() {
            None => shared
                .changed
                .wait(cell)
                .unwrap_or_else(PoisonError::into_inner),
            Some(at) => {
                // Recomputed after every wake-up: a condition variable's
                // timeout runs on the monotonic clock, the alarm on the wall
                // clock, and the guest may have moved the alarm meanwhile.
                let wait = at.saturating_sub(shared.clock.now());
                shared
                    .changed
                    .wait_timeout(cell, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::pl031::tests::Line;
    use super::super::pl031::HostClock;
    use super::*;
    use crate::uart::IrqLine;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const MIS: u64 = 0x018;
    const MR: u64 = 0x004;
    const IMSC: u64 = 0x010;
    const DR: u64 = 0x000;

    fn read32(dev: &RtcDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sends every level to a channel, so the test waits without polling.
    struct ChannelLine(Mutex<mpsc::Sender<bool>>);

    impl IrqLine for ChannelLine {
        fn set_level(&self, high: bool) {
            let _ = self.0.lock().unwrap().send(high);
        }
    }

    #[test]
    fn the_alarm_thread_raises_the_line_at_the_match_second_without_guest_access() {
        let clock: Arc<dyn WallClock> = Arc::new(HostClock);
        let (tx, rx) = mpsc::channel();
        let dev = RtcDevice::new(
            Pl031::new(Arc::clone(&clock), Box::new(ChannelLine(Mutex::new(tx)))),
            Arc::clone(&clock),
        )
        .unwrap();
        dev.write(IMSC, &1u32.to_le_bytes());
        let now = read32(&dev, DR);
        dev.write(MR, &(now + 1).to_le_bytes());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        assert!(
            clock.now().as_secs() as u32 > now,
            "fired before the match second"
        );
        assert_eq!(read32(&dev, MIS), 1);
    }

    #[test]
    fn dropping_the_device_stops_its_thread_even_with_an_alarm_far_away() {
        let clock: Arc<dyn WallClock> = Arc::new(HostClock);
        let dev = RtcDevice::new(
            Pl031::new(Arc::clone(&clock), Box::new(Line::default())),
            clock,
        )
        .unwrap();
        let now = read32(&dev, DR);
        dev.write(MR, &now.wrapping_add(3600).to_le_bytes());
        let started = Instant::now();
        drop(dev);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
