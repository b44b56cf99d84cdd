//! The scenario table: which guest program each run boots, with how many vCPUs and which
//! parameters, which scenarios it must report, and what each implementation is documented
//! not to offer (the only skips the judge accepts).

use std::time::Duration;

use super::{Against, Options};

/// vCPU counts of the CPU_ON race (every size has at least two racing callers).
pub(super) const RACE_SIZES: [u32; 5] = [3, 4, 8, 16, 64];
/// vCPUs of the extra race run under `vpsci run --report-on-pending`.
pub(super) const ON_PENDING_RACE_SIZE: u32 = 8;
/// vCPU counts of the power-call storm (hostile guest, docs/reliability.md).
pub(super) const STORM_SIZES: [u32; 2] = [8, 64];
/// Length of each storm in seconds, by default and with `--long`.
pub(super) const STORM_SECONDS: u32 = 60;
pub(super) const STORM_SECONDS_LONG: u32 = 600;
/// Length in seconds of each time-bound hostile run (SMCCC fuzzing, CPU_ON edges, system
/// calls racing storms), by default and with `--long`.
pub(super) const HOSTILE_SECONDS: u32 = 30;
pub(super) const HOSTILE_SECONDS_LONG: u32 = 600;
/// Resets of the reset-racing-a-storm run and of the reset-cycle leak run, by default and
/// with `--long`.
pub(super) const RACE_RESETS: u32 = 20;
pub(super) const RACE_RESETS_LONG: u32 = 200;
pub(super) const RESET_CYCLES: u32 = 20;
pub(super) const RESET_CYCLES_LONG: u32 = 1000;
/// vCPUs of the system-call races and the reset cycles.
pub(super) const SYSTEM_RACE_CPUS: u32 = 8;

/// `action` values of the system-race guest (see `guests/scenarios/src/bin/system_race.rs`).
pub(super) mod system_race_action {
    pub const SUSPEND: u32 = 1;
    pub const RESET: u32 = 2;
    pub const OFF2_REFUSED: u32 = 3;
    pub const OFF2_COMMIT: u32 = 4;
    pub const RESET_CYCLES: u32 = 5;
}

/// Which host-side check of the event log a hostile run gets
/// ([`super::hostile::check_log`]); such runs collect the whole log in a compact form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hostile {
    /// `smccc-fuzz`: the engine's error answers equal the log's.
    SmcccFuzz,
    /// `cpu-on-edges`: CPU_ON answers and the target's starts equal the log's.
    CpuOnEdges,
    /// SYSTEM_SUSPEND racing a storm: every other vCPU OFF at each commit.
    SuspendRace,
    /// SYSTEM_RESET racing a storm: nothing from another vCPU between a reset and the
    /// restart.
    ResetRace,
    /// Refused SYSTEM_OFF2 racing a storm: one refused event per INTERNAL_FAILURE.
    Off2Refused,
    /// SYSTEM_OFF2 committing in a storm: nothing from another vCPU after the event.
    Off2Commit,
    /// Reset cycles: vpsci's threads, descriptors and resident memory sampled twice.
    ResetCycles,
}

/// vCPUs of the AFFINITY_INFO-after-CPU_ON run.
const AFFINITY_RACE_SIZE: u32 = 8;
/// PSCI versions vpsci can be configured with.
const VERSIONS: [&str; 5] = ["0.2", "1.0", "1.1", "1.2", "1.3"];
/// The PSCI version vpsci offers when `--psci-version` is not given (README, `vpsci
/// --help`). Written here, not read from the engine, so a regression of the engine's
/// default fails `psci-version` instead of moving the expectation with it.
pub(super) const VPSCI_DEFAULT_VERSION: &str = "1.3";
/// The version runs whose meaning depends on it are pinned to (SYSTEM_OFF2 needs 1.3).
const PINNED_VERSION: &str = "1.3";
/// Cookie and vendor reset type the system-event guest passes (see its source).
pub(super) const WARM_COOKIE: u64 = 0x1234_5678_9abc_def0;
pub(super) const VENDOR_TYPE: u64 = 0x8000_0001;
pub(super) const VENDOR_COOKIE: u64 = 0xC0FF_EE00_0000_0042;

