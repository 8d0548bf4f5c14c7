//! The compact structures that keep a placement decision away from a scan
//! of every host and every VM: hosts ordered by free memory, interned label
//! pairs, and per-host multisets of them.

use std::cmp::Reverse;
use std::collections::{btree_set, BTreeSet, BinaryHeap, HashMap};

use super::model::Strategy;

/// Ready hosts of one scope (a cell, a zone, the cluster) ordered by free
/// memory, then by host slot. Bin-pack walks it upwards from the VM's
/// memory (best fit first); spread walks it downwards (emptiest first).
#[derive(Debug, Default)]
pub(super) struct FreeMemoryIndex {
    hosts: BTreeSet<(u64, u32)>,
}

impl FreeMemoryIndex {
    pub(super) fn insert(&mut self, free_mib: u64, host: u32) {
        self.hosts.insert((free_mib, host));
    }

    pub(super) fn remove(&mut self, free_mib: u64, host: u32) {
        self.hosts.remove(&(free_mib, host));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.hosts.len()
    }

    #[cfg(test)]
    pub(super) fn contains(&self, free_mib: u64, host: u32) -> bool {
        self.hosts.contains(&(free_mib, host))
    }

    /// Hosts with at least `need_mib` free, in the strategy's order.
    pub(super) fn candidates(&self, need_mib: u64, strategy: Strategy) -> Candidates<'_> {
        Candidates {
            range: self.hosts.range((need_mib, 0)..),
            strategy,
        }
    }
}

/// One index walked in a strategy's order.
pub(super) struct Candidates<'a> {
    range: btree_set::Range<'a, (u64, u32)>,
    strategy: Strategy,
}

impl Iterator for Candidates<'_> {
    type Item = (u64, u32);

    fn next(&mut self) -> Option<(u64, u32)> {
        match self.strategy {
            Strategy::BinPack => self.range.next().copied(),
            Strategy::Spread => self.range.next_back().copied(),
        }
    }
}

/// Several indexes walked as one, in the strategy's order (a k-way merge).
pub(super) struct MergedCandidates<'a> {
    sources: Vec<Candidates<'a>>,
    // Min-heap on an order key: (free, host) for bin-pack, its complement
    // for spread, so one heap serves both directions.
    heads: BinaryHeap<Reverse<((u64, u32), usize)>>,
    strategy: Strategy,
}

impl<'a> MergedCandidates<'a> {
    pub(super) fn new(sources: Vec<Candidates<'a>>, strategy: Strategy) -> Self {
        let mut merged = Self {
            heads: BinaryHeap::with_capacity(sources.len()),
            sources,
            strategy,
        };
        for i in 0..merged.sources.len() {
            merged.advance(i);
        }
        merged
    }

    fn order_key(&self, (free, host): (u64, u32)) -> (u64, u32) {
        match self.strategy {
            Strategy::BinPack => (free, host),
            Strategy::Spread => (u64::MAX - free, u32::MAX - host),
        }
    }

    fn advance(&mut self, source: usize) {
        if let Some(entry) = self.sources.get_mut(source).and_then(Iterator::next) {
            let key = self.order_key(entry);
            self.heads.push(Reverse((key, source)));
        }
    }
}

impl Iterator for MergedCandidates<'_> {
    type Item = (u64, u32);

    fn next(&mut self) -> Option<(u64, u32)> {
        let Reverse((key, source)) = self.heads.pop()?;
        self.advance(source);
        Some(match self.strategy {
            Strategy::BinPack => key,
            Strategy::Spread => (u64::MAX - key.0, u32::MAX - key.1),
        })
    }
}

/// Interns `key=value` pairs into small ids, reference-counted so pairs of
/// released VMs do not accumulate.
#[derive(Debug, Default)]
pub(super) struct PairInterner {
    ids: HashMap<String, HashMap<String, u32>>,
    entries: Vec<PairEntry>,
    free: Vec<u32>,
}

#[derive(Debug, Default)]
struct PairEntry {
    key: String,
    value: String,
    refs: u64,
}

impl PairInterner {
    /// The id of a pair if some VM holds it.
    pub(super) fn get(&self, key: &str, value: &str) -> Option<u32> {
        self.ids.get(key)?.get(value).copied()
    }

