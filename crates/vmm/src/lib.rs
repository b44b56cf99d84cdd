//! `vpsci` VMM library: the hypervisor-independent parts of the VMM (guest
//! memory map, image loading, device tree, devices (PL011 UART, PL031 RTC),
//! event log, command line) and the KVM glue that drives them.
//!
//! The hypervisor-independent modules build and test on any host; the KVM
//! glue is added by its own modules below.

#![deny(missing_docs)]

pub mod api;
pub mod cli;

pub mod devices;
pub mod events;
pub mod fdt;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod policy;
pub mod snapshot;
pub mod timeline;
pub mod uart;

// The KVM glue: the run command and the vCPU control everywhere, the VM and
// the vCPU threads on arm64.
pub mod restore;
pub mod run;
#[cfg(target_arch = "aarch64")]
pub mod terminal;
pub mod text;
pub mod vcpu;
#[cfg(target_arch = "aarch64")]
pub mod vm;
