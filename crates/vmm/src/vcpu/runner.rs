//! The KVM side of a vCPU: the engine's [`Platform`] over [`VmControl`],
//! and the thread that runs one vCPU (`KVM_RUN`, exits, PSCI through the
//! engine, MMIO to the devices, suspend and wake-up).

use std::sync::Arc;
use std::time::Instant;

use vpsci_firmware::{
    CallOutcome, Conduit, EntropyError, EntryPoint, Firmware, FunctionId, GuestCall, Platform,
    QuiesceError, SystemEvent, SystemVerdict, Transition, VcpuId, WakeOutcome,
};
use vpsci_kvm::{CoreReg, KvmError, MpState, SystemEventKind, VcpuExit};

use super::calls::CallCounts;
use super::control::{KernelEvent, Next, StopReason, VmControl};
use super::ops::{Mmio, VcpuOps};
use crate::cli::HibernateAction;
use crate::devices::irq::RiseMark;
use crate::events::{self, Event, EventSink, Hex, WakeSource};

/// Who answers the guest's PSCI calls.
#[derive(Clone)]
pub enum PsciBackend {
    /// vpsci's engine (the SMCCC filter forwards PSCI and TRNG).
    Engine(Arc<Firmware>),
    /// KVM's in-kernel PSCI (no filter); vCPU threads always sit in `KVM_RUN`.
    Kernel,
    /// Forwarded calls are answered with x0 = 0 without the engine (only
    /// SYSTEM_OFF is recognised, to end the VM): the floor cost of a call
    /// forwarded to userspace (measurements only).
    EmptyHandler,
}

impl std::fmt::Debug for PsciBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PsciBackend::Engine(_) => "Engine",
            PsciBackend::Kernel => "Kernel",
            PsciBackend::EmptyHandler => "EmptyHandler",
        })
    }
}

/// The [`Platform`] the engine acts through.
pub struct VmPlatform {
    control: Arc<VmControl>,
    clock: Instant,
    events: Arc<dyn EventSink>,
    on_hibernate: HibernateAction,
    calls: Arc<CallCounts>,
}

impl std::fmt::Debug for VmPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPlatform").finish_non_exhaustive()
    }
}

impl VmPlatform {
    /// A platform over `control` that logs system events and power-state
    /// transitions to `events` and handles a hibernate request as
    /// `on_hibernate` says.
    pub fn new(
        control: Arc<VmControl>,
        events: Arc<dyn EventSink>,
        on_hibernate: HibernateAction,
    ) -> VmPlatform {
        VmPlatform {
            control,
            clock: Instant::now(),
            events,
            on_hibernate,
            calls: Arc::new(CallCounts::default()),
        }
    }

    /// The same platform counting the engine's calls in `calls` (shared with
    /// the control API and kept across restarts).
    pub fn with_call_counts(mut self, calls: Arc<CallCounts>) -> VmPlatform {
        self.calls = calls;
        self
    }

    /// The engine's calls counted so far.
    pub fn call_counts(&self) -> &CallCounts {
        &self.calls
    }
}

