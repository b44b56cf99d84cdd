//! The control API's request handling (`vpsci::api::handle`) behind `vpsci run
//! --api-socket`: sequences of requests with arbitrary methods, paths and bodies against
//! the real `LiveVm` over a VM without KVM (a real `VmControl` and engine, no vCPU
//! threads). Any request gets an answer, never a panic; an error answer is a typed
//! `ApiError` whose kind gives its status and whose message is one line; and a refused
//! request changes nothing (run state, pause, stop).
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vpsci::api::hub::EventHub;
use vpsci::api::live::{LiveVm, RunningVm};
use vpsci::api::types::ApiError;
use vpsci::api::{handle, Reply, VmApi};
use vpsci::vcpu::{CallCounts, Kick, VmControl};
use vpsci_firmware::{Firmware, FirmwareConfig, MemoryRegion, Mpidr};

#[derive(Debug, Arbitrary)]
struct Request {
    method: u8,
    /// A known route (by index) or this path.
    route: Result<u8, String>,
    body: Body,
}

#[derive(Debug, Arbitrary)]
enum Body {
    Empty,
    Action(u8),
    Bytes(Vec<u8>),
}

const METHODS: [&str; 6] = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"];
const PATHS: [&str; 6] = ["/vm", "/vm/actions", "/events", "/vm/snapshot", "/", "/vm?x=1"];
const ACTIONS: [&str; 6] = ["pause", "resume", "reboot", "poweroff", "wake", "fly"];

struct NoKick;
impl Kick for NoKick {
    fn kick(&self) {}
}

fuzz_target!(|requests: Vec<Request>| {
    let control = Arc::new(VmControl::new(vec![Box::new(NoKick), Box::new(NoKick)]));
    let fw = Arc::new(
        Firmware::new(
            FirmwareConfig::default(),
            vec![Mpidr::from_index(0), Mpidr::from_index(1)],
            vec![MemoryRegion {
                base: 0x4000_0000,
                size: 0x10_0000,
            }],
        )
        .expect("valid firmware"),
    );
    let hub = Arc::new(EventHub::new(None, Instant::now()).expect("no file"));
    let live = LiveVm::new(hub, Arc::new(CallCounts::default()), FirmwareConfig::default());
    live.attach(RunningVm {
        control: Arc::clone(&control),
        engine: Some(fw),
        wake: None,
        mpidrs: vec![Mpidr::from_index(0), Mpidr::from_index(1)],
    });
    for r in requests.iter().take(32) {
        let method = METHODS[usize::from(r.method) % METHODS.len()];
        let path = match &r.route {
            Ok(i) => PATHS[usize::from(*i) % PATHS.len()].to_owned(),
            Err(p) => p.clone(),
        };
        let body = match &r.body {
            Body::Empty => Vec::new(),
            Body::Action(i) => format!(
                "{{\"action\":\"{}\"}}",
                ACTIONS[usize::from(*i) % ACTIONS.len()]
            )
            .into_bytes(),
            Body::Bytes(b) => b.clone(),
        };
        let before = (live.info().run_state, control.is_paused(), control.is_stopping());
        match handle(&live, method, &path, &body) {
            Reply::Json { status, body, .. } if status != 200 => {
                let error: ApiError = serde_json::from_slice(&body).expect("a typed error");
                assert_eq!(error.kind.status(), status);
                assert!(!error.message.is_empty() && !error.message.contains('\n'));
                let after = (live.info().run_state, control.is_paused(), control.is_stopping());
                assert_eq!(before, after, "a refused request changed the VM");
            }
            Reply::Json { body, .. } => {
                let _: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            }
            Reply::Events(stream) => drop(stream),
        }
    }
});
