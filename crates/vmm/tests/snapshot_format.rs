//! The snapshot directory format: what is written reads back, and a
//! truncated, corrupted, incomplete or incompatible snapshot, or one whose
//! disk images can no longer be used, is refused with one line naming the
//! problem (these checks run before any VM exists and write no image).

mod vm_state_fixture;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::{Bytes, GuestAddress};
use vpsci::devices::pl031::Pl031State;
use vpsci::devices::virtio_blk::{Block, QUEUE_SIZE};
use vpsci::devices::virtio_blk_image::ImageStamp;
use vpsci::devices::virtio_mmio::{QueueRegs, VirtioMmioState};
use vpsci::layout::{virtio_mmio_slot, GuestLayout};
use vpsci::snapshot::{
    self, DevicesState, DiskSnapshot, RestoredDisk, SnapshotError, SnapshotParts,
};
use vpsci::uart::Pl011State;
use vpsci_firmware::{testing, FirmwareConfig};
use vpsci_kvm::VmState;

const CPUS: u32 = 2;
const RAM: u64 = 16 << 20;

fn vm_state() -> VmState {
    vm_state_fixture::vm_state(CPUS)
}

/// A snapshot of a 2-vCPU, 16 MiB machine whose RAM holds a pattern, with
/// two virtio disks: `a.img` writable and in use (a queue set up, one
/// request served), `b.img` read only.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    images: [PathBuf; 2],
}

const DISK_SECTORS: u64 = 64;

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let images = [tmp.path().join("a.img"), tmp.path().join("b.img")];
        for image in &images {
            std::fs::write(image, vec![0x11; (DISK_SECTORS * 512) as usize]).unwrap();
            // One time for both, so that one image replaced by the other
            // passes the change check and reaches the same-file check.
            File::options()
                .write(true)
                .open(image)
                .unwrap()
                .set_modified(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
                .unwrap();
        }
        let dir = tmp.path().join("s");
        write_snapshot(&dir, &images);
        Fixture {
            _tmp: tmp,
            dir,
            images,
        }
    }

    /// What is on the host's disk of each image now: bytes and stamp.
    fn images_on_disk(&self) -> Vec<Option<(Vec<u8>, ImageStamp)>> {
        self.images
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((std::fs::read(p).ok()?, ImageStamp::of(&meta)))
            })
            .collect()
    }
}

/// A disk as the snapshot writer sees it: the image flushed and stamped,
/// its transport with queue 0 set up in guest RAM and one request served.
fn disk_snapshot(index: usize, image: &Path, readonly: bool, ram: u64) -> DiskSnapshot {
    let block = Block::open(image, readonly, &format!("vpsci-disk{index}")).unwrap();
    let (base, spi) = virtio_mmio_slot(index);
    let queue = QueueRegs {
        max_size: QUEUE_SIZE,
        size: 16,
        ready: true,
        desc_table: ram + 0x1000,
        avail_ring: ram + 0x2000,
        used_ring: ram + 0x3000,
        next_avail: 1,
        next_used: 1,
        event_idx: false,
    };
    DiskSnapshot {
        mmio_base: base.0,
        spi,
        transport: VirtioMmioState {
            driver_features: (1 << 32) | (1 << VIRTIO_BLK_F_FLUSH),
            status: 0xF,
            queues: vec![queue],
            ..VirtioMmioState::default()
        },
        block: block.state().clone(),
        image: block.sync_and_stamp().unwrap(),
    }
}

fn write_snapshot(dir: &Path, images: &[PathBuf]) -> snapshot::Manifest {
    let layout = GuestLayout::new(CPUS, RAM).unwrap();
    let memory = layout.create_memory().unwrap();
    memory
        .write_slice(b"guest bytes", GuestAddress(layout.ram_base().0 + 4096))
        .unwrap();
    let config = FirmwareConfig::default();
    let (fw, _platform) = testing::firmware(config, CPUS).unwrap();
    let devices = DevicesState {
        pl011: Pl011State::default(),
        pl031: Pl031State {
            offset: 7,
            ..Pl031State::default()
        },
        disks: images
            .iter()
            .enumerate()
            .map(|(i, image)| disk_snapshot(i, image, i == 1, layout.ram_base().0))
            .collect(),
    };
    snapshot::write(
        dir,
        &SnapshotParts {
            layout: &layout,
            vm: &vm_state(),
            firmware: &fw.snapshot(),
            firmware_config: &config,
            devices: &devices,
            memory: &memory,
        },
    )
    .unwrap()
    .manifest
}

