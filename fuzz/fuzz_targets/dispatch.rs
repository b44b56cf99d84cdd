//! Fuzzes decode + dispatch of the firmware engine with the fake platform: arbitrary
//! configurations and arbitrary sequences of guest calls (any vCPU, conduit, registers)
//! interleaved with the VMM's notifications (started, woken, reset, snapshot/restore).
//!
//! Checked on every step: no panic; an unknown function ID answers NOT_SUPPORTED with
//! x1..x3 untouched; a negative status in w0 of a PSCI function is one of the spec's return
//! codes, and each key function answers only the codes DEN0022 lists for it; each outcome
//! kind comes only from functions that may produce it; state changes match the outcome;
//! quiesce/resume are balanced; every start request belongs to a CPU_ON that returned
//! SUCCESS.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vpsci_firmware::testing::{self, TEST_RAM};
use vpsci_firmware::{
    CallOutcome, Conduit, FeatureSet, FirmwareConfig, FunctionId, GuestCall, Mpidr, OnPending,
    PowerState, PsciError, PsciVersion, Service, SuspendKind, VcpuId, WakeOutcome,
};

/// x0: a known function ID (possibly with junk in the upper 32 bits) or any value.
#[derive(Arbitrary, Debug)]
enum Fid {
    Known { index: u8, high: u32 },
    Raw(u64),
}

/// An argument register: biased towards values that reach deep into the engine.
#[derive(Arbitrary, Debug)]
enum Arg {
    Raw(u64),
    Mpidr { index: u8 },
    Ram { offset: u32 },
    Small(u8),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Call {
        vcpu: u8,
        smc: bool,
        aarch32: bool,
        fid: Fid,
        args: [Arg; 3],
    },
    Started {
        vcpu: u8,
    },
    Woken {
        vcpu: u8,
    },
    Reset,
    SnapshotRoundTrip,
    RestoreBytes {
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    version: u8,
    smc_conduit: bool,
    all_features: bool,
    report_on_pending: bool,
    cpus: u8,
    entropy_fails: bool,
    ops: Vec<Op>,
}

fn code(e: PsciError) -> i32 {
    e.to_register() as u32 as i32
}

/// Status codes DEN0022 F.b lists for the functions whose answers are pure status codes.
fn allowed_statuses(fid: FunctionId) -> Option<&'static [PsciError]> {
    use PsciError::*;
    Some(match fid {
        FunctionId::CpuOn32 | FunctionId::CpuOn64 => &[
            NotSupported,
            InvalidParameters,
            InvalidAddress,
            AlreadyOn,
            OnPending,
            InternalFailure,
        ],
        FunctionId::CpuOff | FunctionId::CpuFreeze => &[NotSupported, Denied],
        FunctionId::CpuSuspend32
        | FunctionId::CpuSuspend64
        | FunctionId::CpuDefaultSuspend32
        | FunctionId::CpuDefaultSuspend64 => {
            &[NotSupported, InvalidParameters, InvalidAddress, Denied]
        }
        FunctionId::SystemSuspend32 | FunctionId::SystemSuspend64 => &[
            NotSupported,
            InvalidParameters,
            InvalidAddress,
            Denied,
            InternalFailure,
        ],
        FunctionId::AffinityInfo32 | FunctionId::AffinityInfo64 => {
            &[NotSupported, InvalidParameters, Disabled]
        }
        FunctionId::Migrate32 | FunctionId::Migrate64 => &[NotSupported],
        _ => return None,
    })
}

