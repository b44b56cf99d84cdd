//! The vCPU thread's exit handling and the platform's one verdict, driven natively by a
//! scripted fake vCPU: the same `VcpuRunner` and `VmPlatform` `vpsci run` uses on KVM, with
//! `KVM_RUN` replaced by a list of exits. Each test checks what the guest would see (its
//! registers, MP state, where it starts), what the VM does (stop reason, start requests)
//! and what the event log says.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use vpsci::cli::HibernateAction;
use vpsci::events::{Event, EventSink};
use vpsci::vcpu::{
    Kick, Mmio, PsciBackend, StopReason, VcpuOps, VcpuRunner, VmControl, VmPlatform,
};
use vpsci_firmware::{
    Firmware, FirmwareConfig, MemoryRegion, Mpidr, PowerState, SystemEvent, VcpuId,
};
use vpsci_kvm::{CoreReg, KvmError, MpState, SystemEventKind, VcpuExit};

const RAM: u64 = 0x4000_0000;
const ENTRY: u64 = RAM + 0x1000;
const INTERNAL_FAILURE: u64 = -6i64 as u64;
const NOT_SUPPORTED: u64 = u64::MAX;

/// Everything the fake vCPU was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Get(CoreReg),
    Set(CoreReg, u64),
    StartAt { entry: u64, context_id: u64 },
    MpState(MpState),
    SmcccResult([u64; 4]),
    MmioData(Vec<u8>),
    Run,
}

#[derive(Debug, Default)]
struct FakeState {
    x: [u64; 31],
    ops: Vec<Op>,
}

/// A vCPU whose `run` returns the scripted exits one by one; when the script is used up
/// it stops the VM (as the operator's timeout would) and reports an interruption. An
/// injected fault makes one operation fail the way a KVM ioctl does.
struct FakeVcpu {
    index: usize,
    script: VecDeque<VcpuExit>,
    control: Arc<VmControl>,
    state: Arc<Mutex<FakeState>>,
    fault: Option<Fault>,
}

/// Which operation fails, as its ioctl would (EIO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `KVM_RUN`.
    Run,
    /// `KVM_GET_ONE_REG`.
    GetReg,
    /// `KVM_SET_ONE_REG`.
    SetReg,
    /// `KVM_SET_MP_STATE`.
    SetMpState,
    /// `KVM_ARM_VCPU_INIT` (a start).
    Init,
}

impl Fault {
    fn ioctl(self) -> &'static str {
        match self {
            Fault::Run => "KVM_RUN",
            Fault::GetReg => "KVM_GET_ONE_REG",
            Fault::SetReg => "KVM_SET_ONE_REG",
            Fault::SetMpState => "KVM_SET_MP_STATE",
            Fault::Init => "KVM_ARM_VCPU_INIT",
        }
    }
}

impl FakeVcpu {
    fn inject(&self, fault: Fault) -> Result<(), KvmError> {
        if self.fault == Some(fault) {
            return Err(KvmError::Ioctl {
                op: fault.ioctl(),
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        Ok(())
    }

    fn log(&self, op: Op) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ops
            .push(op);
    }
}

fn x_index(reg: CoreReg) -> Option<usize> {
    match reg {
        CoreReg::X(n) if n <= 30 => Some(usize::from(n)),
        _ => None,
    }
}

impl VcpuOps for FakeVcpu {
    fn index(&self) -> usize {
        self.index
    }
    fn bind_current_thread(&mut self) {}
    fn run(&mut self) -> Result<VcpuExit, KvmError> {
        self.inject(Fault::Run)?;
        self.log(Op::Run);
        match self.script.pop_front() {
            Some(exit) => Ok(exit),
            None => {
                self.control.stop(StopReason::Timeout {
                    after: std::time::Duration::ZERO,
                });
                Ok(VcpuExit::Interrupted)
            }
        }
    }
    fn get_core(&self, reg: CoreReg) -> Result<u64, KvmError> {
        self.inject(Fault::GetReg)?;
        self.log(Op::Get(reg));
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(x_index(reg).map_or(0, |i| st.x[i]))
    }
    fn set_core(&self, reg: CoreReg, value: u64) -> Result<(), KvmError> {
        self.inject(Fault::SetReg)?;
        self.log(Op::Set(reg, value));
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = x_index(reg) {
            st.x[i] = value;
        }
        Ok(())
    }
    fn start_at(&self, entry: u64, context_id: u64) -> Result<(), KvmError> {
        self.inject(Fault::Init)?;
        self.log(Op::StartAt { entry, context_id });
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.x = [0; 31];
        st.x[0] = context_id;
        Ok(())
    }
    fn set_mp_state(&self, state: MpState) -> Result<(), KvmError> {
        self.inject(Fault::SetMpState)?;
        self.log(Op::MpState(state));
        Ok(())
    }
    fn set_smccc_result(&self, regs: [u64; 4]) -> Result<(), KvmError> {
        self.log(Op::SmcccResult(regs));
        Ok(())
    }
    fn complete_mmio_read(&mut self, data: &[u8]) {
        self.log(Op::MmioData(data.to_vec()));
    }
}

struct NoKick;

impl Kick for NoKick {
    fn kick(&self) {}
}

/// Keeps every event as its JSON form.
#[derive(Default)]
struct Log(Mutex<Vec<Value>>);

impl EventSink for Log {
    fn enabled(&self) -> bool {
        true
    }
    fn record(&self, event: &Event<'_>) {
        let value = serde_json::to_value(event).unwrap_or(Value::Null);
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value);
    }
}

impl Log {
    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|v| v["kind"] == kind)
            .cloned()
            .collect()
    }
}

