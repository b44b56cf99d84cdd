//! Model-checked concurrency properties of the power-state coordinator.
//!
//! Built only with `--cfg loom` (the engine's `sync` module then uses loom's primitives, so
//! every lock and atomic access in the engine is an interleaving point):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p vpsci-firmware --test loom_coordinator --release
//! ```
//!
//! The preemption bound defaults to 3 (override with `LOOM_MAX_PREEMPTIONS`). Each test
//! prints how many interleavings it explored. See docs/firmware-verification.md.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use vpsci_firmware::psci::affinity_info;
use vpsci_firmware::{
    CallOutcome, EntropyError, EntryPoint, Firmware, FirmwareConfig, FunctionId, GuestCall,
    MemoryRegion, Mpidr, OnPending, Platform, PowerState, PsciError, SuspendKind, SystemEvent,
    SystemVerdict, Transition, VcpuId,
};

/// Both CPU_ON answer modes, for the models whose answers depend on it.
const MODES: [OnPending; 2] = [OnPending::Hidden, OnPending::Reported];

const RAM: u64 = 0x4000_0000;

/// A [`Platform`] built from loom primitives: it records start requests and system events,
/// and wakes a waiting target thread when its start request arrives.
#[derive(Default)]
struct LoomPlatform {
    starts: Mutex<Vec<(VcpuId, EntryPoint)>>,
    start_posted: Condvar,
    events: Mutex<Vec<(VcpuId, SystemEvent)>>,
    /// Set (under `starts`) once a system event committed: the VMM stops the VM.
    stopped: Mutex<bool>,
    quiesce_depth: Mutex<i32>,
    /// The engine's transition reports. A std mutex on purpose: it is an observer, not part
    /// of the protocol, and never held across a loom interleaving point, so it adds no
    /// interleavings to explore.
    transitions: std::sync::Mutex<Vec<Transition>>,
}

impl LoomPlatform {
    fn started_reported(&self, vcpu: VcpuId) -> bool {
        self.transitions
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.vcpu == vcpu && t.from == PowerState::OnPending && t.to == PowerState::On)
    }

    fn starts(&self) -> Vec<(VcpuId, EntryPoint)> {
        self.starts.lock().unwrap().clone()
    }

    fn events(&self) -> Vec<(VcpuId, SystemEvent)> {
        self.events.lock().unwrap().clone()
    }

    /// Like [`LoomPlatform::wait_for_start`], but gives up (`None`) once a committed system
    /// event stopped the VM, as a VMM's vCPU thread then ends.
    fn wait_for_start_or_stop(&self, vcpu: VcpuId) -> Option<EntryPoint> {
        let mut starts = self.starts.lock().unwrap();
        loop {
            if let Some((_, entry)) = starts.iter().find(|(v, _)| *v == vcpu) {
                return Some(*entry);
            }
            if *self.stopped.lock().unwrap() {
                return None;
            }
            starts = self.start_posted.wait(starts).unwrap();
        }
    }

    /// Blocks until a start request for `vcpu` was posted (the target vCPU thread of a VMM).
    fn wait_for_start(&self, vcpu: VcpuId) -> EntryPoint {
        let mut starts = self.starts.lock().unwrap();
        loop {
            if let Some((_, entry)) = starts.iter().find(|(v, _)| *v == vcpu) {
                return *entry;
            }
            starts = self.start_posted.wait(starts).unwrap();
        }
    }
}

impl Platform for LoomPlatform {
    fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint) {
        self.starts.lock().unwrap().push((vcpu, entry));
        self.start_posted.notify_all();
    }

    fn quiesce(&self, _caller: VcpuId) -> Result<(), vpsci_firmware::QuiesceError> {
        *self.quiesce_depth.lock().unwrap() += 1;
        Ok(())
    }

    fn resume(&self, _caller: VcpuId) {
        *self.quiesce_depth.lock().unwrap() -= 1;
    }

    fn system_event(&self, caller: VcpuId, event: &SystemEvent) -> SystemVerdict {
        self.events.lock().unwrap().push((caller, *event));
        let _starts = self.starts.lock().unwrap();
        *self.stopped.lock().unwrap() = true;
        self.start_posted.notify_all();
        SystemVerdict::Commit
    }

    fn power_transition(&self, transition: &Transition) {
        self.transitions.lock().unwrap().push(*transition);
    }

    fn fill_random(&self, _buf: &mut [u8]) -> Result<(), EntropyError> {
        Err(EntropyError {
            reason: "no entropy under loom".to_owned(),
        })
    }

    fn now_ns(&self) -> u64 {
        0
    }
}

