//! The operator's pause on the real vCPU thread (`VcpuRunner`, `VmPlatform`, the engine)
//! with a fake vCPU whose `KVM_RUN` blocks until the test hands it an exit, and whose kick
//! makes that run return `Interrupted` as a signal would. Checks what the guest would
//! see: power states unchanged by a pause, no exit handled and no start applied while
//! paused, and everything carried on after the resume.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vpsci::cli::HibernateAction;
use vpsci::events::{EventSink, NoEvents};
use vpsci::vcpu::{
    Kick, Mmio, PsciBackend, StopReason, VcpuOps, VcpuRunner, VmControl, VmPlatform,
};
use vpsci_firmware::{
    Firmware, FirmwareConfig, MemoryRegion, Mpidr, PowerState, SuspendKind, VcpuId,
};
use vpsci_kvm::{CoreReg, KvmError, MpState, SystemEventKind, VcpuExit};

const RAM: u64 = 0x4000_0000;
const ENTRY: u64 = RAM + 0x1000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Run,
    StartAt { entry: u64, context_id: u64 },
    MpState(MpState),
}

/// A vCPU whose `run` waits for the next exit the test (or a kick) sends; a closed
/// channel stops the VM.
struct GatedVcpu {
    index: usize,
    exits: Receiver<VcpuExit>,
    x: [u64; 4],
    control: Arc<VmControl>,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl GatedVcpu {
    fn log(&self, op: Op) {
        self.ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(op);
    }
}

impl VcpuOps for GatedVcpu {
    fn index(&self) -> usize {
        self.index
    }
    fn bind_current_thread(&mut self) {}
    fn run(&mut self) -> Result<VcpuExit, KvmError> {
        self.log(Op::Run);
        match self.exits.recv() {
            Ok(exit) => Ok(exit),
            Err(_) => {
                self.control.stop(StopReason::Timeout {
                    after: Duration::ZERO,
                });
                Ok(VcpuExit::Interrupted)
            }
        }
    }
    fn get_core(&self, reg: CoreReg) -> Result<u64, KvmError> {
        Ok(match reg {
            CoreReg::X(n) if n < 4 => self.x[usize::from(n)],
            _ => 0,
        })
    }
    fn set_core(&self, _reg: CoreReg, _value: u64) -> Result<(), KvmError> {
        Ok(())
    }
    fn start_at(&self, entry: u64, context_id: u64) -> Result<(), KvmError> {
        self.log(Op::StartAt { entry, context_id });
        Ok(())
    }
    fn set_mp_state(&self, state: MpState) -> Result<(), KvmError> {
        self.log(Op::MpState(state));
        Ok(())
    }
    fn set_smccc_result(&self, _regs: [u64; 4]) -> Result<(), KvmError> {
        Ok(())
    }
    fn complete_mmio_read(&mut self, _data: &[u8]) {}
}

/// A kick is an `Interrupted` exit for the vCPU's next (or current) run.
struct ChannelKick(Mutex<Sender<VcpuExit>>);

impl Kick for ChannelKick {
    fn kick(&self) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(VcpuExit::Interrupted);
    }
}

struct NoBus;

impl Mmio for NoBus {
    fn read(&self, _addr: u64, _data: &mut [u8]) {}
    fn write(&self, _addr: u64, _data: &[u8]) {}
}

