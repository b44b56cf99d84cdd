//! Taking the samples on arm64 KVM: each one boots a fresh VM through
//! vpsci's own run loop ([`vpsci::run::run_session`]) with the variant's PSCI
//! routing, then checks and measures what the guest left behind.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vpsci::cli::{HibernateAction, ResetAction};
use vpsci::events::{Event, EventSink};
use vpsci::fdt::IdleState;
use vpsci::layout::GuestLayout;
use vpsci::metrics::{ExitCounts, VCPU_EXITS};
use vpsci::run::{run_session, RunOutcome, Session, EXIT_POWERED_OFF};
use vpsci::vm::{ImageSource, VmOptions};
use vpsci_firmware::{Conduit, FirmwareConfig, PsciVersion};
use vpsci_kvm::{KvmHost, SmcccRouting};

use crate::guests::{
    self, fid, slot, Batches, Check, TimedCall, BATCH_TIMES, DONE, FAILED, RESULTS,
};
use crate::linux;
use crate::plan::{Case, Step, Variant, Workload};
use crate::report::{self, Failure, Sample};

/// Where the Linux workloads get their kernel and userland.
#[derive(Debug, Clone)]
pub struct LinuxAssets {
    /// arm64 Linux `Image`.
    pub image: PathBuf,
    /// Static busybox for the guest's initramfs.
    pub busybox: Vec<u8>,
}

/// What a workload measured.
struct Measured {
    value: f64,
    detail: serde_json::Value,
}

/// Takes one sample.
pub fn sample(
    host: &KvmHost,
    case: &Case,
    step: &Step,
    linux: Option<&LinuxAssets>,
) -> Result<Sample, Failure> {
    let before = VCPU_EXITS.snapshot();
    let started = Instant::now();
    let measured = match case.workload {
        Workload::PsciVersion | Workload::AffinityInfo | Workload::PsciFeatures => {
            call_loop(host, case, step.variant)
        }
        Workload::CpuOnOff => cpu_on_off(host, case, step.variant),
        Workload::BringUp => bring_up(host, case, step.variant),
        Workload::SystemReset => system_reset(host, case, step.variant),
        Workload::LinuxBoot | Workload::LinuxHotplug | Workload::LinuxIdle => match linux {
            Some(assets) => linux_workload(host, case, step.variant, assets),
            None => Err(anyhow::anyhow!("no Linux image given")),
        },
    };
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let exits = VCPU_EXITS.snapshot().since(&before);
    match measured {
        Ok(m) => Ok(Sample {
            workload: case.workload,
            cpus: case.cpus,
            variant: step.variant,
            round: step.round,
            value: m.value,
            unit: case.workload.unit(),
            work: case.work,
            wall_ms,
            exits,
            detail: m.detail,
        }),
        Err(e) => Err(Failure {
            workload: case.workload,
            cpus: case.cpus,
            variant: step.variant,
            round: step.round,
            error: format!("{e:#}"),
        }),
    }
}

/// The firmware every vpsci variant runs: PSCI 1.3 over HVC, the defaults otherwise.
fn firmware() -> FirmwareConfig {
    FirmwareConfig {
        psci_version: PsciVersion::V1_3,
        conduit: Conduit::Hvc,
        ..FirmwareConfig::default()
    }
}

fn routing(variant: Variant) -> Result<SmcccRouting> {
    Ok(match variant {
        Variant::InKernel => SmcccRouting::kernel_psci(),
        Variant::VpsciKept => SmcccRouting::userspace_psci()
            .keep_in_kernel(fid::CPU_SUSPEND_32)?
            .keep_in_kernel(fid::CPU_SUSPEND_64)?,
        _ => SmcccRouting::userspace_psci(),
    })
}

/// How to boot one sample's VM.
struct Boot {
    image: ImageSource,
    initrd: Option<PathBuf>,
    cmdline: String,
    memory_mib: u64,
    on_reset: ResetAction,
    /// The event log (only the reset workload keeps one, for its phase times).
    events: Arc<dyn EventSink>,
}

impl Boot {
    /// A bare-metal image in 64 MiB that powers off at its end.
    fn bare(image: Vec<u8>) -> Boot {
        Boot {
            image: ImageSource::Bytes(image),
            initrd: None,
            cmdline: String::new(),
            memory_mib: 64,
            on_reset: ResetAction::Exit,
            events: Arc::new(vpsci::events::NoEvents),
        }
    }
}

