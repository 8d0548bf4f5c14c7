//! Host certificates of a few seconds renew while a real guest keeps running (issue 16): one
//! real-KVM host in its own network namespace joins the controller with a token (its tls_dir
//! starts with only ca.pem), runs a guest, and renews its certificate again and again over
//! mutual TLS. Its host.pem changes at least twice, the host stays Ready (heartbeats flow
//! over the channel rebuilt from the new files), and the guest's fabric-vmm is the same
//! process, RUNNING, throughout.

use std::time::{Duration, Instant};

use fabric_proto::tls::{Identity, TlsFiles};
use fabric_proto::v1::{GetHostRequest, GetVmRequest, HostState, VmPhase};
use fabric_test_support::cluster::Timing;
use fabric_test_support::compute::{ready_hosts, wait_running};
use fabric_test_support::image::Image;
use fabric_test_support::netcluster::NetCluster;
use fabric_test_support::skip_without_kvm;

const BOOT: Duration = Duration::from_secs(600);
/// The controller's `--host-cert-ttl`: renewed every ~5 s.
const CERT_TTL: &str = "8s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_seconds_renew_while_a_real_guest_keeps_running() {
    skip_without_kvm!("renewal");
    let image = Image::built();
    let mode = image.manifest.mode().clone();
    let timing = Timing {
        lease_ttl: 5.0,
        heartbeat_interval: 1.0,
        fencing_margin: 2.0,
    };
    let cluster = NetCluster::start_with(1, 1, 1, timing, &["--host-cert-ttl", CERT_TTL], true);
    let mut c = cluster.compute().await;
    let hosts = ready_hosts(&c, 1, Duration::from_secs(60)).await;
    let host_id = hosts.values().next().unwrap().clone();
    let host = &cluster.hosts[0];
    let files = TlsFiles::in_dir(&host.dir.join("tls"), "host");
    assert_eq!(
        files.identity(),
        Ok(Identity::Host(host.name.clone())),
        "the agent joined with its token"
    );
    cluster.push_guest_image(&image);
    let vm = cluster.create_vm("renew-web", 256, &mode.cmdline, &[]);
    wait_running(&c, &vm, BOOT, "the guest running", |_| true).await;
    let start = Instant::now();
    while !host.console(&vm).contains(&mode.ready_marker) {
        assert!(start.elapsed() < BOOT, "the guest did not boot");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pid = host.record(&vm, "pid").and_then(|p| p.as_u64()).unwrap() as u32;
    assert!(host.vmms().iter().any(|(p, _)| *p == pid));

    let mut seen = vec![std::fs::read_to_string(&files.cert).unwrap()];
    let watching = Instant::now();
    let deadline = watching + Duration::from_secs(120);
    let mut checks = 0u32;
    while seen.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "host.pem renewed {} times in 120 s",
            seen.len() - 1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let state = c
            .get_host(GetHostRequest {
                id: host_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .state();
        assert_eq!(
            state,
            HostState::Ready,
            "the host left Ready while renewing"
        );
        let phase = c
            .get_vm(GetVmRequest { id: vm.clone() })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap_or_default()
            .phase();
        assert_eq!(
            phase,
            VmPhase::Running,
            "the VM left RUNNING while renewing"
        );
        checks += 1;
        if let Ok(now) = std::fs::read_to_string(&files.cert) {
            if seen.last() != Some(&now) && now.contains("END CERTIFICATE") {
                seen.push(now);
            }
        }
    }
    // Past the lifetime of the certificate the guest started under, all is as it was.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = c
        .get_host(GetHostRequest { id: host_id })
        .await
        .unwrap()
        .into_inner()
        .state();
    assert_eq!(state, HostState::Ready);
    let vm_now = c
        .get_vm(GetVmRequest { id: vm.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm_now.status.unwrap_or_default().phase(), VmPhase::Running);
    assert_eq!(
        host.record(&vm, "pid").and_then(|p| p.as_u64()),
        Some(pid as u64),
        "the guest's fabric-vmm changed"
    );
    assert!(
        host.vmms().iter().any(|(p, _)| *p == pid),
        "fabric-vmm {pid} is gone"
    );
    let log = host
        .agent
        .as_ref()
        .map(|a| a.log_tail(400))
        .unwrap_or_default();
    assert!(log.contains("host certificate renewed"), "{log}");
    println!(
        "host.pem renewed {} times in {:.1} s ({checks} checks: host Ready, VM RUNNING); fabric-vmm pid {pid} unchanged",
        seen.len() - 1,
        watching.elapsed().as_secs_f64()
    );
}
