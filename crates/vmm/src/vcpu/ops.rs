//! What a vCPU thread needs from its vCPU and from the MMIO bus, as two small
//! traits. KVM's vCPU ([`vpsci_kvm::KvmVcpu`], arm64) and the VM's device bus
//! implement them for real; tests drive the same exit handling natively with
//! a scripted fake vCPU.

use vpsci_kvm::{CoreReg, KvmError, MpState, VcpuExit};

use crate::devices::irq::{Raised, RiseMark};

/// The vCPU operations the exit handling uses (the `KvmVcpu` methods of the
/// same names).
pub trait VcpuOps: Send {
    /// Position of the vCPU in the VM.
    fn index(&self) -> usize;
    /// Makes kicks reach the calling thread (call on the vCPU's own thread).
    fn bind_current_thread(&mut self);
    /// Enters the guest until the next exit.
    fn run(&mut self) -> Result<VcpuExit, KvmError>;
    /// Reads a core register.
    fn get_core(&self, reg: CoreReg) -> Result<u64, KvmError>;
    /// Writes a core register.
    fn set_core(&self, reg: CoreReg, value: u64) -> Result<(), KvmError>;
    /// Resets the vCPU and makes it runnable at `entry` with x0 = `context_id`.
    fn start_at(&self, entry: u64, context_id: u64) -> Result<(), KvmError>;
    /// Sets the MP state.
    fn set_mp_state(&self, state: MpState) -> Result<(), KvmError>;
    /// Makes a suspended vCPU runnable with x0..x3 = `regs`.
    fn set_smccc_result(&self, regs: [u64; 4]) -> Result<(), KvmError>;
    /// Supplies the data of the last `VcpuExit::MmioRead`.
    fn complete_mmio_read(&mut self, data: &[u8]);
}

/// Where guest MMIO goes (the VM's device bus).
pub trait Mmio: Send + Sync {
    /// A load of `data.len()` bytes at guest physical `addr`.
    fn read(&self, addr: u64, data: &mut [u8]);
    /// A store of `data` at guest physical `addr`.
    fn write(&self, addr: u64, data: &[u8]);
    /// How often each device interrupt line has risen so far (taken when a
    /// vCPU suspends). A bus without device interrupts has none to count.
    fn interrupt_mark(&self) -> RiseMark {
        RiseMark::default()
    }
    /// The device interrupt lines that can have woken a vCPU that suspended
    /// at `mark` (the wake-up sources the event log names): those that rose
    /// since, else those still high.
    fn wake_sources(&self, mark: &RiseMark) -> Vec<Raised> {
        let _ = mark;
        Vec::new()
    }
}

#[cfg(target_arch = "aarch64")]
impl VcpuOps for vpsci_kvm::KvmVcpu {
    fn index(&self) -> usize {
        vpsci_kvm::KvmVcpu::index(self)
    }
    fn bind_current_thread(&mut self) {
        vpsci_kvm::KvmVcpu::bind_current_thread(self);
    }
    fn run(&mut self) -> Result<VcpuExit, KvmError> {
        vpsci_kvm::KvmVcpu::run(self)
    }
    fn get_core(&self, reg: CoreReg) -> Result<u64, KvmError> {
        vpsci_kvm::KvmVcpu::get_core(self, reg)
    }
    fn set_core(&self, reg: CoreReg, value: u64) -> Result<(), KvmError> {
        vpsci_kvm::KvmVcpu::set_core(self, reg, value)
    }
    fn start_at(&self, entry: u64, context_id: u64) -> Result<(), KvmError> {
        vpsci_kvm::KvmVcpu::start_at(self, entry, context_id)
    }
    fn set_mp_state(&self, state: MpState) -> Result<(), KvmError> {
        vpsci_kvm::KvmVcpu::set_mp_state(self, state)
    }
    fn set_smccc_result(&self, regs: [u64; 4]) -> Result<(), KvmError> {
        vpsci_kvm::KvmVcpu::set_smccc_result(self, regs)
    }
    fn complete_mmio_read(&mut self, data: &[u8]) {
        vpsci_kvm::KvmVcpu::complete_mmio_read(self, data);
    }
}
