//! A hostile or careless client against a real controller (issue 15): every oversized or
//! malformed request is refused with a status naming the limit, and the controller keeps
//! serving. What each limit is: docs/limits.md.

use std::time::Duration;

use fabric_proto::v1::{CordonHostRequest, CreateVmRequest, NicSpec, Placement, VmSpec};
use fabric_test_support::cluster::{Controller, SimHost, Timing};
use fabric_test_support::compute::{create_vm, ready_hosts};
use fabric_test_support::vmspec::simulated_vm;

fn create(spec: VmSpec) -> CreateVmRequest {
    CreateVmRequest {
        spec: Some(spec),
        desired_state: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_requests_are_refused_naming_the_limit_and_the_controller_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let _host = SimHost::start(&dir.path().join("h1"), "h1", &controller.address(), 0, 0);
    let mut client = controller.compute().await;
    let hosts = ready_hosts(&client, 1, Duration::from_secs(30)).await;

    let refusals: Vec<(&str, VmSpec, &str)> = vec![
        (
            // A few MiB in one field used to be accepted, and then broke the host's whole
            // assignment stream.
            "a 3 MiB NIC network name",
            VmSpec {
                nics: vec![NicSpec {
                    network: "n".repeat(3 << 20),
                    mac: String::new(),
                }],
                ..simulated_vm("huge-nic")
            },
            "at most 16384",
        ),
        (
            "a zone of 1,000 bytes",
            VmSpec {
                placement: Some(Placement {
                    zone: "z".repeat(1000),
                    ..Default::default()
                }),
                ..simulated_vm("huge-zone")
            },
            "spec.placement.zone",
        ),
        (
            "a command line that fits the spec's limit but not with what the host adds",
            VmSpec {
                kernel_cmdline: "x".repeat(2000),
                ..simulated_vm("long-cmdline")
            },
            "with what the host adds",
        ),
    ];
    for (what, spec, names) in refusals {
        let status = client.create_vm(create(spec)).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(status.message().contains(names), "{what}: {status:?}");
    }

    // Larger than any message a server decodes.
    let status = client
        .create_vm(create(VmSpec {
            kernel_cmdline: "x".repeat(5 << 20),
            ..simulated_vm("five-mib")
        }))
        .await
        .expect_err("a 5 MiB request");
    // tonic says OUT_OF_RANGE; fabric_proto::server() makes it gRPC's code for a message over
    // the limit.
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("4194304"),
        "the refusal does not name the limit: {status:?}"
    );

    let status = client
        .cordon_host(CordonHostRequest {
            id: hosts["h1"].clone(),
            reason: "r".repeat(10_000),
        })
        .await
        .expect_err("a 10 KB reason");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("256 bytes"), "{status:?}");

    // A registration with a label of 10 KB, and one with 65 labels.
    let mut hostlink = fabric_proto::v1::host_link_client::HostLinkClient::new(
        fabric_test_support::cluster::unix_channel(&controller.socket).await,
    );
    let register =
        |labels: std::collections::HashMap<String, String>| fabric_proto::v1::RegisterHostRequest {
            machine_id: "hostile-machine".into(),
            name: "hostile".into(),
            capacity: Some(Default::default()),
            allocatable: Some(Default::default()),
            labels,
            ..Default::default()
        };
    let long = [("rack".to_string(), "r".repeat(10_000))].into();
    let status = hostlink
        .register_host(register(long))
        .await
        .expect_err("a 10 KB label");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("0..=63"), "{status:?}");
    let many = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let status = hostlink
        .register_host(register(many))
        .await
        .expect_err("65 labels");
    assert!(status.message().contains("at most 64"), "{status:?}");
    // A host offering more than it has (u64::MAX of disk: it would never be judged full).
    let status = hostlink
        .register_host(fabric_proto::v1::RegisterHostRequest {
            capacity: Some(fabric_proto::v1::Resources {
                cpus: 8,
                memory_mib: 8192,
                disk_mib: 1024,
            }),
            allocatable: Some(fabric_proto::v1::Resources {
                cpus: 8,
                memory_mib: 8192,
                disk_mib: u64::MAX,
            }),
            ..register(Default::default())
        })
        .await
        .expect_err("allocatable over capacity");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("exceeds capacity"), "{status:?}");

    // And it serves on.
    create_vm(&client, simulated_vm("after"))
        .await
        .expect("a good create");
}
