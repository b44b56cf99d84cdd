//! The hypervisor-independent boot assembly end to end: command line ->
//! layout -> guest memory -> image + initrd -> device tree in guest memory,
//! then the tree is read back out of guest memory and checked against what
//! was loaded.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress};
use vpsci::cli::{parse_from, Action};
use vpsci::fdt::{build, write_to_memory, FdtConfig};
use vpsci::loader::{load_image, load_initrd};

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap())
}

#[test]
fn command_line_to_device_tree_in_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("guest.bin");
    let initrd_path = dir.path().join("initrd.img");
    std::fs::File::create(&image_path)
        .unwrap()
        .write_all(&[0xAB; 4096])
        .unwrap();
    std::fs::File::create(&initrd_path)
        .unwrap()
        .write_all(&[0xCD; 5000])
        .unwrap();

    let args = [
        "vpsci",
        "run",
        "--image",
        image_path.to_str().unwrap(),
        "--initrd",
        initrd_path.to_str().unwrap(),
        "--cpus",
        "3",
        "--memory",
        "128M",
        "--psci-version",
        "1.1",
        "--conduit",
        "smc",
        "--cmdline",
        "root=/dev/ram0",
    ];
    let Action::Run(config) = parse_from(args).unwrap() else {
        panic!("expected a run configuration");
    };
    let layout = config.layout;
    let mem = layout.create_memory().unwrap();
    let image = load_image(&mem, &layout, &config.image).unwrap();
    let initrd = load_initrd(&mem, &layout, config.initrd.as_deref().unwrap(), image.end).unwrap();
    let blob = build(&FdtConfig {
        layout,
        cpus: (0..3).map(vpsci_firmware::Mpidr::from_index).collect(),
        psci_version: config.psci_version,
        conduit: config.conduit,
        cmdline: config.cmdline.clone(),
        initrd: Some(initrd),
        virtio_devices: 0,
        idle_states: Vec::new(),
    })
    .unwrap();
    let fdt_addr = write_to_memory(&mem, &layout, &blob).unwrap();

    // Read the tree back from guest memory, as the guest would.
    let mut back = vec![0u8; blob.len()];
    mem.read_slice(&mut back, fdt_addr).unwrap();
    let tree = fdt::Fdt::new(&back).unwrap();
    let chosen = tree.find_node("/chosen").unwrap();
    let start = be_u64(chosen.property("linux,initrd-start").unwrap().value);
    let end = be_u64(chosen.property("linux,initrd-end").unwrap().value);
    assert_eq!(end - start, 5000);
    let mut initrd_bytes = vec![0u8; 5000];
    mem.read_slice(&mut initrd_bytes, GuestAddress(start))
        .unwrap();
    assert!(initrd_bytes.iter().all(|&b| b == 0xCD));
    assert!(start >= image.end.0 && end <= fdt_addr.0);
    assert_eq!(
        chosen.property("bootargs").unwrap().as_str(),
        Some("root=/dev/ram0")
    );
    assert_eq!(
        tree.find_node("/psci")
            .unwrap()
            .property("method")
            .unwrap()
            .as_str(),
        Some("smc")
    );
    assert_eq!(tree.find_node("/cpus").unwrap().children().count(), 3);
    assert_eq!(
        tree.find_node("/memory@40000000")
            .unwrap()
            .reg()
            .unwrap()
            .next()
            .unwrap()
            .size,
        Some(128 << 20)
    );
    let mut entry_bytes = [0u8; 4];
    mem.read_slice(&mut entry_bytes, image.entry).unwrap();
    assert_eq!(entry_bytes, [0xAB; 4]);
}
