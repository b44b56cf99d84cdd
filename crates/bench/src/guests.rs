//! The bare-metal benchmark guests, assembled with [`crate::asm`].
//!
//! Each guest times its work with the virtual counter (`CNTVCT_EL0` /
//! `CNTFRQ_EL0`), checks every PSCI answer it gets and writes a result block
//! at [`RESULTS`] before it calls SYSTEM_OFF: a status word (done or failed),
//! the counter at the start and end, the counter frequency and, on failure,
//! which check failed with the offending value. The host reads the block from
//! guest memory after the VM stopped.

use crate::asm::{Asm, Cond, ZR};

/// Guest physical base of RAM.
pub const RAM: u64 = 0x4000_0000;
/// Result block (1 MiB into RAM, far above every image here).
pub const RESULTS: u64 = RAM + 0x10_0000;
/// Per-vCPU marks written by started secondaries (8 bytes each): [`MARK_OK`]
/// or [`MARK_WRONG_REDISTRIBUTOR`].
pub const MARKS: u64 = RESULTS + 0x1000;
/// Per-vCPU guest address of its GICv3 redistributor, as the VM's layout places it.
pub const REDISTRIBUTORS: u64 = RESULTS + 0x2000;
/// A secondary ran and found its own redistributor where the layout says.
pub const MARK_OK: u64 = 1;
/// A secondary ran but the redistributor the layout gives it belongs to another vCPU.
pub const MARK_WRONG_REDISTRIBUTOR: u64 = 2;
/// Counter values around timed batches: before the first, after each (8 bytes each).
pub const BATCH_TIMES: u64 = RESULTS + 0x3000;
/// Per-vCPU counter just before the boot vCPU's CPU_ON of it.
pub const CPU_ON_CALLED: u64 = RESULTS + 0x4000;
/// Per-vCPU counter when that CPU_ON returned to the boot vCPU.
pub const CPU_ON_RETURNED: u64 = RESULTS + 0x4800;
/// Per-vCPU counter at the started vCPU's first instruction.
pub const STARTED_AT: u64 = RESULTS + 0x5000;
/// PL011 data register.
pub const UART_DR: u64 = 0x0900_0000;

/// Offsets in the result block.
pub mod slot {
    /// [`super::DONE`] or [`super::FAILED`]; 0 while running.
    pub const STATUS: u64 = 0;
    /// Counter when the timed part started.
    pub const START: u64 = 8;
    /// Counter when it ended.
    pub const END: u64 = 16;
    /// Counter frequency in Hz.
    pub const FREQUENCY: u64 = 24;
    /// Which check failed ([`super::Check`]).
    pub const CHECK: u64 = 32;
    /// The value that failed it.
    pub const VALUE: u64 = 40;
    /// The answer of the untimed first call (the value every timed call must repeat).
    pub const WARMUP: u64 = 48;
    /// Times the CPU_ON target ran.
    pub const SECONDARY_RUNS: u64 = 56;
    /// Context id the CPU_ON target last received.
    pub const LAST_CONTEXT: u64 = 64;
    /// Boots so far (kept in RAM across guest resets).
    pub const BOOTS: u64 = 72;
    /// Iterations left when a check failed.
    pub const LEFT: u64 = 80;
}

/// [`slot::STATUS`]: the guest finished its work.
pub const DONE: u64 = 1;
/// [`slot::STATUS`]: a check failed.
pub const FAILED: u64 = 2;

/// The checks a guest makes, as written to [`slot::CHECK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A timed call answered differently from the untimed first call.
    AnswerChanged = 1,
    /// CPU_ON did not answer SUCCESS.
    CpuOn = 2,
    /// AFFINITY_INFO answered something other than ON or OFF.
    AffinityInfo = 3,
    /// The CPU_ON target did not run once per successful CPU_ON.
    SecondaryRuns = 4,
    /// The CPU_ON target received another context id than the caller passed.
    ContextId = 5,
    /// CPU_OFF returned.
    CpuOffReturned = 6,
    /// SYSTEM_RESET returned.
    ResetReturned = 7,
    /// A started vCPU's redistributor (by the layout) reports another vCPU's affinity.
    Redistributor = 8,
}

