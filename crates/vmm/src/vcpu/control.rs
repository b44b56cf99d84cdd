//! The VM-wide control the vCPU threads share: who is in the guest, the
//! quiesce hold counter, start requests and the reason the VM stops.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vpsci_firmware::{EntryPoint, SystemEvent};

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
    /// A snapshot was written and the VM stopped after it (`vpsci run
    /// --snapshot-on-console`).
    Snapshotted {
        /// Where the snapshot is.
        dir: std::path::PathBuf,
    },
    /// The VM was migrated to another vpsci (`vpsci ctl migrate`): past the
    /// commit point it runs there and never here again.
    Migrated {
        /// The destination.
        to: String,
    },
    /// The operator stopped the VM through the control API.
    Operator {
        /// Power off or reboot.
        action: OperatorStop,
    },
    /// The operator's `--timeout` expired.
    Timeout {
        /// How long the VM ran.
        after: Duration,
    },
}

/// How the operator stopped the VM (control API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorStop {
    /// Like SYSTEM_OFF: `vpsci run` exits 0.
    PowerOff,
    /// Like SYSTEM_RESET with `--on-reset restart`: the VM starts again.
    Reboot,
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
    /// The operator paused the VM ([`VmControl::pause`]).
    paused: bool,
    in_guest: Vec<bool>,
    /// Out of the guest but not yet back in [`VmControl::next`]: handling an exit or a
    /// start (the engine, MMIO, ioctls). A pause waits for these too, so nothing a vCPU
    /// thread does can change the VM once a pause has returned.
    busy: Vec<bool>,
    start: Vec<Option<EntryPoint>>,
    /// Start requests stay queued ([`VmControl::hold_starts`]).
    starts_held: bool,
    stop: Option<StopReason>,
}

/// Why [`VmControl::pause`] did not pause the VM (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseError {
    /// The VM is already paused.
    AlreadyPaused,
    /// The VM is stopping (or stopped while the pause waited).
    Stopping,
    /// A vCPU thread did not come back within the quiesce limit; the pause was undone and
    /// the VM runs on.
    Stuck {
        /// The vCPU.
        vcpu: usize,
        /// Whether it was still inside `KVM_RUN` (else busy handling an exit).
        in_guest: bool,
        /// How long the pause waited.
        waited: Duration,
    },
}

impl std::fmt::Display for PauseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PauseError::AlreadyPaused => f.write_str("the VM is already paused"),
            PauseError::Stopping => f.write_str("the VM is stopping"),
            PauseError::Stuck {
                vcpu,
                in_guest,
                waited,
            } => write!(
                f,
                "vCPU {vcpu} did not stop within {:.1} s ({}); the VM was not paused",
                waited.as_secs_f64(),
                if *in_guest {
                    "still in the guest after being kicked"
                } else {
                    "still handling an exit"
                }
            ),
        }
    }
}

impl std::error::Error for PauseError {}

/// [`VmControl::unpause`] on a VM that is not paused (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotPaused;

/// How long [`VmControl::quiesce`] waits for the other vCPUs to leave the guest before it
/// gives up on the VM. A kicked vCPU leaves `KVM_RUN` within a forwarded exit's time
/// (microseconds natively, tens of milliseconds under the nested harness) whatever its guest
/// does, interrupts masked or not; one that does not is stuck outside the guest's control.
pub const DEFAULT_QUIESCE_LIMIT: Duration = Duration::from_secs(10);

/// How often a quiesce kicks the vCPUs still in the guest again while it waits (a kick that
/// raced with the vCPU's own exit and re-entry is not lost for long).
const REKICK_EVERY: Duration = Duration::from_millis(100);

/// How [`VmControl::kick_and_wait`] ended (the state lock still held).
enum Waited<'a, E> {
    /// No vCPU blocks any more (the lock was released).
    Done,
    /// The caller's condition gave up with `E` (a pause saw the VM stopping).
    GaveUp(MutexGuard<'a, ControlState>, E),
    /// `vcpu` still blocked when the quiesce limit had passed.
    TimedOut {
        guard: MutexGuard<'a, ControlState>,
        vcpu: usize,
        waited: Duration,
        kicks: u32,
    },
}

