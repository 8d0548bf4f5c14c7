//! Memory relief end to end: a controller and simulated hosts (fabric-agent `hypervisor =
//! "sim"`) over real gRPC, each agent running the real memory balancer over its simulated
//! guests. A host whose VMs want more memory than its budget for longer than the relief window
//! has one VM moved to the host with the most room, with events that say why; VMs on hosts that
//! are not short stay where they are. A host short with nowhere to move a VM gets a reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fabric_agent::sim::MEMORY_DEMAND_LABEL;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{
    CordonHostRequest, Event, EventKind, Placement, UncordonHostRequest, VmPhase, VmSpec,
    WatchEventsRequest,
};
use fabric_test_support::cluster::{Controller, SimHost, SimHostSpec, Timing};
use fabric_test_support::compute::{
    create_vm, eventually, list_hosts, ready_hosts_where, vm_status, wait_running,
};
use fabric_test_support::vmspec::{memory, simulated_vm};
use tonic::transport::Channel;

/// The relief window the controller runs with, seconds.
const WINDOW_S: f64 = 4.0;

/// A VM of startup 512, minimum 128, maximum 1024 MiB (buffer 20 %). Without a demand its
/// simulated guest uses 40 % of its startup memory, 204 MiB: it wants 245 MiB.
fn spec(name: &str, demand_mib: Option<u64>) -> VmSpec {
    VmSpec {
        memory: Some(memory(512, 128, 1024)),
        placement: Some(Placement {
            labels: demand_mib
                .map(|d| (MEMORY_DEMAND_LABEL.to_string(), d.to_string()))
                .into_iter()
                .collect(),
            ..Default::default()
        }),
        ..simulated_vm(name)
    }
}

/// `spec` placed only on the hosts of `zone`.
fn in_zone(mut spec: VmSpec, zone: &str) -> VmSpec {
    spec.placement.get_or_insert_with(Default::default).zone = zone.to_string();
    spec
}

