//! The snapshot directory: manifest, sections, checksums, reader and writer.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vpsci_firmware::{Firmware, FirmwareConfig};
use vpsci_kvm::VmState;

use crate::devices::pl031::Pl031State;
use crate::devices::virtio_blk::{BlockState, SECTOR_SIZE};
use crate::devices::virtio_blk_image::ImageStamp;
use crate::devices::virtio_mmio::VirtioMmioState;
use crate::layout::{virtio_mmio_slot, GuestLayout, MAX_VIRTIO_DEVICES};
use crate::text::one_line;
use crate::uart::Pl011State;

use super::sparse::{read_memory, write_memory, ReadError};

/// `format` field of every manifest.
pub const FORMAT_NAME: &str = "vpsci-snapshot";
/// The manifest version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

const MANIFEST_FILE: &str = "manifest.json";
/// Largest manifest or JSON section accepted (a 64-vCPU VM's KVM state is
/// well under 2 MiB): a bigger file is not ours and is not read into memory.
const MAX_SMALL_SECTION: u64 = 16 << 20;

/// The sections of a snapshot; each is stored in the file named here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionName {
    /// Guest RAM, raw, from the RAM base (`memory.bin`).
    Memory,
    /// The KVM state: vCPU registers, MP states, vGICv3, counter (`vm.json`).
    Vm,
    /// The firmware engine's own versioned snapshot (`firmware.bin`).
    Firmware,
    /// The devices' states (`devices.json`).
    Devices,
}

impl SectionName {
    /// Every section, in the order they are written.
    pub const ALL: [SectionName; 4] = [
        SectionName::Vm,
        SectionName::Firmware,
        SectionName::Devices,
        SectionName::Memory,
    ];

    /// The file that holds the section (fixed: a manifest cannot point elsewhere).
    pub fn file(self) -> &'static str {
        match self {
            SectionName::Memory => "memory.bin",
            SectionName::Vm => "vm.json",
            SectionName::Firmware => "firmware.bin",
            SectionName::Devices => "devices.json",
        }
    }
}

/// One section as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// Which section.
    pub name: SectionName,
    /// Its file (must be [`SectionName::file`]).
    pub file: String,
    /// Its length in bytes.
    pub size: u64,
    /// CRC-32 (IEEE) of its bytes.
    pub crc32: u32,
}

/// The machine the snapshot was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineInfo {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM base (guest physical).
    pub ram_base: u64,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// Which program wrote it (`vpsci 0.1.0`), for people.
    pub writer: String,
    /// The machine.
    pub machine: MachineInfo,
    /// The guest's pinned firmware (PSCI version, conduit, ...), for people:
    /// the authoritative copy is the firmware section.
    pub firmware_summary: String,
    /// Every section, each exactly once.
    pub sections: Vec<Section>,
}

/// One virtio block device: where the guest finds it, the transport's
/// registers, the disk, and a stamp of its image (the image itself is not
/// copied into the snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshot {
    /// Guest-physical base of its virtio-mmio window (a restore places the
    /// disk at the same slot: it must be this build's slot for its index).
    pub mmio_base: u64,
    /// Its interrupt (SPI number), likewise fixed by the slot.
    pub spi: u32,
    /// The virtio-mmio transport (feature negotiation, status, queues).
    pub transport: VirtioMmioState,
    /// The disk (image path, read-only, capacity, serial).
    pub block: BlockState,
    /// The image's length and modification time once flushed with the VM
    /// paused: a restore refuses an image that differs.
    pub image: ImageStamp,
}

/// `devices.json`: every device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    /// The PL011 UART.
    pub pl011: Pl011State,
    /// The PL031 RTC.
    pub pl031: Pl031State,
    /// Virtio block devices, slot order.
    pub disks: Vec<DiskSnapshot>,
}

