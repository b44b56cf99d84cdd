//! Firmware snapshot: round trip, and refusal of corrupted, truncated or incompatible input
//! with nothing changed.

mod common;

use common::*;
use vpsci_firmware::{
    CallOutcome, EntryPoint, Firmware, FirmwareConfig, FunctionId as F, Mpidr, OnPending,
    PowerState, PsciVersion, SnapshotError, SuspendKind, SuspendMode, VcpuId, WakeOutcome,
    SNAPSHOT_FORMAT_VERSION,
};

fn mpidr(i: u32) -> u64 {
    Mpidr::from_index(i).raw()
}

fn states(fw: &Firmware) -> Vec<PowerState> {
    (0..fw.vcpu_count() as u32)
        .map(|i| fw.power_state(VcpuId::new(i)))
        .collect()
}

/// A 6-vCPU VM with one vCPU in every state, stats, MEM_PROTECT and OS-initiated mode.
fn busy_vm() -> (Firmware, vpsci_firmware::testing::FakePlatform) {
    let (fw, p) = fw(6);
    // vCPU 1: standby; vCPU 2: powerdown; vCPU 3: pending; vCPU 4: frozen; vCPU 5: off.
    assert_eq!(x0(&fw, &p, 0, F::SetSuspendMode, 1, 0, 0), 0);
    assert_eq!(x0(&fw, &p, 0, F::MemProtect, 1, 0, 0), 0);
    for v in [1, 2, 4] {
        bring_up(&fw, &p, v);
    }
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, 0, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    p.clock.advance(3_000);
    fw.vcpu_woken(VcpuId::new(1), &p);
    assert!(matches!(
        fw.handle_call(&call(1, F::CpuSuspend64, 0, 0xAA, 0xBB), &p),
        CallOutcome::Suspend { .. }
    ));
    assert!(matches!(
        fw.handle_call(&call(2, F::CpuSuspend64, 1 << 30, RAM + 0x200, 0x77), &p),
        CallOutcome::Suspend { .. }
    ));
    assert_eq!(x0(&fw, &p, 0, F::CpuOn64, mpidr(3), RAM + 0x300, 0x33), 0);
    assert_eq!(
        fw.handle_call(&call(4, F::CpuFreeze, 0, 0, 0), &p),
        CallOutcome::PowerOff
    );
    fw.freeze();
    (fw, p)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites the trailing CRC so a deliberately altered body passes the checksum.
/// Offset of the flags byte: magic 8 + version 2 + configuration 30.
const FLAGS: usize = 40;
/// Header length: flags offset + flags 1 + vCPU count 4.
const HEADER: usize = FLAGS + 5;
/// Bytes per vCPU record.
const VCPU_RECORD: usize = 91;

fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let crc = crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn snapshot_round_trip_restores_every_vcpu_state_and_vm_flag() {
    let (src, _p) = busy_vm();
    let bytes = src.snapshot();
    let (dst, p) = fw(6);
    dst.restore(&bytes).expect("compatible snapshot");
    assert_eq!(states(&dst), states(&src));
    assert!(dst.is_frozen());
    assert!(dst.mem_protect_enabled());
    assert_eq!(dst.suspend_mode(), SuspendMode::OsInitiated);
    assert_eq!(
        dst.pending_start(VcpuId::new(3)),
        Some(EntryPoint {
            pc: RAM + 0x300,
            context_id: 0x33,
            aarch32: false
        })
    );
    assert_eq!(x0(&dst, &p, 0, F::StatCount64, mpidr(1), 0, 0), 1);
    assert_eq!(x0(&dst, &p, 0, F::StatResidency64, mpidr(1), 0, 0), 3);
    assert_eq!(
        dst.snapshot(),
        bytes,
        "restore then snapshot is the identity"
    );
}

#[test]
fn restored_suspended_vcpus_wake_as_they_would_have_on_the_source() {
    let (src, p) = busy_vm();
    let (dst, _p) = fw(6);
    dst.restore(&src.snapshot()).expect("compatible snapshot");
    assert_eq!(
        dst.vcpu_woken(VcpuId::new(1), &p),
        WakeOutcome::Return {
            regs: [0, 0, 0xAA, 0xBB]
        }
    );
    assert_eq!(
        dst.vcpu_woken(VcpuId::new(2), &p),
        WakeOutcome::ResumeAt {
            entry: EntryPoint {
                pc: RAM + 0x200,
                context_id: 0x77,
                aarch32: false
            }
        }
    );
    assert_eq!(dst.power_state(VcpuId::new(4)), PowerState::Frozen);
}

#[test]
fn snapshot_of_system_suspended_vm_restores_the_system_suspension() {
    let (src, p) = fw(2);
    assert_eq!(
        src.handle_call(&call(0, F::SystemSuspend64, RAM, 9, 0), &p),
        CallOutcome::Suspend {
            kind: SuspendKind::System
        }
    );
    let (dst, _p) = fw(2);
    dst.restore(&src.snapshot()).expect("compatible");
    assert_eq!(
        dst.power_state(VcpuId::new(0)),
        PowerState::Suspended {
            kind: SuspendKind::System
        }
    );
    assert!(
        matches!(dst.vcpu_woken(VcpuId::new(0), &p), WakeOutcome::ResumeAt { entry } if entry.context_id == 9)
    );
}

/// Asserts `restore` fails with a matching error and leaves `dst` exactly as before.
fn assert_refused(dst: &Firmware, bytes: &[u8], check: impl Fn(&SnapshotError) -> bool) {
    let before = dst.snapshot();
    let result = dst.restore(bytes);
    match &result {
        Err(e) => assert!(check(e), "unexpected error {e}"),
        Ok(()) => panic!("restore accepted a bad snapshot"),
    }
    assert_eq!(dst.snapshot(), before, "a refused restore changed state");
}

#[test]
fn truncated_snapshot_is_refused_at_every_length() {
    let (src, _p) = busy_vm();
    let bytes = src.snapshot();
    let (dst, _p) = fw(6);
    for len in 0..bytes.len() {
        assert_refused(&dst, &bytes[..len], |e| {
            matches!(
                e,
                SnapshotError::Truncated { .. }
                    | SnapshotError::BadMagic
                    | SnapshotError::ChecksumMismatch { .. }
            )
        });
    }
}

#[test]
fn snapshot_with_any_flipped_bit_is_refused() {
    let (src, _p) = busy_vm();
    let bytes = src.snapshot();
    let (dst, _p) = fw(6);
    for bit in 0..bytes.len() * 8 {
        let mut bad = bytes.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert_refused(&dst, &bad, |_| true);
    }
}

#[test]
fn snapshot_with_bad_magic_is_refused() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    bytes[0] = b'X';
    reseal(&mut bytes);
    assert_refused(&src, &bytes, |e| *e == SnapshotError::BadMagic);
}