/// Every event from now on, as it arrives.
fn record_events(client: &ComputeClient<Channel>) -> Arc<Mutex<Vec<Event>>> {
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let mut client = client.clone();
    let sink = events.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        let mut stream = client
            .watch_events(WatchEventsRequest::default())
            .await
            .expect("WatchEvents")
            .into_inner();
        let _ = ready_tx.send(());
        while let Ok(Some(event)) = stream.message().await {
            sink.lock().unwrap().push(event);
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the event stream opened");
    events
}

fn event_time(event: &Event) -> SystemTime {
    event
        .time
        .and_then(|t| SystemTime::try_from(t).ok())
        .expect("an event time")
}

fn describe(events: &[Event], names: &HashMap<String, String>) -> String {
    let start = events.first().map(event_time);
    events
        .iter()
        .map(|e| {
            let at = start
                .and_then(|s| event_time(e).duration_since(s).ok())
                .unwrap_or_default();
            format!(
                "{:>6.2}s {:?} vm={} host={} {} {}",
                at.as_secs_f64(),
                e.kind(),
                names.get(&e.vm_id).map_or(e.vm_id.as_str(), String::as_str),
                names
                    .get(&e.host_id)
                    .map_or(e.host_id.as_str(), String::as_str),
                e.reason,
                e.message
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn cordon(c: &mut ComputeClient<Channel>, host_id: &str) {
    c.cordon_host(CordonHostRequest {
        id: host_id.to_string(),
        reason: "test: steer placement".into(),
    })
    .await
    .expect("cordon");
}

async fn uncordon(c: &mut ComputeClient<Channel>, host_id: &str) {
    c.uncordon_host(UncordonHostRequest {
        id: host_id.to_string(),
    })
    .await
    .expect("uncordon");
}

async fn create(c: &ComputeClient<Channel>, spec: VmSpec) -> String {
    create_vm(c, spec).await.expect("create")
}

/// Waits until `vm_id` runs on `host_id`.
async fn running_on(c: &ComputeClient<Channel>, vm_id: &str, host_id: &str, what: &str) {
    wait_running(c, vm_id, Duration::from_secs(60), what, |on| on == host_id).await;
}

/// A controller relieving memory after [`WINDOW_S`] and simulated hosts, every one ready and
/// reporting its memory balance. Fields drop in order: processes first, the directory last.
struct ReliefCluster {
    _hosts: Vec<SimHost>,
    _controller: Controller,
    client: ComputeClient<Channel>,
    /// Host ids by name.
    host_ids: HashMap<String, String>,
    _dir: tempfile::TempDir,
}

/// Starts the cluster: host *i* of `hosts` (name, zone, memory budget) in fault and update
/// domain *i*.
async fn relief_cluster(hosts: &[(&str, &str, u64)]) -> ReliefCluster {
    let dir = tempfile::tempdir().unwrap();
    let window = WINDOW_S.to_string();
    let controller = Controller::start_with_args(
        &dir.path().join("controller"),
        Timing::default(),
        &["--memory-relief-window", &window],
    );
    let sim_hosts: Vec<SimHost> = hosts
        .iter()
        .enumerate()
        .map(|(i, (name, zone, budget))| {
            let spec = SimHostSpec::new(name, i as u32, i as u32)
                .in_zone(zone)
                .with_memory_budget(*budget);
            SimHost::start_spec(&dir.path().join(name), &controller.address(), &spec)
        })
        .collect();
    let client = controller.compute().await;
    let host_ids = ready_hosts_where(&client, hosts.len(), Duration::from_secs(30), |h| {
        h.usage.is_some_and(|u| u.memory_balance.is_some())
    })
    .await;
    ReliefCluster {
        _hosts: sim_hosts,
        _controller: controller,
        client,
        host_ids,
        _dir: dir,
    }
}

/// h0 (budget 1200 MiB) takes two idle VMs (245 MiB wanted each) and a hungry one whose guest
/// uses 700 MiB (840 wanted): 1330 > 1200, short by 130 MiB (a little more while the hungry one
/// pages: a pressured VM wants what it has plus its buffer). Either idle VM covers that and is
/// the smallest that does; their wants are equal, so the smaller VM id moves. h1 (budget 2000,
/// empty) has more room than h2 (budget 1500, one idle VM), so it goes to h1; then h0 fits
/// again and nothing else moves.
///
/// Every host is open before h0 turns short, so nothing here races the relief window: the
/// hungry VM and the steady one are pinned to h0 and h2 by zones only those hosts are in (the
/// hungry one cannot move; the idle ones, placed on h0 while h1 and h2 were cordoned, can).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_over_committed_host_has_a_vm_moved_to_the_host_with_the_most_room() {
    let cluster =
        relief_cluster(&[("h0", "z0", 1200), ("h1", "z1", 2000), ("h2", "z2", 1500)]).await;
    let (mut c, host_ids) = (cluster.client.clone(), &cluster.host_ids);
    let (h0, h1, h2) = (
        host_ids["h0"].clone(),
        host_ids["h1"].clone(),
        host_ids["h2"].clone(),
    );

    // The idle VMs on h0: the only open host while they are placed.
    cordon(&mut c, &h1).await;
    cordon(&mut c, &h2).await;
    let idle_a = create(&c, spec("idle-a", None)).await;
    let idle_b = create(&c, spec("idle-b", None)).await;
    running_on(&c, &idle_a, &h0, "idle-a running on h0").await;
    running_on(&c, &idle_b, &h0, "idle-b running on h0").await;
    uncordon(&mut c, &h1).await;
    uncordon(&mut c, &h2).await;
    let steady = create(&c, in_zone(spec("steady", None), "z2")).await;
    running_on(&c, &steady, &h2, "steady running on h2").await;

    // The hungry VM over-commits h0.
    let events = record_events(&c);
    let hungry = create(&c, in_zone(spec("hungry", Some(700)), "z0")).await;
    running_on(&c, &hungry, &h0, "hungry running on h0").await;

    let expected_mover = idle_a.clone().min(idle_b.clone());
    let stays_on_h0 = if expected_mover == idle_a {
        idle_b.clone()
    } else {
        idle_a.clone()
    };
    running_on(
        &c,
        &expected_mover,
        &h1,
        "the idle VM with the smaller id running on h1",
    )
    .await;
    // h0 fits again once the VM has left.
    eventually(Duration::from_secs(30), "h0 fits again", || {
        let events = events.clone();
        let h0 = h0.clone();
        async move {
            events
                .lock()
                .unwrap()
                .iter()
                .any(|e| {
                    e.kind() == EventKind::HostMemory && e.host_id == h0 && e.reason == "MemoryFits"
                })
                .then_some(())
        }
    })
    .await;
    // Two more windows: nothing else moves.
    tokio::time::sleep(Duration::from_secs_f64(2.0 * WINDOW_S)).await;

    let mut names: HashMap<String, String> = host_ids
        .iter()
        .map(|(n, id)| (id.clone(), n.clone()))
        .collect();
    for (id, name) in [
        (&steady, "steady"),
        (&idle_a, "idle-a"),
        (&idle_b, "idle-b"),
        (&hungry, "hungry"),
    ] {
        names.insert(id.clone(), name.to_string());
    }
    let events = events.lock().unwrap().clone();
    let log = describe(&events, &names);
    println!("events:\n{log}");

    let evictions: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind() == EventKind::VmEvicted)
        .collect();
    assert_eq!(evictions.len(), 1, "exactly one move:\n{log}");
    let eviction = evictions[0];
    assert_eq!(eviction.reason, "MemoryRelief", "{log}");
    assert_eq!(
        eviction.vm_id, expected_mover,
        "the smaller idle VM:\n{log}"
    );
    assert_eq!(eviction.host_id, h0, "{log}");
    for words in [
        "off host h0",
        "to host h1",
        "budget",
        "too much",
        "the VM wants 245 MiB",
        "enough to end the shortage",
    ] {
        assert!(
            eviction.message.contains(words),
            "the eviction does not say {words:?}: {}",
            eviction.message
        );
    }

    // Only after the window: h0 was short, without a break, for WINDOW_S before the move.
    let short_before: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind() == EventKind::HostMemory && e.host_id == h0)
        .filter(|e| event_time(e) <= event_time(eviction))
        .collect();
    let last = short_before
        .last()
        .unwrap_or_else(|| panic!("no HOST_MEMORY event of h0 before the move:\n{log}"));
    assert_eq!(last.reason, "MemoryShort", "{log}");
    assert!(
        last.message.contains("is short of memory") && last.message.contains("1200 MiB budget"),
        "{}",
        last.message
    );
    let waited = event_time(eviction)
        .duration_since(event_time(last))
        .unwrap_or_default();
    assert!(
        waited >= Duration::from_secs_f64(WINDOW_S - 0.05),
        "moved {waited:?} after h0 turned short, within the {WINDOW_S} s window:\n{log}"
    );
    assert!(
        waited < Duration::from_secs_f64(WINDOW_S + 10.0),
        "moved only {waited:?} after h0 turned short:\n{log}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.kind() == EventKind::HostMemory && e.reason == "MemoryReliefBlocked"),
        "a destination was open:\n{log}"
    );

    // Placed on h1 for the reason given; nothing else moved or went to h2.
    let scheduled: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind() == EventKind::VmScheduled && e.vm_id == expected_mover)
        .collect();
    assert_eq!(scheduled.len(), 1, "{log}");
    assert_eq!(scheduled[0].host_id, h1, "{log}");
    assert_eq!(scheduled[0].reason, "MemoryRelief", "{log}");
    let status = vm_status(&c, &expected_mover).await.unwrap();
    assert_eq!((&status.host_id, status.phase()), (&h1, VmPhase::Running));
    for (vm, host) in [(&steady, &h2), (&stays_on_h0, &h0), (&hungry, &h0)] {
        let status = vm_status(&c, vm).await.unwrap();
        assert_eq!(
            (&status.host_id, status.phase()),
            (host, VmPhase::Running),
            "{} moved:\n{log}",
            names[vm]
        );
    }
    // No host is short any more.
    for host in list_hosts(&c).await.unwrap() {
        let balance = host.usage.and_then(|u| u.memory_balance).unwrap();
        assert!(
            !balance.short,
            "{} still short: {balance:?}:\n{log}",
            host.name
        );
    }
}

/// A host short of memory whose only other host is cordoned: after the window, a
/// HOST_MEMORY event says why nothing moves; once the other host opens, the VM moves there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_host_without_a_destination_gets_a_reason_not_a_move() {
    let cluster = relief_cluster(&[("s0", "z1", 600), ("s1", "z1", 4000)]).await;
    let (mut c, host_ids) = (cluster.client.clone(), &cluster.host_ids);
    let (s0, s1) = (host_ids["s0"].clone(), host_ids["s1"].clone());
    cordon(&mut c, &s1).await;
    let events = record_events(&c);
    // One VM whose guest uses 700 MiB on a 600 MiB budget: short whatever is shared.
    let big = create(&c, spec("big", Some(700))).await;
    running_on(&c, &big, &s0, "big running on s0").await;
    let blocked = eventually(
        Duration::from_secs(60),
        "a MemoryReliefBlocked event for s0",
        || {
            let events = events.clone();
            let s0 = s0.clone();
            async move {
                events
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|e| {
                        e.kind() == EventKind::HostMemory
                            && e.host_id == s0
                            && e.reason == "MemoryReliefBlocked"
                    })
                    .cloned()
            }
        },
    )
    .await;
    assert!(
        blocked.message.contains("host s0")
            && blocked.message.contains("no VM can move: big (wants ")
            && blocked
                .message
                .contains("fits none of 1 other hosts: 1 cordoned"),
        "{}",
        blocked.message
    );
    let status = vm_status(&c, &big).await.unwrap();
    assert_eq!(status.host_id, s0, "moved although nowhere had room");
    assert!(
        !events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind() == EventKind::VmEvicted),
        "an eviction without a destination"
    );

    // s1 opens: s0 has been short for longer than the window, so the VM moves at once.
    uncordon(&mut c, &s1).await;
    running_on(&c, &big, &s1, "big running on s1").await;
    let events = events.lock().unwrap().clone();
    let names: HashMap<String, String> = host_ids
        .iter()
        .map(|(n, id)| (id.clone(), n.clone()))
        .chain([(big.clone(), "big".to_string())])
        .collect();
    let log = describe(&events, &names);
    println!("events:\n{log}");
    let eviction = events
        .iter()
        .find(|e| e.kind() == EventKind::VmEvicted)
        .unwrap_or_else(|| panic!("no eviction:\n{log}"));
    assert_eq!(eviction.reason, "MemoryRelief");
    assert!(
        eviction.message.contains("off host s0") && eviction.message.contains("to host s1"),
        "{}",
        eviction.message
    );
    // Announced when the reason changes, not at every pass.
    let reasons: Vec<&str> = events
        .iter()
        .filter(|e| e.reason == "MemoryReliefBlocked")
        .map(|e| e.message.split("no VM can move: ").nth(1).unwrap_or(""))
        .collect();
    assert!(!reasons.is_empty(), "{log}");
    assert!(
        reasons.windows(2).all(|pair| pair[0] != pair[1]),
        "the same reason announced twice in a row:\n{log}"
    );
}
