//! The Compute service: the operators' API.
//!
//! Every handler starts from a [`Call`]: the caller, its grants and the request's digest.
//! The authorization layer has already checked the caller's roles allow the method at all
//! (`authz::RULES`); here each call is limited to the caller's projects: another project's VM
//! is NOT_FOUND (as if it did not exist), lists and event streams leave it out. Mutations are
//! audited in their own commit; refusals and failed mutations through the audit queue.

use std::collections::HashMap;
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

use crate::authz::Grants;
use crate::controller::{new_id, Controller};
use crate::events::Logged;
use crate::images::ImageStore;
use crate::validate;
use fabric_proto::tls::Identity;
use fabric_proto::v1::{
    AuditEntry, BindRoleRequest, BindRoleResponse, GetQuotaRequest, ListAuditRequest,
    ListAuditResponse, ListRoleBindingsRequest, ListRoleBindingsResponse, ProjectQuota, Role,
    SetQuotaRequest, UnbindRoleRequest, UnbindRoleResponse,
};

/// Default and largest page of a list call.
const DEFAULT_PAGE: usize = 500;
const MAX_PAGE: usize = 5000;

/// WatchEvents streams served at once; more are refused (RESOURCE_EXHAUSTED): each holds
/// buffers the controller cannot shed while its client does not read.
pub const MAX_EVENT_WATCHERS: usize = 256;
/// Events queued for one watcher before it must read (then the broadcast's backlog, then
/// DATA_LOSS).
const WATCHER_QUEUE: usize = 32;

/// WatchEvents streams one identity holds at once (local-root excepted), so that one user
/// cannot take every slot of [`MAX_EVENT_WATCHERS`].
pub const MAX_EVENT_WATCHERS_PER_CALLER: usize = 16;

const WATCH_EVENTS: &str = "/fabric.v1.Compute/WatchEvents";

pub struct ComputeService {
    controller: Arc<Controller>,
    images: Arc<ImageStore>,
    watchers: Arc<tokio::sync::Semaphore>,
    /// Open WatchEvents streams per identity.
    watchers_by_caller: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

impl ComputeService {
    pub fn new(controller: Arc<Controller>, images: Arc<ImageStore>) -> ComputeService {
        ComputeService {
            controller,
            images,
            watchers: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_WATCHERS)),
            watchers_by_caller: Default::default(),
        }
    }

    /// A slot among `caller`'s [`MAX_EVENT_WATCHERS_PER_CALLER`] streams, held until the
    /// stream ends; RESOURCE_EXHAUSTED when all are taken. Root on the Unix socket is not
    /// counted (it is the machine's administrator, not a network client).
    fn per_caller_watcher(&self, caller: &Identity) -> Result<Option<CallerWatcher>, Status> {
        if *caller == Identity::LocalRoot {
            return Ok(None);
        }
        let key = caller.to_string();
        let mut counts = self
            .watchers_by_caller
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= MAX_EVENT_WATCHERS_PER_CALLER {
            return Err(Status::resource_exhausted(format!(
                "{caller} has {MAX_EVENT_WATCHERS_PER_CALLER} event watchers connected: \
                 close one first"
            )));
        }
        *count += 1;
        Ok(Some(CallerWatcher {
            counts: self.watchers_by_caller.clone(),
            key,
        }))
    }
}

