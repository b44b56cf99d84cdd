//! The self-test proper, on arm64 Linux KVM.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::OpenOptions;

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{
    kvm_device_attr, kvm_smccc_filter, kvm_smccc_filter_action_KVM_SMCCC_FILTER_FWD_TO_USER,
    kvm_userspace_memory_region, kvm_vcpu_init, KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VM_SMCCC_CTRL,
    KVM_ARM_VM_SMCCC_FILTER, KVM_CAP_ARM_PSCI_0_2, KVM_CAP_ARM_SYSTEM_SUSPEND,
    KVM_HYPERCALL_EXIT_SMC, KVM_REG_ARM64, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Guest physical address of the guest's RAM (the `virt` layout vpsci keeps).
const RAM_BASE: u64 = 0x4000_0000;
/// RAM size; also the host buffer's alignment, a multiple of every arm64 page size.
const RAM_SIZE: usize = 0x1_0000;

/// PSCI function ids (DEN0022 F.b, table 5.1 / section 5.1).
const PSCI_VERSION: u32 = 0x8400_0000;
const SYSTEM_OFF: u32 = 0x8400_0008;
/// The PSCI SMC32 and SMC64 ranges forwarded to userspace: 0x8400_0000..=0x8400_001F and
/// 0xC400_0000..=0xC400_001F.
const PSCI_RANGES: [(u32, u32); 2] = [(0x8400_0000, 0x20), (0xC400_0000, 0x20)];

/// What this program answers to PSCI_VERSION: 1.3, encoded major << 16 | minor.
const ANSWERED_VERSION: u64 = 0x0001_0003;

/// The guest, hand-encoded A64 (little-endian words):
const GUEST: [u32; 7] = [
    0x52B0_8000, // movz w0, #0x8400, lsl #16   ; w0 = PSCI_VERSION
    0xD400_0002, // hvc  #0
    0xAA00_03F3, // mov  x19, x0                 ; keep the answer
    0x52B0_8000, // movz w0, #0x8400, lsl #16
    0x7280_0100, // movk w0, #0x8                ; w0 = SYSTEM_OFF
    0xD400_0003, // smc  #0
    0x1400_0000, // b    .                       ; SYSTEM_OFF must not return
];

/// Core register ids for KVM_{GET,SET}_ONE_REG: `KVM_REG_ARM_CORE` plus the offset, in
/// 32-bit words, of the field in `struct kvm_regs` (`regs.regs[n]` at 8 * n, `regs.pc` at
/// 8 * 32).
fn core_reg(byte_offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (byte_offset / 4)
}

fn x_reg(n: u64) -> u64 {
    core_reg(8 * n)
}

fn pc_reg() -> u64 {
    core_reg(8 * 32)
}

/// Page-aligned zeroed host memory that backs guest RAM; freed on drop (after the VM fd,
/// which is declared later in `run` and so dropped earlier).
struct GuestRam {
    ptr: *mut u8,
    layout: Layout,
}

impl GuestRam {
    fn new() -> Result<GuestRam> {
        let layout = Layout::from_size_align(RAM_SIZE, RAM_SIZE)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        ensure!(
            !ptr.is_null(),
            "could not allocate {RAM_SIZE} bytes of guest RAM"
        );
        Ok(GuestRam { ptr, layout })
    }

    fn load(&mut self, words: &[u32]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert!(bytes.len() <= RAM_SIZE, "guest program larger than RAM");
        // SAFETY: `ptr` is valid for RAM_SIZE bytes and `bytes` fits (checked above); the
        // regions cannot overlap (fresh Vec).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, bytes.len()) };
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn step(text: &str) {
    println!("harness-selftest: {text}");
}

/// Runs every check; the first failure is the error.
pub fn run() -> Result<()> {
    // Open explicitly first so a missing device gets its own message.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("cannot open /dev/kvm: this machine has no usable KVM")?;
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    step(&format!(
        "/dev/kvm open, KVM API version {}",
        kvm.get_api_version()
    ));

    let psci = kvm.check_extension_raw(KVM_CAP_ARM_PSCI_0_2.into());
    ensure!(psci > 0, "KVM_CAP_ARM_PSCI_0_2 is not offered");
    step("KVM_CAP_ARM_PSCI_0_2: yes");
    let suspend = kvm.check_extension_raw(KVM_CAP_ARM_SYSTEM_SUSPEND.into());
    ensure!(suspend > 0, "KVM_CAP_ARM_SYSTEM_SUSPEND is not offered");
    step("KVM_CAP_ARM_SYSTEM_SUSPEND: yes");

    let mut ram = GuestRam::new()?;
    ram.load(&GUEST);
    let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
    let filter_attr = kvm_device_attr {
        group: KVM_ARM_VM_SMCCC_CTRL,
        attr: u64::from(KVM_ARM_VM_SMCCC_FILTER),
        ..Default::default()
    };
    vm.has_device_attr(&filter_attr)
        .context("the VM has no KVM_ARM_VM_SMCCC_FILTER attribute (Linux 6.4+ needed)")?;
    step("KVM_ARM_VM_SMCCC_FILTER attribute: yes");

    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM_BASE,
        memory_size: RAM_SIZE as u64,
        userspace_addr: ram.ptr as u64,
    };
    // SAFETY: `ram` stays allocated, and is not otherwise written, while the VM exists:
    // it is declared before `vm` and so dropped after it.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION failed")?;
    step(&format!(
        "VM created, {} KiB RAM at {RAM_BASE:#x}",
        RAM_SIZE / 1024
    ));

    forward_psci_to_userspace(&vm)?;
    let mut vcpu = create_vcpu(&vm)?;
    step("vCPU 0 created (PSCI 0.2+ enabled), entry at RAM base");

    let version_call = run_until_hypercall(&mut vcpu)?;
    ensure!(
        version_call.function == PSCI_VERSION && !version_call.smc,
        "first exit: expected PSCI_VERSION over HVC, got {version_call}"
    );
    step(&format!(
        "forwarded exit 1: KVM_EXIT_HYPERCALL {version_call} = PSCI_VERSION; answering {ANSWERED_VERSION:#x}"
    ));
    set_reg(&vcpu, x_reg(0), ANSWERED_VERSION)?;

    let off_call = run_until_hypercall(&mut vcpu)?;
    ensure!(
        off_call.function == SYSTEM_OFF && off_call.smc,
        "second exit: expected SYSTEM_OFF over SMC, got {off_call}"
    );
    let seen = get_reg(&vcpu, x_reg(19))?;
    step(&format!(
        "forwarded exit 2: KVM_EXIT_HYPERCALL {off_call} = SYSTEM_OFF; guest kept PSCI_VERSION = {seen:#x}"
    ));
    ensure!(
        seen == ANSWERED_VERSION,
        "the guest saw PSCI_VERSION {seen:#x}, not the {ANSWERED_VERSION:#x} userspace answered"
    );
    step("both PSCI calls were forwarded to userspace and the answer reached the guest");
    Ok(())
}

fn forward_psci_to_userspace(vm: &VmFd) -> Result<()> {
    for (base, count) in PSCI_RANGES {
        let filter = kvm_smccc_filter {
            base,
            nr_functions: count,
            action: kvm_smccc_filter_action_KVM_SMCCC_FILTER_FWD_TO_USER as u8,
            pad: [0; 15],
        };
        let attr = kvm_device_attr {
            group: KVM_ARM_VM_SMCCC_CTRL,
            attr: u64::from(KVM_ARM_VM_SMCCC_FILTER),
            addr: &filter as *const kvm_smccc_filter as u64,
            flags: 0,
        };
        vm.set_device_attr(&attr).with_context(|| {
            format!("installing the SMCCC filter for {base:#x}+{count:#x} failed")
        })?;
        step(&format!(
            "SMCCC filter: {base:#010x}..={:#010x} -> forward to userspace",
            base + count - 1
        ));
    }
    Ok(())
}

fn create_vcpu(vm: &VmFd) -> Result<VcpuFd> {
    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .context("KVM_ARM_PREFERRED_TARGET failed")?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&init).context("KVM_ARM_VCPU_INIT failed")?;
    set_reg(&vcpu, pc_reg(), RAM_BASE)?;
    Ok(vcpu)
}

/// A forwarded SMCCC call as KVM reported it.
struct Forwarded {
    function: u32,
    smc: bool,
    args: [u64; 3],
}

impl std::fmt::Display for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nr={:#010x} conduit={} x1..x3=[{:#x}, {:#x}, {:#x}]",
            self.function,
            if self.smc { "SMC" } else { "HVC" },
            self.args[0],
            self.args[1],
            self.args[2]
        )
    }
}

