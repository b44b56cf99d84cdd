//! vCPU threads and the VM-wide control they share.
//!
//! Each vCPU runs on its own thread, which owns its `KvmVcpu`. A thread is
//! either *in guest* (inside `KVM_RUN`) or *out*. [`VmControl`] keeps, under
//! one mutex, which threads are in guest, the quiesce hold counter, pending
//! start requests and the reason the VM stops, and wakes waiters through one
//! condition variable — no sleep-polling anywhere:
//!
//! - a thread enters the guest only while nothing holds the VM and the VM is
//!   not stopping; it marks itself out (and wakes quiescers) as soon as
//!   `KVM_RUN` returns;
//! - [`VmControl::quiesce`] bumps the hold counter, kicks every other thread
//!   that is in guest, and waits until none is; a thread blocked in the engine
//!   or parked powered off already counts as held;
//! - CPU_ON hands the target's thread a start request; the target applies it
//!   itself (vCPU ioctls stay on their own thread), tells the engine it started
//!   and enters the guest;
//! - a suspended vCPU sits in `KVM_RUN` with `KVM_MP_STATE_SUSPENDED`; a kick
//!   comes back as `VcpuExit::Interrupted` and leaves it suspended, only
//!   `KVM_SYSTEM_EVENT_WAKEUP` resumes it through the engine.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vpsci_firmware::{EntryPoint, SystemEvent};

#[cfg(target_arch = "aarch64")]
pub use kvm::{PsciBackend, VcpuRunner, VmPlatform};

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The engine committed a system event (SYSTEM_OFF, RESET, ...).
    Firmware {
        /// vCPU that made the call.
        vcpu: usize,
        /// What it asked for.
        event: SystemEvent,
    },
    /// KVM's in-kernel PSCI reported a system event (`--in-kernel-psci`).
    Kernel {
        /// vCPU that made the call.
        vcpu: usize,
        /// What KVM reported.
        event: KernelEvent,
        /// `KVM_SYSTEM_EVENT_*_FLAG_PSCI_{OFF2,RESET2}` when set.
        flags: u64,
    },
    /// A vCPU could not go on.
    VcpuFailed {
        /// The vCPU.
        vcpu: usize,
        /// What happened.
        reason: String,
    },
    /// The operator's `--timeout` expired.
    Timeout {
        /// How long the VM ran.
        after: Duration,
    },
}

/// A system event KVM's in-kernel PSCI reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    /// `KVM_SYSTEM_EVENT_SHUTDOWN` (SYSTEM_OFF, SYSTEM_OFF2).
    Shutdown,
    /// `KVM_SYSTEM_EVENT_RESET` (SYSTEM_RESET, SYSTEM_RESET2).
    Reset,
    /// Any other type, by number.
    Other(u32),
}

/// Pulls one vCPU thread out of the guest (for KVM, a `vpsci_kvm::VcpuKicker`).
pub trait Kick: Send + Sync {
    /// Kicks; a kick that lands before the thread enters the guest must
    /// still make that entry return at once.
    fn kick(&self);
}

#[cfg(target_arch = "aarch64")]
impl Kick for vpsci_kvm::VcpuKicker {
    fn kick(&self) {
        vpsci_kvm::VcpuKicker::kick(self);
    }
}

/// What a vCPU thread does next (see [`VmControl::next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Enter the guest; the thread is now marked in guest and must call
    /// [`VmControl::left_guest`] when `KVM_RUN` returns.
    RunGuest,
    /// Reset and start at this entry point, then ask again.
    Start(EntryPoint),
    /// The VM is stopping: end the thread.
    Stop,
}

#[derive(Debug)]
struct ControlState {
    hold: u32,
    in_guest: Vec<bool>,
    start: Vec<Option<EntryPoint>>,
    stop: Option<StopReason>,
}

/// State shared by the vCPU threads of one VM and the thread that waits for it.
pub struct VmControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    kickers: Vec<Box<dyn Kick>>,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl VmControl {
    /// Control for a VM whose vCPUs are kicked through `kickers` (index order).
    pub fn new(kickers: Vec<Box<dyn Kick>>) -> VmControl {
        let n = kickers.len();
        VmControl {
            state: Mutex::new(ControlState {
                hold: 0,
                in_guest: vec![false; n],
                start: vec![None; n],
                stop: None,
            }),
            changed: Condvar::new(),
            kickers,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, ControlState>) -> MutexGuard<'a, ControlState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn kick_in_guest(&self, state: &ControlState, except: Option<usize>) {
        for (i, &inside) in state.in_guest.iter().enumerate() {
            if inside && Some(i) != except {
                if let Some(k) = self.kickers.get(i) {
                    k.kick();
                }
            }
        }
    }

