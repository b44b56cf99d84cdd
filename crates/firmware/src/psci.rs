//! Call entry point and the per-CPU PSCI functions (DEN0022 F.b §5.1).
//!
//! Per-CPU functions run under the shared VM lock. System-scoped ones are handed to
//! the system module, which quiesces the VM first.

use crate::config::OnPending;
use crate::coordinator::{Code, Firmware, Resume, Suspension, VcpuSlot, VmState};
use crate::decode::{self, Call, CpuPowerState, PsciCall, RawEntry};
use crate::error::{PsciError, SUCCESS};
use crate::features;
use crate::ids::{AffinityLevel, FunctionId, Mpidr, Service};
use crate::platform::{CallOutcome, GuestCall, Platform, PowerState, SuspendKind};
use crate::sync;

/// MIGRATE_INFO_TYPE answer: Trusted OS not present or does not require migration (§5.1.7).
pub const MIGRATE_INFO_TYPE_NOT_REQUIRED: u64 = 2;

/// AFFINITY_INFO results (§5.1.5).
pub mod affinity_info {
    /// At least one core of the instance is ON.
    pub const ON: u64 = 0;
    /// Every core of the instance is OFF.
    pub const OFF: u64 = 1;
    /// The instance is transitioning to ON.
    pub const ON_PENDING: u64 = 2;
}

/// NODE_HW_STATE results (§5.1.18).
pub mod hw_state {
    /// The node is powered up.
    pub const HW_ON: u64 = 0;
    /// The node is powered down.
    pub const HW_OFF: u64 = 1;
    /// The node is in a standby/retention state.
    pub const HW_STANDBY: u64 = 2;
}

/// Builds a `Return` outcome from the guest's registers with x0 replaced.
pub(crate) fn reply(regs: &[u64; 4], x0: u64) -> CallOutcome {
    CallOutcome::Return {
        regs: [x0, regs[1], regs[2], regs[3]],
    }
}

pub(crate) fn reply_result(regs: &[u64; 4], result: Result<u64, PsciError>) -> CallOutcome {
    reply(regs, result.unwrap_or_else(PsciError::to_register))
}

/// Checks the conduit, the function ID and its availability, then decodes the arguments.
pub(crate) fn decode_call(vm: &VmState, call: &GuestCall) -> Result<Call, PsciError> {
    if call.conduit != vm.config.conduit {
        return Err(PsciError::NotSupported);
    }
    let fid = FunctionId::try_from(call.regs[0] as u32).map_err(|_| PsciError::NotSupported)?;
    features::function_flags(&vm.config, fid, call.caller_aarch32)
        .ok_or(PsciError::NotSupported)?;
    decode::decode(&vm.config, fid, &call.regs)
}

impl Firmware {
    /// Decodes and carries out one SMCCC call made by `call.vcpu`.
    ///
    /// Never panics on guest input: unknown or disabled functions answer NOT_SUPPORTED,
    /// malformed arguments the spec's error codes. A `call.vcpu` outside the topology (host
    /// misuse) answers INTERNAL_FAILURE.
    pub fn handle_call(&self, call: &GuestCall, platform: &dyn Platform) -> CallOutcome {
        let Some(slot) = self.slot(call.vcpu) else {
            return reply(&call.regs, PsciError::InternalFailure.to_register());
        };
        let vm = sync::read(&self.vm);
        if self.is_halted() {
            // A system event stopped the VM while this vCPU was on its way in (the
            // quiesce holds vCPUs out of the guest, not out of the engine).
            return reply(&call.regs, PsciError::InternalFailure.to_register());
        }
        let decoded = match decode_call(&vm, call) {
            Ok(decoded) => decoded,
            Err(e) => return reply(&call.regs, e.to_register()),
        };
        match decoded {
            Call::Psci(psci) => self.psci_call(&vm, slot, call, psci, platform),
            Call::System(_) => {
                // Quiesce needs the VM lock released: vCPUs blocked on it count as held,
                // but the exclusive lock must be taken after quiescing.
                drop(vm);
                self.system_call(call, platform)
            }
            Call::Arch(arch) => crate::smccc::arch_call(&vm.config, call, arch),
            Call::Trng(trng) => crate::smccc::trng_call(&vm.config, call, trng, platform),
        }
    }

