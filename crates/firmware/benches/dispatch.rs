//! Dispatch cost of the firmware engine.
//!
//! `cargo bench -p vpsci-firmware --bench dispatch -- --measurement-time 3 --warm-up-time 1`
//!
//! Baselines measured in the same run, to report ratios against:
//! * `baseline/dyn_platform_const`: one call through `&dyn Platform` returning a constant
//!   (the indirection every engine call pays at least once).
//! * `baseline/function_id_decode`: decoding x0 into a `FunctionId` alone.
//!
//! Engine calls: PSCI_VERSION, PSCI_FEATURES(CPU_ON), AFFINITY_INFO (levels 0 and 1),
//! SMCCC_VERSION, one CPU_ON + `vcpu_started` + CPU_OFF cycle, and a round of 256 threads
//! racing CPU_ON on one target (time per round, including releasing and collecting the
//! threads), next to `race/barrier_only_256_threads_round`, the same round with no engine
//! call (the cost of waking and collecting 256 threads).

// criterion_group!/criterion_main! generate public functions without doc comments.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vpsci_firmware::testing::{call, TEST_RAM};
use vpsci_firmware::{
    CallOutcome, EntropyError, EntryPoint, Firmware, FirmwareConfig, FunctionId, Mpidr, Platform,
    SystemEvent, SystemVerdict, Transition, VcpuId,
};

/// A platform that only counts start requests (the fake's `Vec` would grow without bound).
#[derive(Default)]
struct CountingPlatform {
    starts: AtomicU64,
}

impl Platform for CountingPlatform {
    fn start_vcpu(&self, _vcpu: VcpuId, _entry: EntryPoint) {
        self.starts.fetch_add(1, Ordering::Relaxed);
    }
    fn quiesce(&self, _caller: VcpuId) -> Result<(), vpsci_firmware::QuiesceError> {
        Ok(())
    }
    fn resume(&self, _caller: VcpuId) {}
    fn system_event(&self, _caller: VcpuId, _event: &SystemEvent) -> SystemVerdict {
        SystemVerdict::Commit
    }
    fn power_transition(&self, _transition: &Transition) {}
    fn fill_random(&self, _buf: &mut [u8]) -> Result<(), EntropyError> {
        Ok(())
    }
    fn now_ns(&self) -> u64 {
        42
    }
}

fn firmware(cpus: u32) -> Firmware {
    Firmware::new(
        FirmwareConfig::default(),
        (0..cpus).map(Mpidr::from_index).collect(),
        vec![TEST_RAM],
    )
    .unwrap()
}

fn regs(fid: FunctionId, x1: u64, x2: u64, x3: u64) -> [u64; 4] {
    [u64::from(fid.raw()), x1, x2, x3]
}

fn x0(outcome: CallOutcome) -> u64 {
    match outcome {
        CallOutcome::Return { regs } => regs[0],
        other => panic!("expected a register return, got {other:?}"),
    }
}

fn baselines(c: &mut Criterion) {
    let platform = CountingPlatform::default();
    let dyn_platform: &dyn Platform = &platform;
    c.bench_function("baseline/dyn_platform_const", |b| {
        b.iter(|| black_box(black_box(dyn_platform).now_ns()))
    });
    let x0 = u64::from(FunctionId::AffinityInfo64.raw());
    c.bench_function("baseline/function_id_decode", |b| {
        b.iter(|| black_box(FunctionId::try_from(black_box(x0) as u32).ok()))
    });
}

fn queries(c: &mut Criterion) {
    let fw = firmware(8);
    let p = CountingPlatform::default();
    let cases = [
        ("query/psci_version", regs(FunctionId::PsciVersion, 0, 0, 0)),
        (
            "query/psci_features_cpu_on",
            regs(
                FunctionId::PsciFeatures,
                u64::from(FunctionId::CpuOn64.raw()),
                0,
                0,
            ),
        ),
        (
            "query/affinity_info_level0",
            regs(FunctionId::AffinityInfo64, Mpidr::from_index(1).raw(), 0, 0),
        ),
        (
            "query/affinity_info_level1",
            regs(FunctionId::AffinityInfo64, Mpidr::from_index(1).raw(), 1, 0),
        ),
        (
            "query/smccc_version",
            regs(FunctionId::SmcccVersion, 0, 0, 0),
        ),
    ];
    for (name, r) in cases {
        let guest_call = call(0, r);
        // Not an error answer: the benchmark measures the real path.
        assert!((x0(fw.handle_call(&guest_call, &p)) as i64) >= 0, "{name}");
        c.bench_function(name, |b| {
            b.iter(|| black_box(fw.handle_call(black_box(&guest_call), &p)))
        });
    }
}

