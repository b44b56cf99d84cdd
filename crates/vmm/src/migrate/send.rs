//! The source side of a migration: [`send`] (see the module docs of
//! [`crate::migrate`] for the steps and the commit point).

use std::io::Write;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vpsci_firmware::Firmware;
use vpsci_kvm::{host_cntfrq, DirtyLog};

use super::wire::{self, Hello, Message, WireError};
use super::{
    Endpoint, Fault, MigrateOptions, Stream, DEFAULT_DOWNTIME, DEFAULT_MAX_ROUNDS, PEER_TIMEOUT,
};
use crate::api::live::SendVm;
use crate::api::types::{MigrateDone, MigrateRequest, MigrationRound, RunState};
use crate::events::{Event, EventSink};
use crate::memory::touched_pages;
use crate::snapshot::{encode_sections, LiveVm, MachineInfo};
use crate::vcpu::StopReason;

/// Bandwidth assumed before anything was measured (a guest of zero pages).
const ASSUMED_BYTES_PER_S: f64 = 64.0 * 1024.0 * 1024.0;
/// How long the source waits for the destination's confirmation after Go.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

impl SendVm for LiveVm {
    fn migrate(
        &self,
        request: &MigrateRequest,
        events: &dyn EventSink,
    ) -> Result<MigrateDone, String> {
        let options = MigrateOptions {
            to: request.to.parse::<Endpoint>()?,
            max_rounds: request.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
            downtime: request
                .downtime_ms
                .map_or(DEFAULT_DOWNTIME, Duration::from_millis),
        };
        send(self, &options, events)
    }
}

/// Migrates `vm` (running, not paused) to `options.to`. `Ok`: Go was
/// written; if the destination confirmed (`confirmed`), the VM stopped here
/// ([`StopReason::Migrated`]) and runs there, else it stays paused here,
/// intact, for the operator to resume or power off. `Err`: one line; the VM
/// runs on here as before.
pub fn send(
    vm: &LiveVm,
    options: &MigrateOptions,
    events: &dyn EventSink,
) -> Result<MigrateDone, String> {
    let started = Instant::now();
    let peer = options.to.to_string();
    let Some(engine) = &vm.engine else {
        return Err(
            "a VM under KVM's in-kernel PSCI cannot be migrated (its firmware state is KVM's)"
                .to_owned(),
        );
    };
    // A VM with devices that cannot be saved is refused before anything.
    vm.devices.state()?;
    log(events, "started", &peer, None);
    let mut sender = Sender {
        vm,
        engine,
        events,
        peer: peer.clone(),
        fault: Fault::from_env(),
        page_size: 0,
        bytes_sent: 0,
        send_time: Duration::ZERO,
        rounds: Vec::new(),
        paused: false,
        logging: false,
    };
    match sender.run(options, started) {
        Ok(done) => Ok(done),
        Err(reason) => {
            // Before Go: undo everything, the VM carries on.
            if sender.logging {
                let _ = vm.kvm.set_dirty_logging(false);
                vm.devices.vmm_writes.stop();
            }
            if sender.paused {
                let _ = vm.control.unpause();
            }
            let reason = format!("migration to {peer} failed, the VM runs on here: {reason}");
            log(events, "failed", &peer, Some(&reason));
            Err(reason)
        }
    }
}

fn log(events: &dyn EventSink, phase: &str, peer: &str, reason: Option<&str>) {
    if events.enabled() {
        events.record(&Event::Migration {
            role: "source",
            phase,
            peer,
            round: None,
            pages: None,
            dirty_pages: None,
            device_pages: None,
            expected_downtime_us: None,
            reason,
        });
    }
}

struct Sender<'a> {
    vm: &'a LiveVm,
    engine: &'a Firmware,
    events: &'a dyn EventSink,
    peer: String,
    fault: Option<Fault>,
    page_size: u64,
    bytes_sent: u64,
    /// Time spent writing pages (the bandwidth estimate's denominator).
    send_time: Duration,
    rounds: Vec<MigrationRound>,
    paused: bool,
    logging: bool,
}