#[test]
fn snapshot_of_unknown_format_version_is_refused() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    bytes[8..10].copy_from_slice(&(SNAPSHOT_FORMAT_VERSION + 1).to_le_bytes());
    reseal(&mut bytes);
    assert_refused(&src, &bytes, |e| {
        matches!(e, SnapshotError::UnsupportedFormat { found, oldest: 1, newest }
            if *found == SNAPSHOT_FORMAT_VERSION + 1 && *newest == SNAPSHOT_FORMAT_VERSION)
    });
}

#[test]
fn snapshot_with_corrupted_checksum_is_refused() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    let n = bytes.len();
    bytes[n - 1] ^= 0xFF;
    assert_refused(&src, &bytes, |e| {
        matches!(e, SnapshotError::ChecksumMismatch { .. })
    });
}

#[test]
fn snapshot_from_a_different_psci_version_is_refused_as_incompatible() {
    let (src, _p) = fw_with(
        FirmwareConfig {
            psci_version: PsciVersion::V1_1,
            ..FirmwareConfig::default()
        },
        2,
    );
    let (dst, _p) = fw(2);
    assert_refused(&dst, &src.snapshot(), |e| {
        matches!(e, SnapshotError::IncompatibleConfig { snapshot, local }
            if snapshot.contains("PSCI 1.1") && local.contains("PSCI 1.3"))
    });
}