fn on_off_cycle(c: &mut Criterion) {
    let fw = firmware(2);
    let p = CountingPlatform::default();
    let on = call(
        0,
        regs(
            FunctionId::CpuOn64,
            Mpidr::from_index(1).raw(),
            TEST_RAM.base,
            7,
        ),
    );
    let off = call(1, regs(FunctionId::CpuOff, 0, 0, 0));
    c.bench_function("cycle/cpu_on_started_cpu_off", |b| {
        b.iter(|| {
            assert_eq!(x0(fw.handle_call(black_box(&on), &p)), 0);
            fw.vcpu_started(VcpuId::new(1), &p);
            assert_eq!(fw.handle_call(black_box(&off), &p), CallOutcome::PowerOff);
        })
    });
}

/// 256 persistent caller threads; each round releases them at a barrier to race CPU_ON on
/// vCPU 256, then the main thread checks one SUCCESS and powers the target off again.
fn race(c: &mut Criterion) {
    const RACERS: u32 = 256;
    let target = RACERS;
    let fw = Arc::new(firmware(RACERS + 1));
    let p = Arc::new(CountingPlatform::default());
    for v in 1..RACERS {
        let on = call(
            0,
            regs(
                FunctionId::CpuOn64,
                Mpidr::from_index(v).raw(),
                TEST_RAM.base,
                0,
            ),
        );
        assert_eq!(x0(fw.handle_call(&on, &*p)), 0);
        fw.vcpu_started(VcpuId::new(v), &*p);
    }
    let go = Arc::new(Barrier::new(RACERS as usize + 1));
    let done = Arc::new(Barrier::new(RACERS as usize + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let wins = Arc::new(AtomicU64::new(0));
    let call_engine = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..RACERS)
        .map(|v| {
            let (fw, p, go, done, stop, wins, call_engine) = (
                Arc::clone(&fw),
                Arc::clone(&p),
                Arc::clone(&go),
                Arc::clone(&done),
                Arc::clone(&stop),
                Arc::clone(&wins),
                Arc::clone(&call_engine),
            );
            let on = call(
                v,
                regs(
                    FunctionId::CpuOn64,
                    Mpidr::from_index(target).raw(),
                    TEST_RAM.base,
                    u64::from(v),
                ),
            );
            std::thread::spawn(move || loop {
                go.wait();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                if call_engine.load(Ordering::Acquire) && x0(fw.handle_call(&on, &*p)) == 0 {
                    wins.fetch_add(1, Ordering::Relaxed);
                }
                done.wait();
            })
        })
        .collect();
    let off = call(target, regs(FunctionId::CpuOff, 0, 0, 0));
    let mut group = c.benchmark_group("race");
    group.sample_size(10);
    group.bench_function("barrier_only_256_threads_round", |b| {
        b.iter_custom(|rounds| {
            let started = Instant::now();
            for _ in 0..rounds {
                go.wait();
                done.wait();
            }
            started.elapsed()
        })
    });
    // Published to the racers by the barriers below.
    call_engine.store(true, Ordering::Release);
    group.bench_function("cpu_on_256_threads_one_target_round", |b| {
        b.iter_custom(|rounds| {
            let mut total = Duration::ZERO;
            for _ in 0..rounds {
                let started = Instant::now();
                go.wait();
                done.wait();
                total += started.elapsed();
                assert_eq!(wins.swap(0, Ordering::Relaxed), 1, "exactly one SUCCESS");
                fw.vcpu_started(VcpuId::new(target), &*p);
                assert_eq!(fw.handle_call(&off, &*p), CallOutcome::PowerOff);
            }
            total
        })
    });
    group.finish();
    stop.store(true, Ordering::Release);
    go.wait();
    for t in threads {
        t.join().unwrap();
    }
}

criterion_group!(benches, baselines, queries, on_off_cycle, race);
criterion_main!(benches);