/// Why a snapshot was refused (one line each).
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("snapshot {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// The directory has no manifest (not a snapshot, or one whose writing did not finish).
    #[error("{dir} is not a complete snapshot: it has no manifest.json")]
    NoManifest {
        /// The directory.
        dir: PathBuf,
    },
    /// A file is too large to be what it claims.
    #[error("{file} has {size} bytes, more than a snapshot's {file} can have ({max})")]
    TooLarge {
        /// Which file.
        file: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The manifest does not parse.
    #[error("manifest.json is not a valid snapshot manifest: {0}")]
    BadManifest(String),
    /// The manifest is not ours.
    #[error("manifest.json describes a {found:?}, not a {FORMAT_NAME}")]
    WrongFormat {
        /// Its `format` field.
        found: String,
    },
    /// A version this build does not read.
    #[error(
        "snapshot format version {found} is not supported (this vpsci reads version {FORMAT_VERSION})"
    )]
    Version {
        /// Its version.
        found: u32,
    },
    /// A section is missing, listed twice, or points at another file.
    #[error("manifest.json: {0}")]
    BadSections(String),
    /// A section file's length differs from the manifest's.
    #[error("{file} has {found} bytes but the manifest says {expected}: the snapshot is truncated or damaged")]
    Size {
        /// Which file.
        file: &'static str,
        /// Its length.
        found: u64,
        /// The manifest's.
        expected: u64,
    },
    /// A section's checksum differs from the manifest's.
    #[error(
        "{file} is corrupted: its CRC-32 is {found:#010x}, the manifest says {expected:#010x}"
    )]
    Checksum {
        /// Which file.
        file: &'static str,
        /// Computed.
        found: u32,
        /// From the manifest.
        expected: u32,
    },
    /// A section's content is invalid although its checksum matches.
    #[error("{file}: {reason}")]
    BadSection {
        /// Which file.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The parts disagree with each other or with this build.
    #[error("incompatible snapshot: {0}")]
    Incompatible(String),
    /// A saved disk's image cannot be used again (nothing was written to it).
    #[error("virtio disk {index} ({}): {reason}", one_line(path.display()))]
    Disk {
        /// Its slot.
        index: usize,
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The directory to write into is not empty.
    #[error("{dir} already exists and is not empty: a snapshot is written into a new directory")]
    NotEmpty {
        /// The directory.
        dir: PathBuf,
    },
}

fn io_error(path: &Path, e: &std::io::Error) -> SnapshotError {
    SnapshotError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A snapshot whose manifest and small sections were read and checked.
#[derive(Debug, Clone)]
pub struct CheckedSnapshot {
    /// The manifest.
    pub manifest: Manifest,
    /// The layout of the saved machine.
    pub layout: GuestLayout,
    /// The KVM state.
    pub vm: VmState,
    /// The engine's snapshot bytes (checked by the engine's reader).
    pub firmware: Vec<u8>,
    /// The guest's pinned firmware configuration, from those bytes.
    pub firmware_config: FirmwareConfig,
    /// The devices.
    pub devices: DevicesState,
    memory: Option<PathBuf>,
}

/// Where the sections come from: a directory, or memory (tests, fuzzing).
trait Source {
    fn size(&self, file: &'static str) -> Result<Option<u64>, SnapshotError>;
    fn read_small(&self, file: &'static str, size: u64) -> Result<Vec<u8>, SnapshotError>;
}

struct DirSource<'a>(&'a Path);

impl Source for DirSource<'_> {
    fn size(&self, file: &'static str) -> Result<Option<u64>, SnapshotError> {
        let path = self.0.join(file);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, &e)),
        }
    }

    fn read_small(&self, file: &'static str, size: u64) -> Result<Vec<u8>, SnapshotError> {
        if size > MAX_SMALL_SECTION {
            return Err(SnapshotError::TooLarge {
                file,
                size,
                max: MAX_SMALL_SECTION,
            });
        }
        let path = self.0.join(file);
        let mut bytes = Vec::with_capacity(size as usize);
        File::open(&path)
            .and_then(|f| f.take(MAX_SMALL_SECTION + 1).read_to_end(&mut bytes))
            .map_err(|e| io_error(&path, &e))?;
        Ok(bytes)
    }
}

/// Files held in memory by name.
struct MemSource<'a>(&'a [(&'a str, &'a [u8])]);

