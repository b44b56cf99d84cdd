//! Property tests: arbitrary guest registers never panic and only produce spec-defined
//! codes; PSCI_FEATURES agrees with dispatch; random operation sequences on N vCPUs agree
//! with a simple reference model of the power-state machine.

mod common;

use common::*;
use proptest::prelude::*;
use vpsci_firmware::{
    CallOutcome, Conduit, FeatureSet, Firmware, FirmwareConfig, FunctionId, GuestCall, Mpidr,
    OnPending, PowerState, PowerStateFormat, PsciError, PsciVersion, Service, SuspendKind,
    Transition, VcpuId, WakeOutcome,
};

// ---------- generators ----------

fn any_version() -> impl Strategy<Value = PsciVersion> {
    prop::sample::select(PsciVersion::ALL.to_vec())
}

fn any_features() -> impl Strategy<Value = FeatureSet> {
    prop::array::uniform11(any::<bool>()).prop_map(|b| FeatureSet {
        system_suspend: b[0],
        system_off2: b[1],
        system_reset2: b[2],
        mem_protect: b[3],
        cpu_freeze: b[4],
        cpu_default_suspend: b[5],
        node_hw_state: b[6],
        os_initiated: b[7],
        stats: b[8],
        trng: b[9],
        soc_id: b[10],
    })
}

fn any_config() -> impl Strategy<Value = FirmwareConfig> {
    (any_version(), any_features(), any::<bool>(), any::<bool>()).prop_map(
        |(v, f, smc, original)| {
            let mut c = FirmwareConfig {
                psci_version: v,
                conduit: if smc { Conduit::Smc } else { Conduit::Hvc },
                features: f,
                ..FirmwareConfig::default()
            };
            if original {
                c.suspend_states.format = PowerStateFormat::Original;
            }
            c
        },
    )
}

/// A function ID: mostly known ones, sometimes anything (upper half of x0 random too).
fn any_fid() -> impl Strategy<Value = u64> {
    let known: Vec<u32> = FunctionId::ALL.iter().map(|f| f.raw()).collect();
    (
        prop_oneof![
            4 => prop::sample::select(known),
            1 => any::<u32>(),
            1 => 0x8400_0000u32..0x8400_0060,
        ],
        prop_oneof![3 => Just(0u32), 1 => any::<u32>()],
    )
        .prop_map(|(lo, hi)| (u64::from(hi) << 32) | u64::from(lo))
}

/// An argument: mostly interesting values, sometimes anything.
fn any_arg() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => any::<u64>(),
        1 => 0u64..4,
        1 => Just(1u64 << 30),
        1 => (0u32..20).prop_map(|i| Mpidr::from_index(i).raw()),
        1 => RAM - 8..RAM + 16,
        1 => Just(RAM_END - 4),
        1 => any::<u32>().prop_map(|x| 0xFFFF_FFFF_0000_0000 | u64::from(x)),
    ]
}

fn any_regs() -> impl Strategy<Value = [u64; 4]> {
    (any_fid(), any_arg(), any_arg(), any_arg()).prop_map(|(a, b, c, d)| [a, b, c, d])
}

// ---------- spec-defined codes ----------

const NS: i64 = -1;

/// Negative x0 values each function may return (besides NOT_SUPPORTED, which any function
/// returns when it is not offered), per DEN0022 F.b §5.1 / DEN0028 §7 / DEN0098 §2.
fn allowed_errors(fid: FunctionId) -> &'static [i64] {
    use FunctionId as F;
    match fid {
        F::CpuSuspend32 | F::CpuSuspend64 => &[-2, -3, -9],
        F::CpuOff | F::CpuFreeze => &[-3],
        F::CpuOn32 | F::CpuOn64 => &[-2, -4, -5, -6, -9],
        F::AffinityInfo32 | F::AffinityInfo64 | F::NodeHwState32 | F::NodeHwState64 => &[-2],
        F::SystemOff2_32 | F::SystemOff2_64 | F::SystemReset2_32 | F::SystemReset2_64 => &[-2, -3],
        F::MemProtectCheckRange32 | F::MemProtectCheckRange64 => &[-3],
        F::CpuDefaultSuspend32 | F::CpuDefaultSuspend64 => &[-3, -9],
        F::SystemSuspend32 | F::SystemSuspend64 => &[-3, -9],
        F::SetSuspendMode => &[-2, -3],
        F::SystemOff | F::SystemReset => &[-3],
        // SMCCC_ARCH_FEATURES: NOT_REQUIRED for workaround answers.
        F::SmcccArchFeatures => &[-2],
        F::SmcccArchSocId => &[-3],
        // TRNG: INVALID_PARAMETERS, NO_ENTROPY.
        F::TrngRnd32 | F::TrngRnd64 => &[-2, -3],
        _ => &[],
    }
}