/// A device bus that answers every load with 0xAB and records stores.
#[derive(Default)]
struct RecordingBus(Mutex<Vec<(u64, Vec<u8>)>>);

impl Mmio for RecordingBus {
    fn read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xAB);
    }
    fn write(&self, addr: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((addr, data.to_vec()));
    }
}

/// One VM with `cpus` vCPUs whose vCPU threads can be run one at a time.
struct Vm {
    fw: Arc<Firmware>,
    control: Arc<VmControl>,
    platform: Arc<VmPlatform>,
    log: Arc<Log>,
    bus: Arc<RecordingBus>,
}

impl Vm {
    fn new(cpus: u32, on_hibernate: HibernateAction) -> Vm {
        let fw = Firmware::new(
            FirmwareConfig::default(),
            (0..cpus).map(Mpidr::from_index).collect(),
            vec![MemoryRegion {
                base: RAM,
                size: 0x100_0000,
            }],
        )
        .expect("valid firmware");
        let control = Arc::new(VmControl::new(
            (0..cpus)
                .map(|_| Box::new(NoKick) as Box<dyn Kick>)
                .collect(),
        ));
        let log = Arc::new(Log::default());
        let platform = Arc::new(VmPlatform::new(
            Arc::clone(&control),
            Arc::clone(&log) as Arc<dyn EventSink>,
            on_hibernate,
        ));
        Vm {
            fw: Arc::new(fw),
            control,
            platform,
            log,
            bus: Arc::new(RecordingBus::default()),
        }
    }

    /// Runs vCPU `index` through `script` (with x registers preset to `x`) on this thread
    /// until the VM stops; returns what the vCPU was asked to do and its final x registers.
    fn run(&self, index: usize, x: &[(u8, u64)], script: Vec<VcpuExit>) -> FakeState {
        self.run_with(index, x, script, PsciBackend::Engine(Arc::clone(&self.fw)))
    }

    fn run_with(
        &self,
        index: usize,
        x: &[(u8, u64)],
        script: Vec<VcpuExit>,
        psci: PsciBackend,
    ) -> FakeState {
        self.run_faulty(index, x, script, psci, None)
    }

    fn run_faulty(
        &self,
        index: usize,
        x: &[(u8, u64)],
        script: Vec<VcpuExit>,
        psci: PsciBackend,
        fault: Option<Fault>,
    ) -> FakeState {
        let state = Arc::new(Mutex::new(FakeState::default()));
        for &(n, v) in x {
            state.lock().unwrap_or_else(PoisonError::into_inner).x[usize::from(n)] = v;
        }
        let vcpu = FakeVcpu {
            index,
            script: script.into(),
            control: Arc::clone(&self.control),
            state: Arc::clone(&state),
            fault,
        };
        VcpuRunner::new(
            vcpu,
            Arc::clone(&self.control),
            Arc::clone(&self.platform),
            psci,
            Arc::clone(&self.bus) as Arc<dyn Mmio>,
            Arc::clone(&self.log) as Arc<dyn EventSink>,
        )
        .run();
        let st = state.lock().unwrap_or_else(PoisonError::into_inner);
        FakeState {
            x: st.x,
            ops: st.ops.clone(),
        }
    }

