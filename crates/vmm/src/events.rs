//! The event log: one JSON object per line for every PSCI call, every vCPU
//! power-state transition, every system event and every wake-up of a
//! suspended vCPU with the device interrupts that caused it (schema in
//! `docs/event-log.md`).
//!
//! Callers hand an [`Event`] (borrowed data, no allocation) to an
//! [`EventSink`]. Without `--events` the sink is [`NoEvents`]: `record` does
//! nothing and [`EventSink::enabled`] is `false`, so the vCPU threads can
//! skip even building events. [`JsonLinesFile`] stamps each event with the
//! nanoseconds since VM start, serialises it and writes the line with one
//! `write` call under a mutex, so lines from concurrent vCPUs never interleave
//! and a crash loses at most the line being written.
//!
//! The logged types are our own (their JSON form is a stable schema); `From`
//! conversions map the firmware engine's outcomes, power states and system
//! events onto them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;
use vpsci_firmware as fw;

/// Logs one power-state transition the engine committed (a no-op without a log).
pub fn record_transition(sink: &dyn EventSink, t: &fw::Transition) {
    if sink.enabled() {
        sink.record(&Event::PowerState {
            vcpu: t.vcpu.raw(),
            from: t.from.into(),
            to: t.to.into(),
        });
    }
}

/// The `function` logged for an ID the engine does not know (it answered NOT_SUPPORTED).
pub const UNKNOWN_FUNCTION: &str = "UNKNOWN";

/// A 64-bit value written as a `"0x..."` string (exact in every JSON reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex(pub u64);

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// What a PSCI call did to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CallResult {
    /// The caller continues with this x0 (a PSCI return code or value),
    /// logged as a signed 64-bit integer.
    Return {
        /// x0 as returned to the guest, reinterpreted as signed.
        x0: i64,
    },
    /// CPU_OFF (or CPU_FREEZE): the caller stopped.
    PowerOff,
    /// CPU_SUSPEND / SYSTEM_SUSPEND: the caller is parked.
    Suspend {
        /// Which kind of suspend.
        suspend: SuspendKind,
    },
    /// A system event was committed (logged separately as `system_event`).
    SystemEvent,
}

/// Suspend kinds, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendKind {
    /// CPU_SUSPEND standby: resumes after the call.
    Standby,
    /// CPU_SUSPEND powerdown: resumes at an entry point.
    Powerdown,
    /// SYSTEM_SUSPEND.
    System,
}

/// vCPU power states, as logged (and as the control API reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// OFF.
    Off,
    /// ON_PENDING: a CPU_ON is being carried out.
    OnPending,
    /// ON.
    On,
    /// Suspended in standby.
    SuspendedStandby,
    /// Suspended in a powerdown state.
    SuspendedPowerdown,
    /// Suspended by SYSTEM_SUSPEND.
    SuspendedSystem,
    /// Stopped by CPU_FREEZE until the VM is reset.
    Frozen,
}

impl From<fw::SuspendKind> for SuspendKind {
    fn from(kind: fw::SuspendKind) -> Self {
        match kind {
            fw::SuspendKind::Standby => Self::Standby,
            fw::SuspendKind::Powerdown => Self::Powerdown,
            fw::SuspendKind::System => Self::System,
        }
    }
}

impl From<fw::PowerState> for PowerState {
    fn from(state: fw::PowerState) -> Self {
        match state {
            fw::PowerState::Off => Self::Off,
            fw::PowerState::OnPending => Self::OnPending,
            fw::PowerState::On => Self::On,
            fw::PowerState::Suspended { kind } => match kind {
                fw::SuspendKind::Standby => Self::SuspendedStandby,
                fw::SuspendKind::Powerdown => Self::SuspendedPowerdown,
                fw::SuspendKind::System => Self::SuspendedSystem,
            },
            fw::PowerState::Frozen => Self::Frozen,
        }
    }
}

impl From<fw::SystemEvent> for SystemEvent {
    fn from(event: fw::SystemEvent) -> Self {
        match event {
            fw::SystemEvent::Off => Self::Off,
            fw::SystemEvent::Hibernate => Self::Hibernate,
            fw::SystemEvent::Reset => Self::Reset,
            fw::SystemEvent::WarmReset { cookie } => Self::WarmReset {
                cookie: Hex(cookie),
            },
            fw::SystemEvent::VendorReset { reset_type, cookie } => Self::VendorReset {
                reset_type: Hex(u64::from(reset_type)),
                cookie: Hex(cookie),
            },
        }
    }
}

