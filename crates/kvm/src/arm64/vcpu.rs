//! One KVM vCPU: initialisation/reset, registers, MP state, `KVM_RUN` and its
//! exits in a form that does not leak kvm-ioctls types.

use std::sync::Arc;

use kvm_bindings::{
    kvm_mp_state, kvm_vcpu_init, KVM_HYPERCALL_EXIT_SMC, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_SUSPEND, KVM_SYSTEM_EVENT_WAKEUP,
};
use kvm_ioctls::{VcpuExit as RawExit, VcpuFd};

use super::kick::{KickRegistration, KickTarget, VcpuKicker};
use super::regs::core_reg_id;
use super::vm::POWER_OFF_BIT;
use crate::KvmError;
use crate::{CoreReg, MpState, SystemEventKind, VcpuExit};
use vpsci_firmware::{Mpidr, VcpuId};

/// One vCPU. Owned by the thread that runs it (call
/// [`KvmVcpu::bind_current_thread`] there so kicks reach it).
#[derive(Debug)]
pub struct KvmVcpu {
    // Declared before `fd` so it is dropped first: the kick handler must
    // stop pointing into kvm_run before the mapping goes away.
    registration: Option<KickRegistration>,
    fd: VcpuFd,
    index: usize,
    mpidr: Mpidr,
    kvi: kvm_vcpu_init,
    kick: Arc<KickTarget>,
}

impl KvmVcpu {
    pub(crate) fn new(fd: VcpuFd, index: usize, kvi: kvm_vcpu_init) -> KvmVcpu {
        KvmVcpu {
            registration: None,
            fd,
            index,
            mpidr: Mpidr::from_index(0),
            kvi,
            kick: Arc::new(KickTarget::default()),
        }
    }

    pub(crate) fn with_mpidr(mut self, mpidr: Mpidr) -> KvmVcpu {
        self.mpidr = mpidr;
        self
    }

    /// Index of the vCPU in the VM (its KVM vCPU id), for indexing.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The vCPU as the firmware engine names it (same number as [`KvmVcpu::index`]).
    pub fn id(&self) -> VcpuId {
        // `KvmVm::create` makes at most `VmSpec::vcpus` vCPUs, which KVM caps far below
        // u32::MAX.
        VcpuId::new(self.index as u32)
    }

    /// The vCPU's fd (state capture and restore).
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// MPIDR affinity, as KVM assigned it.
    pub fn mpidr(&self) -> Mpidr {
        self.mpidr
    }

    /// (Re)initialises the vCPU with `KVM_ARM_VCPU_INIT`: every register
    /// takes its architectural reset value (PSTATE = EL1h with D, A, I, F
    /// masked; SCTLR_EL1 with the MMU and caches off). Powered on: runnable;
    /// otherwise `KVM_MP_STATE_STOPPED`.
    pub fn init(&self, powered_on: bool) -> Result<(), KvmError> {
        let mut kvi = self.kvi;
        if !powered_on {
            kvi.features[0] |= POWER_OFF_BIT;
        }
        self.fd
            .vcpu_init(&kvi)
            .map_err(|e| KvmError::ioctl("KVM_ARM_VCPU_INIT", e))
    }

    /// Resets the vCPU and makes it runnable at `entry` with x0 = `context_id`:
    /// the state PSCI requires at a CPU_ON or powerdown-resume entry
    /// (DEN0022 §6.4.3: MMU and caches off, interrupts masked, other GPRs
    /// UNKNOWN — KVM's reset zeroes them).
    pub fn start_at(&self, entry: u64, context_id: u64) -> Result<(), KvmError> {
        self.init(true)?;
        self.set_core(CoreReg::Pc, entry)?;
        self.set_core(CoreReg::X(0), context_id)?;
        Ok(())
    }

