//! The reconciler against a real [`Controller`] (its redb store in a temp dir), with the test
//! playing the agents through the HostLink service itself: registrations and heartbeats take
//! the same path as over gRPC, and each reconciler pass is run by hand, so a test decides
//! exactly what every host reports between two passes.

use std::sync::Arc;
use std::time::Duration;

use fabric_proto::v1::host_link_server::HostLink;
use fabric_proto::v1::{
    BootImage, DesiredState, Event, HeartbeatRequest, HostMemoryBalance, HostState, HostUsage,
    MemorySpec, ObservedPhase, ObservedVm, RegisterHostRequest, Resources, Vm, VmMemoryBalance,
    VmPhase, VmSpec, VmStatus,
};
use tonic::Request;

use super::Reconciler;
use crate::controller::{Controller, Settings};
use crate::hostlink::HostLinkService;
use crate::store::redb::RedbStore;

/// A controller, its reconciler (run by hand) and the hosts the test plays.
pub(crate) struct Harness {
    pub c: Arc<Controller>,
    pub reconciler: Reconciler,
    pub hostlink: HostLinkService,
    _dir: tempfile::TempDir,
}

/// One VM as a heartbeat reports it: running with a memory decision, or in `phase`.
pub(crate) fn observed(vm: &Vm, phase: ObservedPhase) -> ObservedVm {
    ObservedVm {
        vm_id: vm.id.clone(),
        phase: phase as i32,
        generation: vm.generation,
        ..Default::default()
    }
}

/// A running VM whose host's balancer gave it `target_mib` for a guest using `demand_mib`.
pub(crate) fn running_with_memory(vm: &Vm, target_mib: u64, demand_mib: u64) -> ObservedVm {
    ObservedVm {
        memory_balance: Some(VmMemoryBalance {
            target_mib,
            demand_mib: Some(demand_mib),
            ..Default::default()
        }),
        ..observed(vm, ObservedPhase::Running)
    }
}

/// A host balance of `budget_mib` of which its VMs want `wanted_mib` (short when more).
pub(crate) fn balance(budget_mib: u64, wanted_mib: u64) -> HostMemoryBalance {
    HostMemoryBalance {
        budget_mib,
        wanted_mib,
        assigned_mib: budget_mib.min(wanted_mib),
        short: wanted_mib > budget_mib,
        ..Default::default()
    }
}

