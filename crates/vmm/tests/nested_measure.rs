//! Measurements on real arm64 KVM (nested harness), run on demand (the guests they
//! time check every answer, and `measurement_guests_get_the_answers_they_time` runs
//! them small in every test run):
//! `cargo test -p vpsci --target aarch64-unknown-linux-musl --test nested_measure -- --ignored --nocapture --test-threads=1`.
//!
//! Times come from the guest's own virtual counter (CNTVCT_EL0 / CNTFRQ_EL0),
//! so they include everything between the guest's HVC and its next
//! instruction. On the nested harness the "hardware" is QEMU's TCG emulator:
//! absolute numbers are those of emulation; ratios between the variants,
//! measured in the same run, are what carries over.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::time::Duration;

use nested_common::*;
use vpsci::run::{run_session, Session, EXIT_POWERED_OFF};
use vpsci::vm::{ImageSource, VmOptions};
use vpsci_firmware::{Conduit, FirmwareConfig, PsciVersion};
use vpsci_kvm::{KvmHost, SmcccRouting};

/// Which of the three ways PSCI_VERSION is answered.
#[derive(Debug, Clone, Copy)]
enum Way {
    Engine,
    EmptyHandler,
    Kernel,
}

/// What a measurement guest left in RAM: counter at start and end, the counter
/// frequency, and the answers it checked.
struct Measured {
    start: u64,
    end: u64,
    freq: u64,
    /// `call_loop`: the first PSCI_VERSION answer; `bring_up`: unused.
    first_answer: u64,
    /// `call_loop`: answers that differed from the first; `bring_up`: CPU_ON calls that
    /// did not return SUCCESS.
    wrong_answers: u64,
}

fn ran_with(program: &Asm, cpus: u32, way: Way) -> Measured {
    let host = KvmHost::open().unwrap_or_else(|e| panic!("{e}"));
    let layout = vpsci::layout::GuestLayout::new(cpus, 64 << 20).unwrap_or_else(|e| panic!("{e}"));
    let memory = layout.create_memory().unwrap_or_else(|e| panic!("{e}"));
    let session = Session {
        vm: VmOptions {
            layout,
            image: ImageSource::Bytes(program.bytes()),
            initrd: None,
            cmdline: String::new(),
            firmware: FirmwareConfig {
                psci_version: PsciVersion::V1_3,
                conduit: Conduit::Hvc,
                ..FirmwareConfig::default()
            },
            routing: match way {
                Way::Kernel => SmcccRouting::kernel_psci(),
                _ => SmcccRouting::userspace_psci(),
            },
            devices: Default::default(),
            idle_states: Vec::new(),
        },
        on_reset: vpsci::cli::ResetAction::Exit,
        on_hibernate: vpsci::cli::HibernateAction::PowerOff,
        timeout: Some(Duration::from_secs(300)),
        empty_handler: matches!(way, Way::EmptyHandler),
        console: std::sync::Arc::new(|| {
            Box::new(std::io::sink()) as Box<dyn std::io::Write + Send>
        }),
        events: std::sync::Arc::new(vpsci::events::NoEvents),
    };
    let outcome = run_session(&host, &session, &memory);
    assert_eq!(
        outcome.status, EXIT_POWERED_OFF,
        "{way:?}: {}",
        outcome.message
    );
    let read = |addr: u64| {
        use vm_memory::Bytes;
        memory
            .read_obj::<u64>(vm_memory::GuestAddress(addr))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    Measured {
        start: read(RESULTS),
        end: read(RESULTS + 8),
        freq: read(RESULTS + 16),
        wrong_answers: read(RESULTS + 24),
        first_answer: read(RESULTS + 32),
    }
}

/// `cinc x24, x24, ne` (CSINC x24, x24, x24, EQ): count a mismatch after `cmp`.
const COUNT_IF_NOT_EQUAL_X24: u32 = 0x9A98_0718;

/// One PSCI_VERSION whose answer is kept (x23, and RESULTS + 32), then
/// x19 = n; loop { x0 = PSCI_VERSION; hvc; x24 += (x0 != x23); x19 -= 1 };
/// results: start, end, freq, mismatches (x24), first answer.
fn call_loop(n: u64) -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.mov(0, u64::from(PSCI_VERSION)).call().mov_reg(23, 0);
    a.store_at(23, RESULTS + 32);
    a.mov(24, 0).mov(19, n).counter(20);
    let top = a.here();
    a.mov(0, u64::from(PSCI_VERSION)).call();
    a.cmp(0, 23).word(COUNT_IF_NOT_EQUAL_X24);
    a.word(0xF100_0673); // subs x19, x19, #1
    a.bne_back(top);
    a.counter(21).mrs(3, 3, 14, 0, 0, 22); // x22 = CNTFRQ_EL0
    a.store_at(20, RESULTS)
        .store_at(21, RESULTS + 8)
        .store_at(22, RESULTS + 16)
        .store_at(24, RESULTS + 24)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    a
}

