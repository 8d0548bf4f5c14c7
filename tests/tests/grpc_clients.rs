//! Any gRPC client can call Fabric's Unix sockets, not only tonic and grpc-go: Python grpcio
//! (gRPC C-core, the transport of the C++, Ruby and PHP clients too) with default channel
//! options, which sends the %-encoded socket path as `:authority`, calls each server that
//! listens on a Unix socket (the controller, an agent, a fabric-vmm's control socket): a health
//! check, the service list from its stock reflection **v1alpha** client, and one method of each
//! service, typed from reflection (`tests/grpc_clients/probe.py`).
//!
//! The Python packages are pinned in `tests/grpc_clients/requirements.txt` and installed by
//! `scripts/test`; without them these tests fail and say how to install them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fabric_proto::v1::{CreateVmRequest, GetVmRequest, VmPhase};
use fabric_test_support::cluster::{
    wait_for_path, workspace_bin, Controller, Process, SimHost, Timing,
};
use fabric_test_support::compute::{eventually, ready_hosts};
use fabric_test_support::guest::kvm_available;
use serde_json::{json, Value};

/// Runs `probe.py` against the Unix socket `socket`, calling each of `calls` (method, JSON
/// request); its report, or a panic with what went wrong and how to fix it.
fn probe(socket: &Path, calls: &[(&str, Value)]) -> Value {
    let mut args = vec![format!("unix:{}", socket.display())];
    for (method, request) in calls {
        args.extend([
            "--call".to_string(),
            method.to_string(),
            request.to_string(),
        ]);
    }
    fabric_test_support::python::grpc_client_report("probe.py", &args)
}

/// What every Fabric server lists next to its own services.
fn listed_with_standard(own: &[&str]) -> BTreeSet<String> {
    own.iter()
        .chain(&[
            fabric_proto::HEALTH_SERVICE,
            fabric_proto::REFLECTION_SERVICE,
            fabric_proto::REFLECTION_V1ALPHA_SERVICE,
        ])
        .map(|s| s.to_string())
        .collect()
}

/// Checks the report's service list and health (the server and each of `own` SERVING), and
/// returns the responses of its calls.
fn check_standard(report: &Value, own: &[&str]) -> Vec<Value> {
    let listed: BTreeSet<String> = report["services"]
        .as_array()
        .expect("a service list")
        .iter()
        .map(|s| s.as_str().expect("a service name").to_owned())
        .collect();
    assert_eq!(listed, listed_with_standard(own), "reflection v1alpha");
    let mut expected_health = serde_json::Map::new();
    for service in [""].iter().chain(own) {
        expected_health.insert(service.to_string(), json!("SERVING"));
    }
    assert_eq!(report["health"], Value::Object(expected_health));
    report["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| c["response"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_the_controller_and_an_agent_over_their_unix_sockets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let host_dir = dir.path().join("h1");
    let _host = SimHost::start(&host_dir, "h1", &controller.address(), 0, 0);
    let mut compute = controller.compute().await;
    let hosts = ready_hosts(&compute, 1, Duration::from_secs(30)).await;
    let vm = compute
        .create_vm(CreateVmRequest {
            spec: Some(fabric_test_support::vmspec::simulated_vm("py-web")),
            desired_state: 0,
        })
        .await
        .expect("CreateVm")
        .into_inner();
    eventually(Duration::from_secs(30), "py-web running", || {
        let mut compute = compute.clone();
        let id = vm.id.clone();
        async move {
            let vm = compute.get_vm(GetVmRequest { id }).await.ok()?.into_inner();
            (vm.status?.phase() == VmPhase::Running).then_some(())
        }
    })
    .await;

    let controller_socket = controller.socket.clone();
    let report = tokio::task::spawn_blocking(move || {
        probe(
            &controller_socket,
            &[
                ("fabric.v1.Compute.ListHosts", json!({})),
                (
                    "fabric.v1.HostLink.RegisterHost",
                    json!({
                        "machineId": "machine-python",
                        "name": "python",
                        "zone": "z1",
                        "capacity": {"cpus": 2, "memoryMib": 1024},
                        "allocatable": {"cpus": 2, "memoryMib": 1024},
                    }),
                ),
                ("fabric.v1.Images.ListImages", json!({})),
            ],
        )
    })
    .await
    .expect("probe task");
    let responses = check_standard(
        &report,
        &[
            fabric_proto::COMPUTE_SERVICE,
            fabric_proto::HOST_LINK_SERVICE,
            fabric_proto::IMAGES_SERVICE,
        ],
    );
    assert_eq!(responses[0]["hosts"][0]["id"], json!(hosts["h1"]));
    assert_eq!(responses[0]["hosts"][0]["name"], json!("h1"));
    let python_host = responses[1]["hostId"].as_str().expect("a host id");
    let registered = compute
        .get_host(fabric_proto::v1::GetHostRequest {
            id: python_host.to_owned(),
        })
        .await
        .expect("the host Python registered")
        .into_inner();
    assert_eq!(registered.name, "python");
    assert_eq!(responses[2], json!({}), "no image pushed");

    let agent_socket = host_dir.join("agent.sock");
    let report = tokio::task::spawn_blocking(move || {
        probe(
            &agent_socket,
            &[("fabric.v1.Agent.ListLocalVms", json!({}))],
        )
    })
    .await
    .expect("probe task");
    let responses = check_standard(&report, &[fabric_proto::AGENT_SERVICE]);
    assert_eq!(responses[0]["vms"][0]["vmId"], json!(vm.id));
    assert_eq!(responses[0]["vms"][0]["spec"]["name"], json!("py-web"));
}

#[test]
fn python_grpcio_calls_a_fabric_vmm_control_socket() {
    if !kvm_available("python_grpcio_calls_a_fabric_vmm_control_socket") {
        return;
    }
    // Panics, saying how to build it, when it is missing.
    let testguest = fabric_test_support::testguest::elf();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("control.sock");
    // The test guest's balloon scenario waits minutes for the host to drive it: a VM that
    // stays up while Python calls its VMM.
    let mut command = Command::new(workspace_bin("fabric-vmm"));
    command
        .arg("--kernel")
        .arg(&testguest)
        .arg("--cmdline")
        .arg("fabric.test=balloon")
        .arg("--memory")
        .arg("256")
        .arg("--balloon")
        .arg("--console")
        .arg(dir.path().join("console.log"))
        .arg("--control-socket")
        .arg(&socket)
        .arg("--vm-id")
        .arg("vm-python");
    let _vmm = Process::spawn("fabric-vmm", command, dir.path().join("vmm.log"));
    wait_for_path(&socket, Duration::from_secs(30));

    let report = probe(&socket, &[("fabric.v1.Vmm.GetState", json!({}))]);

    let responses = check_standard(&report, &[fabric_proto::VMM_SERVICE]);
    assert_eq!(responses[0]["vmId"], json!("vm-python"));
    assert_eq!(responses[0]["memoryMib"], json!("256"));
}
