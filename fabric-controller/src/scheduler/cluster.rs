//! The cluster snapshot the scheduler keeps up to date incrementally: hosts,
//! what is assigned to each, and the counters and indexes that filters read
//! instead of scanning VMs.

use std::collections::HashMap;

use super::index::{FreeMemoryIndex, PairCounts, PairInterner};
use super::model::{Allocation, Demand, HostSpec, HostState, SchedulerConfig};

/// A change to the snapshot that does not match it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// `add_host` with an id that is already registered.
    #[error("host {0}: already registered")]
    HostExists(String),
    /// A host id that is not registered.
    #[error("host {0}: not registered")]
    UnknownHost(String),
    /// `assign` of a VM that is already assigned (release it first).
    #[error("vm {vm_id}: already assigned to host {host_id}")]
    AlreadyAssigned {
        /// The VM.
        vm_id: String,
        /// Where it is assigned.
        host_id: String,
    },
    /// `release` of a VM that is not assigned.
    #[error("vm {0}: not assigned")]
    UnknownVm(String),
}

/// One registered host with its running totals.
#[derive(Debug)]
pub(super) struct Host {
    pub(super) spec: HostSpec,
    pub(super) zone: u32,
    /// Interned `(zone, fault_domain)`.
    pub(super) fault_domain: u32,
    /// Interned `(zone, update_domain)`.
    pub(super) update_domain: u32,
    /// Interned `(zone, fault_domain, update_domain)`.
    pub(super) cell: u32,
    /// `allocatable_cpus` times the overcommit ratio.
    pub(super) cpu_capacity: u64,
    pub(super) cpu_allocated: u64,
    pub(super) memory_allocated: u64,
    /// Sum of the VMs' disk space, MiB.
    pub(super) disk_allocated: u64,
    /// Sum of the VMs' `maximum - minimum` memory.
    pub(super) memory_burst: u64,
    /// Label pairs of the VMs here (multiset).
    pub(super) vm_labels: PairCounts,
    /// Anti-affinity pairs of the VMs here (multiset).
    pub(super) vm_anti_affinity: PairCounts,
    /// Slots of the VMs here.
    vms: Vec<u32>,
}

impl Host {
    pub(super) fn free_memory(&self) -> u64 {
        self.spec
            .allocatable_memory_mib
            .saturating_sub(self.memory_allocated)
    }
}

/// Hosts sharing a zone, fault domain and update domain: the unit in which
/// availability-set spreading looks for candidates.
#[derive(Debug)]
pub(super) struct Cell {
    pub(super) fault_domain: u32,
    pub(super) update_domain: u32,
    pub(super) index: FreeMemoryIndex,
}

/// How many VMs of one availability set each domain holds.
#[derive(Debug, Default)]
pub(super) struct SetCounts {
    name: String,
    vms: u64,
    fault_domains: Vec<u32>,
    update_domains: Vec<u32>,
}

