//! A PL031 real-time clock (Arm PrimeCell RTC, DDI0224) with its match
//! register and interrupt, so a guest can set a wake-up alarm.
//!
//! Written here because rust-vmm's `vm-superio` 0.8 PL031 (`rtc_pl031.rs`)
//! stores the match register but never compares it (its source marks the
//! alarm as a TODO), and a suspended guest needs exactly that alarm to be
//! woken.
//!
//! What is modelled (DDI0224 §3.3):
//! - `RTCDR` (0x000): the counter, in seconds: the host's wall clock (UNIX
//!   seconds, so UTC) plus an offset, modulo 2^32;
//! - `RTCLR` (0x008): a write loads the counter (sets the offset so `RTCDR`
//!   reads the value now) and reads back the last value loaded;
//! - `RTCMR` (0x004): the match value; when the counter reaches it the raw
//!   interrupt `RTCRIS` latches. A match value equal to the counter when it is
//!   written (or when the counter is loaded) matches at once, as QEMU's model
//!   does;
//! - `RTCIMSC` (0x010) masks, `RTCMIS` (0x018) = `RTCRIS & RTCIMSC`, and a
//!   write of 1 to `RTCICR` (0x01C) clears the latch. The interrupt output
//!   `RTCINTR` is level-triggered: high exactly while `RTCMIS` is set;
//! - `RTCCR` (0x00C) reads 1: the counter always runs (it is the host's
//!   clock, which nothing stops); writes are accepted and change nothing, as
//!   the TRM says for writes once the RTC is started;
//! - the PrimeCell identification registers at 0xFE0..0xFFC, which Linux's
//!   AMBA bus reads to bind the `rtc-pl031` driver (peripheral ID 0x00141031:
//!   part 0x031, designer 0x41 Arm, revision 1; cell ID 0xB105F00D).
//!
//! Matching needs no guest access: [`Pl031::alarm_at`] gives the wall-clock
//! second of the next match and [`Pl031::update`] latches it. The VMM runs
//! one thread per RTC ([`super::rtc::RtcDevice`]) that sleeps until then.
//! After a match the alarm is spent until the guest writes `RTCMR` or `RTCLR`
//! again (the counter would next pass the same value 2^32 s later).
//!
//! Everything the device remembers is in [`Pl031State`], one plain
//! serialisable struct, so a snapshot can save and restore it. Any offset
//! and access size is accepted; nothing here panics.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::irq::IrqLine;

/// Data (counter) register.
const DR: u64 = 0x000;
/// Match register.
const MR: u64 = 0x004;
/// Load register.
const LR: u64 = 0x008;
/// Control register.
const CR: u64 = 0x00C;
/// Interrupt mask set/clear.
const IMSC: u64 = 0x010;
/// Raw interrupt status.
const RIS: u64 = 0x014;
/// Masked interrupt status.
const MIS: u64 = 0x018;
/// Interrupt clear (write only).
const ICR: u64 = 0x01C;
/// First identification register.
const ID_BASE: u64 = 0xFE0;
/// Last identification register.
const ID_LAST: u64 = 0xFFC;

/// The one interrupt bit of RIS/MIS/IMSC/ICR.
pub const INT_ALARM: u32 = 1;

/// PeriphID0..3 then PCellID0..3.
pub const ID_REGISTERS: [u8; 8] = [0x31, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;

/// The wall clock the RTC counts from.
pub trait WallClock: Send + Sync {
    /// Time since the UNIX epoch.
    fn now(&self) -> Duration;
}

/// The host's wall clock (`SystemTime`); a clock set before 1970 reads as
/// the epoch.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostClock;

impl WallClock for HostClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// Everything a PL031 remembers (what a snapshot saves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pl031State {
    /// Added to the host's UNIX seconds (modulo 2^32) to give `RTCDR`.
    pub offset: u32,
    /// `RTCMR`.
    pub match_value: u32,
    /// `RTCLR` as last written.
    pub load_value: u32,
    /// `RTCIMSC`.
    pub mask: u32,
    /// `RTCRIS`.
    pub raw_status: u32,
    /// Host UNIX second at which the counter reaches `match_value`, while
    /// that match is still to come.
    pub alarm_at: Option<u64>,
}

