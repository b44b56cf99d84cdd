//! Guest images: building the guest programs, turning each ELF into the flat image vpsci
//! and QEMU load at [`LOAD_ADDRESS`], and writing a run's parameters into the image's
//! `VPSCICF1` block (see `guests/rt/src/config.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::plan::Run;
use crate::cargo::{self, cargo};
use crate::paths;

/// Where the guests are linked and loaded (RAM base + 0x8_0000).
pub const LOAD_ADDRESS: u64 = 0x4008_0000;
/// Magic of the parameter block in every guest image.
const CONFIG_MAGIC: &[u8; 8] = b"VPSCICF1";

/// Builds the guest programs; returns program name -> ELF path.
pub(crate) fn build_guests() -> Result<BTreeMap<String, PathBuf>> {
    let dir = paths::workspace_root().join("guests");
    eprintln!("conformance: building guests (aarch64-unknown-none)");
    let mut cmd = cargo();
    cmd.current_dir(&dir)
        .args(["build", "--release", "--bins"])
        .env_remove("RUSTFLAGS");
    let (built, _) = cargo::build_executables(&mut cmd)?;
    let map: BTreeMap<String, PathBuf> = built
        .into_iter()
        .filter(|e| e.kind == "bin")
        .map(|e| (e.target, e.path))
        .collect();
    if map.is_empty() {
        bail!("building {} produced no guest programs", dir.display());
    }
    Ok(map)
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Turns a little-endian ELF64 into the flat image a loader places at `base`: every
/// PT_LOAD segment's file bytes at `p_paddr - base`, gaps zero-filled (what
/// `objcopy -O binary` does, without needing binutils).
pub fn elf_to_flat(elf: &[u8], base: u64) -> Result<Vec<u8>> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        bail!("not a little-endian ELF64 file");
    }
    let field = |v: Option<u64>| v.context("ELF file truncated");
    let phoff = field(read_u64(elf, 0x20))? as usize;
    let phentsize = field(read_u16(elf, 0x36).map(u64::from))? as usize;
    let phnum = field(read_u16(elf, 0x38).map(u64::from))? as usize;
    let mut image: Vec<u8> = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if field(read_u32(elf, ph).map(u64::from))? != 1 {
            continue; // not PT_LOAD
        }
        let offset = field(read_u64(elf, ph + 0x08))? as usize;
        let paddr = field(read_u64(elf, ph + 0x18))?;
        let filesz = field(read_u64(elf, ph + 0x20))? as usize;
        if filesz == 0 {
            continue;
        }
        let at = paddr.checked_sub(base).with_context(|| {
            format!("segment at {paddr:#x} lies below the load address {base:#x}")
        })? as usize;
        if at > 64 << 20 {
            bail!("segment at {paddr:#x} is too far above {base:#x} for a flat image");
        }
        let bytes = elf
            .get(offset..offset + filesz)
            .context("segment extends past the end of the ELF file")?;
        if image.len() < at + filesz {
            image.resize(at + filesz, 0);
        }
        image[at..at + filesz].copy_from_slice(bytes);
    }
    if image.is_empty() {
        bail!("ELF file has no loadable bytes");
    }
    Ok(image)
}

/// `major.minor` as the parameter block holds it: major in bits 31..16, minor in 15..0.
fn encode_version(text: &str) -> u32 {
    match text.split_once('.') {
        Some((major, minor)) => {
            (major.parse::<u32>().unwrap_or(0) << 16) | minor.parse::<u32>().unwrap_or(0)
        }
        None => 0,
    }
}

/// Reads a guest program's ELF file and returns its flat image for [`LOAD_ADDRESS`].
pub(crate) fn flat_image(elf_path: &Path) -> Result<Vec<u8>> {
    let elf = std::fs::read(elf_path).with_context(|| format!("reading {}", elf_path.display()))?;
    elf_to_flat(&elf, LOAD_ADDRESS).with_context(|| format!("converting {}", elf_path.display()))
}