/// `action` values of the cpu-on-race guest (see `guests/scenarios/src/bin/cpu_on_race.rs`).
pub(super) mod race_action {
    /// Strict race: exactly one SUCCESS, every other answer ALREADY_ON.
    pub const STRICT: u32 = 0;
    /// ON_PENDING accepted as well (for `vpsci run --report-on-pending`).
    pub const ON_PENDING_ACCEPTED: u32 = 1;
    /// Strict race, and after the winner's SUCCESS every vCPU checks AFFINITY_INFO = ON.
    pub const AFFINITY_AFTER_SUCCESS: u32 = 2;
}

/// A call judged from the VMM's side: one that ends the VM, or a hibernate request the
/// VMM refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Terminal {
    Off,
    Hibernate,
    WarmReset,
    VendorReset,
    /// SYSTEM_OFF2(HIBERNATE_OFF) under `--on-hibernate refuse`: the guest itself checks
    /// that the call returns INTERNAL_FAILURE, then powers off; the event log must show
    /// the hibernate event marked `"refused": true`, then `off`, and vpsci must exit 0.
    RefusedHibernate,
}

impl Terminal {
    /// vpsci's exit status, the event log's name and the function KVM's PSCI reports for
    /// a call that ends the VM; `None` for a refused hibernate, which does not end it.
    pub(super) fn ending(self) -> Option<Ending> {
        let (status, event, function) = match self {
            Terminal::Off => (0, "off", "SYSTEM_OFF"),
            Terminal::Hibernate => (0, "hibernate", "SYSTEM_OFF2"),
            Terminal::WarmReset => (3, "warm_reset", "SYSTEM_RESET2"),
            Terminal::VendorReset => (3, "vendor_reset", "SYSTEM_RESET2"),
            Terminal::RefusedHibernate => return None,
        };
        Some(Ending {
            status,
            event,
            function,
        })
    }
}

/// How a VM-ending call must end a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ending {
    /// vpsci's exit status.
    pub(super) status: i32,
    /// The `system_event` name in vpsci's event log.
    pub(super) event: &'static str,
    /// The function vpsci names when KVM's own PSCI ended the VM.
    pub(super) function: &'static str,
}

/// One boot of one guest program.
#[derive(Debug, Clone)]
pub(super) struct Run {
    /// Unique name, also the image file name.
    pub(super) id: String,
    /// Binary in `guests/scenarios/src/bin`.
    pub(super) program: &'static str,
    pub(super) cpus: u32,
    /// `--psci-version` given to vpsci (never under KVM's or QEMU's PSCI).
    pub(super) psci_version: Option<&'static str>,
    /// The PSCI version the guest must see (patched into the image); `None`: any valid one.
    pub(super) expect_version: Option<&'static str>,
    pub(super) smc: bool,
    /// `--on-hibernate refuse` for vpsci.
    pub(super) refuse_hibernate: bool,
    /// `--report-on-pending` for vpsci.
    pub(super) report_on_pending: bool,
    /// `--on-reset restart` for vpsci (else `exit`): the guest boots `restarts + 1` times.
    pub(super) restarts: Option<u32>,
    /// A hostile run: collect the whole event log and check it ([`Hostile`]).
    pub(super) hostile: Option<Hostile>,
    pub(super) iterations: u32,
    pub(super) action: u32,
    /// Every scenario this run's guest reports (in order).
    pub(super) scenarios: Vec<String>,
    pub(super) terminal: Option<(String, Terminal)>,
    /// The guest reports only one of `scenarios` (the implementation picks which, e.g. its
    /// PSCI version); the others are skipped for this reason once the run ended cleanly
    /// and reported exactly one.
    pub(super) one_of: Option<&'static str>,
    /// The implementation cannot be configured for this run: it is not booted and every
    /// scenario is skipped for this (documented) reason.
    pub(super) not_offered: Option<&'static str>,
    /// Wall-time limit for the VMM.
    pub(super) timeout: Duration,
}

