//! Register identifiers for `KVM_{GET,SET}_ONE_REG` on arm64.

use crate::CoreReg;
use kvm_bindings::{
    KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM64_SYSREG_CRM_SHIFT,
    KVM_REG_ARM64_SYSREG_CRN_SHIFT, KVM_REG_ARM64_SYSREG_OP0_SHIFT, KVM_REG_ARM64_SYSREG_OP1_SHIFT,
    KVM_REG_ARM64_SYSREG_OP2_SHIFT, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
};

/// The ONE_REG id of a core register, or `None` for an x register above 30.
pub(crate) fn core_reg_id(reg: CoreReg) -> Option<u64> {
    // Core register ids are the offset into `struct kvm_regs` in 32-bit
    // words; user_pt_regs is x0..x30, sp, pc, pstate, all 64-bit.
    let word = match reg {
        CoreReg::X(n) if n <= 30 => u64::from(n) * 2,
        CoreReg::X(_) => return None,
        CoreReg::Sp => 31 * 2,
        CoreReg::Pc => 32 * 2,
        CoreReg::Pstate => 33 * 2,
    };
    Some(KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | word)
}

/// ONE_REG id of a system register given its encoding.
pub(crate) const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT)
        | (op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT)
        | (crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT)
        | (crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT)
        | (op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT)
}

/// MPIDR_EL1 (op0=3, op1=0, CRn=0, CRm=0, op2=5).
pub(crate) const MPIDR_EL1: u64 = sysreg(3, 0, 0, 0, 5);