    /// Blocks vCPU `index`'s thread until it has something to do: a start
    /// request, entering the guest (only when `runnable` and nothing holds
    /// the VM), or stopping.
    pub fn next(&self, index: usize, runnable: bool) -> Next {
        let mut st = self.lock();
        loop {
            if st.stop.is_some() {
                return Next::Stop;
            }
            if let Some(entry) = st.start.get_mut(index).and_then(Option::take) {
                return Next::Start(entry);
            }
            if runnable && st.hold == 0 {
                if let Some(flag) = st.in_guest.get_mut(index) {
                    *flag = true;
                    return Next::RunGuest;
                }
                return Next::Stop;
            }
            st = self.wait(st);
        }
    }

    /// vCPU `index` is out of the guest again; wakes a waiting quiescer.
    pub fn left_guest(&self, index: usize) {
        let mut st = self.lock();
        if let Some(flag) = st.in_guest.get_mut(index) {
            *flag = false;
        }
        let waited_on = st.hold > 0 || st.stop.is_some();
        drop(st);
        if waited_on {
            self.changed.notify_all();
        }
    }

    /// Holds every vCPU but `caller` out of the guest; returns when none is in.
    pub fn quiesce(&self, caller: usize) {
        let mut st = self.lock();
        st.hold += 1;
        self.kick_in_guest(&st, Some(caller));
        while st
            .in_guest
            .iter()
            .enumerate()
            .any(|(i, &inside)| inside && i != caller)
        {
            st = self.wait(st);
        }
    }

    /// Undoes one [`VmControl::quiesce`].
    pub fn resume(&self) {
        let mut st = self.lock();
        st.hold = st.hold.saturating_sub(1);
        drop(st);
        self.changed.notify_all();
    }

