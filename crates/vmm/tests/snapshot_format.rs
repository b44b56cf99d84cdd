//! The snapshot directory format: what is written reads back, and a
//! truncated, corrupted, incomplete or incompatible snapshot is refused with
//! one line naming the problem (these checks run before any VM exists).

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};
use vpsci::devices::pl031::Pl031State;
use vpsci::layout::GuestLayout;
use vpsci::snapshot::{self, DevicesState, SnapshotError, SnapshotParts};
use vpsci::uart::Pl011State;
use vpsci_firmware::{testing, FirmwareConfig};
use vpsci_kvm::{GicState, RedistributorState, RegValue, VcpuState, VmState};

const CPUS: u32 = 2;
const RAM: u64 = 16 << 20;

fn vm_state() -> VmState {
    VmState {
        cntfrq: 62_500_000,
        counter: 123_456,
        vcpus: (0..CPUS)
            .map(|i| VcpuState {
                index: i,
                mpidr: u64::from(i),
                mp_state: if i == 0 { 0 } else { 3 },
                regs: vec![RegValue {
                    id: 0x6030_0000_0010_0040,
                    bytes: (0x4008_0000u64 + u64::from(i)).to_le_bytes().to_vec(),
                }],
            })
            .collect(),
        gic: GicState {
            nr_irqs: 64,
            distributor: Vec::new(),
            spi_levels: vec![0],
            redistributors: (0..CPUS)
                .map(|i| RedistributorState {
                    mpidr: u64::from(i),
                    regs: Vec::new(),
                    sysregs: Vec::new(),
                })
                .collect(),
        },
    }
}

/// Writes a snapshot of a 2-vCPU, 16 MiB machine whose RAM holds a pattern.
fn write_snapshot(dir: &Path) -> snapshot::Manifest {
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
        disks: Vec::new(),
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
}

fn refusal(dir: &Path) -> String {
    let err: SnapshotError = snapshot::open(dir)
        .and_then(|s| {
            let layout = s.layout;
            s.load_memory(&layout.create_memory().unwrap())
        })
        .expect_err("the snapshot was accepted");
    let line = err.to_string();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    line
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
}

#[test]
fn a_written_snapshot_reads_back_with_its_memory_state_and_firmware() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let manifest = write_snapshot(&dir);
    let snap = snapshot::open(&dir).unwrap();
    assert_eq!(snap.manifest, manifest);
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
}

#[test]
fn a_directory_without_manifest_is_refused_as_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    write_snapshot(&tmp.path().join("s"));
    std::fs::remove_file(tmp.path().join("s/manifest.json")).unwrap();
    assert!(refusal(&tmp.path().join("s")).contains("not a complete snapshot"));
}

#[test]
fn truncated_memory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory.bin"))
        .unwrap();
    f.set_len(RAM - 4096).unwrap();
    let line = refusal(&dir);
    assert!(
        line.contains("memory.bin") && line.contains("truncated"),
        "{line}"
    );
}

#[test]
fn a_corrupted_byte_in_guest_memory_is_refused_by_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    let mut bytes = std::fs::read(dir.join("memory.bin")).unwrap();
    bytes[4096] ^= 1;
    std::fs::write(dir.join("memory.bin"), bytes).unwrap();
    let line = refusal(&dir);
    assert!(line.contains("memory.bin is corrupted"), "{line}");
}

#[test]
fn a_corrupted_vcpu_state_is_refused_by_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    let text = std::fs::read_to_string(dir.join("vm.json")).unwrap();
    std::fs::write(dir.join("vm.json"), text.replace("123456", "123457")).unwrap();
    let line = refusal(&dir);
    assert!(line.contains("vm.json is corrupted"), "{line}");
}

#[test]
fn another_format_version_is_refused_as_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    edit_manifest(&dir, |m| m["version"] = 2.into());
    let line = refusal(&dir);
    assert!(line.contains("format version 2 is not supported"), "{line}");
}

#[test]
fn a_manifest_that_points_a_section_at_another_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    edit_manifest(&dir, |m| {
        m["sections"][0]["file"] = "../../etc/passwd".into()
    });
    let line = refusal(&dir);
    assert!(line.contains("must be vm.json"), "{line}");
}

#[test]
fn a_machine_whose_vcpu_count_disagrees_with_the_vcpu_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    edit_manifest(&dir, |m| m["machine"]["cpus"] = 4.into());
    let line = refusal(&dir);
    assert!(line.contains("incompatible snapshot"), "{line}");
}

#[test]
fn a_firmware_section_this_build_cannot_read_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    write_snapshot(&dir);
    // A firmware snapshot of an unknown format version, with a matching CRC
    // in the manifest: only the engine's own reader can refuse it.
    let mut fw = std::fs::read(dir.join("firmware.bin")).unwrap();
    fw[8] = 0xFF;
    fw[9] = 0x7F;
    std::fs::write(dir.join("firmware.bin"), &fw).unwrap();
    let crc = crc32(&fw);
    edit_manifest(&dir, |m| {
        for s in m["sections"].as_array_mut().unwrap() {
            if s["name"] == "firmware" {
                s["crc32"] = crc.into();
            }
        }
    });
    let line = refusal(&dir);
    assert!(line.starts_with("firmware.bin:"), "{line}");
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

/// The fuzz target's seed reaches the last check: every small section of it
/// is valid, only its memory is missing.
#[test]
fn the_fuzz_seed_is_refused_only_for_its_missing_memory() {
    // Embedded at build time: the test binaries also run in the nested machine, without the
    // source tree.
    let data: &[u8] = include_bytes!("../../../fuzz/corpus/snapshot_dir/truncated-memory");
    let names = [
        "manifest.json",
        "vm.json",
        "firmware.bin",
        "devices.json",
        "memory.bin",
    ];
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
        "{err}"
    );
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