/// The VM a sample boots: the case's vCPUs, the variant's routing and idle states.
fn vm_options(case: &Case, variant: Variant, boot: &Boot) -> Result<VmOptions> {
    let firmware = firmware();
    let idle_states = if variant.idle_states(case.workload) {
        vec![IdleState::psci_standby(&firmware)]
    } else {
        Vec::new()
    };
    Ok(VmOptions {
        layout: GuestLayout::new(case.cpus, boot.memory_mib << 20)?,
        image: boot.image.clone(),
        initrd: boot.initrd.clone(),
        cmdline: boot.cmdline.clone(),
        firmware,
        routing: routing(variant)?,
        idle_states,
        devices: Default::default(),
    })
}

fn run(
    host: &KvmHost,
    case: &Case,
    variant: Variant,
    boot: Boot,
    console: impl Write + Clone + Send + Sync + 'static,
) -> Result<(RunOutcome, GuestMemoryMmap)> {
    let vm = vm_options(case, variant, &boot)?;
    let memory = vm.layout.create_memory()?;
    let session = Session {
        vm,
        on_reset: boot.on_reset,
        on_hibernate: HibernateAction::PowerOff,
        timeout: Some(case.timeout()),
        empty_handler: variant == Variant::Floor,
        console: Arc::new(move || Box::new(console.clone()) as Box<dyn Write + Send>),
        events: boot.events,
    };
    let outcome = run_session(host, &session, &memory);
    Ok((outcome, memory))
}

fn read(memory: &GuestMemoryMmap, offset: u64) -> Result<u64> {
    memory
        .read_obj::<u64>(GuestAddress(RESULTS + offset))
        .context("reading the guest's result block")
}

/// Runs a bare-metal guest to SYSTEM_OFF and checks its result block.
fn run_bare(
    host: &KvmHost,
    case: &Case,
    variant: Variant,
    boot: Boot,
    console: ByteLog,
) -> Result<GuestMemoryMmap> {
    let (outcome, memory) = run(host, case, variant, boot, console)?;
    if outcome.status != EXIT_POWERED_OFF {
        bail!("vpsci exit status {}: {}", outcome.status, outcome.message);
    }
    match read(&memory, slot::STATUS)? {
        DONE => Ok(memory),
        FAILED => {
            let code = read(&memory, slot::CHECK)?;
            let what = Check::from_code(code).map_or("unknown check", Check::describe);
            bail!(
                "guest check failed: {what} (value {:#x}, {} left)",
                read(&memory, slot::VALUE)?,
                read(&memory, slot::LEFT)?
            )
        }
        other => bail!("the guest powered off without a result (status {other})"),
    }
}

/// Guest counter ticks between the result block's start and end, in microseconds.
fn timed_us(memory: &GuestMemoryMmap) -> Result<f64> {
    let start = read(memory, slot::START)?;
    let end = read(memory, slot::END)?;
    let freq = read(memory, slot::FREQUENCY)?.max(1);
    Ok(end.saturating_sub(start) as f64 * 1e6 / freq as f64)
}

/// Microseconds per unit of work: the median over the guest's timed batches
/// (a batch the shared host preempted does not move it), with the mean over
/// all of them and the fastest and slowest batch for the record.
fn batched_us(memory: &GuestMemoryMmap, batches: Batches) -> Result<Measured> {
    let freq = read(memory, slot::FREQUENCY)?.max(1) as f64;
    let mut times = Vec::new();
    for k in 0..=batches.count {
        let at = memory
            .read_obj::<u64>(GuestAddress(BATCH_TIMES + 8 * k))
            .context("reading the guest's batch times")?;
        times.push(at);
    }
    let per_unit: Vec<f64> = times
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]) as f64 * 1e6 / freq / batches.size as f64)
        .collect();
    let total = times[times.len() - 1].saturating_sub(times[0]) as f64 * 1e6 / freq;
    let mut sorted = per_unit.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Measured {
        value: report::median(&per_unit).unwrap_or(0.0),
        detail: json!({
            "batches": batches.count,
            "per_batch": batches.size,
            "mean_us": total / batches.total() as f64,
            "fastest_batch_us": sorted.first(),
            "slowest_batch_us": sorted.last(),
        }),
    })
}

