//! Memory relief: which VM to move off a host that has stayed over-committed, and where to.
//!
//! Every agent's memory balancer reports, each heartbeat, its host's memory *budget* and what
//! its VMs *want* (the sum of their targets: demand plus buffer, within minimum and maximum).
//! A host is *short* while they want more than its budget; its balancer then shares the
//! memory above the minimums by weight, which carries a burst but squeezes every guest. A host
//! that stays short for longer than the relief window is relieved by moving one of its VMs to
//! another host. This module decides which VM and where, from a snapshot, without I/O or a
//! clock of its own (the caller passes `now`); the reconciler carries a move out (stop on the
//! source, start on the destination) and calls [`plan_relief`] again on later passes.
//!
//! # Figures
//!
//! - A host's **excess** is `wanted − budget` from its latest report (at least 1 MiB while it
//!   reports itself short).
//! - A VM's **want** ([`MovableVm::wanted_mib`]) is what leaves the host with it: the target the
//!   balancer would give it without sharing, `demand × (1 + buffer%)` within `[minimum,
//!   maximum]`, or the target it reported when that is larger (the agent adds the guest
//!   kernel's own overhead, which the controller does not see). Without a reported demand it is
//!   the reported target. Never more than the maximum, whatever the host reports.
//! - A destination's **room** is `budget − wanted` from its latest report, less the want of VMs
//!   already moving to it that the report does not count yet (`incoming_mib`).
//!
//! # Which VM
//!
//! Among the VMs of the host that may move (the caller lists the running ones with a memory
//! report), candidates are ordered:
//!
//! 1. VMs whose want covers the excess, **smallest want first**: one move ends the shortage,
//!    and the smallest such VM is the least disruption (least memory to re-create elsewhere,
//!    the most room left on the destination);
//! 2. then, if none covers it, the others **largest want first**: the move that relieves most;
//!    the host stays short and the next move comes after another window.
//!
//! Equal wants go to the smaller VM id. The first candidate in this order that has a
//! destination moves; later candidates are tried only when the earlier ones fit nowhere.
//!
//! # Where
//!
//! A destination is any other host whose room holds the VM's want and on which the VM passes
//! the scheduler's hard filters as if it had already left its source
//! ([`Scheduler::explain_move_among`]: host state, zone, CPU and memory capacity by minimum,
//! anti-affinity, availability-set spread over fault and update domains). Of those, the host
//! with the **most room** wins; equal room goes to the smaller host id. Hosts without a memory
//! report have unknown room and are not destinations. The spread filters pick the least-used
//! domains among the source and the hosts with the room (the others could not take the VM
//! anyway); the source counting there means a relief move never worsens an availability set's
//! spread. The fallback when a chosen destination no longer fits at commit
//! ([`Scheduler::place_elsewhere`]) is ordinary placement without the source, where spreading,
//! as always, only chooses among the hosts left.
//!
//! # Cost
//!
//! The plan runs with the placement snapshot locked, over clusters of 10,000 hosts. Hosts are
//! kept sorted by room, so the filters judge, for each VM tried, only the hosts with room for
//! its want (and the source); a VM whose want exceeds the largest room anywhere costs no
//! filter at all, and neither does a host blocked for want of room.
//! [`ReliefPlan::hosts_judged`] counts the hosts the filters judged.
//!
//! # When
//!
//! Only Ready or Cordoned hosts are relieved (a draining host is being emptied anyway; a
//! suspect or dead one is the failover's business). A host is due once it has been short for
//! the window without a break, with no move off it in flight, and, after its last move
//! completed, short for another full window: the balancer gets time to settle on the new
//! figures before the next VM is disturbed. Several hosts may be relieved in one plan, the
//! longest-short first; a move counts against its destination's room at once, so two moves
//! never overfill one host.
//!
//! A due host without any possible move gets a [`ReliefDecision::NoDestination`] with the
//! reason (`web-1 (wants 600 MiB) fits none of 3 other hosts: 2 too little memory room (most
//! 300 MiB), 1 cordoned`), not a move.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use super::cluster::Scheduler;
use super::model::{Decision, Demand, HostState};
use super::place::HostVerdict;
use super::reasons::{FilterReason, Unplaceable};

/// The buffer when a memory spec gives 0 (the agent's balancer uses the same default).
pub const DEFAULT_BUFFER_PERCENT: u64 = 20;

/// A host's latest memory-balancer report (`HostMemoryBalance`), the figures relief reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// Memory the VMs may use in all, MiB.
    pub budget_mib: u64,
    /// The sum of the VMs' targets before sharing, MiB.
    pub wanted_mib: u64,
    /// The host says its VMs want more than its budget.
    pub short: bool,
}

impl MemoryReport {
    /// `wanted − budget` while short (at least 1 MiB), else 0.
    pub fn excess_mib(&self) -> u64 {
        if self.short {
            self.wanted_mib.saturating_sub(self.budget_mib).max(1)
        } else {
            0
        }
    }

    /// `budget − wanted`: what the host could still give.
    pub fn room_mib(&self) -> u64 {
        self.budget_mib.saturating_sub(self.wanted_mib)
    }
}

/// A VM that relief may move: running on its host, with the balancer's latest decision.
#[derive(Debug, Clone, PartialEq)]
pub struct MovableVm {
    pub vm_id: String,
    /// Its name, for messages (the id when empty).
    pub name: String,
    /// What it asks of a host (the scheduler's view: vCPUs, minimum and maximum memory,
    /// placement rules).
    pub demand: Demand,
    /// Its memory spec's buffer percentage (0: the default, 20).
    pub buffer_percent: u64,
    /// The balancer's latest target for it, MiB (after sharing).
    pub target_mib: u64,
    /// Memory in use in its guest, MiB, when the guest reported it.
    pub demand_mib: Option<u64>,
}

