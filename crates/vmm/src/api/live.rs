//! The running session behind the API: which VM is current (a reboot or a
//! guest reset builds a new one), its run state, and the operator's actions
//! carried out on its [`VmControl`], engine and wake-up device.
//!
//! How each action reaches the guest:
//!
//! Before the first VM runs the state is `starting` and every action is
//! refused (`wrong_state`).
//!
//! | action | accepted when | what happens |
//! |---|---|---|
//! | pause | running or suspended | [`VmControl::pause`]: every vCPU out of the guest and parked, power states unchanged |
//! | resume | paused | [`VmControl::unpause`] |
//! | reboot | not stopping | the VM stops ([`StopReason::Operator`]) and `vpsci run` builds it again, as for a guest SYSTEM_RESET with `--on-reset restart` (whatever `--on-reset` says: that option is about the guest's resets) |
//! | poweroff | not stopping | the VM stops and `vpsci run` exits 0, as for SYSTEM_OFF |
//! | wake | suspended (SYSTEM_SUSPEND), not paused | the PL031's alarm interrupt is raised ([`RtcDevice::raise_alarm`]); KVM's vGIC wakes the caller and the usual wake-up path runs, its `wakeup` line naming `pl031` |
//!
//! Each accepted action is logged as an `operator` line before what it
//! causes. Actions are serialised by one mutex (a pause waits under it,
//! bounded by the quiesce limit); none runs on a vCPU thread.
//!
//! A migration holds no lock while it runs: `PUT /vm/migrate` marks the
//! session `migrating` under the mutex, runs the migration without it (the
//! server gives that request a thread of its own), and clears the mark when
//! the migration returns, fails or panics. While the mark is set `info` and
//! the event streams answer as usual, `info` with the progress the
//! migration's own `migration` events report, and every request that would
//! change the VM (an action, a snapshot, a second migration) is refused with
//! `migrating`, changing nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use vpsci_firmware::{CpuPowerState, Firmware, FirmwareConfig, Mpidr, OnPending, PowerState};
use vpsci_firmware::{SuspendKind, VcpuId};

use super::handler::{EventStream, VmApi};
use super::hub::EventHub;
use super::types::{
    Action, ActionDone, ApiError, ErrorKind, FirmwareInfo, MigrateDone, MigrateRequest,
    MigrationPhase, MigrationProgress, RunState, SnapshotDone, SnapshotRequest, VcpuInfo, VmInfo,
};
use crate::devices::pl031::AlarmMasked;
use crate::devices::rtc::RtcDevice;
use crate::events::{Event, EventSink};
use crate::snapshot::SnapshotTimes;
use crate::vcpu::{CallCounts, OperatorStop, PauseError, StopReason, VmControl};

/// A device that can wake a suspended guest on the operator's request.
pub trait WakeDevice: Send + Sync {
    /// Its name in the event log (`"pl031"`).
    fn name(&self) -> &'static str;
    /// Raises its wake-up interrupt; refused, changing nothing, while the
    /// guest masks it.
    fn raise(&self) -> Result<(), AlarmMasked>;
}

impl WakeDevice for RtcDevice {
    fn name(&self) -> &'static str {
        "pl031"
    }
    fn raise(&self) -> Result<(), AlarmMasked> {
        self.raise_alarm()
    }
}

/// The parts of one built VM the API acts on.
#[derive(Clone)]
pub struct RunningVm {
    /// Its vCPU control.
    pub control: Arc<VmControl>,
    /// The engine (none under `--in-kernel-psci`).
    pub engine: Option<Arc<Firmware>>,
    /// The device tree's wake-up source.
    pub wake: Option<Arc<dyn WakeDevice>>,
    /// MPIDR of each vCPU.
    pub mpidrs: Vec<Mpidr>,
}

/// Takes a snapshot of the running VM (`crate::snapshot::LiveVm` on arm64).
pub trait TakeSnapshot: Send + Sync {
    /// Writes a snapshot into `dir`; a running VM is paused for it and
    /// resumed, a paused one stays paused.
    fn snapshot(&self, dir: &std::path::Path) -> Result<SnapshotTimes, String>;
}

/// Sends the running VM to another vpsci (`crate::snapshot::LiveVm` on arm64,
/// through `crate::migrate::send`).
pub trait SendVm: Send + Sync {
    /// Migrates the VM as `request` asks, logging `migration` lines to
    /// `events`. `Ok`: Go was sent; with `confirmed` the VM has stopped here
    /// for good, without it the VM stays paused here for the operator's
    /// resume or poweroff. `Err`: it runs on here as it was (one line).
    fn migrate(
        &self,
        request: &MigrateRequest,
        events: &dyn EventSink,
    ) -> Result<MigrateDone, String>;
}

