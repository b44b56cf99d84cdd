//! `vpsci run --snapshot-on-console MARKER`: a console writer that notices
//! when the guest prints a marker, so a snapshot is taken at a point the
//! guest chose.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::events::{Event, EventSink, PowerState};

/// Set once the marker was seen; waited on by the snapshot thread.
#[derive(Debug, Default)]
pub struct MarkerSeen {
    seen: Mutex<bool>,
    changed: Condvar,
}

impl MarkerSeen {
    /// Whether the marker was seen, waiting at most `limit` for it.
    pub fn wait(&self, limit: Duration) -> bool {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let (seen, _) = self
            .changed
            .wait_timeout_while(seen, limit, |s| !*s)
            .unwrap_or_else(PoisonError::into_inner);
        *seen
    }

    /// Marks the event as seen.
    pub fn set(&self) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.changed.notify_all();
    }
}

/// Passes console output through to `inner` and sets [`MarkerSeen`] the first
/// time the output contains the marker (also across writes).
pub struct MarkerWriter {
    inner: Box<dyn Write + Send>,
    marker: Vec<u8>,
    /// The last `marker.len() - 1` bytes written (a marker split across writes).
    tail: Vec<u8>,
    seen: Arc<MarkerSeen>,
    done: bool,
}

impl MarkerWriter {
    /// Watches output to `inner` for `marker` (not empty).
    pub fn new(inner: Box<dyn Write + Send>, marker: &str, seen: Arc<MarkerSeen>) -> MarkerWriter {
        MarkerWriter {
            inner,
            marker: marker.as_bytes().to_vec(),
            tail: Vec::new(),
            seen,
            done: marker.is_empty(),
        }
    }
}

impl Write for MarkerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if !self.done {
            self.tail.extend_from_slice(&buf[..n]);
            if self
                .tail
                .windows(self.marker.len())
                .any(|w| w == self.marker.as_slice())
            {
                self.done = true;
                self.tail.clear();
                self.seen.set();
            } else {
                let keep = self.marker.len().saturating_sub(1).min(self.tail.len());
                self.tail.drain(..self.tail.len() - keep);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An event log that also notices when the guest suspends the VM (the
/// engine commits SYSTEM_SUSPEND); everything is passed on to `inner`.
pub struct SystemSuspendWatch {
    inner: Arc<dyn EventSink>,
    seen: Arc<MarkerSeen>,
}

impl SystemSuspendWatch {
    /// Watches the events written to `inner`.
    pub fn new(inner: Arc<dyn EventSink>, seen: Arc<MarkerSeen>) -> SystemSuspendWatch {
        SystemSuspendWatch { inner, seen }
    }
}

impl EventSink for SystemSuspendWatch {
    fn enabled(&self) -> bool {
        // Power-state transitions are only built for an enabled sink.
        true
    }

    fn record(&self, event: &Event<'_>) {
        if let Event::PowerState {
            to: PowerState::SuspendedSystem,
            ..
        } = event
        {
            self.seen.set();
        }
        if self.inner.enabled() {
            self.inner.record(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]], marker: &str) -> bool {
        let seen = Arc::new(MarkerSeen::default());
        let mut w = MarkerWriter::new(Box::new(std::io::sink()), marker, Arc::clone(&seen));
        for c in chunks {
            w.write_all(c).unwrap();
        }
        seen.wait(Duration::ZERO)
    }

    #[test]
    fn a_marker_written_byte_by_byte_is_seen() {
        let bytes: Vec<&[u8]> = b"xxSNAPyy".chunks(1).collect();
        assert!(feed(&bytes, "SNAP"));
    }

    #[test]
    fn a_marker_split_across_two_writes_is_seen() {
        assert!(feed(&[b"hello SN", b"AP\n"], "SNAP"));
    }

    #[test]
    fn only_a_system_suspend_transition_is_seen() {
        let seen = Arc::new(MarkerSeen::default());
        let watch = SystemSuspendWatch::new(Arc::new(crate::events::NoEvents), Arc::clone(&seen));
        watch.record(&Event::PowerState {
            vcpu: 1,
            from: PowerState::On,
            to: PowerState::SuspendedStandby,
        });
        assert!(!seen.wait(Duration::ZERO));
        watch.record(&Event::PowerState {
            vcpu: 0,
            from: PowerState::On,
            to: PowerState::SuspendedSystem,
        });
        assert!(seen.wait(Duration::ZERO));
    }

    #[test]
    fn output_without_the_marker_sets_nothing() {
        assert!(!feed(&[b"SNA", b"xP", b"NAP"], "SNAP"));
    }
}
