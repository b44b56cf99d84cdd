//! The device tree, parsed back with an independent reader (the `fdt` crate).

use vm_memory::{Bytes, GuestAddress};
use vpsci::fdt::{build, write_to_memory, FdtConfig, FdtError};
use vpsci::layout::GuestLayout;
use vpsci::loader::InitrdRange;
use vpsci_firmware::{Conduit, Mpidr, PsciVersion};

const MIB: u64 = 1 << 20;

fn mpidrs(raw: &[u64]) -> Vec<Mpidr> {
    raw.iter().map(|&m| Mpidr::try_from(m).unwrap()).collect()
}

fn config(cpus: Vec<u64>) -> FdtConfig {
    FdtConfig {
        layout: GuestLayout::new(cpus.len() as u32, 256 * MIB).unwrap(),
        cpus: mpidrs(&cpus),
        psci_version: PsciVersion::V1_3,
        conduit: Conduit::Hvc,
        cmdline: "console=ttyAMA0 panic=-1".to_owned(),
        initrd: None,
        virtio_devices: 0,
        idle_states: Vec::new(),
    }
}

fn prop<'a>(tree: &'a fdt::Fdt<'a>, node: &str, name: &str) -> &'a [u8] {
    tree.find_node(node)
        .unwrap_or_else(|| panic!("no node {node}"))
        .property(name)
        .unwrap_or_else(|| panic!("no property {node}:{name}"))
        .value
}

fn strings(bytes: &[u8]) -> Vec<&str> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| std::str::from_utf8(s).unwrap())
        .collect()
}

