//! The event log with live readers: every event becomes its JSON line once,
//! which goes to the `--events` file (if any) and to each open `GET /events`
//! stream. A stream gets lines through a bounded channel and a non-blocking
//! send, so a slow or stuck API client never holds up a vCPU thread: a stream
//! that falls [`STREAM_BUFFER`] lines behind is cut off and marked lagged.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::handler::EventStream;
use super::types::{ApiError, ErrorKind};
use crate::events::{encode_line, Event, EventLogError, EventSink};

/// Lines a stream may fall behind before it is cut off.
pub const STREAM_BUFFER: usize = 4096;
/// Streams open at once.
pub const MAX_STREAMS: usize = 4;

struct Reader {
    tx: SyncSender<Arc<[u8]>>,
    lagged: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
}

/// An [`EventSink`] writing the log file and feeding event streams.
pub struct EventHub {
    start: Instant,
    file: Option<Mutex<File>>,
    readers: Mutex<Vec<Reader>>,
    /// `readers.len()`, readable without the lock (vCPU threads check it).
    open: AtomicUsize,
    closed: AtomicBool,
    failures: AtomicU64,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("file", &self.file.is_some())
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl EventHub {
    /// A hub writing `path` (created or truncated) if given; times are
    /// measured from `vm_start`.
    pub fn new(path: Option<&Path>, vm_start: Instant) -> Result<EventHub, EventLogError> {
        let file = match path {
            Some(p) => Some(Mutex::new(File::create(p).map_err(|source| {
                EventLogError {
                    path: p.to_owned(),
                    source,
                }
            })?)),
            None => None,
        };
        Ok(EventHub {
            start: vm_start,
            file,
            readers: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        })
    }

    fn readers(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        self.readers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a stream of the lines recorded from now on.
    pub fn subscribe(&self) -> Result<EventStream, ApiError> {
        let mut readers = self.readers();
        if self.closed.load(Ordering::Acquire) {
            return Err(ApiError::new(
                ErrorKind::VmStopped,
                "the VM has ended: no more events",
            ));
        }
        readers.retain(|r| r.alive.load(Ordering::Relaxed));
        if readers.len() >= MAX_STREAMS {
            self.open.store(readers.len(), Ordering::Release);
            return Err(ApiError::new(
                ErrorKind::TooManyStreams,
                format!("{MAX_STREAMS} event streams are open already"),
            ));
        }
        let (tx, rx) = sync_channel(STREAM_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        readers.push(Reader {
            tx,
            lagged: Arc::clone(&lagged),
            alive: Arc::clone(&alive),
        });
        self.open.store(readers.len(), Ordering::Release);
        Ok(EventStream {
            lines: rx,
            lagged,
            alive,
        })
    }

    /// Ends every stream (after the log's last line) and refuses new ones.
    pub fn close(&self) {
        let mut readers = self.readers();
        self.closed.store(true, Ordering::Release);
        readers.clear();
        self.open.store(0, Ordering::Release);
    }

    /// Events that could not be written to the file.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl EventSink for EventHub {
    fn enabled(&self) -> bool {
        self.file.is_some() || self.open.load(Ordering::Acquire) > 0
    }

    fn record(&self, event: &Event<'_>) {
        let Some(line) = encode_line(self.start, event) else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            if file.write_all(&line).is_err() {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.open.load(Ordering::Acquire) == 0 {
            return;
        }
        let line: Arc<[u8]> = line.into();
        let mut readers = self.readers();
        readers.retain(|r| match r.tx.try_send(Arc::clone(&line)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                r.lagged.store(true, Ordering::Relaxed);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        self.open.store(readers.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PowerState;

    fn event(vcpu: u32) -> Event<'static> {
        Event::PowerState {
            vcpu,
            from: PowerState::Off,
            to: PowerState::On,
        }
    }

    #[test]
    fn a_stream_gets_the_lines_recorded_after_it_opened_and_ends_when_the_hub_closes() {
        let hub = EventHub::new(None, Instant::now()).unwrap();
        assert!(!hub.enabled(), "nothing reads: events need not be built");
        hub.record(&event(0));
        let stream = hub.subscribe().unwrap();
        assert!(hub.enabled());
        hub.record(&event(1));
        hub.close();
        let lines: Vec<Arc<[u8]>> = stream.lines.iter().collect();
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&lines[0]).unwrap();
        assert_eq!(v["vcpu"], 1);
        assert_eq!(v["kind"], "power_state");
        assert!(!stream.lagged());
        assert_eq!(
            hub.subscribe().map(|_| ()).unwrap_err().kind,
            ErrorKind::VmStopped
        );
    }

    #[test]
    fn a_stream_that_falls_behind_is_cut_off_and_marked_while_the_others_go_on() {
        let hub = EventHub::new(None, Instant::now()).unwrap();
        let slow = hub.subscribe().unwrap();
        let fast = hub.subscribe().unwrap();
        let mut got = 0usize;
        for i in 0..=STREAM_BUFFER {
            hub.record(&event(i as u32));
            got += fast.lines.try_iter().count();
        }
        assert_eq!(got, STREAM_BUFFER + 1, "the reading stream lost lines");
        assert!(slow.lagged());
        assert_eq!(slow.lines.try_iter().count(), STREAM_BUFFER);
        assert!(slow.lines.try_recv().is_err(), "cut off: no more lines");
        assert!(!fast.lagged());
    }

    #[test]
    fn streams_are_limited_and_a_dropped_one_frees_its_slot() {
        let hub = EventHub::new(None, Instant::now()).unwrap();
        let mut open: Vec<EventStream> =
            (0..MAX_STREAMS).map(|_| hub.subscribe().unwrap()).collect();
        assert_eq!(
            hub.subscribe().map(|_| ()).unwrap_err().kind,
            ErrorKind::TooManyStreams
        );
        open.pop();
        assert!(hub.subscribe().is_ok());
    }

    #[test]
    fn the_file_gets_every_line_with_or_without_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let hub = EventHub::new(Some(&path), Instant::now()).unwrap();
        assert!(hub.enabled());
        hub.record(&event(0));
        let _stream = hub.subscribe().unwrap();
        hub.record(&event(1));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
