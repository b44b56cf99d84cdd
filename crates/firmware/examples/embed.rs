//! Embedding the firmware engine in a (toy) VMM.
//!
//! `cargo run -p vpsci-firmware --example embed [-- <vcpus>]` (default 4, at most 64)
//!
//! Each "vCPU" is a host thread running a scripted guest written in Rust; a guest's `hvc`
//! is a VM exit into the engine, like `KVM_EXIT_HYPERCALL` in a real VMM. The VMM side
//! shows the whole contract of [`Platform`]:
//!
//! * `start_vcpu` posts the entry point to the target's slot and wakes it through a condition
//!   variable; the target's thread calls [`Firmware::vcpu_started`] before it runs guest code.
//! * `quiesce` raises a hold count and waits (condition variable, no polling) until every
//!   other vCPU is out of guest code; a vCPU checks the hold count before it re-enters.
//! * `system_event` gives the one verdict on a system event (this toy commits every one)
//!   and stops the VM; every vCPU thread then leaves its loop.
//! * `power_transition` hears of every power-state change the engine commits (printed).
//!
//! The guest: the boot CPU reads PSCI_VERSION and brings up every secondary with CPU_ON.
//! Each secondary, once running, also races the boot CPU with a CPU_ON of the next
//! secondary (so a secondary that already went OFF may be started again: one run per CPU_ON
//! SUCCESS), checks in through "guest memory" and calls CPU_OFF; the last one first tries
//! SYSTEM_SUSPEND, which quiesces the VM and is DENIED because other CPUs are on. The boot CPU waits for
//! the check-ins, polls AFFINITY_INFO until every secondary is OFF and calls SYSTEM_OFF.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vpsci_firmware::psci::affinity_info;
use vpsci_firmware::{
    CallOutcome, EntropyError, EntryPoint, Firmware, FirmwareConfig, FunctionId, MemoryRegion,
    Mpidr, Platform, PsciError, QuiesceError, SystemEvent, SystemVerdict, Transition, VcpuId,
};

const RAM: MemoryRegion = MemoryRegion {
    base: 0x4000_0000,
    size: 0x100_0000,
};
/// The guest's secondary entry point (the toy "loads" `secondary_main` there).
const SECONDARY_ENTRY: u64 = 0x4008_0000;
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// VM-wide run state, protected by one mutex and signalled through one condition variable.
#[derive(Debug, Default)]
struct RunState {
    /// Start requests not yet picked up, per vCPU.
    start: Vec<Option<EntryPoint>>,
    /// Whether each vCPU is executing guest code.
    in_guest: Vec<bool>,
    /// Outstanding quiesce requests.
    hold: u32,
    /// Set once a system event committed: every vCPU thread leaves.
    stopped: Option<SystemEvent>,
}

#[derive(Debug, Default)]
struct VmControl {
    state: Mutex<RunState>,
    changed: Condvar,
    started_at: Option<Instant>,
}

impl VmControl {
    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, RunState>) -> MutexGuard<'a, RunState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, who: &str, what: std::fmt::Arguments<'_>) {
        let t = self
            .started_at
            .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
        println!("[{t:8.3} ms] {who:>6}: {what}");
    }
}

/// The toy VMM's [`Platform`].
struct ToyPlatform {
    control: Arc<VmControl>,
    clock: Instant,
    quiesces: AtomicU64,
}

impl Platform for ToyPlatform {
    fn start_vcpu(&self, vcpu: VcpuId, entry: EntryPoint) {
        let mut st = self.control.lock();
        if let Some(slot) = st.start.get_mut(vcpu.index()) {
            *slot = Some(entry);
        }
        drop(st);
        self.control.changed.notify_all();
    }

    fn quiesce(&self, caller: VcpuId) -> Result<(), QuiesceError> {
        // A real VMM bounds this wait (a vCPU may never leave the guest); this toy's guests
        // always reach a kick point.
        self.quiesces.fetch_add(1, Ordering::Relaxed);
        let mut st = self.control.lock();
        st.hold += 1;
        while st
            .in_guest
            .iter()
            .enumerate()
            .any(|(i, &running)| running && i != caller.index())
        {
            st = self.control.wait(st);
        }
        Ok(())
    }

