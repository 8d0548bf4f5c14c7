//! The controller's state: VMs and hosts as stored (the durable truth, in the [`Store`]) plus
//! what only lives in memory (leases, what agents observe), and every mutation of it.
//!
//! Writes are optimistic: a mutation reads an object and its revision from memory, commits the
//! new version with a compare on that revision, and installs it in memory once durable; a lost
//! race is retried on the fresh version. Concurrent commits share fsyncs in the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fabric_proto::v1::{
    Assignment, AuditEntry, DesiredState, EventKind, Host, HostState, HostUsage, ObservedPhase,
    ObservedVm, ProjectQuota, Resources, Role, RoleBinding, Vm, VmPhase, VmStatus,
};
use prost::Message;
use tokio::sync::watch;
use tonic::Status;

use crate::events::Events;
use crate::placement::Placer;
use crate::store::{Compare, Revision, Store, Txn, TxnOutcome};

/// Timing of leases and failure detection.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Lease granted by each registration and heartbeat.
    pub lease_ttl: Duration,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// Time after a lease expired before the host is DEAD and its VMs move: covers the agent's
    /// fencing (stopping its VMs) after its own, earlier, view of the expiry.
    pub fencing_margin: Duration,
    /// vCPUs placed per host CPU.
    pub cpu_overcommit: f64,
    /// How long a host must stay short of memory before a VM is moved off it (and, after a
    /// move, before the next one); zero turns memory relief off.
    pub memory_relief_window: Duration,
    /// How much of the audit log is kept.
    pub audit_retention: crate::audit::Retention,
}

impl Settings {
    /// A host with no heartbeat for this long is SUSPECT (its VMs LOST).
    pub fn suspect_after(&self) -> Duration {
        (self.heartbeat_interval * 3).min(self.lease_ttl)
    }
}

pub(crate) struct VmEntry {
    pub vm: Vm,
    pub rev: Revision,
}

/// What only lives in memory about a host.
pub(crate) struct HostLive {
    pub lease_expires: Instant,
    pub last_heartbeat: Instant,
    pub last_heartbeat_wall: SystemTime,
    pub observed: HashMap<String, ObservedVm>,
    pub usage: Option<HostUsage>,
    /// Bumped whenever the host's assignments may have changed.
    pub assignments: watch::Sender<u64>,
    /// The assignment generation the agent last reported applied.
    pub acked_generation: u64,
    /// Per VM, the generation of the update that last told the agent to stop it.
    pub stop_sent: HashMap<String, u64>,
    /// Since when the host has counted as short of memory: from its balancer's first report
    /// saying short, until it has settled on fitting again (see `hostlink`'s
    /// `note_memory_balance`: a host hovering at its budget stays short).
    pub memory_short_since: Option<Instant>,
    /// While a short host reports fitting: the first of those reports in a row, and how many.
    pub memory_fits_run: Option<(Instant, u32)>,
    /// Until when no assignment stream may be sent the host's set: its current agent session
    /// superseded one whose lease (plus the fencing margin) may not have run out yet, so the
    /// machine that held it may still run the VMs until it fences.
    pub assignments_held_until: Option<Instant>,
    /// Set when the host is declared DEAD, cleared once no VM is placed on it any more: its
    /// VMs are being moved elsewhere, so it may be sent no assignments (a registration in
    /// the meantime does not clear it) and nothing is placed on it.
    pub evicting: bool,
}

impl HostLive {
    pub(crate) fn new(now: Instant, lease_ttl: Duration) -> HostLive {
        HostLive {
            lease_expires: now + lease_ttl,
            last_heartbeat: now,
            last_heartbeat_wall: fabric_proto::clock::now(),
            observed: HashMap::new(),
            usage: None,
            assignments: watch::channel(0).0,
            acked_generation: 0,
            stop_sent: HashMap::new(),
            memory_short_since: None,
            memory_fits_run: None,
            assignments_held_until: None,
            evicting: false,
        }
    }
}

/// A VM being moved off a host that stayed short of memory: stopped on `source`, then placed
/// on `destination` (or elsewhere if that no longer fits), until it runs there.
#[derive(Debug, Clone)]
pub(crate) struct ReliefInFlight {
    pub source: String,
    /// Where the relief policy chose to put it.
    pub destination: String,
    /// Where it was placed once stopped on the source (None: not yet).
    pub placed_on: Option<String>,
    /// Since when it has waited PENDING: stopped on the source, and no host but the source
    /// would take it. Ordinary placement then places it anywhere but the source, for up to
    /// a relief window; it is promised to no host meanwhile.
    pub waiting_since: Option<Instant>,
    /// Its want (demand plus buffer), counted against the destination's room until the
    /// destination reports it.
    pub wanted_mib: u64,
}

pub(crate) struct HostEntry {
    pub host: Host,
    pub rev: Revision,
    pub live: HostLive,
}

#[derive(Default)]
pub(crate) struct Model {
    pub vms: BTreeMap<String, VmEntry>,
    pub names: HashMap<String, String>,
    pub hosts: BTreeMap<String, HostEntry>,
    pub machines: HashMap<String, String>,
    /// VMs being moved off draining hosts (asked to stop there first).
    pub evicting: HashSet<String>,
    /// VMs being moved off hosts short of memory, by VM id.
    pub relieving: HashMap<String, ReliefInFlight>,
}

pub struct Controller {
    pub settings: Settings,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) model: Mutex<Model>,
    pub(crate) placer: Mutex<Placer>,
    pub events: Events,
    /// Wakes the reconciler.
    pub(crate) kick: tokio::sync::Notify,
    /// The state last announced per host, so each change is one event.
    announced: Mutex<HashMap<String, HostState>>,
    generation: AtomicU64,
    /// Generations below this may be handed out without writing to the store: it is stored
    /// (`meta/generation-ceiling`) before any generation at or above the stored value is.
    generation_ceiling: Mutex<u64>,
    /// Held by RegisterHost from its name check to its commit, so that two machines
    /// registering the same new name at once cannot both get it (this process is the store's
    /// only writer).
    pub(crate) registering: tokio::sync::Mutex<()>,
    /// Names whose identity host/NAME is refused (RevokeHost), as stored under
    /// `revoked-hosts/`.
    revoked: std::sync::RwLock<std::collections::HashSet<String>>,
    /// Hosts reinstated after a revocation, and when (Unix seconds), as stored under
    /// `reinstated-hosts/`: their certificates issued before that are refused.
    reinstated: std::sync::RwLock<HashMap<String, u64>>,
    /// The audit log.
    pub audit: Arc<crate::audit::Audit>,
    /// Role bindings by (user, project or `*`), as stored under `role-bindings/`.
    bindings: std::sync::RwLock<BTreeMap<(String, String), Role>>,
    /// Bumped after every change of role bindings (anything that may change a caller's
    /// [`Controller::grants`]): open event streams check their caller again.
    pub grants_changed: tokio::sync::watch::Sender<u64>,
    /// Project quotas, as stored under `quotas/`.
    quotas: std::sync::RwLock<BTreeMap<String, ProjectQuota>>,
    /// Held for writing by a CreateVm in a project with a quota from its usage check to its
    /// commit (so that concurrent creates cannot together exceed it) and by SetQuota; for
    /// reading by other creates (so that none that saw no quota commits after one is set).
    quota_check: tokio::sync::RwLock<()>,
    /// Signs hosts' certificates (join, renewal): set when the controller has a TLS
    /// directory (see `join`).
    pub(crate) issuer: std::sync::OnceLock<crate::join::Issuer>,
    /// Held by every read-modify-write of join tokens, so that the bound on their number
    /// holds and a token is spent once.
    pub(crate) join_tokens: tokio::sync::Mutex<()>,
    /// Refused joins, rate-limited.
    pub(crate) refused_joins: crate::join::RefusedJoins,
    /// When each host last renewed its certificate: a host may renew once per tenth of the
    /// certificates' lifetime, so one cannot keep the controller signing.
    pub(crate) renewed: Mutex<HashMap<String, Instant>>,
}

