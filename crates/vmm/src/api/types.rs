//! The control API's wire types, shared by the server (`vpsci run --api-socket`) and the
//! client (`vpsci ctl`): one definition, so both sides always agree. `docs/api.yaml` is
//! the OpenAPI description of the same shapes; a test checks that it names every route,
//! action and error kind defined here.

use serde::{Deserialize, Serialize};

pub use crate::events::PowerState;

/// How the VM is running, as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// The VM is being built: `vpsci run` started and its first VM does not run yet.
    Starting,
    /// vCPUs run guest code (or wait in it, powered off or suspended one by one).
    Running,
    /// The operator paused it: no vCPU runs or changes state until resumed.
    Paused,
    /// The guest is in SYSTEM_SUSPEND, waiting for a wake-up interrupt.
    Suspended,
    /// A migration to another vpsci is under way (`PUT /vm/migrate`): the guest runs
    /// (paused only for the stop-and-copy), [`VmInfo::migration`] tells how far it got,
    /// and every request that would change the VM is refused with
    /// [`ErrorKind::Migrating`] until it ends.
    Migrating,
    /// The VM is stopping or restarting (a system event, the operator, a failure or the
    /// timeout); no operation but `info` and `events` is accepted.
    Stopping,
}

impl RunState {
    /// Every run state, in documentation order.
    pub const ALL: [RunState; 6] = [
        RunState::Starting,
        RunState::Running,
        RunState::Paused,
        RunState::Suspended,
        RunState::Migrating,
        RunState::Stopping,
    ];
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Suspended => "suspended",
            RunState::Migrating => "migrating",
            RunState::Stopping => "stopping",
        })
    }
}

/// An operation on the VM (`PUT /vm/actions`, body `{"action": "pause"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", deny_unknown_fields)]
pub enum Action {
    /// Hold every vCPU out of the guest (running or suspended VM).
    Pause,
    /// Let a paused VM carry on.
    Resume,
    /// Stop the VM and start it again from its image, as a guest SYSTEM_RESET does with
    /// `--on-reset restart` (RAM kept, devices and vCPUs rebuilt).
    Reboot,
    /// Stop the VM as a guest SYSTEM_OFF does: `vpsci run` exits with status 0.
    Poweroff,
    /// Wake a system-suspended guest through the PL031 RTC (the device tree's
    /// `wakeup-source`): its alarm interrupt is raised as if the alarm had matched.
    Wake,
}

impl Action {
    /// Every action, in documentation order.
    pub const ALL: [Action; 5] = [
        Action::Pause,
        Action::Resume,
        Action::Reboot,
        Action::Poweroff,
        Action::Wake,
    ];

    /// The action's name on the wire and on `vpsci ctl`'s command line.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Reboot => "reboot",
            Action::Poweroff => "poweroff",
            Action::Wake => "wake",
        }
    }
}

/// The answer to an accepted action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionDone {
    /// What was done.
    #[serde(flatten)]
    pub action: Action,
    /// The run state right after it.
    pub run_state: RunState,
}

/// `GET /vm`: the VM as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// How it is running.
    pub run_state: RunState,
    /// How many times it was restarted (guest resets with `--on-reset restart`, operator
    /// reboots).
    pub restarts: u64,
    /// One entry per vCPU, in index order, with the engine's view of its power state.
    pub vcpus: Vec<VcpuInfo>,
    /// PSCI/SMCCC/TRNG calls the engine answered since `vpsci run` started, by function
    /// name (`"UNKNOWN"` for IDs it does not know); functions never called are left out.
    pub psci_calls: std::collections::BTreeMap<String, u64>,
    /// The firmware the guest sees (pinned when the VM first ran).
    pub firmware: FirmwareInfo,
    /// The migration under way (run state `migrating`, or `stopping` once it passed
    /// its commit point); `null` when none runs.
    #[serde(default)]
    pub migration: Option<MigrationProgress>,
}

/// How far a running migration got, from the source's own reports (its `migration`
/// event log lines), in [`VmInfo::migration`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// The destination, as the request named it.
    pub to: String,
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// The last finished round (0 is the full copy); `null` before the full copy ends.
    pub round: Option<u32>,
    /// Pages sent in the finished rounds.
    pub pages_sent: u64,
    /// Pages the guest and the devices dirtied during the last finished round
    /// (what the next round sends).
    pub dirty_pages: u64,
    /// How long sending those would keep the VM paused, at the bandwidth measured so
    /// far, in milliseconds.
    pub expected_downtime_ms: f64,
    /// Milliseconds since the migration started.
    pub elapsed_ms: f64,
}

