//! Scenario group `smccc-fuzz`: a hostile guest. Every vCPU makes SMCCC calls with
//! pseudo-random function IDs from every owner range of DEN0028 (§2.5, table 2-1: Arm
//! architecture, CPU, SiP, OEM, standard secure (PSCI, TRNG and the rest), standard
//! hypervisor, vendor hypervisor, trusted applications, trusted OS, reserved, KVM's old
//! PSCI 0.1 IDs, yielding calls) with pseudo-random x0 upper half and x1..x17, over HVC and
//! SMC, for the run's duration (`iterations` seconds), and checks every answer:
//!
//! - an ID the firmware does not implement answers NOT_SUPPORTED (x0 = -1, all 64 bits);
//! - any ID over the conduit the VM was not given answers NOT_SUPPORTED where vpsci's
//!   engine decides (PSCI 0x00..0x1F, TRNG 0x50..0x53): the engine only listens on its
//!   conduit. IDs KVM keeps (the architecture range, vendor hypervisor, everything not
//!   forwarded) are answered by KVM, which treats HVC and SMC alike;
//! - a PSCI or TRNG function of the engine, called with arguments forced invalid (a
//!   non-affinity MPIDR bit, a reserved power_state bit, a misaligned entry point, a
//!   non-zero SYSTEM_OFF2 cookie, a reserved reset type, ...), answers the error code
//!   DEN0022 F.b / DEN0098 give for it; argument-free functions answer their fixed value.
//!   CPU_OFF, CPU_FREEZE, SYSTEM_OFF and SYSTEM_RESET stop a CPU or the VM whatever their
//!   arguments, so they are only made over the other conduit, where they must change
//!   nothing;
//! - x4..x17 come back unchanged (SMCCC 1.1+: they are preserved unless a function
//!   returns results in them, which none of these does).
//!
//! The guest prints its counts per range (`VG-INFO smccc-fuzz ...`) and a histogram of the
//! engine's error answers (`VG-INFO smccc-fuzz-engine ...`) that the host compares with
//! the event log's `psci_call` lines. Only 64-bit (AArch64) callers: vpsci creates every
//! vCPU without `KVM_ARM_VCPU_EL1_32BIT`.

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vguest::psci::{self, Conduit};
use vguest::report::{check, CheckResult, Detail};
use vguest::{config, cpu, fail, println, timer};
use vpsci_guest_scenarios::{effective_version, send_event, wait_affinity, wait_until, Rng};

vguest::guest_main!("smccc-fuzz", main);

const DEFAULT_SECONDS: u32 = 30;
const LIVENESS_MS: u64 = 60_000;
/// NOT_SUPPORTED as every implementation here writes it: -1 in all 64 bits of x0.
const NOT_SUPPORTED: u64 = u64::MAX;
const SMC64: u32 = 1 << 30;

const fn err(code: i64) -> u64 {
    code as u64
}
const SUCCESS_OR_M3: [u64; 2] = [0, err(-3)];
const DENIED_OR_INVALID_ADDRESS: [u64; 2] = [err(-3), err(-9)];

/// An owner range of DEN0028 table 2-1 (and two special groups inside them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Range {
    Arch,
    Cpu,
    Sip,
    Oem,
    Psci,
    Trng,
    StdSecureOther,
    StdHyp,
    VendorHyp,
    TrustedApp,
    TrustedOs,
    Reserved,
    KvmPsci01,
    Yielding,
}

const RANGES: [(Range, &str); 14] = [
    (Range::Arch, "arch"),
    (Range::Cpu, "cpu"),
    (Range::Sip, "sip"),
    (Range::Oem, "oem"),
    (Range::Psci, "psci"),
    (Range::Trng, "trng"),
    (Range::StdSecureOther, "std-secure-other"),
    (Range::StdHyp, "std-hyp"),
    (Range::VendorHyp, "vendor-hyp"),
    (Range::TrustedApp, "trusted-app"),
    (Range::TrustedOs, "trusted-os"),
    (Range::Reserved, "reserved"),
    (Range::KvmPsci01, "kvm-psci-0.1"),
    (Range::Yielding, "yielding"),
];

