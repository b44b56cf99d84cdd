//! Boot, secondary and resume entry points, exception vectors and the
//! suspend-call trampoline, in assembly.
//!
//! Every entry runs with the MMU and caches off and no usable stack. It
//! normalises the exception level (a guest booted at EL2, as QEMU does with
//! `virtualization=on`, drops to EL1), enables the FP unit, installs the
//! vectors, finds its CPU index by looking its MPIDR up in
//! [`crate::cpu::MPIDR_TABLE`] and switches to that CPU's stack.

use crate::cpu::{SavedContext, CPU_COUNT, MPIDR_TABLE, SAVED_CONTEXTS};

/// The value [`vg_suspend_call`] returns when the CPU came back through
/// [`vg_resume_entry`] instead of returning from the call. No PSCI call returns it.
pub const RESUMED_MARKER: u64 = 0x5245_5355_4d45_4421;

core::arch::global_asm!(
    r#"
.section .text.vg_head, "ax"
.global _start
_start:
    /* arm64 Linux image header (Documentation/arch/arm64/booting.rst) */
    b       vg_primary_entry
    .long   0
    .quad   0x80000              /* text_offset */
    .quad   __image_size         /* image_size, including bss and stacks */
    .quad   0x2                  /* flags: little endian, 4K pages */
    .quad   0
    .quad   0
    .quad   0
    .ascii  "ARM\x64"
    .long   0

vg_primary_entry:
    mov     x19, x0              /* device tree address */
    bl      vg_el_setup
    ldr     x9, =__bss_start
    ldr     x10, =__bss_end
1:  cmp     x9, x10
    b.hs    2f
    str     xzr, [x9], #8
    b       1b
2:  ldr     x9, =__stacks_top
    mov     sp, x9
    mov     x0, x19
    bl      vg_rust_primary
3:  wfe
    b       3b

.section .text.vg_entry, "ax"
/* CPU_ON entry point: x0 = context id. */
.global vg_secondary_entry
.balign 8
vg_secondary_entry:
    mov     x19, x0
    bl      vg_el_setup
    bl      vg_cpu_index
    bl      vg_set_stack
    mov     x1, x19
    bl      vg_rust_secondary
1:  wfe
    b       1b

/* CPU_SUSPEND (powerdown) and SYSTEM_SUSPEND entry point: x0 = context id.
 * Restores the registers vg_suspend_call saved for this CPU and returns from
 * that call with RESUMED_MARKER. */
.global vg_resume_entry
.balign 8
vg_resume_entry:
    mov     x19, x0
    bl      vg_el_setup
    bl      vg_cpu_index
    ldr     x9, ={contexts}
    mov     x10, #{ctx_size}
    madd    x9, x0, x10, x9
    str     x19, [x9, #{off_received}]
    mov     x10, #1
    str     x10, [x9, #{off_resumed}]
    ldp     x19, x20, [x9, #0]
    ldp     x21, x22, [x9, #16]
    ldp     x23, x24, [x9, #32]
    ldp     x25, x26, [x9, #48]
    ldp     x27, x28, [x9, #64]
    ldp     x29, x30, [x9, #80]
    ldr     x10, [x9, #96]
    mov     sp, x10
    ldp     d8, d9, [x9, #104]
    ldp     d10, d11, [x9, #120]
    ldp     d12, d13, [x9, #136]
    ldp     d14, d15, [x9, #152]
    ldr     x0, ={marker}
    ret

/* u64 vg_suspend_call(SavedContext *ctx, u64 fid, u64 a1, u64 a2, u64 a3, u64 use_smc)
 * Saves the callee-saved state, then makes the call. Returns the call's x0
 * if it returns, or RESUMED_MARKER after a resume through vg_resume_entry. */
.global vg_suspend_call
vg_suspend_call:
    stp     x19, x20, [x0, #0]
    stp     x21, x22, [x0, #16]
    stp     x23, x24, [x0, #32]
    stp     x25, x26, [x0, #48]
    stp     x27, x28, [x0, #64]
    stp     x29, x30, [x0, #80]
    mov     x9, sp
    str     x9, [x0, #96]
    stp     d8, d9, [x0, #104]
    stp     d10, d11, [x0, #120]
    stp     d12, d13, [x0, #136]
    stp     d14, d15, [x0, #152]
    mov     x9, x5
    mov     x0, x1
    mov     x1, x2
    mov     x2, x3
    mov     x3, x4
    cbnz    x9, 1f
    hvc     #0
    ret
1:  smc     #0
    ret

/* Look this CPU's MPIDR up in MPIDR_TABLE; x0 = index. Clobbers x9-x12. */
vg_cpu_index:
    mrs     x9, mpidr_el1
    ldr     x10, =0xff00ffffff
    and     x9, x9, x10
    ldr     x10, ={table}
    ldr     x11, ={count}
    ldr     x11, [x11]
    mov     x0, #0
1:  cmp     x0, x11
    b.hs    3f
    ldr     x12, [x10, x0, lsl #3]
    cmp     x12, x9
    b.eq    2f
    add     x0, x0, #1
    b       1b
2:  ret
3:  wfe                          /* unknown CPU: park it */
    b       3b

/* sp = __stacks_top - x0 * STACK_SIZE. Clobbers x9, x10. */
vg_set_stack:
    ldr     x9, =__stacks_top
    mov     x10, #0x2000
    msub    x9, x0, x10, x9
    mov     sp, x9
    ret

/* Leave EL2 for EL1 if needed; mask interrupts, enable FP/SIMD, install the
 * vectors. Uses no stack; clobbers x9. */
vg_el_setup:
    mrs     x9, CurrentEL
    lsr     x9, x9, #2
    cmp     x9, #2
    b.ne    1f
    mov     x9, #(1 << 31)       /* HCR_EL2.RW: EL1 is AArch64 */
    msr     hcr_el2, x9
    mov     x9, #3               /* CNTHCTL_EL2: EL1 may use the counters/timers */
    msr     cnthctl_el2, x9
    msr     cntvoff_el2, xzr
    mov     x9, #0x33ff          /* CPTR_EL2: RES1 bits, FP not trapped */
    msr     cptr_el2, x9
    mrs     x9, s3_4_c12_c9_5    /* ICC_SRE_EL2 */
    orr     x9, x9, #0xf         /* SRE, DFB, DIB, Enable (EL1 may use SRE) */
    msr     s3_4_c12_c9_5, x9
    isb
    ldr     x9, =0x30d00800      /* SCTLR_EL1: RES1 bits, MMU and caches off */
    msr     sctlr_el1, x9
    mov     x9, #0x3c5           /* EL1h, DAIF masked */
    msr     spsr_el2, x9
    adr     x9, 1f
    msr     elr_el2, x9
    eret
1:  msr     daifset, #0xf
    mov     x9, #(3 << 20)       /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr     cpacr_el1, x9
    mov     x9, #((15 << 4) | (1 << 2)) /* CNTKCTL_EL1: event stream, so WFE never sleeps for long */
    msr     cntkctl_el1, x9
    ldr     x9, =vg_vectors
    msr     vbar_el1, x9
    isb
    ret

/* Exception vectors: every exception is fatal for a conformance guest. */
.section .text.vg_vectors, "ax"
.balign 2048
vg_vectors:
.set vg_vec_kind, 0
.rept 16
.balign 128
    mov     x0, #vg_vec_kind
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    b       vg_rust_exception
.set vg_vec_kind, vg_vec_kind + 1
.endr
"#,
    contexts = sym SAVED_CONTEXTS,
    table = sym MPIDR_TABLE,
    count = sym CPU_COUNT,
    ctx_size = const core::mem::size_of::<SavedContext>(),
    off_received = const core::mem::offset_of!(SavedContext, received_context_id),
    off_resumed = const core::mem::offset_of!(SavedContext, resumed),
    marker = const RESUMED_MARKER,
);

extern "C" {
    /// Start of the CPU_ON entry code.
    pub fn vg_secondary_entry();
    /// Start of the powerdown/system-suspend resume code.
    pub fn vg_resume_entry();
    /// See the assembly above: saves callee-saved state, makes an SMCCC call
    /// and returns its x0, or [`RESUMED_MARKER`] after a resume.
    pub fn vg_suspend_call(
        ctx: *mut SavedContext,
        fid: u64,
        a1: u64,
        a2: u64,
        a3: u64,
        use_smc: u64,
    ) -> u64;
}
