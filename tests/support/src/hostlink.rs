//! A small in-test controller for fabric-agent tests: it serves `fabric.v1.HostLink` and
//! `fabric.v1.Images` on a Unix socket, on its own tokio runtime, and records what the agent
//! tells it (registrations, every heartbeat, each VM's observed state).
//!
//! It can be stopped for real (the socket is removed and every connection and stream is
//! dropped, as when a controller process dies) and restarted on the same path with its state
//! kept (host ids, assignments, generation), which is what the fencing tests need.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fabric_proto::v1::host_link_server::{HostLink, HostLinkServer};
use fabric_proto::v1::images_server::{Images, ImagesServer};
use fabric_proto::v1::{
    pull_image_response, Assignment, AssignmentUpdate, HeartbeatRequest, HeartbeatResponse,
    ListImagesRequest, ListImagesResponse, ObservedVm, PullImageHeader, PullImageRequest,
    PullImageResponse, PushImageRequest, PushImageResponse, RegisterHostRequest,
    RegisterHostResponse, WatchAssignmentsRequest,
};
use sha2::{Digest, Sha256};

use crate::host::{HostOptions, TestHost, AGENT_TIMEOUT};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// The response stream of a server-streaming call.
pub type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `items` as a response stream.
pub fn stream_of<T: Send + 'static>(items: Vec<T>) -> ServerStream<T> {
    Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))
}

/// What `PullImage` answers for `request` when `bytes` is the file it names: the header, then
/// the bytes from the requested offset in data messages of at most `chunk_bytes`.
/// OUT_OF_RANGE for an offset past the end.
pub fn pull_image_responses(
    request: &PullImageRequest,
    bytes: &[u8],
    chunk_bytes: usize,
) -> Result<ServerStream<PullImageResponse>, Status> {
    let rest = usize::try_from(request.offset)
        .ok()
        .and_then(|offset| bytes.get(offset..))
        .ok_or_else(|| {
            Status::out_of_range(format!(
                "offset {} past the end ({} bytes)",
                request.offset,
                bytes.len()
            ))
        })?;
    let header = PullImageResponse {
        part: Some(pull_image_response::Part::Header(PullImageHeader {
            sha256: request.sha256.clone(),
            size_bytes: bytes.len() as u64,
            offset: request.offset,
        })),
    };
    let data = rest.chunks(chunk_bytes).map(|chunk| PullImageResponse {
        part: Some(pull_image_response::Part::Data(chunk.to_vec())),
    });
    Ok(stream_of(std::iter::once(header).chain(data).collect()))
}

/// PullImage sends at most this much per data message (the contract's bound).
const CHUNK_BYTES: usize = 1 << 20;

/// sha256 of `bytes` as 64 lowercase hex characters.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One heartbeat as received.
#[derive(Clone, Debug)]
pub struct HeartbeatRecord {
    /// 1 for the first heartbeat this controller received, then 2, 3, ...
    pub seq: u64,
    pub at: Instant,
    pub request: HeartbeatRequest,
}

/// What the controller knows and has seen; kept across stop/restart.
struct State {
    lease_ttl: Duration,
    heartbeat_interval: Duration,
    /// machine_id -> host id.
    hosts: HashMap<String, String>,
    next_host: u64,
    registrations: Vec<RegisterHostRequest>,
    assignments: BTreeMap<String, Assignment>,
    generation: u64,
    watchers: Vec<mpsc::UnboundedSender<Result<AssignmentUpdate, Status>>>,
    watch_streams_opened: u64,
    /// While set, new watch streams are accepted but get nothing, not even the complete set,
    /// until [`FakeController::release_assignments`] (a controller slow to answer).
    withhold_assignments: bool,
    withheld: Vec<mpsc::UnboundedSender<Result<AssignmentUpdate, Status>>>,
    /// While set, heartbeats are received but not answered until
    /// [`FakeController::release_heartbeats`] (an answer in flight).
    hold_heartbeats: bool,
    /// Heartbeats received while held, answered or not.
    heartbeats_held: u64,
    images: HashMap<String, Arc<Vec<u8>>>,
    pulls: HashMap<String, u64>,
    /// While set, image pulls are received (and counted) but not answered until
    /// [`FakeController::release_pulls`]: a slow download.
    hold_pulls: bool,
    heartbeats: Vec<HeartbeatRecord>,
    /// Latest observed state per VM id, with the seq of the heartbeat that carried it.
    observed: HashMap<String, (u64, ObservedVm)>,
}

