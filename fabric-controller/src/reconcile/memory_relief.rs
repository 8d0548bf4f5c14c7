//! The reconciler's memory relief: carries out what [`crate::scheduler::memory_relief`]
//! decides, one move in flight per host.
//!
//! A move is "stop here and start there" (live migration comes later): the VM is marked in
//! `Model::relieving`, so its source's assignments say stop; once the source's agent reports it
//! stopped, it is placed on the chosen destination if the VM still passes the filters there and
//! its want still fits the destination's room, else placed as usual on any host but the source
//! (and, if none takes it, left PENDING for ordinary placement). The move is in flight until
//! the VM runs on its new host and that host's balancer counts it; then the source must be
//! short for another full window before the next move.
//!
//! Events: VM_EVICTED (reason `MemoryRelief`) when a move starts, naming the source, the
//! destination and the figures; VM_SCHEDULED when the VM is placed; HOST_MEMORY (reason
//! `MemoryReliefBlocked`) when a due host has no possible move, once per distinct reason (such
//! a host is searched again every [`BLOCKED_RETRY`], or every window if that is shorter).
//! HOST_MEMORY `MemoryShort` / `MemoryFits` come from the heartbeats (`crate::hostlink`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fabric_proto::v1::{DesiredState, EventKind, ObservedPhase, Vm, VmPhase};

use super::Reconciler;
use crate::controller::{effective_state, Controller, Model, ReliefInFlight};
use crate::placement;
use crate::scheduler::memory_relief::{
    plan_relief, HostMemory, MemoryReport, MovableVm, ReliefDecision, ReliefMove,
};

/// A host for which relief found no move is searched again after this long (or the window,
/// if shorter): the search is cheap when room is what blocks it, but a host blocked by the
/// filters (zones, spread, cordons) has its VMs judged on every host with room each time.
const BLOCKED_RETRY: Duration = Duration::from_secs(5);

/// What the reconciler remembers about relief between passes.
#[derive(Default)]
pub(super) struct ReliefMemory {
    /// When the last move off each host completed.
    done: HashMap<String, Instant>,
    /// Per host without a possible move: the reason last announced, and when to search again.
    blocked: HashMap<String, (String, Instant)>,
}

fn ts() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// `name (id)` of a host, or its id when unknown.
fn host_label(model: &Model, host_id: &str) -> String {
    match model.hosts.get(host_id) {
        Some(h) => format!("{} ({host_id})", h.host.name),
        None => host_id.to_string(),
    }
}

fn vm_name(vm: &Vm) -> String {
    vm.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
}

/// The VM is on `host_id`, running there, and that host's balancer has accounted for it (or
/// the host has no balancer to wait for).
fn settled_on(model: &Model, vm_id: &str, host_id: &str) -> bool {
    let Some(host) = model.hosts.get(host_id) else {
        return false;
    };
    let Some(observed) = host.live.observed.get(vm_id) else {
        return false;
    };
    let balancer_runs = host.live.usage.is_some_and(|u| u.memory_balance.is_some());
    match observed.phase() {
        ObservedPhase::Running => observed.memory_balance.is_some() || !balancer_runs,
        // It will not run there: the move is over either way.
        ObservedPhase::Failed => true,
        _ => false,
    }
}

/// Memory promised to `host_id` by moves in flight that its report does not count yet.
fn incoming_mib(model: &Model, host_id: &str, except_vm: Option<&str>) -> u64 {
    model
        .relieving
        .iter()
        .filter(|(vm_id, _)| Some(vm_id.as_str()) != except_vm)
        .filter(|(_, m)| m.placed_on.as_deref().unwrap_or(&m.destination) == host_id)
        .map(|(_, m)| m.wanted_mib)
        .fold(0, u64::saturating_add)
}

fn room_mib(model: &Model, host_id: &str) -> Option<u64> {
    let balance = model.hosts.get(host_id)?.live.usage?.memory_balance?;
    Some(balance.budget_mib.saturating_sub(balance.wanted_mib))
}

