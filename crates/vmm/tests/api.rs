//! The control API through its real socket: `ApiServer` (tiny_http on a Unix socket) and
//! the `Client` `vpsci ctl` uses, serving the real `LiveVm` over a VM without KVM: a real
//! `VmControl` and engine, a fake wake-up device, and vCPUs that are never in the guest.
//! Every route, every error kind, and that a refused request changes nothing.

mod api_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_common::*;
use vpsci::api::client::{Client, ClientError};
use vpsci::api::hub::{EventHub, MAX_STREAMS};
use vpsci::api::live::{LiveVm, RunningVm};
use vpsci::api::server::{ApiServer, ApiServerError};
use vpsci::api::types::{
    Action, ErrorKind, MigrationPhase, PowerState, RunState, MAX_BODY, ROUTES,
};
use vpsci::api::VmApi;
use vpsci::events::EventSink;
use vpsci::vcpu::{CallCounts, Kick, OperatorStop, StopReason, VmControl};
use vpsci_firmware::{FirmwareConfig, Mpidr};

#[test]
fn info_reports_run_state_power_states_stats_calls_and_the_firmware() {
    let s = Setup::new(2);
    s.guest_call(0, [0x8400_0000, 0, 0, 0]); // PSCI_VERSION
    s.guest_call(0, [0xC400_0003, 1, RAM + 0x1000, 7]); // CPU_ON vCPU 1
    let info = s.client().info().expect("info");
    assert_eq!(info.run_state, RunState::Running);
    assert_eq!(info.restarts, 0);
    assert_eq!(info.vcpus.len(), 2);
    assert_eq!(info.vcpus[0].power_state, Some(PowerState::On));
    assert_eq!(info.vcpus[1].mpidr, "0x1");
    // KVM's answers by default: the started vCPU is ON_PENDING inside the engine until it runs.
    assert_eq!(info.vcpus[1].power_state, Some(PowerState::OnPending));
    assert_eq!(info.psci_calls.get("CPU_ON"), Some(&1));
    assert_eq!(info.psci_calls.get("PSCI_VERSION"), Some(&1));
    assert_eq!(info.firmware.psci_version, "1.3");
    assert_eq!(info.firmware.conduit, "hvc");
    assert!(info.firmware.frozen);
    assert_eq!(info.firmware.psci_backend, "engine");
    assert!(!info.firmware.report_on_pending);
}

#[test]
fn pause_and_resume_change_the_run_state_and_are_logged_as_operator_actions() {
    let s = Setup::new(2);
    let done = s.client().act(Action::Pause).expect("pause");
    assert_eq!(done.action, Action::Pause);
    assert_eq!(done.run_state, RunState::Paused);
    assert!(s.control.is_paused());
    assert_eq!(s.state(), RunState::Paused);
    let done = s.client().act(Action::Resume).expect("resume");
    assert_eq!(done.run_state, RunState::Running);
    assert!(!s.control.is_paused());
    assert_eq!(s.operator_actions(), ["pause", "resume"]);
}

#[test]
fn actions_in_the_wrong_state_are_refused_with_409_and_change_nothing() {
    let s = Setup::new(2);
    let (status, kind, message) = refused(s.client().act(Action::Resume));
    assert_eq!((status, kind), (409, ErrorKind::WrongState), "{message}");
    assert!(!s.control.is_paused());
    let (status, kind, _) = refused(s.client().act(Action::Wake));
    assert_eq!((status, kind), (409, ErrorKind::WrongState));
    assert_eq!(s.wake.raised.load(Ordering::SeqCst), 0);
    s.client().act(Action::Pause).expect("pause");
    let (status, kind, message) = refused(s.client().act(Action::Pause));
    assert_eq!((status, kind), (409, ErrorKind::WrongState), "{message}");
    assert!(message.contains("paused already"), "{message}");
    assert!(s.control.is_paused(), "a refused pause unpaused");
    assert_eq!(s.operator_actions(), ["pause"], "refusals were logged");
}

#[test]
fn wake_raises_the_wake_device_of_a_suspended_vm_and_the_log_names_it() {
    let s = Setup::new(2);
    s.system_suspend();
    assert_eq!(s.state(), RunState::Suspended);
    let done = s.client().act(Action::Wake).expect("wake");
    assert_eq!(done.action, Action::Wake);
    assert_eq!(s.wake.raised.load(Ordering::SeqCst), 1);
    let operator: Vec<serde_json::Value> = s
        .log_lines()
        .into_iter()
        .filter(|v| v["kind"] == "operator")
        .collect();
    assert_eq!(operator.len(), 1);
    assert_eq!(operator[0]["action"], "wake");
    assert_eq!(operator[0]["device"], "pl031");
}

