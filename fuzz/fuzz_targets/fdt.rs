//! The device tree builder's inputs come from the command line (vCPU count, RAM size, kernel
//! command line, initrd placement, virtio devices, CPU idle states) and the firmware configuration: any of them must
//! give a blob that parses back (header, CPU nodes, command line) or a typed error, never a panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vpsci::fdt::{self, FdtConfig, IdleState};
use vpsci::layout::GuestLayout;
use vpsci::loader::InitrdRange;
use vpsci_firmware::{Conduit, Mpidr, PsciVersion};

#[derive(Arbitrary, Debug)]
struct Input {
    cpus: u8,
    ram_mib: u16,
    mpidrs: Vec<u64>,
    use_index_mpidrs: bool,
    version: u8,
    smc: bool,
    cmdline: String,
    initrd: Option<(u64, u64)>,
    virtio_devices: u8,
    /// (psci-suspend-param, entry, exit, residency) of up to four idle states.
    idle_states: Vec<(u32, u32, u32, u32)>,
}

fuzz_target!(|input: Input| {
    let cpus = u32::from(input.cpus % 65);
    let Ok(layout) = GuestLayout::new(cpus, u64::from(input.ram_mib) << 20) else {
        return;
    };
    let mpidrs: Vec<Mpidr> = if input.use_index_mpidrs {
        (0..cpus).map(Mpidr::from_index).collect()
    } else {
        input
            .mpidrs
            .iter()
            .filter_map(|&m| Mpidr::try_from(m).ok())
            .collect()
    };
    let config = FdtConfig {
        layout,
        cpus: mpidrs,
        psci_version: PsciVersion::ALL[usize::from(input.version) % PsciVersion::ALL.len()],
        conduit: if input.smc {
            Conduit::Smc
        } else {
            Conduit::Hvc
        },
        cmdline: input.cmdline,
        // The loader only places an initrd inside RAM, so its end never overflows.
        initrd: input
            .initrd
            .filter(|(start, size)| start.checked_add(*size).is_some())
            .map(|(start, size)| InitrdRange {
                start: GuestAddress(start),
                size,
            }),
        virtio_devices: usize::from(input.virtio_devices),
        idle_states: input
            .idle_states
            .iter()
            .take(4)
            .enumerate()
            .map(|(i, &(param, entry, exit, residency))| IdleState {
                name: format!("cpu-idle-{i}"),
                psci_suspend_param: param,
                entry_latency_us: entry,
                exit_latency_us: exit,
                min_residency_us: residency,
            })
            .collect(),
    };
    let Ok(blob) = fdt::build(&config) else {
        return;
    };
    assert_eq!(&blob[..4], &[0xd0, 0x0d, 0xfe, 0xed], "not a device tree");
    let total = u32::from_be_bytes([blob[4], blob[5], blob[6], blob[7]]) as usize;
    assert_eq!(total, blob.len(), "header size disagrees with the blob");
    let parsed = match ::fdt::Fdt::new(&blob) {
        Ok(parsed) => parsed,
        Err(e) => panic!("the blob does not parse back: {e:?}"),
    };
    assert_eq!(parsed.cpus().count(), config.cpus.len(), "CPU nodes");
    assert_eq!(
        parsed.find_node("/cpus/idle-states").is_some(),
        !config.idle_states.is_empty(),
        "idle-states node"
    );
    if !config.cmdline.contains('\0') {
        assert_eq!(
            parsed.chosen().bootargs(),
            Some(config.cmdline.as_str()),
            "bootargs"
        );
    }
});
