//! The agent's side of HostLink: registration, heartbeats, the lease with its fence, and the
//! assignment stream.
//!
//! The lease runs on the agent's own clock from the moment a request was *sent*, so the
//! agent's view of it always ends before the controller's. That clock is CLOCK_BOOTTIME
//! ([`BootInstant`]) everywhere: the expiry held in memory, the check that an answer came
//! before the lease it renews ran out, the fence's wake-up, and `<data_dir>/lease.json` (with
//! the boot id, so a restarted agent knows whether the VMs it finds may keep running). A host
//! that was suspended with a heartbeat in flight has spent the suspend on BOOTTIME but not on
//! CLOCK_MONOTONIC (tokio's timers, `Instant`): measured on MONOTONIC, the answer would renew
//! a lease the controller has already given up. Timers still run on MONOTONIC, so every wait
//! for a BOOTTIME deadline wakes at least every [`CLOCK_CHECK`] to look at the clock again.
//! When the lease lapses the host is fenced: every
//! VM is stopped, and they may run again only once the lease is renewed *and* a complete
//! assignment set has been read on a stream opened after the fence (the controller may have
//! moved them elsewhere meanwhile).
//!
//! Sessions: each registration is given a session number, kept in `<data_dir>/session` and
//! sent with every heartbeat and assignment stream; the next agent process on the same data
//! directory presents it to show it continues that session. A controller that refuses the
//! session as superseded (another agent registered with this machine id) makes the agent fence
//! at once and stay out: it does not register again until an operator restarts it, so two
//! agents sharing a machine id do not take the host from each other forever.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fabric_proto::v1::host_link_client::HostLinkClient;
use fabric_proto::v1::{
    AssignmentUpdate, HeartbeatRequest, HostUsage, MemoryPressure, ObservedPhase,
    RegisterHostRequest, WatchAssignmentsRequest,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::Host;
use fabric_vmm_api::lease::{BootInstant, LeaseFile};

/// Retry delays when the controller cannot be reached.
const MIN_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// The longest a wait for a lease deadline sleeps before it reads CLOCK_BOOTTIME again: after
/// a suspend, the fence notices a lease that ran out within this.
pub const CLOCK_CHECK: Duration = Duration::from_millis(250);

/// How often a superseded agent repeats why it does nothing.
const SUPERSEDED_REMINDER: Duration = Duration::from_secs(60);

/// Where the session number is kept across agent restarts.
fn session_path(host: &Host) -> std::path::PathBuf {
    host.config.data_dir.join("session")
}

/// The session the previous agent process on this data directory was given (0: none).
fn load_session(host: &Host) -> u64 {
    std::fs::read_to_string(session_path(host))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn save_session(host: &Host, session: u64) {
    let path = session_path(host);
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, format!("{session}\n")).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(err) = written {
        tracing::error!(path = %path.display(), error = %err, "cannot persist the agent session");
    }
}

/// True for a refusal saying another agent session holds the host now.
fn is_superseded(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(fabric_proto::SESSION_METADATA)
            .is_some_and(|v| v.as_bytes() == b"superseded")
}

/// Where the lease is kept (and where each fabric-vmm reads it).
pub fn lease_path(host: &Host) -> std::path::PathBuf {
    host.config.data_dir.join(super::kvm::LEASE_FILE)
}

/// The lease a previous agent process left: its expiry, if still valid.
pub fn load_lease(host: &Host) -> Option<BootInstant> {
    LeaseFile::read(&lease_path(host)).ok()?.expiry()
}

/// Makes sure the lease file exists at its fixed size, so that every renewal after overwrites
/// it in place and needs no free space (a full disk must not stop the VMs). Keeps a valid
/// lease it finds (`previous`); else writes one that has run out. Called at start-up.
pub fn reserve_lease_file(host: &Host, previous: Option<BootInstant>) {
    let path = lease_path(host);
    let reserved = std::fs::metadata(&path)
        .is_ok_and(|m| m.len() == fabric_vmm_api::lease::LEASE_FILE_BYTES as u64);
    if reserved {
        return;
    }
    let lease = match previous {
        Some(expiry) => LeaseFile::expiring_at(expiry),
        None => LeaseFile::expiring_in(std::time::Duration::ZERO),
    };
    if let Err(err) = lease.write(&path) {
        tracing::error!(error = %err, "cannot make the lease file: the lease cannot be renewed until it can be written");
    }
}

/// Writes the lease for the VMMs (and a restarted agent). A failed write leaves the previous,
/// earlier expiry in the file: the VMMs then stop sooner than they must, never later.
fn save_lease(host: &Host, expires: BootInstant) {
    if let Err(err) = LeaseFile::expiring_at(expires).write(&lease_path(host)) {
        tracing::error!(error = %err, "cannot persist the lease");
    }
}

/// The lease a request sent at `sent` and answered at `answered` (both on the lease clock)
/// gives, for a TTL of `ttl`: it runs from the sending, and an answer that comes when it has
/// already run out renews nothing (the controller may have given the host up meanwhile,
/// for instance while the host was suspended with the request in flight).
pub fn renewed_expiry(
    sent: BootInstant,
    ttl: Duration,
    answered: BootInstant,
) -> Option<BootInstant> {
    let expires = sent.saturating_add(ttl);
    (answered < expires && sent <= answered).then_some(expires)
}

/// The lease expiry the fence watches, on the lease clock.
pub struct Lease {
    expiry: watch::Sender<Option<BootInstant>>,
}

impl Lease {
    pub fn new(initial: Option<BootInstant>) -> Lease {
        Lease {
            expiry: watch::channel(initial).0,
        }
    }

    /// Renews the lease for a request sent at `sent` and answered just now.
    fn renew(&self, host: &Host, sent: BootInstant, ttl: Duration) {
        let Some(expires) = renewed_expiry(sent, ttl, BootInstant::now()) else {
            tracing::warn!(
                ttl_ms = ttl.as_millis() as u64,
                since_sent_ms = BootInstant::now()
                    .saturating_duration_since(sent)
                    .as_millis() as u64,
                "a heartbeat answer came after its lease had run out; not renewed"
            );
            return;
        };
        save_lease(host, expires);
        self.expiry.send_replace(Some(expires));
        // Looked at again: the agent may have been paused (or the host suspended) since the
        // answer was checked, and a lease that ran out meanwhile must not be declared valid.
        host.update_fence(|s| {
            if BootInstant::now() < expires {
                s.lease_valid = true;
            }
        });
    }

    /// The controller disowned the host: fence now.
    fn revoke(&self, host: &Host, why: &str) {
        tracing::warn!("{why}: fencing now");
        save_lease(host, BootInstant::now());
        self.expiry.send_replace(None);
        host.update_fence(|s| {
            s.lease_valid = false;
            s.need_sync = true;
            s.epoch += 1;
        });
    }
}

/// Fences the host whenever the lease runs out.
pub async fn run_fence(host: Arc<Host>, lease: Arc<Lease>) {
    let mut expiry = lease.expiry.subscribe();
    loop {
        let current = *expiry.borrow_and_update();
        match current {
            Some(t) if BootInstant::now() < t => {
                // A MONOTONIC timer, so never for long: a suspend stops it but not the lease.
                let nap = t.remaining().min(CLOCK_CHECK);
                tokio::select! {
                    _ = tokio::time::sleep(nap) => {}
                    changed = expiry.changed() => if changed.is_err() { return },
                }
                continue;
            }
            _ => {
                if host.fence_state().lease_valid || current.is_some() {
                    tracing::warn!(
                        "the host's lease expired: no heartbeat was answered within the TTL"
                    );
                    host.update_fence(|s| {
                        s.lease_valid = false;
                        s.need_sync = true;
                        s.epoch += 1;
                    });
                }
                if expiry.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

fn duration(d: Option<prost_types::Duration>, default: Duration) -> Duration {
    d.and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
}

/// The longest lease the agent takes from a controller: a controller (or anything answering
/// in its place) cannot make the host's VMs outlive its reach by more than this.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
/// The shortest heartbeat interval the agent takes: a controller cannot make it spin.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// The lease TTL a controller's answer gives, bounded by [`MAX_LEASE_TTL`].
fn lease_ttl(d: Option<prost_types::Duration>, default: Duration) -> Duration {
    let ttl = duration(d, default);
    if ttl > MAX_LEASE_TTL {
        tracing::warn!(
            ttl_ms = ttl.as_millis() as u64,
            "the controller's lease TTL is longer than {} s; taking {} s",
            MAX_LEASE_TTL.as_secs(),
            MAX_LEASE_TTL.as_secs()
        );
    }
    ttl.min(MAX_LEASE_TTL)
}

/// The heartbeat interval a controller's answer gives (1 s when it gives none), for a lease
/// of `ttl`: at most half the TTL, so that one lost heartbeat does not cost the lease, and at
/// least [`MIN_HEARTBEAT_INTERVAL`], so that no controller makes the agent spin (the floor
/// wins when the TTL is under twice the floor).
fn heartbeat_interval(d: Option<prost_types::Duration>, ttl: Duration) -> Duration {
    duration(d, Duration::from_secs(1))
        .min(ttl / 2)
        .max(MIN_HEARTBEAT_INTERVAL)
}

/// The size and free space of the filesystem holding `dir`, MiB, as every heartbeat reports
/// them (`HostUsage.disk_total_mib`, `disk_available_mib`: what an unprivileged writer may
/// use); None when it cannot be read.
fn disk_usage(dir: &Path) -> Option<(u64, u64)> {
    let fs = nix::sys::statvfs::statvfs(dir).ok()?;
    let block = fs.fragment_size();
    Some((
        fs.blocks().saturating_mul(block) >> 20,
        fs.blocks_available().saturating_mul(block) >> 20,
    ))
}

fn register_request(host: &Host, previous_session: u64) -> RegisterHostRequest {
    let mut labels: std::collections::HashMap<String, String> =
        host.config.labels.clone().into_iter().collect();
    labels.insert("fabric.hypervisor".into(), host.backend.name().into());
    RegisterHostRequest {
        machine_id: host.config.machine_id.clone(),
        name: host.config.name.clone(),
        zone: host.config.zone.clone(),
        fault_domain: host.config.fault_domain,
        update_domain: host.config.update_domain,
        capacity: Some(host.capacity()),
        allocatable: Some(host.allocatable()),
        labels,
        agent_address: host.config.advertise.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        previous_session,
        boot_id: fabric_vmm_api::lease::boot_id(),
    }
}

fn memory_pressure() -> Option<MemoryPressure> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    let avg10 = |kind: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(kind))?;
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse()
            .ok()
    };
    Some(MemoryPressure {
        some_avg10_percent: avg10("some")?,
        full_avg10_percent: avg10("full").unwrap_or(0.0),
    })
}

fn heartbeat_request(host: &Host, host_id: &str, session: u64) -> HeartbeatRequest {
    // Read before the VMs' states: the controller takes the states as at least as recent as
    // the generation (a stop it sent counts as done once acknowledged and reported).
    let assignments_generation = host.generation();
    let views = host.views();
    let mut usage = HostUsage::default();
    for view in &views {
        if view.observed.phase() != ObservedPhase::Running {
            continue;
        }
        usage.running_vms += 1;
        if let Some(spec) = view.assignment.as_ref().and_then(|a| a.spec.as_ref()) {
            usage.vcpus = usage.vcpus.saturating_add(spec.vcpus);
            let memory = spec.memory.unwrap_or_default();
            let max = memory.maximum_mib.max(memory.startup_mib);
            let balloon = view
                .observed
                .memory
                .as_ref()
                .map(|m| m.balloon_actual_mib)
                .unwrap_or(0);
            usage.vm_memory_mib = usage
                .vm_memory_mib
                .saturating_add(max.saturating_sub(balloon));
        }
    }
    let total = super::meminfo_kib("MemTotal").unwrap_or(0) / 1024;
    let available = super::meminfo_kib("MemAvailable").unwrap_or(0) / 1024;
    usage.memory_used_mib = total.saturating_sub(available);
    usage.memory_available_mib = available;
    usage.memory_pressure = memory_pressure();
    if let Some((total, available)) = disk_usage(&host.config.data_dir) {
        usage.disk_total_mib = total;
        usage.disk_available_mib = available;
    }
    usage.memory_balance = host.memory_balance();
    HeartbeatRequest {
        host_id: host_id.to_string(),
        capacity: Some(host.capacity()),
        usage: Some(usage),
        vms: host.observed(),
        assignments_generation,
        session,
    }
}

/// Registers, heartbeats and watches assignments, forever; reconnects after any failure.
pub async fn run(host: Arc<Host>, lease: Arc<Lease>, channel: crate::connect::ControllerChannel) {
    // Replaced when the host's certificate is renewed: later calls and the assignment stream
    // move to the new channel (its new connection presents the new certificate).
    let mut channels = channel.watch();
    let mut client = HostLinkClient::new(channels.borrow_and_update().clone());
    let mut retry = MIN_RETRY;
    let mut last_complaint: Option<String> = None;
    let mut session = load_session(&host);
    loop {
        if channels.has_changed().unwrap_or(false) {
            client = HostLinkClient::new(channels.borrow_and_update().clone());
        }
        let sent = BootInstant::now();
        let response = match tokio::time::timeout(
            Duration::from_secs(10),
            client.register_host(register_request(&host, session)),
        )
        .await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let text = format!(
                    "cannot register with the controller at {}: {}",
                    host.config.controller,
                    status.message()
                );
                if last_complaint.as_deref() != Some(text.as_str()) {
                    tracing::error!("{text}; retrying");
                    last_complaint = Some(text);
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
            Err(_) => {
                tracing::error!(controller = %host.config.controller, "RegisterHost timed out; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        };
        retry = MIN_RETRY;
        last_complaint = None;
        let ttl = lease_ttl(response.lease_ttl, Duration::from_secs(10));
        let interval = heartbeat_interval(response.heartbeat_interval, ttl);
        let host_id = response.host_id;
        session = response.session;
        save_session(&host, session);
        tracing::info!(host_id = %host_id, session, ttl_ms = ttl.as_millis() as u64, "registered with the controller");
        lease.renew(&host, sent, ttl);

        // Set by the assignment stream when the controller says this session was superseded.
        let (disowned_tx, mut disowned) = watch::channel(None::<tonic::Status>);
        let mut watcher = tokio::spawn(watch_assignments(
            host.clone(),
            client.clone(),
            host_id.clone(),
            session,
            disowned_tx.clone(),
        ));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut failing = false;
        let superseded = loop {
            tokio::select! {
                _ = ticker.tick() => {}
                // (A watcher gone without a word disables this branch; the ticker goes on.)
                Ok(()) = disowned.changed() => {
                    if let Some(status) = disowned.borrow_and_update().clone() {
                        break Some(status);
                    }
                    continue;
                }
                Ok(()) = channels.changed() => {
                    // A renewed certificate: the next heartbeat and a new assignment stream
                    // go over the new channel. The stream reopened starts with the complete
                    // set, which changes nothing on the host: the VMs run on.
                    client = HostLinkClient::new(channels.borrow_and_update().clone());
                    watcher.abort();
                    watcher = tokio::spawn(watch_assignments(
                        host.clone(),
                        client.clone(),
                        host_id.clone(),
                        session,
                        disowned_tx.clone(),
                    ));
                    tracing::info!("the controller connection now presents the renewed certificate");
                    continue;
                }
            }
            let sent = BootInstant::now();
            let request = heartbeat_request(&host, &host_id, session);
            match tokio::time::timeout(ttl, client.heartbeat(request)).await {
                Ok(Ok(response)) => {
                    let ttl = lease_ttl(response.into_inner().lease_ttl, ttl);
                    lease.renew(&host, sent, ttl);
                    if failing {
                        tracing::info!("heartbeats answered again");
                        failing = false;
                    }
                }
                Ok(Err(status)) if is_superseded(&status) => break Some(status),
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound | tonic::Code::FailedPrecondition
                    ) =>
                {
                    lease.revoke(
                        &host,
                        &format!(
                            "the controller refused the heartbeat ({})",
                            status.message()
                        ),
                    );
                    break None;
                }
                Ok(Err(status)) => {
                    if !failing {
                        tracing::warn!(error = %status.message(), "heartbeat failed; the VMs keep running until the lease expires");
                        failing = true;
                    }
                }
                Err(_) => {
                    if !failing {
                        tracing::warn!(
                            "heartbeat timed out; the VMs keep running until the lease expires"
                        );
                        failing = true;
                    }
                }
            }
        };
        watcher.abort();
        if let Some(status) = superseded {
            stay_out(&host, &lease, &host_id, session, &status).await;
        }
    }
}

/// Another agent holds this host's machine id: fence now and never register again on our own
/// (the other agent would be superseded in turn, and the two would take the host from each
/// other forever). Says so loudly, and again every minute.
async fn stay_out(host: &Host, lease: &Lease, host_id: &str, session: u64, status: &tonic::Status) {
    lease.revoke(host, "another agent holds this machine id");
    loop {
        tracing::error!(
            host_id = %host_id,
            machine_id = %host.config.machine_id,
            session,
            refusal = %status.message(),
            "another agent holds this machine id: it registered as this host after this agent, \
             so this agent stopped its VMs and stays out. Two machines must never share a \
             machine_id (a cloned image?): give this machine its own (machine_id in the agent \
             config), then restart this agent; restarting it as it is takes the host back from \
             the other agent"
        );
        tokio::time::sleep(SUPERSEDED_REMINDER).await;
    }
}

/// The most parts one update may come in, and the most assignments it may hold: a stream
/// that sends more is reopened rather than followed into unbounded memory.
pub const MAX_UPDATE_PARTS: usize = 1024;
pub const MAX_UPDATE_ASSIGNMENTS: usize = 100_000;

/// Gathers an assignment update sent in parts (`AssignmentUpdate.continued`).
#[derive(Default)]
pub struct Parts {
    pending: Option<AssignmentUpdate>,
    count: usize,
}

impl Parts {
    /// Takes the next message: the whole update once its last part is in, else None; an
    /// error (the stream is then reopened) for a part of another update or too many.
    pub fn add(&mut self, part: AssignmentUpdate) -> Result<Option<AssignmentUpdate>, String> {
        let update = match self.pending.take() {
            None => {
                self.count = 1;
                part
            }
            Some(mut pending) => {
                if pending.generation != part.generation || pending.full != part.full {
                    return Err(format!(
                        "a part of update {} (full {}) in the middle of update {} (full {})",
                        part.generation, part.full, pending.generation, pending.full
                    ));
                }
                self.count += 1;
                pending.upserts.extend(part.upserts);
                pending.removed_vm_ids.extend(part.removed_vm_ids);
                pending.continued = part.continued;
                pending
            }
        };
        if self.count > MAX_UPDATE_PARTS
            || update.upserts.len() + update.removed_vm_ids.len() > MAX_UPDATE_ASSIGNMENTS
        {
            return Err(format!(
                "an update of more than {MAX_UPDATE_PARTS} parts or {MAX_UPDATE_ASSIGNMENTS} assignments"
            ));
        }
        if update.continued {
            self.pending = Some(update);
            return Ok(None);
        }
        Ok(Some(update))
    }
}

/// Keeps a WatchAssignments stream open, reopening it after errors and after each fencing.
async fn watch_assignments(
    host: Arc<Host>,
    mut client: HostLinkClient<Channel>,
    host_id: String,
    session: u64,
    disowned: watch::Sender<Option<tonic::Status>>,
) {
    let mut fence = host.fence_rx();
    loop {
        let epoch = host.fence_state().epoch;
        fence.borrow_and_update();
        let stream = client
            .watch_assignments(WatchAssignmentsRequest {
                host_id: host_id.clone(),
                session,
            })
            .await;
        let mut stream = match stream {
            Ok(response) => response.into_inner(),
            Err(status) if is_superseded(&status) => {
                disowned.send_replace(Some(status));
                return;
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot watch assignments; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // The stream's complete set has been read (its first message).
        let mut full_read = false;
        // The parts of an update sent in several messages, so far.
        let mut parts = Parts::default();
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(part)) => {
                        match parts.add(part) {
                            Ok(Some(update)) => {
                                full_read |= update.full;
                                host.apply(update, epoch);
                            }
                            Ok(None) => {}
                            Err(why) => {
                                tracing::warn!("the assignment stream sent {why}; reopening");
                                break;
                            }
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("the assignment stream ended; reopening");
                        break;
                    }
                    Err(status) if is_superseded(&status) => {
                        disowned.send_replace(Some(status));
                        return;
                    }
                    Err(status) => {
                        tracing::warn!(error = %status.message(), "the assignment stream failed; reopening");
                        break;
                    }
                },
                _ = fence.changed() => {
                    let state = host.fence_state();
                    if state.epoch != epoch {
                        // Fenced since the stream opened: read the complete set again.
                        break;
                    }
                    if full_read && state.need_sync && state.lease_valid {
                        // The set was read before the lease was renewed, so it did not count
                        // (it may come from a controller that has moved the VMs since): read
                        // it again, from whichever controller renewed the lease.
                        tracing::info!("lease renewed after the assignments were read: reading them again");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(4);

    fn at_ms(ms: u64) -> BootInstant {
        BootInstant::from_nanos(1_000_000_000_000 + ms * 1_000_000)
    }

    #[test]
    fn an_update_in_parts_is_applied_whole_and_a_stray_part_is_refused() {
        use fabric_proto::v1::Assignment;
        let part = |generation, continued, ids: &[&str]| AssignmentUpdate {
            generation,
            full: true,
            continued,
            upserts: ids
                .iter()
                .map(|id| Assignment {
                    vm_id: id.to_string(),
                    ..Default::default()
                })
                .collect(),
            removed_vm_ids: Vec::new(),
        };
        let mut parts = Parts::default();
        assert!(parts.add(part(7, true, &["a", "b"])).unwrap().is_none());
        assert!(parts.add(part(7, true, &["c"])).unwrap().is_none());
        let whole = parts.add(part(7, false, &["d"])).unwrap().unwrap();
        let ids: Vec<&str> = whole.upserts.iter().map(|a| a.vm_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert!(!whole.continued);
        // A single message is its own whole.
        assert_eq!(
            parts
                .add(part(8, false, &["x"]))
                .unwrap()
                .unwrap()
                .upserts
                .len(),
            1
        );
        // A part of another update in the middle: refused.
        assert!(parts.add(part(9, true, &["y"])).unwrap().is_none());
        assert!(parts.add(part(10, false, &["z"])).is_err());
        // Endless parts: refused.
        let mut parts = Parts::default();
        let refused = (0..=MAX_UPDATE_PARTS).any(|_| parts.add(part(11, true, &[])).is_err());
        assert!(refused);
    }

    #[test]
    fn a_controllers_heartbeat_interval_is_bounded_by_the_floor_and_half_the_ttl() {
        let ms = |ms: i64| {
            Some(prost_types::Duration {
                seconds: ms / 1000,
                nanos: (ms % 1000) as i32 * 1_000_000,
            })
        };
        let ttl = Duration::from_secs(4);
        assert_eq!(heartbeat_interval(ms(700), ttl), Duration::from_millis(700));
        // Faster than the floor: the floor (a controller cannot make the agent spin).
        assert_eq!(MIN_HEARTBEAT_INTERVAL, Duration::from_millis(100));
        assert_eq!(heartbeat_interval(ms(1), ttl), MIN_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(ms(99), ttl), MIN_HEARTBEAT_INTERVAL);
        // Slower than half the TTL: half the TTL (one lost heartbeat keeps the lease).
        assert_eq!(heartbeat_interval(ms(3000), ttl), ttl / 2);
        assert_eq!(heartbeat_interval(ms(i64::MAX / 2), ttl), ttl / 2);
        // None, zero or negative: 1 s, bounded the same way.
        assert_eq!(heartbeat_interval(None, ttl), Duration::from_secs(1));
        assert_eq!(heartbeat_interval(ms(0), ttl), Duration::from_secs(1));
        assert_eq!(heartbeat_interval(ms(-5000), ttl), Duration::from_secs(1));
        assert_eq!(
            heartbeat_interval(None, Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        // A TTL under twice the floor: the floor wins.
        assert_eq!(
            heartbeat_interval(ms(1000), Duration::from_millis(150)),
            MIN_HEARTBEAT_INTERVAL
        );
    }

    /// The disk figures of every heartbeat are those of the filesystem holding the data
    /// directory, as statvfs(3) gives them (checked here against `df`, which reads the same).
    #[test]
    fn heartbeats_report_the_data_directorys_filesystem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (total, available) = disk_usage(dir.path()).expect("statvfs");
        let fs = nix::sys::statvfs::statvfs(dir.path()).expect("statvfs");
        let frsize = fs.fragment_size();
        assert_eq!(total, fs.blocks() * frsize / (1 << 20));
        assert!(total > 0 && available <= total, "{total} {available}");
        // `df` in 1 MiB blocks rounds up where this rounds down; free space may move a little
        // between the two reads.
        let df = std::process::Command::new("df")
            .args(["--block-size=1M", "--output=size,avail"])
            .arg(dir.path())
            .output()
            .expect("df");
        let text = String::from_utf8_lossy(&df.stdout);
        let figures: Vec<u64> = text
            .lines()
            .nth(1)
            .expect("df's line")
            .split_whitespace()
            .map(|f| f.parse().expect("a figure"))
            .collect();
        assert!(
            figures[0].abs_diff(total) <= 1,
            "df {figures:?}, ours {total}"
        );
        assert!(
            figures[1].abs_diff(available) <= 64,
            "df {figures:?}, ours {available}"
        );
        assert_eq!(disk_usage(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_controllers_lease_ttl_is_bounded() {
        let proto = |secs: i64| {
            Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            })
        };
        assert_eq!(
            lease_ttl(proto(10), Duration::ZERO),
            Duration::from_secs(10)
        );
        assert_eq!(lease_ttl(proto(i64::MAX), Duration::ZERO), MAX_LEASE_TTL);
        assert_eq!(
            lease_ttl(proto(-5), Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        assert_eq!(
            lease_ttl(None, Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn a_lease_runs_from_the_sending_of_the_request() {
        // Answered 100 ms after it was sent: the lease ends TTL after the sending.
        assert_eq!(
            renewed_expiry(at_ms(0), TTL, at_ms(100)),
            Some(at_ms(4_000))
        );
        // A slow answer still renews, for what is left.
        assert_eq!(
            renewed_expiry(at_ms(0), TTL, at_ms(3_999)),
            Some(at_ms(4_000))
        );
    }

    #[test]
    fn an_answer_after_the_lease_ran_out_renews_nothing() {
        assert_eq!(renewed_expiry(at_ms(0), TTL, at_ms(4_000)), None);
        // Sent, then the host slept for an hour (boot time counts it), answered at once after
        // the wake-up: on CLOCK_MONOTONIC it took milliseconds, on the lease clock an hour.
        assert_eq!(renewed_expiry(at_ms(0), TTL, at_ms(3_600_050)), None);
        // An answer "before" its request (a clock gone backwards) is not trusted either.
        assert_eq!(renewed_expiry(at_ms(10), TTL, at_ms(0)), None);
    }
}