/// Every check a restore makes before it builds the VM: the snapshot, its
/// memory, its disks with their queues.
fn check_before_building(dir: &Path) -> Result<Vec<RestoredDisk>, SnapshotError> {
    let snap = snapshot::open(dir)?;
    let memory = snap.layout.create_memory().unwrap();
    snap.load_memory(&memory)?;
    snap.restore_disks(&memory)
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
}

/// Replaces a section's bytes and records their size and CRC-32 in the
/// manifest, as a writer would have (only the content checks can refuse it).
fn replace_section(dir: &Path, name: &str, file: &str, bytes: &[u8]) {
    std::fs::write(dir.join(file), bytes).unwrap();
    let crc = crc32(bytes);
    edit_manifest(dir, |m| {
        for s in m["sections"].as_array_mut().unwrap() {
            if s["name"] == name {
                s["crc32"] = crc.into();
                s["size"] = bytes.len().into();
            }
        }
    });
}

fn edit_devices(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("devices.json")).unwrap()).unwrap();
    edit(&mut value);
    replace_section(
        dir,
        "devices",
        "devices.json",
        &serde_json::to_vec(&value).unwrap(),
    );
}

#[test]
fn a_written_snapshot_reads_back_with_its_memory_state_firmware_and_disks() {
    let fx = Fixture::new();
    let snap = snapshot::open(&fx.dir).unwrap();
    assert_eq!(snap.vm, vm_state());
    assert_eq!(snap.firmware_config, FirmwareConfig::default());
    assert_eq!(snap.devices.pl031.offset, 7);
    assert_eq!(snap.layout.cpus(), CPUS);
    let memory = snap.layout.create_memory().unwrap();
    snap.load_memory(&memory).unwrap();
    let mut buf = [0u8; 11];
    memory
        .read_slice(&mut buf, GuestAddress(snap.layout.ram_base().0 + 4096))
        .unwrap();
    assert_eq!(&buf, b"guest bytes");

    let disks = snap.restore_disks(&memory).unwrap();
    assert_eq!(disks.len(), 2);
    for (restored, saved) in disks.iter().zip(&snap.devices.disks) {
        assert_eq!(restored.block.state(), &saved.block);
    }
    let saved = &snap.devices.disks;
    assert_eq!(
        (saved[0].block.readonly, saved[1].block.readonly),
        (false, true)
    );
    assert_eq!(saved[1].block.serial, "vpsci-disk1");
    assert_eq!(saved[0].block.sectors, DISK_SECTORS);
    assert_eq!(saved[0].transport.queues[0].next_avail, 1);
    assert_eq!(
        (saved[1].mmio_base, saved[1].spi),
        (virtio_mmio_slot(1).0 .0, virtio_mmio_slot(1).1)
    );
}

/// One way to damage a snapshot (or the disk images beside it), and what
/// the one-line refusal must say.
struct Refusal {
    name: &'static str,
    damage: fn(&Fixture),
    says: &'static [&'static str],
}