/// [`Pl031::raise_alarm`] while the guest masks the alarm interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmMasked;

/// A PL031 counting from `clock` and interrupting on `irq`.
pub struct Pl031 {
    state: Pl031State,
    clock: Arc<dyn WallClock>,
    irq: Box<dyn IrqLine>,
    irq_high: bool,
}

impl std::fmt::Debug for Pl031 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl031")
            .field("state", &self.state)
            .field("irq_high", &self.irq_high)
            .finish_non_exhaustive()
    }
}

impl Pl031 {
    /// An RTC reading the host clock's UNIX time, alarm unset and masked.
    pub fn new(clock: Arc<dyn WallClock>, irq: Box<dyn IrqLine>) -> Pl031 {
        Pl031::from_state(Pl031State::default(), clock, irq)
    }

    /// An RTC continuing from a saved `state` (its interrupt line is driven
    /// to the level the state implies, and a match that came due while it
    /// was saved latches now).
    pub fn from_state(
        state: Pl031State,
        clock: Arc<dyn WallClock>,
        irq: Box<dyn IrqLine>,
    ) -> Pl031 {
        let mut rtc = Pl031 {
            state,
            clock,
            irq,
            irq_high: false,
        };
        rtc.update();
        rtc.update_irq();
        rtc
    }

    /// What a snapshot saves.
    pub fn state(&self) -> Pl031State {
        self.state
    }

    /// The wall-clock time (since the UNIX epoch) of the next match, if one
    /// is armed.
    pub fn alarm_at(&self) -> Option<Duration> {
        self.state.alarm_at.map(Duration::from_secs)
    }

    /// Latches the match if its time has come; returns whether it did.
    pub fn update(&mut self) -> bool {
        let Some(at) = self.state.alarm_at else {
            return false;
        };
        if self.clock.now().as_secs() < at {
            return false;
        }
        self.state.alarm_at = None;
        self.state.raw_status |= INT_ALARM;
        self.update_irq();
        true
    }

    /// Raises the alarm interrupt now, as if the match had come (the
    /// operator's wake-up of a suspended guest): `RTCRIS` latches, a pending
    /// match is used up, and the line goes high. Refused, changing nothing,
    /// while the guest masks the alarm in `RTCIMSC` (the line could not rise).
    pub fn raise_alarm(&mut self) -> Result<(), AlarmMasked> {
        if self.state.mask & INT_ALARM == 0 {
            return Err(AlarmMasked);
        }
        self.state.alarm_at = None;
        self.state.raw_status |= INT_ALARM;
        self.update_irq();
        Ok(())
    }

