//! The control API while a migration runs, through the real socket and the real
//! `LiveVm` (no KVM): the migration is a fake `SendVm` that reports its rounds as the
//! real sender does (`migration` events) and waits for the test between rounds, so the
//! test decides how long the migration runs and what happens in the middle of it.
//! While it runs every `GET` is answered at once with run state `migrating` and the
//! progress, event streams carry its lines as they happen, every request that would
//! change the VM gets `409 migrating` and changes nothing; the migration's own request
//! answers when it ends, and a failed or panicking migration leaves the API answering
//! and the VM running.

mod api_common;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use api_common::*;
use vpsci::api::client::{Client, ClientError};
use vpsci::api::live::SendVm;
use vpsci::api::types::{
    Action, ErrorKind, MigrateDone, MigrateRequest, MigrationPhase, MigrationRound, PowerState,
    RunState,
};
use vpsci::events::{Event, EventSink};
use vpsci::vcpu::{StopReason, VmControl};

/// Pages the fake migration reports per round.
const PAGES: u64 = 1000;
/// How long the test waits for the fake migration to reach a round.
const STEP: Duration = Duration::from_secs(10);

/// How the fake migration ends once the test lets it past its last round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It commits: the VM stops here, as the real sender stops it after Go.
    Commits,
    /// It fails before the commit point.
    Fails,
    /// It pauses the VM (the stop-and-copy) and then panics.
    PanicsPaused,
    /// It pauses the VM, sends Go (reports `committed`) and then panics.
    PanicsAfterGo,
}

/// A `SendVm` that reports `rounds` rounds and waits for the test after each.
struct GatedMigration {
    rounds: u32,
    ending: Ending,
    control: Arc<VmControl>,
    /// Told the number of each round once it is reported.
    reached: Mutex<Sender<u32>>,
    /// One message lets it go on past a round.
    go_on: Mutex<Receiver<()>>,
}

impl GatedMigration {
    fn report(events: &dyn EventSink, to: &str, phase: &str, round: Option<u32>) {
        if events.enabled() {
            events.record(&Event::Migration {
                role: "source",
                phase,
                peer: to,
                round,
                pages: round.map(|_| PAGES),
                dirty_pages: round.map(|r| u64::from(r) + 1),
                device_pages: round.map(|_| 0),
                expected_downtime_us: round.map(|r| u64::from(r) * 1000),
                reason: None,
            });
        }
    }
}

impl SendVm for GatedMigration {
    fn migrate(
        &self,
        request: &MigrateRequest,
        events: &dyn EventSink,
    ) -> Result<MigrateDone, String> {
        let to = request.to.as_str();
        GatedMigration::report(events, to, "started", None);
        GatedMigration::report(events, to, "accepted", None);
        for round in 0..self.rounds {
            GatedMigration::report(events, to, "round", Some(round));
            let _ = self
                .reached
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(round);
            self.go_on
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv()
                .map_err(|_| "the test went away".to_owned())?;
        }
        match self.ending {
            Ending::Fails => Err(format!(
                "migration to {to} failed, the VM runs on here: the destination refused"
            )),
            Ending::PanicsPaused | Ending::PanicsAfterGo => {
                self.control.pause().expect("the fake VM pauses");
                GatedMigration::report(events, to, "paused", None);
                if self.ending == Ending::PanicsAfterGo {
                    GatedMigration::report(events, to, "committed", None);
                }
                panic!("a bug in the sender (this panic is the test's)");
            }
            Ending::Commits => {
                GatedMigration::report(events, to, "committed", None);
                self.control
                    .stop(StopReason::Migrated { to: to.to_owned() });
                Ok(MigrateDone {
                    to: to.to_owned(),
                    rounds: (0..self.rounds)
                        .map(|round| MigrationRound {
                            round,
                            pages_sent: PAGES,
                            bytes_sent: PAGES * 4096,
                            ms: 1.0,
                            dirty_pages: 0,
                            device_pages: 0,
                            dirty_pages_per_s: 0.0,
                            mib_per_s: 1.0,
                            expected_downtime_ms: 0.0,
                        })
                        .collect(),
                    bytes_sent: u64::from(self.rounds) * PAGES * 4096,
                    total_ms: 1.0,
                    downtime_ms: 1.0,
                    confirmed: true,
                    run_state: RunState::Running,
                })
            }
        }
    }
}

