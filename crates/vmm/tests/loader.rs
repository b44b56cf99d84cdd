//! Image and initrd loading into real (mmap-backed) guest memory.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vpsci::layout::{GuestLayout, RAM_BASE};
use vpsci::loader::{
    load_image, load_image_bytes, load_initrd, load_initrd_bytes, ImageKind, LoadError,
};

const MIB: u64 = 1 << 20;

fn vm(ram: u64) -> (GuestLayout, GuestMemoryMmap) {
    let layout = GuestLayout::new(1, ram).unwrap();
    let mem = layout.create_memory().unwrap();
    (layout, mem)
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// One PT_LOAD segment for [`elf`].
struct Seg {
    vaddr: u64,
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

/// Builds a minimal ELF64 little-endian executable.
fn elf(machine: u16, entry: u64, segs: &[Seg]) -> Vec<u8> {
    let phoff = 64u64;
    let data_start = phoff + 56 * segs.len() as u64;
    let mut out = vec![0u8; data_start as usize];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // little-endian
    out[6] = 1; // EV_CURRENT
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[18..20].copy_from_slice(&machine.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&phoff.to_le_bytes());
    out[52..54].copy_from_slice(&64u16.to_le_bytes());
    out[54..56].copy_from_slice(&56u16.to_le_bytes());
    out[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    let mut offset = data_start;
    for (i, s) in segs.iter().enumerate() {
        let ph = 64 + 56 * i;
        let fields: [u64; 6] = [
            offset,
            s.vaddr,
            s.paddr,
            s.data.len() as u64,
            s.memsz,
            0x1000,
        ];
        out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        out[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes());
        for (j, f) in fields.iter().enumerate() {
            out[ph + 8 + 8 * j..ph + 16 + 8 * j].copy_from_slice(&f.to_le_bytes());
        }
        offset += s.data.len() as u64;
    }
    for s in segs {
        out.extend_from_slice(&s.data);
    }
    out
}

/// Builds a Linux arm64 Image: header then `body` bytes.
fn linux_image(text_offset: u64, image_size: u64, flags: u64, body: usize) -> Vec<u8> {
    let mut out = vec![0u8; 64 + body];
    out[8..16].copy_from_slice(&text_offset.to_le_bytes());
    out[16..24].copy_from_slice(&image_size.to_le_bytes());
    out[24..32].copy_from_slice(&flags.to_le_bytes());
    out[0x38..0x3c].copy_from_slice(b"ARM\x64");
    for (i, b) in out[64..].iter_mut().enumerate() {
        *b = i as u8;
    }
    out
}

#[test]
fn raw_image_lands_at_ram_plus_512k_and_is_entered_there() {
    let (layout, mem) = vm(64 * MIB);
    let img = b"\x1f\x20\x03\xd5raw-guest";
    let loaded = load_image_bytes(&mem, &layout, img).unwrap();
    assert_eq!(loaded.kind, ImageKind::Raw);
    assert_eq!(loaded.entry, GuestAddress(0x4008_0000));
    assert_eq!(loaded.end, GuestAddress(0x4008_0000 + img.len() as u64));
    assert_eq!(read(&mem, 0x4008_0000, img.len()), img);
}

#[test]
fn elf_segments_are_copied_to_paddr_and_bss_is_zeroed() {
    let (layout, mem) = vm(64 * MIB);
    // Dirty the BSS area first: a reload after reset must clear it.
    mem.write_slice(&[0xEE; 32], GuestAddress(0x4010_0004))
        .unwrap();
    let img = elf(
        183,
        0x4010_0000,
        &[
            Seg {
                vaddr: 0x4010_0000,
                paddr: 0x4010_0000,
                data: vec![1, 2, 3, 4],
                memsz: 36,
            },
            Seg {
                vaddr: 0x4020_0000,
                paddr: 0x4020_0000,
                data: vec![9; 8],
                memsz: 8,
            },
        ],
    );
    let loaded = load_image_bytes(&mem, &layout, &img).unwrap();
    assert_eq!(loaded.kind, ImageKind::Elf);
    assert_eq!(loaded.entry, GuestAddress(0x4010_0000));
    assert_eq!(loaded.start, GuestAddress(0x4010_0000));
    assert_eq!(loaded.end, GuestAddress(0x4020_0008));
    assert_eq!(read(&mem, 0x4010_0000, 4), vec![1, 2, 3, 4]);
    assert_eq!(read(&mem, 0x4010_0004, 32), vec![0; 32]);
    assert_eq!(read(&mem, 0x4020_0000, 8), vec![9; 8]);
}

#[test]
fn elf_entry_is_translated_from_virtual_to_physical() {
    let (layout, mem) = vm(64 * MIB);
    let img = elf(
        183,
        0xffff_0000_0000_0010,
        &[Seg {
            vaddr: 0xffff_0000_0000_0000,
            paddr: 0x4040_0000,
            data: vec![0; 64],
            memsz: 64,
        }],
    );
    let loaded = load_image_bytes(&mem, &layout, &img).unwrap();
    assert_eq!(loaded.entry, GuestAddress(0x4040_0010));
}

#[test]
fn elf_for_another_machine_is_rejected() {
    let (layout, mem) = vm(64 * MIB);
    let img = elf(
        62, // x86-64
        0x4010_0000,
        &[Seg {
            vaddr: 0x4010_0000,
            paddr: 0x4010_0000,
            data: vec![0; 4],
            memsz: 4,
        }],
    );
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::WrongMachine { machine: 62 })
    ));
}

