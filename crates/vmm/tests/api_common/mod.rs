//! What the native API tests share (`api`, `api_migrating`): the real `LiveVm` and
//! `ApiServer` over a VM without KVM (a real `VmControl` and engine, a fake wake-up
//! device, vCPUs that are never in the guest), reached through the real socket.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vpsci::api::client::{Client, ClientError};
use vpsci::api::hub::EventHub;
use vpsci::api::live::{LiveVm, RunningVm, WakeDevice};
use vpsci::api::server::ApiServer;
use vpsci::api::types::{ErrorKind, RunState};
use vpsci::api::VmApi;
use vpsci::cli::HibernateAction;
use vpsci::devices::pl031::AlarmMasked;
use vpsci::events::EventSink;
use vpsci::vcpu::{CallCounts, Kick, VmControl, VmPlatform};
use vpsci_firmware::{Conduit, Firmware, FirmwareConfig, GuestCall, MemoryRegion, Mpidr, VcpuId};

pub const RAM: u64 = 0x4000_0000;

pub struct NoKick;
impl Kick for NoKick {
    fn kick(&self) {}
}

/// A wake-up device that records raises and can be masked.
#[derive(Default)]
pub struct FakeWake {
    pub masked: AtomicBool,
    pub raised: AtomicUsize,
}

impl WakeDevice for FakeWake {
    fn name(&self) -> &'static str {
        "pl031"
    }
    fn raise(&self) -> Result<(), AlarmMasked> {
        if self.masked.load(Ordering::SeqCst) {
            return Err(AlarmMasked);
        }
        self.raised.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub live: Arc<LiveVm>,
    pub control: Arc<VmControl>,
    pub fw: Arc<Firmware>,
    pub platform: Arc<VmPlatform>,
    pub wake: Arc<FakeWake>,
    pub log: PathBuf,
    pub server: Option<ApiServer>,
}

impl Setup {
    pub fn new(cpus: u32) -> Setup {
        Setup::with_control(VmControl::new(
            (0..cpus)
                .map(|_| Box::new(NoKick) as Box<dyn Kick>)
                .collect(),
        ))
    }

    pub fn with_control(control: VmControl) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let log = dir.path().join("events.jsonl");
        let hub = Arc::new(EventHub::new(Some(&log), Instant::now()).expect("event log"));
        let calls = Arc::new(CallCounts::default());
        let control = Arc::new(control);
        let cpus = 2;
        let fw = Arc::new(
            Firmware::new(
                FirmwareConfig::default(),
                (0..cpus).map(Mpidr::from_index).collect(),
                vec![MemoryRegion {
                    base: RAM,
                    size: 0x100_0000,
                }],
            )
            .expect("firmware"),
        );
        fw.freeze();
        let platform = Arc::new(
            VmPlatform::new(
                Arc::clone(&control),
                Arc::clone(&hub) as Arc<dyn EventSink>,
                HibernateAction::PowerOff,
            )
            .with_call_counts(Arc::clone(&calls)),
        );
        let live = Arc::new(LiveVm::new(hub, calls, FirmwareConfig::default()));
        let wake = Arc::new(FakeWake::default());
        live.attach(RunningVm {
            control: Arc::clone(&control),
            engine: Some(Arc::clone(&fw)),
            wake: Some(Arc::clone(&wake) as Arc<dyn WakeDevice>),
            mpidrs: (0..cpus).map(Mpidr::from_index).collect(),
        });
        let server = ApiServer::start(&path, Arc::clone(&live) as Arc<dyn VmApi>).expect("server");
        Setup {
            _dir: dir,
            path,
            live,
            control,
            fw,
            platform,
            wake,
            log,
            server: Some(server),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.path, Some(Duration::from_secs(10)))
    }

    /// A guest call from vCPU `vcpu`, answered by the engine as on a vCPU thread.
    pub fn guest_call(&self, vcpu: u32, regs: [u64; 4]) {
        let call = GuestCall {
            vcpu: VcpuId::new(vcpu),
            conduit: Conduit::Hvc,
            regs,
            caller_aarch32: false,
        };
        self.fw.handle_call(&call, self.platform.as_ref());
        self.platform.call_counts().count(regs[0] as u32);
    }

    /// The guest system-suspends (vCPU 0; every other vCPU is off).
    pub fn system_suspend(&self) {
        self.guest_call(0, [0xC400_000E, RAM + 0x1000, 0x42, 0]);
    }

    pub fn state(&self) -> RunState {
        self.client().info().expect("info").run_state
    }

    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .expect("log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    pub fn operator_actions(&self) -> Vec<String> {
        self.log_lines()
            .iter()
            .filter(|v| v["kind"] == "operator")
            .map(|v| v["action"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Raw request: status and body.
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let mut response = self.client().request(method, path, body).expect("request");
        let mut text = Vec::new();
        response.body.read_to_end(&mut text).expect("body");
        let value = serde_json::from_slice(&text).unwrap_or(serde_json::Value::Null);
        (response.status, value)
    }
}

pub fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorKind, String) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error.kind, error.message),
        other => panic!("expected a typed API error, got {other:?}"),
    }
}