/// The store key of a role binding; `project` None is cluster-wide (`*`).
fn binding_key(user: &str, project: Option<&str>) -> String {
    format!("role-bindings/{user}/{}", project.unwrap_or("*"))
}

fn quota_key(project: &str) -> String {
    format!("quotas/{project}")
}

/// What a project's VMs take: (vCPUs, startup memory MiB, VMs).
pub type Usage = (u64, u64, u64);

/// The store key of when a host was last reinstated.
fn reinstated_key(name: &str) -> String {
    format!("reinstated-hosts/{name}")
}

/// The store key of a revoked host identity.
fn revoked_key(name: &str) -> String {
    format!("revoked-hosts/{name}")
}

pub fn vm_key(id: &str) -> String {
    format!("vms/{id}")
}
fn name_key(name: &str) -> String {
    format!("names/{name}")
}
pub fn host_key(id: &str) -> String {
    format!("hosts/{id}")
}
fn machine_key(machine_id: &str) -> String {
    format!("machines/{machine_id}")
}

fn now_ts() -> prost_types::Timestamp {
    prost_types::Timestamp::from(fabric_proto::clock::now())
}

/// A store failure as the API reports it.
pub fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("store: {e}"))
}

/// A random id with a prefix: `vm-` + 16 hex characters, the form `validate::has_id_form`
/// tells from every name.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Fall back to time and a counter: ids only need to be unique.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = fabric_proto::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = (t ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(40)).to_le_bytes();
    }
    format!("{prefix}-{}", hex::encode(bytes))
}

/// Where the controller keeps the largest lease TTL and fencing margin it has used
/// ([`LeaseBound`]).
pub const LEASE_BOUND_KEY: &str = "meta/lease-bound";

/// The largest lease TTL and fencing margin any controller process may have granted with:
/// a process started with shorter ones must still wait out the leases of the earlier ones
/// before it declares a host dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseBound {
    pub ttl: Duration,
    pub margin: Duration,
}

impl LeaseBound {
    pub fn of(settings: &Settings) -> LeaseBound {
        LeaseBound {
            ttl: settings.lease_ttl,
            margin: settings.fencing_margin,
        }
    }

    fn widest(stored: Option<LeaseBound>, current: LeaseBound) -> LeaseBound {
        let stored = stored.unwrap_or(current);
        LeaseBound {
            ttl: stored.ttl.max(current.ttl),
            margin: stored.margin.max(current.margin),
        }
    }

    /// The stored bound, if any ("TTL_MS MARGIN_MS").
    pub fn read(store: &dyn Store) -> Result<Option<LeaseBound>, String> {
        let Some(kv) = store.get(LEASE_BOUND_KEY).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&kv.value).into_owned();
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>());
        match (parts.next(), parts.next()) {
            (Some(Ok(ttl)), Some(Ok(margin))) => Ok(Some(LeaseBound {
                ttl: Duration::from_millis(ttl),
                margin: Duration::from_millis(margin),
            })),
            _ => Err(format!(
                "{LEASE_BOUND_KEY}: {text:?} is not \"TTL_MS MARGIN_MS\""
            )),
        }
    }

    pub fn write(self, store: &dyn Store) -> Result<(), String> {
        let value = format!("{} {}", self.ttl.as_millis(), self.margin.as_millis());
        store
            .txn(Txn::new().put(LEASE_BOUND_KEY, value.into_bytes()))
            .map(|_| ())
            .map_err(|e| format!("cannot store {LEASE_BOUND_KEY}: {e}"))
    }
}

impl Controller {
    /// Once every lease an earlier process may have granted has run out (the stored bound's
    /// TTL and margin after start-up), lowers the stored bound to this process's own TTL and
    /// margin: later restarts then wait only as long as they must.
    pub async fn settle_lease_bound(self: Arc<Self>) {
        let Ok(Some(stored)) = LeaseBound::read(self.store.as_ref()) else {
            return;
        };
        let own = LeaseBound::of(&self.settings);
        if stored == own {
            return;
        }
        tokio::time::sleep(stored.ttl + stored.margin).await;
        if let Err(err) = own.write(self.store.as_ref()) {
            tracing::warn!(error = %err, "cannot lower the stored lease bound");
        }
    }
}

/// Where the controller keeps the generation ceiling ([`Controller::next_generation`]).
pub const GENERATION_CEILING_KEY: &str = "meta/generation-ceiling";
/// Generations handed out between two writes of the ceiling.
const GENERATION_BLOCK: u64 = 1 << 20;