impl Platform for VmPlatform {
    fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint) {
        self.control.request_start(vcpu.index(), entry);
    }

    fn power_transition(&self, t: &Transition) {
        events::record_transition(self.events.as_ref(), t);
    }

    fn quiesce(&self, caller: VcpuId) -> Result<(), QuiesceError> {
        self.control
            .quiesce(caller.index())
            .map_err(|stuck| QuiesceError {
                // A vCPU index fits: the VM has at most `layout::MAX_VCPUS` of them.
                vcpu: VcpuId::new(stuck as u32),
            })
    }

    fn resume(&self, _caller: VcpuId) {
        self.control.resume();
    }

    fn system_event(&self, caller: VcpuId, event: &SystemEvent) -> SystemVerdict {
        let refused = self.on_hibernate.refuses(event);
        if self.events.enabled() {
            self.events.record(&Event::SystemEvent {
                vcpu: caller.index() as u32,
                event: (*event).into(),
                refused,
            });
        }
        if refused {
            // The engine changes nothing and answers the caller
            // INTERNAL_FAILURE; when it resumes the VM every vCPU carries on.
            eprintln!(
                "vpsci: vCPU {} asked to hibernate (SYSTEM_OFF2 HIBERNATE_OFF): refused \
                 (--on-hibernate refuse); the guest continues with INTERNAL_FAILURE",
                caller.index()
            );
            return SystemVerdict::Refuse;
        }
        // Decided while the VM is still quiesced: nobody re-enters the guest.
        self.control.stop(StopReason::Firmware {
            vcpu: caller.index(),
            event: *event,
        });
        SystemVerdict::Commit
    }

    fn fill_random(&self, buf: &mut [u8]) -> Result<(), EntropyError> {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(EntropyError {
                    reason: std::io::Error::last_os_error().to_string(),
                });
            }
            filled += n as usize;
        }
        Ok(())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A vCPU's power as its own thread sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    /// Parked in userspace until a start request.
    Off,
    /// Runs guest code.
    On,
    /// In `KVM_RUN` with `KVM_MP_STATE_SUSPENDED`, waiting for a wake-up.
    Suspended,
}

/// One vCPU thread's state: the vCPU (KVM's, or a test's fake) and what it
/// shares with the rest of the VM.
pub struct VcpuRunner<V: VcpuOps> {
    vcpu: V,
    index: usize,
    control: Arc<VmControl>,
    platform: Arc<VmPlatform>,
    psci: PsciBackend,
    mmio: Arc<dyn Mmio>,
    events: Arc<dyn EventSink>,
    power: Power,
    /// Device interrupt rises when this vCPU suspended (event log only).
    suspended_at: Option<RiseMark>,
}

impl<V: VcpuOps> std::fmt::Debug for VcpuRunner<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("index", &self.index)
            .field("power", &self.power)
            .finish_non_exhaustive()
    }
}

/// Leaves a vCPU thread's mark consistent however the thread ends: never
/// counted as in guest again (so a quiescer cannot wait for it forever), and
/// an unwinding thread stops the VM naming its vCPU.
struct ExitGuard {
    control: Arc<VmControl>,
    index: usize,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.control.thread_ended(self.index);
        if std::thread::panicking() {
            self.control.stop(StopReason::VcpuFailed {
                vcpu: self.index,
                reason: "its thread panicked".to_owned(),
            });
        }
    }
}

/// What stops one vCPU thread.
#[derive(Debug)]
enum Fatal {
    /// The VM is stopping; leave quietly.
    Stopped,
    /// This vCPU failed.
    Failed(String),
}

impl From<KvmError> for Fatal {
    fn from(e: KvmError) -> Fatal {
        Fatal::Failed(e.to_string())
    }
}

impl<V: VcpuOps> VcpuRunner<V> {
    /// A runner for `vcpu`. In engine mode only vCPU 0 starts on.
    pub fn new(
        vcpu: V,
        control: Arc<VmControl>,
        platform: Arc<VmPlatform>,
        psci: PsciBackend,
        mmio: Arc<dyn Mmio>,
        events: Arc<dyn EventSink>,
    ) -> VcpuRunner<V> {
        let index = vcpu.index();
        let power = match psci {
            // KVM owns power states: every thread sits in KVM_RUN, where
            // KVM blocks the ones that are off.
            PsciBackend::Kernel => Power::On,
            _ if index == 0 => Power::On,
            _ => Power::Off,
        };
        VcpuRunner {
            vcpu,
            index,
            control,
            platform,
            psci,
            mmio,
            events,
            power,
            suspended_at: None,
        }
    }