    fn stop_reason(&self) -> StopReason {
        self.control
            .wait_stopped(Some(std::time::Duration::from_secs(5)))
    }
}

fn hvc(function_id: u32) -> VcpuExit {
    VcpuExit::Hypercall {
        function_id,
        smc: false,
    }
}

fn reads(ops: &[Op]) -> Vec<CoreReg> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Get(r) => Some(*r),
            _ => None,
        })
        .collect()
}

fn writes(ops: &[Op]) -> Vec<(CoreReg, u64)> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Set(r, v) => Some((*r, *v)),
            _ => None,
        })
        .collect()
}

#[test]
fn psci_version_reads_no_argument_register_and_writes_only_x0() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let ran = vm.run(0, &[(1, 11), (2, 22), (3, 33)], vec![hvc(0x8400_0000)]);
    assert_eq!(reads(&ran.ops), vec![], "PSCI_VERSION takes no arguments");
    assert_eq!(writes(&ran.ops), vec![(CoreReg::X(0), 0x1_0003)]);
    assert_eq!(&ran.x[1..4], &[11, 22, 33], "x1..x3 untouched");
    let calls = vm.log.of_kind("psci_call");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"], "PSCI_VERSION");
    assert_eq!(calls[0]["result"]["x0"], 0x1_0003);
}

#[test]
fn an_unknown_function_is_not_supported_without_reading_any_register() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let ran = vm.run(0, &[(1, 5)], vec![hvc(0x8400_0042)]);
    assert_eq!(reads(&ran.ops), vec![]);
    assert_eq!(writes(&ran.ops), vec![(CoreReg::X(0), NOT_SUPPORTED)]);
    assert_eq!(vm.log.of_kind("psci_call")[0]["function"], "UNKNOWN");
}

#[test]
fn cpu_on_reads_its_three_arguments_and_the_engine_logs_the_targets_step() {
    let vm = Vm::new(2, HibernateAction::PowerOff);
    let ran = vm.run(0, &[(1, 1), (2, ENTRY), (3, 0x2A)], vec![hvc(0xC400_0003)]);
    assert_eq!(
        reads(&ran.ops),
        vec![CoreReg::X(1), CoreReg::X(2), CoreReg::X(3)]
    );
    assert_eq!(ran.x[0], 0, "SUCCESS");
    assert_eq!(vm.fw.power_state(VcpuId::new(1)), PowerState::OnPending);
    let steps = vm.log.of_kind("power_state");
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(
        (&steps[0]["vcpu"], &steps[0]["from"], &steps[0]["to"]),
        (
            &Value::from(1),
            &Value::from("off"),
            &Value::from("on_pending")
        )
    );
}

#[test]
fn a_started_vcpu_is_reset_at_its_entry_with_the_context_id_before_it_runs() {
    let vm = Vm::new(2, HibernateAction::PowerOff);
    // vCPU 0's CPU_ON, straight through the engine: the start request is queued.
    vm.run(0, &[(1, 1), (2, ENTRY), (3, 0x77)], vec![hvc(0xC400_0003)]);
    assert_eq!(
        vm.fw.pending_start(VcpuId::new(1)).map(|e| e.pc),
        Some(ENTRY)
    );
    // The VM was stopped when vCPU 0's script ended; a fresh control for vCPU 1's turn.
    let vm1 = Vm {
        fw: Arc::clone(&vm.fw),
        ..Vm::new(2, HibernateAction::PowerOff)
    };
    let entry = vm.fw.pending_start(VcpuId::new(1)).expect("pending start");
    vm1.control.request_start(1, entry);
    let ran = vm1.run(1, &[], vec![hvc(0x8400_0000)]);
    assert_eq!(
        ran.ops.first(),
        Some(&Op::StartAt {
            entry: ENTRY,
            context_id: 0x77
        }),
        "reset at the entry before anything else: {:?}",
        ran.ops
    );
    assert_eq!(ran.ops.get(1), Some(&Op::Run));
    assert_eq!(vm.fw.power_state(VcpuId::new(1)), PowerState::On);
    let steps = vm1.log.of_kind("power_state");
    assert_eq!(
        (&steps[0]["from"], &steps[0]["to"]),
        (&Value::from("on_pending"), &Value::from("on"))
    );
}