fn parse_ceiling(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn store_ceiling(store: &dyn Store, ceiling: u64) -> Result<(), String> {
    store
        .txn(Txn::new().put(GENERATION_CEILING_KEY, ceiling.to_string().into_bytes()))
        .map(|_| ())
        .map_err(|e| format!("cannot store {GENERATION_CEILING_KEY}: {e}"))
}

impl Controller {
    /// Loads the stored state. Every known host gets a fresh lease: none is declared dead
    /// before it had a full TTL to reach this controller.
    pub fn load(settings: Settings, store: Arc<dyn Store>) -> Result<Arc<Controller>, String> {
        let mut model = Model::default();
        // The leases agents hold now were granted by earlier processes, perhaps with a longer
        // TTL or margin than this one's: the largest ever used bounds them.
        let stored = LeaseBound::read(store.as_ref())?;
        let bound = LeaseBound::widest(stored, LeaseBound::of(&settings));
        if Some(bound) != stored {
            bound.write(store.as_ref())?;
        }
        let (hosts, _) = store.list("hosts/").map_err(|e| e.to_string())?;
        let now = Instant::now();
        for kv in hosts {
            let host = Host::decode(kv.value.as_slice()).map_err(|e| format!("{}: {e}", kv.key))?;
            // DEAD no sooner than the bound's TTL and margin from now.
            let first_lease = bound.ttl + bound.margin.saturating_sub(settings.fencing_margin);
            let mut live = HostLive::new(now, first_lease);
            if host.agent_session_held {
                // The superseded session's lease was granted by an earlier controller process,
                // at the latest just before this one started: it has surely run out one TTL
                // plus the margin (the largest ever used) from now.
                live.assignments_held_until = Some(now + bound.ttl + bound.margin);
            }
            model.hosts.insert(
                host.id.clone(),
                HostEntry {
                    host,
                    rev: kv.mod_revision,
                    live,
                },
            );
        }
        let (machines, _) = store.list("machines/").map_err(|e| e.to_string())?;
        for kv in machines {
            let machine = kv.key.trim_start_matches("machines/").to_string();
            model
                .machines
                .insert(machine, String::from_utf8_lossy(&kv.value).into_owned());
        }
        let (vms, revision) = store.list("vms/").map_err(|e| e.to_string())?;
        let events = Events::new();
        for kv in vms {
            let vm = Vm::decode(kv.value.as_slice()).map_err(|e| format!("{}: {e}", kv.key))?;
            events.track(&vm);
            if let Some(spec) = &vm.spec {
                model.names.insert(spec.name.clone(), vm.id.clone());
            }
            model.vms.insert(
                vm.id.clone(),
                VmEntry {
                    vm,
                    rev: kv.mod_revision,
                },
            );
        }
        let mut placer = Placer::new(settings.cpu_overcommit);
        for entry in model.hosts.values() {
            placer.sync_host(&entry.host, effective_state(&settings, entry));
        }
        for entry in model.vms.values() {
            let host = &entry
                .vm
                .status
                .as_ref()
                .map(|s| s.host_id.clone())
                .unwrap_or_default();
            if !host.is_empty() {
                placer.assign(&entry.vm, host);
            }
        }
        tracing::info!(
            hosts = model.hosts.len(),
            vms = model.vms.len(),
            revision,
            "loaded the store"
        );
        // Agents ignore an assignment update older than the one they applied, so the
        // generations of this process must start above every earlier process's. The wall
        // clock alone does not ensure it (it may have been set back since, by an hour or by
        // years): the store keeps a ceiling that no earlier generation reached.
        let stored_ceiling = match store
            .get(GENERATION_CEILING_KEY)
            .map_err(|e| e.to_string())?
        {
            Some(kv) => parse_ceiling(&kv.value)
                .ok_or_else(|| format!("{GENERATION_CEILING_KEY}: not a generation"))?,
            None => 0,
        };
        let start_generation = fabric_proto::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
            .max(revision)
            .max(stored_ceiling);
        let ceiling = start_generation.saturating_add(GENERATION_BLOCK);
        store_ceiling(store.as_ref(), ceiling)?;
        let (reinstated, _) = store.list("reinstated-hosts/").map_err(|e| e.to_string())?;
        let reinstated: HashMap<String, u64> = reinstated
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix("reinstated-hosts/")?.to_string();
                let at = std::str::from_utf8(&kv.value).ok()?.parse().ok()?;
                Some((name, at))
            })
            .collect();
        let (revoked, _) = store.list("revoked-hosts/").map_err(|e| e.to_string())?;
        let revoked = revoked
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix("revoked-hosts/").map(str::to_string))
            .collect();
        let (stored_bindings, _) = store.list("role-bindings/").map_err(|e| e.to_string())?;
        let mut bindings = BTreeMap::new();
        for kv in stored_bindings {
            let rest = kv.key.trim_start_matches("role-bindings/");
            let (user, project) = rest
                .split_once('/')
                .ok_or_else(|| format!("{}: not user/project", kv.key))?;
            let role = crate::authz::parse_role(&String::from_utf8_lossy(&kv.value))
                .map_err(|e| format!("{}: {e}", kv.key))?;
            bindings.insert((user.to_string(), project.to_string()), role);
        }
        let (stored_quotas, _) = store.list("quotas/").map_err(|e| e.to_string())?;
        let mut quotas = BTreeMap::new();
        for kv in stored_quotas {
            let quota = ProjectQuota::decode(kv.value.as_slice())
                .map_err(|e| format!("{}: {e}", kv.key))?;
            quotas.insert(quota.project.clone(), quota);
        }
        let audit = crate::audit::Audit::load(store.clone(), settings.audit_retention)?;
        Ok(Arc::new(Controller {
            settings,
            store,
            model: Mutex::new(model),
            placer: Mutex::new(placer),
            events,
            kick: tokio::sync::Notify::new(),
            announced: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(start_generation),
            generation_ceiling: Mutex::new(ceiling),
            registering: tokio::sync::Mutex::new(()),
            revoked: std::sync::RwLock::new(revoked),
            reinstated: std::sync::RwLock::new(reinstated),
            audit,
            bindings: std::sync::RwLock::new(bindings),
            grants_changed: tokio::sync::watch::channel(0).0,
            quotas: std::sync::RwLock::new(quotas),
            quota_check: tokio::sync::RwLock::new(()),
            issuer: std::sync::OnceLock::new(),
            join_tokens: tokio::sync::Mutex::new(()),
            refused_joins: crate::join::RefusedJoins::default(),
            renewed: Mutex::new(HashMap::new()),
        }))
    }

    pub(crate) fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn placer(&self) -> MutexGuard<'_, Placer> {
        self.placer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new assignment-stream generation, greater than every earlier one.
    pub fn next_generation(&self) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let mut ceiling = self
            .generation_ceiling
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if generation >= *ceiling {
            // Once per GENERATION_BLOCK generations. A store that cannot take it now leaves
            // the old ceiling: the next call tries again, and a restart in between starts
            // from the wall clock and the revision as well.
            let raised = generation.saturating_add(GENERATION_BLOCK);
            match store_ceiling(self.store.as_ref(), raised) {
                Ok(()) => *ceiling = raised,
                Err(err) => tracing::error!(error = %err, "cannot store the generation ceiling"),
            }
        }
        generation
    }

    pub(crate) async fn commit(&self, txn: Txn) -> Result<TxnOutcome, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.txn(txn))
            .await
            .map_err(|e| Status::internal(format!("store task: {e}")))?
            .map_err(unavailable)
    }

    /// Creates a VM (already checked and with defaults filled), within its project's quota,
    /// with `audit` (if any) committed in the same transaction.
    pub async fn create_vm(&self, vm: Vm, audit: Option<AuditEntry>) -> Result<Vm, Status> {
        let name = vm.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        let project = vm
            .spec
            .as_ref()
            .map(|s| s.project.clone())
            .unwrap_or_default();
        // Only creates in a project with a quota wait for each other.
        let mut _shared = Some(self.quota_check.read().await);
        let mut _exclusive = None;
        let mut quota = self.quota(&project);
        if quota.is_some() {
            _shared = None;
            _exclusive = Some(self.quota_check.write().await);
            quota = self.quota(&project);
        }
        if let Some(quota) = &quota {
            check_quota(quota, self.usage(&project), &vm)?;
        }
        let txn = Txn::new()
            .when(Compare::Absent(name_key(&name)))
            .when(Compare::Absent(vm_key(&vm.id)))
            .put(name_key(&name), vm.id.clone().into_bytes())
            .put(vm_key(&vm.id), vm.encode_to_vec());
        let (txn, staged) = self.audit.stage(txn, audit.into_iter().collect());
        match self.commit(txn).await? {
            TxnOutcome::Committed(rev) => {
                staged.committed();
                self.events.track(&vm);
                let mut model = self.model();
                model.names.insert(name.clone(), vm.id.clone());
                model.vms.insert(
                    vm.id.clone(),
                    VmEntry {
                        vm: vm.clone(),
                        rev,
                    },
                );
                drop(model);
                self.events.vm(
                    EventKind::VmCreated,
                    &vm.id,
                    "",
                    "",
                    format!("VM {name} created"),
                );
                self.kick.notify_one();
                Ok(vm)
            }
            TxnOutcome::Failed(Compare::Absent(key)) if key.starts_with("names/") => Err(
                Status::already_exists(format!("a VM named {name:?} already exists")),
            ),
            TxnOutcome::Failed(_) => Err(Status::already_exists("VM id collision; retry")),
        }
    }

    pub fn get_vm(&self, id: &str) -> Result<Vm, Status> {
        let model = self.model();
        let entry = model
            .vms
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no VM with id {id:?}")))?;
        Ok(self.with_observed(&model, &entry.vm))
    }

    /// The VM with what its host currently observes.
    pub(crate) fn with_observed(&self, model: &Model, vm: &Vm) -> Vm {
        let mut vm = vm.clone();
        if let Some(status) = vm.status.as_mut() {
            if let Some(host) = model.hosts.get(&status.host_id) {
                status.observed = host.live.observed.get(&vm.id).cloned();
            }
        }
        vm
    }

    /// Applies `change` to VM `id` and commits it; retried on a concurrent update. `change`
    /// returns Ok(false) when there is nothing to do.
    pub async fn update_vm(
        &self,
        id: &str,
        change: impl Fn(&mut Vm) -> Result<bool, Status>,
    ) -> Result<Vm, Status> {
        self.update_vm_audited(id, change, None).await
    }

    /// [`Controller::update_vm`] with an audit entry committed with the change (none when
    /// there is nothing to change: the caller records it then).
    pub async fn update_vm_audited(
        &self,
        id: &str,
        change: impl Fn(&mut Vm) -> Result<bool, Status>,
        audit: Option<AuditEntry>,
    ) -> Result<Vm, Status> {
        for _ in 0..100 {
            let (mut vm, rev) = {
                let model = self.model();
                let entry = model
                    .vms
                    .get(id)
                    .ok_or_else(|| Status::not_found(format!("no VM with id {id:?}")))?;
                (entry.vm.clone(), entry.rev)
            };
            let before = vm.clone();
            if !change(&mut vm)? {
                return Ok(vm);
            }
            vm.updated_at = Some(now_ts());
            let txn = Txn::new()
                .when(Compare::ModRevision(vm_key(id), rev))
                .put(vm_key(id), vm.encode_to_vec());
            let (txn, staged) = self.audit.stage(txn, audit.iter().cloned().collect());
            match self.commit(txn).await? {
                TxnOutcome::Committed(new_rev) => {
                    staged.committed();
                    self.install_vm(&before, vm.clone(), new_rev);
                    return Ok(vm);
                }
                TxnOutcome::Failed(_) => tokio::task::yield_now().await,
            }
        }
        Err(Status::aborted(format!(
            "VM {id}: too many concurrent updates"
        )))
    }

    /// Puts a committed VM into memory and tells whoever cares.
    fn install_vm(&self, before: &Vm, vm: Vm, rev: Revision) {
        let old_status = before.status.clone().unwrap_or_default();
        let new_status = vm.status.clone().unwrap_or_default();
        let mut model = self.model();
        match model.vms.get_mut(&vm.id) {
            Some(entry) if entry.rev < rev => {
                entry.vm = vm.clone();
                entry.rev = rev;
            }
            Some(_) => return,
            None => return,
        }
        let assignment_changed = old_status.host_id != new_status.host_id
            || old_status.desired_state != new_status.desired_state
            || before.generation != vm.generation;
        if assignment_changed {
            for host in [&old_status.host_id, &new_status.host_id] {
                if let Some(entry) = model.hosts.get(host) {
                    entry.live.assignments.send_modify(|v| *v += 1);
                }
            }
        }
        drop(model);
        if old_status.host_id != new_status.host_id {
            let mut placer = self.placer();
            if !old_status.host_id.is_empty() {
                placer.release(&vm.id);
            }
            if !new_status.host_id.is_empty() {
                placer.assign(&vm, &new_status.host_id);
            }
        }
        if old_status.phase != new_status.phase {
            self.events.vm_phase(
                &vm.id,
                &new_status.host_id,
                new_status.phase(),
                if new_status.reason.is_empty() {
                    format!("phase {}", short_phase(new_status.phase()))
                } else {
                    format!(
                        "phase {}: {}",
                        short_phase(new_status.phase()),
                        new_status.reason
                    )
                },
            );
        }
    }

    /// Deletes a VM: it leaves its host's assignments (the agent stops it) and the store.
    pub async fn delete_vm(&self, id: &str, audit: Option<AuditEntry>) -> Result<(), Status> {
        loop {
            let (vm, rev) = {
                let model = self.model();
                let entry = model
                    .vms
                    .get(id)
                    .ok_or_else(|| Status::not_found(format!("no VM with id {id:?}")))?;
                (entry.vm.clone(), entry.rev)
            };
            let name = vm.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            let txn = Txn::new()
                .when(Compare::ModRevision(vm_key(id), rev))
                .delete(vm_key(id))
                .delete(name_key(&name));
            let (txn, staged) = self.audit.stage(txn, audit.iter().cloned().collect());
            match self.commit(txn).await? {
                TxnOutcome::Committed(_) => {
                    staged.committed();
                    let host_id = vm
                        .status
                        .as_ref()
                        .map(|s| s.host_id.clone())
                        .unwrap_or_default();
                    let mut model = self.model();
                    model.vms.remove(id);
                    if model.names.get(&name).map(String::as_str) == Some(id) {
                        model.names.remove(&name);
                    }
                    model.evicting.remove(id);
                    model.relieving.remove(id);
                    if let Some(host) = model.hosts.get(&host_id) {
                        host.live.assignments.send_modify(|v| *v += 1);
                    }
                    drop(model);
                    self.placer().release(id);
                    self.events.vm(
                        EventKind::VmDeleted,
                        id,
                        &host_id,
                        "",
                        format!("VM {name} deleted"),
                    );
                    return Ok(());
                }
                TxnOutcome::Failed(_) => tokio::task::yield_now().await,
            }
        }
    }

    /// Sets a VM's desired state (StartVm/StopVm); bumps its generation when it changes, so
    /// its agent acts even on a VM its restart policy left stopped.
    pub async fn set_desired(
        &self,
        id: &str,
        desired: DesiredState,
        audit: Option<AuditEntry>,
    ) -> Result<Vm, Status> {
        let unchanged = audit.clone();
        let changed = std::sync::atomic::AtomicBool::new(false);
        let vm = self
            .update_vm_audited(
                id,
                |vm| {
                    changed.store(false, Ordering::Relaxed);
                    let status = vm.status.get_or_insert_with(VmStatus::default);
                    let failed = status.phase() == VmPhase::Failed;
                    if status.desired_state() == desired
                        && !(failed && desired == DesiredState::Running)
                    {
                        return Ok(false);
                    }
                    status.desired_state = desired as i32;
                    vm.generation += 1;
                    changed.store(true, Ordering::Relaxed);
                    if desired == DesiredState::Running && status.host_id.is_empty() {
                        status.phase = VmPhase::Pending as i32;
                        status.reason = "waiting for placement".into();
                        status.phase_changed_at = Some(now_ts());
                    }
                    Ok(true)
                },
                audit,
            )
            .await?;
        if !changed.load(Ordering::Relaxed) {
            // Nothing committed: the call is audited all the same.
            if let Some(entry) = unchanged {
                self.audit.record(entry);
            }
            return self.get_vm(id);
        }
        self.events.vm(
            EventKind::VmDesiredStateChanged,
            id,
            vm.status.as_ref().map(|s| s.host_id.as_str()).unwrap_or(""),
            "",
            format!(
                "desired state {}",
                match desired {
                    DesiredState::Stopped => "stopped",
                    _ => "running",
                }
            ),
        );
        self.kick.notify_one();
        self.get_vm(id)
    }

    /// Whether host `name` may pull the image file `sha256`: a VM placed on a host of that
    /// name boots from it or has a disk copied from it.
    pub fn host_may_pull(&self, name: &str, sha256: &str) -> bool {
        let model = self.model();
        let ids: HashSet<&str> = model
            .hosts
            .values()
            .filter(|e| e.host.name == name)
            .map(|e| e.host.id.as_str())
            .collect();
        model.vms.values().any(|e| {
            let placed_here =
                e.vm.status
                    .as_ref()
                    .is_some_and(|s| ids.contains(s.host_id.as_str()));
            placed_here
                && e.vm
                    .spec
                    .as_ref()
                    .is_some_and(|spec| uses_image(spec, sha256))
        })
    }

    /// The assignments of `host_id`: its VMs and whether each should run.
    pub fn assignments(&self, host_id: &str) -> Vec<Assignment> {
        let model = self.model();
        model
            .vms
            .values()
            .filter(|e| e.vm.status.as_ref().is_some_and(|s| s.host_id == host_id))
            .map(|e| {
                let status = e.vm.status.clone().unwrap_or_default();
                let relieved_here = model
                    .relieving
                    .get(&e.vm.id)
                    .is_some_and(|r| r.source == host_id);
                let run = status.desired_state() != DesiredState::Stopped
                    && !model.evicting.contains(&e.vm.id)
                    && !relieved_here;
                Assignment {
                    vm_id: e.vm.id.clone(),
                    spec: e.vm.spec.clone(),
                    desired_state: if run {
                        DesiredState::Running as i32
                    } else {
                        DesiredState::Stopped as i32
                    },
                    generation: e.vm.generation,
                }
            })
            .collect()
    }

    /// The notifier of `host_id`'s assignment changes.
    pub fn assignment_notifier(&self, host_id: &str) -> Option<watch::Receiver<u64>> {
        self.model()
            .hosts
            .get(host_id)
            .map(|h| h.live.assignments.subscribe())
    }

    /// Commits a host.
    pub(crate) async fn put_host(
        &self,
        host: Host,
        rev: Option<Revision>,
    ) -> Result<Revision, Status> {
        self.put_host_audited(host, rev, &mut None).await
    }

    /// Commits a host with `audit`'s entry, taken from it once committed.
    async fn put_host_audited(
        &self,
        host: Host,
        rev: Option<Revision>,
        audit: &mut Option<AuditEntry>,
    ) -> Result<Revision, Status> {
        let compare = match rev {
            Some(rev) => Compare::ModRevision(host_key(&host.id), rev),
            None => Compare::Absent(host_key(&host.id)),
        };
        let txn = Txn::new()
            .when(compare)
            .put(host_key(&host.id), host.encode_to_vec());
        let (txn, staged) = self.audit.stage(txn, audit.iter().cloned().collect());
        match self.commit(txn).await? {
            TxnOutcome::Committed(rev) => {
                staged.committed();
                audit.take();
                Ok(rev)
            }
            TxnOutcome::Failed(_) => Err(Status::aborted("host changed concurrently; retry")),
        }
    }

    /// Records that `session` of `host_id` is no longer held (its first assignment set may be
    /// sent): a later controller process then does not hold it again. A newer session, or one
    /// already released, is left alone.
    pub(crate) async fn release_session_hold(&self, host_id: &str, session: u64) {
        loop {
            let (mut host, rev) = {
                let model = self.model();
                let Some(entry) = model.hosts.get(host_id) else {
                    return;
                };
                if entry.host.agent_session != session || !entry.host.agent_session_held {
                    return;
                }
                (entry.host.clone(), entry.rev)
            };
            host.agent_session_held = false;
            match self.put_host(host.clone(), Some(rev)).await {
                Ok(new_rev) => {
                    let mut model = self.model();
                    if let Some(entry) = model.hosts.get_mut(host_id) {
                        if entry.rev == rev {
                            entry.host = host;
                            entry.rev = new_rev;
                        }
                    }
                    return;
                }
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                Err(s) => {
                    tracing::warn!(host = %host_id, error = %s.message(), "cannot record that the host's session is no longer held");
                    return;
                }
            }
        }
    }

    /// Why `machine_id` may not register as `name`: another machine's host holds that name.
    /// Host names are unique in a cluster (they identify hosts to operators and, later, in
    /// certificates); a machine keeps the name it is registered with, also when hosts that
    /// shared a name before names were unique register again.
    pub(crate) fn host_name_taken(&self, machine_id: &str, name: &str) -> Option<Status> {
        let model = self.model();
        let own = model.machines.get(machine_id);
        if let Some(own) = own.and_then(|id| model.hosts.get(id)) {
            if own.host.name == name {
                return None;
            }
        }
        let holder = model
            .hosts
            .values()
            .find(|e| e.host.name == name && Some(&e.host.id) != own)?;
        let holder_machine = model
            .machines
            .iter()
            .find(|(_, host_id)| **host_id == holder.host.id)
            .map_or("?", |(machine, _)| machine.as_str());
        let state = short_host_state(effective_state(&self.settings, holder));
        Some(Status::already_exists(format!(
            "host name {name:?} is held by machine {holder_machine:?} (host {}, {state}): host \
             names are unique in a cluster. A machine that replaces it takes it over with \
             machine_id = {holder_machine:?} in its agent config, once the old machine is off for \
             good; any other machine needs a name of its own",
            holder.host.id
        )))
    }

    /// Records a machine's host id.
    pub(crate) async fn put_machine(&self, machine_id: &str, host_id: &str) -> Result<(), Status> {
        let txn = Txn::new()
            .when(Compare::Absent(machine_key(machine_id)))
            .put(machine_key(machine_id), host_id.as_bytes().to_vec());
        match self.commit(txn).await? {
            TxnOutcome::Committed(_) => Ok(()),
            TxnOutcome::Failed(_) => Err(Status::aborted("machine registered concurrently; retry")),
        }
    }

    /// A host as the API shows it: stored fields plus its live state and allocations.
    pub(crate) fn host_view(&self, model: &Model, entry: &HostEntry) -> Host {
        let mut host = entry.host.clone();
        host.state = effective_state(&self.settings, entry) as i32;
        host.usage = entry.live.usage;
        host.last_heartbeat_at = Some(prost_types::Timestamp::from(entry.live.last_heartbeat_wall));
        let left = entry
            .live
            .lease_expires
            .saturating_duration_since(Instant::now());
        host.lease_expires_at = Some(prost_types::Timestamp::from(
            fabric_proto::clock::now() + left,
        ));
        let mut allocated = Resources::default();
        for e in model.vms.values() {
            let Some(status) = &e.vm.status else { continue };
            if status.host_id != host.id {
                continue;
            }
            if let Some(spec) = &e.vm.spec {
                allocated.cpus = allocated.cpus.saturating_add(spec.vcpus);
                let (_, minimum, _) =
                    crate::validate::memory_sizes(&spec.memory.unwrap_or_default());
                allocated.memory_mib = allocated.memory_mib.saturating_add(minimum);
            }
            allocated.disk_mib = allocated
                .disk_mib
                .saturating_add(crate::placement::disk_mib(&e.vm));
        }
        host.allocated = Some(allocated);
        host
    }

    pub fn get_host(&self, id: &str) -> Result<Host, Status> {
        let model = self.model();
        let entry = model
            .hosts
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no host with id {id:?}")))?;
        Ok(self.host_view(&model, entry))
    }

    /// Forgets host `id`, which must be DEAD and hold no VM: its record, its machine ids and
    /// (with the record) its name. Serialized with registrations.
    pub async fn remove_host(
        &self,
        id: &str,
        audit: &mut Option<AuditEntry>,
    ) -> Result<(), Status> {
        let _registering = self.registering.lock().await;
        let (rev, machines, name) = {
            let model = self.model();
            let entry = model
                .hosts
                .get(id)
                .ok_or_else(|| Status::not_found(format!("no host with id {id:?}")))?;
            let name = entry.host.name.clone();
            let state = effective_state(&self.settings, entry);
            if state != HostState::Dead {
                return Err(Status::failed_precondition(format!(
                    "host {id} ({name}) is {}: only a DEAD host is removed (stop its agent, or \
                     drain the host first, then wait for its lease and the fencing margin)",
                    short_host_state(state)
                )));
            }
            let placed = model
                .vms
                .values()
                .filter(|e| e.vm.status.as_ref().is_some_and(|s| s.host_id == id))
                .count();
            if placed > 0 {
                return Err(Status::failed_precondition(format!(
                    "host {id} ({name}) still holds {placed} VMs; they are moved off a DEAD \
                     host by the reconciler: try again shortly"
                )));
            }
            let machines: Vec<String> = model
                .machines
                .iter()
                .filter(|(_, host)| host.as_str() == id)
                .map(|(machine, _)| machine.clone())
                .collect();
            (entry.rev, machines, name)
        };
        let mut txn = Txn::new()
            .when(Compare::ModRevision(host_key(id), rev))
            .delete(host_key(id));
        for machine in &machines {
            txn = txn.delete(machine_key(machine));
        }
        let (txn, staged) = self.audit.stage(txn, audit.iter().cloned().collect());
        match self.commit(txn).await? {
            TxnOutcome::Committed(_) => {
                staged.committed();
                audit.take();
            }
            TxnOutcome::Failed(_) => {
                return Err(Status::aborted("host changed concurrently; retry"))
            }
        }
        {
            let mut model = self.model();
            model.hosts.remove(id);
            model.machines.retain(|_, host| host != id);
        }
        if let Err(err) = self.placer().scheduler_mut().remove_host(id) {
            tracing::debug!(host = %id, error = %err, "scheduler bookkeeping");
        }
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.events.emit(fabric_proto::v1::Event {
            kind: EventKind::HostRemoved as i32,
            host_id: id.to_string(),
            message: format!("host {name} removed"),
            ..Default::default()
        });
        tracing::info!(host = %id, name = %name, "host removed");
        Ok(())
    }

    /// When host/`name` was last reinstated (Unix seconds): its certificates must have been
    /// issued since.
    pub fn reinstated_at(&self, name: &str) -> Option<u64> {
        self.reinstated
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// The check of a caller's certificate beyond its identity: a reinstated host's
    /// certificates issued before the reinstatement (a stolen key's among them) are
    /// refused; it joins again with a new token. Refusals are audited.
    pub fn certificate_check(&self, peer: &fabric_proto::tls::PeerInfo) -> Result<(), String> {
        let fabric_proto::tls::Identity::Host(name) = &peer.identity else {
            return Ok(());
        };
        let Some(at) = self.reinstated_at(name) else {
            return Ok(());
        };
        // Certificates are back-dated up to a minute (clocks a little apart): one issued at
        // or after the reinstatement has notBefore at most that much before it.
        let issued = peer
            .issued
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() + crate::join::MAX_BACKDATE.as_secs());
        if issued.is_some_and(|t| t >= at) {
            return Ok(());
        }
        let why = format!(
            "host/{name} was reinstated at {at} (Unix seconds): its certificates issued before are refused; join it again with a new token"
        );
        self.audit_refusal(
            &peer.identity,
            "certificate",
            &format!("host/{name}"),
            &Status::permission_denied(why.clone()),
        );
        Err(why)
    }

    /// Whether the identity host/`name` is revoked.
    pub fn is_revoked(&self, name: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// What `caller` may do: local-root is a cluster-wide admin, a user has its bindings,
    /// hosts and the controller have no role.
    pub fn grants(&self, caller: &fabric_proto::tls::Identity) -> crate::authz::Grants {
        use fabric_proto::tls::Identity;
        match caller {
            Identity::LocalRoot => crate::authz::Grants::admin(),
            Identity::User(name) => {
                let bindings = self.bindings.read().unwrap_or_else(|e| e.into_inner());
                let mut grants = crate::authz::Grants::default();
                let from = (name.clone(), String::new());
                for ((user, project), role) in bindings.range(from..) {
                    if user != name {
                        break;
                    }
                    grants.add((project != "*").then_some(project.as_str()), *role);
                }
                grants
            }
            _ => crate::authz::Grants::default(),
        }
    }

    /// Who may call what, with revoked host identities refused: the policy of the
    /// controller's server. Every refusal goes to the audit log.
    pub fn authorize(
        &self,
        path: &str,
        caller: &fabric_proto::tls::Identity,
    ) -> Result<(), String> {
        let grants = self.grants(caller);
        let verdict = match caller {
            fabric_proto::tls::Identity::Host(name) if self.is_revoked(name) => {
                Err("the identity is revoked (fabricctl host reinstate)".to_string())
            }
            _ => crate::authz::controller_policy(path, caller, &grants),
        };
        if let Err(why) = &verdict {
            self.audit.record(AuditEntry {
                identity: caller.to_string(),
                roles: grants.describe(),
                rpc: path.chars().take(256).collect(),
                code: tonic::Code::PermissionDenied as i32,
                message: format!("{caller} may not call {path}: {why}"),
                ..Default::default()
            });
        }
        verdict
    }

    /// For a HostLink call `rpc` about host `name`: [`crate::authz::check_host`], with the
    /// refusal (a certificate acting as another host) in the audit log.
    pub fn check_host(
        &self,
        caller: &fabric_proto::tls::Identity,
        name: &str,
        rpc: &str,
    ) -> Result<(), Status> {
        crate::authz::check_host(caller, name)
            .inspect_err(|status| self.audit_refusal(caller, rpc, &format!("host/{name}"), status))
    }

    /// An entry for a call refused in a handler (not by the authorization layer, which
    /// records its own): who, what, on what, and why.
    pub fn audit_refusal(
        &self,
        caller: &fabric_proto::tls::Identity,
        rpc: &str,
        target: &str,
        status: &Status,
    ) {
        self.audit.record(AuditEntry {
            identity: caller.to_string(),
            roles: self.grants(caller).describe(),
            rpc: rpc.chars().take(256).collect(),
            target: target.chars().take(256).collect(),
            code: status.code() as i32,
            message: status.message().chars().take(1024).collect(),
            ..Default::default()
        });
    }

    /// Every role binding, or one user's, ordered by user then project.
    pub fn role_bindings(&self, user: &str) -> Vec<RoleBinding> {
        self.bindings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((u, _), _)| user.is_empty() || u == user)
            .map(|((u, p), r)| RoleBinding {
                user: u.clone(),
                role: *r as i32,
                project: if p == "*" { String::new() } else { p.clone() },
            })
            .collect()
    }

    /// A binding checked: (user, project or None, role).
    pub fn check_binding(binding: &RoleBinding) -> Result<(String, Option<String>, Role), Status> {
        fabric_proto::tls::check_name("user", &binding.user).map_err(Status::invalid_argument)?;
        let role = match Role::try_from(binding.role) {
            Ok(Role::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "role {}: one of admin, operator, viewer",
                    binding.role
                )))
            }
            Ok(role) => role,
        };
        let project = match binding.project.as_str() {
            "" => None,
            p => {
                fabric_proto::tls::check_name("project", p).map_err(Status::invalid_argument)?;
                Some(p.to_string())
            }
        };
        Ok((binding.user.clone(), project, role))
    }

    /// Binds `role` to `user` in `project` (None: cluster-wide), replacing the role the user
    /// held in that scope; false when it held that role already. Serialized with other
    /// binding changes; `audit` is committed with the change.
    pub async fn bind_role(
        &self,
        user: &str,
        project: Option<&str>,
        role: Role,
        audit: AuditEntry,
    ) -> Result<bool, Status> {
        self.change_binding(user, project, role, true, audit).await
    }

    /// Removes a binding; false when the user did not hold `role` in that scope.
    pub async fn unbind_role(
        &self,
        user: &str,
        project: Option<&str>,
        role: Role,
        audit: AuditEntry,
    ) -> Result<bool, Status> {
        self.change_binding(user, project, role, false, audit).await
    }

    /// `--bootstrap-admin NAME`: binds admin to `name` cluster-wide the first time this
    /// store sees that flag for it, and never again, so that an admin's later `role unbind`
    /// stands across restarts. True when it bound.
    pub async fn bootstrap_admin(&self, name: &str) -> Result<bool, Status> {
        let marker = format!("meta/bootstrap-admin/{name}");
        let seen = self.store.get(&marker).map_err(unavailable)?.is_some();
        if seen {
            return Ok(false);
        }
        let entry = AuditEntry {
            identity: "controller".into(),
            rpc: "--bootstrap-admin".into(),
            target: format!("user/{name}"),
            ..Default::default()
        };
        let bound = self.bind_role(name, None, Role::Admin, entry).await?;
        // After the binding: a crash between the two binds again (a no-op) at the next start.
        self.commit(Txn::new().put(marker, b"bound".to_vec()))
            .await?;
        Ok(bound)
    }

    /// [`Self::bind_role`] (`bind`) or [`Self::unbind_role`]: the change committed with its
    /// audit entry, then applied in memory; false (the entry still recorded) when there was
    /// nothing to change.
    async fn change_binding(
        &self,
        user: &str,
        project: Option<&str>,
        role: Role,
        bind: bool,
        audit: AuditEntry,
    ) -> Result<bool, Status> {
        let _serialized = self.registering.lock().await;
        let scope = (user.to_string(), project.unwrap_or("*").to_string());
        let current = self
            .bindings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&scope)
            .copied();
        if (current == Some(role)) == bind {
            self.audit.record(audit);
            return Ok(false);
        }
        let txn = if bind {
            Txn::new().put(
                binding_key(user, project),
                crate::authz::role_name(role).as_bytes().to_vec(),
            )
        } else {
            Txn::new().delete(binding_key(user, project))
        };
        let (txn, staged) = self.audit.stage(txn, vec![audit]);
        self.commit(txn).await?;
        staged.committed();
        let mut bindings = self.bindings.write().unwrap_or_else(|e| e.into_inner());
        if bind {
            bindings.insert(scope, role);
        } else {
            bindings.remove(&scope);
        }
        drop(bindings);
        self.grants_changed.send_modify(|g| *g += 1);
        tracing::info!(
            user,
            project = project.unwrap_or("*"),
            role = crate::authz::role_name(role),
            bound = bind,
            "role binding changed"
        );
        Ok(true)
    }

    /// A project's quota, if it has one.
    pub fn quota(&self, project: &str) -> Option<ProjectQuota> {
        self.quotas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(project)
            .cloned()
    }

    /// What `project`'s VMs take now. A deleted VM stops counting once its deletion commits.
    pub fn usage(&self, project: &str) -> Usage {
        let model = self.model();
        let mut usage: Usage = (0, 0, 0);
        for entry in model.vms.values() {
            let Some(spec) = &entry.vm.spec else { continue };
            // VMs stored before projects existed are in the default one.
            let own = match spec.project.as_str() {
                "" => crate::authz::DEFAULT_PROJECT,
                p => p,
            };
            if own != project {
                continue;
            }
            usage.0 += u64::from(spec.vcpus);
            usage.1 += quota_memory_mib(spec);
            usage.2 += 1;
        }
        usage
    }

    /// Sets (or, all limits zero, removes) a project's quota, with `audit` in the commit.
    /// Serialized with creates in projects with quotas.
    pub async fn set_quota(
        &self,
        quota: ProjectQuota,
        audit: AuditEntry,
    ) -> Result<ProjectQuota, Status> {
        let _serialized = self.quota_check.write().await;
        let limits = ProjectQuota {
            project: quota.project.clone(),
            vcpus: quota.vcpus,
            memory_mib: quota.memory_mib,
            vms: quota.vms,
            ..Default::default()
        };
        let unlimited = limits.vcpus == 0 && limits.memory_mib == 0 && limits.vms == 0;
        let txn = if unlimited {
            Txn::new().delete(quota_key(&limits.project))
        } else {
            Txn::new().put(quota_key(&limits.project), limits.encode_to_vec())
        };
        let (txn, staged) = self.audit.stage(txn, vec![audit]);
        self.commit(txn).await?;
        staged.committed();
        let mut quotas = self.quotas.write().unwrap_or_else(|e| e.into_inner());
        if unlimited {
            quotas.remove(&limits.project);
        } else {
            quotas.insert(limits.project.clone(), limits.clone());
        }
        drop(quotas);
        Ok(self.quota_view(&limits.project))
    }

    /// A project's quota (zeros: none) and usage.
    pub fn quota_view(&self, project: &str) -> ProjectQuota {
        let mut view = self.quota(project).unwrap_or_else(|| ProjectQuota {
            project: project.to_string(),
            ..Default::default()
        });
        let (vcpus, memory, vms) = self.usage(project);
        view.used_vcpus = vcpus.min(u64::from(u32::MAX)) as u32;
        view.used_memory_mib = memory;
        view.used_vms = vms.min(u64::from(u32::MAX)) as u32;
        view
    }

    /// Revokes the identity host/`name` (durably first); false when it was revoked already.
    pub async fn revoke_host(
        &self,
        name: &str,
        reason: &str,
        by: &str,
        audit: &mut Option<AuditEntry>,
    ) -> Result<bool, Status> {
        fabric_proto::tls::check_name("host", name).map_err(Status::invalid_argument)?;
        crate::validate::check_reason(reason).map_err(Status::invalid_argument)?;
        let _serialized = self.registering.lock().await;
        // No token for the name is made or spent meanwhile; those that exist go with it.
        let _tokens = self.join_tokens.lock().await;
        if self.is_revoked(name) {
            return Ok(false);
        }
        let mut txn = Txn::new().put(revoked_key(name), by.as_bytes().to_vec());
        for key in crate::join::token_keys_of(self.store.as_ref(), name).map_err(unavailable)? {
            txn = txn.delete(key);
        }
        let (txn, staged) = self.audit.stage(txn, audit.iter().cloned().collect());
        self.commit(txn).await?;
        staged.committed();
        audit.take();
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        let host_id = {
            let model = self.model();
            let entry = model.hosts.values().find(|e| e.host.name == name);
            // Its open assignment stream wakes and ends.
            if let Some(entry) = entry {
                entry.live.assignments.send_modify(|v| *v += 1);
            }
            entry.map(|e| e.host.id.clone()).unwrap_or_default()
        };
        self.events.emit(fabric_proto::v1::Event {
            kind: EventKind::HostIdentity as i32,
            host_id,
            message: format!("host/{name} revoked by {by}"),
            reason: reason.to_string(),
            ..Default::default()
        });
        tracing::warn!(host = name, by, reason, "host identity revoked");
        Ok(true)
    }

    /// Accepts the identity host/`name` again; false when it was not revoked.
    pub async fn reinstate_host(
        &self,
        name: &str,
        by: &str,
        audit: &mut Option<AuditEntry>,
    ) -> Result<bool, Status> {
        fabric_proto::tls::check_name("host", name).map_err(Status::invalid_argument)?;
        let _serialized = self.registering.lock().await;
        if !self.is_revoked(name) {
            return Ok(false);
        }
        let at = fabric_proto::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let txn = Txn::new()
            .delete(revoked_key(name))
            .put(reinstated_key(name), at.to_string().into_bytes());
        let (txn, staged) = self.audit.stage(txn, audit.iter().cloned().collect());
        self.commit(txn).await?;
        staged.committed();
        audit.take();
        self.reinstated
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), at);
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.events.emit(fabric_proto::v1::Event {
            kind: EventKind::HostIdentity as i32,
            message: format!("host/{name} reinstated by {by}"),
            ..Default::default()
        });
        tracing::info!(host = name, by, "host identity reinstated");
        Ok(true)
    }

    /// Sets a host's administrative state (cordon, drain, uncordon).
    pub async fn set_host_admin(
        &self,
        id: &str,
        state: HostState,
        reason: &str,
    ) -> Result<Host, Status> {
        self.set_host_admin_audited(id, state, reason, &mut None)
            .await
    }

    /// [`Controller::set_host_admin`] with `audit`'s entry in the commit of the change (taken
    /// from it then; left there when nothing changed).
    pub async fn set_host_admin_audited(
        &self,
        id: &str,
        state: HostState,
        reason: &str,
        audit: &mut Option<AuditEntry>,
    ) -> Result<Host, Status> {
        loop {
            let (mut host, rev, effective) = {
                let model = self.model();
                let entry = model
                    .hosts
                    .get(id)
                    .ok_or_else(|| Status::not_found(format!("no host with id {id:?}")))?;
                (
                    entry.host.clone(),
                    entry.rev,
                    effective_state(&self.settings, entry),
                )
            };
            if state == HostState::Ready && effective == HostState::Dead {
                return Err(Status::failed_precondition(format!(
                    "host {id} is DEAD: it becomes READY when its agent registers again"
                )));
            }
            let cordoned = state != HostState::Ready;
            if host.state == state as i32 && host.cordoned == cordoned {
                return self.get_host(id);
            }
            host.state = state as i32;
            host.cordoned = cordoned;
            host.cordon_reason = if cordoned {
                reason.to_string()
            } else {
                String::new()
            };
            match self.put_host_audited(host.clone(), Some(rev), audit).await {
                Ok(new_rev) => {
                    let mut model = self.model();
                    if let Some(entry) = model.hosts.get_mut(id) {
                        entry.host = host;
                        entry.rev = new_rev;
                        let state = placement_state(&self.settings, entry);
                        self.placer().sync_host(&entry.host, state);
                        let name = entry.host.name.clone();
                        drop(model);
                        self.announce_host_state(id, &name, state, reason);
                    } else {
                        drop(model);
                    }
                    self.kick.notify_one();
                    return self.get_host(id);
                }
                Err(s) if s.code() == tonic::Code::Aborted => continue,
                Err(s) => return Err(s),
            }
        }
    }
}