/// Runs the vCPU until its next `KVM_EXIT_HYPERCALL`; any other exit is a failure.
fn run_until_hypercall(vcpu: &mut VcpuFd) -> Result<Forwarded> {
    let (nr, flags) = match vcpu.run().context("KVM_RUN failed")? {
        VcpuExit::Hypercall(exit) => (exit.nr, u64::from(exit.longmode)),
        other => bail!("expected KVM_EXIT_HYPERCALL, got {other:?}"),
    };
    let function = u32::try_from(nr).context("hypercall.nr does not fit a function id")?;
    let args = [
        get_reg(vcpu, x_reg(1))?,
        get_reg(vcpu, x_reg(2))?,
        get_reg(vcpu, x_reg(3))?,
    ];
    let x0 = get_reg(vcpu, x_reg(0))?;
    ensure!(
        x0 & 0xFFFF_FFFF == nr,
        "hypercall.nr {nr:#x} differs from the guest's w0 {x0:#x}"
    );
    Ok(Forwarded {
        function,
        smc: flags & u64::from(KVM_HYPERCALL_EXIT_SMC) != 0,
        args,
    })
}

fn get_reg(vcpu: &VcpuFd, id: u64) -> Result<u64> {
    let mut bytes = [0u8; 8];
    vcpu.get_one_reg(id, &mut bytes)
        .with_context(|| format!("KVM_GET_ONE_REG {id:#x} failed"))?;
    Ok(u64::from_le_bytes(bytes))
}

fn set_reg(vcpu: &VcpuFd, id: u64, value: u64) -> Result<()> {
    vcpu.set_one_reg(id, &value.to_le_bytes())
        .with_context(|| format!("KVM_SET_ONE_REG {id:#x} failed"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kvm_regs_layout() {
        // x0 is word 0 of struct kvm_regs, pc word 64 (documented KVM ABI values).
        assert_eq!(x_reg(0), 0x6030_0000_0010_0000);
        assert_eq!(x_reg(19), 0x6030_0000_0010_0026);
        assert_eq!(pc_reg(), 0x6030_0000_0010_0040);
    }
}