/// One of a caller's watcher slots, given back on drop.
struct CallerWatcher {
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for CallerWatcher {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl ComputeService {
    fn call<T: prost::Message>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
    ) -> Result<Call, Status> {
        let identity = fabric_proto::tls::caller(request)?;
        let grants = self.controller.grants(&identity);
        Ok(Call {
            identity,
            grants,
            rpc,
            digest: crate::audit::digest(request.get_ref()),
        })
    }

    /// Audits a refused or failed call (never waits), and passes the status on.
    fn refused(&self, call: &Call, project: &str, target: &str, status: Status) -> Status {
        self.controller
            .audit
            .record(call.entry(project, target, Err(&status)));
        status
    }

    /// VM `id` if the caller holds `need` in its project: NOT_FOUND when the caller cannot
    /// see it (or it does not exist), PERMISSION_DENIED when it can see it but not do this.
    /// Refusals are audited.
    fn vm_for(&self, call: &Call, id: &str, need: Role) -> Result<Vm, Status> {
        let target = format!("vm/{id}");
        let vm = match self.controller.get_vm(id) {
            Ok(vm) => vm,
            Err(status) => {
                // A mutation of a VM that does not exist is audited; a read is not.
                return Err(if need > Role::Viewer {
                    self.refused(call, "", &target, status)
                } else {
                    status
                });
            }
        };
        let project = vm_project(&vm).to_string();
        if !call.grants.can(Role::Viewer, &project) {
            return Err(self.refused(call, &project, &target, vm_not_found(id)));
        }
        if !call.grants.can(need, &project) {
            let status = Status::permission_denied(format!(
                "{} may not call {}: it needs role {} in project {project}",
                call.identity,
                call.rpc,
                crate::authz::role_name(need)
            ));
            return Err(self.refused(call, &project, &target, status));
        }
        Ok(vm)
    }

    /// Runs a mutation of VM `id` that commits `ok` (its audit entry) with the change; a
    /// failure is audited through the queue.
    async fn mutate_vm<R, F, Fut>(&self, call: &Call, id: &str, run: F) -> Result<R, Status>
    where
        F: FnOnce(AuditEntry) -> Fut,
        Fut: std::future::Future<Output = Result<R, Status>>,
    {
        let vm = self.vm_for(call, id, Role::Operator)?;
        let project = vm_project(&vm).to_string();
        let target = format!("vm/{id}");
        let ok = call.entry(&project, &target, Ok(()));
        run(ok)
            .await
            .map_err(|status| self.refused(call, &project, &target, status))
    }

    /// Audits the outcome of a host or identity call: its entry `ok` was committed with its
    /// change if the controller took it; else (nothing changed, or the call failed) it is
    /// recorded now.
    fn audited<R>(
        &self,
        call: &Call,
        target: &str,
        ok: Option<AuditEntry>,
        result: Result<R, Status>,
    ) -> Result<R, Status> {
        match result {
            Ok(r) => {
                if let Some(entry) = ok {
                    self.controller.audit.record(entry);
                }
                Ok(r)
            }
            Err(status) => Err(self.refused(call, "", target, status)),
        }
    }
}

impl ComputeService {
    /// CreateVm once the caller may create in `project`.
    async fn create_vm_in(
        &self,
        req: CreateVmRequest,
        project: String,
        ok: AuditEntry,
    ) -> Result<Vm, Status> {
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        spec.project = project;
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
        self.controller.create_vm(vm, Some(ok)).await
    }
}

fn page_size(requested: u32) -> usize {
    match requested as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

/// One call as the handlers see it: who, with which grants, which method and request.
pub struct Call {
    pub identity: Identity,
    pub grants: Grants,
    pub rpc: &'static str,
    pub digest: String,
}

impl Call {
    /// The audit entry of this call's outcome.
    pub fn entry(&self, project: &str, target: &str, outcome: Result<(), &Status>) -> AuditEntry {
        let (code, message) = match outcome {
            Ok(()) => (0, String::new()),
            Err(status) => (status.code() as i32, status.message().to_string()),
        };
        AuditEntry {
            identity: self.identity.to_string(),
            roles: self.grants.describe(),
            project: project.to_string(),
            rpc: format!("/{}/{}", fabric_proto::COMPUTE_SERVICE, self.rpc),
            target: target.to_string(),
            code,
            message,
            request_sha256: self.digest.clone(),
            ..Default::default()
        }
    }
}

/// The answer for a VM the caller may not see: the same as for a VM that does not exist.
fn vm_not_found(id: &str) -> Status {
    Status::not_found(format!("no VM with id {id:?}"))
}

/// A VM's project; VMs stored before projects existed are in the default one.
fn vm_project(vm: &Vm) -> &str {
    match vm.spec.as_ref().map_or("", |s| s.project.as_str()) {
        "" => crate::authz::DEFAULT_PROJECT,
        project => project,
    }
}

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn create_vm(&self, request: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let call = self.call(&request, "CreateVm")?;
        let req = request.into_inner();
        let name = req
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let target = format!("vm-name/{}", name.chars().take(64).collect::<String>());
        let project = req
            .spec
            .as_ref()
            .map(|s| s.project.clone())
            .unwrap_or_default();
        let project = match crate::authz::project_or_default(&project) {
            Ok(p) => p,
            Err(e) => {
                let status = Status::invalid_argument(format!("spec.{e}"));
                return Err(self.refused(&call, "", &target, status));
            }
        };
        if !call.grants.can(Role::Operator, &project) {
            let status = Status::permission_denied(format!(
                "{} may not create VMs in project {project}: it needs role operator there",
                call.identity
            ));
            return Err(self.refused(&call, &project, &target, status));
        }
        let ok = call.entry(&project, &target, Ok(()));
        self.create_vm_in(req, project.clone(), ok)
            .await
            .map(Response::new)
            .map_err(|status| self.refused(&call, &project, &target, status))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        let call = self.call(&request, "GetVm")?;
        let id = request.into_inner().id;
        Ok(Response::new(self.vm_for(&call, &id, Role::Viewer)?))
    }

    async fn list_vms(
        &self,
        request: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let call = self.call(&request, "ListVms")?;
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
            // Another project's VMs are left out, as if they did not exist.
            if !call.grants.can(Role::Viewer, vm_project(&entry.vm)) {
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
        let call = self.call(&request, "DeleteVm")?;
        let id = request.into_inner().id;
        self.mutate_vm(&call, &id, |ok| self.controller.delete_vm(&id, Some(ok)))
            .await?;
        Ok(Response::new(DeleteVmResponse {}))
    }

    async fn start_vm(&self, request: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        let call = self.call(&request, "StartVm")?;
        let id = request.into_inner().id;
        let vm = self
            .mutate_vm(&call, &id, |ok| {
                self.controller
                    .set_desired(&id, DesiredState::Running, Some(ok))
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn stop_vm(&self, request: Request<StopVmRequest>) -> Result<Response<Vm>, Status> {
        let call = self.call(&request, "StopVm")?;
        let id = request.into_inner().id;
        let vm = self
            .mutate_vm(&call, &id, |ok| {
                self.controller
                    .set_desired(&id, DesiredState::Stopped, Some(ok))
            })
            .await?;
        Ok(Response::new(vm))
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
        let call = self.call(&request, "CordonHost")?;
        let req = request.into_inner();
        let target = format!("host/{}", req.id);
        let mut ok = Some(call.entry("", &target, Ok(())));
        let result = async {
            crate::validate::check_reason(&req.reason).map_err(Status::invalid_argument)?;
            let current = self.controller.get_host(&req.id)?;
            if current.state() == HostState::Draining {
                // Already cordoned, and draining: cordoning again does not stop the drain.
                return Ok(current);
            }
            self.controller
                .set_host_admin_audited(&req.id, HostState::Cordoned, &req.reason, &mut ok)
                .await
        }
        .await;
        self.audited(&call, &target, ok, result).map(Response::new)
    }

    async fn uncordon_host(
        &self,
        request: Request<UncordonHostRequest>,
    ) -> Result<Response<Host>, Status> {
        let call = self.call(&request, "UncordonHost")?;
        let req = request.into_inner();
        let target = format!("host/{}", req.id);
        let mut ok = Some(call.entry("", &target, Ok(())));
        let result = self
            .controller
            .set_host_admin_audited(&req.id, HostState::Ready, "", &mut ok)
            .await;
        self.audited(&call, &target, ok, result).map(Response::new)
    }

    async fn drain_host(
        &self,
        request: Request<DrainHostRequest>,
    ) -> Result<Response<Host>, Status> {
        let call = self.call(&request, "DrainHost")?;
        let req = request.into_inner();
        let target = format!("host/{}", req.id);
        let mut ok = Some(call.entry("", &target, Ok(())));
        let result = async {
            crate::validate::check_reason(&req.reason).map_err(Status::invalid_argument)?;
            self.controller
                .set_host_admin_audited(&req.id, HostState::Draining, &req.reason, &mut ok)
                .await
        }
        .await;
        self.audited(&call, &target, ok, result).map(Response::new)
    }

    async fn remove_host(
        &self,
        request: Request<RemoveHostRequest>,
    ) -> Result<Response<RemoveHostResponse>, Status> {
        let call = self.call(&request, "RemoveHost")?;
        let req = request.into_inner();
        let target = format!("host/{}", req.id);
        let mut ok = Some(call.entry("", &target, Ok(())));
        let result = self.controller.remove_host(&req.id, &mut ok).await;
        self.audited(&call, &target, ok, result)?;
        Ok(Response::new(RemoveHostResponse {}))
    }

    async fn revoke_host(
        &self,
        request: Request<RevokeHostRequest>,
    ) -> Result<Response<RevokeHostResponse>, Status> {
        let call = self.call(&request, "RevokeHost")?;
        let by = call.identity.to_string();
        let req = request.into_inner();
        let target = format!(
            "host-name/{}",
            req.name.chars().take(64).collect::<String>()
        );
        let mut ok = Some(call.entry("", &target, Ok(())));
        let result = self
            .controller
            .revoke_host(&req.name, &req.reason, &by, &mut ok)
            .await;
        let newly_revoked = self.audited(&call, &target, ok, result)?;
        Ok(Response::new(RevokeHostResponse { newly_revoked }))
    }

    async fn reinstate_host(
        &self,
        request: Request<ReinstateHostRequest>,
    ) -> Result<Response<ReinstateHostResponse>, Status> {
        let call = self.call(&request, "ReinstateHost")?;
        let by = call.identity.to_string();
        let req = request.into_inner();
        let target = format!(
            "host-name/{}",
            req.name.chars().take(64).collect::<String>()
        );
        let mut ok = Some(call.entry("", &target, Ok(())));
        let result = self
            .controller
            .reinstate_host(&req.name, &by, &mut ok)
            .await;
        let was_revoked = self.audited(&call, &target, ok, result)?;
        Ok(Response::new(ReinstateHostResponse { was_revoked }))
    }

    async fn bind_role(
        &self,
        request: Request<BindRoleRequest>,
    ) -> Result<Response<BindRoleResponse>, Status> {
        let call = self.call(&request, "BindRole")?;
        let binding = request.into_inner().binding.unwrap_or_default();
        let newly_bound = self.change_binding(&call, &binding, true).await?;
        Ok(Response::new(BindRoleResponse { newly_bound }))
    }

    async fn unbind_role(
        &self,
        request: Request<UnbindRoleRequest>,
    ) -> Result<Response<UnbindRoleResponse>, Status> {
        let call = self.call(&request, "UnbindRole")?;
        let binding = request.into_inner().binding.unwrap_or_default();
        let was_bound = self.change_binding(&call, &binding, false).await?;
        Ok(Response::new(UnbindRoleResponse { was_bound }))
    }

    async fn list_role_bindings(
        &self,
        request: Request<ListRoleBindingsRequest>,
    ) -> Result<Response<ListRoleBindingsResponse>, Status> {
        let user = request.into_inner().user;
        if !user.is_empty() {
            fabric_proto::tls::check_name("user", &user).map_err(Status::invalid_argument)?;
        }
        Ok(Response::new(ListRoleBindingsResponse {
            bindings: self.controller.role_bindings(&user),
        }))
    }

    async fn set_quota(
        &self,
        request: Request<SetQuotaRequest>,
    ) -> Result<Response<ProjectQuota>, Status> {
        let call = self.call(&request, "SetQuota")?;
        let mut quota = request.into_inner().quota.unwrap_or_default();
        let project = crate::authz::project_or_default(&quota.project)
            .map_err(|e| self.refused(&call, "", "", Status::invalid_argument(e)))?;
        quota.project = project.clone();
        let target = format!("project/{project}");
        let ok = call.entry(&project, &target, Ok(()));
        let view = self
            .controller
            .set_quota(quota, ok)
            .await
            .map_err(|status| self.refused(&call, &project, &target, status))?;
        Ok(Response::new(view))
    }

    async fn get_quota(
        &self,
        request: Request<GetQuotaRequest>,
    ) -> Result<Response<ProjectQuota>, Status> {
        let call = self.call(&request, "GetQuota")?;
        let project = crate::authz::project_or_default(&request.into_inner().project)
            .map_err(Status::invalid_argument)?;
        if !call.grants.can(Role::Viewer, &project) {
            let status = Status::permission_denied(format!(
                "{} may not read the quota of project {project}",
                call.identity
            ));
            return Err(self.refused(&call, &project, &format!("project/{project}"), status));
        }
        Ok(Response::new(self.controller.quota_view(&project)))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let req = request.into_inner();
        if req.identity.len() > 128 || req.project.len() > 64 {
            return Err(Status::invalid_argument(
                "identity (at most 128 bytes) and project (at most 64) filters",
            ));
        }
        let since = req.since.map(|t| (t.seconds, t.nanos));
        let keep = move |e: &AuditEntry| {
            (req.identity.is_empty() || e.identity == req.identity)
                && (req.project.is_empty() || e.project == req.project)
                && since.is_none_or(|s| e.time.as_ref().is_some_and(|t| (t.seconds, t.nanos) >= s))
        };
        let size = match req.page_size as usize {
            0 => 500,
            n => n.min(crate::audit::MAX_PAGE),
        };
        let audit = self.controller.audit.clone();
        let after = req.after_sequence;
        let (entries, last_sequence) =
            tokio::task::spawn_blocking(move || audit.list(after, size, keep))
                .await
                .map_err(|e| Status::internal(format!("audit task: {e}")))?
                .map_err(crate::controller::unavailable)?;
        Ok(Response::new(ListAuditResponse {
            entries,
            last_sequence,
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<fabric_proto::v1::CreateJoinTokenRequest>,
    ) -> Result<Response<fabric_proto::v1::CreateJoinTokenResponse>, Status> {
        let call = self.call(&request, "CreateJoinToken")?;
        let by = call.identity.to_string();
        let req = request.into_inner();
        let target = format!(
            "host/{}",
            req.host_name.chars().take(64).collect::<String>()
        );
        let (token, info) = self
            .controller
            .create_join_token(&req.host_name, req.ttl_seconds, &by)
            .await
            .map_err(|status| self.refused(&call, "", &target, status))?;
        // The token is stored; its entry follows (the secret is never in it).
        self.controller
            .audit
            .record(call.entry("", &target, Ok(())));
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
        let caller = fabric_proto::tls::caller(&request)?;
        // Subscribed before the grants are read: a binding changed after is seen below.
        let mut grants_changed = self.controller.grants_changed.subscribe();
        let mut grants = self.controller.grants(&caller);
        let req = request.into_inner();
        let per_caller = self.per_caller_watcher(&caller)?;
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_EVENT_WATCHERS} event watchers are connected: the controller takes no more"
            ))
        })?;
        // since_sequence 0: only what happens from now on.
        let (past, mut live, mut last) = self.controller.events.subscribe(req.since_sequence);
        let (tx, rx) = tokio::sync::mpsc::channel(WATCHER_QUEUE);
        let controller = self.controller.clone();
        // A cluster-wide viewer sees every event; anyone else only the events of VMs in
        // projects they may view (the event carries its VM's project, so a VM's deletion is
        // filtered like its other events). Host-only events are cluster-wide: only
        // cluster-wide viewers see them. The grants are read again whenever role bindings
        // change; a caller that may no longer watch has its stream ended.
        let wanted = move |e: &Logged, grants: &Grants| {
            if !((req.vm_id.is_empty() || e.vm_id == req.vm_id)
                && (req.host_id.is_empty() || e.host_id == req.host_id))
            {
                return false;
            }
            if grants.everywhere(Role::Viewer) {
                return true;
            }
            !e.vm_id.is_empty()
                && e.project
                    .as_deref()
                    .is_some_and(|p| grants.can(Role::Viewer, p))
        };
        // Viewer somewhere, as the authorization layer's rule for WatchEvents asks.
        let may_watch = |grants: &Grants| {
            grants.everywhere(Role::Viewer) || grants.projects.values().any(|r| *r >= Role::Viewer)
        };
        if !may_watch(&grants) {
            return Err(Status::permission_denied(
                "watching events needs the viewer role",
            ));
        }
        tokio::spawn(async move {
            let _permit = permit;
            let _per_caller = per_caller;
            for event in past {
                last = event.sequence;
                if wanted(&event, &grants) && tx.send(Ok(event.event.clone())).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    biased;
                    changed = grants_changed.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        grants = controller.grants(&caller);
                        if !may_watch(&grants) {
                            let status = Status::permission_denied(format!(
                                "{caller}: role bindings changed: watching events needs the viewer role"
                            ));
                            controller.audit.record(AuditEntry {
                                identity: caller.to_string(),
                                roles: grants.describe(),
                                rpc: WATCH_EVENTS.to_string(),
                                code: status.code() as i32,
                                message: status.message().to_string(),
                                ..Default::default()
                            });
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                    received = live.recv() => match received {
                        Ok(event) => {
                            if event.sequence <= last {
                                continue;
                            }
                            last = event.sequence;
                            if wanted(&event, &grants) && tx.send(Ok(event.event.clone())).await.is_err() {
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

impl ComputeService {
    /// BindRole (`bind`) or UnbindRole: the binding checked, the change made with its audit
    /// entry (refusals audited too); whether anything changed.
    async fn change_binding(
        &self,
        call: &Call,
        binding: &fabric_proto::v1::RoleBinding,
        bind: bool,
    ) -> Result<bool, Status> {
        let target = format!("user/{}", binding.user.chars().take(64).collect::<String>());
        let (user, project, role) = Controller::check_binding(binding)
            .map_err(|status| self.refused(call, &binding.project, &target, status))?;
        let ok = call.entry(project.as_deref().unwrap_or(""), &target, Ok(()));
        let changed = if bind {
            self.controller
                .bind_role(&user, project.as_deref(), role, ok)
                .await
        } else {
            self.controller
                .unbind_role(&user, project.as_deref(), role, ok)
                .await
        };
        changed.map_err(|status| self.refused(call, &binding.project, &target, status))
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
            audit_retention: crate::audit::Retention::default(),
        };
        let controller = Controller::load(settings, store.clone()).expect("controller");
        let images = ImageStore::new(dir, store, 1024).expect("image store");
        ComputeService::new(controller, Arc::new(images))
    }

    async fn watch(service: &ComputeService, since_sequence: u64) -> EventStream {
        service
            .watch_events(crate::reconcile::tests::local_root(WatchEventsRequest {
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

    /// Concurrent creates in a project with a quota: exactly as many as the quota allows
    /// commit; a deleted VM frees its share.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_cannot_exceed_a_quota() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = Arc::new(service(dir.path()));
        let quota = ProjectQuota {
            project: "p1".into(),
            vms: 3,
            vcpus: 100,
            ..Default::default()
        };
        service
            .controller
            .set_quota(quota, AuditEntry::default())
            .await
            .expect("quota");
        let mut tasks = Vec::new();
        for i in 0..12 {
            let service = service.clone();
            tasks.push(tokio::spawn(async move {
                let mut spec = fabric_test_support::vmspec::simulated_vm(&format!("q{i}"));
                spec.project = "p1".into();
                service
                    .create_vm(crate::reconcile::tests::local_root(CreateVmRequest {
                        spec: Some(spec),
                        desired_state: DesiredState::Stopped as i32,
                    }))
                    .await
                    .map(|r| r.into_inner().id)
            }));
        }
        let mut created = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                Ok(id) => created.push(id),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert_eq!(
                        status.message(),
                        "project p1: 1 VM requested, 3 of 3 in use (quota vms=3)"
                    );
                }
            }
        }
        assert_eq!(created.len(), 3, "{created:?}");
        assert_eq!(service.controller.usage("p1"), (3, 768, 3));
        // Another project is not held back.
        let mut other = fabric_test_support::vmspec::simulated_vm("other");
        other.project = "p2".into();
        service
            .create_vm(crate::reconcile::tests::local_root(CreateVmRequest {
                spec: Some(other),
                desired_state: DesiredState::Stopped as i32,
            }))
            .await
            .expect("p2 has no quota");
        service
            .controller
            .delete_vm(&created[0], None)
            .await
            .expect("delete");
        let mut again = fabric_test_support::vmspec::simulated_vm("again");
        again.project = "p1".into();
        service
            .create_vm(crate::reconcile::tests::local_root(CreateVmRequest {
                spec: Some(again),
                desired_state: DesiredState::Stopped as i32,
            }))
            .await
            .expect("a deleted VM frees its share");
        // Every create, refused or not, is in the audit log.
        let mut entries = Vec::new();
        for _ in 0..50 {
            let (found, _) = service
                .controller
                .audit
                .list(0, 100, |e| e.rpc.ends_with("/CreateVm"))
                .expect("audit");
            entries = found;
            if entries.len() >= 14 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(entries.len(), 14, "{entries:?}");
        assert_eq!(entries.iter().filter(|e| e.code == 0).count(), 5);
    }
}
