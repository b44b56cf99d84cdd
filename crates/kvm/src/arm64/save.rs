//! Capturing and applying [`VmState`] on arm64 KVM.
//!
//! Order and rules (Documentation/virt/kvm/api.rst and devices/arm-vgic-v3.rst;
//! the same as the peers that save arm64 VMs):
//! - Every vCPU must be out of `KVM_RUN` (the vGIC's attribute accesses take
//!   every vCPU's lock and fail with EBUSY otherwise).
//! - Save: `KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES` first (it writes LPI pending
//!   state into guest RAM, so the caller saves RAM after this), then the vCPUs'
//!   registers and MP states, then the distributor, each redistributor by its
//!   vCPU's MPIDR (never vCPU 0's for everyone) and each CPU interface.
//! - Restore, onto a VM freshly created with the same vCPUs and
//!   `KVM_ARM_VCPU_INIT` done: registers (MPIDR is checked against the new
//!   vCPU, not written), the counter, MP state; then the distributor, the
//!   redistributors, the CPU interfaces and the shared lines' levels.
//! - The counter: `KVM_REG_ARM_TIMER_CNT` written on a vCPU sets the VM's
//!   virtual counter offset (VM-wide since Linux 6.4), so the guest's counter
//!   continues from the saved value: it does not see the time the VM spent
//!   saved. The physical counter is left alone (since 6.4 its offset can only
//!   be set with `KVM_ARM_SET_COUNTER_OFFSET`; guests use the virtual one).

use kvm_bindings::{
    kvm_device_attr, RegList, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES,
    VGIC_LEVEL_INFO_LINE_LEVEL,
};
use kvm_ioctls::DeviceFd;

use super::regs::{sysreg, MPIDR_EL1};
use super::vcpu::KvmVcpu;
use crate::state::{GicReg, GicState, GicSysreg, RedistributorState, RegValue, VcpuState, VmState};
use crate::KvmError;

/// `KVM_REG_ARM_TIMER_CNT`: the virtual counter (CNTVCT_EL0's value). The uapi
/// gives it the encoding (3, 3, 14, 3, 2).
pub(crate) const TIMER_CNT: u64 = sysreg(3, 3, 14, 3, 2);
/// `KVM_REG_ARM_PTIMER_CNT`: the physical counter (3, 3, 14, 0, 1).
const PTIMER_CNT: u64 = sysreg(3, 3, 14, 0, 1);

/// This host's counter frequency (CNTFRQ_EL0, readable at EL0).
pub fn host_cntfrq() -> u64 {
    let value: u64;
    // SAFETY: CNTFRQ_EL0 is readable at EL0 on every arm64 Linux host (the
    // vDSO relies on it); the instruction has no other effect.
    unsafe { std::arch::asm!("mrs {}, cntfrq_el0", out(reg) value, options(nomem, nostack)) };
    value
}

// ---- vCPU registers ----

/// Reads every register KVM lists for `vcpu`, its MP state, and its counter.
fn save_vcpu(vcpu: &KvmVcpu) -> Result<(VcpuState, u64), KvmError> {
    let fd = vcpu.fd();
    // 500 is more than any arm64 vCPU without SVE lists (~250 on 6.12); KVM
    // reports E2BIG with the count it needs otherwise, and we retry once.
    let mut list = RegList::new(500).map_err(|_| KvmError::StateTooLarge {
        what: "register list",
    })?;
    if let Err(e) = fd.get_reg_list(&mut list) {
        if e.errno() != libc::E2BIG {
            return Err(KvmError::ioctl("KVM_GET_REG_LIST", e));
        }
        let needed = list.as_fam_struct_ref().n as usize;
        list = RegList::new(needed).map_err(|_| KvmError::StateTooLarge {
            what: "register list",
        })?;
        fd.get_reg_list(&mut list)
            .map_err(|e| KvmError::ioctl("KVM_GET_REG_LIST", e))?;
    }
    let mut regs = Vec::with_capacity(list.as_slice().len());
    for &id in list.as_slice() {
        if id == MPIDR_EL1 || id == TIMER_CNT || id == PTIMER_CNT {
            continue;
        }
        let size = RegValue::size_of_id(id).ok_or(KvmError::RegisterTooLarge { id })?;
        let mut bytes = vec![0u8; size];
        fd.get_one_reg(id, &mut bytes)
            .map_err(|e| KvmError::register("KVM_GET_ONE_REG", id, e))?;
        regs.push(RegValue { id, bytes });
    }
    let mut cnt = [0u8; 8];
    fd.get_one_reg(TIMER_CNT, &mut cnt)
        .map_err(|e| KvmError::register("KVM_GET_ONE_REG", TIMER_CNT, e))?;
    let mp_state = fd
        .get_mp_state()
        .map_err(|e| KvmError::ioctl("KVM_GET_MP_STATE", e))?
        .mp_state;
    Ok((
        VcpuState {
            index: vcpu.index() as u32,
            mpidr: vcpu.mpidr().raw(),
            mp_state,
            regs,
        },
        u64::from_le_bytes(cnt),
    ))
}