impl Check {
    /// The check with code `code`, if any.
    pub fn from_code(code: u64) -> Option<Check> {
        [
            Check::AnswerChanged,
            Check::CpuOn,
            Check::AffinityInfo,
            Check::SecondaryRuns,
            Check::ContextId,
            Check::CpuOffReturned,
            Check::ResetReturned,
            Check::Redistributor,
        ]
        .into_iter()
        .find(|c| *c as u64 == code)
    }

    /// What failing it means.
    pub fn describe(self) -> &'static str {
        match self {
            Check::AnswerChanged => "a timed call answered differently from the first call",
            Check::CpuOn => "CPU_ON did not answer SUCCESS",
            Check::AffinityInfo => "AFFINITY_INFO answered neither ON nor OFF",
            Check::SecondaryRuns => "the CPU_ON target did not run once per CPU_ON",
            Check::ContextId => "the CPU_ON target received the wrong context id",
            Check::CpuOffReturned => "CPU_OFF returned",
            Check::ResetReturned => "SYSTEM_RESET returned",
            Check::Redistributor => {
                "a started vCPU's redistributor (where the layout puts it) belongs to another vCPU"
            }
        }
    }
}

/// PSCI function IDs (DEN0022 F.b table 6).
pub mod fid {
    /// PSCI_VERSION.
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    /// CPU_OFF.
    pub const CPU_OFF: u32 = 0x8400_0002;
    /// CPU_ON, SMC64.
    pub const CPU_ON: u32 = 0xC400_0003;
    /// AFFINITY_INFO, SMC64.
    pub const AFFINITY_INFO: u32 = 0xC400_0004;
    /// SYSTEM_OFF.
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    /// SYSTEM_RESET.
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES.
    pub const PSCI_FEATURES: u32 = 0x8400_000A;
    /// CPU_SUSPEND, SMC32.
    pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
    /// CPU_SUSPEND, SMC64.
    pub const CPU_SUSPEND_64: u32 = 0xC400_0001;
}

/// The MPIDR KVM gives vCPU `index` (Aff0 = index % 16, Aff1 = index / 16).
pub fn mpidr(index: u32) -> u64 {
    vpsci_firmware::Mpidr::from_index(index).raw()
}

/// Where secondaries enter: a fixed address after the boot code.
const SECONDARY_AT: u64 = crate::asm::ENTRY + 0x4_0000;

/// A guest call with its arguments, repeated by [`call_loop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedCall {
    /// Function ID (w0).
    pub function: u32,
    /// x1 and x2.
    pub args: [u64; 2],
}

/// Writes the end of a run: counters and status DONE, then SYSTEM_OFF.
/// Expects x20 = start counter, x21 = end counter.
fn finish(a: &mut Asm) {
    a.counter_frequency(22)
        .store_at(20, RESULTS + slot::START)
        .store_at(21, RESULTS + slot::END)
        .store_at(22, RESULTS + slot::FREQUENCY)
        .mov(9, DONE)
        .store_at(9, RESULTS + slot::STATUS)
        .smccc(fid::SYSTEM_OFF, [0; 3]);
    let park = a.label();
    a.bind(park).wfi().b(park);
}

/// A failure exit: x9 = check, x10 = value, x19 = iterations left; status
/// FAILED, then SYSTEM_OFF.
fn fail_block(a: &mut Asm, check: Check, value_reg: u32) {
    a.mov(9, check as u64)
        .store_at(9, RESULTS + slot::CHECK)
        .store_at(value_reg, RESULTS + slot::VALUE)
        .store_at(19, RESULTS + slot::LEFT)
        .mov(9, FAILED)
        .store_at(9, RESULTS + slot::STATUS)
        .smccc(fid::SYSTEM_OFF, [0; 3]);
    let park = a.label();
    a.bind(park).wfi().b(park);
}

