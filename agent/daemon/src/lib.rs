//! `fabric-agent`: the host daemon. It registers the host with the controller, keeps its lease
//! alive with heartbeats, and turns the host's assignments into running VMs.
//!
//! - [`link`]: the controller connection: registration, heartbeats, the lease and its fence,
//!   the assignment stream.
//! - [`balancer`]: the memory balancer's decisions (pure logic), applied every half second by
//!   [`Host::run_memory_balancer`] through each instance's [`backend::Balloon`] (real and
//!   simulated VMs alike) and reported in heartbeats.
//! - [`vm`]: one supervising task per VM: prepare, start, watch, restart by policy, stop,
//!   clean up; every transition reported.
//! - [`backend`]: the [`backend::Hypervisor`] trait, implemented by [`kvm`] (fabric-vmm
//!   processes) and [`sim`] (simulated VMs for scale tests).
//! - [`images`], [`disk`], [`network`], [`cgroup`]: what a VM is given on the host.
//! - [`record`]: what survives an agent restart, on disk; [`process`]: watching VMM processes
//!   the agent may not have started itself (pidfds).
//! - [`service`]: the Agent gRPC service for operators on the host.
//! - [`certs`]: the host's certificate: joining with a token, renewing before expiry.
//!
//! Restart safety: a VM's VMM runs in its own session and cgroup, and everything the agent
//! knows about it is in `<data_dir>/vms/<vm_id>/vm.json`; the lease's expiry is in
//! `<data_dir>/lease.json` on the boot-time clock. A new agent process reads both, re-adopts
//! the running VMMs and carries on; SIGTERM ends only the agent.

pub mod backend;
pub mod balancer;
pub mod certs;
pub mod cgroup;
pub mod config;
pub mod connect;
pub mod disk;
pub mod images;
pub mod kvm;
pub mod link;
pub mod network;
pub mod process;
pub mod record;
pub mod service;
pub mod sim;
pub mod testhook;
pub mod vm;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fabric_proto::v1::{
    Assignment, AssignmentUpdate, HostMemoryBalance, ObservedPhase, ObservedVm, Resources,
    VmMemoryBalance,
};
use tokio::sync::watch;

use backend::Hypervisor;
use config::{Config, HypervisorKind};
use record::VmRecord;
use vm::{Supervisor, VmView};

/// True for names safe as one path component and in logs: 1..=128 of `[A-Za-z0-9._-]`, not
/// `.` or `..`. VM ids from the controller must pass before they name a directory.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

struct VmEntry {
    desired: watch::Sender<Option<Assignment>>,
    view: Arc<Mutex<VmView>>,
}

/// Why VMs may not run: the lease is not valid, or it lapsed (or the agent has just started)
/// and the controller's assignments have not been read since.
///
/// Two rules follow from it ([`vm`]): a VM is *stopped* when the lease is not valid or it was
/// started (or adopted) before the latest fencing; a VM is *started* only when the host is not
/// [`fenced`](FenceState::fenced) at all. A restarted agent holding a still-valid lease file
/// so keeps the VMMs it re-adopts (they obey the same file) but starts nothing, not even a VM
/// whose VMM died while it was away, until it has read the current set: the record on disk is
/// what the controller wanted before, and it may have moved the VM since.
///
/// Only a complete assignment set read while the lease is valid, on a stream opened after the
/// fencing, counts. A set read before the renewal may be stale by then: the controller that
/// sent it may have declared the host dead and moved its VMs, then restarted (a restarted
/// controller does not remember "dead" and accepts the heartbeat). When the lease is renewed
/// after the set was read, the stream is opened again (`link::watch_assignments`).
#[derive(Debug, Clone, Default)]
pub struct FenceState {
    pub lease_valid: bool,
    /// No complete assignment set has been read, with the lease valid, on a stream opened in
    /// this epoch. True at start-up, whatever the lease file says.
    pub need_sync: bool,
    /// Bumped at each fencing; a watch stream opened before it cannot lift the fence, and a
    /// VM started (or adopted) before it is stopped even if the fence is lifted again before
    /// its supervisor looks.
    pub epoch: u64,
}