#[test]
fn snapshot_onto_a_vm_pinned_to_the_same_version_is_accepted() {
    let older = FirmwareConfig {
        psci_version: PsciVersion::V1_0,
        ..FirmwareConfig::default()
    };
    let (src, _p) = fw_with(older, 2);
    let (dst, _p) = fw(2);
    assert!(dst.restore(&src.snapshot()).is_err());
    dst.set_config(older).expect("not frozen");
    dst.restore(&src.snapshot()).expect("same configuration");
}

#[test]
fn snapshot_with_different_vcpu_count_or_mpidr_is_refused() {
    let (src, _p) = fw(2);
    let (dst, _p) = fw(3);
    assert_refused(&dst, &src.snapshot(), |e| {
        *e == SnapshotError::CpuCountMismatch {
            snapshot: 2,
            local: 3,
        }
    });
    let other = Firmware::new(
        FirmwareConfig::default(),
        vec![Mpidr::from_index(0), Mpidr::from_index(16)],
        vec![vpsci_firmware::testing::TEST_RAM],
    )
    .expect("valid");
    assert_refused(&other, &src.snapshot(), |e| {
        matches!(e, SnapshotError::MpidrMismatch { index: 1, .. })
    });
}

#[test]
fn snapshot_with_invalid_state_byte_is_refused() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    bytes[HEADER + 8] = 0x7F;
    reseal(&mut bytes);
    assert_refused(&src, &bytes, |e| {
        matches!(
            e,
            SnapshotError::InvalidField {
                field: "vcpu state",
                ..
            }
        )
    });
}

#[test]
fn snapshot_with_trailing_bytes_is_refused() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    let n = bytes.len() - 4;
    bytes.splice(n..n, [0u8; 3]);
    reseal(&mut bytes);
    assert_refused(&src, &bytes, |e| {
        *e == SnapshotError::TrailingBytes { extra: 3 }
    });
}

#[test]
fn snapshot_with_unknown_flag_bits_is_refused() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    bytes[FLAGS] |= 0x80;
    reseal(&mut bytes);
    assert_refused(&src, &bytes, |e| {
        matches!(e, SnapshotError::InvalidField { field: "flags", .. })
    });
}

#[test]
fn snapshot_config_lets_a_newer_destination_pin_the_source_firmware() {
    let source_cfg = FirmwareConfig {
        psci_version: PsciVersion::V1_1,
        ..FirmwareConfig::default()
    };
    let (src, _p) = fw_with(source_cfg, 2);
    let bytes = src.snapshot();
    let (dst, p) = fw(2);
    let offered = Firmware::snapshot_config(&bytes).expect("valid snapshot");
    assert_eq!(offered.psci_version, PsciVersion::V1_1);
    dst.set_config(offered).expect("not frozen");
    dst.restore(&bytes).expect("same firmware now");
    assert_eq!(x0(&dst, &p, 0, F::PsciVersion, 0, 0, 0), 0x1_0001);
    assert_eq!(x0(&dst, &p, 0, F::SystemOff2_64, 1, 0, 0), u64::MAX);
}

#[test]
fn snapshot_config_refuses_corrupted_bytes() {
    let (src, _p) = fw(1);
    let mut bytes = src.snapshot();
    bytes[12] ^= 1;
    assert!(matches!(
        Firmware::snapshot_config(&bytes),
        Err(SnapshotError::ChecksumMismatch { .. })
    ));
    assert!(matches!(
        Firmware::snapshot_config(&bytes[..5]),
        Err(SnapshotError::Truncated { .. })
    ));
}

