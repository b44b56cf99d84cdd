//! Device interrupt lines as the VMM sees them: which device drives which
//! SPI, whether the line is high, and how often it rose.
//!
//! Devices never see KVM: they drive a [`IrqLine`]. The VMM wraps the real
//! line (a vGIC SPI) in a [`TrackedLine`] that first notes the level in the
//! VM's [`InterruptLines`], then forwards it. Noting before forwarding
//! matters: when a rising edge wakes a suspended vCPU, KVM can only report the
//! wake-up after the line reached the vGIC, so by then the rise is on record
//! and the vCPU thread can name the device that woke it
//! ([`InterruptLines::raised_since`]).
//!
//! Everything here is lock-free (one atomic per fact) so devices can raise
//! lines from any thread, including the RTC's alarm thread, while vCPU
//! threads take marks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::uart::{IrqLine, NoIrq};

/// One device's interrupt line as registered with [`InterruptLines`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineInfo {
    /// The device's name in the event log (`"pl011"`, `"pl031"`, ...).
    pub device: &'static str,
    /// The shared peripheral interrupt it drives (INTID = 32 + SPI).
    pub spi: u32,
}

#[derive(Debug)]
struct LineState {
    info: LineInfo,
    high: AtomicBool,
    rises: AtomicU64,
    /// Nanoseconds from [`InterruptLines`]' epoch to the latest rise.
    last_rise_ns: AtomicU64,
}

/// The VM's device interrupt lines, fixed when the VM is assembled.
#[derive(Debug)]
pub struct InterruptLines {
    lines: Vec<LineState>,
    epoch: Instant,
}

impl Default for InterruptLines {
    fn default() -> InterruptLines {
        InterruptLines::new(&[])
    }
}

/// A line that rose after a [`RiseMark`], and when it last did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The line.
    pub line: LineInfo,
    /// Time from its latest rise to the [`InterruptLines::raised_since`] call.
    pub ago: Duration,
}

/// How often each line had risen at some moment ([`InterruptLines::mark`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RiseMark(Vec<u64>);