impl MovableVm {
    fn label(&self) -> &str {
        if self.name.is_empty() {
            &self.vm_id
        } else {
            &self.name
        }
    }

    /// The memory that leaves its host with it, MiB (see the module docs).
    pub fn wanted_mib(&self) -> u64 {
        // The reported target comes from the host: whatever it says, a VM takes no more than
        // its maximum with it (and the wants summed per destination cannot overflow).
        let maximum = self.demand.memory_maximum_mib;
        let Some(demand) = self.demand_mib else {
            return self.target_mib.min(maximum);
        };
        let buffer = match self.buffer_percent {
            0 => DEFAULT_BUFFER_PERCENT,
            b => b,
        };
        let with_buffer = (u128::from(demand) * u128::from(100 + buffer)).div_ceil(100);
        let with_buffer = u64::try_from(with_buffer).unwrap_or(u64::MAX);
        let minimum = self.demand.memory_minimum_mib.min(maximum);
        with_buffer.max(self.target_mib).clamp(minimum, maximum)
    }
}

/// One host as relief sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMemory {
    pub host_id: String,
    /// Its effective state (leases and cordons applied).
    pub state: HostState,
    /// Its latest balancer report; None when it sends none.
    pub report: Option<MemoryReport>,
    /// Since when its reports say short without a break; None while it is not short.
    pub short_since: Option<Instant>,
    /// When the last relief move off this host completed.
    pub last_relief_done: Option<Instant>,
    /// A relief move off this host is under way.
    pub relief_in_flight: bool,
    /// Not relieved before this instant (the caller's back-off after a plan found no move for
    /// the host, so that a blocked host is not searched again at every pass).
    pub retry_at: Option<Instant>,
    /// The want of VMs moving to this host that its report does not count yet, MiB.
    pub incoming_mib: u64,
    /// Its VMs that may move.
    pub vms: Vec<MovableVm>,
}

/// A decided move.
#[derive(Debug, Clone, PartialEq)]
pub struct ReliefMove {
    pub vm_id: String,
    pub source: String,
    pub destination: String,
    /// The VM's want, MiB.
    pub vm_wanted_mib: u64,
    /// The source's budget and wanted when decided, MiB.
    pub source_budget_mib: u64,
    pub source_wanted_mib: u64,
    /// The source's excess, MiB.
    pub excess_mib: u64,
    /// The destination's room before the move, MiB.
    pub destination_room_mib: u64,
    /// How long the source had been short (since the later of its turning short and its last
    /// move completing).
    pub short_for: Duration,
}

impl ReliefMove {
    /// The move ends the source's shortage (on the reported figures).
    pub fn covers_excess(&self) -> bool {
        self.vm_wanted_mib >= self.excess_mib
    }
}

/// What relief decided for one due host.
#[derive(Debug, Clone, PartialEq)]
pub enum ReliefDecision {
    Move(ReliefMove),
    /// The host is due but no VM of it can go anywhere.
    NoDestination {
        host_id: String,
        short_for: Duration,
        reason: String,
    },
}

/// What [`plan_relief`] decided, and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct ReliefPlan {
    pub decisions: Vec<ReliefDecision>,
    /// Host verdicts the filters computed (one host judged for one VM): the search's cost.
    pub hosts_judged: usize,
}

/// Why a host is not a destination for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    Filter(FilterReason),
    NoReport,
    TooLittleRoom,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Filter(reason) => reason.fmt(f),
            Refusal::NoReport => f.write_str("no memory report"),
            Refusal::TooLittleRoom => f.write_str("too little memory room"),
        }
    }
}

/// The hosts a VM could go to, or why none.
struct Destinations {
    /// `(room, host id)` of every acceptable host.
    fitting: Vec<(u64, String)>,
    refusals: BTreeMap<Refusal, usize>,
    /// The most room among hosts with too little for the want.
    most_room_short: u64,
    /// Hosts other than the source.
    considered: usize,
}

impl Scheduler {
    /// Every host's verdict for a VM as if it had left the host it is assigned to (its own
    /// labels and availability-set count no longer there): the question "where could this VM
    /// move?". The snapshot is unchanged afterwards. O(hosts).
    pub fn explain_move(&mut self, vm_id: &str, demand: &Demand) -> Vec<HostVerdict> {
        let assigned_to = self.release(vm_id).ok();
        let verdicts = self.explain(demand);
        self.restore(vm_id, assigned_to, demand);
        verdicts
    }

