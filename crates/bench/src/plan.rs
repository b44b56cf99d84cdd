//! What one bench run measures: the workloads, their sizes, the variants each
//! runs under, and the interleaved order of the samples.
//!
//! Every sample of one workload and size is taken side by side with the same
//! guest under each variant, round after round, with the variants' order
//! rotated each round so no variant always runs first (after a Linux boot,
//! say). Ratios between variants of one round are what this machine can
//! measure; absolute numbers are those of the machine (nested emulation on
//! x86_64 hosts).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// Who answers the guest's PSCI calls in a sample, and what its device tree offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// vpsci's engine (every PSCI call forwarded to userspace).
    Vpsci,
    /// The floor: forwarded calls answered x0 = 0 by an empty handler.
    Floor,
    /// KVM's in-kernel PSCI (`--in-kernel-psci`).
    InKernel,
    /// vpsci, no idle states in the device tree: the guest idles with WFI.
    VpsciWfi,
    /// vpsci with a PSCI idle state; CPU_SUSPEND forwarded to the engine.
    VpsciForwarded,
    /// vpsci with a PSCI idle state; CPU_SUSPEND kept in KVM (`SmcccRouting::keep_in_kernel`).
    VpsciKept,
}

impl Variant {
    /// Name in samples and tables.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Vpsci => "vpsci",
            Variant::Floor => "floor",
            Variant::InKernel => "in-kernel",
            Variant::VpsciWfi => "vpsci-wfi",
            Variant::VpsciForwarded => "vpsci-forwarded",
            Variant::VpsciKept => "vpsci-kept",
        }
    }

    /// The device tree offers a PSCI idle state (only the idle workload's
    /// variants differ here; the in-kernel variant of that workload gets it too).
    pub fn idle_states(self, workload: Workload) -> bool {
        match self {
            Variant::VpsciForwarded | Variant::VpsciKept => true,
            Variant::InKernel => workload == Workload::LinuxIdle,
            _ => false,
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kind of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// PSCI_VERSION in a loop.
    PsciVersion,
    /// AFFINITY_INFO(boot CPU, level 0) in a loop.
    AffinityInfo,
    /// PSCI_FEATURES(CPU_ON) in a loop.
    PsciFeatures,
    /// CPU_ON vCPU 1, poll AFFINITY_INFO until it called CPU_OFF.
    CpuOnOff,
    /// CPU_ON every other vCPU, wait until all ran.
    BringUp,
    /// SYSTEM_RESET with every vCPU on, until the boot vCPU runs again.
    SystemReset,
    /// A Linux guest from VMM start to its init.
    LinuxBoot,
    /// Linux takes CPU 1 offline and online through sysfs.
    LinuxHotplug,
    /// Linux sits idle; userspace exits are counted.
    LinuxIdle,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 9] = [
        Workload::PsciVersion,
        Workload::AffinityInfo,
        Workload::PsciFeatures,
        Workload::CpuOnOff,
        Workload::BringUp,
        Workload::SystemReset,
        Workload::LinuxBoot,
        Workload::LinuxHotplug,
        Workload::LinuxIdle,
    ];

    /// Name in samples and tables.
    pub fn name(self) -> &'static str {
        match self {
            Workload::PsciVersion => "psci-version",
            Workload::AffinityInfo => "affinity-info",
            Workload::PsciFeatures => "psci-features",
            Workload::CpuOnOff => "cpu-on-off",
            Workload::BringUp => "bring-up",
            Workload::SystemReset => "system-reset",
            Workload::LinuxBoot => "linux-boot",
            Workload::LinuxHotplug => "linux-hotplug",
            Workload::LinuxIdle => "linux-idle",
        }
    }

    /// Boots a Linux kernel (needs `--linux-image`).
    pub fn needs_linux(self) -> bool {
        matches!(
            self,
            Workload::LinuxBoot | Workload::LinuxHotplug | Workload::LinuxIdle
        )
    }

    /// The unit of a sample's value.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::PsciVersion | Workload::AffinityInfo | Workload::PsciFeatures => "us/call",
            Workload::CpuOnOff => "us/cycle",
            Workload::BringUp | Workload::SystemReset | Workload::LinuxBoot => "ms",
            Workload::LinuxHotplug => "ms/cycle",
            Workload::LinuxIdle => "exits",
        }
    }

    fn variants(self) -> Vec<Variant> {
        match self {
            Workload::PsciVersion | Workload::AffinityInfo | Workload::PsciFeatures => {
                vec![Variant::Vpsci, Variant::Floor, Variant::InKernel]
            }
            Workload::LinuxIdle => vec![
                Variant::VpsciWfi,
                Variant::VpsciForwarded,
                Variant::VpsciKept,
                Variant::InKernel,
            ],
            _ => vec![Variant::Vpsci, Variant::InKernel],
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One workload at one size, with how much work a sample does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// The work.
    pub workload: Workload,
    /// vCPUs of the VM.
    pub cpus: u32,
    /// Calls, cycles or resets per sample; for the idle workload, the window in seconds.
    pub work: u32,
    /// Variants, in the first round's order.
    pub variants: Vec<Variant>,
    /// Samples per variant.
    pub rounds: u32,
}

impl Case {
    /// `bring-up/64`, `psci-version/1`: what `--filter` matches.
    pub fn id(&self) -> String {
        format!("{}/{}", self.workload, self.cpus)
    }

    /// Guest time limit of one sample.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(if self.workload.needs_linux() {
            600
        } else {
            120
        })
    }
}