    fn resume(&self, _caller: VcpuId) {
        let mut st = self.control.lock();
        st.hold = st.hold.saturating_sub(1);
        drop(st);
        self.control.changed.notify_all();
    }

    fn system_event(&self, caller: VcpuId, event: &SystemEvent) -> SystemVerdict {
        self.control.log(
            "vmm",
            format_args!("system event {event:?} from vCPU {}", caller.index()),
        );
        self.control.lock().stopped = Some(*event);
        self.control.changed.notify_all();
        SystemVerdict::Commit
    }

    fn power_transition(&self, t: &Transition) {
        // Called under engine locks (and, for a start, under our own run-state lock):
        // only log, never lock anything here.
        self.control.log(
            "vmm",
            format_args!("{}: {:?} -> {:?}", t.vcpu, t.from, t.to),
        );
    }

    fn fill_random(&self, buf: &mut [u8]) -> Result<(), EntropyError> {
        // A toy: a clock-seeded xorshift, not a real entropy source.
        let mut x = self.now_ns() | 1;
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        Ok(())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Why guest code stopped running on a vCPU.
#[derive(Debug)]
enum Exit {
    /// CPU_OFF committed: wait for the next start request.
    PoweredOff,
    /// The VM stopped (system event).
    Stopped,
}

/// Memory the guest CPUs share (their "RAM").
#[derive(Debug, Default)]
struct GuestMemory {
    checked_in: AtomicU64,
    /// CPU_ON calls that returned SUCCESS, per target.
    cpu_on_success: Vec<AtomicU64>,
    /// Times each CPU started running at the secondary entry.
    runs: Vec<AtomicU64>,
}

/// One vCPU as its guest code sees it.
struct Cpu<'a> {
    index: usize,
    name: String,
    fw: &'a Firmware,
    platform: &'a ToyPlatform,
    mem: &'a GuestMemory,
    cpus: usize,
}

impl Cpu<'_> {
    fn log(&self, what: std::fmt::Arguments<'_>) {
        self.platform.control.log(&self.name, what);
    }

    /// Leaves guest mode (the VM exit), so a quiescing vCPU no longer waits for us.
    fn exit_guest(&self) {
        self.platform.control.lock().in_guest[self.index] = false;
        self.platform.control.changed.notify_all();
    }

    /// Blocks until this vCPU may run guest code (no hold, VM not stopped) and marks it in
    /// guest. Returns the start request when this vCPU is OFF and one arrives.
    fn enter_guest(&self, off: bool) -> Result<Option<EntryPoint>, Exit> {
        let control = &self.platform.control;
        let mut st = control.lock();
        loop {
            if st.stopped.is_some() {
                return Err(Exit::Stopped);
            }
            if off {
                if st.hold == 0 {
                    if let Some(entry) = st.start[self.index].take() {
                        // ON_PENDING -> ON right before the guest runs at its entry (false
                        // only if the start was withdrawn, which this toy never does).
                        if self
                            .fw
                            .vcpu_started(VcpuId::new(self.index as u32), self.platform)
                        {
                            st.in_guest[self.index] = true;
                            return Ok(Some(entry));
                        }
                    }
                }
            } else if st.hold == 0 {
                st.in_guest[self.index] = true;
                return Ok(None);
            }
            st = control.wait(st);
        }
    }

    /// One iteration of a guest busy-wait. A real VMM kicks a vCPU out of the guest (signal,
    /// `immediate_exit`) when another vCPU quiesces; this toy's guest code offers the exit
    /// itself: if a quiesce is pending, leave guest mode and wait until it is over.
    fn interruptible_spin(&self) -> Result<(), Exit> {
        std::thread::yield_now();
        if self.platform.control.lock().hold > 0 {
            self.exit_guest();
            self.enter_guest(false)?;
        }
        Ok(())
    }