impl FenceState {
    /// VMs may not be started.
    pub fn fenced(&self) -> bool {
        !self.lease_valid || self.need_sync
    }
}

/// The agent's shared state.
pub struct Host {
    pub config: Config,
    pub backend: Arc<dyn Hypervisor>,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    /// Assignments refused before they became VMs (e.g. an unusable id), reported as FAILED.
    rejected: Mutex<BTreeMap<String, String>>,
    fence_state: Mutex<FenceState>,
    fence: watch::Sender<bool>,
    generation: Mutex<u64>,
    /// The memory balancer's latest step over the host; None while it is off or before its
    /// first step. (Its decisions per VM are in each VM's view.)
    memory_balance: Mutex<Option<HostMemoryBalance>>,
}

impl Host {
    /// `lease_valid`: the lease a previous agent process left is still valid, so the VMMs it
    /// re-adopts may keep running. Nothing is started before the assignments are read.
    pub fn new(config: Config, backend: Arc<dyn Hypervisor>, lease_valid: bool) -> Arc<Host> {
        let state = FenceState {
            lease_valid,
            need_sync: true,
            epoch: 0,
        };
        let (fence, _) = watch::channel(state.fenced());
        Arc::new(Host {
            config,
            backend,
            vms: Mutex::new(BTreeMap::new()),
            rejected: Mutex::new(BTreeMap::new()),
            fence_state: Mutex::new(state),
            fence,
            generation: Mutex::new(0),
            memory_balance: Mutex::new(None),
        })
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.config.data_dir.join("vms")
    }

    /// True while VMs must not run.
    pub fn fence_rx(&self) -> watch::Receiver<bool> {
        self.fence.subscribe()
    }

