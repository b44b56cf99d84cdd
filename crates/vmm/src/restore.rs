//! `vpsci restore DIR` and `vpsci restore --listen`: resume a VM from a
//! snapshot directory, or from a live migration, in a new process.
//!
//! Everything that can refuse the snapshot runs before any KVM object
//! exists, in this order: the snapshot's own checks (manifest, sizes,
//! checksums, versions, consistency: [`crate::snapshot::open`]); the guest's
//! firmware (an engine is built with the snapshot's pinned configuration, not
//! this process's defaults, and takes the engine snapshot; a destination
//! asked for KVM's PSCI cannot offer it); the host (arm64 KVM, the counter
//! frequency the guest calibrated on); then guest memory is loaded into fresh
//! RAM with its checksum checked. Only then is the VM created, its saved
//! state written before any vCPU runs, and its threads started in the power
//! states the engine restored (starts that were committed but not yet run are
//! queued again).
//!
//! Building and running the VM from a checked snapshot and loaded memory is
//! shared with the migration destination ([`crate::migrate`]): `build`
//! then `run_built` (arm64 only).
//!
//! Exit statuses are those of `vpsci run` ([`crate::run`]); a guest reset
//! ends the process with status 3 (a restored VM has no image to boot again).

use crate::cli::{RestoreConfig, RestoreSource};
use crate::run::RunOutcome;

