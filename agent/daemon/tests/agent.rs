//! fabric-agent end to end: each test runs the agent binary as a test host inside a network
//! namespace it made (`tests/support/src/host.rs`), against a small in-test controller that
//! serves HostLink and Images on a Unix socket (`tests/support/src/hostlink.rs`), and checks
//! what the agent really did on the host: fabric-vmm processes, taps on the bridge, cgroups,
//! files, what it reports in heartbeats and on its local Agent API, and what the guest printed.
//!
//! - an assignment becomes a guest that reaches the image's ready marker; `kill -9` and
//!   SIGTERM of the agent leave it running and the restarted agent adopts it; removing the
//!   assignment leaves no process, tap, cgroup, socket or directory;
//! - a killed fabric-vmm is restarted under `always`, not under `never`;
//! - fencing: a controller outage shorter than the lease keeps VMs running, a longer one stops
//!   them and the agent says so when it reconnects;
//! - bad inputs (no controller yet, digest mismatch, missing image, tap name taken) each show
//!   a clear error and the agent keeps serving;
//! - the simulated backend runs 200 hollow VMs without processes;
//! - a VM whose start fails is reported STARTING (with the error and when the next start is
//!   due) while the agent retries, never FAILED;
//! - the memory balancer over simulated guests: a host whose budget is below what its VMs
//!   want reports itself short and shares by weight, a VM that wants more than its share shows
//!   pressure; with room, idle VMs shrink to demand plus buffer and a hungry one grows; with
//!   the balancer off, heartbeats carry no balancer figures;
//! - a controller that forgot the host (NOT_FOUND) makes the agent stop its VMs and register
//!   again.

use fabric_test_support::guest::{tail, Image, BOOT_TIMEOUT};
use fabric_test_support::host::{self, HostOptions, Proc, TestHost, AGENT_TIMEOUT};
use fabric_test_support::host::{BRIDGE, GATEWAY, NETWORK};
use fabric_test_support::hostlink::{registered_host, sha256_hex, FakeController, LEASE_TTL};
use fabric_test_support::skip_without_kvm;
use fabric_test_support::vmspec::{assignment, memory, vm_spec};

use std::sync::Mutex;
use std::time::{Duration, Instant};

use fabric_agent::sim::MEMORY_DEMAND_LABEL;
use fabric_proto::v1::agent_client::AgentClient;
use fabric_proto::v1::{
    Assignment, ConsoleChunk, GetLocalVmRequest, GetStateRequest, HeartbeatRequest,
    HostMemoryBalance, ListLocalVmsRequest, LocalVm, NicSpec, ObservedPhase, ObservedVm, Placement,
    RestartPolicy, StreamConsoleRequest, VmMemoryBalance, VmSpec,
};
use tonic::transport::Channel;
use tonic::Streaming;

/// From an assignment to a VMM process whose vCPUs run (image pull, tap, cgroup, spawn).
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// From a removal to everything gone (graceful stop, then forced, then cleanup).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(90);

/// Tests that boot real guests take turns: two cores, guest kernels under emulation.
static KVM_SLOT: Mutex<()> = Mutex::new(());

fn kvm_slot() -> std::sync::MutexGuard<'static, ()> {
    KVM_SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent's tap name for NIC `nic` of `vm_id`.
fn tap_name(vm_id: &str, nic: usize) -> String {
    fabric_agent::network::tap_name(vm_id, nic)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `check` (Ok: done, Err: what is still wrong) until it passes or `timeout` ends.
fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) -> Duration {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return start.elapsed(),
            Err(why) => assert!(
                start.elapsed() < timeout,
                "{what}: still not true after {timeout:?}: {why}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn phase(vm: &ObservedVm) -> ObservedPhase {
    ObservedPhase::try_from(vm.phase).unwrap_or(ObservedPhase::Unspecified)
}

fn running(vm: &ObservedVm) -> bool {
    phase(vm) == ObservedPhase::Running && vm.pid != 0
}

/// A locally administered MAC for the `index`-th test VM.
fn mac(index: u8) -> String {
    format!("52:54:00:fb:00:{index:02x}")
}

/// What the tests put in the controller for the default guest image.
struct GuestImage {
    image: Image,
    kernel_sha256: String,
    initramfs_sha256: String,
}

impl GuestImage {
    fn serve(controller: &FakeController) -> GuestImage {
        let image = Image::built();
        let kernel_sha256 = controller.add_image_file(&image.kernel());
        let initramfs_sha256 = if image.use_initramfs() {
            controller.add_image_file(&image.initramfs())
        } else {
            String::new()
        };
        GuestImage {
            image,
            kernel_sha256,
            initramfs_sha256,
        }
    }

    /// A 1-vCPU, 256 MiB VM of the default guest with one NIC on the default network.
    fn assignment(&self, vm_id: &str, policy: RestartPolicy, mac_index: u8) -> Assignment {
        let mut spec = default_vm(vm_id, &self.kernel_sha256, policy);
        spec.image.as_mut().expect("image").initramfs_sha256 = self.initramfs_sha256.clone();
        spec.kernel_cmdline = self.image.cmdline();
        spec.nics = vec![NicSpec {
            network: NETWORK.into(),
            mac: mac(mac_index),
        }];
        assignment(vm_id, spec)
    }
}

/// `assignment` with its kernel digest replaced by `kernel_sha256`.
fn with_kernel(mut assignment: Assignment, kernel_sha256: &str) -> Assignment {
    assignment
        .spec
        .as_mut()
        .and_then(|s| s.image.as_mut())
        .expect("image")
        .kernel_sha256 = kernel_sha256.to_string();
    assignment
}

/// A 1-vCPU, 256 MiB VM of image "default" booting `kernel_sha256`.
fn default_vm(vm_id: &str, kernel_sha256: &str, policy: RestartPolicy) -> VmSpec {
    vm_spec(vm_id, memory(256, 0, 0), "default", kernel_sha256, policy)
}

async fn get_local_vm(client: &mut AgentClient<Channel>, vm_id: &str) -> LocalVm {
    client
        .get_local_vm(GetLocalVmRequest {
            vm_id: vm_id.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("GetLocalVm {vm_id}: {e}"))
        .into_inner()
}

async fn list_local_vms(client: &mut AgentClient<Channel>) -> Vec<LocalVm> {
    client
        .list_local_vms(ListLocalVmsRequest {})
        .await
        .unwrap_or_else(|e| panic!("ListLocalVms: {e}"))
        .into_inner()
        .vms
}

/// A VM's console through the agent, from its start; with `follow`, what it prints next too.
async fn stream_console(
    client: &mut AgentClient<Channel>,
    vm_id: &str,
    follow: bool,
) -> Streaming<ConsoleChunk> {
    client
        .stream_console(StreamConsoleRequest {
            vm_id: vm_id.to_string(),
            start: None,
            follow,
        })
        .await
        .unwrap_or_else(|e| panic!("StreamConsole {vm_id}: {e}"))
        .into_inner()
}

/// Follows a VM's console through the agent until `needle` shows; checks that the chunks'
/// offsets are contiguous from 0. Returns the console text.
async fn console_until(
    client: &mut AgentClient<Channel>,
    vm_id: &str,
    needle: &str,
    timeout: Duration,
) -> String {
    let mut stream = stream_console(client, vm_id, true).await;
    let mut text = Vec::new();
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    assert_eq!(
                        chunk.offset,
                        text.len() as u64,
                        "{vm_id}: console chunk offset after {} bytes",
                        text.len()
                    );
                    text.extend_from_slice(&chunk.data);
                    if String::from_utf8_lossy(&text).contains(needle) {
                        return Ok(());
                    }
                }
                Ok(None) => return Err("the follow stream ended".to_string()),
                Err(status) => return Err(format!("the stream failed: {status}")),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&text).into_owned();
    match outcome {
        Ok(Ok(())) => text,
        Ok(Err(why)) => panic!(
            "{vm_id}: no {needle:?} on the console: {why}\n--- console ---\n{}",
            tail(&text)
        ),
        Err(_) => panic!(
            "{vm_id}: no {needle:?} on the console after {timeout:?}\n--- console ---\n{}",
            tail(&text)
        ),
    }
}