/// The phases of [`MigrationProgress`], in the order a migration goes through them
/// (docs/migration.md, "Steps and the commit point").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Connecting and waiting for the destination's compatibility answer.
    Connecting,
    /// The destination accepted; pre-copy rounds are sent while the guest runs.
    Precopy,
    /// The VM is paused here; the last pages and the state are sent.
    StopAndCopy,
    /// The destination built the VM and waits for the go.
    Ready,
    /// Go was sent (the commit point): the VM is held paused here until the destination
    /// confirms that it runs there (then it stops here, run state `stopping`); without
    /// that confirmation it stays paused for the operator (docs/migration.md).
    Committed,
}

impl MigrationPhase {
    /// Every phase, in order.
    pub const ALL: [MigrationPhase; 5] = [
        MigrationPhase::Connecting,
        MigrationPhase::Precopy,
        MigrationPhase::StopAndCopy,
        MigrationPhase::Ready,
        MigrationPhase::Committed,
    ];

    /// The phase's name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            MigrationPhase::Connecting => "connecting",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::StopAndCopy => "stop_and_copy",
            MigrationPhase::Ready => "ready",
            MigrationPhase::Committed => "committed",
        }
    }
}

/// One vCPU in [`VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    /// Index (0 is the boot vCPU).
    pub index: u32,
    /// MPIDR affinity, `"0x..."`.
    pub mpidr: String,
    /// Power state as the engine holds it (`null` under `--in-kernel-psci`, where KVM
    /// keeps power states to itself).
    pub power_state: Option<PowerState>,
    /// Completed CPU_SUSPEND standby suspensions (PSCI_STAT_COUNT).
    pub standby_count: u64,
    /// Their total time in nanoseconds (PSCI_STAT_RESIDENCY).
    pub standby_residency_ns: u64,
    /// Completed CPU_SUSPEND powerdown suspensions.
    pub powerdown_count: u64,
    /// Their total time in nanoseconds.
    pub powerdown_residency_ns: u64,
}

/// The firmware configuration in [`VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareInfo {
    /// PSCI version offered, `"1.3"`.
    pub psci_version: String,
    /// `"hvc"` or `"smc"`.
    pub conduit: String,
    /// Whether a starting CPU is reported ON_PENDING (`--report-on-pending`).
    pub report_on_pending: bool,
    /// Whether the configuration is frozen (it is once the VM has run).
    pub frozen: bool,
    /// Who answers PSCI: `"engine"` (vpsci) or `"kvm"` (`--in-kernel-psci`: no power
    /// states, statistics or calls are known then).
    pub psci_backend: String,
    /// The engine's one-line summary of the whole configuration.
    pub summary: String,
}

/// A typed error: what went wrong, machine-readable, plus one line for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of error (also decides the HTTP status).
    pub kind: ErrorKind,
    /// One line saying what happened.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// The kinds of [`ApiError`], each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the body is not valid JSON.
    MalformedJson,
    /// 400: valid JSON that is not a request this route takes (unknown action, missing or
    /// extra fields, a body where none is taken).
    InvalidRequest,
    /// 413: the body is longer than [`MAX_BODY`].
    BodyTooLarge,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: the operation does not apply in the VM's current run state (resume when
    /// running, pause when paused, wake when not suspended, ...).
    WrongState,
    /// 409: the VM has stopped or is stopping.
    VmStopped,
    /// 409: a migration is under way; only `GET` requests are answered until it ends
    /// (nothing was changed).
    Migrating,
    /// 409: the wake-up device's interrupt is masked by the guest, so raising it would
    /// not wake the VM (nothing was changed).
    WakeSourceMasked,
    /// 429: too many event streams are open.
    TooManyStreams,
    /// 501: the route is reserved for a feature this build does not have.
    NotBuilt,
    /// 503: the VM did not reach the requested state in bounded time (nothing changed).
    Timeout,
    /// 502: a migration failed before Go was sent (the destination refused or
    /// failed, the connection dropped, a frame was corrupted, a timeout): the VM runs on
    /// here as it was.
    MigrationFailed,
}

