//! The controller against real processes: durability of acknowledged creates across SIGKILL,
//! and failover of a dead host's VMs only after the fencing window, with simulated hosts
//! (fabric-agent `hypervisor = "sim"`) driven over real gRPC.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_proto::v1::{
    CreateVmRequest, EventKind, GetHostRequest, GetVmRequest, HostState, ListVmsRequest, Placement,
    StopVmRequest, VmPhase, VmSpec, WatchEventsRequest,
};
use fabric_test_support::cluster::{Controller, SimHost, Timing};
use fabric_test_support::compute::{
    create_vm, eventually, ready_hosts, running_placement, vm_status,
};
use fabric_test_support::vmspec::simulated_vm;

/// A VM a simulated host runs, in availability set `set` ("" for none).
fn spec(name: &str, set: &str) -> VmSpec {
    VmSpec {
        placement: Some(Placement {
            availability_set: set.to_string(),
            ..Default::default()
        }),
        ..simulated_vm(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_creates_survive_sigkill_with_their_placement() {
    let dir = tempfile::tempdir().unwrap();
    let mut controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let _host = SimHost::start(&dir.path().join("h1"), "h1", &controller.address(), 0, 0);
    let client = controller.compute().await;
    ready_hosts(&client, 1, Duration::from_secs(30)).await;

    // 16 clients create VMs as fast as they can; the controller is killed mid-stream.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut c = client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let name = format!("d-{w}-{i}");
                let request = CreateVmRequest {
                    spec: Some(spec(&name, "")),
                    desired_state: 0,
                };
                match c.create_vm(request).await {
                    Ok(vm) => acked.lock().unwrap().push((vm.into_inner().id, name)),
                    Err(_) => return, // the controller is gone
                }
            }
        }));
    }
    // Let creates and placements flow until at least 50 are acknowledged and some of them
    // placed (noted), then kill while the writers keep going.
    let mut placed_before: HashMap<String, String> = HashMap::new();
    let c = client.clone();
    let flowing_by = Instant::now() + Duration::from_secs(60);
    while placed_before.is_empty() || acked.lock().unwrap().len() < 50 {
        assert!(
            Instant::now() < flowing_by,
            "in 60 s: {} creates acknowledged, {} of the first 50 placed",
            acked.lock().unwrap().len(),
            placed_before.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sample: Vec<String> = acked
            .lock()
            .unwrap()
            .iter()
            .take(50)
            .map(|(id, _)| id.clone())
            .collect();
        for id in sample {
            let host = vm_status(&c, &id).await.unwrap_or_default().host_id;
            if !host.is_empty() {
                placed_before.insert(id, host);
            }
        }
    }
    controller.process.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 50,
        "only {} creates acknowledged before the kill",
        acked.len()
    );
    assert!(
        !placed_before.is_empty(),
        "no VM was placed before the kill"
    );

    controller.kill9_and_restart();
    let mut c = controller.compute().await;
    let mut all = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_vms(ListVmsRequest {
                page_token: token.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("ListVms after restart")
            .into_inner();
        for vm in page.vms {
            all.insert(vm.id.clone(), vm);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    for (id, name) in &acked {
        let vm = all.get(id).unwrap_or_else(|| {
            panic!("VM {id} ({name}) was acknowledged but is gone after SIGKILL")
        });
        assert_eq!(vm.spec.as_ref().unwrap().name, *name);
    }
    for (id, host) in &placed_before {
        let now = all[id].status.clone().unwrap_or_default().host_id;
        assert_eq!(&now, host, "VM {id} lost its placement across the restart");
    }
    println!(
        "{} creates acknowledged before SIGKILL, all present after restart ({} in store); {} placements checked",
        acked.len(),
        all.len(),
        placed_before.len()
    );
    // The restarted controller carries on: the one host (16 CPUs x 4 overcommit, 64 GiB)
    // fills up, and every VM is either placed or pending because nothing fits.
    let (placed, full) = eventually(
        Duration::from_secs(60),
        "every VM placed or explained",
        || {
            let mut c = c.clone();
            async move {
                let vms = c
                    .list_vms(ListVmsRequest {
                        page_size: 5000,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .vms;
                let placed = vms
                    .iter()
                    .filter(|v| !v.status.as_ref().unwrap().host_id.is_empty())
                    .count();
                let full = vms
                    .iter()
                    .filter(|v| {
                        let s = v.status.as_ref().unwrap();
                        s.phase() == VmPhase::Pending
                            && s.reason.starts_with("0/1 hosts: 1 insufficient")
                    })
                    .count();
                (placed + full == vms.len() && placed == 64).then_some((placed, full))
            }
        },
    )
    .await;
    println!(
        "after the restart: {placed} placed (the host is full), {full} pending with the reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_hosts_vms_move_only_after_the_fencing_window() {
    let dir = tempfile::tempdir().unwrap();
    // The support's default: a 2 s lease, 0.5 s heartbeats, a 1.5 s fencing margin.
    let timing = Timing::default();
    let controller = Controller::start(&dir.path().join("controller"), timing);
    let mut hosts: Vec<SimHost> = (0..3)
        .map(|i| {
            SimHost::start(
                &dir.path().join(format!("h{i}")),
                &format!("h{i}"),
                &controller.address(),
                i,
                i,
            )
        })
        .collect();
    let mut c = controller.compute().await;
    let host_ids = ready_hosts(&c, 3, Duration::from_secs(30)).await;
    // An availability set of 3 spreads over the 3 fault domains: one VM per host.
    let mut ids = Vec::new();
    for i in 0..3 {
        let spec = spec(&format!("web-{i}"), "web");
        ids.push(create_vm(&c, spec).await.expect("create"));
    }
    let placement: HashMap<String, String> =
        eventually(Duration::from_secs(30), "3 VMs running", || {
            running_placement(&c, &ids)
        })
        .await;
    let distinct: std::collections::HashSet<_> = placement.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "the availability set was not spread: {placement:?}"
    );

    // Kill host h0's agent: its heartbeats stop.
    let dead_id = host_ids["h0"].clone();
    let victim = placement
        .iter()
        .find(|(_, h)| **h == dead_id)
        .map(|(id, _)| id.clone())
        .unwrap();
    let mut events = c
        .watch_events(WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    hosts[0].process.kill9();
    let killed = Instant::now();
    let killed_wall = std::time::SystemTime::now();

    // Collect events until the victim runs elsewhere.
    let mut seen = Vec::new();
    let mut suspect_at = None;
    let mut dead_at = None;
    let mut scheduled_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let event = tokio::time::timeout(Duration::from_secs(5), events.message()).await;
        let Ok(Ok(Some(event))) = event else { continue };
        let at = killed.elapsed();
        if event.host_id == dead_id && event.kind() == EventKind::HostStateChanged {
            match event.host_state() {
                HostState::Suspect => suspect_at = suspect_at.or(Some(at)),
                HostState::Dead => dead_at = dead_at.or(Some(at)),
                _ => {}
            }
        }
        if event.vm_id == victim
            && event.kind() == EventKind::VmScheduled
            && event.host_id != dead_id
        {
            scheduled_at = Some(at);
        }
        seen.push(format!(
            "{:>6.2}s {:?} vm={} host={} {}",
            at.as_secs_f64(),
            event.kind(),
            event.vm_id,
            event.host_id,
            event.message
        ));
        if event.vm_id == victim
            && event.kind() == EventKind::VmPhaseChanged
            && event.vm_phase() == VmPhase::Running
            && scheduled_at.is_some()
        {
            break;
        }
    }
    let log = seen.join("\n");
    println!("events after the kill:\n{log}");
    let suspect_at = suspect_at.unwrap_or_else(|| panic!("no SUSPECT event:\n{log}"));
    let dead_at = dead_at.unwrap_or_else(|| panic!("no DEAD event:\n{log}"));
    let scheduled_at =
        scheduled_at.unwrap_or_else(|| panic!("the VM was not placed elsewhere:\n{log}"));
    assert!(suspect_at < dead_at, "{log}");
    // The lease runs from the last heartbeat the controller received (as it reports it; an
    // agent starved before the kill may have sent it well over an interval earlier): the
    // lease plus the margin must have passed from then before the host was declared dead and
    // the VM moved.
    let last_heartbeat: std::time::SystemTime = c
        .get_host(GetHostRequest {
            id: dead_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_heartbeat_at
        .expect("last heartbeat")
        .try_into()
        .expect("a valid timestamp");
    let quiet_before_kill = killed_wall
        .duration_since(last_heartbeat)
        .unwrap_or_default();
    let window = Duration::from_secs_f64(timing.lease_ttl + timing.fencing_margin);
    // Wall-clock readings in two processes: allow 50 ms for the difference.
    let slack = Duration::from_millis(50);
    assert!(
        scheduled_at + quiet_before_kill + slack >= window,
        "the VM was placed elsewhere {scheduled_at:?} after the kill, {quiet_before_kill:?} after the last heartbeat, inside the fencing window {window:?}:\n{log}"
    );
    assert!(
        dead_at + quiet_before_kill + slack >= window,
        "host declared dead too early ({dead_at:?} after the kill, {quiet_before_kill:?} after the last heartbeat):\n{log}"
    );
    assert!(
        log.contains("VmEvicted") && log.contains("declared dead"),
        "{log}"
    );
    println!(
        "suspect after {:.2}s, dead after {:.2}s, placed elsewhere after {:.2}s (fencing window {:.2}s)",
        suspect_at.as_secs_f64(),
        dead_at.as_secs_f64(),
        scheduled_at.as_secs_f64(),
        window.as_secs_f64()
    );
    let vm = c
        .get_vm(GetVmRequest { id: victim.clone() })
        .await
        .unwrap()
        .into_inner();
    let status = vm.status.unwrap();
    assert_ne!(status.host_id, dead_id);
    assert_eq!(status.phase(), VmPhase::Running);
    hosts.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_moves_every_vm_one_update_domain_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    // h0, h1 in update domain 0; h2, h3 in update domain 1.
    let _hosts: Vec<SimHost> = (0..4)
        .map(|i| {
            SimHost::start(
                &dir.path().join(format!("h{i}")),
                &format!("h{i}"),
                &controller.address(),
                i,
                i / 2,
            )
        })
        .collect();
    let mut c = controller.compute().await;
    let host_ids = ready_hosts(&c, 4, Duration::from_secs(30)).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut s = spec(&format!("app-{i}"), "");
        s.placement
            .as_mut()
            .unwrap()
            .labels
            .insert("fabric.placement/strategy".into(), "spread".into());
        ids.push(create_vm(&c, s).await.unwrap());
    }
    let before = eventually(Duration::from_secs(30), "8 VMs running", || {
        running_placement(&c, &ids)
    })
    .await;
    let (h0, h2) = (host_ids["h0"].clone(), host_ids["h2"].clone());
    let on_h0 = before.values().filter(|h| **h == h0).count();
    let on_h2 = before.values().filter(|h| **h == h2).count();
    assert!(
        on_h0 > 0 && on_h2 > 0,
        "spread placement left a drained host empty: {before:?}"
    );

    let mut events = c
        .watch_events(WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    use fabric_proto::v1::DrainHostRequest;
    c.drain_host(DrainHostRequest {
        id: h2.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    c.drain_host(DrainHostRequest {
        id: h0.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    let after = eventually(
        Duration::from_secs(60),
        "all VMs running off the drained hosts",
        || async {
            let on = running_placement(&c, &ids).await?;
            on.values().all(|h| *h != h0 && *h != h2).then_some(on)
        },
    )
    .await;
    assert_eq!(after.len(), 8, "a VM was lost");
    // The order of evictions: every VM of update domain 0's host before any of domain 1's.
    let mut order = Vec::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), events.message()).await
    {
        if e.kind() == EventKind::VmEvicted {
            order.push(e.host_id.clone());
        }
    }
    assert_eq!(order.len(), on_h0 + on_h2, "evictions: {order:?}");
    let first_h2 = order.iter().position(|h| *h == h2).unwrap();
    let last_h0 = order.iter().rposition(|h| *h == h0).unwrap();
    assert!(
        last_h0 < first_h2,
        "update domains were drained together: {order:?}"
    );
    for id in [&h0, &h2] {
        let host = eventually(Duration::from_secs(10), "drained host cordoned", || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                let h = c
                    .get_host(fabric_proto::v1::GetHostRequest { id })
                    .await
                    .ok()?
                    .into_inner();
                (h.state() == HostState::Cordoned).then_some(h)
            }
        })
        .await;
        assert_eq!(host.allocated.unwrap_or_default().cpus, 0);
    }
}

/// Agents ignore an assignment update older than the last one they applied, and a
/// controller numbers its updates from where the previous process stopped. It used to take
/// that from the wall clock: a controller restarted after its clock was set back an hour (a
/// wall-clock jump as the daemon sees it, made with the test-only offset) sent updates that
/// the agent took for stale and ignored, so a VM told to stop kept running, for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restarted_with_its_clock_set_back_is_still_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("wall-clock-offset-ms");
    std::fs::write(&offset, "0").unwrap();
    let offset_arg = offset.display().to_string();
    let mut controller = Controller::start_with_env(
        &dir.path().join("controller"),
        Timing::default(),
        &[],
        &[(fabric_proto::clock::TEST_OFFSET_ENV, offset_arg.as_str())],
    );
    let _host = SimHost::start(&dir.path().join("h1"), "h1", &controller.address(), 0, 0);
    let client = controller.compute().await;
    ready_hosts(&client, 1, Duration::from_secs(30)).await;
    let id = create_vm(&client, simulated_vm("clocked")).await.unwrap();
    eventually(Duration::from_secs(60), "the VM running", || {
        let ids = vec![id.clone()];
        let client = client.clone();
        async move { running_placement(&client, &ids).await }
    })
    .await;

    std::fs::write(&offset, "-3600000").unwrap();
    controller.kill9_and_restart();
    let mut client = controller.compute().await;
    ready_hosts(&client, 1, Duration::from_secs(30)).await;
    client
        .stop_vm(StopVmRequest { id: id.clone() })
        .await
        .expect("StopVm");
    eventually(
        Duration::from_secs(30),
        "the agent to stop the VM after the controller's restart",
        || {
            let client = client.clone();
            let id = id.clone();
            async move {
                let status = vm_status(&client, &id).await?;
                (status.phase() == VmPhase::Stopped).then_some(())
            }
        },
    )
    .await;
}

/// A controller restarted with a shorter lease TTL and margin than the process before it
/// must still wait out the leases that process granted before it declares a host dead. It
/// used to give every host a fresh lease of its own (shorter) TTL: a host paused just after
/// renewing a 10 s lease was declared dead 3 s after the restart and its VM placed elsewhere,
/// while its own VMM could run on for 7 s more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restarted_with_a_shorter_lease_waits_out_the_longer_one() {
    let dir = tempfile::tempdir().unwrap();
    let long = Timing {
        lease_ttl: 10.0,
        heartbeat_interval: 1.0,
        fencing_margin: 2.0,
    };
    let mut controller = Controller::start(&dir.path().join("controller"), long);
    let h1 = SimHost::start(&dir.path().join("h1"), "h1", &controller.address(), 0, 0);
    let h2 = SimHost::start(&dir.path().join("h2"), "h2", &controller.address(), 1, 1);
    let client = controller.compute().await;
    let hosts = ready_hosts(&client, 2, Duration::from_secs(30)).await;
    let id = create_vm(&client, simulated_vm("leased")).await.unwrap();
    let placed = eventually(Duration::from_secs(60), "the VM running", || {
        let ids = vec![id.clone()];
        let client = client.clone();
        async move { running_placement(&client, &ids).await }
    })
    .await;
    let on = placed[&id].clone();
    let paused = if hosts["h1"] == on { &h1 } else { &h2 };
    // Paused right after a heartbeat: its lease (10 s) runs on, and so would its VMs.
    let heartbeats = std::time::Instant::now();
    while heartbeats.elapsed() < Duration::from_millis(1200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: kill(2) on the pid of the agent this test started.
    unsafe { libc::kill(paused.process.pid() as i32, libc::SIGSTOP) };
    let stopped_at = std::time::Instant::now();
    controller.timing = Timing {
        lease_ttl: 2.0,
        heartbeat_interval: 1.0,
        fencing_margin: 1.0,
    };
    controller.kill9_and_restart();
    let client = controller.compute().await;
    // The paused host's lease may run 10 s from its last heartbeat (at most ~1 s before the
    // pause): for 8 s after the pause, the VM may not be anywhere else.
    while stopped_at.elapsed() < Duration::from_secs(8) {
        if let Some(status) = vm_status(&client, &id).await {
            assert!(
                status.host_id == on,
                "{:.1} s after the pause the VM is {:?} on {:?}, not on the paused host {on}",
                stopped_at.elapsed().as_secs_f64(),
                status.phase(),
                status.host_id
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: as above.
    unsafe { libc::kill(paused.process.pid() as i32, libc::SIGCONT) };
}

/// A machine retired for good leaves no record behind: RemoveHost forgets a DEAD host that
/// holds no VM (and refuses one that is not DEAD, saying why); its agent, should it return,
/// registers as a new host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_host_is_removed_and_a_live_one_is_not() {
    use fabric_proto::v1::RemoveHostRequest;
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let _h1 = SimHost::start(&dir.path().join("h1"), "h1", &controller.address(), 0, 0);
    let mut h2 = SimHost::start(&dir.path().join("h2"), "h2", &controller.address(), 1, 1);
    let mut client = controller.compute().await;
    let hosts = ready_hosts(&client, 2, Duration::from_secs(30)).await;
    // Every heartbeat reports the data directory's filesystem (what `fabricctl host get`
    // shows as disk).
    let h1 = hosts["h1"].clone();
    let usage = eventually(Duration::from_secs(10), "h1's disk figures", || {
        let mut client = client.clone();
        let id = h1.clone();
        async move {
            let host = client.get_host(GetHostRequest { id }).await.ok()?;
            host.into_inner().usage.filter(|u| u.disk_total_mib > 0)
        }
    })
    .await;
    assert!(
        usage.disk_available_mib <= usage.disk_total_mib,
        "{usage:?}"
    );
    let refused = client
        .remove_host(RemoveHostRequest {
            id: hosts["h2"].clone(),
        })
        .await
        .expect_err("a READY host removed");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("only a DEAD host"),
        "{refused:?}"
    );

    h2.process.kill9();
    let id = hosts["h2"].clone();
    eventually(Duration::from_secs(30), "h2 DEAD", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let host = client
                .get_host(GetHostRequest { id })
                .await
                .ok()?
                .into_inner();
            (host.state() == HostState::Dead).then_some(())
        }
    })
    .await;
    client
        .remove_host(RemoveHostRequest { id: id.clone() })
        .await
        .expect("remove the DEAD host");
    let gone = client.get_host(GetHostRequest { id: id.clone() }).await;
    assert_eq!(gone.expect_err("removed").code(), tonic::Code::NotFound);
    let left = client
        .list_hosts(fabric_proto::v1::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(left.len(), 1);

    // The machine comes back: a new host, under its old name.
    let _h2 = SimHost::start(&dir.path().join("h2"), "h2", &controller.address(), 1, 1);
    let again = ready_hosts(&client, 2, Duration::from_secs(30)).await;
    assert_ne!(again["h2"], id);
}

/// The controller's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 1,000 image pushes cancelled after their first chunk leave no partial file behind (the
/// handler is dropped, not finished, when a client goes away: its file used to stay), and
/// 1,000 event watchers that never read, then go away, leave the controller's memory where it
/// was. The figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_pushes_and_unread_watchers_leave_nothing_behind() {
    use fabric_proto::v1::images_client::ImagesClient;
    use fabric_proto::v1::push_image_request::Part;
    use fabric_proto::v1::{ImageFileRole, PushImageHeader, PushImageRequest};
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let pid = controller.process.pid();
    let blobs = dir.path().join("controller/data/images/blobs");
    let channel = fabric_test_support::cluster::unix_channel(&controller.socket).await;
    let _host = SimHost::start(&dir.path().join("h1"), "h1", &controller.address(), 0, 0);
    let client = controller.compute().await;
    ready_hosts(&client, 1, Duration::from_secs(30)).await;
    let before = rss_kib(pid);

    for i in 0..1000u32 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(PushImageRequest {
            part: Some(Part::Header(PushImageHeader {
                image_name: "cancelled".into(),
                role: ImageFileRole::Disk as i32,
                sha256: format!("{:064x}", i),
                size_bytes: 1 << 20,
                file_name: "disk.img".into(),
                project: String::new(),
            })),
        })
        .await
        .unwrap();
        tx.send(PushImageRequest {
            part: Some(Part::Data(vec![0u8; 64 << 10])),
        })
        .await
        .unwrap();
        let mut images = ImagesClient::new(channel.clone());
        let push = tokio::spawn(async move {
            let _tx = tx; // held open: the push waits for more
            images
                .push_image(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        tokio::time::sleep(Duration::from_millis(3)).await;
        push.abort();
    }
    let partial_files = || {
        std::fs::read_dir(&blobs)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(".push-"))
                    .count()
            })
            .unwrap_or(0)
    };
    println!(
        "partial push files right after the cancels: {}",
        partial_files()
    );
    // Most handlers see their stream reset and remove their file at once; one whose client
    // went away without a reset reaching it is dropped by the push idle timeout (60 s).
    eventually(Duration::from_secs(75), "no partial push files", || {
        let n = partial_files();
        async move { (n == 0).then_some(()) }
    })
    .await;
    let after_pushes = rss_kib(pid);

    // 1,000 watchers on 4 connections that never read while events flow, then go away: the
    // controller serves MAX_EVENT_WATCHERS of them and refuses the rest, naming the limit.
    // Twice: what the first round leaves is the allocator's and the 200 VMs' it created; a
    // second round must not add to it.
    let mut rounds = Vec::new();
    for round in 0..2 {
        let mut watchers = Vec::new();
        let mut refused = 0;
        for _ in 0..4 {
            let channel = fabric_test_support::cluster::unix_channel(&controller.socket).await;
            for _ in 0..250 {
                let mut compute =
                    fabric_proto::v1::compute_client::ComputeClient::new(channel.clone());
                let request = fabric_proto::v1::WatchEventsRequest {
                    since_sequence: 1,
                    ..Default::default()
                };
                match compute.watch_events(request).await {
                    Ok(stream) => watchers.push(stream.into_inner()),
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                        assert!(
                            status.message().contains("256 event watchers"),
                            "{status:?}"
                        );
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!((watchers.len(), refused), (256, 744));
        for i in 0..200 {
            let _ = create_vm(&client, simulated_vm(&format!("churn-{round}-{i}"))).await;
        }
        let with_watchers = rss_kib(pid);
        drop(watchers);
        tokio::time::sleep(Duration::from_secs(3)).await;
        rounds.push((with_watchers, rss_kib(pid)));
    }
    let [(with_watchers, after), (with_watchers_2, after_2)] = rounds[..] else {
        unreachable!()
    };
    println!(
        "controller RSS: {before} KiB at start, {after_pushes} KiB after 1000 cancelled pushes, \
         {with_watchers} KiB with 1000 unread watchers, {after} KiB after they left; \
         second round: {with_watchers_2} KiB with them, {after_2} KiB after"
    );
    assert!(
        after_2 < after + 4 * 1024,
        "a second round of 1000 unread watchers grew the controller from {after} to {after_2} KiB"
    );
    assert!(
        after_pushes < before + 32 * 1024,
        "1000 cancelled pushes grew the controller from {before} to {after_pushes} KiB"
    );
    assert!(
        after < before + 16 * 1024,
        "the watchers' memory was not given back: {before} -> {with_watchers} -> {after} KiB"
    );
}

/// Pushes `bytes` as a disk image `name`; the controller's answer.
async fn push_bytes(
    channel: tonic::transport::Channel,
    name: &str,
    bytes: Vec<u8>,
) -> Result<(), tonic::Status> {
    push_file(channel, name, fabric_proto::v1::ImageFileRole::Disk, bytes).await
}

/// Pushes `bytes` as the file of `role` of image `name`; the controller's answer.
async fn push_file(
    channel: tonic::transport::Channel,
    name: &str,
    role: fabric_proto::v1::ImageFileRole,
    bytes: Vec<u8>,
) -> Result<(), tonic::Status> {
    use fabric_proto::v1::images_client::ImagesClient;
    use fabric_proto::v1::push_image_request::Part;
    use fabric_proto::v1::{PushImageHeader, PushImageRequest};
    use sha2::Digest;
    let mut messages = vec![PushImageRequest {
        part: Some(Part::Header(PushImageHeader {
            image_name: name.into(),
            role: role as i32,
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            size_bytes: bytes.len() as u64,
            file_name: "disk.img".into(),
            project: String::new(),
        })),
    }];
    for chunk in bytes.chunks(1 << 20) {
        messages.push(PushImageRequest {
            part: Some(Part::Data(chunk.to_vec())),
        });
    }
    ImagesClient::new(channel)
        .push_image(tokio_stream::iter(messages))
        .await
        .map(|_| ())
}

/// The images a controller stores are held to `--image-quota-mib`: a push that would exceed
/// it is refused, naming the quota, and takes nothing (a later push that fits goes through).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_pushes_beyond_the_quota_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start_with_args(
        &dir.path().join("controller"),
        Timing::default(),
        &["--image-quota-mib", "2"],
    );
    let channel = fabric_test_support::cluster::unix_channel(&controller.socket).await;
    push_bytes(channel.clone(), "a", vec![1u8; 1 << 20])
        .await
        .expect("1 MiB of a 2 MiB quota");
    let refused = push_bytes(channel.clone(), "b", vec![2u8; 1536 << 10])
        .await
        .expect_err("1.5 MiB more");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("of 2 MiB"), "{refused:?}");
    push_bytes(channel, "c", vec![3u8; 512 << 10])
        .await
        .expect("what still fits");
}

/// DeleteImage forgets an image and removes the files nothing refers to: not a file a VM
/// still uses (collected by a later deletion once the VM is gone), and a file replaced by a
/// newer push of the same role is collected too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_images_free_their_files_but_not_those_a_vm_uses() {
    use fabric_proto::v1::images_client::ImagesClient;
    use fabric_proto::v1::{BootImage, DeleteImageRequest, DeleteVmRequest};
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let blobs = dir.path().join("controller/data/images/blobs");
    let count = || std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    let channel = fabric_test_support::cluster::unix_channel(&controller.socket).await;
    let mut images = ImagesClient::new(channel.clone());
    let mut client = controller.compute().await;

    push_bytes(channel.clone(), "scratch", vec![1u8; 4096])
        .await
        .unwrap();
    push_bytes(channel.clone(), "scratch", vec![2u8; 4096])
        .await
        .unwrap(); // replaces the first
    push_kernel(channel.clone(), "used", vec![3u8; 4096]).await;
    assert_eq!(count(), 3);
    let vm = client
        .create_vm(CreateVmRequest {
            spec: Some(VmSpec {
                image: Some(BootImage {
                    name: "used".into(),
                    ..Default::default()
                }),
                ..simulated_vm("uses-it")
            }),
            desired_state: 0,
        })
        .await
        .expect("a VM of image used")
        .into_inner();

    let deleted = images
        .delete_image(DeleteImageRequest {
            name: "scratch".into(),
        })
        .await
        .expect("delete scratch")
        .into_inner();
    assert_eq!(deleted.removed_sha256.len(), 2, "{deleted:?}");
    assert_eq!(deleted.freed_bytes, 8192);
    let deleted = images
        .delete_image(DeleteImageRequest {
            name: "used".into(),
        })
        .await
        .expect("delete used")
        .into_inner();
    assert!(
        deleted.removed_sha256.is_empty(),
        "a file the VM uses was removed: {deleted:?}"
    );
    assert_eq!(count(), 1);
    let missing = images
        .delete_image(DeleteImageRequest {
            name: "used".into(),
        })
        .await
        .expect_err("deleted twice");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    client
        .delete_vm(DeleteVmRequest { id: vm.id })
        .await
        .expect("delete the VM");
    push_bytes(channel.clone(), "later", vec![4u8; 10])
        .await
        .unwrap();
    let deleted = images
        .delete_image(DeleteImageRequest {
            name: "later".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.removed_sha256.len(), 2, "{deleted:?}");
    assert_eq!(count(), 0);
}

/// Pushes `bytes` as the kernel of image `name`.
async fn push_kernel(channel: tonic::transport::Channel, name: &str, bytes: Vec<u8>) {
    push_file(
        channel,
        name,
        fabric_proto::v1::ImageFileRole::Kernel,
        bytes,
    )
    .await
    .expect("push the kernel");
}

/// Host disk is reserved at placement: a VM counts its disks at their full size (a sparse
/// one too), its image disks as stored and 32 MiB of logs; a host offers its data
/// directory's filesystem less the agent's reserve. A VM that does not fit waits, saying
/// "insufficient disk", and is placed once space is freed; a disk image the store does not
/// have is refused at CreateVm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_disk_is_reserved_at_placement() {
    use fabric_proto::v1::{disk_spec, DeleteVmRequest, DiskSpec};
    use fabric_test_support::cluster::SimHostSpec;
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    // 4 GiB announced, 1 GiB kept back by the agent's default reserve: 3,072 MiB offered.
    let _h1 = SimHost::start_spec(
        &dir.path().join("h1"),
        &controller.address(),
        &SimHostSpec::new("h1", 0, 0).with_disk(4096),
    );
    let mut client = controller.compute().await;
    let hosts = ready_hosts(&client, 1, Duration::from_secs(30)).await;
    let host_id = hosts["h1"].clone();
    let with_disk = |name: &str, source: disk_spec::Source| VmSpec {
        disks: vec![DiskSpec {
            source: Some(source),
            read_only: false,
        }],
        ..spec(name, "")
    };

    let a = create_vm(&client, with_disk("a", disk_spec::Source::SizeMib(2000)))
        .await
        .expect("create a");
    let vm_a = client
        .get_vm(GetVmRequest { id: a.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm_a.disk_mib, 2000 + 32, "a sparse disk counts in full");
    eventually(Duration::from_secs(30), "a running", || {
        let ids = vec![a.clone()];
        let client = client.clone();
        async move { running_placement(&client, &ids).await }
    })
    .await;

    let b = create_vm(&client, with_disk("b", disk_spec::Source::SizeMib(1100)))
        .await
        .expect("create b");
    let reason = eventually(Duration::from_secs(30), "b waiting for disk", || {
        let (client, b) = (client.clone(), b.clone());
        async move {
            let status = vm_status(&client, &b).await?;
            (status.phase() == VmPhase::Pending && status.reason.contains("insufficient disk"))
                .then_some(status.reason)
        }
    })
    .await;
    assert!(reason.contains("1 insufficient disk"), "{reason}");
    let host = client
        .get_host(GetHostRequest {
            id: host_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(host.capacity.unwrap().disk_mib, 4096);
    assert_eq!(host.allocatable.unwrap().disk_mib, 4096 - 1024);
    assert_eq!(host.allocated.unwrap().disk_mib, 2032);

    // An image disk counts as stored; one the store does not have is refused.
    let missing = create_vm(
        &client,
        with_disk("c", disk_spec::Source::ImageSha256("ab".repeat(32))),
    )
    .await
    .expect_err("a disk image nobody pushed");
    assert_eq!(missing.code(), tonic::Code::InvalidArgument, "{missing:?}");
    assert!(
        missing
            .message()
            .contains("no such file in the image store"),
        "{missing:?}"
    );
    let bytes = vec![7u8; 3 << 20];
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let channel = fabric_test_support::cluster::unix_channel(&controller.socket).await;
    push_file(
        channel,
        "data",
        fabric_proto::v1::ImageFileRole::Disk,
        bytes,
    )
    .await
    .expect("push a disk image");
    let c = create_vm(
        &client,
        with_disk("c", disk_spec::Source::ImageSha256(digest)),
    )
    .await
    .expect("create c");
    let vm_c = client
        .get_vm(GetVmRequest { id: c.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm_c.disk_mib, 3 + 32);

    // Space freed: b is placed.
    client
        .delete_vm(DeleteVmRequest { id: a })
        .await
        .expect("delete a");
    eventually(Duration::from_secs(30), "b running once a is gone", || {
        let ids = vec![b.clone(), c.clone()];
        let client = client.clone();
        async move { running_placement(&client, &ids).await }
    })
    .await;
}
