//! The Compute service: the operators' API.

use std::pin::Pin;
use std::sync::Arc;

use fabric_proto::v1::compute_server::Compute;
use fabric_proto::v1::{
    CordonHostRequest, CreateVmRequest, DeleteVmRequest, DeleteVmResponse, DesiredState,
    DrainHostRequest, Event, GetHostRequest, GetVmRequest, Host, HostState, ListHostsRequest,
    ListHostsResponse, ListVmsRequest, ListVmsResponse, ReinstateHostRequest,
    ReinstateHostResponse, RemoveHostRequest, RemoveHostResponse, RevokeHostRequest,
    RevokeHostResponse, StartVmRequest, StopVmRequest, UncordonHostRequest, Vm, VmPhase, VmStatus,
    WatchEventsRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::controller::{new_id, Controller};
use crate::images::ImageStore;
use crate::validate;

/// Default and largest page of a list call.
const DEFAULT_PAGE: usize = 500;
const MAX_PAGE: usize = 5000;

/// WatchEvents streams served at once; more are refused (RESOURCE_EXHAUSTED): each holds
/// buffers the controller cannot shed while its client does not read.
pub const MAX_EVENT_WATCHERS: usize = 256;
/// Events queued for one watcher before it must read (then the broadcast's backlog, then
/// DATA_LOSS).
const WATCHER_QUEUE: usize = 32;

pub struct ComputeService {
    controller: Arc<Controller>,
    images: Arc<ImageStore>,
    watchers: Arc<tokio::sync::Semaphore>,
}

impl ComputeService {
    pub fn new(controller: Arc<Controller>, images: Arc<ImageStore>) -> ComputeService {
        ComputeService {
            controller,
            images,
            watchers: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_WATCHERS)),
        }
    }
}