impl From<&fw::CallOutcome> for CallResult {
    fn from(outcome: &fw::CallOutcome) -> Self {
        match *outcome {
            fw::CallOutcome::Return { regs } => Self::Return { x0: regs[0] as i64 },
            fw::CallOutcome::PowerOff => Self::PowerOff,
            fw::CallOutcome::Suspend { kind } => Self::Suspend {
                suspend: kind.into(),
            },
            fw::CallOutcome::SystemEvent { .. } => Self::SystemEvent,
        }
    }
}

/// System events, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SystemEvent {
    /// SYSTEM_OFF, or SYSTEM_OFF2 with type 0.
    Off,
    /// SYSTEM_OFF2 HIBERNATE_OFF.
    Hibernate,
    /// SYSTEM_RESET (cold).
    Reset,
    /// SYSTEM_RESET2 WARM_RESET.
    WarmReset {
        /// The caller's cookie.
        cookie: Hex,
    },
    /// SYSTEM_RESET2 with a vendor reset type (bit 31 set).
    VendorReset {
        /// The reset type.
        reset_type: Hex,
        /// The caller's cookie.
        cookie: Hex,
    },
}

/// One loggable event. Borrowed so building one never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A PSCI / SMCCC call handled by the engine.
    PsciCall {
        /// Calling vCPU index.
        vcpu: u32,
        /// Function name (e.g. `"CPU_ON"`; `"UNKNOWN"` for an unknown ID).
        function: &'a str,
        /// The function ID in w0.
        function_id: Hex,
        /// x1..x3 as the guest passed them.
        args: [Hex; 3],
        /// What the call did.
        result: CallResult,
    },
    /// A vCPU changed power state.
    PowerState {
        /// vCPU index.
        vcpu: u32,
        /// Old state.
        from: PowerState,
        /// New state.
        to: PowerState,
    },
    /// A system-wide event committed by a vCPU's call.
    SystemEvent {
        /// Calling vCPU index.
        vcpu: u32,
        /// The event.
        #[serde(flatten)]
        event: SystemEvent,
        /// The VMM refused the event (`--on-hibernate refuse`): the VM keeps
        /// running and the caller gets INTERNAL_FAILURE. Written only when
        /// true, so lines of events that were carried out are unchanged.
        #[serde(skip_serializing_if = "is_false")]
        refused: bool,
    },
    /// The VM stopped and is restarted (`--on-reset restart`).
    VmRestart {
        /// Why (the operator's one-line message).
        reason: &'a str,
        /// How many restarts so far, this one included.
        restart: u64,
    },
    /// The operator acted on the VM through the control API (`vpsci run
    /// --api-socket`): pause, resume, reboot, poweroff or wake. Logged once the
    /// action is accepted, before what it causes (a restart, the end, a wake-up).
    Operator {
        /// The action's name (`"pause"`, ...).
        action: &'a str,
        /// For a wake, the device whose interrupt was raised (`"pl031"`).
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<&'a str>,
    },
    /// A step of a live migration (docs/migration.md), in the source's log
    /// (`role` `"source"`) and in the destination's (`"destination"`).
    Migration {
        /// `"source"` or `"destination"`.
        role: &'a str,
        /// What happened: `started`, `accepted`, `refused`, `round`,
        /// `paused`, `ready`, `committed`, `running`, `failed`.
        phase: &'a str,
        /// The other side (`unix:PATH`, `tcp:ADDR:PORT`, or the listening endpoint).
        peer: &'a str,
        /// For `round`: the round (0 is the full copy).
        #[serde(skip_serializing_if = "Option::is_none")]
        round: Option<u32>,
        /// For `round`: pages sent in it.
        #[serde(skip_serializing_if = "Option::is_none")]
        pages: Option<u64>,
        /// For `round`: pages dirtied while it was sent.
        #[serde(skip_serializing_if = "Option::is_none")]
        dirty_pages: Option<u64>,
        /// For `round`: pages the VMM's devices wrote meanwhile (KVM does not
        /// log those).
        #[serde(skip_serializing_if = "Option::is_none")]
        device_pages: Option<u64>,
        /// For `round`: expected downtime at the measured bandwidth, microseconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        expected_downtime_us: Option<u64>,
        /// For `refused` and `failed`: the one-line reason.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// `vpsci run` ends: always the log's last line.
    VmEnd {
        /// The process exit status.
        exit_status: u8,
        /// Why (the operator's one-line message).
        reason: &'a str,
    },
    /// KVM woke a suspended vCPU (`KVM_SYSTEM_EVENT_WAKEUP`); its
    /// `power_state` line (the resume) follows.
    Wakeup {
        /// The vCPU that was woken.
        vcpu: u32,
        /// Device interrupts that rose since it suspended, else those still
        /// high (empty when the wake-up came from no device, e.g. the
        /// architected timer).
        sources: &'a [WakeSource<'a>],
    },
}

