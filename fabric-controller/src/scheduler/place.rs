//! Filters, scorers, and the two ways of applying them: the fast path that
//! walks the free-memory indexes and stops after `candidate_limit` feasible
//! hosts, and the full scan that judges every host (the reference, and the
//! explanation of an unplaceable VM).

use std::cmp::Ordering;

use super::cluster::{Host, Scheduler, SetCounts};
use super::index::{Candidates, MergedCandidates};
use super::model::{Decision, Demand, HostState, Strategy};
use super::reasons::{FilterReason, Unplaceable};

/// Which zones a demand accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZoneScope {
    Any,
    Zone(u32),
    /// A zone no host is in.
    Unknown,
}

/// A demand with its names resolved to the snapshot's ids, once per decision.
struct Resolved<'d> {
    demand: &'d Demand,
    vcpus: u64,
    memory: u64,
    burst: u64,
    zone: ZoneScope,
    /// The availability set, if it has VMs (an empty set constrains nothing).
    set: Option<u32>,
    /// The demand's anti-affinity pairs that some VM holds (others match no
    /// host).
    anti_affinity: Vec<u32>,
    /// The demand's labels that some VM holds (others match no rule).
    labels: Vec<u32>,
}

/// One host's verdict for a demand (from [`Scheduler::explain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVerdict {
    /// The host.
    pub host_id: String,
    /// The first filter it fails, or `None` if it accepts the VM.
    pub rejected_by: Option<FilterReason>,
}

/// The best host seen so far while scoring.
struct Best<'a> {
    host: &'a Host,
    score: f64,
}

impl Scheduler {
    /// Chooses a host for a VM without changing the snapshot: the controller
    /// commits the decision, then calls [`Scheduler::assign`].
    ///
    /// The fast path scores at most `candidate_limit` feasible hosts; when
    /// it finds none, a full scan explains why (and, defensively, places
    /// the VM if the scan disagrees).
    pub fn place(&self, demand: &Demand) -> Result<Decision, Unplaceable> {
        let resolved = self.resolve(demand);
        if let Some(decision) = self.place_fast(&resolved) {
            return Ok(decision);
        }
        self.place_by_full_scan(&resolved)
    }

    /// Chooses the best host over every feasible host (no candidate limit):
    /// the reference the fast path is tested against; O(hosts).
    pub fn place_exhaustive(&self, demand: &Demand) -> Result<Decision, Unplaceable> {
        self.place_by_full_scan(&self.resolve(demand))
    }

    /// Every host's verdict for a demand, sorted by host id: the answer to
    /// "why not host X". O(hosts).
    pub fn explain(&self, demand: &Demand) -> Vec<HostVerdict> {
        let resolved = self.resolve(demand);
        let mut verdicts: Vec<HostVerdict> = self
            .full_scan(&resolved)
            .into_iter()
            .map(|(host, verdict)| HostVerdict {
                host_id: host.spec.id.clone(),
                rejected_by: verdict.err(),
            })
            .collect();
        verdicts.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        verdicts
    }