impl Source for MemSource<'_> {
    fn size(&self, file: &'static str) -> Result<Option<u64>, SnapshotError> {
        Ok(self
            .0
            .iter()
            .find(|(n, _)| *n == file)
            .map(|(_, b)| b.len() as u64))
    }

    fn read_small(&self, file: &'static str, size: u64) -> Result<Vec<u8>, SnapshotError> {
        if size > MAX_SMALL_SECTION {
            return Err(SnapshotError::TooLarge {
                file,
                size,
                max: MAX_SMALL_SECTION,
            });
        }
        Ok(self
            .0
            .iter()
            .find(|(n, _)| *n == file)
            .map(|(_, b)| b.to_vec())
            .unwrap_or_default())
    }
}

/// Reads and checks the snapshot in `dir`: manifest, every small section's
/// size, checksum and content, the memory file's size; and that the parts
/// agree. Guest memory's checksum is checked by
/// [`CheckedSnapshot::load_memory`].
pub fn open(dir: &Path) -> Result<CheckedSnapshot, SnapshotError> {
    let source = DirSource(dir);
    if source.size(MANIFEST_FILE)?.is_none() {
        return Err(SnapshotError::NoManifest {
            dir: dir.to_path_buf(),
        });
    }
    let mut snap = check(&source)?;
    snap.memory = Some(dir.join(SectionName::Memory.file()));
    Ok(snap)
}

/// [`open`] over files held in memory, by name (`manifest.json`,
/// `vm.json`, ...). The memory section's checksum is checked here too.
pub fn open_parts(files: &[(&str, &[u8])]) -> Result<CheckedSnapshot, SnapshotError> {
    let source = MemSource(files);
    if source.size(MANIFEST_FILE)?.is_none() {
        return Err(SnapshotError::NoManifest {
            dir: PathBuf::from("(memory)"),
        });
    }
    let snap = check(&source)?;
    let section = section(&snap.manifest, SectionName::Memory)?;
    let memory = files
        .iter()
        .find(|(n, _)| *n == SectionName::Memory.file())
        .map_or(&[][..], |(_, b)| *b);
    let found = crc32fast::hash(memory);
    if found != section.crc32 {
        return Err(SnapshotError::Checksum {
            file: SectionName::Memory.file(),
            found,
            expected: section.crc32,
        });
    }
    Ok(snap)
}

fn section(manifest: &Manifest, name: SectionName) -> Result<&Section, SnapshotError> {
    manifest
        .sections
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| SnapshotError::BadSections(format!("no {} section", name.file())))
}

fn parse_manifest(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
    // The format and version are looked at first, so that a manifest of
    // another version is refused as such rather than as unparseable.
    #[derive(Deserialize)]
    struct Header {
        format: String,
        version: u32,
    }
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| SnapshotError::BadManifest(one_line(e)))?;
    if header.format != FORMAT_NAME {
        return Err(SnapshotError::WrongFormat {
            found: header.format,
        });
    }
    if header.version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: header.version,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| SnapshotError::BadManifest(one_line(e)))?;
    for name in SectionName::ALL {
        let count = manifest.sections.iter().filter(|s| s.name == name).count();
        if count != 1 {
            return Err(SnapshotError::BadSections(format!(
                "the {} section is listed {count} times (must be once)",
                name.file()
            )));
        }
    }
    if let Some(s) = manifest.sections.iter().find(|s| s.file != s.name.file()) {
        return Err(SnapshotError::BadSections(format!(
            "section {:?} names file {:?}, it must be {}",
            s.name,
            s.file,
            s.name.file()
        )));
    }
    Ok(manifest)
}

fn read_checked(
    source: &dyn Source,
    manifest: &Manifest,
    name: SectionName,
) -> Result<Vec<u8>, SnapshotError> {
    let file = name.file();
    let section = section(manifest, name)?;
    let found = source.size(file)?.ok_or(SnapshotError::Size {
        file,
        found: 0,
        expected: section.size,
    })?;
    if found != section.size {
        return Err(SnapshotError::Size {
            file,
            found,
            expected: section.size,
        });
    }
    let bytes = source.read_small(file, found)?;
    if bytes.len() as u64 != section.size {
        return Err(SnapshotError::Size {
            file,
            found: bytes.len() as u64,
            expected: section.size,
        });
    }
    let crc = crc32fast::hash(&bytes);
    if crc != section.crc32 {
        return Err(SnapshotError::Checksum {
            file,
            found: crc,
            expected: section.crc32,
        });
    }
    Ok(bytes)
}

