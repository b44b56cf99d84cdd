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