    /// An MMIO read of `data.len()` bytes at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.update();
        let value = self.read_register(offset & !3);
        let shifted = u64::from(value) >> ((offset & 3) * 8);
        let bytes = shifted.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// An MMIO write of `data` at `offset`. Writes that do not start at a
    /// register's first byte are ignored; shorter ones are zero-extended.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.is_empty() {
            return;
        }
        self.update();
        let mut bytes = [0u8; 4];
        for (dst, src) in bytes.iter_mut().zip(data) {
            *dst = *src;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
        self.update();
        self.update_irq();
    }

    fn now_secs(&self) -> u64 {
        self.clock.now().as_secs()
    }

    /// `RTCDR` at host second `secs`.
    fn counter_at(&self, secs: u64) -> u32 {
        (secs as u32).wrapping_add(self.state.offset)
    }

    fn read_register(&self, reg: u64) -> u32 {
        match reg {
            DR => self.counter_at(self.now_secs()),
            MR => self.state.match_value,
            LR => self.state.load_value,
            CR => 1,
            IMSC => self.state.mask,
            RIS => self.state.raw_status,
            MIS => self.state.raw_status & self.state.mask,
            ID_BASE..=ID_LAST => {
                let index = ((reg - ID_BASE) / 4) as usize;
                ID_REGISTERS.get(index).copied().map_or(0, u32::from)
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, reg: u64, value: u32) {
        match reg {
            MR => {
                self.state.match_value = value;
                self.arm();
            }
            LR => {
                self.state.load_value = value;
                self.state.offset = value.wrapping_sub(self.now_secs() as u32);
                self.arm();
            }
            IMSC => self.state.mask = value & INT_ALARM,
            ICR => self.state.raw_status &= !(value & INT_ALARM),
            // DR, RIS and MIS are read only; CR cannot stop a running RTC.
            _ => {}
        }
    }

    /// Schedules the next time the counter equals the match value: now if it
    /// does already, else at the start of the host second when it will.
    fn arm(&mut self) {
        let now = self.now_secs();
        let ticks = self.state.match_value.wrapping_sub(self.counter_at(now));
        self.state.alarm_at = Some(now + u64::from(ticks));
    }

    fn line_level(&self) -> bool {
        self.state.raw_status & self.state.mask != 0
    }

    fn update_irq(&mut self) {
        let high = self.line_level();
        if high != self.irq_high {
            self.irq_high = high;
            self.irq.set_level(high);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A wall clock the test moves by hand.
    #[derive(Clone, Default)]
    pub(crate) struct FakeClock(pub Arc<Mutex<Duration>>);

    impl FakeClock {
        pub(crate) fn at(secs: u64) -> FakeClock {
            FakeClock(Arc::new(Mutex::new(Duration::from_secs(secs))))
        }
        pub(crate) fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl WallClock for FakeClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    #[derive(Clone, Default)]
    pub(crate) struct Line(pub Arc<Mutex<Vec<bool>>>);

    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    const START: u64 = 1_700_000_000;

    fn rtc() -> (Pl031, FakeClock, Line) {
        let clock = FakeClock::at(START);
        let line = Line::default();
        let rtc = Pl031::new(Arc::new(clock.clone()), Box::new(line.clone()));
        (rtc, clock, line)
    }

    fn read32(rtc: &mut Pl031, off: u64) -> u32 {
        let mut b = [0u8; 4];
        rtc.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(rtc: &mut Pl031, off: u64, value: u32) {
        rtc.write(off, &value.to_le_bytes());
    }

    #[test]
    fn data_register_reads_host_unix_seconds_and_advances_with_the_clock() {
        let (mut rtc, clock, _) = rtc();
        assert_eq!(read32(&mut rtc, DR), START as u32);
        clock.advance(Duration::from_millis(2500));
        assert_eq!(read32(&mut rtc, DR), START as u32 + 2);
    }

    #[test]
    fn host_clock_reads_now() {
        let mut rtc = Pl031::new(Arc::new(HostClock), Box::new(super::super::irq::NoIrq));
        let before = HostClock.now().as_secs() as u32;
        let read = read32(&mut rtc, DR);
        let after = HostClock.now().as_secs() as u32;
        assert!(before <= read && read <= after, "{before} {read} {after}");
    }

    #[test]
    fn load_register_sets_the_counter_which_keeps_counting() {
        let (mut rtc, clock, _) = rtc();
        write32(&mut rtc, LR, 1000);
        assert_eq!(read32(&mut rtc, LR), 1000);
        assert_eq!(read32(&mut rtc, DR), 1000);
        clock.advance(Duration::from_secs(5));
        assert_eq!(read32(&mut rtc, DR), 1005);
        assert_eq!(read32(&mut rtc, LR), 1000, "LR keeps what was loaded");
    }

    #[test]
    fn counter_wraps_modulo_2_pow_32() {
        let (mut rtc, clock, _) = rtc();
        write32(&mut rtc, LR, u32::MAX);
        clock.advance(Duration::from_secs(2));
        assert_eq!(read32(&mut rtc, DR), 1);
    }

    #[test]
    fn alarm_latches_at_the_match_second_and_raises_the_unmasked_line() {
        let (mut rtc, clock, line) = rtc();
        write32(&mut rtc, IMSC, INT_ALARM);
        write32(&mut rtc, MR, START as u32 + 2);
        assert_eq!(rtc.alarm_at(), Some(Duration::from_secs(START + 2)));
        clock.advance(Duration::from_millis(1999));
        assert!(!rtc.update());
        assert_eq!(read32(&mut rtc, RIS), 0);
        assert!(line.0.lock().unwrap().is_empty());
        clock.advance(Duration::from_millis(1));
        assert!(rtc.update());
        assert_eq!(read32(&mut rtc, RIS), INT_ALARM);
        assert_eq!(read32(&mut rtc, MIS), INT_ALARM);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        assert_eq!(rtc.alarm_at(), None, "the alarm is spent");
    }

    #[test]
    fn a_guest_read_after_the_match_second_sees_the_latch_without_the_alarm_thread() {
        let (mut rtc, clock, line) = rtc();
        write32(&mut rtc, MR, START as u32 + 1);
        write32(&mut rtc, IMSC, INT_ALARM);
        clock.advance(Duration::from_secs(3));
        assert_eq!(read32(&mut rtc, MIS), INT_ALARM);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
    }

    #[test]
    fn a_masked_alarm_latches_in_ris_but_leaves_the_line_low_until_unmasked() {
        let (mut rtc, clock, line) = rtc();
        write32(&mut rtc, MR, START as u32 + 1);
        clock.advance(Duration::from_secs(1));
        rtc.update();
        assert_eq!(read32(&mut rtc, RIS), INT_ALARM);
        assert_eq!(read32(&mut rtc, MIS), 0);
        assert!(line.0.lock().unwrap().is_empty());
        write32(&mut rtc, IMSC, INT_ALARM);
        assert_eq!(
            *line.0.lock().unwrap(),
            vec![true],
            "level: unmasking raises"
        );
        write32(&mut rtc, IMSC, 0);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn clearing_the_interrupt_lowers_the_line_and_it_stays_low() {
        let (mut rtc, clock, line) = rtc();
        write32(&mut rtc, IMSC, INT_ALARM);
        write32(&mut rtc, MR, START as u32 + 1);
        clock.advance(Duration::from_secs(1));
        rtc.update();
        write32(&mut rtc, ICR, INT_ALARM);
        assert_eq!(read32(&mut rtc, RIS), 0);
        assert_eq!(read32(&mut rtc, MIS), 0);
        clock.advance(Duration::from_secs(10));
        rtc.update();
        assert_eq!(read32(&mut rtc, RIS), 0, "one match, one latch");
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn a_match_equal_to_the_counter_latches_at_once() {
        let (mut rtc, _, line) = rtc();
        write32(&mut rtc, IMSC, INT_ALARM);
        write32(&mut rtc, MR, START as u32);
        assert_eq!(read32(&mut rtc, RIS), INT_ALARM);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
    }

    #[test]
    fn a_match_in_the_past_waits_for_the_counter_to_wrap() {
        let (mut rtc, _, _) = rtc();
        write32(&mut rtc, MR, START as u32 - 1);
        assert_eq!(
            rtc.alarm_at(),
            Some(Duration::from_secs(START + u64::from(u32::MAX)))
        );
        assert_eq!(read32(&mut rtc, RIS), 0);
    }

    #[test]
    fn loading_the_counter_moves_the_alarm() {
        let (mut rtc, _, _) = rtc();
        write32(&mut rtc, MR, 100);
        write32(&mut rtc, LR, 90);
        assert_eq!(rtc.alarm_at(), Some(Duration::from_secs(START + 10)));
    }

    #[test]
    fn id_registers_identify_a_pl031_primecell() {
        let (mut rtc, _, _) = rtc();
        let ids: Vec<u32> = (0..8).map(|i| read32(&mut rtc, ID_BASE + 4 * i)).collect();
        assert_eq!(ids, vec![0x31, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        // Linux's AMBA bus: periphid = ID0 | ID1 << 8 | ID2 << 16 | ID3 << 24,
        // matched by rtc-pl031 as 0x00041031 under mask 0x000fffff.
        let periph = ids[..4]
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (b << (8 * i)));
        assert_eq!(periph & 0x000f_ffff, 0x0004_1031);
        let cell = ids[4..]
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (b << (8 * i)));
        assert_eq!(cell, 0xB105_F00D);
    }

    #[test]
    fn control_reads_started_and_read_only_registers_ignore_writes() {
        let (mut rtc, _, _) = rtc();
        assert_eq!(read32(&mut rtc, CR), 1);
        write32(&mut rtc, CR, 0);
        assert_eq!(read32(&mut rtc, CR), 1);
        write32(&mut rtc, DR, 5);
        write32(&mut rtc, RIS, 1);
        write32(&mut rtc, MIS, 1);
        assert_eq!(read32(&mut rtc, DR), START as u32);
        assert_eq!(read32(&mut rtc, RIS), 0);
        write32(&mut rtc, IMSC, 0xFFFF_FFFF);
        assert_eq!(read32(&mut rtc, IMSC), INT_ALARM, "only bit 0 exists");
    }

    #[test]
    fn state_round_trips_and_a_restored_latched_alarm_raises_its_line() {
        let (mut rtc, clock, _) = rtc();
        write32(&mut rtc, LR, 42);
        write32(&mut rtc, IMSC, INT_ALARM);
        write32(&mut rtc, MR, 44);
        let saved = rtc.state();
        let json = serde_json::to_string(&saved).unwrap();
        let back: Pl031State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        clock.advance(Duration::from_secs(2));
        let line = Line::default();
        let mut restored = Pl031::from_state(back, Arc::new(clock.clone()), Box::new(line.clone()));
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        assert_eq!(read32(&mut restored, DR), 44);
        assert_eq!(read32(&mut restored, MIS), INT_ALARM);
    }

    #[test]
    fn any_offset_and_size_is_harmless() {
        let (mut rtc, _, _) = rtc();
        for off in 0..0x1010u64 {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut buf = vec![0x55u8; len];
                rtc.read(off, &mut buf);
            }
        }
        rtc.read(u64::MAX, &mut [0u8; 8]);
        rtc.write(u64::MAX - 3, &[1, 2, 3, 4]);
        rtc.write(0x2000, &[1; 16]);
        let mut wide = [0xFFu8; 8];
        rtc.read(CR, &mut wide);
        assert_eq!(u64::from_le_bytes(wide), 1, "wide reads zero-extend");
    }

    #[test]
    fn raising_the_alarm_latches_it_and_drives_the_line_only_when_the_guest_unmasked_it() {
        let (mut rtc, _clock, line) = rtc();
        assert_eq!(rtc.raise_alarm(), Err(AlarmMasked));
        assert_eq!(read32(&mut rtc, RIS), 0, "a refused raise changed RTCRIS");
        assert!(
            line.0.lock().unwrap().is_empty(),
            "a refused raise drove the line"
        );
        let now = read32(&mut rtc, DR);
        write32(&mut rtc, MR, now.wrapping_add(3600));
        write32(&mut rtc, IMSC, INT_ALARM);
        assert_eq!(rtc.raise_alarm(), Ok(()));
        assert_eq!(read32(&mut rtc, MIS), INT_ALARM);
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        assert_eq!(rtc.alarm_at(), None, "the pending match was not used up");
        write32(&mut rtc, ICR, INT_ALARM);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
    }
}