    /// Queues a start of `vcpu` at `entry` for its thread.
    pub fn request_start(&self, vcpu: usize, entry: EntryPoint) {
        let mut st = self.lock();
        if let Some(slot) = st.start.get_mut(vcpu) {
            *slot = Some(entry);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Stops the VM for `reason` unless it is already stopping; every vCPU
    /// leaves the guest and its thread ends.
    pub fn stop(&self, reason: StopReason) {
        let mut st = self.lock();
        if st.stop.is_none() {
            st.stop = Some(reason);
        }
        self.kick_in_guest(&st, None);
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until the VM stops or `timeout` passes (then stops it with
    /// [`StopReason::Timeout`]); returns why it stopped.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> StopReason {
        let started = Instant::now();
        let mut st = self.lock();
        loop {
            if let Some(reason) = &st.stop {
                return reason.clone();
            }
            match timeout {
                None => st = self.wait(st),
                Some(limit) => {
                    let elapsed = started.elapsed();
                    if elapsed >= limit {
                        drop(st);
                        self.stop(StopReason::Timeout { after: elapsed });
                        st = self.lock();
                        continue;
                    }
                    st = self
                        .changed
                        .wait_timeout(st, limit - elapsed)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// Whether `vcpu` is inside `KVM_RUN` right now (diagnostics).
    pub fn in_guest(&self, vcpu: usize) -> bool {
        self.lock().in_guest.get(vcpu).copied().unwrap_or(false)
    }
}

/// The KVM side: the engine's [`Platform`](vpsci_firmware::Platform) and the vCPU thread.
#[cfg(target_arch = "aarch64")]
mod kvm {
    use std::sync::Arc;
    use std::time::Instant;

    use vpsci_firmware::{
        CallOutcome, Conduit, EntropyError, EntryPoint, Firmware, FunctionId, GuestCall, Platform,
        PowerState, SuspendKind, SystemEvent, VcpuId, WakeOutcome,
    };
    use vpsci_kvm::{CoreReg, KvmError, KvmVcpu, MpState, SystemEventKind, VcpuExit};

    use super::{KernelEvent, Next, StopReason, VmControl};
    use crate::events::{self, Event, EventSink, Hex};
    use crate::vm::MmioBus;

    /// PSCI SYSTEM_OFF (DEN0022 §5.1.9), the one call the empty handler honours.
    const SYSTEM_OFF_ID: u32 = 0x8400_0008;

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
    }

    impl std::fmt::Debug for VmPlatform {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VmPlatform").finish_non_exhaustive()
        }
    }

    impl VmPlatform {
        /// A platform over `control` that logs system events to `events`.
        pub fn new(control: Arc<VmControl>, events: Arc<dyn EventSink>) -> VmPlatform {
            VmPlatform {
                control,
                clock: Instant::now(),
                events,
            }
        }
    }

    impl Platform for VmPlatform {
        fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint) {
            self.control.request_start(vcpu.index(), entry);
        }

        fn quiesce(&self, caller: VcpuId) {
            self.control.quiesce(caller.index());
        }

        fn resume(&self, _caller: VcpuId) {
            self.control.resume();
        }

        fn system_event(&self, caller: VcpuId, event: &SystemEvent) {
            if self.events.enabled() {
                self.events.record(&Event::SystemEvent {
                    vcpu: caller.index() as u32,
                    event: log_event(event),
                });
            }
            // Decided while the VM is still quiesced: nobody re-enters the guest.
            self.control.stop(StopReason::Firmware {
                vcpu: caller.index(),
                event: *event,
            });
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

    /// One vCPU thread's state.
    pub struct VcpuRunner {
        vcpu: KvmVcpu,
        index: usize,
        control: Arc<VmControl>,
        platform: Arc<VmPlatform>,
        psci: PsciBackend,
        mmio: Arc<MmioBus>,
        events: Arc<dyn EventSink>,
        power: Power,
    }

    impl std::fmt::Debug for VcpuRunner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VcpuRunner")
                .field("index", &self.index)
                .field("power", &self.power)
                .finish_non_exhaustive()
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

    impl VcpuRunner {
        /// A runner for `vcpu`. In engine mode only vCPU 0 starts on.
        pub fn new(
            vcpu: KvmVcpu,
            control: Arc<VmControl>,
            platform: Arc<VmPlatform>,
            psci: PsciBackend,
            mmio: Arc<MmioBus>,
            events: Arc<dyn EventSink>,
        ) -> VcpuRunner {
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
            }
        }

        /// Runs the vCPU until the VM stops. On failure the VM is stopped with
        /// [`StopReason::VcpuFailed`] naming this vCPU.
        pub fn run(mut self) {
            self.vcpu.bind_current_thread();
            if let Err(Fatal::Failed(reason)) = self.run_loop() {
                self.control.stop(StopReason::VcpuFailed {
                    vcpu: self.index,
                    reason,
                });
            }
        }

        fn run_loop(&mut self) -> Result<(), Fatal> {
            loop {
                self.enter()?;
                let exit = self.vcpu.run();
                self.control.left_guest(self.index);
                self.handle(exit?)?;
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

        /// CPU_ON (or a powerdown resume): reset at `entry` with x0 = context id.
        fn start(&mut self, entry: EntryPoint) -> Result<(), Fatal> {
            self.vcpu.start_at(entry.pc, entry.context_id)?;
            if let PsciBackend::Engine(fw) = &self.psci {
                let id = VcpuId::new(self.index as u32);
                let from = fw.power_state(id);
                fw.vcpu_started(id);
                self.log_power(from, fw.power_state(id));
            }
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
                    if function_id == SYSTEM_OFF_ID {
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
            let mut regs = [u64::from(function_id), 0, 0, 0];
            for (n, slot) in regs.iter_mut().enumerate().skip(1) {
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
            let before = fw.power_state(call.vcpu);
            let outcome = fw.handle_call(&call, self.platform.as_ref());
            if self.events.enabled() {
                self.log_call(&call, &outcome);
                self.log_power(before, fw.power_state(call.vcpu));
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
                    self.vcpu.set_mp_state(MpState::Suspended)?;
                    self.power = Power::Suspended;
                    Ok(())
                }
                // Already reported and the VM already stopping (VmPlatform::system_event).
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
            let id = VcpuId::new(self.index as u32);
            let before = fw.power_state(id);
            let outcome = fw.vcpu_woken(id);
            self.log_power(before, fw.power_state(id));
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

        fn log_call(&self, call: &GuestCall, outcome: &CallOutcome) {
            let w0 = call.regs[0] as u32;
            let name = match FunctionId::try_from(w0) {
                Ok(id) => screaming_snake(&format!("{id:?}")),
                Err(_) => "UNKNOWN".to_owned(),
            };
            let result = match outcome {
                CallOutcome::Return { regs } => events::CallResult::Return { x0: regs[0] as i64 },
                CallOutcome::PowerOff => events::CallResult::PowerOff,
                CallOutcome::Suspend { kind } => events::CallResult::Suspend {
                    suspend: log_suspend(*kind),
                },
                CallOutcome::SystemEvent { .. } => events::CallResult::SystemEvent,
            };
            self.events.record(&Event::PsciCall {
                vcpu: self.index as u32,
                function: &name,
                function_id: Hex(u64::from(w0)),
                args: [Hex(call.regs[1]), Hex(call.regs[2]), Hex(call.regs[3])],
                result,
            });
        }

        fn log_power(&self, from: PowerState, to: PowerState) {
            if from != to && self.events.enabled() {
                self.events.record(&Event::PowerState {
                    vcpu: self.index as u32,
                    from: log_power_state(from),
                    to: log_power_state(to),
                });
            }
        }
    }

    /// `CpuOn64` -> `CPU_ON64`: the spec's spelling of a function name.
    fn screaming_snake(camel: &str) -> String {
        let mut out = String::with_capacity(camel.len() + 4);
        for (i, c) in camel.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }

    fn log_suspend(kind: SuspendKind) -> events::SuspendKind {
        match kind {
            SuspendKind::Standby => events::SuspendKind::Standby,
            SuspendKind::Powerdown => events::SuspendKind::Powerdown,
            SuspendKind::System => events::SuspendKind::System,
        }
    }

    fn log_power_state(state: PowerState) -> events::PowerState {
        match state {
            PowerState::Off | PowerState::Frozen => events::PowerState::Off,
            PowerState::OnPending => events::PowerState::OnPending,
            PowerState::On => events::PowerState::On,
            PowerState::Suspended { kind } => match kind {
                SuspendKind::Standby => events::PowerState::SuspendedStandby,
                SuspendKind::Powerdown => events::PowerState::SuspendedPowerdown,
                SuspendKind::System => events::PowerState::SuspendedSystem,
            },
        }
    }

    /// The event log's spelling of a system event.
    pub(crate) fn log_event(event: &SystemEvent) -> events::SystemEvent {
        match *event {
            SystemEvent::Off => events::SystemEvent::Off,
            SystemEvent::Hibernate => events::SystemEvent::Hibernate,
            SystemEvent::Reset => events::SystemEvent::Reset,
            SystemEvent::WarmReset { cookie } => events::SystemEvent::WarmReset {
                cookie: Hex(cookie),
            },
            SystemEvent::VendorReset { reset_type, cookie } => events::SystemEvent::VendorReset {
                reset_type: Hex(u64::from(reset_type)),
                cookie: Hex(cookie),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread;

    use super::*;

    /// A fake vCPU's guest: "runs" until kicked; a kick that arrives before
    /// the next entry makes that entry return at once (like immediate_exit).
    #[derive(Default)]
    struct FakeCpu {
        kicked: AtomicBool,
        inside: AtomicBool,
    }

    struct FakeKick(Arc<FakeCpu>);

    impl Kick for FakeKick {
        fn kick(&self) {
            self.0.kicked.store(true, Ordering::SeqCst);
        }
    }

    fn vm(n: usize) -> (Arc<VmControl>, Vec<Arc<FakeCpu>>) {
        let cpus: Vec<Arc<FakeCpu>> = (0..n).map(|_| Arc::new(FakeCpu::default())).collect();
        let kicks = cpus
            .iter()
            .map(|c| Box::new(FakeKick(Arc::clone(c))) as Box<dyn Kick>)
            .collect();
        (Arc::new(VmControl::new(kicks)), cpus)
    }

    /// Runs the fake guest until kicked or `spins` iterations pass.
    fn run_guest(cpu: &FakeCpu, spins: usize) {
        cpu.inside.store(true, Ordering::SeqCst);
        for _ in 0..spins {
            if cpu.kicked.load(Ordering::SeqCst) {
                break;
            }
            std::hint::spin_loop();
        }
        cpu.kicked.store(false, Ordering::SeqCst);
        cpu.inside.store(false, Ordering::SeqCst);
    }

    #[test]
    fn quiesce_holds_every_other_vcpu_out_of_the_guest_under_contention() {
        const CPUS: usize = 6;
        const ROUNDS: usize = 100;
        let (control, cpus) = vm(CPUS);
        let violations = Arc::new(AtomicUsize::new(0));
        let quiesces = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for i in 0..CPUS {
            let control = Arc::clone(&control);
            let cpus = cpus.clone();
            let violations = Arc::clone(&violations);
            let quiesces = Arc::clone(&quiesces);
            threads.push(thread::spawn(move || {
                let mut round = 0usize;
                loop {
                    // vCPUs 0 and 1 make a "system call" every few exits,
                    // concurrently with each other.
                    if i < 2 && round % 7 == 3 && quiesces.load(Ordering::SeqCst) < ROUNDS {
                        control.quiesce(i);
                        for (j, other) in cpus.iter().enumerate() {
                            if j != i && other.inside.load(Ordering::SeqCst) {
                                violations.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        if quiesces.fetch_add(1, Ordering::SeqCst) + 1 == ROUNDS {
                            control.stop(StopReason::Timeout {
                                after: Duration::ZERO,
                            });
                        }
                        control.resume();
                    }
                    round += 1;
                    match control.next(i, true) {
                        Next::RunGuest => {
                            run_guest(&cpus[i], 5_000);
                            control.left_guest(i);
                        }
                        Next::Start(_) => {}
                        Next::Stop => return,
                    }
                }
            }));
        }
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert!(quiesces.load(Ordering::SeqCst) >= ROUNDS);
        assert_eq!(violations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_off_vcpu_waits_for_its_start_request_and_gets_it_once() {
        let (control, _cpus) = vm(2);
        let c = Arc::clone(&control);
        let waiter = thread::spawn(move || {
            let first = c.next(1, false);
            let second = c.next(1, true);
            (first, second)
        });
        let entry = EntryPoint {
            pc: 0x4008_0000,
            context_id: 7,
            aarch32: false,
        };
        control.request_start(1, entry);
        let (first, second) = waiter.join().unwrap_or_else(|_| panic!("waiter panicked"));
        assert_eq!(first, Next::Start(entry));
        assert_eq!(second, Next::RunGuest);
        assert!(control.in_guest(1));
    }

    #[test]
    fn stop_ends_waiting_threads_kicks_running_ones_and_the_first_reason_wins() {
        let (control, cpus) = vm(2);
        assert_eq!(control.next(0, true), Next::RunGuest);
        let c = Arc::clone(&control);
        let parked = thread::spawn(move || c.next(1, false));
        control.stop(StopReason::VcpuFailed {
            vcpu: 0,
            reason: "first".into(),
        });
        control.stop(StopReason::Timeout {
            after: Duration::ZERO,
        });
        assert!(cpus[0].kicked.load(Ordering::SeqCst), "running vCPU kicked");
        assert!(
            !cpus[1].kicked.load(Ordering::SeqCst),
            "parked vCPU not kicked"
        );
        assert_eq!(parked.join().ok(), Some(Next::Stop));
        assert_eq!(control.next(0, true), Next::Stop);
        assert_eq!(
            control.wait_stopped(None),
            StopReason::VcpuFailed {
                vcpu: 0,
                reason: "first".into()
            }
        );
    }

    #[test]
    fn wait_stopped_turns_an_expired_timeout_into_a_stop() {
        let (control, _cpus) = vm(1);
        let reason = control.wait_stopped(Some(Duration::from_millis(20)));
        assert!(
            matches!(reason, StopReason::Timeout { after } if after >= Duration::from_millis(20))
        );
        assert_eq!(control.next(0, true), Next::Stop);
    }

    #[test]
    fn no_vcpu_enters_while_the_vm_is_held() {
        let (control, _cpus) = vm(2);
        control.quiesce(0);
        let c = Arc::clone(&control);
        let entered = Arc::new(AtomicBool::new(false));
        let e = Arc::clone(&entered);
        let t = thread::spawn(move || {
            let next = c.next(1, true);
            e.store(true, Ordering::SeqCst);
            next
        });
        thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "entered while held");
        control.resume();
        assert_eq!(t.join().ok(), Some(Next::RunGuest));
    }
}
