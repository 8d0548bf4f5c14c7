//! Ballooned pages the device holds back from `MADV_DONTNEED` for a moment, so that the host
//! keeps its transparent huge pages whole.
//!
//! Guest RAM is backed by 2 MiB pages where the host has them (`vmm::memory`). Discarding part
//! of one splits it: the kernel replaces the huge page by a table of 4 KiB pages, and when the
//! guest touches that memory again each 4 KiB page faults in on its own, 512 faults where one
//! would do (on a host without hardware virtualization each is an expensive exit). A driver
//! inflates 1 MiB (256 PFNs) per request, so a 2 MiB block reaches the device in two requests
//! or more, and an inflation that starts or stops inside a block covers only part of it.
//!
//! So ballooned pages that cover only part of a 2 MiB block (guest-physical, which lines up
//! with the host's huge pages: RAM regions start on 2 MiB boundaries and the host maps them
//! 2 MiB-aligned) are held: when the rest of the block arrives the whole block is discarded in
//! one call, and the huge page goes back to the host whole. What is held is bounded: at most
//! [`MAX_HELD_BLOCKS`] blocks (the oldest goes when another is needed) and at most
//! [`HOLD_FOR`] (the device then discards everything held, in 4 KiB runs as before).
//!
//! Holding is only safe if the guest does not touch a ballooned page before the device has
//! seen it leave the balloon: the device holds pages only when the driver negotiated
//! `VIRTIO_BALLOON_F_MUST_TELL_HOST`, and a deflate request releases the pages it names before
//! it is acknowledged. A reset forgets what is held (nothing is discarded: the guest owns all
//! its memory again).

use std::time::Duration;

use super::PAGE_SIZE;

/// Pages in a block: a 2 MiB huge page of the host.
pub const BLOCK_PAGES: u64 = 512;
/// A block in bytes.
pub const BLOCK_SIZE: u64 = BLOCK_PAGES * PAGE_SIZE;
/// The most blocks held at once (64 MiB of guest memory).
pub const MAX_HELD_BLOCKS: usize = 32;
/// The longest a page is held before the device discards it anyway.
pub const HOLD_FOR: Duration = Duration::from_millis(500);

/// One partly ballooned block.
#[derive(Debug, Clone)]
struct Held {
    /// Guest-physical address of the block.
    start: u64,
    /// Bit `i`: page `i` of the block is ballooned and not yet discarded.
    pages: [u64; (BLOCK_PAGES / 64) as usize],
}

impl Held {
    fn count(&self) -> u32 {
        self.pages.iter().map(|w| w.count_ones()).sum()
    }

    fn set(&mut self, first: u64, count: u64, on: bool) {
        for page in first..first + count {
            let (word, bit) = ((page / 64) as usize, page % 64);
            if on {
                self.pages[word] |= 1 << bit;
            } else {
                self.pages[word] &= !(1 << bit);
            }
        }
    }

    /// The held pages as (address, length) runs.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for page in 0..BLOCK_PAGES {
            let held = self.pages[(page / 64) as usize] & (1 << (page % 64)) != 0;
            match (&mut run, held) {
                (Some((_, pages)), true) => *pages += 1,
                (None, true) => run = Some((page, 1)),
                (Some(_), false) => {
                    if let Some(r) = run.take() {
                        runs.push(r);
                    }
                }
                (None, false) => {}
            }
        }
        runs.extend(run);
        runs.into_iter()
            .map(|(page, pages)| (self.start + page * PAGE_SIZE, pages * PAGE_SIZE))
            .collect()
    }
}

/// The blocks held, oldest first.
#[derive(Debug, Clone)]
pub struct HeldBlocks {
    blocks: Vec<Held>,
    limit: usize,
}

impl HeldBlocks {
    pub fn new(limit: usize) -> HeldBlocks {
        HeldBlocks {
            blocks: Vec::new(),
            limit: limit.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Pages held now.
    #[cfg(test)]
    pub fn pages(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.count())).sum()
    }

    /// Takes the ballooned range `[start, start + len)` (page-aligned, inside guest RAM): whole
    /// blocks, and blocks it completes, go to `discard` at once; parts of blocks are held.
    /// `whole_block_in_ram(block)` says whether a block lies entirely in guest RAM; parts of
    /// one that does not (at the end of RAM) are discarded at once, as it can never fill.
    pub fn inflate(
        &mut self,
        start: u64,
        len: u64,
        whole_block_in_ram: impl Fn(u64) -> bool,
        discard: &mut impl FnMut(u64, u64) -> Result<(), String>,
    ) -> Result<(), String> {
        let end = start + len;
        let mut at = start;
        while at < end {
            let block = at - at % BLOCK_SIZE;
            let piece_end = end.min(block + BLOCK_SIZE);
            let index = self.blocks.iter().position(|b| b.start == block);
            if piece_end - at == BLOCK_SIZE {
                // A whole block: what was held of it goes with it.
                if let Some(i) = index {
                    self.blocks.remove(i);
                }
                discard(block, BLOCK_SIZE)?;
            } else if !whole_block_in_ram(block) {
                discard(at, piece_end - at)?;
            } else {
                let i = match index {
                    Some(i) => i,
                    None => {
                        if self.blocks.len() >= self.limit {
                            let oldest = self.blocks.remove(0);
                            for (addr, len) in oldest.runs() {
                                discard(addr, len)?;
                            }
                        }
                        self.blocks.push(Held {
                            start: block,
                            pages: [0; (BLOCK_PAGES / 64) as usize],
                        });
                        self.blocks.len() - 1
                    }
                };
                let held = &mut self.blocks[i];
                held.set((at - block) / PAGE_SIZE, (piece_end - at) / PAGE_SIZE, true);
                if u64::from(held.count()) == BLOCK_PAGES {
                    self.blocks.remove(i);
                    discard(block, BLOCK_SIZE)?;
                }
            }
            at = piece_end;
        }
        Ok(())
    }

