//! PSCI idle states in the device tree (`/cpus/idle-states`, `cpu-idle-states`),
//! parsed back with an independent reader (the `fdt` crate).

use vpsci::fdt::{build, FdtConfig, IdleState};
use vpsci::layout::GuestLayout;
use vpsci_firmware::{
    encode_power_state, Conduit, CpuPowerState, FirmwareConfig, Mpidr, PsciVersion,
};

fn config(cpus: u32, idle_states: Vec<IdleState>) -> FdtConfig {
    FdtConfig {
        layout: GuestLayout::new(cpus, 256 << 20).unwrap(),
        cpus: (0..cpus).map(Mpidr::from_index).collect(),
        psci_version: PsciVersion::V1_3,
        conduit: Conduit::Hvc,
        cmdline: String::new(),
        initrd: None,
        virtio_devices: 0,
        idle_states,
    }
}

fn cells(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

fn string(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap().trim_end_matches('\0')
}

#[test]
fn standby_state_is_offered_to_every_cpu_with_the_firmwares_power_state() {
    let firmware = FirmwareConfig::default();
    let blob = build(&config(4, vec![IdleState::psci_standby(&firmware)])).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();

    let states = tree.find_node("/cpus/idle-states").expect("no idle-states");
    assert_eq!(
        string(states.property("entry-method").unwrap().value),
        "psci"
    );
    let standby = tree
        .find_node("/cpus/idle-states/cpu-standby")
        .expect("no cpu-standby state");
    let u32_prop = |name: &str| cells(standby.property(name).unwrap().value);
    assert_eq!(
        string(standby.property("compatible").unwrap().value),
        "arm,idle-state"
    );
    assert_eq!(
        u32_prop("arm,psci-suspend-param"),
        [encode_power_state(&firmware, CpuPowerState::Standby)]
    );
    for name in ["entry-latency-us", "exit-latency-us", "min-residency-us"] {
        assert_eq!(u32_prop(name).len(), 1, "{name}");
    }
    let phandle = u32_prop("phandle")[0];

    let cpus: Vec<_> = tree
        .find_node("/cpus")
        .unwrap()
        .children()
        .filter(|n| n.name.starts_with("cpu@"))
        .collect();
    assert_eq!(cpus.len(), 4);
    for cpu in cpus {
        assert_eq!(
            cells(cpu.property("cpu-idle-states").unwrap().value),
            [phandle],
            "{}",
            cpu.name
        );
    }
}

#[test]
fn without_idle_states_the_cpus_only_know_wfi() {
    let blob = build(&config(2, Vec::new())).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    assert!(tree.find_node("/cpus/idle-states").is_none());
    for cpu in tree.find_node("/cpus").unwrap().children() {
        assert!(cpu.property("cpu-idle-states").is_none(), "{}", cpu.name);
    }
}
