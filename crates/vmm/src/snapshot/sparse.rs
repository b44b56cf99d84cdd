//! `memory.bin` as a sparse file: the writer stores only the pages guest
//! RAM's mapping ever backed ([`crate::memory::touched_pages`]) and leaves
//! the rest as holes; the reader copies only the file's data extents
//! (`lseek` `SEEK_DATA`/`SEEK_HOLE`) into fresh RAM, so the restored process
//! backs only those pages. To any other reader the file is the plain raw
//! image it always was: its length is the RAM size and holes read as zero.
//!
//! The manifest's CRC-32 still covers every byte of that logical content.
//! A run of zeros is added to a CRC in time logarithmic in its length
//! ([`append_zeros`]), so neither side reads or hashes the holes.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use crc32fast::Hasher;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::GuestLayout;
use crate::memory::{host_page_size, touched_pages};

/// Guest memory is copied in pieces of at most this size.
const CHUNK: u64 = 4 << 20;

/// Appends `len` zero bytes to `hasher`'s CRC-32 without hashing them:
/// one `crc32fast::Hasher::combine` (which appends a block given its CRC and
/// length in O(log length)) per bit set in `len`, with the CRC of 2^k zero
/// bytes from [`zero_runs`]. A hole of gigabytes costs microseconds, and a
/// page-aligned one a few combines.
pub(super) fn append_zeros(hasher: &mut Hasher, len: u64) {
    for (k, run) in zero_runs().iter().enumerate() {
        if len >> k & 1 != 0 {
            hasher.combine(run);
        }
    }
}

/// The CRC-32 states of 2^k zero bytes, k = 0..64, built once by doubling
/// one zero byte.
fn zero_runs() -> &'static [Hasher] {
    static RUNS: OnceLock<Vec<Hasher>> = OnceLock::new();
    RUNS.get_or_init(|| {
        let mut run = Hasher::new();
        run.update(&[0]);
        let mut runs = vec![run.clone()];
        for _ in 1..64 {
            let same = run.clone();
            run.combine(&same);
            runs.push(run.clone());
        }
        runs
    })
}

/// What [`write_memory`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MemoryFile {
    /// The file's (logical) length: the RAM size.
    pub size: u64,
    /// CRC-32 of all of it, holes as zeros.
    pub crc32: u32,
    /// Bytes of guest RAM written as data; the rest are holes.
    pub stored: u64,
}

/// Writes guest RAM into `path` (created): the pages the RAM's mapping ever
/// backed as data, the others as holes. When that cannot be told (see
/// [`touched_pages`]) every page is written.
pub(super) fn write_memory(
    path: &Path,
    layout: &GuestLayout,
    memory: &GuestMemoryMmap,
) -> std::io::Result<MemoryFile> {
    let base = layout.ram_base().0;
    let size = layout.ram_size();
    let page = host_page_size();
    let touched = touched_pages(memory, base, size / page, page).filter(|_| size % page == 0);
    let runs = match &touched {
        Some(pages) => page_runs(pages, page),
        None => vec![(0, size, true)],
    };
    let file = File::create(path)?;
    // The whole length first: whatever is not written below is a hole.
    file.set_len(size)?;
    let mut hasher = Hasher::new();
    let mut stored = 0;
    let mut buf = Vec::new();
    for (start, len, data) in runs {
        if !data {
            append_zeros(&mut hasher, len);
            continue;
        }
        let mut at = start;
        while at < start + len {
            let want = (start + len - at).min(CHUNK);
            buf.resize(want as usize, 0);
            memory
                .read_slice(&mut buf, GuestAddress(base + at))
                .map_err(|e| std::io::Error::other(format!("guest RAM: {e}")))?;
            hasher.update(&buf);
            file.write_all_at(&buf, at)?;
            at += want;
        }
        stored += len;
    }
    file.sync_all()?;
    Ok(MemoryFile {
        size,
        crc32: hasher.finalize(),
        stored,
    })
}

/// Runs of equal pages: (offset, length, backed) in bytes, in order.
fn page_runs(touched: &[bool], page: u64) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (i, &t) in touched.iter().enumerate() {
        match runs.last_mut() {
            Some((_, len, data)) if *data == t => *len += page,
            _ => runs.push((i as u64 * page, page, t)),
        }
    }
    runs
}