    /// Reads a core register.
    pub fn get_core(&self, reg: CoreReg) -> Result<u64, KvmError> {
        let id = reg_id(reg)?;
        let mut buf = [0u8; 8];
        self.fd
            .get_one_reg(id, &mut buf)
            .map_err(|e| KvmError::ioctl("KVM_GET_ONE_REG", e))?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Writes a core register.
    pub fn set_core(&self, reg: CoreReg, value: u64) -> Result<(), KvmError> {
        let id = reg_id(reg)?;
        self.fd
            .set_one_reg(id, &value.to_le_bytes())
            .map_err(|e| KvmError::ioctl("KVM_SET_ONE_REG", e))?;
        Ok(())
    }

    pub(crate) fn get_sysreg(&self, id: u64) -> Result<u64, KvmError> {
        let mut buf = [0u8; 8];
        self.fd
            .get_one_reg(id, &mut buf)
            .map_err(|e| KvmError::ioctl("KVM_GET_ONE_REG(sysreg)", e))?;
        Ok(u64::from_le_bytes(buf))
    }

    /// x0..x3 as the guest left them at an SMCCC call.
    pub fn smccc_args(&self) -> Result<[u64; 4], KvmError> {
        let mut regs = [0u64; 4];
        for (n, slot) in regs.iter_mut().enumerate() {
            *slot = self.get_core(CoreReg::X(n as u8))?;
        }
        Ok(regs)
    }

    /// Writes the results of an SMCCC call to x0..x3.
    pub fn set_smccc_result(&self, regs: [u64; 4]) -> Result<(), KvmError> {
        for (n, value) in regs.into_iter().enumerate() {
            self.set_core(CoreReg::X(n as u8), value)?;
        }
        Ok(())
    }

    /// Sets the MP state.
    pub fn set_mp_state(&self, state: MpState) -> Result<(), KvmError> {
        let raw = match state {
            MpState::Runnable => KVM_MP_STATE_RUNNABLE,
            MpState::Stopped => KVM_MP_STATE_STOPPED,
            MpState::Suspended => KVM_MP_STATE_SUSPENDED,
            MpState::Other(n) => n,
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state: raw })
            .map_err(|e| KvmError::ioctl("KVM_SET_MP_STATE", e))
    }

    /// Reads the MP state.
    pub fn mp_state(&self) -> Result<MpState, KvmError> {
        let s = self
            .fd
            .get_mp_state()
            .map_err(|e| KvmError::ioctl("KVM_GET_MP_STATE", e))?;
        Ok(match s.mp_state {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_STOPPED => MpState::Stopped,
            KVM_MP_STATE_SUSPENDED => MpState::Suspended,
            n => MpState::Other(n),
        })
    }

    /// A handle other threads use to kick this vCPU out of `KVM_RUN`.
    pub fn kicker(&self) -> VcpuKicker {
        VcpuKicker {
            target: Arc::clone(&self.kick),
        }
    }

    /// Registers the calling thread as the one that runs this vCPU, so
    /// [`VcpuKicker::kick`] signals it. Call on the vCPU thread before the
    /// first [`KvmVcpu::run`]; [`install_kick_handler`](crate::install_kick_handler)
    /// must have been called.
    pub fn bind_current_thread(&mut self) {
        // Drop any previous registration first (it may point at this thread).
        self.registration = None;
        let run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        self.registration = Some(KickRegistration::register(&self.kick, run));
    }