/// Timed batches: how many and how much work each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batches {
    /// Number of batches (at most [`MAX_BATCHES`]).
    pub count: u64,
    /// Calls or cycles per batch.
    pub size: u64,
}

impl Batches {
    /// `total` units of work in (up to) 20 batches: enough batches for a median
    /// that ignores the ones the shared host preempted.
    pub fn split(total: u64) -> Batches {
        let count = total.clamp(1, 20);
        Batches {
            count,
            size: (total / count).max(1),
        }
    }

    /// Work in all batches.
    pub fn total(self) -> u64 {
        self.count * self.size
    }
}

/// Most batches a guest times.
pub const MAX_BATCHES: u64 = 500;

/// Writes the counter to the next batch slot (x23 points at it; post-indexed).
fn batch_mark(a: &mut Asm, rt: u32) {
    a.counter(rt).str_post(rt, 23, 8);
}

/// One untimed call (its answer kept in [`slot::WARMUP`]), then `batches`
/// of timed calls, each checked to give the same answer in w0. The counter
/// before the first batch and after each batch goes to [`BATCH_TIMES`].
pub fn call_loop(call: TimedCall, batches: Batches) -> Vec<u8> {
    let mut a = Asm::new();
    let outer = a.label();
    let inner = a.label();
    let changed = a.label();
    a.mov(24, u64::from(call.function))
        .mov(25, call.args[0])
        .mov(26, call.args[1]);
    a.mov_reg(0, 24)
        .mov_reg(1, 25)
        .mov_reg(2, 26)
        .mov_reg(3, ZR)
        .hvc();
    a.mov_reg(27, 0).store_at(27, RESULTS + slot::WARMUP);
    a.mov(23, BATCH_TIMES)
        .mov(19, batches.count.clamp(1, MAX_BATCHES))
        .mov(22, batches.size.max(1));
    batch_mark(&mut a, 20);
    a.bind(outer).mov_reg(18, 22);
    a.bind(inner)
        .mov_reg(0, 24)
        .mov_reg(1, 25)
        .mov_reg(2, 26)
        .mov_reg(3, ZR)
        .hvc()
        .cmp_w(0, 27)
        .b_cond(Cond::Ne, changed)
        .subs_imm(18, 18, 1)
        .b_cond(Cond::Ne, inner);
    batch_mark(&mut a, 21);
    a.subs_imm(19, 19, 1).b_cond(Cond::Ne, outer);
    finish(&mut a);
    a.bind(changed).mov_reg(10, 0);
    fail_block(&mut a, Check::AnswerChanged, 10);
    a.assemble()
}

/// The secondary of [`cpu_on_off_cycle`]: counts its run, keeps its context
/// id, calls CPU_OFF (which must not return).
fn counting_secondary(a: &mut Asm) {
    let returned = a.label();
    a.pad_to(SECONDARY_AT)
        .mov_reg(11, 0)
        .load_from(9, RESULTS + slot::SECONDARY_RUNS)
        .add_imm(9, 9, 1)
        .store_at(9, RESULTS + slot::SECONDARY_RUNS)
        .store_at(11, RESULTS + slot::LAST_CONTEXT)
        .smccc(fid::CPU_OFF, [0; 3])
        .b(returned);
    a.bind(returned).mov_reg(10, 0);
    fail_block(a, Check::CpuOffReturned, 10);
}