impl Run {
    pub(super) fn new(
        id: impl Into<String>,
        program: &'static str,
        cpus: u32,
        scenarios: &[&str],
    ) -> Run {
        Run {
            id: id.into(),
            program,
            cpus,
            psci_version: None,
            expect_version: None,
            smc: false,
            refuse_hibernate: false,
            report_on_pending: false,
            restarts: None,
            hostile: None,
            iterations: 0,
            action: 0,
            scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
            terminal: None,
            one_of: None,
            not_offered: None,
            timeout: Duration::from_secs(60),
        }
    }

    /// Pins the PSCI version for vpsci (`--psci-version`) and tells the guest to expect it.
    fn pin_version(&mut self, against: Against, version: &'static str) {
        if against == Against::Vpsci {
            self.psci_version = Some(version);
            self.expect_version = Some(version);
        }
    }
}

const QEMU_NO_SYSTEM_SUSPEND: &str = "QEMU does not implement SYSTEM_SUSPEND (optional)";
const QEMU_NO_OFF2: &str = "QEMU's PSCI is 1.1; SYSTEM_OFF2 needs PSCI 1.3";
const QEMU_NO_RESET2: &str = "QEMU does not implement SYSTEM_RESET2 (optional)";
const QEMU_VERSION_FIXED: &str = "QEMU's PSCI version cannot be selected";
const QEMU_NO_REFUSE: &str = "QEMU has no operator policy to refuse a hibernate request";
const QEMU_NO_ON_PENDING_OPTION: &str =
    "QEMU has no option to report ON_PENDING (vpsci --report-on-pending)";
const KVM_NO_SYSTEM_SUSPEND_DECISION: &str =
    "KVM has no SYSTEM_SUSPEND decision of its own: it offers the call only to a VMM that \
     enables KVM_CAP_ARM_SYSTEM_SUSPEND and decides it in userspace, which vpsci \
     --in-kernel-psci does not";
const KVM_NO_OFF2: &str =
    "KVM's PSCI is 1.1 here (Linux 6.12's default, which vpsci --in-kernel-psci keeps); \
     SYSTEM_OFF2 needs PSCI 1.3";
const KVM_VERSION_FIXED: &str = "vpsci --in-kernel-psci leaves KVM's PSCI version at KVM's default";
const KVM_NO_REFUSE: &str =
    "vpsci --on-hibernate refuse needs vpsci's engine; under KVM's PSCI SYSTEM_OFF2 ends the VM";
const KVM_NEVER_ON_PENDING: &str =
    "KVM never answers ON_PENDING: a CPU_ON target is ON from the moment the call succeeds";