fn cells(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

fn u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn psci_node_lists_1_0_and_0_2_for_every_1_x_version() {
    for v in [
        PsciVersion::V1_0,
        PsciVersion::V1_1,
        PsciVersion::V1_2,
        PsciVersion::V1_3,
    ] {
        let blob = build(&FdtConfig {
            psci_version: v,
            ..config(vec![0])
        })
        .unwrap();
        let tree = fdt::Fdt::new(&blob).unwrap();
        assert_eq!(
            strings(prop(&tree, "/psci", "compatible")),
            ["arm,psci-1.0", "arm,psci-0.2"],
            "{v}"
        );
    }
}

#[test]
fn psci_0_2_node_lists_only_0_2_and_no_function_ids() {
    let blob = build(&FdtConfig {
        psci_version: PsciVersion::V0_2,
        ..config(vec![0])
    })
    .unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    assert_eq!(
        strings(prop(&tree, "/psci", "compatible")),
        ["arm,psci-0.2"]
    );
    let psci = tree.find_node("/psci").unwrap();
    for id in ["cpu_on", "cpu_off", "cpu_suspend", "migrate"] {
        assert!(psci.property(id).is_none(), "{id} present");
    }
}

#[test]
fn psci_method_follows_the_conduit() {
    for (conduit, method) in [(Conduit::Hvc, "hvc"), (Conduit::Smc, "smc")] {
        let blob = build(&FdtConfig {
            conduit,
            ..config(vec![0])
        })
        .unwrap();
        let tree = fdt::Fdt::new(&blob).unwrap();
        assert_eq!(strings(prop(&tree, "/psci", "method")), [method]);
    }
}

#[test]
fn one_cpu_node_per_vcpu_with_mpidr_reg_and_psci_enable_method() {
    let mpidrs = vec![0x0, 0x1, 0x100, 0x01_0000_0000];
    let blob = build(&config(mpidrs.clone())).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    let cpus = tree.find_node("/cpus").unwrap();
    let mut regs = Vec::new();
    for cpu in cpus.children() {
        let p = |n: &str| cpu.property(n).unwrap().value;
        assert_eq!(strings(p("device_type")), ["cpu"]);
        assert_eq!(strings(p("compatible")), ["arm,arm-v8"]);
        assert_eq!(strings(p("enable-method")), ["psci"]);
        let reg = u64s(p("reg"));
        assert_eq!(cpu.name, format!("cpu@{:x}", reg[0]));
        regs.extend(reg);
    }
    assert_eq!(regs, mpidrs);
    assert_eq!(cells(prop(&tree, "/cpus", "#address-cells")), [2]);
    assert_eq!(cells(prop(&tree, "/cpus", "#size-cells")), [0]);
}

#[test]
fn memory_node_covers_ram() {
    let blob = build(&config(vec![0])).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    assert_eq!(
        u64s(prop(&tree, "/memory@40000000", "reg")),
        [0x4000_0000, 256 * MIB]
    );
    assert_eq!(
        strings(prop(&tree, "/memory@40000000", "device_type")),
        ["memory"]
    );
    assert_eq!(
        strings(prop(&tree, "/", "compatible")),
        ["linux,dummy-virt"]
    );
}

#[test]
fn chosen_has_bootargs_stdout_and_initrd_range() {
    let blob = build(&FdtConfig {
        initrd: Some(InitrdRange {
            start: GuestAddress(0x4800_0000),
            size: 0x1234,
        }),
        ..config(vec![0])
    })
    .unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    assert_eq!(
        strings(prop(&tree, "/chosen", "bootargs")),
        ["console=ttyAMA0 panic=-1"]
    );
    let stdout = strings(prop(&tree, "/chosen", "stdout-path"))[0];
    assert_eq!(stdout, "/pl011@9000000");
    assert!(tree.find_node(stdout).is_some(), "stdout-path dangles");
    assert_eq!(
        u64s(prop(&tree, "/chosen", "linux,initrd-start")),
        [0x4800_0000]
    );
    assert_eq!(
        u64s(prop(&tree, "/chosen", "linux,initrd-end")),
        [0x4800_1234]
    );
}

#[test]
fn chosen_has_no_initrd_properties_without_an_initrd() {
    let blob = build(&config(vec![0])).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    let chosen = tree.find_node("/chosen").unwrap();
    assert!(chosen.property("linux,initrd-start").is_none());
    assert!(chosen.property("linux,initrd-end").is_none());
}

#[test]
fn gic_timer_and_uart_describe_the_layout() {
    let blob = build(&config(vec![0, 1])).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    let gic = "/intc@8000000";
    assert_eq!(strings(prop(&tree, gic, "compatible")), ["arm,gic-v3"]);
    assert_eq!(cells(prop(&tree, gic, "#interrupt-cells")), [3]);
    assert!(tree
        .find_node(gic)
        .unwrap()
        .property("interrupt-controller")
        .is_some());
    assert_eq!(
        u64s(prop(&tree, gic, "reg")),
        [0x0800_0000, 0x1_0000, 0x080A_0000, 2 * 0x2_0000]
    );
    let phandle = cells(prop(&tree, gic, "phandle"));
    assert_eq!(cells(prop(&tree, "/", "interrupt-parent")), phandle);

    assert_eq!(
        strings(prop(&tree, "/timer", "compatible")),
        ["arm,armv8-timer"]
    );
    assert_eq!(
        cells(prop(&tree, "/timer", "interrupts")),
        [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
    );
    assert!(tree
        .find_node("/timer")
        .unwrap()
        .property("always-on")
        .is_some());

    let uart = "/pl011@9000000";
    assert_eq!(
        strings(prop(&tree, uart, "compatible")),
        ["arm,pl011", "arm,primecell"]
    );
    assert_eq!(u64s(prop(&tree, uart, "reg")), [0x0900_0000, 0x1000]);
    assert_eq!(cells(prop(&tree, uart, "interrupts")), [0, 1, 4]);
    assert_eq!(
        strings(prop(&tree, uart, "clock-names")),
        ["uartclk", "apb_pclk"]
    );
    let clk = cells(prop(&tree, "/apb-pclk", "phandle"));
    assert_eq!(cells(prop(&tree, uart, "clocks")), [clk[0], clk[0]]);
    assert_eq!(
        strings(prop(&tree, "/apb-pclk", "compatible")),
        ["fixed-clock"]
    );
}

#[test]
fn rtc_is_a_pl031_primecell_on_spi_2_marked_as_a_wakeup_source() {
    let blob = build(&config(vec![0])).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    let rtc = "/pl031@9010000";
    assert_eq!(
        strings(prop(&tree, rtc, "compatible")),
        ["arm,pl031", "arm,primecell"]
    );
    assert_eq!(u64s(prop(&tree, rtc, "reg")), [0x0901_0000, 0x1000]);
    assert_eq!(cells(prop(&tree, rtc, "interrupts")), [0, 2, 4]);
    let clk = cells(prop(&tree, "/apb-pclk", "phandle"));
    assert_eq!(cells(prop(&tree, rtc, "clocks")), clk);
    assert_eq!(strings(prop(&tree, rtc, "clock-names")), ["apb_pclk"]);
    assert!(tree
        .find_node(rtc)
        .unwrap()
        .property("wakeup-source")
        .is_some());
}

#[test]
fn each_virtio_device_gets_a_virtio_mmio_node_with_its_own_spi() {
    let none = build(&config(vec![0])).unwrap();
    let tree = fdt::Fdt::new(&none).unwrap();
    assert!(tree.find_node("/virtio_mmio@e000000").is_none());
    let blob = build(&FdtConfig {
        virtio_devices: 2,
        ..config(vec![0])
    })
    .unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    for (node, base, spi) in [
        ("/virtio_mmio@e000000", 0x0E00_0000u64, 16u32),
        ("/virtio_mmio@e000200", 0x0E00_0200, 17),
    ] {
        assert_eq!(strings(prop(&tree, node, "compatible")), ["virtio,mmio"]);
        assert_eq!(u64s(prop(&tree, node, "reg")), [base, 0x200]);
        assert_eq!(cells(prop(&tree, node, "interrupts")), [0, spi, 4]);
    }
    assert!(tree.find_node("/virtio_mmio@e000400").is_none());
}

#[test]
fn many_cpus_get_a_second_redistributor_region() {
    let mpidrs: Vec<u64> = (0..200u64).map(|i| ((i / 16) << 8) | (i % 16)).collect();
    let blob = build(&config(mpidrs)).unwrap();
    let tree = fdt::Fdt::new(&blob).unwrap();
    let gic = "/intc@8000000";
    assert_eq!(cells(prop(&tree, gic, "#redistributor-regions")), [2]);
    assert_eq!(
        u64s(prop(&tree, gic, "reg")),
        [
            0x0800_0000,
            0x1_0000,
            0x080A_0000,
            123 * 0x2_0000,
            0x0A00_0000,
            77 * 0x2_0000
        ]
    );
    assert_eq!(tree.find_node("/cpus").unwrap().children().count(), 200);
}

#[test]
fn inconsistent_cpu_lists_are_rejected() {
    let mut c = config(vec![0, 1]);
    c.cpus = mpidrs(&[0]);
    assert!(matches!(
        build(&c),
        Err(FdtError::CpuCountMismatch {
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        build(&config(vec![0, 0])),
        Err(FdtError::DuplicateMpidr { mpidr }) if mpidr.raw() == 0
    ));
    // An MPIDR with non-affinity bits cannot even be built (`Mpidr::try_from`).
}

#[test]
fn blob_is_written_at_the_layout_fdt_address() {
    let c = config(vec![0]);
    let mem = c.layout.create_memory().unwrap();
    let blob = build(&c).unwrap();
    let addr = write_to_memory(&mem, &c.layout, &blob).unwrap();
    assert_eq!(addr, c.layout.fdt_addr());
    let mut back = vec![0; blob.len()];
    mem.read_slice(&mut back, addr).unwrap();
    assert_eq!(back, blob);
    assert_eq!(&back[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
}