    /// The id of a pair, taking one reference.
    pub(super) fn acquire(&mut self, key: &str, value: &str) -> u32 {
        if let Some(id) = self.get(key, value) {
            if let Some(entry) = self.entries.get_mut(id as usize) {
                entry.refs += 1;
            }
            return id;
        }
        let entry = PairEntry {
            key: key.to_owned(),
            value: value.to_owned(),
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        self.ids
            .entry(key.to_owned())
            .or_default()
            .insert(value.to_owned(), id);
        id
    }

    /// Drops one reference; forgets the pair at zero.
    pub(super) fn release(&mut self, id: u32) {
        let Some(entry) = self.entries.get_mut(id as usize) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs > 0 {
            return;
        }
        let key = std::mem::take(&mut entry.key);
        let value = std::mem::take(&mut entry.value);
        if let Some(values) = self.ids.get_mut(&key) {
            values.remove(&value);
            if values.is_empty() {
                self.ids.remove(&key);
            }
        }
        self.free.push(id);
    }

    #[cfg(test)]
    pub(super) fn name(&self, id: u32) -> Option<(&str, &str)> {
        let entry = self.entries.get(id as usize).filter(|e| e.refs > 0)?;
        Some((&entry.key, &entry.value))
    }

    #[cfg(test)]
    pub(super) fn live(&self) -> usize {
        self.entries.iter().filter(|e| e.refs > 0).count()
    }
}

/// A multiset of pair ids, sorted: a host's VM labels or its VMs'
/// anti-affinity pairs. Hosts hold tens of entries, so a sorted vector
/// beats a hash map on both memory and lookup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct PairCounts {
    counts: Vec<(u32, u32)>,
}

impl PairCounts {
    pub(super) fn contains(&self, id: u32) -> bool {
        self.counts.binary_search_by_key(&id, |(i, _)| *i).is_ok()
    }

    pub(super) fn add(&mut self, id: u32) {
        match self.counts.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(at) => self.counts[at].1 += 1,
            Err(at) => self.counts.insert(at, (id, 1)),
        }
    }

    pub(super) fn remove(&mut self, id: u32) {
        if let Ok(at) = self.counts.binary_search_by_key(&id, |(i, _)| *i) {
            if self.counts[at].1 > 1 {
                self.counts[at].1 -= 1;
            } else {
                self.counts.remove(at);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn entries(&self) -> &[(u32, u32)] {
        &self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_candidates_follow_the_strategy_order() {
        let mut a = FreeMemoryIndex::default();
        let mut b = FreeMemoryIndex::default();
        for (free, host) in [(10, 0), (30, 1), (50, 2)] {
            a.insert(free, host);
        }
        for (free, host) in [(20, 3), (30, 4), (5, 5)] {
            b.insert(free, host);
        }
        for (strategy, need, expected) in [
            (Strategy::BinPack, 10, vec![0, 3, 1, 4, 2]),
            (Strategy::Spread, 10, vec![2, 4, 1, 3, 0]),
            (Strategy::BinPack, 0, vec![5, 0, 3, 1, 4, 2]),
            (Strategy::Spread, 60, vec![]),
        ] {
            let merged = MergedCandidates::new(
                vec![a.candidates(need, strategy), b.candidates(need, strategy)],
                strategy,
            );
            let hosts: Vec<u32> = merged.map(|(_, h)| h).collect();
            assert_eq!(hosts, expected, "{strategy:?} need {need}");
        }
    }

    #[test]
    fn pair_interner_reuses_and_forgets_ids() {
        let mut pairs = PairInterner::default();
        let web = pairs.acquire("app", "web");
        assert_eq!(pairs.acquire("app", "web"), web);
        let db = pairs.acquire("app", "db");
        assert_ne!(web, db);
        pairs.release(web);
        assert_eq!(pairs.get("app", "web"), Some(web));
        pairs.release(web);
        assert_eq!(pairs.get("app", "web"), None);
        assert_eq!(pairs.live(), 1);
        // A released id is reused.
        assert_eq!(pairs.acquire("tier", "gold"), web);
    }

    #[test]
    fn pair_counts_are_a_multiset() {
        let mut counts = PairCounts::default();
        counts.add(7);
        counts.add(3);
        counts.add(7);
        assert!(counts.contains(7) && counts.contains(3));
        counts.remove(7);
        assert!(counts.contains(7));
        counts.remove(7);
        assert!(!counts.contains(7));
        counts.remove(42);
        assert_eq!(counts.entries(), &[(3, 1)]);
    }
}