fn ns(ticks: u64, freq: u64) -> f64 {
    ticks as f64 * 1e9 / freq as f64
}

/// The answer each way must give to PSCI_VERSION: the engine the configured 1.3, the
/// empty handler 0 (it writes x0 = 0), KVM some 1.x.
fn assert_version_answers(way: Way, measured: &Measured, calls: u64) {
    let first = measured.first_answer;
    match way {
        Way::Engine => assert_eq!(first, 0x1_0003, "{way:?}: PSCI_VERSION"),
        Way::EmptyHandler => assert_eq!(first, 0, "{way:?}: the empty handler's x0"),
        Way::Kernel => assert_eq!(first >> 16, 1, "{way:?}: KVM's PSCI_VERSION {first:#x}"),
    }
    assert_eq!(
        measured.wrong_answers, 0,
        "{way:?}: {} of {calls} timed calls answered something other than {first:#x}",
        measured.wrong_answers
    );
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn cost_of_one_psci_version_call_three_ways() {
    const N: u64 = 2000;
    const ROUNDS: usize = 5;
    let program = call_loop(N);
    let ways = [Way::Engine, Way::EmptyHandler, Way::Kernel];
    // Interleave the ways round by round so load changes on the (shared,
    // emulated) machine hit all three alike; report medians.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    for _ in 0..ROUNDS {
        for (w, way) in ways.iter().enumerate() {
            let m = ran_with(&program, 1, *way);
            assert_version_answers(*way, &m, N);
            samples[w].push(ns(m.end - m.start, m.freq) / N as f64);
        }
    }
    let mut median = Vec::new();
    for (w, way) in ways.iter().enumerate() {
        samples[w].sort_by(f64::total_cmp);
        let m = samples[w][ROUNDS / 2];
        println!(
            "MEASURE psci_version {way:?}: median {m:.0} ns/call over {ROUNDS} runs of {N} calls {:.0?}",
            samples[w]
        );
        median.push(m);
    }
    println!(
        "MEASURE ratios (medians): engine/kernel {:.2}, empty/kernel {:.2}, engine/empty {:.2}",
        median[0] / median[2],
        median[1] / median[2],
        median[0] / median[1]
    );
    assert!(median.iter().all(|&c| c > 0.0));
}

/// Boot vCPU: counter, CPU_ON every other vCPU (which writes a mark at the
/// address its context id names and idles in WFI), wait for every mark,
/// counter; results: start, end, freq, CPU_ON calls that did not return SUCCESS.
fn bring_up(cpus: usize) -> Asm {
    let secondary = ENTRY + 0x4_0000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.mov(23, SUCCESS).mov(24, 0).counter(20);
    for i in 1..cpus {
        a.smccc(
            CPU_ON,
            [mpidr(i), secondary, RESULTS + 0x1000 + 8 * i as u64],
        );
        a.cmp(0, 23).word(COUNT_IF_NOT_EQUAL_X24);
    }
    for i in 1..cpus {
        a.mov(5, RESULTS + 0x1000 + 8 * i as u64);
        let poll = a.here();
        a.ldr(6, 5, 0).cbz_back(6, poll);
    }
    a.counter(21).mrs(3, 3, 14, 0, 0, 22);
    a.store_at(20, RESULTS)
        .store_at(21, RESULTS + 8)
        .store_at(22, RESULTS + 16)
        .store_at(24, RESULTS + 24)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    while a.here() < secondary {
        a.spin();
    }
    a.mov(5, 1).str(5, 0, 0);
    let idle = a.here();
    a.wfi().b_back(idle);
    a
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn time_to_bring_up_8_and_64_vcpus() {
    for cpus in [8usize, 64] {
        for way in [Way::Engine, Way::Kernel] {
            let mut samples = Vec::new();
            for _ in 0..5 {
                let m = ran_with(&bring_up(cpus), cpus as u32, way);
                assert_eq!(m.wrong_answers, 0, "{way:?}: CPU_ON calls that failed");
                samples.push(ns(m.end - m.start, m.freq) / 1e6);
            }
            samples.sort_by(f64::total_cmp);
            println!(
                "MEASURE bring-up {cpus} vCPUs {way:?}: median {:.2} ms (runs {samples:.2?})",
                samples[2]
            );
        }
    }
}

#[test]
fn measurement_guests_get_the_answers_they_time() {
    // The guests the measurements above time, run once each, small: every timed call
    // must get the answer its way gives, or the timing measures something else.
    const N: u64 = 20;
    for way in [Way::Engine, Way::EmptyHandler, Way::Kernel] {
        let m = ran_with(&call_loop(N), 1, way);
        assert_version_answers(way, &m, N);
        assert!(m.end > m.start, "{way:?}: the counter did not move");
    }
    for way in [Way::Engine, Way::Kernel] {
        let m = ran_with(&bring_up(4), 4, way);
        assert_eq!(
            m.wrong_answers, 0,
            "{way:?}: CPU_ON calls that did not return SUCCESS"
        );
    }
}
