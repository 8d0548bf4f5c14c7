//! The HostLink service: agents register, renew their lease with heartbeats (reporting what
//! they observe), and follow their assignments.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_proto::v1::host_link_server::HostLink;
use fabric_proto::v1::{
    AssignmentUpdate, DesiredState, EventKind, HeartbeatRequest, HeartbeatResponse, Host,
    HostState, RegisterHostRequest, RegisterHostResponse, VmPhase, WatchAssignmentsRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::controller::{
    derived_phase, effective_state, new_id, placement_state, Controller, HostEntry, HostLive,
};

pub struct HostLinkService {
    controller: Arc<Controller>,
}

impl HostLinkService {
    pub fn new(controller: Arc<Controller>) -> HostLinkService {
        HostLinkService { controller }
    }
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn check_register(req: &RegisterHostRequest) -> Result<(), Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if req.machine_id.is_empty() || req.machine_id.len() > 128 {
        return bad("machine_id: required, at most 128 characters".into());
    }
    crate::validate::check_host_name(&req.name).map_err(Status::invalid_argument)?;
    if req.zone.len() > 63 {
        return bad("zone: at most 63 characters".into());
    }
    if req.labels.len() > 64 {
        return bad("labels: at most 64".into());
    }
    for (key, value) in &req.labels {
        crate::validate::check_label("labels", key, value).map_err(Status::invalid_argument)?;
    }
    if req.agent_address.len() > 255 || req.agent_version.len() > 64 {
        return bad("agent_address: at most 255 characters; agent_version: at most 64".into());
    }
    if req.boot_id.len() > 64 {
        return bad("boot_id: at most 64 characters".into());
    }
    let (Some(capacity), Some(allocatable)) = (req.capacity, req.allocatable) else {
        return bad("capacity and allocatable: required".into());
    };
    if allocatable.cpus > capacity.cpus
        || allocatable.memory_mib > capacity.memory_mib
        || allocatable.disk_mib > capacity.disk_mib
    {
        return bad(format!(
            "allocatable ({} CPUs, {} MiB memory, {} MiB disk) exceeds capacity ({} CPUs, {} MiB memory, {} MiB disk)",
            allocatable.cpus,
            allocatable.memory_mib,
            allocatable.disk_mib,
            capacity.cpus,
            capacity.memory_mib,
            capacity.disk_mib
        ));
    }
    Ok(())
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<AssignmentUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl HostLink for HostLinkService {
    async fn register_host(
        &self,
        request: Request<RegisterHostRequest>,
    ) -> Result<Response<RegisterHostResponse>, Status> {
        let caller = fabric_proto::tls::caller(&request)?;
        let req = request.into_inner();
        check_register(&req)?;
        self.controller
            .check_host(&caller, &req.name, "/fabric.v1.HostLink/RegisterHost")?;
        let c = &self.controller;
        let settings = &c.settings;
        let _registering = c.registering.lock().await;
        if let Some(taken) = c.host_name_taken(&req.machine_id, &req.name) {
            tracing::warn!(
                machine = %req.machine_id,
                name = %req.name,
                reason = taken.message(),
                "registration refused"
            );
            return Err(taken);
        }
        let existing = c.model().machines.get(&req.machine_id).cloned();
        // The record of this machine is the certificate's only if it carries the
        // certificate's name: host b's certificate presenting a's machine id must not rename
        // a's record to b and take its VMs (a rename is root's, on the Unix socket).
        if let Some(id) = &existing {
            let current = c.model().hosts.get(id).map(|e| e.host.name.clone());
            if let Some(current) = current.filter(|name| *name != req.name) {
                c.check_host(&caller, &current, "/fabric.v1.HostLink/RegisterHost")?;
            }
        }
        let host_id = match existing {
            Some(id) => id,
            None => {
                let id = new_id("host");
                c.put_machine(&req.machine_id, &id).await?;
                c.model()
                    .machines
                    .insert(req.machine_id.clone(), id.clone());
                id
            }
        };
        let labels: HashMap<String, String> = req.labels.clone();
        loop {
            let current = {
                let model = c.model();
                model
                    .hosts
                    .get(&host_id)
                    .map(|e| (e.host.clone(), e.rev, effective_state(settings, e)))
            };
            let (mut host, rev, was) = match current {
                Some((host, rev, state)) => (host, Some(rev), Some(state)),
                None => (
                    Host {
                        id: host_id.clone(),
                        state: HostState::Ready as i32,
                        registered_at: Some(prost_types::Timestamp::from(
                            fabric_proto::clock::now(),
                        )),
                        ..Default::default()
                    },
                    None,
                    None,
                ),
            };
            host.name = req.name.clone();
            host.zone = req.zone.clone();
            host.fault_domain = req.fault_domain;
            host.update_domain = req.update_domain;
            host.capacity = req.capacity;
            host.allocatable = req.allocatable;
            host.labels = labels.clone();
            host.agent_address = req.agent_address.clone();
            // One live session per host: this registration supersedes the current session.
            // Unless it shows it continues that session (the same agent's data, after a
            // restart), the machine holding it may be another one presenting the same
            // machine id, still running the VMs until it fences: the new session gets no
            // assignments until that lease has surely run out (decided below, from the lease
            // as it stands when the new session is installed).
            let superseded = host.agent_session;
            // From the same boot too: a clone made from a running machine's disk presents
            // the session file it copied, from another boot (an agent that sends no boot id
            // continues on the session alone, as before).
            let same_boot = req.boot_id == host.agent_boot_id;
            let continues =
                rev.is_some() && req.previous_session == superseded && superseded != 0 && same_boot;
            host.agent_session = superseded + 1;
            host.agent_boot_id = req.boot_id.clone();
            if rev.is_some() && !continues {
                host.agent_session_held = true;
            }
            let new_rev = match c.put_host(host.clone(), rev).await {
                Ok(rev) => rev,
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                Err(s) => return Err(s),
            };
            let now = Instant::now();
            // How long the new session is held, when it superseded another: for the event.
            let mut held_for: Option<Duration> = None;
            let state = {
                let mut model = c.model();
                let live_lease = now + settings.lease_ttl;
                match model.hosts.get_mut(&host_id) {
                    Some(entry) => {
                        // Covers a heartbeat of the superseded session accepted between the
                        // commit and now: it renewed `lease_expires`.
                        let old_lease_out = entry.live.lease_expires + settings.fencing_margin;
                        let held_until = match entry.live.assignments_held_until {
                            Some(t) if t > now => Some(t),
                            _ => None,
                        };
                        entry.live.assignments_held_until = if continues {
                            held_until
                        } else {
                            held_until.max(Some(old_lease_out).filter(|t| *t > now))
                        };
                        if superseded != 0 && !continues {
                            held_for = Some(
                                entry
                                    .live
                                    .assignments_held_until
                                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                            );
                            tracing::warn!(
                                host = %host_id,
                                machine = %req.machine_id,
                                name = %req.name,
                                superseded,
                                session = host.agent_session,
                                held_ms = entry
                                    .live
                                    .assignments_held_until
                                    .map_or(0, |t| t.saturating_duration_since(now).as_millis() as u64),
                                "a new agent session supersedes the host's previous one (an agent \
                                 restarted without its data, or another machine presents the same \
                                 machine id); the previous session is refused from now on"
                            );
                        }
                        entry.host = host.clone();
                        entry.rev = new_rev;
                        entry.live.lease_expires = live_lease;
                        entry.live.last_heartbeat = now;
                        entry.live.last_heartbeat_wall = fabric_proto::clock::now();
                        entry.live.observed.clear();
                        // Stops acknowledged in an earlier session say nothing about what this
                        // one runs (a restarted agent re-adopts VMMs that were still stopping):
                        // a VM absent from its reports counts as stopped only once this
                        // session has been sent the stop and acknowledged it.
                        entry.live.stop_sent.clear();
                        entry.live.assignments.send_modify(|v| *v += 1);
                    }
                    None => {
                        model.hosts.insert(
                            host_id.clone(),
                            HostEntry {
                                host: host.clone(),
                                rev: new_rev,
                                live: HostLive::new(now, settings.lease_ttl),
                            },
                        );
                    }
                }
                let entry = &model.hosts[&host_id];
                let state = placement_state(settings, entry);
                c.placer().sync_host(&entry.host, state);
                state
            };
            c.events.emit(fabric_proto::v1::Event {
                kind: EventKind::HostRegistered as i32,
                host_id: host_id.clone(),
                host_state: state as i32,
                message: format!(
                    "host {} registered ({} CPUs, {} MiB allocatable){}{}",
                    req.name,
                    req.allocatable.map(|r| r.cpus).unwrap_or(0),
                    req.allocatable.map(|r| r.memory_mib).unwrap_or(0),
                    if was == Some(HostState::Dead) {
                        " after being declared dead"
                    } else {
                        ""
                    },
                    match held_for {
                        Some(held) => format!(
                            ": agent session {} supersedes session {superseded} (an agent \
                             restarted without its data, or another machine with machine id \
                             {:?}); its VMs start in {:.1} s, once the old session's lease has \
                             surely run out",
                            host.agent_session,
                            req.machine_id,
                            held.as_secs_f64()
                        ),
                        None => String::new(),
                    }
                ),
                ..Default::default()
            });
            c.kick.notify_one();
            tracing::info!(host = %host_id, name = %req.name, "host registered");
            return Ok(Response::new(RegisterHostResponse {
                host_id,
                lease_ttl: Some(duration(settings.lease_ttl)),
                heartbeat_interval: Some(duration(settings.heartbeat_interval)),
                lease_expires_at: Some(prost_types::Timestamp::from(
                    fabric_proto::clock::now() + settings.lease_ttl,
                )),
                session: host.agent_session,
            }));
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = fabric_proto::tls::caller(&request)?;
        let req = request.into_inner();
        let c = &self.controller;
        let settings = &c.settings;
        let now = Instant::now();
        let mut phase_updates = Vec::new();
        let memory_change;
        let host_name;
        {
            let mut model = c.model();
            let entry = model.hosts.get_mut(&req.host_id).ok_or_else(|| {
                Status::not_found(format!("unknown host id {:?}: register", req.host_id))
            })?;
            c.check_host(&caller, &entry.host.name, "/fabric.v1.HostLink/Heartbeat")?;
            if req.session != 0 && req.session != entry.host.agent_session {
                return Err(superseded(
                    &req.host_id,
                    req.session,
                    entry.host.agent_session,
                ));
            }
            if effective_state(settings, entry) == HostState::Dead {
                return Err(Status::failed_precondition(format!(
                    "host {} was declared dead and its VMs were moved: stop every VM and register again",
                    req.host_id
                )));
            }
            entry.live.lease_expires = now + settings.lease_ttl;
            entry.live.last_heartbeat = now;
            entry.live.last_heartbeat_wall = fabric_proto::clock::now();
            entry.live.usage = req.usage;
            memory_change = note_memory_balance(&mut entry.live, now, settings.heartbeat_interval);
            host_name = entry.host.name.clone();
            entry.live.acked_generation = req.assignments_generation;
            let previous = std::mem::take(&mut entry.live.observed);
            entry.live.observed = req
                .vms
                .iter()
                .take(100_000)
                .map(|o| (o.vm_id.clone(), o.clone()))
                .collect();
            let state = effective_state(settings, entry);
            let observed = entry.live.observed.clone();
            let host_id = req.host_id.clone();
            for vm in model.vms.values() {
                let Some(status) = &vm.vm.status else {
                    continue;
                };
                if status.host_id != host_id {
                    continue;
                }
                let seen = observed.get(&vm.vm.id);
                // Only what the agent reports for the VM's current generation counts.
                let (phase, reason) = derived_phase(seen, state);
                if phase != status.phase() || (phase == VmPhase::Failed && reason != status.reason)
                {
                    phase_updates.push((vm.vm.id.clone(), phase, reason));
                }
                if let (Some(now_seen), Some(before)) = (seen, previous.get(&vm.vm.id)) {
                    if now_seen.restart_count > before.restart_count {
                        c.events.vm(
                            EventKind::VmRestarted,
                            &vm.vm.id,
                            &host_id,
                            "",
                            format!(
                                "restarted on its host (restart {}): {}",
                                now_seen.restart_count, now_seen.last_error
                            ),
                        );
                    }
                }
            }
        }
        if let Some((reason, message)) = memory_change {
            tracing::info!(host = %req.host_id, name = %host_name, reason, "{message}");
            c.events
                .host_memory(&req.host_id, reason, format!("host {host_name} {message}"));
            c.kick.notify_one();
        }
        if !phase_updates.is_empty() {
            let controller = c.clone();
            let host_id = req.host_id.clone();
            tokio::spawn(async move {
                for (vm_id, phase, reason) in phase_updates {
                    let host_id = host_id.clone();
                    let result = controller
                        .update_vm(&vm_id, |vm| {
                            let status = vm.status.get_or_insert_with(Default::default);
                            if status.host_id != host_id
                                || (status.phase() == phase && status.reason == reason)
                            {
                                return Ok(false);
                            }
                            status.phase = phase as i32;
                            status.reason = reason.clone();
                            status.phase_changed_at =
                                Some(prost_types::Timestamp::from(fabric_proto::clock::now()));
                            Ok(true)
                        })
                        .await;
                    if let Err(e) = result {
                        if e.code() != tonic::Code::NotFound {
                            tracing::warn!(vm = %vm_id, error = %e.message(), "cannot record a phase change");
                        }
                    }
                }
                controller.kick.notify_one();
            });
        }
        Ok(Response::new(HeartbeatResponse {
            lease_ttl: Some(duration(settings.lease_ttl)),
            lease_expires_at: Some(prost_types::Timestamp::from(
                fabric_proto::clock::now() + settings.lease_ttl,
            )),
        }))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        request: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<AssignmentStream>, Status> {
        let caller = fabric_proto::tls::caller(&request)?;
        let WatchAssignmentsRequest { host_id, session } = request.into_inner();
        let c = self.controller.clone();
        let name = c
            .model()
            .hosts
            .get(&host_id)
            .map(|entry| entry.host.name.clone())
            .ok_or_else(|| Status::not_found(format!("unknown host id {host_id:?}: register")))?;
        c.check_host(&caller, &name, "/fabric.v1.HostLink/WatchAssignments")?;
        let mut notifier = c
            .assignment_notifier(&host_id)
            .ok_or_else(|| Status::not_found(format!("unknown host id {host_id:?}: register")))?;
        c.session_check(&host_id, session)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // What the agent has been sent: vm id -> (generation, desired state).
            let mut sent: HashMap<String, (u64, i32)> = HashMap::new();
            let mut first = true;
            loop {
                notifier.borrow_and_update();
                // Revoked while the stream is open: it ends now (RevokeHost wakes it).
                if c.is_revoked(&name) {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "host/{name}: the identity is revoked"
                        ))))
                        .await;
                    return;
                }
                let (current, hold) = match c.session_check(&host_id, session) {
                    Ok(checked) => checked,
                    Err(status) => {
                        // Superseded: the stream ends, so that the agent learns it at once.
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                // The previous session may still run the VMs (its first set waits), or the
                // host was declared dead and its VMs are being moved off it (nothing is sent
                // until that is done).
                let wait = match hold {
                    Hold::Until(t) if first => Some(Some(t)),
                    Hold::Evicting => Some(None),
                    _ => None,
                };
                if let Some(until) = wait {
                    tokio::select! {
                        _ = sleep_until_some(until) => {}
                        changed = notifier.changed() => if changed.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                if first {
                    c.release_session_hold(&host_id, current).await;
                }
                // Taken before the set is read: a set read later always carries a greater
                // generation than any stop recorded for what an earlier read held.
                let generation = c.next_generation();
                let now = c.assignments(&host_id);
                let update = if first {
                    first = false;
                    sent = now
                        .iter()
                        .map(|a| (a.vm_id.clone(), (a.generation, a.desired_state)))
                        .collect();
                    Some(AssignmentUpdate {
                        generation,
                        full: true,
                        upserts: now,
                        removed_vm_ids: Vec::new(),
                        continued: false,
                    })
                } else {
                    let mut upserts = Vec::new();
                    let mut current = HashMap::new();
                    for a in now {
                        let key = (a.generation, a.desired_state);
                        current.insert(a.vm_id.clone(), key);
                        if sent.get(&a.vm_id) != Some(&key) {
                            upserts.push(a);
                        }
                    }
                    let removed: Vec<String> = sent
                        .keys()
                        .filter(|id| !current.contains_key(*id))
                        .cloned()
                        .collect();
                    sent = current;
                    (!upserts.is_empty() || !removed.is_empty()).then_some(AssignmentUpdate {
                        generation,
                        full: false,
                        upserts,
                        removed_vm_ids: removed,
                        continued: false,
                    })
                };
                if let Some(update) = update {
                    {
                        let mut model = c.model();
                        if let Some(host) = model.hosts.get_mut(&host_id) {
                            for a in &update.upserts {
                                if a.desired_state() == DesiredState::Stopped {
                                    host.live
                                        .stop_sent
                                        .insert(a.vm_id.clone(), update.generation);
                                } else {
                                    // Told to run again: an earlier stop says nothing now.
                                    host.live.stop_sent.remove(&a.vm_id);
                                }
                            }
                        }
                    }
                    for part in into_parts(update, MAX_UPDATE_PART_BYTES) {
                        if tx.send(Ok(part)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    changed = notifier.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn join_host(
        &self,
        request: Request<fabric_proto::v1::JoinHostRequest>,
    ) -> Result<Response<fabric_proto::v1::JoinHostResponse>, Status> {
        let req = request.into_inner();
        let certificate_pem = self
            .controller
            .join_host(&req.token, &req.host_name, &req.csr_pem)
            .await?;
        Ok(Response::new(fabric_proto::v1::JoinHostResponse {
            certificate_pem,
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<fabric_proto::v1::RenewCertificateRequest>,
    ) -> Result<Response<fabric_proto::v1::RenewCertificateResponse>, Status> {
        let caller = fabric_proto::tls::caller(&request)?;
        let req = request.into_inner();
        let certificate_pem = self.controller.renew_certificate(&caller, &req.csr_pem)?;
        Ok(Response::new(fabric_proto::v1::RenewCertificateResponse {
            certificate_pem,
        }))
    }
}

/// The largest message of an assignment stream: a larger update goes in parts
/// (`AssignmentUpdate.continued`), so a host with many VMs never gets a message its agent
/// cannot decode (tonic's default limit is 4 MiB).
pub const MAX_UPDATE_PART_BYTES: usize = 1 << 20;

/// `update` cut into parts of at most `max_bytes` encoded each (one assignment larger than
/// that goes alone), every part but the last marked `continued`, all with its generation.
pub fn into_parts(update: AssignmentUpdate, max_bytes: usize) -> Vec<AssignmentUpdate> {
    use prost::Message;
    if update.encoded_len() <= max_bytes {
        return vec![update];
    }
    let empty = || AssignmentUpdate {
        generation: update.generation,
        full: update.full,
        upserts: Vec::new(),
        removed_vm_ids: Vec::new(),
        continued: true,
    };
    let mut parts = vec![empty()];
    let mut size = 0;
    // Room for the fields every part has, and a field's tag and length.
    let overhead = 32;
    for assignment in update.upserts {
        let len = assignment.encoded_len() + 8;
        if size > 0 && size + len + overhead > max_bytes {
            parts.push(empty());
            size = 0;
        }
        size += len;
        if let Some(part) = parts.last_mut() {
            part.upserts.push(assignment);
        }
    }
    for id in update.removed_vm_ids {
        let len = id.len() + 8;
        if size > 0 && size + len + overhead > max_bytes {
            parts.push(empty());
            size = 0;
        }
        size += len;
        if let Some(part) = parts.last_mut() {
            part.removed_vm_ids.push(id);
        }
    }
    if let Some(last) = parts.last_mut() {
        last.continued = false;
    }
    parts
}

/// The refusal of a superseded session's heartbeat or stream: FAILED_PRECONDITION (an older
/// agent stops its VMs and registers again) marked `fabric-session: superseded` (this one
/// stops its VMs and stays out: another agent holds its machine id).
fn superseded(host_id: &str, session: u64, current: u64) -> Status {
    let mut status = Status::failed_precondition(format!(
        "agent session {session} of host {host_id} was superseded by session {current}: \
         another agent registered with this host's machine id; stop every VM"
    ));
    status.metadata_mut().insert(
        fabric_proto::SESSION_METADATA,
        tonic::metadata::MetadataValue::from_static("superseded"),
    );
    status
}

impl Controller {
    /// Whether `session` may act for `host_id` (0: an agent without sessions, not checked):
    /// the host's current session, and until when its assignments are held.
    fn session_check(&self, host_id: &str, session: u64) -> Result<(u64, Hold), Status> {
        let model = self.model();
        let Some(entry) = model.hosts.get(host_id) else {
            return Err(Status::not_found(format!(
                "unknown host id {host_id:?}: register"
            )));
        };
        if session != 0 && session != entry.host.agent_session {
            return Err(superseded(host_id, session, entry.host.agent_session));
        }
        let hold = if entry.live.evicting {
            Hold::Evicting
        } else {
            match entry.live.assignments_held_until {
                Some(t) if t > Instant::now() => Hold::Until(t),
                _ => Hold::None,
            }
        };
        Ok((entry.host.agent_session, hold))
    }
}

/// Whether a host's assignment stream may send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    None,
    /// Its session superseded one whose lease may not have run out: no first set before.
    Until(Instant),
    /// Declared dead, its VMs being moved off it: nothing until the reconciler lifts it.
    Evicting,
}

async fn sleep_until_some(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => futures::future::pending().await,
    }
}

/// Heartbeats in a row that must report a short host fitting before it counts as fitting.
const FITS_AFTER_REPORTS: u32 = 3;
/// The time those reports must span, in heartbeat intervals.
const FITS_AFTER_INTERVALS: u32 = 2;

/// Follows the host's memory balance from its latest heartbeat: when it turns short (reason
/// `MemoryShort`) and when it fits again (`MemoryFits`), with the figures.
///
/// Turning short counts at the first report saying so. Fitting again counts only once
/// [`FITS_AFTER_REPORTS`] heartbeats in a row, spanning at least [`FITS_AFTER_INTERVALS`]
/// heartbeat intervals, have said so: a host hovering at its budget (short, fits, short, ...)
/// stays short, without an event per heartbeat, and its relief window runs on. A host that
/// stops reporting a balance (its balancer is off) is no longer short, without an event:
/// nothing is known about it.
fn note_memory_balance(
    live: &mut HostLive,
    now: Instant,
    heartbeat_interval: Duration,
) -> Option<(&'static str, String)> {
    let balance = live.usage.and_then(|u| u.memory_balance);
    let Some(balance) = balance else {
        live.memory_short_since = None;
        live.memory_fits_run = None;
        return None;
    };
    let figures = format!(
        "its VMs want {} MiB of a {} MiB budget (demand {} MiB, assigned {} MiB, minimums {} MiB, {} VMs pressured)",
        balance.wanted_mib,
        balance.budget_mib,
        balance.demand_mib,
        balance.assigned_mib,
        balance.minimum_mib,
        balance.pressured_vms
    );
    if balance.short {
        live.memory_fits_run = None;
        if live.memory_short_since.is_some() {
            return None;
        }
        live.memory_short_since = Some(now);
        return Some(("MemoryShort", format!("is short of memory: {figures}")));
    }
    live.memory_short_since?;
    let (first, reports) = live.memory_fits_run.get_or_insert((now, 0));
    *reports += 1;
    let span = now.saturating_duration_since(*first);
    if *reports < FITS_AFTER_REPORTS || span < heartbeat_interval * FITS_AFTER_INTERVALS {
        return None;
    }
    let reports = *reports;
    live.memory_short_since = None;
    live.memory_fits_run = None;
    Some((
        "MemoryFits",
        format!(
            "fits its memory again ({reports} reports in a row over {:.1} s): {figures}",
            span.as_secs_f64()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::{HostMemoryBalance, HostUsage};

    const INTERVAL: Duration = Duration::from_secs(1);

    /// Feeds heartbeats reporting `short` (true) or fitting (false), one per `step`, from
    /// `start`; the memory events they cause, as `(heartbeat index, reason)`.
    fn feed(
        live: &mut HostLive,
        start: Instant,
        step: Duration,
        reports: &[bool],
    ) -> Vec<(usize, &'static str)> {
        let mut events = Vec::new();
        for (i, short) in reports.iter().enumerate() {
            live.usage = Some(HostUsage {
                memory_balance: Some(HostMemoryBalance {
                    budget_mib: 1000,
                    wanted_mib: if *short { 1010 } else { 990 },
                    short: *short,
                    ..Default::default()
                }),
                ..Default::default()
            });
            let now = start + step * i as u32;
            if let Some((reason, message)) = note_memory_balance(live, now, INTERVAL) {
                assert!(message.contains("1000 MiB budget"), "{message}");
                events.push((i, reason));
            }
        }
        events
    }

    #[test]
    fn a_host_hovering_at_its_budget_stays_short_without_an_event_per_heartbeat() {
        let start = Instant::now();
        let mut live = HostLive::new(start, Duration::from_secs(10));
        let hovering: Vec<bool> = (0..20).map(|i| i % 2 == 0).collect();
        assert_eq!(
            feed(&mut live, start, INTERVAL, &hovering),
            [(0, "MemoryShort")]
        );
        assert_eq!(live.memory_short_since, Some(start), "the window runs on");

        // Two reports fitting, then short again: still short, from the start.
        let later = start + INTERVAL * 20;
        assert_eq!(
            feed(&mut live, later, INTERVAL, &[true, false, false, true]),
            []
        );
        assert_eq!(live.memory_short_since, Some(start));

        // Three in a row over two intervals: fits, once.
        let later = start + INTERVAL * 30;
        assert_eq!(
            feed(&mut live, later, INTERVAL, &[false, false, false, false]),
            [(2, "MemoryFits")]
        );
        assert_eq!(live.memory_short_since, None);
        assert_eq!(
            feed(&mut live, later + INTERVAL * 5, INTERVAL, &[true]),
            [(0, "MemoryShort")]
        );
    }

    #[test]
    fn fitting_must_last_two_intervals_however_fast_the_reports_come() {
        let start = Instant::now();
        let mut live = HostLive::new(start, Duration::from_secs(10));
        assert_eq!(
            feed(&mut live, start, INTERVAL, &[true]),
            [(0, "MemoryShort")]
        );
        // Ten reports 100 ms apart: 0.9 s, not yet two intervals.
        let fast = Duration::from_millis(100);
        assert_eq!(feed(&mut live, start + INTERVAL, fast, &[false; 10]), []);
        assert!(live.memory_short_since.is_some());
        // The run goes on: at 2 s after its first report, it counts.
        assert_eq!(
            feed(&mut live, start + INTERVAL * 3, INTERVAL, &[false]),
            [(0, "MemoryFits")]
        );
    }

    #[test]
    fn a_host_whose_balancer_stops_reporting_is_no_longer_short_without_an_event() {
        let start = Instant::now();
        let mut live = HostLive::new(start, Duration::from_secs(10));
        assert_eq!(
            feed(&mut live, start, INTERVAL, &[true, false]),
            [(0, "MemoryShort")]
        );
        live.usage = None;
        assert_eq!(note_memory_balance(&mut live, start, INTERVAL), None);
        assert_eq!(
            (live.memory_short_since, live.memory_fits_run),
            (None, None)
        );
    }
}
