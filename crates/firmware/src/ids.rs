//! Identifiers: vCPU indices, MPIDR affinity values, conduits and SMCCC function IDs.
//!
//! Function IDs follow DEN0022 F.b §5.1 ("Function prototypes"), DEN0028 (SMCCC) §7 (Arm
//! architecture calls) and DEN0098 (TRNG). Bits 23:16 of a fast-call ID must be zero; any
//! value not listed here is not a function this engine knows and is answered NOT_SUPPORTED.

use core::fmt;
use core::str::FromStr;

use crate::config::PsciVersion;
use crate::error::{InvalidMpidr, ParseConduitError};

/// Index of a vCPU in the VM's topology (position in the `cpus` list given to
/// [`Firmware::new`](crate::Firmware::new)). vCPU 0 is the boot CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuId(u32);

impl VcpuId {
    /// The vCPU at position `index` of the topology.
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// Position in the topology, for indexing.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// The raw index.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for VcpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vcpu{}", self.0)
    }
}

/// An MPIDR_EL1 value reduced to its affinity fields (Aff3 bits 39:32, Aff2 23:16, Aff1 15:8,
/// Aff0 7:0), as PSCI uses it to name a core (DEN0022 F.b §5.1.4 `target_cpu`).
///
/// Building one from a `u64` with any other bit set fails, so an `Mpidr` always names a valid
/// affinity path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mpidr(u64);

impl Mpidr {
    /// Bits of MPIDR_EL1 that hold affinity fields.
    pub const AFFINITY_MASK: u64 = 0xFF_00FF_FFFF;

    /// The MPIDR this engine assigns to the vCPU at `index` by default, the same layout Linux
    /// KVM uses: Aff0 = bits 3:0 of the index (16 CPUs per cluster, what a GICv3 SGI target
    /// list can address), Aff1 = bits 11:4, Aff2 = bits 19:12, Aff3 = bits 27:20.
    pub const fn from_index(index: u32) -> Self {
        let i = index as u64;
        let aff0 = i & 0xF;
        let aff1 = (i >> 4) & 0xFF;
        let aff2 = (i >> 12) & 0xFF;
        let aff3 = (i >> 20) & 0xFF;
        Self(aff0 | (aff1 << 8) | (aff2 << 16) | (aff3 << 32))
    }

    /// The affinity of an MPIDR_EL1 register value: the affinity fields kept, everything
    /// else (bit 31 RES1, U bit 30, MT bit 24, RES0 bits) dropped.
    pub const fn from_mpidr_el1(value: u64) -> Self {
        Self(value & Self::AFFINITY_MASK)
    }

    /// The affinity value (only affinity bits can be set).
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Affinity field at `level` (0..=3); levels above 3 read as 0.
    pub const fn affinity(self, level: u8) -> u8 {
        let shift = match level {
            0 => 0,
            1 => 8,
            2 => 16,
            3 => 32,
            _ => return 0,
        };
        ((self.0 >> shift) & 0xFF) as u8
    }

    /// This value with the affinity fields below `level` cleared: the affinity instance at
    /// `level` that contains this core (DEN0022 F.b §5.1.5: lower levels are ignored).
    pub const fn instance_at(self, level: AffinityLevel) -> Mpidr {
        let keep = match level {
            AffinityLevel::Zero => Self::AFFINITY_MASK,
            AffinityLevel::One => 0xFF_00FF_FF00,
            AffinityLevel::Two => 0xFF_00FF_0000,
            AffinityLevel::Three => 0xFF_0000_0000,
        };
        Mpidr(self.0 & keep)
    }
}

impl TryFrom<u64> for Mpidr {
    type Error = InvalidMpidr;

    fn try_from(value: u64) -> Result<Self, Self::Error> {
        if value & !Self::AFFINITY_MASK == 0 {
            Ok(Self(value))
        } else {
            Err(InvalidMpidr { value })
        }
    }
}

impl fmt::Display for Mpidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An affinity level (DEN0022 F.b §5.1.5, §5.1.18): 0 = core, up to 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AffinityLevel {
    /// Aff0: a single core.
    Zero,
    /// Aff1 (typically a cluster).
    One,
    /// Aff2.
    Two,
    /// Aff3.
    Three,
}

impl AffinityLevel {
    /// The level for a guest-supplied number, or `None` above 3.
    pub const fn from_raw(level: u64) -> Option<Self> {
        match level {
            0 => Some(Self::Zero),
            1 => Some(Self::One),
            2 => Some(Self::Two),
            3 => Some(Self::Three),
            _ => None,
        }
    }
}

/// How the guest enters the firmware (SMCCC conduit, DEN0028 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Conduit {
    /// `HVC #0`: the usual choice for a VM.
    #[default]
    Hvc,
    /// `SMC #0`.
    Smc,
}

