//! Names and ids never collide, against a live controller: an argument of the form of an id
//! (`vm-` or `host-` and 16 hex digits) is an id and anything else a name, for every fabricctl
//! command, and no name may have the form of an id; host names are unique in a cluster, while
//! a machine registering again keeps its name.

use std::process::Command;
use std::time::Duration;

use fabric_proto::v1::host_link_client::HostLinkClient;
use fabric_proto::v1::{RegisterHostRequest, Resources};
use fabric_test_support::cluster::{unix_channel, Controller, Timing};
use serde_json::Value;
use tonic::transport::Channel;
use tonic::Code;

/// Fake hosts here never heartbeat: a lease long enough that none goes DEAD during a test.
const LONG_LEASE: Timing = Timing {
    lease_ttl: 300.0,
    heartbeat_interval: 1.0,
    fencing_margin: 5.0,
};

/// A kernel digest: CreateVm does not look digests up in the image store.
const KERNEL: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn fabricctl(controller: &Controller, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fabricctl"))
        .arg("--controller")
        .arg(controller.address())
        .args(args)
        .env_remove("FABRIC_CONTROLLER")
        .output()
        .expect("run fabricctl")
}

/// The JSON a command that must succeed prints with `-o json`.
fn json(controller: &Controller, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.extend(["-o", "json"]);
    let output = fabricctl(controller, &with_json);
    assert!(
        output.status.success(),
        "fabricctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The one-line error of a command that must fail.
fn fails(controller: &Controller, args: &[&str]) -> String {
    let output = fabricctl(controller, args);
    assert!(!output.status.success(), "fabricctl {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr)
        .trim_end()
        .to_owned()
}

async fn host_link(controller: &Controller) -> HostLinkClient<Channel> {
    HostLinkClient::new(unix_channel(&controller.socket).await)
}

/// Registers machine `machine` as host `name` (8 CPUs, 8 GiB), as its agent does at start.
async fn register(
    link: &mut HostLinkClient<Channel>,
    machine: &str,
    name: &str,
) -> Result<String, tonic::Status> {
    let resources = Resources {
        cpus: 8,
        memory_mib: 8192,
        disk_mib: 0,
    };
    let response = link
        .register_host(RegisterHostRequest {
            machine_id: machine.into(),
            name: name.into(),
            zone: "z1".into(),
            capacity: Some(resources),
            allocatable: Some(resources),
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner().host_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_start_like_ids_are_names_for_every_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let controller = Controller::start(dir.path(), LONG_LEASE);
    let mut link = host_link(&controller).await;
    let host_b = register(&mut link, "machine-b", "host-b")
        .await
        .expect("register host-b");
    let host_c = register(&mut link, "machine-c", "host-c")
        .await
        .expect("register host-c");

    let cordoned = json(
        &controller,
        &["host", "cordon", "host-b", "--reason", "rma"],
    );
    assert_eq!(cordoned["id"], host_b.as_str());
    assert_eq!(cordoned["state"], "cordoned");
    assert_eq!(
        json(&controller, &["host", "get", "host-c"])["state"],
        "ready"
    );
    let got = json(&controller, &["host", "get", "host-b"]);
    assert_eq!(
        (&got["id"], &got["state"]),
        (&host_b.as_str().into(), &"cordoned".into())
    );
    assert_eq!(
        json(&controller, &["host", "get", &host_b])["name"],
        "host-b"
    );
    let uncordoned = json(&controller, &["host", "uncordon", "host-b"]);
    assert_eq!(uncordoned["state"], "ready");
    let drained = json(&controller, &["host", "drain", "host-c"]);
    assert_eq!(drained["id"], host_c.as_str());
    assert_eq!(drained["state"], "draining");

    let created = json(
        &controller,
        &[
            "vm", "create", "--name", "vm-web", "--vcpus", "1", "--memory", "256", "--kernel",
            KERNEL,
        ],
    );
    let vm_web = created["id"].as_str().expect("an id").to_owned();
    // Placed on host-b, the one schedulable host: `vm list --host host-b` finds it there.
    let on_b = eventually_json(&controller, &["vm", "get", "vm-web"], |vm| {
        vm["status"]["host_id"] == host_b.as_str()
    })
    .await;
    assert_eq!(on_b["id"], vm_web.as_str());
    let listed = json(&controller, &["vm", "list", "--host", "host-b"]);
    assert_eq!(listed[0]["id"], vm_web.as_str(), "{listed:#}");

    let stopped = json(&controller, &["vm", "stop", "vm-web"]);
    assert_eq!(stopped["id"], vm_web.as_str());
    assert_eq!(stopped["status"]["desired_state"], "stopped");
    let started = json(&controller, &["vm", "start", "vm-web"]);
    assert_eq!(started["status"]["desired_state"], "running");
    assert_eq!(
        json(&controller, &["vm", "get", &vm_web])["spec"]["name"],
        "vm-web"
    );
    let events = json(&controller, &["events", "--vm", "vm-web"]);
    let events = events.as_array().expect("events");
    assert!(
        !events.is_empty() && events.iter().all(|e| e["vm_id"] == vm_web.as_str()),
        "{events:#?}"
    );
    let deleted = json(&controller, &["vm", "delete", "vm-web"]);
    assert_eq!(deleted["id"], vm_web.as_str());

    // An argument of the form of an id is looked up as an id only.
    let error = fails(&controller, &["host", "get", "host-0123456789abcdef"]);
    assert!(error.starts_with("fabricctl: NOT_FOUND: "), "{error}");
    let error = fails(&controller, &["vm", "stop", "vm-0123456789abcdef"]);
    assert!(error.starts_with("fabricctl: NOT_FOUND: "), "{error}");
    // And no name may have that form.
    let error = fails(
        &controller,
        &[
            "vm",
            "create",
            "--name",
            "vm-0123456789abcdef",
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--kernel",
            KERNEL,
        ],
    );
    assert!(
        error.starts_with("fabricctl: INVALID_ARGUMENT: spec.name \"vm-0123456789abcdef\": has the form of a VM id"),
        "{error}"
    );
    let refused = register(&mut link, "machine-x", "host-0123456789abcdef")
        .await
        .expect_err("a host name of the form of an id");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("has the form of a host id"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_unique_and_a_machine_keeps_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let controller = Controller::start(dir.path(), LONG_LEASE);
    let mut link = host_link(&controller).await;

    let web_1 = register(&mut link, "machine-a", "web-1")
        .await
        .expect("register web-1");
    let taken = register(&mut link, "machine-b", "web-1")
        .await
        .expect_err("a second machine named web-1");
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(
        taken.message().starts_with(&format!(
            r#"host name "web-1" is held by machine "machine-a" (host {web_1}, ready)"#
        )),
        "{taken:?}"
    );
    // The agent of machine-a restarts: same machine, same name, same host.
    let again = register(&mut link, "machine-a", "web-1")
        .await
        .expect("machine-a registers again");
    assert_eq!(again, web_1);

    // A rename frees the old name; a name held by another machine is still refused.
    let web_2 = register(&mut link, "machine-b", "web-2")
        .await
        .expect("register web-2");
    assert_ne!(web_2, web_1);
    let taken = register(&mut link, "machine-b", "web-1")
        .await
        .expect_err("renaming onto a taken name");
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert_eq!(
        register(&mut link, "machine-a", "web-3")
            .await
            .expect("rename web-1 to web-3"),
        web_1
    );
    assert_eq!(
        register(&mut link, "machine-b", "web-1")
            .await
            .expect("web-1 is free again"),
        web_2
    );

    // Machines racing for one new name: exactly one gets it.
    let racers = (0..8).map(|i| {
        let mut link = link.clone();
        tokio::spawn(async move { register(&mut link, &format!("machine-race-{i}"), "race").await })
    });
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("racer task") {
            Ok(_) => won += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(won, 1);

    let hosts = json(&controller, &["host", "list"]);
    let mut names: Vec<&str> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["name"].as_str().expect("a name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["race", "web-1", "web-3"]);
}

/// Polls a command's JSON until `done` holds for it.
async fn eventually_json(
    controller: &Controller,
    args: &[&str],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = json(controller, args);
        if done(&value) {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?}: never as expected: {value:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