impl SetCounts {
    pub(super) fn in_fault_domain(&self, domain: u32) -> u32 {
        self.fault_domains
            .get(domain as usize)
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn in_update_domain(&self, domain: u32) -> u32 {
        self.update_domains
            .get(domain as usize)
            .copied()
            .unwrap_or(0)
    }

    fn add(&mut self, fault_domain: u32, update_domain: u32) {
        bump(&mut self.fault_domains, fault_domain);
        bump(&mut self.update_domains, update_domain);
    }

    fn remove(&mut self, fault_domain: u32, update_domain: u32) {
        if let Some(c) = self.fault_domains.get_mut(fault_domain as usize) {
            *c = c.saturating_sub(1);
        }
        if let Some(c) = self.update_domains.get_mut(update_domain as usize) {
            *c = c.saturating_sub(1);
        }
    }
}

fn bump(counts: &mut Vec<u32>, at: u32) {
    let at = at as usize;
    if counts.len() <= at {
        counts.resize(at + 1, 0);
    }
    counts[at] = counts[at].saturating_add(1);
}

/// What an assigned VM reserves, remembered so `release` is exact.
#[derive(Debug)]
struct Vm {
    id: String,
    host: u32,
    /// Position in its host's `vms`.
    position: u32,
    vcpus: u64,
    memory: u64,
    disk: u64,
    burst: u64,
    set: Option<u32>,
    labels: Vec<u32>,
    anti_affinity: Vec<u32>,
}

/// The placement engine: a snapshot of hosts and assignments, and the
/// `place` query over it (see the module docs).
#[derive(Debug)]
pub struct Scheduler {
    pub(super) config: SchedulerConfig,
    pub(super) hosts: Vec<Option<Host>>,
    free_host_slots: Vec<u32>,
    host_slots: HashMap<String, u32>,
    pub(super) zones: HashMap<String, u32>,
    fault_domains: HashMap<(u32, u32), u32>,
    update_domains: HashMap<(u32, u32), u32>,
    pub(super) cells: Vec<Cell>,
    cell_ids: HashMap<(u32, u32, u32), u32>,
    /// Cells of each zone, by zone id.
    pub(super) zone_cells: Vec<Vec<u32>>,
    pub(super) all_cells: Vec<u32>,
    /// Ready hosts of each zone, by zone id.
    pub(super) zone_index: Vec<FreeMemoryIndex>,
    /// Every Ready host.
    pub(super) cluster_index: FreeMemoryIndex,
    pub(super) pairs: PairInterner,
    pub(super) set_ids: HashMap<String, u32>,
    pub(super) sets: Vec<SetCounts>,
    free_set_slots: Vec<u32>,
    vm_slots: HashMap<String, u32>,
    vms: Vec<Option<Vm>>,
    free_vm_slots: Vec<u32>,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new(SchedulerConfig::default())
    }
}