/// The retained console of a VM (no follow).
async fn console_snapshot(client: &mut AgentClient<Channel>, vm_id: &str) -> String {
    let mut stream = stream_console(client, vm_id, false).await;
    let mut text = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = stream.message().await.expect("console chunk") {
            text.extend_from_slice(&chunk.data);
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "{vm_id}: a non-follow console stream did not end"
    );
    String::from_utf8_lossy(&text).into_owned()
}

/// `key=value` from the kernel's IP-Config report on the console.
fn ip_config_field(console: &str, key: &str) -> Option<String> {
    let start = console.find(&format!("{key}="))? + key.len() + 1;
    let value: String = console[start..]
        .chars()
        .take_while(|c| !matches!(c, ',' | ' ' | '\r' | '\n'))
        .collect();
    Some(value)
}

/// Whatever of a removed VM is still on the host, empty when nothing is.
fn leftovers(host: &TestHost, vm_id: &str, vmm: Option<Proc>, socket: &str) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(vmm) = vmm.filter(Proc::alive) {
        left.push(format!("fabric-vmm pid {} runs", vmm.pid));
    }
    for proc in host.vmm_processes_of(vm_id) {
        left.push(format!("a fabric-vmm of {vm_id} runs (pid {})", proc.pid));
    }
    let tap = tap_name(vm_id, 0);
    if host.link(&tap).is_some() {
        left.push(format!("tap {tap}"));
    }
    for controller in host::CGROUP_CONTROLLERS {
        let dir = host.cgroup_dir(controller, vm_id);
        if dir.exists() {
            left.push(format!("cgroup {}", dir.display()));
        }
    }
    if !socket.is_empty() && std::path::Path::new(socket).exists() {
        left.push(format!("socket {socket}"));
    }
    let dir = host.vm_dir(vm_id);
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    left
}

/// A running VM's host resources: tap on the bridge, cgroups holding the VMM, files.
fn assert_vm_resources(host: &TestHost, vm_id: &str, pid: u32, socket: &str) {
    let tap = tap_name(vm_id, 0);
    let link = host
        .link(&tap)
        .unwrap_or_else(|| panic!("{vm_id}: no tap {tap} in {}", host.netns));
    assert!(
        link.contains(&format!("master {BRIDGE}")),
        "{vm_id}: tap {tap} is not on the bridge {BRIDGE}: {link}"
    );
    for controller in host::CGROUP_CONTROLLERS {
        let dir = host.cgroup_dir(controller, vm_id);
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("{vm_id}: {}: {e}", dir.display()));
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "{vm_id}: fabric-vmm {pid} is not in {} (procs: {procs:?})",
            dir.display()
        );
    }
    let limit: u64 = std::fs::read_to_string(
        host.cgroup_dir("memory", vm_id)
            .join("memory.limit_in_bytes"),
    )
    .expect("memory.limit_in_bytes")
    .trim()
    .parse()
    .expect("a number");
    assert!(
        (256 << 20..1 << 50).contains(&limit),
        "{vm_id}: memory.limit_in_bytes {limit} is no limit for a 256 MiB guest"
    );
    assert!(
        TestHost::is_socket(std::path::Path::new(socket)),
        "{vm_id}: the control socket {socket} is not a socket"
    );
    let dir = host.vm_dir(vm_id);
    for file in ["vm.json", "console.log"] {
        assert!(
            dir.join(file).is_file(),
            "{vm_id}: no {}",
            dir.join(file).display()
        );
    }
}

/// GetState of a VM's fabric-vmm: (pid, started_at, uptime).
async fn vmm_state(socket: &str) -> (u32, Option<prost_types::Timestamp>, Duration) {
    let mut vmm = fabric_vmm_api::client::connect(std::path::Path::new(socket))
        .await
        .unwrap_or_else(|e| panic!("connect {socket}: {e}"));
    let state = vmm
        .get_state(GetStateRequest {})
        .await
        .unwrap_or_else(|e| panic!("GetState on {socket}: {e}"))
        .into_inner();
    let uptime = state
        .uptime
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        .unwrap_or_default();
    (state.pid, state.started_at, uptime)
}

