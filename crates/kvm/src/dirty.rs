//! Dirty page logs: which guest pages were written since the last fetch.
//!
//! KVM keeps one bitmap per memory slot once the slot has
//! `KVM_MEM_LOG_DIRTY_PAGES` set ([`KvmVm::set_dirty_logging`](crate::KvmVm));
//! `KVM_GET_DIRTY_LOG` hands it over and clears it (Documentation/virt/kvm/api.rst,
//! 4.8: without `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` the fetch also write-protects
//! the pages again). Bit `n` of the bitmap stands for the slot's page `n`, pages
//! being the host's page size. The log only sees writes made by the guest (and by
//! KVM on its behalf): writes the VMM makes through its own mapping are not in it.

/// One memory slot's dirty bitmap, as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyLog {
    /// Guest physical address of the slot's first byte.
    pub guest_addr: u64,
    /// Bytes per page (the host's page size).
    pub page_size: u64,
    /// Pages in the slot.
    pub pages: u64,
    /// One bit per page, page `n` in bit `n % 64` of word `n / 64`.
    pub bitmap: Vec<u64>,
}

impl DirtyLog {
    /// A log of `pages` pages of `page_size` bytes from `guest_addr`, none dirty.
    pub fn clean(guest_addr: u64, page_size: u64, pages: u64) -> DirtyLog {
        DirtyLog {
            guest_addr,
            page_size,
            pages,
            bitmap: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Whether the page holding guest physical address `addr` is dirty.
    pub fn is_dirty(&self, addr: u64) -> bool {
        let Some(page) = self.page_of(addr) else {
            return false;
        };
        self.bitmap
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Marks every page that `len` bytes from `addr` touch (parts outside the
    /// slot are ignored).
    pub fn mark(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.saturating_add(len - 1);
        let first = addr.max(self.guest_addr);
        let last = end.min(self.guest_addr + self.pages * self.page_size - 1);
        if first > last {
            return;
        }
        for page in
            (first - self.guest_addr) / self.page_size..=(last - self.guest_addr) / self.page_size
        {
            if let Some(w) = self.bitmap.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// Adds every page dirty in `other` (the same slot) to this log.
    pub fn merge(&mut self, other: &DirtyLog) {
        for (w, o) in self.bitmap.iter_mut().zip(&other.bitmap) {
            *w |= o;
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Guest physical addresses of the dirty pages, ascending.
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(move |(i, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(i as u64 * 64 + bit)
            })
            .filter(move |&page| page < self.pages)
            .map(move |page| self.guest_addr + page * self.page_size)
        })
    }

    fn page_of(&self, addr: u64) -> Option<u64> {
        let offset = addr.checked_sub(self.guest_addr)?;
        let page = offset / self.page_size;
        (page < self.pages).then_some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_ranges_cover_exactly_the_pages_they_touch() {
        let mut log = DirtyLog::clean(0x4000_0000, 4096, 200);
        log.mark(0x4000_0FFF, 2); // pages 0 and 1
        log.mark(0x4000_0000 + 130 * 4096, 1); // page 130
        log.mark(0x3FFF_F000, 0x2000); // before the slot, then page 0 again
        log.mark(0x4000_0000 + 199 * 4096, 1 << 20); // the last page, then past the end
        assert_eq!(log.count(), 4);
        let pages: Vec<u64> = log
            .dirty_pages()
            .map(|a| (a - 0x4000_0000) / 4096)
            .collect();
        assert_eq!(pages, vec![0, 1, 130, 199]);
        assert!(log.is_dirty(0x4000_1234));
        assert!(!log.is_dirty(0x4000_2000));
        assert!(!log.is_dirty(0x5000_0000));
    }

    #[test]
    fn merging_adds_the_other_logs_pages() {
        let mut a = DirtyLog::clean(0, 4096, 64);
        let mut b = DirtyLog::clean(0, 4096, 64);
        a.mark(0, 1);
        b.mark(63 * 4096, 1);
        a.merge(&b);
        assert_eq!(a.dirty_pages().collect::<Vec<_>>(), vec![0, 63 * 4096]);
    }
}
