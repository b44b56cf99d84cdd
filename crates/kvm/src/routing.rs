//! The per-VM SMCCC routing table: which function IDs KVM forwards to
//! userspace (`KVM_EXIT_HYPERCALL`) and which it keeps.
//!
//! By default the whole PSCI range (DEN0022 §5.1: function numbers
//! `0x00..=0x1F` of the standard secure service owner, SMC32 and SMC64) and
//! the TRNG range (DEN0098: `0x50..=0x53`) go to userspace. The SMCCC
//! architecture range (`0x8000_0000..=0x8000_FFFF`, `0xC000_0000..=0xC000_FFFF`)
//! is reserved by KVM and cannot be filtered: KVM answers SMCCC_VERSION,
//! ARCH_FEATURES and the workarounds itself. Chosen calls can be handed back
//! to the kernel ([`SmcccRouting::keep_in_kernel`]), for example CPU_SUSPEND
//! so guest idle never leaves the kernel.

use crate::KvmError;

/// What KVM does with a range of function IDs (`enum kvm_smccc_filter_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterAction {
    /// KVM handles the call itself (the default for unfiltered IDs).
    Handle,
    /// KVM answers NOT_SUPPORTED without involving userspace.
    Deny,
    /// KVM exits to userspace with `KVM_EXIT_HYPERCALL`.
    ForwardToUser,
}

/// One entry of the SMCCC filter: `count` function IDs from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterRange {
    /// First function ID.
    pub base: u32,
    /// Number of consecutive function IDs (at least 1).
    pub count: u32,
    /// What KVM does with them.
    pub action: FilterAction,
}

/// Function IDs of the PSCI range, SMC32 calling convention.
const PSCI32: (u32, u32) = (0x8400_0000, 0x20);
/// Function IDs of the PSCI range, SMC64 calling convention.
const PSCI64: (u32, u32) = (0xC400_0000, 0x20);
/// TRNG, SMC32.
const TRNG32: (u32, u32) = (0x8400_0050, 4);
/// TRNG, SMC64.
const TRNG64: (u32, u32) = (0xC400_0050, 4);

/// The per-VM routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmcccRouting {
    /// `None`: no filter at all, KVM's in-kernel PSCI answers everything.
    forwarded: Option<Vec<(u32, u32)>>,
    /// Function IDs inside the forwarded ranges that stay in the kernel.
    kernel: Vec<u32>,
}

impl Default for SmcccRouting {
    fn default() -> Self {
        SmcccRouting::userspace_psci()
    }
}

impl SmcccRouting {
    /// Forward PSCI (32 and 64 bit) and TRNG to userspace.
    pub fn userspace_psci() -> SmcccRouting {
        SmcccRouting {
            forwarded: Some(vec![PSCI32, PSCI64, TRNG32, TRNG64]),
            kernel: Vec::new(),
        }
    }

    /// Install no filter: KVM's in-kernel PSCI handles every call. Loses
    /// everything vpsci's engine adds (see `vpsci run --help` for `--in-kernel-psci`).
    pub fn kernel_psci() -> SmcccRouting {
        SmcccRouting {
            forwarded: None,
            kernel: Vec::new(),
        }
    }

    /// Forward only `[base, base + count)` to userspace (for measuring the cost of
    /// a bare forwarded call on an unused range).
    pub fn forward_only(base: u32, count: u32) -> Result<SmcccRouting, KvmError> {
        check_range(base, count)?;
        Ok(SmcccRouting {
            forwarded: Some(vec![(base, count)]),
            kernel: Vec::new(),
        })
    }

    /// Hand `function_id` back to KVM (it must be inside a forwarded range).
    pub fn keep_in_kernel(mut self, function_id: u32) -> Result<SmcccRouting, KvmError> {
        let inside = self.forwarded.as_ref().is_some_and(|ranges| {
            ranges
                .iter()
                .any(|&(b, n)| function_id >= b && function_id - b < n)
        });
        if !inside {
            return Err(KvmError::BadRoute {
                base: function_id,
                count: 1,
                reason: "not inside a range forwarded to userspace",
            });
        }
        if !self.kernel.contains(&function_id) {
            self.kernel.push(function_id);
        }
        Ok(self)
    }

    /// Whether the VM uses KVM's in-kernel PSCI (no filter).
    pub fn is_kernel_psci(&self) -> bool {
        self.forwarded.is_none()
    }