/// `lseek(2)` with `whence`: the offset, or `None` where Linux answers ENXIO
/// (no data at or after `offset`).
type SeekFn = fn(&File, u64, libc::c_int) -> std::io::Result<Option<u64>>;

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek on a descriptor `file` owns for the call; it touches no memory.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(e)
}

/// The data extents of the first `len` bytes of `file`, in order, as
/// (offset, length); everything between them reads as zero. A file system
/// without `SEEK_DATA` (EINVAL) gives one extent: the whole file.
fn data_extents(file: &File, len: u64, seek: SeekFn) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let data = match seek(file, at, libc::SEEK_DATA) {
            Ok(Some(d)) if d < len => d,
            Ok(_) => break,
            Err(e) if at == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![(0, len)]);
            }
            Err(e) => return Err(e),
        };
        // A hole always follows (the end of the file counts as one).
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if hole <= data {
            return Err(std::io::Error::other(format!(
                "SEEK_HOLE from data at {data} answered {hole}"
            )));
        }
        extents.push((data, hole - data));
        at = hole;
    }
    Ok(extents)
}

/// Why [`read_memory`] failed.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The file ended before `len` bytes (it was cut short).
    Short {
        /// Bytes it has.
        found: u64,
    },
    /// Reading or seeking failed.
    Io(std::io::Error),
    /// Guest RAM does not hold the file.
    Ram(String),
}

/// Copies the `len` bytes of `file` into `memory` from guest address `base`,
/// only its data extents (holes stay unbacked: fresh RAM reads as zero), and
/// returns the CRC-32 of all `len` bytes, holes as zeros. On an error
/// `memory` holds a partial copy.
pub(super) fn read_memory(
    file: &File,
    len: u64,
    memory: &GuestMemoryMmap,
    base: u64,
) -> Result<u32, ReadError> {
    read_memory_with(file, len, memory, base, lseek)
}

