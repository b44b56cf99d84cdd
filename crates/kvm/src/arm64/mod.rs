//! The arm64 KVM backend proper.

mod host;
mod kick;
mod regs;
mod save;
mod vcpu;
mod vm;

pub use host::KvmHost;
pub use kick::{install_kick_handler, VcpuKicker};
pub use save::host_cntfrq;

pub use vcpu::KvmVcpu;
pub use vm::{KvmVm, SpiLine, VgicLayout, VmSpec};