fn call_loop(host: &KvmHost, case: &Case, variant: Variant) -> Result<Measured> {
    let call = match case.workload {
        Workload::PsciVersion => TimedCall {
            function: fid::PSCI_VERSION,
            args: [0, 0],
        },
        Workload::AffinityInfo => TimedCall {
            function: fid::AFFINITY_INFO,
            args: [guests::mpidr(0), 0],
        },
        _ => TimedCall {
            function: fid::PSCI_FEATURES,
            args: [u64::from(fid::CPU_ON), 0],
        },
    };
    let batches = Batches::split(u64::from(case.work));
    let image = guests::call_loop(call, batches);
    let memory = run_bare(host, case, variant, Boot::bare(image), ByteLog::default())?;
    let answer = read(&memory, slot::WARMUP)? as u32;
    let expected_ok = match (case.workload, variant) {
        // The empty handler answers 0 to everything.
        (_, Variant::Floor) => answer == 0,
        (Workload::PsciVersion, Variant::InKernel) => answer >> 16 >= 1 && answer >> 31 == 0,
        (Workload::PsciVersion, _) => answer == PsciVersion::V1_3.encoded(),
        // AFFINITY_INFO of the running boot CPU: ON; PSCI_FEATURES(CPU_ON): supported, no flags.
        _ => answer == 0,
    };
    if !expected_ok {
        bail!(
            "{} answered {answer:#x}, which {variant} must not answer",
            case.workload
        );
    }
    let mut measured = batched_us(&memory, batches)?;
    measured.detail["answer"] = json!(format!("{answer:#x}"));
    if variant == Variant::Vpsci {
        // The image is never run: `b .`.
        let boot = Boot::bare(0x1400_0000u32.to_le_bytes().to_vec());
        measured.detail["one_reg_read_us"] = json!(one_reg_read_us(host, case, variant, &boot)?);
    }
    Ok(measured)
}

/// What one `KVM_GET_ONE_REG` of a core register costs here (us, mean of
/// 1000): the price of each argument register the engine reads at a
/// forwarded call, which the empty handler never reads.
fn one_reg_read_us(host: &KvmHost, case: &Case, variant: Variant, boot: &Boot) -> Result<f64> {
    const READS: u32 = 1000;
    let options = vm_options(case, variant, boot)?;
    let memory = options.layout.create_memory()?;
    let vm = vpsci::vm::build(host, &options, &memory, Box::new(std::io::sink()))?;
    let vcpu = vm.vcpus.first().context("a VM without vCPUs")?;
    let started = Instant::now();
    for _ in 0..READS {
        vcpu.get_core(vpsci_kvm::CoreReg::X(1))?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(READS))
}

fn cpu_on_off(host: &KvmHost, case: &Case, variant: Variant) -> Result<Measured> {
    let batches = Batches::split(u64::from(case.work));
    let image = guests::cpu_on_off_cycle(batches);
    let memory = run_bare(host, case, variant, Boot::bare(image), ByteLog::default())?;
    batched_us(&memory, batches)
}

fn bring_up(host: &KvmHost, case: &Case, variant: Variant) -> Result<Measured> {
    let image = guests::bring_up(case.cpus);
    let memory = run_bare(host, case, variant, Boot::bare(image), ByteLog::default())?;
    Ok(Measured {
        value: timed_us(&memory)? / 1e3,
        detail: json!({
            "started": case.cpus - 1,
            "cpu_on": cpu_on_profile(&memory, case.cpus)?,
        }),
    })
}

/// Where a bring-up's time goes, per started vCPU (medians and maxima, us):
/// the CPU_ON call as its caller sees it, and the time from the call to the
/// target's first instruction.
fn cpu_on_profile(memory: &GuestMemoryMmap, cpus: u32) -> Result<serde_json::Value> {
    let freq = read(memory, slot::FREQUENCY)?.max(1) as f64;
    let at = |table: u64, i: u32| -> Result<u64> {
        memory
            .read_obj::<u64>(GuestAddress(table + 8 * u64::from(i)))
            .context("reading the guest's CPU_ON times")
    };
    let mut call = Vec::new();
    let mut start = Vec::new();
    for i in 1..cpus {
        let called = at(guests::CPU_ON_CALLED, i)?;
        let us = |t: u64| t.saturating_sub(called) as f64 * 1e6 / freq;
        call.push(us(at(guests::CPU_ON_RETURNED, i)?));
        start.push(us(at(guests::STARTED_AT, i)?));
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "call_us_median": report::median(&call),
        "call_us_max": max(&call),
        "start_us_median": report::median(&start),
        "start_us_max": max(&start),
    }))
}

