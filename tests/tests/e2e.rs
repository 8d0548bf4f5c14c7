//! End to end with real guests: a controller and four hosts on one machine (each host a
//! network namespace with its own uplink, VM bridge, agent and fabric-vmm processes), the
//! default guest image pushed with fabricctl. One cluster runs the whole story, to keep the
//! number of (emulated, ~30 s) guest boots small:
//!
//! 1. an availability set of 3 VMs lands one per fault domain; each guest boots and answers
//!    ping on its host's network;
//! 2. the controller is SIGKILLed and restarted: every VM is still there, on the same host,
//!    with the same fabric-vmm process;
//! 3. host death (agent and VMMs killed): its VM runs and boots elsewhere;
//! 4. partition (uplink cut, the host keeps running): the host fences its VM before the
//!    controller starts it elsewhere — sampled every 10 ms, never two copies at once;
//! 5. drain: every VM leaves the drained host, none lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{DrainHostRequest, GetHostRequest, GetVmRequest, HostState, VmPhase};
use fabric_test_support::cluster::Timing;
use fabric_test_support::compute::{eventually, host_id, ready_hosts, wait_running};
use fabric_test_support::image::Image;
use fabric_test_support::netcluster::NetCluster;
use fabric_test_support::skip_without_kvm;
use tonic::transport::Channel;

const BOOT: Duration = Duration::from_secs(600);

async fn host_name(c: &mut ComputeClient<Channel>, id: &str) -> String {
    c.get_host(GetHostRequest { id: id.to_string() })
        .await
        .expect("GetHost")
        .into_inner()
        .name
}

/// Waits until VM `id` runs on a host other than `not_on`; returns the host id.
async fn running_on(
    c: &ComputeClient<Channel>,
    id: &str,
    not_on: &[String],
    timeout: Duration,
) -> String {
    let what = format!("VM {id} running (not on {not_on:?})");
    wait_running(c, id, timeout, &what, |host| {
        !not_on.iter().any(|h| h == host)
    })
    .await
}

