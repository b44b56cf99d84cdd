//! The power-state coordinator: the [`Firmware`] object, per-vCPU state and the lifecycle
//! entry points the VMM calls (started, woken, reset, freeze, configuration).
//!
//! # Locking
//!
//! * `vm`: a VM-wide `RwLock` over the configuration and VM-wide state. Per-CPU calls take it
//!   shared; system-scoped calls (SYSTEM_*, PSCI_SET_SUSPEND_MODE), [`Firmware::reset`],
//!   [`Firmware::restore`] and configuration changes take it exclusively, system calls only
//!   after [`Platform::quiesce`](crate::Platform::quiesce).
//! * per vCPU: a `Mutex` over the details of its state (entry point, saved registers,
//!   suspension start) plus an `AtomicU8` mirror of the state code, written only while the
//!   mutex is held, so queries (AFFINITY_INFO, [`Firmware::power_state`]) never lock
//!   exclusively. CPU_ON decides under the target's mutex, so exactly one caller wins.
//! * lock order: `vm` before any vCPU mutex; at most one vCPU mutex at a time except under
//!   the exclusive `vm` lock. [`Firmware::vcpu_started`] and [`Firmware::vcpu_woken`] take
//!   only the vCPU mutex, so the VMM may call them from inside
//!   [`Platform::start_vcpu`](crate::Platform::start_vcpu).
//! * State *into* and *out of* OFF changes only under `vm` (CPU_OFF and CPU_ON shared, reset
//!   and restore exclusive), so the set of OFF vCPUs is stable under the exclusive lock.

use crate::config::{FirmwareConfig, MemoryRegion};
use crate::decode::{CpuPowerState, RawEntry, SuspendMode};
use crate::error::{ConfigError, PsciError};
use crate::ids::{Mpidr, VcpuId};
use crate::platform::{
    Clock, EntryPoint, MonotonicClock, Platform, PowerState, SuspendKind, Transition, WakeOutcome,
};
use crate::stats::VcpuStats;
use crate::sync::{self, AtomicBool, AtomicU8, Mutex, Ordering, RwLock};

/// A vCPU's state as mirrored in its atomic. The discriminants are internal: the snapshot
/// format maps each variant to its own wire value (see `snapshot.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum Code {
    Off = 0,
    OnPending = 1,
    On = 2,
    Standby = 3,
    Powerdown = 4,
    System = 5,
    Frozen = 6,
}

impl TryFrom<u8> for Code {
    type Error = u8;

    fn try_from(value: u8) -> Result<Self, u8> {
        Ok(match value {
            0 => Self::Off,
            1 => Self::OnPending,
            2 => Self::On,
            3 => Self::Standby,
            4 => Self::Powerdown,
            5 => Self::System,
            6 => Self::Frozen,
            other => return Err(other),
        })
    }
}

impl Code {
    /// The public view of this state.
    pub(crate) const fn power_state(self) -> PowerState {
        match self {
            Self::Off => PowerState::Off,
            Self::OnPending => PowerState::OnPending,
            Self::On => PowerState::On,
            Self::Standby => PowerState::Suspended {
                kind: SuspendKind::Standby,
            },
            Self::Powerdown => PowerState::Suspended {
                kind: SuspendKind::Powerdown,
            },
            Self::System => PowerState::Suspended {
                kind: SuspendKind::System,
            },
            Self::Frozen => PowerState::Frozen,
        }
    }
}

/// What a suspended vCPU does on wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Standby: return SUCCESS with the guest's x1..x3.
    Return { saved_regs: [u64; 4] },
    /// Powerdown or system suspend: restart at the entry point.
    Entry { entry: EntryPoint, system: bool },
}