    /// A runner for a vCPU of a restored VM, whose power the engine's
    /// restored `state` gives instead of its index: OFF, ON_PENDING (its
    /// start is queued again by the caller) and CPU_FREEZE park the thread,
    /// ON runs, a suspension waits in `KVM_RUN` for its wake-up (the restored
    /// MP state is `KVM_MP_STATE_SUSPENDED`).
    pub fn with_restored_power(mut self, state: vpsci_firmware::PowerState) -> VcpuRunner<V> {
        use vpsci_firmware::PowerState;
        self.power = match state {
            PowerState::Off | PowerState::OnPending | PowerState::Frozen => Power::Off,
            PowerState::On => Power::On,
            PowerState::Suspended { .. } => Power::Suspended,
        };
        // A wake-up after the restore is logged like any other (its sources:
        // the device lines that rise from now on).
        if self.power == Power::Suspended && self.events.enabled() {
            self.suspended_at = Some(self.mmio.interrupt_mark());
        }
        self
    }

    /// Runs the vCPU until the VM stops. On failure the VM is stopped with
    /// [`StopReason::VcpuFailed`] naming this vCPU.
    pub fn run(mut self) {
        self.vcpu.bind_current_thread();
        let guard = ExitGuard {
            control: Arc::clone(&self.control),
            index: self.index,
        };
        if let Err(Fatal::Failed(reason)) = self.run_loop() {
            self.control.stop(StopReason::VcpuFailed {
                vcpu: self.index,
                reason,
            });
        }
        drop(guard);
    }

    fn run_loop(&mut self) -> Result<(), Fatal> {
        loop {
            self.enter()?;
            let exit = self.vcpu.run();
            self.control.left_guest(self.index);
            let exit = exit?;
            crate::metrics::VCPU_EXITS.record(&exit);
            self.handle(exit)?;
        }
    }

    /// Blocks until this vCPU may enter the guest, applying start requests.
    fn enter(&mut self) -> Result<(), Fatal> {
        loop {
            match self.control.next(self.index, self.power != Power::Off) {
                Next::RunGuest => return Ok(()),
                Next::Start(entry) => self.start(entry)?,
                Next::Stop => return Err(Fatal::Stopped),
            }
        }
    }

    /// A start request (CPU_ON): the engine commits ON_PENDING -> ON, then
    /// the vCPU is reset at `entry` with x0 = context id before it runs any
    /// guest instruction. A request the engine no longer stands behind (the
    /// VM was reset since) is dropped.
    fn start(&mut self, entry: EntryPoint) -> Result<(), Fatal> {
        if let PsciBackend::Engine(fw) = &self.psci {
            if !fw.vcpu_started(VcpuId::new(self.index as u32), self.platform.as_ref()) {
                return Ok(());
            }
        }
        self.vcpu.start_at(entry.pc, entry.context_id)?;
        self.power = Power::On;
        Ok(())
    }

    fn handle(&mut self, exit: VcpuExit) -> Result<(), Fatal> {
        match exit {
            VcpuExit::Interrupted => Ok(()),
            VcpuExit::Hypercall { function_id, smc } => self.hypercall(function_id, smc),
            VcpuExit::MmioRead { addr, len } => {
                let mut data = [0u8; 8];
                let len = len.min(8);
                self.mmio.read(addr, &mut data[..len]);
                self.vcpu.complete_mmio_read(&data[..len]);
                Ok(())
            }
            VcpuExit::MmioWrite { addr, data, len } => {
                self.mmio.write(addr, &data[..len.min(8)]);
                Ok(())
            }
            VcpuExit::SystemEvent {
                kind: SystemEventKind::Wakeup,
                ..
            } => self.woken(),
            VcpuExit::SystemEvent { kind, flags } => match self.psci {
                PsciBackend::Kernel => {
                    let event = match kind {
                        SystemEventKind::Shutdown => KernelEvent::Shutdown,
                        SystemEventKind::Reset => KernelEvent::Reset,
                        SystemEventKind::Crash => KernelEvent::Other(3),
                        SystemEventKind::Suspend => KernelEvent::Other(5),
                        SystemEventKind::Wakeup => KernelEvent::Other(4),
                        SystemEventKind::Other(n) => KernelEvent::Other(n),
                    };
                    if self.events.enabled() {
                        self.log_kernel_event(event, flags)?;
                    }
                    self.control.stop(StopReason::Kernel {
                        vcpu: self.index,
                        event,
                        flags,
                    });
                    Err(Fatal::Stopped)
                }
                _ => Err(Fatal::Failed(format!(
                    "unexpected KVM system event {kind:?} (flags {flags:#x})"
                ))),
            },
            VcpuExit::FailEntry { reason } => Err(Fatal::Failed(format!(
                "KVM could not enter the guest (hardware reason {reason:#x})"
            ))),
            VcpuExit::Unhandled { reason } => {
                Err(Fatal::Failed(format!("unhandled KVM exit reason {reason}")))
            }
        }
    }

