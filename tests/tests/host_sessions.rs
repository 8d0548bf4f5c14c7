//! One live agent session per host: two agents presenting the same `machine_id` (machines
//! cloned from one image) must never both run the host's VMs. Simulated hosts against a real
//! controller; each agent's own view (its Agent service, `ListLocalVms`) is sampled every
//! 50 ms.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_proto::v1::agent_client::AgentClient;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{
    CreateVmRequest, GetVmRequest, ListLocalVmsRequest, ObservedPhase, VmPhase,
};
use fabric_test_support::cluster::{unix_channel, Controller, SimHost, SimHostSpec, Timing};
use fabric_test_support::compute::{eventually, ready_hosts};
use tonic::transport::Channel;

/// The phase of `vm_id` as the agent listening on `socket` sees it (UNSPECIFIED: it does not
/// know the VM); None if the agent did not answer within 500 ms.
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

/// The lease TTL plus the fencing margin.
fn window(timing: Timing) -> Duration {
    Duration::from_secs_f64(timing.lease_ttl + timing.fencing_margin)
}

/// A start under way, running, or still stopping: a VMM may exist.
fn live(phase: Option<ObservedPhase>) -> bool {
    matches!(
        phase,
        Some(ObservedPhase::Starting | ObservedPhase::Running | ObservedPhase::Stopping)
    )
}

/// One sample: what each agent reported, and whether it answered.
struct Sample {
    at: Duration,
    phases: [Option<ObservedPhase>; 2],
    answered: [bool; 2],
}

/// Samples both agents' views of `vm_id` every 50 ms until `stop` is set. An agent that does
/// not answer (paused) counts as it was last seen: its VMs run on without it.
fn spawn_sampler(
    sockets: [PathBuf; 2],
    vm_id: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last: [Option<ObservedPhase>; 2] = [None, None];
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let (a, b) = tokio::join!(runs(&sockets[0], &vm_id), runs(&sockets[1], &vm_id));
            let answered = [a.is_some(), b.is_some()];
            for (slot, seen) in last.iter_mut().zip([a, b]) {
                if seen.is_some() {
                    *slot = seen;
                }
            }
            samples.push(Sample {
                at: started.elapsed(),
                phases: last,
                answered,
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        samples
    })
}

/// Checks the samples: never both agents live at once; at the end exactly one runs the VM,
/// steadily (the last 2 s), and the other says in its log why it stays out. The trace.
async fn check_one_runner(
    samples: &[Sample],
    first: &SimHost,
    second: &SimHost,
    vm_id: &str,
) -> String {
    let line = |s: &Sample| {
        let show = |i: usize| {
            format!(
                "{:?}{}",
                s.phases[i],
                if s.answered[i] { "" } else { " (silent)" }
            )
        };
        format!(
            "{:>6.2}s first={} second={}",
            s.at.as_secs_f64(),
            show(0),
            show(1)
        )
    };
    let trace: Vec<String> = samples.iter().map(line).collect();
    let trace = trace.join("\n");
    if let Some(both) = samples
        .iter()
        .find(|s| live(s.phases[0]) && live(s.phases[1]))
    {
        panic!(
            "both agents run the VM at {:?} after the sampling started:\n{trace}",
            both.at
        );
    }
    let running = |p: Option<ObservedPhase>| p == Some(ObservedPhase::Running);
    let (first_socket, second_socket) =
        (first.dir.join("agent.sock"), second.dir.join("agent.sock"));
    let (a, b) = tokio::join!(runs(&first_socket, vm_id), runs(&second_socket, vm_id));
    assert!(
        running(a) != running(b),
        "exactly one agent must run the VM at the end: first={a:?} second={b:?}\n{trace}"
    );
    let winner = if running(a) { 0 } else { 1 };
    assert!(
        samples
            .iter()
            .rev()
            .take(40)
            .all(|s| running(s.phases[winner]) && !live(s.phases[1 - winner])),
        "the VM did not settle on one agent:\n{trace}"
    );
    let idle = if winner == 0 { second } else { first };
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
            spec: Some(fabric_test_support::vmspec::simulated_vm("web")),
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
    // The support's default: a 2 s lease, 0.5 s heartbeats, a 1.5 s fencing margin.
    let timing = Timing::default();
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
    // own (empty) data directory. Sampled for four fencing windows (lease TTL plus margin).
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(
        [first_socket, dir.path().join("second/agent.sock")],
        vm_id.clone(),
        stop.clone(),
    );
    let second = SimHost::start_spec(&dir.path().join("second"), &controller.address(), &machine);
    tokio::time::sleep(window(timing) * 4).await;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.expect("the sampler");
    let trace = check_one_runner(&samples, &first, &second, &vm_id).await;
    let vm = c
        .get_vm(GetVmRequest { id: vm_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.status.unwrap().phase(), VmPhase::Running, "{trace}");
    println!("{trace}");
}

/// The first agent is paused (SIGSTOP) while the clone registers, and the controller is
/// killed and restarted during the clone's hold: the restarted controller does not know when
/// the first agent last renewed its lease, so it holds the clone again for a full TTL plus
/// margin (the hold is stored with the host). The paused agent is resumed after a TTL and a
/// half, by when its lease has run out and it fences; until then it counts as still running
/// the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restart_during_the_hold_keeps_the_vm_on_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    // The support's default: a 2 s lease, 0.5 s heartbeats, a 1.5 s fencing margin.
    let timing = Timing::default();
    let mut controller = Controller::start(&dir.path().join("controller"), timing);
    let machine = SimHostSpec::new("h1", 0, 0).with_machine_id("machine-cloned");
    let first = SimHost::start_spec(&dir.path().join("first"), &controller.address(), &machine);
    let mut c = controller.compute().await;
    ready_hosts(&c, 1, Duration::from_secs(30)).await;
    let vm_id = running_vm(&mut c).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(
        [
            first.dir.join("agent.sock"),
            dir.path().join("second/agent.sock"),
        ],
        vm_id.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first_pid = first.process.pid() as libc::pid_t;
    // SAFETY: signals a child process this test started and still owns.
    assert_eq!(unsafe { libc::kill(first_pid, libc::SIGSTOP) }, 0);
    let paused = Instant::now();
    let second = SimHost::start_spec(&dir.path().join("second"), &controller.address(), &machine);
    eventually(Duration::from_secs(30), "the clone registered", || {
        let log = std::fs::read_to_string(&second.process.log).unwrap_or_default();
        async move { log.contains("registered with the controller").then_some(()) }
    })
    .await;
    tokio::task::block_in_place(|| controller.kill9_and_restart());
    let resume_at = paused + Duration::from_secs_f64(timing.lease_ttl * 1.5);
    tokio::time::sleep_until(resume_at.into()).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(first_pid, libc::SIGCONT) }, 0);
    tokio::time::sleep(window(timing) * 4).await;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.expect("the sampler");
    let trace = check_one_runner(&samples, &first, &second, &vm_id).await;
    let mut c = controller.compute().await;
    let vm = c
        .get_vm(GetVmRequest { id: vm_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.status.unwrap().phase(), VmPhase::Running, "{trace}");
    println!("{trace}");
}