fn page_size(requested: u32) -> usize {
    match requested as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn create_vm(&self, request: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let req = request.into_inner();
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        validate::check_spec(&spec).map_err(Status::invalid_argument)?;
        let desired = match DesiredState::try_from(req.desired_state) {
            Ok(DesiredState::Stopped) => DesiredState::Stopped,
            Ok(_) => DesiredState::Running,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "desired_state {}: unknown",
                    req.desired_state
                )))
            }
        };
        // No image file is collected between resolving the image and committing the VM
        // that refers to its files.
        let _resolving = self.images.collecting.read().await;
        if let Some(image) = spec.image.as_mut() {
            self.images.resolve(image).await?;
        }
        let disk_mib = self.images.vm_disk_mib(&spec).await?;
        let id = new_id("vm");
        validate::fill_defaults(&mut spec, &id);
        let now = prost_types::Timestamp::from(fabric_proto::clock::now());
        let (phase, reason) = match desired {
            DesiredState::Stopped => (VmPhase::Stopped, "created stopped"),
            _ => (VmPhase::Pending, "waiting for placement"),
        };
        let vm = Vm {
            id,
            spec: Some(spec),
            status: Some(VmStatus {
                desired_state: desired as i32,
                phase: phase as i32,
                host_id: String::new(),
                reason: reason.to_string(),
                observed: None,
                phase_changed_at: Some(now),
            }),
            generation: 1,
            created_at: Some(now),
            updated_at: Some(now),
            disk_mib,
        };
        Ok(Response::new(self.controller.create_vm(vm).await?))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        Ok(Response::new(
            self.controller.get_vm(&request.into_inner().id)?,
        ))
    }

    async fn list_vms(
        &self,
        request: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let req = request.into_inner();
        let phase = VmPhase::try_from(req.phase)
            .map_err(|_| Status::invalid_argument(format!("phase {}: unknown", req.phase)))?;
        let size = page_size(req.page_size);
        let model = self.controller.model();
        let start = std::ops::Bound::Excluded(req.page_token.clone());
        let range = if req.page_token.is_empty() {
            model.vms.range::<String, _>(..)
        } else {
            model.vms.range((start, std::ops::Bound::Unbounded))
        };
        let mut vms = Vec::new();
        let mut next = String::new();
        for (id, entry) in range {
            let status = entry.vm.status.clone().unwrap_or_default();
            if !req.host_id.is_empty() && status.host_id != req.host_id {
                continue;
            }
            if !req.name.is_empty()
                && entry.vm.spec.as_ref().map(|s| s.name.as_str()) != Some(req.name.as_str())
            {
                continue;
            }
            if phase != VmPhase::Unspecified && status.phase() != phase {
                continue;
            }
            if vms.len() == size {
                next = vms.last().map(|v: &Vm| v.id.clone()).unwrap_or_default();
                break;
            }
            let _ = id;
            vms.push(self.controller.with_observed(&model, &entry.vm));
        }
        Ok(Response::new(ListVmsResponse {
            vms,
            next_page_token: next,
        }))
    }

    async fn delete_vm(
        &self,
        request: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        self.controller.delete_vm(&request.into_inner().id).await?;
        Ok(Response::new(DeleteVmResponse {}))
    }

    async fn start_vm(&self, request: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(
            self.controller
                .set_desired(&id, DesiredState::Running)
                .await?,
        ))
    }

    async fn stop_vm(&self, request: Request<StopVmRequest>) -> Result<Response<Vm>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(
            self.controller
                .set_desired(&id, DesiredState::Stopped)
                .await?,
        ))
    }

    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let req = request.into_inner();
        let state = HostState::try_from(req.state)
            .map_err(|_| Status::invalid_argument(format!("state {}: unknown", req.state)))?;
        let size = page_size(req.page_size);
        let model = self.controller.model();
        let mut hosts: Vec<Host> = Vec::new();
        let mut next = String::new();
        for (id, entry) in model.hosts.iter() {
            if !req.page_token.is_empty() && id.as_str() <= req.page_token.as_str() {
                continue;
            }
            if !req.zone.is_empty() && entry.host.zone != req.zone {
                continue;
            }
            let view = self.controller.host_view(&model, entry);
            if state != HostState::Unspecified && view.state() != state {
                continue;
            }
            if hosts.len() == size {
                next = hosts.last().map(|h| h.id.clone()).unwrap_or_default();
                break;
            }
            hosts.push(view);
        }
        Ok(Response::new(ListHostsResponse {
            hosts,
            next_page_token: next,
        }))
    }

    async fn get_host(&self, request: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        Ok(Response::new(
            self.controller.get_host(&request.into_inner().id)?,
        ))
    }

    async fn cordon_host(
        &self,
        request: Request<CordonHostRequest>,
    ) -> Result<Response<Host>, Status> {
        let req = request.into_inner();
        crate::validate::check_reason(&req.reason).map_err(Status::invalid_argument)?;
        let current = self.controller.get_host(&req.id)?;
        if current.state() == HostState::Draining {
            // Already cordoned, and draining: cordoning again does not stop the drain.
            return Ok(Response::new(current));
        }
        Ok(Response::new(
            self.controller
                .set_host_admin(&req.id, HostState::Cordoned, &req.reason)
                .await?,
        ))
    }

    async fn uncordon_host(
        &self,
        request: Request<UncordonHostRequest>,
    ) -> Result<Response<Host>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.controller
                .set_host_admin(&req.id, HostState::Ready, "")
                .await?,
        ))
    }

    async fn drain_host(
        &self,
        request: Request<DrainHostRequest>,
    ) -> Result<Response<Host>, Status> {
        let req = request.into_inner();
        crate::validate::check_reason(&req.reason).map_err(Status::invalid_argument)?;
        Ok(Response::new(
            self.controller
                .set_host_admin(&req.id, HostState::Draining, &req.reason)
                .await?,
        ))
    }

    async fn remove_host(
        &self,
        request: Request<RemoveHostRequest>,
    ) -> Result<Response<RemoveHostResponse>, Status> {
        let req = request.into_inner();
        self.controller.remove_host(&req.id).await?;
        Ok(Response::new(RemoveHostResponse {}))
    }

    async fn revoke_host(
        &self,
        request: Request<RevokeHostRequest>,
    ) -> Result<Response<RevokeHostResponse>, Status> {
        let by = fabric_proto::tls::caller(&request)?.to_string();
        let req = request.into_inner();
        let newly_revoked = self
            .controller
            .revoke_host(&req.name, &req.reason, &by)
            .await?;
        Ok(Response::new(RevokeHostResponse { newly_revoked }))
    }

    async fn reinstate_host(
        &self,
        request: Request<ReinstateHostRequest>,
    ) -> Result<Response<ReinstateHostResponse>, Status> {
        let by = fabric_proto::tls::caller(&request)?.to_string();
        let req = request.into_inner();
        let was_revoked = self.controller.reinstate_host(&req.name, &by).await?;
        Ok(Response::new(ReinstateHostResponse { was_revoked }))
    }

    async fn create_join_token(
        &self,
        request: Request<fabric_proto::v1::CreateJoinTokenRequest>,
    ) -> Result<Response<fabric_proto::v1::CreateJoinTokenResponse>, Status> {
        let by = fabric_proto::tls::caller(&request)?.to_string();
        let req = request.into_inner();
        let (token, info) = self
            .controller
            .create_join_token(&req.host_name, req.ttl_seconds, &by)
            .await?;
        Ok(Response::new(fabric_proto::v1::CreateJoinTokenResponse {
            token,
            info: Some(info),
        }))
    }

    async fn list_join_tokens(
        &self,
        _request: Request<fabric_proto::v1::ListJoinTokensRequest>,
    ) -> Result<Response<fabric_proto::v1::ListJoinTokensResponse>, Status> {
        let tokens = self.controller.list_join_tokens().await?;
        Ok(Response::new(fabric_proto::v1::ListJoinTokensResponse {
            tokens,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_EVENT_WATCHERS} event watchers are connected: the controller takes no more"
            ))
        })?;
        // since_sequence 0: only what happens from now on.
        let (past, mut live, mut last) = self.controller.events.subscribe(req.since_sequence);
        let (tx, rx) = tokio::sync::mpsc::channel(WATCHER_QUEUE);
        let wanted = move |e: &Event| {
            (req.vm_id.is_empty() || e.vm_id == req.vm_id)
                && (req.host_id.is_empty() || e.host_id == req.host_id)
        };
        tokio::spawn(async move {
            let _permit = permit;
            for event in past {
                last = event.sequence;
                if wanted(&event) && tx.send(Ok(event.as_ref().clone())).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    received = live.recv() => match received {
                        Ok(event) => {
                            if event.sequence <= last {
                                continue;
                            }
                            last = event.sequence;
                            if wanted(&event) && tx.send(Ok(event.as_ref().clone())).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx
                                .send(Err(Status::data_loss(format!(
                                    "the watcher fell {n} events behind; resume with since_sequence={last}"
                                ))))
                                .await;
                            return;
                        }
                        Err(_) => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Settings;
    use crate::events::LIVE_BACKLOG;
    use crate::store::redb::RedbStore;
    use fabric_proto::v1::HostState;
    use tokio_stream::StreamExt;

    fn service(dir: &std::path::Path) -> ComputeService {
        let store: Arc<dyn crate::store::Store> =
            Arc::new(RedbStore::open(&dir.join("store.redb")).expect("store"));
        let settings = Settings {
            data_dir: dir.to_owned(),
            lease_ttl: std::time::Duration::from_secs(600),
            heartbeat_interval: std::time::Duration::from_secs(1),
            fencing_margin: std::time::Duration::from_secs(5),
            cpu_overcommit: 4.0,
            memory_relief_window: std::time::Duration::ZERO,
        };
        let controller = Controller::load(settings, store.clone()).expect("controller");
        let images = ImageStore::new(dir, store, 1024).expect("image store");
        ComputeService::new(controller, Arc::new(images))
    }

    async fn watch(service: &ComputeService, since_sequence: u64) -> EventStream {
        service
            .watch_events(Request::new(WatchEventsRequest {
                since_sequence,
                ..Default::default()
            }))
            .await
            .expect("a watcher")
            .into_inner()
    }

    fn emit(service: &ComputeService, count: usize) {
        for i in 0..count {
            service
                .controller
                .events
                .host_state("h", HostState::Ready, "", format!("{i}"));
        }
    }

    /// What a watcher reads until the stream ends or is quiet for a while: its events'
    /// sequences, and the error that ended it.
    async fn read(stream: &mut EventStream) -> (Vec<u64>, Option<Status>) {
        let mut sequences = Vec::new();
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(300), stream.next()).await {
                Ok(Some(Ok(event))) => sequences.push(event.sequence),
                Ok(Some(Err(status))) => return (sequences, Some(status)),
                Ok(None) | Err(_) => return (sequences, None),
            }
        }
    }

    /// A live watcher that does not read while the controller emits: up to the broadcast's
    /// backlog behind, it gets every event once it reads; one more, and it gets DATA_LOSS
    /// naming where to resume, from where a new watcher gets every event it missed. (The
    /// test's runtime has one thread: the watcher's task runs only when the test reads, so it
    /// queues nothing of its own before.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_watcher_too_far_behind_gets_data_loss_and_resumes_losing_nothing() {
        assert_eq!(LIVE_BACKLOG, 8192, "the figure docs/limits.md gives");
        let dir = tempfile::tempdir().expect("temp dir");
        let service = service(dir.path());

        let mut near = watch(&service, 0).await;
        emit(&service, LIVE_BACKLOG);
        let (got, error) = read(&mut near).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(got.len(), LIVE_BACKLOG);
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "in order, no gap");

        // With events before it, since_sequence 0: only what follows.
        let mut far = watch(&service, 0).await;
        let first_missed = service
            .controller
            .events
            .retained()
            .last()
            .unwrap()
            .sequence
            + 1;
        emit(&service, LIVE_BACKLOG + 1);
        let (got, error) = read(&mut far).await;
        let error = error.expect("DATA_LOSS");
        assert_eq!(error.code(), tonic::Code::DataLoss, "{error:?}");
        let resume: u64 = error
            .message()
            .split("resume with since_sequence=")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no sequence to resume from: {error:?}"));
        assert_eq!(resume, got.last().map_or(first_missed - 1, |s| *s));
        let newest = service
            .controller
            .events
            .retained()
            .last()
            .unwrap()
            .sequence;
        let (rest, error) = read(&mut watch(&service, resume).await).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(rest.first(), Some(&(resume + 1)), "resumed where told");
        assert_eq!(rest.last(), Some(&newest));
        assert_eq!(rest.len() as u64, newest - resume);
    }
}