impl Harness {
    /// Leases long enough that no host turns suspect while a test thinks; relief after
    /// `memory_relief_window` (zero: off).
    pub async fn new(memory_relief_window: Duration) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(&dir.path().join("store.redb")).expect("store");
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            lease_ttl: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(1),
            fencing_margin: Duration::from_secs(5),
            cpu_overcommit: 4.0,
            memory_relief_window,
            audit_retention: crate::audit::Retention::default(),
        };
        let c = Controller::load(settings, Arc::new(store)).expect("controller");
        Harness {
            hostlink: HostLinkService::new(c.clone()),
            c,
            reconciler: Reconciler::default(),
            _dir: dir,
        }
    }

    /// Registers host `name` (8 CPUs, 16 GiB, zone z1) in `fault_domain`; its id.
    pub async fn add_host(&self, name: &str, fault_domain: u32) -> String {
        let resources = Resources {
            cpus: 8,
            memory_mib: 16_384,
            disk_mib: 0,
        };
        self.hostlink
            .register_host(local_root(RegisterHostRequest {
                machine_id: format!("machine-{name}"),
                name: name.to_string(),
                zone: "z1".to_string(),
                fault_domain,
                update_domain: fault_domain,
                capacity: Some(resources),
                allocatable: Some(resources),
                ..Default::default()
            }))
            .await
            .expect("register")
            .into_inner()
            .host_id
    }

    /// Creates a running VM of 1 vCPU and `memory`, pending placement; its id.
    pub async fn create_vm(&self, name: &str, memory: MemorySpec) -> String {
        let id = format!("vm-{name}");
        let vm = Vm {
            id: id.clone(),
            spec: Some(VmSpec {
                name: name.to_string(),
                vcpus: 1,
                memory: Some(memory),
                image: Some(BootImage {
                    kernel_sha256: "0".repeat(64),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: Some(VmStatus {
                desired_state: DesiredState::Running as i32,
                phase: VmPhase::Pending as i32,
                ..Default::default()
            }),
            generation: 1,
            ..Default::default()
        };
        self.c.create_vm(vm, None).await.expect("create");
        id
    }

    /// Cordons, drains or opens (`Ready`) a host.
    pub async fn set_host(&self, host_id: &str, state: HostState) {
        self.c
            .set_host_admin(host_id, state, "test")
            .await
            .expect("host state");
    }

    /// A heartbeat of `host_id` reporting `vms` and, when given, its memory balance.
    pub async fn heartbeat(
        &self,
        host_id: &str,
        vms: Vec<ObservedVm>,
        memory: Option<HostMemoryBalance>,
    ) {
        // As if the host's assignment stream had sent it its current set (stops recorded as
        // the stream records them) and the agent had applied it before reporting.
        let generation = self.c.next_generation();
        let set = self.c.assignments(host_id);
        if let Some(host) = self.c.model().hosts.get_mut(host_id) {
            for a in set {
                if a.desired_state() == DesiredState::Stopped {
                    host.live.stop_sent.insert(a.vm_id, generation);
                } else {
                    host.live.stop_sent.remove(&a.vm_id);
                }
            }
        }
        self.hostlink
            .heartbeat(local_root(HeartbeatRequest {
                host_id: host_id.to_string(),
                vms,
                usage: Some(HostUsage {
                    memory_balance: memory,
                    ..Default::default()
                }),
                assignments_generation: generation,
                ..Default::default()
            }))
            .await
            .expect("heartbeat");
    }

    pub async fn pass(&mut self) {
        self.reconciler.pass(&self.c).await;
    }

    /// A pass without its first step (host states, as last computed, are kept).
    pub async fn dead_and_lost_then_place(&mut self) {
        self.reconciler.dead_and_lost(&self.c).await;
        self.reconciler.place(&self.c).await;
    }

    pub fn vm(&self, vm_id: &str) -> Vm {
        self.c.get_vm(vm_id).expect("the VM")
    }

    /// The host the VM is assigned to ("" when none).
    pub fn host_of(&self, vm_id: &str) -> String {
        self.vm(vm_id).status.unwrap_or_default().host_id
    }

    /// Whether the VM's host is told to run it (rather than stop it).
    pub fn told_to_run(&self, vm_id: &str) -> bool {
        let host = self.host_of(vm_id);
        self.c
            .assignments(&host)
            .iter()
            .any(|a| a.vm_id == vm_id && a.desired_state() == DesiredState::Running)
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.c.events.retained()
    }

    /// Places the pending VMs on `host_id`: every other host is cordoned for the pass.
    pub async fn place_on(&mut self, host_id: &str) {
        let others: Vec<String> = self
            .c
            .model()
            .hosts
            .keys()
            .filter(|id| *id != host_id)
            .cloned()
            .collect();
        for other in &others {
            self.set_host(other, HostState::Cordoned).await;
        }
        self.pass().await;
        for other in &others {
            self.set_host(other, HostState::Ready).await;
        }
    }
}

/// A VM of 512 MiB startup (no dynamic memory range beyond it).
pub(crate) fn plain() -> MemorySpec {
    MemorySpec {
        startup_mib: 512,
        ..Default::default()
    }
}

/// The agent reports FAILED only when it will not start the VM again by itself; a VM being
/// stopped or moved is released on it. STARTING (a start failed and is due again) keeps the
/// VM where it is: releasing it then could run it on two hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reported_failed_is_released_one_still_starting_is_not() {
    let mut h = Harness::new(Duration::ZERO).await;
    let a = h.add_host("node-a", 0).await;
    let b = h.add_host("node-b", 1).await;
    h.set_host(&b, HostState::Cordoned).await;
    let stopping = h.create_vm("stopping", plain()).await;
    let moving = h.create_vm("moving", plain()).await;
    h.pass().await;
    assert_eq!(h.host_of(&stopping), a);
    assert_eq!(h.host_of(&moving), a);
    h.set_host(&b, HostState::Ready).await;

    // One is stopped by its operator, the other's host drains; both are still retrying a
    // failed start.
    h.c.set_desired(&stopping, DesiredState::Stopped, None)
        .await
        .expect("stop");
    h.set_host(&a, HostState::Draining).await;
    let report = |h: &Harness, phase| {
        vec![
            observed(&h.vm(&stopping), phase),
            observed(&h.vm(&moving), phase),
        ]
    };
    h.heartbeat(&a, report(&h, ObservedPhase::Starting), None)
        .await;
    for _ in 0..3 {
        h.pass().await;
    }
    assert_eq!(h.host_of(&stopping), a, "released while a start is due");
    assert_eq!(
        h.host_of(&moving),
        a,
        "moved while a start is due on node-a"
    );

    // Now the agent has given up on both: they are released, one stopped, one placed on b.
    h.heartbeat(&a, report(&h, ObservedPhase::Failed), None)
        .await;
    h.pass().await;
    let status = h.vm(&stopping).status.unwrap_or_default();
    assert_eq!(
        (status.host_id.as_str(), status.phase()),
        ("", VmPhase::Stopped)
    );
    assert_eq!(h.host_of(&moving), b);
}

/// A "stopped" report that predates the stop does not release the VM: the host's fence
/// stopped it (reported STOPPED), it was started again at once (not yet reported), and an
/// operator's StopVm in that window used to release it on the old report; a StartVm could
/// then place it on another host while the first still ran it. Only a stop the agent has
/// acknowledged, reported stopped since, releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_stopped_report_does_not_release_a_vm() {
    let mut h = Harness::new(Duration::ZERO).await;
    let a = h.add_host("node-a", 0).await;
    let vm = h.create_vm("blip", plain()).await;
    h.pass().await;
    assert_eq!(h.host_of(&vm), a);
    // The fence blip: STOPPED, reported while the VM is wanted running.
    h.heartbeat(&a, vec![observed(&h.vm(&vm), ObservedPhase::Stopped)], None)
        .await;
    h.c.set_desired(&vm, DesiredState::Stopped, None)
        .await
        .expect("stop");
    for _ in 0..3 {
        h.pass().await;
    }
    assert_eq!(
        h.host_of(&vm),
        a,
        "released on a report from before the stop was sent"
    );
    // The agent applies the stop and reports the VM stopped: released.
    h.heartbeat(&a, vec![observed(&h.vm(&vm), ObservedPhase::Stopped)], None)
        .await;
    h.pass().await;
    assert_eq!(h.host_of(&vm), "");
}

/// A host declared DEAD that registers again before its VMs have all been moved off gets no
/// assignments until they have: its first set used to hold the VMs the reconciler was still
/// evicting (decided from the DEAD it had seen), so the host started them while they were
/// placed elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_registering_again_gets_nothing_until_its_vms_are_moved() {
    use fabric_proto::v1::WatchAssignmentsRequest;
    use tokio_stream::StreamExt;
    let mut h = Harness::new(Duration::ZERO).await;
    let a = h.add_host("node-a", 0).await;
    let vm = h.create_vm("moved", plain()).await;
    h.place_on(&a).await;
    assert_eq!(h.host_of(&vm), a);
    let b = h.add_host("node-b", 1).await;
    h.heartbeat(&a, vec![observed(&h.vm(&vm), ObservedPhase::Running)], None)
        .await;

    // Lease and margin run out: the reconciler sees DEAD (the eviction is decided next).
    {
        let mut model = h.c.model();
        let entry = model.hosts.get_mut(&a).expect("host a");
        entry.live.lease_expires = std::time::Instant::now() - Duration::from_secs(3600);
    }
    h.reconciler.host_states(&h.c);
    // The agent registers again at once, continuing its session.
    let session = h.c.model().hosts[&a].host.agent_session;
    let registered = h
        .hostlink
        .register_host(local_root(RegisterHostRequest {
            machine_id: "machine-node-a".to_string(),
            name: "node-a".to_string(),
            zone: "z1".to_string(),
            capacity: Some(Resources {
                cpus: 8,
                memory_mib: 16_384,
                disk_mib: 0,
            }),
            allocatable: Some(Resources {
                cpus: 8,
                memory_mib: 16_384,
                disk_mib: 0,
            }),
            previous_session: session,
            ..Default::default()
        }))
        .await
        .expect("register")
        .into_inner();
    let mut stream = h
        .hostlink
        .watch_assignments(local_root(WatchAssignmentsRequest {
            host_id: a.clone(),
            session: registered.session,
        }))
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(
        first.is_err(),
        "the re-registered host was sent a set while its VMs were being moved: {first:?}"
    );
    // The reconciler moves the VM (to node-b), then lifts the hold: an empty set.
    h.dead_and_lost_then_place().await;
    h.pass().await;
    assert_eq!(h.host_of(&vm), b);
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a set once the VMs are moved")
        .expect("stream open")
        .expect("a set");
    assert!(first.full && first.upserts.is_empty(), "{first:?}");
}