    /// The guest takes `[start, start + len)` back: none of it may be discarded any more.
    pub fn deflate(&mut self, start: u64, len: u64) {
        let end = start + len;
        for held in &mut self.blocks {
            let from = start.max(held.start);
            let to = end.min(held.start + BLOCK_SIZE);
            if from < to {
                held.set(
                    (from - held.start) / PAGE_SIZE,
                    (to - from) / PAGE_SIZE,
                    false,
                );
            }
        }
        self.blocks.retain(|b| b.count() > 0);
    }

    /// Discards everything held.
    pub fn flush(
        &mut self,
        discard: &mut impl FnMut(u64, u64) -> Result<(), String>,
    ) -> Result<(), String> {
        for held in std::mem::take(&mut self.blocks) {
            for (addr, len) in held.runs() {
                discard(addr, len)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Runs `f` with a discard that records its calls.
    fn recorded(f: impl FnOnce(&mut dyn FnMut(u64, u64) -> Result<(), String>)) -> Vec<(u64, u64)> {
        let mut calls = Vec::new();
        f(&mut |addr, len| {
            calls.push((addr, len));
            Ok(())
        });
        calls
    }

    fn inflate(held: &mut HeldBlocks, start: u64, len: u64) -> Vec<(u64, u64)> {
        recorded(|d| {
            held.inflate(start, len, |b| b < 64 * MIB, &mut |a, l| d(a, l))
                .expect("inflate")
        })
    }

    #[test]
    fn a_block_in_two_halves_is_discarded_whole() {
        let mut held = HeldBlocks::new(MAX_HELD_BLOCKS);
        // Top half first, as a driver that fills the balloon downward sends it.
        assert_eq!(inflate(&mut held, 5 * MIB, MIB), vec![]);
        assert_eq!(held.pages(), 256);
        assert_eq!(inflate(&mut held, 4 * MIB, MIB), vec![(4 * MIB, 2 * MIB)]);
        assert!(held.is_empty());
    }

    #[test]
    fn whole_blocks_go_at_once_and_the_edges_are_held() {
        let mut held = HeldBlocks::new(MAX_HELD_BLOCKS);
        // 1 MiB .. 7 MiB: half of block 0, blocks 1 and 2, half of block 3.
        assert_eq!(
            inflate(&mut held, MIB, 6 * MIB),
            vec![(2 * MIB, 2 * MIB), (4 * MIB, 2 * MIB)]
        );
        assert_eq!(held.pages(), 512);
        // A whole block that was partly held goes whole and is held no more.
        assert_eq!(inflate(&mut held, 0, 2 * MIB), vec![(0, 2 * MIB)]);
        assert_eq!(held.pages(), 256);
        // The same pages twice count once.
        assert_eq!(inflate(&mut held, 6 * MIB, MIB), vec![]);
        assert_eq!(held.pages(), 256);
    }

    #[test]
    fn deflated_pages_are_never_discarded() {
        let mut held = HeldBlocks::new(MAX_HELD_BLOCKS);
        inflate(&mut held, 0, MIB);
        held.deflate(0x1000, 0x2000);
        held.deflate(60 * MIB, MIB); // not held: nothing happens
        let flushed = recorded(|d| held.flush(&mut |a, l| d(a, l)).expect("flush"));
        assert_eq!(flushed, vec![(0, 0x1000), (0x3000, MIB - 0x3000)]);
        assert!(held.is_empty());
        // A block whose every held page was deflated is dropped.
        inflate(&mut held, 2 * MIB, 0x1000);
        held.deflate(2 * MIB, 0x1000);
        assert!(held.is_empty());
        // Completing a block after part of it was deflated does not discard that part.
        inflate(&mut held, 4 * MIB, MIB);
        held.deflate(4 * MIB, 0x1000);
        assert_eq!(inflate(&mut held, 5 * MIB, MIB), vec![]);
        assert_eq!(held.pages(), 511);
    }

    #[test]
    fn the_oldest_block_goes_when_the_limit_is_reached() {
        let mut held = HeldBlocks::new(2);
        inflate(&mut held, 0, 0x1000);
        inflate(&mut held, 2 * MIB, 0x1000);
        assert_eq!(inflate(&mut held, 4 * MIB, 0x1000), vec![(0, 0x1000)]);
        assert_eq!(held.pages(), 2);
    }

    #[test]
    fn parts_of_a_block_past_the_end_of_ram_go_at_once() {
        let mut held = HeldBlocks::new(MAX_HELD_BLOCKS);
        // RAM ends at 64 MiB in `inflate`: block 64 MiB is not whole.
        assert_eq!(
            inflate(&mut held, 64 * MIB, 0x3000),
            vec![(64 * MIB, 0x3000)]
        );
        assert!(held.is_empty());
    }

    #[test]
    fn runs_follow_the_bitmap() {
        let mut block = Held {
            start: 8 * MIB,
            pages: [0; 8],
        };
        block.set(0, 2, true);
        block.set(63, 3, true);
        block.set(511, 1, true);
        assert_eq!(
            block.runs(),
            vec![
                (8 * MIB, 0x2000),
                (8 * MIB + 63 * 0x1000, 0x3000),
                (8 * MIB + 511 * 0x1000, 0x1000)
            ]
        );
    }
}