#[test]
fn a_start_request_the_engine_no_longer_stands_behind_is_dropped() {
    let vm = Vm::new(2, HibernateAction::PowerOff);
    // A start request for a vCPU the engine holds OFF (as after a VM reset).
    vm.control.request_start(
        1,
        vpsci_firmware::EntryPoint {
            pc: ENTRY,
            context_id: 1,
            aarch32: false,
        },
    );
    // vCPU 1's thread takes the request, the engine refuses it, and the vCPU stays parked
    // (it never runs); once the request is gone the VM is stopped from outside.
    let runner = {
        let vm_fw = Arc::clone(&vm.fw);
        let control = Arc::clone(&vm.control);
        let platform = Arc::clone(&vm.platform);
        let log = Arc::clone(&vm.log);
        let bus = Arc::clone(&vm.bus);
        let state = Arc::new(Mutex::new(FakeState::default()));
        let seen = Arc::clone(&state);
        let handle = std::thread::spawn(move || {
            let vcpu = FakeVcpu {
                index: 1,
                script: VecDeque::from(vec![hvc(0x8400_0000)]),
                control: Arc::clone(&control),
                state,
                fault: None,
            };
            VcpuRunner::new(
                vcpu,
                control,
                platform,
                PsciBackend::Engine(vm_fw),
                bus as Arc<dyn Mmio>,
                log as Arc<dyn EventSink>,
            )
            .run();
        });
        (handle, seen)
    };
    while vm.control.start_pending(1) {
        std::thread::yield_now();
    }
    vm.control.stop(StopReason::Timeout {
        after: std::time::Duration::ZERO,
    });
    runner.0.join().expect("vCPU 1 thread");
    let ops = runner
        .1
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .ops
        .clone();
    assert!(
        ops.is_empty(),
        "the dropped start touched the vCPU: {ops:?}"
    );
    assert_eq!(vm.fw.power_state(VcpuId::new(1)), PowerState::Off);
}

#[test]
fn system_off_stops_the_vm_with_the_engines_event() {
    let vm = Vm::new(2, HibernateAction::PowerOff);
    let ran = vm.run(0, &[], vec![hvc(0x8400_0008), hvc(0x8400_0000)]);
    assert_eq!(
        vm.stop_reason(),
        StopReason::Firmware {
            vcpu: 0,
            event: SystemEvent::Off
        }
    );
    assert_eq!(
        ran.ops.iter().filter(|op| **op == Op::Run).count(),
        1,
        "the caller never re-enters the guest"
    );
    let events = vm.log.of_kind("system_event");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "off");
}

#[test]
fn a_refused_hibernate_returns_internal_failure_and_the_vm_runs_on() {
    let vm = Vm::new(1, HibernateAction::Refuse);
    let ran = vm.run(
        0,
        &[(1, 1), (2, 0)],
        vec![hvc(0xC400_0015), hvc(0x8400_0000)],
    );
    let w = writes(&ran.ops);
    assert_eq!(w[0], (CoreReg::X(0), INTERNAL_FAILURE));
    assert_eq!(
        w[1],
        (CoreReg::X(0), 0x1_0003),
        "the next call is answered too"
    );
    assert!(
        matches!(vm.stop_reason(), StopReason::Timeout { .. }),
        "only the end of the script stopped the VM"
    );
    let events = vm.log.of_kind("system_event");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "hibernate");
    assert_eq!(events[0]["refused"], true);
    assert_eq!(vm.log.of_kind("psci_call")[0]["result"]["x0"], -6);
}

#[test]
fn hibernate_is_carried_out_under_the_default_policy() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    vm.run(0, &[(1, 1), (2, 0)], vec![hvc(0xC400_0015)]);
    assert_eq!(
        vm.stop_reason(),
        StopReason::Firmware {
            vcpu: 0,
            event: SystemEvent::Hibernate
        }
    );
}