/// One VM with `cpus` gated vCPUs, each on its own thread.
struct Vm {
    fw: Arc<Firmware>,
    control: Arc<VmControl>,
    exits: Vec<Sender<VcpuExit>>,
    ops: Vec<Arc<Mutex<Vec<Op>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Vm {
    /// vCPU `i` reads x1..x3 = `regs[i]` for its calls.
    fn start(regs: &[[u64; 3]]) -> Vm {
        let cpus = regs.len();
        let fw = Arc::new(
            Firmware::new(
                FirmwareConfig::default(),
                (0..cpus as u32).map(Mpidr::from_index).collect(),
                vec![MemoryRegion {
                    base: RAM,
                    size: 0x100_0000,
                }],
            )
            .expect("valid firmware"),
        );
        let channels: Vec<(Sender<VcpuExit>, Receiver<VcpuExit>)> =
            (0..cpus).map(|_| channel()).collect();
        let control = Arc::new(VmControl::new(
            channels
                .iter()
                .map(|(tx, _)| Box::new(ChannelKick(Mutex::new(tx.clone()))) as Box<dyn Kick>)
                .collect(),
        ));
        let events: Arc<dyn EventSink> = Arc::new(NoEvents);
        let platform = Arc::new(VmPlatform::new(
            Arc::clone(&control),
            Arc::clone(&events),
            HibernateAction::PowerOff,
        ));
        let mut exits = Vec::new();
        let mut ops = Vec::new();
        let mut threads = Vec::new();
        for (index, (tx, rx)) in channels.into_iter().enumerate() {
            let log = Arc::new(Mutex::new(Vec::new()));
            let r = regs[index];
            let vcpu = GatedVcpu {
                index,
                exits: rx,
                x: [0, r[0], r[1], r[2]],
                control: Arc::clone(&control),
                ops: Arc::clone(&log),
            };
            let runner = VcpuRunner::new(
                vcpu,
                Arc::clone(&control),
                Arc::clone(&platform),
                PsciBackend::Engine(Arc::clone(&fw)),
                Arc::new(NoBus) as Arc<dyn Mmio>,
                Arc::clone(&events),
            );
            threads.push(std::thread::spawn(move || runner.run()));
            exits.push(tx);
            ops.push(log);
        }
        Vm {
            fw,
            control,
            exits,
            ops,
            threads,
        }
    }

    fn ops(&self, vcpu: usize) -> Vec<Op> {
        self.ops[vcpu]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn state(&self, vcpu: u32) -> PowerState {
        self.fw.power_state(VcpuId::new(vcpu))
    }

    /// Waits (bounded) until `cond` holds, re-checking whenever a short nap passes.
    fn until(&self, what: &str, cond: impl Fn(&Vm) -> bool) {
        for _ in 0..500 {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting until {what}");
    }

    fn end(self) {
        drop(self.exits);
        self.control.stop(StopReason::Timeout {
            after: Duration::ZERO,
        });
        for t in self.threads {
            assert!(t.join().is_ok(), "a vCPU thread panicked");
        }
    }
}

fn hvc(function_id: u32) -> VcpuExit {
    VcpuExit::Hypercall {
        function_id,
        smc: false,
    }
}

const WAKEUP: VcpuExit = VcpuExit::SystemEvent {
    kind: SystemEventKind::Wakeup,
    flags: 0,
};

fn runs(ops: &[Op]) -> usize {
    ops.iter().filter(|op| **op == Op::Run).count()
}

#[test]
fn a_paused_suspended_vcpu_stays_suspended_and_its_wakeup_waits_for_the_resume() {
    // CPU_SUSPEND powerdown at ENTRY with context 0x99.
    let vm = Vm::start(&[[1 << 30, ENTRY, 0x99]]);
    vm.exits[0].send(hvc(0xC400_0001)).expect("send");
    vm.until("vCPU 0 is suspended and back in KVM_RUN", |vm| {
        runs(&vm.ops(0)) == 2
    });
    let suspended = PowerState::Suspended {
        kind: SuspendKind::Powerdown,
    };
    assert_eq!(vm.state(0), suspended);

    assert_eq!(vm.control.pause(), Ok(()));
    let held = vm.ops(0);
    assert_eq!(vm.state(0), suspended, "the pause changed the power state");
    assert!(
        !held.contains(&Op::MpState(MpState::Runnable)),
        "the kick made the vCPU runnable: {held:?}"
    );
    // The wake-up KVM would report is not taken while paused.
    vm.exits[0].send(WAKEUP).expect("send");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.ops(0), held, "the vCPU ran while paused");
    assert_eq!(vm.state(0), suspended);

    assert_eq!(vm.control.unpause(), Ok(()));
    vm.until("vCPU 0 resumed at its entry", |vm| {
        vm.ops(0).contains(&Op::StartAt {
            entry: ENTRY,
            context_id: 0x99,
        })
    });
    assert_eq!(vm.state(0), PowerState::On);
    vm.end();
}

#[test]
fn a_cpu_on_made_just_before_a_pause_is_applied_only_after_the_resume() {
    // vCPU 0 calls CPU_ON(MPIDR 1, ENTRY, 0x55); vCPU 1 starts off.
    let vm = Vm::start(&[[1, ENTRY, 0x55], [0, 0, 0]]);
    assert_eq!(vm.control.pause(), Ok(()));
    // Handed to vCPU 0 while it is held: nothing happens yet.
    vm.exits[0].send(hvc(0xC400_0003)).expect("send");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.state(1), PowerState::Off);
    assert_eq!(vm.control.unpause(), Ok(()));
    vm.until("vCPU 0 made its call", |vm| runs(&vm.ops(0)) >= 2);
    // Pause again right after the call: the start is either applied already or held.
    assert_eq!(vm.control.pause(), Ok(()));
    let started = vm.ops(1).contains(&Op::StartAt {
        entry: ENTRY,
        context_id: 0x55,
    });
    let state = vm.state(1);
    if started {
        assert_eq!(state, PowerState::On);
    } else {
        assert!(vm.control.start_pending(1), "the start request was lost");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(vm.state(1), state, "the start was applied while paused");
        assert!(vm.ops(1).is_empty(), "vCPU 1 did something while paused");
    }
    assert_eq!(vm.control.unpause(), Ok(()));
    vm.until("vCPU 1 started at its entry", |vm| {
        vm.ops(1).contains(&Op::StartAt {
            entry: ENTRY,
            context_id: 0x55,
        })
    });
    assert_eq!(vm.state(1), PowerState::On);
    vm.end();
}
