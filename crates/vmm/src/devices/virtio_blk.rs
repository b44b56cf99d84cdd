//! A virtio block device (virtio 1.2 §5.2) over a raw disk image file.
//!
//! rust-vmm publishes the queue (`virtio-queue`) and the ABI constants
//! (`virtio-bindings`) on crates.io but no block device, so the request
//! handling is ours, on their descriptor-chain [`Reader`]/[`Writer`].
//!
//! Requests (§5.2.6): `VIRTIO_BLK_T_IN` (read), `OUT` (write), `FLUSH`
//! (fsync of the image, so data the guest flushed is on the host's disk when
//! it powers off) and `GET_ID` (the serial). Every request a guest can build
//! is answered, never panics and never changes the disk before it is known
//! to be valid:
//! - a data length that is not a multiple of 512, a range past the end of
//!   the disk (checked without overflow) or a write to a read-only disk gets
//!   `VIRTIO_BLK_S_IOERR` and touches nothing;
//! - a write's data is copied out of guest memory completely before the
//!   image is written, so a bad guest buffer never half-writes a sector run;
//! - an unknown request type gets `VIRTIO_BLK_S_UNSUPP`;
//! - a chain without a writable status byte, or whose buffers lie outside
//!   guest RAM, is returned to the driver with nothing written (used length 0).
//!
//! The image is used as it is: `capacity` is its length in 512-byte sectors
//! (a trailing partial sector is not exposed) and nothing is ever written to
//! it except what the guest writes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::virtio_mmio::VirtioDevice;

/// Bytes per sector, the unit of `sector` and `capacity`.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors per queue the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the request header (type, reserved, sector).
const HEADER_BYTES: usize = 16;
/// Largest single request accepted (bounded host buffer): 4 MiB.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Why a disk image cannot be used.
#[derive(Debug, Error)]
#[error("cannot open disk {}: {source}", path.display())]
pub struct DiskError {
    /// The image.
    pub path: PathBuf,
    /// What the host said.
    #[source]
    pub source: std::io::Error,
}

/// What a snapshot saves of a block device besides its queue (the image
/// file itself is the disk's content and is not copied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// The image path, made absolute when the disk was opened (so a restore
    /// started in another directory finds the same file).
    pub path: PathBuf,
    /// Whether the guest sees a read-only disk.
    pub readonly: bool,
    /// Capacity in sectors when the device was created.
    pub sectors: u64,
    /// The serial `GET_ID` answers (at most 20 bytes are used).
    pub serial: String,
}

/// A raw disk image as a virtio block device.
#[derive(Debug)]
pub struct Block {
    file: File,
    state: BlockState,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// The outcome of one request: the status byte and how many data bytes
/// were written into the guest's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Done {
    status: u8,
    data_written: usize,
}

impl Done {
    fn status(status: u32) -> Done {
        Done {
            status: status as u8,
            data_written: 0,
        }
    }
}