impl InterruptLines {
    /// Registers every line at once; line `i` of the result is `infos[i]`.
    pub fn new(infos: &[LineInfo]) -> InterruptLines {
        InterruptLines {
            lines: infos
                .iter()
                .map(|&info| LineState {
                    info,
                    high: AtomicBool::new(false),
                    rises: AtomicU64::new(0),
                    last_rise_ns: AtomicU64::new(0),
                })
                .collect(),
            epoch: Instant::now(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The registered lines, in registration order.
    pub fn infos(&self) -> impl Iterator<Item = LineInfo> + '_ {
        self.lines.iter().map(|l| l.info)
    }

    /// Records that line `index` is now at `high`; out-of-range indices are
    /// ignored (a line is only ever built for a registered index).
    fn note(&self, index: usize, high: bool) {
        if let Some(line) = self.lines.get(index) {
            let was = line.high.swap(high, Ordering::AcqRel);
            if high && !was {
                line.last_rise_ns.store(self.now_ns(), Ordering::Release);
                line.rises.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether line `index` is high now.
    pub fn is_high(&self, index: usize) -> bool {
        self.lines
            .get(index)
            .is_some_and(|l| l.high.load(Ordering::Acquire))
    }

    /// The rise counts now, to compare with later.
    pub fn mark(&self) -> RiseMark {
        RiseMark(
            self.lines
                .iter()
                .map(|l| l.rises.load(Ordering::Acquire))
                .collect(),
        )
    }

    /// The lines that can have woken a vCPU that suspended at `mark`: those
    /// that rose since; if none did, those still high (a level interrupt
    /// already pending when the vCPU suspended wakes it at once, so its rise
    /// came before the mark).
    pub fn wake_sources(&self, mark: &RiseMark) -> Vec<Raised> {
        let rose = self.raised_since(mark);
        if !rose.is_empty() {
            return rose;
        }
        let now = self.now_ns();
        self.lines
            .iter()
            .filter(|line| line.high.load(Ordering::Acquire))
            .map(|line| Raised {
                line: line.info,
                ago: Duration::from_nanos(
                    now.saturating_sub(line.last_rise_ns.load(Ordering::Acquire)),
                ),
            })
            .collect()
    }

    /// The lines that rose at least once after `mark` was taken.
    pub fn raised_since(&self, mark: &RiseMark) -> Vec<Raised> {
        let now = self.now_ns();
        self.lines
            .iter()
            .zip(mark.0.iter().copied().chain(std::iter::repeat(0)))
            .filter(|(line, before)| line.rises.load(Ordering::Acquire) > *before)
            .map(|(line, _)| Raised {
                line: line.info,
                ago: Duration::from_nanos(
                    now.saturating_sub(line.last_rise_ns.load(Ordering::Acquire)),
                ),
            })
            .collect()
    }
}

/// A line that notes every level in [`InterruptLines`] and then drives
/// `inner` (the real interrupt).
pub struct TrackedLine {
    lines: Arc<InterruptLines>,
    index: usize,
    inner: Box<dyn IrqLine>,
}

impl std::fmt::Debug for TrackedLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedLine")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl TrackedLine {
    /// Line `index` of `lines`, forwarding to `inner`.
    pub fn new(lines: Arc<InterruptLines>, index: usize, inner: Box<dyn IrqLine>) -> TrackedLine {
        TrackedLine {
            lines,
            index,
            inner,
        }
    }
}

impl IrqLine for TrackedLine {
    fn set_level(&self, high: bool) {
        self.lines.note(self.index, high);
        self.inner.set_level(high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UART: LineInfo = LineInfo {
        device: "pl011",
        spi: 1,
    };
    const RTC: LineInfo = LineInfo {
        device: "pl031",
        spi: 2,
    };

    fn lines() -> Arc<InterruptLines> {
        Arc::new(InterruptLines::new(&[UART, RTC]))
    }

    #[test]
    fn only_lines_that_rose_after_the_mark_are_named() {
        let lines = lines();
        let uart = TrackedLine::new(Arc::clone(&lines), 0, Box::new(NoIrq));
        let rtc = TrackedLine::new(Arc::clone(&lines), 1, Box::new(NoIrq));
        uart.set_level(true); // already high when the VM suspends
        let mark = lines.mark();
        assert!(lines.raised_since(&mark).is_empty());
        rtc.set_level(true);
        uart.set_level(true); // still high: not a new rise
        let raised = lines.raised_since(&mark);
        assert_eq!(raised.iter().map(|r| r.line).collect::<Vec<_>>(), vec![RTC]);
        assert!(lines.is_high(0) && lines.is_high(1));
    }

    #[test]
    fn a_pulse_between_mark_and_check_still_counts() {
        let lines = lines();
        let rtc = TrackedLine::new(Arc::clone(&lines), 1, Box::new(NoIrq));
        let mark = lines.mark();
        rtc.set_level(true);
        rtc.set_level(false);
        let raised = lines.raised_since(&mark);
        assert_eq!(raised.iter().map(|r| r.line).collect::<Vec<_>>(), vec![RTC]);
        assert!(!lines.is_high(1));
    }

    #[test]
    fn the_level_is_noted_before_it_is_forwarded() {
        struct Check(Arc<InterruptLines>);
        impl IrqLine for Check {
            fn set_level(&self, high: bool) {
                assert_eq!(self.0.is_high(1), high);
            }
        }
        let lines = lines();
        let rtc = TrackedLine::new(Arc::clone(&lines), 1, Box::new(Check(Arc::clone(&lines))));
        rtc.set_level(true);
        rtc.set_level(false);
    }

    #[test]
    fn the_time_since_the_latest_rise_is_reported() {
        let lines = lines();
        let rtc = TrackedLine::new(Arc::clone(&lines), 1, Box::new(NoIrq));
        let mark = lines.mark();
        rtc.set_level(true);
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let raised = lines.raised_since(&mark);
        assert!(raised[0].ago >= Duration::from_millis(20), "{raised:?}");
        assert!(
            raised[0].ago <= before.elapsed() + Duration::from_millis(20),
            "{raised:?}"
        );
    }

    #[test]
    fn a_line_already_high_at_the_mark_is_the_wake_source_when_none_rose() {
        let lines = lines();
        let rtc = TrackedLine::new(Arc::clone(&lines), 1, Box::new(NoIrq));
        rtc.set_level(true); // the alarm fired just before the vCPU suspended
        let mark = lines.mark();
        let sources: Vec<LineInfo> = lines.wake_sources(&mark).iter().map(|r| r.line).collect();
        assert_eq!(sources, vec![RTC]);
        // A line that rose after the mark takes precedence.
        let uart = TrackedLine::new(Arc::clone(&lines), 0, Box::new(NoIrq));
        uart.set_level(true);
        let sources: Vec<LineInfo> = lines.wake_sources(&mark).iter().map(|r| r.line).collect();
        assert_eq!(sources, vec![UART]);
    }

    #[test]
    fn unknown_indices_are_ignored() {
        let lines = lines();
        let stray = TrackedLine::new(Arc::clone(&lines), 7, Box::new(NoIrq));
        let mark = lines.mark();
        stray.set_level(true);
        assert!(lines.raised_since(&mark).is_empty());
        assert!(!lines.is_high(7));
    }
}
