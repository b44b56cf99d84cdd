//! The QEMU backend: each run boots under QEMU's own PSCI (TCG).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use super::judge::RunOutput;
use super::plan::Run;
use crate::process::run_captured;
use crate::provision::{self, Host};

/// QEMU's command line for one run.
fn qemu_command(qemu: &Path, run: &Run, image: &Path) -> Command {
    let machine = if run.smc {
        "virt,gic-version=3,virtualization=on"
    } else {
        "virt,gic-version=3"
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", machine, "-cpu", "max"])
        .args(["-smp", &run.cpus.to_string(), "-m", "256M"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-nic", "none", "-kernel"])
        .arg(image);
    cmd
}

pub(super) fn run_on_qemu(
    runs: &[Run],
    images: &BTreeMap<String, PathBuf>,
) -> Result<Vec<RunOutput>> {
    let qemu = match provision::prepare_machine()? {
        Host::Nested(assets) => assets.qemu,
        Host::Native => PathBuf::from("qemu-system-aarch64"),
    };
    let mut outputs = Vec::new();
    for run in runs {
        if run.not_offered.is_some() {
            outputs.push(RunOutput::default());
            continue;
        }
        let image = &images[&run.id];
        let started = Instant::now();
        let finished = run_captured(&mut qemu_command(&qemu, run, image), run.timeout)?;
        let problem = if finished.timed_out {
            Some(format!("QEMU killed after {} s", run.timeout.as_secs()))
        } else {
            None
        };
        outputs.push(RunOutput {
            lines: finished.output.lines().map(str::to_string).collect(),
            exit: finished.code,
            problem,
            elapsed: started.elapsed(),
            ..RunOutput::default()
        });
    }
    Ok(outputs)
}
