//! Live migration between vpsci processes (docs/migration.md).
//!
//! The source is a running VM served by the control API (`vpsci run` or
//! `vpsci restore` with `--api-socket`); `vpsci ctl SOCKET migrate --to
//! ENDPOINT` starts `send` on it. The destination is `vpsci restore
//! --listen ENDPOINT` (`receive`, arm64). One connection, framed messages with a
//! CRC-32 each ([`wire`]):
//!
//! 1. **Compatibility** — the source sends [`wire::Hello`] (machine, MPIDRs,
//!    CNTFRQ, the engine's snapshot); the destination runs the same checks a
//!    restore runs on them ([`crate::restore::check_firmware_of`],
//!    `crate::restore::check_host` (arm64)) and answers Accept or Refuse. No
//!    memory is sent before Accept.
//! 2. **Pre-copy** — dirty logging on, every non-zero page, then rounds of
//!    the pages dirtied meanwhile until the rest would take no longer than
//!    the downtime target at the measured bandwidth, or the round limit.
//! 3. **Stop and copy** — the VM is paused; the last dirty pages and the
//!    snapshot's small sections (the bytes a snapshot directory holds,
//!    checked by [`crate::snapshot::open_streamed`]); the destination builds
//!    the VM and answers Ready.
//! 4. **Commit** — the source writes Go and from then on never runs the VM
//!    on its own again; the destination runs it only after reading a whole,
//!    checked Go frame, and confirms with Running. The source keeps the VM
//!    paused, intact, until Running arrives, and only then stops it. Without
//!    Running (timeout, a closed connection, garbage) it cannot tell whether
//!    the destination read Go, so it keeps the VM paused and leaves the
//!    choice to the operator (resume here, or power off here).
//!
//! Before Go every failure (a refusal, a dead peer, a dropped connection, a
//! bad checksum, a timeout) leaves the source running as it was: logging
//! off, the VM unpaused. The destination exits with status 1 and one line,
//! never having run the VM.

mod endpoint;
pub mod wire;

#[cfg(target_arch = "aarch64")]
mod receive;
#[cfg(target_arch = "aarch64")]
mod send;

use std::time::Duration;

use crate::layout::GuestLayout;
use wire::Hello;

pub use endpoint::{accept_one, Endpoint, Stream};
#[cfg(target_arch = "aarch64")]
pub use receive::receive;
#[cfg(target_arch = "aarch64")]
pub use send::send;

/// How long either side waits for the other's next bytes before giving up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default round limit (`--max-rounds`).
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Default downtime target (`--downtime-ms`).
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);

/// What `vpsci ctl migrate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The destination.
    pub to: Endpoint,
    /// Dirty rounds at most after the full copy.
    pub max_rounds: u32,
    /// Stop pre-copy once the rest would keep the VM paused no longer than this.
    pub downtime: Duration,
}

/// Test-only fault injection, read from `VPSCI_MIGRATE_FAULT` (never set
/// in normal use; docs/migration.md lists it): how the failure tests make a
/// frame arrive corrupted or a destination die in the middle of the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Source: the first page frame's payload is damaged after its CRC-32.
    CorruptPages,
    /// Destination: the process exits (status 101, no answer) after this
    /// many page frames, as if it were killed.
    DieAfterPages(u64),
    /// Destination: after Accept it reads nothing more and never answers,
    /// as if it hung.
    HangAfterAccept,
    /// Source: only the first bytes of the Go frame are written, then the
    /// connection is shut down, as if it broke while Go was on its way.
    CutGo,
    /// Source: the Go frame is written whole but with a damaged CRC-32.
    CorruptGo,
    /// Destination: it runs the VM after Go but never answers Running,
    /// keeping the connection open and silent, as if the confirmation were
    /// lost on the way.
    WithholdRunning,
}

