//! Loading the guest image and initrd into guest RAM.
//!
//! Three image formats, recognised by content:
//! - **ELF64, little-endian, AArch64** (`EM_AARCH64`): every `PT_LOAD`
//!   segment is copied to its physical address (`p_paddr`, since the guest
//!   starts with the MMU off) and the rest of its `p_memsz` is zeroed; the
//!   entry point is `e_entry` translated to the physical address of the
//!   segment containing it.
//! - **Linux arm64 `Image`** (magic `"ARM\x64"` at offset 0x38, see the
//!   kernel's `Documentation/arch/arm64/booting.rst`): loaded at the 2 MiB
//!   aligned start of RAM plus the header's `text_offset`; the kernel may use
//!   `image_size` bytes from there (its BSS included). Images from before
//!   Linux 3.17 (`image_size` 0) get the historical `text_offset` 0x80000.
//! - anything else is a **raw** binary, loaded at RAM + 0x8_0000 and entered
//!   at its first byte, as QEMU does.
//!
//! The ELF parser is our own: `linux-loader` only builds its ELF loader for
//! x86 hosts (and its arm64 `Image` loader only on arm64 hosts), and we need
//! both on every host. It reads only the ELF header and program headers, with
//! every offset bounds-checked.
//!
//! The image may use RAM up to the device tree area
//! ([`GuestLayout::fdt_addr`]); the initrd goes right below the device tree
//! and must not overlap the image.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::GuestLayout;

/// Offset of the Linux arm64 image magic.
const LINUX_MAGIC_OFFSET: usize = 0x38;
/// `"ARM\x64"` read as a little-endian u32.
const LINUX_MAGIC: u32 = 0x644d_5241;
/// Bytes of the Linux arm64 image header.
const LINUX_HEADER_SIZE: usize = 64;
/// `text_offset` of kernels whose header predates `image_size`.
const LINUX_LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// Linux images are placed at a 2 MiB aligned base plus `text_offset`.
const LINUX_BASE_ALIGN: u64 = 2 << 20;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
/// `EM_AARCH64`.
pub const EM_AARCH64: u16 = 183;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

/// Which format the image was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Headerless binary.
    Raw,
    /// ELF64 AArch64 executable.
    Elf,
    /// Linux arm64 `Image`.
    LinuxImage,
}

/// Where an image was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// Format recognised.
    pub kind: ImageKind,
    /// Address the boot vCPU starts at.
    pub entry: GuestAddress,
    /// Lowest address the image occupies.
    pub start: GuestAddress,
    /// One past the highest address the image may use (for a Linux image
    /// this includes its BSS, from `image_size`).
    pub end: GuestAddress,
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRange {
    /// First byte.
    pub start: GuestAddress,
    /// Length in bytes.
    pub size: u64,
}

impl InitrdRange {
    /// One past the last byte (`linux,initrd-end`).
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.start.0 + self.size)
    }
}

/// Why an image or initrd could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file is missing or unreadable.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than the RAM it would go into.
    #[error("{} is {size} bytes, more than the {max} bytes of RAM available for it", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        max: u64,
    },
    /// The image (or a segment, or a Linux image with its BSS) would not lie
    /// inside the RAM available to it.
    #[error("image range {start:#x}..{end:#x} does not fit in RAM {ram_start:#x}..{ram_end:#x}")]
    DoesNotFit {
        /// First byte the image needs.
        start: u64,
        /// One past the last byte it needs (saturated at u64::MAX).
        end: u64,
        /// Start of the RAM available for the image.
        ram_start: u64,
        /// End of the RAM available for the image (the device tree follows).
        ram_end: u64,
    },
    /// An ELF `PT_LOAD` segment lies outside the RAM available for the image.
    #[error(
        "ELF segment {index} at {start:#x}..{end:#x} lies outside RAM {ram_start:#x}..{ram_end:#x}"
    )]
    SegmentOutsideRam {
        /// Program header index.
        index: usize,
        /// Segment physical start.
        start: u64,
        /// Segment physical end (saturated at u64::MAX).
        end: u64,
        /// Start of the RAM available for the image.
        ram_start: u64,
        /// End of the RAM available for the image.
        ram_end: u64,
    },
    /// An ELF for another architecture.
    #[error("ELF machine {machine} is not AArch64 ({EM_AARCH64})")]
    WrongMachine {
        /// `e_machine` found.
        machine: u16,
    },
    /// An ELF file we cannot load (32-bit, big-endian, truncated, ...).
    #[error("unsupported or malformed ELF: {reason}")]
    BadElf {
        /// What is wrong.
        reason: &'static str,
    },
    /// The ELF entry point is outside every loaded segment.
    #[error("ELF entry point {entry:#x} is outside the loaded segments")]
    EntryOutsideImage {
        /// `e_entry`.
        entry: u64,
    },
    /// A Linux image header we cannot honour.
    #[error("unsupported Linux image: {reason}")]
    BadLinuxImage {
        /// What is wrong.
        reason: &'static str,
    },
    /// No room for the initrd between the image and the device tree.
    #[error("initrd of {size} bytes does not fit between the image end {image_end:#x} and the device tree at {fdt:#x}")]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// End of the image.
        image_end: u64,
        /// Device tree address.
        fdt: u64,
    },
    /// Writing guest memory failed (RAM not mapped where the layout says).
    #[error("cannot write guest memory at {addr:#x}: {source}")]
    GuestMemory {
        /// Guest address written.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: GuestMemoryError,
    },
}

