//! Measurements on real arm64 KVM (nested harness), run on demand:
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

fn ran_with(program: &Asm, cpus: u32, way: Way) -> (u64, u64, u64) {
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
    (read(RESULTS), read(RESULTS + 8), read(RESULTS + 16))
}

/// x19 = n; loop { x0 = PSCI_VERSION; hvc; x19 -= 1 } ; results: start, end, freq.
fn call_loop(n: u64) -> Asm {
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.mov(19, n).counter(20);
    let top = a.here();
    a.mov(0, u64::from(PSCI_VERSION)).call();
    a.word(0xF100_0673); // subs x19, x19, #1
    a.bne_back(top);
    a.counter(21).mrs(3, 3, 14, 0, 0, 22); // x22 = CNTFRQ_EL0
    a.store_at(20, RESULTS)
        .store_at(21, RESULTS + 8)
        .store_at(22, RESULTS + 16)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    a
}

fn ns(ticks: u64, freq: u64) -> f64 {
    ticks as f64 * 1e9 / freq as f64
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
            let (start, end, freq) = ran_with(&program, 1, *way);
            samples[w].push(ns(end - start, freq) / N as f64);
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

/// Boot vCPU: counter, CPU_ON every other vCPU (which writes a mark and
/// idles in WFI), wait for every mark, counter; results: start, end, freq.
fn bring_up(cpus: usize) -> Asm {
    let secondary = ENTRY + 0x4_0000;
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.counter(20);
    for i in 1..cpus {
        a.smccc(
            CPU_ON,
            [mpidr(i), secondary, RESULTS + 0x1000 + 8 * i as u64],
        );
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
                let (start, end, freq) = ran_with(&bring_up(cpus), cpus as u32, way);
                samples.push(ns(end - start, freq) / 1e6);
            }
            samples.sort_by(f64::total_cmp);
            println!(
                "MEASURE bring-up {cpus} vCPUs {way:?}: median {:.2} ms (runs {samples:.2?})",
                samples[2]
            );
        }
    }
}