impl Block {
    /// Opens `path` (read and write, or read only) without creating,
    /// truncating or writing it. `serial` names the disk to the guest
    /// (`GET_ID`, at most 20 bytes are used).
    pub fn open(path: &Path, readonly: bool, serial: &str) -> Result<Block, DiskError> {
        let err = |source| DiskError {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (dst, src) in id.iter_mut().zip(serial.bytes()) {
            *dst = src;
        }
        Ok(Block {
            file,
            state: BlockState {
                path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
                readonly,
                sectors: meta.len() / SECTOR_SIZE,
                serial: serial.to_owned(),
            },
            serial: id,
        })
    }

    /// What a snapshot saves.
    pub fn state(&self) -> &BlockState {
        &self.state
    }

    /// The open image file (its metadata is what a snapshot stamps).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes everything the guest wrote to the host's disk (`fsync`); a
    /// read-only disk has nothing to write.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.state.readonly {
            return Ok(());
        }
        self.file.sync_all()
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.state.sectors
    }

    /// Serves one request chain; returns the used length (bytes written to
    /// the guest's buffers, status byte included).
    pub fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            return 0; // buffers outside guest RAM: nothing can be answered
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return 0; // no status byte to write
        };
        let Ok(mut status) = writer.split_at(data_len) else {
            return 0;
        };
        let done = self.execute(&mut reader, &mut writer);
        if status.write_all(&[done.status]).is_err() {
            return 0;
        }
        u32::try_from(done.data_written + 1).unwrap_or(u32::MAX)
    }

    fn execute(&mut self, reader: &mut Reader<'_>, data: &mut Writer<'_>) -> Done {
        let mut header = [0u8; HEADER_BYTES];
        if reader.read_exact(&mut header).is_err() {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match kind {
            VIRTIO_BLK_T_IN => self.read(sector, data),
            VIRTIO_BLK_T_OUT => self.write(sector, reader),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => self.get_id(data),
            _ => Done::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Byte offset of `len` bytes at `sector`, if the whole range is on the
    /// disk and `len` is whole sectors.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = u64::try_from(len).ok()?;
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES as u64 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.state.sectors).then(|| sector * SECTOR_SIZE)
    }

    fn read(&mut self, sector: u64, data: &mut Writer<'_>) -> Done {
        let len = data.available_bytes();
        let Some(offset) = self.range(sector, len) else {
            return Done::status(VIRTIO_BLK_S_IOERR);
        };
        let mut buf = vec![0u8; len];
        if self.file.read_exact_at(&mut buf, offset).is_err() || data.write_all(&buf).is_err() {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        Done {
            status: VIRTIO_BLK_S_OK as u8,
            data_written: len,
        }
    }

    fn write(&mut self, sector: u64, data: &mut Reader<'_>) -> Done {
        let len = data.available_bytes();
        if self.state.readonly {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        let Some(offset) = self.range(sector, len) else {
            return Done::status(VIRTIO_BLK_S_IOERR);
        };
        let mut buf = vec![0u8; len];
        if data.read_exact(&mut buf).is_err() {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        if self.file.write_all_at(&buf, offset).is_err() {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        Done::status(VIRTIO_BLK_S_OK)
    }

    fn flush(&mut self) -> Done {
        match self.sync() {
            Ok(()) => Done::status(VIRTIO_BLK_S_OK),
            Err(_) => Done::status(VIRTIO_BLK_S_IOERR),
        }
    }

    fn get_id(&mut self, data: &mut Writer<'_>) -> Done {
        // §5.2.6: the id is up to 20 bytes, NUL-padded if shorter; a smaller
        // buffer gets what fits.
        let len = data.available_bytes().min(self.serial.len());
        if data.write_all(&self.serial[..len]).is_err() {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        Done {
            status: VIRTIO_BLK_S_OK as u8,
            data_written: len,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut features = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.state.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    /// `struct virtio_blk_config`: only `capacity` (le64 at 0) is meaningful
    /// without further features; the rest reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let capacity = self.state.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64);
            *b = at
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| capacity.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn serve(
        &mut self,
        _queue: usize,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        Block::serve(self, mem, chain)
    }

    fn flush_on_reset(&mut self) {
        // A driver reset (or a VM reset) must not lose what was written.
        let _ = self.sync();
    }
}

/// A disk the operator asked for: `--disk FILE[,readonly]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The raw image.
    pub path: PathBuf,
    /// Whether the guest sees it read only (and vpsci opens it read only).
    pub readonly: bool,
}

/// A `--disk` value that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiskSpecError {
    /// Nothing before the first comma.
    #[error("{input:?} names no file")]
    NoFile {
        /// The whole value.
        input: String,
    },
    /// An option other than `readonly`.
    #[error("unknown option {option:?} in {input:?} (the only option is readonly)")]
    UnknownOption {
        /// The option.
        option: String,
        /// The whole value.
        input: String,
    },
}

impl std::str::FromStr for DiskSpec {
    type Err = DiskSpecError;

    /// `FILE` or `FILE,readonly` (a file name containing a comma cannot be
    /// given; a name that is only options is refused).
    fn from_str(input: &str) -> Result<DiskSpec, DiskSpecError> {
        let mut parts = input.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DiskSpecError::NoFile {
                input: input.to_owned(),
            });
        }
        let mut readonly = false;
        for option in parts {
            match option {
                "readonly" => readonly = true,
                _ => {
                    return Err(DiskSpecError::UnknownOption {
                        option: option.to_owned(),
                        input: input.to_owned(),
                    })
                }
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            readonly,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn disk(sectors: u64, readonly: bool) -> (tempfile::NamedTempFile, Block) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / 512) as u8)
            .collect();
        std::fs::write(file.path(), content).unwrap();
        let block = Block::open(file.path(), readonly, "vpsci-test").unwrap();
        (file, block)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_slice(&[0xEE], GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain of (address, length, device-writable) descriptors.
    fn serve(block: &mut Block, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u32 {
        let queue = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = 0;
                if write {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        queue.build_desc_chain(&raw).unwrap();
        let mut q: virtio_queue::Queue = queue.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        block.serve(mem, chain)
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn a_read_copies_the_sectors_into_the_guest_buffer() {
        let (_f, mut b) = disk(8, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 3);
        let used = serve(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!(used, 1025);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
    }

    #[test]
    fn a_write_reaches_the_image_and_a_flush_succeeds() {
        let (f, mut b) = disk(8, false);
        let mem = memory();
        mem.write_slice(&[0xAB; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 7);
        let used = serve(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!((used, status(&mem)), (1, VIRTIO_BLK_S_OK as u8));
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        serve(&mut b, &mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[7 * 512..].iter().all(|&b| b == 0xAB));
        assert!(on_disk[6 * 512..7 * 512].iter().all(|&b| b == 6));
    }

    #[test]
    fn out_of_range_and_overflowing_sectors_are_io_errors_that_touch_nothing() {
        let (f, mut b) = disk(8, false);
        let before = std::fs::read(f.path()).unwrap();
        let mem = memory();
        for sector in [7, 8, u64::MAX, u64::MAX / 512] {
            header(&mem, VIRTIO_BLK_T_OUT, sector);
            serve(
                &mut b,
                &mem,
                &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
            );
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
            header(&mem, VIRTIO_BLK_T_IN, sector);
            let used = serve(
                &mut b,
                &mem,
                &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
            );
            assert_eq!((used, status(&mem)), (1, VIRTIO_BLK_S_IOERR as u8));
        }
        assert_eq!(std::fs::read(f.path()).unwrap(), before);
    }

    #[test]
    fn partial_sectors_are_io_errors() {
        let (f, mut b) = disk(8, false);
        let before = std::fs::read(f.path()).unwrap();
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        serve(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(f.path()).unwrap(), before);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_offers_the_ro_feature() {
        let (f, mut b) = disk(8, true);
        let before = std::fs::read(f.path()).unwrap();
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        serve(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(f.path()).unwrap(), before);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let (_f, mut b) = disk(8, false);
        let mem = memory();
        for kind in [2, 11, 13, 0x8000_0000, u32::MAX] {
            header(&mem, kind, 0);
            serve(&mut b, &mem, &[(HDR, 16, false), (STATUS, 1, true)]);
            assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8, "type {kind}");
        }
    }

    #[test]
    fn get_id_returns_the_serial() {
        let (_f, mut b) = disk(8, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let used = serve(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
        );
        assert_eq!(used, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..10], b"vpsci-test");
        assert!(id[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn malformed_chains_are_answered_without_panicking() {
        let (f, mut b) = disk(8, false);
        let before = std::fs::read(f.path()).unwrap();
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        // No status byte at all.
        assert_eq!(
            serve(&mut b, &mem, &[(HDR, 16, false), (DATA, 512, false)]),
            0
        );
        // A short header.
        serve(&mut b, &mem, &[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        // A buffer beyond guest RAM.
        assert_eq!(
            serve(
                &mut b,
                &mem,
                &[
                    (HDR, 16, false),
                    (0xFFFF_0000, 512, false),
                    (STATUS, 1, true)
                ]
            ),
            0
        );
        // Only a status byte.
        serve(&mut b, &mem, &[(STATUS, 1, true)]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(f.path()).unwrap(), before);
    }

    #[test]
    fn config_space_holds_the_capacity_in_sectors() {
        let (_f, b) = disk(8, false);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut tail = [0xFFu8; 4];
        b.read_config(0x20, &mut tail);
        assert_eq!(tail, [0; 4]);
        b.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
    }

    #[test]
    fn disk_values_parse_a_file_and_the_readonly_option() {
        assert_eq!(
            "a.img".parse(),
            Ok(DiskSpec {
                path: PathBuf::from("a.img"),
                readonly: false
            })
        );
        assert_eq!(
            "/d/a.img,readonly".parse(),
            Ok(DiskSpec {
                path: PathBuf::from("/d/a.img"),
                readonly: true
            })
        );
        assert!(matches!(
            "a.img,ro".parse::<DiskSpec>(),
            Err(DiskSpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            "a.img,".parse::<DiskSpec>(),
            Err(DiskSpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            ",readonly".parse::<DiskSpec>(),
            Err(DiskSpecError::NoFile { .. })
        ));
        assert!(matches!(
            "".parse::<DiskSpec>(),
            Err(DiskSpecError::NoFile { .. })
        ));
    }

    #[test]
    fn opening_a_missing_file_is_an_error_naming_it_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.img");
        let err = Block::open(&path, false, "x").unwrap_err();
        assert!(err.to_string().contains("absent.img"), "{err}");
        assert!(!path.exists());
        let err = Block::open(dir.path(), true, "x").unwrap_err();
        assert!(
            err.to_string().contains("not a regular file") || err.to_string().contains("directory"),
            "{err}"
        );
    }
}
