//! Snapshots of a running VM: pause it, take the KVM state (vGIC pending
//! tables flushed to RAM first), the engine's snapshot and the devices, then
//! write guest memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestMemoryMmap;
use vpsci_firmware::Firmware;
use vpsci_kvm::{KvmVcpu, KvmVm};

use super::format::{write, SnapshotParts};
use super::SnapshotTimes;
use crate::layout::GuestLayout;
use crate::vcpu::{SharedVcpu, VmControl};
use crate::vm::Devices;

/// A running VM, as the snapshot code reaches it.
pub struct LiveVm {
    /// The VM's vCPU control (pause, stop).
    pub control: Arc<VmControl>,
    /// The KVM VM (its vGIC).
    pub kvm: Arc<KvmVm>,
    /// The vCPUs, shared with their threads.
    pub vcpus: Vec<SharedVcpu<KvmVcpu>>,
    /// The engine (none under KVM's PSCI: such a VM cannot be snapshotted).
    pub engine: Option<Arc<Firmware>>,
    /// The devices.
    pub devices: Devices,
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// The machine.
    pub layout: GuestLayout,
}

impl std::fmt::Debug for LiveVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVm").finish_non_exhaustive()
    }
}

impl crate::api::live::TakeSnapshot for LiveVm {
    fn snapshot(&self, dir: &Path) -> Result<SnapshotTimes, String> {
        LiveVm::snapshot(self, dir)
    }
}

impl LiveVm {
    /// Writes a snapshot of the VM into `dir`. A running VM is paused for it
    /// and resumed after; a paused one stays paused. Nothing about the VM
    /// changes, whether it succeeds or not.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotTimes, String> {
        self.snapshot_then(dir, true)
    }

    /// [`LiveVm::snapshot`] that leaves the VM paused (to stop it after).
    pub fn snapshot_and_hold(&self, dir: &Path) -> Result<SnapshotTimes, String> {
        self.snapshot_then(dir, false)
    }

    fn snapshot_then(&self, dir: &Path, resume: bool) -> Result<SnapshotTimes, String> {
        let Some(engine) = &self.engine else {
            return Err(
                "a VM under KVM's in-kernel PSCI cannot be snapshotted (its firmware state is KVM's)"
                    .to_owned(),
            );
        };
        // Refuses a VM with devices it cannot save before pausing anything;
        // it also flushes the disk images once while the VM runs, so the
        // flush inside the pause has little left to write.
        self.devices.state()?;
        let started = Instant::now();
        let paused_here = !self.control.is_paused();
        if paused_here {
            self.control.pause().map_err(|e| e.to_string())?;
        }
        let result = self.save_paused(engine, dir, started);
        if paused_here && (resume || result.is_err()) {
            let _ = self.control.unpause();
        }
        result
    }

    fn save_paused(
        &self,
        engine: &Firmware,
        dir: &Path,
        started: Instant,
    ) -> Result<SnapshotTimes, String> {
        let pause = started.elapsed();
        let captured = self.capture_paused(engine)?;
        let state = started.elapsed() - pause;
        let written = write(dir, &captured.parts(self)).map_err(|e| e.to_string())?;
        Ok(SnapshotTimes {
            pause,
            state,
            write: started.elapsed() - pause - state,
            memory_bytes: written.manifest.machine.ram_size,
            memory_stored: written.memory_stored,
        })
    }

    /// Reads the state of a paused VM (everything but guest memory): the
    /// KVM state, the engine's snapshot and the devices. The vGIC's pending
    /// tables are written into guest RAM on the way, so guest memory must be
    /// read after this returns.
    pub fn capture_paused(&self, engine: &Firmware) -> Result<CapturedState, String> {
        // Every thread is parked in VmControl::next: these locks are free.
        let mut guards: Vec<_> = self.vcpus.iter().map(SharedVcpu::lock).collect();
        for guard in &mut guards {
            // An MMIO access the vCPU exited for is only finished by the next
            // KVM_RUN: finish it now, or the restored guest would repeat it
            // (a store printed twice) or lose it (a load's value).
            guard.complete_pending_io().map_err(|e| e.to_string())?;
        }
        let refs: Vec<&KvmVcpu> = guards.iter().map(|g| &**g).collect();
        let vm = self.kvm.save_state(&refs).map_err(|e| e.to_string())?;
        drop(refs);
        drop(guards);
        Ok(CapturedState {
            vm,
            firmware: engine.snapshot(),
            firmware_config: engine.config(),
            devices: self.devices.state()?,
        })
    }
}

/// The state of a paused VM apart from guest memory ([`LiveVm::capture_paused`]).
#[derive(Debug)]
pub struct CapturedState {
    /// The KVM state.
    pub vm: vpsci_kvm::VmState,
    /// The engine's snapshot.
    pub firmware: Vec<u8>,
    /// The engine's configuration.
    pub firmware_config: vpsci_firmware::FirmwareConfig,
    /// The devices.
    pub devices: super::DevicesState,
}

impl CapturedState {
    /// The snapshot parts of this state and `vm`'s memory and layout.
    pub fn parts<'a>(&'a self, vm: &'a LiveVm) -> SnapshotParts<'a> {
        SnapshotParts {
            layout: &vm.layout,
            vm: &self.vm,
            firmware: &self.firmware,
            firmware_config: &self.firmware_config,
            devices: &self.devices,
            memory: &vm.memory,
        }
    }
}
