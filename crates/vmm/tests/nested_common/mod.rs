//! Shared pieces of the nested KVM tests: a tiny A64 assembler for
//! hand-encoded guests and a runner that boots one through the real VMM
//! (KVM backend + firmware engine) with the console and RAM kept for checks.
#![allow(dead_code)]

pub mod binary;
pub mod disk;
pub mod linux;

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vpsci::cli::{HibernateAction, ResetAction};
use vpsci::events::{Event, EventSink};
use vpsci::layout::GuestLayout;
use vpsci::run::{run_session, RunOutcome, Session, EXIT_POWERED_OFF};
use vpsci::vm::{ImageSource, VmOptions};
use vpsci_firmware::{Conduit, FirmwareConfig, OnPending, PsciVersion};
use vpsci_kvm::{KvmHost, SmcccRouting};

/// Guest RAM base and where raw images are loaded.
pub const RAM: u64 = 0x4000_0000;
pub const ENTRY: u64 = RAM + 0x8_0000;
/// Scratch area the guests write their results to (1 MiB into RAM).
pub const RESULTS: u64 = RAM + 0x10_0000;
/// PL011 data register.
pub const UART_DR: u64 = 0x0900_0000;

pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const CPU_SUSPEND: u32 = 0xC400_0001;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON: u32 = 0xC400_0003;
pub const AFFINITY_INFO: u32 = 0xC400_0004;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000A;
pub const SYSTEM_SUSPEND: u32 = 0xC400_000E;
pub const SYSTEM_RESET2: u32 = 0xC400_0012;
pub const SYSTEM_OFF2: u32 = 0xC400_0015;

pub const SUCCESS: u64 = 0;
pub const NOT_SUPPORTED: u64 = -1i64 as u64;
pub const INVALID_PARAMETERS: u64 = -2i64 as u64;
pub const DENIED: u64 = -3i64 as u64;
pub const ALREADY_ON: u64 = -4i64 as u64;
pub const ON_PENDING: u64 = -5i64 as u64;
pub const INTERNAL_FAILURE: u64 = -6i64 as u64;
pub const INVALID_ADDRESS: u64 = -9i64 as u64;

/// The MPIDR KVM gives vCPU `i` (Aff0 = i % 16, Aff1 = i / 16), checked
/// against the VM by [`run`].
pub fn mpidr(i: usize) -> u64 {
    ((i as u64 / 16) << 8) | (i as u64 % 16)
}

/// An A64 program being assembled at a fixed guest address.
pub struct Asm {
    base: u64,
    code: Vec<u32>,
    conduit: u32,
}

/// A forward branch to patch once its target is known.
pub struct Fixup {
    at: usize,
    kind: u8,
}

impl Asm {
    /// A program starting at `base` whose calls use `conduit`.
    pub fn new(base: u64, conduit: Conduit) -> Asm {
        Asm {
            base,
            code: Vec::new(),
            conduit: match conduit {
                Conduit::Hvc => 0xD400_0002,
                Conduit::Smc => 0xD400_0003,
            },
        }
    }

    pub fn here(&self) -> u64 {
        self.base + 4 * self.code.len() as u64
    }

    pub fn word(&mut self, w: u32) -> &mut Asm {
        self.code.push(w);
        self
    }

    /// `xd = imm` (always four instructions).
    pub fn mov(&mut self, rd: u32, imm: u64) -> &mut Asm {
        self.word(0xD280_0000 | ((imm & 0xFFFF) as u32) << 5 | rd);
        for hw in 1..4u32 {
            let part = ((imm >> (16 * hw)) & 0xFFFF) as u32;
            self.word(0xF280_0000 | (hw << 21) | (part << 5) | rd);
        }
        self
    }

    /// `xd = xm`.
    pub fn mov_reg(&mut self, rd: u32, rm: u32) -> &mut Asm {
        self.word(0xAA00_03E0 | (rm << 16) | rd)
    }

    /// An SMCCC call through the program's conduit.
    pub fn call(&mut self) -> &mut Asm {
        let c = self.conduit;
        self.word(c)
    }

