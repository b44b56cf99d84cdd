//! `vpsci restore DIR`: resume a VM from a snapshot in a new process.
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
//! Exit statuses are those of `vpsci run` ([`crate::run`]); a guest reset
//! ends the process with status 3 (a restored VM has no image to boot again).

use crate::run::RunOutcome;

/// Restores and runs the VM of `config.dir`.
#[cfg(not(target_arch = "aarch64"))]
pub fn restore(config: &crate::cli::RestoreConfig) -> RunOutcome {
    // The snapshot and its disks are still checked, so a bad one is
    // reported as such.
    if let Err(e) = crate::snapshot::open(&config.dir).and_then(|s| s.open_disks()) {
        return failure(e.to_string());
    }
    match vpsci_kvm::KvmHost::open() {
        Ok(_) => failure("KVM is not supported on this host".to_owned()),
        Err(e) => failure(e.to_string()),
    }
}

fn failure(message: String) -> RunOutcome {
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
    let config = snapshot.firmware_config;
    if in_kernel_psci {
        return Err(format!(
            "the guest was given vpsci's firmware (PSCI {}, {:?} conduit); KVM's in-kernel \
             PSCI (--in-kernel-psci) cannot offer it: restore refused",
            config.psci_version, config.conduit
        ));
    }
    let cpus = snapshot
        .vm
        .vcpus
        .iter()
        .map(|v| vpsci_firmware::Mpidr::from_mpidr_el1(v.mpidr))
        .collect();
    let ram = vec![vpsci_firmware::MemoryRegion {
        base: snapshot.layout.ram_base().0,
        size: snapshot.layout.ram_size(),
    }];
    let fw = vpsci_firmware::Firmware::new(config, cpus, ram).map_err(|e| {
        format!("this vpsci cannot offer the guest's firmware: {e}: restore refused")
    })?;
    fw.restore(&snapshot.firmware)
        .map_err(|e| format!("firmware.bin: {e}: restore refused"))?;
    Ok(fw)
}

#[cfg(target_arch = "aarch64")]
pub use kvm_restore::restore;

#[cfg(target_arch = "aarch64")]
mod kvm_restore {
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Instant;

    use vpsci_kvm::{host_cntfrq, install_kick_handler, KvmHost, SmcccRouting};

    use super::{check_firmware, failure};
    use crate::cli::RestoreConfig;
    use crate::devices::console::ConsoleInput;
    use crate::events;
    use crate::policy::{decide, Decision};
    use crate::run::{run_vm_with, RunExtras, RunOutcome, VmStopped, EXIT_RESET};
    use crate::snapshot;
    use crate::terminal;
    use crate::vcpu::PsciBackend;
    use crate::vm::{self, DeviceOptions};

    /// Restores and runs the VM of `config.dir` (see the module docs).
    pub fn restore(config: &RestoreConfig) -> RunOutcome {
        let started = Instant::now();
        let snap = match snapshot::open(&config.dir) {
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
        let host = match KvmHost::open() {
            Ok(h) => h,
            Err(e) => return failure(e.to_string()),
        };
        let cntfrq = host_cntfrq();
        if snap.vm.cntfrq != cntfrq {
            return failure(format!(
                "incompatible snapshot: the guest's counter ran at {} Hz, this host's runs at \
                 {cntfrq} Hz: restore refused",
                snap.vm.cntfrq
            ));
        }
        let memory = match snap.layout.create_memory() {
            Ok(m) => m,
            Err(e) => return failure(e.to_string()),
        };
        if let Err(e) = snap.load_memory(&memory) {
            return failure(e.to_string());
        }
        let events = match events::open(config.events.as_deref(), Instant::now()) {
            Ok(sink) => sink,
            Err(e) => return failure(e.to_string()),
        };
        if let Err(e) = install_kick_handler() {
            return failure(e.to_string());
        }
        let console_input = Arc::new(ConsoleInput::new());
        if let Err(e) = terminal::spawn_stdin_reader(Arc::clone(&console_input)) {
            return failure(format!("cannot read standard input: {e}"));
        }
        let vm = match vm::build_restored(
            &host,
            &snap,
            &SmcccRouting::userspace_psci(),
            &memory,
            &DeviceOptions {
                console_input: Some(console_input),
                disks: Vec::new(),
            },
            Box::new(std::io::stdout()) as Box<dyn Write + Send>,
        ) {
            Ok(vm) => vm,
            Err(e) => return failure(e.to_string()),
        };
        eprintln!(
            "vpsci: restored {} vCPU(s), {} MiB from {} in {:.1} ms (PSCI {} kept)",
            snap.layout.cpus(),
            snap.layout.ram_size() >> 20,
            config.dir.display(),
            started.elapsed().as_secs_f64() * 1e3,
            snap.firmware_config.psci_version
        );
        let _terminal = terminal::InteractiveTerminal::enter();
        let VmStopped { reason, stuck } = run_vm_with(
            vm,
            PsciBackend::Engine(Arc::clone(&fw)),
            config.timeout,
            Arc::clone(&events),
            config.on_hibernate,
            RunExtras {
                memory: Some((memory.clone(), snap.layout)),
                on_running: None,
                restored: true,
                api: None,
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
        if events.enabled() {
            events.record(&events::Event::VmEnd {
                exit_status: outcome.status,
                reason: &outcome.message,
            });
        }
        outcome
    }
}