fn read_memory_with(
    file: &File,
    len: u64,
    memory: &GuestMemoryMmap,
    base: u64,
    seek: SeekFn,
) -> Result<u32, ReadError> {
    let found = file.metadata().map_err(ReadError::Io)?.len();
    if found < len {
        return Err(ReadError::Short { found });
    }
    let mut hasher = Hasher::new();
    let mut buf = Vec::new();
    let mut hashed = 0;
    for (start, extent) in data_extents(file, len, seek).map_err(ReadError::Io)? {
        append_zeros(&mut hasher, start - hashed);
        let mut at = start;
        while at < start + extent {
            let want = (start + extent - at).min(CHUNK);
            buf.resize(want as usize, 0);
            file.read_exact_at(&mut buf, at).map_err(|e| {
                if e.kind() == ErrorKind::UnexpectedEof {
                    ReadError::Short { found: at }
                } else {
                    ReadError::Io(e)
                }
            })?;
            hasher.update(&buf);
            memory
                .write_slice(&buf, GuestAddress(base + at))
                .map_err(|e| ReadError::Ram(e.to_string()))?;
            at += want;
        }
        hashed = start + extent;
    }
    append_zeros(&mut hasher, len - hashed);
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const BASE: u64 = 0x4000_0000;
    const HUGE_PAGE: u64 = 2 << 20;

    #[test]
    fn appended_zeros_give_the_crc_of_the_zeros_hashed() {
        for len in [
            0u64,
            1,
            2,
            3,
            7,
            4096,
            4097,
            65_535,
            1 << 20,
            (3 << 20) + 17,
        ] {
            let mut fast = Hasher::new();
            fast.update(b"prefix");
            append_zeros(&mut fast, len);
            fast.update(b"suffix");
            let mut slow = Hasher::new();
            slow.update(b"prefix");
            slow.update(&vec![0u8; len as usize]);
            slow.update(b"suffix");
            assert_eq!(fast.finalize(), slow.finalize(), "{len} zeros");
        }
    }

    /// A sparse file: `len` bytes, data (0xA5..) at each of `at`.
    fn sparse_file(dir: &Path, len: u64, at: &[(u64, usize)]) -> (File, Vec<u8>) {
        let path = dir.join("memory.bin");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        let mut image = vec![0u8; len as usize];
        for (i, &(offset, n)) in at.iter().enumerate() {
            let bytes: Vec<u8> = (0..n).map(|k| 0xA5 ^ (k as u8) ^ (i as u8)).collect();
            file.write_all_at(&bytes, offset).unwrap();
            image[offset as usize..offset as usize + n].copy_from_slice(&bytes);
        }
        (file, image)
    }

    fn ram(len: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), len as usize)]).unwrap()
    }

    const LEN: u64 = 8 << 20;
    const DATA: [(u64, usize); 3] = [(0, 4096), (3 << 20, 100_000), ((8 << 20) - 4096, 4096)];

    #[test]
    fn a_file_with_holes_has_the_crc_of_its_bytes_and_loads_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let (file, image) = sparse_file(dir.path(), LEN, &DATA);
        assert_eq!(std::fs::read(dir.path().join("memory.bin")).unwrap(), image);
        let extents = data_extents(&file, LEN, lseek).unwrap();
        assert!(
            extents.iter().map(|e| e.1).sum::<u64>() < LEN / 2,
            "the test's file system keeps no holes: {extents:?}"
        );
        let memory = ram(LEN);
        let crc = read_memory(&file, LEN, &memory, BASE).unwrap();
        assert_eq!(crc, crc32fast::hash(&image));
        let mut loaded = vec![0u8; LEN as usize];
        memory.read_slice(&mut loaded, GuestAddress(BASE)).unwrap();
        assert_eq!(loaded, image);
    }

    #[test]
    fn without_seek_data_the_whole_file_is_read_with_the_same_crc() {
        fn no_seek_data(_: &File, _: u64, _: libc::c_int) -> std::io::Result<Option<u64>> {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        }
        let dir = tempfile::tempdir().unwrap();
        let (file, image) = sparse_file(dir.path(), LEN, &DATA);
        assert_eq!(data_extents(&file, LEN, no_seek_data).unwrap(), [(0, LEN)]);
        let memory = ram(LEN);
        let crc = read_memory_with(&file, LEN, &memory, BASE, no_seek_data).unwrap();
        assert_eq!(crc, crc32fast::hash(&image));
        let mut loaded = vec![0u8; LEN as usize];
        memory.read_slice(&mut loaded, GuestAddress(BASE)).unwrap();
        assert_eq!(loaded, image);
        // Every page was written: the fallback backs them all.
        let page = host_page_size();
        let touched = touched_pages(&memory, BASE, LEN / page, page).unwrap();
        assert!(touched.iter().all(|&t| t));
    }

    #[test]
    fn only_the_data_extents_back_pages_of_the_new_ram() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = sparse_file(dir.path(), LEN, &DATA);
        let memory = ram(LEN);
        read_memory(&file, LEN, &memory, BASE).unwrap();
        let page = host_page_size();
        let touched = touched_pages(&memory, BASE, LEN / page, page).unwrap();
        let backed = touched.iter().filter(|&&t| t).count() as u64 * page;
        let extents = data_extents(&file, LEN, lseek).unwrap();
        let data: u64 = extents.iter().map(|e| e.1).sum();
        // Each extent may back up to one transparent huge page more than
        // its bytes (on a host whose THP mode is "always").
        let slack = extents.len() as u64 * HUGE_PAGE;
        assert!(
            backed <= data + slack && backed < LEN,
            "{backed} bytes backed for {data} of data"
        );
    }

    #[test]
    fn a_short_file_is_reported_short() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = sparse_file(dir.path(), LEN - 1, &DATA[..2]);
        match read_memory(&file, LEN, &ram(LEN), BASE) {
            Err(ReadError::Short { found }) => assert_eq!(found, LEN - 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn written_memory_stores_only_the_pages_written_and_hashes_all() {
        let page = host_page_size();
        let layout = GuestLayout::new(1, 16 << 20).unwrap();
        let memory = layout.create_memory().unwrap();
        let base = layout.ram_base().0;
        memory.write_slice(b"first", GuestAddress(base)).unwrap();
        memory
            .write_slice(b"later", GuestAddress(base + (9 << 20) + 3))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let written = write_memory(&path, &layout, &memory).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut expected = vec![0u8; 16 << 20];
        expected[..5].copy_from_slice(b"first");
        expected[(9 << 20) + 3..(9 << 20) + 8].copy_from_slice(b"later");
        assert_eq!(bytes, expected);
        assert_eq!(written.size, 16 << 20);
        assert_eq!(written.crc32, crc32fast::hash(&expected));
        // Two pages (two huge pages at most, where THP backs whole ones).
        assert!(
            (2 * page..=2 * HUGE_PAGE).contains(&written.stored),
            "{} bytes stored",
            written.stored
        );
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(blocks <= 2 * HUGE_PAGE, "{blocks} bytes on disk");
    }
}