/// What the specification allows as the answer.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// x0 exactly.
    X0(u64),
    /// x0 is one of these.
    OneOf(&'static [u64]),
    /// w0 is an SMCCC-style version 1.x (0x1_0000..=0x1_FFFF).
    Version1,
    /// A data answer of an implemented function: anything but NOT_SUPPORTED.
    Data,
    /// The function defines no return value (the architectural workarounds).
    Anything,
}

impl Expect {
    fn allows(self, x0: u64) -> bool {
        match self {
            Expect::X0(v) => x0 == v,
            Expect::OneOf(values) => values.contains(&x0),
            Expect::Version1 => (0x1_0000..=0x1_FFFF).contains(&(x0 as u32)),
            Expect::Data => x0 as u32 != u32::MAX,
            Expect::Anything => true,
        }
    }
}

static STOP: AtomicU32 = AtomicU32::new(0);
static CALLS: [AtomicU32; RANGES.len()] = [const { AtomicU32::new(0) }; RANGES.len()];
static BAD: [AtomicU32; RANGES.len()] = [const { AtomicU32::new(0) }; RANGES.len()];
static OTHER_CONDUIT: AtomicU32 = AtomicU32::new(0);
static FINISHED: AtomicU32 = AtomicU32::new(0);
/// The first bad answer: function ID, conduit (1 HVC, 2 SMC), x0, and what was wrong
/// (0 the answer, 1 a preserved register changed).
static FIRST_BAD: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Answers of the engine (forwarded IDs): NOT_SUPPORTED, INVALID_PARAMETERS, DENIED (or
/// TRNG's NO_ENTROPY, also -3), INVALID_ADDRESS, any other negative value, and calls of
/// IDs the engine's table does not know (its log names them UNKNOWN).
static ENGINE_M1: AtomicU32 = AtomicU32::new(0);
static ENGINE_M2: AtomicU32 = AtomicU32::new(0);
static ENGINE_M3: AtomicU32 = AtomicU32::new(0);
static ENGINE_M9: AtomicU32 = AtomicU32::new(0);
static ENGINE_OTHER_NEGATIVE: AtomicU32 = AtomicU32::new(0);
static ENGINE_UNKNOWN: AtomicU32 = AtomicU32::new(0);

/// What the boot CPU learnt before the storm: the engine's version and which functions
/// PSCI_FEATURES says are there.
struct Facts {
    conduit: Conduit,
    version: u64,
    trng: bool,
    /// PSCI function numbers 0x00..0x15 offered with the SMC32 and SMC64 ID.
    offered32: u32,
    offered64: u32,
}

static FACTS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn facts() -> Facts {
    Facts {
        conduit: psci::conduit(),
        version: FACTS[0].load(Ordering::Acquire),
        trng: FACTS[1].load(Ordering::Acquire) != 0,
        offered32: FACTS[2].load(Ordering::Acquire) as u32,
        offered64: FACTS[3].load(Ordering::Acquire) as u32,
    }
}

/// PSCI function numbers that have an SMC64 ID (DEN0022 F.b table 6).
const HAS_SMC64: [u32; 13] = [
    0x01, 0x03, 0x04, 0x05, 0x07, 0x0C, 0x0D, 0x0E, 0x10, 0x11, 0x12, 0x14, 0x15,
];
const PSCI_LAST: u32 = 0x15;

/// A forwarded call outside the storm, counted like the storm's answers (the host
/// compares the engine's answers with the event log, where every call shows).
fn counted_status(fid: u32, a1: u64) -> i32 {
    let x0 = psci::call(fid, a1, 0, 0)[0];
    count_engine_answer(fid, x0);
    x0 as u32 as i32
}

fn learn_facts() {
    let version = effective_version();
    let trng = counted_status(0x8400_0050, 0) >= 0;
    let (mut offered32, mut offered64) = (0u32, 0u32);
    for func in 0..=PSCI_LAST {
        if counted_status(psci::PSCI_FEATURES, u64::from(0x8400_0000 | func)) >= 0 {
            offered32 |= 1 << func;
        }
        if HAS_SMC64.contains(&func)
            && counted_status(psci::PSCI_FEATURES, u64::from(0xC400_0000 | func)) >= 0
        {
            offered64 |= 1 << func;
        }
    }
    FACTS[0].store(u64::from(version), Ordering::Release);
    FACTS[1].store(u64::from(trng), Ordering::Release);
    FACTS[2].store(u64::from(offered32), Ordering::Release);
    FACTS[3].store(u64::from(offered64), Ordering::Release);
}

fn width(rng: &mut Rng) -> u32 {
    if rng.below(2) == 0 {
        SMC64
    } else {
        0
    }
}

/// A function ID in `range`.
fn function_id(range: Range, rng: &mut Rng) -> u32 {
    let low16 = rng.next_u64() as u32 & 0xFFFF;
    let owner = |owner: u32| 0x8000_0000 | (owner << 24);
    match range {
        Range::Arch => {
            const KNOWN: [u32; 6] = [
                0x8000_0000,
                0x8000_0001,
                0x8000_0002,
                0x8000_3FFF,
                0x8000_7FFF,
                0x8000_8000,
            ];
            if rng.below(2) == 0 {
                let wide = if rng.below(4) == 0 { width(rng) } else { 0 };
                KNOWN[rng.below(KNOWN.len() as u64) as usize] | wide
            } else {
                owner(0) | low16 | width(rng)
            }
        }
        Range::Cpu => owner(1) | low16 | width(rng),
        Range::Sip => owner(2) | low16 | width(rng),
        Range::Oem => owner(3) | low16 | width(rng),
        Range::Psci => owner(4) | rng.below(0x20) as u32 | width(rng),
        Range::Trng => owner(4) | 0x50 | rng.below(4) as u32 | width(rng),
        Range::StdSecureOther => {
            let func = match rng.below(3) {
                0 => 0x20 + rng.below(0x30) as u32,
                1 => 0x54 + rng.below(0xFFAC) as u32,
                // Bits 23:16 must be zero: an ID with them set names no function.
                _ => (1 + rng.below(0xFF) as u32) << 16 | rng.below(0x20) as u32,
            };
            owner(4) | func | width(rng)
        }
        Range::StdHyp => owner(5) | low16 | width(rng),
        Range::VendorHyp => {
            const KNOWN: [u32; 3] = [0x8600_0000, 0x8600_0001, 0x8600_FF01];
            if rng.below(2) == 0 {
                KNOWN[rng.below(3) as usize]
            } else {
                owner(6) | low16 | width(rng)
            }
        }
        Range::TrustedApp => owner(48 + rng.below(2) as u32) | low16 | width(rng),
        Range::TrustedOs => owner(50 + rng.below(14) as u32) | low16 | width(rng),
        Range::Reserved => owner(7 + rng.below(41) as u32) | low16 | width(rng),
        Range::KvmPsci01 => 0x95c1_ba5e + rng.below(4) as u32,
        Range::Yielding => rng.next_u64() as u32 & 0x7FFF_FFFF,
    }
}

/// Whether KVM's SMCCC filter hands `fid` to vpsci's engine (PSCI 0x00..0x1F and TRNG
/// 0x50..0x53 of the standard secure range, both conventions).
fn forwarded(fid: u32) -> bool {
    let base = fid & !SMC64;
    (0x8400_0000..=0x8400_001F).contains(&base) || (0x8400_0050..=0x8400_0053).contains(&base)
}

/// Whether the engine's function table has `fid` (its event log names the others UNKNOWN).
fn in_engine_table(fid: u32) -> bool {
    let func = fid & 0xFFFF;
    match (fid & SMC64 != 0, func) {
        (false, 0..=PSCI_LAST) | (false, 0x50..=0x53) | (true, 0x53) => true,
        (true, f) => HAS_SMC64.contains(&f),
        _ => false,
    }
}

/// Sets one of the bits an MPIDR argument must leave clear (24..31, which SMC32 keeps).
fn spoil_mpidr(r: &mut u64, rng: &mut Rng) {
    *r |= 1 << (24 + rng.below(8));
}

/// The answer the engine must give to forwarded `fid` over its own conduit, after forcing
/// the arguments invalid where the function takes any; `None` for the functions that
/// stop the caller or the VM whatever the arguments.
fn engine_expect(fid: u32, r: &mut [u64; 18], rng: &mut Rng, f: &Facts) -> Option<Expect> {
    let func = fid & 0xFFFF;
    let wide = fid & SMC64 != 0;
    if func >= 0x50 {
        if !f.trng || (wide && func != 0x53) {
            return Some(Expect::X0(NOT_SUPPORTED));
        }
        return Some(match func {
            0x50 => Expect::Version1,
            0x51 => {
                // A queried ID with bit 31 clear is no fast call: not a TRNG function.
                r[1] &= !(1 << 31);
                Expect::X0(NOT_SUPPORTED)
            }
            0x52 => Expect::Data,
            _ => {
                if rng.below(2) == 0 {
                    r[1] = rng.below(256);
                }
                let max = if wide { 192 } else { 96 };
                if (1..=max).contains(&(r[1] as u32)) {
                    Expect::OneOf(&SUCCESS_OR_M3)
                } else {
                    Expect::X0(err(-2))
                }
            }
        });
    }
    let offered = if wide { f.offered64 } else { f.offered32 };
    if func > PSCI_LAST || offered & (1 << func) == 0 || (wide && !HAS_SMC64.contains(&func)) {
        return Some(Expect::X0(NOT_SUPPORTED));
    }
    Some(match func {
        0x00 => Expect::X0(f.version),
        0x01 => {
            // Bit 31 is reserved in both power_state formats.
            r[1] |= 1 << 31;
            Expect::X0(err(-2))
        }
        0x03 | 0x04 | 0x0D => {
            spoil_mpidr(&mut r[1], rng);
            Expect::X0(err(-2))
        }
        0x06 => Expect::X0(2),
        0x0A => {
            r[1] &= !(1 << 31);
            Expect::X0(NOT_SUPPORTED)
        }
        0x0C => {
            r[1] |= 1;
            Expect::X0(err(-9))
        }
        // Every other CPU is on (DENIED first), or was just switched off (INVALID_ADDRESS).
        0x0E => {
            r[1] |= 1;
            Expect::OneOf(&DENIED_OR_INVALID_ADDRESS)
        }
        0x0F => {
            r[1] |= 2;
            Expect::X0(err(-2))
        }
        0x10 | 0x11 => {
            spoil_mpidr(&mut r[1], rng);
            Expect::X0(0)
        }
        0x12 => {
            // A reset type with bit 31 clear other than 0 is reserved.
            r[1] = (r[1] & !(1 << 31)) | 1;
            Expect::X0(err(-2))
        }
        0x13 => Expect::OneOf(&[0, 1]),
        0x14 => Expect::OneOf(&SUCCESS_OR_M3),
        0x15 => {
            r[2] |= 1;
            Expect::X0(err(-2))
        }
        // CPU_OFF, SYSTEM_OFF, SYSTEM_RESET, CPU_FREEZE.
        _ => return None,
    })
}

/// The answer KVM must give to an ID it keeps (it answers HVC and SMC alike).
fn kvm_expect(fid: u32, r: &mut [u64; 18]) -> Expect {
    match fid {
        0x8000_0000 => Expect::Version1,
        0x8000_0001 => {
            r[1] &= !(1 << 31);
            Expect::X0(NOT_SUPPORTED)
        }
        0x8000_3FFF | 0x8000_7FFF | 0x8000_8000 => Expect::Anything,
        // KVM's features bitmap, its PTP clock and the vendor UID.
        0x8600_0000 | 0x8600_0001 | 0x8600_FF01 => Expect::Anything,
        _ => Expect::X0(NOT_SUPPORTED),
    }
}

fn record_bad(range: usize, fid: u32, conduit: Conduit, x0: u64, what: u64) {
    if BAD[range].fetch_add(1, Ordering::AcqRel) == 0 && FIRST_BAD[0].load(Ordering::Acquire) == 0 {
        FIRST_BAD[1].store(1 + u64::from(conduit == Conduit::Smc), Ordering::Relaxed);
        FIRST_BAD[2].store(x0, Ordering::Relaxed);
        FIRST_BAD[3].store(what | (range as u64) << 8, Ordering::Relaxed);
        FIRST_BAD[0].store(u64::from(fid) | 1 << 40, Ordering::Release);
    }
}

fn count_engine_answer(fid: u32, x0: u64) {
    if !in_engine_table(fid) {
        ENGINE_UNKNOWN.fetch_add(1, Ordering::Relaxed);
    }
    let counter = match x0 as i64 {
        -1 => &ENGINE_M1,
        -2 => &ENGINE_M2,
        -3 => &ENGINE_M3,
        -9 => &ENGINE_M9,
        v if v < 0 => &ENGINE_OTHER_NEGATIVE,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One random call and its check.
fn fuzz_one(rng: &mut Rng, f: &Facts) {
    let range = rng.below(RANGES.len() as u64) as usize;
    let fid = function_id(RANGES[range].0, rng);
    let mut regs = [0u64; 18];
    for r in regs.iter_mut() {
        *r = rng.next_u64();
    }
    // The upper half of x0 is not part of the function ID (SMCCC: W0).
    regs[0] = (regs[0] & 0xFFFF_FFFF_0000_0000) | u64::from(fid);
    let other = match f.conduit {
        Conduit::Hvc => Conduit::Smc,
        Conduit::Smc => Conduit::Hvc,
    };
    let mut conduit = if rng.below(2) == 0 { f.conduit } else { other };
    let expect = if !forwarded(fid) {
        kvm_expect(fid, &mut regs)
    } else if conduit != f.conduit {
        Expect::X0(NOT_SUPPORTED)
    } else {
        match engine_expect(fid, &mut regs, rng, f) {
            Some(e) => e,
            None => {
                conduit = other;
                Expect::X0(NOT_SUPPORTED)
            }
        }
    };
    if conduit != f.conduit {
        OTHER_CONDUIT.fetch_add(1, Ordering::Relaxed);
    }
    CALLS[range].fetch_add(1, Ordering::Relaxed);
    let out = psci::call_raw(conduit, regs);
    if forwarded(fid) {
        count_engine_answer(fid, out[0]);
    }
    if !expect.allows(out[0]) {
        record_bad(range, fid, conduit, out[0], 0);
    } else if out[4..] != regs[4..] {
        record_bad(range, fid, conduit, out[0], 1);
    }
}

fn fuzz_task(index: usize, _context: u64) {
    let f = facts();
    let mut rng = Rng::new(index);
    while STOP.load(Ordering::Acquire) == 0 {
        fuzz_one(&mut rng, &f);
    }
    FINISHED.fetch_add(1, Ordering::AcqRel);
    send_event();
}

fn sum(counters: &[AtomicU32]) -> u32 {
    counters.iter().map(|c| c.load(Ordering::Acquire)).sum()
}

fn main() {
    let n = cpu::count();
    let mut name = Detail::new();
    let conduit = match psci::conduit() {
        Conduit::Hvc => "hvc",
        Conduit::Smc => "smc",
    };
    let _ = core::fmt::Write::write_fmt(&mut name, format_args!("smccc-fuzz-{}", conduit));
    let name = name.as_str();
    let cfg = config::get();
    let seconds = if cfg.iterations == 0 {
        DEFAULT_SECONDS
    } else {
        cfg.iterations
    };
    let started = timer::now();
    let result = fuzz(n, seconds);
    // Two halves: one line of all 14 counts would not fit a `Detail` (200 bytes).
    let mut per_range = [Detail::new(), Detail::new()];
    for (i, (_, label)) in RANGES.iter().enumerate() {
        let _ = core::fmt::Write::write_fmt(
            &mut per_range[i * 2 / RANGES.len()],
            format_args!(" {}={}", label, CALLS[i].load(Ordering::Relaxed)),
        );
    }
    println!(
        "VG-INFO smccc-fuzz {} cpus={} seconds={} calls={} other_conduit={} bad={} total_ms={}",
        name,
        n,
        seconds,
        sum(&CALLS),
        OTHER_CONDUIT.load(Ordering::Relaxed),
        sum(&BAD),
        timer::ticks_to_ms(timer::now() - started)
    );
    println!("VG-INFO smccc-fuzz-ranges{}", per_range[0].as_str());
    println!("VG-INFO smccc-fuzz-ranges{}", per_range[1].as_str());
    // Compared with the event log on the host (xtask/src/conformance/hostile.rs).
    println!(
        "VG-INFO smccc-fuzz-engine unknown={} m1={} m2={} m3={} m9={} other_negative={}",
        ENGINE_UNKNOWN.load(Ordering::Relaxed),
        ENGINE_M1.load(Ordering::Relaxed),
        ENGINE_M2.load(Ordering::Relaxed),
        ENGINE_M3.load(Ordering::Relaxed),
        ENGINE_M9.load(Ordering::Relaxed),
        ENGINE_OTHER_NEGATIVE.load(Ordering::Relaxed),
    );
    check(name, result);
}

fn fuzz(n: usize, seconds: u32) -> CheckResult {
    learn_facts();
    for i in 1..n {
        let r = cpu::start(i, fuzz_task, 0);
        if r != psci::SUCCESS {
            return fail!("CPU_ON(cpu {}) = {}", i, psci::status_name(r));
        }
    }
    let f = facts();
    let end = timer::now() + timer::ms_to_ticks(u64::from(seconds) * 1000);
    let mut rng = Rng::new(0);
    while timer::now() < end {
        fuzz_one(&mut rng, &f);
    }
    STOP.store(1, Ordering::Release);
    send_event();
    if !wait_until(
        || FINISHED.load(Ordering::Acquire) == (n - 1) as u32,
        LIVENESS_MS,
    ) {
        return fail!(
            "only {} of {} fuzzing secondaries finished",
            FINISHED.load(Ordering::Acquire),
            n - 1
        );
    }
    for i in 1..n {
        wait_affinity(i, psci::AFFINITY_OFF, LIVENESS_MS)?;
    }
    let bad = sum(&BAD);
    if bad != 0 {
        let fid = FIRST_BAD[0].load(Ordering::Acquire) as u32;
        let what = FIRST_BAD[3].load(Ordering::Relaxed);
        let range = RANGES
            .get((what >> 8) as usize)
            .map_or("?", |(_, label)| label);
        let conduit = if FIRST_BAD[1].load(Ordering::Relaxed) == 2 {
            "SMC"
        } else {
            "HVC"
        };
        let x0 = FIRST_BAD[2].load(Ordering::Relaxed);
        let what = if what & 0xFF == 1 {
            "changed a register in x4..x17"
        } else {
            "answered outside the spec's list"
        };
        return fail!(
            "{} calls wrong; first: {:#010x} ({}) over {} {} (x0 {:#x})",
            bad,
            fid,
            range,
            conduit,
            what,
            x0
        );
    }
    Ok(())
}