impl Fault {
    /// The fault the environment asks for, if any.
    pub fn from_env() -> Option<Fault> {
        let value = std::env::var("VPSCI_MIGRATE_FAULT").ok()?;
        if value == "corrupt-pages" {
            return Some(Fault::CorruptPages);
        }
        if value == "hang-after-accept" {
            return Some(Fault::HangAfterAccept);
        }
        if value == "cut-go" {
            return Some(Fault::CutGo);
        }
        if value == "corrupt-go" {
            return Some(Fault::CorruptGo);
        }
        if value == "withhold-running" {
            return Some(Fault::WithholdRunning);
        }
        value
            .strip_prefix("die-after-pages:")
            .and_then(|n| n.parse().ok())
            .map(Fault::DieAfterPages)
    }
}

/// The destination's compatibility check on the Hello, before any memory:
/// the machine fits this build's memory map and this build can offer the
/// guest's pinned firmware (`in_kernel_psci`: the destination was asked for
/// KVM's PSCI, which cannot). The host's side (KVM, CNTFRQ, vCPU count) is
/// `crate::restore::check_host`'s (arm64).
pub fn check_hello(hello: &Hello, in_kernel_psci: bool) -> Result<GuestLayout, String> {
    let machine = &hello.machine;
    let layout = GuestLayout::new(machine.cpus, machine.ram_size)
        .map_err(|e| format!("incompatible machine: {e}"))?;
    if layout.ram_base().0 != machine.ram_base {
        return Err(format!(
            "incompatible machine: guest RAM starts at {:#x} there, this vpsci places it at {:#x}",
            machine.ram_base,
            layout.ram_base().0
        ));
    }
    if hello.mpidrs.len() != machine.cpus as usize {
        return Err(format!(
            "incompatible machine: {} vCPUs but {} MPIDRs",
            machine.cpus,
            hello.mpidrs.len()
        ));
    }
    if !hello.page_size.is_power_of_two() || !(4096..=65536).contains(&hello.page_size) {
        return Err(format!(
            "page size {} is not one of 4, 16 or 64 KiB",
            hello.page_size
        ));
    }
    crate::restore::check_firmware_of(&hello.firmware, &hello.mpidrs, &layout, in_kernel_psci)?;
    Ok(layout)
}

/// `vpsci restore --listen` on a host without arm64 KVM.
#[cfg(not(target_arch = "aarch64"))]
pub fn receive(
    _config: &crate::cli::RestoreConfig,
    _endpoint: &Endpoint,
) -> crate::run::RunOutcome {
    crate::restore::no_kvm()
}

/// Writes the VMM itself makes into guest RAM (virtio buffers and used
/// rings, served on vCPU threads), which KVM's dirty log never sees. While a
/// migration logs dirty pages, the devices mark what they write here and
/// each round merges it with KVM's log; otherwise marking costs one
/// uncontended lock.
#[derive(Debug, Default)]
pub struct VmmWrites {
    logs: std::sync::Mutex<Option<Vec<vpsci_kvm::DirtyLog>>>,
}

impl VmmWrites {
    fn logs(&self) -> std::sync::MutexGuard<'_, Option<Vec<vpsci_kvm::DirtyLog>>> {
        self.logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `len` bytes from guest physical `addr` were written (no-op
    /// unless a migration is logging).
    pub fn mark(&self, addr: u64, len: u64) {
        if let Some(logs) = self.logs().as_mut() {
            for log in logs {
                log.mark(addr, len);
            }
        }
    }

    /// Starts logging into `clean` (one log per RAM slot, all clean).
    pub fn start(&self, clean: Vec<vpsci_kvm::DirtyLog>) {
        *self.logs() = Some(clean);
    }

    /// The pages written since the last call (or the start), cleared;
    /// `None` when logging is off (a caller merging this into KVM's log must
    /// not mistake "not logging" for "nothing written").
    pub fn take(&self) -> Option<Vec<vpsci_kvm::DirtyLog>> {
        self.logs().as_mut().map(|logs| {
            logs.iter_mut()
                .map(|log| {
                    let clean =
                        vpsci_kvm::DirtyLog::clean(log.guest_addr, log.page_size, log.pages);
                    std::mem::replace(log, clean)
                })
                .collect()
        })
    }

    /// Stops logging.
    pub fn stop(&self) {
        *self.logs() = None;
    }
}