impl Reconciler {
    /// Ends the moves that are over: the VM runs on its new host (and is counted there), or
    /// left its source some other way (deleted, stopped, its host died, nothing took it).
    pub(super) fn finish_relief_moves(&mut self, c: &Controller) {
        let now = Instant::now();
        let mut model = c.model();
        if model.relieving.is_empty() {
            return;
        }
        let finished: Vec<String> = model
            .relieving
            .iter()
            .filter(|(vm_id, m)| {
                let host = model
                    .vms
                    .get(*vm_id)
                    .and_then(|e| e.vm.status.as_ref())
                    .map(|s| s.host_id.as_str())
                    .unwrap_or("");
                let in_flight = if host == m.source {
                    true
                } else if !host.is_empty() && m.placed_on.as_deref() == Some(host) {
                    !settled_on(&model, vm_id, host)
                } else {
                    false
                };
                !in_flight
            })
            .map(|(vm_id, _)| vm_id.clone())
            .collect();
        for vm_id in finished {
            if let Some(m) = model.relieving.remove(&vm_id) {
                tracing::info!(vm = %vm_id, source = %m.source, placed_on = ?m.placed_on, "memory relief move finished");
                self.relief.done.insert(m.source, now);
            }
        }
    }

    /// Starts the moves the relief policy decides on now.
    pub(super) async fn relieve_memory(&mut self, c: &Arc<Controller>) {
        let window = c.settings.memory_relief_window;
        if window.is_zero() {
            return;
        }
        let now = Instant::now();
        let hosts = {
            let model = c.model();
            // Hosts no longer short may be announced again when they are blocked next time.
            self.relief.blocked.retain(|id, _| {
                model
                    .hosts
                    .get(id)
                    .is_some_and(|h| h.live.memory_short_since.is_some())
            });
            let possibly_due: Vec<&String> = model
                .hosts
                .iter()
                .filter(|(_, h)| {
                    h.live
                        .memory_short_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= window)
                })
                .map(|(id, _)| id)
                .collect();
            if possibly_due.is_empty() {
                return;
            }
            let mut movable: HashMap<&str, Vec<MovableVm>> = possibly_due
                .iter()
                .map(|id| (id.as_str(), Vec::new()))
                .collect();
            for entry in model.vms.values() {
                let Some(status) = &entry.vm.status else {
                    continue;
                };
                let Some(list) = movable.get_mut(status.host_id.as_str()) else {
                    continue;
                };
                if status.desired_state() == DesiredState::Stopped
                    || model.evicting.contains(&entry.vm.id)
                    || model.relieving.contains_key(&entry.vm.id)
                {
                    continue;
                }
                let observed = model
                    .hosts
                    .get(&status.host_id)
                    .and_then(|h| h.live.observed.get(&entry.vm.id));
                let Some(observed) = observed else { continue };
                let Some(balance) = &observed.memory_balance else {
                    continue;
                };
                if observed.phase() != ObservedPhase::Running {
                    continue;
                }
                let memory = entry
                    .vm
                    .spec
                    .as_ref()
                    .and_then(|s| s.memory)
                    .unwrap_or_default();
                list.push(MovableVm {
                    vm_id: entry.vm.id.clone(),
                    name: vm_name(&entry.vm),
                    demand: placement::demand(&entry.vm),
                    buffer_percent: u64::from(memory.buffer_percent),
                    target_mib: balance.target_mib,
                    demand_mib: balance.demand_mib,
                });
            }
            model
                .hosts
                .iter()
                .map(|(id, h)| HostMemory {
                    host_id: id.clone(),
                    state: placement::host_state(effective_state(&c.settings, h)),
                    report: h
                        .live
                        .usage
                        .and_then(|u| u.memory_balance)
                        .map(|b| MemoryReport {
                            budget_mib: b.budget_mib,
                            wanted_mib: b.wanted_mib,
                            short: b.short,
                        }),
                    short_since: h.live.memory_short_since,
                    last_relief_done: self.relief.done.get(id).copied(),
                    relief_in_flight: model.relieving.values().any(|m| m.source == *id),
                    retry_at: self.relief.blocked.get(id).map(|(_, at)| *at),
                    incoming_mib: incoming_mib(&model, id, None),
                    vms: movable.remove(id.as_str()).unwrap_or_default(),
                })
                .collect::<Vec<_>>()
        };
        let plan = {
            let mut placer = c.placer();
            plan_relief(&hosts, window, now, placer.scheduler_mut())
        };
        tracing::debug!(
            decisions = plan.decisions.len(),
            hosts_judged = plan.hosts_judged,
            "memory relief planned"
        );
        for decision in plan.decisions {
            match decision {
                ReliefDecision::Move(m) => self.start_move(c, m),
                ReliefDecision::NoDestination {
                    host_id,
                    short_for,
                    reason,
                } => {
                    let retry_at = now + BLOCKED_RETRY.min(window);
                    let announced = self
                        .relief
                        .blocked
                        .insert(host_id.clone(), (reason.clone(), retry_at));
                    if announced.is_some_and(|(before, _)| before == reason) {
                        continue;
                    }
                    let host = host_label(&c.model(), &host_id);
                    tracing::warn!(host = %host_id, %reason, "memory relief: no VM can move");
                    c.events.host_memory(
                        &host_id,
                        "MemoryReliefBlocked",
                        format!(
                            "host {host} has been short of memory for {:.0} s, but no VM can move: {reason}",
                            short_for.as_secs_f64()
                        ),
                    );
                }
            }
        }
    }

    /// Marks the VM as moving (its source's assignments now say stop) and says why, if it is
    /// still what the plan saw: on the source, wanted and observed running there, and not
    /// already leaving (a drain, another move). The plan was made from a snapshot; a StopVm or
    /// a drain may have committed since, and such a VM must get no relief move or event.
    fn start_move(&mut self, c: &Controller, m: ReliefMove) {
        let mut model = c.model();
        let Some(vm) = model.vms.get(&m.vm_id).map(|e| e.vm.clone()) else {
            return;
        };
        let status = vm.status.clone().unwrap_or_default();
        let running_on_source = model
            .hosts
            .get(&m.source)
            .and_then(|h| h.live.observed.get(&m.vm_id))
            .is_some_and(|o| o.phase() == ObservedPhase::Running);
        let movable = status.host_id == m.source
            && status.desired_state() == DesiredState::Running
            && running_on_source
            && !model.evicting.contains(&m.vm_id)
            && !model.relieving.contains_key(&m.vm_id);
        if !movable {
            tracing::debug!(vm = %m.vm_id, source = %m.source, "memory relief: the VM changed since the plan; not moved");
            return;
        }
        model.relieving.insert(
            m.vm_id.clone(),
            ReliefInFlight {
                source: m.source.clone(),
                destination: m.destination.clone(),
                placed_on: None,
                wanted_mib: m.vm_wanted_mib,
            },
        );
        if let Some(host) = model.hosts.get(&m.source) {
            host.live.assignments.send_modify(|v| *v += 1);
        }
        let source = host_label(&model, &m.source);
        let destination = host_label(&model, &m.destination);
        drop(model);
        self.relief.blocked.remove(&m.source);
        let name = vm_name(&vm);
        let enough = if m.covers_excess() {
            "enough to end the shortage"
        } else {
            "the most any VM there gives, not enough alone"
        };
        let message = format!(
            "VM {name} moves off host {source}, short of memory for {:.0} s (its VMs want {} MiB of a {} MiB budget: {} MiB too much), to host {destination} with {} MiB of room: the VM wants {} MiB, {enough}; stopping it on {source} first",
            m.short_for.as_secs_f64(),
            m.source_wanted_mib,
            m.source_budget_mib,
            m.excess_mib,
            m.destination_room_mib,
            m.vm_wanted_mib,
        );
        tracing::info!(vm = %m.vm_id, source = %m.source, destination = %m.destination, wanted_mib = m.vm_wanted_mib, excess_mib = m.excess_mib, "memory relief: moving a VM");
        c.events.vm(
            EventKind::VmEvicted,
            &m.vm_id,
            &m.source,
            "MemoryRelief",
            message,
        );
    }
}

