//! The image file behind a virtio block device, as snapshots see it: which
//! file it is (device and inode), a stamp of its length and modification
//! time taken when a snapshot is written, and the checks a restore makes
//! before the guest uses the image again.
//!
//! A snapshot does not copy the image (it can be far larger than guest
//! RAM); the operator keeps it at its path. The stamp is what lets a restore
//! notice that the image is no longer the one the guest's memory was saved
//! with (the source VM ran on and wrote to it, or someone replaced it):
//! restoring then would give the guest a page cache and file-system state
//! that disagree with its disk, so such an image is refused.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::virtio_blk::{Block, BlockState};

/// What makes two disk names the same image: for an existing file its
/// device and inode (which a symbolic link, a `..` or a hard link all lead
/// to), otherwise the name as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskIdentity {
    /// An existing file.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A name that does not lead to a file (yet).
    Name(PathBuf),
}

impl DiskIdentity {
    /// The identity of whatever `path` names now.
    pub fn of_path(path: &Path) -> DiskIdentity {
        match std::fs::metadata(path) {
            Ok(meta) => DiskIdentity::of_metadata(&meta),
            Err(_) => DiskIdentity::Name(path.to_path_buf()),
        }
    }

    /// The identity of a file with this metadata.
    pub fn of_metadata(meta: &Metadata) -> DiskIdentity {
        DiskIdentity::File {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The image's length and last modification time when a snapshot was
/// written (after it was flushed, with the VM paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageStamp {
    /// Length in bytes.
    pub len: u64,
    /// `st_mtime`: seconds since the UNIX epoch.
    pub modified_secs: i64,
    /// `st_mtime_nsec`.
    pub modified_nanos: i64,
}

impl ImageStamp {
    /// The stamp of a file with this metadata.
    pub fn of(meta: &Metadata) -> ImageStamp {
        ImageStamp {
            len: meta.len(),
            modified_secs: meta.mtime(),
            modified_nanos: meta.mtime_nsec(),
        }
    }
}

impl std::fmt::Display for ImageStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes, modified at {}.{:09}",
            self.len, self.modified_secs, self.modified_nanos
        )
    }
}

/// Why a saved disk's image cannot be used again (the path is the caller's
/// to name).
#[derive(Debug, Error)]
pub enum ReopenError {
    /// The image cannot be opened (missing, not a regular file, ...).
    #[error("cannot open the image: {0}")]
    Open(std::io::Error),
    /// The guest had the disk writable, the image is not.
    #[error("the image is not writable, and the guest's disk was")]
    NotWritable,
    /// The image's capacity differs from the guest's disk.
    #[error("the image has {found} sectors, the guest's disk had {saved}")]
    Capacity {
        /// Sectors now.
        found: u64,
        /// Sectors in the snapshot.
        saved: u64,
    },
    /// The image changed after the snapshot was written.
    #[error(
        "the image changed after the snapshot ({now}; at the snapshot {saved}): the guest's \
         memory would not match its disk"
    )]
    Changed {
        /// The stamp now.
        now: ImageStamp,
        /// The stamp in the snapshot.
        saved: ImageStamp,
    },
}

fn is_write_refusal(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

impl Block {
    /// Flushes the image to the host's disk and stamps it. Call with the
    /// VM paused, so that no request changes it before the snapshot is
    /// written (requests are served inside the vCPU's MMIO exit).
    pub fn sync_and_stamp(&self) -> std::io::Result<ImageStamp> {
        self.sync()?;
        Ok(ImageStamp::of(&self.file().metadata()?))
    }

    /// Opens the image a snapshot saved, as the guest had it (read-only or
    /// writable, the same serial), refusing an image that is missing, not
    /// writable when the guest's disk was (an image without any write
    /// permission bit counts as not writable, for root too), of another
    /// capacity, or changed since `stamp` was taken. Nothing is written to
    /// the image.
    pub fn reopen(saved: &BlockState, stamp: &ImageStamp) -> Result<Block, ReopenError> {
        let meta = std::fs::metadata(&saved.path).map_err(ReopenError::Open)?;
        if !saved.readonly && meta.permissions().readonly() {
            return Err(ReopenError::NotWritable);
        }
        let block = Block::open(&saved.path, saved.readonly, &saved.serial).map_err(|e| {
            if !saved.readonly && is_write_refusal(&e.source) {
                ReopenError::NotWritable
            } else {
                ReopenError::Open(e.source)
            }
        })?;
        if block.sectors() != saved.sectors {
            return Err(ReopenError::Capacity {
                found: block.sectors(),
                saved: saved.sectors,
            });
        }
        let now = ImageStamp::of(&block.file().metadata().map_err(ReopenError::Open)?);
        if now != *stamp {
            return Err(ReopenError::Changed { now, saved: *stamp });
        }
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn image(dir: &Path, name: &str, sectors: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![7u8; (sectors * 512) as usize]).unwrap();
        path
    }

    fn saved(path: &Path, readonly: bool) -> (BlockState, ImageStamp) {
        let block = Block::open(path, readonly, "vpsci-disk0").unwrap();
        let stamp = block.sync_and_stamp().unwrap();
        (block.state().clone(), stamp)
    }

    #[test]
    fn an_unchanged_image_reopens_with_its_saved_mode_serial_and_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), "a.img", 8);
        let (state, stamp) = saved(&path, true);
        let block = Block::reopen(&state, &stamp).unwrap();
        assert_eq!(block.state(), &state);
        assert_eq!(block.state().serial, "vpsci-disk0");
        assert!(block.state().path.is_absolute());
    }

    #[test]
    fn a_missing_resized_changed_or_unwritable_image_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), "a.img", 8);
        let (state, stamp) = saved(&path, false);

        let before = std::fs::read(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = Block::reopen(&state, &stamp).unwrap_err();
        assert!(matches!(err, ReopenError::NotWritable), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(ImageStamp::of(&std::fs::metadata(&path).unwrap()), stamp);

        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(16 * 512).unwrap();
        let err = Block::reopen(&state, &stamp).unwrap_err();
        assert!(
            matches!(
                err,
                ReopenError::Capacity {
                    found: 16,
                    saved: 8
                }
            ),
            "{err}"
        );
        f.set_len(8 * 512).unwrap();
        // Set the time explicitly: the kernel's file times are coarse (a
        // clock tick), so two changes in one tick can share a time.
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        let err = Block::reopen(&state, &stamp).unwrap_err();
        assert!(matches!(err, ReopenError::Changed { .. }), "{err}");
        assert!(err.to_string().contains("changed after the snapshot"));

        std::fs::remove_file(&path).unwrap();
        let err = Block::reopen(&state, &stamp).unwrap_err();
        assert!(matches!(err, ReopenError::Open(_)), "{err}");
        assert!(!path.exists(), "nothing was created");
    }

    #[test]
    fn identities_match_through_hard_links_and_differ_between_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a.img", 1);
        let b = image(dir.path(), "b.img", 1);
        let link = dir.path().join("link.img");
        std::fs::hard_link(&a, &link).unwrap();
        assert_eq!(DiskIdentity::of_path(&a), DiskIdentity::of_path(&link));
        assert_ne!(DiskIdentity::of_path(&a), DiskIdentity::of_path(&b));
        let missing = dir.path().join("none");
        assert_eq!(
            DiskIdentity::of_path(&missing),
            DiskIdentity::Name(missing.clone())
        );
    }
}