/// Scenarios an implementation is documented not to offer (docs/conformance.md), by
/// exact name. A guest's SKIP of any other scenario, and any SKIP on vpsci, is a failure.
const DOCUMENTED_SKIPS: &[(Against, &str, &str)] = &[
    (
        Against::Qemu,
        "system-suspend-denied-other-on",
        QEMU_NO_SYSTEM_SUSPEND,
    ),
    (
        Against::Qemu,
        "system-suspend-denied-other-suspended",
        QEMU_NO_SYSTEM_SUSPEND,
    ),
    (
        Against::Qemu,
        "system-suspend-invalid-address",
        QEMU_NO_SYSTEM_SUSPEND,
    ),
    (
        Against::Qemu,
        "system-suspend-timer-wake-repeated",
        QEMU_NO_SYSTEM_SUSPEND,
    ),
    (
        Against::Qemu,
        "system-suspend-pending-interrupt",
        QEMU_NO_SYSTEM_SUSPEND,
    ),
    (Against::Qemu, "system-off2-features", QEMU_NO_OFF2),
    (Against::Qemu, "system-off2-nonzero-cookie", QEMU_NO_OFF2),
    (Against::Qemu, "system-off2-hibernate", QEMU_NO_OFF2),
    (Against::Qemu, "system-reset2-invalid-type", QEMU_NO_RESET2),
    (Against::Qemu, "system-reset2-warm", QEMU_NO_RESET2),
    (Against::Qemu, "system-reset2-vendor", QEMU_NO_RESET2),
    (Against::Kvm, "system-off2-features", KVM_NO_OFF2),
    (Against::Kvm, "system-off2-nonzero-cookie", KVM_NO_OFF2),
    (Against::Kvm, "system-off2-hibernate", KVM_NO_OFF2),
];

const QEMU_ENDING_UNREPORTED: &str =
    "QEMU ends the VM but reports no event type, reset type or cookie to check";

/// Why a VM-ending call's details cannot be checked on `against` (the VM did end as the
/// call asks), if they cannot: the scenario is then skipped for this documented reason.
pub(super) fn unverifiable_ending(against: Against, terminal: Terminal) -> Option<&'static str> {
    match (against, terminal) {
        (Against::Vpsci, _) | (_, Terminal::Off) => None,
        (Against::Qemu, _) => Some(QEMU_ENDING_UNREPORTED),
        // vpsci logs what KVM reported with the guest's SYSTEM_RESET2 / SYSTEM_OFF2 arguments.
        (Against::Kvm, _) => None,
    }
}

/// Why `against` is documented not to offer `scenario`, if it is.
pub(super) fn documented_skip(against: Against, scenario: &str) -> Option<&'static str> {
    DOCUMENTED_SKIPS
        .iter()
        .find(|(a, name, _)| *a == against && *name == scenario)
        .map(|(_, _, why)| *why)
}

