//! The migration stream without a VM (host tests): every message survives its frame,
//! every kind of damage is refused before the payload is used, the destination's
//! compatibility check refuses what it cannot honour, and the snapshot sections a
//! migration carries are read back by the same checks as a snapshot directory.

mod vm_state_fixture;

use std::io::Cursor;

use vm_memory::{Bytes, GuestAddress};
use vpsci::api::types::MigrationRound;
use vpsci::devices::pl031::Pl031State;
use vpsci::layout::GuestLayout;
use vpsci::migrate::check_hello;
use vpsci::migrate::wire::{self, Hello, Kind, Message, WireError, MAX_PAYLOAD};
use vpsci::snapshot::{self, DevicesState, MachineInfo, SnapshotParts};
use vpsci::uart::Pl011State;
use vpsci_firmware::{testing, FirmwareConfig, PsciVersion};
use vpsci_kvm::VmState;

const CPUS: u32 = 2;
const RAM: u64 = 16 << 20;

fn framed(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    wire::send(&mut out, message).unwrap_or_else(|e| panic!("{e}"));
    out
}

fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    wire::receive(&mut Cursor::new(bytes))
}

fn hello(config: FirmwareConfig) -> Hello {
    let (fw, _platform) = testing::firmware(config, CPUS).unwrap_or_else(|e| panic!("{e}"));
    let layout = GuestLayout::new(CPUS, RAM).unwrap_or_else(|e| panic!("{e}"));
    Hello {
        machine: MachineInfo {
            cpus: CPUS,
            ram_base: layout.ram_base().0,
            ram_size: RAM,
        },
        mpidrs: (0..u64::from(CPUS)).collect(),
        cntfrq: 62_500_000,
        firmware: fw.snapshot(),
        page_size: 4096,
    }
}

fn round() -> MigrationRound {
    MigrationRound {
        round: 3,
        pages_sent: 12,
        bytes_sent: 12 * 4096,
        ms: 1.5,
        dirty_pages: 4,
        device_pages: 2,
        dirty_pages_per_s: 2666.0,
        mib_per_s: 31.25,
        expected_downtime_ms: 0.5,
    }
}

#[test]
fn every_message_reads_back_as_it_was_sent() {
    let messages = [
        Message::Hello(hello(FirmwareConfig::default())),
        Message::Accept,
        Message::Refuse("no room".to_owned()),
        Message::Pages {
            addr: 0x4000_1000,
            data: vec![0xA5; 8192],
        },
        Message::Round(round()),
        Message::State(vec![
            ("manifest.json".to_owned(), b"{}".to_vec()),
            ("firmware.bin".to_owned(), vec![1, 2, 3]),
        ]),
        Message::Ready,
        Message::Go,
        Message::Running,
    ];
    // One stream, in order, as the peer reads it.
    let mut stream = Vec::new();
    for m in &messages {
        stream.extend(framed(m));
    }
    let mut reader = Cursor::new(stream);
    for m in &messages {
        assert_eq!(
            &wire::receive(&mut reader).unwrap_or_else(|e| panic!("{e}")),
            m
        );
    }
    assert!(
        matches!(wire::receive(&mut reader), Err(WireError::Io(_))),
        "the end is an error"
    );
}

#[test]
fn a_flipped_bit_anywhere_after_the_magic_is_refused() {
    let frame = framed(&Message::Pages {
        addr: 0x4000_0000,
        data: (0..4096u32).map(|i| i as u8).collect(),
    });
    for at in 4..frame.len() {
        let mut damaged = frame.clone();
        damaged[at] ^= 0x08;
        assert!(
            decode(&damaged).is_err(),
            "a flipped bit at byte {at} was accepted"
        );
    }
}

#[test]
fn a_payload_damaged_after_its_checksum_is_a_checksum_error() {
    let mut out = Vec::new();
    wire::send_pages(&mut out, 0x4000_0000, &[7u8; 4096], true).unwrap_or_else(|e| panic!("{e}"));
    match decode(&out) {
        Err(WireError::Checksum {
            kind: Kind::Pages, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_stream_another_version_an_unknown_kind_or_a_huge_length_is_refused_before_the_payload() {
    let good = framed(&Message::Ready);
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(decode(&magic), Err(WireError::Magic { .. })));
    let mut version = good.clone();
    version[4] = 2;
    assert!(matches!(
        decode(&version),
        Err(WireError::Version { found: 2 })
    ));
    let mut kind = good.clone();
    kind[6] = 99;
    assert!(matches!(decode(&kind), Err(WireError::Kind(99))));
    let mut huge = good.clone();
    huge[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    assert!(matches!(decode(&huge), Err(WireError::TooLong(_))));
    // One message, cut short anywhere: never decoded.
    let frame = framed(&Message::Refuse("why".to_owned()));
    for len in 0..frame.len() {
        assert!(
            matches!(decode(&frame[..len]), Err(WireError::Io(_))),
            "cut at {len}"
        );
    }
}

#[test]
fn a_frame_whose_payload_does_not_fit_its_kind_is_refused() {
    let mut out = Vec::new();
    wire::write_frame(&mut out, Kind::Go, b"extra", false).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        decode(&out),
        Err(WireError::Payload { kind: Kind::Go, .. })
    ));
    out.clear();
    wire::write_frame(&mut out, Kind::Hello, b"{\"machine\": 1}", false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        decode(&out),
        Err(WireError::Payload {
            kind: Kind::Hello,
            ..
        })
    ));
    out.clear();
    wire::write_frame(&mut out, Kind::State, &[1, 0, 0, 0, 200], false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        decode(&out),
        Err(WireError::Payload {
            kind: Kind::State,
            ..
        })
    ));
    out.clear();
    wire::write_frame(&mut out, Kind::Pages, &[1, 2, 3], false).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        decode(&out),
        Err(WireError::Payload {
            kind: Kind::Pages,
            ..
        })
    ));
}