impl Conduit {
    /// Stable name, as used in device trees (`method` property of the `psci` node).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hvc => "hvc",
            Self::Smc => "smc",
        }
    }
}

impl fmt::Display for Conduit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Conduit {
    type Err = ParseConduitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hvc" => Ok(Self::Hvc),
            "smc" => Ok(Self::Smc),
            other => Err(ParseConduitError {
                input: other.to_owned(),
            }),
        }
    }
}

/// The service a function belongs to (DEN0028 function identifier: owning entity number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Arm architecture calls (DEN0028 §7).
    Arch,
    /// PSCI (DEN0022).
    Psci,
    /// True random number generator (DEN0098).
    Trng,
}

macro_rules! function_ids {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $service:ident, $since:ident,
        $spec_name:literal, $args:literal; )*) => {
        /// Every SMCCC function identifier this engine implements or answers.
        ///
        /// Built from the guest's W0 with [`FunctionId::try_from`]; unknown IDs are refused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum FunctionId {
            $( $(#[$doc])* $name = $value, )*
        }

        impl FunctionId {
            /// Every known ID, in table order.
            pub const ALL: &'static [FunctionId] = &[$(FunctionId::$name,)*];

            /// The service (owning entity) the function belongs to.
            pub const fn service(self) -> Service {
                match self { $( FunctionId::$name => Service::$service, )* }
            }

            /// The first PSCI version that defines this function (DEN0022 F.b §5.1).
            /// Arch and TRNG calls report 1.0, the first version whose PSCI_FEATURES lets a
            /// guest discover SMCCC 1.1 and with it these services.
            pub const fn since(self) -> PsciVersion {
                match self { $( FunctionId::$name => PsciVersion::$since, )* }
            }

            /// The function's name as its specification spells it (DEN0022 F.b §5.1,
            /// DEN0028 §7, DEN0098): `CPU_ON` for both the SMC32 and the SMC64 ID
            /// ([`is_smc64`](FunctionId::is_smc64) tells them apart).
            pub const fn name(self) -> &'static str {
                match self { $( FunctionId::$name => $spec_name, )* }
            }

            /// How many argument registers (x1, x2, ...) the function reads; the others
            /// are neither read nor changed by it.
            pub const fn arg_count(self) -> usize {
                match self { $( FunctionId::$name => $args, )* }
            }
        }

        impl TryFrom<u32> for FunctionId {
            type Error = u32;

            fn try_from(value: u32) -> Result<Self, u32> {
                match value {
                    $( $value => Ok(FunctionId::$name), )*
                    other => Err(other),
                }
            }
        }
    };
}

