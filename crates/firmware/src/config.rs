//! Per-VM firmware configuration: the "firmware registers" of the VM.
//!
//! The PSCI version offered, the conduit, the enabled optional function groups, the suspend
//! power states, the SoC ID and the CPU-vulnerability workaround answers. Together they fix
//! what the guest can observe, so they are frozen once the VM runs and are part of every
//! snapshot (compare KVM's `KVM_REG_ARM_PSCI_VERSION` firmware pseudo-register).

use core::fmt;
use core::str::FromStr;

use crate::error::{ConfigError, ParseVersionError};
use crate::ids::Conduit;

/// A PSCI version a VM can offer (DEN0022 F.b §5.1.1). Default: the newest, 1.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum PsciVersion {
    /// PSCI 0.2 (DEN0022 issue C): the first version with fixed function IDs.
    V0_2,
    /// PSCI 1.0 (issue D): PSCI_FEATURES, SYSTEM_SUSPEND, statistics, extended StateID.
    V1_0,
    /// PSCI 1.1 (issue D.b): SYSTEM_RESET2, MEM_PROTECT.
    V1_1,
    /// PSCI 1.2 (issue E).
    V1_2,
    /// PSCI 1.3 (issue F.b): SYSTEM_OFF2.
    #[default]
    V1_3,
}

impl PsciVersion {
    /// Every version, oldest first.
    pub const ALL: [PsciVersion; 5] = [Self::V0_2, Self::V1_0, Self::V1_1, Self::V1_2, Self::V1_3];

    /// Major number.
    pub const fn major(self) -> u16 {
        match self {
            Self::V0_2 => 0,
            _ => 1,
        }
    }

    /// Minor number.
    pub const fn minor(self) -> u16 {
        match self {
            Self::V0_2 => 2,
            Self::V1_0 => 0,
            Self::V1_1 => 1,
            Self::V1_2 => 2,
            Self::V1_3 => 3,
        }
    }

    /// The PSCI_VERSION return value: major in bits 30:16, minor in bits 15:0.
    pub const fn encoded(self) -> u32 {
        ((self.major() as u32) << 16) | self.minor() as u32
    }

    /// The version whose PSCI_VERSION encoding is `value`.
    pub fn from_encoded(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.encoded() == value)
    }
}

impl fmt::Display for PsciVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

impl FromStr for PsciVersion {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.to_string() == s)
            .ok_or_else(|| ParseVersionError {
                input: s.to_owned(),
            })
    }
}

/// Optional function groups a VM exposes. A disabled group answers NOT_SUPPORTED and
/// PSCI_FEATURES says so. Default: everything enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureSet {
    /// SYSTEM_SUSPEND (§5.1.19).
    pub system_suspend: bool,
    /// SYSTEM_OFF2 (§5.1.10).
    pub system_off2: bool,
    /// SYSTEM_RESET2 (§5.1.12).
    pub system_reset2: bool,
    /// MEM_PROTECT and MEM_PROTECT_CHECK_RANGE (§5.1.13, §5.1.14).
    pub mem_protect: bool,
    /// CPU_FREEZE (§5.1.16).
    pub cpu_freeze: bool,
    /// CPU_DEFAULT_SUSPEND (§5.1.17).
    pub cpu_default_suspend: bool,
    /// NODE_HW_STATE (§5.1.18).
    pub node_hw_state: bool,
    /// PSCI_SET_SUSPEND_MODE and OS-initiated mode (§5.1.20).
    pub os_initiated: bool,
    /// PSCI_STAT_RESIDENCY and PSCI_STAT_COUNT (§5.1.21, §5.1.22).
    pub stats: bool,
    /// TRNG (DEN0098).
    pub trng: bool,
    /// SMCCC_ARCH_SOC_ID (DEN0028 §7.4).
    pub soc_id: bool,
}

impl FeatureSet {
    /// Every optional group enabled.
    pub const ALL: FeatureSet = FeatureSet {
        system_suspend: true,
        system_off2: true,
        system_reset2: true,
        mem_protect: true,
        cpu_freeze: true,
        cpu_default_suspend: true,
        node_hw_state: true,
        os_initiated: true,
        stats: true,
        trng: true,
        soc_id: true,
    };

    /// Only the mandatory functions.
    pub const NONE: FeatureSet = FeatureSet {
        system_suspend: false,
        system_off2: false,
        system_reset2: false,
        mem_protect: false,
        cpu_freeze: false,
        cpu_default_suspend: false,
        node_hw_state: false,
        os_initiated: false,
        stats: false,
        trng: false,
        soc_id: false,
    };

