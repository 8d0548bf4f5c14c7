//! The reconciler: a level-triggered loop that looks at the whole state and moves it one step
//! toward what is wanted. Each pass is idempotent, so it runs on every change (a kick) and on
//! a timer, and a controller restart simply resumes it.
//!
//! Per pass: host states from leases (READY → SUSPECT → DEAD, with events); VMs of DEAD hosts
//! back to PENDING (their agent has fenced itself); stopped VMs released from their host;
//! draining hosts emptied one update domain at a time (each VM stopped there first, then
//! placed elsewhere); hosts that stayed short of memory relieved one VM at a time
//! ([`crate::scheduler::memory_relief`] decides, `reconcile/memory_relief.rs` acts); pending VMs
//! placed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_proto::v1::{DesiredState, EventKind, HostState, ObservedPhase, VmPhase};

use crate::controller::{effective_state, short_host_state, Controller};

mod memory_relief;
#[cfg(test)]
pub(crate) mod tests;

/// Longest time between passes.
const PERIOD: Duration = Duration::from_millis(250);
/// Most placements committed per pass (they commit concurrently, sharing fsyncs).
const PLACEMENTS_PER_PASS: usize = 4096;

/// Longest wait before an unplaceable VM is considered again (it doubles from 250 ms).
const MAX_PLACEMENT_BACKOFF: Duration = Duration::from_secs(5);

pub struct Reconciler {
    host_states: HashMap<String, HostState>,
    /// The unplaceable reason last announced per VM (to announce changes only).
    unplaceable: HashMap<String, String>,
    /// Unplaceable VMs: when each may be considered again, and how many tries failed.
    backoff: HashMap<String, (Instant, u32)>,
    /// Pending VMs considered per pass, oldest first.
    placements_per_pass: usize,
    relief: memory_relief::ReliefMemory,
}

impl Default for Reconciler {
    fn default() -> Self {
        Reconciler {
            host_states: HashMap::new(),
            unplaceable: HashMap::new(),
            backoff: HashMap::new(),
            placements_per_pass: PLACEMENTS_PER_PASS,
            relief: memory_relief::ReliefMemory::default(),
        }
    }
}

fn ts() -> prost_types::Timestamp {
    prost_types::Timestamp::from(fabric_proto::clock::now())
}

impl Reconciler {
    pub async fn run(mut self, c: Arc<Controller>) {
        loop {
            self.pass(&c).await;
            tokio::select! {
                _ = c.kick.notified() => {}
                _ = tokio::time::sleep(PERIOD) => {}
            }
        }
    }

    pub async fn pass(&mut self, c: &Arc<Controller>) {
        self.host_states(c);
        self.dead_and_lost(c).await;
        self.stopped_and_evicted(c).await;
        self.finish_relief_moves(c);
        self.relieve_memory(c).await;
        self.place(c).await;
    }

    /// Recomputes host states from leases; announces and applies changes.
    fn host_states(&mut self, c: &Controller) {
        let mut model = c.model();
        let mut placed: HashMap<String, usize> = HashMap::new();
        for entry in model.vms.values() {
            if let Some(status) = &entry.vm.status {
                if !status.host_id.is_empty() {
                    *placed.entry(status.host_id.clone()).or_default() += 1;
                }
            }
        }
        let mut changed = Vec::new();
        for (id, entry) in model.hosts.iter_mut() {
            let mut state = effective_state(&c.settings, entry);
            // DEAD is sticky until the host's VMs have all been moved off it: decided here,
            // under the model lock, so that a registration either came first (and renewed the
            // lease: not DEAD) or finds the host evicting and gets no assignments.
            if state == HostState::Dead {
                entry.live.evicting = true;
            } else if entry.live.evicting && placed.get(id).copied().unwrap_or(0) == 0 {
                entry.live.evicting = false;
                entry.live.assignments.send_modify(|v| *v += 1);
            }
            if entry.live.evicting {
                state = HostState::Dead;
            }
            if self.host_states.get(id) != Some(&state) {
                self.host_states.insert(id.clone(), state);
                changed.push((id.clone(), entry.host.clone(), state));
            }
        }
        drop(model);
        if !changed.is_empty() {
            // A host opened or closed: what could not be placed may fit now.
            self.backoff.clear();
        }
        for (id, host, state) in changed {
            c.placer().sync_host(&host, state);
            let reason = match state {
                HostState::Suspect => "missed heartbeats",
                HostState::Dead => "lease expired beyond the fencing margin",
                _ => "",
            };
            if c.announce_host_state(&id, &host.name, state, reason)
                && matches!(state, HostState::Dead | HostState::Suspect)
            {
                tracing::warn!(host = %id, name = %host.name, state = short_host_state(state), "{reason}");
            }
        }
    }