/// Batches of cycles of: CPU_ON(vCPU 1, context = cycles left) must answer
/// SUCCESS; AFFINITY_INFO(vCPU 1) polled until OFF (every answer must be ON
/// or OFF) while vCPU 1 counts its run and calls CPU_OFF; vCPU 1 must have
/// received that cycle's context id. At the end vCPU 1 must have run once per
/// cycle. Batch times go to [`BATCH_TIMES`] as in [`call_loop`].
pub fn cpu_on_off_cycle(batches: Batches) -> Vec<u8> {
    let mut a = Asm::new();
    let outer = a.label();
    let top = a.label();
    let poll = a.label();
    let off = a.label();
    let on_failed = a.label();
    let affinity_failed = a.label();
    let runs_failed = a.label();
    let context_failed = a.label();
    let total = batches.count.clamp(1, MAX_BATCHES) * batches.size.max(1);
    a.mov(23, BATCH_TIMES)
        .mov(19, batches.count.clamp(1, MAX_BATCHES))
        .mov(22, batches.size.max(1))
        .mov(24, total);
    batch_mark(&mut a, 20);
    a.bind(outer).mov_reg(18, 22);
    a.bind(top)
        .mov(0, u64::from(fid::CPU_ON))
        .mov(1, mpidr(1))
        .mov(2, SECONDARY_AT)
        .mov_reg(3, 24)
        .hvc()
        .cmp_w_imm(0, 0)
        .b_cond(Cond::Ne, on_failed);
    a.bind(poll)
        .mov(0, u64::from(fid::AFFINITY_INFO))
        .mov(1, mpidr(1))
        .mov_reg(2, ZR)
        .hvc()
        .cmp_w_imm(0, 1) // OFF
        .b_cond(Cond::Eq, off)
        .cmp_w_imm(0, 0) // ON
        .b_cond(Cond::Eq, poll)
        .b(affinity_failed);
    a.bind(off)
        .load_from(11, RESULTS + slot::LAST_CONTEXT)
        .cmp_x(11, 24)
        .b_cond(Cond::Ne, context_failed)
        .subs_imm(24, 24, 1)
        .subs_imm(18, 18, 1)
        .b_cond(Cond::Ne, top);
    batch_mark(&mut a, 21);
    a.subs_imm(19, 19, 1)
        .b_cond(Cond::Ne, outer)
        .load_from(10, RESULTS + slot::SECONDARY_RUNS)
        .mov(11, total)
        .cmp_x(10, 11)
        .b_cond(Cond::Ne, runs_failed);
    finish(&mut a);
    a.bind(on_failed).mov_reg(10, 0);
    fail_block(&mut a, Check::CpuOn, 10);
    a.bind(affinity_failed).mov_reg(10, 0);
    fail_block(&mut a, Check::AffinityInfo, 10);
    a.bind(runs_failed);
    fail_block(&mut a, Check::SecondaryRuns, 10);
    a.bind(context_failed);
    fail_block(&mut a, Check::ContextId, 11);
    counting_secondary(&mut a);
    a.assemble()
}

/// Guest address of each vCPU's GICv3 redistributor in a VM of `cpus` vCPUs
/// (vpsci's layout: the second region holds the vCPUs past the first 123).
pub fn redistributors(cpus: u32) -> Vec<u64> {
    let layout = match vpsci::layout::GuestLayout::new(cpus, vpsci::layout::MIN_RAM_SIZE) {
        Ok(layout) => layout,
        Err(_) => return Vec::new(),
    };
    layout
        .redistributor_regions()
        .iter()
        .flat_map(|r| {
            (0..u64::from(r.count)).map(move |k| r.base.0 + k * vpsci::layout::GICR_STRIDE)
        })
        .take(cpus as usize)
        .collect()
}