impl ErrorKind {
    /// Every kind, in documentation order.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::MalformedJson,
        ErrorKind::InvalidRequest,
        ErrorKind::BodyTooLarge,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::WrongState,
        ErrorKind::VmStopped,
        ErrorKind::Migrating,
        ErrorKind::WakeSourceMasked,
        ErrorKind::TooManyStreams,
        ErrorKind::NotBuilt,
        ErrorKind::Timeout,
        ErrorKind::MigrationFailed,
    ];

    /// The HTTP status this kind is answered with.
    pub const fn status(self) -> u16 {
        match self {
            ErrorKind::MalformedJson | ErrorKind::InvalidRequest => 400,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::WrongState
            | ErrorKind::VmStopped
            | ErrorKind::Migrating
            | ErrorKind::WakeSourceMasked => 409,
            ErrorKind::TooManyStreams => 429,
            ErrorKind::NotBuilt => 501,
            ErrorKind::Timeout => 503,
            ErrorKind::MigrationFailed => 502,
        }
    }

    /// The kind's name on the wire.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// The largest request body the server reads (an action is a few dozen bytes).
pub const MAX_BODY: usize = 4096;

/// `PUT /vm/snapshot`: where to write the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A new (or empty) directory on the VMM's host (docs/snapshot.md).
    pub dir: std::path::PathBuf,
}

/// The answer to a snapshot: where it went and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDone {
    /// The snapshot directory.
    pub dir: std::path::PathBuf,
    /// Bytes of guest RAM (`memory.bin`'s length).
    pub memory_bytes: u64,
    /// Of those, the bytes stored: the pages guest RAM's mapping ever backed;
    /// the rest are holes in `memory.bin` (docs/snapshot.md, "Sparse memory").
    pub memory_stored_bytes: u64,
    /// Milliseconds until every vCPU was parked.
    pub pause_ms: f64,
    /// Milliseconds reading the KVM, engine and device state.
    pub state_ms: f64,
    /// Milliseconds writing the directory.
    pub write_ms: f64,
    /// The run state after it (as before: a running VM runs on, a paused one stays paused).
    pub run_state: RunState,
}

/// `PUT /vm/migrate`: where to send the VM and when to stop pre-copying
/// (docs/migration.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination, `unix:PATH` or `tcp:ADDR:PORT` (a `vpsci restore --listen`).
    pub to: String,
    /// Dirty-page rounds at most after the full copy (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Pre-copy ends once the remaining dirty pages would keep the VM paused no longer
    /// than this many milliseconds at the measured bandwidth (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// One round of a migration's pre-copy (and the final, paused one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRound {
    /// 0 is the full copy; 1.. are dirty rounds; the last is the one sent paused.
    pub round: u32,
    /// Pages sent in the round.
    pub pages_sent: u64,
    /// Bytes of guest memory sent in the round.
    pub bytes_sent: u64,
    /// How long the round took, in milliseconds.
    pub ms: f64,
    /// Pages the guest dirtied while the round was sent (0 for the paused round).
    pub dirty_pages: u64,
    /// Pages the VMM's devices wrote over the same time (virtio data buffers
    /// and used rings; KVM's dirty log does not see them), counted whether or
    /// not the guest dirtied them too. For the paused round: since the last
    /// dirty round.
    pub device_pages: u64,
    /// Those per second.
    pub dirty_pages_per_s: f64,
    /// Bandwidth over the round, MiB/s.
    pub mib_per_s: f64,
    /// How long sending the dirty pages would keep the VM paused, at the bandwidth
    /// measured so far.
    pub expected_downtime_ms: f64,
}

/// The answer to a migration that sent Go: confirmed (the VM runs on the destination)
/// or not (the VM is paused here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateDone {
    /// The destination.
    pub to: String,
    /// Each round, the paused one last.
    pub rounds: Vec<MigrationRound>,
    /// Bytes of guest memory sent over all rounds.
    pub bytes_sent: u64,
    /// Milliseconds from the request to the destination's confirmation.
    pub total_ms: f64,
    /// Milliseconds the VM was paused here until the destination confirmed it runs (or
    /// until the wait for that confirmation ended).
    pub downtime_ms: f64,
    /// Whether the destination confirmed that the VM runs there. If not, Go was sent
    /// but this side cannot tell whether the destination read it: the VM stays paused
    /// here, intact, and the operator resumes it (the destination exited 1 without
    /// running it) or powers it off (the destination runs it).
    pub confirmed: bool,
    /// The run state here after it: `stopping` when confirmed (this process exits with
    /// status 0), else `paused`.
    pub run_state: RunState,
}

/// Routes, as `(method, path)`: the one table the server dispatches on, the OpenAPI
/// test checks against, and the 405 answer lists.
pub const ROUTES: [(&str, &str); 5] = [
    ("GET", "/vm"),
    ("PUT", "/vm/actions"),
    ("GET", "/events"),
    ("PUT", "/vm/snapshot"),
    ("PUT", "/vm/migrate"),
];