    /// [`Self::explain_move`] for the hosts `host_ids` only, in that order
    /// ([`Scheduler::explain_among`]). O(hosts given).
    pub fn explain_move_among<'h>(
        &mut self,
        vm_id: &str,
        demand: &Demand,
        host_ids: impl IntoIterator<Item = &'h str>,
    ) -> Vec<HostVerdict> {
        let assigned_to = self.release(vm_id).ok();
        let verdicts = self.explain_among(demand, host_ids);
        self.restore(vm_id, assigned_to, demand);
        verdicts
    }

    /// Places a VM anywhere but `avoid` (the host it is moving off), as if it had left the
    /// host it is assigned to. The snapshot is unchanged afterwards.
    pub fn place_elsewhere(
        &mut self,
        vm_id: &str,
        demand: &Demand,
        avoid: &str,
    ) -> Result<Decision, Unplaceable> {
        let assigned_to = self.release(vm_id).ok();
        // The avoided host takes no VM while cordoned; its real state comes back below.
        let avoided_state = self.host(avoid).map(|h| h.state);
        if avoided_state.is_some() {
            let _ = self.set_host_state(avoid, HostState::Cordoned);
        }
        let decision = self.place(demand).map_err(|_| {
            // Explained while the avoided host is cordoned (as placement saw it), without
            // counting it.
            let others: Vec<HostVerdict> = self
                .explain(demand)
                .into_iter()
                .filter(|v| v.host_id != avoid)
                .collect();
            Unplaceable::new(
                others.len(),
                others.iter().filter_map(|v| v.rejected_by).map(|r| (r, 1)),
            )
        });
        if let Some(state) = avoided_state {
            let _ = self.set_host_state(avoid, state);
        }
        self.restore(vm_id, assigned_to, demand);
        decision
    }

    fn restore(&mut self, vm_id: &str, assigned_to: Option<String>, demand: &Demand) {
        if let Some(host_id) = assigned_to {
            if let Err(e) = self.assign(vm_id, &host_id, demand) {
                // Cannot happen: the host was there a moment ago.
                tracing::warn!(vm = %vm_id, host = %host_id, error = %e, "scheduler bookkeeping");
            }
        }
    }
}

/// Every host's room now (`budget − wanted − incoming`), largest first, so that a search
/// looks only at the hosts that could take a want.
struct Rooms {
    /// `(room, host id)` of the hosts with a report: largest room first, equal room by id.
    by_room: BTreeSet<(Reverse<u64>, String)>,
    room_of: HashMap<String, u64>,
    /// Hosts without a memory report.
    unreported: BTreeSet<String>,
}

impl Rooms {
    fn new(hosts: &[HostMemory]) -> Rooms {
        let mut rooms = Rooms {
            by_room: BTreeSet::new(),
            room_of: HashMap::new(),
            unreported: BTreeSet::new(),
        };
        for host in hosts {
            match host.report {
                Some(report) => {
                    let room = report.room_mib().saturating_sub(host.incoming_mib);
                    rooms.by_room.insert((Reverse(room), host.host_id.clone()));
                    rooms.room_of.insert(host.host_id.clone(), room);
                }
                None => {
                    rooms.unreported.insert(host.host_id.clone());
                }
            }
        }
        rooms
    }

    /// The largest room of any host but `source`.
    fn largest_except(&self, source: &str) -> u64 {
        self.by_room
            .iter()
            .find(|(_, id)| id != source)
            .map_or(0, |(Reverse(room), _)| *room)
    }

    /// `host_id` takes `want_mib` more.
    fn take(&mut self, host_id: &str, want_mib: u64) {
        let Some(room) = self.room_of.get_mut(host_id) else {
            return;
        };
        self.by_room.remove(&(Reverse(*room), host_id.to_string()));
        *room = room.saturating_sub(want_mib);
        self.by_room.insert((Reverse(*room), host_id.to_string()));
    }
}

/// Where `vm` (on `source`) could go with the hosts' room now. Only hosts with room for its
/// want are judged by the filters (with the source, for the spread filters: see the module
/// docs); `judged` counts them.
fn destinations(
    scheduler: &mut Scheduler,
    vm: &MovableVm,
    source: &str,
    rooms: &Rooms,
    judged: &mut usize,
) -> Destinations {
    let want = vm.wanted_mib();
    let mut result = Destinations {
        fitting: Vec::new(),
        refusals: BTreeMap::new(),
        most_room_short: 0,
        considered: 0,
    };
    // Largest room first: the hosts with room for the want are a prefix, and the first host
    // after it has the most room of those without enough.
    let mut roomy: Vec<&str> = Vec::new();
    for (Reverse(room), host_id) in &rooms.by_room {
        if host_id == source {
            continue;
        }
        if *room < want {
            result.most_room_short = *room;
            break;
        }
        roomy.push(host_id);
    }
    let reported_others = rooms.by_room.len() - usize::from(rooms.room_of.contains_key(source));
    let unreported = rooms.unreported.len() - usize::from(rooms.unreported.contains(source));
    result.considered = reported_others + unreported;
    for (refusal, count) in [
        (Refusal::NoReport, unreported),
        (Refusal::TooLittleRoom, reported_others - roomy.len()),
    ] {
        if count > 0 {
            result.refusals.insert(refusal, count);
        }
    }
    if roomy.is_empty() {
        return result;
    }
    let candidates = roomy.iter().copied().chain(std::iter::once(source));
    let verdicts = scheduler.explain_move_among(&vm.vm_id, &vm.demand, candidates);
    *judged += verdicts.len();
    for verdict in verdicts {
        if verdict.host_id == source {
            continue;
        }
        match verdict.rejected_by {
            Some(reason) => *result.refusals.entry(Refusal::Filter(reason)).or_default() += 1,
            None => {
                let room = rooms.room_of.get(&verdict.host_id).copied().unwrap_or(0);
                result.fitting.push((room, verdict.host_id));
            }
        }
    }
    result
}