fn on_vcpus(fw: &Firmware) -> Vec<u32> {
    (0..fw.vcpu_count() as u32)
        .filter(|&i| fw.power_state(VcpuId::new(i)) == PowerState::On)
        .collect()
}

fn check_outcome(call: &GuestCall, outcome: &CallOutcome) -> Result<(), TestCaseError> {
    let fid = FunctionId::try_from(call.regs[0] as u32);
    match outcome {
        CallOutcome::Return { regs } => {
            // Read a PSCI x0 the way a guest reads a return code: a signed 32-bit value in
            // w0 (DEN0022 F.b §5.2.2), so a zero-extended error still counts as an error.
            // Statistics and the other services' results may use all bits.
            let counts = matches!(
                fid,
                Ok(FunctionId::StatResidency32
                    | FunctionId::StatResidency64
                    | FunctionId::StatCount32
                    | FunctionId::StatCount64)
            );
            let psci = fid.is_ok_and(|f| f.service() == Service::Psci);
            let code = if psci && !counts {
                i64::from(regs[0] as u32 as i32)
            } else {
                regs[0] as i64
            };
            match fid {
                Err(_) => prop_assert_eq!(code, NS, "unknown function must be NOT_SUPPORTED"),
                Ok(fid) => {
                    if code < 0 {
                        let allowed = allowed_errors(fid);
                        prop_assert!(
                            code == NS || allowed.contains(&code),
                            "{} returned {} (allowed {:?})",
                            fid,
                            code,
                            allowed
                        );
                    }
                    if code < 0 && psci && !counts {
                        // SMCCC returns errors sign-extended to 64 bits in x0.
                        prop_assert_eq!(
                            regs[0],
                            code as u64,
                            "error {:#x} not sign-extended",
                            regs[0]
                        );
                        prop_assert!(PsciError::from_register(regs[0]).is_some());
                    }
                    let defines_x1_x3 = matches!(
                        fid,
                        FunctionId::TrngGetUuid | FunctionId::TrngRnd32 | FunctionId::TrngRnd64
                    );
                    if !defines_x1_x3 {
                        prop_assert_eq!(&regs[1..], &call.regs[1..], "x1..x3 must be preserved");
                    }
                }
            }
        }
        CallOutcome::PowerOff => prop_assert!(matches!(
            fid,
            Ok(FunctionId::CpuOff | FunctionId::CpuFreeze)
        )),
        CallOutcome::Suspend { kind } => {
            let ok = match kind {
                SuspendKind::System => matches!(
                    fid,
                    Ok(FunctionId::SystemSuspend32 | FunctionId::SystemSuspend64)
                ),
                _ => matches!(
                    fid,
                    Ok(FunctionId::CpuSuspend32
                        | FunctionId::CpuSuspend64
                        | FunctionId::CpuDefaultSuspend32
                        | FunctionId::CpuDefaultSuspend64)
                ),
            };
            prop_assert!(ok, "{:?} from {:?}", kind, fid);
        }
        CallOutcome::SystemEvent { .. } => {
            prop_assert!(matches!(
                fid,
                Ok(FunctionId::SystemOff
                    | FunctionId::SystemReset
                    | FunctionId::SystemOff2_32
                    | FunctionId::SystemOff2_64
                    | FunctionId::SystemReset2_32
                    | FunctionId::SystemReset2_64)
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary register values, configurations, conduits and caller states: no panic, and
    /// only the codes the spec defines for the function called.
    #[test]
    fn arbitrary_registers_never_panic_and_return_only_spec_codes(
        config in any_config(),
        cpus in 1u32..6,
        calls in prop::collection::vec((any_regs(), any::<bool>(), any::<bool>(), any::<u8>()), 1..24),
    ) {
        let (fw, p) = fw_with(config, cpus);
        for (regs, aarch32, wrong_conduit, pick) in calls {
            let on = on_vcpus(&fw);
            let Some(&vcpu) = on.get(usize::from(pick) % on.len().max(1)) else {
                fw.reset();
                continue;
            };
            let conduit = match (config.conduit, wrong_conduit) {
                (c, false) => c,
                (Conduit::Hvc, true) => Conduit::Smc,
                (Conduit::Smc, true) => Conduit::Hvc,
            };
            let c = GuestCall { vcpu: VcpuId::new(vcpu), conduit, regs, caller_aarch32: aarch32 };
            let outcome = fw.handle_call(&c, &p);
            check_outcome(&c, &outcome)?;
            if wrong_conduit {
                prop_assert_eq!(outcome, CallOutcome::Return { regs: [u64::MAX, regs[1], regs[2], regs[3]] });
            }
            if matches!(outcome, CallOutcome::SystemEvent { .. }) {
                // The VM stopped; the engine decides nothing more until the VMM resets it.
                prop_assert!(fw.is_halted());
                fw.reset();
            }
            // Let suspended and started vCPUs move on so later calls see varied states.
            for i in 0..cpus {
                if pick & 1 == 0 {
                    fw.vcpu_started(VcpuId::new(i), &p);
                }
                if pick & 2 == 0 {
                    let _ = fw.vcpu_woken(VcpuId::new(i), &p);
                }
            }
        }
    }

    /// PSCI_FEATURES says "supported" exactly for the functions that do not answer
    /// NOT_SUPPORTED (for any arguments).
    #[test]
    fn psci_features_agrees_with_dispatch(
        config in any_config(),
        aarch32 in any::<bool>(),
        args in prop::array::uniform3(any_arg()),
        extra in any::<u32>(),
    ) {
        let mut queried: Vec<u32> = FunctionId::ALL.iter().map(|f| f.raw()).collect();
        queried.push(extra);
        for id in queried {
            let (fw, p) = fw_with(config, 2);
            let mk = |regs| GuestCall { vcpu: VcpuId::new(0), conduit: config.conduit, regs, caller_aarch32: aarch32 };
            let features = match fw.handle_call(&mk([0x8400_000A, u64::from(id), 0, 0]), &p) {
                CallOutcome::Return { regs } => regs[0],
                other => return Err(TestCaseError::fail(format!("PSCI_FEATURES gave {other:?}"))),
            };
            if config.psci_version < PsciVersion::V1_0 {
                prop_assert_eq!(features, u64::MAX, "PSCI_FEATURES does not exist in 0.2");
                continue;
            }
            let is_psci = FunctionId::try_from(id)
                .map(|f| f.service() == Service::Psci || f == FunctionId::SmcccVersion)
                .unwrap_or(false);
            if !is_psci {
                prop_assert_eq!(features, u64::MAX, "{:#x} is not a PSCI function", id);
                continue;
            }
            // PSCI_FEATURES answers NOT_SUPPORTED about other functions; probe it with a
            // query whose answer is never NOT_SUPPORTED, so -1 can only mean "not offered".
            let mut args = args;
            if id == FunctionId::PsciFeatures.raw() {
                args[0] = u64::from(FunctionId::PsciVersion.raw());
            }
            let outcome = fw.handle_call(&mk([u64::from(id), args[0], args[1], args[2]]), &p);
            let not_supported = outcome == CallOutcome::Return { regs: [u64::MAX, args[0], args[1], args[2]] };
            prop_assert_eq!(features == u64::MAX, not_supported, "{:#x}: features {:#x}, call {:?}", id, features, outcome);
        }
    }
}

// ---------- reference model ----------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    Off,
    Pending,
    On,
    Standby,
    Powerdown,
    System,
    Frozen,
}

impl M {
    fn power_state(self) -> PowerState {
        match self {
            M::Off => PowerState::Off,
            M::Pending => PowerState::OnPending,
            M::On => PowerState::On,
            M::Standby => PowerState::Suspended {
                kind: SuspendKind::Standby,
            },
            M::Powerdown => PowerState::Suspended {
                kind: SuspendKind::Powerdown,
            },
            M::System => PowerState::Suspended {
                kind: SuspendKind::System,
            },
            M::Frozen => PowerState::Frozen,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    CpuOn {
        caller: u8,
        target: u8,
        good_entry: bool,
    },
    Started {
        vcpu: u8,
    },
    CpuOff {
        caller: u8,
    },
    Suspend {
        caller: u8,
        powerdown: bool,
    },
    Wake {
        vcpu: u8,
    },
    SystemSuspend {
        caller: u8,
    },
    Freeze {
        caller: u8,
    },
    AffinityInfo {
        caller: u8,
        target: u8,
    },
    Reset,
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>(), prop::bool::weighted(0.9))
            .prop_map(|(caller, target, good_entry)| Op::CpuOn { caller, target, good_entry }),
        3 => any::<u8>().prop_map(|vcpu| Op::Started { vcpu }),
        2 => any::<u8>().prop_map(|caller| Op::CpuOff { caller }),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(caller, powerdown)| Op::Suspend { caller, powerdown }),
        3 => any::<u8>().prop_map(|vcpu| Op::Wake { vcpu }),
        1 => any::<u8>().prop_map(|caller| Op::SystemSuspend { caller }),
        1 => any::<u8>().prop_map(|caller| Op::Freeze { caller }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(caller, target)| Op::AffinityInfo { caller, target }),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random operation sequences on N vCPUs, in both CPU_ON answer modes: every outcome
    /// and every vCPU's state match a simple reference model, each OFF -> ON transition
    /// produced exactly one SUCCESS and one start request, and the transitions the engine
    /// reported for each operation are exactly the model's changes.
    #[test]
    fn random_sequences_agree_with_reference_model(
        n in 1usize..7,
        reported in any::<bool>(),
        ops in prop::collection::vec(any_op(), 1..60),
    ) {
        let mode = if reported { OnPending::Reported } else { OnPending::Hidden };
        let (fw, p) = fw_with(FirmwareConfig { on_pending: mode, ..FirmwareConfig::default() }, n as u32);
        let mut model = vec![M::Off; n];
        model[0] = M::On;
        let mut successes = 0usize;
        let pick_on = |model: &[M], sel: u8| {
            let on: Vec<usize> = (0..model.len()).filter(|&i| model[i] == M::On).collect();
            on.get(usize::from(sel) % on.len().max(1)).copied()
        };
        for op in ops {
            let model_before = model.clone();
            let reported_before = p.transitions().len();
            let mut returned = Vec::new();
            match op {
                Op::CpuOn { caller, target, good_entry } => {
                    let Some(c) = pick_on(&model, caller) else { continue };
                    let t = usize::from(target) % n;
                    let entry = if good_entry { RAM + 0x1000 } else { RAM_END };
                    let got = x0(&fw, &p, c as u32, FunctionId::CpuOn64, Mpidr::from_index(t as u32).raw(), entry, t as u64);
                    let want = if !good_entry {
                        PsciError::InvalidAddress.to_register()
                    } else {
                        match model[t] {
                            M::Off => { model[t] = M::Pending; successes += 1; 0 }
                            M::Pending if mode == OnPending::Reported => PsciError::OnPending.to_register(),
                            _ => PsciError::AlreadyOn.to_register(),
                        }
                    };
                    prop_assert_eq!(got, want);
                }
                Op::Started { vcpu } => {
                    let v = usize::from(vcpu) % n;
                    let started = fw.vcpu_started(VcpuId::new(v as u32), &p);
                    prop_assert_eq!(started, model[v] == M::Pending);
                    if model[v] == M::Pending { model[v] = M::On; }
                }
                Op::CpuOff { caller } => {
                    let Some(c) = pick_on(&model, caller) else { continue };
                    prop_assert_eq!(fw.handle_call(&call(c as u32, FunctionId::CpuOff, 0, 0, 0), &p), CallOutcome::PowerOff);
                    model[c] = M::Off;
                }
                Op::Freeze { caller } => {
                    let Some(c) = pick_on(&model, caller) else { continue };
                    prop_assert_eq!(fw.handle_call(&call(c as u32, FunctionId::CpuFreeze, 0, 0, 0), &p), CallOutcome::PowerOff);
                    model[c] = M::Frozen;
                }
                Op::Suspend { caller, powerdown } => {
                    let Some(c) = pick_on(&model, caller) else { continue };
                    let ps = if powerdown { 1 << 30 } else { 0 };
                    let got = fw.handle_call(&call(c as u32, FunctionId::CpuSuspend64, ps, RAM, c as u64), &p);
                    let kind = if powerdown { SuspendKind::Powerdown } else { SuspendKind::Standby };
                    prop_assert_eq!(got, CallOutcome::Suspend { kind });
                    model[c] = if powerdown { M::Powerdown } else { M::Standby };
                }
                Op::SystemSuspend { caller } => {
                    let Some(c) = pick_on(&model, caller) else { continue };
                    let got = fw.handle_call(&call(c as u32, FunctionId::SystemSuspend64, RAM, 0, 0), &p);
                    if (0..n).all(|i| i == c || model[i] == M::Off) {
                        prop_assert_eq!(got, CallOutcome::Suspend { kind: SuspendKind::System });
                        model[c] = M::System;
                    } else {
                        prop_assert_eq!(got, CallOutcome::Return { regs: [PsciError::Denied.to_register(), RAM, 0, 0] });
                    }
                }
                Op::Wake { vcpu } => {
                    let v = usize::from(vcpu) % n;
                    let got = fw.vcpu_woken(VcpuId::new(v as u32), &p);
                    match model[v] {
                        M::Standby => {
                            let ok = matches!(got, WakeOutcome::Return { regs } if regs[0] == 0);
                            prop_assert!(ok, "standby wake gave {:?}", got);
                        }
                        M::Powerdown => {
                            let ok = matches!(got, WakeOutcome::ResumeAt { entry } if entry.context_id == v as u64);
                            prop_assert!(ok, "powerdown wake gave {:?}", got);
                        }
                        M::System => {
                            let ok = matches!(got, WakeOutcome::ResumeAt { entry } if entry.pc == RAM);
                            prop_assert!(ok, "system wake gave {:?}", got);
                        }
                        _ => prop_assert_eq!(got, WakeOutcome::NotSuspended),
                    }
                    if matches!(model[v], M::Standby | M::Powerdown | M::System) { model[v] = M::On; }
                }
                Op::AffinityInfo { caller, target } => {
                    let Some(c) = pick_on(&model, caller) else { continue };
                    let t = usize::from(target) % n;
                    let got = x0(&fw, &p, c as u32, FunctionId::AffinityInfo64, Mpidr::from_index(t as u32).raw(), 0, 0);
                    let want = match (model[t], mode) {
                        (M::Off, _) => 1,
                        (M::Pending, OnPending::Reported) => 2,
                        _ => 0,
                    };
                    prop_assert_eq!(got, want);
                }
                Op::Reset => {
                    returned = fw.reset();
                    model = vec![M::Off; n];
                    model[0] = M::On;
                }
            }
            for (i, m) in model.iter().enumerate() {
                prop_assert_eq!(fw.power_state(VcpuId::new(i as u32)), m.power_state(), "vCPU {}", i);
            }
            let mut reported: Vec<Transition> = p.transitions().split_off(reported_before);
            reported.extend(returned);
            reported.sort_by_key(|t| t.vcpu);
            let expected: Vec<Transition> = (0..n)
                .filter(|&i| model_before[i] != model[i])
                .map(|i| Transition {
                    vcpu: VcpuId::new(i as u32),
                    from: model_before[i].power_state(),
                    to: model[i].power_state(),
                })
                .collect();
            prop_assert_eq!(reported, expected, "transitions reported for one operation");
        }
        prop_assert_eq!(p.starts().len(), successes, "one start request per SUCCESS");
    }
}

/// `outcome` with every register above `args` that still holds the caller's value cleared,
/// so answers to calls that differ only there compare equal.
fn ignoring_unread(outcome: CallOutcome, input: &[u64; 4], args: usize) -> CallOutcome {
    match outcome {
        CallOutcome::Return { mut regs } => {
            for i in (args + 1)..4 {
                if regs[i] == input[i] {
                    regs[i] = 0;
                }
            }
            CallOutcome::Return { regs }
        }
        other => other,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The function table's argument counts are what dispatch really reads, so a VMM may
    /// skip reading the other registers: changing a register above a function's
    /// `arg_count` never changes the answer, and such a register is handed back unchanged.
    #[test]
    fn registers_beyond_the_argument_count_never_change_the_answer(
        config in any_config(),
        pick in any::<prop::sample::Index>(),
        args in prop::array::uniform3(any_arg()),
        garbage in prop::array::uniform3(any::<u64>()),
    ) {
        let fid = *pick.get(FunctionId::ALL);
        let n = fid.arg_count();
        let mut a = [u64::from(fid.raw()), args[0], args[1], args[2]];
        let mut b = a;
        b[(n + 1)..].copy_from_slice(&garbage[n..]);
        // Zero where the VMM would not read: what it hands the engine.
        for r in a.iter_mut().skip(n + 1) {
            *r = 0;
        }
        let (fw_a, p_a) = fw_with(config, 2);
        let (fw_b, p_b) = fw_with(config, 2);
        let mk = |regs| GuestCall { vcpu: VcpuId::new(0), conduit: config.conduit, regs, caller_aarch32: false };
        let out_a = fw_a.handle_call(&mk(a), &p_a);
        let out_b = fw_b.handle_call(&mk(b), &p_b);
        if let CallOutcome::Return { regs } = out_b {
            for i in (n + 1)..4 {
                let defines = matches!(fid, FunctionId::TrngGetUuid | FunctionId::TrngRnd32 | FunctionId::TrngRnd64);
                if !defines {
                    prop_assert_eq!(regs[i], b[i], "{}: x{} changed", fid, i);
                }
            }
        }
        prop_assert_eq!(ignoring_unread(out_a, &a, n), ignoring_unread(out_b, &b, n), "{}", fid);
    }
}