/// Runs `f` under loom with a default preemption bound of 3 and returns the number of
/// interleavings explored.
fn explore<F>(name: &str, f: F) -> usize
where
    F: Fn() + Sync + Send + 'static,
{
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    RUNS.store(0, StdOrdering::SeqCst);
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    let bound = builder.preemption_bound;
    builder.check(move || {
        RUNS.fetch_add(1, StdOrdering::SeqCst);
        f();
    });
    let runs = RUNS.load(StdOrdering::SeqCst);
    println!("{name}: {runs} interleavings explored (preemption bound {bound:?})");
    runs
}

fn firmware(cpus: u32) -> Firmware {
    firmware_in(OnPending::default(), cpus)
}

fn firmware_in(mode: OnPending, cpus: u32) -> Firmware {
    Firmware::new(
        FirmwareConfig {
            on_pending: mode,
            ..FirmwareConfig::default()
        },
        (0..cpus).map(Mpidr::from_index).collect(),
        vec![MemoryRegion {
            base: RAM,
            size: 0x10_0000,
        }],
    )
    .unwrap()
}

fn call(vcpu: u32, fid: FunctionId, x1: u64, x2: u64, x3: u64) -> GuestCall {
    GuestCall {
        vcpu: VcpuId::new(vcpu),
        conduit: vpsci_firmware::Conduit::Hvc,
        regs: [u64::from(fid.raw()), x1, x2, x3],
        caller_aarch32: false,
    }
}

fn x0(outcome: CallOutcome) -> u64 {
    match outcome {
        CallOutcome::Return { regs } => regs[0],
        other => panic!("expected a register return, got {other:?}"),
    }
}

fn cpu_on(fw: &Firmware, p: &LoomPlatform, caller: u32, target: u32) -> u64 {
    let mpidr = Mpidr::from_index(target).raw();
    x0(fw.handle_call(
        &call(caller, FunctionId::CpuOn64, mpidr, RAM, u64::from(caller)),
        p,
    ))
}

fn affinity(fw: &Firmware, p: &LoomPlatform, caller: u32, target: u32) -> u64 {
    let mpidr = Mpidr::from_index(target).raw();
    x0(fw.handle_call(&call(caller, FunctionId::AffinityInfo64, mpidr, 0, 0), p))
}

/// Brings `target` up from vCPU 0 before any thread is spawned.
fn bring_up(fw: &Firmware, p: &LoomPlatform, target: u32) {
    assert_eq!(cpu_on(fw, p, 0, target), 0);
    fw.vcpu_started(VcpuId::new(target), &*p);
}

fn err(e: PsciError) -> u64 {
    e.to_register()
}

/// Three callers race CPU_ON on one OFF target whose thread does not run until the race is
/// over (the next model runs it concurrently): exactly one SUCCESS and one start request
/// carrying the winner's context id; every loser is told ALREADY_ON by default and
/// ON_PENDING when that is reported (the target has not started, so nothing else is right).
#[test]
fn three_racing_cpu_on_calls_start_the_target_exactly_once() {
    for mode in MODES {
        three_racing_cpu_on_calls(mode);
    }
}

