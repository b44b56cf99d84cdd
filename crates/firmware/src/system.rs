//! System-scoped PSCI calls: SYSTEM_OFF (§5.1.9), SYSTEM_OFF2 (§5.1.10), SYSTEM_RESET
//! (§5.1.11), SYSTEM_RESET2 (§5.1.12), SYSTEM_SUSPEND (§5.1.19) and PSCI_SET_SUSPEND_MODE
//! (§5.1.20).
//!
//! Each one quiesces every other vCPU through [`Platform::quiesce`], takes the VM lock
//! exclusively, decides, and then either commits (state change and/or system event reported
//! while still quiesced) or returns an error with nothing changed.

use crate::coordinator::{Code, Firmware, Resume, Suspension, VmState};
use crate::decode::{Call, Off2Type, Reset2Type, SuspendMode, SystemCall};
use crate::error::{PsciError, SUCCESS};
use crate::ids::VcpuId;
use crate::platform::{CallOutcome, GuestCall, Platform, SuspendKind, SystemEvent, SystemVerdict};
use crate::psci::{decode_call, reply};
use crate::sync;

impl Firmware {
    pub(crate) fn system_call(&self, call: &GuestCall, platform: &dyn Platform) -> CallOutcome {
        if platform.quiesce(call.vcpu).is_err() {
            // Nothing is held and nothing was decided: the VM stays as it was.
            return reply(&call.regs, PsciError::InternalFailure.to_register());
        }
        let outcome = {
            let mut vm = sync::write(&self.vm);
            if self.is_halted() {
                // Another system call stopped the VM while this one waited for the lock.
                drop(vm);
                platform.resume(call.vcpu);
                return reply(&call.regs, PsciError::InternalFailure.to_register());
            }
            // Decode again under the exclusive lock: the configuration may have changed
            // (before freeze) since the shared-lock decode.
            match decode_call(&vm, call) {
                Ok(Call::System(system)) => self.system_locked(&mut vm, call, system, platform),
                Ok(_) => reply(&call.regs, PsciError::InternalFailure.to_register()),
                Err(e) => reply(&call.regs, e.to_register()),
            }
        };
        platform.resume(call.vcpu);
        outcome
    }

    fn system_locked(
        &self,
        vm: &mut VmState,
        call: &GuestCall,
        system: SystemCall,
        platform: &dyn Platform,
    ) -> CallOutcome {
        let regs = &call.regs;
        let Some(caller) = self.slot(call.vcpu) else {
            return reply(regs, PsciError::InternalFailure.to_register());
        };
        if caller.code() != Code::On {
            return reply(regs, PsciError::Denied.to_register());
        }
        let event = match system {
            SystemCall::Off => SystemEvent::Off,
            SystemCall::Off2 { off_type } => match off_type {
                // Type 0 selects the default type, HIBERNATE_OFF.
                Off2Type::Default | Off2Type::Hibernate => SystemEvent::Hibernate,
            },
            SystemCall::Reset => SystemEvent::Reset,
            SystemCall::Reset2 { reset_type, cookie } => match reset_type {
                Reset2Type::Warm => SystemEvent::WarmReset { cookie },
                Reset2Type::Vendor(reset_type) => SystemEvent::VendorReset { reset_type, cookie },
            },
            SystemCall::Suspend { entry } => {
                // DENIED before INVALID_ADDRESS, as the reference firmware orders them.
                if self.others(call.vcpu).any(|c| c != Code::Off) {
                    return reply(regs, PsciError::Denied.to_register());
                }
                let entry = match self.validate_entry(entry, call.caller_aarch32) {
                    Ok(entry) => entry,
                    Err(e) => return reply(regs, e.to_register()),
                };
                let mut detail = sync::lock(&caller.detail);
                detail.suspension = Some(Suspension {
                    resume: Resume::Entry {
                        entry,
                        system: true,
                    },
                    stat_state: None,
                    started_ns: Some(self.clock.now_ns()),
                    by_default_suspend: false,
                });
                caller.set_code(Code::System, platform);
                return CallOutcome::Suspend {
                    kind: SuspendKind::System,
                };
            }
            SystemCall::SetSuspendMode { mode } => {
                if mode != vm.suspend_mode && !self.mode_switch_allowed(call.vcpu, mode) {
                    return reply(regs, PsciError::Denied.to_register());
                }
                vm.suspend_mode = mode;
                return reply(regs, SUCCESS);
            }
        };
        match platform.system_event(call.vcpu, &event) {
            SystemVerdict::Commit => {
                // Still under the exclusive lock: no call is decided after this.
                self.halted.store(true, sync::Ordering::Release);
                CallOutcome::SystemEvent { event }
            }
            // Nothing changed: the caller continues, told the call failed (§5.1.10).
            SystemVerdict::Refuse => reply(regs, PsciError::InternalFailure.to_register()),
        }
    }

    /// PSCI_SET_SUSPEND_MODE's precondition (§5.1.20): a switch to OS-initiated mode needs
    /// every other core ON, OFF, or suspended through CPU_DEFAULT_SUSPEND; a switch back to
    /// platform-coordinated mode needs every other core OFF. Starting and frozen cores block
    /// both. (The spec's further rule that no CPU_SUSPEND was made since the last switch is
    /// approximated by "no core is in a CPU_SUSPEND state now".)
    fn mode_switch_allowed(&self, caller: VcpuId, mode: SuspendMode) -> bool {
        self.vcpus
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != caller.index())
            .all(|(_, slot)| {
                let detail = sync::lock(&slot.detail);
                match (mode, slot.code()) {
                    (SuspendMode::PlatformCoordinated, c) => c == Code::Off,
                    (SuspendMode::OsInitiated, Code::On | Code::Off) => true,
                    (SuspendMode::OsInitiated, Code::Powerdown) => {
                        detail.suspension.is_some_and(|s| s.by_default_suspend)
                    }
                    (SuspendMode::OsInitiated, _) => false,
                }
            })
    }

    /// State codes of every vCPU except `caller`.
    fn others(&self, caller: VcpuId) -> impl Iterator<Item = Code> + '_ {
        self.vcpus
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != caller.index())
            .map(|(_, s)| s.code())
    }
}