    /// VMs on DEAD hosts go back to PENDING (or STOPPED); VMs on SUSPECT hosts are LOST.
    async fn dead_and_lost(&self, c: &Arc<Controller>) {
        let mut evict = Vec::new();
        let mut lost = Vec::new();
        {
            let model = c.model();
            for entry in model.vms.values() {
                let Some(status) = &entry.vm.status else {
                    continue;
                };
                if status.host_id.is_empty() {
                    continue;
                }
                match self.host_states.get(&status.host_id) {
                    Some(HostState::Dead) => {
                        evict.push((entry.vm.id.clone(), status.host_id.clone()))
                    }
                    Some(HostState::Suspect) if status.phase() != VmPhase::Lost => {
                        lost.push((entry.vm.id.clone(), status.host_id.clone()))
                    }
                    _ => {}
                }
            }
        }
        let evictions = evict.into_iter().map(|(vm_id, host_id)| {
            let c = c.clone();
            async move {
                let reason = format!("host {host_id} was declared dead (lease expired and the fencing margin passed)");
                let result = c
                    .update_vm(&vm_id, |vm| {
                        let status = vm.status.get_or_insert_with(Default::default);
                        if status.host_id != host_id {
                            return Ok(false);
                        }
                        status.host_id.clear();
                        let running = status.desired_state() != DesiredState::Stopped;
                        status.phase = if running { VmPhase::Pending } else { VmPhase::Stopped } as i32;
                        status.reason = reason.clone();
                        status.phase_changed_at = Some(ts());
                        Ok(true)
                    })
                    .await;
                if result.is_ok() {
                    c.events.vm(EventKind::VmEvicted, &vm_id, &host_id, "host dead", reason);
                }
            }
        });
        futures::future::join_all(evictions).await;
        let losses = lost.into_iter().map(|(vm_id, host_id)| {
            let c = c.clone();
            async move {
                let _ = c
                    .update_vm(&vm_id, |vm| {
                        let status = vm.status.get_or_insert_with(Default::default);
                        if status.host_id != host_id || status.phase() == VmPhase::Lost {
                            return Ok(false);
                        }
                        status.phase = VmPhase::Lost as i32;
                        status.reason = format!("host {host_id} stopped heartbeating; waiting for it to return or be declared dead");
                        status.phase_changed_at = Some(ts());
                        Ok(true)
                    })
                    .await;
            }
        });
        futures::future::join_all(losses).await;
    }