fn three_racing_cpu_on_calls(mode: OnPending) {
    let runs = explore(&format!("cpu_on x3 ({mode:?})"), move || {
        let fw = Arc::new(firmware_in(mode, 4));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        bring_up(&fw, &p, 2);
        let before = p.starts().len();
        let racers: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|caller| {
                let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
                thread::spawn(move || cpu_on(&fw, &p, caller, 3))
            })
            .collect();
        let mine = cpu_on(&fw, &p, 0, 3);
        let mut results = vec![mine];
        results.extend(racers.into_iter().map(|h| h.join().unwrap()));
        let wins = results.iter().filter(|&&r| r == 0).count();
        assert_eq!(wins, 1, "results {results:?}");
        let loser = match mode {
            OnPending::Hidden => err(PsciError::AlreadyOn),
            OnPending::Reported => err(PsciError::OnPending),
        };
        for &r in &results {
            assert!(r == 0 || r == loser, "unexpected {r:#x} in {results:?}");
        }
        let starts = p.starts();
        assert_eq!(starts.len() - before, 1, "start requests {starts:?}");
        let (target, entry) = starts[before];
        assert_eq!(target, VcpuId::new(3));
        // The context id is the winner's own.
        let winner = [0u64, 1, 2][results.iter().position(|&r| r == 0).unwrap()];
        assert_eq!(entry.context_id, winner);
        assert_eq!(fw.power_state(target), PowerState::OnPending);
        fw.vcpu_started(target, &*p);
        assert_eq!(fw.power_state(target), PowerState::On);
    });
    assert!(runs > 1);
}

/// Same race, but the target's thread runs concurrently and calls `vcpu_started` as soon as
/// its start request arrives. By default the loser is told ALREADY_ON whatever the timing;
/// when ON_PENDING is reported, the loser gets ALREADY_ON only if the target's start had
/// already committed (its ON_PENDING -> ON was reported before the answer) and ON_PENDING
/// otherwise.
#[test]
fn cpu_on_race_with_target_starting_concurrently_has_one_winner() {
    for mode in MODES {
        cpu_on_race_with_target_starting(mode);
    }
}

fn cpu_on_race_with_target_starting(mode: OnPending) {
    explore(&format!("cpu_on x2 + target start ({mode:?})"), move || {
        let fw = Arc::new(firmware_in(mode, 3));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        let before = p.starts().len();
        let target = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || {
                let entry = p.wait_for_start(VcpuId::new(2));
                fw.vcpu_started(VcpuId::new(2), &*p);
                entry
            })
        };
        // Each caller notes, right when its answer arrives, whether the target's start had
        // been reported yet.
        let answer = move |fw: &Firmware, p: &LoomPlatform, caller: u32| {
            let r = cpu_on(fw, p, caller, 2);
            (r, p.started_reported(VcpuId::new(2)))
        };
        let racer = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || answer(&fw, &p, 1))
        };
        let mine = answer(&fw, &p, 0);
        let theirs = racer.join().unwrap();
        let entry = target.join().unwrap();
        let mut results = [mine, theirs];
        results.sort_unstable();
        assert_eq!(results[0].0, 0, "{results:?}");
        let (lost, started_by_then) = results[1];
        match mode {
            OnPending::Hidden => assert_eq!(lost, err(PsciError::AlreadyOn), "{results:?}"),
            OnPending::Reported if started_by_then => {
                assert_eq!(lost, err(PsciError::AlreadyOn), "{results:?}")
            }
            OnPending::Reported => assert_eq!(lost, err(PsciError::OnPending), "{results:?}"),
        }
        let (mine, _) = mine;
        assert_eq!(p.starts().len() - before, 1);
        let winner = if mine == 0 { 0 } else { 1 };
        assert_eq!(entry.context_id, winner);
        assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::On);
    });
}