/// Writes the run's parameters into the image's `VPSCICF1` block.
pub(super) fn patch_config(image: &mut [u8], run: &Run, long: bool) -> Result<()> {
    let at = image
        .windows(CONFIG_MAGIC.len())
        .position(|w| w == CONFIG_MAGIC)
        .context("guest image has no VPSCICF1 parameter block")?;
    let fields = [
        run.expect_version.map(encode_version).unwrap_or(0),
        // Every backend is told the conduit (QEMU's follows `virtualization=on`).
        if run.smc { 2 } else { 1 },
        run.iterations,
        run.action,
        u32::from(long),
    ];
    for (i, value) in fields.iter().enumerate() {
        let start = at + 8 + 4 * i;
        image
            .get_mut(start..start + 4)
            .context("parameter block truncated")?
            .copy_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

/// Builds every image the plan needs under `<target>/conformance`.
pub(super) fn prepare_images(runs: &[Run], long: bool) -> Result<BTreeMap<String, PathBuf>> {
    let elves = build_guests()?;
    let dir = paths::target_dir().join("conformance");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut images = BTreeMap::new();
    for run in runs {
        let elf_path = elves
            .get(run.program)
            .with_context(|| format!("guest program {} was not built", run.program))?;
        let mut image = flat_image(elf_path)?;
        patch_config(&mut image, run, long)?;
        let path = dir.join(format!("{}.bin", run.id));
        std::fs::write(&path, &image).with_context(|| format!("writing {}", path.display()))?;
        images.insert(run.id.clone(), path);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with the given PT_LOAD segments (paddr, bytes).
    fn elf(segments: &[(u64, &[u8])]) -> Vec<u8> {
        let phoff = 64usize;
        let data_start = phoff + 56 * segments.len();
        let mut out = vec![0u8; data_start];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (paddr, bytes)) in segments.iter().enumerate() {
            let ph = phoff + 56 * i;
            let offset = out.len() as u64;
            out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            out[ph + 0x08..ph + 0x10].copy_from_slice(&offset.to_le_bytes());
            out[ph + 0x18..ph + 0x20].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 0x20..ph + 0x28].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    #[test]
    fn flat_image_places_segments_at_their_physical_offsets_and_fills_gaps() {
        let image = elf(&[(LOAD_ADDRESS, b"abcd"), (LOAD_ADDRESS + 8, b"xy")]);
        let flat = elf_to_flat(&image, LOAD_ADDRESS).unwrap();
        assert_eq!(flat, b"abcd\0\0\0\0xy");
    }

    #[test]
    fn flat_image_refuses_segments_below_the_load_address_and_non_elf_input() {
        let image = elf(&[(LOAD_ADDRESS - 4, b"abcd")]);
        assert!(elf_to_flat(&image, LOAD_ADDRESS).is_err());
        assert!(elf_to_flat(b"MZ not an elf file", LOAD_ADDRESS).is_err());
        let mut truncated = elf(&[(LOAD_ADDRESS, b"abcd")]);
        truncated.truncate(70);
        assert!(elf_to_flat(&truncated, LOAD_ADDRESS).is_err());
    }

    #[test]
    fn parameters_are_written_after_the_magic_in_field_order() {
        let mut image = b"....VPSCICF1".to_vec();
        image.extend_from_slice(&[0xAA; 20]);
        let mut run = Run::new("r", "version-gating", 1, &["x"]);
        run.expect_version = Some("1.2");
        run.iterations = 7;
        run.action = 3;
        patch_config(&mut image, &run, true).unwrap();
        let field =
            |i: usize| u32::from_le_bytes(image[12 + 4 * i..16 + 4 * i].try_into().unwrap());
        assert_eq!(
            [field(0), field(1), field(2), field(3), field(4)],
            [0x1_0002, 1, 7, 3, 1]
        );
        assert!(patch_config(&mut b"no magic here".to_vec(), &run, false).is_err());
    }
}
