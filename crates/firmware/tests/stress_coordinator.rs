//! Stress test of the coordinator with real threads: 64 vCPU threads, many rounds of
//! CPU_ON storms, CPU_OFF waves, AFFINITY_INFO probes and SYSTEM_SUSPEND attempts, with
//! every outcome counted.
//!
//! Each vCPU has its own thread. An OFF vCPU's thread blocks on its start channel (the
//! platform's `start_vcpu` sends the entry point there) and calls `vcpu_started` when the
//! request arrives, like a VMM's vCPU loop. Per round:
//!
//! 1. *storm*: every ON vCPU calls CPU_ON on every OFF vCPU (each in its own order), then
//!    AFFINITY_INFO on it; the OFF vCPUs wait for their start request.
//! 2. check: exactly one SUCCESS and one start request per OFF -> ON transition, nobody got
//!    a second start request, everybody is ON.
//! 3. *off wave*: a pseudo-random subset of the secondaries (all of them every 8th round)
//!    calls CPU_OFF while the others probe them with AFFINITY_INFO (only ON or OFF may be
//!    seen) and vCPU 0 races a SYSTEM_SUSPEND (DENIED unless everyone else is already OFF).
//! 4. check: the chosen vCPUs are OFF; in an all-off round vCPU 0 suspends (retrying once
//!    the wave is over if its racing attempt was denied), is woken and resumes at its entry.
//!
//! Both CPU_ON answer modes run ([`OnPending`]): by default (hidden) no caller may ever see
//! ON_PENDING, from CPU_ON or AFFINITY_INFO; in the reported mode both answers are counted.
//! The engine's own transition reports ([`Platform::power_transition`]) are counted too and
//! must match the transitions the threads made.
//!
//! Runs in a few seconds; `cargo test -p vpsci-firmware --test stress_coordinator --
//! --nocapture` prints the counts. `VPSCI_STRESS_ROUNDS` overrides the number of rounds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vpsci_firmware::psci::affinity_info;
use vpsci_firmware::testing::{call, TEST_RAM};
use vpsci_firmware::{
    CallOutcome, EntropyError, EntryPoint, Firmware, FirmwareConfig, FunctionId, Mpidr, OnPending,
    Platform, PowerState, PsciError, SuspendKind, SystemEvent, SystemVerdict, Transition, VcpuId,
    WakeOutcome,
};

const VCPUS: u32 = 64;
const DEFAULT_ROUNDS: u32 = 200;
/// Every this many rounds, every secondary powers off and vCPU 0 system-suspends.
const ALL_OFF_EVERY: u32 = 8;
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Delivers start requests to the target's thread through a channel.
struct ChannelPlatform {
    start_tx: Vec<Sender<EntryPoint>>,
    starts: AtomicU64,
    /// OFF -> ON_PENDING reports.
    reported_pending: AtomicU64,
    /// ON_PENDING -> ON reports.
    reported_started: AtomicU64,
    /// ON -> OFF reports.
    reported_off: AtomicU64,
}

impl Platform for ChannelPlatform {
    fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint) {
        self.starts.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = self.start_tx.get(vcpu.index()) {
            // The receiving thread lives until the end of the test.
            tx.send(entry).unwrap();
        }
    }
    // Every vCPU thread is inside the engine or in test code, never "in guest".
    fn quiesce(&self, _caller: VcpuId) -> Result<(), vpsci_firmware::QuiesceError> {
        Ok(())
    }
    fn resume(&self, _caller: VcpuId) {}
    fn system_event(&self, caller: VcpuId, event: &SystemEvent) -> SystemVerdict {
        panic!("unexpected system event {event:?} from {caller:?}");
    }
    fn power_transition(&self, t: &Transition) {
        let counter = match (t.from, t.to) {
            (PowerState::Off, PowerState::OnPending) => &self.reported_pending,
            (PowerState::OnPending, PowerState::On) => &self.reported_started,
            (PowerState::On, PowerState::Off) => &self.reported_off,
            _ => return,
        };
        bump(counter);
    }
    fn fill_random(&self, _buf: &mut [u8]) -> Result<(), EntropyError> {
        Err(EntropyError {
            reason: "not used".to_owned(),
        })
    }
    fn now_ns(&self) -> u64 {
        0
    }
}