/// A session whose VM migrates through a [`GatedMigration`] the test drives.
struct Migrating {
    /// Dropped first (fields drop in order), so that a test failing half-way lets the
    /// migration end before the server, which waits for its answer, is dropped.
    go_on: Sender<()>,
    reached: Receiver<u32>,
    /// The `PUT /vm/migrate` client, waiting for its answer.
    request: Option<JoinHandle<Result<MigrateDone, ClientError>>>,
    s: Setup,
}

const TO: &str = "unix:/nowhere/dest.sock";

/// A migrate request to `endpoint` with the default limits.
fn to(endpoint: &str) -> MigrateRequest {
    MigrateRequest {
        to: endpoint.to_owned(),
        max_rounds: None,
        downtime_ms: None,
    }
}

impl Migrating {
    /// Starts a migration of `rounds` rounds ending as `ending` and waits until it
    /// reported its first round.
    fn start(rounds: u32, ending: Ending) -> Migrating {
        let m = Migrating::request(rounds, ending);
        m.reached(0);
        m
    }

    /// Sends the `PUT /vm/migrate` of a migration of `rounds` rounds ending as
    /// `ending`, without waiting for it.
    fn request(rounds: u32, ending: Ending) -> Migrating {
        let s = Setup::new(2);
        let (reached_tx, reached) = channel();
        let (go_on, go_on_rx) = channel();
        s.live.attach_migrate(Arc::new(GatedMigration {
            rounds,
            ending,
            control: Arc::clone(&s.control),
            reached: Mutex::new(reached_tx),
            go_on: Mutex::new(go_on_rx),
        }));
        let client = Client::new(&s.path, Some(Duration::from_secs(60)));
        let request = std::thread::spawn(move || client.migrate(&to(TO)));
        Migrating {
            s,
            reached,
            go_on,
            request: Some(request),
        }
    }

    /// Waits until the migration reported `round`.
    fn reached(&self, round: u32) {
        assert_eq!(
            self.reached.recv_timeout(STEP),
            Ok(round),
            "the migration did not reach round {round}"
        );
    }

    /// Lets the migration go past the round it waits after.
    fn go_on(&self) {
        self.go_on.send(()).expect("the migration is waiting");
    }

    /// Lets it finish and returns its request's answer.
    fn finish(mut self) -> (Setup, Result<MigrateDone, ClientError>) {
        let _ = self.go_on.send(());
        let answer = self
            .request
            .take()
            .expect("one answer")
            .join()
            .expect("the request thread");
        (self.s, answer)
    }
}

/// Every request that would change the VM, refused while it migrates.
fn refused_while_migrating(s: &Setup) -> Vec<(String, u16, ErrorKind)> {
    let mut out = Vec::new();
    for action in Action::ALL {
        let (status, kind, message) = refused(s.client().act(action));
        assert!(message.contains(TO), "{message}");
        out.push((action.name().to_owned(), status, kind));
    }
    let dir = s._dir.path().join("snap");
    let (status, kind, _) = refused(s.client().snapshot(&dir));
    out.push(("snapshot".to_owned(), status, kind));
    assert!(!dir.exists(), "a refused snapshot wrote its directory");
    let (status, kind, _) = refused(s.client().migrate(&to("unix:/elsewhere.sock")));
    out.push(("migrate".to_owned(), status, kind));
    out
}

#[test]
fn while_a_migration_runs_info_answers_with_its_progress_and_changing_requests_get_409() {
    let m = Migrating::start(3, Ending::Commits);
    let info = m.s.client().info().expect("info during the migration");
    assert_eq!(info.run_state, RunState::Migrating);
    let p = info.migration.expect("progress");
    assert_eq!(p.to, TO);
    assert_eq!(p.phase, MigrationPhase::Precopy);
    assert_eq!(p.round, Some(0));
    assert_eq!(p.pages_sent, PAGES);
    assert_eq!(p.dirty_pages, 1);
    let text = vpsci::api::ctl::render_info(&m.s.client().info().expect("info"));
    assert!(text.starts_with("run state: migrating"), "{text}");
    assert!(
        text.contains(&format!(
            "\nmigration: to {TO}, precopy, round 0, {PAGES} pages sent, 1 dirty, expected \
             downtime 0.0 ms, "
        )),
        "{text}"
    );

    let refusals = refused_while_migrating(&m.s);
    assert_eq!(refusals.len(), Action::ALL.len() + 2);
    for (what, status, kind) in &refusals {
        assert_eq!((*status, *kind), (409, ErrorKind::Migrating), "{what}");
    }
    // Nothing changed: not paused, not stopped, nothing woken, nothing logged.
    assert!(!m.s.control.is_paused());
    assert!(!m.s.control.is_stopping());
    assert_eq!(m.s.wake.raised.load(Ordering::SeqCst), 0);
    assert!(m.s.operator_actions().is_empty());

    m.go_on();
    m.reached(1);
    let p =
        m.s.client()
            .info()
            .expect("info")
            .migration
            .expect("progress");
    assert_eq!(
        (p.round, p.pages_sent, p.dirty_pages),
        (Some(1), 2 * PAGES, 2)
    );
    assert!((p.expected_downtime_ms - 1.0).abs() < 1e-9, "{p:?}");
    m.go_on();
    m.reached(2);

    let (s, answer) = m.finish();
    let done = answer.expect("the migration's own answer");
    assert_eq!(done.rounds.len(), 3);
    assert_eq!(done.run_state, RunState::Stopping, "the VM migrated away");
    let after = s.client().info().expect("info after");
    assert_eq!(after.run_state, RunState::Stopping);
    assert_eq!(after.migration, None);
}