#[test]
fn an_assignment_boots_survives_agent_restarts_and_leaves_nothing_when_removed() {
    skip_without_kvm!("agent: assignment lifecycle");
    let _slot = kvm_slot();
    let rt = runtime();
    // A lease long enough that the agent's restarts below stay well within it even on a busy
    // machine (a restart after the lease ran out would rightly fence the VM).
    let (mut host, controller) = registered_host(HostOptions::kvm(), Duration::from_secs(15));

    // Registration: who the host is, and its memory less the reserve.
    let registration = controller.registrations()[0].clone();
    assert_eq!(registration.name, host.name);
    assert_eq!(registration.zone, "z1");
    assert_eq!(
        registration.labels.get("rack").map(String::as_str),
        Some("r1")
    );
    let capacity = registration.capacity.expect("capacity");
    let allocatable = registration.allocatable.expect("allocatable");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    assert_eq!(capacity.cpus, cpus, "capacity cpus");
    assert_eq!(
        allocatable.memory_mib,
        capacity.memory_mib - host::RESERVE_MEMORY_MIB,
        "allocatable memory is capacity less the reserve"
    );

    let guest = GuestImage::serve(&controller);
    let vm_id = "vm-life";
    let generation =
        controller.set_assignments(vec![guest.assignment(vm_id, RestartPolicy::Always, 1)]);
    let observed = controller.wait_observed(vm_id, START_TIMEOUT, running);
    let pid = observed.pid;
    assert_eq!(observed.generation, 1, "observed generation");
    assert!(observed.started_at.is_some(), "started_at of a running VM");
    let vmm = Proc::fabric_vmm(pid)
        .unwrap_or_else(|| panic!("reported pid {pid} is no fabric-vmm\n{}", host.report()));
    controller.wait_heartbeat(
        0,
        Duration::from_secs(30),
        "the assignments generation applied",
        |hb| hb.assignments_generation == generation,
    );

    // The guest boots to the image's ready marker, followed through the agent's console.
    let mut client = rt.block_on(host.agent_client());
    let console = rt.block_on(console_until(
        &mut client,
        vm_id,
        &guest.image.ready_marker(),
        BOOT_TIMEOUT,
    ));
    let local = rt.block_on(get_local_vm(&mut client, vm_id));
    let socket = local.vmm_socket_path.clone();
    assert_eq!(local.observed.as_ref().map(|o| o.pid), Some(pid));
    assert_vm_resources(&host, vm_id, pid, &socket);

    // Its network: the first NIC got the MAC, an address in the subnet and the bridge's
    // gateway, and the guest kernel answers ping from the namespace.
    assert_eq!(
        ip_config_field(&console, "hwaddr"),
        Some(mac(1)),
        "{console}"
    );
    let address = ip_config_field(&console, "ipaddr")
        .unwrap_or_else(|| panic!("no IP-Config on the console:\n{console}"));
    assert!(address.starts_with("10.200.0."), "guest address {address}");
    assert_ne!(address, GATEWAY);
    assert_eq!(
        ip_config_field(&console, "gw").as_deref(),
        Some(GATEWAY),
        "gateway"
    );
    let bridge = host.addresses(BRIDGE);
    assert!(
        bridge.contains(&format!("{GATEWAY}/24")),
        "bridge {BRIDGE}: {bridge}"
    );
    let ping = host
        .ns_command("ping")
        .args(["-c", "3", "-W", "3", &address])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "ping {address} in {}: {}",
        host.netns,
        String::from_utf8_lossy(&ping.stdout)
    );

    // kill -9 of the agent: the VM keeps running; the restarted agent adopts it.
    let (state_pid, started_at, uptime_before) = rt.block_on(vmm_state(&socket));
    assert_eq!(state_pid, pid, "GetState pid");
    let measured = Instant::now();
    host.kill9();
    std::thread::sleep(Duration::from_secs(2));
    assert!(vmm.alive(), "fabric-vmm {pid} died with the agent");
    let mark = controller.mark();
    host.restart();
    controller.wait_registrations(&host.machine_id, 2, AGENT_TIMEOUT);
    let adopted =
        controller.wait_observed_after(mark, vm_id, START_TIMEOUT, |o| running(o) && o.pid == pid);
    assert_eq!(adopted.restart_count, 0, "adoption is not a restart");
    for (seq, report) in controller.observed_history(vm_id, mark) {
        assert!(
            report.pid == 0 || report.pid == pid,
            "heartbeat #{seq} after the agent restart reports another pid: {report:?}"
        );
    }
    let mut client = rt.block_on(host.agent_client());
    let local = rt.block_on(get_local_vm(&mut client, vm_id));
    assert_eq!(local.vmm_socket_path, socket);
    let (state_pid, started_at_after, uptime_after) = rt.block_on(vmm_state(&socket));
    let elapsed = measured.elapsed();
    assert_eq!(state_pid, pid);
    assert_eq!(started_at_after, started_at, "the VMM did not start again");
    assert!(
        uptime_after + Duration::from_secs(2) >= uptime_before + elapsed,
        "uptime {uptime_after:?} did not continue from {uptime_before:?} (+{elapsed:?})"
    );
    let console = rt.block_on(console_snapshot(&mut client, vm_id));
    assert!(
        console.contains(&guest.image.ready_marker()),
        "the adopted VM's console lost its output:\n{}",
        tail(&console)
    );
    assert_eq!(
        console.matches("Linux version").count(),
        1,
        "the guest booted more than once:\n{}",
        tail(&console)
    );
    eprintln!("agent: kill -9 and restart: fabric-vmm {pid} adopted, uptime {uptime_before:?} -> {uptime_after:?}");

    // SIGTERM: the agent exits, the VM stays.
    let status = host.sigterm(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "the agent's exit on SIGTERM: {status}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        vmm.alive(),
        "fabric-vmm {pid} died with a SIGTERM of the agent"
    );
    let mark = controller.mark();
    host.restart();
    controller.wait_observed_after(mark, vm_id, START_TIMEOUT, |o| running(o) && o.pid == pid);

    // Removal: graceful stop, then nothing left.
    let mark = controller.mark();
    controller.set_assignments(Vec::new());
    let took = wait_until(REMOVE_TIMEOUT, "removed VM cleaned up", || {
        let mut left = leftovers(&host, vm_id, Some(vmm), &socket);
        match controller.latest_heartbeat() {
            Some(hb) if hb.seq > mark && hb.request.vms.iter().all(|v| v.vm_id != vm_id) => {}
            _ => left.push("heartbeats still report it".into()),
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join(", "))
        }
    });
    let mut client = rt.block_on(host.agent_client());
    let listed = rt.block_on(list_local_vms(&mut client));
    assert!(listed.is_empty(), "ListLocalVms after removal: {listed:?}");
    host.assert_agent_running();
    eprintln!("agent: removal cleaned up in {took:?}");
}