struct Slot {
    vm: Option<RunningVm>,
    /// How to snapshot `vm` (none under KVM's PSCI, or before it runs).
    snapshot: Option<Arc<dyn TakeSnapshot>>,
    /// How to migrate `vm` (present exactly when `snapshot` is).
    migrate: Option<Arc<dyn SendVm>>,
    restarts: u64,
    ended: bool,
    /// The migration under way, if one is.
    migration: Option<Migration>,
}

/// A migration under way: when it started and what it reported so far.
struct Migration {
    started: Instant,
    progress: MigrationProgress,
}

impl Migration {
    fn new(to: &str) -> Migration {
        Migration {
            started: Instant::now(),
            progress: MigrationProgress {
                to: to.to_owned(),
                phase: MigrationPhase::Connecting,
                round: None,
                pages_sent: 0,
                dirty_pages: 0,
                expected_downtime_ms: 0.0,
                elapsed_ms: 0.0,
            },
        }
    }

    /// Takes in one of the source's `migration` events (the sender reports its
    /// progress there; this only reads it back).
    fn update(&mut self, event: &Event<'_>) {
        let Event::Migration {
            role: "source",
            phase,
            round,
            pages,
            dirty_pages,
            expected_downtime_us,
            ..
        } = *event
        else {
            return;
        };
        let p = &mut self.progress;
        match phase {
            "accepted" => p.phase = MigrationPhase::Precopy,
            "paused" => p.phase = MigrationPhase::StopAndCopy,
            "ready" => p.phase = MigrationPhase::Ready,
            "committed" => p.phase = MigrationPhase::Committed,
            "round" => {
                p.round = round.or(p.round);
                p.pages_sent = p.pages_sent.saturating_add(pages.unwrap_or(0));
                p.dirty_pages = dirty_pages.unwrap_or(0);
                p.expected_downtime_ms = expected_downtime_us.unwrap_or(0) as f64 / 1e3;
            }
            // started (the phase a migration begins in), refused, failed,
            // running, unconfirmed: the phase stays; the migration is ending.
            _ => {}
        }
    }

    fn progress(&self) -> MigrationProgress {
        MigrationProgress {
            elapsed_ms: self.started.elapsed().as_secs_f64() * 1e3,
            ..self.progress.clone()
        }
    }
}

/// The event sink a migration reports to: the session's log, and the
/// progress `info` shows.
struct ProgressSink<'a> {
    live: &'a LiveVm,
}

impl EventSink for ProgressSink<'_> {
    fn enabled(&self) -> bool {
        // The progress needs the events even when nobody logs them.
        true
    }

    fn record(&self, event: &Event<'_>) {
        if let Some(m) = self.live.slot().migration.as_mut() {
            m.update(event);
        }
        if self.live.hub.enabled() {
            self.live.hub.record(event);
        }
    }
}

/// The session the API serves.
pub struct LiveVm {
    hub: Arc<EventHub>,
    calls: Arc<CallCounts>,
    firmware: FirmwareConfig,
    slot: Mutex<Slot>,
}

impl std::fmt::Debug for LiveVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVm").finish_non_exhaustive()
    }
}

