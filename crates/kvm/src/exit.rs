//! What a vCPU reports and what the VMM asks of it: registers, MP states and
//! `KVM_RUN` exits, as plain data. They build on every host, so the VMM's exit
//! handling can be driven by a fake vCPU in native tests; only `KvmVcpu`
//! (arm64) produces and consumes them for real.

/// A core register of an AArch64 vCPU (`struct kvm_regs` / `user_pt_regs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreReg {
    /// General purpose register x0..=x30.
    X(u8),
    /// SP_EL0.
    Sp,
    /// Program counter.
    Pc,
    /// PSTATE (as SPSR encodes it).
    Pstate,
}

/// A vCPU's multiprocessing state as far as vpsci uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MpState {
    /// Runs when `KVM_RUN` is called.
    Runnable,
    /// Powered off: `KVM_RUN` blocks until the state changes.
    Stopped,
    /// Suspended: `KVM_RUN` blocks until KVM sees a wake-up interrupt and
    /// reports [`SystemEventKind::Wakeup`]; the state stays suspended until
    /// userspace changes it.
    Suspended,
    /// Any other state KVM reports.
    Other(u32),
}

/// `KVM_SYSTEM_EVENT_*` types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEventKind {
    /// In-kernel PSCI SYSTEM_OFF / SYSTEM_OFF2.
    Shutdown,
    /// In-kernel PSCI SYSTEM_RESET / SYSTEM_RESET2.
    Reset,
    /// Guest crash (not raised on arm64 today).
    Crash,
    /// A suspended vCPU saw a wake-up event.
    Wakeup,
    /// In-kernel PSCI SYSTEM_SUSPEND (only with KVM_CAP_ARM_SYSTEM_SUSPEND enabled).
    Suspend,
    /// A type this crate does not know.
    Other(u32),
}

/// Why `KVM_RUN` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// An SMCCC call the filter forwards (`KVM_EXIT_HYPERCALL`). The
    /// arguments are in x0..x3 (`KvmVcpu::smccc_args`). KVM has already
    /// moved PC past the HVC or SMC instruction for both conduits (see
    /// `Documentation/virt/kvm/api.rst`, KVM_EXIT_HYPERCALL: "At the point of
    /// exit, PC points to the instruction immediately following the trapping
    /// instruction"), so userspace writes the results and re-enters.
    Hypercall {
        /// The function ID (w0).
        function_id: u32,
        /// The guest used SMC rather than HVC.
        smc: bool,
    },
    /// A load from an address without memory; answer with
    /// `KvmVcpu::complete_mmio_read` before the next run.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Access size in bytes (1..=8).
        len: usize,
    },
    /// A store to an address without memory.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// The bytes written (first `len` valid).
        data: [u8; 8],
        /// Access size in bytes (1..=8).
        len: usize,
    },
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent {
        /// Event type.
        kind: SystemEventKind,
        /// `data[0]` when present (e.g. the PSCI OFF2/RESET2 flag), else 0.
        flags: u64,
    },
    /// `KVM_RUN` returned `EINTR`: a kick (signal or `immediate_exit`), never
    /// a guest wake-up.
    Interrupted,
    /// Entry failed (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// Any other exit reason; the VMM treats it as fatal for the vCPU.
    Unhandled {
        /// `kvm_run.exit_reason`.
        reason: u32,
    },
}