impl Controller {
    /// Emits a HOST_STATE_CHANGED event if `state` differs from the last one announced for
    /// the host. Returns whether it did.
    pub fn announce_host_state(
        &self,
        id: &str,
        name: &str,
        state: HostState,
        reason: &str,
    ) -> bool {
        let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        if announced.get(id) == Some(&state) {
            return false;
        }
        announced.insert(id.to_string(), state);
        drop(announced);
        self.events.host_state(
            id,
            state,
            reason,
            format!("host {name} is {}", short_host_state(state)),
        );
        true
    }
}

/// RESOURCE_EXHAUSTED naming the quota and the figures when `vm` does not fit `quota`
/// beside `used`.
/// The memory a VM counts against its project's quota: the most it may be given (its
/// maximum under dynamic memory, else its startup memory), not what it starts with.
pub fn quota_memory_mib(spec: &fabric_proto::v1::VmSpec) -> u64 {
    spec.memory.map_or(0, |m| m.startup_mib.max(m.maximum_mib))
}

pub fn check_quota(quota: &ProjectQuota, used: Usage, vm: &Vm) -> Result<(), Status> {
    let spec = vm.spec.clone().unwrap_or_default();
    let project = &quota.project;
    let vcpus = u64::from(spec.vcpus);
    let memory = quota_memory_mib(&spec);
    if quota.vcpus > 0 && used.0 + vcpus > u64::from(quota.vcpus) {
        return Err(Status::resource_exhausted(format!(
            "project {project}: {vcpus} vCPUs requested, {} of {} in use (quota vcpus={})",
            used.0, quota.vcpus, quota.vcpus
        )));
    }
    if quota.memory_mib > 0 && used.1 + memory > quota.memory_mib {
        return Err(Status::resource_exhausted(format!(
            "project {project}: {memory} MiB of memory requested, {} of {} MiB in use (quota memory-mib={})",
            used.1, quota.memory_mib, quota.memory_mib
        )));
    }
    if quota.vms > 0 && used.2 + 1 > u64::from(quota.vms) {
        return Err(Status::resource_exhausted(format!(
            "project {project}: 1 VM requested, {} of {} in use (quota vms={})",
            used.2, quota.vms, quota.vms
        )));
    }
    Ok(())
}