    /// x0 = function, x1..x3 = args, call.
    pub fn smccc(&mut self, function: u32, args: [u64; 3]) -> &mut Asm {
        self.mov(0, u64::from(function));
        for (i, a) in args.iter().enumerate() {
            self.mov(1 + i as u32, *a);
        }
        self.call()
    }

    /// `str xt, [xn, #off]` (off multiple of 8, < 32 KiB).
    pub fn str(&mut self, rt: u32, rn: u32, off: u64) -> &mut Asm {
        self.word(0xF900_0000 | (((off / 8) as u32) << 10) | (rn << 5) | rt)
    }

    /// `str wt, [xn, #off]` (32-bit store, off multiple of 4).
    pub fn str32(&mut self, rt: u32, rn: u32, off: u64) -> &mut Asm {
        self.word(0xB900_0000 | (((off / 4) as u32) << 10) | (rn << 5) | rt)
    }

    /// 32-bit store of `value` to MMIO `addr` (clobbers x16, x17).
    pub fn mmio_write32(&mut self, addr: u64, value: u32) -> &mut Asm {
        self.mov(16, addr)
            .mov(17, u64::from(value))
            .str32(17, 16, 0)
    }

    /// Enables the GICv3 for vCPU 0 and arms its virtual timer (PPI 27) to
    /// fire `ticks` from now; x20 = the counter when the timer was armed.
    /// Clobbers x16, x17. Interrupts stay masked in PSTATE: they only wake.
    pub fn arm_timer_wakeup(&mut self, ticks: u64) -> &mut Asm {
        self.mmio_write32(0x0800_0000, 0x13) // GICD_CTLR: ARE, Grp1, Grp0
            .mmio_write32(0x080A_0014, 0) // GICR_WAKER: awake
            .mmio_write32(0x080B_0080, 0xFFFF_FFFF) // GICR_IGROUPR0: group 1
            .mmio_write32(0x080B_0100, 1 << 27); // GICR_ISENABLER0: vtimer
        self.mov(17, 0xFF).msr(3, 0, 4, 6, 0, 17); // ICC_PMR_EL1
        self.mov(17, 1).msr(3, 0, 12, 12, 7, 17); // ICC_IGRPEN1_EL1
        self.isb();
        self.mrs(3, 3, 14, 0, 2, 20); // x20 = CNTVCT_EL0
        self.mov(17, ticks).msr(3, 3, 14, 3, 0, 17); // CNTV_TVAL_EL0
        self.mov(17, 1).msr(3, 3, 14, 3, 1, 17); // CNTV_CTL_EL0: enable
        self.isb()
    }

    /// `xt = CNTVCT_EL0`.
    pub fn counter(&mut self, rt: u32) -> &mut Asm {
        self.isb().mrs(3, 3, 14, 0, 2, rt)
    }

    /// Spins until `secs` seconds of guest time have passed on the virtual
    /// counter (CNTFRQ_EL0 ticks each). Clobbers x20..x24.
    pub fn wait_seconds(&mut self, secs: u32) -> &mut Asm {
        self.mrs(3, 3, 14, 0, 0, 23); // x23 = CNTFRQ_EL0
        self.mov(24, u64::from(secs));
        self.word(0x9B18_7EF7); // mul x23, x23, x24
        self.counter(20);
        let again = self.here();
        self.counter(21);
        self.word(0xCB14_02B6); // sub x22, x21, x20
        self.cmp(22, 23);
        let off = ((again as i64 - self.here() as i64) / 4) as u32 & 0x7FFFF;
        self.word(0x5400_0003 | (off << 5)) // b.lo again
    }

    /// `ldr wt, [xn, #off]` (32-bit load, zero-extended; off multiple of 4).
    pub fn ldr32(&mut self, rt: u32, rn: u32, off: u64) -> &mut Asm {
        self.word(0xB940_0000 | (((off / 4) as u32) << 10) | (rn << 5) | rt)
    }

    /// `ldr xt, [xn, #off]`.
    pub fn ldr(&mut self, rt: u32, rn: u32, off: u64) -> &mut Asm {
        self.word(0xF940_0000 | (((off / 8) as u32) << 10) | (rn << 5) | rt)
    }

    /// Store xt to an absolute address (clobbers x16).
    pub fn store_at(&mut self, rt: u32, addr: u64) -> &mut Asm {
        self.mov(16, addr).str(rt, 16, 0)
    }