const REFUSALS: &[Refusal] = &[
    Refusal {
        name: "a directory without manifest is incomplete",
        damage: |fx| std::fs::remove_file(fx.dir.join("manifest.json")).unwrap(),
        says: &["not a complete snapshot"],
    },
    Refusal {
        name: "truncated memory",
        damage: |fx| cut_memory(fx, RAM - 4096),
        says: &["memory.bin", "truncated"],
    },
    Refusal {
        name: "a corrupted byte in guest memory",
        damage: |fx| {
            let mut bytes = std::fs::read(fx.dir.join("memory.bin")).unwrap();
            bytes[4096] ^= 1;
            std::fs::write(fx.dir.join("memory.bin"), bytes).unwrap();
        },
        says: &["memory.bin is corrupted"],
    },
    Refusal {
        name: "a corrupted byte in a data extent of the sparse memory file, holes kept",
        damage: |fx| flip_memory_byte(fx, 4096 + 3),
        says: &["memory.bin is corrupted"],
    },
    Refusal {
        name: "a byte written into a hole of the sparse memory file",
        damage: |fx| flip_memory_byte(fx, RAM / 2),
        says: &["memory.bin is corrupted"],
    },
    Refusal {
        name: "memory cut inside its data",
        damage: |fx| cut_memory(fx, 4096 + 5),
        says: &["memory.bin", "truncated"],
    },
    Refusal {
        name: "a corrupted vCPU state",
        damage: |fx| {
            let text = std::fs::read_to_string(fx.dir.join("vm.json")).unwrap();
            std::fs::write(fx.dir.join("vm.json"), text.replace("123456", "123457")).unwrap();
        },
        says: &["vm.json is corrupted"],
    },
    Refusal {
        name: "another format version",
        damage: |fx| edit_manifest(&fx.dir, |m| m["version"] = 2.into()),
        says: &["format version 2 is not supported"],
    },
    Refusal {
        name: "a section pointed at another file",
        damage: |fx| {
            edit_manifest(&fx.dir, |m| {
                m["sections"][0]["file"] = "../../etc/passwd".into()
            })
        },
        says: &["must be vm.json"],
    },
    Refusal {
        name: "a machine whose vCPU count disagrees with the vCPU state",
        damage: |fx| edit_manifest(&fx.dir, |m| m["machine"]["cpus"] = 4.into()),
        says: &["incompatible snapshot"],
    },
    Refusal {
        // A firmware snapshot of an unknown format version, with a matching
        // CRC in the manifest: only the engine's own reader can refuse it.
        name: "a firmware section this build cannot read",
        damage: |fx| {
            let mut fw = std::fs::read(fx.dir.join("firmware.bin")).unwrap();
            fw[8] = 0xFF;
            fw[9] = 0x7F;
            replace_section(&fx.dir, "firmware", "firmware.bin", &fw);
        },
        says: &["firmware.bin:"],
    },
    Refusal {
        // A newer build's guest pinned to a PSCI version this build does not
        // have: new -> old is refused unless the guest's version is offered.
        name: "a guest given a PSCI version this build does not offer",
        damage: |fx| {
            let mut fw = std::fs::read(fx.dir.join("firmware.bin")).unwrap();
            fw[FW_CONFIG..FW_CONFIG + 4].copy_from_slice(&0x0001_0004u32.to_le_bytes());
            reseal_firmware(&mut fw);
            replace_section(&fx.dir, "firmware", "firmware.bin", &fw);
        },
        says: &["firmware.bin:", "not one this build can offer"],
    },
    Refusal {
        // A newer build's guest offered a function group this build does not
        // know (the next feature bit after the last one it has).
        name: "a guest given a function group this build does not know",
        damage: |fx| {
            let mut fw = std::fs::read(fx.dir.join("firmware.bin")).unwrap();
            fw[FW_CONFIG + 5 + 1] |= 0x08; // feature bit 11
            reseal_firmware(&mut fw);
            replace_section(&fx.dir, "firmware", "firmware.bin", &fw);
        },
        says: &["firmware.bin:", "not one this build can offer"],
    },
    Refusal {
        name: "a disk image that is missing",
        damage: |fx| std::fs::remove_file(&fx.images[0]).unwrap(),
        says: &["virtio disk 0", "a.img", "cannot open the image"],
    },
    Refusal {
        name: "a disk image of another capacity",
        damage: |fx| {
            let f = File::options().write(true).open(&fx.images[0]).unwrap();
            f.set_len((DISK_SECTORS + 8) * 512).unwrap();
        },
        says: &["virtio disk 0", "72 sectors, the guest's disk had 64"],
    },
    Refusal {
        name: "a disk image written after the snapshot",
        damage: |fx| {
            let f = File::options().write(true).open(&fx.images[0]).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, b"later", 0).unwrap();
            // Explicitly later: file times are coarse (a clock tick).
            f.set_modified(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
                .unwrap();
        },
        says: &["virtio disk 0", "changed after the snapshot"],
    },
    Refusal {
        name: "a writable disk whose image is now read-only",
        damage: |fx| {
            std::fs::set_permissions(&fx.images[0], std::fs::Permissions::from_mode(0o444)).unwrap()
        },
        says: &["virtio disk 0", "not writable, and the guest's disk was"],
    },
    Refusal {
        name: "two disks whose images are now one file",
        damage: |fx| {
            std::fs::remove_file(&fx.images[1]).unwrap();
            std::fs::hard_link(&fx.images[0], &fx.images[1]).unwrap();
        },
        says: &["virtio disk 1", "the same image as virtio disk 0"],
    },
    Refusal {
        name: "a disk moved to another slot",
        damage: |fx| {
            edit_devices(&fx.dir, |d| {
                d["disks"][0]["mmio_base"] = (virtio_mmio_slot(0).0 .0 + 0x200).into()
            })
        },
        says: &["incompatible snapshot", "virtio disk 0", "places it at"],
    },
    Refusal {
        name: "a disk queue whose rings are outside guest RAM",
        damage: |fx| {
            edit_devices(&fx.dir, |d| {
                d["disks"][0]["transport"]["queues"][0]["used_ring"] = 0x1000.into()
            })
        },
        says: &["virtio disk 0", "not in guest RAM"],
    },
];