/// Writes a saved vCPU onto `vcpu` (initialised, never run).
fn restore_vcpu(vcpu: &KvmVcpu, state: &VcpuState, counter: u64) -> Result<(), KvmError> {
    let fd = vcpu.fd();
    for reg in &state.regs {
        if reg.id == MPIDR_EL1 || reg.id == TIMER_CNT || reg.id == PTIMER_CNT {
            continue;
        }
        fd.set_one_reg(reg.id, &reg.bytes)
            .map_err(|e| KvmError::register("KVM_SET_ONE_REG", reg.id, e))?;
    }
    fd.set_one_reg(TIMER_CNT, &counter.to_le_bytes())
        .map_err(|e| KvmError::register("KVM_SET_ONE_REG", TIMER_CNT, e))?;
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(|e| KvmError::ioctl("KVM_SET_MP_STATE", e))
}

// ---- vGICv3 ----

/// The redistributor/CPU interface attribute's affinity field (bits 63:32:
/// Aff3.Aff2.Aff1.Aff0, one byte each).
fn affinity_attr(mpidr: u64) -> u64 {
    let aff0 = mpidr & 0xFF;
    let aff1 = (mpidr >> 8) & 0xFF;
    let aff2 = (mpidr >> 16) & 0xFF;
    let aff3 = (mpidr >> 32) & 0xFF;
    ((aff3 << 24) | (aff2 << 16) | (aff1 << 8) | aff0) << 32
}

/// A per-interrupt distributor register block: base offset and bits per interrupt.
struct DistBlock {
    base: u32,
    bits: u32,
}

// GICv3 architecture spec (IHI 0069), distributor register map. Only the
// shared interrupts (INTID 32 up): the private ones live in each
// redistributor. Pending comes after enables and configuration so a level
// interrupt's latch is only set where the line does not already explain it.
const GICD_CTLR: u32 = 0x0000;
const DIST_BLOCKS: &[DistBlock] = &[
    DistBlock {
        base: 0x0080,
        bits: 1,
    }, // GICD_IGROUPR
    DistBlock {
        base: 0x0C00,
        bits: 2,
    }, // GICD_ICFGR
    DistBlock {
        base: 0x0400,
        bits: 8,
    }, // GICD_IPRIORITYR
    DistBlock {
        base: 0x6000,
        bits: 64,
    }, // GICD_IROUTER
    DistBlock {
        base: 0x0100,
        bits: 1,
    }, // GICD_ISENABLER
    DistBlock {
        base: 0x0300,
        bits: 1,
    }, // GICD_ISACTIVER
    DistBlock {
        base: 0x0200,
        bits: 1,
    }, // GICD_ISPENDR
];
const GICD_ICFGR: u32 = 0x0C00;
const GICD_ISPENDR: u32 = 0x0200;

