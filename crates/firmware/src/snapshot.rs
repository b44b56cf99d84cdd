//! Versioned binary snapshot of the firmware state.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `b"VPSCIFW\0"` |
//! | 2 | format version ([`SNAPSHOT_FORMAT_VERSION`]) |
//! | 30 | canonical firmware configuration (version, conduit, features, power states, SoC ID, workarounds, ON_PENDING reporting) |
//! | 1 | flags: bit 0 frozen, bit 1 MEM_PROTECT on, bit 2 OS-initiated suspend mode |
//! | 4 | vCPU count N |
//! | N x 91 | per vCPU: MPIDR u64, state u8 (wire values below), entry flags u8 (bit 0 AArch32, bit 1 CPU_DEFAULT_SUSPEND), stat state u8, entry pc u64, context id u64, saved x0..x3 4 x u64, counts 2 x u64, residency ns 2 x u64 |
//! | 4 | CRC-32 (IEEE) of everything before it |
//!
//! vCPU state wire values (fixed by the format, not by the engine's internal numbering):
//! 0 OFF, 1 ON_PENDING, 2 ON, 3 standby, 4 powerdown, 5 system suspend, 6 frozen.
//!
//! Format 1 (before the ON_PENDING option) is read too: its configuration has 29 bytes and
//! no ON_PENDING byte; the engines that wrote it always reported ON_PENDING, so it restores
//! only onto [`OnPending::Reported`](crate::OnPending::Reported). Its state values are the
//! same.
//!
//! Restore parses and checks everything (length, magic, version, checksum, configuration,
//! topology, every field) before it changes anything; on any error the engine is untouched.
//! A restore is accepted only onto an identical guest-visible configuration, because the
//! guest has already observed it (PSCI version, enabled functions, power states, SoC ID,
//! workaround answers).

use crate::config::OnPending;
use crate::config::{FirmwareConfig, CANONICAL_LEN};
use crate::coordinator::{Code, Firmware, Resume, Suspension, VcpuDetail};
use crate::decode::{CpuPowerState, SuspendMode};
use crate::error::SnapshotError;
use crate::platform::EntryPoint;
use crate::sync::{self, Ordering};

/// The snapshot format version this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 2;

/// The oldest format this build still reads.
const OLDEST_READABLE_FORMAT: u16 = 1;

/// Length of the configuration in format 1 (no ON_PENDING byte).
const CANONICAL_LEN_V1: usize = CANONICAL_LEN - 1;

/// The snapshot wire value of a vCPU state.
const fn wire_of(code: Code) -> u8 {
    match code {
        Code::Off => 0,
        Code::OnPending => 1,
        Code::On => 2,
        Code::Standby => 3,
        Code::Powerdown => 4,
        Code::System => 5,
        Code::Frozen => 6,
    }
}

/// The vCPU state a snapshot wire value stands for (formats 1 and 2).
const fn code_of_wire(value: u8) -> Option<Code> {
    Some(match value {
        0 => Code::Off,
        1 => Code::OnPending,
        2 => Code::On,
        3 => Code::Standby,
        4 => Code::Powerdown,
        5 => Code::System,
        6 => Code::Frozen,
        _ => return None,
    })
}

