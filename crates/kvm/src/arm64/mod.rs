//! The arm64 KVM backend proper.

mod host;
mod kick;
mod regs;
mod vcpu;
mod vm;

pub use host::KvmHost;
pub use kick::{install_kick_handler, VcpuKicker};

pub use regs::CoreReg;
pub use vcpu::{KvmVcpu, MpState, SystemEventKind, VcpuExit};
pub use vm::{KvmVm, SpiLine, VgicLayout, VmSpec};