#[test]
fn cpu_off_parks_the_caller_powered_off() {
    let vm = Arc::new(Vm::new(2, HibernateAction::PowerOff));
    // Powered off, the vCPU's thread waits for a start request that never comes: stop the
    // VM from outside once the engine has it OFF.
    let thread = {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || vm.run(0, &[], vec![hvc(0x8400_0002)]))
    };
    while vm.fw.power_state(VcpuId::new(0)) != PowerState::Off {
        std::thread::yield_now();
    }
    vm.control.stop(StopReason::Timeout {
        after: std::time::Duration::ZERO,
    });
    let ran = thread.join().expect("vCPU 0 thread");
    assert!(ran.ops.contains(&Op::MpState(MpState::Stopped)));
    assert_eq!(
        ran.ops.iter().filter(|op| **op == Op::Run).count(),
        1,
        "an OFF vCPU does not enter the guest again"
    );
    let steps = vm.log.of_kind("power_state");
    assert_eq!(
        (&steps[0]["from"], &steps[0]["to"]),
        (&Value::from("on"), &Value::from("off"))
    );
}

#[test]
fn a_powerdown_suspend_resumes_at_its_entry_when_kvm_reports_the_wakeup() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let wakeup = VcpuExit::SystemEvent {
        kind: SystemEventKind::Wakeup,
        flags: 0,
    };
    // CPU_SUSPEND(powerdown, entry, context 0x99), then KVM's wake-up exit.
    let ran = vm.run(
        0,
        &[(1, 1 << 30), (2, ENTRY), (3, 0x99)],
        vec![hvc(0xC400_0001), wakeup],
    );
    let suspend = ran
        .ops
        .iter()
        .position(|op| *op == Op::MpState(MpState::Suspended))
        .expect("parked suspended");
    let resume = ran
        .ops
        .iter()
        .position(|op| {
            *op == Op::StartAt {
                entry: ENTRY,
                context_id: 0x99,
            }
        })
        .expect("resumed at the entry");
    assert!(suspend < resume);
    assert_eq!(vm.fw.power_state(VcpuId::new(0)), PowerState::On);
}

#[test]
fn a_standby_suspend_returns_success_on_wakeup_and_a_kick_is_not_a_wakeup() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let wakeup = VcpuExit::SystemEvent {
        kind: SystemEventKind::Wakeup,
        flags: 0,
    };
    let ran = vm.run(
        0,
        &[(1, 0), (2, 0), (3, 0)],
        vec![hvc(0xC400_0001), VcpuExit::Interrupted, wakeup],
    );
    let results: Vec<[u64; 4]> = ran
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::SmcccResult(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert_eq!(results.len(), 1, "one wake-up: {:?}", ran.ops);
    assert_eq!(results[0][0], 0, "SUCCESS");
}

#[test]
fn mmio_exits_reach_the_bus_and_loads_are_completed() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let ran = vm.run(
        0,
        &[],
        vec![
            VcpuExit::MmioWrite {
                addr: 0x0900_0000,
                data: [0x41, 0, 0, 0, 0, 0, 0, 0],
                len: 1,
            },
            VcpuExit::MmioRead {
                addr: 0x0900_0018,
                len: 4,
            },
        ],
    );
    assert_eq!(
        *vm.bus.0.lock().unwrap_or_else(PoisonError::into_inner),
        vec![(0x0900_0000, vec![0x41])]
    );
    assert!(ran.ops.contains(&Op::MmioData(vec![0xAB; 4])));
}