#[test]
fn snapshot_keeps_whether_a_suspension_came_from_cpu_default_suspend() {
    let (src, p) = fw(2);
    bring_up(&src, &p, 1);
    assert!(matches!(
        src.handle_call(&call(1, F::CpuDefaultSuspend64, RAM, 0, 0), &p),
        CallOutcome::Suspend { .. }
    ));
    let (dst, p) = fw(2);
    dst.restore(&src.snapshot()).expect("compatible");
    // Only a CPU_DEFAULT_SUSPEND suspension lets the switch to OS-initiated mode through.
    assert_eq!(x0(&dst, &p, 0, F::SetSuspendMode, 1, 0, 0), 0);
}

#[test]
fn restore_never_unfreezes_a_frozen_configuration() {
    let (src, _p) = fw(1);
    let (dst, _p) = fw(1);
    dst.freeze();
    dst.restore(&src.snapshot()).expect("compatible");
    assert!(dst.is_frozen());
    assert_eq!(
        dst.set_config(FirmwareConfig::default()),
        Err(vpsci_firmware::ConfigError::Frozen)
    );
}

#[test]
fn vcpu_states_are_stored_as_the_documented_wire_values() {
    let (src, p) = fw(3);
    assert_eq!(
        x0(&src, &p, 0, F::CpuOn64, Mpidr::from_index(1).raw(), RAM, 0),
        0
    );
    let bytes = src.snapshot();
    let state = |v: usize| bytes[HEADER + v * VCPU_RECORD + 8];
    // ON 2, ON_PENDING 1, OFF 0 (module docs of the snapshot format).
    assert_eq!([state(0), state(1), state(2)], [2, 1, 0]);
}

fn reporting_on_pending() -> FirmwareConfig {
    FirmwareConfig {
        on_pending: OnPending::Reported,
        ..FirmwareConfig::default()
    }
}

/// A format-1 snapshot (before the ON_PENDING option) made from a current one: no
/// ON_PENDING byte in the configuration, version 1.
fn as_format_1(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.remove(FLAGS - 1);
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    reseal(&mut bytes);
    bytes
}

#[test]
fn a_format_1_snapshot_restores_onto_a_vm_that_reports_on_pending() {
    let (src, p) = fw_with(reporting_on_pending(), 3);
    assert_eq!(
        x0(&src, &p, 0, F::CpuOn64, Mpidr::from_index(2).raw(), RAM, 5),
        0
    );
    let old = as_format_1(src.snapshot());
    assert_eq!(
        Firmware::snapshot_config(&old).map(|c| c.on_pending),
        Ok(OnPending::Reported)
    );
    let (dst, _p) = fw_with(reporting_on_pending(), 3);
    dst.restore(&old).expect("format 1 is read");
    assert_eq!(dst.power_state(VcpuId::new(2)), PowerState::OnPending);
    assert_eq!(
        dst.pending_start(VcpuId::new(2)).map(|e| e.context_id),
        Some(5)
    );
}

#[test]
fn a_format_1_snapshot_is_refused_by_a_vm_that_hides_on_pending() {
    let (src, _p) = fw_with(reporting_on_pending(), 2);
    let old = as_format_1(src.snapshot());
    let (dst, _p) = fw(2);
    assert_refused(&dst, &old, |e| {
        matches!(e, SnapshotError::IncompatibleConfig { snapshot, local }
            if snapshot.contains("ON_PENDING reported") && local.contains("ON_PENDING hidden"))
    });
}

#[test]
fn a_snapshot_from_the_other_on_pending_mode_is_refused_as_incompatible() {
    let (src, _p) = fw(2);
    let (dst, _p) = fw_with(reporting_on_pending(), 2);
    assert_refused(&dst, &src.snapshot(), |e| {
        matches!(e, SnapshotError::IncompatibleConfig { .. })
    });
}