/// Clears the marks of vCPUs 1..cpus and records their redistributors,
/// starts each with CPU_ON (context id = the address of its mark; SUCCESS
/// checked) and waits until every one has written its mark, which must be
/// [`MARK_OK`]. x19 = the vCPU whose CPU_ON or redistributor check failed.
fn bring_up_all(
    a: &mut Asm,
    cpus: u32,
    on_failed: crate::asm::Label,
    wrong_redistributor: crate::asm::Label,
) {
    a.mov(5, MARKS).mov(4, REDISTRIBUTORS);
    for (i, gicr) in redistributors(cpus).into_iter().enumerate().skip(1) {
        a.str(ZR, 5, 8 * i as u64)
            .mov(6, gicr)
            .str(6, 4, 8 * i as u64);
    }
    a.mov(13, CPU_ON_CALLED).mov(14, CPU_ON_RETURNED);
    for i in 1..cpus {
        let slot = 8 * u64::from(i);
        a.mov(19, u64::from(i)).counter(12).str(12, 13, slot);
        a.smccc(fid::CPU_ON, [mpidr(i), SECONDARY_AT, MARKS + slot]);
        a.counter(12)
            .str(12, 14, slot)
            .cmp_w_imm(0, 0)
            .b_cond(Cond::Ne, on_failed);
    }
    a.mov(5, MARKS);
    for i in 1..cpus {
        let wait = a.label();
        a.mov(19, u64::from(i))
            .bind(wait)
            .ldr(6, 5, 8 * u64::from(i))
            .cbz(6, wait)
            .cmp_w_imm(6, MARK_OK as u32)
            .b_cond(Cond::Ne, wrong_redistributor);
    }
}

/// The secondary of [`bring_up`] and [`reset_cycle`]: notes the counter at
/// its first instruction in [`STARTED_AT`], reads the affinity its
/// redistributor reports (GICR_TYPER bits 63:32, at the address the layout
/// gives this vCPU) and writes [`MARK_OK`] to its mark if it is its own
/// MPIDR's (Aff2.Aff1.Aff0), [`MARK_WRONG_REDISTRIBUTOR`] if not; then idles in WFI.
fn marking_secondary(a: &mut Asm) {
    let idle = a.label();
    let matched = a.label();
    a.pad_to(SECONDARY_AT).counter(12);
    a.mov(9, STARTED_AT - MARKS)
        .add_reg(9, 0, 9)
        .str(12, 9, 0)
        .mov(9, REDISTRIBUTORS - MARKS)
        .add_reg(9, 0, 9)
        .ldr(9, 9, 0)
        .ldr(8, 9, 8) // GICR_TYPER
        .ubfx(8, 8, 32, 32)
        .mpidr(7)
        .ubfx(7, 7, 0, 24)
        .mov(6, MARK_OK)
        .cmp_x(8, 7)
        .b_cond(Cond::Eq, matched)
        .mov(6, MARK_WRONG_REDISTRIBUTOR)
        .bind(matched)
        .str(6, 0, 0)
        .bind(idle)
        .wfi()
        .b(idle);
}

/// Starts vCPUs 1..cpus with CPU_ON and times until every one has run.
pub fn bring_up(cpus: u32) -> Vec<u8> {
    let mut a = Asm::new();
    let on_failed = a.label();
    let wrong_redistributor = a.label();
    a.counter(20);
    bring_up_all(&mut a, cpus, on_failed, wrong_redistributor);
    a.counter(21);
    finish(&mut a);
    a.bind(on_failed).mov_reg(10, 0);
    fail_block(&mut a, Check::CpuOn, 10);
    a.bind(wrong_redistributor);
    fail_block(&mut a, Check::Redistributor, 6);
    marking_secondary(&mut a);
    a.assemble()
}

/// The byte the guest prints first thing after every boot.
pub const BOOTED: u8 = b'B';
/// The byte the guest prints just before it calls SYSTEM_RESET.
pub const RESETTING: u8 = b'R';