impl LiveVm {
    /// A session logging to `hub`, counting calls in `calls`, whose guest is
    /// offered `firmware`. No VM yet: the state is starting until [`LiveVm::attach`].
    pub fn new(hub: Arc<EventHub>, calls: Arc<CallCounts>, firmware: FirmwareConfig) -> LiveVm {
        LiveVm {
            hub,
            calls,
            firmware,
            slot: Mutex::new(Slot {
                vm: None,
                snapshot: None,
                migrate: None,
                restarts: 0,
                ended: false,
                migration: None,
            }),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The event hub (the session's event sink).
    pub fn hub(&self) -> &Arc<EventHub> {
        &self.hub
    }

    /// The call counters (for the VMs' platforms).
    pub fn calls(&self) -> &Arc<CallCounts> {
        &self.calls
    }

    /// A (new) VM runs.
    pub fn attach(&self, vm: RunningVm) {
        let mut slot = self.slot();
        slot.vm = Some(vm);
        slot.snapshot = None;
        slot.migrate = None;
    }

    /// How to snapshot the VM last attached.
    pub fn attach_snapshot(&self, taker: Arc<dyn TakeSnapshot>) {
        self.slot().snapshot = Some(taker);
    }

    /// How to migrate the VM last attached.
    pub fn attach_migrate(&self, sender: Arc<dyn SendVm>) {
        self.slot().migrate = Some(sender);
    }

    /// The VM is being restarted.
    pub fn restarted(&self) {
        self.slot().restarts += 1;
    }

    /// The session is over: every operation but `info` is refused and the
    /// event streams end.
    pub fn end(&self) {
        self.slot().ended = true;
        self.hub.close();
    }

    fn run_state(slot: &Slot) -> RunState {
        if slot.ended {
            return RunState::Stopping;
        }
        let Some(vm) = &slot.vm else {
            return RunState::Starting;
        };
        if vm.control.is_stopping() {
            RunState::Stopping
        } else if slot.migration.is_some() {
            RunState::Migrating
        } else if vm.control.is_paused() {
            RunState::Paused
        } else if system_suspended(vm) {
            RunState::Suspended
        } else {
            RunState::Running
        }
    }

    /// A migration panicked (a bug); the panic becomes the request's
    /// failure. Before Go the VM is let run on here, as after any failure
    /// there: its own undo did not run, so if it had paused the VM (nobody
    /// else can while it runs) the VM is unpaused; KVM's and the devices'
    /// dirty logs may stay on, which costs time but changes no guest state.
    /// After Go (phase `committed`) the destination may run the VM: it stays
    /// paused here for the operator, as when the confirmation does not come.
    fn after_panic(&self, request: &MigrateRequest, panic: &(dyn std::any::Any + Send)) -> String {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        let now = {
            let slot = self.slot();
            let went = slot
                .migration
                .as_ref()
                .is_some_and(|m| m.progress.phase == MigrationPhase::Committed);
            match &slot.vm {
                Some(vm) if vm.control.is_stopping() => "the VM is stopping here",
                Some(_) if went => {
                    "Go was sent: the VM stays paused here; resume it only if the destination \
                     did not run it, else power it off"
                }
                Some(vm) => {
                    if vm.control.is_paused() {
                        let _ = vm.control.unpause();
                    }
                    "the VM runs on here"
                }
                None => "the VM runs on here",
            }
        };
        let reason = format!(
            "migration to {} failed, {now}: the migration panicked: {}",
            request.to,
            what.replace('\n', " ")
        );
        if self.hub.enabled() {
            self.hub.record(&Event::Migration {
                role: "source",
                phase: "failed",
                peer: &request.to,
                round: None,
                pages: None,
                dirty_pages: None,
                device_pages: None,
                expected_downtime_us: None,
                reason: Some(&reason),
            });
        }
        reason
    }

    fn log(&self, action: Action, device: Option<&str>) {
        if self.hub.enabled() {
            self.hub.record(&Event::Operator {
                action: action.name(),
                device,
            });
        }
    }

    fn act_on(&self, slot: &Slot, action: Action) -> Result<RunState, ApiError> {
        let state = LiveVm::run_state(slot);
        let vm = match (&slot.vm, state) {
            (_, RunState::Starting) => {
                return Err(ApiError::new(
                    ErrorKind::WrongState,
                    format!("the VM is starting: cannot {} it yet", action.name()),
                ))
            }
            (_, RunState::Migrating) => return Err(migrating(slot, action.name())),
            (Some(vm), s) if s != RunState::Stopping => vm,
            _ => {
                return Err(ApiError::new(
                    ErrorKind::VmStopped,
                    format!(
                        "the VM is stopping or has stopped: cannot {}",
                        action.name()
                    ),
                ))
            }
        };
        let wrong = |what: &str| {
            Err(ApiError::new(
                ErrorKind::WrongState,
                format!("cannot {} a {state} VM: {what}", action.name()),
            ))
        };
        match action {
            Action::Pause => {
                if state == RunState::Paused {
                    return wrong("it is paused already");
                }
                vm.control.pause().map_err(|e| match e {
                    PauseError::AlreadyPaused => {
                        ApiError::new(ErrorKind::WrongState, e.to_string())
                    }
                    PauseError::Stopping => ApiError::new(ErrorKind::VmStopped, e.to_string()),
                    PauseError::Stuck { .. } => ApiError::new(ErrorKind::Timeout, e.to_string()),
                })?;
                self.log(action, None);
            }
            Action::Resume => {
                if state != RunState::Paused {
                    return wrong("only a paused VM resumes");
                }
                vm.control
                    .unpause()
                    .map_err(|_| ApiError::new(ErrorKind::WrongState, "the VM is not paused"))?;
                self.log(action, None);
            }
            Action::Reboot | Action::Poweroff => {
                self.log(action, None);
                vm.control.stop(StopReason::Operator {
                    action: if action == Action::Reboot {
                        OperatorStop::Reboot
                    } else {
                        OperatorStop::PowerOff
                    },
                });
            }
            Action::Wake => {
                if state != RunState::Suspended {
                    return wrong("only a system-suspended guest (SYSTEM_SUSPEND) can be woken");
                }
                let Some(device) = &vm.wake else {
                    return Err(ApiError::new(
                        ErrorKind::NotBuilt,
                        "this VM has no wake-up device",
                    ));
                };
                device.raise().map_err(|AlarmMasked| {
                    ApiError::new(
                        ErrorKind::WakeSourceMasked,
                        format!(
                            "the guest masks the {} alarm interrupt (RTCIMSC), so it cannot \
                             wake the VM; nothing was changed",
                            device.name()
                        ),
                    )
                })?;
                self.log(action, Some(device.name()));
            }
        }
        Ok(LiveVm::run_state(slot))
    }
}

/// The refusal of `what` while a migration runs.
fn migrating(slot: &Slot, what: &str) -> ApiError {
    let to = slot
        .migration
        .as_ref()
        .map_or("another vpsci", |m| m.progress.to.as_str());
    ApiError::new(
        ErrorKind::Migrating,
        format!(
            "a migration to {to} is under way: cannot {what} until it ends; nothing was changed"
        ),
    )
}

fn system_suspended(vm: &RunningVm) -> bool {
    let Some(fw) = &vm.engine else {
        return false;
    };
    (0..vm.mpidrs.len() as u32).any(|i| {
        fw.power_state(VcpuId::new(i))
            == PowerState::Suspended {
                kind: SuspendKind::System,
            }
    })
}

impl VmApi for LiveVm {
    fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotDone, ApiError> {
        // The slot stays locked for the whole snapshot, so no pause or
        // resume from another request can interleave with it.
        let slot = self.slot();
        let state = LiveVm::run_state(&slot);
        if state == RunState::Starting {
            return Err(ApiError::new(
                ErrorKind::WrongState,
                "the VM has not started yet: cannot snapshot",
            ));
        }
        if state == RunState::Migrating {
            return Err(migrating(&slot, "snapshot"));
        }
        if slot.vm.is_none() || state == RunState::Stopping || slot.ended {
            return Err(ApiError::new(
                ErrorKind::VmStopped,
                "the VM is stopping or has stopped: cannot snapshot",
            ));
        }
        let Some(taker) = &slot.snapshot else {
            return Err(ApiError::new(
                ErrorKind::NotBuilt,
                "this VM cannot be snapshotted (KVM's in-kernel PSCI holds its firmware state)",
            ));
        };
        let times = taker
            .snapshot(&request.dir)
            .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, format!("no snapshot: {e}")))?;
        Ok(SnapshotDone {
            dir: request.dir.clone(),
            memory_bytes: times.memory_bytes,
            memory_stored_bytes: times.memory_stored,
            pause_ms: times.pause.as_secs_f64() * 1e3,
            state_ms: times.state.as_secs_f64() * 1e3,
            write_ms: times.write.as_secs_f64() * 1e3,
            run_state: LiveVm::run_state(&slot),
        })
    }

    fn migrate(&self, request: &MigrateRequest) -> Result<MigrateDone, ApiError> {
        let sender = {
            let mut slot = self.slot();
            let state = LiveVm::run_state(&slot);
            match state {
                RunState::Running | RunState::Suspended => {}
                RunState::Migrating => return Err(migrating(&slot, "migrate")),
                RunState::Starting | RunState::Paused => {
                    return Err(ApiError::new(
                        ErrorKind::WrongState,
                        format!("cannot migrate a {state} VM: only a running or suspended one"),
                    ))
                }
                RunState::Stopping => {
                    return Err(ApiError::new(
                        ErrorKind::VmStopped,
                        "the VM is stopping or has stopped: cannot migrate",
                    ))
                }
            }
            let Some(sender) = &slot.migrate else {
                return Err(ApiError::new(
                    ErrorKind::NotBuilt,
                    "this VM cannot be migrated (KVM's in-kernel PSCI holds its firmware state)",
                ));
            };
            let sender = Arc::clone(sender);
            slot.migration = Some(Migration::new(&request.to));
            sender
        };
        // No lock is held from here on: other requests are answered (or
        // refused with `migrating`) while this runs.
        let progress = ProgressSink { live: self };
        let result = catch_unwind(AssertUnwindSafe(|| sender.migrate(request, &progress)))
            .unwrap_or_else(|panic| Err(self.after_panic(request, panic.as_ref())));
        let mut slot = self.slot();
        slot.migration = None;
        let mut done = result.map_err(|e| ApiError::new(ErrorKind::MigrationFailed, e))?;
        done.run_state = LiveVm::run_state(&slot);
        Ok(done)
    }

    fn info(&self) -> VmInfo {
        let slot = self.slot();
        let run_state = LiveVm::run_state(&slot);
        let (engine, mpidrs) = match &slot.vm {
            Some(vm) => (vm.engine.clone(), vm.mpidrs.clone()),
            None => (None, Vec::new()),
        };
        let vcpus = mpidrs
            .iter()
            .enumerate()
            .map(|(i, mpidr)| {
                let id = VcpuId::new(i as u32);
                let stats = |state| {
                    engine
                        .as_ref()
                        .and_then(|fw| fw.suspend_stats(id, state))
                        .unwrap_or((0, 0))
                };
                let (standby_count, standby_residency_ns) = stats(CpuPowerState::Standby);
                let (powerdown_count, powerdown_residency_ns) = stats(CpuPowerState::Powerdown);
                VcpuInfo {
                    index: i as u32,
                    mpidr: format!("{:#x}", mpidr.raw()),
                    power_state: engine.as_ref().map(|fw| fw.power_state(id).into()),
                    standby_count,
                    standby_residency_ns,
                    powerdown_count,
                    powerdown_residency_ns,
                }
            })
            .collect();
        let config = engine.as_ref().map_or(self.firmware, |fw| fw.config());
        VmInfo {
            run_state,
            migration: slot.migration.as_ref().map(Migration::progress),
            restarts: slot.restarts,
            vcpus,
            psci_calls: self.calls.snapshot(),
            firmware: FirmwareInfo {
                psci_version: config.psci_version.to_string(),
                conduit: config.conduit.to_string(),
                report_on_pending: config.on_pending == OnPending::Reported,
                frozen: engine.as_ref().is_some_and(|fw| fw.is_frozen()),
                psci_backend: if engine.is_some() { "engine" } else { "kvm" }.to_owned(),
                summary: config.summary(),
            },
        }
    }

    fn act(&self, action: Action) -> Result<ActionDone, ApiError> {
        let slot = self.slot();
        let run_state = self.act_on(&slot, action)?;
        Ok(ActionDone { action, run_state })
    }

    fn subscribe(&self) -> Result<EventStream, ApiError> {
        self.hub.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(role: &'a str, phase: &'a str, round: Option<u32>) -> Event<'a> {
        Event::Migration {
            role,
            phase,
            peer: "unix:/d.sock",
            round,
            pages: round.map(|r| u64::from(r) + 10),
            dirty_pages: round.map(u64::from),
            device_pages: round.map(|_| 0),
            expected_downtime_us: round.map(|r| u64::from(r) * 500),
            reason: None,
        }
    }

    #[test]
    fn progress_follows_the_sources_migration_lines_through_every_phase() {
        let mut m = Migration::new("unix:/d.sock");
        let mut seen = vec![m.progress().phase];
        for (phase, round) in [
            ("started", None),
            ("accepted", None),
            ("round", Some(0)),
            ("round", Some(1)),
            ("paused", None),
            ("round", Some(2)),
            ("ready", None),
            ("committed", None),
            ("running", None),
        ] {
            m.update(&event("source", phase, round));
            if seen.last() != Some(&m.progress().phase) {
                seen.push(m.progress().phase);
            }
        }
        assert_eq!(seen, MigrationPhase::ALL);
        let p = m.progress();
        assert_eq!(p.round, Some(2));
        assert_eq!(p.pages_sent, 10 + 11 + 12);
        assert_eq!(p.dirty_pages, 2);
        assert!((p.expected_downtime_ms - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_destinations_lines_and_other_events_leave_the_progress_alone() {
        let mut m = Migration::new("unix:/d.sock");
        m.update(&event("destination", "accepted", None));
        m.update(&event("destination", "round", Some(0)));
        m.update(&Event::Operator {
            action: "pause",
            device: None,
        });
        let p = m.progress();
        assert_eq!(p.phase, MigrationPhase::Connecting);
        assert_eq!((p.round, p.pages_sent), (None, 0));
    }
}
