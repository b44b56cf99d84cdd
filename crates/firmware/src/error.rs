//! Error types: PSCI return codes (DEN0022 F.b §5.2.2) and host-facing errors.
//!
//! Guest-visible failures are [`PsciError`] values, mapped to the register encoding in one
//! place ([`PsciError::to_register`]). Host misuse (bad configuration, bad snapshot) gets its
//! own typed errors and never reaches the guest.

use thiserror::Error;

use crate::ids::Mpidr;

/// The value of `SUCCESS` in x0 (DEN0022 F.b §5.2.2).
pub const SUCCESS: u64 = 0;

/// A PSCI error return code (DEN0022 F.b §5.2.2, table 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
#[repr(i32)]
pub enum PsciError {
    /// NOT_SUPPORTED (-1): unknown or disabled function.
    #[error("NOT_SUPPORTED")]
    NotSupported = -1,
    /// INVALID_PARAMETERS (-2).
    #[error("INVALID_PARAMETERS")]
    InvalidParameters = -2,
    /// DENIED (-3).
    #[error("DENIED")]
    Denied = -3,
    /// ALREADY_ON (-4): CPU_ON of a core that is on.
    #[error("ALREADY_ON")]
    AlreadyOn = -4,
    /// ON_PENDING (-5): CPU_ON of a core whose start is in flight.
    #[error("ON_PENDING")]
    OnPending = -5,
    /// INTERNAL_FAILURE (-6).
    #[error("INTERNAL_FAILURE")]
    InternalFailure = -6,
    /// NOT_PRESENT (-7).
    #[error("NOT_PRESENT")]
    NotPresent = -7,
    /// DISABLED (-8).
    #[error("DISABLED")]
    Disabled = -8,
    /// INVALID_ADDRESS (-9): an entry point the caller may not use.
    #[error("INVALID_ADDRESS")]
    InvalidAddress = -9,
}

impl PsciError {
    /// Every PSCI error code.
    pub const ALL: [PsciError; 9] = [
        Self::NotSupported,
        Self::InvalidParameters,
        Self::Denied,
        Self::AlreadyOn,
        Self::OnPending,
        Self::InternalFailure,
        Self::NotPresent,
        Self::Disabled,
        Self::InvalidAddress,
    ];

    /// The signed return code.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The code as written to x0: sign-extended to 64 bits (W0 carries the 32-bit code for
    /// SMC32 callers, DEN0028 §2).
    pub const fn to_register(self) -> u64 {
        self.code() as i64 as u64
    }

    /// The error whose register encoding (W0, sign-extended or not) is `x0`, if any.
    pub fn from_register(x0: u64) -> Option<Self> {
        let code = x0 as u32 as i32;
        Self::ALL.into_iter().find(|e| e.code() == code)
    }
}

/// An MPIDR value with bits outside the affinity fields set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("MPIDR {value:#x} has bits set outside Aff0..Aff3")]
pub struct InvalidMpidr {
    /// The rejected value.
    pub value: u64,
}

/// A conduit name other than "hvc" or "smc".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown conduit {input:?}: expected \"hvc\" or \"smc\"")]
pub struct ParseConduitError {
    /// The rejected text.
    pub input: String,
}

/// A PSCI version string other than "0.2", "1.0", "1.1", "1.2" or "1.3".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unsupported PSCI version {input:?}: expected one of 0.2, 1.0, 1.1, 1.2, 1.3")]
pub struct ParseVersionError {
    /// The rejected text.
    pub input: String,
}

/// The host could not supply entropy (TRNG answers NO_ENTROPY).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("host entropy source unavailable: {reason}")]
pub struct EntropyError {
    /// Why, for logs.
    pub reason: String,
}

