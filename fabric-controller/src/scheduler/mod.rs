//! Placement: which host a VM goes to, or why no host can take it.
//!
//! The scheduler is a pure, synchronous library. It owns a snapshot of the
//! cluster ([`Scheduler`]) that the controller keeps current with
//! [`Scheduler::add_host`], [`Scheduler::update_host`],
//! [`Scheduler::set_host_state`], [`Scheduler::remove_host`],
//! [`Scheduler::assign`] and [`Scheduler::release`], and it answers
//! [`Scheduler::place`] without changing anything: the controller commits a
//! [`Decision`] to the store first, then calls `assign`. It speaks plain
//! structs ([`HostSpec`], [`Demand`]); converting protobuf messages is the
//! controller's job.
//!
//! # Model
//!
//! A host offers `allocatable_cpus * cpu_overcommit` vCPUs and
//! `allocatable_memory_mib` of memory, never overcommitted. A VM reserves its
//! vCPUs and its *minimum* memory: dynamic memory balances everything above
//! the minimums at run time, so only minimums must fit. Fault and update
//! domains are numbered within a zone: the domain keys are
//! `(zone, fault_domain)` and `(zone, update_domain)`.
//!
//! # Filters
//!
//! Filters run in a fixed order and a rejected host is counted under the
//! first one it fails ([`FilterReason`]):
//!
//! 1. host state: only Ready hosts accept VMs ("cordoned", "draining",
//!    "not ready" for a suspect host, "dead");
//! 2. zone, when the VM names one ("wrong zone");
//! 3. CPU: allocated vCPUs + the VM's ≤ capacity ("insufficient cpu");
//! 4. memory: allocated minimums + the VM's ≤ allocatable ("insufficient memory");
//! 5. disk: the disk space of the host's VMs + the VM's ≤ allocatable, counting every disk
//!    at its full size, sparse or not ("insufficient disk"; skipped on a host that does not
//!    say its disk space);
//! 6. anti-affinity, both ways: the host has no VM whose labels contain one
//!    of the VM's anti-affinity pairs, and no VM with an anti-affinity pair
//!    contained in the VM's labels ("anti-affinity");
//! 7. availability-set spread over fault domains, then 8. over update
//!    domains. Let E be the hosts that pass filters 1–6. A host of E fails
//!    "fault domain already used" when the set has more VMs in its fault
//!    domain than in the least-used fault domain of E; of the hosts left, a
//!    host fails "update domain already used" when the set has more VMs in
//!    its update domain than in their least-used update domain. So the VMs of
//!    a set go to distinct fault domains (and distinct update domains) while
//!    fault domains without the set still have a host with room; once every
//!    eligible fault domain holds the set, the least-used ones are filled
//!    first, round-robin. These two filters only choose *among* eligible
//!    hosts: they never make a VM unplaceable on their own, so they show up
//!    in [`Scheduler::explain`], not in an [`Unplaceable`].
//!
//! Host state, CPU, memory, disk and anti-affinity are checked per host against
//! counters (sums and multisets of interned label pairs); set spreading reads
//! per-set, per-domain VM counts. No check walks the VMs of a host.
//!
//! # Scorers
//!
//! Feasible hosts are scored by the weighted sum ([`ScoreWeights`]) of:
//! *fit*, the mean of the host's CPU and memory fractions after placement
//! (bin-pack: higher is better; spread: lower is better), and *memory
//! headroom*, the fraction of its VMs' possible dynamic-memory growth
//! (`maximum - minimum`, this VM included) that the host's free memory still
//! covers after placement (1 when nothing can grow). Equal scores go to the
//! smaller host id. Update-domain balance of a set is not a scorer: the
//! update-domain filter above already makes it exact.
//!
//! # Speed, and what it costs in quality
//!
//! Ready hosts are kept in B-tree indexes ordered by free memory: one for
//! the cluster, one per zone, one per cell (zone × fault domain × update
//! domain). Bin-pack walks an index upwards from the VM's minimum memory —
//! best fit first — and spread walks it downwards; both stop after
//! [`SchedulerConfig::candidate_limit`] feasible hosts and take the best
//! score among them (as kube-scheduler's `percentageOfNodesToScore` and
//! Nomad's limited candidate iteration do). The decision is then the best of
//! the K tightest (or emptiest) fits by memory, not necessarily the best
//! score in the cluster: a host with more free memory but a better CPU fit or
//! more headroom can be missed. A limit of 0 scores every feasible host and
//! is exact. Measured by `benches/scheduler.rs`: bin-packing 20,000 VMs into
//! 1,000 hosts uses 288 hosts with the default K = 16, 285 exactly. Feasibility is never traded: the walk skips infeasible hosts
//! until it has found K, so the fast path finds a host whenever one exists.
//! For a set, cells are grouped by the set's VM counts in their fault and
//! update domains and groups are visited least-used first: the first group
//! with a feasible host holds exactly the hosts that pass filters 6 and 7.
//! Only when nothing fits does [`Scheduler::place`] scan every host, to count
//! the reasons.
//!
//! # Memory relief
//!
//! [`memory_relief`] answers the other question the controller asks of this
//! snapshot: which VM to move off a host that has stayed short of memory,
//! and where to (through [`Scheduler::explain_move_among`], the filters as if
//! the VM had already left its host, judged only on the hosts with the
//! memory room to take it).
//!
//! # Inputs that could be nonsense
//!
//! Nothing panics on any input: no hosts, zero allocatable resources, a
//! VM asking for nothing, unknown zones. A `cpu_overcommit` that is NaN,
//! infinite, zero or negative is treated as 1.0; non-finite weights as 0.

mod cluster;
mod index;
pub mod memory_relief;
mod model;
mod place;
mod reasons;

#[cfg(test)]
mod tests;

pub use cluster::{Scheduler, SchedulerError};
pub use model::{
    Allocation, Decision, Demand, HostSpec, HostState, Labels, SchedulerConfig, ScoreWeights,
    Strategy,
};
pub use place::HostVerdict;
pub use reasons::{FilterReason, Unplaceable};
