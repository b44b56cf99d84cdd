//! Helpers shared by the firmware integration tests.
#![allow(dead_code)]

use vpsci_firmware::testing::{self, FakePlatform};
use vpsci_firmware::{CallOutcome, Firmware, FirmwareConfig, FunctionId, GuestCall, PsciError};

pub const RAM: u64 = 0x4000_0000;
pub const RAM_END: u64 = 0x4100_0000;

pub fn fw(cpus: u32) -> (Firmware, FakePlatform) {
    fw_with(FirmwareConfig::default(), cpus)
}

pub fn fw_with(config: FirmwareConfig, cpus: u32) -> (Firmware, FakePlatform) {
    testing::firmware(config, cpus).expect("test configuration is valid")
}

pub fn call(vcpu: u32, fid: FunctionId, x1: u64, x2: u64, x3: u64) -> GuestCall {
    testing::call(vcpu, [u64::from(fid.raw()), x1, x2, x3])
}

/// Makes the call and returns x0..x3 of a `Return` outcome (panics on other outcomes).
pub fn regs(
    fw: &Firmware,
    p: &FakePlatform,
    vcpu: u32,
    fid: FunctionId,
    x1: u64,
    x2: u64,
    x3: u64,
) -> [u64; 4] {
    match fw.handle_call(&call(vcpu, fid, x1, x2, x3), p) {
        CallOutcome::Return { regs } => regs,
        other => panic!("{fid} returned {other:?}, expected a register return"),
    }
}

/// x0 of a `Return` outcome.
pub fn x0(
    fw: &Firmware,
    p: &FakePlatform,
    vcpu: u32,
    fid: FunctionId,
    x1: u64,
    x2: u64,
    x3: u64,
) -> u64 {
    regs(fw, p, vcpu, fid, x1, x2, x3)[0]
}

pub fn err(e: PsciError) -> u64 {
    e.to_register()
}

/// CPU_ON of `target` by vCPU 0 followed by the target's start.
pub fn bring_up(fw: &Firmware, p: &FakePlatform, target: u32) {
    let mpidr = vpsci_firmware::Mpidr::from_index(target).raw();
    assert_eq!(x0(fw, p, 0, FunctionId::CpuOn64, mpidr, RAM, 0), 0);
    fw.vcpu_started(vpsci_firmware::VcpuId::new(target), p);
}