fuzz_target!(|input: Input| {
    let versions = PsciVersion::ALL;
    let config = FirmwareConfig {
        psci_version: versions[usize::from(input.version) % versions.len()],
        conduit: if input.smc_conduit {
            Conduit::Smc
        } else {
            Conduit::Hvc
        },
        features: if input.all_features {
            FeatureSet::ALL
        } else {
            FeatureSet::NONE
        },
        on_pending: if input.report_on_pending {
            OnPending::Reported
        } else {
            OnPending::Hidden
        },
        ..FirmwareConfig::default()
    };
    let cpus = u32::from(input.cpus % 8) + 1;
    let Ok((fw, platform)) = testing::firmware(config, cpus) else {
        // A configuration the engine refuses (for example an optional group PSCI 0.2 lacks).
        return;
    };
    platform
        .entropy_fails
        .store(input.entropy_fails, std::sync::atomic::Ordering::SeqCst);
    let mut successes = 0usize;
    let vcpu_of = |v: u8| VcpuId::new(u32::from(v) % (cpus + 1)); // one past the end too
    for op in input.ops.iter().take(64) {
        match op {
            Op::Call {
                vcpu,
                smc,
                aarch32,
                fid,
                args,
            } => {
                let x0 = match fid {
                    Fid::Known { index, high } => {
                        let ids = FunctionId::ALL;
                        let id = ids[usize::from(*index) % ids.len()];
                        u64::from(*high) << 32 | u64::from(id.raw())
                    }
                    Fid::Raw(v) => *v,
                };
                let arg = |a: &Arg| match a {
                    Arg::Raw(v) => *v,
                    Arg::Mpidr { index } => Mpidr::from_index(u32::from(*index) % (cpus + 2)).raw(),
                    Arg::Ram { offset } => TEST_RAM.base.wrapping_add(u64::from(*offset)),
                    Arg::Small(v) => u64::from(*v),
                };
                let regs = [x0, arg(&args[0]), arg(&args[1]), arg(&args[2])];
                let call = GuestCall {
                    vcpu: vcpu_of(*vcpu),
                    conduit: if *smc { Conduit::Smc } else { Conduit::Hvc },
                    regs,
                    caller_aarch32: *aarch32,
                };
                let before = fw.power_state(call.vcpu);
                let halted = fw.is_halted();
                let states: Vec<_> = (0..cpus).map(|i| fw.power_state(VcpuId::new(i))).collect();
                let outcome = fw.handle_call(&call, &platform);
                if halted {
                    // A committed system event stopped the VM: nothing is decided until
                    // the reset.
                    let failed = [
                        PsciError::InternalFailure.to_register(),
                        regs[1],
                        regs[2],
                        regs[3],
                    ];
                    assert_eq!(outcome, CallOutcome::Return { regs: failed });
                    let after: Vec<_> = (0..cpus).map(|i| fw.power_state(VcpuId::new(i))).collect();
                    assert_eq!(states, after, "a call changed a halted engine");
                } else {
                    check_call(&fw, &call, before, outcome, &mut successes);
                    if matches!(outcome, CallOutcome::SystemEvent { .. }) {
                        assert!(
                            fw.is_halted(),
                            "a committed system event left the engine deciding"
                        );
                    }
                }
            }
            Op::Started { vcpu } => {
                let v = vcpu_of(*vcpu);
                let before = fw.power_state(v);
                let halted = fw.is_halted();
                let started = fw.vcpu_started(v, &platform);
                assert_eq!(started, before == PowerState::OnPending && !halted);
                let after = fw.power_state(v);
                if started {
                    assert_eq!(after, PowerState::On);
                } else {
                    assert_eq!(after, before, "vcpu_started changed a non-pending vCPU");
                }
            }
            Op::Woken { vcpu } => {
                let v = vcpu_of(*vcpu);
                let before = fw.power_state(v);
                let wake = fw.vcpu_woken(v, &platform);
                match (before, wake) {
                    (PowerState::Suspended { kind }, wake) => {
                        assert_eq!(fw.power_state(v), PowerState::On);
                        match (kind, wake) {
                            (SuspendKind::Standby, WakeOutcome::Return { regs }) => {
                                assert_eq!(regs[0], 0)
                            }
                            (
                                SuspendKind::Powerdown | SuspendKind::System,
                                WakeOutcome::ResumeAt { .. },
                            ) => {}
                            (kind, wake) => panic!("{kind:?} woke with {wake:?}"),
                        }
                    }
                    (before, wake) => {
                        assert_eq!(wake, WakeOutcome::NotSuspended);
                        assert_eq!(fw.power_state(v), before);
                    }
                }
            }
            Op::Reset => {
                fw.reset();
                for i in 0..cpus {
                    let expected = if i == 0 {
                        PowerState::On
                    } else {
                        PowerState::Off
                    };
                    assert_eq!(fw.power_state(VcpuId::new(i)), expected);
                    assert_eq!(fw.pending_start(VcpuId::new(i)), None);
                }
            }
            Op::SnapshotRoundTrip => {
                let states: Vec<_> = (0..cpus).map(|i| fw.power_state(VcpuId::new(i))).collect();
                let bytes = fw.snapshot();
                assert_eq!(fw.restore(&bytes), Ok(()));
                let again: Vec<_> = (0..cpus).map(|i| fw.power_state(VcpuId::new(i))).collect();
                assert_eq!(states, again);
                assert_eq!(fw.snapshot(), bytes);
            }
            Op::RestoreBytes { bytes } => {
                // Garbage must be refused or accepted without a panic; a refusal changes nothing.
                let before = fw.snapshot();
                if fw.restore(bytes).is_err() {
                    assert_eq!(fw.snapshot(), before, "a refused restore changed state");
                }
            }
        }
        assert_eq!(
            platform
                .quiesce_depth
                .load(std::sync::atomic::Ordering::SeqCst),
            0,
            "quiesce without resume"
        );
        assert_eq!(
            platform.starts().len(),
            successes,
            "start requests vs CPU_ON SUCCESS"
        );
    }
});