    /// The guest's `hvc #0`: a VM exit into the engine and back.
    fn hvc(&self, fid: FunctionId, x1: u64, x2: u64, x3: u64) -> Result<[u64; 4], Exit> {
        self.exit_guest();
        let call = vpsci_firmware::GuestCall {
            vcpu: VcpuId::new(self.index as u32),
            conduit: vpsci_firmware::Conduit::Hvc,
            regs: [u64::from(fid.raw()), x1, x2, x3],
            caller_aarch32: false,
        };
        match self.fw.handle_call(&call, self.platform) {
            CallOutcome::Return { regs } => {
                self.enter_guest(false)?;
                Ok(regs)
            }
            CallOutcome::PowerOff => Err(Exit::PoweredOff),
            CallOutcome::SystemEvent { .. } => Err(Exit::Stopped),
            CallOutcome::Suspend { kind } => {
                // This guest never suspends; a VMM would park the vCPU until an interrupt.
                self.log(format_args!("unexpected suspend ({kind:?})"));
                Err(Exit::Stopped)
            }
        }
    }

    fn cpu_on(&self, target: usize, context_id: u64) -> Result<u64, Exit> {
        let mpidr = Mpidr::from_index(target as u32).raw();
        let r = self.hvc(FunctionId::CpuOn64, mpidr, SECONDARY_ENTRY, context_id)?[0];
        if r == 0 {
            self.mem.cpu_on_success[target].fetch_add(1, Ordering::SeqCst);
        }
        self.log(format_args!(
            "CPU_ON(cpu{target}, ctx {context_id}) = {}",
            status(r)
        ));
        Ok(r)
    }

    /// Guest code of the boot CPU.
    fn boot_main(&self) -> Result<(), Exit> {
        let v = self.hvc(FunctionId::PsciVersion, 0, 0, 0)?[0];
        self.log(format_args!("PSCI_VERSION = {}.{}", v >> 16, v & 0xFFFF));
        for target in 1..self.cpus {
            self.cpu_on(target, 0x100 + target as u64)?;
        }
        while self.mem.checked_in.load(Ordering::SeqCst) < (self.cpus - 1) as u64 {
            self.interruptible_spin()?;
        }
        self.log(format_args!("all {} secondaries checked in", self.cpus - 1));
        let mut polls = 0u64;
        for target in 1..self.cpus {
            let mpidr = Mpidr::from_index(target as u32).raw();
            loop {
                polls += 1;
                let r = self.hvc(FunctionId::AffinityInfo64, mpidr, 0, 0)?[0];
                if r == affinity_info::OFF {
                    break;
                }
                self.interruptible_spin()?;
            }
        }
        self.log(format_args!(
            "AFFINITY_INFO: every secondary OFF ({polls} polls); SYSTEM_OFF"
        ));
        self.hvc(FunctionId::SystemOff, 0, 0, 0)?;
        self.log(format_args!("SYSTEM_OFF returned?!"));
        Ok(())
    }

    /// Guest code of a secondary, entered at SECONDARY_ENTRY with x0 = context id.
    fn secondary_main(&self, x0: u64) -> Result<(), Exit> {
        self.mem.runs[self.index].fetch_add(1, Ordering::SeqCst);
        self.log(format_args!(
            "running at {SECONDARY_ENTRY:#x}, x0 = {x0:#x}"
        ));
        let next = self.index + 1;
        if next < self.cpus {
            // Race the boot CPU: only one of us gets SUCCESS.
            self.cpu_on(next, 0x200 + next as u64)?;
        }
        if self.index == self.cpus - 1 {
            // A system-scoped call quiesces the VM (the boot CPU is busy-waiting in guest
            // code and must be held) and is DENIED: the boot CPU is still on.
            let r = self.hvc(FunctionId::SystemSuspend64, SECONDARY_ENTRY, 0, 0)?[0];
            self.log(format_args!("SYSTEM_SUSPEND = {}", status(r)));
        }
        self.mem.checked_in.fetch_add(1, Ordering::SeqCst);
        self.log(format_args!("CPU_OFF"));
        self.hvc(FunctionId::CpuOff, 0, 0, 0)?;
        self.log(format_args!("CPU_OFF returned?!"));
        Ok(())
    }