#[test]
fn a_killed_vmm_is_restarted_under_always_and_not_under_never() {
    skip_without_kvm!("agent: restart policies");
    let _slot = kvm_slot();
    let (mut host, controller) = registered_host(HostOptions::kvm(), LEASE_TTL);
    let guest = GuestImage::serve(&controller);
    let (always, never) = ("vm-always", "vm-never");
    controller.set_assignments(vec![
        guest.assignment(always, RestartPolicy::Always, 1),
        guest.assignment(never, RestartPolicy::Never, 2),
    ]);
    let first_always = controller.wait_observed(always, START_TIMEOUT, running);
    let first_never = controller.wait_observed(never, START_TIMEOUT, running);
    let vmm_always = Proc::fabric_vmm(first_always.pid).expect("the always VM's fabric-vmm");
    let vmm_never = Proc::fabric_vmm(first_never.pid).expect("the never VM's fabric-vmm");
    vmm_always.kill9();
    vmm_never.kill9();
    assert!(vmm_always.wait_gone(Duration::from_secs(10)));
    assert!(vmm_never.wait_gone(Duration::from_secs(10)));

    let restarted = controller.wait_observed(always, START_TIMEOUT, |o| {
        running(o) && o.pid != first_always.pid
    });
    assert_eq!(restarted.restart_count, 1, "{restarted:?}");
    let new_vmm = Proc::fabric_vmm(restarted.pid)
        .unwrap_or_else(|| panic!("restarted pid {} is no fabric-vmm", restarted.pid));
    let lowered = restarted.last_error.to_lowercase();
    assert!(
        lowered.contains("signal") || lowered.contains("sigkill"),
        "last_error of the restarted VM should tell it was killed: {restarted:?}"
    );

    let failed =
        controller.wait_observed(never, START_TIMEOUT, |o| phase(o) == ObservedPhase::Failed);
    assert_eq!(failed.pid, 0, "{failed:?}");
    let lowered = failed.last_error.to_lowercase();
    assert!(
        lowered.contains("signal") || lowered.contains("sigkill"),
        "last_error of the never VM should name the signal: {failed:?}"
    );

    // And it stays that way: no restart of `never`, no second one of `always`.
    std::thread::sleep(Duration::from_secs(10));
    let (_, never_now) = controller.observed(never).expect("never reported");
    assert_eq!(phase(&never_now), ObservedPhase::Failed, "{never_now:?}");
    assert_eq!(never_now.restart_count, 0, "{never_now:?}");
    assert!(
        host.vmm_processes_of(never).is_empty(),
        "a fabric-vmm runs for the never VM"
    );
    let (_, always_now) = controller.observed(always).expect("always reported");
    assert!(
        running(&always_now) && always_now.pid == restarted.pid,
        "{always_now:?}"
    );
    assert_eq!(always_now.restart_count, 1);
    assert!(new_vmm.alive());
    let cgroup = host.cgroup_dir("memory", always).join("cgroup.procs");
    let procs = std::fs::read_to_string(&cgroup).unwrap_or_default();
    assert!(
        procs.lines().any(|l| l.trim() == restarted.pid.to_string()),
        "the restarted fabric-vmm {} is not in {} ({procs:?})",
        restarted.pid,
        cgroup.display()
    );
    host.assert_agent_running();
}