fn check(source: &dyn Source) -> Result<CheckedSnapshot, SnapshotError> {
    let size = source.size(MANIFEST_FILE)?.unwrap_or(0);
    let bytes = source.read_small(MANIFEST_FILE, size)?;
    let manifest = parse_manifest(&bytes)?;

    let vm_bytes = read_checked(source, &manifest, SectionName::Vm)?;
    let vm: VmState = serde_json::from_slice(&vm_bytes).map_err(|e| SnapshotError::BadSection {
        file: SectionName::Vm.file(),
        reason: one_line(e),
    })?;
    let firmware = read_checked(source, &manifest, SectionName::Firmware)?;
    let firmware_config =
        Firmware::snapshot_config(&firmware).map_err(|e| SnapshotError::BadSection {
            file: SectionName::Firmware.file(),
            reason: one_line(e),
        })?;
    let dev_bytes = read_checked(source, &manifest, SectionName::Devices)?;
    let devices: DevicesState =
        serde_json::from_slice(&dev_bytes).map_err(|e| SnapshotError::BadSection {
            file: SectionName::Devices.file(),
            reason: one_line(e),
        })?;
    check_disk_slots(&devices.disks)?;

    let machine = &manifest.machine;
    let layout = GuestLayout::new(machine.cpus, machine.ram_size)
        .map_err(|e| SnapshotError::Incompatible(format!("the saved machine: {e}")))?;
    if layout.ram_base().0 != machine.ram_base {
        return Err(SnapshotError::Incompatible(format!(
            "guest RAM starts at {:#x} in the snapshot, this vpsci places it at {:#x}",
            machine.ram_base,
            layout.ram_base().0
        )));
    }
    let memory = section(&manifest, SectionName::Memory)?;
    if memory.size != machine.ram_size {
        return Err(SnapshotError::Incompatible(format!(
            "memory.bin is listed with {} bytes for {} bytes of RAM",
            memory.size, machine.ram_size
        )));
    }
    let found = source.size(SectionName::Memory.file())?.unwrap_or(0);
    if found != memory.size {
        return Err(SnapshotError::Size {
            file: SectionName::Memory.file(),
            found,
            expected: memory.size,
        });
    }
    if vm.vcpus.len() != machine.cpus as usize {
        return Err(SnapshotError::Incompatible(format!(
            "the machine has {} vCPUs but vm.json holds {}",
            machine.cpus,
            vm.vcpus.len()
        )));
    }
    let mpidrs: Vec<u64> = vm.vcpus.iter().map(|v| v.mpidr).collect();
    vm.check_fits(&mpidrs, vm.cntfrq)
        .map_err(|e| SnapshotError::Incompatible(one_line(e)))?;
    Ok(CheckedSnapshot {
        manifest,
        layout,
        vm,
        firmware,
        firmware_config,
        devices,
        memory: None,
    })
}

/// The saved disks sit where this build puts them (the guest's device tree,
/// in its memory, names those windows and interrupts), and each one's
/// capacity agrees with its image's length.
fn check_disk_slots(disks: &[DiskSnapshot]) -> Result<(), SnapshotError> {
    if disks.len() > MAX_VIRTIO_DEVICES {
        return Err(SnapshotError::Incompatible(format!(
            "{} virtio disks saved, this vpsci has {MAX_VIRTIO_DEVICES} slots",
            disks.len()
        )));
    }
    for (index, disk) in disks.iter().enumerate() {
        let (base, spi) = virtio_mmio_slot(index);
        if disk.mmio_base != base.0 || disk.spi != spi {
            return Err(SnapshotError::Incompatible(format!(
                "virtio disk {index} was at {:#x} (SPI {}), this vpsci places it at {:#x} (SPI {spi})",
                disk.mmio_base, disk.spi, base.0
            )));
        }
        if disk.block.sectors != disk.image.len / SECTOR_SIZE {
            return Err(SnapshotError::Incompatible(format!(
                "virtio disk {index} has {} sectors but its image had {} bytes",
                disk.block.sectors, disk.image.len
            )));
        }
    }
    Ok(())
}