/// Places VMs that stopped on the host they are being moved off (see the module docs).
pub(super) async fn place_relieved(c: &Arc<Controller>, stopped: Vec<(String, String)>) {
    for (vm_id, source) in stopped {
        place_one(c, &vm_id, &source).await;
    }
}

async fn place_one(c: &Arc<Controller>, vm_id: &str, source: &str) {
    let (vm, planned, room, wanted) = {
        let model = c.model();
        let (Some(entry), Some(m)) = (model.vms.get(vm_id), model.relieving.get(vm_id)) else {
            return;
        };
        let room = room_mib(&model, &m.destination)
            .map(|r| r.saturating_sub(incoming_mib(&model, &m.destination, Some(vm_id))));
        (entry.vm.clone(), m.destination.clone(), room, m.wanted_mib)
    };
    // Where it goes now: the chosen host if it still fits, else anywhere but the source.
    let (target, detour) = {
        let mut placer = c.placer();
        let scheduler = placer.scheduler_mut();
        let demand = placement::demand(&vm);
        // Judged as the plan judged it: among the source and the chosen host.
        let verdict = scheduler
            .explain_move_among(vm_id, &demand, [planned.as_str(), source])
            .into_iter()
            .find(|v| v.host_id == planned)
            .map(|v| v.rejected_by);
        let refusal = match (verdict, room) {
            (None, _) => Some("is gone".to_string()),
            (Some(Some(reason)), _) => Some(format!("refuses it ({reason})")),
            (Some(None), None) => Some("no longer reports its memory".to_string()),
            (Some(None), Some(room)) if room < wanted => Some(format!(
                "has {room} MiB of room left, the VM wants {wanted} MiB"
            )),
            (Some(None), Some(_)) => None,
        };
        match refusal {
            None => (Some(planned.clone()), None),
            Some(refusal) => match scheduler.place_elsewhere(vm_id, &demand, source) {
                Ok(decision) => (Some(decision.host_id), Some(refusal)),
                Err(unplaceable) => (None, Some(format!("{refusal}; {unplaceable}"))),
            },
        }
    };
    let (source_label, planned_label, target_label) = {
        let model = c.model();
        (
            host_label(&model, source),
            host_label(&model, &planned),
            target.as_deref().map(|t| host_label(&model, t)),
        )
    };
    let reason = match (&target_label, &detour) {
        (Some(t), None) => format!("placed on host {t}: moved off host {source_label} for memory relief"),
        (Some(t), Some(why)) => format!(
            "placed on host {t}: moved off host {source_label} for memory relief (host {planned_label} {why})"
        ),
        (None, Some(why)) => format!(
            "moved off host {source_label} for memory relief; host {planned_label} {why}: waiting for placement"
        ),
        (None, None) => format!("moved off host {source_label} for memory relief"),
    };
    let result = c
        .update_vm(vm_id, |vm| {
            let status = vm.status.get_or_insert_with(Default::default);
            if status.host_id != source {
                return Ok(false);
            }
            if status.desired_state() == DesiredState::Stopped {
                status.host_id.clear();
                status.phase = VmPhase::Stopped as i32;
                status.reason = "stopped".into();
            } else if let Some(target) = &target {
                status.host_id = target.clone();
                status.phase = VmPhase::Scheduled as i32;
                status.reason = reason.clone();
            } else {
                status.host_id.clear();
                status.phase = VmPhase::Pending as i32;
                status.reason = reason.clone();
            }
            status.phase_changed_at = Some(ts());
            Ok(true)
        })
        .await;
    let placed = match &result {
        Ok(vm) => vm
            .status
            .as_ref()
            .map(|s| s.host_id.clone())
            .filter(|h| !h.is_empty() && h != source),
        Err(e) => {
            tracing::warn!(vm = %vm_id, error = %e.message(), "memory relief: cannot place a moved VM");
            return;
        }
    };
    if let Some(m) = c.model().relieving.get_mut(vm_id) {
        m.placed_on = placed.clone();
    }
    if let Some(host) = placed {
        c.events
            .vm(EventKind::VmScheduled, vm_id, &host, "MemoryRelief", reason);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{observed, plain, Harness};
    use super::*;

    /// A move of `vm_id` from `source` to `destination` as a plan would decide it.
    fn planned(vm_id: &str, source: &str, destination: &str) -> ReliefMove {
        ReliefMove {
            vm_id: vm_id.to_string(),
            source: source.to_string(),
            destination: destination.to_string(),
            vm_wanted_mib: 600,
            source_budget_mib: 2000,
            source_wanted_mib: 2400,
            excess_mib: 400,
            destination_room_mib: 3000,
            short_for: Duration::from_secs(30),
        }
    }

    /// The plan is made from a snapshot; by the time a move starts, the VM may have been
    /// stopped, caught by a drain or be running no longer: such a VM gets no move and no
    /// event, and its host's assignments stay as they were.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_starts_only_for_a_vm_still_wanted_and_running_on_its_source() {
        let mut h = Harness::new(Duration::from_secs(30)).await;
        let source = h.add_host("source", 0).await;
        let destination = h.add_host("destination", 1).await;
        let names = ["moves", "stopped", "drained", "rebooting", "moved-already"];
        let mut ids = Vec::new();
        for name in names {
            ids.push(h.create_vm(name, plain()).await);
        }
        h.place_on(&source).await;
        let vms: Vec<Vm> = ids.iter().map(|id| h.vm(id)).collect();
        let mut report: Vec<_> = vms
            .iter()
            .map(|vm| observed(vm, ObservedPhase::Running))
            .collect();
        report[3].phase = ObservedPhase::Starting as i32;
        h.heartbeat(&source, report, None).await;
        // Meanwhile: a StopVm, a drain's mark, and a move already under way.
        h.c.set_desired(&ids[1], DesiredState::Stopped)
            .await
            .expect("stop");
        h.c.model().evicting.insert(ids[2].clone());
        h.reconciler
            .start_move(&h.c, planned(&ids[4], &source, &destination));
        let before = h.events().len();

        for id in &ids[1..] {
            h.reconciler
                .start_move(&h.c, planned(id, &source, &destination));
        }
        let after_refused = h.events();
        assert_eq!(
            after_refused.len(),
            before,
            "events for VMs that must not move: {:?}",
            &after_refused[before..]
        );
        h.reconciler
            .start_move(&h.c, planned(&ids[0], &source, &destination));

        let relieving: Vec<String> = {
            let model = h.c.model();
            let mut ids: Vec<String> = model.relieving.keys().cloned().collect();
            ids.sort();
            ids
        };
        let mut expected = vec![ids[0].clone(), ids[4].clone()];
        expected.sort();
        assert_eq!(relieving, expected);
        let evicted: Vec<String> = h.events()[before..]
            .iter()
            .filter(|e| e.kind() == EventKind::VmEvicted)
            .map(|e| e.vm_id.clone())
            .collect();
        assert_eq!(evicted, [ids[0].clone()]);
        assert!(!h.told_to_run(&ids[0]), "the mover is told to stop");
        assert!(h.told_to_run(&ids[3]), "the rebooting VM was told to stop");
    }

    #[test]
    fn memory_promised_to_a_host_adds_up_without_overflow() {
        let mut model = Model::default();
        for (vm, destination, placed_on) in [
            ("a", "d", None),
            ("b", "other", Some("d")),
            ("c", "d", Some("other")),
        ] {
            model.relieving.insert(
                vm.to_string(),
                ReliefInFlight {
                    source: "s".to_string(),
                    destination: destination.to_string(),
                    placed_on: placed_on.map(str::to_string),
                    wanted_mib: u64::MAX / 2 + 1,
                },
            );
        }
        // a is headed for d, b was placed there; c was placed elsewhere after all.
        assert_eq!(incoming_mib(&model, "d", None), u64::MAX);
        assert_eq!(incoming_mib(&model, "d", Some("a")), u64::MAX / 2 + 1);
        assert_eq!(incoming_mib(&model, "nowhere", None), 0);
    }
}