fn wait_marker(cluster: &NetCluster, host: usize, vm: &str, marker: &str) {
    let start = Instant::now();
    while !cluster.hosts[host].console(vm).contains(marker) {
        assert!(
            start.elapsed() < BOOT,
            "VM {vm} on {} did not reach {marker:?}",
            cluster.hosts[host].name
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_places_heals_fences_and_drains_real_guests() {
    skip_without_kvm!("e2e");
    let image = Image::built();
    let mode = image.manifest.mode().clone();
    // The lease must outlast step 2's controller restart: from an agent's last good heartbeat
    // (up to an interval before the kill) through the new process starting, opening its store
    // and answering, with the agents' retry delay on top, on a loaded 2-core machine.
    let timing = Timing {
        lease_ttl: 5.0,
        heartbeat_interval: 1.0,
        fencing_margin: 2.0,
    };
    // Hosts 0..3 in fault domains 0..3, update domains 0,1,0,1.
    let mut cluster = NetCluster::start(4, 4, 2, timing);
    let mut c = cluster.compute().await;
    ready_hosts(&c, 4, Duration::from_secs(60)).await;
    cluster.push_guest_image(&image);

    // 1. An availability set of 3.
    let vms: Vec<String> = (0..3)
        .map(|i| {
            cluster.create_vm(
                &format!("web-{i}"),
                256,
                &mode.cmdline,
                &["--availability-set", "web"],
            )
        })
        .collect();
    let mut placement: HashMap<String, usize> = HashMap::new();
    for id in &vms {
        let host_id = running_on(&c, id, &[], BOOT).await;
        let name = host_name(&mut c, &host_id).await;
        placement.insert(
            id.clone(),
            cluster.host_by_name(&name).expect("a cluster host"),
        );
    }
    let fds: std::collections::HashSet<u32> = placement
        .values()
        .map(|h| cluster.hosts[*h].fault_domain)
        .collect();
    assert_eq!(
        fds.len(),
        3,
        "the availability set shares a fault domain: {placement:?}"
    );
    for id in &vms {
        let host = placement[id];
        wait_marker(&cluster, host, id, &mode.ready_marker);
        let ip = cluster.hosts[host].record(id, "ip").expect("VM address");
        let ip = ip.as_str().unwrap().to_string();
        let pinged = (0..20).any(|_| {
            let ok = cluster.hosts[host].ping(&ip);
            if !ok {
                std::thread::sleep(Duration::from_millis(500));
            }
            ok
        });
        assert!(
            pinged,
            "VM {id} at {ip} does not answer ping on {}",
            cluster.hosts[host].name
        );
    }
    println!("1. placed one per fault domain, booted and answering ping: {placement:?}");

    // 2. Controller SIGKILL and restart: nothing acknowledged changes, no guest restarts.
    let pids: HashMap<String, u64> = vms
        .iter()
        .map(|id| {
            (
                id.clone(),
                cluster.hosts[placement[id]]
                    .record(id, "pid")
                    .unwrap()
                    .as_u64()
                    .unwrap(),
            )
        })
        .collect();
    cluster.kill9_controller();
    cluster.start_controller();
    let mut c = cluster.compute().await;
    for id in &vms {
        let host_id = running_on(&c, id, &[], Duration::from_secs(60)).await;
        let name = host_name(&mut c, &host_id).await;
        assert_eq!(
            cluster.host_by_name(&name),
            Some(placement[id]),
            "VM {id} moved across a controller restart"
        );
        let pid = cluster.hosts[placement[id]]
            .record(id, "pid")
            .unwrap()
            .as_u64()
            .unwrap();
        assert_eq!(
            pid, pids[id],
            "VM {id} was restarted by a controller restart"
        );
    }
    println!("2. controller restarted: same VMs, same hosts, same fabric-vmm pids");

    // 3. Host death.
    let victim = vms[0].clone();
    let dead = placement[&victim];
    let dead_id = host_id(&c, &cluster.hosts[dead].name).await;
    let killed = Instant::now();
    cluster.hosts[dead].kill();
    let new_host_id = running_on(
        &c,
        &victim,
        std::slice::from_ref(&dead_id),
        Duration::from_secs(120),
    )
    .await;
    let running_after = killed.elapsed();
    let new_host = cluster
        .host_by_name(&host_name(&mut c, &new_host_id).await)
        .unwrap();
    wait_marker(&cluster, new_host, &victim, &mode.ready_marker);
    println!(
        "3. host {} died: VM running on {} after {:.1} s, booted after {:.1} s",
        cluster.hosts[dead].name,
        cluster.hosts[new_host].name,
        running_after.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    placement.insert(victim.clone(), new_host);
    // The dead host comes back (empty) to give the next steps room.
    cluster.start_agent(dead);

    // 4. Partition: fence before failover, never two copies.
    let moved = vms[1].clone();
    let cut = placement[&moved];
    let cut_id = host_id(&c, &cluster.hosts[cut].name).await;
    let old_pid = cluster.hosts[cut]
        .record(&moved, "pid")
        .unwrap()
        .as_u64()
        .unwrap() as u32;
    cluster.hosts[cut].partition();
    let cut_at = Instant::now();
    let mut old_gone_at = None;
    let mut new_seen_at = None;
    let mut overlap = 0;
    while new_seen_at.is_none() && cut_at.elapsed() < Duration::from_secs(120) {
        let old_alive = cluster.hosts[cut]
            .vmms()
            .iter()
            .any(|(pid, vm)| *pid == old_pid && *vm == moved);
        let new_alive = cluster
            .hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != cut)
            .any(|(_, h)| h.vmms().iter().any(|(_, vm)| *vm == moved));
        if old_alive && new_alive {
            overlap += 1;
        }
        if !old_alive && old_gone_at.is_none() {
            old_gone_at = Some(cut_at.elapsed());
        }
        if new_alive {
            new_seen_at = Some(cut_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let old_gone_at = old_gone_at.expect("the partitioned host never stopped its VM");
    let new_seen_at = new_seen_at.expect("the VM was never started elsewhere");
    assert_eq!(overlap, 0, "two copies of VM {moved} ran at once");
    assert!(old_gone_at < new_seen_at);
    println!(
        "4. partition: old copy stopped {:.2} s after the cut, new copy started {:.2} s after (gap {:.2} s, sampled every 10 ms)",
        old_gone_at.as_secs_f64(),
        new_seen_at.as_secs_f64(),
        (new_seen_at - old_gone_at).as_secs_f64()
    );
    let new_host_id = running_on(
        &c,
        &moved,
        std::slice::from_ref(&cut_id),
        Duration::from_secs(60),
    )
    .await;
    placement.insert(
        moved.clone(),
        cluster
            .host_by_name(&host_name(&mut c, &new_host_id).await)
            .unwrap(),
    );
    cluster.hosts[cut].heal();
    // Back on the network, the host re-registers and reports nothing of the moved VM.
    eventually(
        Duration::from_secs(60),
        "the partitioned host ready again",
        || {
            let mut c = c.clone();
            let cut_id = cut_id.clone();
            async move {
                let h = c
                    .get_host(GetHostRequest { id: cut_id })
                    .await
                    .ok()?
                    .into_inner();
                (h.state() == HostState::Ready).then_some(())
            }
        },
    )
    .await;
    assert!(cluster.hosts[cut].vmms().iter().all(|(_, vm)| *vm != moved));

    // 5. Drain the host of the third VM.
    let third = vms[2].clone();
    let drained = placement[&third];
    let drained_id = host_id(&c, &cluster.hosts[drained].name).await;
    let on_drained: Vec<String> = placement
        .iter()
        .filter(|(_, h)| **h == drained)
        .map(|(v, _)| v.clone())
        .collect();
    c.drain_host(DrainHostRequest {
        id: drained_id.clone(),
        reason: "e2e".into(),
    })
    .await
    .unwrap();
    for id in &on_drained {
        let host_id = running_on(&c, id, std::slice::from_ref(&drained_id), BOOT).await;
        placement.insert(
            id.clone(),
            cluster
                .host_by_name(&host_name(&mut c, &host_id).await)
                .unwrap(),
        );
    }
    eventually(
        Duration::from_secs(60),
        "the drained host cordoned and empty",
        || {
            let mut c = c.clone();
            let id = drained_id.clone();
            async move {
                let h = c.get_host(GetHostRequest { id }).await.ok()?.into_inner();
                (h.state() == HostState::Cordoned && h.allocated.unwrap_or_default().cpus == 0)
                    .then_some(())
            }
        },
    )
    .await;
    assert!(
        cluster.hosts[drained].vmms().is_empty(),
        "a VMM still runs on the drained host"
    );
    for id in &vms {
        let vm = c
            .get_vm(GetVmRequest { id: id.clone() })
            .await
            .expect("no VM lost")
            .into_inner();
        assert_eq!(vm.status.unwrap().phase(), VmPhase::Running, "VM {id}");
    }
    println!(
        "5. drained {}: {} VM(s) moved, all 3 VMs running",
        cluster.hosts[drained].name,
        on_drained.len()
    );
}
