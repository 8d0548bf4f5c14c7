//! The plain inputs and outputs of placement: what a host offers, what a VM
//! asks for, how the scheduler is tuned, and what it decided.
//!
//! These are deliberately not the protobuf types: the controller converts
//! `fabric.v1.Host` and `fabric.v1.VmSpec` into them, so the scheduler stays a
//! pure library that tests and benchmarks can drive without gRPC.

use std::collections::BTreeMap;

/// Key/value labels (of a host or a VM), ordered so every walk is
/// deterministic.
pub type Labels = BTreeMap<String, String>;

/// Liveness and schedulability of a host. Only [`HostState::Ready`] accepts
/// new VMs; every other state keeps the VMs already assigned there counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HostState {
    /// Holds its lease and accepts new VMs.
    #[default]
    Ready,
    /// Its lease expired recently; it may still run its VMs.
    Suspect,
    /// Fenced: its lease expired more than the safety margin ago.
    Dead,
    /// An operator cordoned it: its VMs keep running, no new ones come.
    Cordoned,
    /// Cordoned and being emptied.
    Draining,
}

/// A host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostSpec {
    /// Unique host id (the controller's `Host.id`).
    pub id: String,
    /// Zone the host is in.
    pub zone: String,
    /// Fault domain (rack) within the zone: the domain key is `(zone, fault_domain)`.
    pub fault_domain: u32,
    /// Update domain (maintenance wave) within the zone: the domain key is
    /// `(zone, update_domain)`.
    pub update_domain: u32,
    /// Logical CPUs offered to VMs, before the overcommit ratio.
    pub allocatable_cpus: u32,
    /// Memory offered to VMs, MiB. Never overcommitted.
    pub allocatable_memory_mib: u64,
    /// Disk space offered to VM disks and logs, MiB; `None` when the host does not say
    /// (an agent older than disk accounting): then disk is not filtered on this host.
    pub allocatable_disk_mib: Option<u64>,
    /// The host's own labels (kept for the controller; no filter uses them yet).
    pub labels: Labels,
    /// Liveness and schedulability.
    pub state: HostState,
}

/// How to choose among the hosts that pass every filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Prefer the host that ends up fullest: fewer hosts in use, big holes
    /// kept for big VMs.
    #[default]
    BinPack,
    /// Prefer the emptiest host: fewer VMs share a host's failure.
    Spread,
}

/// What one VM asks of a host.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Demand {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// The memory the VM reserves on its host: its dynamic-memory minimum
    /// (`MemorySpec.minimum_mib`, or `startup_mib` when that is 0). Memory
    /// above the minimum is balanced at run time and not reserved.
    pub memory_minimum_mib: u64,
    /// The most the VM may grow to, MiB; 0 means the minimum (static
    /// memory). Only the memory-headroom scorer reads it.
    pub memory_maximum_mib: u64,
    /// Host disk space the VM may take at most, MiB: its disks at their full size (sparse
    /// ones too) and its logs.
    pub disk_mib: u64,
    /// Zone the VM must run in; empty means any zone.
    pub zone: String,
    /// Availability set whose VMs are spread over fault and update domains;
    /// empty means none.
    pub availability_set: String,
    /// The VM never shares a host with a VM whose labels contain any of
    /// these pairs (and, symmetrically, never joins a VM whose
    /// anti-affinity pairs match this VM's `labels`).
    pub anti_affinity_labels: Labels,
    /// This VM's own labels.
    pub labels: Labels,
    /// Bin-pack (default) or spread.
    pub strategy: Strategy,
}

impl Demand {
    /// Sets the memory figures from a `MemorySpec`'s `startup`, `minimum`
    /// and `maximum` (MiB), applying its defaults: a minimum or maximum of 0
    /// means the startup size.
    pub fn with_memory_spec(
        mut self,
        startup_mib: u64,
        minimum_mib: u64,
        maximum_mib: u64,
    ) -> Self {
        self.memory_minimum_mib = if minimum_mib == 0 {
            startup_mib
        } else {
            minimum_mib
        };
        self.memory_maximum_mib = if maximum_mib == 0 {
            startup_mib
        } else {
            maximum_mib
        };
        self
    }

    /// How far above its reserved minimum the VM may grow, MiB.
    pub fn memory_burst_mib(&self) -> u64 {
        self.memory_maximum_mib
            .saturating_sub(self.memory_minimum_mib)
    }
}

/// Weights of the scorers; a host's score is the weighted sum of scores in
/// `[0, 1]`. Non-finite weights count as 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreWeights {
    /// Bin-pack (or spread, by the demand's strategy): how full the host is
    /// after placement, the mean of its CPU and memory fractions.
    pub fit: f64,
    /// Memory headroom: the fraction of the host's dynamic-memory growth
    /// (sum of `maximum - minimum` of its VMs and this one) that its free
    /// memory still covers after placement. Neutral (1) when nothing can grow.
    pub memory_headroom: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            fit: 1.0,
            memory_headroom: 0.5,
        }
    }
}

/// Tuning of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// vCPUs offered per allocatable CPU (4.0: a 16-CPU host takes 64
    /// vCPUs). A ratio that is NaN, infinite, zero or negative is treated as
    /// 1.0 (no overcommit).
    pub cpu_overcommit: f64,
    /// Scorer weights.
    pub weights: ScoreWeights,
    /// Stop after scoring this many feasible hosts (visited best-fit first
    /// for bin-pack, emptiest first for spread) and take the best of them.
    /// 0 means no limit: every feasible host is scored (exact, slower).
    pub candidate_limit: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            cpu_overcommit: 4.0,
            weights: ScoreWeights::default(),
            candidate_limit: 16,
        }
    }
}

impl SchedulerConfig {
    /// The overcommit ratio actually applied (see [`Self::cpu_overcommit`]).
    pub fn effective_cpu_overcommit(&self) -> f64 {
        if self.cpu_overcommit.is_finite() && self.cpu_overcommit > 0.0 {
            self.cpu_overcommit
        } else {
            1.0
        }
    }

    /// The configuration with every value made usable: the overcommit ratio
    /// as applied and non-finite weights as 0.
    pub(super) fn sanitized(self) -> Self {
        let finite_or_zero = |w: f64| if w.is_finite() { w } else { 0.0 };
        Self {
            cpu_overcommit: self.effective_cpu_overcommit(),
            weights: ScoreWeights {
                fit: finite_or_zero(self.weights.fit),
                memory_headroom: finite_or_zero(self.weights.memory_headroom),
            },
            candidate_limit: self.candidate_limit,
        }
    }
}

/// Where a VM should go.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The chosen host.
    pub host_id: String,
    /// Its score (weighted sum; higher is better).
    pub score: f64,
    /// Feasible hosts that were scored to choose it.
    pub candidates_scored: usize,
    /// Hosts whose filters were evaluated.
    pub hosts_visited: usize,
}

/// What the VMs assigned to a host reserve on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Allocation {
    /// Sum of vCPUs.
    pub vcpus: u64,
    /// Sum of minimum memory, MiB.
    pub memory_mib: u64,
    /// Sum of the VMs' disk space, MiB.
    pub disk_mib: u64,
    /// Number of VMs.
    pub vms: usize,
}