/// Reads `path` and loads it as an image (format detected from its content).
pub fn load_image(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    path: &Path,
) -> Result<LoadedImage, LoadError> {
    let max = image_room(layout);
    let bytes = read_file(path, max)?;
    load_image_bytes(mem, layout, &bytes)
}

/// Loads an image already in memory (format detected from its content).
pub fn load_image_bytes(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &[u8],
) -> Result<LoadedImage, LoadError> {
    if image.starts_with(&ELF_MAGIC) {
        load_elf(mem, layout, image)
    } else if read_u32(image, LINUX_MAGIC_OFFSET) == Some(LINUX_MAGIC) {
        load_linux(mem, layout, image)
    } else {
        load_raw(mem, layout, image)
    }
}

/// Reads `path` and puts it right below the device tree, above `image_end`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    path: &Path,
    image_end: GuestAddress,
) -> Result<InitrdRange, LoadError> {
    let bytes = read_file(path, image_room(layout))?;
    load_initrd_bytes(mem, layout, &bytes, image_end)
}

/// Puts initrd bytes right below the device tree, above `image_end`.
pub fn load_initrd_bytes(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    initrd: &[u8],
    image_end: GuestAddress,
) -> Result<InitrdRange, LoadError> {
    let size = initrd.len() as u64;
    let start = layout
        .initrd_addr(size)
        .filter(|start| start.0 >= image_end.0)
        .ok_or(LoadError::InitrdDoesNotFit {
            size,
            image_end: image_end.0,
            fdt: layout.fdt_addr().0,
        })?;
    write(mem, start.0, initrd)?;
    Ok(InitrdRange { start, size })
}

/// Bytes of RAM an image may use: from RAM start to the device tree.
fn image_room(layout: &GuestLayout) -> u64 {
    layout.fdt_addr().0 - layout.ram_base().0
}

fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > max {
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
            size,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // take(): a file growing while we read cannot make us exceed `max`.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), LoadError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| LoadError::GuestMemory { addr, source })
}

/// Checks that `start..start+len` lies within the RAM available to the image.
fn check_fits(layout: &GuestLayout, start: u64, len: u64) -> Result<u64, LoadError> {
    let ram_start = layout.ram_base().0;
    let ram_end = layout.fdt_addr().0;
    match start.checked_add(len) {
        Some(end) if start >= ram_start && end <= ram_end => Ok(end),
        end => Err(LoadError::DoesNotFit {
            start,
            end: end.unwrap_or(u64::MAX),
            ram_start,
            ram_end,
        }),
    }
}

fn load_raw(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &[u8],
) -> Result<LoadedImage, LoadError> {
    let start = layout.raw_image_addr().0;
    let end = check_fits(layout, start, image.len() as u64)?;
    write(mem, start, image)?;
    Ok(LoadedImage {
        kind: ImageKind::Raw,
        entry: GuestAddress(start),
        start: GuestAddress(start),
        end: GuestAddress(end),
    })
}

fn load_linux(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &[u8],
) -> Result<LoadedImage, LoadError> {
    if image.len() < LINUX_HEADER_SIZE {
        return Err(LoadError::BadLinuxImage {
            reason: "file shorter than the 64-byte header",
        });
    }
    let header_u64 = |off| read_u64(image, off).unwrap_or(0);
    let (text_offset, image_size, flags) = (header_u64(8), header_u64(16), header_u64(24));
    // booting.rst: flags bit 0 is the kernel's endianness, 1 = big-endian.
    if flags & 1 != 0 {
        return Err(LoadError::BadLinuxImage {
            reason: "big-endian kernel",
        });
    }
    let (text_offset, image_size) = if image_size == 0 {
        (LINUX_LEGACY_TEXT_OFFSET, image.len() as u64)
    } else {
        (text_offset, image_size.max(image.len() as u64))
    };
    let base = layout.ram_base().0.next_multiple_of(LINUX_BASE_ALIGN);
    let start = base
        .checked_add(text_offset)
        .ok_or(LoadError::BadLinuxImage {
            reason: "text_offset overflows the address space",
        })?;
    let end = check_fits(layout, start, image_size)?;
    write(mem, start, image)?;
    Ok(LoadedImage {
        kind: ImageKind::LinuxImage,
        entry: GuestAddress(start),
        start: GuestAddress(start),
        end: GuestAddress(end),
    })
}