    fn hypercall(&mut self, function_id: u32, smc: bool) -> Result<(), Fatal> {
        let fw = match &self.psci {
            PsciBackend::Engine(fw) => Arc::clone(fw),
            PsciBackend::EmptyHandler => {
                // SYSTEM_OFF still ends the VM so a measurement guest can stop.
                if FunctionId::try_from(function_id) == Ok(FunctionId::SystemOff) {
                    self.control.stop(StopReason::Firmware {
                        vcpu: self.index,
                        event: SystemEvent::Off,
                    });
                    return Err(Fatal::Stopped);
                }
                self.vcpu.set_core(CoreReg::X(0), 0)?;
                return Ok(());
            }
            PsciBackend::Kernel => {
                return Err(Fatal::Failed(format!(
                    "SMCCC call {function_id:#x} forwarded although KVM handles PSCI"
                )))
            }
        };
        // PC already points past the HVC/SMC for both conduits (KVM advances
        // it before exiting; see vpsci_kvm::VcpuExit::Hypercall).
        // SMCCC passes the function ID in W0 (bits 63:32 of X0 are not part
        // of it) and KVM reports it as the exit's `nr`: no need to read X0.
        // Only the argument registers the engine's function table says the
        // function reads are fetched (none for an unknown ID, which answers
        // NOT_SUPPORTED): the engine hands the other zeros back, and
        // unchanged registers are not written back, so the guest keeps its
        // own values.
        let mut regs = [u64::from(function_id), 0, 0, 0];
        let args = FunctionId::try_from(function_id).map_or(0, FunctionId::arg_count);
        for (n, slot) in regs.iter_mut().enumerate().skip(1).take(args) {
            *slot = self.vcpu.get_core(CoreReg::X(n as u8))?;
        }
        let call = GuestCall {
            vcpu: VcpuId::new(self.index as u32),
            conduit: if smc { Conduit::Smc } else { Conduit::Hvc },
            regs,
            // vCPUs are created without KVM_ARM_VCPU_EL1_32BIT and HVC/SMC
            // are undefined at EL0, so every caller runs AArch64.
            caller_aarch32: false,
        };
        // The engine decides once and reports the transitions it commits
        // (VmPlatform::power_transition); here only the call is logged.
        let outcome = fw.handle_call(&call, self.platform.as_ref());
        self.platform.calls.count(function_id);
        if self.events.enabled() {
            self.log_call(&call, &outcome);
        }
        match outcome {
            CallOutcome::Return { regs: results } => {
                // x0 always carries the result; x1..x3 only when they changed
                // (the engine hands back the guest's own values otherwise).
                for (n, (&new, &old)) in results.iter().zip(regs.iter()).enumerate() {
                    if n == 0 || new != old {
                        self.vcpu.set_core(CoreReg::X(n as u8), new)?;
                    }
                }
                Ok(())
            }
            CallOutcome::PowerOff => {
                self.vcpu.set_mp_state(MpState::Stopped)?;
                self.power = Power::Off;
                Ok(())
            }
            CallOutcome::Suspend { .. } => {
                if self.events.enabled() {
                    self.suspended_at = Some(self.mmio.interrupt_mark());
                }
                self.vcpu.set_mp_state(MpState::Suspended)?;
                self.power = Power::Suspended;
                Ok(())
            }
            // Committed by VmPlatform::system_event, which is already
            // stopping the VM (a refused event is a Return).
            CallOutcome::SystemEvent { .. } => Err(Fatal::Stopped),
        }
    }