/// A registration continues the host's session (no hold) only from the same boot: a machine
/// cloned from a running one's disk presents the session it copied, from another boot, and
/// used to continue it, so both machines ran the host's VMs until the first heard it was
/// superseded (or, paused, until its lease ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_same_boot_continues_a_session() {
    let h = Harness::new(Duration::ZERO).await;
    let register = |machine: &'static str, boot: &'static str, previous: u64| {
        let hostlink = &h.hostlink;
        async move {
            let resources = Some(Resources {
                cpus: 8,
                memory_mib: 16_384,
                disk_mib: 0,
            });
            let response = hostlink
                .register_host(local_root(RegisterHostRequest {
                    machine_id: machine.to_string(),
                    name: machine.to_string(),
                    zone: "z1".to_string(),
                    capacity: resources,
                    allocatable: resources,
                    previous_session: previous,
                    boot_id: boot.to_string(),
                    ..Default::default()
                }))
                .await
                .expect("register")
                .into_inner();
            (response.host_id, response.session)
        }
    };
    let held = |host_id: &str| h.c.model().hosts[host_id].host.agent_session_held;

    // The same agent after a restart, same boot: continues.
    let (restarted, s1) = register("restarted", "boot-1", 0).await;
    register("restarted", "boot-1", s1).await;
    assert!(!held(&restarted), "a restart on the same boot was held");

    // A clone of a running machine: same session file, another boot: held.
    let (cloned, s1) = register("cloned", "boot-1", 0).await;
    register("cloned", "boot-2", s1).await;
    assert!(
        held(&cloned),
        "a registration from another boot continued the session"
    );
}