// Redistributor: RD frame, then the SGI frame 64 KiB above it.
const GICR_CTLR: u32 = 0x0000;
const SGI: u32 = 0x1_0000;
const GICR_IGROUPR0: u32 = SGI + 0x0080;
const GICR_ISENABLER0: u32 = SGI + 0x0100;
const GICR_ISPENDR0: u32 = SGI + 0x0200;
const GICR_ISACTIVER0: u32 = SGI + 0x0300;
const GICR_IPRIORITYR0: u32 = SGI + 0x0400;
const GICR_ICFGR1: u32 = SGI + 0x0C04;
/// Restore order of the redistributor registers (configuration before
/// enable, pending last).
fn redist_offsets() -> Vec<u32> {
    let mut v = vec![GICR_CTLR, GICR_IGROUPR0, GICR_ICFGR1];
    v.extend((0..8).map(|n| GICR_IPRIORITYR0 + 4 * n));
    v.extend([GICR_ISENABLER0, GICR_ISACTIVER0, GICR_ISPENDR0]);
    v
}

/// Encoding of an ICC system register for `KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS`.
const fn icc(op0: u16, op1: u16, crn: u16, crm: u16, op2: u16) -> u16 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}
const ICC_SRE_EL1: u16 = icc(3, 0, 12, 12, 5);
const ICC_CTLR_EL1: u16 = icc(3, 0, 12, 12, 4);
const ICC_PMR_EL1: u16 = icc(3, 0, 4, 6, 0);
const ICC_BPR0_EL1: u16 = icc(3, 0, 12, 8, 3);
const ICC_BPR1_EL1: u16 = icc(3, 0, 12, 12, 3);
const ICC_IGRPEN0_EL1: u16 = icc(3, 0, 12, 12, 6);
const ICC_IGRPEN1_EL1: u16 = icc(3, 0, 12, 12, 7);
const fn icc_ap0r(n: u16) -> u16 {
    icc(3, 0, 12, 8, 4 + n)
}
const fn icc_ap1r(n: u16) -> u16 {
    icc(3, 0, 12, 9, n)
}

/// The vGIC device of a VM.
pub(crate) struct Vgic<'a> {
    pub(crate) fd: &'a DeviceFd,
}

