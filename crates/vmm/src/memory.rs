//! What the host knows about guest RAM's pages: which ones its mapping ever
//! backed. A page never backed reads as zero, so a snapshot stores it as a
//! hole and a migration does not send it, neither reading it (reading would
//! back it with the zero page, and scanning all of guest RAM for zero pages
//! took seconds per 256 MiB under emulation).

use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The host's page size: the unit of `/proc/self/pagemap` (and of KVM's
/// dirty logs).
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

/// Which of the `pages` host pages of guest RAM from `base` (guest physical)
/// the anonymous mapping behind them has ever backed, present or swapped out
/// (`/proc/self/pagemap`, bits 63 and 62,
/// Documentation/admin-guide/mm/pagemap.rst).
///
/// `None` when that cannot be told, and the caller must treat every page as
/// backed: the pagemap file cannot be read, `page_size` is not the host's
/// page size (pagemap has one entry per host page), or the pages are not all
/// in the one mapping at `base`.
pub fn touched_pages(
    memory: &GuestMemoryMmap,
    base: u64,
    pages: u64,
    page_size: u64,
) -> Option<Vec<bool>> {
    if page_size != host_page_size() {
        return None;
    }
    let region = memory.find_region(GuestAddress(base))?;
    let inside = base - region.start_addr().0;
    if pages.checked_mul(page_size)? > region.len().checked_sub(inside)? {
        return None;
    }
    let host = memory.get_host_address(GuestAddress(base)).ok()? as u64;
    if host % page_size != 0 {
        return None;
    }
    let file = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut entries = vec![0u8; usize::try_from(pages).ok()?.checked_mul(8)?];
    file.read_exact_at(&mut entries, host / page_size * 8)
        .ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| {
                let word = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                word & (3 << 62) != 0
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    const BASE: u64 = 0x4000_0000;

    #[test]
    fn only_the_pages_written_read_as_touched() {
        let page = host_page_size();
        let pages = 64;
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), (pages * page) as usize)]).unwrap();
        memory
            .write_obj(1u8, GuestAddress(BASE + 3 * page))
            .unwrap();
        memory
            .write_slice(&[7u8; 10], GuestAddress(BASE + 41 * page + page - 5))
            .unwrap();
        let touched = touched_pages(&memory, BASE, pages, page).expect("pagemap readable");
        let found: Vec<u64> = (0..pages).filter(|&i| touched[i as usize]).collect();
        assert_eq!(found, [3, 41, 42]);
    }

    #[test]
    fn pages_outside_the_mapping_or_of_another_size_are_not_guessed() {
        let page = host_page_size();
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), (8 * page) as usize)]).unwrap();
        assert_eq!(touched_pages(&memory, BASE, 9, page), None);
        assert_eq!(touched_pages(&memory, BASE + 8 * page, 1, page), None);
        assert_eq!(touched_pages(&memory, BASE, 1, page * 2), None);
        assert!(touched_pages(&memory, BASE + page, 7, page).is_some());
    }
}