/// A host's update larger than a message may be goes in parts, each within the limit, that
/// together hold every assignment, in order, the last one marked final.
#[test]
fn a_large_update_goes_in_parts_within_the_limit() {
    use crate::hostlink::{into_parts, MAX_UPDATE_PART_BYTES};
    use fabric_proto::v1::{Assignment, AssignmentUpdate};
    use prost::Message;
    let assignment = |i: usize| Assignment {
        vm_id: format!("vm-{i:016x}"),
        spec: Some(VmSpec {
            name: format!("vm{i}"),
            kernel_cmdline: "x".repeat(2000),
            ..Default::default()
        }),
        ..Default::default()
    };
    let update = AssignmentUpdate {
        generation: 9,
        full: true,
        upserts: (0..3000).map(assignment).collect(),
        removed_vm_ids: (0..500).map(|i| format!("vm-gone-{i}")).collect(),
        continued: false,
    };
    assert!(update.encoded_len() > 4 << 20);
    let parts = into_parts(update.clone(), MAX_UPDATE_PART_BYTES);
    assert!(parts.len() > 4, "{}", parts.len());
    for (i, part) in parts.iter().enumerate() {
        assert!(part.encoded_len() <= MAX_UPDATE_PART_BYTES, "part {i}");
        assert_eq!((part.generation, part.full), (9, true));
        assert_eq!(part.continued, i + 1 < parts.len());
    }
    let upserts: Vec<Assignment> = parts.iter().flat_map(|p| p.upserts.clone()).collect();
    let removed: Vec<String> = parts
        .iter()
        .flat_map(|p| p.removed_vm_ids.clone())
        .collect();
    assert_eq!(upserts, update.upserts);
    assert_eq!(removed, update.removed_vm_ids);
    // A small one is one message.
    let small = AssignmentUpdate {
        upserts: vec![assignment(1)],
        ..update
    };
    assert_eq!(
        into_parts(small.clone(), MAX_UPDATE_PART_BYTES),
        vec![small]
    );
}

/// Pending VMs are considered oldest first, and one that cannot be placed waits a while
/// before it is considered again: VMs that fit nowhere do not starve a new one. (They were
/// taken in id order, the same first ones every pass.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_vms_do_not_starve_a_new_one() {
    let mut h = Harness::new(Duration::ZERO).await;
    h.reconciler.placements_per_pass = 4;
    h.add_host("node-a", 0).await;
    let huge = MemorySpec {
        startup_mib: 1 << 20,
        ..Default::default()
    };
    for i in 0..6 {
        h.create_vm(&format!("a{i}"), huge).await;
    }
    h.pass().await;
    let newcomer = h.create_vm("z", plain()).await;
    for _ in 0..3 {
        h.pass().await;
    }
    assert!(!h.host_of(&newcomer).is_empty(), "the new VM was starved");
    for i in 0..6 {
        assert_eq!(h.host_of(&format!("vm-a{i}")), "");
    }
    // Forgotten once they no longer wait.
    for i in 0..6 {
        h.c.delete_vm(&format!("vm-a{i}"), None)
            .await
            .expect("delete");
    }
    h.pass().await;
    assert!(h.reconciler.backoff.is_empty() && h.reconciler.unplaceable.is_empty());
}

/// A request as root on the Unix socket sends it (the tests call the handlers in process).
pub(crate) fn local_root<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .extensions_mut()
        .insert(fabric_proto::tls::PeerInfo {
            remote: None,
            identity: fabric_proto::tls::Identity::LocalRoot,
            expires: None,
            issued: None,
        });
    request
}