/// Cuts `memory.bin` to `len` bytes.
fn cut_memory(fx: &Fixture, len: u64) {
    let f = File::options()
        .write(true)
        .open(fx.dir.join("memory.bin"))
        .unwrap();
    f.set_len(len).unwrap();
}

/// Flips one bit of `memory.bin` at `offset` in place (its holes stay holes).
fn flip_memory_byte(fx: &Fixture, offset: u64) {
    let f = File::options()
        .read(true)
        .write(true)
        .open(fx.dir.join("memory.bin"))
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).unwrap();
    f.write_all_at(&[byte[0] ^ 1], offset).unwrap();
}

#[test]
fn memory_bin_is_a_raw_image_of_ram_stored_sparse_whose_crc_covers_every_byte() {
    let fx = Fixture::new();
    let path = fx.dir.join("memory.bin");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), RAM);
    // The fixture wrote one page of its 16 MiB (a huge page at most).
    assert!(
        meta.blocks() * 512 <= 2 << 20,
        "{} bytes on disk",
        meta.blocks() * 512
    );
    let bytes = std::fs::read(&path).unwrap();
    let mut expected = vec![0u8; RAM as usize];
    expected[4096..4096 + 11].copy_from_slice(b"guest bytes");
    assert!(bytes == expected, "memory.bin is not the raw image of RAM");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.dir.join("manifest.json")).unwrap()).unwrap();
    let memory = manifest["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "memory")
        .unwrap();
    assert_eq!(memory["crc32"], crc32(&bytes));
    assert_eq!(memory["size"], RAM);

    // A copy that keeps no holes is the same snapshot.
    std::fs::write(&path, &bytes).unwrap();
    let snap = snapshot::open(&fx.dir).unwrap();
    let ram = snap.layout.create_memory().unwrap();
    snap.load_memory(&ram).unwrap();
    let mut loaded = vec![0u8; RAM as usize];
    ram.read_slice(&mut loaded, GuestAddress(snap.layout.ram_base().0))
        .unwrap();
    assert!(loaded == expected, "the dense copy loaded other bytes");
}