    pub(crate) fn from_bits(bits: u32) -> Option<Self> {
        if bits >> 11 != 0 {
            return None;
        }
        let on = |i: u32| bits & (1 << i) != 0;
        Some(FeatureSet {
            system_suspend: on(0),
            system_off2: on(1),
            system_reset2: on(2),
            mem_protect: on(3),
            cpu_freeze: on(4),
            cpu_default_suspend: on(5),
            node_hw_state: on(6),
            os_initiated: on(7),
            stats: on(8),
            trng: on(9),
            soc_id: on(10),
        })
    }

    pub(crate) fn to_bits(self) -> u32 {
        let flags = [
            self.system_suspend,
            self.system_off2,
            self.system_reset2,
            self.mem_protect,
            self.cpu_freeze,
            self.cpu_default_suspend,
            self.node_hw_state,
            self.os_initiated,
            self.stats,
            self.trng,
            self.soc_id,
        ];
        flags
            .iter()
            .enumerate()
            .fold(0, |acc, (i, &on)| acc | (u32::from(on) << i))
    }
}

impl Default for FeatureSet {
    fn default() -> Self {
        Self::ALL
    }
}

/// Layout of CPU_SUSPEND's `power_state` argument (DEN0022 F.b §5.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PowerStateFormat {
    /// Original format: StateID bits 15:0, StateType bit 16, PowerLevel bits 25:24.
    Original,
    /// Extended StateID format (PSCI 1.0+): StateID bits 27:0, StateType bit 30.
    #[default]
    Extended,
}

impl PowerStateFormat {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Extended => "extended",
        }
    }

    const fn state_id_mask(self) -> u32 {
        match self {
            Self::Original => 0xFFFF,
            Self::Extended => 0x0FFF_FFFF,
        }
    }
}

/// The CPU_SUSPEND power states the VM offers: one standby (retention) state and one
/// powerdown state, both at core level (the VM has no cluster power domains).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SuspendStates {
    /// power_state format; PSCI 0.2 only defines the original format, so below 1.0 the
    /// engine uses `Original` whatever this says.
    pub format: PowerStateFormat,
    /// StateID of the standby state.
    pub standby_id: u32,
    /// StateID of the powerdown state.
    pub powerdown_id: u32,
}

/// SMCCC_ARCH_SOC_ID answers (DEN0028 §7.4). Bit 31 of each must be clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SocId {
    /// SoC_ID_version: JEP-106 bank index (bits 30:24) and identification code (23:16),
    /// implementation-defined SoC ID (15:0).
    pub version: u32,
    /// SoC_ID_revision: implementation-defined revision.
    pub revision: u32,
}

/// What SMCCC_ARCH_FEATURES answers for one CPU-vulnerability workaround call
/// (DEN0028 §7.5-7.7). The right answer depends on the host CPU, so the VMM sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WorkaroundState {
    /// NOT_SUPPORTED (-1): the call is not implemented; the guest treats the CPU as
    /// possibly affected and unmitigated.
    #[default]
    Unavailable,
    /// 0: the CPU is affected and the call implements the mitigation.
    Mitigated,
    /// 1: the CPU is not affected; the call exists but need not be made.
    Unaffected,
    /// NOT_REQUIRED (-2): the mitigation is not needed (ARCH_WORKAROUND_2 on a CPU with
    /// SSBS or where the host mitigates permanently).
    NotRequired,
}

impl WorkaroundState {
    /// The SMCCC_ARCH_FEATURES return value.
    pub const fn features_answer(self) -> i32 {
        match self {
            Self::Unavailable => -1,
            Self::Mitigated => 0,
            Self::Unaffected => 1,
            Self::NotRequired => -2,
        }
    }

    const fn to_byte(self) -> u8 {
        match self {
            Self::Unavailable => 0,
            Self::Mitigated => 1,
            Self::Unaffected => 2,
            Self::NotRequired => 3,
        }
    }

    const fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Unavailable),
            1 => Some(Self::Mitigated),
            2 => Some(Self::Unaffected),
            3 => Some(Self::NotRequired),
            _ => None,
        }
    }
}

/// Workaround answers for ARCH_WORKAROUND_1/2/3. Default: all unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Workarounds {
    /// ARCH_WORKAROUND_1 (Spectre v2 / CVE-2017-5715).
    pub wa1: WorkaroundState,
    /// ARCH_WORKAROUND_2 (Spectre v4 / CVE-2018-3639).
    pub wa2: WorkaroundState,
    /// ARCH_WORKAROUND_3 (Spectre-BHB / CVE-2022-23960).
    pub wa3: WorkaroundState,
}

