//! The KVM-side state of a stopped VM as plain data: every vCPU register of
//! `KVM_GET_REG_LIST`, MP states, the vGICv3 and the guest's counter.
//!
//! These types build on every host (a snapshot can be read and checked
//! anywhere); capturing and applying them needs arm64 KVM
//! ([`KvmVm::save_state`](crate::KvmVm::save_state) and
//! [`KvmVm::restore_state`](crate::KvmVm::restore_state)).

use serde::{Deserialize, Serialize};

/// One register as `KVM_GET_ONE_REG` returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegValue {
    /// The ONE_REG id (architecture, size and register fields).
    pub id: u64,
    /// The register's bytes as KVM returned them (little-endian), exactly as
    /// many as the size field of `id` says.
    pub bytes: Vec<u8>,
}

impl RegValue {
    /// How many bytes a register with this ONE_REG id has (`KVM_REG_SIZE_*`,
    /// bits 55:52 of the id: log2 of the size in bytes). `None` above 2048
    /// bits, which no arm64 register uses.
    pub fn size_of_id(id: u64) -> Option<usize> {
        let log2 = (id >> 52) & 0xF;
        if log2 > 8 {
            return None;
        }
        Some(1usize << log2)
    }

    /// Whether the value has the length its id calls for.
    pub fn is_well_formed(&self) -> bool {
        RegValue::size_of_id(self.id) == Some(self.bytes.len())
    }
}

/// One vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// KVM vCPU id (index in the VM).
    pub index: u32,
    /// MPIDR_EL1 as KVM assigned it; checked on restore, never written.
    pub mpidr: u64,
    /// `KVM_GET_MP_STATE` (0 runnable, 3 stopped, 4 suspended, as KVM numbers them).
    pub mp_state: u32,
    /// Every register of `KVM_GET_REG_LIST` except MPIDR_EL1 and the two
    /// counters (the VM's counter is [`VmState::counter`]), in list order.
    pub regs: Vec<RegValue>,
}

/// A 32-bit vGIC register reached through a device attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicReg {
    /// Offset in the distributor or redistributor frame.
    pub offset: u32,
    /// Its value.
    pub value: u32,
}

/// A GIC CPU interface system register (`ICC_*_EL1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicSysreg {
    /// The register's encoding (op0, op1, CRn, CRm, op2 packed as in
    /// `KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS`, bits 15:0).
    pub encoding: u16,
    /// Its value.
    pub value: u64,
}

/// One vCPU's redistributor and CPU interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedistributorState {
    /// The vCPU's MPIDR_EL1 (the redistributor is addressed by its affinity).
    pub mpidr: u64,
    /// Redistributor registers (RD and SGI frames).
    pub regs: Vec<GicReg>,
    /// CPU interface system registers, in restore order.
    pub sysregs: Vec<GicSysreg>,
}

/// The in-kernel vGICv3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicState {
    /// Interrupts the distributor implements (`KVM_DEV_ARM_VGIC_GRP_NR_IRQS`).
    pub nr_irqs: u32,
    /// Distributor registers for the shared interrupts, in restore order.
    pub distributor: Vec<GicReg>,
    /// Input line levels of the shared interrupts, 32 per word from INTID 32
    /// (`KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO`).
    pub spi_levels: Vec<u32>,
    /// One per vCPU, in vCPU order.
    pub redistributors: Vec<RedistributorState>,
}

/// A stopped VM as KVM holds it (guest memory apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The counter frequency (CNTFRQ_EL0) of the host that saved it: a guest
    /// calibrated its clocks on it, so a host with another one is refused.
    pub cntfrq: u64,
    /// The guest's virtual counter when it was saved (`KVM_REG_ARM_TIMER_CNT`
    /// of vCPU 0); the restored guest's counter continues from here.
    pub counter: u64,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The interrupt controller.
    pub gic: GicState,
}

/// Why a saved [`VmState`] cannot go onto a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateMismatch {
    /// The host counter runs at another frequency.
    #[error("the snapshot's counter runs at {saved} Hz, this host's at {host} Hz")]
    CounterFrequency {
        /// Saved CNTFRQ_EL0.
        saved: u64,
        /// This host's.
        host: u64,
    },
    /// The VM has another number of vCPUs.
    #[error("the snapshot has {saved} vCPUs, the VM {vm}")]
    VcpuCount {
        /// In the snapshot.
        saved: usize,
        /// In the VM.
        vm: usize,
    },
    /// A vCPU got another MPIDR.
    #[error("vCPU {index} has MPIDR {vm:#x} here but {saved:#x} in the snapshot")]
    Mpidr {
        /// The vCPU.
        index: usize,
        /// In the snapshot.
        saved: u64,
        /// In the VM.
        vm: u64,
    },
    /// The parts disagree with each other (a damaged or hand-made state).
    #[error("inconsistent vCPU/vGIC state: {0}")]
    Inconsistent(String),
}