    /// Print `text` on the UART (clobbers x16, x17).
    pub fn print(&mut self, text: &str) -> &mut Asm {
        self.mov(16, UART_DR);
        for b in text.bytes() {
            self.mov(17, u64::from(b));
            // strb w17, [x16]
            self.word(0x3900_0000 | (16 << 5) | 17);
        }
        self
    }

    /// `add xd, xn, #imm`.
    pub fn add_imm(&mut self, rd: u32, rn: u32, imm: u32) -> &mut Asm {
        self.word(0x9100_0000 | (imm << 10) | (rn << 5) | rd)
    }

    /// `b .` (spin forever).
    pub fn spin(&mut self) -> &mut Asm {
        self.word(0x1400_0000)
    }

    /// `b <earlier>`.
    pub fn b_back(&mut self, target: u64) -> &mut Asm {
        let off = ((target as i64 - self.here() as i64) / 4) as u32 & 0x3FF_FFFF;
        self.word(0x1400_0000 | off)
    }

    /// `wfi`.
    pub fn wfi(&mut self) -> &mut Asm {
        self.word(0xD503_207F)
    }

    /// `cbz xt, target` for a target already emitted.
    pub fn cbz_back(&mut self, rt: u32, target: u64) -> &mut Asm {
        let off = ((target as i64 - self.here() as i64) / 4) as u32 & 0x7FFFF;
        self.word(0xB400_0000 | (off << 5) | rt)
    }

    /// `cbnz xt, <later>`.
    pub fn cbnz_fwd(&mut self, rt: u32) -> Fixup {
        let at = self.code.len();
        self.word(0xB500_0000 | rt);
        Fixup { at, kind: 1 }
    }

    /// `b.ne <earlier>` after a compare.
    pub fn bne_back(&mut self, target: u64) -> &mut Asm {
        let off = ((target as i64 - self.here() as i64) / 4) as u32 & 0x7FFFF;
        self.word(0x5400_0001 | (off << 5))
    }

    /// `b.eq <earlier>` after a compare.
    pub fn beq_back(&mut self, target: u64) -> &mut Asm {
        let off = ((target as i64 - self.here() as i64) / 4) as u32 & 0x7FFFF;
        self.word(0x5400_0000 | (off << 5))
    }

    /// `cmp xn, xm`.
    pub fn cmp(&mut self, rn: u32, rm: u32) -> &mut Asm {
        self.word(0xEB00_001F | (rm << 16) | (rn << 5))
    }

    /// Points a forward branch at the current address.
    pub fn bind(&mut self, fixup: Fixup) {
        let off = ((self.here() - (self.base + 4 * fixup.at as u64)) / 4) as u32;
        debug_assert_eq!(fixup.kind, 1);
        self.code[fixup.at] |= (off & 0x7FFFF) << 5;
    }

    /// `msr <sysreg>, xt` with the register's encoding fields.
    pub fn msr(&mut self, op0: u32, op1: u32, crn: u32, crm: u32, op2: u32, rt: u32) -> &mut Asm {
        self.word(
            0xD510_0000
                | ((op0 - 2) << 19)
                | (op1 << 16)
                | (crn << 12)
                | (crm << 8)
                | (op2 << 5)
                | rt,
        )
    }

    /// `mrs xt, <sysreg>`.
    pub fn mrs(&mut self, op0: u32, op1: u32, crn: u32, crm: u32, op2: u32, rt: u32) -> &mut Asm {
        self.word(
            0xD530_0000
                | ((op0 - 2) << 19)
                | (op1 << 16)
                | (crn << 12)
                | (crm << 8)
                | (op2 << 5)
                | rt,
        )
    }

    /// `isb`.
    pub fn isb(&mut self) -> &mut Asm {
        self.word(0xD503_3FDF)
    }