/// An in-progress suspension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Suspension {
    pub(crate) resume: Resume,
    /// The CPU_SUSPEND state it counts for in PSCI_STAT_* (None for SYSTEM_SUSPEND).
    pub(crate) stat_state: Option<CpuPowerState>,
    /// Clock reading at entry (None after a restore: the time base is the source host's).
    pub(crate) started_ns: Option<u64>,
    /// Entered through CPU_DEFAULT_SUSPEND (allowed to stay across a switch to OS-initiated
    /// mode, §5.1.20).
    pub(crate) by_default_suspend: bool,
}

/// Details behind a vCPU's state code.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VcpuDetail {
    /// Entry of an ON_PENDING vCPU.
    pub(crate) pending: Option<EntryPoint>,
    /// Set exactly while SUSPENDED.
    pub(crate) suspension: Option<Suspension>,
}

pub(crate) struct VcpuSlot {
    pub(crate) id: VcpuId,
    pub(crate) mpidr: Mpidr,
    pub(crate) state: AtomicU8,
    pub(crate) detail: Mutex<VcpuDetail>,
    pub(crate) stats: VcpuStats,
}

impl VcpuSlot {
    pub(crate) fn code(&self) -> Code {
        // Only `set_code` stores, and only `Code` values.
        Code::try_from(self.state.load(Ordering::Acquire)).unwrap_or(Code::Off)
    }

    /// Sets the state code and reports the change; the caller holds `detail`, which keeps
    /// the reports for one vCPU in commit order.
    pub(crate) fn set_code(&self, c: Code, platform: &dyn Platform) {
        let from = self.code();
        self.state.store(c as u8, Ordering::Release);
        if from != c {
            platform.power_transition(&Transition {
                vcpu: self.id,
                from: from.power_state(),
                to: c.power_state(),
            });
        }
    }

    /// Sets the state code without a report (restore, which replaces the whole state).
    pub(crate) fn set_code_silently(&self, c: Code) {
        self.state.store(c as u8, Ordering::Release);
    }
}

/// VM-wide state behind the VM lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmState {
    pub(crate) config: FirmwareConfig,
    pub(crate) frozen: bool,
    pub(crate) suspend_mode: SuspendMode,
}

/// The firmware engine of one VM. `Send + Sync`; share it between vCPU threads with `Arc`.
pub struct Firmware {
    pub(crate) vm: RwLock<VmState>,
    pub(crate) vcpus: Box<[VcpuSlot]>,
    pub(crate) ram: Box<[MemoryRegion]>,
    pub(crate) mem_protect: AtomicBool,
    pub(crate) clock: Box<dyn Clock>,
}

impl core::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Firmware")
            .field("vcpus", &self.vcpus.len())
            .field("ram", &self.ram)
            .finish_non_exhaustive()
    }
}

impl Firmware {
    /// A firmware for a VM with vCPUs `cpus` (vCPU `i` has MPIDR `cpus[i]`) and guest RAM
    /// `ram`. vCPU 0 (the boot CPU) starts ON, all others OFF. Suspensions are timed with a
    /// [`MonotonicClock`].
    pub fn new(
        config: FirmwareConfig,
        cpus: Vec<Mpidr>,
        ram: Vec<MemoryRegion>,
    ) -> Result<Firmware, ConfigError> {
        Self::with_clock(config, cpus, ram, Box::new(MonotonicClock::new()))
    }