/// `web-1 (wants 600 MiB) fits none of 3 other hosts: 2 too little memory room (most
/// 300 MiB), 1 cordoned`.
fn refusal_text(vm: &MovableVm, found: &Destinations) -> String {
    let mut text = format!(
        "{} (wants {} MiB) fits none of {} other hosts",
        vm.label(),
        vm.wanted_mib(),
        found.considered
    );
    let mut counts: Vec<(Refusal, usize)> = found.refusals.iter().map(|(r, n)| (*r, *n)).collect();
    counts.sort_by_key(|(refusal, count)| (Reverse(*count), *refusal));
    for (i, (refusal, count)) in counts.iter().enumerate() {
        text.push_str(if i == 0 { ": " } else { ", " });
        text.push_str(&format!("{count} {refusal}"));
        if *refusal == Refusal::TooLittleRoom {
            text.push_str(&format!(" (most {} MiB)", found.most_room_short));
        }
    }
    text
}

/// The candidates of a host in the order they are tried (see the module docs).
fn candidate_order(vms: &[MovableVm], excess_mib: u64) -> Vec<&MovableVm> {
    let mut covering: Vec<&MovableVm> = vms
        .iter()
        .filter(|v| v.wanted_mib() >= excess_mib)
        .collect();
    let mut others: Vec<&MovableVm> = vms.iter().filter(|v| v.wanted_mib() < excess_mib).collect();
    covering.sort_by(|a, b| {
        a.wanted_mib()
            .cmp(&b.wanted_mib())
            .then_with(|| a.vm_id.cmp(&b.vm_id))
    });
    others.sort_by(|a, b| {
        b.wanted_mib()
            .cmp(&a.wanted_mib())
            .then_with(|| a.vm_id.cmp(&b.vm_id))
    });
    covering.extend(others);
    covering
}

/// How long `host` has counted as short for relief at `now`, if it is a relief source at all.
fn short_for(host: &HostMemory, now: Instant) -> Option<Duration> {
    if !matches!(host.state, HostState::Ready | HostState::Cordoned)
        || host.relief_in_flight
        || host.retry_at.is_some_and(|at| now < at)
    {
        return None;
    }
    let report = host.report?;
    if !report.short {
        return None;
    }
    let since = host.short_since?;
    let since = match host.last_relief_done {
        Some(done) => since.max(done),
        None => since,
    };
    Some(now.saturating_duration_since(since))
}

