//! The destination side of a migration: `vpsci restore --listen`
//! ([`receive`]). It runs the VM only after a whole, checked Go frame; every
//! failure before that ends the process with status 1 and one line, the VM
//! never having run here.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::wire::{self, Message, WireError};
use super::{accept_one, check_hello, Endpoint, Fault, Stream, PEER_TIMEOUT};
use crate::cli::RestoreConfig;
use crate::events::{Event, EventSink};
use crate::layout::GuestLayout;
use crate::restore::{build, check_firmware, check_host, failure, open_log, run_built};
use crate::run::RunOutcome;
use crate::snapshot::{open_streamed, SnapshotError};

/// Waits on `endpoint` for one VM, receives it and runs it (exit statuses
/// as for `vpsci restore DIR`).
pub fn receive(config: &RestoreConfig, endpoint: &Endpoint) -> RunOutcome {
    let started = Instant::now();
    let log = match open_log(config, started) {
        Ok(log) => log,
        Err(e) => return failure(e),
    };
    let peer = endpoint.to_string();
    let events = Arc::clone(&log.events);
    let note =
        |phase: &str, reason: Option<&str>| record(events.as_ref(), phase, &peer, None, reason);
    let mut stream = match accept_one(endpoint) {
        Ok(s) => s,
        Err(e) => return failure(e),
    };
    if let Err(e) = stream.set_timeout(PEER_TIMEOUT) {
        return failure(format!("migration from {peer}: {e}"));
    }
    let accepted = Instant::now();
    note("started", None);
    let refuse = |stream: &mut Stream, reason: String| {
        note("failed", Some(&reason));
        // The source may be gone already; the reason is ours to print either way.
        let _ = wire::send(stream, &Message::Refuse(reason.clone()))
            .and_then(|()| stream.flush().map_err(WireError::from));
        failure(format!(
            "migration from {peer} refused, the VM did not run here: {reason}"
        ))
    };

    // 1. Compatibility.
    let hello = match wire::receive(&mut stream) {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            return refuse(
                &mut stream,
                format!("expected Hello, got {:?}", other.kind()),
            )
        }
        Err(e) => return refuse(&mut stream, e.to_string()),
    };
    let layout = match check_hello(&hello, config.in_kernel_psci) {
        Ok(layout) => layout,
        Err(reason) => return refuse(&mut stream, reason),
    };
    let host = match check_host(hello.cntfrq, hello.machine.cpus) {
        Ok(h) => h,
        Err(reason) => return refuse(&mut stream, reason),
    };
    let memory = match layout.create_memory() {
        Ok(m) => m,
        Err(e) => return refuse(&mut stream, e.to_string()),
    };
    if let Err(e) = wire::send(&mut stream, &Message::Accept)
        .and_then(|()| stream.flush().map_err(WireError::from))
    {
        return failure(format!(
            "migration from {peer}: {e}; the VM did not run here"
        ));
    }
    note("accepted", None);
    if Fault::from_env() == Some(Fault::HangAfterAccept) {
        // Test-only fault injection: hang as if stuck.
        loop {
            std::thread::park();
        }
    }

    // 2. and 3. Memory rounds, then the state.
    let mut frames = 0u64;
    let die_after = match Fault::from_env() {
        Some(Fault::DieAfterPages(n)) => Some(n),
        _ => None,
    };
    let files = loop {
        match wire::receive(&mut stream) {
            Ok(Message::Pages { addr, data }) => {
                if let Err(reason) = store_pages(&memory, &layout, hello.page_size, addr, &data) {
                    return refuse(&mut stream, reason);
                }
                frames += 1;
                if die_after == Some(frames) {
                    // Test-only fault injection: die as if killed.
                    std::process::exit(101);
                }
            }
            Ok(Message::Round(r)) => record(events.as_ref(), "round", &peer, Some(&r), None),
            Ok(Message::State(files)) => break files,
            Ok(other) => {
                return refuse(
                    &mut stream,
                    format!("expected pages or the state, got {:?}", other.kind()),
                )
            }
            Err(e) => return refuse(&mut stream, e.to_string()),
        }
    };
    let parts: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let snap = match open_streamed(&parts, layout.ram_size()) {
        Ok(s) => s,
        Err(e) => return refuse(&mut stream, state_error(&e)),
    };
    if snap.layout != layout {
        return refuse(
            &mut stream,
            "the state describes another machine than the Hello did".to_owned(),
        );
    }
    let fw = match check_firmware(&snap, config.in_kernel_psci) {
        Ok(fw) => Arc::new(fw),
        Err(reason) => return refuse(&mut stream, reason),
    };
    // Virtio disk images are reopened by path (shared storage between hosts).
    if let Err(e) = snap.open_disks() {
        return refuse(&mut stream, e.to_string());
    }
    let vm = match build(&host, &snap, &memory) {
        Ok(vm) => vm,
        Err(reason) => return refuse(&mut stream, reason),
    };
    if let Err(e) = wire::send(&mut stream, &Message::Ready)
        .and_then(|()| stream.flush().map_err(WireError::from))
    {
        note("failed", Some(&e.to_string()));
        return failure(format!(
            "migration from {peer}: {e}; the VM did not run here"
        ));
    }
    note("ready", None);

    // 4. Only a whole, checked Go runs the VM.
    match wire::receive(&mut stream) {
        Ok(Message::Go) => {}
        Ok(other) => return refuse(&mut stream, format!("expected Go, got {:?}", other.kind())),
        Err(e) => {
            let reason = format!("the source did not commit ({e})");
            note("failed", Some(&reason));
            return failure(format!(
                "migration from {peer} failed, the VM did not run here: {reason}"
            ));
        }
    }
    // From here on the VM runs here whatever happens to the connection: the
    // source, without Running, keeps its copy paused for the operator.
    let withhold = Fault::from_env() == Some(Fault::WithholdRunning);
    let confirmed = if withhold {
        // Test-only fault injection: the confirmation is lost on the way.
        Err("the test-only fault withhold-running held it back".to_owned())
    } else {
        wire::send(&mut stream, &Message::Running)
            .and_then(|()| stream.flush().map_err(WireError::from))
            .map_err(|e| e.to_string())
    };
    // Under the fault the connection stays open while the VM runs, so the
    // source sees silence (its wait times out) rather than a closed socket.
    let _held = withhold.then_some(stream);
    match confirmed {
        Ok(()) => note("running", None),
        Err(e) => {
            let reason = format!(
                "the VM runs here, but its confirmation (Running) could not be sent to the \
                 source ({e}); the source keeps its copy paused until its operator powers it off"
            );
            note("running", Some(&reason));
            eprintln!("vpsci: migration from {peer}: {reason}");
        }
    }
    eprintln!(
        "vpsci: migrated in {} vCPU(s), {} MiB from {peer} in {:.1} ms (PSCI {} kept)",
        snap.layout.cpus(),
        snap.layout.ram_size() >> 20,
        accepted.elapsed().as_secs_f64() * 1e3,
        snap.firmware_config.psci_version
    );
    run_built(vm, fw, &snap, &memory, config, &log)
}