/// A device interrupt that rose while a vCPU was suspended, as logged in a
/// `wakeup` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WakeSource<'a> {
    /// The device (`"pl011"`, `"pl031"`, ...).
    pub device: &'a str,
    /// Its shared peripheral interrupt.
    pub spi: u32,
    /// The GIC interrupt ID (32 + `spi`).
    pub intid: u32,
    /// Nanoseconds from the line's latest rise to this line being written
    /// (how long the wake-up took to reach the vCPU thread).
    pub raised_ns_ago: u64,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Where events go. Implementations must be cheap to call from vCPU threads.
pub trait EventSink: Send + Sync {
    /// Whether events are kept at all; callers may skip building events
    /// when this is `false`.
    fn enabled(&self) -> bool;
    /// Records one event.
    fn record(&self, event: &Event<'_>);
}

/// Discards every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn enabled(&self) -> bool {
        false
    }

    #[inline]
    fn record(&self, _event: &Event<'_>) {}
}

/// The event log file could not be created.
#[derive(Debug, Error)]
#[error("cannot create event log {}: {source}", path.display())]
pub struct EventLogError {
    /// The file.
    pub path: PathBuf,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

/// Writes events as JSON lines to a file.
#[derive(Debug)]
pub struct JsonLinesFile {
    file: Mutex<File>,
    start: Instant,
    failures: AtomicU64,
}

/// One line: the time stamp, then the event's own fields.
#[derive(Serialize)]
struct Line<'a, 'b> {
    t_ns: u64,
    #[serde(flatten)]
    event: &'a Event<'b>,
}

impl JsonLinesFile {
    /// Creates (truncates) `path`; times are measured from `vm_start`.
    pub fn create(path: &Path, vm_start: Instant) -> Result<Self, EventLogError> {
        let file = File::create(path).map_err(|source| EventLogError {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            file: Mutex::new(file),
            start: vm_start,
            failures: AtomicU64::new(0),
        })
    }

    /// Events that could not be written (serialisation or I/O errors).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl EventSink for JsonLinesFile {
    fn enabled(&self) -> bool {
        true
    }

