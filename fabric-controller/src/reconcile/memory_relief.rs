//! The reconciler's memory relief: carries out what [`crate::scheduler::memory_relief`]
//! decides, one move in flight per host.
//!
//! A move is "stop here and start there" (live migration comes later): the VM is marked in
//! `Model::relieving`, so its source's assignments say stop; once the source's agent reports it
//! stopped, it is placed on the chosen destination if the VM still passes the filters there and
//! its want still fits the destination's room, else placed as usual on any host but the source.
//! If none takes it, it waits PENDING and ordinary placement keeps it off the source
//! ([`placement_avoids`]) until it is placed or has waited a relief window: putting it straight
//! back on the host it was moved off for want of memory would undo the move. The move is in
//! flight until the VM runs on its new host and that host's balancer counts it (or it has
//! waited the window); then the source must be short for another full window before the next
//! move.
//!
//! Events: VM_EVICTED (reason `MemoryRelief`) when a move starts, naming the source, the
//! destination and the figures; VM_SCHEDULED when the VM is placed; HOST_MEMORY (reason
//! `MemoryReliefBlocked`) when a due host has no possible move, once per distinct reason (such
//! a host is searched again every [`BLOCKED_RETRY`], or every window if that is shorter).
//! HOST_MEMORY `MemoryShort` / `MemoryFits` come from the heartbeats (`crate::hostlink`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_proto::v1::{DesiredState, EventKind, ObservedPhase, Vm, VmPhase};

use super::{ts, Reconciler};
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

/// The host ordinary placement must not put `vm_id` on: the source of its relief move while
/// it waits for a host (see the module docs). `window` is the relief window.
pub(super) fn placement_avoids<'m>(
    model: &'m Model,
    vm_id: &str,
    window: Duration,
    now: Instant,
) -> Option<&'m str> {
    let m = model.relieving.get(vm_id)?;
    let waiting = m
        .waiting_since
        .is_some_and(|since| now.saturating_duration_since(since) < window);
    (waiting && m.placed_on.is_none()).then_some(m.source.as_str())
}

/// Notes where ordinary placement put a VM that waited after a relief move, so that the move
/// stays in flight until the VM runs there.
pub(super) fn placed_while_waiting(c: &Controller, vm_id: &str, host_id: &str) {
    if let Some(m) = c.model().relieving.get_mut(vm_id) {
        if m.waiting_since.is_some() && m.placed_on.is_none() {
            m.waiting_since = None;
            m.placed_on = Some(host_id.to_string());
        }
    }
}

