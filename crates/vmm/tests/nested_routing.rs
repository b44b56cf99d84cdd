//! The per-VM routing table on real arm64 KVM (nested harness): a call
//! handed back to the kernel never reaches vpsci, everything else still does.
#![cfg(target_arch = "aarch64")]

mod nested_common;

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nested_common::*;
use vpsci::cli::ResetAction;
use vpsci::events::{Event, EventSink};
use vpsci::run::{run_session, Session, EXIT_POWERED_OFF};
use vpsci::vm::{ImageSource, VmOptions};
use vpsci_firmware::{encode_power_state, CpuPowerState};
use vpsci_firmware::{Conduit, FirmwareConfig, PsciVersion};
use vpsci_kvm::{KvmHost, SmcccRouting};

#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

impl EventSink for Calls {
    fn enabled(&self) -> bool {
        true
    }
    fn record(&self, event: &Event<'_>) {
        if let Event::PsciCall { function, .. } = event {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((*function).to_owned());
        }
    }
}

#[test]
fn cpu_suspend_kept_in_the_kernel_never_reaches_vpsci() {
    let standby = u64::from(encode_power_state(
        &FirmwareConfig::default(),
        CpuPowerState::Standby,
    ));
    let mut a = Asm::new(ENTRY, Conduit::Hvc);
    a.arm_timer_wakeup(0x4_0000)
        .smccc(CPU_SUSPEND, [standby, 0, 0])
        .store_at(0, RESULTS)
        .smccc(PSCI_VERSION, [0; 3])
        .store_at(0, RESULTS + 8)
        .smccc(SYSTEM_OFF, [0; 3])
        .spin();
    let routing = match SmcccRouting::userspace_psci().keep_in_kernel(CPU_SUSPEND) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let host = KvmHost::open().unwrap_or_else(|e| panic!("{e}"));
    let layout = vpsci::layout::GuestLayout::new(1, 64 << 20).unwrap_or_else(|e| panic!("{e}"));
    let memory = layout.create_memory().unwrap_or_else(|e| panic!("{e}"));
    let calls = Arc::new(Calls::default());
    let session = Session {
        vm: VmOptions {
            layout,
            image: ImageSource::Bytes(a.bytes()),
            initrd: None,
            cmdline: String::new(),
            firmware: FirmwareConfig {
                psci_version: PsciVersion::V1_3,
                conduit: Conduit::Hvc,
                ..FirmwareConfig::default()
            },
            routing,
            devices: Default::default(),
            idle_states: Vec::new(),
        },
        on_reset: ResetAction::Exit,
        on_hibernate: vpsci::cli::HibernateAction::PowerOff,
        timeout: Some(Duration::from_secs(30)),
        empty_handler: false,
        console: Arc::new(|| Box::new(std::io::sink()) as Box<dyn Write + Send>),
        events: calls.clone(),
    };
    let outcome = run_session(&host, &session, &memory);
    assert_eq!(outcome.status, EXIT_POWERED_OFF, "{}", outcome.message);
    let seen = calls
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(seen, ["PSCI_VERSION", "SYSTEM_OFF"], "calls vpsci saw");
    use vm_memory::Bytes;
    let read = |addr| {
        memory
            .read_obj::<u64>(vm_memory::GuestAddress(addr))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(read(RESULTS), SUCCESS, "KVM's CPU_SUSPEND");
    assert_eq!(read(RESULTS + 8), 0x1_0003, "vpsci's PSCI_VERSION");
}