impl Sender<'_> {
    fn run(&mut self, options: &MigrateOptions, started: Instant) -> Result<MigrateDone, String> {
        let mut stream = Stream::connect(&options.to, PEER_TIMEOUT)
            .map_err(|e| format!("cannot connect: {e}"))?;
        stream
            .set_timeout(PEER_TIMEOUT)
            .map_err(|e| format!("cannot set the connection's timeout: {e}"))?;
        let page_size = self
            .vm
            .kvm
            .clean_dirty_log()
            .first()
            .map_or(4096, |l| l.page_size);
        self.page_size = page_size;
        let layout = &self.vm.layout;

        // 1. Compatibility, before any memory.
        let hello = Hello {
            machine: MachineInfo {
                cpus: layout.cpus(),
                ram_base: layout.ram_base().0,
                ram_size: layout.ram_size(),
            },
            mpidrs: self.vm.kvm.mpidrs().iter().map(|m| m.raw()).collect(),
            cntfrq: host_cntfrq(),
            firmware: self.engine.snapshot(),
            page_size,
        };
        self.exchange(&mut stream, &Message::Hello(hello))?;
        match self.reply(&mut stream)? {
            Message::Accept => log(self.events, "accepted", &self.peer, None),
            other => return Err(unexpected("Accept", &other)),
        }

        // 2. Pre-copy: everything, then what the guest and the devices
        // dirtied meanwhile. Both logs start before the full copy reads RAM.
        self.vm
            .devices
            .vmm_writes
            .start(self.vm.kvm.clean_dirty_log());
        self.logging = true;
        self.vm
            .kvm
            .set_dirty_logging(true)
            .map_err(|e| e.to_string())?;
        let mut round_start = Instant::now();
        let (pages, bytes) = self.send_all(&mut stream)?;
        let mut sent = (pages, bytes);
        let mut round = 0u32;
        let pending = loop {
            let (dirty, device_pages) = self.take_dirty()?;
            let count: u64 = dirty.iter().map(DirtyLog::count).sum();
            let report = self.report(round, sent, round_start.elapsed(), (count, device_pages));
            let expected = Duration::from_secs_f64(report.expected_downtime_ms / 1e3);
            self.record_round(&mut stream, report)?;
            if expected <= options.downtime || round >= options.max_rounds {
                break dirty;
            }
            round += 1;
            round_start = Instant::now();
            sent = self.send_dirty(&mut stream, &dirty)?;
        };

        // 3. Stop and copy.
        let paused_at = Instant::now();
        self.vm
            .control
            .pause()
            .map_err(|e| format!("cannot pause the VM: {e}"))?;
        self.paused = true;
        log(self.events, "paused", &self.peer, None);
        let captured = self.vm.capture_paused(self.engine)?;
        // After the capture: saving the vGIC's pending tables writes guest RAM.
        let (mut last, device_pages) = self.take_dirty()?;
        for (log, earlier) in last.iter_mut().zip(&pending) {
            log.merge(earlier);
        }
        let final_start = Instant::now();
        let final_sent = self.send_dirty(&mut stream, &last)?;
        let report = self.report(
            round + 1,
            final_sent,
            final_start.elapsed(),
            (0, device_pages),
        );
        self.record_round(&mut stream, report)?;
        let files = encode_sections(&captured.parts(self.vm)).map_err(|e| e.to_string())?;
        let files = files.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
        self.exchange(&mut stream, &Message::State(files))?;
        match self.reply(&mut stream)? {
            Message::Ready => log(self.events, "ready", &self.peer, None),
            other => return Err(unexpected("Ready", &other)),
        }

        // 4. Commit: once Go is written this VM never runs here on its own
        // again. It stays paused, intact, until the destination confirms.
        self.write_go(&mut stream)?;
        // Past this point nothing unpauses the VM but the operator.
        self.paused = false;
        let _ = self.vm.kvm.set_dirty_logging(false);
        self.vm.devices.vmm_writes.stop();
        self.logging = false;
        log(self.events, "committed", &self.peer, None);
        let confirmed = match confirmation(&mut stream) {
            Ok(()) => {
                // Logged before the stop: stopping lets the VMM write
                // `vm_end`, which must stay the log's last line.
                log(self.events, "running", &self.peer, None);
                self.vm.control.stop(StopReason::Migrated {
                    to: self.peer.clone(),
                });
                true
            }
            Err(why) => {
                let reason = format!(
                    "{why}; the VM is paused here: resume it only if the destination did not \
                     run it (its process exited 1 saying so), else power it off"
                );
                log(self.events, "unconfirmed", &self.peer, Some(&reason));
                false
            }
        };
        Ok(MigrateDone {
            to: self.peer.clone(),
            rounds: std::mem::take(&mut self.rounds),
            bytes_sent: self.bytes_sent,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: paused_at.elapsed().as_secs_f64() * 1e3,
            confirmed,
            // The API puts the state it sees in here.
            run_state: if confirmed {
                RunState::Stopping
            } else {
                RunState::Paused
            },
        })
    }

    /// Writes Go. A write that fails cannot have delivered the whole frame
    /// (its last bytes were not taken), so the destination cannot run the VM
    /// and the caller may resume it here. The test-only faults report
    /// success after a Go the destination cannot take: [`Fault::CutGo`]
    /// writes half the frame and shuts the connection down (it broke after
    /// Go left), [`Fault::CorruptGo`] writes it with a damaged CRC-32.
    fn write_go(&mut self, stream: &mut Stream) -> Result<(), String> {
        let fault = self.fault;
        if !matches!(fault, Some(Fault::CutGo | Fault::CorruptGo)) {
            return self.exchange(stream, &Message::Go);
        }
        let mut frame = Vec::new();
        wire::send(&mut frame, &Message::Go).map_err(|e| e.to_string())?;
        if fault == Some(Fault::CutGo) {
            frame.truncate(frame.len() / 2);
        } else if let Some(crc) = frame.last_mut() {
            *crc ^= 0x40;
        }
        let _ = stream.write_all(&frame).and_then(|()| stream.flush());
        if fault == Some(Fault::CutGo) {
            let _ = stream.shutdown();
        }
        Ok(())
    }

    /// The pages dirtied since the last call: KVM's log (the guest's writes)
    /// merged with the devices' own writes (which KVM does not see), and how
    /// many pages the devices wrote.
    fn take_dirty(&self) -> Result<(Vec<DirtyLog>, u64), String> {
        let mut logs = self.vm.kvm.take_dirty_log().map_err(|e| e.to_string())?;
        // Without the devices' log a page a virtio device filled would reach
        // the destination stale (a guest then reads old data, or finds a used
        // ring entry it never posted): refuse rather than send that.
        let vmm = self
            .vm
            .devices
            .vmm_writes
            .take()
            .ok_or("the devices' write log is not running")?;
        if vmm.len() != logs.len() {
            return Err(format!(
                "the devices' write log has {} RAM slots, KVM's has {}",
                vmm.len(),
                logs.len()
            ));
        }
        let device_pages = vmm.iter().map(DirtyLog::count).sum();
        for (log, vmm) in logs.iter_mut().zip(&vmm) {
            log.merge(vmm);
        }
        Ok((logs, device_pages))
    }

    /// Sends a message; a failed write is explained by the destination's
    /// refusal when it sent one before closing.
    fn exchange(&mut self, stream: &mut Stream, message: &Message) -> Result<(), String> {
        let written =
            wire::send(stream, message).and_then(|()| stream.flush().map_err(WireError::from));
        written.map_err(|e| peer_reason(stream).unwrap_or_else(|| e.to_string()))
    }

    fn reply(&mut self, stream: &mut Stream) -> Result<Message, String> {
        match wire::receive(stream) {
            Ok(Message::Refuse(reason)) => {
                log(self.events, "refused", &self.peer, Some(&reason));
                Err(format!("the destination refused: {reason}"))
            }
            Ok(m) => Ok(m),
            Err(e) => Err(format!("no answer from the destination: {e}")),
        }
    }

    fn report(
        &self,
        round: u32,
        (pages, bytes): (u64, u64),
        took: Duration,
        (dirty, device_pages): (u64, u64),
    ) -> MigrationRound {
        let secs = took.as_secs_f64().max(1e-6);
        let per_s = if self.bytes_sent > 0 && !self.send_time.is_zero() {
            self.bytes_sent as f64 / self.send_time.as_secs_f64()
        } else {
            ASSUMED_BYTES_PER_S
        };
        MigrationRound {
            round,
            pages_sent: pages,
            bytes_sent: bytes,
            ms: took.as_secs_f64() * 1e3,
            dirty_pages: dirty,
            device_pages,
            dirty_pages_per_s: dirty as f64 / secs,
            mib_per_s: bytes as f64 / secs / (1024.0 * 1024.0),
            expected_downtime_ms: (dirty * self.page_size) as f64 / per_s * 1e3,
        }
    }

    fn record_round(&mut self, stream: &mut Stream, report: MigrationRound) -> Result<(), String> {
        if self.events.enabled() {
            self.events.record(&Event::Migration {
                role: "source",
                phase: "round",
                peer: &self.peer,
                round: Some(report.round),
                pages: Some(report.pages_sent),
                dirty_pages: Some(report.dirty_pages),
                device_pages: Some(report.device_pages),
                expected_downtime_us: Some((report.expected_downtime_ms * 1e3) as u64),
                reason: None,
            });
        }
        self.exchange(stream, &Message::Round(report.clone()))?;
        self.rounds.push(report);
        Ok(())
    }

    /// Round 0: every page of guest RAM this process's mapping has ever
    /// backed (the destination's fresh RAM reads as zero elsewhere). Returns
    /// (pages, bytes) sent.
    fn send_all(&mut self, stream: &mut Stream) -> Result<(u64, u64), String> {
        let base = self.vm.layout.ram_base().0;
        let pages = self.vm.layout.ram_size() / self.page_size;
        let mut all = DirtyLog::clean(base, self.page_size, pages);
        match touched_pages(&self.vm.memory, base, pages, self.page_size) {
            Some(touched) => {
                for (i, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
                    all.mark(base + i as u64 * self.page_size, 1);
                }
            }
            None => all.mark(base, pages * self.page_size),
        }
        self.send_dirty(stream, &[all])
    }

    /// Sends every dirty page of `logs`, contiguous pages in one frame.
    fn send_dirty(&mut self, stream: &mut Stream, logs: &[DirtyLog]) -> Result<(u64, u64), String> {
        let page = self.page_size;
        let max_pages = (u64::from(wire::MAX_PAYLOAD) - 8) / page;
        let mut buf = Vec::new();
        let mut totals = (0u64, 0u64);
        for log in logs {
            let mut run: Option<(u64, u64)> = None; // (first address, pages)
            let mut pages = log.dirty_pages().peekable();
            while let Some(addr) = pages.next() {
                run = match run {
                    Some((first, n)) if first + n * page == addr && n < max_pages => {
                        Some((first, n + 1))
                    }
                    Some((first, n)) => {
                        self.send_range(stream, &mut buf, first, n)?;
                        totals = (totals.0 + n, totals.1 + n * page);
                        Some((addr, 1))
                    }
                    None => Some((addr, 1)),
                };
                if pages.peek().is_none() {
                    if let Some((first, n)) = run.take() {
                        self.send_range(stream, &mut buf, first, n)?;
                        totals = (totals.0 + n, totals.1 + n * page);
                    }
                }
            }
        }
        Ok(totals)
    }

    fn send_range(
        &mut self,
        stream: &mut Stream,
        buf: &mut Vec<u8>,
        addr: u64,
        pages: u64,
    ) -> Result<(), String> {
        buf.resize((pages * self.page_size) as usize, 0);
        self.vm
            .memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| format!("guest RAM: {e}"))?;
        let data = std::mem::take(buf);
        let result = self.send_run(stream, addr, &data);
        *buf = data;
        result
    }

    fn send_run(&mut self, stream: &mut Stream, addr: u64, data: &[u8]) -> Result<(), String> {
        let corrupt = self.fault == Some(Fault::CorruptPages);
        if corrupt {
            self.fault = None;
        }
        let t = Instant::now();
        let written = wire::send_pages(stream, addr, data, corrupt);
        self.send_time += t.elapsed();
        self.bytes_sent += data.len() as u64;
        written.map_err(|e| peer_reason(stream).unwrap_or_else(|| e.to_string()))
    }
}

/// Waits (bounded) for the destination's Running; the error says what came
/// instead.
fn confirmation(stream: &mut Stream) -> Result<(), String> {
    stream
        .set_timeout(CONFIRM_TIMEOUT)
        .map_err(|e| format!("cannot wait for the destination's Running: {e}"))?;
    match wire::receive(stream) {
        Ok(Message::Running) => Ok(()),
        Ok(other) => Err(unexpected("Running", &other)),
        Err(WireError::Timeout) => Err(format!(
            "the destination did not confirm within {} s that the VM runs there",
            CONFIRM_TIMEOUT.as_secs()
        )),
        Err(e) => Err(format!(
            "the destination did not confirm that the VM runs there ({e})"
        )),
    }
}

/// After a failed write: the destination's refusal, if it sent one.
fn peer_reason(stream: &mut Stream) -> Option<String> {
    let _ = stream.set_timeout(Duration::from_secs(2));
    match wire::receive(stream) {
        Ok(Message::Refuse(reason)) => Some(format!("the destination refused: {reason}")),
        _ => None,
    }
}

fn unexpected(wanted: &str, got: &Message) -> String {
    format!(
        "the destination answered {:?} where {wanted} was due",
        got.kind()
    )
}