#[test]
fn elf_segment_outside_ram_is_rejected_before_anything_is_written() {
    let (layout, mem) = vm(64 * MIB);
    let img = elf(
        183,
        0x4010_0000,
        &[
            Seg {
                vaddr: 0x4010_0000,
                paddr: 0x4010_0000,
                data: vec![7; 4],
                memsz: 4,
            },
            Seg {
                vaddr: 0x0900_0000,
                paddr: 0x0900_0000, // the UART, not RAM
                data: vec![0; 4],
                memsz: 4,
            },
        ],
    );
    match load_image_bytes(&mem, &layout, &img) {
        Err(LoadError::SegmentOutsideRam {
            index: 1, start, ..
        }) => assert_eq!(start, 0x0900_0000),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        read(&mem, 0x4010_0000, 4),
        vec![0; 4],
        "first segment was written"
    );
}

#[test]
fn elf_segment_overlapping_the_device_tree_area_is_rejected() {
    let (layout, mem) = vm(64 * MIB);
    let fdt = layout.fdt_addr().0;
    let img = elf(
        183,
        fdt - 4,
        &[Seg {
            vaddr: fdt - 4,
            paddr: fdt - 4,
            data: vec![0; 8],
            memsz: 8,
        }],
    );
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::SegmentOutsideRam { index: 0, .. })
    ));
}

#[test]
fn elf_with_huge_or_wrapping_segment_is_rejected() {
    let (layout, mem) = vm(64 * MIB);
    let img = elf(
        183,
        0x4010_0000,
        &[Seg {
            vaddr: 0x4010_0000,
            paddr: 0x4010_0000,
            data: vec![0; 4],
            memsz: u64::MAX,
        }],
    );
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::SegmentOutsideRam { end: u64::MAX, .. })
    ));
}

#[test]
fn elf_entry_outside_every_segment_is_rejected() {
    let (layout, mem) = vm(64 * MIB);
    let img = elf(
        183,
        0x5000_0000,
        &[Seg {
            vaddr: 0x4010_0000,
            paddr: 0x4010_0000,
            data: vec![0; 4],
            memsz: 4,
        }],
    );
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::EntryOutsideImage { entry: 0x5000_0000 })
    ));
}

#[test]
fn truncated_or_foreign_elf_headers_are_errors_not_panics() {
    let (layout, mem) = vm(64 * MIB);
    let good = elf(
        183,
        0x4010_0000,
        &[Seg {
            vaddr: 0x4010_0000,
            paddr: 0x4010_0000,
            data: vec![0; 16],
            memsz: 16,
        }],
    );
    for len in 4..good.len() {
        assert!(
            load_image_bytes(&mem, &layout, &good[..len]).is_err(),
            "truncated to {len} bytes was accepted"
        );
    }
    let mut class32 = good.clone();
    class32[4] = 1;
    assert!(matches!(
        load_image_bytes(&mem, &layout, &class32),
        Err(LoadError::BadElf { .. })
    ));
    let mut big_endian = good.clone();
    big_endian[5] = 2;
    assert!(matches!(
        load_image_bytes(&mem, &layout, &big_endian),
        Err(LoadError::BadElf { .. })
    ));
    let mut phoff_huge = good;
    phoff_huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        load_image_bytes(&mem, &layout, &phoff_huge),
        Err(LoadError::BadElf { .. })
    ));
}

#[test]
fn linux_image_goes_to_aligned_base_plus_text_offset() {
    let (layout, mem) = vm(64 * MIB);
    let img = linux_image(0x8_0000, 4 * MIB, 0b1010, 256);
    let loaded = load_image_bytes(&mem, &layout, &img).unwrap();
    assert_eq!(loaded.kind, ImageKind::LinuxImage);
    assert_eq!(loaded.entry, GuestAddress(RAM_BASE.0 + 0x8_0000));
    assert_eq!(loaded.end, GuestAddress(RAM_BASE.0 + 0x8_0000 + 4 * MIB));
    assert_eq!(read(&mem, RAM_BASE.0 + 0x8_0000, img.len()), img);
}

#[test]
fn modern_linux_image_with_zero_text_offset_starts_at_ram_base() {
    let (layout, mem) = vm(64 * MIB);
    let img = linux_image(0, 2 * MIB, 0b1010, 16);
    let loaded = load_image_bytes(&mem, &layout, &img).unwrap();
    assert_eq!(loaded.entry, RAM_BASE);
}

