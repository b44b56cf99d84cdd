//! `vpsci run`: assemble the VM, run its vCPU threads, and turn the way it
//! ended into an exit status and a one-line message.
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest powered off (SYSTEM_OFF, SYSTEM_OFF2; HIBERNATE_OFF only with `--on-hibernate poweroff`) |
//! | 1 | the VM could not start, a vCPU failed, or `--timeout` expired |
//! | 2 | invalid command line (from [`crate::cli`]) |
//! | 3 | the guest reset (SYSTEM_RESET, SYSTEM_RESET2) with `--on-reset exit` |

/// Exit status: the guest powered off.
pub const EXIT_POWERED_OFF: u8 = 0;
/// Exit status: the VM failed (could not start, vCPU failure, timeout).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: the guest asked for a reset and `--on-reset exit` was given.
pub const EXIT_RESET: u8 = 3;

/// How a `vpsci run` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Process exit status.
    pub status: u8,
    /// One line for the operator.
    pub message: String,
}

impl RunOutcome {
    fn failure(message: String) -> RunOutcome {
        RunOutcome {
            status: EXIT_FAILURE,
            message,
        }
    }
}

/// Runs the VM `config` describes until it powers off, resets (with
/// `--on-reset exit`), fails or times out.
#[cfg(not(target_arch = "aarch64"))]
pub fn run(config: &crate::cli::RunConfig) -> RunOutcome {
    let _ = config;
    match vpsci_kvm::KvmHost::open() {
        Ok(_) => RunOutcome::failure("KVM is not supported on this host".to_owned()),
        Err(e) => RunOutcome::failure(e.to_string()),
    }
}

#[cfg(target_arch = "aarch64")]
pub use kvm_run::{
    run, run_session, run_session_with, run_vm, run_vm_with, ConsoleFactory, RunExtras, Session,
    VmStopped,
};

#[cfg(target_arch = "aarch64")]
mod kvm_run {
    use std::io::Write;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vm_memory::GuestMemoryMmap;
    use vpsci_firmware::{Firmware, FirmwareConfig, MemoryRegion};
    use vpsci_kvm::{install_kick_handler, KvmHost, SmcccRouting};

    use super::RunOutcome;
    use crate::api::hub::EventHub;
    use crate::api::live::{LiveVm, RunningVm, SendVm, TakeSnapshot, WakeDevice};
    use crate::api::server::ApiServer;
    use crate::api::VmApi;
    use crate::cli::SnapshotWhen;
    use crate::cli::{HibernateAction, ResetAction, RunConfig};
    use crate::devices::console::ConsoleInput;
    use crate::events::{self, EventSink};
    use crate::layout::GuestLayout;
    use crate::policy::{decide, Decision};
    use crate::snapshot::trigger::{MarkerSeen, MarkerWriter, SystemSuspendWatch};
    use crate::snapshot::LiveVm as SnapshotVm;
    use crate::terminal;
    use crate::vcpu::{
        CallCounts, Kick, Mmio, PsciBackend, SharedVcpu, StopReason, VcpuRunner, VmControl,
        VmPlatform,
    };
    use crate::vm::{self, DeviceOptions, ImageSource, Vm, VmOptions};
    use vpsci_firmware::VcpuId;

    /// How long stopped vCPU threads get to finish before we give up on them.
    const JOIN_GRACE: Duration = Duration::from_secs(5);

    /// Makes the UART's output sink for each (re)started VM.
    pub type ConsoleFactory = Arc<dyn Fn() -> Box<dyn Write + Send> + Send + Sync>;

    /// One `vpsci run`: a VM description plus what to do around it.
    pub struct Session {
        /// What to assemble (also says whether KVM or vpsci answers PSCI).
        pub vm: VmOptions,
        /// Restart or exit on a guest reset.
        pub on_reset: ResetAction,
        /// Power off or refuse on a guest hibernate request (engine only:
        /// under KVM's in-kernel PSCI, KVM has stopped every vCPU before it
        /// reports SYSTEM_OFF2, so the VM powers off whatever this says).
        pub on_hibernate: HibernateAction,
        /// Stop the whole session after this long.
        pub timeout: Option<Duration>,
        /// Answer forwarded calls with an empty handler instead of the engine
        /// (measurements of the forwarding floor only).
        pub empty_handler: bool,
        /// UART output.
        pub console: ConsoleFactory,
        /// Event log.
        pub events: Arc<dyn EventSink>,
    }