    /// Releases VMs that stopped as wanted, and moves VMs off draining hosts and off hosts
    /// short of memory.
    async fn stopped_and_evicted(&mut self, c: &Arc<Controller>) {
        let mut release = Vec::new();
        let mut relieved = Vec::new();
        let mut drained_hosts = Vec::new();
        {
            let mut model = c.model();
            // Draining hosts, by update domain: only the lowest domain that still has VMs
            // is emptied now.
            let mut draining: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
            let mut vms_on: HashMap<String, usize> = HashMap::new();
            for entry in model.vms.values() {
                if let Some(status) = &entry.vm.status {
                    if !status.host_id.is_empty() {
                        *vms_on.entry(status.host_id.clone()).or_default() += 1;
                    }
                }
            }
            for (id, entry) in &model.hosts {
                if self.host_states.get(id) == Some(&HostState::Draining) {
                    if vms_on.get(id).copied().unwrap_or(0) == 0 {
                        drained_hosts.push(id.clone());
                    } else {
                        draining
                            .entry((entry.host.zone.clone(), entry.host.update_domain))
                            .or_default()
                            .push(id.clone());
                    }
                }
            }
            let active: Vec<String> = draining.into_values().next().unwrap_or_default();
            let mut evicting = std::collections::HashSet::new();
            for entry in model.vms.values() {
                let Some(status) = &entry.vm.status else {
                    continue;
                };
                if active.contains(&status.host_id) {
                    evicting.insert(entry.vm.id.clone());
                }
            }
            if evicting != model.evicting {
                for id in evicting.symmetric_difference(&model.evicting) {
                    if let Some(host) = model
                        .vms
                        .get(id)
                        .and_then(|e| e.vm.status.as_ref())
                        .and_then(|s| model.hosts.get(&s.host_id))
                    {
                        host.live.assignments.send_modify(|v| *v += 1);
                    }
                }
                model.evicting = evicting;
            }
            for entry in model.vms.values() {
                let Some(status) = &entry.vm.status else {
                    continue;
                };
                if status.host_id.is_empty() {
                    continue;
                }
                let wants_stopped = status.desired_state() == DesiredState::Stopped;
                // A memory-relief move has its destination chosen: it goes there rather than
                // back to placement, even off a host that has started draining since.
                let relief = !wants_stopped
                    && model
                        .relieving
                        .get(&entry.vm.id)
                        .is_some_and(|r| r.source == status.host_id);
                let moving = model.evicting.contains(&entry.vm.id) && !relief;
                if !wants_stopped && !moving && !relief {
                    continue;
                }
                let Some(host) = model.hosts.get(&status.host_id) else {
                    continue;
                };
                let observed = host.live.observed.get(&entry.vm.id);
                // The agent has applied the update that told it to stop the VM, and reports
                // it stopped (or not at all) since. A "stopped" report alone may predate the
                // stop: a VM stopped by a fence blip and started again at once still reads
                // STOPPED until the next heartbeat. (The agent reads its applied generation
                // before its VMs' states, so this report is at least that recent.)
                let stop_applied = host
                    .live
                    .stop_sent
                    .get(&entry.vm.id)
                    .is_some_and(|g| host.live.acked_generation >= *g);
                let stopped = stop_applied
                    && observed.is_none_or(|o| {
                        matches!(o.phase(), ObservedPhase::Stopped | ObservedPhase::Failed)
                    });
                if stopped && relief {
                    relieved.push((entry.vm.id.clone(), status.host_id.clone()));
                } else if stopped {
                    release.push((entry.vm.id.clone(), status.host_id.clone(), moving));
                }
            }
        }
        let releases = release.into_iter().map(|(vm_id, host_id, moving)| {
            let c = c.clone();
            async move {
                let result = c
                    .update_vm(&vm_id, |vm| {
                        let status = vm.status.get_or_insert_with(Default::default);
                        if status.host_id != host_id {
                            return Ok(false);
                        }
                        status.host_id.clear();
                        if status.desired_state() == DesiredState::Stopped {
                            status.phase = VmPhase::Stopped as i32;
                            status.reason = "stopped".into();
                        } else {
                            status.phase = VmPhase::Pending as i32;
                            status.reason = format!("moved off draining host {host_id}");
                        }
                        status.phase_changed_at = Some(ts());
                        Ok(true)
                    })
                    .await;
                if result.is_ok() && moving {
                    c.events.vm(
                        EventKind::VmEvicted,
                        &vm_id,
                        &host_id,
                        "drain",
                        format!("stopped on draining host {host_id}; to be placed elsewhere"),
                    );
                }
            }
        });
        futures::future::join_all(releases).await;
        memory_relief::place_relieved(c, relieved).await;
        for host_id in drained_hosts {
            if let Err(e) = c
                .set_host_admin(&host_id, HostState::Cordoned, "drained")
                .await
            {
                tracing::warn!(host = %host_id, error = %e.message(), "cannot mark a drained host cordoned");
            } else {
                self.host_states.insert(host_id, HostState::Cordoned);
            }
        }
    }