fn system_reset(host: &KvmHost, case: &Case, variant: Variant) -> Result<Measured> {
    let resets = u64::from(case.work);
    let phases = Arc::new(PhaseLog::default());
    let boot = Boot {
        on_reset: ResetAction::Restart,
        events: phases.clone(),
        ..Boot::bare(guests::reset_cycle(case.cpus, resets))
    };
    let build_options = vm_options(case, variant, &boot)?;
    let console = ByteLog::default();
    let memory = run_bare(host, case, variant, boot, console.clone())?;
    let boots = read(&memory, slot::BOOTS)?;
    if boots != resets {
        bail!("the guest reset {boots} times, not {resets}");
    }
    let bytes = console.bytes();
    let times = reset_times(&bytes)?;
    if times.len() as u64 != resets {
        bail!("{} resets timed, {resets} expected", times.len());
    }
    // Profile: where a reset's time goes, and what assembling such a VM costs alone.
    let split = reset_phases(&bytes, &phases.marks());
    let build_started = Instant::now();
    let vm = vpsci::vm::build(host, &build_options, &memory, Box::new(std::io::sink()))?;
    let build_ms = build_started.elapsed().as_secs_f64() * 1e3;
    let drop_started = Instant::now();
    drop(vm);
    let drop_ms = drop_started.elapsed().as_secs_f64() * 1e3;
    Ok(Measured {
        value: report::median(&times).unwrap_or(0.0),
        detail: json!({
            "resets": resets,
            "reset_ms": times,
            "phase_ms": split,
            "vm_build_ms": build_ms,
            "vm_drop_ms": drop_ms,
        }),
    })
}

/// What the reset workload's event log marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseMark {
    /// The system event was decided (engine: after quiescing; KVM: reported).
    Decided,
    /// Every vCPU thread stopped; the VM is rebuilt next.
    Restarting,
}

/// An event sink that keeps only the times of the reset's phase marks.
#[derive(Default)]
struct PhaseLog(Mutex<Vec<(PhaseMark, Instant)>>);

impl PhaseLog {
    fn marks(&self) -> Vec<(PhaseMark, Instant)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl EventSink for PhaseLog {
    fn enabled(&self) -> bool {
        true
    }

    fn record(&self, event: &Event<'_>) {
        let mark = match event {
            Event::SystemEvent { .. } => PhaseMark::Decided,
            Event::VmRestart { .. } => PhaseMark::Restarting,
            _ => return,
        };
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((mark, Instant::now()));
    }
}

/// Each reset split in three (ms): from the guest's last act to the decision,
/// from the decision to every vCPU thread stopped, from there to the guest's
/// first act in the rebuilt VM (firmware reset, VM assembly, threads started).
fn reset_phases(bytes: &[(u8, Instant)], marks: &[(PhaseMark, Instant)]) -> serde_json::Value {
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    let mut decide = Vec::new();
    let mut stop = Vec::new();
    let mut rebuild = Vec::new();
    for (i, &(byte, at)) in bytes.iter().enumerate() {
        if byte != guests::RESETTING {
            continue;
        }
        let after = |kind: PhaseMark, t: Instant| {
            marks
                .iter()
                .find(|(k, when)| *k == kind && *when >= t)
                .map(|m| m.1)
        };
        let booted = bytes[i..]
            .iter()
            .find(|(b, _)| *b == guests::BOOTED)
            .map(|b| b.1);
        let (Some(decided), Some(booted)) = (after(PhaseMark::Decided, at), booted) else {
            continue;
        };
        let Some(restarting) = after(PhaseMark::Restarting, decided) else {
            continue;
        };
        decide.push(ms(at, decided));
        stop.push(ms(decided, restarting));
        rebuild.push(ms(restarting, booted));
    }
    json!({
        "to_decision": decide,
        "to_stopped": stop,
        "to_running": rebuild,
    })
}

/// Milliseconds from each [`guests::RESETTING`] byte to the next [`guests::BOOTED`].
fn reset_times(bytes: &[(u8, Instant)]) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    let mut pending: Option<Instant> = None;
    for &(byte, at) in bytes {
        match byte {
            guests::RESETTING => pending = Some(at),
            guests::BOOTED => {
                if let Some(reset) = pending.take() {
                    times.push(at.duration_since(reset).as_secs_f64() * 1e3);
                }
            }
            other => bail!("unexpected console byte {other:#x} from the reset guest"),
        }
    }
    Ok(times)
}