/// A host's state from its stored administrative state and its lease.
/// The state placement sees: DEAD while the host's VMs are being moved off it after it was
/// declared dead ([`HostLive::evicting`]), even once it has registered again.
pub(crate) fn placement_state(settings: &Settings, entry: &HostEntry) -> HostState {
    if entry.live.evicting {
        return HostState::Dead;
    }
    effective_state(settings, entry)
}

pub(crate) fn effective_state(settings: &Settings, entry: &HostEntry) -> HostState {
    let now = Instant::now();
    if now >= entry.live.lease_expires + settings.fencing_margin {
        return HostState::Dead;
    }
    if now >= entry.live.lease_expires
        || now.duration_since(entry.live.last_heartbeat) > settings.suspect_after()
    {
        return HostState::Suspect;
    }
    match entry.host.state() {
        HostState::Draining => HostState::Draining,
        HostState::Cordoned => HostState::Cordoned,
        _ if entry.host.cordoned => HostState::Cordoned,
        _ => HostState::Ready,
    }
}

/// The controller's phase for a VM on a host, from what the agent observes.
pub(crate) fn derived_phase(
    observed: Option<&ObservedVm>,
    host_state: HostState,
) -> (VmPhase, String) {
    if matches!(host_state, HostState::Suspect | HostState::Dead) {
        return (VmPhase::Lost, "the host stopped heartbeating".to_string());
    }
    let Some(observed) = observed else {
        return (
            VmPhase::Scheduled,
            "waiting for the host's agent".to_string(),
        );
    };
    let phase = match observed.phase() {
        ObservedPhase::Unspecified => VmPhase::Scheduled,
        ObservedPhase::Starting => VmPhase::Starting,
        ObservedPhase::Running => VmPhase::Running,
        ObservedPhase::Stopping => VmPhase::Stopping,
        ObservedPhase::Stopped => VmPhase::Stopped,
        ObservedPhase::Failed => VmPhase::Failed,
    };
    let reason = match phase {
        VmPhase::Failed if !observed.last_error.is_empty() => observed.last_error.clone(),
        _ => observed.message.clone(),
    };
    (phase, reason)
}