    /// Runs the vCPU until the next exit.
    pub fn run(&mut self) -> Result<VcpuExit, KvmError> {
        let result = self.fd.run();
        let exit = match result {
            Ok(RawExit::Hypercall(h)) => {
                let function_id = h.nr as u32;
                // kvm-ioctls decodes KVM_EXIT_HYPERCALL but only exposes the
                // x86 `longmode` view of the last union; on arm64 that union
                // holds the 64-bit `flags` (KVM_HYPERCALL_EXIT_SMC, ...), so
                // read it from kvm_run directly.
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_HYPERCALL, so the kernel
                // filled the `hypercall` member of the union.
                let flags = unsafe { run.__bindgen_anon_1.hypercall.__bindgen_anon_1.flags };
                VcpuExit::Hypercall {
                    function_id,
                    smc: flags & u64::from(KVM_HYPERCALL_EXIT_SMC) != 0,
                }
            }
            Ok(RawExit::MmioRead(addr, data)) => VcpuExit::MmioRead {
                addr,
                len: data.len(),
            },
            Ok(RawExit::MmioWrite(addr, data)) => {
                let mut bytes = [0u8; 8];
                let len = data.len().min(8);
                bytes[..len].copy_from_slice(&data[..len]);
                VcpuExit::MmioWrite {
                    addr,
                    data: bytes,
                    len,
                }
            }
            Ok(RawExit::SystemEvent(kind, data)) => VcpuExit::SystemEvent {
                kind: match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
                    KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
                    KVM_SYSTEM_EVENT_WAKEUP => SystemEventKind::Wakeup,
                    KVM_SYSTEM_EVENT_SUSPEND => SystemEventKind::Suspend,
                    n => SystemEventKind::Other(n),
                },
                flags: data.first().copied().unwrap_or(0),
            },
            Ok(RawExit::FailEntry(reason, _cpu)) => VcpuExit::FailEntry { reason },
            Ok(RawExit::Intr) => VcpuExit::Interrupted,
            Ok(RawExit::Unsupported(reason)) => VcpuExit::Unhandled { reason },
            Ok(other) => VcpuExit::Unhandled {
                reason: exit_reason_of(&other),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                VcpuExit::Interrupted
            }
            Err(e) => return Err(KvmError::ioctl("KVM_RUN", e)),
        };
        // Consume a kick that arrived while we were out of the guest (see kick.rs).
        let run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` points at this vCPU's live kvm_run mapping; the only
        // other writer is the kick handler on this same thread, hence volatile.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
        Ok(exit)
    }

    /// Finishes the guest instruction behind the last exit without running
    /// any other: KVM completes an MMIO access (the loaded value into its
    /// register, PC past the instruction) only when userspace next enters
    /// `KVM_RUN`, and that pending part is in no register userspace can read
    /// (Documentation/virt/kvm/api.rst, `KVM_EXIT_MMIO`). So before its state
    /// is saved, the vCPU enters `KVM_RUN` once with `immediate_exit` set,
    /// which completes the access and returns `EINTR` at once (for any MP
    /// state: nothing of the guest runs).
    pub fn complete_pending_io(&mut self) -> Result<(), KvmError> {
        let run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` points at this vCPU's live kvm_run mapping; we hold
        // the vCPU exclusively (no KVM_RUN on another thread can be using it),
        // and the kick handler only ever writes 1 here too.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        let result = self.fd.run();
        // SAFETY: as above.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(KvmError::ioctl("KVM_RUN (completing the last exit)", e)),
            // Nothing of the guest ran: KVM checks immediate_exit before entering it.
            Ok(_) => Ok(()),
        }
    }

    /// Supplies the value of the load that caused the last [`VcpuExit::MmioRead`].
    pub fn complete_mmio_read(&mut self, data: &[u8]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: called after an MMIO exit, so the `mmio` union member is
        // the live one; we only write its data bytes.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = data.len().min(mmio.data.len());
        mmio.data[..len].copy_from_slice(&data[..len]);
    }
}

fn reg_id(reg: CoreReg) -> Result<u64, KvmError> {
    match reg {
        CoreReg::X(n) => core_reg_id(reg).ok_or(KvmError::BadRegister(n)),
        _ => core_reg_id(reg).ok_or(KvmError::BadRegister(0)),
    }
}

/// Best-effort exit reason number for exits kvm-ioctls decodes but vpsci does not use.
fn exit_reason_of(exit: &RawExit<'_>) -> u32 {
    match exit {
        RawExit::Unknown => kvm_bindings::KVM_EXIT_UNKNOWN,
        RawExit::Exception => kvm_bindings::KVM_EXIT_EXCEPTION,
        RawExit::Debug(_) => kvm_bindings::KVM_EXIT_DEBUG,
        RawExit::Shutdown => kvm_bindings::KVM_EXIT_SHUTDOWN,
        RawExit::InternalError => kvm_bindings::KVM_EXIT_INTERNAL_ERROR,
        _ => u32::MAX,
    }
}