#[test]
fn a_controller_outage_within_the_lease_keeps_vms_and_a_longer_one_fences_them() {
    skip_without_kvm!("agent: fencing");
    let _slot = kvm_slot();
    let rt = runtime();
    let lease_ttl = Duration::from_secs(4);
    let (mut host, mut controller) = registered_host(
        HostOptions {
            stop_timeout_secs: 3,
            ..HostOptions::kvm()
        },
        lease_ttl,
    );
    let guest = GuestImage::serve(&controller);
    let vm_id = "vm-fence";
    controller.set_assignments(vec![guest.assignment(vm_id, RestartPolicy::Always, 1)]);
    let observed = controller.wait_observed(vm_id, START_TIMEOUT, running);
    let vmm = Proc::fabric_vmm(observed.pid).expect("fabric-vmm");
    // A few heartbeats in a steady state before the outage.
    let mark = controller.mark();
    controller.wait_heartbeat(mark + 2, Duration::from_secs(30), "steady state", |_| true);

    // 1.5 s without a controller: nothing happens to the VM.
    controller.stop();
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_millis(1500) {
        assert!(vmm.alive(), "fabric-vmm stopped during a 1.5 s outage");
        std::thread::sleep(Duration::from_millis(50));
    }
    controller.restart();
    let mark = controller.mark();
    let watch_streams = controller.watch_streams_opened();
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(6) {
        assert!(
            vmm.alive(),
            "fabric-vmm stopped after a 1.5 s outage (lease {lease_ttl:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = controller.wait_observed_after(mark, vm_id, Duration::from_secs(10), running);
    assert_eq!(again.pid, vmm.pid, "{again:?}");
    wait_until(
        Duration::from_secs(15),
        "the agent reopens its assignment stream",
        || {
            if controller.watch_streams_opened() > watch_streams
                && controller.open_watch_streams() > 0
            {
                Ok(())
            } else {
                Err(format!(
                    "{} streams opened in all, {} open",
                    controller.watch_streams_opened(),
                    controller.open_watch_streams()
                ))
            }
        },
    );

    // 10 s without a controller: the VM is stopped once the lease has run out.
    controller.stop();
    let outage = Instant::now();
    // The heartbeat before the last one the controller received: that one was answered
    // (the last one may have been cut off by the stop).
    let answered = controller.latest_heartbeat().expect("heartbeats").seq - 1;
    let last_heartbeat = controller
        .heartbeats_after(answered - 1)
        .first()
        .expect("an answered heartbeat")
        .at;
    let mut gone_after = None;
    while outage.elapsed() < Duration::from_secs(10) {
        if gone_after.is_none() && !vmm.alive() {
            gone_after = Some(outage.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone_after = gone_after.unwrap_or_else(|| {
        panic!(
            "fabric-vmm {} still runs 10 s into an outage (lease {lease_ttl:?})\n{}",
            vmm.pid,
            host.report()
        )
    });
    // The lease counts from when the last answered heartbeat was sent: at the latest from
    // when that one was sent, just before the controller received it (a starved agent may
    // have sent it well over an interval before the outage). 250 ms for its way there.
    let since_heartbeat = outage.duration_since(last_heartbeat) + gone_after;
    assert!(
        since_heartbeat + Duration::from_millis(250) >= lease_ttl,
        "fenced {gone_after:?} into the outage, {since_heartbeat:?} after the last heartbeat, before the {lease_ttl:?} lease could end"
    );
    assert!(
        host.vmm_processes_of(vm_id).is_empty(),
        "a fabric-vmm of {vm_id} runs during the outage"
    );
    // The local API keeps serving and tells the VM is not running.
    let mut client = rt.block_on(host.agent_client());
    let local = rt.block_on(get_local_vm(&mut client, vm_id));
    let local_observed = local.observed.unwrap_or_default();
    assert!(
        !running(&local_observed) && local_observed.pid == 0,
        "GetLocalVm during the outage, after the fence: {local_observed:?}"
    );

    let mark = controller.mark();
    controller.restart();
    wait_until(Duration::from_secs(30), "the fence reported", || {
        let history = controller.observed_history(vm_id, mark);
        let fenced = history.iter().any(|(_, o)| {
            let text = format!("{} {}", o.message, o.last_error).to_lowercase();
            phase(o) == ObservedPhase::Stopped && (text.contains("lease") || text.contains("fenc"))
        });
        if fenced {
            Ok(())
        } else {
            Err(format!("reports since reconnecting: {history:#?}"))
        }
    });
    // The controller still assigns the VM here: once the lease is renewed and the set read
    // again (in whichever order the agent's heartbeat and its watch stream get through), the
    // fence lifts and the VM runs again, in a new fabric-vmm.
    let again = controller.wait_observed_after(mark, vm_id, START_TIMEOUT, running);
    assert_ne!(again.pid, vmm.pid, "{again:?}");
    eprintln!("agent: fenced {gone_after:?} into a 10 s outage with a {lease_ttl:?} lease; running again after the controller came back (pid {})", again.pid);
    host.assert_agent_running();
}

#[test]
fn bad_inputs_show_on_the_vm_and_the_agent_keeps_serving() {
    skip_without_kvm!("agent: bad inputs");
    let _slot = kvm_slot();
    let rt = runtime();
    let mut host = TestHost::new(HostOptions::kvm());

    // (i) No controller yet: the agent runs, serves its local API, and registers later.
    host.start_agent();
    std::thread::sleep(Duration::from_secs(3));
    host.assert_agent_running();
    let mut client = rt.block_on(host.agent_client());
    assert!(rt.block_on(list_local_vms(&mut client)).is_empty());
    let controller = FakeController::start(&host.controller_socket);
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);

    let guest = GuestImage::serve(&controller);
    let image = &guest.image;

    // (ii) The controller serves bytes that are not what the digest says.
    let claimed = sha256_hex(b"the kernel the controller believes it has");
    controller.add_image_bytes(&claimed, b"something else entirely".to_vec());
    let mismatch = with_kernel(
        guest.assignment("vm-mismatch", RestartPolicy::Always, 2),
        &claimed,
    );

    // (iii) A digest the controller does not have.
    let missing_digest = sha256_hex(b"never pushed");
    let missing = with_kernel(
        guest.assignment("vm-missing", RestartPolicy::Always, 3),
        &missing_digest,
    );

    // (iv) Someone already has the tap name the agent will want.
    let taken = "vm-taptaken";
    let tap = tap_name(taken, 0);
    host.add_foreign_tap(&tap);

    controller.set_assignments(vec![
        mismatch.clone(),
        missing.clone(),
        guest.assignment(taken, RestartPolicy::Always, 4),
    ]);
    let expectations = [
        ("vm-mismatch", "sha256 mismatch"),
        ("vm-missing", "not found"),
        (taken, "already exists"),
    ];
    for (vm_id, wanted) in expectations {
        let observed =
            controller.wait_observed(vm_id, START_TIMEOUT, |o| o.last_error.contains(wanted));
        assert_ne!(phase(&observed), ObservedPhase::Running, "{observed:?}");
        assert_eq!(observed.pid, 0, "{observed:?}");
        eprintln!(
            "agent: {vm_id}: {:?}: {}",
            phase(&observed),
            observed.last_error
        );
    }
    assert!(
        controller.pulls(&claimed) >= 1,
        "the agent never asked for the mismatching image"
    );

    // The agent still serves: its API shows the errors, and a good VM runs beside them.
    host.assert_agent_running();
    let mut client = rt.block_on(host.agent_client());
    for (vm_id, wanted) in expectations {
        let local = rt.block_on(get_local_vm(&mut client, vm_id));
        let last_error = local.observed.map(|o| o.last_error).unwrap_or_default();
        assert!(
            last_error.contains(wanted),
            "GetLocalVm {vm_id}: last_error {last_error:?}, wanted {wanted:?}"
        );
    }
    let good = "vm-good";
    controller.upsert_assignment(guest.assignment(good, RestartPolicy::Always, 5));
    let observed = controller.wait_observed(good, START_TIMEOUT, running);
    rt.block_on(console_until(
        &mut client,
        good,
        &image.ready_marker(),
        BOOT_TIMEOUT,
    ));
    let listed: Vec<String> = rt
        .block_on(list_local_vms(&mut client))
        .into_iter()
        .map(|vm| vm.vm_id)
        .collect();
    assert_eq!(
        listed,
        ["vm-good", "vm-mismatch", "vm-missing", taken],
        "ListLocalVms, ordered by id"
    );
    assert!(Proc::fabric_vmm(observed.pid).is_some());
    host.assert_agent_running();
}

#[test]
fn the_simulated_backend_runs_200_vms_without_processes() {
    let rt = runtime();
    let (mut host, controller, kernel_sha256) = sim_host(HostOptions::sim());

    let ids: Vec<String> = (0..200).map(|i| format!("sim-{i:03}")).collect();
    let assignments = ids
        .iter()
        .map(|id| assignment(id, default_vm(id, &kernel_sha256, RestartPolicy::Always)))
        .collect();
    let started = Instant::now();
    controller.set_assignments(assignments);
    let record = controller.wait_heartbeat(
        0,
        Duration::from_secs(120),
        "200 simulated VMs running",
        |hb| hb.vms.len() == 200 && hb.vms.iter().all(|vm| phase(vm) == ObservedPhase::Running),
    );
    let took = started.elapsed();
    for vm in &record.request.vms {
        assert!(
            vm.message.to_lowercase().contains("simulated"),
            "{}: message {:?} does not say it is simulated",
            vm.vm_id,
            vm.message
        );
        assert_eq!(vm.pid, 0, "{}: a simulated VM has no process", vm.vm_id);
    }
    assert!(
        host.vmm_processes().is_empty(),
        "fabric-vmm processes run for a simulated host"
    );
    let taps: Vec<String> = host
        .links()
        .into_iter()
        .filter(|l| l.starts_with("fv"))
        .collect();
    assert!(taps.is_empty(), "taps for simulated VMs: {taps:?}");
    assert!(
        controller.pulls(&kernel_sha256) < 10,
        "the same kernel was pulled {} times for 200 VMs (no cache?)",
        controller.pulls(&kernel_sha256)
    );
    let mut client = rt.block_on(host.agent_client());
    let listed = rt.block_on(list_local_vms(&mut client));
    assert_eq!(listed.len(), 200);
    let mut listed_ids: Vec<String> = listed.iter().map(|vm| vm.vm_id.clone()).collect();
    assert!(listed_ids.is_sorted(), "ListLocalVms is ordered by id");
    listed_ids.dedup();
    assert_eq!(listed_ids, ids);

    controller.set_assignments(Vec::new());
    wait_until(Duration::from_secs(60), "all simulated VMs removed", || {
        let left = rt.block_on(list_local_vms(&mut client)).len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("ListLocalVms lists {left}"))
        }
    });
    let mark = controller.mark();
    controller.wait_heartbeat(mark, Duration::from_secs(10), "no VMs", |hb| {
        hb.vms.is_empty()
    });
    host.assert_agent_running();
    eprintln!("agent: 200 simulated VMs running {took:?} after the assignment");
}

/// A VM whose start fails is started again after a back-off, whatever its restart policy
/// (that governs exits): until then it is STARTING, with the error and when the next start is
/// due, never FAILED. The controller reads FAILED as "will not run here" and releases the VM
/// to another host, so a FAILED report while a start is still due could run it twice.
#[test]
fn a_simulated_vm_that_cannot_start_is_reported_starting_while_the_agent_retries() {
    let (mut host, controller, kernel_sha256) = sim_host(HostOptions::sim());
    let vm_id = "cannot-start";
    // The simulated backend refuses 0 vCPUs at every start.
    let mut spec = default_vm(vm_id, &kernel_sha256, RestartPolicy::Never);
    spec.vcpus = 0;
    let mark = controller.mark();
    controller.set_assignments(vec![assignment(vm_id, spec.clone())]);

    // Three starts have failed (back-off 0.5 s, then 1 s, then 2 s).
    controller.wait_observed_after(mark, vm_id, Duration::from_secs(30), |o| {
        o.message.contains("starting again in 2.0 s")
    });
    let history = controller.observed_history(vm_id, mark);
    let failing: Vec<&ObservedVm> = history
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o.last_error.contains("vcpus 0"))
        .collect();
    assert!(failing.len() >= 2, "{history:#?}");
    for o in &failing {
        assert_eq!(phase(o), ObservedPhase::Starting, "{o:?}");
        assert_eq!(o.pid, 0, "{o:?}");
    }
    assert!(
        history
            .iter()
            .all(|(_, o)| phase(o) != ObservedPhase::Failed),
        "reported FAILED although the agent retries: {history:#?}"
    );
    let latest = failing.last().expect("a report");
    assert!(
        latest.message.starts_with("start failed: vcpus 0")
            && latest.message.contains("starting again in ")
            && latest.message.contains(" (at 20"),
        "the message does not say a start is due and when: {:?}",
        latest.message
    );

    // The retries are real: once the assignment is fixed, the next one runs it.
    spec.vcpus = 1;
    let mut fixed = assignment(vm_id, spec);
    fixed.generation = 2;
    controller.upsert_assignment(fixed);
    let started = controller.wait_observed(vm_id, Duration::from_secs(60), |o| {
        phase(o) == ObservedPhase::Running
    });
    assert_eq!(started.generation, 2, "{started:?}");
    host.assert_agent_running();
}

#[test]
fn a_controller_that_forgot_the_host_makes_the_agent_stop_its_vms_and_register_again() {
    let (mut host, controller, kernel_sha256) = sim_host(HostOptions {
        sim_start_delay_ms: 1500,
        ..HostOptions::sim()
    });
    let first_id = controller.host_id(&host.machine_id).expect("host id");
    let vm_id = "sim-a";
    controller.set_assignments(vec![assignment(
        vm_id,
        default_vm(vm_id, &kernel_sha256, RestartPolicy::Always),
    )]);
    let before = controller.wait_observed(vm_id, Duration::from_secs(60), |o| {
        phase(o) == ObservedPhase::Running
    });

    // Heartbeats now fail with NOT_FOUND: the agent must stop its VMs and register again.
    let mark = controller.mark();
    controller.forget_hosts();
    controller.wait_registrations(&host.machine_id, 2, AGENT_TIMEOUT);
    let second_id = controller.host_id(&host.machine_id).expect("new host id");
    assert_ne!(first_id, second_id);
    let after = controller.wait_heartbeat(
        mark,
        Duration::from_secs(60),
        "the new host id and the VM running",
        |hb| {
            hb.host_id == second_id
                && hb
                    .vms
                    .iter()
                    .any(|vm| vm.vm_id == vm_id && phase(vm) == ObservedPhase::Running)
        },
    );
    let after = after
        .request
        .vms
        .into_iter()
        .find(|vm| vm.vm_id == vm_id)
        .expect("reported");
    // Stopped and started again: a new start time (and, in between, not running).
    assert!(
        before.started_at.is_some() && after.started_at != before.started_at,
        "{vm_id} kept running through the NOT_FOUND: before {before:?}, after {after:?}"
    );
    let history = controller.observed_history(vm_id, mark);
    assert!(
        history
            .iter()
            .any(|(_, o)| phase(o) != ObservedPhase::Running),
        "no report of {vm_id} out of RUNNING after the NOT_FOUND: {history:#?}"
    );
    host.assert_agent_running();
}

/// A simulated VM of startup 512, minimum 128 and maximum 1024 MiB (buffer 20 %, equal
/// weights), with a demand label when given. Without one, its guest uses 40 % of its startup
/// memory (`[sim] memory_used_percent`): 204 MiB, so its target is 204 × 1.2 = 245 MiB
/// (balloon 1024 − 245 = 779).
fn dynamic_memory_assignment(vm_id: &str, kernel_sha256: &str, demand: Option<&str>) -> Assignment {
    let mut spec = default_vm(vm_id, kernel_sha256, RestartPolicy::Always);
    spec.memory = Some(memory(512, 128, 1024));
    spec.placement = Some(Placement {
        labels: demand
            .map(|d| (MEMORY_DEMAND_LABEL.to_string(), d.to_string()))
            .into_iter()
            .collect(),
        ..Default::default()
    });
    assignment(vm_id, spec)
}

/// A simulated host with `options`, registered with its controller, which serves a kernel
/// the simulated backend never runs; that kernel's sha256.
fn sim_host(options: HostOptions) -> (TestHost, FakeController, String) {
    let (host, controller) = registered_host(options, LEASE_TTL);
    let kernel = b"a kernel the simulated backend never runs".to_vec();
    let kernel_sha256 = sha256_hex(&kernel);
    controller.add_image_bytes(&kernel_sha256, kernel);
    (host, controller, kernel_sha256)
}

/// A simulated host with `options`, its controller, and the VMs of `demands` (id, demand
/// label) assigned.
fn sim_host_with_vms(
    options: HostOptions,
    demands: &[(&str, Option<&str>)],
) -> (TestHost, FakeController) {
    let (host, controller, kernel_sha256) = sim_host(options);
    controller.set_assignments(
        demands
            .iter()
            .map(|(id, demand)| dynamic_memory_assignment(id, &kernel_sha256, *demand))
            .collect(),
    );
    (host, controller)
}

fn reported<'a>(hb: &'a HeartbeatRequest, vm_id: &str) -> Option<&'a ObservedVm> {
    hb.vms.iter().find(|vm| vm.vm_id == vm_id)
}