    /// The vCPU thread: run guest code while ON, wait for a start request while OFF.
    fn run(&self) {
        let mut entry = if self.index == 0 {
            match self.enter_guest(false) {
                Ok(_) => None,
                Err(_) => return,
            }
        } else {
            match self.enter_guest(true) {
                Ok(entry) => entry,
                Err(_) => return,
            }
        };
        loop {
            let result = match entry {
                None => self.boot_main(),
                Some(e) => self.secondary_main(e.context_id),
            };
            match result {
                Err(Exit::PoweredOff) => match self.enter_guest(true) {
                    Ok(next) => entry = next,
                    Err(_) => break,
                },
                Err(Exit::Stopped) | Ok(()) => break,
            }
        }
        self.exit_guest();
        self.log(format_args!("thread exits"));
    }
}

fn status(x0: u64) -> String {
    match PsciError::from_register(x0) {
        Some(e) => format!("{e}"),
        None if x0 == 0 => "SUCCESS".to_owned(),
        None => format!("{x0:#x}"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cpus: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 4,
    };
    if !(1..=64).contains(&cpus) {
        return Err(format!("vCPU count {cpus} outside 1..=64").into());
    }
    let fw = Firmware::new(
        FirmwareConfig::default(),
        (0..cpus as u32).map(Mpidr::from_index).collect(),
        vec![RAM],
    )?;
    fw.freeze();
    let control = Arc::new(VmControl {
        state: Mutex::new(RunState {
            start: vec![None; cpus],
            in_guest: vec![false; cpus],
            hold: 0,
            stopped: None,
        }),
        changed: Condvar::new(),
        started_at: Some(Instant::now()),
    });
    let platform = ToyPlatform {
        control: Arc::clone(&control),
        clock: Instant::now(),
        quiesces: AtomicU64::new(0),
    };
    let mem = GuestMemory {
        checked_in: AtomicU64::new(0),
        cpu_on_success: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
        runs: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
    };
    println!("toy VMM: {cpus} vCPUs, firmware {}", fw.config().summary());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        for index in 0..cpus {
            let (fw, platform, mem, done_tx) = (&fw, &platform, &mem, done_tx.clone());
            scope.spawn(move || {
                let cpu = Cpu {
                    index,
                    name: format!("vcpu{index}"),
                    fw,
                    platform,
                    mem,
                    cpus,
                };
                cpu.run();
                let _ = done_tx.send(index);
            });
        }
        drop(done_tx);
        for _ in 0..cpus {
            if done_rx.recv_timeout(RUN_LIMIT).is_err() {
                eprintln!("toy VMM: vCPU threads did not finish within {RUN_LIMIT:?}");
                std::process::exit(1);
            }
        }
    });

    let stopped = control.lock().stopped;
    println!("--- summary ---");
    println!("system event: {stopped:?}");
    println!(
        "quiesce calls: {}",
        platform.quiesces.load(Ordering::Relaxed)
    );
    let mut ok = stopped == Some(SystemEvent::Off);
    for i in 1..cpus {
        let n = mem.cpu_on_success[i].load(Ordering::SeqCst);
        let runs = mem.runs[i].load(Ordering::SeqCst);
        let state = fw.power_state(VcpuId::new(i as u32));
        println!("cpu{i}: {n} CPU_ON SUCCESS, started {runs} time(s), final state {state:?}");
        // A secondary that went OFF may legitimately be started again by a later racer.
        ok &= n >= 1 && n == runs && state == vpsci_firmware::PowerState::Off;
    }
    if ok {
        println!(
            "one start per CPU_ON SUCCESS, every secondary OFF at the end; the VM powered off"
        );
        Ok(())
    } else {
        Err("unexpected outcome (see above)".into())
    }
}