impl VmState {
    /// Checks the state's own consistency and that it fits a VM whose vCPUs
    /// have `mpidrs`, on a host whose counter runs at `host_cntfrq`. Called
    /// before anything is written to KVM.
    pub fn check_fits(&self, mpidrs: &[u64], host_cntfrq: u64) -> Result<(), StateMismatch> {
        if self.cntfrq != host_cntfrq {
            return Err(StateMismatch::CounterFrequency {
                saved: self.cntfrq,
                host: host_cntfrq,
            });
        }
        if self.vcpus.len() != mpidrs.len() {
            return Err(StateMismatch::VcpuCount {
                saved: self.vcpus.len(),
                vm: mpidrs.len(),
            });
        }
        if self.gic.redistributors.len() != self.vcpus.len() {
            return Err(StateMismatch::Inconsistent(format!(
                "{} redistributors for {} vCPUs",
                self.gic.redistributors.len(),
                self.vcpus.len()
            )));
        }
        for (index, ((vcpu, redist), &mpidr)) in self
            .vcpus
            .iter()
            .zip(&self.gic.redistributors)
            .zip(mpidrs)
            .enumerate()
        {
            if vcpu.index as usize != index {
                return Err(StateMismatch::Inconsistent(format!(
                    "vCPU {index} is stored as vCPU {}",
                    vcpu.index
                )));
            }
            if vcpu.mpidr != mpidr {
                return Err(StateMismatch::Mpidr {
                    index,
                    saved: vcpu.mpidr,
                    vm: mpidr,
                });
            }
            if redist.mpidr != mpidr {
                return Err(StateMismatch::Inconsistent(format!(
                    "the redistributor of vCPU {index} is stored for MPIDR {:#x}",
                    redist.mpidr
                )));
            }
            if let Some(bad) = vcpu.regs.iter().find(|r| !r.is_well_formed()) {
                return Err(StateMismatch::Inconsistent(format!(
                    "vCPU {index}: register {:#x} has {} bytes",
                    bad.id,
                    bad.bytes.len()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(mpidrs: &[u64]) -> VmState {
        VmState {
            cntfrq: 62_500_000,
            counter: 1000,
            vcpus: mpidrs
                .iter()
                .enumerate()
                .map(|(i, &m)| VcpuState {
                    index: i as u32,
                    mpidr: m,
                    mp_state: 0,
                    regs: vec![RegValue {
                        id: 0x6030_0000_0010_0000,
                        bytes: vec![0; 8],
                    }],
                })
                .collect(),
            gic: GicState {
                nr_irqs: 64,
                distributor: Vec::new(),
                spi_levels: vec![0],
                redistributors: mpidrs
                    .iter()
                    .map(|&m| RedistributorState {
                        mpidr: m,
                        regs: Vec::new(),
                        sysregs: Vec::new(),
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn register_size_comes_from_the_id() {
        assert_eq!(RegValue::size_of_id(0x6030_0000_0010_0000), Some(8));
        assert_eq!(RegValue::size_of_id(0x6040_0000_0010_0000), Some(16));
        assert_eq!(RegValue::size_of_id(0x6020_0000_0010_0000), Some(4));
        assert_eq!(RegValue::size_of_id(0x60F0_0000_0000_0000), None);
    }

    #[test]
    fn a_state_fits_the_vm_it_was_taken_from() {
        assert_eq!(state(&[0, 1]).check_fits(&[0, 1], 62_500_000), Ok(()));
    }

    #[test]
    fn another_counter_frequency_is_refused() {
        assert_eq!(
            state(&[0]).check_fits(&[0], 25_000_000),
            Err(StateMismatch::CounterFrequency {
                saved: 62_500_000,
                host: 25_000_000
            })
        );
    }

    #[test]
    fn another_vcpu_count_or_mpidr_is_refused() {
        assert_eq!(
            state(&[0, 1]).check_fits(&[0], 62_500_000),
            Err(StateMismatch::VcpuCount { saved: 2, vm: 1 })
        );
        assert_eq!(
            state(&[0, 1]).check_fits(&[0, 0x100], 62_500_000),
            Err(StateMismatch::Mpidr {
                index: 1,
                saved: 1,
                vm: 0x100
            })
        );
    }

    #[test]
    fn a_register_of_the_wrong_length_is_refused() {
        let mut s = state(&[0]);
        s.vcpus[0].regs[0].bytes.pop();
        assert!(matches!(
            s.check_fits(&[0], 62_500_000),
            Err(StateMismatch::Inconsistent(_))
        ));
    }

    #[test]
    fn a_redistributor_saved_for_another_vcpu_is_refused() {
        let mut s = state(&[0, 1]);
        s.gic.redistributors[1].mpidr = 0;
        assert!(matches!(
            s.check_fits(&[0, 1], 62_500_000),
            Err(StateMismatch::Inconsistent(_))
        ));
    }
}