impl State {
    fn host_id_known(&self, host_id: &str) -> bool {
        self.hosts.values().any(|h| h == host_id)
    }

    fn lease_ttl_proto(&self) -> prost_types::Duration {
        duration_proto(self.lease_ttl)
    }

    fn full_set(&self) -> AssignmentUpdate {
        AssignmentUpdate {
            generation: self.generation,
            full: true,
            upserts: self.assignments.values().cloned().collect(),
            removed_vm_ids: Vec::new(),
            continued: false,
        }
    }

    fn broadcast(&mut self, update: AssignmentUpdate) {
        self.watchers.retain(|w| w.send(Ok(update.clone())).is_ok());
    }
}

fn duration_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn timestamp_in(d: Duration) -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now() + d)
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    /// Watch streams the server holds open right now.
    open_watch_streams: Arc<AtomicUsize>,
    /// Wakes held heartbeats when they are released.
    heartbeats_released: Arc<tokio::sync::Notify>,
    /// Wakes held image pulls when they are released.
    pulls_released: Arc<tokio::sync::Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decrements the open-stream count when the stream it lives in is dropped.
struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl HostLink for Shared {
    async fn register_host(
        &self,
        request: Request<RegisterHostRequest>,
    ) -> Result<Response<RegisterHostResponse>, Status> {
        let request = request.into_inner();
        if request.machine_id.is_empty() {
            return Err(Status::invalid_argument("machine_id is required"));
        }
        let mut state = self.lock();
        let host_id = match state.hosts.get(&request.machine_id) {
            Some(id) => id.clone(),
            None => {
                state.next_host += 1;
                let id = format!("host-{}", state.next_host);
                state.hosts.insert(request.machine_id.clone(), id.clone());
                id
            }
        };
        state.registrations.push(request);
        Ok(Response::new(RegisterHostResponse {
            host_id,
            lease_ttl: Some(state.lease_ttl_proto()),
            heartbeat_interval: Some(duration_proto(state.heartbeat_interval)),
            lease_expires_at: Some(timestamp_in(state.lease_ttl)),
            // A controller without sessions: the agent's heartbeats are not checked.
            session: 0,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        // Registered before the hold is looked at, so a release in between is not missed.
        let released = self.heartbeats_released.notified();
        let held = {
            let mut state = self.lock();
            if state.hold_heartbeats {
                state.heartbeats_held += 1;
            }
            state.hold_heartbeats
        };
        if held {
            released.await;
        }
        let mut state = self.lock();
        if !state.host_id_known(&request.host_id) {
            return Err(Status::not_found(format!("host {}", request.host_id)));
        }
        let seq = state.heartbeats.len() as u64 + 1;
        for vm in &request.vms {
            state.observed.insert(vm.vm_id.clone(), (seq, vm.clone()));
        }
        state.heartbeats.push(HeartbeatRecord {
            seq,
            at: Instant::now(),
            request,
        });
        Ok(Response::new(HeartbeatResponse {
            lease_ttl: Some(state.lease_ttl_proto()),
            lease_expires_at: Some(timestamp_in(state.lease_ttl)),
        }))
    }

    type WatchAssignmentsStream = ServerStream<AssignmentUpdate>;

    async fn watch_assignments(
        &self,
        request: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let WatchAssignmentsRequest { host_id, .. } = request.into_inner();
        let mut state = self.lock();
        if !state.host_id_known(&host_id) {
            return Err(Status::not_found(format!("host {host_id}")));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if state.withhold_assignments {
            state.withheld.push(tx);
        } else {
            // The first message of every stream is the complete set.
            tx.send(Ok(state.full_set()))
                .map_err(|_| Status::internal("watch channel closed"))?;
            state.watchers.push(tx);
        }
        state.watch_streams_opened += 1;
        self.open_watch_streams.fetch_add(1, Ordering::SeqCst);
        let guard = StreamGuard(self.open_watch_streams.clone());
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |item| {
            let _ = &guard;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn join_host(
        &self,
        _: Request<fabric_proto::v1::JoinHostRequest>,
    ) -> Result<Response<fabric_proto::v1::JoinHostResponse>, Status> {
        Err(Status::unimplemented(
            "the fake controller issues no certificates",
        ))
    }

    async fn renew_certificate(
        &self,
        _: Request<fabric_proto::v1::RenewCertificateRequest>,
    ) -> Result<Response<fabric_proto::v1::RenewCertificateResponse>, Status> {
        Err(Status::unimplemented(
            "the fake controller issues no certificates",
        ))
    }
}

#[tonic::async_trait]
impl Images for Shared {
    type PullImageStream = ServerStream<PullImageResponse>;

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let request = request.get_ref();
        // Registered before the hold is looked at, so a release in between is not missed.
        let released = self.pulls_released.notified();
        let (bytes, held) = {
            let mut state = self.lock();
            *state.pulls.entry(request.sha256.clone()).or_default() += 1;
            (state.images.get(&request.sha256).cloned(), state.hold_pulls)
        };
        if held {
            released.await;
        }
        let bytes = bytes.ok_or_else(|| Status::not_found(format!("image {}", request.sha256)))?;
        Ok(Response::new(pull_image_responses(
            request,
            &bytes,
            CHUNK_BYTES,
        )?))
    }

    async fn push_image(
        &self,
        _request: Request<Streaming<PushImageRequest>>,
    ) -> Result<Response<PushImageResponse>, Status> {
        Err(Status::unimplemented(
            "the test controller is filled by the test",
        ))
    }

    async fn delete_image(
        &self,
        _request: Request<fabric_proto::v1::DeleteImageRequest>,
    ) -> Result<Response<fabric_proto::v1::DeleteImageResponse>, Status> {
        Err(Status::unimplemented(
            "the test controller is filled by the test",
        ))
    }

    async fn list_images(
        &self,
        _request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        Err(Status::unimplemented(
            "the test controller is filled by the test",
        ))
    }
}

/// One incarnation of the server: its own runtime, so that stopping it drops every task,
/// connection and stream it had.
struct Server {
    runtime: tokio::runtime::Runtime,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The in-test controller.
pub struct FakeController {
    path: PathBuf,
    shared: Shared,
    server: Option<Server>,
}

/// The lease a [`FakeController`] grants unless a test asks for another.
pub const LEASE_TTL: Duration = Duration::from_secs(4);
/// The heartbeat interval a [`FakeController`] asks for.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A test host with `options` whose agent runs and has registered with a fake controller of
/// its own, which grants leases of `lease_ttl`.
pub fn registered_host(options: HostOptions, lease_ttl: Duration) -> (TestHost, FakeController) {
    let mut host = TestHost::new(options);
    let controller =
        FakeController::start_with(&host.controller_socket, lease_ttl, HEARTBEAT_INTERVAL);
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    (host, controller)
}

impl FakeController {
    /// Serves on `path` (a Unix socket; a stale one is replaced) with a [`LEASE_TTL`] lease
    /// and a [`HEARTBEAT_INTERVAL`].
    pub fn start(path: &Path) -> FakeController {
        Self::start_with(path, LEASE_TTL, HEARTBEAT_INTERVAL)
    }

    pub fn start_with(
        path: &Path,
        lease_ttl: Duration,
        heartbeat_interval: Duration,
    ) -> FakeController {
        let state = State {
            lease_ttl,
            heartbeat_interval,
            hosts: HashMap::new(),
            next_host: 0,
            registrations: Vec::new(),
            assignments: BTreeMap::new(),
            generation: 1,
            watchers: Vec::new(),
            watch_streams_opened: 0,
            withhold_assignments: false,
            withheld: Vec::new(),
            hold_heartbeats: false,
            hold_pulls: false,
            heartbeats_held: 0,
            images: HashMap::new(),
            pulls: HashMap::new(),
            heartbeats: Vec::new(),
            observed: HashMap::new(),
        };
        let mut controller = FakeController {
            path: path.to_owned(),
            shared: Shared {
                state: Arc::new(Mutex::new(state)),
                open_watch_streams: Arc::new(AtomicUsize::new(0)),
                heartbeats_released: Arc::new(tokio::sync::Notify::new()),
                pulls_released: Arc::new(tokio::sync::Notify::new()),
            },
            server: None,
        };
        controller.restart();
        controller
    }

    /// The address to put in the agent's configuration.
    pub fn address(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_serving(&self) -> bool {
        self.server.is_some()
    }

    /// Starts serving again on the same path, with the state kept. No-op when serving.
    pub fn restart(&mut self) {
        if self.server.is_some() {
            return;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-controller")
            .enable_all()
            .build()
            .expect("controller runtime");
        let _ = std::fs::remove_file(&self.path);
        let listener = std::os::unix::net::UnixListener::bind(&self.path)
            .unwrap_or_else(|e| panic!("bind {}: {e}", self.path.display()));
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let listener = tokio::net::UnixListener::from_std(listener).expect("tokio listener");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = tonic::transport::Server::builder()
                .add_service(HostLinkServer::new(shared.clone()))
                .add_service(ImagesServer::new(shared))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(err) = result {
                eprintln!("fake controller: server ended: {err}");
            }
        });
        self.server = Some(Server {
            runtime,
            shutdown: Some(tx),
        });
    }

    /// Stops serving as a dead controller would: the socket disappears, and every connection
    /// and stream (including the agent's open WatchAssignments) is dropped. No-op when stopped.
    pub fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let _ = std::fs::remove_file(&self.path);
        if let Some(tx) = server.shutdown.take() {
            let _ = tx.send(());
        }
        {
            let mut state = self.shared.lock();
            state.watchers.clear();
            state.withheld.clear();
        }
        // Dropping the runtime's tasks closes every accepted connection: a graceful shutdown
        // would wait for the never-ending watch streams.
        server.runtime.shutdown_timeout(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.shared.open_watch_streams.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "fake controller: {} watch streams still open after stop",
                self.shared.open_watch_streams.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !self.path.exists(),
            "{} still exists after stop",
            self.path.display()
        );
    }

    /// Makes the controller forget every host: heartbeats and watches of known host ids then
    /// fail with NOT_FOUND, and a new registration gets a new host id.
    pub fn forget_hosts(&self) {
        let mut state = self.shared.lock();
        state.hosts.clear();
        state.watchers.clear();
    }

    /// From now on, watch streams are opened but get nothing, not even their complete set,
    /// until [`release_assignments`](Self::release_assignments).
    pub fn withhold_assignments(&self) {
        self.shared.lock().withhold_assignments = true;
    }

    /// Sends each withheld stream its complete set (the assignments as they are now) and
    /// serves streams normally again.
    pub fn release_assignments(&self) {
        let mut state = self.shared.lock();
        state.withhold_assignments = false;
        let full = state.full_set();
        let withheld = std::mem::take(&mut state.withheld);
        for tx in withheld {
            if tx.send(Ok(full.clone())).is_ok() {
                state.watchers.push(tx);
            }
        }
    }

    /// From now on, heartbeats are received but not answered until
    /// [`release_heartbeats`](Self::release_heartbeats): an answer in flight.
    pub fn hold_heartbeats(&self) {
        self.shared.lock().hold_heartbeats = true;
    }

    /// Answers every held heartbeat and stops holding them.
    pub fn release_heartbeats(&self) {
        self.shared.lock().hold_heartbeats = false;
        self.shared.heartbeats_released.notify_waiters();
    }

    /// From now on, image pulls are counted but not answered until
    /// [`release_pulls`](Self::release_pulls): a download that takes as long as the test wants.
    pub fn hold_pulls(&self) {
        self.shared.lock().hold_pulls = true;
    }

    /// Answers every held pull and stops holding them.
    pub fn release_pulls(&self) {
        self.shared.lock().hold_pulls = false;
        self.shared.pulls_released.notify_waiters();
    }

    /// Heartbeats that were (or are) held so far.
    pub fn heartbeats_held(&self) -> u64 {
        self.shared.lock().heartbeats_held
    }

    /// Replaces the desired set: sends an incremental update (changed or new assignments as
    /// upserts, the rest as removals) with the next generation to every open watch stream.
    pub fn set_assignments(&self, assignments: Vec<Assignment>) -> u64 {
        let mut state = self.shared.lock();
        let new: BTreeMap<String, Assignment> = assignments
            .into_iter()
            .map(|a| (a.vm_id.clone(), a))
            .collect();
        let upserts: Vec<Assignment> = new
            .values()
            .filter(|a| state.assignments.get(&a.vm_id) != Some(*a))
            .cloned()
            .collect();
        let removed_vm_ids: Vec<String> = state
            .assignments
            .keys()
            .filter(|id| !new.contains_key(*id))
            .cloned()
            .collect();
        state.generation += 1;
        state.assignments = new;
        let update = AssignmentUpdate {
            generation: state.generation,
            full: false,
            upserts,
            removed_vm_ids,
            continued: false,
        };
        state.broadcast(update);
        state.generation
    }

    /// Adds (or replaces) one assignment, keeping the others.
    pub fn upsert_assignment(&self, assignment: Assignment) -> u64 {
        let mut all: Vec<Assignment> = self.assignments();
        all.retain(|a| a.vm_id != assignment.vm_id);
        all.push(assignment);
        self.set_assignments(all)
    }

    pub fn assignments(&self) -> Vec<Assignment> {
        self.shared.lock().assignments.values().cloned().collect()
    }

    /// Serves the file at `path` under its sha256, which it returns.
    pub fn add_image_file(&self, path: &Path) -> String {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("image {}: {e}", path.display()));
        let digest = sha256_hex(&bytes);
        self.add_image_bytes(&digest, bytes);
        digest
    }

    /// Serves `bytes` as the file with digest `digest_claimed`, whether or not that is their
    /// real sha256 (a corrupt store, for the mismatch test).
    pub fn add_image_bytes(&self, digest_claimed: &str, bytes: Vec<u8>) {
        self.shared
            .lock()
            .images
            .insert(digest_claimed.to_string(), Arc::new(bytes));
    }

    /// How many PullImage calls asked for `digest`.
    pub fn pulls(&self, digest: &str) -> u64 {
        self.shared.lock().pulls.get(digest).copied().unwrap_or(0)
    }

    pub fn registrations(&self) -> Vec<RegisterHostRequest> {
        self.shared.lock().registrations.clone()
    }

    pub fn registration_count(&self) -> usize {
        self.shared.lock().registrations.len()
    }

    pub fn watch_streams_opened(&self) -> u64 {
        self.shared.lock().watch_streams_opened
    }

    pub fn open_watch_streams(&self) -> usize {
        self.shared.open_watch_streams.load(Ordering::SeqCst)
    }

    /// The host id this controller gave `machine_id`, if it knows it.
    pub fn host_id(&self, machine_id: &str) -> Option<String> {
        self.shared.lock().hosts.get(machine_id).cloned()
    }

    /// The seq of the last heartbeat received (0: none yet). Pass it to the `_after` waits to
    /// consider only later heartbeats.
    pub fn mark(&self) -> u64 {
        self.shared.lock().heartbeats.len() as u64
    }

    pub fn latest_heartbeat(&self) -> Option<HeartbeatRecord> {
        self.shared.lock().heartbeats.last().cloned()
    }

    /// Every heartbeat with a seq greater than `after`.
    pub fn heartbeats_after(&self, after: u64) -> Vec<HeartbeatRecord> {
        let state = self.shared.lock();
        state
            .heartbeats
            .iter()
            .filter(|h| h.seq > after)
            .cloned()
            .collect()
    }

    /// Every report of `vm_id` in heartbeats with a seq greater than `after`, oldest first.
    pub fn observed_history(&self, vm_id: &str, after: u64) -> Vec<(u64, ObservedVm)> {
        let state = self.shared.lock();
        state
            .heartbeats
            .iter()
            .filter(|h| h.seq > after)
            .flat_map(|h| {
                h.request
                    .vms
                    .iter()
                    .filter(|vm| vm.vm_id == vm_id)
                    .map(move |vm| (h.seq, vm.clone()))
            })
            .collect()
    }

    /// The latest report of `vm_id`, with its heartbeat's seq.
    pub fn observed(&self, vm_id: &str) -> Option<(u64, ObservedVm)> {
        self.shared.lock().observed.get(vm_id).cloned()
    }

    /// Waits until `machine_id` has registered at least `count` times in total.
    pub fn wait_registrations(&self, machine_id: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .registrations()
                .iter()
                .filter(|r| r.machine_id == machine_id)
                .count();
            if seen >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{machine_id} registered {seen} times after {timeout:?}, expected {count}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a heartbeat (seq > `after`) that satisfies `pred`, and returns it.
    pub fn wait_heartbeat(
        &self,
        after: u64,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&HeartbeatRequest) -> bool,
    ) -> HeartbeatRecord {
        let deadline = Instant::now() + timeout;
        let mut checked = after;
        loop {
            for record in self.heartbeats_after(checked) {
                checked = record.seq;
                if pred(&record.request) {
                    return record;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "no heartbeat with {what} after {timeout:?}; latest: {:#?}",
                    self.latest_heartbeat()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a heartbeat reports `vm_id` in a state satisfying `pred` and returns it;
    /// panics with the last state seen when the time runs out.
    pub fn wait_observed(
        &self,
        vm_id: &str,
        timeout: Duration,
        pred: impl FnMut(&ObservedVm) -> bool,
    ) -> ObservedVm {
        self.wait_observed_after(0, vm_id, timeout, pred)
    }

    /// As [`wait_observed`](Self::wait_observed), for reports in heartbeats with a seq
    /// greater than `after` only.
    pub fn wait_observed_after(
        &self,
        after: u64,
        vm_id: &str,
        timeout: Duration,
        mut pred: impl FnMut(&ObservedVm) -> bool,
    ) -> ObservedVm {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((seq, vm)) = self.observed(vm_id) {
                if seq > after && pred(&vm) {
                    return vm;
                }
            }
            if Instant::now() >= deadline {
                let last = self.observed(vm_id);
                panic!(
                    "{vm_id}: no matching report after {timeout:?} (heartbeats after #{after}); last seen: {last:#?}\nlatest heartbeat #{}",
                    self.mark()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = std::fs::remove_file(&self.path);
            if let Some(tx) = server.shutdown.take() {
                let _ = tx.send(());
            }
            server.runtime.shutdown_background();
        }
    }
}

/// A registration of host `name` (machine `machine-NAME`, zone z1, 4 CPUs, 4 GiB, 4 GiB of
/// disk), as an agent would send it.
pub fn registration(name: &str) -> RegisterHostRequest {
    let resources = fabric_proto::v1::Resources {
        cpus: 4,
        memory_mib: 4096,
        disk_mib: 4096,
    };
    RegisterHostRequest {
        machine_id: format!("machine-{name}"),
        name: name.into(),
        zone: "z1".into(),
        capacity: Some(resources),
        allocatable: Some(resources),
        ..Default::default()
    }
}