/// Memory promised to `host_id` by moves in flight that its report does not count yet.
fn incoming_mib(model: &Model, host_id: &str, except_vm: Option<&str>) -> u64 {
    model
        .relieving
        .iter()
        .filter(|(vm_id, _)| Some(vm_id.as_str()) != except_vm)
        // A VM waiting for any host is promised to none.
        .filter(|(_, m)| m.waiting_since.is_none())
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
    /// left its source some other way (deleted, stopped, its host died), or waited a window
    /// without any other host taking it.
    pub(super) fn finish_relief_moves(&mut self, c: &Controller) {
        let now = Instant::now();
        let window = c.settings.memory_relief_window;
        let mut model = c.model();
        if model.relieving.is_empty() {
            return;
        }
        let finished: Vec<String> = model
            .relieving
            .iter()
            .filter(|(vm_id, m)| {
                let status = model
                    .vms
                    .get(*vm_id)
                    .and_then(|e| e.vm.status.clone())
                    .unwrap_or_default();
                let host = status.host_id.as_str();
                let in_flight = if host == m.source {
                    true
                } else if host.is_empty() {
                    status.desired_state() != DesiredState::Stopped
                        && placement_avoids(&model, vm_id, window, now).is_some()
                } else if m.placed_on.as_deref() == Some(host) {
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
                // Its constraint is gone: it may fit where it did not.
                self.backoff.remove(&vm_id);
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
                waiting_since: None,
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
            "moved off host {source_label} for memory relief; host {planned_label} {why}: waiting for placement (not on {source_label})"
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
    let waiting = result.as_ref().is_ok_and(|vm| {
        vm.status
            .as_ref()
            .is_some_and(|s| s.host_id.is_empty() && s.desired_state() != DesiredState::Stopped)
    });
    if let Some(m) = c.model().relieving.get_mut(vm_id) {
        m.placed_on = placed.clone();
        m.waiting_since = waiting.then(Instant::now);
    }
    if let Some(host) = placed {
        c.events
            .vm(EventKind::VmScheduled, vm_id, &host, "MemoryRelief", reason);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{balance, observed, plain, running_with_memory, Harness};
    use fabric_proto::v1::{HostState, MemorySpec};

    const WINDOW: Duration = Duration::from_secs(30);

    /// `host` has counted as short since `ago`.
    fn short_since(h: &Harness, host_id: &str, ago: Duration) {
        let since = Instant::now()
            .checked_sub(ago)
            .expect("the machine is up longer");
        let mut model = h.c.model();
        model
            .hosts
            .get_mut(host_id)
            .expect("host")
            .live
            .memory_short_since = Some(since);
    }

    /// A source short of memory for two windows, whose one VM (wanting 600 MiB) relief moves
    /// to the only other host; that host is cordoned before the VM has stopped, so when it
    /// has, no host but the source would take it. Returns the harness, the source, the
    /// destination and the VM.
    async fn a_move_whose_destination_closed() -> (Harness, String, String, String) {
        let mut h = Harness::new(WINDOW).await;
        let source = h.add_host("source", 0).await;
        let destination = h.add_host("destination", 1).await;
        let vm = h
            .create_vm(
                "mover",
                MemorySpec {
                    startup_mib: 512,
                    minimum_mib: 256,
                    maximum_mib: 2048,
                    ..Default::default()
                },
            )
            .await;
        h.place_on(&source).await;
        let running = vec![running_with_memory(&h.vm(&vm), 600, 500)];
        h.heartbeat(&source, running, Some(balance(1000, 1400)))
            .await;
        h.heartbeat(&destination, vec![], Some(balance(4000, 0)))
            .await;
        short_since(&h, &source, 2 * WINDOW);
        h.pass().await;
        assert!(
            h.c.model().relieving.contains_key(&vm) && !h.told_to_run(&vm),
            "the move started: {:?}",
            h.events()
        );

        h.set_host(&destination, HostState::Cordoned).await;
        let stopped = vec![observed(&h.vm(&vm), ObservedPhase::Stopped)];
        h.heartbeat(&source, stopped, Some(balance(1000, 800)))
            .await;
        h.pass().await;
        (h, source, destination, vm)
    }

    /// A VM moved off a short host whose destination closed waits PENDING rather than go
    /// back to the host it was moved off; when another host opens, it goes there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_moved_vm_waits_for_another_host_rather_than_return_to_its_source() {
        let (mut h, source, destination, vm) = a_move_whose_destination_closed().await;
        for _ in 0..3 {
            let status = h.vm(&vm).status.unwrap_or_default();
            assert_eq!(
                (status.host_id.as_str(), status.phase()),
                ("", VmPhase::Pending),
                "{status:?}"
            );
            assert!(
                status.reason.contains("refuses it (cordoned)")
                    && status
                        .reason
                        .contains("waiting for placement (not on source"),
                "{}",
                status.reason
            );
            h.pass().await;
        }

        h.set_host(&destination, HostState::Ready).await;
        h.pass().await;
        assert_eq!(h.host_of(&vm), destination);
        let running = vec![running_with_memory(&h.vm(&vm), 600, 500)];
        h.heartbeat(&destination, running, Some(balance(4000, 600)))
            .await;
        h.pass().await;
        assert!(
            h.c.model().relieving.is_empty(),
            "the move is over once the VM runs on its new host"
        );
        let scheduled: Vec<String> = h
            .events()
            .iter()
            .filter(|e| e.kind() == EventKind::VmScheduled && e.vm_id == vm)
            .map(|e| e.host_id.clone())
            .collect();
        assert_eq!(
            scheduled,
            [source, destination],
            "first placement, then the move"
        );
    }

    /// The source is avoided for one window: a VM no other host takes in that time is placed
    /// as usual, on its source if that is the only host left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_window_of_waiting_ordinary_placement_may_use_the_source() {
        let (mut h, source, _destination, vm) = a_move_whose_destination_closed().await;
        assert_eq!(h.host_of(&vm), "");
        {
            let mut model = h.c.model();
            let m = model.relieving.get_mut(&vm).expect("still moving");
            m.waiting_since = Instant::now().checked_sub(WINDOW);
        }
        h.pass().await;
        assert_eq!(h.host_of(&vm), source);
        assert!(h.c.model().relieving.is_empty());
    }
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
        // The heartbeat records phase changes on a task of its own: wait for them, so that
        // their events are counted before, not after.
        let deadline = Instant::now() + Duration::from_secs(10);
        while [0, 1, 2, 4].iter().any(|&i| {
            h.vm(&ids[i]).status.unwrap_or_default().phase() != fabric_proto::v1::VmPhase::Running
        }) {
            assert!(
                Instant::now() < deadline,
                "the reported phases were not recorded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Meanwhile: a StopVm, a drain's mark, and a move already under way.
        h.c.set_desired(&ids[1], DesiredState::Stopped, None)
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
                    waiting_since: None,
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
