//! A vCPU its thread runs and the snapshot code can reach while the VM is
//! paused.
//!
//! The vCPU thread owns its vCPU for `KVM_RUN` and every exit; a snapshot
//! needs the same vCPU's registers from another thread, but only while the VM
//! is paused ([`VmControl::pause`](super::VmControl::pause): every thread
//! parked, none inside `KVM_RUN` or handling an exit). A mutex per vCPU
//! expresses exactly that: the runner takes it for each operation (never
//! contended while the VM runs), the snapshot takes it while paused.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vpsci_kvm::{CoreReg, KvmError, MpState, VcpuExit};

use super::ops::VcpuOps;

/// A vCPU behind a mutex, shared by its thread and the snapshot code.
pub struct SharedVcpu<V> {
    inner: Arc<Mutex<V>>,
    index: usize,
}

impl<V> Clone for SharedVcpu<V> {
    fn clone(&self) -> Self {
        SharedVcpu {
            inner: Arc::clone(&self.inner),
            index: self.index,
        }
    }
}

impl<V> std::fmt::Debug for SharedVcpu<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedVcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<V: VcpuOps> SharedVcpu<V> {
    /// Shares `vcpu`.
    pub fn new(vcpu: V) -> SharedVcpu<V> {
        let index = vcpu.index();
        SharedVcpu {
            inner: Arc::new(Mutex::new(vcpu)),
            index,
        }
    }
}

impl<V> SharedVcpu<V> {
    /// The vCPU itself. Blocks while its thread is inside `KVM_RUN`: take it
    /// only while the VM is paused.
    pub fn lock(&self) -> MutexGuard<'_, V> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<V: VcpuOps> VcpuOps for SharedVcpu<V> {
    fn index(&self) -> usize {
        self.index
    }
    fn bind_current_thread(&mut self) {
        self.lock().bind_current_thread();
    }
    fn run(&mut self) -> Result<VcpuExit, KvmError> {
        self.lock().run()
    }
    fn get_core(&self, reg: CoreReg) -> Result<u64, KvmError> {
        self.lock().get_core(reg)
    }
    fn set_core(&self, reg: CoreReg, value: u64) -> Result<(), KvmError> {
        self.lock().set_core(reg, value)
    }
    fn start_at(&self, entry: u64, context_id: u64) -> Result<(), KvmError> {
        self.lock().start_at(entry, context_id)
    }
    fn set_mp_state(&self, state: MpState) -> Result<(), KvmError> {
        self.lock().set_mp_state(state)
    }
    fn set_smccc_result(&self, regs: [u64; 4]) -> Result<(), KvmError> {
        self.lock().set_smccc_result(regs)
    }
    fn complete_mmio_read(&mut self, data: &[u8]) {
        self.lock().complete_mmio_read(data);
    }
}