/// SYSTEM_SUSPEND by vCPU 0 against vCPU 1 doing CPU_ON(2) then CPU_OFF, with vCPU 2
/// starting and then doing CPU_OFF. The suspend may commit only when every other vCPU is
/// OFF, and no vCPU ever runs (ON) while vCPU 0 is in a committed system suspend.
#[test]
fn system_suspend_never_commits_while_another_cpu_is_on() {
    static COMMITTED: AtomicUsize = AtomicUsize::new(0);
    static DENIED: AtomicUsize = AtomicUsize::new(0);
    explore("system_suspend vs cpu_on", || {
        let fw = Arc::new(firmware(3));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        let before = p.starts().len();
        let suspended = |fw: &Firmware| {
            fw.power_state(VcpuId::new(0))
                == PowerState::Suspended {
                    kind: SuspendKind::System,
                }
        };
        let one = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || {
                let r = cpu_on(&fw, &p, 1, 2);
                assert_eq!(r, 0, "vCPU 2 was OFF and only vCPU 1 starts it");
                // vCPU 1 is still ON here: the system cannot be suspended.
                assert!(!suspended(&fw));
                let off = fw.handle_call(&call(1, FunctionId::CpuOff, 0, 0, 0), &*p);
                assert_eq!(off, CallOutcome::PowerOff);
            })
        };
        let two = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || {
                p.wait_for_start(VcpuId::new(2));
                fw.vcpu_started(VcpuId::new(2), &*p);
                assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::On);
                assert!(!suspended(&fw), "vCPU 2 runs during a system suspend");
                let off = fw.handle_call(&call(2, FunctionId::CpuOff, 0, 0, 0), &*p);
                assert_eq!(off, CallOutcome::PowerOff);
            })
        };
        let outcome = fw.handle_call(&call(0, FunctionId::SystemSuspend64, RAM, 7, 0), &*p);
        match outcome {
            CallOutcome::Suspend {
                kind: SuspendKind::System,
            } => {
                // Committed: both others were OFF at the decision, so both threads are past
                // their CPU_OFF commit and nobody can turn a CPU on again.
                assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
                assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::Off);
                COMMITTED.fetch_add(1, StdOrdering::SeqCst);
            }
            other => {
                assert_eq!(x0(other), err(PsciError::Denied));
                assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
                DENIED.fetch_add(1, StdOrdering::SeqCst);
            }
        }
        one.join().unwrap();
        two.join().unwrap();
        assert_eq!(p.starts().len() - before, 1);
        assert_eq!(
            *p.quiesce_depth.lock().unwrap(),
            0,
            "quiesce/resume balanced"
        );
    });
    let (c, d) = (
        COMMITTED.load(StdOrdering::SeqCst),
        DENIED.load(StdOrdering::SeqCst),
    );
    println!("system_suspend vs cpu_on: {c} interleavings committed, {d} denied");
    assert!(c > 0 && d > 0, "both outcomes must be reachable");
}

/// AFFINITY_INFO racing CPU_OFF of its target sees only ON or OFF, never ON_PENDING or an
/// error, and never ON after OFF; OFF is only seen once CPU_OFF committed.
#[test]
fn affinity_info_sees_only_on_or_off_while_the_target_powers_off() {
    explore("cpu_off vs affinity_info", || {
        let fw = Arc::new(firmware(3));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        bring_up(&fw, &p, 2);
        let off = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || fw.handle_call(&call(1, FunctionId::CpuOff, 0, 0, 0), &*p))
        };
        let observer = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            // Level 1 covers vCPUs 0..16 of the linear layout, so it stays ON (vCPU 0).
            thread::spawn(move || {
                let mpidr = Mpidr::from_index(1).raw();
                x0(fw.handle_call(&call(2, FunctionId::AffinityInfo64, mpidr, 1, 0), &*p))
            })
        };
        let first = affinity(&fw, &p, 0, 1);
        let second = affinity(&fw, &p, 0, 1);
        for r in [first, second] {
            assert!(
                r == affinity_info::ON || r == affinity_info::OFF,
                "AFFINITY_INFO returned {r:#x}"
            );
        }
        assert!(
            !(first == affinity_info::OFF && second == affinity_info::ON),
            "OFF then ON"
        );
        assert_eq!(observer.join().unwrap(), affinity_info::ON);
        assert_eq!(off.join().unwrap(), CallOutcome::PowerOff);
        assert_eq!(affinity(&fw, &p, 0, 1), affinity_info::OFF);
    });
}