/// The balloon the guest of `vm_id` has, as the heartbeat reports it.
fn balloon_actual(hb: &HeartbeatRequest, vm_id: &str) -> Option<u64> {
    reported(hb, vm_id)?
        .memory
        .as_ref()
        .map(|m| m.balloon_actual_mib)
}

/// The balancer's decision for `vm_id`, as the heartbeat reports it.
fn decision(hb: &HeartbeatRequest, vm_id: &str) -> Option<VmMemoryBalance> {
    reported(hb, vm_id)?.memory_balance.clone()
}

fn balance_target(hb: &HeartbeatRequest, vm_id: &str) -> Option<u64> {
    decision(hb, vm_id).map(|b| b.target_mib)
}

/// The host's memory balance, as the heartbeat reports it.
fn host_balance(hb: &HeartbeatRequest) -> Option<HostMemoryBalance> {
    hb.usage.as_ref().and_then(|u| u.memory_balance)
}

/// Budget 1000 MiB for three VMs of minimum 128: two idle ones want 245 MiB each, the third's
/// guest wants 900 MiB and has its startup 512, all in use, so the balancer sees demand 512
/// and pressure, and wants 512 × 1.2 = 615 for it. Wanted 1105 > 1000: above the minimums
/// (384), 616 MiB are shared by weight; the idle ones need 117 each, less than their share,
/// and get it; the hungry one gets the remaining 382: target 510, below its demand, so it stays
/// under pressure (paging) and the host stays short, which is what the controller acts on.
#[test]
fn a_short_simulated_host_shares_its_budget_by_weight_and_reports_the_pressure() {
    let (mut host, controller) = sim_host_with_vms(
        HostOptions {
            memory_budget_mib: 1000,
            ..HostOptions::sim()
        },
        &[("idle-a", None), ("idle-b", None), ("hungry", Some("900"))],
    );
    let ids = ["idle-a", "idle-b", "hungry"];
    let record = controller.wait_heartbeat(
        0,
        Duration::from_secs(60),
        "the idle VMs shrunk to 245 MiB on a short host",
        |hb| {
            host_balance(hb).is_some_and(|b| b.short)
                && ids.iter().all(|id| {
                    reported(hb, id).is_some_and(|vm| {
                        phase(vm) == ObservedPhase::Running && vm.memory_balance.is_some()
                    })
                })
                && ["idle-a", "idle-b"].iter().all(|id| {
                    balloon_actual(hb, id) == Some(779) && balance_target(hb, id) == Some(245)
                })
        },
    );
    let hb = &record.request;
    let balance = host_balance(hb).expect("host memory balance");
    assert_eq!(
        (
            balance.budget_mib,
            balance.demand_mib,
            balance.wanted_mib,
            balance.assigned_mib,
            balance.minimum_mib,
            balance.short,
            balance.pressured_vms
        ),
        (1000, 204 + 204 + 512, 245 + 245 + 615, 1000, 384, true, 1),
        "{balance:?}"
    );
    let decisions: Vec<_> = ids
        .iter()
        .map(|id| decision(hb, id).expect("decision"))
        .collect();
    let targets: u64 = decisions.iter().map(|d| d.target_mib).sum();
    assert!(
        targets <= 1000,
        "targets {targets} MiB above the budget: {decisions:?}"
    );
    assert!(
        decisions.iter().all(|d| d.target_mib >= 128),
        "a VM below its minimum: {decisions:?}"
    );
    for idle in &decisions[..2] {
        assert_eq!(
            (idle.target_mib, idle.demand_mib, idle.pressured),
            (245, Some(204), false),
            "{idle:?}"
        );
    }
    let hungry = &decisions[2];
    assert!(
        hungry.pressured && hungry.reason.starts_with("pressure"),
        "{hungry:?}"
    );
    assert_eq!(
        (hungry.target_mib, hungry.demand_mib),
        (510, Some(512)),
        "{hungry:?}"
    );

    // The hungry guest keeps paging: its major faults grow between reports, by far more than
    // the balancer's threshold of 20 a second.
    let faults = |hb: &HeartbeatRequest| {
        reported(hb, "hungry")
            .and_then(|vm| vm.memory.as_ref())
            .and_then(|m| m.major_faults)
            .expect("major faults")
    };
    let before = faults(hb);
    let later = controller.wait_heartbeat(
        record.seq + 1,
        Duration::from_secs(10),
        "a later report",
        |_| true,
    );
    let grown = faults(&later.request) - before;
    let secs = later.at.duration_since(record.at).as_secs_f64();
    assert!(
        grown as f64 > 20.0 * secs.max(1.0) * 10.0,
        "major faults grew by {grown} in {secs:.1} s"
    );
    let still = host_balance(&later.request);
    assert!(still.is_some_and(|b| b.short), "{still:?}");
    host.assert_agent_running();
}

