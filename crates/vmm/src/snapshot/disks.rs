//! The virtio disks of a snapshot on the restoring side: each saved image is
//! opened again at its path and checked (present, writable when the guest had
//! it writable, same capacity, unchanged since the snapshot, not the same file
//! as another disk), and each saved transport is checked against its device
//! and the loaded guest memory. All of it runs before the VM is built, and
//! none of it writes to an image.

use vm_memory::GuestMemoryMmap;

use super::format::{CheckedSnapshot, SnapshotError};
use crate::devices::virtio_blk::Block;
use crate::devices::virtio_blk_image::DiskIdentity;
use crate::devices::virtio_mmio::CheckedTransport;

/// A saved disk ready to be put back on its slot.
#[derive(Debug)]
pub struct RestoredDisk {
    /// Its image, open as the guest had it.
    pub block: Block,
    /// Its transport's saved state, checked.
    pub transport: CheckedTransport,
}

impl CheckedSnapshot {
    /// Opens every saved disk's image, in slot order, refusing the first
    /// that cannot be used as the guest had it (see the module docs).
    pub fn open_disks(&self) -> Result<Vec<Block>, SnapshotError> {
        let mut blocks: Vec<Block> = Vec::with_capacity(self.devices.disks.len());
        let mut identities = Vec::with_capacity(self.devices.disks.len());
        for (index, disk) in self.devices.disks.iter().enumerate() {
            let refused = |reason: String| SnapshotError::Disk {
                index,
                path: disk.block.path.clone(),
                reason,
            };
            let block =
                Block::reopen(&disk.block, &disk.image).map_err(|e| refused(e.to_string()))?;
            let identity = block
                .file()
                .metadata()
                .map(|m| DiskIdentity::of_metadata(&m))
                .map_err(|e| refused(e.to_string()))?;
            if let Some(other) = identities.iter().position(|i| *i == identity) {
                return Err(refused(format!(
                    "the same image as virtio disk {other} (two devices on one image would \
                     corrupt it)"
                )));
            }
            identities.push(identity);
            blocks.push(block);
        }
        Ok(blocks)
    }

    /// [`CheckedSnapshot::open_disks`], each with its transport state
    /// checked against the device and guest `memory` (already loaded).
    pub fn restore_disks(
        &self,
        memory: &GuestMemoryMmap,
    ) -> Result<Vec<RestoredDisk>, SnapshotError> {
        let blocks = self.open_disks()?;
        blocks
            .into_iter()
            .zip(&self.devices.disks)
            .enumerate()
            .map(|(index, (block, saved))| {
                let transport =
                    saved
                        .transport
                        .check(&block, memory)
                        .map_err(|e| SnapshotError::Disk {
                            index,
                            path: saved.block.path.clone(),
                            reason: e.to_string(),
                        })?;
                Ok(RestoredDisk { block, transport })
            })
            .collect()
    }
}