#[test]
fn an_event_stream_opened_during_a_migration_carries_its_rounds_as_they_happen() {
    let m = Migrating::start(3, Ending::Fails);
    let client = m.s.client();
    let (tx, lines) = channel::<String>();
    let reader = std::thread::spawn(move || client.events(|line| tx.send(line.to_owned()).is_ok()));
    // The stream is open once a line recorded after it arrives: log until one does (a
    // power-state line, as a vCPU thread would write it).
    let poke = Event::PowerState {
        vcpu: 1,
        from: PowerState::Off,
        to: PowerState::On,
    };
    (0..100)
        .find_map(|_| {
            m.s.live.hub().record(&poke);
            lines.recv_timeout(Duration::from_millis(100)).ok()
        })
        .expect("the stream opened during the migration never delivered a line");
    let next_migration_line = || loop {
        let line = lines.recv_timeout(STEP).expect("a migration line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        if v["kind"] == "migration" {
            return v;
        }
    };
    for round in 1..3 {
        m.go_on();
        m.reached(round);
        let v = next_migration_line();
        assert_eq!(v["phase"], "round");
        assert_eq!(v["round"], round);
        assert_eq!(v["pages"], PAGES);
    }
    let (s, answer) = m.finish();
    s.live.end();
    assert!(reader.join().expect("reader").is_ok());
    let (status, kind, message) = refused(answer);
    assert_eq!(
        (status, kind),
        (502, ErrorKind::MigrationFailed),
        "{message}"
    );
}

#[test]
fn after_a_failed_migration_the_vm_runs_on_and_takes_actions_again() {
    let m = Migrating::start(1, Ending::Fails);
    let (s, answer) = m.finish();
    let (status, kind, message) = refused(answer);
    assert_eq!((status, kind), (502, ErrorKind::MigrationFailed));
    assert!(message.contains("runs on here"), "{message}");
    let info = s.client().info().expect("info");
    assert_eq!(info.run_state, RunState::Running);
    assert_eq!(info.migration, None);
    assert_eq!(
        s.client().act(Action::Pause).expect("pause").run_state,
        RunState::Paused
    );
    s.client().act(Action::Resume).expect("resume");
    assert_eq!(s.operator_actions(), ["pause", "resume"]);
}