impl Vgic<'_> {
    fn get32(&self, group: u32, attr: u64, what: &'static str) -> Result<u32, KvmError> {
        let mut value = 0u32;
        let mut a = kvm_device_attr {
            group,
            attr,
            addr: &mut value as *mut u32 as u64,
            flags: 0,
        };
        // SAFETY: every attribute of these groups is 32 bits wide and `addr`
        // points at a live u32.
        unsafe { self.fd.get_device_attr(&mut a) }.map_err(|e| KvmError::ioctl(what, e))?;
        Ok(value)
    }

    fn set32(&self, group: u32, attr: u64, value: u32, what: &'static str) -> Result<(), KvmError> {
        let a = kvm_device_attr {
            group,
            attr,
            addr: &value as *const u32 as u64,
            flags: 0,
        };
        self.fd
            .set_device_attr(&a)
            .map_err(|e| KvmError::ioctl(what, e))
    }

    fn get_sysreg(&self, mpidr: u64, enc: u16) -> Result<u64, KvmError> {
        let mut value = 0u64;
        let mut a = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            attr: affinity_attr(mpidr) | u64::from(enc),
            addr: &mut value as *mut u64 as u64,
            flags: 0,
        };
        // SAFETY: CPU interface registers are 64 bits wide; `addr` points at
        // a live u64.
        unsafe { self.fd.get_device_attr(&mut a) }
            .map_err(|e| KvmError::ioctl("vGIC CPU interface register read", e))?;
        Ok(value)
    }

    fn set_sysreg(&self, mpidr: u64, enc: u16, value: u64) -> Result<(), KvmError> {
        let a = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            attr: affinity_attr(mpidr) | u64::from(enc),
            addr: &value as *const u64 as u64,
            flags: 0,
        };
        self.fd
            .set_device_attr(&a)
            .map_err(|e| KvmError::ioctl("vGIC CPU interface register write", e))
    }

    /// Flushes LPI pending state into guest RAM (before RAM is saved).
    pub(crate) fn save_pending_tables(&self) -> Result<(), KvmError> {
        let a = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: u64::from(KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES),
            addr: 0,
            flags: 0,
        };
        self.fd
            .set_device_attr(&a)
            .map_err(|e| KvmError::ioctl("KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES", e))
    }

    fn nr_irqs(&self) -> Result<u32, KvmError> {
        self.get32(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, "vGIC number of interrupts")
    }

    /// Offsets of the distributor registers, in restore order.
    fn dist_offsets(nr_irqs: u32) -> Vec<u32> {
        let mut v = vec![GICD_CTLR];
        for block in DIST_BLOCKS {
            // Bytes the block takes for INTIDs 32..nr_irqs, in 32-bit words.
            let start = block.base + 32 * block.bits / 8;
            let end = block.base + nr_irqs * block.bits / 8;
            v.extend((start..end).step_by(4));
        }
        v
    }

    fn save(&self, mpidrs: &[u64]) -> Result<GicState, KvmError> {
        let nr_irqs = self.nr_irqs()?;
        let mut distributor = Vec::new();
        for offset in Vgic::dist_offsets(nr_irqs) {
            let value = self.get32(
                KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                u64::from(offset),
                "vGIC distributor register read",
            )?;
            distributor.push(GicReg { offset, value });
        }
        // Line levels are read through a vCPU's affinity (any will do for
        // shared interrupts).
        let any = affinity_attr(mpidrs.first().copied().unwrap_or(0));
        let mut spi_levels = Vec::new();
        for intid in (32..nr_irqs).step_by(32) {
            spi_levels.push(self.get32(
                KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                any | (u64::from(VGIC_LEVEL_INFO_LINE_LEVEL) << 10) | u64::from(intid),
                "vGIC line level read",
            )?);
        }
        let mut redistributors = Vec::with_capacity(mpidrs.len());
        for &mpidr in mpidrs {
            let mut regs = Vec::new();
            for offset in redist_offsets() {
                let value = self.get32(
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    affinity_attr(mpidr) | u64::from(offset),
                    "vGIC redistributor register read",
                )?;
                regs.push(GicReg { offset, value });
            }
            let ctlr = self.get_sysreg(mpidr, ICC_CTLR_EL1)?;
            // ICC_CTLR_EL1.PRIbits (10:8) is the number of priority bits - 1;
            // it sets how many active-priority registers exist.
            let pri_bits = ((ctlr >> 8) & 7) + 1;
            let ap_regs: u16 = match pri_bits {
                7 => 4,
                6 => 2,
                _ => 1,
            };
            let mut order = vec![
                ICC_SRE_EL1,
                ICC_CTLR_EL1,
                ICC_IGRPEN0_EL1,
                ICC_IGRPEN1_EL1,
                ICC_PMR_EL1,
                ICC_BPR0_EL1,
                ICC_BPR1_EL1,
            ];
            order.extend((0..ap_regs).map(icc_ap0r));
            order.extend((0..ap_regs).map(icc_ap1r));
            let mut sysregs = Vec::with_capacity(order.len());
            for enc in order {
                sysregs.push(GicSysreg {
                    encoding: enc,
                    value: self.get_sysreg(mpidr, enc)?,
                });
            }
            redistributors.push(RedistributorState {
                mpidr,
                regs,
                sysregs,
            });
        }
        Ok(GicState {
            nr_irqs,
            distributor,
            spi_levels,
            redistributors,
        })
    }

    fn restore(&self, state: &GicState) -> Result<(), KvmError> {
        let nr_irqs = self.nr_irqs()?;
        if nr_irqs != state.nr_irqs {
            return Err(KvmError::StateMismatch {
                reason: format!(
                    "the vGIC has {nr_irqs} interrupts here, {} in the snapshot",
                    state.nr_irqs
                ),
            });
        }
        // A level interrupt whose line is high is pending because of the
        // line: restoring its pending bit as well would latch it, and the
        // guest would take it once more after the device lowered the line.
        let level_triggered = |intid: u32| -> bool {
            let word = GICD_ICFGR + intid / 16 * 4;
            state
                .distributor
                .iter()
                .find(|r| r.offset == word)
                .is_some_and(|r| (r.value >> ((intid % 16) * 2 + 1)) & 1 == 0)
        };
        let line_high = |intid: u32| -> bool {
            let word = (intid - 32) / 32;
            state
                .spi_levels
                .get(word as usize)
                .is_some_and(|w| (w >> (intid % 32)) & 1 == 1)
        };
        for reg in &state.distributor {
            let mut value = reg.value;
            if (GICD_ISPENDR + 4..GICD_ISPENDR + 0x80).contains(&reg.offset) {
                let first = (reg.offset - GICD_ISPENDR) * 8;
                for bit in 0..32 {
                    let intid = first + bit;
                    if level_triggered(intid) && line_high(intid) {
                        value &= !(1 << bit);
                    }
                }
            }
            self.set32(
                KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                u64::from(reg.offset),
                value,
                "vGIC distributor register write",
            )?;
        }
        for redist in &state.redistributors {
            // The private level interrupts (the timers, the PMU) are driven by
            // KVM from the restored timer state: never latch them pending.
            let icfgr1 = redist
                .regs
                .iter()
                .find(|r| r.offset == GICR_ICFGR1)
                .map_or(0, |r| r.value);
            for reg in &redist.regs {
                let mut value = reg.value;
                if reg.offset == GICR_ISPENDR0 {
                    for ppi in 16..32 {
                        let edge = (icfgr1 >> ((ppi - 16) * 2 + 1)) & 1 == 1;
                        if !edge {
                            value &= !(1 << ppi);
                        }
                    }
                }
                self.set32(
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    affinity_attr(redist.mpidr) | u64::from(reg.offset),
                    value,
                    "vGIC redistributor register write",
                )?;
            }
        }
        for redist in &state.redistributors {
            for reg in &redist.sysregs {
                self.set_sysreg(redist.mpidr, reg.encoding, reg.value)?;
            }
        }
        let any = affinity_attr(state.redistributors.first().map_or(0, |r| r.mpidr));
        for (n, &levels) in state.spi_levels.iter().enumerate() {
            let intid = 32 + 32 * n as u64;
            self.set32(
                KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                any | (u64::from(VGIC_LEVEL_INFO_LINE_LEVEL) << 10) | intid,
                levels,
                "vGIC line level write",
            )?;
        }
        Ok(())
    }
}