function_ids! {
    /// SMCCC_VERSION (DEN0028 §7.2).
    SmcccVersion = 0x8000_0000, Arch, V1_0, "SMCCC_VERSION", 0;
    /// SMCCC_ARCH_FEATURES (DEN0028 §7.3).
    SmcccArchFeatures = 0x8000_0001, Arch, V1_0, "SMCCC_ARCH_FEATURES", 1;
    /// SMCCC_ARCH_SOC_ID (DEN0028 §7.4).
    SmcccArchSocId = 0x8000_0002, Arch, V1_0, "SMCCC_ARCH_SOC_ID", 1;
    /// SMCCC_ARCH_WORKAROUND_3 (DEN0028 §7.7).
    SmcccArchWorkaround3 = 0x8000_3FFF, Arch, V1_0, "SMCCC_ARCH_WORKAROUND_3", 0;
    /// SMCCC_ARCH_WORKAROUND_2 (DEN0028 §7.6).
    SmcccArchWorkaround2 = 0x8000_7FFF, Arch, V1_0, "SMCCC_ARCH_WORKAROUND_2", 1;
    /// SMCCC_ARCH_WORKAROUND_1 (DEN0028 §7.5).
    SmcccArchWorkaround1 = 0x8000_8000, Arch, V1_0, "SMCCC_ARCH_WORKAROUND_1", 0;
    /// PSCI_VERSION (§5.1.1).
    PsciVersion = 0x8400_0000, Psci, V0_2, "PSCI_VERSION", 0;
    /// CPU_SUSPEND, SMC32 (§5.1.2).
    CpuSuspend32 = 0x8400_0001, Psci, V0_2, "CPU_SUSPEND", 3;
    /// CPU_OFF (§5.1.3).
    CpuOff = 0x8400_0002, Psci, V0_2, "CPU_OFF", 0;
    /// CPU_ON, SMC32 (§5.1.4).
    CpuOn32 = 0x8400_0003, Psci, V0_2, "CPU_ON", 3;
    /// AFFINITY_INFO, SMC32 (§5.1.5).
    AffinityInfo32 = 0x8400_0004, Psci, V0_2, "AFFINITY_INFO", 2;
    /// MIGRATE, SMC32 (§5.1.6).
    Migrate32 = 0x8400_0005, Psci, V0_2, "MIGRATE", 1;
    /// MIGRATE_INFO_TYPE (§5.1.7).
    MigrateInfoType = 0x8400_0006, Psci, V0_2, "MIGRATE_INFO_TYPE", 0;
    /// MIGRATE_INFO_UP_CPU, SMC32 (§5.1.8).
    MigrateInfoUpCpu32 = 0x8400_0007, Psci, V0_2, "MIGRATE_INFO_UP_CPU", 0;
    /// SYSTEM_OFF (§5.1.9).
    SystemOff = 0x8400_0008, Psci, V0_2, "SYSTEM_OFF", 0;
    /// SYSTEM_RESET (§5.1.11).
    SystemReset = 0x8400_0009, Psci, V0_2, "SYSTEM_RESET", 0;
    /// PSCI_FEATURES (§5.1.15).
    PsciFeatures = 0x8400_000A, Psci, V1_0, "PSCI_FEATURES", 1;
    /// CPU_FREEZE (§5.1.16).
    CpuFreeze = 0x8400_000B, Psci, V1_0, "CPU_FREEZE", 0;
    /// CPU_DEFAULT_SUSPEND, SMC32 (§5.1.17).
    CpuDefaultSuspend32 = 0x8400_000C, Psci, V1_0, "CPU_DEFAULT_SUSPEND", 2;
    /// NODE_HW_STATE, SMC32 (§5.1.18).
    NodeHwState32 = 0x8400_000D, Psci, V1_0, "NODE_HW_STATE", 2;
    /// SYSTEM_SUSPEND, SMC32 (§5.1.19).
    SystemSuspend32 = 0x8400_000E, Psci, V1_0, "SYSTEM_SUSPEND", 2;
    /// PSCI_SET_SUSPEND_MODE (§5.1.20).
    SetSuspendMode = 0x8400_000F, Psci, V1_0, "PSCI_SET_SUSPEND_MODE", 1;
    /// PSCI_STAT_RESIDENCY, SMC32 (§5.1.21).
    StatResidency32 = 0x8400_0010, Psci, V1_0, "PSCI_STAT_RESIDENCY", 2;
    /// PSCI_STAT_COUNT, SMC32 (§5.1.22).
    StatCount32 = 0x8400_0011, Psci, V1_0, "PSCI_STAT_COUNT", 2;
    /// SYSTEM_RESET2, SMC32 (§5.1.12).
    SystemReset2_32 = 0x8400_0012, Psci, V1_1, "SYSTEM_RESET2", 2;
    /// MEM_PROTECT (§5.1.13).
    MemProtect = 0x8400_0013, Psci, V1_1, "MEM_PROTECT", 1;
    /// MEM_PROTECT_CHECK_RANGE, SMC32 (§5.1.14).
    MemProtectCheckRange32 = 0x8400_0014, Psci, V1_1, "MEM_PROTECT_CHECK_RANGE", 2;
    /// SYSTEM_OFF2, SMC32 (§5.1.10).
    SystemOff2_32 = 0x8400_0015, Psci, V1_3, "SYSTEM_OFF2", 2;
    /// TRNG_VERSION (DEN0098).
    TrngVersion = 0x8400_0050, Trng, V1_0, "TRNG_VERSION", 0;
    /// TRNG_FEATURES (DEN0098).
    TrngFeatures = 0x8400_0051, Trng, V1_0, "TRNG_FEATURES", 1;
    /// TRNG_GET_UUID (DEN0098).
    TrngGetUuid = 0x8400_0052, Trng, V1_0, "TRNG_GET_UUID", 0;
    /// TRNG_RND32 (DEN0098).
    TrngRnd32 = 0x8400_0053, Trng, V1_0, "TRNG_RND32", 1;
    /// CPU_SUSPEND, SMC64 (§5.1.2).
    CpuSuspend64 = 0xC400_0001, Psci, V0_2, "CPU_SUSPEND", 3;
    /// CPU_ON, SMC64 (§5.1.4).
    CpuOn64 = 0xC400_0003, Psci, V0_2, "CPU_ON", 3;
    /// AFFINITY_INFO, SMC64 (§5.1.5).
    AffinityInfo64 = 0xC400_0004, Psci, V0_2, "AFFINITY_INFO", 2;
    /// MIGRATE, SMC64 (§5.1.6).
    Migrate64 = 0xC400_0005, Psci, V0_2, "MIGRATE", 1;
    /// MIGRATE_INFO_UP_CPU, SMC64 (§5.1.8).
    MigrateInfoUpCpu64 = 0xC400_0007, Psci, V0_2, "MIGRATE_INFO_UP_CPU", 0;
    /// CPU_DEFAULT_SUSPEND, SMC64 (§5.1.17).
    CpuDefaultSuspend64 = 0xC400_000C, Psci, V1_0, "CPU_DEFAULT_SUSPEND", 2;
    /// NODE_HW_STATE, SMC64 (§5.1.18).
    NodeHwState64 = 0xC400_000D, Psci, V1_0, "NODE_HW_STATE", 2;
    /// SYSTEM_SUSPEND, SMC64 (§5.1.19).
    SystemSuspend64 = 0xC400_000E, Psci, V1_0, "SYSTEM_SUSPEND", 2;
    /// PSCI_STAT_RESIDENCY, SMC64 (§5.1.21).
    StatResidency64 = 0xC400_0010, Psci, V1_0, "PSCI_STAT_RESIDENCY", 2;
    /// PSCI_STAT_COUNT, SMC64 (§5.1.22).
    StatCount64 = 0xC400_0011, Psci, V1_0, "PSCI_STAT_COUNT", 2;
    /// SYSTEM_RESET2, SMC64 (§5.1.12).
    SystemReset2_64 = 0xC400_0012, Psci, V1_1, "SYSTEM_RESET2", 2;
    /// MEM_PROTECT_CHECK_RANGE, SMC64 (§5.1.14).
    MemProtectCheckRange64 = 0xC400_0014, Psci, V1_1, "MEM_PROTECT_CHECK_RANGE", 2;
    /// SYSTEM_OFF2, SMC64 (§5.1.10).
    SystemOff2_64 = 0xC400_0015, Psci, V1_3, "SYSTEM_OFF2", 2;
    /// TRNG_RND64 (DEN0098).
    TrngRnd64 = 0xC400_0053, Trng, V1_0, "TRNG_RND64", 1;
}