/// Boots `resets + 1` times: each boot prints [`BOOTED`], and until it has
/// reset `resets` times, brings up every vCPU, prints [`RESETTING`] and calls
/// SYSTEM_RESET (which must not return). The boot count lives in RAM, which
/// the VMM keeps across a reset. The host times each reset from the bytes.
pub fn reset_cycle(cpus: u32, resets: u64) -> Vec<u8> {
    let mut a = Asm::new();
    let done = a.label();
    let on_failed = a.label();
    let wrong_redistributor = a.label();
    let returned = a.label();
    a.mov(16, UART_DR).mov(17, u64::from(BOOTED)).strb(17, 16);
    a.load_from(9, RESULTS + slot::BOOTS)
        .mov(10, resets)
        .cmp_x(9, 10)
        .b_cond(Cond::Hs, done)
        .add_imm(9, 9, 1)
        .store_at(9, RESULTS + slot::BOOTS);
    bring_up_all(&mut a, cpus, on_failed, wrong_redistributor);
    a.mov(16, UART_DR)
        .mov(17, u64::from(RESETTING))
        .strb(17, 16);
    a.smccc(fid::SYSTEM_RESET, [0; 3]).b(returned);
    a.bind(done).mov(20, 0).mov(21, 0);
    finish(&mut a);
    a.bind(on_failed).mov_reg(10, 0);
    fail_block(&mut a, Check::CpuOn, 10);
    a.bind(wrong_redistributor);
    fail_block(&mut a, Check::Redistributor, 6);
    a.bind(returned).mov_reg(10, 0);
    fail_block(&mut a, Check::ResetReturned, 10);
    marking_secondary(&mut a);
    a.assemble()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_assembles_and_keeps_its_boot_code_below_the_secondary_entry() {
        let limit = (SECONDARY_AT - crate::asm::ENTRY) as usize;
        let call = TimedCall {
            function: fid::PSCI_VERSION,
            args: [0, 0],
        };
        assert!(call_loop(call, Batches::split(10)).len() < limit);
        // 256 vCPUs: the largest unrolled bring-up still fits.
        for image in [
            cpu_on_off_cycle(Batches::split(10)),
            bring_up(256),
            reset_cycle(256, 3),
        ] {
            assert!(image.len() > limit, "has a secondary entry");
            assert!(image.len() < (RESULTS - crate::asm::ENTRY) as usize);
        }
    }

    #[test]
    fn secondaries_enter_at_the_fixed_address() {
        let image = bring_up(8);
        let at = (SECONDARY_AT - crate::asm::ENTRY) as usize;
        let first = u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
        // isb; then mrs x12, cntvct_el0
        assert_eq!(first, 0xD503_3FDF);
    }

    #[test]
    fn redistributors_continue_in_the_second_region_past_123_vcpus() {
        let eight = redistributors(8);
        assert_eq!(eight.len(), 8);
        assert_eq!(eight[1] - eight[0], 0x2_0000);
        let all = redistributors(256);
        assert_eq!(all.len(), 256);
        assert_eq!(all[0], 0x080A_0000);
        assert_eq!(all[122], 0x080A_0000 + 122 * 0x2_0000);
        assert_eq!(all[123], 0x0A00_0000);
        assert_eq!(all[255], 0x0A00_0000 + 132 * 0x2_0000);
    }

    #[test]
    fn work_splits_into_at_most_twenty_batches() {
        assert_eq!(
            Batches::split(2000),
            Batches {
                count: 20,
                size: 100
            }
        );
        assert_eq!(Batches::split(200).total(), 200);
        assert_eq!(Batches::split(5), Batches { count: 5, size: 1 });
        assert_eq!(Batches::split(0).total(), 1);
    }

    #[test]
    fn mpidrs_follow_kvms_numbering() {
        assert_eq!(mpidr(0), 0);
        assert_eq!(mpidr(15), 0xF);
        assert_eq!(mpidr(16), 0x100);
        assert_eq!(mpidr(255), 0xF0F);
    }

    #[test]
    fn check_codes_round_trip() {
        for code in 1..=8 {
            let check = Check::from_code(code).unwrap();
            assert_eq!(check as u64, code);
            assert!(!check.describe().is_empty());
        }
        assert_eq!(Check::from_code(0), None);
    }
}