/// Writes a page frame into RAM: whole pages, inside RAM.
fn store_pages(
    memory: &GuestMemoryMmap,
    layout: &GuestLayout,
    page_size: u64,
    addr: u64,
    data: &[u8],
) -> Result<(), String> {
    let base = layout.ram_base().0;
    let end = addr.checked_add(data.len() as u64);
    let inside = addr >= base && end.is_some_and(|e| e <= base + layout.ram_size());
    if !inside || addr % page_size != 0 || data.len() as u64 % page_size != 0 || data.is_empty() {
        return Err(format!(
            "a page frame for {:#x}+{:#x} is not whole pages inside guest RAM",
            addr,
            data.len()
        ));
    }
    memory
        .write_slice(data, GuestAddress(addr))
        .map_err(|e| format!("guest RAM: {e}"))
}

fn state_error(e: &SnapshotError) -> String {
    format!("the VM's state: {e}")
}

fn record(
    events: &dyn EventSink,
    phase: &str,
    peer: &str,
    round: Option<&crate::api::types::MigrationRound>,
    reason: Option<&str>,
) {
    if events.enabled() {
        events.record(&Event::Migration {
            role: "destination",
            phase,
            peer,
            round: round.map(|r| r.round),
            pages: round.map(|r| r.pages_sent),
            dirty_pages: round.map(|r| r.dirty_pages),
            device_pages: round.map(|r| r.device_pages),
            expected_downtime_us: round.map(|r| (r.expected_downtime_ms * 1e3) as u64),
            reason,
        });
    }
}