/// Every run of the suite against `options.against`, in the order they execute; runs
/// without a scenario matching `options.filter` are left out.
pub(super) fn plan(options: &Options) -> Vec<Run> {
    let against = options.against;
    let (race_rounds, suspend_rounds) = if options.long { (1000, 200) } else { (100, 20) };
    let storm_seconds = if options.long {
        STORM_SECONDS_LONG
    } else {
        STORM_SECONDS
    };
    let mut basic = Run::new(
        "psci-basic",
        "psci-basic",
        4,
        &[
            "psci-version",
            "unknown-function-not-supported",
            "features-invalid-id-not-supported",
            "affinity-info-boot-cpu-on",
            "affinity-info-never-started-off",
            "affinity-info-levels",
            "cpu-on-context-id",
            "cpu-on-already-on",
            "cpu-on-invalid-mpidr",
            "migrate-info-type",
            "migrate-not-supported",
            "cpu-off-secondaries",
            "cpu-on-invalid-address",
            "cpu-on-misaligned-entry",
        ],
    );
    // Not pinned: `psci-version` checks vpsci's default.
    if against == Against::Vpsci {
        basic.expect_version = Some(VPSCI_DEFAULT_VERSION);
    }
    let mut runs = vec![basic];
    let race_timeout = |cpus: u32, rounds: u32| {
        Duration::from_secs(u64::from(cpus) * u64::from(rounds) / 10 + 120)
    };
    // One caller (the boot CPU) and one target: no race, but 100 OFF -> ON -> OFF cycles.
    let mut cycles = Run::new("cpu-on-after-off-repeated", "cpu-on-race", 2, &[]);
    cycles.scenarios = vec!["cpu-on-after-off-repeated".into()];
    cycles.iterations = race_rounds;
    cycles.action = race_action::STRICT;
    cycles.timeout = race_timeout(2, race_rounds);
    runs.push(cycles);
    for n in RACE_SIZES {
        let name = format!("cpu-on-race-{n}");
        let mut run = Run::new(name.clone(), "cpu-on-race", n, &[&name]);
        run.iterations = race_rounds;
        run.action = race_action::STRICT;
        // Generous: the limit only stops a hung run; 64 vCPUs under TCG are slow.
        run.timeout = race_timeout(n, race_rounds);
        runs.push(run);
    }
    let name = format!("cpu-on-race-{ON_PENDING_RACE_SIZE}-report-on-pending");
    let mut run = Run::new(name.clone(), "cpu-on-race", ON_PENDING_RACE_SIZE, &[&name]);
    run.iterations = race_rounds;
    run.action = race_action::ON_PENDING_ACCEPTED;
    run.report_on_pending = true;
    run.timeout = race_timeout(ON_PENDING_RACE_SIZE, race_rounds);
    run.not_offered = match against {
        Against::Vpsci => None,
        Against::Kvm => Some(KVM_NEVER_ON_PENDING),
        Against::Qemu => Some(QEMU_NO_ON_PENDING_OPTION),
    };
    runs.push(run);
    let name = format!("affinity-info-on-after-cpu-on-{AFFINITY_RACE_SIZE}");
    let mut run = Run::new(name.clone(), "cpu-on-race", AFFINITY_RACE_SIZE, &[&name]);
    run.iterations = race_rounds;
    run.action = race_action::AFFINITY_AFTER_SUCCESS;
    run.timeout = race_timeout(AFFINITY_RACE_SIZE, race_rounds);
    runs.push(run);
    // Hostile guest: power-call storms on pseudo-random targets for `storm_seconds`.
    for n in STORM_SIZES {
        let name = format!("power-storm-{n}");
        let mut run = Run::new(name.clone(), "power-storm", n, &[&name]);
        run.iterations = storm_seconds;
        // The storm's length, then booting and settling 64 vCPUs under nested TCG.
        run.timeout = Duration::from_secs(u64::from(storm_seconds) + 300);
        runs.push(run);
    }
    if against == Against::Vpsci {
        runs.extend(hostile_runs(options.long));
    }
    let mut suspend = Run::new(
        "cpu-suspend",
        "cpu-suspend",
        1,
        &["cpu-suspend-standby", "cpu-suspend-powerdown"],
    );
    // The power_state format (original or extended) depends on the version.
    suspend.pin_version(against, PINNED_VERSION);
    runs.push(suspend);
    let mut suspend = Run::new(
        "system-suspend",
        "system-suspend",
        2,
        &[
            "system-suspend-features",
            "system-suspend-denied-other-on",
            "system-suspend-denied-other-suspended",
            "system-suspend-invalid-address",
            "system-suspend-timer-wake-repeated",
            "system-suspend-pending-interrupt",
        ],
    );
    suspend.iterations = suspend_rounds;
    suspend.timeout = Duration::from_secs(120 + u64::from(suspend_rounds));
    suspend.pin_version(against, PINNED_VERSION);
    if against == Against::Kvm {
        suspend.not_offered = Some(KVM_NO_SYSTEM_SUSPEND_DECISION);
    }
    runs.push(suspend);
    let mut checks = Run::new(
        "system-event-checks",
        "system-event",
        1,
        &[
            "system-off2-features",
            "system-off2-nonzero-cookie",
            "system-reset2-features",
            "system-reset2-invalid-type",
            "system-off",
        ],
    );
    checks.terminal = Some(("system-off".into(), Terminal::Off));
    checks.pin_version(against, PINNED_VERSION);
    runs.push(checks);
    for (action, name, terminal) in [
        (1, "system-off2-hibernate", Terminal::Hibernate),
        (2, "system-reset2-warm", Terminal::WarmReset),
        (3, "system-reset2-vendor", Terminal::VendorReset),
    ] {
        let mut run = Run::new(name, "system-event", 1, &[name]);
        run.action = action;
        run.terminal = Some((name.to_string(), terminal));
        run.pin_version(against, PINNED_VERSION);
        runs.push(run);
    }
    let refused = "system-off2-refused-internal-failure";
    let mut run = Run::new(refused, "system-event", 1, &[refused]);
    run.action = 4;
    run.refuse_hibernate = true;
    run.terminal = Some((refused.to_string(), Terminal::RefusedHibernate));
    run.pin_version(against, PINNED_VERSION);
    run.not_offered = match against {
        Against::Vpsci => None,
        Against::Kvm => Some(KVM_NO_REFUSE),
        Against::Qemu => Some(QEMU_NO_REFUSE),
    };
    runs.push(run);
    match against {
        Against::Vpsci => {
            for v in VERSIONS {
                let name = format!("version-gating-{v}");
                let mut run = Run::new(name.clone(), "version-gating", 1, &[&name]);
                run.pin_version(against, v);
                runs.push(run);
            }
        }
        Against::Kvm | Against::Qemu => {
            // The version is fixed: one run, reported under the version it has.
            let mut run = Run::new("version-gating", "version-gating", 1, &[]);
            run.scenarios = VERSIONS
                .iter()
                .map(|v| format!("version-gating-{v}"))
                .collect();
            run.one_of = Some(if against == Against::Kvm {
                KVM_VERSION_FIXED
            } else {
                QEMU_VERSION_FIXED
            });
            runs.push(run);
        }
    }
    for smc in [false, true] {
        let name = if smc { "conduit-smc" } else { "conduit-hvc" };
        let mut run = Run::new(name, "conduit", 2, &[name]);
        run.smc = smc;
        runs.push(run);
    }
    runs.retain(|r| r.scenarios.iter().any(|s| options.matches(s)));
    runs
}