/// The relief due at `now`: one decision per host that has stayed short for `window` (see the
/// module docs). `scheduler` is the placement snapshot, with every VM of `hosts` assigned
/// where it runs; it is the same afterwards.
pub fn plan_relief(
    hosts: &[HostMemory],
    window: Duration,
    now: Instant,
    scheduler: &mut Scheduler,
) -> ReliefPlan {
    let mut plan = ReliefPlan {
        decisions: Vec::new(),
        hosts_judged: 0,
    };
    let mut due: Vec<(&HostMemory, Duration)> = hosts
        .iter()
        .filter_map(|h| short_for(h, now).map(|d| (h, d)))
        .filter(|(_, short_for)| *short_for >= window)
        .collect();
    if due.is_empty() {
        return plan;
    }
    // Longest short first; then by id.
    due.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.host_id.cmp(&b.0.host_id)));
    let mut rooms = Rooms::new(hosts);

    let decisions = &mut plan.decisions;
    for (host, short_for) in due {
        let Some(report) = host.report else { continue };
        let excess = report.excess_mib();
        let candidates = candidate_order(&host.vms, excess);
        let largest_room = rooms.largest_except(&host.host_id);
        let mut first_refusal: Option<String> = None;
        let mut chosen: Option<(&MovableVm, u64, String)> = None;
        for vm in &candidates {
            if first_refusal.is_some() && vm.wanted_mib() > largest_room {
                // Fits nowhere, whatever the filters would say (and its reason is not the
                // one reported): no search.
                continue;
            }
            let found = destinations(scheduler, vm, &host.host_id, &rooms, &mut plan.hosts_judged);
            // Most room; equal room to the smaller id.
            let best = found
                .fitting
                .iter()
                .min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            if let Some((best_room, best_host)) = best {
                chosen = Some((vm, *best_room, best_host.clone()));
                break;
            }
            if first_refusal.is_none() {
                first_refusal = Some(refusal_text(vm, &found));
            }
        }
        match chosen {
            Some((vm, destination_room, destination)) => {
                let want = vm.wanted_mib();
                rooms.take(&destination, want);
                decisions.push(ReliefDecision::Move(ReliefMove {
                    vm_id: vm.vm_id.clone(),
                    source: host.host_id.clone(),
                    destination,
                    vm_wanted_mib: want,
                    source_budget_mib: report.budget_mib,
                    source_wanted_mib: report.wanted_mib,
                    excess_mib: excess,
                    destination_room_mib: destination_room,
                    short_for,
                }));
            }
            None => {
                let reason = match (first_refusal, candidates.len()) {
                    (None, _) => {
                        "no VM that can move (none running with a memory report)".to_string()
                    }
                    (Some(first), 1) => first,
                    (Some(first), n) => {
                        format!("{first}; none of its {} other VMs fits either", n - 1)
                    }
                };
                decisions.push(ReliefDecision::NoDestination {
                    host_id: host.host_id.clone(),
                    short_for,
                    reason,
                });
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::super::model::{HostSpec, Labels, SchedulerConfig};
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    fn spec(id: &str, fault_domain: u32, state: HostState) -> HostSpec {
        HostSpec {
            id: id.to_owned(),
            zone: "z1".to_owned(),
            fault_domain,
            update_domain: fault_domain,
            allocatable_cpus: 16,
            allocatable_memory_mib: 16_384,
            allocatable_disk_mib: None,
            labels: Labels::new(),
            state,
        }
    }

    /// A VM of `minimum..=maximum` MiB whose balancer reported `target` and `demand`.
    fn vm(id: &str, minimum: u64, maximum: u64, target: u64, demand: Option<u64>) -> MovableVm {
        MovableVm {
            vm_id: id.to_owned(),
            name: String::new(),
            demand: Demand {
                vcpus: 1,
                ..Demand::default()
            }
            .with_memory_spec(minimum, minimum, maximum),
            buffer_percent: 0,
            target_mib: target,
            demand_mib: demand,
        }
    }

    /// A host reporting `budget` and `wanted`, short (when wanted > budget) for `short_for`
    /// seconds before `now`.
    struct HostCase {
        id: &'static str,
        fault_domain: u32,
        state: HostState,
        report: Option<(u64, u64)>,
        short_for_s: Option<u64>,
        relief_done_s_ago: Option<u64>,
        in_flight: bool,
        retry_in_s: Option<u64>,
        incoming: u64,
        vms: Vec<MovableVm>,
    }

    fn h(id: &'static str, budget: u64, wanted: u64, vms: Vec<MovableVm>) -> HostCase {
        HostCase {
            id,
            fault_domain: 0,
            state: HostState::Ready,
            report: Some((budget, wanted)),
            short_for_s: (wanted > budget).then_some(60),
            relief_done_s_ago: None,
            in_flight: false,
            retry_in_s: None,
            incoming: 0,
            vms,
        }
    }

    struct Case {
        name: &'static str,
        hosts: Vec<HostCase>,
        /// Change to the snapshot before planning (extra VMs, other demands).
        setup: fn(&mut Scheduler),
        /// Decisions as text: `move VM SOURCE->DEST` or `none HOST: reason`.
        expected: Vec<&'static str>,
    }

    fn no_setup(_: &mut Scheduler) {}

    fn plan(case: &Case, now: Instant) -> Vec<String> {
        let mut scheduler = Scheduler::new(SchedulerConfig::default());
        for host in &case.hosts {
            scheduler
                .add_host(spec(host.id, host.fault_domain, host.state))
                .expect("add host");
            for vm in &host.vms {
                scheduler
                    .assign(&vm.vm_id, host.id, &vm.demand)
                    .expect("assign");
            }
        }
        (case.setup)(&mut scheduler);
        let before = scheduler.fingerprint();
        let hosts: Vec<HostMemory> = case
            .hosts
            .iter()
            .map(|c| HostMemory {
                host_id: c.id.to_owned(),
                state: c.state,
                report: c.report.map(|(budget, wanted)| MemoryReport {
                    budget_mib: budget,
                    wanted_mib: wanted,
                    short: wanted > budget,
                }),
                short_since: c.short_for_s.map(|s| now - Duration::from_secs(s)),
                last_relief_done: c.relief_done_s_ago.map(|s| now - Duration::from_secs(s)),
                relief_in_flight: c.in_flight,
                retry_at: c.retry_in_s.map(|s| now + Duration::from_secs(s)),
                incoming_mib: c.incoming,
                vms: c.vms.clone(),
            })
            .collect();
        let decisions = plan_relief(&hosts, WINDOW, now, &mut scheduler).decisions;
        assert_eq!(
            before,
            scheduler.fingerprint(),
            "case {}: the snapshot changed",
            case.name
        );
        decisions
            .into_iter()
            .map(|d| match d {
                ReliefDecision::Move(m) => {
                    format!("move {} {}->{}", m.vm_id, m.source, m.destination)
                }
                ReliefDecision::NoDestination {
                    host_id, reason, ..
                } => format!("none {host_id}: {reason}"),
            })
            .collect()
    }

    fn run(cases: Vec<Case>) {
        let now = Instant::now() + Duration::from_secs(3600);
        for case in &cases {
            assert_eq!(plan(case, now), case.expected, "case: {}", case.name);
        }
    }

    /// A source `s` (budget 2000, wanting 2600: excess 600) and the VMs given; two
    /// destinations with room 1000 (`a`) and 3000 (`b`).
    fn short_source(vms: Vec<MovableVm>) -> Vec<HostCase> {
        vec![
            h("s", 2000, 2600, vms),
            h("a", 4000, 3000, vec![]),
            h("b", 4000, 1000, vec![]),
        ]
    }

    #[test]
    fn when_a_host_is_due() {
        let one = || vec![vm("v1", 256, 2048, 800, Some(700))];
        let with = |f: fn(&mut HostCase)| {
            let mut hosts = short_source(one());
            f(&mut hosts[0]);
            hosts
        };
        run(vec![
            Case {
                name: "short for longer than the window: a move",
                hosts: short_source(one()),
                setup: no_setup,
                expected: vec!["move v1 s->b"],
            },
            Case {
                name: "not short: nothing",
                hosts: with(|s| {
                    s.report = Some((2000, 1900));
                    s.short_for_s = None;
                }),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "short for less than the window: nothing yet",
                hosts: with(|s| s.short_for_s = Some(29)),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "short for exactly the window: due",
                hosts: with(|s| s.short_for_s = Some(30)),
                setup: no_setup,
                expected: vec!["move v1 s->b"],
            },
            Case {
                name: "a move off it in flight: nothing",
                hosts: with(|s| s.in_flight = true),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "blocked earlier, retry not yet due: nothing",
                hosts: with(|s| s.retry_in_s = Some(1)),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "blocked earlier, retry due: a move",
                hosts: with(|s| s.retry_in_s = Some(0)),
                setup: no_setup,
                expected: vec!["move v1 s->b"],
            },
            Case {
                name: "last move completed less than a window ago: nothing",
                hosts: with(|s| s.relief_done_s_ago = Some(10)),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "last move completed a window ago and still short: the next",
                hosts: with(|s| s.relief_done_s_ago = Some(31)),
                setup: no_setup,
                expected: vec!["move v1 s->b"],
            },
            Case {
                name: "no report: nothing",
                hosts: with(|s| s.report = None),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "a cordoned host is relieved",
                hosts: with(|s| s.state = HostState::Cordoned),
                setup: no_setup,
                expected: vec!["move v1 s->b"],
            },
            Case {
                name: "a draining host is left to the drain",
                hosts: with(|s| s.state = HostState::Draining),
                setup: no_setup,
                expected: vec![],
            },
            Case {
                name: "a suspect host is left to failover",
                hosts: with(|s| s.state = HostState::Suspect),
                setup: no_setup,
                expected: vec![],
            },
        ]);
    }

    #[test]
    fn which_vm_moves() {
        run(vec![
            Case {
                name: "the smallest VM whose want covers the excess (600)",
                hosts: short_source(vec![
                    vm("big", 256, 4096, 1400, Some(1300)),
                    vm("fits", 256, 2048, 650, Some(600)),
                    vm("small", 256, 2048, 300, Some(250)),
                ]),
                setup: no_setup,
                expected: vec!["move fits s->b"],
            },
            Case {
                name: "none covers the excess: the largest",
                hosts: short_source(vec![
                    vm("a1", 256, 2048, 300, Some(250)),
                    vm("a2", 256, 2048, 500, Some(400)),
                    vm("a3", 256, 2048, 200, Some(100)),
                ]),
                setup: no_setup,
                expected: vec!["move a2 s->b"],
            },
            Case {
                name: "equal wants: the smaller VM id",
                hosts: short_source(vec![
                    vm("v2", 256, 2048, 700, None),
                    vm("v1", 256, 2048, 700, None),
                ]),
                setup: no_setup,
                expected: vec!["move v1 s->b"],
            },
            Case {
                // Shared down to 400 MiB, but its demand (500) plus the 20 % buffer is 600:
                // it covers the excess, the one reporting a 550 target and no demand does not.
                name: "want is demand plus buffer, not the shared target",
                hosts: short_source(vec![
                    vm("shared", 256, 2048, 400, Some(500)),
                    vm("unknown", 256, 2048, 550, None),
                ]),
                setup: no_setup,
                expected: vec!["move shared s->b"],
            },
            Case {
                // Neither covers the excess (600), so the larger want moves: demand 100 + 20 %
                // is 120, but the minimum (580) is what the VM holds on to.
                name: "want is at least the minimum",
                hosts: short_source(vec![
                    vm("idle", 580, 2048, 300, Some(100)),
                    vm("other", 256, 2048, 500, None),
                ]),
                setup: no_setup,
                expected: vec!["move idle s->b"],
            },
            Case {
                name: "the preferred VM fits nowhere: the next one moves",
                hosts: short_source(vec![
                    // Wants 3500: more than any room.
                    vm("huge", 256, 4096, 3500, None),
                    vm("mid", 256, 2048, 500, None),
                ]),
                setup: no_setup,
                expected: vec!["move mid s->b"],
            },
        ]);
    }

    #[test]
    fn where_it_goes() {
        let mover = || vec![vm("v", 1024, 4096, 700, None)];
        let hosts_with = |f: fn(&mut Vec<HostCase>)| {
            let mut hosts = short_source(mover());
            f(&mut hosts);
            hosts
        };
        run(vec![
            Case {
                name: "the host with the most room",
                hosts: short_source(mover()),
                setup: no_setup,
                expected: vec!["move v s->b"],
            },
            Case {
                name: "equal room: the smaller host id",
                hosts: hosts_with(|hs| hs[1].report = Some((4000, 1000))),
                setup: no_setup,
                expected: vec!["move v s->a"],
            },
            Case {
                name: "room already promised to VMs moving there counts",
                hosts: hosts_with(|hs| hs[2].incoming = 2500),
                setup: no_setup,
                expected: vec!["move v s->a"],
            },
            Case {
                name: "a cordoned host is no destination",
                hosts: hosts_with(|hs| hs[2].state = HostState::Cordoned),
                setup: no_setup,
                expected: vec!["move v s->a"],
            },
            Case {
                name: "a host without a report is no destination",
                hosts: hosts_with(|hs| hs[2].report = None),
                setup: no_setup,
                expected: vec!["move v s->a"],
            },
            Case {
                name: "capacity by minimum: the roomiest host has no minimum left",
                hosts: short_source(mover()),
                setup: |s| {
                    s.assign("filler", "b", &Demand::default().with_memory_spec(16_000, 16_000, 16_000))
                        .expect("assign");
                },
                expected: vec!["move v s->a"],
            },
            Case {
                name: "zone: the VM stays in its zone",
                hosts: hosts_with(|hs| hs[0].vms[0].demand.zone = "z1".to_owned()),
                setup: |s| {
                    let mut b = s.host("b").expect("b").clone();
                    b.zone = "z2".to_owned();
                    s.update_host(b).expect("update");
                },
                expected: vec!["move v s->a"],
            },
            Case {
                name: "anti-affinity: not next to a VM it avoids",
                hosts: short_source(vec![MovableVm {
                    demand: Demand {
                        anti_affinity_labels: [("app".to_owned(), "db".to_owned())].into(),
                        ..mover()[0].demand.clone()
                    },
                    ..mover()[0].clone()
                }]),
                setup: |s| {
                    let db = Demand {
                        labels: [("app".to_owned(), "db".to_owned())].into(),
                        ..Demand::default()
                    };
                    s.assign("db", "b", &db).expect("assign");
                },
                expected: vec!["move v s->a"],
            },
            Case {
                // Set "web" has a VM in fault domain 1 (host b's) and the mover in fault domain
                // 0 (s's); a (fault domain 2) keeps the set spread, b would double it up.
                name: "availability set: to an unused fault domain",
                hosts: hosts_with(|hs| {
                    hs[0].vms[0].demand.availability_set = "web".to_owned();
                    hs[1].fault_domain = 2;
                    hs[2].fault_domain = 1;
                }),
                setup: |s| {
                    let web = Demand {
                        availability_set: "web".to_owned(),
                        ..Demand::default()
                    };
                    s.assign("web-other", "b", &web).expect("assign");
                },
                expected: vec!["move v s->a"],
            },
            Case {
                name: "no destination: a reason (naming the VM), not a move",
                hosts: hosts_with(|hs| {
                    hs[0].vms[0].name = "web-1".to_owned();
                    hs[1].state = HostState::Cordoned;
                    hs[2].report = Some((4000, 3500));
                }),
                setup: no_setup,
                expected: vec![
                    "none s: web-1 (wants 700 MiB) fits none of 2 other hosts: 1 cordoned, 1 too little memory room (most 500 MiB)",
                ],
            },
            Case {
                name: "no destination for any VM: the preferred one's reason",
                hosts: vec![
                    h("s", 2000, 2600, vec![vm("v1", 256, 2048, 700, None), vm("v2", 256, 2048, 900, None)]),
                    h("a", 4000, 3800, vec![]),
                ],
                setup: no_setup,
                expected: vec![
                    "none s: v1 (wants 700 MiB) fits none of 1 other hosts: 1 too little memory room (most 200 MiB); none of its 1 other VMs fits either",
                ],
            },
            Case {
                name: "no VM to move",
                hosts: vec![h("s", 2000, 2600, vec![]), h("a", 4000, 0, vec![])],
                setup: no_setup,
                expected: vec!["none s: no VM that can move (none running with a memory report)"],
            },
        ]);
    }

    /// 10,000 hosts, nearly all with 100 MiB of room: a short host's search has the filters
    /// judge only the few hosts with room for a want (and the source), and none at all when
    /// every want exceeds the largest room. The count is the cost, whatever the machine.
    #[test]
    fn the_search_judges_only_the_hosts_with_room() {
        const HOSTS: usize = 10_000;
        let plan_over = |vms: Vec<MovableVm>| {
            let mut scheduler = Scheduler::new(SchedulerConfig::default());
            let mut hosts = Vec::with_capacity(HOSTS + 1);
            let mut add = |id: String, state, budget, wanted, vms: Vec<MovableVm>| {
                scheduler
                    .add_host(spec(&id, (hosts.len() % 10) as u32, state))
                    .expect("add");
                for vm in &vms {
                    scheduler
                        .assign(&vm.vm_id, &id, &vm.demand)
                        .expect("assign");
                }
                hosts.push(HostMemory {
                    host_id: id,
                    state,
                    report: Some(MemoryReport {
                        budget_mib: budget,
                        wanted_mib: wanted,
                        short: wanted > budget,
                    }),
                    short_since: None,
                    last_relief_done: None,
                    relief_in_flight: false,
                    retry_at: None,
                    incoming_mib: 0,
                    vms,
                });
            };
            add("s".to_owned(), HostState::Ready, 2000, 2600, vms);
            // Room 2000 (cordoned), 1500 and 1200; everyone else 100.
            add(
                "roomy-1".to_owned(),
                HostState::Cordoned,
                4000,
                2000,
                vec![],
            );
            add("roomy-2".to_owned(), HostState::Ready, 4000, 2500, vec![]);
            add("roomy-3".to_owned(), HostState::Ready, 4000, 2800, vec![]);
            for i in 3..HOSTS {
                add(format!("h{i:05}"), HostState::Ready, 4000, 3900, vec![]);
            }
            let now = Instant::now() + Duration::from_secs(3600);
            hosts[0].short_since = Some(now - 2 * WINDOW);
            let plan = plan_relief(&hosts, WINDOW, now, &mut scheduler);
            let decisions: Vec<String> = plan
                .decisions
                .into_iter()
                .map(|d| match d {
                    ReliefDecision::Move(m) => format!("move {} -> {}", m.vm_id, m.destination),
                    ReliefDecision::NoDestination { reason, .. } => format!("none: {reason}"),
                })
                .collect();
            (decisions, plan.hosts_judged)
        };

        // Excess 600: "small" (wants 700) is tried first. Three hosts have room for it and are
        // judged with the source; roomy-1 is cordoned, roomy-2 has the most room left.
        let (decisions, judged) = plan_over(vec![
            vm("huge", 256, 4096, 3000, None),
            vm("mid", 256, 2048, 1500, None),
            vm("small", 256, 2048, 700, None),
        ]);
        assert_eq!(decisions, ["move small -> roomy-2"]);
        assert_eq!(judged, 4, "3 hosts with room and the source");

        // Every want exceeds the largest room (2000): a reason, without judging any host.
        let (decisions, judged) = plan_over(vec![
            vm("big", 256, 4096, 2500, None),
            vm("bigger", 256, 4096, 3000, None),
        ]);
        assert_eq!(
            decisions,
            ["none: big (wants 2500 MiB) fits none of 10000 other hosts: 10000 too little memory room (most 2000 MiB); none of its 1 other VMs fits either"]
        );
        assert_eq!(judged, 0);

        // "small" is tried first but asks for a zone no host is in: its 3 hosts with room and
        // the source are judged and refuse it. Then "mid" (1500): roomy-1 and roomy-2 have the
        // room, and are judged with the source.
        let small = vm("small", 256, 2048, 700, None);
        let (decisions, judged) = plan_over(vec![
            vm("mid", 256, 2048, 1500, None),
            MovableVm {
                demand: Demand {
                    zone: "elsewhere".to_owned(),
                    ..small.demand.clone()
                },
                ..small
            },
        ]);
        assert_eq!(decisions, ["move mid -> roomy-2"]);
        assert_eq!(judged, 4 + 3);
    }

    #[test]
    fn several_short_hosts_do_not_overfill_one_destination() {
        // s1 has been short longer than s2, so it chooses first and takes b's room (1200 of
        // it, 700 used); s2's VM then goes to a (1000). The third short host finds 300 and
        // 500 MiB left: a reason.
        let mut s1 = h("s1", 2000, 2600, vec![vm("v1", 256, 2048, 700, None)]);
        s1.short_for_s = Some(90);
        let s2 = h("s2", 2000, 2600, vec![vm("v2", 256, 2048, 700, None)]);
        let mut s3 = h("s3", 2000, 2600, vec![vm("v3", 256, 2048, 700, None)]);
        s3.short_for_s = Some(31);
        run(vec![Case {
            name: "two moves, one reason",
            hosts: vec![
                s1,
                s2,
                s3,
                h("a", 4000, 3000, vec![]),
                h("b", 4000, 2800, vec![]),
            ],
            setup: no_setup,
            expected: vec![
                "move v1 s1->b",
                "move v2 s2->a",
                "none s3: v3 (wants 700 MiB) fits none of 4 other hosts: 4 too little memory room (most 500 MiB)",
            ],
        }]);
    }

    #[test]
    fn wants_and_figures() {
        let mut v = vm("v", 256, 1024, 300, Some(500));
        assert_eq!(v.wanted_mib(), 600, "demand 500 + 20 %");
        v.buffer_percent = 50;
        assert_eq!(v.wanted_mib(), 750);
        v.demand_mib = Some(2000);
        assert_eq!(v.wanted_mib(), 1024, "at most the maximum");
        v.demand_mib = None;
        assert_eq!(v.wanted_mib(), 300, "no demand: the reported target");
        v.demand_mib = Some(u64::MAX);
        assert_eq!(v.wanted_mib(), 1024, "no overflow");
        // A target beyond the maximum is nonsense from the host (its balancer never gives
        // more than the maximum): the want stays within the VM's range all the same.
        v.target_mib = u64::MAX;
        assert_eq!(v.wanted_mib(), 1024, "a reported target above the maximum");
        v.demand_mib = None;
        assert_eq!(
            v.wanted_mib(),
            1024,
            "no demand, a target above the maximum"
        );
        let report = MemoryReport {
            budget_mib: 1000,
            wanted_mib: 1000,
            short: true,
        };
        assert_eq!(
            report.excess_mib(),
            1,
            "short by the report: at least 1 MiB"
        );
        assert_eq!(report.room_mib(), 0);
        let fits = MemoryReport {
            short: false,
            wanted_mib: 400,
            ..report
        };
        assert_eq!((fits.excess_mib(), fits.room_mib()), (0, 600));
    }

    #[test]
    fn moving_and_placing_elsewhere_leave_the_snapshot_as_it_was() {
        let mut s = Scheduler::new(SchedulerConfig::default());
        for (id, fd) in [("s", 0), ("a", 1), ("b", 2)] {
            s.add_host(spec(id, fd, HostState::Ready)).expect("add");
        }
        let web = Demand {
            vcpus: 2,
            availability_set: "web".to_owned(),
            ..Demand::default()
        }
        .with_memory_spec(1024, 1024, 1024);
        s.assign("w1", "s", &web).expect("assign");
        s.assign("w2", "a", &web).expect("assign");
        let before = s.fingerprint();
        // As if w1 had left s: b (an unused fault domain) is the only host that keeps the set
        // spread; s itself would too, but a does not.
        let verdicts = s.explain_move("w1", &web);
        let ok: Vec<&str> = verdicts
            .iter()
            .filter(|v| v.rejected_by.is_none())
            .map(|v| v.host_id.as_str())
            .collect();
        assert_eq!(ok, ["b", "s"]);
        assert_eq!(s.fingerprint(), before);
        assert_eq!(
            s.place_elsewhere("w1", &web, "s").map(|d| d.host_id),
            Ok("b".to_owned())
        );
        assert_eq!(s.fingerprint(), before);
        assert_eq!(s.host("s").map(|h| h.state), Some(HostState::Ready));
        // Placement proper, with s out of the picture: spreading only chooses among the
        // hosts left, so with b cordoned the set doubles up in a's fault domain.
        s.set_host_state("b", HostState::Cordoned).expect("cordon");
        assert_eq!(
            s.place_elsewhere("w1", &web, "s").map(|d| d.host_id),
            Ok("a".to_owned())
        );
        s.set_host_state("a", HostState::Draining).expect("drain");
        let before = s.fingerprint();
        let unplaceable = s
            .place_elsewhere("w1", &web, "s")
            .expect_err("only the avoided host is left");
        assert_eq!(unplaceable.to_string(), "0/2 hosts: 1 cordoned, 1 draining");
        assert_eq!(s.fingerprint(), before);
        assert_eq!(s.vm_host("w1"), Some("s"));
    }
}