#[test]
fn the_destination_accepts_a_guest_pinned_to_an_older_psci_and_refuses_what_it_cannot_honour() {
    let pinned = FirmwareConfig {
        psci_version: PsciVersion::V1_0,
        ..FirmwareConfig::default()
    };
    let ok = hello(pinned);
    let layout = check_hello(&ok, false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((layout.cpus(), layout.ram_size()), (CPUS, RAM));

    let err = check_hello(&ok, true).expect_err("KVM's PSCI cannot offer the engine's");
    assert!(err.contains("--in-kernel-psci"), "{err}");
    let mut moved = ok.clone();
    moved.machine.ram_base += 0x1000_0000;
    assert!(check_hello(&moved, false)
        .expect_err("RAM elsewhere")
        .contains("RAM starts"));
    let mut fewer = ok.clone();
    fewer.mpidrs.pop();
    assert!(
        check_hello(&fewer, false).is_err(),
        "MPIDRs for another vCPU count"
    );
    let mut odd = ok.clone();
    odd.page_size = 3000;
    assert!(
        check_hello(&odd, false).is_err(),
        "a page size that is no page size"
    );
    let mut garbage = ok;
    garbage.firmware[0] ^= 0xFF;
    assert!(check_hello(&garbage, false)
        .expect_err("bad engine snapshot")
        .contains("firmware.bin"));
}

fn vm_state() -> VmState {
    vm_state_fixture::vm_state(CPUS)
}

#[test]
fn the_sections_a_migration_sends_pass_the_snapshot_checks_and_damage_is_refused() {
    let layout = GuestLayout::new(CPUS, RAM).unwrap_or_else(|e| panic!("{e}"));
    let memory = layout.create_memory().unwrap_or_else(|e| panic!("{e}"));
    memory
        .write_slice(b"x", GuestAddress(layout.ram_base().0))
        .unwrap_or_else(|e| panic!("{e}"));
    let config = FirmwareConfig::default();
    let (fw, _platform) = testing::firmware(config, CPUS).unwrap_or_else(|e| panic!("{e}"));
    let devices = DevicesState {
        pl011: Pl011State::default(),
        pl031: Pl031State::default(),
        disks: Vec::new(),
    };
    let files = snapshot::encode_sections(&SnapshotParts {
        layout: &layout,
        vm: &vm_state(),
        firmware: &fw.snapshot(),
        firmware_config: &config,
        devices: &devices,
        memory: &memory,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let parts: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let snap = snapshot::open_streamed(&parts, RAM).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snap.layout, layout);
    assert_eq!(snap.vm, vm_state());
    // The RAM the destination holds must be the machine's.
    assert!(snapshot::open_streamed(&parts, RAM / 2).is_err());
    // Any damaged section is refused by its checksum.
    for i in 1..files.len() {
        let mut damaged = files.clone();
        damaged[i].1[0] ^= 1;
        let parts: Vec<(&str, &[u8])> = damaged.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let err = snapshot::open_streamed(&parts, RAM).expect_err("damaged");
        assert!(
            err.to_string().contains("corrupted"),
            "{}: {err}",
            files[i].0
        );
    }
}

#[test]
fn arbitrary_and_mutated_streams_never_panic_and_every_refusal_is_one_line() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut valid = Vec::new();
    for m in [
        Message::Hello(hello(FirmwareConfig::default())),
        Message::Round(round()),
        Message::State(vec![("vm.json".to_owned(), b"{}".to_vec())]),
        Message::Pages {
            addr: 0x4000_0000,
            data: vec![1; 4096],
        },
    ] {
        valid.extend(framed(&m));
    }
    let (mut decoded, mut refused) = (0u32, 0u32);
    for round in 0..20_000u32 {
        let bytes: Vec<u8> = if round % 2 == 0 {
            // Random bytes behind a valid header start, so the checks past the magic run.
            let len = (next() % 64) as usize;
            let mut b = b"VPMG\x01\x00".to_vec();
            b.extend((0..len).map(|_| next() as u8));
            b
        } else {
            let mut b = valid.clone();
            for _ in 0..=(next() % 3) {
                let at = (next() as usize) % b.len();
                b[at] ^= 1 << (next() % 8);
            }
            b
        };
        let mut reader = Cursor::new(bytes);
        loop {
            match wire::receive(&mut reader) {
                Ok(_) => decoded += 1,
                Err(e) => {
                    assert_eq!(e.to_string().lines().count(), 1, "{e}");
                    refused += 1;
                    break;
                }
            }
        }
    }
    println!("{decoded} frames decoded, {refused} streams refused");
    // The frames before a damaged one still decode: the reader refuses what is
    // damaged, not everything.
    assert!(decoded > 0);
}