/// SYSTEM_RESET by vCPU 0 against CPU_ON(2) by vCPU 1 and vCPU 2's thread applying its start
/// request. The VMM protocol modelled here is the one `vpsci` uses: once the reset event is
/// reported the VMM stops the VM (a vCPU thread still on its way into the engine gets its
/// answer, then ends), then calls `Firmware::reset`. Guarantees checked: the reset event is
/// reported exactly once; vCPU 1's CPU_ON is SUCCESS with one start request if the engine
/// decided it before the reset committed, INTERNAL_FAILURE with none after (nothing is
/// decided once a system event stopped the VM), and both orders happen; a start request
/// applied after the commit is dropped; after `reset` the boot CPU is ON and every other
/// vCPU OFF with no pending start, whatever the order.
#[test]
fn system_reset_leaves_boot_cpu_on_and_others_off_despite_racing_cpu_on() {
    static DECIDED_BEFORE: AtomicUsize = AtomicUsize::new(0);
    static REFUSED_AFTER: AtomicUsize = AtomicUsize::new(0);
    explore("system_reset vs cpu_on", || {
        let fw = Arc::new(firmware(3));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        let before = p.starts().len();
        let one = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || cpu_on(&fw, &p, 1, 2))
        };
        let two = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || {
                if p.wait_for_start_or_stop(VcpuId::new(2)).is_some() {
                    fw.vcpu_started(VcpuId::new(2), &*p);
                }
            })
        };
        let outcome = fw.handle_call(&call(0, FunctionId::SystemReset, 0, 0, 0), &*p);
        assert!(matches!(
            outcome,
            CallOutcome::SystemEvent {
                event: SystemEvent::Reset,
                ..
            }
        ));
        let answer = one.join().unwrap();
        let refused = PsciError::InternalFailure.to_register();
        assert!(
            answer == 0 || answer == refused,
            "CPU_ON answered {answer:#x}"
        );
        let counter = if answer == 0 {
            &DECIDED_BEFORE
        } else {
            &REFUSED_AFTER
        };
        counter.fetch_add(1, StdOrdering::SeqCst);
        assert_eq!(p.starts().len() - before, usize::from(answer == 0));
        two.join().unwrap();
        fw.reset();
        assert_eq!(fw.power_state(VcpuId::new(0)), PowerState::On);
        assert_eq!(fw.power_state(VcpuId::new(1)), PowerState::Off);
        assert_eq!(fw.pending_start(VcpuId::new(2)), None);
        // The start delivered before the reset did not bring vCPU 2 back.
        assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::Off);
        assert_eq!(p.events(), vec![(VcpuId::new(0), SystemEvent::Reset)]);
        assert_eq!(*p.quiesce_depth.lock().unwrap(), 0);
    });
    let (before, after) = (
        DECIDED_BEFORE.load(StdOrdering::SeqCst),
        REFUSED_AFTER.load(StdOrdering::SeqCst),
    );
    println!(
        "system_reset vs cpu_on: {before} decided before the commit, {after} refused after it"
    );
    assert!(before > 0 && after > 0);
}

/// Characterises the VMM's obligation behind the previous test: `Firmware::reset` does not
/// cancel a CPU_ON that is still inside the engine. If a VMM resets while vCPU 1's CPU_ON(2)
/// is in flight, some interleavings let the CPU_ON land after the reset (vCPU 2 ends
/// ON_PENDING with a start request issued after the reset), others not. A VMM must therefore
/// let every vCPU thread leave the engine (as `vpsci` does by joining them) before `reset`.
/// If the engine ever rejects such stale calls, this test fails and should be replaced by a
/// guarantee.
#[test]
fn reset_while_a_cpu_on_is_in_flight_can_let_it_land_after_the_reset() {
    static LANDED_AFTER: AtomicUsize = AtomicUsize::new(0);
    static CANCELLED: AtomicUsize = AtomicUsize::new(0);
    explore("reset vs in-flight cpu_on", || {
        let fw = Arc::new(firmware(3));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        let one = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || cpu_on(&fw, &p, 1, 2))
        };
        fw.reset();
        assert_eq!(one.join().unwrap(), 0);
        match fw.power_state(VcpuId::new(2)) {
            PowerState::OnPending => LANDED_AFTER.fetch_add(1, StdOrdering::SeqCst),
            PowerState::Off => CANCELLED.fetch_add(1, StdOrdering::SeqCst),
            other => panic!("vCPU 2 ended {other:?}"),
        };
    });
    let (after, cancelled) = (
        LANDED_AFTER.load(StdOrdering::SeqCst),
        CANCELLED.load(StdOrdering::SeqCst),
    );
    println!(
        "reset vs in-flight cpu_on: {after} landed after the reset, {cancelled} cleared by it"
    );
    assert!(after > 0 && cancelled > 0);
}