impl Scheduler {
    /// An empty cluster.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config: config.sanitized(),
            hosts: Vec::new(),
            free_host_slots: Vec::new(),
            host_slots: HashMap::new(),
            zones: HashMap::new(),
            fault_domains: HashMap::new(),
            update_domains: HashMap::new(),
            cells: Vec::new(),
            cell_ids: HashMap::new(),
            zone_cells: Vec::new(),
            all_cells: Vec::new(),
            zone_index: Vec::new(),
            cluster_index: FreeMemoryIndex::default(),
            pairs: PairInterner::default(),
            set_ids: HashMap::new(),
            sets: Vec::new(),
            free_set_slots: Vec::new(),
            vm_slots: HashMap::new(),
            vms: Vec::new(),
            free_vm_slots: Vec::new(),
        }
    }

    /// The configuration in force (sanitized: see [`SchedulerConfig`]).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Changes the configuration; CPU capacities follow the new ratio.
    pub fn set_config(&mut self, config: SchedulerConfig) {
        self.config = config.sanitized();
        let ratio = self.config.cpu_overcommit;
        for host in self.hosts.iter_mut().flatten() {
            host.cpu_capacity = cpu_capacity(host.spec.allocatable_cpus, ratio);
        }
    }

    /// Registered hosts.
    pub fn host_count(&self) -> usize {
        self.host_slots.len()
    }

    /// Assigned VMs.
    pub fn vm_count(&self) -> usize {
        self.vm_slots.len()
    }

    /// A registered host.
    pub fn host(&self, host_id: &str) -> Option<&HostSpec> {
        let slot = *self.host_slots.get(host_id)?;
        self.host_at(slot).map(|h| &h.spec)
    }

    /// A registered host with its running totals.
    pub(super) fn host_by_id(&self, host_id: &str) -> Option<&Host> {
        self.host_at(*self.host_slots.get(host_id)?)
    }

    /// What the VMs assigned to a host reserve on it (for `Host.allocated`).
    pub fn allocation(&self, host_id: &str) -> Option<Allocation> {
        let slot = *self.host_slots.get(host_id)?;
        let host = self.host_at(slot)?;
        Some(Allocation {
            vcpus: host.cpu_allocated,
            memory_mib: host.memory_allocated,
            disk_mib: host.disk_allocated,
            vms: host.vms.len(),
        })
    }

    /// The host a VM is assigned to.
    pub fn vm_host(&self, vm_id: &str) -> Option<&str> {
        let vm = self
            .vms
            .get(*self.vm_slots.get(vm_id)? as usize)?
            .as_ref()?;
        self.host_at(vm.host).map(|h| h.spec.id.as_str())
    }

    /// Registers a host.
    pub fn add_host(&mut self, spec: HostSpec) -> Result<(), SchedulerError> {
        if self.host_slots.contains_key(&spec.id) {
            return Err(SchedulerError::HostExists(spec.id));
        }
        let (zone, fault_domain, update_domain, cell) = self.intern_location(&spec);
        let host = Host {
            zone,
            fault_domain,
            update_domain,
            cell,
            cpu_capacity: cpu_capacity(spec.allocatable_cpus, self.config.cpu_overcommit),
            cpu_allocated: 0,
            memory_allocated: 0,
            disk_allocated: 0,
            memory_burst: 0,
            vm_labels: PairCounts::default(),
            vm_anti_affinity: PairCounts::default(),
            vms: Vec::new(),
            spec,
        };
        let slot = match self.free_host_slots.pop() {
            Some(slot) => slot,
            None => {
                self.hosts.push(None);
                (self.hosts.len() - 1) as u32
            }
        };
        self.host_slots.insert(host.spec.id.clone(), slot);
        self.hosts[slot as usize] = Some(host);
        self.index_host(slot);
        Ok(())
    }

    /// Replaces a registered host's description (state, capacity, location,
    /// labels), keeping its VMs. A move to another fault or update domain
    /// moves its VMs' availability-set counts with it.
    pub fn update_host(&mut self, spec: HostSpec) -> Result<(), SchedulerError> {
        let Some(&slot) = self.host_slots.get(&spec.id) else {
            return Err(SchedulerError::UnknownHost(spec.id));
        };
        let (zone, fault_domain, update_domain, cell) = self.intern_location(&spec);
        self.unindex_host(slot);
        let ratio = self.config.cpu_overcommit;
        let Some(host) = self.hosts[slot as usize].as_mut() else {
            return Err(SchedulerError::UnknownHost(spec.id));
        };
        let (old_fault, old_update) = (host.fault_domain, host.update_domain);
        host.zone = zone;
        host.fault_domain = fault_domain;
        host.update_domain = update_domain;
        host.cell = cell;
        host.cpu_capacity = cpu_capacity(spec.allocatable_cpus, ratio);
        host.spec = spec;
        if (old_fault, old_update) != (fault_domain, update_domain) {
            for &vm_slot in &host.vms {
                let Some(set) = self.vms[vm_slot as usize].as_ref().and_then(|vm| vm.set) else {
                    continue;
                };
                if let Some(counts) = self.sets.get_mut(set as usize) {
                    counts.remove(old_fault, old_update);
                    counts.add(fault_domain, update_domain);
                }
            }
        }
        self.index_host(slot);
        Ok(())
    }

    /// Changes only a host's state (the frequent case: heartbeats, cordon).
    pub fn set_host_state(
        &mut self,
        host_id: &str,
        state: HostState,
    ) -> Result<(), SchedulerError> {
        let Some(&slot) = self.host_slots.get(host_id) else {
            return Err(SchedulerError::UnknownHost(host_id.to_owned()));
        };
        self.unindex_host(slot);
        if let Some(host) = self.hosts[slot as usize].as_mut() {
            host.spec.state = state;
        }
        self.index_host(slot);
        Ok(())
    }

    /// Forgets a host, releasing the VMs assigned to it; returns their ids
    /// (sorted) so the controller can place them again.
    pub fn remove_host(&mut self, host_id: &str) -> Result<Vec<String>, SchedulerError> {
        let Some(&slot) = self.host_slots.get(host_id) else {
            return Err(SchedulerError::UnknownHost(host_id.to_owned()));
        };
        let vm_ids: Vec<String> = self
            .host_at(slot)
            .map(|host| {
                host.vms
                    .iter()
                    .filter_map(|&v| self.vms[v as usize].as_ref().map(|vm| vm.id.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for vm_id in &vm_ids {
            self.release(vm_id)?;
        }
        self.unindex_host(slot);
        self.hosts[slot as usize] = None;
        self.host_slots.remove(host_id);
        self.free_host_slots.push(slot);
        let mut vm_ids = vm_ids;
        vm_ids.sort();
        Ok(vm_ids)
    }

    /// Records that a VM runs (or will run) on a host. It is not checked
    /// against the filters: the controller is the authority on what was
    /// committed, and a snapshot rebuilt from the store must accept it.
    pub fn assign(
        &mut self,
        vm_id: &str,
        host_id: &str,
        demand: &Demand,
    ) -> Result<(), SchedulerError> {
        if let Some(current) = self.vm_host(vm_id) {
            return Err(SchedulerError::AlreadyAssigned {
                vm_id: vm_id.to_owned(),
                host_id: current.to_owned(),
            });
        }
        let Some(&host_slot) = self.host_slots.get(host_id) else {
            return Err(SchedulerError::UnknownHost(host_id.to_owned()));
        };
        let labels: Vec<u32> = demand
            .labels
            .iter()
            .map(|(k, v)| self.pairs.acquire(k, v))
            .collect();
        let anti_affinity: Vec<u32> = demand
            .anti_affinity_labels
            .iter()
            .map(|(k, v)| self.pairs.acquire(k, v))
            .collect();
        let set = (!demand.availability_set.is_empty())
            .then(|| self.acquire_set(&demand.availability_set));
        let vm_slot = match self.free_vm_slots.pop() {
            Some(slot) => slot,
            None => {
                self.vms.push(None);
                (self.vms.len() - 1) as u32
            }
        };

        self.unindex_host(host_slot);
        let Some(host) = self.hosts[host_slot as usize].as_mut() else {
            return Err(SchedulerError::UnknownHost(host_id.to_owned()));
        };
        let vm = Vm {
            id: vm_id.to_owned(),
            host: host_slot,
            position: host.vms.len() as u32,
            vcpus: u64::from(demand.vcpus),
            memory: demand.memory_minimum_mib,
            disk: demand.disk_mib,
            burst: demand.memory_burst_mib(),
            set,
            labels,
            anti_affinity,
        };
        host.cpu_allocated = host.cpu_allocated.saturating_add(vm.vcpus);
        host.memory_allocated = host.memory_allocated.saturating_add(vm.memory);
        host.disk_allocated = host.disk_allocated.saturating_add(vm.disk);
        host.memory_burst = host.memory_burst.saturating_add(vm.burst);
        for &id in &vm.labels {
            host.vm_labels.add(id);
        }
        for &id in &vm.anti_affinity {
            host.vm_anti_affinity.add(id);
        }
        host.vms.push(vm_slot);
        if let Some(counts) = set.and_then(|s| self.sets.get_mut(s as usize)) {
            counts.add(host.fault_domain, host.update_domain);
        }
        self.vm_slots.insert(vm.id.clone(), vm_slot);
        self.vms[vm_slot as usize] = Some(vm);
        self.index_host(host_slot);
        Ok(())
    }

    /// Forgets a VM's assignment, returning exactly what it reserved; returns
    /// the host it was on.
    pub fn release(&mut self, vm_id: &str) -> Result<String, SchedulerError> {
        let Some(vm_slot) = self.vm_slots.remove(vm_id) else {
            return Err(SchedulerError::UnknownVm(vm_id.to_owned()));
        };
        let Some(vm) = self.vms[vm_slot as usize].take() else {
            return Err(SchedulerError::UnknownVm(vm_id.to_owned()));
        };
        self.free_vm_slots.push(vm_slot);
        self.unindex_host(vm.host);
        let Some(host) = self.hosts[vm.host as usize].as_mut() else {
            return Err(SchedulerError::UnknownVm(vm_id.to_owned()));
        };
        host.cpu_allocated = host.cpu_allocated.saturating_sub(vm.vcpus);
        host.memory_allocated = host.memory_allocated.saturating_sub(vm.memory);
        host.disk_allocated = host.disk_allocated.saturating_sub(vm.disk);
        host.memory_burst = host.memory_burst.saturating_sub(vm.burst);
        for &id in &vm.labels {
            host.vm_labels.remove(id);
        }
        for &id in &vm.anti_affinity {
            host.vm_anti_affinity.remove(id);
        }
        let position = vm.position as usize;
        if position < host.vms.len() {
            host.vms.swap_remove(position);
            if let Some(&moved) = host.vms.get(position) {
                if let Some(moved_vm) = self.vms[moved as usize].as_mut() {
                    moved_vm.position = position as u32;
                }
            }
        }
        let (fault_domain, update_domain) = (host.fault_domain, host.update_domain);
        let host_id = host.spec.id.clone();
        for &id in vm.labels.iter().chain(&vm.anti_affinity) {
            self.pairs.release(id);
        }
        if let Some(set) = vm.set {
            self.release_set(set, fault_domain, update_domain);
        }
        self.index_host(vm.host);
        Ok(host_id)
    }

    pub(super) fn host_at(&self, slot: u32) -> Option<&Host> {
        self.hosts.get(slot as usize)?.as_ref()
    }

    fn intern_location(&mut self, spec: &HostSpec) -> (u32, u32, u32, u32) {
        let zone = match self.zones.get(&spec.zone) {
            Some(&zone) => zone,
            None => {
                let zone = self.zone_index.len() as u32;
                self.zones.insert(spec.zone.clone(), zone);
                self.zone_index.push(FreeMemoryIndex::default());
                self.zone_cells.push(Vec::new());
                zone
            }
        };
        let next = self.fault_domains.len() as u32;
        let fault_domain = *self
            .fault_domains
            .entry((zone, spec.fault_domain))
            .or_insert(next);
        let next = self.update_domains.len() as u32;
        let update_domain = *self
            .update_domains
            .entry((zone, spec.update_domain))
            .or_insert(next);
        let key = (zone, spec.fault_domain, spec.update_domain);
        let cell = match self.cell_ids.get(&key) {
            Some(&cell) => cell,
            None => {
                let cell = self.cells.len() as u32;
                self.cells.push(Cell {
                    fault_domain,
                    update_domain,
                    index: FreeMemoryIndex::default(),
                });
                self.cell_ids.insert(key, cell);
                self.zone_cells[zone as usize].push(cell);
                self.all_cells.push(cell);
                cell
            }
        };
        (zone, fault_domain, update_domain, cell)
    }

    fn acquire_set(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.set_ids.get(name) {
            if let Some(counts) = self.sets.get_mut(id as usize) {
                counts.vms += 1;
            }
            return id;
        }
        let counts = SetCounts {
            name: name.to_owned(),
            vms: 1,
            ..SetCounts::default()
        };
        let id = match self.free_set_slots.pop() {
            Some(id) => {
                self.sets[id as usize] = counts;
                id
            }
            None => {
                self.sets.push(counts);
                (self.sets.len() - 1) as u32
            }
        };
        self.set_ids.insert(name.to_owned(), id);
        id
    }

    fn release_set(&mut self, set: u32, fault_domain: u32, update_domain: u32) {
        let Some(counts) = self.sets.get_mut(set as usize) else {
            return;
        };
        counts.remove(fault_domain, update_domain);
        counts.vms = counts.vms.saturating_sub(1);
        if counts.vms == 0 {
            let name = std::mem::take(&mut counts.name);
            *counts = SetCounts::default();
            self.set_ids.remove(&name);
            self.free_set_slots.push(set);
        }
    }

    /// Adds a Ready host to the free-memory indexes (others are never
    /// candidates). Every mutation of a host's state, memory or location is
    /// bracketed by `unindex_host` / `index_host` so the keys stay exact.
    fn index_host(&mut self, slot: u32) {
        let Some(host) = self.hosts.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        if host.spec.state != HostState::Ready {
            return;
        }
        let (free, cell, zone) = (host.free_memory(), host.cell, host.zone);
        self.cells[cell as usize].index.insert(free, slot);
        self.zone_index[zone as usize].insert(free, slot);
        self.cluster_index.insert(free, slot);
    }

    fn unindex_host(&mut self, slot: u32) {
        let Some(host) = self.hosts.get(slot as usize).and_then(Option::as_ref) else {
            return;
        };
        if host.spec.state != HostState::Ready {
            return;
        }
        let (free, cell, zone) = (host.free_memory(), host.cell, host.zone);
        self.cells[cell as usize].index.remove(free, slot);
        self.zone_index[zone as usize].remove(free, slot);
        self.cluster_index.remove(free, slot);
    }

    /// Every observable piece of the snapshot in a canonical text form, so
    /// tests can check that an operation and its inverse leave no trace.
    #[cfg(test)]
    pub(super) fn fingerprint(&self) -> String {
        use std::fmt::Write;
        let zone_names: HashMap<u32, &str> =
            self.zones.iter().map(|(n, &z)| (z, n.as_str())).collect();
        let fault_names: HashMap<u32, (u32, u32)> =
            self.fault_domains.iter().map(|(&k, &v)| (v, k)).collect();
        let update_names: HashMap<u32, (u32, u32)> =
            self.update_domains.iter().map(|(&k, &v)| (v, k)).collect();
        let pair_name = |id: u32| -> String {
            self.pairs
                .name(id)
                .map(|(k, v)| format!("{k}={v}"))
                .unwrap_or_else(|| format!("<stale {id}>"))
        };
        let mut out = String::new();
        let mut hosts: Vec<&Host> = self.hosts.iter().flatten().collect();
        hosts.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        for h in hosts {
            let mut labels: Vec<String> = h
                .vm_labels
                .entries()
                .iter()
                .map(|&(id, n)| format!("{}x{n}", pair_name(id)))
                .collect();
            labels.sort();
            let mut anti: Vec<String> = h
                .vm_anti_affinity
                .entries()
                .iter()
                .map(|&(id, n)| format!("{}x{n}", pair_name(id)))
                .collect();
            anti.sort();
            let mut vms: Vec<&str> = h
                .vms
                .iter()
                .filter_map(|&v| self.vms[v as usize].as_ref().map(|vm| vm.id.as_str()))
                .collect();
            vms.sort();
            let slot = self.host_slots[&h.spec.id];
            let indexed = (
                self.cluster_index.contains(h.free_memory(), slot),
                self.zone_index[h.zone as usize].contains(h.free_memory(), slot),
                self.cells[h.cell as usize]
                    .index
                    .contains(h.free_memory(), slot),
            );
            let _ = writeln!(
                out,
                "host {} {:?} cpu {}/{} mem {}/{} disk {}/{:?} burst {} labels {labels:?} anti {anti:?} vms {vms:?} indexed {indexed:?}",
                h.spec.id,
                h.spec.state,
                h.cpu_allocated,
                h.cpu_capacity,
                h.memory_allocated,
                h.spec.allocatable_memory_mib,
                h.disk_allocated,
                h.spec.allocatable_disk_mib,
                h.memory_burst,
            );
        }
        let _ = writeln!(
            out,
            "indexed {} {:?}",
            self.cluster_index.len(),
            self.zone_index
                .iter()
                .map(FreeMemoryIndex::len)
                .collect::<Vec<_>>()
        );
        let mut sets: Vec<String> = self
            .set_ids
            .iter()
            .map(|(name, &id)| {
                let c = &self.sets[id as usize];
                let mut faults: Vec<String> = c
                    .fault_domains
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(d, n)| {
                        let (z, fd) = fault_names[&(d as u32)];
                        format!("{}/fd{fd}:{n}", zone_names[&z])
                    })
                    .collect();
                faults.sort();
                let mut updates: Vec<String> = c
                    .update_domains
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(d, n)| {
                        let (z, ud) = update_names[&(d as u32)];
                        format!("{}/ud{ud}:{n}", zone_names[&z])
                    })
                    .collect();
                updates.sort();
                format!("set {name} vms {} {faults:?} {updates:?}", c.vms)
            })
            .collect();
        sets.sort();
        for s in sets {
            let _ = writeln!(out, "{s}");
        }
        let _ = writeln!(
            out,
            "pairs {} vms {}",
            self.pairs.live(),
            self.vm_slots.len()
        );
        out
    }
}

fn cpu_capacity(allocatable_cpus: u32, ratio: f64) -> u64 {
    // `as` saturates: a huge ratio gives u64::MAX, never a panic.
    (f64::from(allocatable_cpus) * ratio).floor() as u64
}