    fn psci_call(
        &self,
        vm: &VmState,
        slot: &VcpuSlot,
        call: &GuestCall,
        psci: PsciCall,
        platform: &dyn Platform,
    ) -> CallOutcome {
        let regs = &call.regs;
        let result = match psci {
            PsciCall::Version => Ok(u64::from(vm.config.psci_version.encoded())),
            PsciCall::CpuSuspend { state, entry } => {
                return self.cpu_suspend(slot, call, state, entry, false, platform)
            }
            PsciCall::CpuDefaultSuspend { entry } => {
                return self.cpu_suspend(
                    slot,
                    call,
                    CpuPowerState::Powerdown,
                    entry,
                    true,
                    platform,
                )
            }
            PsciCall::CpuOff => return self.cpu_off(slot, Code::Off, regs, platform),
            PsciCall::CpuFreeze => return self.cpu_off(slot, Code::Frozen, regs, platform),
            PsciCall::CpuOn { target, entry } => {
                self.cpu_on(vm.config.on_pending, call, target, entry, platform)
            }
            PsciCall::AffinityInfo { target, level } => {
                self.affinity_info(vm.config.on_pending, target, level)
            }
            PsciCall::NodeHwState { target, level } => self.node_hw_state(target, level),
            PsciCall::MigrateInfoType => Ok(MIGRATE_INFO_TYPE_NOT_REQUIRED),
            PsciCall::MemProtect { enable } => {
                let previous = self.mem_protect.swap(enable, sync::Ordering::AcqRel);
                Ok(u64::from(previous))
            }
            PsciCall::MemProtectCheckRange { base, length } => {
                self.mem_protect_check_range(base, length)
            }
            PsciCall::Features { queried } => psci_features(vm, queried, call.caller_aarch32),
            PsciCall::Stat {
                count,
                wide,
                target,
                state,
            } => Ok(self.stat(count, wide, target, state)),
        };
        reply_result(regs, result)
    }

    /// CPU_SUSPEND (§5.1.2) and CPU_DEFAULT_SUSPEND (§5.1.17, which always picks the
    /// powerdown state). Standby ignores the entry point; powerdown validates it first.
    fn cpu_suspend(
        &self,
        slot: &VcpuSlot,
        call: &GuestCall,
        state: CpuPowerState,
        entry: RawEntry,
        by_default_suspend: bool,
        platform: &dyn Platform,
    ) -> CallOutcome {
        let resume = match state {
            CpuPowerState::Standby => Resume::Return {
                saved_regs: call.regs,
            },
            CpuPowerState::Powerdown => match self.validate_entry(entry, call.caller_aarch32) {
                Ok(entry) => Resume::Entry {
                    entry,
                    system: false,
                },
                Err(e) => return reply(&call.regs, e.to_register()),
            },
        };
        let mut detail = sync::lock(&slot.detail);
        if slot.code() != Code::On {
            return reply(&call.regs, PsciError::Denied.to_register());
        }
        detail.suspension = Some(Suspension {
            resume,
            stat_state: Some(state),
            started_ns: Some(self.clock.now_ns()),
            by_default_suspend,
        });
        let (c, kind) = match state {
            CpuPowerState::Standby => (Code::Standby, SuspendKind::Standby),
            CpuPowerState::Powerdown => (Code::Powerdown, SuspendKind::Powerdown),
        };
        slot.set_code(c, platform);
        CallOutcome::Suspend { kind }
    }

    /// CPU_OFF (§5.1.3) or CPU_FREEZE (§5.1.16): the caller stops. A frozen vCPU stays ON
    /// for AFFINITY_INFO (so CPU_ON answers ALREADY_ON) until the VM is reset.
    fn cpu_off(
        &self,
        slot: &VcpuSlot,
        target_code: Code,
        regs: &[u64; 4],
        platform: &dyn Platform,
    ) -> CallOutcome {
        let _detail = sync::lock(&slot.detail);
        if slot.code() != Code::On {
            return reply(regs, PsciError::Denied.to_register());
        }
        slot.set_code(target_code, platform);
        CallOutcome::PowerOff
    }

    /// CPU_ON (§5.1.4): exactly one SUCCESS per OFF -> ON_PENDING transition, decided under
    /// the target's mutex; the start request goes out after the mutex is released. Other
    /// callers see the starting core as ON_PENDING or, by default, already ON
    /// ([`OnPending`]).
    fn cpu_on(
        &self,
        on_pending: OnPending,
        call: &GuestCall,
        target: Mpidr,
        entry: RawEntry,
        platform: &dyn Platform,
    ) -> Result<u64, PsciError> {
        let tslot = self
            .vcpus
            .iter()
            .find(|s| s.mpidr == target)
            .ok_or(PsciError::InvalidParameters)?;
        let entry = self.validate_entry(entry, call.caller_aarch32)?;
        {
            let mut detail = sync::lock(&tslot.detail);
            match (tslot.code(), on_pending) {
                (Code::Off, _) => {
                    detail.pending = Some(entry);
                    tslot.set_code(Code::OnPending, platform);
                }
                (Code::OnPending, OnPending::Reported) => return Err(PsciError::OnPending),
                _ => return Err(PsciError::AlreadyOn),
            }
        }
        platform.start_vcpu(tslot.id, entry);
        Ok(SUCCESS)
    }

