//! A small A64 assembler for the benchmark guests: the handful of instructions
//! they use, with labels that may be bound after the branches that use them.
//!
//! The guests run with the MMU off at EL1 from a raw image loaded at
//! [`ENTRY`]; every address is absolute.

/// Where a raw image is loaded (RAM + 0x8_0000, as vpsci and QEMU load one).
pub const ENTRY: u64 = 0x4008_0000;

/// `xzr` / `wzr` as a register operand.
pub const ZR: u32 = 31;

/// A branch target, bound with [`Asm::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// Branch conditions used after a compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Equal.
    Eq = 0,
    /// Not equal.
    Ne = 1,
    /// Unsigned higher or same.
    Hs = 2,
}

#[derive(Debug, Clone, Copy)]
enum Fixup {
    /// 19-bit word offset at bits 23:5 (B.cond, CBZ, CBNZ).
    Imm19,
    /// 26-bit word offset at bits 25:0 (B).
    Imm26,
}

/// A program being assembled at [`ENTRY`].
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label, Fixup)>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Asm {
        Asm::default()
    }

    /// Guest address of the next instruction.
    pub fn here(&self) -> u64 {
        ENTRY + 4 * self.code.len() as u64
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction.
    pub fn bind(&mut self, label: Label) -> &mut Asm {
        self.labels[label.0] = Some(self.code.len());
        self
    }

    fn word(&mut self, w: u32) -> &mut Asm {
        self.code.push(w);
        self
    }

    fn branch(&mut self, w: u32, label: Label, kind: Fixup) -> &mut Asm {
        self.fixups.push((self.code.len(), label, kind));
        self.word(w)
    }

    /// `xd = imm` (MOVZ + 3 MOVK: always four instructions).
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

    /// `hvc #0`.
    pub fn hvc(&mut self) -> &mut Asm {
        self.word(0xD400_0002)
    }

    /// x0 = `function`, x1..x3 = `args`, `hvc #0`.
    pub fn smccc(&mut self, function: u32, args: [u64; 3]) -> &mut Asm {
        self.mov(0, u64::from(function));
        for (i, a) in args.iter().enumerate() {
            self.mov(1 + i as u32, *a);
        }
        self.hvc()
    }

    /// `cmp wn, wm` (the low 32 bits: PSCI answers are 32-bit).
    pub fn cmp_w(&mut self, rn: u32, rm: u32) -> &mut Asm {
        self.word(0x6B00_001F | (rm << 16) | (rn << 5))
    }

    /// `cmp wn, #imm` (imm < 4096).
    pub fn cmp_w_imm(&mut self, rn: u32, imm: u32) -> &mut Asm {
        self.word(0x7100_001F | ((imm & 0xFFF) << 10) | (rn << 5))
    }

    /// `cmp xn, xm`.
    pub fn cmp_x(&mut self, rn: u32, rm: u32) -> &mut Asm {
        self.word(0xEB00_001F | (rm << 16) | (rn << 5))
    }

    /// `subs xd, xn, #imm` (imm < 4096).
    pub fn subs_imm(&mut self, rd: u32, rn: u32, imm: u32) -> &mut Asm {
        self.word(0xF100_0000 | ((imm & 0xFFF) << 10) | (rn << 5) | rd)
    }

    /// `add xd, xn, #imm` (imm < 4096).
    pub fn add_imm(&mut self, rd: u32, rn: u32, imm: u32) -> &mut Asm {
        self.word(0x9100_0000 | ((imm & 0xFFF) << 10) | (rn << 5) | rd)
    }

    /// `add xd, xn, xm`.
    pub fn add_reg(&mut self, rd: u32, rn: u32, rm: u32) -> &mut Asm {
        self.word(0x8B00_0000 | (rm << 16) | (rn << 5) | rd)
    }

    /// `ubfx xd, xn, #lsb, #width`: `width` bits of xn from bit `lsb`, zero-extended.
    pub fn ubfx(&mut self, rd: u32, rn: u32, lsb: u32, width: u32) -> &mut Asm {
        let imms = lsb + width - 1;
        self.word(0xD340_0000 | (lsb << 16) | (imms << 10) | (rn << 5) | rd)
    }

    /// `mrs xt, mpidr_el1`.
    pub fn mpidr(&mut self, rt: u32) -> &mut Asm {
        self.word(0xD538_00A0 | rt)
    }

    /// `b.<cond> label`.
    pub fn b_cond(&mut self, cond: Cond, label: Label) -> &mut Asm {
        self.branch(0x5400_0000 | cond as u32, label, Fixup::Imm19)
    }

    /// `b label`.
    pub fn b(&mut self, label: Label) -> &mut Asm {
        self.branch(0x1400_0000, label, Fixup::Imm26)
    }

    /// `cbz xt, label`.
    pub fn cbz(&mut self, rt: u32, label: Label) -> &mut Asm {
        self.branch(0xB400_0000 | rt, label, Fixup::Imm19)
    }

    /// `ldr xt, [xn, #off]` (off a multiple of 8, < 32 KiB).
    pub fn ldr(&mut self, rt: u32, rn: u32, off: u64) -> &mut Asm {
        self.word(0xF940_0000 | (((off / 8) as u32 & 0xFFF) << 10) | (rn << 5) | rt)
    }

    /// `str xt, [xn, #off]` (off a multiple of 8, < 32 KiB).
    pub fn str(&mut self, rt: u32, rn: u32, off: u64) -> &mut Asm {
        self.word(0xF900_0000 | (((off / 8) as u32 & 0xFFF) << 10) | (rn << 5) | rt)
    }

    /// `str xt, [xn], #imm` (post-index: xn += imm afterwards; -256 <= imm < 256).
    pub fn str_post(&mut self, rt: u32, rn: u32, imm: i32) -> &mut Asm {
        self.word(0xF800_0400 | (((imm as u32) & 0x1FF) << 12) | (rn << 5) | rt)
    }

    /// `strb wt, [xn]`.
    pub fn strb(&mut self, rt: u32, rn: u32) -> &mut Asm {
        self.word(0x3900_0000 | (rn << 5) | rt)
    }

    /// Stores xt at the absolute address `addr` (clobbers x16).
    pub fn store_at(&mut self, rt: u32, addr: u64) -> &mut Asm {
        self.mov(16, addr).str(rt, 16, 0)
    }

    /// Loads xt from the absolute address `addr` (clobbers x16).
    pub fn load_from(&mut self, rt: u32, addr: u64) -> &mut Asm {
        self.mov(16, addr).ldr(rt, 16, 0)
    }

    /// `isb; mrs xt, cntvct_el0`: the virtual counter, after every earlier instruction.
    pub fn counter(&mut self, rt: u32) -> &mut Asm {
        self.word(0xD503_3FDF).word(0xD53B_E040 | rt)
    }

    /// `mrs xt, cntfrq_el0`.
    pub fn counter_frequency(&mut self, rt: u32) -> &mut Asm {
        self.word(0xD53B_E000 | rt)
    }

    /// `wfi`.
    pub fn wfi(&mut self) -> &mut Asm {
        self.word(0xD503_207F)
    }

    /// Pads with `b .` until the next instruction is at `addr`.
    pub fn pad_to(&mut self, addr: u64) -> &mut Asm {
        while self.here() < addr {
            self.word(0x1400_0000);
        }
        self
    }

    /// The little-endian image. Panics on a label used but never bound or a
    /// branch out of range (mistakes in the program, not in its input).
    pub fn assemble(&self) -> Vec<u8> {
        let mut code = self.code.clone();
        for &(at, label, kind) in &self.fixups {
            let target = self.labels[label.0].expect("branch to a label never bound");
            let offset = target as i64 - at as i64;
            code[at] |= match kind {
                Fixup::Imm19 => {
                    assert!((-(1 << 18)..(1 << 18)).contains(&offset), "branch too far");
                    ((offset as u32) & 0x7FFFF) << 5
                }
                Fixup::Imm26 => {
                    assert!((-(1 << 25)..(1 << 25)).contains(&offset), "branch too far");
                    (offset as u32) & 0x3FF_FFFF
                }
            };
        }
        code.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(a: &Asm) -> Vec<u32> {
        a.assemble()
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn encodings_match_the_architecture_reference() {
        let mut a = Asm::new();
        a.subs_imm(19, 19, 1) // subs x19, x19, #1
            .cmp_w(0, 27) // cmp w0, w27
            .cmp_w_imm(0, 1) // cmp w0, #1
            .cmp_x(9, 10) // cmp x9, x10
            .add_imm(1, 1, 1) // add x1, x1, #1
            .mov_reg(0, 24) // mov x0, x24
            .ldr(6, 5, 8) // ldr x6, [x5, #8]
            .str(6, 5, 16) // str x6, [x5, #16]
            .strb(17, 16) // strb w17, [x16]
            .hvc()
            .wfi()
            .counter_frequency(22) // mrs x22, cntfrq_el0
            .add_reg(9, 0, 9) // add x9, x0, x9
            .ubfx(8, 8, 32, 32) // lsr x8, x8, #32
            .ubfx(7, 7, 0, 24) // and x7, x7, #0xffffff
            .mpidr(7) // mrs x7, mpidr_el1
            .str_post(21, 23, 8); // str x21, [x23], #8
        assert_eq!(
            words(&a),
            [
                0xF100_0673,
                0x6B1B_001F,
                0x7100_041F,
                0xEB0A_013F,
                0x9100_0421,
                0xAA18_03E0,
                0xF940_04A6,
                0xF900_08A6,
                0x3900_0211,
                0xD400_0002,
                0xD503_207F,
                0xD53B_E016,
                0x8B09_0009,
                0xD360_FD08,
                0xD340_5CE7,
                0xD538_00A7,
                0xF800_86F5,
            ]
        );
    }

    #[test]
    fn mov_builds_any_64_bit_value_in_four_instructions() {
        let mut a = Asm::new();
        a.mov(3, 0x1234_5678_9ABC_DEF0);
        assert_eq!(
            words(&a),
            [0xD29B_DE03, 0xF2B3_5783, 0xF2CA_CF03, 0xF2E2_4683]
        );
    }

    #[test]
    fn branches_reach_labels_bound_before_and_after_them() {
        let mut a = Asm::new();
        let top = a.label();
        let end = a.label();
        a.bind(top)
            .cbz(0, end)
            .b_cond(Cond::Ne, top)
            .b(top)
            .bind(end);
        assert_eq!(a.here(), ENTRY + 12);
        // cbz +3, b.ne -1, b -2
        assert_eq!(words(&a), [0xB400_0060, 0x54FF_FFE1, 0x17FF_FFFE]);
    }

    #[test]
    #[should_panic(expected = "never bound")]
    fn an_unbound_label_is_a_programming_error() {
        let mut a = Asm::new();
        let nowhere = a.label();
        a.b(nowhere);
        a.assemble();
    }
}