#[test]
fn legacy_linux_image_without_size_uses_text_offset_512k() {
    let (layout, mem) = vm(64 * MIB);
    let img = linux_image(0x1234, 0, 0, 100);
    let loaded = load_image_bytes(&mem, &layout, &img).unwrap();
    assert_eq!(loaded.entry, GuestAddress(RAM_BASE.0 + 0x8_0000));
    assert_eq!(loaded.end.0 - loaded.start.0, img.len() as u64);
}

#[test]
fn linux_image_whose_bss_exceeds_ram_is_rejected() {
    let (layout, mem) = vm(16 * MIB);
    let img = linux_image(0, 15 * MIB, 0b1010, 16);
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::DoesNotFit { .. })
    ));
}

#[test]
fn big_endian_linux_image_is_rejected() {
    let (layout, mem) = vm(16 * MIB);
    let img = linux_image(0, MIB, 1, 16);
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::BadLinuxImage { .. })
    ));
}

#[test]
fn missing_file_is_a_read_error_naming_the_path() {
    let (layout, mem) = vm(16 * MIB);
    let err = load_image(&mem, &layout, "/nonexistent/guest.bin".as_ref()).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/guest.bin"));
}

#[test]
fn directory_is_unreadable_not_a_panic() {
    let (layout, mem) = vm(16 * MIB);
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_image(&mem, &layout, dir.path()),
        Err(LoadError::Read { .. })
    ));
}

#[test]
fn file_larger_than_ram_is_rejected_before_reading() {
    let (layout, mem) = vm(16 * MIB);
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(17 * MIB).unwrap(); // sparse: cheap
    assert!(matches!(
        load_image(&mem, &layout, file.path()),
        Err(LoadError::TooLarge { size, .. }) if size == 17 * MIB
    ));
}

#[test]
fn raw_image_that_fits_the_file_limit_but_not_after_512k_is_rejected() {
    let (layout, mem) = vm(16 * MIB);
    let img = vec![0u8; (layout.fdt_addr().0 - RAM_BASE.0) as usize];
    assert!(matches!(
        load_image_bytes(&mem, &layout, &img),
        Err(LoadError::DoesNotFit { .. })
    ));
}

#[test]
fn image_file_round_trips_through_load_image() {
    let (layout, mem) = vm(16 * MIB);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"hello guest").unwrap();
    let loaded = load_image(&mem, &layout, file.path()).unwrap();
    assert_eq!(read(&mem, loaded.entry.0, 11), b"hello guest");
}

#[test]
fn initrd_sits_below_the_device_tree_and_above_the_image() {
    let (layout, mem) = vm(64 * MIB);
    let image = load_image_bytes(&mem, &layout, b"kernel").unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&[0x5A; 10_000]).unwrap();
    let initrd = load_initrd(&mem, &layout, file.path(), image.end).unwrap();
    assert_eq!(initrd.size, 10_000);
    assert_eq!(initrd.start.0 % 4096, 0);
    assert!(initrd.end().0 <= layout.fdt_addr().0);
    assert!(initrd.start.0 >= image.end.0);
    assert_eq!(read(&mem, initrd.start.0, 10_000), vec![0x5A; 10_000]);
}

#[test]
fn initrd_overlapping_the_image_is_rejected() {
    let (layout, mem) = vm(16 * MIB);
    let image = load_image_bytes(&mem, &layout, &vec![1u8; 8 * MIB as usize]).unwrap();
    assert!(matches!(
        load_initrd_bytes(&mem, &layout, &vec![2u8; 7 * MIB as usize], image.end),
        Err(LoadError::InitrdDoesNotFit { .. })
    ));
}

#[test]
fn random_headers_never_panic_and_never_write_outside_ram() {
    let (layout, mem) = vm(16 * MIB);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let template = elf(
        183,
        0x4010_0000,
        &[Seg {
            vaddr: 0x4010_0000,
            paddr: 0x4010_0000,
            data: vec![0; 64],
            memsz: 128,
        }],
    );
    for round in 0..4000 {
        let mut img = if round % 2 == 0 {
            template.clone()
        } else {
            linux_image(0, MIB, 0, 64)
        };
        // Corrupt a few header bytes (the first 0x100 hold both formats' headers).
        for _ in 0..1 + next() % 4 {
            let pos = (next() % 0x100) as usize % img.len();
            img[pos] = next() as u8;
        }
        if let Ok(loaded) = load_image_bytes(&mem, &layout, &img) {
            assert!(loaded.start.0 >= RAM_BASE.0);
            assert!(loaded.end.0 <= layout.fdt_addr().0);
            assert!(loaded.entry.0 >= RAM_BASE.0 && loaded.entry.0 < layout.fdt_addr().0);
        }
    }
}