fn check_call(
    fw: &vpsci_firmware::Firmware,
    call: &GuestCall,
    before: PowerState,
    outcome: CallOutcome,
    successes: &mut usize,
) {
    let regs = call.regs;
    if call.vcpu.index() >= fw.vcpu_count() {
        // Host misuse (a caller outside the topology): documented INTERNAL_FAILURE.
        let expected = [
            PsciError::InternalFailure.to_register(),
            regs[1],
            regs[2],
            regs[3],
        ];
        assert_eq!(outcome, CallOutcome::Return { regs: expected });
        return;
    }
    let fid = FunctionId::try_from(regs[0] as u32).ok();
    match outcome {
        CallOutcome::Return { regs: out } => {
            let w0 = out[0] as u32 as i32;
            let Some(fid) = fid else {
                assert_eq!(
                    out[0],
                    PsciError::NotSupported.to_register(),
                    "unknown function"
                );
                assert_eq!(out[1..], regs[1..], "unknown function touched x1..x3");
                return;
            };
            if fid.service() == Service::Psci {
                assert_eq!(out[1..], regs[1..], "{fid} touched x1..x3");
                let stat = matches!(
                    fid,
                    FunctionId::StatCount32
                        | FunctionId::StatCount64
                        | FunctionId::StatResidency32
                        | FunctionId::StatResidency64
                );
                if w0 < 0 && !stat {
                    assert!(
                        PsciError::ALL.iter().any(|&e| code(e) == w0),
                        "{fid} answered {w0}, not a PSCI return code"
                    );
                }
            }
            if let Some(allowed) = allowed_statuses(fid) {
                let ok = w0 >= 0 || allowed.iter().any(|&e| code(e) == w0);
                assert!(
                    ok,
                    "{fid} answered {w0}, which DEN0022 does not list for it"
                );
            }
            match fid {
                FunctionId::CpuOn32 | FunctionId::CpuOn64 if out[0] == 0 => {
                    *successes += 1;
                    let target = Mpidr::try_from(if fid.is_smc64() {
                        regs[1]
                    } else {
                        regs[1] & 0xFFFF_FFFF
                    })
                    .ok()
                    .and_then(|m| fw.vcpu_of(m));
                    let Some(target) = target else {
                        panic!("CPU_ON SUCCESS for a target outside the topology: {regs:x?}")
                    };
                    assert_eq!(fw.power_state(target), PowerState::OnPending);
                    if target == call.vcpu {
                        // Host misuse the engine tolerates: an OFF vCPU (which could not
                        // execute a call on real hardware) started itself.
                        assert_eq!(before, PowerState::Off);
                        return;
                    }
                }
                FunctionId::CpuOn32 | FunctionId::CpuOn64 => {
                    assert!(w0 < 0, "CPU_ON answered {w0}")
                }
                FunctionId::AffinityInfo32 | FunctionId::AffinityInfo64 => {
                    assert!(
                        w0 < 0 || (0..=2).contains(&w0),
                        "AFFINITY_INFO answered {w0}"
                    )
                }
                _ => {}
            }
            assert_eq!(
                fw.power_state(call.vcpu),
                before,
                "{fid} returned but changed the caller"
            );
        }
        CallOutcome::PowerOff => {
            assert!(
                matches!(fid, Some(FunctionId::CpuOff | FunctionId::CpuFreeze)),
                "{fid:?} powered off"
            );
            assert_eq!(before, PowerState::On);
            let expected = if fid == Some(FunctionId::CpuOff) {
                PowerState::Off
            } else {
                PowerState::Frozen
            };
            assert_eq!(fw.power_state(call.vcpu), expected);
        }
        CallOutcome::Suspend { kind } => {
            assert!(
                matches!(
                    fid,
                    Some(
                        FunctionId::CpuSuspend32
                            | FunctionId::CpuSuspend64
                            | FunctionId::CpuDefaultSuspend32
                            | FunctionId::CpuDefaultSuspend64
                            | FunctionId::SystemSuspend32
                            | FunctionId::SystemSuspend64
                    )
                ),
                "{fid:?} suspended"
            );
            assert_eq!(before, PowerState::On);
            assert_eq!(fw.power_state(call.vcpu), PowerState::Suspended { kind });
            if kind == SuspendKind::System {
                for i in 0..fw.vcpu_count() {
                    let v = VcpuId::new(i as u32);
                    if v != call.vcpu {
                        assert_eq!(
                            fw.power_state(v),
                            PowerState::Off,
                            "system suspend with {v:?} not off"
                        );
                    }
                }
            }
        }
        CallOutcome::SystemEvent { .. } => {
            assert!(
                matches!(
                    fid,
                    Some(
                        FunctionId::SystemOff
                            | FunctionId::SystemReset
                            | FunctionId::SystemOff2_32
                            | FunctionId::SystemOff2_64
                            | FunctionId::SystemReset2_32
                            | FunctionId::SystemReset2_64
                    )
                ),
                "{fid:?} raised a system event"
            );
        }
    }
}