/// The firmware configuration or topology given to the engine is unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The topology has no vCPU.
    #[error("the VM needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than a [`VcpuId`](crate::VcpuId) can index.
    #[error("{count} vCPUs is more than the engine supports")]
    TooManyCpus {
        /// Requested count.
        count: usize,
    },
    /// Two vCPUs share an MPIDR.
    #[error("MPIDR {mpidr} is used by vCPU {first} and vCPU {second}")]
    DuplicateMpidr {
        /// The shared value.
        mpidr: Mpidr,
        /// First vCPU index using it.
        first: usize,
        /// Second vCPU index using it.
        second: usize,
    },
    /// A RAM region is empty or wraps past the top of the address space.
    #[error("RAM region at {base:#x} with size {size:#x} is empty or overflows")]
    BadRamRegion {
        /// Region base.
        base: u64,
        /// Region size.
        size: u64,
    },
    /// A suspend StateID does not fit the power_state format in use.
    #[error("StateID {state_id:#x} does not fit the {format} power_state format")]
    StateIdTooWide {
        /// The configured StateID.
        state_id: u32,
        /// Name of the format.
        format: &'static str,
    },
    /// SMCCC_ARCH_SOC_ID values must leave bit 31 clear (DEN0028 §7.4).
    #[error("SoC ID {field} {value:#x} has bit 31 set")]
    SocIdBit31 {
        /// "version" or "revision".
        field: &'static str,
        /// The configured value.
        value: u32,
    },
    /// The configuration is frozen: the VM has run.
    #[error("the firmware configuration is frozen because the VM has started running")]
    Frozen,
}

/// A snapshot was refused; the engine's state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotError {
    /// Fewer bytes than the format needs.
    #[error("snapshot truncated: {needed} bytes needed, {len} present")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed to go on.
        needed: usize,
    },
    /// The bytes do not start with the vpsci firmware magic.
    #[error("not a vpsci firmware snapshot (bad magic)")]
    BadMagic,
    /// A format version this build cannot read.
    #[error(
        "snapshot format version {found} is not supported (this build reads versions {oldest} to {newest})"
    )]
    UnsupportedFormat {
        /// Version in the snapshot.
        found: u16,
        /// Oldest version this build reads.
        oldest: u16,
        /// Newest version this build reads (and the one it writes).
        newest: u16,
    },
    /// The checksum does not match the contents.
    #[error("snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Stored CRC-32.
        stored: u32,
        /// Computed CRC-32.
        computed: u32,
    },
    /// The snapshot was taken with a firmware configuration this VM does not offer.
    #[error("snapshot firmware configuration {snapshot} is not compatible with this VM's {local}")]
    IncompatibleConfig {
        /// Summary of the snapshot's configuration.
        snapshot: String,
        /// Summary of this VM's configuration.
        local: String,
    },
    /// The vCPU topology differs.
    #[error("snapshot has {snapshot} vCPUs, this VM has {local}")]
    CpuCountMismatch {
        /// vCPUs in the snapshot.
        snapshot: usize,
        /// vCPUs in this VM.
        local: usize,
    },
    /// A vCPU's MPIDR differs.
    #[error("vCPU {index} has MPIDR {snapshot:#x} in the snapshot but {local} here")]
    MpidrMismatch {
        /// vCPU index.
        index: usize,
        /// MPIDR in the snapshot.
        snapshot: u64,
        /// MPIDR here.
        local: Mpidr,
    },
    /// The stored configuration is not one this build can offer (a PSCI
    /// version, function group or other setting it does not have: written by
    /// a newer build).
    #[error(
        "the guest's firmware configuration (PSCI version, functions, power states) is not \
         one this build can offer"
    )]
    UnknownConfiguration,
    /// A field holds a value the format does not define.
    #[error("snapshot field {field} holds invalid value {value:#x}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// Bytes left over after the last field.
    #[error("snapshot has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_match_den0022_table() {
        let codes: Vec<i32> = PsciError::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, vec![-1, -2, -3, -4, -5, -6, -7, -8, -9]);
    }

    #[test]
    fn error_register_value_is_sign_extended() {
        assert_eq!(PsciError::NotSupported.to_register(), u64::MAX);
        assert_eq!(
            PsciError::InvalidAddress.to_register(),
            0xFFFF_FFFF_FFFF_FFF7
        );
        assert_eq!(
            PsciError::from_register(0xFFFF_FFF7),
            Some(PsciError::InvalidAddress)
        );
        assert_eq!(PsciError::from_register(0), None);
    }
}