/// Two callers race CPU_ON on a target that is itself calling CPU_OFF: a CPU_ON that runs
/// before the off commits answers ALREADY_ON, one that runs after it starts the target again.
/// At most one SUCCESS, exactly one start request per SUCCESS, and the target ends OFF
/// exactly when nobody won (no lost or doubled OFF -> ON transition). ON_PENDING is seen
/// only when it is reported.
#[test]
fn cpu_on_racing_the_targets_own_cpu_off_never_loses_or_doubles_a_start() {
    for mode in MODES {
        cpu_on_racing_cpu_off(mode);
    }
}

fn cpu_on_racing_cpu_off(mode: OnPending) {
    explore(
        &format!("cpu_on x2 vs target cpu_off ({mode:?})"),
        move || {
            let fw = Arc::new(firmware_in(mode, 3));
            let p = Arc::new(LoomPlatform::default());
            bring_up(&fw, &p, 1);
            bring_up(&fw, &p, 2);
            let before = p.starts().len();
            let off = {
                let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
                thread::spawn(move || fw.handle_call(&call(2, FunctionId::CpuOff, 0, 0, 0), &*p))
            };
            let racer = {
                let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
                thread::spawn(move || cpu_on(&fw, &p, 1, 2))
            };
            let mine = cpu_on(&fw, &p, 0, 2);
            let theirs = racer.join().unwrap();
            assert_eq!(off.join().unwrap(), CallOutcome::PowerOff);
            let results = [mine, theirs];
            let wins = results.iter().filter(|&&r| r == 0).count();
            assert!(wins <= 1, "{results:?}");
            for r in results {
                let pending_ok = mode == OnPending::Reported && r == err(PsciError::OnPending);
                assert!(
                    r == 0 || r == err(PsciError::AlreadyOn) || pending_ok,
                    "{mode:?}: {results:?}"
                );
            }
            assert_eq!(p.starts().len() - before, wins);
            let expected = if wins == 1 {
                PowerState::OnPending
            } else {
                PowerState::Off
            };
            assert_eq!(fw.power_state(VcpuId::new(2)), expected);
        },
    );
}

/// By default a committed start is ON for every observer at once: an AFFINITY_INFO from
/// another vCPU racing the CPU_ON and the target's own start never answers ON_PENDING, and
/// answers ON whenever it was made after the winner's SUCCESS had returned.
#[test]
fn affinity_info_says_on_as_soon_as_cpu_on_returned_success_by_default() {
    explore("affinity_info after cpu_on success (Hidden)", || {
        let fw = Arc::new(firmware_in(OnPending::Hidden, 3));
        let p = Arc::new(LoomPlatform::default());
        bring_up(&fw, &p, 1);
        let succeeded = Arc::new(AtomicBool::new(false));
        let target = {
            let (fw, p) = (Arc::clone(&fw), Arc::clone(&p));
            thread::spawn(move || {
                p.wait_for_start(VcpuId::new(2));
                assert!(fw.vcpu_started(VcpuId::new(2), &*p));
            })
        };
        let observer = {
            let (fw, p, succeeded) = (Arc::clone(&fw), Arc::clone(&p), Arc::clone(&succeeded));
            thread::spawn(move || {
                let after_success = succeeded.load(Ordering::Acquire);
                let r = affinity(&fw, &p, 1, 2);
                assert_ne!(r, affinity_info::ON_PENDING);
                if after_success {
                    assert_eq!(r, affinity_info::ON, "ON must follow a returned SUCCESS");
                }
            })
        };
        assert_eq!(cpu_on(&fw, &p, 0, 2), 0);
        succeeded.store(true, Ordering::Release);
        assert_eq!(affinity(&fw, &p, 0, 2), affinity_info::ON);
        observer.join().unwrap();
        target.join().unwrap();
        assert_eq!(fw.power_state(VcpuId::new(2)), PowerState::On);
    });
}