fn linux_workload(
    host: &KvmHost,
    case: &Case,
    variant: Variant,
    assets: &LinuxAssets,
) -> Result<Measured> {
    // The idle guest sleeps past the window: 1 s to settle, the window, 3 s of margin.
    let idle_sleep = case.work + 4;
    let script = match case.workload {
        Workload::LinuxBoot => linux::boot_script(),
        Workload::LinuxHotplug => linux::hotplug_script(case.work),
        _ => linux::idle_script(idle_sleep),
    };
    let initrd = TempFile::new("initrd.cpio", &linux::initramfs(&assets.busybox, &script))?;
    let console = LineLog::default();
    let sampler = (case.workload == Workload::LinuxIdle)
        .then(|| IdleSampler::start(&console, Duration::from_secs(case.work.into())));
    let boot = Boot {
        image: ImageSource::File(assets.image.clone()),
        initrd: Some(initrd.path.clone()),
        cmdline: linux::CMDLINE.to_owned(),
        memory_mib: 512,
        on_reset: ResetAction::Exit,
        events: Arc::new(vpsci::events::NoEvents),
    };
    let started = Instant::now();
    let (outcome, _memory) = run(host, case, variant, boot, console.clone())?;
    console.stop_notifying();
    let window = sampler.map(IdleSampler::finish);
    let lines = console.lines();
    let tail = || {
        let start = lines.len().saturating_sub(15);
        lines[start..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    if outcome.status != EXIT_POWERED_OFF {
        bail!(
            "vpsci exit status {}: {}\nlast console lines:\n{}",
            outcome.status,
            outcome.message,
            tail()
        );
    }
    let find = |marker: &str| {
        lines
            .iter()
            .find_map(|l| Some((l, linux::after_marker(&l.text, marker)?)))
    };
    let missing =
        |marker: &str| anyhow::anyhow!("no `{marker}` line; last console lines:\n{}", tail());
    match case.workload {
        Workload::LinuxBoot => {
            let (init, _) = find(linux::INIT).ok_or_else(|| missing(linux::INIT))?;
            let (_, online) = find(linux::ONLINE).ok_or_else(|| missing(linux::ONLINE))?;
            let online = linux::value_prefix(online);
            let uptime_s = find(linux::UPTIME).and_then(|(_, rest)| {
                let number = rest.trim_start();
                let end = number
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .unwrap_or(number.len());
                number[..end].parse::<f64>().ok()
            });
            if online != linux::all_online(case.cpus) {
                bail!(
                    "CPUs online at init: {online}, expected {}",
                    linux::all_online(case.cpus)
                );
            }
            Ok(Measured {
                value: init.first.duration_since(started).as_secs_f64() * 1e3,
                detail: json!({ "online": online, "guest_uptime_s": uptime_s }),
            })
        }
        Workload::LinuxHotplug => {
            let (start, _) =
                find(linux::HOTPLUG_START).ok_or_else(|| missing(linux::HOTPLUG_START))?;
            let (end, rest) =
                find(linux::HOTPLUG_END).ok_or_else(|| missing(linux::HOTPLUG_END))?;
            let ok: u32 = linux::field(rest, "ok")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let online = linux::field(rest, "online").unwrap_or("?");
            if ok != case.work || online != linux::all_online(case.cpus) {
                bail!(
                    "{ok} of {} offline+online cycles succeeded, online at the end: {online}",
                    case.work
                );
            }
            let ms = end.first.duration_since(start.end).as_secs_f64() * 1e3;
            Ok(Measured {
                value: ms / f64::from(case.work),
                detail: json!({ "cycles": case.work, "total_ms": ms }),
            })
        }
        _ => {
            let (end, rest) = find(linux::IDLE_END).ok_or_else(|| missing(linux::IDLE_END))?;
            let Some(Some(window)) = window else {
                bail!(
                    "the idle window was never sampled (no `{}` line)",
                    linux::IDLE_START
                );
            };
            if end.first < window.closed {
                bail!("the guest ended its idle sleep before the window closed (a loaded host?)");
            }
            let number = |key: &str| linux::field(rest, key).and_then(|v| v.parse::<u64>().ok());
            let psci_state = linux::field(rest, "psci_state") == Some("yes");
            let offered = variant.idle_states(case.workload);
            let kernel_log = || {
                lines
                    .iter()
                    .filter_map(|l| l.text.strip_prefix(linux::LOG))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if psci_state != offered {
                bail!(
                    "the guest {} a PSCI idle state although the device tree {} one; \
                     its PSCI and cpuidle messages:\n{}",
                    if psci_state { "has" } else { "has no" },
                    if offered { "offered" } else { "offered no" },
                    kernel_log()
                );
            }
            let state1 = number("state1").unwrap_or(0);
            if offered && state1 == 0 {
                bail!("the guest never entered its PSCI idle state");
            }
            Ok(Measured {
                value: window.exits.total() as f64,
                detail: json!({
                    "window_s": case.work,
                    "window_exits": window.exits,
                    "cpuidle_wfi_entries": number("state0"),
                    "cpuidle_psci_entries": state1,
                }),
            })
        }
    }
}

/// Console sink for bare-metal guests: every byte with the time it arrived.
#[derive(Clone, Default)]
struct ByteLog(Arc<Mutex<Vec<(u8, Instant)>>>);

impl ByteLog {
    fn bytes(&self) -> Vec<(u8, Instant)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Write for ByteLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.extend(buf.iter().map(|&b| (b, now)));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A console line with the times of its first byte and its newline.
#[derive(Debug, Clone)]
struct Line {
    text: String,
    first: Instant,
    end: Instant,
}

#[derive(Default)]
struct LineState {
    lines: Vec<Line>,
    current: Vec<u8>,
    first: Option<Instant>,
    /// Told when a line equal to [`linux::IDLE_START`] ends.
    idle_started: Option<mpsc::Sender<Instant>>,
}

/// Console sink for Linux guests: timed lines.
#[derive(Clone, Default)]
struct LineLog(Arc<Mutex<LineState>>);

impl LineLog {
    fn lines(&self) -> Vec<Line> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .clone()
    }

    /// Drops a pending idle notification (the guest is gone without sending it).
    fn stop_notifying(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .idle_started = None;
    }
}

impl Write for LineLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for &byte in buf {
            if byte == b'\n' {
                let text = String::from_utf8_lossy(&state.current)
                    .trim_end_matches('\r')
                    .to_owned();
                state.current.clear();
                let first = state.first.take().unwrap_or(now);
                if text.contains(linux::IDLE_START) {
                    if let Some(tx) = state.idle_started.take() {
                        let _ = tx.send(now);
                    }
                }
                state.lines.push(Line {
                    text,
                    first,
                    end: now,
                });
            } else {
                state.first.get_or_insert(now);
                state.current.push(byte);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Exits counted over the idle window.
struct IdleWindow {
    exits: ExitCounts,
    closed: Instant,
}

/// Counts the exits of a window that opens 1 s after the guest says it is
/// idle, on the host's clock, so the marker lines' own exits stay outside it.
struct IdleSampler {
    thread: std::thread::JoinHandle<Option<IdleWindow>>,
}

impl IdleSampler {
    fn start(console: &LineLog, window: Duration) -> IdleSampler {
        let (tx, rx) = mpsc::channel();
        console
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .idle_started = Some(tx);
        let thread = std::thread::spawn(move || {
            // Disconnected (the console sink is gone) when the VM ended without the marker.
            rx.recv().ok()?;
            std::thread::sleep(Duration::from_secs(1));
            let before = VCPU_EXITS.snapshot();
            std::thread::sleep(window);
            let exits = VCPU_EXITS.snapshot().since(&before);
            Some(IdleWindow {
                exits,
                closed: Instant::now(),
            })
        });
        IdleSampler { thread }
    }

    fn finish(self) -> Option<IdleWindow> {
        self.thread.join().ok().flatten()
    }
}

/// A file removed when dropped.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Result<TempFile> {
        let path = std::env::temp_dir().join(format!("vpsci-bench-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(TempFile { path })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
