//! A small, valid KVM state for host tests of the snapshot and migration
//! formats: `cpus` vCPUs (MPIDR = index; vCPU 0 runnable at its PC, the
//! others stopped), a vGICv3 with one redistributor each.

use vpsci_kvm::{GicState, RedistributorState, RegValue, VcpuState, VmState};

/// The state of a `cpus`-vCPU machine (see the module docs).
pub fn vm_state(cpus: u32) -> VmState {
    VmState {
        cntfrq: 62_500_000,
        counter: 123_456,
        vcpus: (0..cpus)
            .map(|i| VcpuState {
                index: i,
                mpidr: u64::from(i),
                mp_state: if i == 0 { 0 } else { 3 },
                regs: vec![RegValue {
                    // PC
                    id: 0x6030_0000_0010_0040,
                    bytes: (0x4008_0000u64 + u64::from(i)).to_le_bytes().to_vec(),
                }],
            })
            .collect(),
        gic: GicState {
            nr_irqs: 64,
            distributor: Vec::new(),
            spi_levels: vec![0],
            redistributors: (0..cpus)
                .map(|i| RedistributorState {
                    mpidr: u64::from(i),
                    regs: Vec::new(),
                    sysregs: Vec::new(),
                })
                .collect(),
        },
    }
}