/// The hostile runs after the power storms (docs/reliability.md). Planned against vpsci
/// only: each is judged from vpsci's event log and options (`--on-reset restart`,
/// `--on-hibernate refuse`).
fn hostile_runs(long: bool) -> Vec<Run> {
    let seconds = if long {
        HOSTILE_SECONDS_LONG
    } else {
        HOSTILE_SECONDS
    };
    let (race_resets, cycles) = if long {
        (RACE_RESETS_LONG, RESET_CYCLES_LONG)
    } else {
        (RACE_RESETS, RESET_CYCLES)
    };
    // Booting and settling 8 vCPUs under nested TCG, on top of the run's own length.
    let timed = |s: u32| Duration::from_secs(u64::from(s) + 240);
    let mut runs = Vec::new();
    for smc in [false, true] {
        let name = if smc {
            "smccc-fuzz-smc"
        } else {
            "smccc-fuzz-hvc"
        };
        let mut run = Run::new(name, "smccc-fuzz", 4, &[name]);
        run.smc = smc;
        run.iterations = seconds;
        run.timeout = timed(seconds);
        run.hostile = Some(Hostile::SmcccFuzz);
        runs.push(run);
    }
    let mut run = Run::new("cpu-on-edges", "cpu-on-edges", 2, &["cpu-on-edges"]);
    run.iterations = seconds;
    run.timeout = timed(seconds);
    run.hostile = Some(Hostile::CpuOnEdges);
    runs.push(run);
    let n = SYSTEM_RACE_CPUS;
    let races = [
        (
            "system-suspend-race",
            system_race_action::SUSPEND,
            Hostile::SuspendRace,
        ),
        (
            "system-off2-refused-race",
            system_race_action::OFF2_REFUSED,
            Hostile::Off2Refused,
        ),
        (
            "system-off2-commit-race",
            system_race_action::OFF2_COMMIT,
            Hostile::Off2Commit,
        ),
    ];
    for (kind, action, hostile) in races {
        let name = format!("{kind}-{n}");
        let mut run = Run::new(name.clone(), "system-race", n, &[&name]);
        run.action = action;
        run.iterations = seconds;
        run.timeout = timed(seconds);
        run.hostile = Some(hostile);
        // SYSTEM_SUSPEND needs PSCI 1.0 and SYSTEM_OFF2 1.3.
        run.pin_version(Against::Vpsci, PINNED_VERSION);
        match hostile {
            Hostile::Off2Refused => run.refuse_hibernate = true,
            Hostile::Off2Commit => run.terminal = Some((name.clone(), Terminal::Hibernate)),
            _ => {}
        }
        runs.push(run);
    }
    for (kind, action, hostile, resets) in [
        (
            "system-reset-race",
            system_race_action::RESET,
            Hostile::ResetRace,
            race_resets,
        ),
        (
            "reset-cycles",
            system_race_action::RESET_CYCLES,
            Hostile::ResetCycles,
            cycles,
        ),
    ] {
        let name = format!("{kind}-{n}");
        let mut run = Run::new(name.clone(), "system-race", n, &[&name]);
        run.action = action;
        run.iterations = resets;
        run.restarts = Some(resets);
        // A cycle (rebuilding the KVM VM, booting 8 vCPUs) took 0.8-2.7 s nested; the limit
        // only stops a hung run on a loaded host.
        run.timeout = Duration::from_secs(u64::from(resets) * 6 + 240);
        run.hostile = Some(hostile);
        runs.push(run);
    }
    runs
}