#[test]
fn a_masked_wake_device_is_refused_and_nothing_is_raised() {
    let s = Setup::new(2);
    s.system_suspend();
    s.wake.masked.store(true, Ordering::SeqCst);
    let (status, kind, message) = refused(s.client().act(Action::Wake));
    assert_eq!(
        (status, kind),
        (409, ErrorKind::WakeSourceMasked),
        "{message}"
    );
    assert_eq!(s.wake.raised.load(Ordering::SeqCst), 0);
    assert_eq!(s.state(), RunState::Suspended);
    assert!(s.operator_actions().is_empty());
}

#[test]
fn a_paused_suspended_vm_is_not_woken_until_resumed() {
    let s = Setup::new(2);
    s.system_suspend();
    s.client().act(Action::Pause).expect("pause");
    let (status, kind, _) = refused(s.client().act(Action::Wake));
    assert_eq!((status, kind), (409, ErrorKind::WrongState));
    assert_eq!(
        s.client().act(Action::Resume).expect("resume").run_state,
        RunState::Suspended
    );
}

#[test]
fn a_vm_without_a_wake_device_answers_wake_with_not_built() {
    let s = Setup::new(2);
    s.live.attach(RunningVm {
        control: Arc::clone(&s.control),
        engine: Some(Arc::clone(&s.fw)),
        wake: None,
        mpidrs: vec![Mpidr::from_index(0), Mpidr::from_index(1)],
    });
    s.system_suspend();
    let (status, kind, _) = refused(s.client().act(Action::Wake));
    assert_eq!((status, kind), (501, ErrorKind::NotBuilt));
}

#[test]
fn poweroff_stops_the_vm_as_the_operator_and_every_later_action_is_refused() {
    let s = Setup::new(2);
    let done = s.client().act(Action::Poweroff).expect("poweroff");
    assert_eq!(done.run_state, RunState::Stopping);
    assert_eq!(
        s.control.wait_stopped(Some(Duration::from_secs(1))),
        StopReason::Operator {
            action: OperatorStop::PowerOff
        }
    );
    for action in Action::ALL {
        let (status, kind, _) = refused(s.client().act(action));
        assert_eq!((status, kind), (409, ErrorKind::VmStopped), "{action:?}");
    }
    assert!(!s.control.is_paused(), "a refused pause paused");
    assert_eq!(s.state(), RunState::Stopping);
    assert_eq!(s.operator_actions(), ["poweroff"]);
}

#[test]
fn reboot_stops_the_vm_for_a_restart_and_the_restart_is_counted() {
    let s = Setup::new(2);
    s.client().act(Action::Reboot).expect("reboot");
    assert_eq!(
        s.control.wait_stopped(Some(Duration::from_secs(1))),
        StopReason::Operator {
            action: OperatorStop::Reboot
        }
    );
    // What run_session does next: count the restart and attach the new VM.
    s.live.restarted();
    let control = Arc::new(VmControl::new(vec![Box::new(NoKick), Box::new(NoKick)]));
    s.live.attach(RunningVm {
        control,
        engine: Some(Arc::clone(&s.fw)),
        wake: None,
        mpidrs: vec![Mpidr::from_index(0), Mpidr::from_index(1)],
    });
    let info = s.client().info().expect("info");
    assert_eq!(info.run_state, RunState::Running);
    assert_eq!(info.restarts, 1);
}

#[test]
fn a_pause_that_cannot_hold_a_vcpu_times_out_with_503_and_the_vm_runs_on() {
    struct Deaf;
    impl Kick for Deaf {
        fn kick(&self) {}
    }
    let control = VmControl::new(vec![Box::new(Deaf), Box::new(Deaf)])
        .with_quiesce_limit(Duration::from_millis(200));
    let s = Setup::with_control(control);
    // vCPU 1 enters the guest and never leaves.
    assert_eq!(s.control.next(1, true), vpsci::vcpu::Next::RunGuest);
    let (status, kind, message) = refused(s.client().act(Action::Pause));
    assert_eq!((status, kind), (503, ErrorKind::Timeout), "{message}");
    assert!(message.contains("vCPU 1"), "{message}");
    assert_eq!(s.state(), RunState::Running);
    assert!(s.operator_actions().is_empty());
}