/// How big a run is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sizing {
    /// Few rounds and small sizes, for CI.
    pub quick: bool,
    /// Rounds for every case instead of the defaults.
    pub rounds: Option<u32>,
    /// Only cases whose id (`bring-up/64`) contains this, or one of its
    /// comma-separated parts.
    pub filter: Option<String>,
}

/// The cases of a run.
pub fn cases(sizing: &Sizing) -> Vec<Case> {
    let q = sizing.quick;
    let mut cases = Vec::new();
    for workload in Workload::ALL {
        let (sizes, work, rounds): (&[u32], u32, u32) = match workload {
            Workload::PsciVersion | Workload::AffinityInfo | Workload::PsciFeatures => {
                (&[1], if q { 200 } else { 2000 }, if q { 3 } else { 7 })
            }
            Workload::CpuOnOff => (&[2], if q { 20 } else { 200 }, if q { 3 } else { 7 }),
            Workload::BringUp => (
                if q { &[8] } else { &[8, 64, 256] },
                1,
                if q { 3 } else { 7 },
            ),
            Workload::SystemReset => (
                if q { &[1, 8] } else { &[1, 8, 64] },
                if q { 2 } else { 5 },
                if q { 2 } else { 5 },
            ),
            Workload::LinuxBoot => (if q { &[1] } else { &[1, 8, 64] }, 1, if q { 1 } else { 3 }),
            Workload::LinuxHotplug => (&[2], if q { 10 } else { 100 }, if q { 1 } else { 3 }),
            // A 1-vCPU Linux boots in half the time of a 2-vCPU one on the nested machine.
            Workload::LinuxIdle => (
                if q { &[1] } else { &[4] },
                if q { 2 } else { 10 },
                if q { 1 } else { 3 },
            ),
        };
        for &cpus in sizes {
            cases.push(Case {
                workload,
                cpus,
                work,
                variants: workload.variants(),
                rounds: sizing.rounds.unwrap_or(rounds).max(1),
            });
        }
    }
    if let Some(filter) = &sizing.filter {
        cases.retain(|c| {
            let id = c.id();
            filter.split(',').any(|part| id.contains(part.trim()))
        });
    }
    cases
}