    /// The verdicts of the hosts `host_ids` only, in the order given (unknown ids left
    /// out): the filters of [`Self::explain`], the availability-set spread judged among these
    /// hosts (the least-used domains are those of the hosts given that pass the other
    /// filters). O(hosts given): for callers that know most hosts cannot take the VM anyway.
    pub fn explain_among<'h>(
        &self,
        demand: &Demand,
        host_ids: impl IntoIterator<Item = &'h str>,
    ) -> Vec<HostVerdict> {
        let resolved = self.resolve(demand);
        let hosts = host_ids.into_iter().filter_map(|id| self.host_by_id(id));
        self.scan(&resolved, hosts)
            .into_iter()
            .map(|(host, verdict)| HostVerdict {
                host_id: host.spec.id.clone(),
                rejected_by: verdict.err(),
            })
            .collect()
    }

    fn resolve<'d>(&self, demand: &'d Demand) -> Resolved<'d> {
        let zone = if demand.zone.is_empty() {
            ZoneScope::Any
        } else {
            self.zones
                .get(&demand.zone)
                .map_or(ZoneScope::Unknown, |&z| ZoneScope::Zone(z))
        };
        let set = if demand.availability_set.is_empty() {
            None
        } else {
            self.set_ids.get(&demand.availability_set).copied()
        };
        Resolved {
            demand,
            vcpus: u64::from(demand.vcpus),
            memory: demand.memory_minimum_mib,
            burst: demand.memory_burst_mib(),
            zone,
            set,
            anti_affinity: demand
                .anti_affinity_labels
                .iter()
                .filter_map(|(k, v)| self.pairs.get(k, v))
                .collect(),
            labels: demand
                .labels
                .iter()
                .filter_map(|(k, v)| self.pairs.get(k, v))
                .collect(),
        }
    }

    /// Every filter that judges a host on its own, in the fixed order:
    /// state, zone, cpu, memory, disk, anti-affinity. The availability-set filters
    /// (fault domain, then update domain) need the whole eligible set and
    /// come after, in [`Self::full_scan`] and [`Self::place_fast`].
    fn host_filter(&self, host: &Host, r: &Resolved<'_>) -> Result<(), FilterReason> {
        match host.spec.state {
            HostState::Ready => {}
            HostState::Suspect => return Err(FilterReason::NotReady),
            HostState::Dead => return Err(FilterReason::Dead),
            HostState::Cordoned => return Err(FilterReason::Cordoned),
            HostState::Draining => return Err(FilterReason::Draining),
        }
        match r.zone {
            ZoneScope::Any => {}
            ZoneScope::Zone(zone) if zone == host.zone => {}
            ZoneScope::Zone(_) | ZoneScope::Unknown => return Err(FilterReason::WrongZone),
        }
        if host.cpu_allocated.saturating_add(r.vcpus) > host.cpu_capacity {
            return Err(FilterReason::InsufficientCpu);
        }
        if host.memory_allocated.saturating_add(r.memory) > host.spec.allocatable_memory_mib {
            return Err(FilterReason::InsufficientMemory);
        }
        if let Some(disk) = host.spec.allocatable_disk_mib {
            if host.disk_allocated.saturating_add(r.demand.disk_mib) > disk {
                return Err(FilterReason::InsufficientDisk);
            }
        }
        let conflicts = r.anti_affinity.iter().any(|&p| host.vm_labels.contains(p))
            || r.labels.iter().any(|&p| host.vm_anti_affinity.contains(p));
        if conflicts {
            return Err(FilterReason::AntiAffinity);
        }
        Ok(())
    }

    /// The weighted score of a feasible host; higher is better.
    fn score(&self, host: &Host, r: &Resolved<'_>) -> f64 {
        let weights = self.config.weights;
        let cpu_used = host.cpu_allocated.saturating_add(r.vcpus);
        let memory_used = host.memory_allocated.saturating_add(r.memory);
        let utilization = (fraction(cpu_used, host.cpu_capacity)
            + fraction(memory_used, host.spec.allocatable_memory_mib))
            / 2.0;
        let fit = match r.demand.strategy {
            Strategy::BinPack => utilization,
            Strategy::Spread => 1.0 - utilization,
        };
        let growth = host.memory_burst.saturating_add(r.burst);
        let headroom = if growth == 0 {
            1.0
        } else {
            let free_after = host.spec.allocatable_memory_mib.saturating_sub(memory_used);
            (free_after as f64 / growth as f64).min(1.0)
        };
        weights.fit * fit + weights.memory_headroom * headroom
    }

    /// Scores feasible hosts from `candidates` (already in the strategy's
    /// order) until `candidate_limit` of them are scored; `in_group` selects
    /// the hosts of the availability-set group being searched.
    fn best_of(
        &self,
        candidates: impl Iterator<Item = (u64, u32)>,
        r: &Resolved<'_>,
        in_group: impl Fn(&Host) -> bool,
    ) -> Option<Decision> {
        let limit = match self.config.candidate_limit {
            0 => usize::MAX,
            k => k,
        };
        let mut best: Option<Best<'_>> = None;
        let (mut scored, mut visited) = (0usize, 0usize);
        for (_, slot) in candidates {
            let Some(host) = self.host_at(slot) else {
                continue;
            };
            if !in_group(host) {
                continue;
            }
            visited += 1;
            if self.host_filter(host, r).is_err() {
                continue;
            }
            scored += 1;
            consider(&mut best, host, self.score(host, r));
            if scored >= limit {
                break;
            }
        }
        best.map(|b| Decision {
            host_id: b.host.spec.id.clone(),
            score: b.score,
            candidates_scored: scored,
            hosts_visited: visited,
        })
    }

    /// The indexed search. Without an availability set it walks the zone's
    /// (or cluster's) index. With one, it visits groups of cells by
    /// ascending `(set VMs in the cell's fault domain, set VMs in its update
    /// domain)`: the first group with a feasible host is exactly the set of
    /// hosts that pass both spread filters (see the module docs).
    fn place_fast(&self, r: &Resolved<'_>) -> Option<Decision> {
        let (scope_index, scope_cells) = match r.zone {
            ZoneScope::Unknown => return None,
            ZoneScope::Any => (&self.cluster_index, self.all_cells.as_slice()),
            ZoneScope::Zone(z) => (
                self.zone_index.get(z as usize)?,
                self.zone_cells.get(z as usize)?.as_slice(),
            ),
        };
        let strategy = r.demand.strategy;
        let Some(set) = r.set.and_then(|s| self.sets.get(s as usize)) else {
            return self.best_of(scope_index.candidates(r.memory, strategy), r, |_| true);
        };

        let mut groups: Vec<(u32, u32, u32)> = scope_cells
            .iter()
            .filter_map(|&c| {
                let cell = self.cells.get(c as usize)?;
                (!cell.index.is_empty()).then(|| {
                    (
                        set.in_fault_domain(cell.fault_domain),
                        set.in_update_domain(cell.update_domain),
                        c,
                    )
                })
            })
            .collect();
        groups.sort_unstable();
        let scope_hosts = scope_index.len();
        for group in groups.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (fault_count, update_count, _) = group[0];
            let group_hosts: usize = group
                .iter()
                .map(|&(_, _, c)| self.cells[c as usize].index.len())
                .sum();
            // A large group is cheaper to walk through the scope's index,
            // skipping the other cells' hosts, than to merge its many cells;
            // both visit the group's hosts in the same order.
            let found = if group_hosts.saturating_mul(2) >= scope_hosts {
                self.best_of(scope_index.candidates(r.memory, strategy), r, |h| {
                    in_set_group(set, h, fault_count, update_count)
                })
            } else {
                let sources = group
                    .iter()
                    .map(|&(_, _, c)| self.cells[c as usize].index.candidates(r.memory, strategy))
                    .collect::<Vec<Candidates<'_>>>();
                self.best_of(MergedCandidates::new(sources, strategy), r, |_| true)
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Judges every host, availability-set filters included.
    ///
    /// Spread rule, with E the hosts that pass every other filter: a host
    /// fails "fault domain already used" if the set has more VMs in its
    /// fault domain than the least-used fault domain among E; of the rest,
    /// it fails "update domain already used" if the set has more VMs in its
    /// update domain than the least-used update domain among them.
    fn full_scan(&self, r: &Resolved<'_>) -> Vec<(&Host, Result<(), FilterReason>)> {
        self.scan(r, self.hosts.iter().flatten())
    }

    /// [`Self::full_scan`] over `hosts` only.
    fn scan<'a>(
        &'a self,
        r: &Resolved<'_>,
        hosts: impl Iterator<Item = &'a Host>,
    ) -> Vec<(&'a Host, Result<(), FilterReason>)> {
        let mut verdicts: Vec<(&Host, Result<(), FilterReason>)> = hosts
            .map(|host| (host, self.host_filter(host, r)))
            .collect();
        let Some(set) = r.set.and_then(|s| self.sets.get(s as usize)) else {
            return verdicts;
        };
        let least_fault = verdicts
            .iter()
            .filter(|(_, v)| v.is_ok())
            .map(|(h, _)| set.in_fault_domain(h.fault_domain))
            .min();
        let Some(least_fault) = least_fault else {
            return verdicts;
        };
        for (host, verdict) in &mut verdicts {
            if verdict.is_ok() && set.in_fault_domain(host.fault_domain) > least_fault {
                *verdict = Err(FilterReason::FaultDomainAlreadyUsed);
            }
        }
        let least_update = verdicts
            .iter()
            .filter(|(_, v)| v.is_ok())
            .map(|(h, _)| set.in_update_domain(h.update_domain))
            .min()
            .unwrap_or(0);
        for (host, verdict) in &mut verdicts {
            if verdict.is_ok() && set.in_update_domain(host.update_domain) > least_update {
                *verdict = Err(FilterReason::UpdateDomainAlreadyUsed);
            }
        }
        verdicts
    }

    fn place_by_full_scan(&self, r: &Resolved<'_>) -> Result<Decision, Unplaceable> {
        let verdicts = self.full_scan(r);
        let mut best: Option<Best<'_>> = None;
        let mut scored = 0usize;
        for (host, verdict) in &verdicts {
            if verdict.is_ok() {
                scored += 1;
                consider(&mut best, host, self.score(host, r));
            }
        }
        match best {
            Some(b) => Ok(Decision {
                host_id: b.host.spec.id.clone(),
                score: b.score,
                candidates_scored: scored,
                hosts_visited: verdicts.len(),
            }),
            None => Err(Unplaceable::new(
                verdicts.len(),
                verdicts
                    .iter()
                    .filter_map(|(_, v)| v.err())
                    .map(|reason| (reason, 1)),
            )),
        }
    }

    /// Test hook: the fast path alone, without the full-scan fallback.
    #[cfg(test)]
    pub(super) fn place_fast_only(&self, demand: &Demand) -> Option<Decision> {
        self.place_fast(&self.resolve(demand))
    }
}

fn in_set_group(set: &SetCounts, host: &Host, fault_count: u32, update_count: u32) -> bool {
    set.in_fault_domain(host.fault_domain) == fault_count
        && set.in_update_domain(host.update_domain) == update_count
}

/// Keeps the higher score; on a tie, the smaller host id (deterministic
/// whatever order hosts were visited in).
fn consider<'a>(best: &mut Option<Best<'a>>, host: &'a Host, score: f64) {
    let better = match best {
        None => true,
        Some(b) => match score.total_cmp(&b.score) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => host.spec.id < b.host.spec.id,
        },
    };
    if better {
        *best = Some(Best { host, score });
    }
}

/// `used / capacity` in `[0, 1]`; a host with no capacity counts as full.
fn fraction(used: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        1.0
    } else {
        (used as f64 / capacity as f64).min(1.0)
    }
}