    /// The vCPUs in the affinity instance at `level` containing `target`.
    fn instance(&self, target: Mpidr, level: AffinityLevel) -> impl Iterator<Item = &VcpuSlot> {
        let wanted = target.instance_at(level);
        self.vcpus
            .iter()
            .filter(move |s| s.mpidr.instance_at(level) == wanted)
    }

    /// AFFINITY_INFO (§5.1.5): ON if any core of the instance is on (suspended and frozen
    /// cores are on), else ON_PENDING if any is starting and [`OnPending::Reported`] (a
    /// starting core is ON otherwise), else OFF. No matching core: INVALID_PARAMETERS.
    /// Lock-free.
    fn affinity_info(
        &self,
        on_pending: OnPending,
        target: Mpidr,
        level: AffinityLevel,
    ) -> Result<u64, PsciError> {
        let mut found = false;
        let mut pending = false;
        for slot in self.instance(target, level) {
            found = true;
            match (slot.code(), on_pending) {
                (Code::Off, _) => {}
                (Code::OnPending, OnPending::Reported) => pending = true,
                _ => return Ok(affinity_info::ON),
            }
        }
        match (found, pending) {
            (false, _) => Err(PsciError::InvalidParameters),
            (true, true) => Ok(affinity_info::ON_PENDING),
            (true, false) => Ok(affinity_info::OFF),
        }
    }

    /// NODE_HW_STATE (§5.1.18). A vCPU is HW_ON when on or starting, HW_STANDBY in standby
    /// or frozen (a retention-like state), HW_OFF when off or powered down. Higher levels
    /// have no power domain of their own in a VM, so a node reports the most powered state
    /// of its cores.
    fn node_hw_state(&self, target: Mpidr, level: AffinityLevel) -> Result<u64, PsciError> {
        let mut best: Option<u64> = None;
        for slot in self.instance(target, level) {
            let hw = match slot.code().power_state() {
                PowerState::On | PowerState::OnPending => hw_state::HW_ON,
                PowerState::Frozen
                | PowerState::Suspended {
                    kind: SuspendKind::Standby,
                } => hw_state::HW_STANDBY,
                PowerState::Off | PowerState::Suspended { .. } => hw_state::HW_OFF,
            };
            let rank = |v: u64| match v {
                hw_state::HW_ON => 2,
                hw_state::HW_STANDBY => 1,
                _ => 0,
            };
            best = Some(match best {
                Some(b) if rank(b) >= rank(hw) => b,
                _ => hw,
            });
        }
        best.ok_or(PsciError::InvalidParameters)
    }

    /// MEM_PROTECT_CHECK_RANGE (§5.1.14): SUCCESS when the whole range is guest RAM (all of
    /// which MEM_PROTECT covers), DENIED otherwise (including empty or wrapping ranges).
    fn mem_protect_check_range(&self, base: u64, length: u64) -> Result<u64, PsciError> {
        if length != 0 && self.ram.iter().any(|r| r.contains(base, length)) {
            Ok(SUCCESS)
        } else {
            Err(PsciError::Denied)
        }
    }

    /// PSCI_STAT_RESIDENCY (µs) / PSCI_STAT_COUNT (§5.1.21, §5.1.22). These have no error
    /// codes: an unknown core or power state reads 0. SMC32 results saturate at 32 bits.
    /// Time in an ongoing suspension is counted when it ends.
    fn stat(
        &self,
        count: bool,
        wide: bool,
        target: Option<Mpidr>,
        state: Option<CpuPowerState>,
    ) -> u64 {
        let (Some(target), Some(state)) = (target, state) else {
            return 0;
        };
        let Some(slot) = self.vcpus.iter().find(|s| s.mpidr == target) else {
            return 0;
        };
        let value = if count {
            slot.stats.count(state)
        } else {
            slot.stats.residency_ns(state) / 1_000
        };
        if wide {
            value
        } else {
            value.min(u64::from(u32::MAX))
        }
    }
}

/// PSCI_FEATURES (§5.1.15): the flags of an available PSCI function, 0 for SMCCC_VERSION
/// when available, NOT_SUPPORTED for everything else.
fn psci_features(vm: &VmState, queried: u32, caller_aarch32: bool) -> Result<u64, PsciError> {
    let fid = FunctionId::try_from(queried).map_err(|_| PsciError::NotSupported)?;
    if fid.service() != Service::Psci && fid != FunctionId::SmcccVersion {
        return Err(PsciError::NotSupported);
    }
    features::function_flags(&vm.config, fid, caller_aarch32)
        .map(u64::from)
        .ok_or(PsciError::NotSupported)
}