    /// Places pending VMs: decide each against the snapshot (counting earlier decisions of
    /// the pass), then commit them all concurrently.
    async fn place(&mut self, c: &Arc<Controller>) {
        // Each pending VM with the host it must avoid: the one a memory-relief move took it
        // off, while it waits for another (`reconcile/memory_relief.rs`).
        // Oldest first (by when they became pending), each unplaceable one only once its
        // back-off has passed: new VMs are not starved by old ones that cannot be placed.
        let pending: Vec<(fabric_proto::v1::Vm, Option<String>)> = {
            let model = c.model();
            let (window, now) = (c.settings.memory_relief_window, Instant::now());
            let all: Vec<&crate::controller::VmEntry> = model
                .vms
                .values()
                .filter(|e| {
                    e.vm.status.as_ref().is_some_and(|s| {
                        s.host_id.is_empty()
                            && s.desired_state() != DesiredState::Stopped
                            && s.phase() != VmPhase::Failed
                    })
                })
                .collect();
            // What no longer waits is forgotten.
            let waiting: std::collections::HashSet<&str> =
                all.iter().map(|e| e.vm.id.as_str()).collect();
            self.backoff.retain(|id, _| waiting.contains(id.as_str()));
            self.unplaceable
                .retain(|id, _| waiting.contains(id.as_str()));
            // A memory-relief move waiting for a host other than its source is not held back:
            // its constraint lapses at a moment of its own (the relief window), and such
            // moves are few.
            let mut due: Vec<&crate::controller::VmEntry> = all
                .into_iter()
                .filter(|e| {
                    self.backoff.get(&e.vm.id).is_none_or(|(t, _)| *t <= now)
                        || model.relieving.contains_key(&e.vm.id)
                })
                .collect();
            let since = |e: &crate::controller::VmEntry| {
                e.vm.status
                    .as_ref()
                    .and_then(|s| s.phase_changed_at)
                    .map_or((0, 0), |t| (t.seconds, t.nanos))
            };
            due.sort_by(|a, b| since(a).cmp(&since(b)).then_with(|| a.vm.id.cmp(&b.vm.id)));
            due.into_iter()
                .take(self.placements_per_pass)
                .map(|e| {
                    let avoid = memory_relief::placement_avoids(&model, &e.vm.id, window, now);
                    (e.vm.clone(), avoid.map(str::to_string))
                })
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        let mut decisions = Vec::new();
        {
            let mut placer = c.placer();
            for (vm, avoid) in pending {
                let decision = match &avoid {
                    Some(source) => placer.place_avoiding(&vm, source),
                    None => placer.place(&vm),
                };
                match decision {
                    Ok(host_id) => {
                        // Counted now so the next decision sees it; undone if the commit fails.
                        placer.assign(&vm, &host_id);
                        self.unplaceable.remove(&vm.id);
                        self.backoff.remove(&vm.id);
                        decisions.push((vm.id.clone(), host_id, avoid.is_some()));
                    }
                    Err(reason) => {
                        let tries = self.backoff.get(&vm.id).map_or(0, |(_, n)| *n) + 1;
                        let wait = (Duration::from_millis(250) * (1 << tries.min(8)) / 2)
                            .min(MAX_PLACEMENT_BACKOFF);
                        self.backoff
                            .insert(vm.id.clone(), (Instant::now() + wait, tries));
                        if self.unplaceable.get(&vm.id) != Some(&reason) {
                            self.unplaceable.insert(vm.id.clone(), reason.clone());
                            decisions.push((vm.id.clone(), String::new(), false));
                            c.events.vm(
                                EventKind::VmUnplaceable,
                                &vm.id,
                                "",
                                "unplaceable",
                                reason.clone(),
                            );
                            let c2 = c.clone();
                            let id = vm.id.clone();
                            tokio::spawn(async move {
                                let _ = c2
                                    .update_vm(&id, |vm| {
                                        let status = vm.status.get_or_insert_with(Default::default);
                                        if !status.host_id.is_empty() || status.reason == reason {
                                            return Ok(false);
                                        }
                                        status.reason = reason.clone();
                                        Ok(true)
                                    })
                                    .await;
                            });
                        }
                    }
                }
            }
        }
        let commits = decisions
            .into_iter()
            .filter(|(_, host, _)| !host.is_empty())
            .map(|(vm_id, host_id, relieved)| {
                let c = c.clone();
                async move {
                    let result = c
                        .update_vm(&vm_id, |vm| {
                            let status = vm.status.get_or_insert_with(Default::default);
                            if !status.host_id.is_empty()
                                || status.desired_state() == DesiredState::Stopped
                            {
                                return Ok(false);
                            }
                            status.host_id = host_id.clone();
                            status.phase = VmPhase::Scheduled as i32;
                            status.reason = format!("placed on host {host_id}");
                            status.phase_changed_at = Some(ts());
                            Ok(true)
                        })
                        .await;
                    match result {
                        Ok(vm) if vm.status.as_ref().is_some_and(|s| s.host_id == host_id) => {
                            if relieved {
                                memory_relief::placed_while_waiting(&c, &vm_id, &host_id);
                            }
                            c.events.vm(
                                EventKind::VmScheduled,
                                &vm_id,
                                &host_id,
                                "",
                                format!("placed on host {host_id}"),
                            );
                        }
                        _ => {
                            // Not placed after all (deleted, stopped, or a store failure):
                            // give back what the decision counted.
                            c.placer().release(&vm_id);
                        }
                    }
                }
            });
        futures::future::join_all(commits).await;
    }
}