    /// How a VM's run ended.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct VmStopped {
        /// Why it stopped.
        pub reason: StopReason,
        /// vCPUs whose threads did not finish within the grace period (they
        /// may still be inside the engine, so the VM must not be restarted).
        pub stuck: Vec<usize>,
    }

    /// Called with a handle on each VM once its vCPU threads run (a snapshot
    /// trigger, a test).
    pub type OnRunning = Arc<dyn Fn(Arc<SnapshotVm>) + Send + Sync>;

    /// What [`run_vm_with`] adds to [`run_vm`].
    #[derive(Clone, Default)]
    pub struct RunExtras {
        /// Guest RAM and the machine's layout (needed for snapshots).
        pub memory: Option<(GuestMemoryMmap, GuestLayout)>,
        /// Called once the VM runs.
        pub on_running: Option<OnRunning>,
        /// The VM was restored from a snapshot: each vCPU thread starts in the
        /// power state the restored engine gives, and ON_PENDING starts are
        /// queued again.
        pub restored: bool,
        /// The control API the VM is served to while it runs.
        pub api: Option<Arc<LiveVm>>,
    }

    /// Runs an assembled VM's vCPU threads until it stops and they finish.
    /// A hibernate request `on_hibernate` refuses does not stop it.
    pub fn run_vm(
        vm: Vm,
        psci: PsciBackend,
        timeout: Option<Duration>,
        events: Arc<dyn EventSink>,
        on_hibernate: HibernateAction,
    ) -> VmStopped {
        run_vm_with(
            vm,
            psci,
            timeout,
            events,
            on_hibernate,
            RunExtras::default(),
        )
    }

    /// [`run_vm`] with [`RunExtras`].
    pub fn run_vm_with(
        vm: Vm,
        psci: PsciBackend,
        timeout: Option<Duration>,
        events: Arc<dyn EventSink>,
        on_hibernate: HibernateAction,
        extras: RunExtras,
    ) -> VmStopped {
        let Vm {
            kvm,
            vcpus,
            mmio,
            devices,
            mpidrs,
            ..
        } = vm;
        let kvm = Arc::new(kvm);
        let control = Arc::new(VmControl::new(
            vcpus
                .iter()
                .map(|v| Box::new(v.kicker()) as Box<dyn Kick>)
                .collect(),
        ));
        let mut platform = VmPlatform::new(Arc::clone(&control), Arc::clone(&events), on_hibernate);
        if let Some(api) = &extras.api {
            platform = platform.with_call_counts(Arc::clone(api.calls()));
        }
        let platform = Arc::new(platform);
        if let PsciBackend::Engine(fw) = &psci {
            fw.freeze();
        }
        let vcpus: Vec<SharedVcpu<vpsci_kvm::KvmVcpu>> =
            vcpus.into_iter().map(SharedVcpu::new).collect();
        let engine = match &psci {
            PsciBackend::Engine(fw) => Some(Arc::clone(fw)),
            _ => None,
        };
        if extras.restored {
            if let Some(fw) = &engine {
                for index in 0..vcpus.len() {
                    if let Some(entry) = fw.pending_start(VcpuId::new(index as u32)) {
                        control.request_start(index, entry);
                    }
                }
            }
        }
        // What a snapshot needs (guest RAM comes with the extras).
        let snapshot_vm = extras.memory.as_ref().map(|(memory, layout)| {
            Arc::new(SnapshotVm {
                control: Arc::clone(&control),
                kvm: Arc::clone(&kvm),
                vcpus: vcpus.clone(),
                engine: engine.clone(),
                devices: devices.clone(),
                memory: memory.clone(),
                layout: *layout,
            })
        });
        if let (Some(hook), Some(vm)) = (&extras.on_running, &snapshot_vm) {
            hook(Arc::clone(vm));
        }
        if let Some(api) = &extras.api {
            api.attach(RunningVm {
                control: Arc::clone(&control),
                engine: engine.clone(),
                wake: Some(Arc::clone(&devices.rtc) as Arc<dyn WakeDevice>),
                mpidrs,
            });
            if let (Some(vm), true) = (&snapshot_vm, engine.is_some()) {
                api.attach_snapshot(Arc::clone(vm) as Arc<dyn TakeSnapshot>);
                api.attach_migrate(Arc::clone(vm) as Arc<dyn SendVm>);
            }
        }
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        let mut threads = Vec::new();
        for vcpu in vcpus {
            let index = crate::vcpu::VcpuOps::index(&vcpu);
            let mut runner = VcpuRunner::new(
                vcpu,
                Arc::clone(&control),
                Arc::clone(&platform),
                psci.clone(),
                Arc::clone(&mmio) as Arc<dyn Mmio>,
                Arc::clone(&events),
            );
            if let (true, Some(fw)) = (extras.restored, &engine) {
                runner = runner.with_restored_power(fw.power_state(VcpuId::new(index as u32)));
            }
            let done = done_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    runner.run();
                    let _ = done.send(index);
                });
            match spawned {
                Ok(handle) => threads.push((index, handle)),
                Err(e) => control.stop(StopReason::VcpuFailed {
                    vcpu: index,
                    reason: format!("cannot start its thread: {e}"),
                }),
            }
        }
        drop(done_tx);
        let reason = control.wait_stopped(timeout);
        // Every thread leaves once the VM stops; wait for them (bounded).
        let deadline = Instant::now() + JOIN_GRACE;
        let mut finished = vec![false; threads.len()];
        let mut left = threads.len();
        while left > 0 {
            let now = Instant::now();
            let Some(wait) = deadline.checked_duration_since(now) else {
                break;
            };
            match done_rx.recv_timeout(wait) {
                Ok(i) => {
                    if let Some(f) = finished.get_mut(i) {
                        if !*f {
                            *f = true;
                            left -= 1;
                        }
                    }
                }
                Err(_) => break,
            }
        }
        let mut stuck = Vec::new();
        for (index, handle) in threads {
            if finished.get(index).copied().unwrap_or(false) {
                let _ = handle.join();
            } else {
                stuck.push(index);
            }
        }
        VmStopped { reason, stuck }
    }

    /// Runs the VM `config` describes (see the module docs for the statuses).
    pub fn run(config: &RunConfig) -> RunOutcome {
        let host = match KvmHost::open() {
            Ok(host) => host,
            Err(e) => return RunOutcome::failure(e.to_string()),
        };
        let started = Instant::now();
        // With the control API, the event log also feeds its streams.
        let hub = match &config.api_socket {
            Some(_) => match EventHub::new(config.events.as_deref(), started) {
                Ok(hub) => Some(Arc::new(hub)),
                Err(e) => return RunOutcome::failure(e.to_string()),
            },
            None => None,
        };
        let events: Arc<dyn EventSink> = match &hub {
            Some(hub) => Arc::clone(hub) as Arc<dyn EventSink>,
            None => match events::open(config.events.as_deref(), started) {
                Ok(sink) => sink,
                Err(e) => return RunOutcome::failure(e.to_string()),
            },
        };
        let routing = if config.in_kernel_psci {
            eprintln!(
                "vpsci: --in-kernel-psci: KVM answers PSCI; lost: the PSCI version and \
                 conduit chosen here, SYSTEM_SUSPEND with wake-up, SYSTEM_OFF2 and \
                 SYSTEM_RESET2 details, CPU_ON decided once under a VM-wide lock, TRNG, \
                 the event log of PSCI calls, firmware snapshots"
            );
            SmcccRouting::kernel_psci()
        } else {
            SmcccRouting::userspace_psci()
        };
        // Standard input feeds the guest's UART (an interactive console).
        let console_input = Arc::new(ConsoleInput::new());
        if let Err(e) = terminal::spawn_stdin_reader(Arc::clone(&console_input)) {
            return RunOutcome::failure(format!("cannot read standard input: {e}"));
        }
        let session = Session {
            vm: VmOptions {
                layout: config.layout,
                image: ImageSource::File(config.image.clone()),
                initrd: config.initrd.clone(),
                cmdline: config.cmdline.clone(),
                firmware: FirmwareConfig {
                    psci_version: config.psci_version,
                    conduit: config.conduit,
                    on_pending: config.on_pending,
                    ..FirmwareConfig::default()
                },
                routing,
                devices: DeviceOptions {
                    console_input: Some(console_input),
                    disks: config.disks.clone(),
                },
                idle_states: Vec::new(),
            },
            on_reset: config.on_reset,
            on_hibernate: config.on_hibernate,
            timeout: config.timeout,
            empty_handler: false,
            console: Arc::new(|| Box::new(std::io::stdout()) as Box<dyn Write + Send>),
            events,
        };
        let memory = match config.layout.create_memory() {
            Ok(m) => m,
            Err(e) => return RunOutcome::failure(e.to_string()),
        };
        let mut session = session;
        let mut extras = RunExtras {
            memory: Some((memory.clone(), config.layout)),
            ..RunExtras::default()
        };
        if let Some(trigger) = &config.snapshot {
            let seen = Arc::new(MarkerSeen::default());
            match &trigger.when {
                SnapshotWhen::Console(marker) => {
                    let marker = marker.clone();
                    let for_console = Arc::clone(&seen);
                    session.console = Arc::new(move || {
                        Box::new(MarkerWriter::new(
                            Box::new(std::io::stdout()),
                            &marker,
                            Arc::clone(&for_console),
                        )) as Box<dyn Write + Send>
                    });
                }
                SnapshotWhen::SystemSuspend => {
                    session.events = Arc::new(SystemSuspendWatch::new(
                        Arc::clone(&session.events),
                        Arc::clone(&seen),
                    ));
                }
            }
            extras.on_running = Some(snapshot_when_seen(seen, trigger.dir.clone()));
        }
        if config.hold_starts {
            eprintln!("vpsci: --hold-starts: vCPUs started by CPU_ON never run (debugging aid)");
            let then = extras.on_running.take();
            // Runs before any vCPU thread exists.
            extras.on_running = Some(Arc::new(move |vm: Arc<SnapshotVm>| {
                vm.control.hold_starts();
                if let Some(hook) = &then {
                    hook(vm);
                }
            }));
        }
        let api = match (&config.api_socket, hub) {
            (Some(path), Some(hub)) => {
                let live = Arc::new(LiveVm::new(
                    hub,
                    Arc::new(CallCounts::default()),
                    session.vm.firmware,
                ));
                match ApiServer::start(path, Arc::clone(&live) as Arc<dyn VmApi>) {
                    Ok(server) => Some((live, server)),
                    Err(e) => return RunOutcome::failure(e.to_string()),
                }
            }
            _ => None,
        };
        extras.api = api.as_ref().map(|(live, _)| Arc::clone(live));
        let _terminal = terminal::InteractiveTerminal::enter();
        let outcome = run_session_with(&host, &session, &memory, &extras);
        if let Some((live, server)) = api {
            // Streams get the log's last line, then end; the socket goes away.
            live.end();
            drop(server);
        }
        outcome
    }

    /// The hook of `--snapshot-on-console` and `--snapshot-on-system-suspend`:
    /// once `seen` is set, pause, write the snapshot into `dir`, stop the VM.
    fn snapshot_when_seen(seen: Arc<MarkerSeen>, dir: std::path::PathBuf) -> OnRunning {
        let hook: OnRunning = Arc::new(move |live: Arc<SnapshotVm>| {
            let seen = Arc::clone(&seen);
            let dir = dir.clone();
            let spawned = std::thread::Builder::new()
                .name("snapshot".to_owned())
                .spawn(move || {
                    while !seen.wait(Duration::from_millis(200)) {
                        if live.control.is_stopping() {
                            return;
                        }
                    }
                    // Left paused: the VM stops after its snapshot.
                    match live.snapshot_and_hold(&dir) {
                        Ok(t) => {
                            eprintln!(
                                "vpsci: snapshot of {} MiB ({} MiB stored) written to {} \
                                 (pause {:.1} ms, state {:.1} ms, write {:.1} ms)",
                                t.memory_bytes >> 20,
                                t.memory_stored >> 20,
                                dir.display(),
                                t.pause.as_secs_f64() * 1e3,
                                t.state.as_secs_f64() * 1e3,
                                t.write.as_secs_f64() * 1e3
                            );
                            live.control.stop(StopReason::Snapshotted { dir });
                        }
                        Err(e) => live.control.stop(StopReason::VcpuFailed {
                            vcpu: 0,
                            reason: format!("snapshot into {} failed: {e}", dir.display()),
                        }),
                    }
                });
            if let Err(e) = spawned {
                eprintln!("vpsci: cannot start the snapshot thread: {e}");
            }
        });
        hook
    }

    /// Runs `session` in `memory` (kept across guest resets, like RAM across
    /// a warm reset; the image and device tree are loaded again each time).
    /// However it ends, the event log's last line says how (`vm_end`).
    pub fn run_session(host: &KvmHost, session: &Session, memory: &GuestMemoryMmap) -> RunOutcome {
        run_session_with(host, session, memory, &RunExtras::default())
    }

    /// [`run_session`] with [`RunExtras`] for each VM it builds.
    pub fn run_session_with(
        host: &KvmHost,
        session: &Session,
        memory: &GuestMemoryMmap,
        extras: &RunExtras,
    ) -> RunOutcome {
        let outcome = run_session_until_end(host, session, memory, extras);
        if session.events.enabled() {
            session.events.record(&events::Event::VmEnd {
                exit_status: outcome.status,
                reason: &outcome.message,
            });
        }
        outcome
    }

    fn run_session_until_end(
        host: &KvmHost,
        session: &Session,
        memory: &GuestMemoryMmap,
        extras: &RunExtras,
    ) -> RunOutcome {
        if let Err(e) = install_kick_handler() {
            return RunOutcome::failure(e.to_string());
        }
        let started = Instant::now();
        let mut firmware: Option<Arc<Firmware>> = None;
        let mut resets = 0u64;
        loop {
            let vm = match vm::build(host, &session.vm, memory, (session.console)()) {
                Ok(vm) => vm,
                Err(e) => return RunOutcome::failure(e.to_string()),
            };
            let psci = if session.vm.routing.is_kernel_psci() {
                PsciBackend::Kernel
            } else if session.empty_handler {
                PsciBackend::EmptyHandler
            } else {
                let fw = match &firmware {
                    Some(fw) => Arc::clone(fw),
                    None => match new_firmware(&session.vm, &vm) {
                        Ok(fw) => {
                            let fw = Arc::new(fw);
                            firmware = Some(Arc::clone(&fw));
                            fw
                        }
                        Err(message) => return RunOutcome::failure(message),
                    },
                };
                PsciBackend::Engine(fw)
            };
            let timeout = match session.timeout {
                Some(limit) => match limit.checked_sub(started.elapsed()) {
                    Some(left) => Some(left),
                    None => {
                        return RunOutcome::failure(format!(
                            "timeout after {} s (while resetting, reset {resets})",
                            limit.as_secs()
                        ))
                    }
                },
                None => None,
            };
            let VmStopped { reason, stuck } = run_vm_with(
                vm,
                psci,
                timeout,
                Arc::clone(&session.events),
                session.on_hibernate,
                extras.clone(),
            );
            if let Some(first) = stuck.first() {
                // A stuck thread may still be inside the engine: neither a
                // restart (Firmware::reset) nor a clean exit is safe to claim.
                return RunOutcome::failure(format!(
                    "vCPU {first} did not stop within {} s after the VM stopped ({reason:?})",
                    JOIN_GRACE.as_secs()
                ));
            }
            let cpus = session.vm.layout.cpus();
            match decide(&reason, session.on_reset, firmware.as_deref(), cpus) {
                Decision::Restart(what) => {
                    resets += 1;
                    if let Some(api) = &extras.api {
                        api.restarted();
                    }
                    eprintln!("vpsci: {what}: restarting the VM (reset {resets})");
                    if session.events.enabled() {
                        session.events.record(&events::Event::VmRestart {
                            reason: &what,
                            restart: resets,
                        });
                    }
                    if let Some(fw) = &firmware {
                        for t in fw.reset() {
                            events::record_transition(session.events.as_ref(), &t);
                        }
                    }
                }
                Decision::Exit(outcome) => return outcome,
            }
        }
    }

    fn new_firmware(options: &VmOptions, vm: &Vm) -> Result<Firmware, String> {
        let fw_config = options.firmware;
        let cpus = vm.mpidrs.clone();
        let ram = vec![MemoryRegion {
            base: options.layout.ram_base().0,
            size: options.layout.ram_size(),
        }];
        Firmware::new(fw_config, cpus, ram).map_err(|e| format!("firmware: {e}"))
    }
}

#[cfg(all(test, not(target_arch = "aarch64")))]
mod tests {
    use super::*;
    use crate::cli::{parse_from, Action};

    #[test]
    fn run_on_a_host_without_arm64_kvm_fails_and_points_to_the_nested_harness() {
        let config = match parse_from(["vpsci", "run", "--image", "guest.bin"]) {
            Ok(Action::Run(config)) => config,
            other => panic!("unexpected parse result {other:?}"),
        };
        let outcome = run(&config);
        assert_eq!(outcome.status, EXIT_FAILURE);
        assert!(
            outcome.message.contains("cargo xtask nested"),
            "{}",
            outcome.message
        );
        assert_eq!(outcome.message.lines().count(), 1);
    }
}