/// Restores and runs the VM `config` names (a directory or a migration).
pub fn restore(config: &RestoreConfig) -> RunOutcome {
    match &config.source {
        RestoreSource::Dir(dir) => restore_dir(config, dir),
        RestoreSource::Listen(endpoint) => crate::migrate::receive(config, endpoint),
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn restore_dir(_config: &RestoreConfig, dir: &std::path::Path) -> RunOutcome {
    // The snapshot and its disks are still checked, so a bad one is
    // reported as such.
    if let Err(e) = crate::snapshot::open(dir).and_then(|s| s.open_disks()) {
        return failure(e.to_string());
    }
    no_kvm()
}

/// The outcome on a host without arm64 KVM.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) fn no_kvm() -> RunOutcome {
    match vpsci_kvm::KvmHost::open() {
        Ok(_) => failure("KVM is not supported on this host".to_owned()),
        Err(e) => failure(e.to_string()),
    }
}

pub(crate) fn failure(message: String) -> RunOutcome {
    RunOutcome {
        status: crate::run::EXIT_FAILURE,
        message,
    }
}

/// Checks that this build can give the guest the firmware it was pinned to.
/// `in_kernel_psci`: the destination asks for KVM's PSCI, which cannot.
pub fn check_firmware(
    snapshot: &crate::snapshot::CheckedSnapshot,
    in_kernel_psci: bool,
) -> Result<vpsci_firmware::Firmware, String> {
    let mpidrs: Vec<u64> = snapshot.vm.vcpus.iter().map(|v| v.mpidr).collect();
    check_firmware_of(
        &snapshot.firmware,
        &mpidrs,
        &snapshot.layout,
        in_kernel_psci,
    )
}

/// [`check_firmware`] from its parts: the engine's snapshot bytes, the
/// vCPUs' MPIDR_EL1 values and the machine (a migration checks these before
/// any memory or vCPU state is sent).
pub fn check_firmware_of(
    firmware: &[u8],
    mpidrs: &[u64],
    layout: &crate::layout::GuestLayout,
    in_kernel_psci: bool,
) -> Result<vpsci_firmware::Firmware, String> {
    let config = vpsci_firmware::Firmware::snapshot_config(firmware)
        .map_err(|e| format!("firmware.bin: {e}: restore refused"))?;
    if in_kernel_psci {
        return Err(format!(
            "the guest was given vpsci's firmware (PSCI {}, {:?} conduit); KVM's in-kernel \
             PSCI (--in-kernel-psci) cannot offer it: restore refused",
            config.psci_version, config.conduit
        ));
    }
    let cpus = mpidrs
        .iter()
        .map(|&m| vpsci_firmware::Mpidr::from_mpidr_el1(m))
        .collect();
    let ram = vec![vpsci_firmware::MemoryRegion {
        base: layout.ram_base().0,
        size: layout.ram_size(),
    }];
    let fw = vpsci_firmware::Firmware::new(config, cpus, ram).map_err(|e| {
        format!("this vpsci cannot offer the guest's firmware: {e}: restore refused")
    })?;
    fw.restore(firmware)
        .map_err(|e| format!("firmware.bin: {e}: restore refused"))?;
    Ok(fw)
}

#[cfg(target_arch = "aarch64")]
use kvm_restore::restore_dir;
#[cfg(target_arch = "aarch64")]
pub use kvm_restore::{build, check_host, open_log, run_built, RestoreLog};

#[cfg(target_arch = "aarch64")]
mod kvm_restore {
    use std::io::Write;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;

    use vm_memory::GuestMemoryMmap;
    use vpsci_firmware::Firmware;
    use vpsci_kvm::{host_cntfrq, install_kick_handler, KvmHost, SmcccRouting};

    use super::{check_firmware, failure};
    use crate::api::hub::EventHub;
    use crate::api::live::LiveVm;
    use crate::api::server::ApiServer;
    use crate::api::VmApi;
    use crate::cli::RestoreConfig;
    use crate::devices::console::ConsoleInput;
    use crate::events::{self, EventSink};
    use crate::policy::{decide, Decision};
    use crate::run::{run_vm_with, RunExtras, RunOutcome, VmStopped, EXIT_RESET};
    use crate::snapshot::{self, CheckedSnapshot};
    use crate::terminal;
    use crate::vcpu::{CallCounts, PsciBackend};
    use crate::vm::{self, DeviceOptions, Vm};

    /// The restored process's event log: a plain file sink, or, with
    /// `--api-socket`, a hub that also feeds the API's event streams.
    #[derive(Clone)]
    pub struct RestoreLog {
        /// Where events go.
        pub events: Arc<dyn EventSink>,
        /// The hub behind `events` when the API is served.
        pub hub: Option<Arc<EventHub>>,
    }

    /// Opens the event log `config` asks for (from now on).
    pub fn open_log(config: &RestoreConfig, started: Instant) -> Result<RestoreLog, String> {
        if config.api_socket.is_some() {
            let hub = Arc::new(
                EventHub::new(config.events.as_deref(), started).map_err(|e| e.to_string())?,
            );
            return Ok(RestoreLog {
                events: Arc::clone(&hub) as Arc<dyn EventSink>,
                hub: Some(hub),
            });
        }
        let events = events::open(config.events.as_deref(), started).map_err(|e| e.to_string())?;
        Ok(RestoreLog { events, hub: None })
    }

    /// Opens KVM and checks the host can run the guest: its counter
    /// frequency and vCPU count.
    pub fn check_host(cntfrq: u64, cpus: u32) -> Result<KvmHost, String> {
        let host = KvmHost::open().map_err(|e| e.to_string())?;
        let here = host_cntfrq();
        if cntfrq != here {
            return Err(format!(
                "incompatible snapshot: the guest's counter ran at {cntfrq} Hz, this host's \
                 runs at {here} Hz: restore refused"
            ));
        }
        if cpus as usize > host.max_vcpus() {
            return Err(format!(
                "incompatible snapshot: the guest has {cpus} vCPUs, this host's KVM allows {}: \
                 restore refused",
                host.max_vcpus()
            ));
        }
        Ok(host)
    }

    /// Builds the VM of a checked snapshot whose memory is in `memory`:
    /// vCPUs, vGIC and devices from their saved states, none running yet.
    /// The console is this process's standard input and output.
    pub fn build(
        host: &KvmHost,
        snap: &CheckedSnapshot,
        memory: &GuestMemoryMmap,
    ) -> Result<Vm, String> {
        install_kick_handler().map_err(|e| e.to_string())?;
        let console_input = Arc::new(ConsoleInput::new());
        terminal::spawn_stdin_reader(Arc::clone(&console_input))
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        vm::build_restored(
            host,
            snap,
            &SmcccRouting::userspace_psci(),
            memory,
            &DeviceOptions {
                console_input: Some(console_input),
                disks: Vec::new(),
            },
            Box::new(std::io::stdout()) as Box<dyn Write + Send>,
        )
        .map_err(|e| e.to_string())
    }

    /// Runs a VM `build` made until it stops, serving the control API when
    /// `config.api_socket` is set; the event log's last line says how it ended.
    pub fn run_built(
        vm: Vm,
        fw: Arc<Firmware>,
        snap: &CheckedSnapshot,
        memory: &GuestMemoryMmap,
        config: &RestoreConfig,
        log: &RestoreLog,
    ) -> RunOutcome {
        let api = match (&config.api_socket, &log.hub) {
            (Some(path), Some(hub)) => {
                let live = Arc::new(LiveVm::new(
                    Arc::clone(hub),
                    Arc::new(CallCounts::default()),
                    snap.firmware_config,
                ));
                match ApiServer::start(path, Arc::clone(&live) as Arc<dyn VmApi>) {
                    Ok(server) => Some((live, server)),
                    Err(e) => return failure(e.to_string()),
                }
            }
            _ => None,
        };
        let _terminal = terminal::InteractiveTerminal::enter();
        let VmStopped { reason, stuck } = run_vm_with(
            vm,
            PsciBackend::Engine(Arc::clone(&fw)),
            config.timeout,
            Arc::clone(&log.events),
            config.on_hibernate,
            RunExtras {
                memory: Some((memory.clone(), snap.layout)),
                on_running: None,
                restored: true,
                api: api.as_ref().map(|(live, _)| Arc::clone(live)),
            },
        );
        let outcome = if let Some(first) = stuck.first() {
            failure(format!(
                "vCPU {first} did not stop after the VM stopped ({reason:?})"
            ))
        } else {
            match decide(
                &reason,
                crate::cli::ResetAction::Exit,
                Some(&fw),
                snap.layout.cpus(),
            ) {
                Decision::Exit(outcome) => outcome,
                Decision::Restart(what) => RunOutcome {
                    status: EXIT_RESET,
                    message: format!("{what}: a restored VM has no image to boot again; exiting"),
                },
            }
        };
        if log.events.enabled() {
            log.events.record(&events::Event::VmEnd {
                exit_status: outcome.status,
                reason: &outcome.message,
            });
        }
        if let Some((live, server)) = api {
            live.end();
            drop(server);
        }
        outcome
    }

    /// Restores and runs the VM of `dir` (see the module docs).
    pub(super) fn restore_dir(config: &RestoreConfig, dir: &Path) -> RunOutcome {
        let started = Instant::now();
        let snap = match snapshot::open(dir) {
            Ok(s) => s,
            Err(e) => return failure(e.to_string()),
        };
        let fw = match check_firmware(&snap, config.in_kernel_psci) {
            Ok(fw) => Arc::new(fw),
            Err(e) => return failure(e),
        };
        // The disk images, before anything else is built (build_restored
        // opens and checks them once more, with their queues).
        if let Err(e) = snap.open_disks() {
            return failure(e.to_string());
        }
        let host = match check_host(snap.vm.cntfrq, snap.layout.cpus()) {
            Ok(h) => h,
            Err(e) => return failure(e),
        };
        let memory = match snap.layout.create_memory() {
            Ok(m) => m,
            Err(e) => return failure(e.to_string()),
        };
        if let Err(e) = snap.load_memory(&memory) {
            return failure(e.to_string());
        }
        let log = match open_log(config, Instant::now()) {
            Ok(log) => log,
            Err(e) => return failure(e),
        };
        let vm = match build(&host, &snap, &memory) {
            Ok(vm) => vm,
            Err(e) => return failure(e),
        };
        eprintln!(
            "vpsci: restored {} vCPU(s), {} MiB from {} in {:.1} ms (PSCI {} kept)",
            snap.layout.cpus(),
            snap.layout.ram_size() >> 20,
            dir.display(),
            started.elapsed().as_secs_f64() * 1e3,
            snap.firmware_config.psci_version
        );
        run_built(vm, fw, &snap, &memory, config, &log)
    }
}