/// Budget 8000 MiB: everything fits. The idle VMs shrink from their startup 512 to 245 MiB;
/// the hungry one (700 MiB wanted, 512 at start) is seen under pressure, grows at once (to its
/// maximum, which the budget can spare), keeps that through the pressure hold and then settles
/// at 700 × 1.2 = 840 MiB, no longer pressured. Only then do wanted and assigned agree: during
/// the hold it is assigned more than it wants.
#[test]
fn a_simulated_host_with_room_shrinks_idle_vms_and_grows_a_hungry_one() {
    let (mut host, controller) = sim_host_with_vms(
        HostOptions {
            memory_budget_mib: 8000,
            ..HostOptions::sim()
        },
        &[("idle-a", None), ("idle-b", None), ("hungry", Some("700"))],
    );
    let record = controller.wait_heartbeat(
        0,
        Duration::from_secs(60),
        "idle VMs at demand plus buffer and the hungry one relieved",
        |hb| {
            let host_calm = host_balance(hb).is_some_and(|b| !b.short && b.pressured_vms == 0);
            let hungry_settled = reported(hb, "hungry").is_some_and(|vm| {
                vm.memory_balance
                    .as_ref()
                    .is_some_and(|b| !b.pressured && b.reason == "at demand+buffer")
                    && vm
                        .memory
                        .as_ref()
                        .is_some_and(|m| m.balloon_actual_mib == 1024 - 840)
            });
            host_calm
                && hungry_settled
                && ["idle-a", "idle-b"]
                    .iter()
                    .all(|id| balloon_actual(hb, id) == Some(779))
        },
    );
    let hb = &record.request;
    let balance = host_balance(hb).expect("host memory balance");
    for id in ["idle-a", "idle-b"] {
        let decision = decision(hb, id).expect("decision");
        assert_eq!(
            (decision.target_mib, decision.demand_mib, decision.pressured),
            (245, Some(204), false),
            "{id}: {decision:?}"
        );
    }
    let hungry = decision(hb, "hungry").expect("decision");
    assert_eq!(
        (hungry.target_mib, hungry.demand_mib),
        (840, Some(700)),
        "{hungry:?}"
    );
    assert_eq!(
        (
            balance.budget_mib,
            balance.demand_mib,
            balance.minimum_mib,
            balance.short
        ),
        (8000, 204 + 204 + 700, 384, false),
        "{balance:?}"
    );
    assert_eq!(
        (balance.wanted_mib, balance.assigned_mib),
        (245 + 245 + 840, 245 + 245 + 840),
        "{balance:?}"
    );
    // On its way there the hungry VM was seen under pressure. Grown to its maximum, it is
    // pressured for one balancer step (0.5 s), which a heartbeat (1 s) may not catch; its
    // pressure hold (3 s) that follows always shows.
    let history = controller.observed_history("hungry", 0);
    assert!(
        history
            .iter()
            .any(|(_, vm)| vm.memory_balance.as_ref().is_some_and(|b| {
                (b.pressured && b.reason.starts_with("pressure"))
                    || b.reason.starts_with("recent pressure")
            })),
        "hungry never reported under pressure: {:#?}",
        history
            .iter()
            .map(|(_, vm)| &vm.memory_balance)
            .collect::<Vec<_>>()
    );
    // And, the budget having room, it was given its whole maximum at once.
    assert!(
        history.iter().any(|(_, vm)| vm
            .memory_balance
            .as_ref()
            .is_some_and(|b| b.target_mib == 1024)),
        "hungry never grown to its maximum: {:#?}",
        history
            .iter()
            .map(|(_, vm)| &vm.memory_balance)
            .collect::<Vec<_>>()
    );
    host.assert_agent_running();
}