    /// `KVM_SYSTEM_EVENT_WAKEUP`: ask the engine how this vCPU resumes.
    fn woken(&mut self) -> Result<(), Fatal> {
        if self.power != Power::Suspended {
            return Ok(());
        }
        let PsciBackend::Engine(fw) = &self.psci else {
            return Ok(());
        };
        // Logged before the engine reports the resume, so the wake-up line
        // comes first.
        if let Some(mark) = self.suspended_at.take() {
            self.log_wakeup(&mark);
        }
        let outcome = fw.vcpu_woken(VcpuId::new(self.index as u32), self.platform.as_ref());
        match outcome {
            WakeOutcome::Return { regs } => {
                self.vcpu.set_mp_state(MpState::Runnable)?;
                self.vcpu.set_smccc_result(regs)?;
            }
            WakeOutcome::ResumeAt { entry } => {
                self.vcpu.start_at(entry.pc, entry.context_id)?;
            }
            // The engine no longer considers it suspended: leave the vCPU alone.
            WakeOutcome::NotSuspended => return Ok(()),
        }
        self.power = Power::On;
        Ok(())
    }

    /// Under KVM's PSCI, logs the system event KVM reported, with what the guest asked
    /// for. KVM sets only x0 (INTERNAL_FAILURE) before it exits for SYSTEM_RESET2 and
    /// SYSTEM_OFF2 (flag bit 0: `KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2`,
    /// `KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2`), so x1 (the type) and x2 (the cookie)
    /// still hold the call's arguments.
    fn log_kernel_event(&self, event: KernelEvent, flags: u64) -> Result<(), Fatal> {
        let psci2 = flags & 1 != 0;
        let logged = match (event, psci2) {
            (KernelEvent::Shutdown, false) => events::SystemEvent::Off,
            // KVM accepts SYSTEM_OFF2 only with type 0 (no type: the default,
            // HIBERNATE_OFF) or HIBERNATE_OFF: both are a hibernation.
            (KernelEvent::Shutdown, true) => events::SystemEvent::Hibernate,
            (KernelEvent::Reset, false) => events::SystemEvent::Reset,
            (KernelEvent::Reset, true) => {
                let reset_type = self.vcpu.get_core(CoreReg::X(1))? as u32;
                let cookie = self.vcpu.get_core(CoreReg::X(2))?;
                SystemEvent::from_reset2(reset_type, cookie)
                    .map_or(events::SystemEvent::Reset, Into::into)
            }
            (KernelEvent::Other(_), _) => return Ok(()),
        };
        self.events.record(&Event::SystemEvent {
            vcpu: self.index as u32,
            event: logged,
            refused: false,
        });
        Ok(())
    }

    fn log_call(&self, call: &GuestCall, outcome: &CallOutcome) {
        let w0 = call.regs[0] as u32;
        let name = FunctionId::try_from(w0).map_or(events::UNKNOWN_FUNCTION, FunctionId::name);
        let result = events::CallResult::from(outcome);
        self.events.record(&Event::PsciCall {
            vcpu: self.index as u32,
            function: name,
            function_id: Hex(u64::from(w0)),
            args: [Hex(call.regs[1]), Hex(call.regs[2]), Hex(call.regs[3])],
            result,
        });
    }

    /// Which device interrupts rose since this vCPU suspended (noted before
    /// they reached the vGIC, so the one that woke it is among them).
    fn log_wakeup(&self, mark: &RiseMark) {
        let raised = self.mmio.wake_sources(mark);
        let sources: Vec<WakeSource<'_>> = raised
            .iter()
            .map(|r| WakeSource {
                device: r.line.device,
                spi: r.line.spi,
                intid: 32 + r.line.spi,
                raised_ns_ago: u64::try_from(r.ago.as_nanos()).unwrap_or(u64::MAX),
            })
            .collect();
        self.events.record(&Event::Wakeup {
            vcpu: self.index as u32,
            sources: &sources,
        });
    }
}