    fn record(&self, event: &Event<'_>) {
        let Some(line) = encode_line(self.start, event) else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // A poisoned lock only means another thread panicked mid-write; the
        // file is still usable.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if file.write_all(&line).is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One event as its log line (ending in a newline), stamped with the
/// nanoseconds since `vm_start`; `None` if it cannot be serialised.
pub fn encode_line(vm_start: Instant, event: &Event<'_>) -> Option<Vec<u8>> {
    let t_ns = u64::try_from(vm_start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut line = serde_json::to_vec(&Line { t_ns, event }).ok()?;
    line.push(b'\n');
    Some(line)
}

/// The sink for an optional `--events FILE`: a [`JsonLinesFile`] if a path is
/// given, else [`NoEvents`].
pub fn open(path: Option<&Path>, vm_start: Instant) -> Result<Arc<dyn EventSink>, EventLogError> {
    Ok(match path {
        Some(p) => Arc::new(JsonLinesFile::create(p, vm_start)?),
        None => Arc::new(NoEvents),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn to_value(event: &Event<'_>) -> Value {
        serde_json::to_value(Line { t_ns: 7, event }).unwrap()
    }

    #[test]
    fn psci_call_line_has_hex_arguments_and_signed_result() {
        let v = to_value(&Event::PsciCall {
            vcpu: 1,
            function: "CPU_ON",
            function_id: Hex(0xC400_0003),
            args: [Hex(2), Hex(0x4008_0000), Hex(u64::MAX)],
            result: CallResult::Return { x0: -4 },
        });
        assert_eq!(
            v,
            json!({"t_ns": 7, "kind": "psci_call", "vcpu": 1, "function": "CPU_ON",
                   "function_id": "0xc4000003",
                   "args": ["0x2", "0x40080000", "0xffffffffffffffff"],
                   "result": {"outcome": "return", "x0": -4}})
        );
    }

    #[test]
    fn non_returning_outcomes_are_named() {
        let v = to_value(&Event::PsciCall {
            vcpu: 0,
            function: "SYSTEM_SUSPEND",
            function_id: Hex(0xC400_000E),
            args: [Hex(0); 3],
            result: CallResult::Suspend {
                suspend: SuspendKind::System,
            },
        });
        assert_eq!(
            v["result"],
            json!({"outcome": "suspend", "suspend": "system"})
        );
        let v = to_value(&Event::PsciCall {
            vcpu: 0,
            function: "CPU_OFF",
            function_id: Hex(0x8400_0002),
            args: [Hex(0); 3],
            result: CallResult::PowerOff,
        });
        assert_eq!(v["result"], json!({"outcome": "power_off"}));
    }

    #[test]
    fn power_state_line_names_both_states() {
        let v = to_value(&Event::PowerState {
            vcpu: 3,
            from: PowerState::OnPending,
            to: PowerState::On,
        });
        assert_eq!(
            v,
            json!({"t_ns": 7, "kind": "power_state", "vcpu": 3, "from": "on_pending", "to": "on"})
        );
    }

    #[test]
    fn system_event_fields_are_flattened_into_the_line() {
        let v = to_value(&Event::SystemEvent {
            vcpu: 0,
            event: SystemEvent::VendorReset {
                reset_type: Hex(0x8000_0001),
                cookie: Hex(0x55),
            },
            refused: false,
        });
        assert_eq!(
            v,
            json!({"t_ns": 7, "kind": "system_event", "vcpu": 0, "event": "vendor_reset",
                   "reset_type": "0x80000001", "cookie": "0x55"})
        );
        let v = to_value(&Event::SystemEvent {
            vcpu: 2,
            event: SystemEvent::Hibernate,
            refused: false,
        });
        assert_eq!(v["event"], "hibernate");
        assert!(v.get("refused").is_none(), "{v}");
    }

    #[test]
    fn a_refused_system_event_carries_refused_true() {
        let v = to_value(&Event::SystemEvent {
            vcpu: 1,
            event: SystemEvent::Hibernate,
            refused: true,
        });
        assert_eq!(
            v,
            json!({"t_ns": 7, "kind": "system_event", "vcpu": 1, "event": "hibernate",
                   "refused": true})
        );
    }

    #[test]
    fn wakeup_line_names_each_source_device_and_interrupt() {
        let sources = [WakeSource {
            device: "pl031",
            spi: 2,
            intid: 34,
            raised_ns_ago: 81_000,
        }];
        let v = to_value(&Event::Wakeup {
            vcpu: 0,
            sources: &sources,
        });
        assert_eq!(
            v,
            json!({"t_ns": 7, "kind": "wakeup", "vcpu": 0,
                   "sources": [{"device": "pl031", "spi": 2, "intid": 34,
                                "raised_ns_ago": 81_000}]})
        );
        let v = to_value(&Event::Wakeup {
            vcpu: 1,
            sources: &[],
        });
        assert_eq!(v["sources"], json!([]));
    }

    #[test]
    fn firmware_states_map_one_to_one() {
        let states = [
            (fw::PowerState::Off, "off"),
            (fw::PowerState::OnPending, "on_pending"),
            (fw::PowerState::On, "on"),
            (
                fw::PowerState::Suspended {
                    kind: fw::SuspendKind::Standby,
                },
                "suspended_standby",
            ),
            (
                fw::PowerState::Suspended {
                    kind: fw::SuspendKind::Powerdown,
                },
                "suspended_powerdown",
            ),
            (
                fw::PowerState::Suspended {
                    kind: fw::SuspendKind::System,
                },
                "suspended_system",
            ),
            (fw::PowerState::Frozen, "frozen"),
        ];
        for (state, name) in states {
            assert_eq!(serde_json::to_value(PowerState::from(state)).unwrap(), name);
        }
    }

    #[test]
    fn firmware_outcomes_and_system_events_convert() {
        let ret = fw::CallOutcome::Return {
            regs: [(-3i64) as u64, 1, 2, 3],
        };
        assert_eq!(CallResult::from(&ret), CallResult::Return { x0: -3 });
        let off = fw::CallOutcome::Suspend {
            kind: fw::SuspendKind::Powerdown,
        };
        assert_eq!(
            CallResult::from(&off),
            CallResult::Suspend {
                suspend: SuspendKind::Powerdown
            }
        );
        assert_eq!(
            SystemEvent::from(fw::SystemEvent::VendorReset {
                reset_type: 0x8000_0002,
                cookie: 9
            }),
            SystemEvent::VendorReset {
                reset_type: Hex(0x8000_0002),
                cookie: Hex(9)
            }
        );
        assert_eq!(
            SystemEvent::from(fw::SystemEvent::Hibernate),
            SystemEvent::Hibernate
        );
    }

    #[test]
    fn no_events_sink_reports_disabled() {
        assert!(!NoEvents.enabled());
        NoEvents.record(&Event::PowerState {
            vcpu: 0,
            from: PowerState::Off,
            to: PowerState::On,
        });
    }
}
