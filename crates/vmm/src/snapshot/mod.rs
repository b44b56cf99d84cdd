//! Whole-VM snapshots on disk: a directory holding a versioned manifest and
//! one file per section (guest memory, the KVM state, the firmware engine's
//! own snapshot, the devices), each with its size and CRC-32 in the manifest.
//! `docs/snapshot.md` describes the format for operators.
//!
//! Reading is split so that nothing about a VM is created before the
//! snapshot is known good: [`open`] reads the manifest and every small
//! section, checks sizes, checksums, versions and that the parts agree with
//! each other; [`CheckedSnapshot::load_memory`] then streams guest memory
//! into freshly allocated RAM, checking its checksum on the way, still before
//! any KVM object exists. Memory is its own file (not embedded in the
//! manifest) so a later live migration can send it as a separate stream. It
//! is a sparse file (the `sparse` module): guest pages the RAM's mapping
//! never backed are holes, neither written on save nor read on restore.

mod disks;
mod format;
#[cfg(target_arch = "aarch64")]
mod live;
mod sparse;
pub mod trigger;

pub use disks::RestoredDisk;
pub use format::{
    encode_sections, open, open_parts, open_streamed, write, CheckedSnapshot, DevicesState,
    DiskSnapshot, MachineInfo, Manifest, Section, SectionName, SnapshotError, SnapshotParts,
    Written, FORMAT_NAME, FORMAT_VERSION,
};
#[cfg(target_arch = "aarch64")]
pub use live::{CapturedState, LiveVm};

/// How long each step of a snapshot took (reported, never asserted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotTimes {
    /// Until every vCPU thread was parked.
    pub pause: std::time::Duration,
    /// Reading the KVM, engine and device state.
    pub state: std::time::Duration,
    /// Writing the directory (mostly guest memory).
    pub write: std::time::Duration,
    /// Bytes of guest memory saved (the RAM size: `memory.bin`'s length).
    pub memory_bytes: u64,
    /// Of those, bytes stored as data: the pages guest RAM's mapping ever
    /// backed (the rest of `memory.bin` is holes).
    pub memory_stored: u64,
}