/// Saves the whole VM (see the module docs for the order). Every vCPU must be
/// out of `KVM_RUN`; the caller saves guest RAM after this returns.
pub(crate) fn save_vm(vgic: &Vgic<'_>, vcpus: &[&KvmVcpu]) -> Result<VmState, KvmError> {
    vgic.save_pending_tables()?;
    let mut states = Vec::with_capacity(vcpus.len());
    let mut counter = None;
    for vcpu in vcpus {
        let (state, cnt) = save_vcpu(vcpu)?;
        counter.get_or_insert(cnt);
        states.push(state);
    }
    let mpidrs: Vec<u64> = vcpus.iter().map(|v| v.mpidr().raw()).collect();
    let gic = vgic.save(&mpidrs)?;
    Ok(VmState {
        cntfrq: host_cntfrq(),
        counter: counter.unwrap_or(0),
        vcpus: states,
        gic,
    })
}

/// Applies `state` to a freshly created VM whose vCPUs have never run.
pub(crate) fn restore_vm(
    vgic: &Vgic<'_>,
    vcpus: &[&KvmVcpu],
    state: &VmState,
) -> Result<(), KvmError> {
    let mpidrs: Vec<u64> = vcpus.iter().map(|v| v.mpidr().raw()).collect();
    state
        .check_fits(&mpidrs, host_cntfrq())
        .map_err(|e| KvmError::StateMismatch {
            reason: e.to_string(),
        })?;
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        restore_vcpu(vcpu, saved, state.counter)?;
    }
    vgic.restore(&state.gic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_attr_packs_aff3_next_to_aff2() {
        assert_eq!(affinity_attr(0x80_0000_0000 | 0x03_0201), 0x8003_0201 << 32);
    }

    #[test]
    fn distributor_offsets_skip_the_private_interrupts() {
        let offsets = Vgic::dist_offsets(64);
        assert_eq!(offsets.first(), Some(&GICD_CTLR));
        assert!(offsets.contains(&0x0084), "IGROUPR for INTIDs 32-63");
        assert!(!offsets.contains(&0x0080), "IGROUPR word 0 is banked");
        assert!(offsets.contains(&(0x6000 + 8 * 32)));
        assert!(offsets.contains(&(0x6000 + 8 * 63 + 4)));
        assert!(!offsets.contains(&(0x6000 + 8 * 64)));
    }
}