    /// Whether KVM forwards `function_id` to userspace under this table.
    pub fn forwards(&self, function_id: u32) -> bool {
        self.filter_ranges().iter().any(|r| {
            r.action == FilterAction::ForwardToUser
                && function_id >= r.base
                && function_id - r.base < r.count
        })
    }

    /// The filter entries to install, in ascending order, with the kernel-kept
    /// IDs cut out of the forwarded ranges. Empty for in-kernel PSCI.
    pub fn filter_ranges(&self) -> Vec<FilterRange> {
        let Some(ranges) = &self.forwarded else {
            return Vec::new();
        };
        let mut kept = self.kernel.clone();
        kept.sort_unstable();
        let mut out = Vec::new();
        for &(base, count) in ranges {
            let end = base + count;
            let mut start = base;
            for &k in kept.iter().filter(|&&k| k >= base && k < end) {
                if k > start {
                    out.push(FilterRange {
                        base: start,
                        count: k - start,
                        action: FilterAction::ForwardToUser,
                    });
                }
                start = k + 1;
            }
            if start < end {
                out.push(FilterRange {
                    base: start,
                    count: end - start,
                    action: FilterAction::ForwardToUser,
                });
            }
        }
        out.sort_by_key(|r| r.base);
        out
    }
}

/// Rejects empty, wrapping and KVM-reserved ranges.
fn check_range(base: u32, count: u32) -> Result<(), KvmError> {
    let bad = |reason| KvmError::BadRoute {
        base,
        count,
        reason,
    };
    if count == 0 {
        return Err(bad("empty range"));
    }
    let last = base.checked_add(count - 1).ok_or(bad("range wraps"))?;
    for (rb, re) in [(0x8000_0000u32, 0x8000_FFFFu32), (0xC000_0000, 0xC000_FFFF)] {
        if base <= re && last >= rb {
            return Err(bad("overlaps the SMCCC architecture range KVM reserves"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_forwards_psci_and_trng_both_conventions() {
        let r = SmcccRouting::userspace_psci();
        for id in [
            0x8400_0000,
            0x8400_0008,
            0x8400_001F,
            0xC400_0003,
            0x8400_0050,
            0xC400_0053,
        ] {
            assert!(r.forwards(id), "{id:#x}");
        }
        for id in [0x8000_0000, 0x8400_0020, 0x8400_0054, 0xC500_0000] {
            assert!(!r.forwards(id), "{id:#x}");
        }
    }

    #[test]
    fn kernel_kept_call_is_cut_out_of_its_range() {
        let r = SmcccRouting::userspace_psci()
            .keep_in_kernel(0xC400_0001)
            .and_then(|r| r.keep_in_kernel(0x8400_0001));
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert!(!r.forwards(0xC400_0001));
        assert!(!r.forwards(0x8400_0001));
        assert!(r.forwards(0x8400_0000));
        assert!(r.forwards(0x8400_0002));
        let ranges = r.filter_ranges();
        assert_eq!(
            ranges[0],
            FilterRange {
                base: 0x8400_0000,
                count: 1,
                action: FilterAction::ForwardToUser
            }
        );
        assert_eq!(
            ranges[1],
            FilterRange {
                base: 0x8400_0002,
                count: 0x1E,
                action: FilterAction::ForwardToUser
            }
        );
    }

    #[test]
    fn keeping_an_unforwarded_call_is_refused() {
        assert!(SmcccRouting::userspace_psci()
            .keep_in_kernel(0x8000_0000)
            .is_err());
        assert!(SmcccRouting::kernel_psci()
            .keep_in_kernel(0x8400_0001)
            .is_err());
    }

    #[test]
    fn kernel_psci_installs_no_filter() {
        assert!(SmcccRouting::kernel_psci().filter_ranges().is_empty());
        assert!(!SmcccRouting::kernel_psci().forwards(0x8400_0000));
    }

    #[test]
    fn reserved_architecture_range_cannot_be_forwarded() {
        assert!(SmcccRouting::forward_only(0x8000_0000, 1).is_err());
        assert!(SmcccRouting::forward_only(0xBFFF_FFFF, 2).is_err());
        assert!(SmcccRouting::forward_only(0x8400_0000, 0).is_err());
        assert!(SmcccRouting::forward_only(0xFFFF_FFFF, 2).is_err());
        assert!(SmcccRouting::forward_only(0xC600_0000, 16).is_ok());
    }
}