/// With `[memory] balancer = false` heartbeats carry no balancer figures, balloons stay at
/// their startup size, and a bad demand label shows on the VM's status message.
#[test]
fn without_the_balancer_heartbeats_carry_no_balancer_figures() {
    let (mut host, controller) = sim_host_with_vms(
        HostOptions {
            memory_balancer: false,
            ..HostOptions::sim()
        },
        &[("plain", None), ("bad-label", Some("lots"))],
    );
    let first = controller.wait_heartbeat(0, Duration::from_secs(60), "both VMs running", |hb| {
        ["plain", "bad-label"].iter().all(|id| {
            reported(hb, id)
                .is_some_and(|vm| phase(vm) == ObservedPhase::Running && vm.memory.is_some())
        })
    });
    // A few steps' worth of time for a balancer that should not be there.
    let later =
        controller.wait_heartbeat(first.seq + 3, Duration::from_secs(20), "3 more", |_| true);
    for record in [&first, &later] {
        let hb = &record.request;
        assert_eq!(host_balance(hb), None);
        for vm in &hb.vms {
            assert_eq!(vm.memory_balance, None, "{}", vm.vm_id);
            assert_eq!(balloon_actual(hb, &vm.vm_id), Some(512), "{}", vm.vm_id);
        }
    }
    let bad = reported(&later.request, "bad-label").expect("reported");
    assert!(
        bad.message.contains(MEMORY_DEMAND_LABEL) && bad.message.contains("lots"),
        "{:?}",
        bad.message
    );
    // The default demand (40 % of 512) is what its guest uses.
    let memory = bad.memory.as_ref().expect("memory");
    let used = memory.total_bytes.unwrap_or(0) - memory.available_bytes.unwrap_or(0);
    assert_eq!(used >> 20, 204, "{memory:?}");
    host.assert_agent_running();
}