/// State shared by the vCPU threads of one VM and the thread that waits for it.
///
/// Two kinds of waiters, two kinds of condition variables (all over the one
/// state lock): a quiescer and [`VmControl::wait_stopped`] wait on `changed`
/// for vCPUs leaving the guest and for the stop; each vCPU thread waits in
/// [`VmControl::next`] on its own `wake` entry, which only its start request,
/// the end of a hold and the stop signal. (One shared condition variable
/// woke every parked vCPU thread at each CPU_ON: about n^2/2 futile wake-ups
/// to bring up n vCPUs.)
pub struct VmControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    wake: Vec<Condvar>,
    kickers: Vec<Box<dyn Kick>>,
    quiesce_limit: Duration,
    rekick_every: Duration,
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
                paused: false,
                in_guest: vec![false; n],
                busy: vec![false; n],
                start: vec![None; n],
                starts_held: false,
                stop: None,
            }),
            changed: Condvar::new(),
            wake: (0..n).map(|_| Condvar::new()).collect(),
            kickers,
            quiesce_limit: DEFAULT_QUIESCE_LIMIT,
            rekick_every: REKICK_EVERY,
        }
    }

    /// The same control with another bound on [`VmControl::quiesce`].
    pub fn with_quiesce_limit(mut self, limit: Duration) -> VmControl {
        self.quiesce_limit = limit;
        self
    }

    /// The same control with another interval between a quiesce's kicks of a
    /// vCPU that is still in the guest (tests).
    #[cfg(test)]
    fn with_rekick_every(mut self, every: Duration) -> VmControl {
        self.rekick_every = every;
        self
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, ControlState>) -> MutexGuard<'a, ControlState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes every vCPU thread waiting in [`VmControl::next`].
    fn wake_all_vcpus(&self) {
        for wake in &self.wake {
            wake.notify_all();
        }
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
    /// request (not while paused), entering the guest (only when `runnable`,
    /// nothing holds the VM and it is not paused), or stopping.
    ///
    /// From the moment `KVM_RUN` returns ([`VmControl::left_guest`]) until
    /// the thread calls this again it counts as busy; a [`Next::Start`] makes
    /// it busy until its next call too.
    pub fn next(&self, index: usize, runnable: bool) -> Next {
        let mut st = self.lock();
        if let Some(flag) = st.busy.get_mut(index) {
            *flag = false;
        }
        if st.paused {
            // A pause may be waiting for this thread to come back.
            self.changed.notify_all();
        }
        loop {
            if st.stop.is_some() {
                return Next::Stop;
            }
            if !st.paused && !st.starts_held {
                if let Some(entry) = st.start.get_mut(index).and_then(Option::take) {
                    if let Some(flag) = st.busy.get_mut(index) {
                        *flag = true;
                    }
                    return Next::Start(entry);
                }
            }
            if runnable && st.hold == 0 && !st.paused {
                if let Some(flag) = st.in_guest.get_mut(index) {
                    *flag = true;
                    return Next::RunGuest;
                }
                return Next::Stop;
            }
            let Some(wake) = self.wake.get(index) else {
                return Next::Stop;
            };
            st = wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// vCPU `index` is out of the guest again (and busy with the exit until
    /// its next [`VmControl::next`]); wakes a waiting quiescer.
    pub fn left_guest(&self, index: usize) {
        let mut st = self.lock();
        if let Some(flag) = st.in_guest.get_mut(index) {
            *flag = false;
        }
        if let Some(flag) = st.busy.get_mut(index) {
            *flag = true;
        }
        let waited_on = st.hold > 0 || st.stop.is_some() || st.paused;
        drop(st);
        if waited_on {
            self.changed.notify_all();
        }
    }

    /// vCPU `index`'s thread ended (however): neither in the guest nor busy
    /// from now on, so no quiesce or pause waits for it.
    pub fn thread_ended(&self, index: usize) {
        let mut st = self.lock();
        if let Some(flag) = st.in_guest.get_mut(index) {
            *flag = false;
        }
        if let Some(flag) = st.busy.get_mut(index) {
            *flag = false;
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Pauses the VM for the operator: every vCPU thread out of the guest
    /// and parked in [`VmControl::next`], none handling an exit or a start,
    /// and none enters the guest or applies a start request until
    /// [`VmControl::unpause`]. Power states are left as they are: a
    /// suspended vCPU kicked out of `KVM_RUN` stays suspended (its MP state is
    /// not touched), a powered-off one stays parked, a queued start stays
    /// queued (its engine state stays ON_PENDING).
    ///
    /// Built on the same kick and wait as [`VmControl::quiesce`], with the
    /// same bound: if a thread does not come back within the quiesce limit
    /// (kicked again every 100 ms), the pause is undone, the VM runs on and
    /// the error names the vCPU. A vCPU in the middle of a system call
    /// finishes it first (it quiesces the others, which are already held);
    /// if that stops the VM, the pause fails with [`PauseError::Stopping`].
    pub fn pause(&self) -> Result<(), PauseError> {
        let started = Instant::now();
        let mut st = self.lock();
        if st.stop.is_some() {
            return Err(PauseError::Stopping);
        }
        if st.paused {
            return Err(PauseError::AlreadyPaused);
        }
        st.paused = true;
        let waited = self.kick_and_wait(st, started, None, |st| {
            if st.stop.is_some() {
                return Err(());
            }
            Ok(st
                .in_guest
                .iter()
                .zip(st.busy.iter())
                .position(|(&inside, &busy)| inside || busy))
        });
        let (mut st, error) = match waited {
            Waited::Done => return Ok(()),
            Waited::GaveUp(st, ()) => (st, PauseError::Stopping),
            Waited::TimedOut {
                guard,
                vcpu,
                waited,
                ..
            } => {
                let in_guest = guard.in_guest.get(vcpu).copied().unwrap_or(false);
                let error = PauseError::Stuck {
                    vcpu,
                    in_guest,
                    waited,
                };
                (guard, error)
            }
        };
        st.paused = false;
        drop(st);
        self.wake_all_vcpus();
        self.changed.notify_all();
        Err(error)
    }

    /// Ends a [`VmControl::pause`]: the vCPU threads carry on where they
    /// were held (a suspended vCPU goes back to waiting for its wake-up).
    pub fn unpause(&self) -> Result<(), NotPaused> {
        let mut st = self.lock();
        if !st.paused {
            return Err(NotPaused);
        }
        st.paused = false;
        drop(st);
        // Parked vCPU threads wait on their own condition variables.
        self.wake_all_vcpus();
        self.changed.notify_all();
        Ok(())
    }

    /// Whether the operator paused the VM.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Whether the VM is stopping (a stop reason is set).
    pub fn is_stopping(&self) -> bool {
        self.lock().stop.is_some()
    }

    /// Holds every vCPU but `caller` out of the guest; returns when none is in.
    ///
    /// Bounded: if a vCPU is still in the guest after the quiesce limit (kicked again every
    /// 100 ms), the hold is undone, the VM is stopped with [`StopReason::VcpuFailed`] naming
    /// that vCPU, and its index comes back as the error.
    pub fn quiesce(&self, caller: usize) -> Result<(), usize> {
        let started = Instant::now();
        let mut st = self.lock();
        st.hold += 1;
        let waited = self.kick_and_wait(st, started, Some(caller), |st| {
            Ok::<_, std::convert::Infallible>(
                st.in_guest
                    .iter()
                    .enumerate()
                    .position(|(i, &inside)| inside && i != caller),
            )
        });
        match waited {
            Waited::Done => Ok(()),
            Waited::GaveUp(_, never) => match never {},
            Waited::TimedOut {
                mut guard,
                vcpu,
                waited,
                kicks,
            } => {
                guard.hold = guard.hold.saturating_sub(1);
                drop(guard);
                self.stop(StopReason::VcpuFailed {
                    vcpu,
                    reason: format!(
                        "it did not leave the guest within {:.1} s of being kicked \
                         ({kicks} kicks) while vCPU {caller} held the VM for a system call",
                        waited.as_secs_f64()
                    ),
                });
                Err(vcpu)
            }
        }
    }

    /// The wait shared by [`VmControl::quiesce`] and [`VmControl::pause`]:
    /// kicks every vCPU in the guest (but `except`), then waits until
    /// `blocking` names no vCPU (`Ok(None)`), gives up (`Err`), or the
    /// quiesce limit since `started` has passed. Woken each time a vCPU
    /// leaves; the others were kicked already and are on their way out.
    /// Kicking them again at every wake-up would cost one signal per vCPU
    /// still inside per vCPU that left (about n^2/2: some 2000 signals for
    /// 64 vCPUs), so only a kick that has had `rekick_every` to work is
    /// repeated.
    fn kick_and_wait<'a, E>(
        &self,
        mut st: MutexGuard<'a, ControlState>,
        started: Instant,
        except: Option<usize>,
        blocking: impl Fn(&ControlState) -> Result<Option<usize>, E>,
    ) -> Waited<'a, E> {
        self.kick_in_guest(&st, except);
        let mut kicks = 1u32;
        let mut kicked_at = Instant::now();
        loop {
            let vcpu = match blocking(&st) {
                Err(reason) => return Waited::GaveUp(st, reason),
                Ok(None) => return Waited::Done,
                Ok(Some(vcpu)) => vcpu,
            };
            let waited = started.elapsed();
            if waited >= self.quiesce_limit {
                return Waited::TimedOut {
                    guard: st,
                    vcpu,
                    waited,
                    kicks,
                };
            }
            let since_kick = kicked_at.elapsed();
            if since_kick >= self.rekick_every {
                self.kick_in_guest(&st, except);
                kicks += 1;
                kicked_at = Instant::now();
                continue;
            }
            let nap = (self.rekick_every - since_kick).min(self.quiesce_limit - waited);
            st = self
                .changed
                .wait_timeout(st, nap)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Undoes one [`VmControl::quiesce`].
    pub fn resume(&self) {
        let mut st = self.lock();
        st.hold = st.hold.saturating_sub(1);
        drop(st);
        self.wake_all_vcpus();
        self.changed.notify_all();
    }

    /// From now on no vCPU thread applies a start request: a CPU_ON the
    /// engine committed leaves its target ON_PENDING with the request queued
    /// and the thread parked (as if paused, for starts only). A debugging and
    /// test aid (`vpsci run --hold-starts`): it lets a snapshot catch a start
    /// that was committed but not yet run, which otherwise lasts microseconds.
    pub fn hold_starts(&self) {
        self.lock().starts_held = true;
    }

    /// Queues a start of `vcpu` at `entry` for its thread.
    pub fn request_start(&self, vcpu: usize, entry: EntryPoint) {
        let mut st = self.lock();
        if let Some(slot) = st.start.get_mut(vcpu) {
            *slot = Some(entry);
        }
        drop(st);
        if let Some(wake) = self.wake.get(vcpu) {
            wake.notify_all();
        }
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
        self.wake_all_vcpus();
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

    /// Whether a start request for `vcpu` is queued and not yet taken by its
    /// thread (diagnostics).
    pub fn start_pending(&self, vcpu: usize) -> bool {
        self.lock()
            .start
            .get(vcpu)
            .is_some_and(|entry| entry.is_some())
    }

    /// Whether `vcpu` is inside `KVM_RUN` right now (diagnostics).
    pub fn in_guest(&self, vcpu: usize) -> bool {
        self.lock().in_guest.get(vcpu).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
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
                        assert_eq!(control.quiesce(i), Ok(()));
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
        assert_eq!(control.quiesce(0), Ok(()));
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

    /// A kick that never lands: the vCPU stays "in guest" however often it is kicked.
    struct DeafKick;

    impl Kick for DeafKick {
        fn kick(&self) {}
    }

    #[test]
    fn a_vcpu_that_never_leaves_the_guest_fails_the_quiesce_in_bounded_time_by_name() {
        let control = Arc::new(
            VmControl::new(vec![
                Box::new(DeafKick),
                Box::new(DeafKick),
                Box::new(DeafKick),
            ])
            .with_quiesce_limit(Duration::from_millis(300)),
        );
        // vCPU 2 enters the guest and never comes back.
        assert_eq!(control.next(2, true), Next::RunGuest);
        let started = Instant::now();
        assert_eq!(control.quiesce(0), Err(2));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300),
            "gave up early: {took:?}"
        );
        match control.wait_stopped(None) {
            StopReason::VcpuFailed { vcpu, reason } => {
                assert_eq!(vcpu, 2);
                assert!(reason.contains("did not leave the guest"), "{reason}");
                assert!(reason.contains("vCPU 0 held the VM"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The hold was undone and the VM is stopping: nobody waits on it forever.
        assert_eq!(control.next(1, true), Next::Stop);
    }

    #[test]
    fn each_parked_vcpu_wakes_for_its_own_start_the_end_of_a_hold_and_the_stop() {
        const CPUS: usize = 32;
        const ROUNDS: u64 = 20;
        let (control, _cpus) = vm(CPUS);
        let (tx, rx) = mpsc::channel();
        let threads: Vec<_> = (1..CPUS)
            .map(|i| {
                let (control, tx) = (Arc::clone(&control), tx.clone());
                thread::spawn(move || {
                    // Off: only a start request moves it; then held out of
                    // the guest until the hold ends; then off again, until the stop.
                    loop {
                        match control.next(i, false) {
                            Next::Start(entry) => {
                                let _ = tx.send((i, entry.context_id));
                                if control.next(i, true) == Next::RunGuest {
                                    control.left_guest(i);
                                    let _ = tx.send((i, u64::MAX));
                                }
                            }
                            Next::RunGuest => unreachable!("an off vCPU entered the guest"),
                            Next::Stop => return,
                        }
                    }
                })
            })
            .collect();
        for round in 0..ROUNDS {
            // Hold the VM, start every vCPU (in a scrambled order), release.
            assert_eq!(control.quiesce(0), Ok(()));
            for k in 0..CPUS - 1 {
                let i = 1 + (k * 7 + round as usize) % (CPUS - 1);
                control.request_start(
                    i,
                    EntryPoint {
                        pc: 0x4008_0000,
                        context_id: round * 1000 + i as u64,
                        aarch32: false,
                    },
                );
            }
            let mut started = [0u32; CPUS];
            for _ in 1..CPUS {
                let (i, context) = rx.recv_timeout(Duration::from_secs(10)).expect("a start");
                assert_eq!(
                    context,
                    round * 1000 + i as u64,
                    "vCPU {i} got another's start"
                );
                started[i] += 1;
            }
            assert_eq!(&started[1..], &[1; CPUS - 1][..], "starts per vCPU");
            control.resume();
            let mut ran = [0u32; CPUS];
            for _ in 1..CPUS {
                let (i, marker) = rx.recv_timeout(Duration::from_secs(10)).expect("an entry");
                assert_eq!(marker, u64::MAX);
                ran[i] += 1;
            }
            assert_eq!(
                &ran[1..],
                &[1; CPUS - 1][..],
                "entries per vCPU after the hold"
            );
        }
        control.stop(StopReason::Timeout {
            after: Duration::ZERO,
        });
        for t in threads {
            assert!(t.join().is_ok());
        }
    }

    #[test]
    fn a_quiesce_kicks_each_vcpu_once_while_the_others_leave_one_by_one() {
        /// Counts its kicks and reports each on a channel.
        struct CountingKick(AtomicUsize, Mutex<mpsc::Sender<()>>);
        impl Kick for CountingKick {
            fn kick(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
                let _ = self.1.lock().map(|tx| tx.send(()));
            }
        }
        const CPUS: usize = 16;
        let (tx, rx) = mpsc::channel();
        let kicks: Vec<Arc<CountingKick>> = (0..CPUS)
            .map(|_| Arc::new(CountingKick(AtomicUsize::new(0), Mutex::new(tx.clone()))))
            .collect();
        struct Shared(Arc<CountingKick>);
        impl Kick for Shared {
            fn kick(&self) {
                self.0.kick();
            }
        }
        let control = Arc::new(
            VmControl::new(
                kicks
                    .iter()
                    .map(|k| Box::new(Shared(Arc::clone(k))) as Box<dyn Kick>)
                    .collect(),
            )
            // No kick is repeated for lack of time: only wake-ups could repeat one.
            .with_rekick_every(Duration::from_secs(3600)),
        );
        for i in 0..CPUS {
            assert_eq!(control.next(i, true), Next::RunGuest);
        }
        control.left_guest(0);
        let quiescer = {
            let control = Arc::clone(&control);
            thread::spawn(move || control.quiesce(0))
        };
        for _ in 1..CPUS {
            assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        }
        // Leave one at a time, each a wake-up of the quiescer.
        for i in 1..CPUS {
            thread::sleep(Duration::from_millis(2));
            control.left_guest(i);
        }
        assert_eq!(quiescer.join().ok(), Some(Ok(())));
        let counts: Vec<usize> = kicks.iter().map(|k| k.0.load(Ordering::SeqCst)).collect();
        let mut expected = vec![1; CPUS];
        expected[0] = 0;
        assert_eq!(counts, expected, "kicks per vCPU");
        control.resume();
    }

    #[test]
    fn a_kick_lost_once_is_repeated_until_the_vcpu_leaves() {
        /// Ignores the first kick, honours the later ones.
        struct LateKick(Arc<FakeCpu>, AtomicUsize);
        impl Kick for LateKick {
            fn kick(&self) {
                if self.1.fetch_add(1, Ordering::SeqCst) > 0 {
                    self.0.kicked.store(true, Ordering::SeqCst);
                }
            }
        }
        let cpu = Arc::new(FakeCpu::default());
        let control = Arc::new(VmControl::new(vec![
            Box::new(DeafKick),
            Box::new(LateKick(Arc::clone(&cpu), AtomicUsize::new(0))),
        ]));
        assert_eq!(control.next(1, true), Next::RunGuest);
        let guest = {
            let (control, cpu) = (Arc::clone(&control), Arc::clone(&cpu));
            thread::spawn(move || {
                run_guest(&cpu, usize::MAX);
                control.left_guest(1);
            })
        };
        assert_eq!(control.quiesce(0), Ok(()));
        assert!(guest.join().is_ok());
        control.resume();
    }

    /// Runs vCPU `i`'s fake thread until the VM stops: enter, "run" until kicked, then
    /// spend a moment "handling the exit" (busy) before asking again. Counts rounds in guest.
    fn spin_vcpu(control: &VmControl, cpu: &FakeCpu, i: usize, handling: &AtomicBool) -> usize {
        let mut entries = 0;
        loop {
            match control.next(i, true) {
                Next::RunGuest => {
                    entries += 1;
                    run_guest(cpu, 20_000);
                    control.left_guest(i);
                    handling.store(true, Ordering::SeqCst);
                    for _ in 0..2_000 {
                        std::hint::spin_loop();
                    }
                    handling.store(false, Ordering::SeqCst);
                }
                Next::Start(_) => {}
                Next::Stop => return entries,
            }
        }
    }

    #[test]
    fn a_pause_holds_every_vcpu_out_of_the_guest_and_idle_until_unpaused_counted_over_rounds() {
        const CPUS: usize = 4;
        const ROUNDS: usize = 200;
        let (control, cpus) = vm(CPUS);
        let handling: Arc<Vec<AtomicBool>> =
            Arc::new((0..CPUS).map(|_| AtomicBool::new(false)).collect());
        let threads: Vec<_> = (0..CPUS)
            .map(|i| {
                let (control, cpu, handling) = (
                    Arc::clone(&control),
                    Arc::clone(&cpus[i]),
                    Arc::clone(&handling),
                );
                thread::spawn(move || spin_vcpu(&control, &cpu, i, &handling[i]))
            })
            .collect();
        let mut violations = 0;
        for round in 0..ROUNDS {
            // Pause only once a vCPU is in the guest, so that every round has
            // one to kick out (on a loaded host the threads may otherwise
            // not get to run between an unpause and the next pause).
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cpus.iter().any(|c| c.inside.load(Ordering::SeqCst)) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: no vCPU entered the guest within 10 s of the unpause"
                );
                thread::yield_now();
            }
            assert_eq!(control.pause(), Ok(()));
            assert!(control.is_paused());
            // Sampled twice with a gap: a thread that slipped through would show up.
            for _ in 0..2 {
                for (cpu, busy) in cpus.iter().zip(handling.iter()) {
                    if cpu.inside.load(Ordering::SeqCst) || busy.load(Ordering::SeqCst) {
                        violations += 1;
                    }
                }
                thread::yield_now();
            }
            assert_eq!(control.unpause(), Ok(()));
        }
        control.stop(StopReason::Timeout {
            after: Duration::ZERO,
        });
        let entries: usize = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| panic!("vCPU thread panicked")))
            .sum();
        assert_eq!(violations, 0, "a vCPU ran or handled an exit while paused");
        // Each round's pause found a vCPU in the guest after the last unpause.
        assert!(entries >= ROUNDS, "{entries} entries in {ROUNDS} rounds");
    }

    #[test]
    fn pausing_twice_or_unpausing_a_running_vm_is_refused_and_changes_nothing() {
        let (control, _cpus) = vm(2);
        assert_eq!(control.unpause(), Err(NotPaused));
        assert!(!control.is_paused());
        assert_eq!(control.pause(), Ok(()));
        assert_eq!(control.pause(), Err(PauseError::AlreadyPaused));
        assert!(control.is_paused());
        assert_eq!(control.unpause(), Ok(()));
        assert_eq!(control.unpause(), Err(NotPaused));
        assert_eq!(control.next(0, true), Next::RunGuest);
    }

    #[test]
    fn a_start_request_queued_while_paused_waits_and_is_applied_once_after_unpause() {
        let (control, _cpus) = vm(2);
        assert_eq!(control.pause(), Ok(()));
        let entry = EntryPoint {
            pc: 0x4008_0000,
            context_id: 3,
            aarch32: false,
        };
        control.request_start(1, entry);
        let (tx, rx) = std::sync::mpsc::channel();
        let c = Arc::clone(&control);
        let t = thread::spawn(move || {
            let first = c.next(1, false);
            let _ = tx.send(first);
            c.next(1, true)
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "a start was applied while paused"
        );
        assert!(control.start_pending(1), "the queued start was lost");
        assert_eq!(control.unpause(), Ok(()));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Next::Start(entry))
        );
        assert_eq!(t.join().ok(), Some(Next::RunGuest));
        assert!(!control.start_pending(1));
    }

    #[test]
    fn a_pause_waits_for_a_vcpu_that_is_still_handling_an_exit() {
        let (control, _cpus) = vm(2);
        assert_eq!(control.next(1, true), Next::RunGuest);
        control.left_guest(1); // now busy with the exit
        let (tx, rx) = std::sync::mpsc::channel();
        let c = Arc::clone(&control);
        let pauser = thread::spawn(move || {
            let r = c.pause();
            let _ = tx.send(());
            r
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the pause returned while vCPU 1 was busy"
        );
        // vCPU 1 finishes its exit and asks what next: it parks, the pause completes.
        let c = Arc::clone(&control);
        let parked = thread::spawn(move || c.next(1, true));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(()));
        assert_eq!(pauser.join().ok(), Some(Ok(())));
        assert_eq!(control.unpause(), Ok(()));
        assert_eq!(parked.join().ok(), Some(Next::RunGuest));
    }

    #[test]
    fn a_held_start_stays_queued_while_the_vm_pauses_and_the_thread_ends_at_the_stop() {
        let (control, _) = vm(2);
        control.hold_starts();
        let (tx, rx) = mpsc::channel();
        let thread = {
            let control = Arc::clone(&control);
            thread::spawn(move || {
                let next = control.next(1, false);
                let _ = tx.send(next);
            })
        };
        control.request_start(
            1,
            EntryPoint {
                pc: 0x4008_0000,
                context_id: 7,
                aarch32: false,
            },
        );
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a held start was applied"
        );
        assert!(control.start_pending(1));
        // The parked thread does not keep a pause waiting.
        assert_eq!(control.pause(), Ok(()));
        assert_eq!(control.unpause(), Ok(()));
        assert!(control.start_pending(1), "the pause took the start");
        control.stop(StopReason::Timeout {
            after: Duration::ZERO,
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Next::Stop));
        let _ = thread.join();
        assert!(control.start_pending(1), "the start is still queued");
    }

    #[test]
    fn stopping_a_paused_vm_ends_its_threads_and_a_later_pause_is_refused() {
        let (control, _cpus) = vm(2);
        assert_eq!(control.pause(), Ok(()));
        let c = Arc::clone(&control);
        let parked = thread::spawn(move || c.next(0, true));
        control.stop(StopReason::Timeout {
            after: Duration::ZERO,
        });
        assert_eq!(parked.join().ok(), Some(Next::Stop));
        assert_eq!(control.unpause(), Ok(()));
        assert_eq!(control.pause(), Err(PauseError::Stopping));
        assert!(!control.is_paused());
    }

    #[test]
    fn a_vcpu_that_never_leaves_the_guest_fails_the_pause_by_name_and_the_vm_runs_on() {
        let control = Arc::new(
            VmControl::new(vec![Box::new(DeafKick), Box::new(DeafKick)])
                .with_quiesce_limit(Duration::from_millis(200)),
        );
        assert_eq!(control.next(1, true), Next::RunGuest);
        match control.pause() {
            Err(PauseError::Stuck {
                vcpu: 1,
                in_guest: true,
                waited,
            }) => assert!(waited >= Duration::from_millis(200)),
            other => panic!("{other:?}"),
        }
        assert!(!control.is_paused(), "the failed pause was not undone");
        assert!(!control.is_stopping(), "a failed pause stopped the VM");
        assert_eq!(control.next(0, true), Next::RunGuest);
    }

    #[test]
    fn an_ended_thread_is_not_waited_for() {
        let (control, _cpus) = vm(2);
        assert_eq!(control.next(1, true), Next::RunGuest);
        control.thread_ended(1);
        assert_eq!(control.pause(), Ok(()));
    }
}