/// What CPU_ON and AFFINITY_INFO answer about a vCPU whose CPU_ON succeeded but which has not
/// yet run its first instruction (DEN0022 F.b §5.1.4, §5.1.5). Default: [`OnPending::Hidden`].
///
/// The spec lets firmware report such a core as ON_PENDING (TF-A does). Linux KVM's in-kernel
/// PSCI never does: a CPU_ON target counts as ON from the moment the call succeeds, and guest
/// code and test suites written against KVM (every arm64 cloud VM) treat ON_PENDING from a
/// racing CPU_ON as a failure. Both modes give exactly one SUCCESS per OFF -> ON transition
/// and start the target at its entry point with x0 = context id before it runs anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnPending {
    /// KVM's answers: CPU_ON on a starting core is ALREADY_ON and AFFINITY_INFO says ON, for
    /// every observer, as soon as one caller got SUCCESS.
    #[default]
    Hidden,
    /// TF-A's answers: CPU_ON on a starting core is ON_PENDING and AFFINITY_INFO says
    /// ON_PENDING until the core runs. Precise, but guests written for KVM reject it.
    Reported,
}

impl OnPending {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Hidden => "ON_PENDING hidden (KVM answers)",
            Self::Reported => "ON_PENDING reported",
        }
    }
}

/// A region of guest RAM; entry points passed to CPU_ON and the suspend calls must lie in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    /// Guest physical base address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl MemoryRegion {
    /// True if `[addr, addr + len)` lies entirely inside this region (no overflow possible).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        addr >= self.base && end <= self.base.saturating_add(self.size)
    }
}

/// Length of [`FirmwareConfig::canonical_bytes`].
pub(crate) const CANONICAL_LEN: usize = 30;

/// The per-VM firmware configuration. Default: PSCI 1.3 over HVC, every optional group on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FirmwareConfig {
    /// The PSCI version offered; newer functions answer NOT_SUPPORTED.
    pub psci_version: PsciVersion,
    /// The conduit the guest must use; calls through the other one answer NOT_SUPPORTED.
    pub conduit: Conduit,
    /// Enabled optional function groups.
    pub features: FeatureSet,
    /// CPU_SUSPEND power states.
    pub suspend_states: SuspendStates,
    /// SMCCC_ARCH_SOC_ID answers (used when `features.soc_id`).
    pub soc_id: SocId,
    /// ARCH_WORKAROUND discovery answers.
    pub workarounds: Workarounds,
    /// Whether a starting core is reported as ON_PENDING.
    pub on_pending: OnPending,
}

impl FirmwareConfig {
    /// The power_state format in effect (always original below PSCI 1.0).
    pub fn effective_format(&self) -> PowerStateFormat {
        if self.psci_version < PsciVersion::V1_0 {
            PowerStateFormat::Original
        } else {
            self.suspend_states.format
        }
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let format = self.effective_format();
        for state_id in [
            self.suspend_states.standby_id,
            self.suspend_states.powerdown_id,
        ] {
            if state_id & !format.state_id_mask() != 0 {
                return Err(ConfigError::StateIdTooWide {
                    state_id,
                    format: format.name(),
                });
            }
        }
        for (field, value) in [
            ("version", self.soc_id.version),
            ("revision", self.soc_id.revision),
        ] {
            if value & 0x8000_0000 != 0 {
                return Err(ConfigError::SocIdBit31 { field, value });
            }
        }
        Ok(())
    }

    /// Canonical byte encoding of everything guest-visible; two configurations are
    /// compatible for restore exactly when their encodings are equal.
    pub(crate) fn canonical_bytes(&self) -> [u8; CANONICAL_LEN] {
        let mut out = [0u8; CANONICAL_LEN];
        out[0..4].copy_from_slice(&self.psci_version.encoded().to_le_bytes());
        out[4] = match self.conduit {
            Conduit::Hvc => 0,
            Conduit::Smc => 1,
        };
        out[5..9].copy_from_slice(&self.features.to_bits().to_le_bytes());
        out[9] = match self.effective_format() {
            PowerStateFormat::Original => 0,
            PowerStateFormat::Extended => 1,
        };
        out[10..14].copy_from_slice(&self.suspend_states.standby_id.to_le_bytes());
        out[14..18].copy_from_slice(&self.suspend_states.powerdown_id.to_le_bytes());
        out[18..22].copy_from_slice(&self.soc_id.version.to_le_bytes());
        out[22..26].copy_from_slice(&self.soc_id.revision.to_le_bytes());
        out[26] = self.workarounds.wa1.to_byte();
        out[27] = self.workarounds.wa2.to_byte();
        out[28] = self.workarounds.wa3.to_byte();
        out[29] = match self.on_pending {
            OnPending::Hidden => 0,
            OnPending::Reported => 1,
        };
        out
    }