/// One sample to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Index into the case list.
    pub case: usize,
    /// Round, from 0.
    pub round: u32,
    /// Who answers PSCI.
    pub variant: Variant,
}

/// The samples in the order they are taken: round by round, every case,
/// every variant of a case back to back, the variants' order rotated by the
/// round.
pub fn schedule(cases: &[Case]) -> Vec<Step> {
    let rounds = cases.iter().map(|c| c.rounds).max().unwrap_or(0);
    let mut steps = Vec::new();
    for round in 0..rounds {
        for (index, case) in cases.iter().enumerate() {
            if round >= case.rounds {
                continue;
            }
            let n = case.variants.len();
            for k in 0..n {
                steps.push(Step {
                    case: index,
                    round,
                    variant: case.variants[(k + round as usize) % n],
                });
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_run_covers_every_size_the_issue_names() {
        let ids: Vec<String> = cases(&Sizing::default()).iter().map(Case::id).collect();
        for id in [
            "psci-version/1",
            "affinity-info/1",
            "psci-features/1",
            "cpu-on-off/2",
            "bring-up/8",
            "bring-up/64",
            "bring-up/256",
            "system-reset/1",
            "system-reset/8",
            "system-reset/64",
            "linux-boot/1",
            "linux-boot/8",
            "linux-boot/64",
            "linux-hotplug/2",
            "linux-idle/4",
        ] {
            assert!(ids.contains(&id.to_string()), "{id} missing from {ids:?}");
        }
        let hotplug = cases(&Sizing::default())
            .into_iter()
            .find(|c| c.workload == Workload::LinuxHotplug)
            .unwrap();
        assert_eq!(hotplug.work, 100);
    }

    #[test]
    fn quick_keeps_every_workload_but_only_small_sizes() {
        let quick = cases(&Sizing {
            quick: true,
            ..Sizing::default()
        });
        for workload in Workload::ALL {
            assert!(quick.iter().any(|c| c.workload == workload), "{workload}");
        }
        assert!(quick.iter().all(|c| c.cpus <= 8));
    }

    #[test]
    fn filter_and_rounds_apply_to_every_case() {
        let only = cases(&Sizing {
            filter: Some("bring-up/6".into()),
            rounds: Some(2),
            ..Sizing::default()
        });
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].id(), "bring-up/64");
        assert_eq!(only[0].rounds, 2);
        let two = cases(&Sizing {
            filter: Some("reset/64, linux-boot/8".into()),
            ..Sizing::default()
        });
        let ids: Vec<String> = two.iter().map(Case::id).collect();
        assert_eq!(ids, ["system-reset/64", "linux-boot/8"]);
    }

    #[test]
    fn rounds_interleave_variants_and_rotate_their_order() {
        let cases = cases(&Sizing {
            filter: Some("psci-version".into()),
            rounds: Some(3),
            ..Sizing::default()
        });
        let steps = schedule(&cases);
        let order: Vec<(u32, &str)> = steps.iter().map(|s| (s.round, s.variant.name())).collect();
        assert_eq!(
            order,
            [
                (0, "vpsci"),
                (0, "floor"),
                (0, "in-kernel"),
                (1, "floor"),
                (1, "in-kernel"),
                (1, "vpsci"),
                (2, "in-kernel"),
                (2, "vpsci"),
                (2, "floor"),
            ]
        );
    }

    #[test]
    fn idle_states_go_only_where_the_variant_asks_for_them() {
        assert!(Variant::VpsciForwarded.idle_states(Workload::LinuxIdle));
        assert!(Variant::VpsciKept.idle_states(Workload::LinuxIdle));
        assert!(Variant::InKernel.idle_states(Workload::LinuxIdle));
        assert!(!Variant::VpsciWfi.idle_states(Workload::LinuxIdle));
        assert!(!Variant::InKernel.idle_states(Workload::LinuxBoot));
        assert!(!Variant::Vpsci.idle_states(Workload::LinuxBoot));
    }
}
