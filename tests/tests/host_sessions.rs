//! One live agent session per host: two agents presenting the same `machine_id` (machines
//! cloned from one image) must never both run the host's VMs. Simulated hosts against a real
//! controller; each agent's own view (its Agent service, `ListLocalVms`) is sampled every
//! 50 ms.

use std::path::Path;
use std::time::{Duration, Instant};

use fabric_proto::v1::agent_client::AgentClient;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{
    BootImage, CreateVmRequest, GetVmRequest, ListLocalVmsRequest, MemorySpec, ObservedPhase,
    VmPhase, VmSpec,
};
use fabric_test_support::cluster::{
    eventually, ready_hosts, unix_channel, Controller, SimHost, SimHostSpec, Timing,
};
use tonic::transport::Channel;

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.to_string(),
        vcpus: 1,
        memory: Some(MemorySpec {
            startup_mib: 256,
            ..Default::default()
        }),
        image: Some(BootImage {
            kernel_sha256: "0".repeat(64),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether the agent listening on `socket` has `vm_id` live (a start under way, running, or
/// still stopping: a VMM may exist); None if the agent did not answer.
async fn runs(socket: &Path, vm_id: &str) -> Option<ObservedPhase> {
    let mut agent = AgentClient::new(unix_channel(socket).await);
    let vms = tokio::time::timeout(
        Duration::from_millis(500),
        agent.list_local_vms(ListLocalVmsRequest {}),
    )
    .await
    .ok()?
    .ok()?
    .into_inner()
    .vms;
    Some(
        vms.iter()
            .find(|v| v.vm_id == vm_id)
            .and_then(|v| v.observed.as_ref())
            .map(|o| o.phase())
            .unwrap_or(ObservedPhase::Unspecified),
    )
}

fn live(phase: Option<ObservedPhase>) -> bool {
    matches!(
        phase,
        Some(ObservedPhase::Starting | ObservedPhase::Running | ObservedPhase::Stopping)
    )
}

/// Samples both agents' views of `vm_id` every 50 ms for four fencing windows (lease TTL plus
/// margin): never both live; at the end exactly one runs it, steadily, and the other says in
/// its log why it stays out. The trace of samples.
async fn sample_until_settled(
    first: &SimHost,
    second: &SimHost,
    vm_id: &str,
    timing: Timing,
) -> String {
    let first_socket = first.dir.join("agent.sock");
    let second_socket = second.dir.join("agent.sock");
    let window = Duration::from_secs_f64(timing.lease_ttl + timing.fencing_margin);
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < window * 4 {
        let (a, b) = tokio::join!(runs(&first_socket, vm_id), runs(&second_socket, vm_id));
        let at = started.elapsed();
        samples.push(format!(
            "{:>6.2}s first={a:?} second={b:?}",
            at.as_secs_f64()
        ));
        assert!(
            !(live(a) && live(b)),
            "both agents run the VM at {at:?} after the clone started:\n{}",
            samples.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let trace = samples.join("\n");

    // Exactly one of them ends up running it, and stays so (no flapping).
    let (a, b) = tokio::join!(runs(&first_socket, vm_id), runs(&second_socket, vm_id));
    let running = |p: Option<ObservedPhase>| p == Some(ObservedPhase::Running);
    assert!(
        running(a) != running(b),
        "exactly one agent must run the VM at the end: first={a:?} second={b:?}\n{trace}"
    );
    let tail: Vec<&str> = trace.lines().rev().take(40).collect();
    assert!(
        tail.iter().all(|l| l.contains("Running")),
        "the VM did not settle on one agent:\n{trace}"
    );
    let idle = if running(a) { second } else { first };
    let idle_log = std::fs::read_to_string(&idle.process.log).unwrap_or_default();
    assert!(
        idle_log.contains("another agent holds this machine id"),
        "the idle agent does not say why in its log:\n{}",
        idle.process.log_tail(30)
    );
    trace
}

/// Creates one VM and waits until the controller reports it RUNNING; its id.
async fn running_vm(c: &mut ComputeClient<Channel>) -> String {
    let vm_id = c
        .create_vm(CreateVmRequest {
            spec: Some(spec("web")),
            desired_state: 0,
        })
        .await
        .expect("create")
        .into_inner()
        .id;
    eventually(Duration::from_secs(30), "the VM running", || {
        let mut c = c.clone();
        let id = vm_id.clone();
        async move {
            let vm = c.get_vm(GetVmRequest { id }).await.ok()?.into_inner();
            (vm.status?.phase() == VmPhase::Running).then_some(())
        }
    })
    .await;
    vm_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_with_one_machine_id_never_both_run_the_hosts_vms() {
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        lease_ttl: 2.0,
        heartbeat_interval: 0.5,
        fencing_margin: 1.5,
    };
    let controller = Controller::start(&dir.path().join("controller"), timing);
    let machine = SimHostSpec::new("h1", 0, 0).with_machine_id("machine-cloned");
    let first = SimHost::start_spec(&dir.path().join("first"), &controller.address(), &machine);
    let mut c = controller.compute().await;
    ready_hosts(&c, 1, Duration::from_secs(30)).await;
    let vm_id = running_vm(&mut c).await;
    let first_socket = first.dir.join("agent.sock");
    assert!(
        live(runs(&first_socket, &vm_id).await),
        "the first agent runs the VM"
    );

    // A second machine cloned from the first one's image: same machine id, same name, its
    // own (empty) data directory.
    let second = SimHost::start_spec(&dir.path().join("second"), &controller.address(), &machine);

    let trace = sample_until_settled(&first, &second, &vm_id, timing).await;
    let vm = c
        .get_vm(GetVmRequest { id: vm_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.status.unwrap().phase(), VmPhase::Running, "{trace}");
    println!("{trace}");
}

/// The controller restarts while the clone's session is held (the first agent may still run
/// the VM): the restarted controller, which does not know when the first agent last renewed
/// its lease, holds the clone's session again for a full TTL plus margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restart_during_the_hold_keeps_the_vm_on_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let timing = Timing {
        lease_ttl: 2.0,
        heartbeat_interval: 0.5,
        fencing_margin: 1.5,
    };
    let mut controller = Controller::start(&dir.path().join("controller"), timing);
    let machine = SimHostSpec::new("h1", 0, 0).with_machine_id("machine-cloned");
    let first = SimHost::start_spec(&dir.path().join("first"), &controller.address(), &machine);
    let mut c = controller.compute().await;
    ready_hosts(&c, 1, Duration::from_secs(30)).await;
    let vm_id = running_vm(&mut c).await;

    let second = SimHost::start_spec(&dir.path().join("second"), &controller.address(), &machine);
    eventually(Duration::from_secs(30), "the clone registered", || {
        let log = std::fs::read_to_string(&second.process.log).unwrap_or_default();
        async move { log.contains("registered with the controller").then_some(()) }
    })
    .await;
    controller.kill9_and_restart();
    let trace = sample_until_settled(&first, &second, &vm_id, timing).await;
    let mut c = controller.compute().await;
    let vm = c
        .get_vm(GetVmRequest { id: vm_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.status.unwrap().phase(), VmPhase::Running, "{trace}");
}