    pub fn fence_state(&self) -> FenceState {
        self.fence_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the fence state and publishes whether VMs must stop.
    pub fn update_fence(&self, f: impl FnOnce(&mut FenceState)) {
        let mut state = self.fence_state.lock().unwrap_or_else(|e| e.into_inner());
        let was = state.fenced();
        f(&mut state);
        let now = state.fenced();
        if was != now {
            if now {
                tracing::warn!("fenced: VMs on this host are stopped until the lease is renewed and the assignments are read again");
            } else {
                tracing::info!("lease valid and assignments current: VMs may run");
            }
        }
        self.fence.send_replace(now);
    }

    /// Reads the VM records left on disk, re-adopts running VMMs and starts a supervisor for
    /// each VM. Called once at start-up, before the controller is reached.
    pub fn load_vms(self: &Arc<Self>) {
        let dir = self.vms_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read VM records");
                return;
            }
        };
        for entry in entries.flatten() {
            let vm_dir = entry.path();
            let Some(vm_id) = vm_dir
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            if !is_safe_name(&vm_id) || !vm_dir.is_dir() {
                continue;
            }
            let mut record = match VmRecord::load(&vm_dir) {
                Ok(record) => record,
                Err(err) => {
                    // Its VMM cannot be adopted (nor told apart from a new one): it ends, so
                    // that it never runs beside a copy the controller starts elsewhere.
                    tracing::error!(vm = %vm_id, error = %err, "unreadable VM record; ending the VM's processes and leaving the directory alone");
                    let backend = self.backend.clone();
                    tokio::spawn(async move {
                        if let Err(err) = backend.kill_all(&vm_id).await {
                            tracing::error!(vm = %vm_id, error = %err, "cannot end the VM's processes");
                        }
                    });
                    continue;
                }
            };
            let loaded = record.clone();
            let instance = self.backend.adopt(&mut record, &vm_dir);
            if record != loaded {
                if let Err(err) = record.save(&vm_dir) {
                    tracing::error!(vm = %vm_id, error = %err, "cannot save the VM record");
                }
            }
            match &instance {
                Some(i) => tracing::info!(vm = %vm_id, pid = i.pid(), "re-adopted a running VM"),
                None if record.pid.is_some() => {
                    tracing::warn!(vm = %vm_id, pid = ?record.pid, "the VM's VMM is no longer running")
                }
                None => {}
            }
            let assignment = record.assignment();
            self.spawn_vm(vm_id, assignment, record, instance);
        }
    }

    fn spawn_vm(
        self: &Arc<Self>,
        vm_id: String,
        assignment: Option<Assignment>,
        mut record: VmRecord,
        instance: Option<Box<dyn backend::Instance>>,
    ) {
        let dir = self.vms_dir().join(&vm_id);
        let (desired_tx, desired_rx) = watch::channel(assignment.clone());
        let console = dir.join(kvm::CONSOLE_LOG);
        let view = Arc::new(Mutex::new(VmView {
            assignment,
            observed: ObservedVm {
                vm_id: vm_id.clone(),
                phase: ObservedPhase::Starting as i32,
                restart_count: record.restart_count,
                last_error: record.last_error.clone(),
                ..Default::default()
            },
            socket: None,
            console: (self.config.hypervisor == HypervisorKind::Kvm).then_some(console),
            balloon: None,
        }));
        if record.pid.is_some() && instance.is_none() {
            record.pid = None;
            record.pid_start_ticks = None;
        }
        self.vms.lock().unwrap_or_else(|e| e.into_inner()).insert(
            vm_id.clone(),
            VmEntry {
                desired: desired_tx,
                view: view.clone(),
            },
        );
        let supervisor = Supervisor {
            instance_epoch: self.fence_state().epoch,
            host: self.clone(),
            vm_id,
            dir,
            desired: desired_rx,
            view,
            record,
            instance,
        };
        tokio::spawn(supervisor.run());
    }

    /// Called by a supervisor after it removed its VM: forgets the VM unless it was assigned
    /// again meanwhile.
    fn forget_if_removed(
        &self,
        vm_id: &str,
        desired: &watch::Receiver<Option<Assignment>>,
    ) -> bool {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        if desired.borrow().is_some() {
            return false;
        }
        vms.remove(vm_id);
        true
    }

    /// Applies one message of the assignment stream. `epoch` is the fence epoch when the
    /// stream was opened.
    pub fn apply(self: &Arc<Self>, update: AssignmentUpdate, epoch: u64) {
        // Held to the end: the generation is published (and heartbeats report it) only once
        // every VM has been handed what the update says.
        let mut generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        let stale = if update.full {
            update.generation < *generation
        } else {
            update.generation <= *generation
        };
        if stale {
            tracing::warn!(
                got = update.generation,
                have = *generation,
                "ignoring an assignment update older than the one applied"
            );
            return;
        }
        let applied = update.generation;
        let mut removed: Vec<String> = update.removed_vm_ids.clone();
        if update.full {
            let wanted: HashSet<&str> = update.upserts.iter().map(|a| a.vm_id.as_str()).collect();
            let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
            removed.extend(
                vms.keys()
                    .filter(|id| !wanted.contains(id.as_str()))
                    .cloned(),
            );
            self.rejected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        for vm_id in removed {
            let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = vms.get(&vm_id) {
                entry.desired.send_replace(None);
            }
            self.rejected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&vm_id);
        }
        for assignment in update.upserts {
            let vm_id = assignment.vm_id.clone();
            if !is_safe_name(&vm_id) {
                let shown: String = vm_id.chars().take(128).collect();
                tracing::error!(vm = ?shown, "refusing an assignment with an unusable VM id");
                self.rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        shown,
                        "VM id unusable on a host: 1..=128 of letters, digits, '.', '_', '-'"
                            .to_string(),
                    );
                continue;
            }
            let existing = {
                let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
                vms.get(&vm_id).map(|entry| entry.desired.clone())
            };
            match existing {
                Some(desired) => {
                    desired.send_replace(Some(assignment));
                }
                None => {
                    let record = VmRecord::new(&vm_id, self.backend.name());
                    self.spawn_vm(vm_id, Some(assignment), record, None);
                }
            }
        }
        *generation = applied;
        drop(generation);
        if update.full {
            let state = self.fence_state();
            if state.need_sync && state.epoch == epoch && state.lease_valid {
                self.update_fence(|s| {
                    if s.epoch == epoch && s.lease_valid {
                        s.need_sync = false;
                    }
                });
            }
        }
    }

    /// The generation of the assignments applied last.
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every VM as the agent sees it, ordered by id.
    pub fn views(&self) -> Vec<VmView> {
        let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.values()
            .map(|e| e.view.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    pub fn view(&self, vm_id: &str) -> Option<VmView> {
        let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.get(vm_id)
            .map(|e| e.view.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Observed state of every VM, for a heartbeat, with refused assignments as FAILED.
    pub fn observed(&self) -> Vec<ObservedVm> {
        let mut all: Vec<ObservedVm> = self.views().into_iter().map(|v| v.observed).collect();
        let rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        all.extend(rejected.iter().map(|(vm_id, error)| ObservedVm {
            vm_id: vm_id.clone(),
            phase: ObservedPhase::Failed as i32,
            message: "assignment refused".to_string(),
            last_error: error.clone(),
            ..Default::default()
        }));
        all
    }

    /// The data directory's filesystem: (its size, what is free for unprivileged writers),
    /// MiB; a hollow host's `[sim] disk_mib` as both when set. `None` when it cannot be read.
    fn data_disk_mib(&self) -> Option<(u64, u64)> {
        let sim = self.config.sim.disk_mib;
        if self.config.hypervisor == HypervisorKind::Sim && sim > 0 {
            return Some((sim, sim));
        }
        let fs = nix::sys::statvfs::statvfs(&self.config.data_dir).ok()?;
        let block = fs.fragment_size();
        let total = fs.blocks().saturating_mul(block) >> 20;
        (total > 0).then(|| (total, fs.blocks_available().saturating_mul(block) >> 20))
    }

    /// What VM disks and logs may take on the data directory's filesystem, MiB: what is free
    /// there now, less what the image cache may still grow by (its budget less what it holds)
    /// and `[reserve] disk_mib`. Space other programs use is not offered, so VMs filling
    /// every disk they were given leave the reserve. What this agent's VMs already hold is
    /// not offered again either: an agent restarted beside running VMs offers less by that
    /// much (their reservations still count in full at the controller), which errs on the
    /// safe side: their copies may share blocks with the cache (reflinks), and a directory
    /// left behind is not the controller's to count. A hollow host with `[sim] disk_mib`
    /// offers that less the reserve. 1 (nothing to speak of) when the filesystem cannot be
    /// read, never 0, which would say "not counted".
    pub fn allocatable_disk_mib(&self) -> u64 {
        let Some((total, available)) = self.data_disk_mib() else {
            tracing::error!(
                data_dir = %self.config.data_dir.display(),
                "cannot read the data directory's filesystem: no disk offered to VMs"
            );
            return 1;
        };
        let reserve = self.config.reserve.disk_mib;
        if self.config.hypervisor == HypervisorKind::Sim && self.config.sim.disk_mib > 0 {
            return total.saturating_sub(reserve).max(1);
        }
        let cache_held = disk::allocated_bytes(&self.config.data_dir.join("images"), 1) >> 20;
        let offered = available
            .saturating_sub(self.config.image_cache_mib.saturating_sub(cache_held))
            .saturating_sub(reserve);
        if offered == 0 {
            tracing::warn!(
                available_mib = available,
                image_cache_mib = self.config.image_cache_mib,
                reserve_disk_mib = reserve,
                "no disk left for VMs after the image cache's budget and the reserve: VMs will not be placed here"
            );
        }
        offered.max(1)
    }

    /// The machine's resources (or the simulated host's).
    pub fn capacity(&self) -> Resources {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = meminfo_kib("MemTotal").unwrap_or(0) / 1024;
        let disk_mib = self.data_disk_mib().map_or(1, |(total, _)| total);
        let sim = &self.config.sim;
        if self.config.hypervisor == HypervisorKind::Sim {
            Resources {
                cpus: if sim.cpus > 0 { sim.cpus } else { cpus },
                memory_mib: if sim.memory_mib > 0 {
                    sim.memory_mib
                } else {
                    memory_mib
                },
                disk_mib,
            }
        } else {
            Resources {
                cpus,
                memory_mib,
                disk_mib,
            }
        }
    }

    pub fn allocatable(&self) -> Resources {
        let capacity = self.capacity();
        Resources {
            cpus: capacity.cpus.saturating_sub(self.config.reserve.cpus),
            memory_mib: capacity
                .memory_mib
                .saturating_sub(self.config.reserve.memory_mib),
            disk_mib: self.allocatable_disk_mib(),
        }
    }
}

impl Host {
    /// The memory balancer's loop ([`balancer`]): every half second, the running VMs' memory specs
    /// and latest guest statistics in, balloon targets out through each instance's
    /// [`backend::Balloon`] (a fabric-vmm's control socket, or a simulated guest). Every
    /// change is logged with its reason, and the step's summary and decisions are kept for
    /// heartbeats ([`Host::memory_balance`], `ObservedVm.memory_balance`). Returns at once
    /// when `[memory] balancer` is off.
    pub async fn run_memory_balancer(self: Arc<Self>) {
        let memory = &self.config.memory;
        if !memory.balancer {
            tracing::info!("memory balancer off");
            return;
        }
        let budget_mib = match memory.budget_mib {
            0 => self.allocatable().memory_mib,
            configured => configured,
        };
        let mut balancer = balancer::Balancer::new(balancer::Params {
            budget_mib,
            rate_mib_per_s: memory.rate_mib_per_s,
            ..Default::default()
        });
        tracing::info!(
            budget_mib,
            rate_mib_per_s = memory.rate_mib_per_s,
            hypervisor = self.backend.name(),
            "memory balancer on"
        );
        let mut was_short = false;
        let mut ticker = tokio::time::interval(balancer::STEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let mut balloons = BTreeMap::new();
            let inputs: Vec<balancer::VmInput> = self
                .views()
                .into_iter()
                .filter(|v| v.observed.phase() == ObservedPhase::Running)
                .filter_map(|v| {
                    let spec = v.assignment.as_ref()?.spec.as_ref()?.memory?;
                    balloons.insert(v.observed.vm_id.clone(), v.balloon?);
                    Some(balancer::VmInput {
                        vm_id: v.observed.vm_id,
                        spec,
                        stats: v.observed.memory,
                    })
                })
                .collect();
            let plan = balancer.step(fabric_proto::clock::now(), &inputs);
            self.publish_memory_balance(&plan);
            let host = &plan.host;
            if host.short != was_short {
                was_short = host.short;
                tracing::info!(
                    budget_mib = host.budget_mib,
                    wanted_mib = host.wanted_mib,
                    demand_mib = host.demand_mib,
                    minimum_mib = host.minimum_mib,
                    overcommitted = host.overcommitted,
                    "{}",
                    if host.short {
                        "host short of memory: sharing by weight"
                    } else {
                        "host memory suffices for every VM's target"
                    }
                );
            }
            for decision in plan.vms.iter().filter(|d| d.changed) {
                let Some(balloon) = balloons.get(&decision.vm_id) else {
                    continue;
                };
                let vm_id = &decision.vm_id;
                match balloon.set_target(decision.balloon_target_mib).await {
                    Ok(()) => tracing::info!(
                        vm = %vm_id,
                        balloon_mib = decision.balloon_target_mib,
                        from_mib = decision.previous_target_mib,
                        target_mib = decision.target_mib,
                        demand_mib = ?decision.demand_mib,
                        "balloon: {}",
                        decision.reason
                    ),
                    Err(error) => {
                        tracing::warn!(vm = %vm_id, %error, "balloon target not set")
                    }
                }
            }
        }
    }

    /// Keeps a balancer step for heartbeats: the host's summary, and each VM's decision in
    /// its view while it runs (a VM that stopped meanwhile reports none).
    fn publish_memory_balance(&self, plan: &balancer::Plan) {
        let decisions: BTreeMap<&str, &balancer::Decision> =
            plan.vms.iter().map(|d| (d.vm_id.as_str(), d)).collect();
        {
            let vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
            for (vm_id, entry) in vms.iter() {
                let mut view = entry.view.lock().unwrap_or_else(|e| e.into_inner());
                let running = view.observed.phase() == ObservedPhase::Running;
                view.observed.memory_balance = decisions
                    .get(vm_id.as_str())
                    .filter(|_| running)
                    .map(|d| vm_memory_balance(d));
            }
        }
        let host = &plan.host;
        *self
            .memory_balance
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(HostMemoryBalance {
            budget_mib: host.budget_mib,
            demand_mib: host.demand_mib,
            wanted_mib: host.wanted_mib,
            assigned_mib: host.assigned_mib,
            minimum_mib: host.minimum_mib,
            short: host.short,
            pressured_vms: u32::try_from(host.pressured_vms).unwrap_or(u32::MAX),
        });
    }

    /// The memory balancer's latest summary of the host; None while it is off or before its
    /// first step.
    pub fn memory_balance(&self) -> Option<HostMemoryBalance> {
        *self
            .memory_balance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A balancer decision as heartbeats report it.
fn vm_memory_balance(decision: &balancer::Decision) -> VmMemoryBalance {
    VmMemoryBalance {
        target_mib: decision.target_mib,
        demand_mib: decision.demand_mib,
        reason: decision.reason.as_str().to_string(),
        pressured: decision.reason.pressured(),
    }
}

/// A `/proc/meminfo` field in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_that_could_escape_a_directory_are_refused() {
        for good in ["vm-1", "a", "VM_2.x", &"a".repeat(128)] {
            assert!(is_safe_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é", &"a".repeat(129)] {
            assert!(!is_safe_name(bad), "{bad}");
        }
        assert!(meminfo_kib("MemTotal").unwrap() > 0);
    }

    fn fenced_host() -> Arc<Host> {
        let dir = std::env::temp_dir().join(format!("fabric-fence-test-{}", std::process::id()));
        let config = Config::from_toml(&format!(
            "controller = \"unix:/nowhere\"\nmachine_id = \"m\"\nname = \"n\"\nhypervisor = \"sim\"\ndata_dir = {:?}",
            dir.display().to_string()
        ))
        .expect("config");
        let backend: Arc<dyn Hypervisor> = Arc::new(super::sim::Sim::new(Default::default()));
        Host::new(config, backend, false)
    }

    fn full_set(generation: u64) -> AssignmentUpdate {
        AssignmentUpdate {
            generation,
            full: true,
            upserts: Vec::new(),
            removed_vm_ids: Vec::new(),
            continued: false,
        }
    }

    #[test]
    fn only_a_full_set_read_with_the_lease_valid_lifts_the_fence() {
        // Read before the lease was renewed: it may be stale by then (it does not count; the
        // watcher reads the set again once the lease is renewed).
        let host = fenced_host();
        let epoch = host.fence_state().epoch;
        assert!(host.fence_state().fenced());
        host.apply(full_set(1), epoch);
        host.update_fence(|s| s.lease_valid = true);
        assert!(host.fence_state().fenced(), "{:?}", host.fence_state());
        // Read again, now with the lease valid.
        host.apply(full_set(2), epoch);
        assert!(!host.fence_state().fenced(), "{:?}", host.fence_state());
    }

    #[test]
    fn a_new_agent_starts_nothing_before_it_has_read_the_assignments_even_on_a_valid_lease() {
        let host = fenced_host();
        let host = Host::new(host.config.clone(), host.backend.clone(), true);
        let state = host.fence_state();
        assert!(
            state.lease_valid && state.need_sync && state.fenced(),
            "{state:?}"
        );
        host.apply(full_set(1), state.epoch);
        assert!(!host.fence_state().fenced(), "{:?}", host.fence_state());
    }

    #[test]
    fn a_full_set_from_a_stream_opened_before_the_fencing_does_not_lift_it() {
        let host = fenced_host();
        let old_epoch = host.fence_state().epoch;
        host.update_fence(|s| {
            s.lease_valid = true;
            s.need_sync = false;
        });
        // The lease lapses while a stream from before is still open.
        host.update_fence(|s| {
            s.lease_valid = false;
            s.need_sync = true;
            s.epoch += 1;
        });
        host.apply(full_set(1), old_epoch);
        host.update_fence(|s| s.lease_valid = true);
        assert!(host.fence_state().fenced(), "{:?}", host.fence_state());
        host.apply(full_set(2), old_epoch + 1);
        assert!(!host.fence_state().fenced(), "{:?}", host.fence_state());
    }
}