#[test]
fn an_unexpected_kvm_system_event_fails_the_vcpu_by_name() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    vm.run(
        0,
        &[],
        vec![VcpuExit::SystemEvent {
            kind: SystemEventKind::Shutdown,
            flags: 0,
        }],
    );
    match vm.stop_reason() {
        StopReason::VcpuFailed { vcpu, reason } => {
            assert_eq!(vcpu, 0);
            assert!(reason.contains("Shutdown"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn under_kvms_psci_a_kvm_shutdown_stops_the_vm_as_a_kernel_event() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    vm.run_with(
        0,
        &[],
        vec![VcpuExit::SystemEvent {
            kind: SystemEventKind::Shutdown,
            flags: 0,
        }],
        PsciBackend::Kernel,
    );
    assert!(matches!(
        vm.stop_reason(),
        StopReason::Kernel {
            vcpu: 0,
            event: vpsci::vcpu::KernelEvent::Shutdown,
            ..
        }
    ));
}

#[test]
fn the_empty_handler_answers_zero_and_still_honours_system_off() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let ran = vm.run_with(
        0,
        &[],
        vec![hvc(0x8400_0000), hvc(0x8400_0008)],
        PsciBackend::EmptyHandler,
    );
    assert_eq!(writes(&ran.ops), vec![(CoreReg::X(0), 0)]);
    assert_eq!(
        vm.stop_reason(),
        StopReason::Firmware {
            vcpu: 0,
            event: SystemEvent::Off
        }
    );
}

/// Every vCPU ioctl the exit handling makes, failing once: the VM stops with a one-line
/// reason that names the vCPU and the operation, and the engine is left as the failure
/// found it (no half-applied call).
#[test]
fn a_failing_kvm_ioctl_stops_the_vm_naming_the_vcpu_and_the_operation() {
    /// The fault, the registers the guest passes, its exits.
    type Case = (Fault, Vec<(u8, u64)>, Vec<VcpuExit>);
    let cases: [Case; 5] = [
        (Fault::Run, vec![], vec![hvc(0x8400_0000)]),
        (Fault::GetReg, vec![(1, 1)], vec![hvc(0xC400_0004)]),
        (Fault::SetReg, vec![], vec![hvc(0x8400_0000)]),
        (Fault::SetMpState, vec![], vec![hvc(0x8400_0002)]),
        (
            Fault::Init,
            vec![(1, 1 << 30), (2, ENTRY), (3, 0)],
            vec![
                hvc(0xC400_0001),
                VcpuExit::SystemEvent {
                    kind: SystemEventKind::Wakeup,
                    flags: 0,
                },
            ],
        ),
    ];
    for (fault, x, script) in cases {
        let vm = Vm::new(2, HibernateAction::PowerOff);
        let psci = PsciBackend::Engine(Arc::clone(&vm.fw));
        vm.run_faulty(0, &x, script, psci, Some(fault));
        match vm.stop_reason() {
            StopReason::VcpuFailed { vcpu, reason } => {
                assert_eq!(vcpu, 0, "{fault:?}");
                assert!(reason.contains(fault.ioctl()), "{fault:?}: {reason}");
                assert!(!reason.contains('\n'), "{fault:?}: one line: {reason}");
            }
            other => panic!("{fault:?}: {other:?}"),
        }
        let outcome = vpsci::policy::decide(
            &vm.stop_reason(),
            vpsci::cli::ResetAction::Restart,
            Some(&vm.fw),
            2,
        );
        match outcome {
            vpsci::policy::Decision::Exit(o) => {
                assert_eq!(o.status, vpsci::run::EXIT_FAILURE);
                assert!(
                    o.message.starts_with("vCPU 0 failed: ") && o.message.contains(fault.ioctl()),
                    "{}",
                    o.message
                );
            }
            other => panic!("{fault:?}: a failed vCPU must end the run: {other:?}"),
        }
    }
}

/// Under KVM's PSCI the event log still names what the guest asked for: KVM leaves the
/// SYSTEM_RESET2 / SYSTEM_OFF2 arguments in x1 and x2 when it exits.
#[test]
fn under_kvms_psci_the_log_names_reset2_types_cookies_and_hibernation() {
    let cases = [
        (
            SystemEventKind::Reset,
            1,
            (0x8000_0001u64, 0x55u64),
            "vendor_reset",
        ),
        (SystemEventKind::Reset, 1, (0, 0x66), "warm_reset"),
        (SystemEventKind::Reset, 0, (0, 0), "reset"),
        (SystemEventKind::Shutdown, 1, (1, 0), "hibernate"),
        (SystemEventKind::Shutdown, 1, (0, 0), "hibernate"),
        (SystemEventKind::Shutdown, 0, (0, 0), "off"),
    ];
    for (kind, flags, (x1, x2), logged) in cases {
        let vm = Vm::new(1, HibernateAction::PowerOff);
        vm.run_with(
            0,
            &[(1, x1), (2, x2)],
            vec![VcpuExit::SystemEvent { kind, flags }],
            PsciBackend::Kernel,
        );
        let events = vm.log.of_kind("system_event");
        assert_eq!(events.len(), 1, "{kind:?}");
        assert_eq!(events[0]["event"], logged, "{kind:?} {flags} {x1:#x}");
        if logged == "vendor_reset" {
            assert_eq!(events[0]["reset_type"], "0x80000001");
            assert_eq!(events[0]["cookie"], "0x55");
        }
        if logged == "warm_reset" {
            assert_eq!(events[0]["cookie"], "0x66");
        }
    }
}

/// A bus with the real interrupt bookkeeping: a store to `RTC_ALARM` raises
/// the "pl031" line (standing in for the RTC's alarm thread), a store to
/// `UART_TX` the "pl011" one.
struct DeviceBus {
    lines: Arc<vpsci::devices::irq::InterruptLines>,
    rtc: Mutex<vpsci::devices::irq::TrackedLine>,
    uart: Mutex<vpsci::devices::irq::TrackedLine>,
}

const RTC_ALARM: u64 = 0x0901_0000;
const UART_TX: u64 = 0x0900_0000;

impl DeviceBus {
    fn new() -> DeviceBus {
        use vpsci::devices::irq::{InterruptLines, LineInfo, NoIrq, TrackedLine};
        let lines = Arc::new(InterruptLines::new(&[
            LineInfo {
                device: "pl011",
                spi: 1,
            },
            LineInfo {
                device: "pl031",
                spi: 2,
            },
        ]));
        DeviceBus {
            uart: Mutex::new(TrackedLine::new(Arc::clone(&lines), 0, Box::new(NoIrq))),
            rtc: Mutex::new(TrackedLine::new(Arc::clone(&lines), 1, Box::new(NoIrq))),
            lines,
        }
    }
}

impl Mmio for DeviceBus {
    fn read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, addr: u64, _data: &[u8]) {
        use vpsci::devices::irq::IrqLine;
        match addr {
            RTC_ALARM => self
                .rtc
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_level(true),
            UART_TX => self
                .uart
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_level(true),
            _ => {}
        }
    }
    fn interrupt_mark(&self) -> vpsci::devices::irq::RiseMark {
        self.lines.mark()
    }
    fn wake_sources(
        &self,
        mark: &vpsci::devices::irq::RiseMark,
    ) -> Vec<vpsci::devices::irq::Raised> {
        self.lines.wake_sources(mark)
    }
}

fn store(addr: u64) -> VcpuExit {
    VcpuExit::MmioWrite {
        addr,
        data: [1, 0, 0, 0, 0, 0, 0, 0],
        len: 4,
    }
}

#[test]
fn a_wakeup_names_the_device_interrupt_that_rose_while_suspended_before_the_resume() {
    let vm = Vm::new(1, HibernateAction::PowerOff);
    let bus = Arc::new(DeviceBus::new());
    let state = Arc::new(Mutex::new(FakeState::default()));
    {
        let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
        st.x[1] = ENTRY;
        st.x[2] = 0x77;
    }
    // The UART's line is already up when the guest suspends: not a wake-up
    // source. SYSTEM_SUSPEND(entry, 0x77); the RTC's line rises; KVM wakes.
    let script = vec![
        store(UART_TX),
        hvc(0xC400_000E),
        store(RTC_ALARM),
        VcpuExit::SystemEvent {
            kind: SystemEventKind::Wakeup,
            flags: 0,
        },
    ];
    let vcpu = FakeVcpu {
        index: 0,
        script: script.into(),
        control: Arc::clone(&vm.control),
        state: Arc::clone(&state),
        fault: None,
    };
    VcpuRunner::new(
        vcpu,
        Arc::clone(&vm.control),
        Arc::clone(&vm.platform),
        PsciBackend::Engine(Arc::clone(&vm.fw)),
        Arc::clone(&bus) as Arc<dyn Mmio>,
        Arc::clone(&vm.log) as Arc<dyn EventSink>,
    )
    .run();
    let ops = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .ops
        .clone();
    assert!(
        ops.contains(&Op::StartAt {
            entry: ENTRY,
            context_id: 0x77
        }),
        "{ops:?}"
    );
    let wakeups = vm.log.of_kind("wakeup");
    assert_eq!(wakeups.len(), 1, "{wakeups:?}");
    let sources = &wakeups[0]["sources"];
    assert_eq!(sources.as_array().map(Vec::len), Some(1), "{sources}");
    assert_eq!(sources[0]["device"], "pl031");
    assert_eq!(sources[0]["spi"], 2);
    assert_eq!(sources[0]["intid"], 34);
    assert!(sources[0]["raised_ns_ago"].is_u64());
    // The wake-up line comes before the engine's resume transition.
    let all = vm
        .log
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let woke = all.iter().position(|e| e["kind"] == "wakeup");
    let resumed = all
        .iter()
        .position(|e| e["kind"] == "power_state" && e["from"] == "suspended_system");
    assert!(woke.is_some() && woke < resumed, "{all:?}");
}