impl CheckedSnapshot {
    /// Copies guest memory from the snapshot into `memory` (the RAM of the
    /// layout [`CheckedSnapshot::layout`]), checking its size and checksum.
    /// On an error `memory` holds a partial copy and must be thrown away.
    pub fn load_memory(&self, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let file = SectionName::Memory.file();
        let section = section(&self.manifest, SectionName::Memory)?;
        let Some(path) = &self.memory else {
            return Err(SnapshotError::Incompatible(
                "this snapshot was read from memory and has no memory file".to_owned(),
            ));
        };
        let f = File::open(path).map_err(|e| io_error(path, &e))?;
        let found = read_memory(&f, section.size, memory, self.layout.ram_base().0).map_err(
            |e| match e {
                ReadError::Short { found } => SnapshotError::Size {
                    file,
                    found,
                    expected: section.size,
                },
                ReadError::Io(e) => io_error(path, &e),
                ReadError::Ram(e) => SnapshotError::Incompatible(format!("guest RAM: {e}")),
            },
        )?;
        if found != section.crc32 {
            return Err(SnapshotError::Checksum {
                file,
                found,
                expected: section.crc32,
            });
        }
        Ok(())
    }
}

/// What [`write()`] stores.
#[derive(Debug)]
pub struct SnapshotParts<'a> {
    /// The machine's layout.
    pub layout: &'a GuestLayout,
    /// The KVM state (taken after guest memory stopped changing).
    pub vm: &'a VmState,
    /// The engine's snapshot ([`Firmware::snapshot`]).
    pub firmware: &'a [u8],
    /// The engine's configuration, for the manifest's summary.
    pub firmware_config: &'a FirmwareConfig,
    /// The devices.
    pub devices: &'a DevicesState,
    /// Guest RAM.
    pub memory: &'a GuestMemoryMmap,
}

/// Writes `bytes` into `path` (created) and returns their size and CRC-32.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(u64, u32), SnapshotError> {
    let mut f = File::create(path).map_err(|e| io_error(path, &e))?;
    f.write_all(bytes).map_err(|e| io_error(path, &e))?;
    f.sync_all().map_err(|e| io_error(path, &e))?;
    Ok((bytes.len() as u64, crc32fast::hash(bytes)))
}

/// What [`write()`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The manifest.
    pub manifest: Manifest,
    /// Bytes of guest memory stored as data in `memory.bin`: the pages
    /// guest RAM's mapping ever backed (the rest of the file is holes).
    pub memory_stored: u64,
}

/// Writes a snapshot into `dir` (created; it must not exist or be empty).
/// The manifest is written last, through a temporary name, so a directory
/// whose writing was cut short is refused as incomplete. `memory.bin` is a
/// sparse file: guest pages never backed are holes.
pub fn write(dir: &Path, parts: &SnapshotParts<'_>) -> Result<Written, SnapshotError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SnapshotError::NotEmpty {
                    dir: dir.to_path_buf(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
        }
        Err(e) => return Err(io_error(dir, &e)),
    }
    let json = |value: &dyn erased::Json| -> Result<Vec<u8>, SnapshotError> {
        value.to_json().map_err(|e| SnapshotError::BadSection {
            file: "(writing)",
            reason: e.to_string(),
        })
    };
    let mut sections = Vec::new();
    let mut memory_stored = 0;
    for name in SectionName::ALL {
        let path = dir.join(name.file());
        let (size, crc32) = match name {
            SectionName::Vm | SectionName::Devices | SectionName::Firmware => {
                let bytes = match name {
                    SectionName::Vm => json(parts.vm)?,
                    SectionName::Devices => json(parts.devices)?,
                    _ => parts.firmware.to_vec(),
                };
                write_file(&path, &bytes)?
            }
            SectionName::Memory => {
                let stored = write_memory(&path, parts.layout, parts.memory)
                    .map_err(|e| io_error(&path, &e))?;
                memory_stored = stored.stored;
                (stored.size, stored.crc32)
            }
        };
        sections.push(Section {
            name,
            file: name.file().to_owned(),
            size,
            crc32,
        });
    }
    let manifest = manifest(parts.layout, parts.firmware_config, sections);
    let bytes = manifest_bytes(&manifest)?;
    let tmp = dir.join("manifest.json.partial");
    write_file(&tmp, &bytes)?;
    let path = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, &e))?;
    Ok(Written {
        manifest,
        memory_stored,
    })
}