    /// Inverse of [`canonical_bytes`](Self::canonical_bytes); `None` for values no
    /// configuration encodes to.
    pub(crate) fn from_canonical(b: &[u8; CANONICAL_LEN]) -> Option<FirmwareConfig> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let config = FirmwareConfig {
            psci_version: PsciVersion::from_encoded(u32_at(0))?,
            conduit: match b[4] {
                0 => Conduit::Hvc,
                1 => Conduit::Smc,
                _ => return None,
            },
            features: FeatureSet::from_bits(u32_at(5))?,
            suspend_states: SuspendStates {
                format: match b[9] {
                    0 => PowerStateFormat::Original,
                    1 => PowerStateFormat::Extended,
                    _ => return None,
                },
                standby_id: u32_at(10),
                powerdown_id: u32_at(14),
            },
            soc_id: SocId {
                version: u32_at(18),
                revision: u32_at(22),
            },
            workarounds: Workarounds {
                wa1: WorkaroundState::from_byte(b[26])?,
                wa2: WorkaroundState::from_byte(b[27])?,
                wa3: WorkaroundState::from_byte(b[28])?,
            },
            on_pending: match b[29] {
                0 => OnPending::Hidden,
                1 => OnPending::Reported,
                _ => return None,
            },
        };
        (config.validate().is_ok() && config.canonical_bytes() == *b).then_some(config)
    }

    /// One-line summary for error messages.
    pub fn summary(&self) -> String {
        format!(
            "PSCI {} over {}, features {:#x}, {} power_state (standby {:#x}, powerdown {:#x}), \
             SoC ID {:#x}/{:#x}, workarounds {:?}/{:?}/{:?}, {}",
            self.psci_version,
            self.conduit,
            self.features.to_bits(),
            self.effective_format().name(),
            self.suspend_states.standby_id,
            self.suspend_states.powerdown_id,
            self.soc_id.version,
            self.soc_id.revision,
            self.workarounds.wa1,
            self.workarounds.wa2,
            self.workarounds.wa3,
            self.on_pending.name(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_encodes_major_and_minor() {
        assert_eq!(PsciVersion::V0_2.encoded(), 0x0000_0002);
        assert_eq!(PsciVersion::V1_0.encoded(), 0x0001_0000);
        assert_eq!(PsciVersion::V1_3.encoded(), 0x0001_0003);
        assert_eq!(PsciVersion::default(), PsciVersion::V1_3);
    }

    #[test]
    fn version_parses_every_display_form_and_rejects_others() {
        for v in PsciVersion::ALL {
            assert_eq!(v.to_string().parse::<PsciVersion>(), Ok(v));
            assert_eq!(PsciVersion::from_encoded(v.encoded()), Some(v));
        }
        assert!("1.4".parse::<PsciVersion>().is_err());
        assert!("0.1".parse::<PsciVersion>().is_err());
    }

    #[test]
    fn config_rejects_state_id_wider_than_original_format() {
        let mut cfg = FirmwareConfig::default();
        cfg.suspend_states.format = PowerStateFormat::Original;
        cfg.suspend_states.standby_id = 0x1_0000;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::StateIdTooWide { .. })
        ));
        cfg.suspend_states.format = PowerStateFormat::Extended;
        assert_eq!(cfg.validate(), Ok(()));
        cfg.psci_version = PsciVersion::V0_2;
        assert!(cfg.validate().is_err(), "0.2 forces the original format");
    }

    #[test]
    fn config_rejects_soc_id_with_bit_31() {
        let mut cfg = FirmwareConfig::default();
        cfg.soc_id.revision = 0x8000_0000;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::SocIdBit31 { .. })
        ));
    }

    #[test]
    fn memory_region_contains_checks_bounds_without_overflow() {
        let r = MemoryRegion {
            base: 0x4000_0000,
            size: 0x1000,
        };
        assert!(r.contains(0x4000_0000, 4));
        assert!(r.contains(0x4000_0FFC, 4));
        assert!(!r.contains(0x4000_0FFD, 4));
        assert!(!r.contains(0x3FFF_FFFC, 4));
        assert!(!r.contains(u64::MAX - 1, 4));
    }
}