/// One `PT_LOAD` segment, checked against the file.
struct Segment<'a> {
    vaddr: u64,
    paddr: u64,
    memsz: u64,
    data: &'a [u8],
}

fn load_elf(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    image: &[u8],
) -> Result<LoadedImage, LoadError> {
    let bad = |reason| LoadError::BadElf { reason };
    if image.len() < ELF64_EHDR_SIZE {
        return Err(bad("file shorter than the ELF64 header"));
    }
    if image[4] != ELFCLASS64 {
        return Err(bad("not a 64-bit ELF"));
    }
    if image[5] != ELFDATA2LSB {
        return Err(bad("not little-endian"));
    }
    let machine = read_u16(image, 18).ok_or(bad("truncated header"))?;
    if machine != EM_AARCH64 {
        return Err(LoadError::WrongMachine { machine });
    }
    let e_type = read_u16(image, 16).ok_or(bad("truncated header"))?;
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(bad("not an executable (e_type is neither EXEC nor DYN)"));
    }
    let entry = read_u64(image, 24).ok_or(bad("truncated header"))?;
    let phoff = read_u64(image, 32).ok_or(bad("truncated header"))?;
    let phentsize = read_u16(image, 54).ok_or(bad("truncated header"))?;
    let phnum = read_u16(image, 56).ok_or(bad("truncated header"))?;
    if usize::from(phentsize) < ELF64_PHDR_SIZE {
        return Err(bad("program header entries smaller than 56 bytes"));
    }

    let mut segments = Vec::new();
    for index in 0..usize::from(phnum) {
        let off = usize::try_from(phoff)
            .ok()
            .and_then(|p| p.checked_add(index * usize::from(phentsize)))
            .ok_or(bad("program header table outside the file"))?;
        let ph = off
            .checked_add(ELF64_PHDR_SIZE)
            .and_then(|end| image.get(off..end))
            .ok_or(bad("program header table outside the file"))?;
        if read_u32(ph, 0) != Some(PT_LOAD) {
            continue;
        }
        let field = |o| read_u64(ph, o).unwrap_or(0);
        let (offset, vaddr, paddr) = (field(8), field(16), field(24));
        let (filesz, memsz) = (field(32), field(40));
        if filesz > memsz {
            return Err(bad("segment file size exceeds its memory size"));
        }
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(filesz).ok())
            .and_then(|(o, n)| image.get(o..o.checked_add(n)?))
            .ok_or(bad("segment data outside the file"))?;
        check_fits(layout, paddr, memsz).map_err(|e| match e {
            LoadError::DoesNotFit {
                start,
                end,
                ram_start,
                ram_end,
            } => LoadError::SegmentOutsideRam {
                index,
                start,
                end,
                ram_start,
                ram_end,
            },
            other => other,
        })?;
        segments.push(Segment {
            vaddr,
            paddr,
            memsz,
            data,
        });
    }
    if segments.is_empty() {
        return Err(bad("no PT_LOAD segment"));
    }
    // e_entry is a virtual address; the vCPU starts with the MMU off, so
    // translate it through the segment that contains it.
    let entry_phys = segments
        .iter()
        .find(|s| entry >= s.vaddr && entry - s.vaddr < s.memsz)
        .map(|s| s.paddr + (entry - s.vaddr))
        .ok_or(LoadError::EntryOutsideImage { entry })?;
    // Everything is checked: only now touch guest memory.
    for s in &segments {
        write(mem, s.paddr, s.data)?;
        let bss = s.memsz - s.data.len() as u64;
        zero(mem, s.paddr + s.data.len() as u64, bss)?;
    }
    let start = segments.iter().map(|s| s.paddr).min().unwrap_or(entry_phys);
    let end = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(entry_phys);
    Ok(LoadedImage {
        kind: ImageKind::Elf,
        entry: GuestAddress(entry_phys),
        start: GuestAddress(start),
        end: GuestAddress(end),
    })
}

fn zero(mem: &GuestMemoryMmap, mut addr: u64, mut len: u64) -> Result<(), LoadError> {
    const CHUNK: [u8; 4096] = [0; 4096];
    while len > 0 {
        let n = len.min(CHUNK.len() as u64);
        write(mem, addr, &CHUNK[..n as usize])?;
        addr += n;
        len -= n;
    }
    Ok(())
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}