#[test]
fn unknown_routes_methods_and_bad_bodies_get_typed_errors_and_change_nothing() {
    let s = Setup::new(2);
    let cases: [(&str, &str, &[u8], u16, &str); 12] = [
        ("GET", "/nope", b"", 404, "not_found"),
        ("DELETE", "/vm", b"", 405, "method_not_allowed"),
        ("GET", "/vm/actions", b"", 405, "method_not_allowed"),
        (
            "PUT",
            "/vm/actions",
            b"{\"action\": ",
            400,
            "malformed_json",
        ),
        ("PUT", "/vm/actions", b"not json", 400, "malformed_json"),
        (
            "PUT",
            "/vm/actions",
            b"{\"action\": \"explode\"}",
            400,
            "invalid_request",
        ),
        (
            "PUT",
            "/vm/actions",
            b"{\"verb\": \"pause\"}",
            400,
            "invalid_request",
        ),
        ("GET", "/vm", b"{}", 400, "invalid_request"),
        ("PUT", "/vm/snapshot", b"{}", 400, "invalid_request"),
        // This test's VM has no snapshot support attached (no KVM here).
        (
            "PUT",
            "/vm/snapshot",
            b"{\"dir\": \"/tmp/x\"}",
            501,
            "not_built",
        ),
        (
            "PUT",
            "/vm/migrate",
            b"{\"dir\": \"x\"}",
            400,
            "invalid_request",
        ),
        // No migration is attached either (no KVM here): nothing is sent anywhere.
        (
            "PUT",
            "/vm/migrate",
            b"{\"to\": \"unix:/tmp/nobody.sock\"}",
            501,
            "not_built",
        ),
    ];
    for (method, path, body, status, kind) in cases {
        let (got, value) = s.raw(method, path, body);
        assert_eq!(got, status, "{method} {path} {body:?}: {value}");
        assert_eq!(value["kind"], kind, "{method} {path}: {value}");
        let message = value["message"].as_str().unwrap_or("");
        assert!(!message.is_empty() && !message.contains('\n'), "{value}");
    }
    let big = vec![b' '; MAX_BODY + 1];
    let (got, value) = s.raw("PUT", "/vm/actions", &big);
    assert_eq!((got, value["kind"].as_str()), (413, Some("body_too_large")));
    assert_eq!(s.state(), RunState::Running);
    assert!(s.operator_actions().is_empty());
    assert!(!s.control.is_stopping());
}

#[test]
fn a_405_names_the_method_the_route_takes() {
    let s = Setup::new(1);
    let mut stream = UnixStream::connect(&s.path).expect("connect");
    stream
        .write_all(
            b"POST /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
        .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.to_ascii_lowercase().contains("allow: get"), "{text}");
}

#[test]
fn a_request_that_is_not_http_gets_400_and_changes_nothing() {
    let s = Setup::new(1);
    let mut stream = UnixStream::connect(&s.path).expect("connect");
    stream
        .write_all(b"\x00\x01 garbage\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert_eq!(s.state(), RunState::Running);
}

#[test]
fn the_event_stream_carries_lines_as_they_happen_and_ends_with_the_session() {
    let s = Setup::new(2);
    let client = s.client();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || client.events(|line| tx.send(line.to_owned()).is_ok()));
    // The stream is open once a line recorded after it arrives: log until one does (a
    // power-state line, as a vCPU thread would write it).
    let poke = vpsci::events::Event::PowerState {
        vcpu: 1,
        from: PowerState::Off,
        to: PowerState::On,
    };
    let first = (0..100)
        .find_map(|_| {
            s.live.hub().record(&poke);
            rx.recv_timeout(Duration::from_millis(100)).ok()
        })
        .expect("the stream never delivered a line");
    let v: serde_json::Value = serde_json::from_str(&first).expect("json");
    assert_eq!(v["kind"], "power_state");
    s.client().act(Action::Pause).expect("pause");
    let paused = loop {
        let line = rx.recv_timeout(Duration::from_secs(5)).expect("line");
        if line.contains("\"operator\"") {
            break line;
        }
    };
    assert!(paused.contains("\"action\":\"pause\""), "{paused}");
    s.live.end();
    assert!(
        reader.join().expect("reader").is_ok(),
        "the stream ended in error"
    );
    let (status, kind, _) = refused(s.client().events(|_| true));
    assert_eq!((status, kind), (409, ErrorKind::VmStopped));
}

#[test]
fn too_many_event_streams_are_refused_with_429() {
    let s = Setup::new(1);
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS {
        let response = s.client().request("GET", "/events", b"").expect("stream");
        assert_eq!(response.status, 200);
        open.push(response);
    }
    let (status, kind, _) = refused(s.client().events(|_| true));
    assert_eq!((status, kind), (429, ErrorKind::TooManyStreams));
}