/// Every reason a scenario may be skipped for, with the implementation it applies to.
#[cfg(test)]
pub(super) fn every_skip_reason() -> Vec<(Against, &'static str)> {
    let mut reasons: Vec<(Against, &'static str)> = DOCUMENTED_SKIPS
        .iter()
        .map(|(a, _, why)| (*a, *why))
        .collect();
    reasons.push((Against::Qemu, QEMU_ENDING_UNREPORTED));
    for against in [Against::Vpsci, Against::Kvm, Against::Qemu] {
        let options = Options {
            against,
            ..Options::default()
        };
        for run in plan(&options) {
            reasons.extend(run.not_offered.map(|why| (against, why)));
            reasons.extend(run.one_of.map(|why| (against, why)));
        }
    }
    reasons.sort();
    reasons.dedup();
    reasons
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::conformance) fn reset_run() -> Run {
        let mut run = Run::new("w", "system-event", 1, &["system-reset2-warm"]);
        run.terminal = Some(("system-reset2-warm".into(), Terminal::WarmReset));
        run
    }

    /// The planned run of `scenario` against `against`.
    pub(in crate::conformance) fn planned(against: Against, scenario: &str) -> Run {
        let options = Options {
            against,
            ..Options::default()
        };
        let mut runs: Vec<Run> = plan(&options)
            .into_iter()
            .filter(|r| r.scenarios.iter().any(|s| s == scenario))
            .collect();
        assert_eq!(runs.len(), 1, "{scenario}");
        runs.remove(0)
    }

    /// The planned run of the refused-hibernate scenario.
    pub(in crate::conformance) fn refused_run() -> Run {
        planned(Against::Vpsci, "system-off2-refused-internal-failure")
    }

    #[test]
    fn the_refused_hibernate_run_asks_vpsci_to_refuse() {
        let run = refused_run();
        assert_eq!(run.program, "system-event");
        assert_eq!(run.action, 4);
        assert!(run.refuse_hibernate);
        assert_eq!(
            run.terminal,
            Some((
                "system-off2-refused-internal-failure".to_string(),
                Terminal::RefusedHibernate
            ))
        );
    }

    #[test]
    fn the_filter_keeps_only_runs_with_a_matching_scenario() {
        let options = Options {
            filter: Some("race-64".into()),
            ..Options::default()
        };
        let runs = plan(&options);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].scenarios, ["cpu-on-race-64"]);
        assert_eq!(runs[0].cpus, 64);
        assert_eq!(runs[0].iterations, 100);
    }

    #[test]
    fn every_race_has_two_callers_and_the_single_caller_run_is_not_called_a_race() {
        for against in [Against::Vpsci, Against::Kvm, Against::Qemu] {
            let options = Options {
                against,
                ..Options::default()
            };
            for run in plan(&options).iter().filter(|r| r.program == "cpu-on-race") {
                let callers = run.cpus - 1;
                let single = run.scenarios[0] == "cpu-on-after-off-repeated";
                assert_eq!(single, callers == 1, "{}", run.id);
                assert!(
                    single || !run.scenarios[0].contains("after-off"),
                    "{}",
                    run.id
                );
            }
        }
        assert_eq!(planned(Against::Vpsci, "cpu-on-after-off-repeated").cpus, 2);
        assert_eq!(planned(Against::Vpsci, "cpu-on-race-3").cpus, 3);
    }

    #[test]
    fn long_mode_runs_1000_race_rounds() {
        let options = Options {
            long: true,
            ..Options::default()
        };
        for run in plan(&options).iter().filter(|r| r.program == "cpu-on-race") {
            assert_eq!(run.iterations, 1000, "{}", run.id);
        }
    }

    #[test]
    fn only_the_on_pending_run_reports_on_pending_and_accepts_it() {
        let runs = plan(&Options::default());
        let on_pending: Vec<&Run> = runs.iter().filter(|r| r.report_on_pending).collect();
        assert_eq!(on_pending.len(), 1);
        assert_eq!(on_pending[0].action, race_action::ON_PENDING_ACCEPTED);
        assert!(runs
            .iter()
            .filter(|r| !r.report_on_pending)
            .all(|r| r.program != "cpu-on-race" || r.action != race_action::ON_PENDING_ACCEPTED));
    }

    #[test]
    fn vpsci_runs_that_depend_on_the_version_are_pinned_and_psci_basic_checks_the_default() {
        for scenario in [
            "cpu-suspend-standby",
            "system-suspend-features",
            "system-off2-features",
            "system-off2-hibernate",
            "system-reset2-warm",
            "system-reset2-vendor",
            "system-off2-refused-internal-failure",
        ] {
            let run = planned(Against::Vpsci, scenario);
            assert_eq!(run.psci_version, Some("1.3"), "{scenario}");
            assert_eq!(run.expect_version, Some("1.3"), "{scenario}");
        }
        let basic = planned(Against::Vpsci, "psci-version");
        assert_eq!(basic.psci_version, None);
        assert_eq!(basic.expect_version, Some(VPSCI_DEFAULT_VERSION));
        for against in [Against::Kvm, Against::Qemu] {
            let options = Options {
                against,
                ..Options::default()
            };
            assert!(plan(&options).iter().all(|r| r.psci_version.is_none()));
        }
    }

    #[test]
    fn vpsci_is_documented_to_offer_everything() {
        let runs = plan(&Options::default());
        assert!(runs
            .iter()
            .all(|r| r.not_offered.is_none() && r.one_of.is_none()));
        assert!(DOCUMENTED_SKIPS
            .iter()
            .all(|(a, _, _)| *a != Against::Vpsci));
    }

    #[test]
    fn documented_skips_name_real_scenarios() {
        for (against, scenario, _) in DOCUMENTED_SKIPS {
            planned(*against, scenario);
        }
    }

    #[test]
    fn every_skip_reason_is_in_the_conformance_docs() {
        let docs =
            std::fs::read_to_string(crate::paths::workspace_root().join("docs/conformance.md"))
                .unwrap();
        let docs = docs.split_whitespace().collect::<Vec<_>>().join(" ");
        for (against, why) in every_skip_reason() {
            assert!(
                docs.contains(why),
                "{against:?}: `{why}` is not in docs/conformance.md"
            );
        }
    }
}