#[test]
fn every_damaged_snapshot_is_refused_with_one_line_naming_the_problem_and_no_image_written() {
    let mut wrong = Vec::new();
    for case in REFUSALS {
        let fx = Fixture::new();
        (case.damage)(&fx);
        let before = fx.images_on_disk();
        let outcome = check_before_building(&fx.dir);
        let after = fx.images_on_disk();
        match outcome {
            Ok(_) => wrong.push(format!("{}: accepted", case.name)),
            Err(e) => {
                let line = e.to_string();
                if line.lines().count() != 1 || !case.says.iter().all(|s| line.contains(s)) {
                    wrong.push(format!(
                        "{}: {line:?} should say {:?}",
                        case.name, case.says
                    ));
                }
            }
        }
        if before != after {
            wrong.push(format!("{}: a disk image changed", case.name));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn vpsci_restore_refuses_a_missing_disk_image_with_one_line_and_status_1_before_kvm() {
    // Host builds answer "KVM is not supported" after the snapshot checks,
    // arm64 builds build the VM after them: both must stop at the disk.
    let fx = Fixture::new();
    std::fs::remove_file(&fx.images[1]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpsci"))
        .arg("restore")
        .arg(&fx.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vpsci: virtio disk 1 (") && err.contains("b.img"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(!fx.images[1].exists(), "the missing image was created");
}

#[test]
fn writing_into_a_directory_that_holds_files_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep"), b"x").unwrap();
    let layout = GuestLayout::new(1, RAM).unwrap();
    let memory = layout.create_memory().unwrap();
    let config = FirmwareConfig::default();
    let err = snapshot::write(
        tmp.path(),
        &SnapshotParts {
            layout: &layout,
            vm: &vm_state(),
            firmware: &[],
            firmware_config: &config,
            devices: &DevicesState {
                pl011: Pl011State::default(),
                pl031: Pl031State::default(),
                disks: Vec::new(),
            },
            memory: &memory,
        },
    )
    .unwrap_err();
    assert!(matches!(err, SnapshotError::NotEmpty { .. }), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// Where the engine snapshot's configuration starts: after its magic (8
/// bytes) and format version (2); PSCI version (4 bytes), conduit (1), then
/// the feature bits (4) (`crates/firmware/src/snapshot.rs`).
const FW_CONFIG: usize = 10;

/// Recomputes the engine snapshot's own trailing CRC-32 after an edit, as a
/// (newer) engine that wrote those bytes would have.
fn reseal_firmware(fw: &mut [u8]) {
    let n = fw.len() - 4;
    let crc = crc32(&fw[..n]);
    fw[n..].copy_from_slice(&crc.to_le_bytes());
}

/// CRC-32 (IEEE), as the manifest records it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The fuzz target's seeds reach the last check: every small section of
/// them is valid (`with-disks` has a writable and a read-only disk, its
/// transport mid-use), only their memory is missing.
#[test]
fn the_fuzz_seeds_are_refused_only_for_their_missing_memory() {
    // Embedded at build time: the test binaries also run in the nested machine, without the
    // source tree.
    let seeds: [(&str, &[u8]); 2] = [
        (
            "truncated-memory",
            include_bytes!("../../../fuzz/corpus/snapshot_dir/truncated-memory"),
        ),
        (
            "with-disks",
            include_bytes!("../../../fuzz/corpus/snapshot_dir/with-disks"),
        ),
    ];
    let names = [
        "manifest.json",
        "vm.json",
        "firmware.bin",
        "devices.json",
        "memory.bin",
    ];
    for (seed, data) in seeds {
        let mut parts: Vec<(&str, &[u8])> = Vec::new();
        let mut rest = data;
        for name in names {
            let (len, tail) = rest.split_first_chunk::<4>().unwrap();
            let (part, tail) = tail.split_at(u32::from_le_bytes(*len) as usize);
            parts.push((name, part));
            rest = tail;
        }
        let err = snapshot::open_parts(&parts).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Size {
                    file: "memory.bin",
                    ..
                }
            ),
            "{seed}: {err}"
        );
    }
}

/// A snapshot of a guest pinned to PSCI 0.2, written by an engine with that
/// configuration.
fn write_psci_0_2_snapshot(dir: &Path) {
    let layout = GuestLayout::new(CPUS, RAM).unwrap();
    let memory = layout.create_memory().unwrap();
    let config = FirmwareConfig {
        psci_version: vpsci_firmware::PsciVersion::V0_2,
        ..FirmwareConfig::default()
    };
    let (fw, _platform) = testing::firmware(config, CPUS).unwrap();
    snapshot::write(
        dir,
        &SnapshotParts {
            layout: &layout,
            vm: &vm_state(),
            firmware: &fw.snapshot(),
            firmware_config: &config,
            devices: &DevicesState {
                pl011: Pl011State::default(),
                pl031: Pl031State::default(),
                disks: Vec::new(),
            },
            memory: &memory,
        },
    )
    .unwrap();
}

#[test]
fn the_restored_engine_keeps_the_guests_pinned_psci_version_not_this_builds_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_psci_0_2_snapshot(&dir);
    assert_ne!(
        FirmwareConfig::default().psci_version,
        vpsci_firmware::PsciVersion::V0_2
    );
    let snap = snapshot::open(&dir).unwrap();
    let fw = vpsci::restore::check_firmware(&snap, false).unwrap();
    assert_eq!(fw.config().psci_version, vpsci_firmware::PsciVersion::V0_2);
}

#[test]
fn a_destination_with_kvms_psci_cannot_offer_the_guests_firmware() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_psci_0_2_snapshot(&dir);
    let snap = snapshot::open(&dir).unwrap();
    let err = vpsci::restore::check_firmware(&snap, true).unwrap_err();
    assert!(err.contains("cannot offer it: restore refused"), "{err}");
    assert_eq!(err.lines().count(), 1);
}