#[test]
fn a_second_server_on_a_live_socket_is_refused_and_a_stale_socket_is_replaced() {
    let mut s = Setup::new(1);
    let again = ApiServer::start(&s.path, Arc::clone(&s.live) as Arc<dyn VmApi>);
    assert!(
        matches!(again, Err(ApiServerError::PathInUse { .. })),
        "{again:?}"
    );
    // A socket file nobody listens on (its server is gone).
    let stale = std::os::unix::net::UnixListener::bind(s.path.with_extension("old")).expect("bind");
    drop(stale);
    let server = ApiServer::start(
        &s.path.with_extension("old"),
        Arc::clone(&s.live) as Arc<dyn VmApi>,
    )
    .expect("stale socket replaced");
    assert!(Client::new(server.path(), None).info().is_ok());
    // Dropping the server removes its socket.
    drop(s.server.take());
    assert!(!s.path.exists());
    let not_socket = s.path.with_extension("txt");
    std::fs::write(&not_socket, b"x").expect("write");
    let refused = ApiServer::start(&not_socket, Arc::clone(&s.live) as Arc<dyn VmApi>);
    assert!(matches!(refused, Err(ApiServerError::PathInUse { .. })));
    assert_eq!(std::fs::read(&not_socket).expect("read"), b"x");
}

#[test]
fn a_client_without_a_server_fails_to_connect_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Client::new(&dir.path().join("none.sock"), None)
        .info()
        .expect_err("no server");
    assert!(matches!(e, ClientError::Connect { .. }));
    assert_eq!(e.to_string().lines().count(), 1);
}

#[test]
fn the_openapi_document_names_every_route_action_run_state_phase_and_error_kind() {
    // Embedded at build time: the test binaries also run in the nested machine, without the
    // source tree.
    let doc = include_str!("../../../docs/api.yaml");
    for (method, path) in ROUTES {
        assert!(doc.contains(&format!("  {path}:")), "route {path} missing");
        assert!(
            doc.contains(&format!("    {}:", method.to_ascii_lowercase())),
            "method {method} missing"
        );
    }
    for action in Action::ALL {
        assert!(
            doc.contains(&format!("- {}", action.name())),
            "action {action:?} missing"
        );
    }
    for state in RunState::ALL {
        assert!(
            doc.contains(&format!("- {state}")),
            "run state {state} missing"
        );
    }
    for phase in MigrationPhase::ALL {
        assert!(
            doc.contains(&format!("- {}", phase.name())),
            "migration phase {phase:?} missing"
        );
    }
    for kind in ErrorKind::ALL {
        assert!(
            doc.contains(&format!("- {}", kind.name())),
            "error kind {kind:?} missing"
        );
        assert!(
            doc.contains(&format!("\"{}\"", kind.status())),
            "status of {kind:?} missing"
        );
    }
}

#[test]
fn concurrent_clients_all_get_answers() {
    let s = Arc::new(Mutex::new(Setup::new(2)));
    let path = s.lock().expect("lock").path.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let client = Client::new(&path, Some(Duration::from_secs(10)));
                (0..25).filter(|_| client.info().is_ok()).count()
            })
        })
        .collect();
    let answered: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    assert_eq!(answered, 200);
}

#[test]
fn before_its_first_vm_runs_a_session_is_starting_and_refuses_every_action() {
    let hub = Arc::new(EventHub::new(None, Instant::now()).expect("hub"));
    let live = LiveVm::new(
        hub,
        Arc::new(CallCounts::default()),
        FirmwareConfig::default(),
    );
    assert_eq!(live.info().run_state, RunState::Starting);
    assert!(live.info().vcpus.is_empty());
    for action in Action::ALL {
        let e = live.act(action).expect_err("refused");
        assert_eq!(e.kind, ErrorKind::WrongState, "{action:?}");
    }
    live.end();
    assert_eq!(live.info().run_state, RunState::Stopping);
    assert_eq!(
        live.act(Action::Pause).expect_err("refused").kind,
        ErrorKind::VmStopped
    );
}

#[test]
fn vpsci_ctl_prints_one_line_per_outcome_and_exits_0_1_2_or_3() {
    let s = Setup::new(2);
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vpsci"))
            .arg("ctl")
            .args(args)
            .output()
            .expect("run vpsci ctl")
    };
    let sock = s.path.to_string_lossy().into_owned();
    let out = ctl(&[&sock, "pause"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pause: done, the VM is paused\n"
    );
    let out = ctl(&[&sock, "pause"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vpsci ctl: wrong_state (409): "), "{err}");
    let out = ctl(&[&sock, "info", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let info: vpsci::api::types::VmInfo = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info.run_state, RunState::Paused);
    let out = ctl(&[&sock, "info"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("run state: paused (restarts: 0)\n"),
        "{text}"
    );
    assert!(text.contains("PSCI 1.3 over hvc"), "{text}");
    let missing = s
        .path
        .with_extension("missing")
        .to_string_lossy()
        .into_owned();
    let out = ctl(&[&missing, "info"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    let out = ctl(&[&sock, "fly"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        s.control.is_paused(),
        "a refused or bad command changed the VM"
    );
}