impl FunctionId {
    /// The raw 32-bit identifier.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// True for SMC64/HVC64 calls (bit 30 of the ID, DEN0028 §2): arguments use all 64
    /// bits and an AArch32 caller cannot make them.
    pub const fn is_smc64(self) -> bool {
        self.raw() & 0x4000_0000 != 0
    }
}

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = if self.is_smc64() { "64" } else { "32" };
        write!(f, "{} (SMC{width}, {:#010x})", self.name(), self.raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpidr_rejects_non_affinity_bits() {
        assert!(Mpidr::try_from(0xFFFF_FFFF).is_err());
        assert!(Mpidr::try_from(1 << 40).is_err());
        assert!(Mpidr::try_from(1 << 31).is_err());
        assert_eq!(
            Mpidr::try_from(0xFF_00FF_FFFF).map(Mpidr::raw),
            Ok(0xFF_00FF_FFFF)
        );
    }

    #[test]
    fn mpidr_from_index_packs_sixteen_cores_per_cluster() {
        assert_eq!(Mpidr::from_index(0).raw(), 0);
        assert_eq!(Mpidr::from_index(15).raw(), 0xF);
        assert_eq!(Mpidr::from_index(16).raw(), 0x100);
        assert_eq!(Mpidr::from_index(0x1234).raw(), 0x01_2304);
        assert_eq!(Mpidr::from_index(0x10_0000).raw(), 1 << 32);
    }

    #[test]
    fn function_id_round_trips_every_known_id() {
        for &id in FunctionId::ALL {
            assert_eq!(FunctionId::try_from(id.raw()), Ok(id));
        }
        assert_eq!(FunctionId::try_from(0x8400_0016), Err(0x8400_0016));
    }

    #[test]
    fn function_names_are_the_spec_spelling_and_shared_by_both_widths() {
        assert_eq!(FunctionId::CpuOn32.name(), "CPU_ON");
        assert_eq!(FunctionId::CpuOn64.name(), "CPU_ON");
        assert_eq!(
            FunctionId::SmcccArchWorkaround1.name(),
            "SMCCC_ARCH_WORKAROUND_1"
        );
        assert_eq!(FunctionId::SetSuspendMode.name(), "PSCI_SET_SUSPEND_MODE");
        assert_eq!(
            FunctionId::CpuOn64.to_string(),
            "CPU_ON (SMC64, 0xc4000003)"
        );
        for &id in FunctionId::ALL {
            let name = id.name();
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
            assert!(id.arg_count() <= 3, "{name}");
        }
    }

    #[test]
    fn conduit_parses_and_displays() {
        assert_eq!("hvc".parse::<Conduit>(), Ok(Conduit::Hvc));
        assert_eq!("smc".parse::<Conduit>(), Ok(Conduit::Smc));
        assert!("HVC ".parse::<Conduit>().is_err());
        assert_eq!(Conduit::Smc.to_string(), "smc");
    }
}