#[test]
fn a_migration_that_panics_while_the_vm_is_paused_fails_with_502_and_the_vm_runs_on() {
    let m = Migrating::start(1, Ending::PanicsPaused);
    let (s, answer) = m.finish();
    let (status, kind, message) = refused(answer);
    assert_eq!((status, kind), (502, ErrorKind::MigrationFailed));
    assert!(
        message.contains("panicked") && message.contains("runs on here"),
        "{message}"
    );
    assert!(!s.control.is_paused(), "the VM stayed paused");
    let info = s.client().info().expect("the API answers after the panic");
    assert_eq!(info.run_state, RunState::Running);
    assert_eq!(info.migration, None);
    let failed: Vec<serde_json::Value> = s
        .log_lines()
        .into_iter()
        .filter(|v| v["kind"] == "migration" && v["phase"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "one failed line for the panic");
    // And it takes actions again.
    s.client()
        .act(Action::Pause)
        .expect("pause after the panic");
}

#[test]
fn a_migration_that_panics_after_go_leaves_the_vm_paused_for_the_operator() {
    let m = Migrating::start(1, Ending::PanicsAfterGo);
    let (s, answer) = m.finish();
    let (status, kind, message) = refused(answer);
    assert_eq!((status, kind), (502, ErrorKind::MigrationFailed));
    assert!(
        message.contains("Go was sent") && message.contains("stays paused"),
        "{message}"
    );
    assert!(
        s.control.is_paused(),
        "unpaused a VM the destination may run"
    );
    let info = s.client().info().expect("the API answers after the panic");
    assert_eq!((info.run_state, info.migration), (RunState::Paused, None));
    // The operator decides: here, that it did not run there.
    assert_eq!(
        s.client().act(Action::Resume).expect("resume").run_state,
        RunState::Running
    );
}

/// Counted outcomes: 4 threads send 50 requests each, every kind in turn, during one
/// migration; every GET is answered `migrating` and every change is refused.
#[test]
fn many_clients_during_a_migration_all_get_answers_and_none_changes_the_vm() {
    const THREADS: usize = 4;
    const EACH: usize = 50;
    let m = Migrating::start(1, Ending::Fails);
    let counts: Vec<(usize, usize)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = m.s.client();
                scope.spawn(move || {
                    let (mut answered, mut refused_409) = (0, 0);
                    for i in 0..EACH {
                        match (t + i) % 3 {
                            0 => {
                                let info = client.info().expect("info");
                                assert_eq!(info.run_state, RunState::Migrating);
                                answered += 1;
                            }
                            1 => {
                                let (status, kind, _) =
                                    refused(client.act(Action::ALL[i % Action::ALL.len()]));
                                assert_eq!((status, kind), (409, ErrorKind::Migrating));
                                refused_409 += 1;
                            }
                            _ => {
                                let (status, kind, _) =
                                    refused(client.migrate(&to("unix:/elsewhere.sock")));
                                assert_eq!((status, kind), (409, ErrorKind::Migrating));
                                refused_409 += 1;
                            }
                        }
                    }
                    (answered, refused_409)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let answered: usize = counts.iter().map(|c| c.0).sum();
    let refused_409: usize = counts.iter().map(|c| c.1).sum();
    println!("{answered} GET answered, {refused_409} changes refused with 409 migrating");
    assert_eq!(answered + refused_409, THREADS * EACH);
    assert!(!m.s.control.is_paused() && !m.s.control.is_stopping());
    assert_eq!(m.s.wake.raised.load(Ordering::SeqCst), 0);
    assert!(m.s.operator_actions().is_empty());
    let (_, answer) = m.finish();
    assert!(answer.is_err());
}

/// A pause and a migration sent at once: exactly one of them wins, 40 times over; the
/// outcomes are counted.
#[test]
fn a_pause_racing_a_migration_start_either_pauses_or_is_refused_never_both() {
    let (mut paused_first, mut migrated_first) = (0, 0);
    for _ in 0..40 {
        let m = Migrating::request(1, Ending::Fails);
        let pause = m.s.client().act(Action::Pause);
        // A refused pause means the migration runs: it reaches its round and is let
        // finish (failing: the VM runs on). A migration that started after a pause
        // was accepted would be let finish too, and fail the match below.
        let started = pause.is_err() && m.reached.recv_timeout(STEP) == Ok(0);
        let (s, migrate) = m.finish();
        match (pause, migrate) {
            (Ok(done), Err(e)) if !started => {
                assert_eq!(done.run_state, RunState::Paused);
                let (status, kind, _) = refused(Err::<(), _>(e));
                assert_eq!((status, kind), (409, ErrorKind::WrongState));
                assert!(s.control.is_paused());
                paused_first += 1;
            }
            (Err(e), Err(m)) if started => {
                let (status, kind, _) = refused(Err::<(), _>(e));
                assert_eq!((status, kind), (409, ErrorKind::Migrating));
                let (status, kind, _) = refused(Err::<(), _>(m));
                assert_eq!((status, kind), (502, ErrorKind::MigrationFailed));
                assert!(!s.control.is_paused());
                migrated_first += 1;
            }
            other => panic!("started {started}: {other:?}"),
        }
    }
    println!("pause first {paused_first}, migration first {migrated_first} (of 40)");
    assert_eq!(paused_first + migrated_first, 40);
}

#[test]
fn migration_phases_are_named_on_the_wire_as_in_the_openapi_document() {
    for phase in MigrationPhase::ALL {
        assert_eq!(
            serde_json::to_value(phase).expect("json"),
            serde_json::Value::from(phase.name())
        );
    }
}