/// Outcome counters shared by all threads.
#[derive(Default)]
struct Counts {
    on_success: AtomicU64,
    on_already_on: AtomicU64,
    on_pending: AtomicU64,
    transitions: AtomicU64,
    affinity_on: AtomicU64,
    affinity_pending: AtomicU64,
    affinity_off: AtomicU64,
    offs: AtomicU64,
    suspend_denied: AtomicU64,
    suspend_committed_racing: AtomicU64,
    suspend_committed_after: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

/// splitmix64: a deterministic pseudo-random stream without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether secondary `v` powers off in `round`.
fn goes_off(round: u32, v: u32) -> bool {
    v != 0
        && (round % ALL_OFF_EVERY == ALL_OFF_EVERY - 1
            || mix(u64::from(round) << 8 | u64::from(v)) & 1 == 1)
}

fn x0(outcome: CallOutcome) -> u64 {
    match outcome {
        CallOutcome::Return { regs } => regs[0],
        other => panic!("expected a register return, got {other:?}"),
    }
}

fn mpidr(v: u32) -> u64 {
    Mpidr::from_index(v).raw()
}

struct Shared {
    mode: OnPending,
    fw: Firmware,
    platform: ChannelPlatform,
    counts: Counts,
    barrier: Barrier,
    rounds: u32,
}

/// The off vCPUs at the start of `round`, as every thread computes them.
fn off_at_start(round: u32) -> Vec<u32> {
    if round == 0 {
        (1..VCPUS).collect()
    } else {
        (1..VCPUS).filter(|&v| goes_off(round - 1, v)).collect()
    }
}

fn storm(s: &Shared, me: u32, round: u32, targets: &[u32]) {
    let n = targets.len();
    if n == 0 {
        return;
    }
    let skew = mix(u64::from(round) << 8 | u64::from(me)) as usize % n;
    for i in 0..n {
        let t = targets[(i + skew) % n];
        let r = x0(s.fw.handle_call(
            &call(
                me,
                [
                    u64::from(FunctionId::CpuOn64.raw()),
                    mpidr(t),
                    TEST_RAM.base,
                    u64::from(me),
                ],
            ),
            &s.platform,
        ));
        match r {
            0 => bump(&s.counts.on_success),
            r if r == PsciError::AlreadyOn.to_register() => bump(&s.counts.on_already_on),
            r if r == PsciError::OnPending.to_register() => {
                assert_eq!(
                    s.mode,
                    OnPending::Reported,
                    "round {round}: CPU_ON({t}) by {me} answered ON_PENDING in the default mode"
                );
                bump(&s.counts.on_pending);
            }
            r => panic!("round {round}: CPU_ON({t}) by {me} returned {r:#x}"),
        }
        // Our own CPU_ON has returned, so the target has left OFF for this round.
        let a = x0(s.fw.handle_call(
            &call(
                me,
                [u64::from(FunctionId::AffinityInfo64.raw()), mpidr(t), 0, 0],
            ),
            &s.platform,
        ));
        match a {
            affinity_info::ON => bump(&s.counts.affinity_on),
            affinity_info::ON_PENDING if s.mode == OnPending::Reported => {
                bump(&s.counts.affinity_pending)
            }
            a => panic!(
                "round {round}: AFFINITY_INFO({t}) after CPU_ON returned {a:#x} ({:?})",
                s.mode
            ),
        }
    }
}

fn off_wave(s: &Shared, me: u32, round: u32, on: &mut bool) {
    if goes_off(round, me) {
        let outcome = s.fw.handle_call(
            &call(me, [u64::from(FunctionId::CpuOff.raw()), 0, 0, 0]),
            &s.platform,
        );
        assert_eq!(
            outcome,
            CallOutcome::PowerOff,
            "round {round}: CPU_OFF by {me}"
        );
        bump(&s.counts.offs);
        *on = false;
        return;
    }
    if me == 0 {
        let outcome = s.fw.handle_call(
            &call(
                0,
                [
                    u64::from(FunctionId::SystemSuspend64.raw()),
                    TEST_RAM.base,
                    u64::from(round),
                    0,
                ],
            ),
            &s.platform,
        );
        match outcome {
            CallOutcome::Suspend {
                kind: SuspendKind::System,
            } => {
                assert_eq!(
                    round % ALL_OFF_EVERY,
                    ALL_OFF_EVERY - 1,
                    "round {round}: suspend committed with CPUs left on"
                );
                bump(&s.counts.suspend_committed_racing);
                wake_boot_cpu(s, round);
            }
            other => {
                assert_eq!(x0(other), PsciError::Denied.to_register(), "round {round}");
                bump(&s.counts.suspend_denied);
            }
        }
        return;
    }
    // Probe a few vCPUs that may be powering off: only ON or OFF can be seen.
    for k in 0..4u64 {
        let t = (mix(u64::from(round) << 16 | u64::from(me) << 4 | k) % u64::from(VCPUS)) as u32;
        let a = x0(s.fw.handle_call(
            &call(
                me,
                [u64::from(FunctionId::AffinityInfo64.raw()), mpidr(t), 0, 0],
            ),
            &s.platform,
        ));
        match a {
            affinity_info::ON => bump(&s.counts.affinity_on),
            affinity_info::OFF => bump(&s.counts.affinity_off),
            a => panic!("round {round}: AFFINITY_INFO({t}) during the off wave returned {a:#x}"),
        }
    }
}

/// vCPU 0 is in a committed system suspend: every other vCPU must be OFF; wake it.
fn wake_boot_cpu(s: &Shared, round: u32) {
    for v in 1..VCPUS {
        assert_eq!(
            s.fw.power_state(VcpuId::new(v)),
            PowerState::Off,
            "round {round}: vCPU {v}"
        );
    }
    match s.fw.vcpu_woken(VcpuId::new(0), &s.platform) {
        WakeOutcome::ResumeAt { entry } => {
            assert_eq!(entry.pc, TEST_RAM.base);
            assert_eq!(entry.context_id, u64::from(round));
        }
        other => panic!("round {round}: system suspend woke with {other:?}"),
    }
}

fn vcpu_thread(s: &Shared, me: u32, rx: &Receiver<EntryPoint>) {
    let mut on = me == 0;
    for round in 0..s.rounds {
        s.barrier.wait();
        let targets = off_at_start(round);
        if on {
            storm(s, me, round, &targets);
        } else {
            match rx.recv_timeout(START_TIMEOUT) {
                Ok(entry) => {
                    assert_eq!(entry.pc, TEST_RAM.base);
                    assert_ne!(entry.context_id, u64::from(me), "started by itself");
                    assert!(
                        s.fw.vcpu_started(VcpuId::new(me), &s.platform),
                        "round {round}: vCPU {me} was not ON_PENDING when its start arrived"
                    );
                    bump(&s.counts.transitions);
                    on = true;
                }
                Err(RecvTimeoutError::Timeout) => panic!("round {round}: vCPU {me} never started"),
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the platform outlives the threads")
                }
            }
        }
        s.barrier.wait();
        // Every OFF -> ON transition got exactly one start request.
        assert_eq!(
            rx.try_recv(),
            Err(TryRecvError::Empty),
            "round {round}: vCPU {me} got a second start"
        );
        assert_eq!(
            s.fw.power_state(VcpuId::new(me)),
            PowerState::On,
            "round {round}: vCPU {me}"
        );
        s.barrier.wait();
        // Only vCPU 0 bumps this counter, so comparing it around the wave tells
        // vCPU 0 whether its racing attempt committed (it is ON again either way:
        // a committed suspend is woken at once).
        let committed_before = get(&s.counts.suspend_committed_racing);
        off_wave(s, me, round, &mut on);
        let racing_committed = get(&s.counts.suspend_committed_racing) != committed_before;
        s.barrier.wait();
        if me == 0 && round % ALL_OFF_EVERY == ALL_OFF_EVERY - 1 && !racing_committed {
            // The racing attempt was denied; with everyone OFF now, it must commit.
            let outcome = s.fw.handle_call(
                &call(
                    0,
                    [
                        u64::from(FunctionId::SystemSuspend64.raw()),
                        TEST_RAM.base,
                        u64::from(round),
                        0,
                    ],
                ),
                &s.platform,
            );
            assert_eq!(
                outcome,
                CallOutcome::Suspend {
                    kind: SuspendKind::System
                },
                "round {round}"
            );
            bump(&s.counts.suspend_committed_after);
            wake_boot_cpu(s, round);
        }
        if !on {
            assert_eq!(
                s.fw.power_state(VcpuId::new(me)),
                PowerState::Off,
                "round {round}: vCPU {me}"
            );
        }
    }
}