pub fn short_phase(phase: VmPhase) -> &'static str {
    match phase {
        VmPhase::Unspecified => "unspecified",
        VmPhase::Pending => "pending",
        VmPhase::Scheduled => "scheduled",
        VmPhase::Starting => "starting",
        VmPhase::Running => "running",
        VmPhase::Stopping => "stopping",
        VmPhase::Stopped => "stopped",
        VmPhase::Failed => "failed",
        VmPhase::Lost => "lost",
    }
}

pub fn short_host_state(state: HostState) -> &'static str {
    match state {
        HostState::Unspecified => "unspecified",
        HostState::Ready => "ready",
        HostState::Suspect => "suspect",
        HostState::Dead => "dead",
        HostState::Cordoned => "cordoned",
        HostState::Draining => "draining",
    }
}

/// Whether `spec` boots from the image file `sha256` or copies a disk from it.
fn uses_image(spec: &fabric_proto::v1::VmSpec, sha256: &str) -> bool {
    let boot = spec.image.as_ref().is_some_and(|i| {
        [&i.kernel_sha256, &i.initramfs_sha256, &i.rootfs_sha256]
            .iter()
            .any(|d| d.as_str() == sha256)
    });
    boot || spec.disks.iter().any(|d| {
        matches!(&d.source, Some(fabric_proto::v1::disk_spec::Source::ImageSha256(d)) if d == sha256)
    })
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    fn vm(startup_mib: u64, maximum_mib: u64) -> Vm {
        Vm {
            spec: Some(fabric_proto::v1::VmSpec {
                vcpus: 1,
                memory: Some(fabric_proto::v1::MemorySpec {
                    startup_mib,
                    minimum_mib: startup_mib.min(maximum_mib),
                    maximum_mib,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_vm_counts_the_most_memory_it_may_be_given() {
        let quota = ProjectQuota {
            project: "p2".into(),
            memory_mib: 1000,
            ..Default::default()
        };
        // Starts with 64 MiB but may grow to 1 TiB: over a 1000 MiB quota.
        let refused = check_quota(&quota, (0, 0, 0), &vm(64, 1 << 20)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("1048576 MiB of memory requested")
                && refused.message().contains("quota memory-mib=1000"),
            "{refused:?}"
        );
        check_quota(&quota, (0, 0, 0), &vm(64, 512)).expect("within the quota");
        // What is in use counts maxima too.
        check_quota(&quota, (0, 600, 1), &vm(64, 512)).unwrap_err();
    }
}