const MAGIC: [u8; 8] = *b"VPSCIFW\0";
/// Header length of the smallest (format 1) snapshot.
const MIN_HEADER_LEN: usize = 8 + 2 + CANONICAL_LEN_V1 + 1 + 4;
const VCPU_LEN: usize = 8 + 1 + 1 + 1 + 8 + 8 + 32 + 16 + 16;
const CRC_LEN: usize = 4;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bitwise: snapshots are small.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// One vCPU as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VcpuRecord {
    mpidr: u64,
    state: Code,
    detail: VcpuDetail,
    count: [u64; 2],
    residency_ns: [u64; 2],
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(SnapshotError::Truncated {
                len: self.bytes.len(),
                needed: self.pos.saturating_add(n),
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

fn invalid(field: &'static str, value: u64) -> SnapshotError {
    SnapshotError::InvalidField { field, value }
}

fn stat_byte(state: Option<CpuPowerState>) -> u8 {
    match state {
        None => 0,
        Some(CpuPowerState::Standby) => 1,
        Some(CpuPowerState::Powerdown) => 2,
    }
}

impl Firmware {
    /// Serialises the firmware state (configuration, VM flags, every vCPU's state, entry
    /// points and statistics). Take it while the VM is paused.
    pub fn snapshot(&self) -> Vec<u8> {
        let vm = sync::write(&self.vm);
        let header_len = MIN_HEADER_LEN + 1;
        let mut out = Vec::with_capacity(header_len + self.vcpus.len() * VCPU_LEN + CRC_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&vm.config.canonical_bytes());
        let flags = u8::from(vm.frozen)
            | u8::from(self.mem_protect.load(Ordering::Acquire)) << 1
            | u8::from(vm.suspend_mode == SuspendMode::OsInitiated) << 2;
        out.push(flags);
        // The count fits: `Firmware::new` refuses more vCPUs than u32 can index.
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        for slot in self.vcpus.iter() {
            let detail = sync::lock(&slot.detail);
            let state = slot.code();
            let default_suspend = detail.suspension.is_some_and(|s| s.by_default_suspend);
            let (entry, regs, stat) = match detail.suspension {
                Some(Suspension {
                    resume: Resume::Return { saved_regs },
                    stat_state,
                    ..
                }) => (None, saved_regs, stat_state),
                Some(Suspension {
                    resume: Resume::Entry { entry, .. },
                    stat_state,
                    ..
                }) => (Some(entry), [0; 4], stat_state),
                None => (detail.pending, [0; 4], None),
            };
            let entry = entry.unwrap_or(EntryPoint {
                pc: 0,
                context_id: 0,
                aarch32: false,
            });
            out.extend_from_slice(&slot.mpidr.raw().to_le_bytes());
            out.push(wire_of(state));
            out.push(u8::from(entry.aarch32) | u8::from(default_suspend) << 1);
            out.push(stat_byte(stat));
            out.extend_from_slice(&entry.pc.to_le_bytes());
            out.extend_from_slice(&entry.context_id.to_le_bytes());
            for r in regs {
                out.extend_from_slice(&r.to_le_bytes());
            }
            for s in [CpuPowerState::Standby, CpuPowerState::Powerdown] {
                out.extend_from_slice(&slot.stats.count(s).to_le_bytes());
            }
            for s in [CpuPowerState::Standby, CpuPowerState::Powerdown] {
                out.extend_from_slice(&slot.stats.residency_ns(s).to_le_bytes());
            }
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Restores a snapshot taken by [`snapshot`](Firmware::snapshot). Refused with a typed
    /// error, leaving everything unchanged, when the bytes are corrupted, truncated, of an
    /// unknown format, or from a VM with a different firmware configuration or topology.
    ///
    /// Afterwards the VMM re-issues the start of every ON_PENDING vCPU
    /// ([`pending_start`](Firmware::pending_start)) and parks suspended ones. Time already
    /// spent in an ongoing suspension is not carried over (the clocks differ).
    pub fn restore(&self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let mut vm = sync::write(&self.vm);
        let (flags, records) = self.parse(&vm.config, bytes)?;
        // Never unfreeze: a VM that has run keeps its configuration fixed.
        vm.frozen |= flags & 1 != 0;
        vm.suspend_mode = if flags & 4 != 0 {
            SuspendMode::OsInitiated
        } else {
            SuspendMode::PlatformCoordinated
        };
        self.mem_protect.store(flags & 2 != 0, Ordering::Release);
        for (slot, record) in self.vcpus.iter().zip(records) {
            let mut detail = sync::lock(&slot.detail);
            *detail = record.detail;
            slot.stats.set(record.count, record.residency_ns);
            slot.set_code_silently(record.state);
        }
        Ok(())
    }

    /// The firmware configuration stored in a snapshot (after checking magic, format version
    /// and checksum). A destination VMM uses it to offer the same firmware as the source
    /// (for example to pin an older PSCI version with [`set_config`](Firmware::set_config))
    /// before [`restore`](Firmware::restore).
    pub fn snapshot_config(bytes: &[u8]) -> Result<FirmwareConfig, SnapshotError> {
        let (mut r, _, format) = open(bytes)?;
        let canonical = read_config(&mut r, format)?;
        FirmwareConfig::from_canonical(&canonical).ok_or(SnapshotError::UnknownConfiguration)
    }

    fn parse(
        &self,
        local: &FirmwareConfig,
        bytes: &[u8],
    ) -> Result<(u8, Vec<VcpuRecord>), SnapshotError> {
        let (mut r, body_len, format) = open(bytes)?;
        let canonical = read_config(&mut r, format)?;
        if canonical != local.canonical_bytes() {
            let snapshot = FirmwareConfig::from_canonical(&canonical)
                .map_or_else(|| "an unreadable configuration".to_owned(), |c| c.summary());
            return Err(SnapshotError::IncompatibleConfig {
                snapshot,
                local: local.summary(),
            });
        }
        let flags = r.u8()?;
        if flags & !0b111 != 0 {
            return Err(invalid("flags", u64::from(flags)));
        }
        let count = r.u32()? as usize;
        if count != self.vcpus.len() {
            return Err(SnapshotError::CpuCountMismatch {
                snapshot: count,
                local: self.vcpus.len(),
            });
        }
        let mut records = Vec::with_capacity(count);
        for (index, slot) in self.vcpus.iter().enumerate() {
            let record = read_vcpu(&mut r)?;
            if record.mpidr != slot.mpidr.raw() {
                return Err(SnapshotError::MpidrMismatch {
                    index,
                    snapshot: record.mpidr,
                    local: slot.mpidr,
                });
            }
            records.push(record);
        }
        let extra = body_len.saturating_sub(r.pos);
        if extra != 0 {
            return Err(SnapshotError::TrailingBytes { extra });
        }
        Ok((flags, records))
    }
}

/// Checks magic, format version and checksum; returns a reader positioned after the
/// version, the length of the checksummed body and the format version.
fn open(bytes: &[u8]) -> Result<(Reader<'_>, usize, u16), SnapshotError> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = r.u16()?;
    if !(OLDEST_READABLE_FORMAT..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedFormat {
            found: version,
            oldest: OLDEST_READABLE_FORMAT,
            newest: SNAPSHOT_FORMAT_VERSION,
        });
    }
    let header_len = MIN_HEADER_LEN + usize::from(version >= 2);
    let Some(body_len) = bytes
        .len()
        .checked_sub(CRC_LEN)
        .filter(|&l| l >= header_len)
    else {
        return Err(SnapshotError::Truncated {
            len: bytes.len(),
            needed: header_len + CRC_LEN,
        });
    };
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&bytes[body_len..]);
    let stored = u32::from_le_bytes(crc_bytes);
    let computed = crc32(&bytes[..body_len]);
    if stored != computed {
        return Err(SnapshotError::ChecksumMismatch { stored, computed });
    }
    Ok((r, body_len, version))
}

/// Reads the configuration in `format`'s layout, as a current canonical encoding.
fn read_config(r: &mut Reader<'_>, format: u16) -> Result<[u8; CANONICAL_LEN], SnapshotError> {
    let mut canonical = [0u8; CANONICAL_LEN];
    if format == 1 {
        canonical[..CANONICAL_LEN_V1].copy_from_slice(r.take(CANONICAL_LEN_V1)?);
        let reported = FirmwareConfig {
            on_pending: OnPending::Reported,
            ..FirmwareConfig::default()
        };
        canonical[CANONICAL_LEN_V1] = reported.canonical_bytes()[CANONICAL_LEN_V1];
    } else {
        canonical.copy_from_slice(r.take(CANONICAL_LEN)?);
    }
    Ok(canonical)
}

fn read_vcpu(r: &mut Reader<'_>) -> Result<VcpuRecord, SnapshotError> {
    let mpidr = r.u64()?;
    let raw_state = r.u8()?;
    let state = code_of_wire(raw_state).ok_or(invalid("vcpu state", u64::from(raw_state)))?;
    let entry_flags = r.u8()?;
    let aarch32 = entry_flags & 1 != 0;
    let by_default_suspend = entry_flags & 2 != 0;
    if entry_flags & !3 != 0 || (by_default_suspend && state != Code::Powerdown) {
        return Err(invalid("entry flags", u64::from(entry_flags)));
    }
    let stat_state = match r.u8()? {
        0 => None,
        1 => Some(CpuPowerState::Standby),
        2 => Some(CpuPowerState::Powerdown),
        other => return Err(invalid("stat state", u64::from(other))),
    };
    let entry = EntryPoint {
        pc: r.u64()?,
        context_id: r.u64()?,
        aarch32,
    };
    let mut saved_regs = [0u64; 4];
    for reg in &mut saved_regs {
        *reg = r.u64()?;
    }
    let count = [r.u64()?, r.u64()?];
    let residency_ns = [r.u64()?, r.u64()?];
    let expected_stat = match state {
        Code::Standby => Some(CpuPowerState::Standby),
        Code::Powerdown => stat_state.filter(|s| *s == CpuPowerState::Powerdown),
        _ => None,
    };
    if stat_state != expected_stat || (state == Code::Powerdown && stat_state.is_none()) {
        return Err(invalid("stat state", u64::from(stat_byte(stat_state))));
    }
    let suspension = |resume| {
        Some(Suspension {
            resume,
            stat_state,
            started_ns: None,
            by_default_suspend,
        })
    };
    let detail = match state {
        Code::OnPending => VcpuDetail {
            pending: Some(entry),
            suspension: None,
        },
        Code::Standby => VcpuDetail {
            pending: None,
            suspension: suspension(Resume::Return { saved_regs }),
        },
        Code::Powerdown | Code::System => VcpuDetail {
            pending: None,
            suspension: suspension(Resume::Entry {
                entry,
                system: state == Code::System,
            }),
        },
        _ => VcpuDetail::default(),
    };
    Ok(VcpuRecord {
        mpidr,
        state,
        detail,
        count,
        residency_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