#[test]
fn sixty_four_vcpus_survive_storms_with_exact_counts_and_never_see_on_pending_by_default() {
    stress(OnPending::Hidden);
}

#[test]
fn sixty_four_vcpus_survive_storms_with_exact_counts_when_on_pending_is_reported() {
    stress(OnPending::Reported);
}

fn stress(mode: OnPending) {
    let rounds = std::env::var("VPSCI_STRESS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..VCPUS).map(|_| mpsc::channel()).unzip();
    let fw = Firmware::new(
        FirmwareConfig {
            on_pending: mode,
            ..FirmwareConfig::default()
        },
        (0..VCPUS).map(Mpidr::from_index).collect(),
        vec![TEST_RAM],
    )
    .unwrap();
    let shared = Arc::new(Shared {
        mode,
        fw,
        platform: ChannelPlatform {
            start_tx: txs,
            starts: AtomicU64::new(0),
            reported_pending: AtomicU64::new(0),
            reported_started: AtomicU64::new(0),
            reported_off: AtomicU64::new(0),
        },
        counts: Counts::default(),
        barrier: Barrier::new(VCPUS as usize),
        rounds,
    });
    let started = Instant::now();
    let threads: Vec<_> = rxs
        .into_iter()
        .zip(0..)
        .map(|(rx, me)| {
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("vcpu{me}"))
                .spawn(move || vcpu_thread(&s, me, &rx))
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();

    let c = &shared.counts;
    let expected_transitions: u64 = (0..rounds).map(|r| off_at_start(r).len() as u64).sum();
    let expected_offs: u64 = (0..rounds)
        .map(|r| (1..VCPUS).filter(|&v| goes_off(r, v)).count() as u64)
        .sum();
    let all_off_rounds = u64::from(rounds / ALL_OFF_EVERY);
    println!(
        "{mode:?}: {VCPUS} vCPUs, {rounds} rounds in {:.2} s: {} OFF->ON transitions, CPU_ON: {} SUCCESS, \
         {} ALREADY_ON, {} ON_PENDING; {} start requests; AFFINITY_INFO: {} ON, {} ON_PENDING, \
         {} OFF; {} CPU_OFF; SYSTEM_SUSPEND: {} DENIED, {} committed while racing, {} committed \
         after the wave",
        elapsed.as_secs_f64(),
        get(&c.transitions),
        get(&c.on_success),
        get(&c.on_already_on),
        get(&c.on_pending),
        get(&shared.platform.starts),
        get(&c.affinity_on),
        get(&c.affinity_pending),
        get(&c.affinity_off),
        get(&c.offs),
        get(&c.suspend_denied),
        get(&c.suspend_committed_racing),
        get(&c.suspend_committed_after),
    );
    assert_eq!(get(&c.transitions), expected_transitions);
    assert_eq!(
        get(&c.on_success),
        expected_transitions,
        "one SUCCESS per transition"
    );
    assert_eq!(
        get(&shared.platform.starts),
        expected_transitions,
        "one start per transition"
    );
    assert_eq!(get(&c.offs), expected_offs);
    let p = &shared.platform;
    assert_eq!(
        (
            get(&p.reported_pending),
            get(&p.reported_started),
            get(&p.reported_off)
        ),
        (expected_transitions, expected_transitions, expected_offs),
        "the engine reports every OFF -> ON_PENDING, ON_PENDING -> ON and ON -> OFF it commits"
    );
    if mode == OnPending::Hidden {
        assert_eq!(
            (get(&c.on_pending), get(&c.affinity_pending)),
            (0, 0),
            "no ON_PENDING answers by default"
        );
    }
    assert_eq!(
        get(&c.suspend_committed_racing) + get(&c.suspend_committed_after),
        all_off_rounds,
        "one committed system suspend per all-off round"
    );
    assert_eq!(
        get(&c.suspend_denied) + get(&c.suspend_committed_racing),
        u64::from(rounds),
        "vCPU 0 tried once per round while racing"
    );
}