    /// Like [`Firmware::new`], timing suspensions (PSCI_STAT_RESIDENCY) with `clock`.
    pub fn with_clock(
        config: FirmwareConfig,
        cpus: Vec<Mpidr>,
        ram: Vec<MemoryRegion>,
        clock: Box<dyn Clock>,
    ) -> Result<Firmware, ConfigError> {
        config.validate()?;
        if cpus.is_empty() {
            return Err(ConfigError::NoCpus);
        }
        if u32::try_from(cpus.len()).is_err() {
            return Err(ConfigError::TooManyCpus { count: cpus.len() });
        }
        let mut sorted: Vec<(Mpidr, usize)> = cpus.iter().copied().zip(0..).collect();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ConfigError::DuplicateMpidr {
                mpidr: w[0].0,
                first: w[0].1,
                second: w[1].1,
            });
        }
        for r in &ram {
            if r.size == 0 || r.base.checked_add(r.size).is_none() {
                return Err(ConfigError::BadRamRegion {
                    base: r.base,
                    size: r.size,
                });
            }
        }
        let vcpus = cpus
            .iter()
            .enumerate()
            .map(|(i, &mpidr)| VcpuSlot {
                // The count fits in u32 (checked above).
                id: VcpuId::new(i as u32),
                mpidr,
                state: AtomicU8::new(if i == 0 { Code::On } else { Code::Off } as u8),
                detail: Mutex::new(VcpuDetail::default()),
                stats: VcpuStats::new(),
            })
            .collect();
        Ok(Firmware {
            vm: RwLock::new(VmState {
                config,
                frozen: false,
                suspend_mode: SuspendMode::PlatformCoordinated,
            }),
            vcpus,
            ram: ram.into_boxed_slice(),
            mem_protect: AtomicBool::new(false),
            clock,
        })
    }

    pub(crate) fn slot(&self, vcpu: VcpuId) -> Option<&VcpuSlot> {
        self.vcpus.get(vcpu.index())
    }

    /// The vCPU with MPIDR `mpidr`.
    pub fn vcpu_of(&self, mpidr: Mpidr) -> Option<VcpuId> {
        self.vcpus
            .iter()
            .position(|s| s.mpidr == mpidr)
            .and_then(|i| u32::try_from(i).ok())
            .map(VcpuId::new)
    }

    /// MPIDR of `vcpu`.
    pub fn mpidr(&self, vcpu: VcpuId) -> Option<Mpidr> {
        self.slot(vcpu).map(|s| s.mpidr)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Guest RAM regions entry points are checked against.
    pub fn ram(&self) -> &[MemoryRegion] {
        &self.ram
    }

    /// Current power state of `vcpu` (lock-free). An index outside the topology reads OFF.
    pub fn power_state(&self, vcpu: VcpuId) -> PowerState {
        self.slot(vcpu)
            .map_or(PowerState::Off, |s| s.code().power_state())
    }

    /// What PSCI_STAT_COUNT and PSCI_STAT_RESIDENCY (DEN0022 F.b §5.1.21, §5.1.22) would
    /// tell the guest about `vcpu` in `state`: completed suspensions and their total time
    /// in nanoseconds (lock-free; `None` outside the topology). For the operator's view.
    pub fn suspend_stats(&self, vcpu: VcpuId, state: CpuPowerState) -> Option<(u64, u64)> {
        let slot = self.slot(vcpu)?;
        Some((slot.stats.count(state), slot.stats.residency_ns(state)))
    }

    /// The entry point of an ON_PENDING vCPU (after a restore the VMM re-issues these starts).
    pub fn pending_start(&self, vcpu: VcpuId) -> Option<EntryPoint> {
        let slot = self.slot(vcpu)?;
        let detail = sync::lock(&slot.detail);
        if slot.code() == Code::OnPending {
            detail.pending
        } else {
            None
        }
    }

    /// The target of a start request is about to run guest code at its entry:
    /// ON_PENDING -> ON, reported through `platform`. Returns false, changing nothing, for
    /// any other state (for example after a VM reset raced with the start): the VMM must
    /// then not start the vCPU.
    pub fn vcpu_started(&self, vcpu: VcpuId, platform: &dyn Platform) -> bool {
        let Some(slot) = self.slot(vcpu) else {
            return false;
        };
        let mut detail = sync::lock(&slot.detail);
        if slot.code() != Code::OnPending {
            return false;
        }
        detail.pending = None;
        slot.set_code(Code::On, platform);
        true
    }

    /// A suspended vCPU was woken by an interrupt: SUSPENDED -> ON, and what it must do now
    /// (DEN0022 F.b §5.1.2: standby returns SUCCESS to the caller; powerdown and system
    /// suspend resume at the entry point with x0 = context id).
    /// The change is reported through `platform`.
    pub fn vcpu_woken(&self, vcpu: VcpuId, platform: &dyn Platform) -> WakeOutcome {
        let Some(slot) = self.slot(vcpu) else {
            return WakeOutcome::NotSuspended;
        };
        let mut detail = sync::lock(&slot.detail);
        let Some(suspension) = detail.suspension.take() else {
            return WakeOutcome::NotSuspended;
        };
        if let Some(state) = suspension.stat_state {
            let elapsed = suspension
                .started_ns
                .map(|t| self.clock.now_ns().saturating_sub(t));
            slot.stats.record(state, elapsed);
        }
        slot.set_code(Code::On, platform);
        match suspension.resume {
            Resume::Return { saved_regs } => WakeOutcome::Return {
                regs: [
                    crate::error::SUCCESS,
                    saved_regs[1],
                    saved_regs[2],
                    saved_regs[3],
                ],
            },
            Resume::Entry { entry, .. } => WakeOutcome::ResumeAt { entry },
        }
    }

    /// VM reset (SYSTEM_RESET restart): boot CPU ON, all others OFF, suspend mode back to
    /// platform-coordinated, MEM_PROTECT off (the VMM checks
    /// [`mem_protect_enabled`](Firmware::mem_protect_enabled) before calling this), statistics
    /// cleared. The configuration and its frozen flag are kept. Returns the transitions it
    /// made, in vCPU order (a reset is the VMM's act, not a guest call, so they come back to
    /// the caller rather than through a [`Platform`]).
    pub fn reset(&self) -> Vec<Transition> {
        let mut vm = sync::write(&self.vm);
        vm.suspend_mode = SuspendMode::PlatformCoordinated;
        self.mem_protect.store(false, Ordering::Release);
        let mut transitions = Vec::new();
        for (i, slot) in self.vcpus.iter().enumerate() {
            let mut detail = sync::lock(&slot.detail);
            *detail = VcpuDetail::default();
            slot.stats.clear();
            let from = slot.code();
            let to = if i == 0 { Code::On } else { Code::Off };
            slot.set_code_silently(to);
            if from != to {
                transitions.push(Transition {
                    vcpu: slot.id,
                    from: from.power_state(),
                    to: to.power_state(),
                });
            }
        }
        transitions
    }

    /// Freezes the configuration (call when the first vCPU first runs).
    pub fn freeze(&self) {
        sync::write(&self.vm).frozen = true;
    }

    /// True once [`freeze`](Firmware::freeze) was called (or a frozen snapshot restored).
    pub fn is_frozen(&self) -> bool {
        sync::read(&self.vm).frozen
    }

    /// The current configuration.
    pub fn config(&self) -> FirmwareConfig {
        sync::read(&self.vm).config
    }

    /// Replaces the configuration (the "firmware register" write). Refused once frozen.
    pub fn set_config(&self, config: FirmwareConfig) -> Result<(), ConfigError> {
        config.validate()?;
        let mut vm = sync::write(&self.vm);
        if vm.frozen {
            return Err(ConfigError::Frozen);
        }
        vm.config = config;
        Ok(())
    }

    /// True while the guest has MEM_PROTECT enabled (DEN0022 F.b §5.1.13): on a reset the
    /// VMM must scrub guest RAM before the guest runs again.
    pub fn mem_protect_enabled(&self) -> bool {
        self.mem_protect.load(Ordering::Acquire)
    }

    /// The current CPU_SUSPEND mode (PSCI_SET_SUSPEND_MODE).
    pub fn suspend_mode(&self) -> SuspendMode {
        sync::read(&self.vm).suspend_mode
    }

    /// Validates an entry point for a caller in the given execution state: it must lie in
    /// guest RAM and be aligned (4 bytes for A64/A32; for AArch32, bit 0 selects T32, which
    /// needs 2-byte alignment). DEN0022 F.b §5.1.4: INVALID_ADDRESS otherwise.
    pub(crate) fn validate_entry(
        &self,
        raw: RawEntry,
        aarch32: bool,
    ) -> Result<EntryPoint, PsciError> {
        let (addr, align) = if aarch32 && raw.pc & 1 == 1 {
            (raw.pc & !1, 2)
        } else {
            (raw.pc, 4)
        };
        if addr % align != 0 || !self.ram.iter().any(|r| r.contains(addr, align)) {
            return Err(PsciError::InvalidAddress);
        }
        Ok(EntryPoint {
            pc: raw.pc,
            context_id: raw.context_id,
            aarch32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> Vec<MemoryRegion> {
        vec![MemoryRegion {
            base: 0x4000_0000,
            size: 0x100_0000,
        }]
    }

    #[test]
    fn new_starts_boot_cpu_on_and_others_off() {
        let cpus = (0..3).map(Mpidr::from_index).collect();
        let fw = Firmware::new(FirmwareConfig::default(), cpus, ram()).expect("valid config");
        assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
        assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
        assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::Off);
        assert_eq!(fw.power_state(VcpuId::new(3)), PowerState::Off);
    }

    #[test]
    fn new_rejects_empty_topology_duplicates_and_bad_ram() {
        let cfg = FirmwareConfig::default();
        assert_eq!(
            Firmware::new(cfg, vec![], ram()).err(),
            Some(ConfigError::NoCpus)
        );
        let dup = vec![Mpidr::from_index(1), Mpidr::from_index(1)];
        assert!(matches!(
            Firmware::new(cfg, dup, ram()),
            Err(ConfigError::DuplicateMpidr { .. })
        ));
        let bad = vec![MemoryRegion {
            base: u64::MAX,
            size: 2,
        }];
        assert!(matches!(
            Firmware::new(cfg, vec![Mpidr::from_index(0)], bad),
            Err(ConfigError::BadRamRegion { .. })
        ));
    }

    #[test]
    fn set_config_is_refused_after_freeze() {
        let fw = Firmware::new(FirmwareConfig::default(), vec![Mpidr::from_index(0)], ram())
            .expect("valid");
        let older = FirmwareConfig {
            psci_version: crate::PsciVersion::V1_0,
            ..FirmwareConfig::default()
        };
        assert_eq!(fw.set_config(older), Ok(()));
        assert_eq!(fw.config().psci_version, crate::PsciVersion::V1_0);
        fw.freeze();
        assert_eq!(
            fw.set_config(FirmwareConfig::default()),
            Err(ConfigError::Frozen)
        );
        assert_eq!(fw.config().psci_version, crate::PsciVersion::V1_0);
    }

    #[test]
    fn entry_validation_requires_ram_and_alignment() {
        let fw = Firmware::new(FirmwareConfig::default(), vec![Mpidr::from_index(0)], ram())
            .expect("valid");
        let e = |pc| RawEntry { pc, context_id: 0 };
        assert!(fw.validate_entry(e(0x4000_0000), false).is_ok());
        assert_eq!(
            fw.validate_entry(e(0x4000_0002), false),
            Err(PsciError::InvalidAddress)
        );
        assert_eq!(
            fw.validate_entry(e(0x3FFF_FFFC), false),
            Err(PsciError::InvalidAddress)
        );
        assert_eq!(
            fw.validate_entry(e(0x4100_0000), false),
            Err(PsciError::InvalidAddress)
        );
        assert!(fw.validate_entry(e(0x4000_0003), true).is_ok(), "T32 entry");
        assert_eq!(
            fw.validate_entry(e(0x4000_0002), true),
            Err(PsciError::InvalidAddress)
        );
    }
}