fn manifest(layout: &GuestLayout, config: &FirmwareConfig, sections: Vec<Section>) -> Manifest {
    Manifest {
        format: FORMAT_NAME.to_owned(),
        version: FORMAT_VERSION,
        writer: format!("vpsci {}", env!("CARGO_PKG_VERSION")),
        machine: MachineInfo {
            cpus: layout.cpus(),
            ram_base: layout.ram_base().0,
            ram_size: layout.ram_size(),
        },
        firmware_summary: format!("PSCI {}, {:?} conduit", config.psci_version, config.conduit),
        sections,
    }
}

fn manifest_bytes(manifest: &Manifest) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::BadSection {
        file: MANIFEST_FILE,
        reason: e.to_string(),
    })
}

/// The small sections of a snapshot as bytes, by file name (`manifest.json`,
/// `vm.json`, `firmware.bin`, `devices.json`), for a live migration that
/// streams guest memory separately. The manifest lists the memory section
/// with the RAM's size and a CRC-32 of 0: the stream checks every memory
/// frame itself, and [`open_streamed`] does not read this field.
pub fn encode_sections(
    parts: &SnapshotParts<'_>,
) -> Result<Vec<(&'static str, Vec<u8>)>, SnapshotError> {
    let json = |file: &'static str, value: &dyn erased::Json| {
        value.to_json().map_err(|e| SnapshotError::BadSection {
            file,
            reason: e.to_string(),
        })
    };
    let small = [
        (SectionName::Vm, json(SectionName::Vm.file(), parts.vm)?),
        (SectionName::Firmware, parts.firmware.to_vec()),
        (
            SectionName::Devices,
            json(SectionName::Devices.file(), parts.devices)?,
        ),
    ];
    let mut sections: Vec<Section> = small
        .iter()
        .map(|(name, bytes)| Section {
            name: *name,
            file: name.file().to_owned(),
            size: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        })
        .collect();
    sections.push(Section {
        name: SectionName::Memory,
        file: SectionName::Memory.file().to_owned(),
        size: parts.layout.ram_size(),
        crc32: 0,
    });
    let manifest = manifest(parts.layout, parts.firmware_config, sections);
    let mut files = vec![(MANIFEST_FILE, manifest_bytes(&manifest)?)];
    files.extend(small.into_iter().map(|(name, bytes)| (name.file(), bytes)));
    Ok(files)
}

/// [`open_parts`] for a snapshot whose guest memory arrives separately (a
/// live migration): every check of [`open`] on the small sections, and the
/// manifest's memory size against `memory_len`, the RAM the caller holds.
/// The memory section's CRC-32 is not checked here (see [`encode_sections`]).
pub fn open_streamed(
    files: &[(&str, &[u8])],
    memory_len: u64,
) -> Result<CheckedSnapshot, SnapshotError> {
    struct Streamed<'a>(MemSource<'a>, u64);
    impl Source for Streamed<'_> {
        fn size(&self, file: &'static str) -> Result<Option<u64>, SnapshotError> {
            if file == SectionName::Memory.file() {
                return Ok(Some(self.1));
            }
            self.0.size(file)
        }
        fn read_small(&self, file: &'static str, size: u64) -> Result<Vec<u8>, SnapshotError> {
            self.0.read_small(file, size)
        }
    }
    let source = Streamed(MemSource(files), memory_len);
    if source.size(MANIFEST_FILE)?.is_none() {
        return Err(SnapshotError::NoManifest {
            dir: PathBuf::from("(migration stream)"),
        });
    }
    check(&source)
}

/// JSON for the writer's sections without naming each type twice.
mod erased {
    pub(super) trait Json {
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}
