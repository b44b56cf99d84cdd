//! How many calls the engine answered, per function: one relaxed atomic per
//! function in the engine's table (plus one for unknown IDs), bumped by the
//! calling vCPU thread after the engine decided, read by the control API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use vpsci_firmware::FunctionId;

use crate::events::UNKNOWN_FUNCTION;

/// Per-function call counters (kept across VM restarts by whoever owns them).
#[derive(Debug)]
pub struct CallCounts {
    /// Indexed like `FunctionId::ALL`, then one slot for unknown IDs.
    counts: Vec<AtomicU64>,
}

impl Default for CallCounts {
    fn default() -> Self {
        CallCounts {
            counts: (0..=FunctionId::ALL.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl CallCounts {
    /// Counts one call of `function_id` (w0).
    pub fn count(&self, function_id: u32) {
        let slot = FunctionId::try_from(function_id)
            .ok()
            .and_then(|id| FunctionId::ALL.iter().position(|f| *f == id))
            .unwrap_or(FunctionId::ALL.len());
        if let Some(counter) = self.counts.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every function called at least once, by name, with its count.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let names = FunctionId::ALL
            .iter()
            .map(|f| f.name())
            .chain(std::iter::once(UNKNOWN_FUNCTION));
        names
            .zip(self.counts.iter())
            .map(|(name, c)| (name, c.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .fold(BTreeMap::new(), |mut map, (name, n)| {
                // SMC32 and SMC64 forms share a name: add them up.
                *map.entry(name.to_owned()).or_insert(0) += n;
                map
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_name_with_both_conventions_together_and_unknown_ids_apart() {
        let c = CallCounts::default();
        c.count(0x8400_0003); // CPU_ON, SMC32
        c.count(0xC400_0003); // CPU_ON, SMC64
        c.count(0x8400_0000); // PSCI_VERSION
        c.count(0x8400_00FF); // unknown
        let s = c.snapshot();
        assert_eq!(s.get("CPU_ON"), Some(&2));
        assert_eq!(s.get("PSCI_VERSION"), Some(&1));
        assert_eq!(s.get(UNKNOWN_FUNCTION), Some(&1));
        assert_eq!(s.len(), 3, "{s:?}");
    }
}
