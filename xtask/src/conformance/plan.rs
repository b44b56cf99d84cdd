//! The scenario table: which guest program each run boots, with how many vCPUs and which
//! parameters, and which scenarios it must report.

use std::time::Duration;

use super::{Against, Options};

/// vCPU counts of the CPU_ON race.
const RACE_SIZES: [u32; 5] = [2, 4, 8, 16, 64];
/// PSCI versions vpsci can be configured with.
const VERSIONS: [&str; 5] = ["0.2", "1.0", "1.1", "1.2", "1.3"];
/// Cookie and vendor reset type the system-event guest passes (see its source).
pub(super) const WARM_COOKIE: u64 = 0x1234_5678_9abc_def0;
pub(super) const VENDOR_TYPE: u64 = 0x8000_0001;
pub(super) const VENDOR_COOKIE: u64 = 0xC0FF_EE00_0000_0042;

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
    /// vpsci's exit status and the event log's name for a call that ends the VM; `None`
    /// for a refused hibernate, which does not end it.
    pub(super) fn ending(self) -> Option<(i32, &'static str)> {
        match self {
            Terminal::Off => Some((0, "off")),
            Terminal::Hibernate => Some((0, "hibernate")),
            Terminal::WarmReset => Some((3, "warm_reset")),
            Terminal::VendorReset => Some((3, "vendor_reset")),
            Terminal::RefusedHibernate => None,
        }
    }
}

/// What to do with an expected scenario the guest did not report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unreported {
    Fail,
    Skip(String),
}

/// One boot of one guest program.
#[derive(Debug, Clone)]
pub(super) struct Run {
    /// Unique name, also the image file name.
    pub(super) id: String,
    /// Binary in `guests/scenarios/src/bin`.
    pub(super) program: &'static str,
    pub(super) cpus: u32,
    /// `--psci-version` for vpsci; `None` = the implementation's default (not checked).
    pub(super) psci_version: Option<&'static str>,
    pub(super) smc: bool,
    /// `--on-hibernate refuse` for vpsci (QEMU has no such policy).
    pub(super) refuse_hibernate: bool,
    pub(super) iterations: u32,
    pub(super) action: u32,
    /// Scenarios this run must report (in order).
    pub(super) scenarios: Vec<String>,
    pub(super) terminal: Option<(String, Terminal)>,
    pub(super) unreported: Unreported,
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
            smc: false,
            refuse_hibernate: false,
            iterations: 0,
            action: 0,
            scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
            terminal: None,
            unreported: Unreported::Fail,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Every run of the suite, in the order they execute.
pub(super) fn plan(options: &Options) -> Vec<Run> {
    let qemu = options.against == Against::Qemu;
    let (race_rounds, suspend_rounds) = if options.long { (1000, 200) } else { (100, 20) };
    let mut runs = vec![Run::new(
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
    )];
    for n in RACE_SIZES {
        let name = format!("cpu-on-race-{n}");
        let mut run = Run::new(name.clone(), "cpu-on-race", n, &[&name]);
        run.iterations = race_rounds;
        // Generous: the limit only stops a hung run; 64 vCPUs under TCG are slow.
        run.timeout = Duration::from_secs(u64::from(n) * race_rounds as u64 / 10 + 120);
        runs.push(run);
    }
    runs.push(Run::new(
        "cpu-suspend",
        "cpu-suspend",
        1,
        &["cpu-suspend-standby", "cpu-suspend-powerdown"],
    ));
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
    runs.push(checks);
    for (action, name, terminal) in [
        (1, "system-off2-hibernate", Terminal::Hibernate),
        (2, "system-reset2-warm", Terminal::WarmReset),
        (3, "system-reset2-vendor", Terminal::VendorReset),
    ] {
        let mut run = Run::new(name, "system-event", 1, &[name]);
        run.action = action;
        run.terminal = Some((name.to_string(), terminal));
        runs.push(run);
    }
    let refused = "system-off2-refused-internal-failure";
    let mut run = Run::new(refused, "system-event", 1, &[refused]);
    run.action = 4;
    run.refuse_hibernate = true;
    run.terminal = Some((refused.to_string(), Terminal::RefusedHibernate));
    runs.push(run);
    if qemu {
        // QEMU's PSCI version is fixed: one run, reported under the version it has.
        let names: Vec<String> = VERSIONS
            .iter()
            .map(|v| format!("version-gating-{v}"))
            .collect();
        let mut run = Run::new("version-gating", "version-gating", 1, &[]);
        run.scenarios = names;
        run.unreported = Unreported::Skip("QEMU's PSCI version cannot be selected".into());
        runs.push(run);
    } else {
        for v in VERSIONS {
            let name = format!("version-gating-{v}");
            let mut run = Run::new(name.clone(), "version-gating", 1, &[&name]);
            run.psci_version = Some(v);
            runs.push(run);
        }
    }
    for smc in [false, true] {
        let name = if smc { "conduit-smc" } else { "conduit-hvc" };
        let mut run = Run::new(name, "conduit", 2, &[name]);
        run.smc = smc;
        runs.push(run);
    }
    if let Some(filter) = &options.filter {
        for run in &mut runs {
            run.scenarios.retain(|s| s.contains(filter.as_str()));
        }
        runs.retain(|r| !r.scenarios.is_empty());
    }
    runs
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::conformance) fn reset_run() -> Run {
        let mut run = Run::new("w", "system-event", 1, &["system-reset2-warm"]);
        run.terminal = Some(("system-reset2-warm".into(), Terminal::WarmReset));
        run
    }

    /// The planned run of the refused-hibernate scenario.
    pub(in crate::conformance) fn refused_run() -> Run {
        let options = Options {
            filter: Some("refused".into()),
            ..Options::default()
        };
        let mut runs = plan(&options);
        assert_eq!(runs.len(), 1);
        runs.remove(0)
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
    fn the_filter_keeps_only_matching_scenarios_and_their_runs() {
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
}
