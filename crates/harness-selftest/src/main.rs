//! Harness self-test: proves that the machine it runs on offers real arm64 KVM with the
//! features vpsci relies on, and that PSCI calls reach userspace through the SMCCC filter.
//!
//! Steps, each printed as it passes: open `/dev/kvm`; check `KVM_CAP_ARM_PSCI_0_2`,
//! `KVM_CAP_ARM_SYSTEM_SUSPEND` and the VM attribute `KVM_ARM_VM_SMCCC_FILTER`; create a VM
//! with 64 KiB of RAM and one vCPU; forward the PSCI function ranges (SMC32 and SMC64,
//! DEN0022 section 5.1) to userspace; run a guest of a few hand-encoded A64 instructions that
//! calls PSCI_VERSION with `hvc #0`, keeps the answer, and calls SYSTEM_OFF with `smc #0`;
//! assert both arrive as `KVM_EXIT_HYPERCALL` with the right function id and conduit flag,
//! and that the guest received the version this program answered (not KVM's own).
//!
//! On other architectures it only says that it needs arm64, and exits non-zero.

#[cfg(target_arch = "aarch64")]
mod arm64;

#[cfg(target_arch = "aarch64")]
fn main() -> std::process::ExitCode {
    match arm64::run() {
        Ok(()) => {
            println!("harness-selftest: PASS");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            println!("harness-selftest: FAIL: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn main() -> std::process::ExitCode {
    eprintln!(
        "harness-selftest: needs an arm64 host with /dev/kvm; run it with \
         `cargo run -p vpsci-harness-selftest --target aarch64-unknown-linux-musl` \
         (nested VM) or `cargo xtask test`"
    );
    std::process::ExitCode::from(2)
}