    /// Little-endian bytes of the program (a raw image if `base` is [`ENTRY`]).
    pub fn bytes(&self) -> Vec<u8> {
        self.code.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Appends `other` (assembled at `self.here()`).
    pub fn append(&mut self, other: &Asm) {
        assert_eq!(other.base, self.here());
        self.code.extend_from_slice(&other.code);
    }
}

/// Everything a nested test looks at after a run.
pub struct Ran {
    pub outcome: RunOutcome,
    pub console: String,
    pub memory: GuestMemoryMmap,
    pub events: Vec<String>,
}

impl Ran {
    /// The run ended with the guest powering off (exit status 0); shows vpsci's message otherwise.
    pub fn assert_powered_off(&self) {
        assert_eq!(
            self.outcome.status, EXIT_POWERED_OFF,
            "{}",
            self.outcome.message
        );
        // The event log ends with how the run ended (events are kept in Debug form).
        let last = self.events.last().map(String::as_str).unwrap_or("");
        assert!(
            last.starts_with("VmEnd {") && last.contains("exit_status: 0,"),
            "last event: {last}"
        );
    }

    pub fn u64_at(&self, addr: u64) -> u64 {
        match self.memory.read_obj::<u64>(GuestAddress(addr)) {
            Ok(v) => v,
            Err(e) => panic!("read {addr:#x}: {e}"),
        }
    }
}

/// How to run a test guest.
pub struct Setup {
    pub cpus: u32,
    pub version: PsciVersion,
    pub conduit: Conduit,
    pub on_pending: OnPending,
    pub on_reset: ResetAction,
    pub on_hibernate: HibernateAction,
    pub timeout: Duration,
    pub kernel_psci: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            cpus: 1,
            version: PsciVersion::V1_3,
            conduit: Conduit::Hvc,
            on_pending: OnPending::Hidden,
            on_reset: ResetAction::Exit,
            on_hibernate: HibernateAction::PowerOff,
            timeout: Duration::from_secs(20),
            kernel_psci: false,
        }
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sees every event as the VMM records it, with the guest's RAM (for tests that let the
/// guest wait for something only the VMM can see, such as another vCPU's suspend).
pub type EventObserver = Arc<dyn Fn(&Event<'_>, &GuestMemoryMmap) + Send + Sync>;

struct EventCapture {
    events: Mutex<Vec<String>>,
    observer: Option<(EventObserver, GuestMemoryMmap)>,
}

impl EventSink for EventCapture {
    fn enabled(&self) -> bool {
        true
    }
    fn record(&self, event: &Event<'_>) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("{event:?}"));
        if let Some((observer, memory)) = &self.observer {
            observer(event, memory);
        }
    }
}

/// Boots `program` (assembled at [`ENTRY`]) as `setup` says and runs it to the end.
pub fn run(program: &Asm, setup: Setup) -> Ran {
    run_observed(program, setup, None)
}

/// [`run`], with `observer` called on every event as it is recorded.
pub fn run_observed(program: &Asm, setup: Setup, observer: Option<EventObserver>) -> Ran {
    let host = match KvmHost::open() {
        Ok(h) => h,
        Err(e) => panic!("these tests need arm64 KVM (run them in the nested VM): {e}"),
    };
    let layout = match GuestLayout::new(setup.cpus, 64 << 20) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    let memory = match layout.create_memory() {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let console = Capture::default();
    let factory_console = console.clone();
    let events = Arc::new(EventCapture {
        events: Mutex::new(Vec::new()),
        observer: observer.map(|o| (o, memory.clone())),
    });
    let session = Session {
        vm: VmOptions {
            layout,
            image: ImageSource::Bytes(program.bytes()),
            initrd: None,
            cmdline: String::new(),
            firmware: FirmwareConfig {
                psci_version: setup.version,
                conduit: setup.conduit,
                on_pending: setup.on_pending,
                ..FirmwareConfig::default()
            },
            routing: if setup.kernel_psci {
                SmcccRouting::kernel_psci()
            } else {
                SmcccRouting::userspace_psci()
            },
            devices: Default::default(),
            idle_states: Vec::new(),
        },
        on_reset: setup.on_reset,
        on_hibernate: setup.on_hibernate,
        timeout: Some(setup.timeout),
        empty_handler: false,
        console: Arc::new(move || Box::new(factory_console.clone()) as Box<dyn Write + Send>),
        events: events.clone(),
    };
    let outcome = run_session(&host, &session, &memory);
    let console =
        String::from_utf8_lossy(&console.0.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned();
    let events = events
        .events
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ran {
        outcome,
        console,
        memory,
        events,
    }
}
