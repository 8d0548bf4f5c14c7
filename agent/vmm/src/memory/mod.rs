//! Guest physical memory: its layout and its backing.
//!
//! RAM is one anonymous private mapping per range (`MAP_NORESERVE`), so the host commits a page
//! only when the guest first touches it: a 4 GiB VM that uses 100 MiB costs the host 100 MiB.
//! The 1 GiB below 4 GiB is left as a hole for MMIO devices, as on a PC.
//!
//! The mappings are marked `MADV_HUGEPAGE`, as QEMU and Cloud Hypervisor do by default: where
//! the host has transparent huge pages (`enabled` = `always` or `madvise`), guest RAM is backed by
//! 2 MiB pages, which saves the guest TLB misses and makes direct I/O into guest memory cheaper
//! (virtio-blk with `cache=none` pins and maps 2 MiB at a time instead of 4 KiB; on a 2-core
//! host that was 1.6x on sequential direct writes, `docs/benchmarks.md`). The host then commits
//! memory in 2 MiB steps where the guest touches it. The balloon gives memory back in whole
//! 2 MiB blocks where it can (it holds partial blocks back for a moment, see
//! `devices::virtio::balloon`), since discarding part of a huge page splits it and the guest
//! then faults that memory back in 4 KiB at a time. Pages it does give back singly still leave
//! the VMM's RSS at once; the kernel frees the split huge page's unmapped part when it needs
//! memory (deferred split).

use std::ptr::NonNull;

use nix::sys::mman::{madvise, MmapAdvise};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the hole below 4 GiB that holds MMIO devices, the IOAPIC and the LAPIC.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of that hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where the first virtio-mmio device window starts (inside the MMIO gap).
pub const MMIO_DEVICES_START: u64 = 0xD000_0000;
/// The smallest VM fabric-vmm builds: below this a Linux guest cannot boot.
pub const MIN_MEMORY_MIB: u64 = 64;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical RAM ranges for `size` bytes of RAM, skipping the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `mib` MiB of guest RAM; nothing is touched, so nothing is committed yet.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let memory = GuestMemoryMmap::from_ranges(&ram_ranges(mib << 20))
        .map_err(|source| MemoryError::Map { mib, source })?;
    for region in memory.iter() {
        // A live mapping never starts at address 0.
        let Some(start) = NonNull::new(region.as_ptr().cast()) else {
            continue;
        };
        // SAFETY: the range is exactly one live mapping that `memory` owns; MADV_HUGEPAGE only
        // tells the kernel how to back it and changes no byte of it.
        let advised = unsafe { madvise(start, region.len() as usize, MmapAdvise::MADV_HUGEPAGE) };
        if let Err(errno) = advised {
            // A kernel without transparent huge pages: 4 KiB pages work as well, just slower.
            tracing::debug!(
                error = %std::io::Error::from(errno),
                "guest memory: MADV_HUGEPAGE refused"
            );
        }
    }
    Ok(memory)
}

/// Total RAM of the host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_vm_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_vm_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1].0, GuestAddress(MMIO_GAP_END));
        let total: usize = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn mapping_does_not_commit_memory() {
        // 1 GiB mapped must not show up as resident.
        let mem = create_guest_memory(1024).expect("map");
        assert_eq!(mem.num_regions(), 1);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let rss_kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            rss_kib < 512 * 1024,
            "RSS {rss_kib} KiB after mapping 1 GiB"
        );
    }
}
