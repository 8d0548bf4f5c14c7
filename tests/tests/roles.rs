//! Roles, projects, quotas and the audit log (issue 16) against a real fabric-controller
//! serving mutual TLS on loopback, with users made by `fabricctl user create`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fabric_proto::tls::TlsFiles;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{
    CreateVmRequest, DeleteVmRequest, DesiredState, GetVmRequest, ListAuditRequest, ListVmsRequest,
    StopVmRequest, WatchEventsRequest,
};
use fabric_test_support::cluster::{unix_channel, workspace_bin, Process};
use fabric_test_support::pki::{free_port, Pki};
use fabric_test_support::vmspec::simulated_vm;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

async fn as_user(port: u16, dir: &Path, name: &str) -> Channel {
    let config = TlsFiles::in_dir(dir, name).client_config().unwrap();
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(config)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

struct Cluster {
    dir: tempfile::TempDir,
    pki: Pki,
    port: u16,
    socket: std::path::PathBuf,
    _controller: Process,
}

impl Cluster {
    fn start(extra: &[&str]) -> Cluster {
        fabric_proto::tls::install_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), "roles", &["127.0.0.1"]);
        let port = free_port();
        let (controller, socket) = pki.controller(dir.path(), port, extra);
        Cluster {
            dir,
            pki,
            port,
            socket,
            _controller: controller,
        }
    }

    /// fabricctl as the bootstrap admin, over mutual TLS.
    fn fabricctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(workspace_bin("fabricctl"))
            .args(["--controller", &format!("127.0.0.1:{}", self.port)])
            .arg("--tls-dir")
            .arg(&self.pki.dir)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.fabricctl(args);
        assert!(
            out.status.success(),
            "fabricctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `fabricctl user create NAME --role ROLE [--project P]`; the user's client.
    async fn user(&self, name: &str, role: &str, project: Option<&str>) -> ComputeClient<Channel> {
        let out = self.dir.path().join(format!("user-{name}"));
        let mut args = vec!["user", "create", name, "--role", role, "--out"];
        let out_str = out.to_str().unwrap().to_string();
        args.push(&out_str);
        if let Some(p) = project {
            args.extend(["--project", p]);
        }
        self.ok(&args);
        ComputeClient::new(as_user(self.port, &out, name).await)
    }

    async fn root(&self) -> ComputeClient<Channel> {
        ComputeClient::new(unix_channel(&self.socket).await)
    }
}

fn in_project(name: &str, project: &str) -> CreateVmRequest {
    let mut spec = simulated_vm(name);
    spec.project = project.into();
    CreateVmRequest {
        spec: Some(spec),
        desired_state: DesiredState::Stopped as i32,
    }
}

/// A viewer calling each mutating RPC (every one the classification table marks mutating)
/// gets PERMISSION_DENIED, and each refusal is in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_is_refused_every_mutating_rpc_and_each_refusal_is_audited() {
    let cluster = Cluster::start(&[]);
    let viewer = cluster.user("vera", "viewer", None).await;
    let raw = as_user(cluster.port, &cluster.dir.path().join("user-vera"), "vera").await;
    let mutating: Vec<String> = fabric_controller::authz::RULES
        .iter()
        .filter(|(_, _, rule)| rule.mutates)
        .map(|(service, method, _)| format!("/{service}/{method}"))
        .collect();
    assert!(mutating.len() >= 14, "{mutating:?}");
    for path in &mutating {
        let mut grpc = tonic::client::Grpc::new(raw.clone());
        grpc.ready().await.expect("ready");
        let refused = grpc
            .unary(
                tonic::Request::new(()),
                path.parse().unwrap(),
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await
            .expect_err(path);
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{path}: {refused:?}"
        );
        assert!(
            refused.message().contains("needs role"),
            "{path}: {refused:?}"
        );
    }
    // A read is allowed.
    viewer
        .clone()
        .list_vms(ListVmsRequest::default())
        .await
        .expect("a viewer lists");
    // Every refusal is audited (the writer commits within a moment).
    let mut root = cluster.root().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = root
            .list_audit(ListAuditRequest {
                identity: "user/vera".into(),
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .entries;
        let missing: Vec<&String> = mutating
            .iter()
            .filter(|path| {
                !entries.iter().any(|e| {
                    &e.rpc == *path
                        && e.code == Code::PermissionDenied as i32
                        && e.roles == ["viewer"]
                        && e.time.is_some()
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not audited: {missing:?}; entries: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An admin's failed image deletion is audited with its target, outcome and digest.
    let out = cluster.fabricctl(&["image", "delete", "nope"]);
    assert!(!out.status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = root
            .list_audit(ListAuditRequest {
                identity: "user/admin".into(),
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .entries;
        if entries.iter().any(|e| {
            e.rpc == "/fabric.v1.Images/DeleteImage"
                && e.target == "image/nope"
                && e.code == Code::NotFound as i32
                && e.roles == ["admin"]
                && e.request_sha256.len() == 64
        }) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{entries:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The same through fabricctl audit.
    let text = cluster.ok(&["audit", "--user", "vera"]);
    assert!(text.contains("/fabric.v1.Compute/CreateVm"), "{text}");
    assert!(text.contains("PERMISSION_DENIED"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_are_isolated_and_quotas_name_the_quota() {
    let cluster = Cluster::start(&[]);
    let mut alice = cluster.user("alice", "operator", Some("p1")).await;
    let mut bob = cluster.user("bob", "operator", Some("p2")).await;
    let mut watcher = cluster.user("wendy", "viewer", None).await;

    // Bob watches from before anything happens.
    let mut bob_events = bob
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("bob watches")
        .into_inner();

    let a1 = alice
        .create_vm(in_project("a1", "p1"))
        .await
        .expect("alice creates in p1")
        .into_inner();
    assert_eq!(a1.spec.as_ref().unwrap().project, "p1");
    let b1 = bob
        .create_vm(in_project("b1", "p2"))
        .await
        .expect("bob creates in p2")
        .into_inner();
    // Alice may not create in p2 (or the default project).
    let refused = alice
        .create_vm(in_project("a2", "p2"))
        .await
        .expect_err("alice created in p2");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = alice
        .create_vm(in_project("a3", ""))
        .await
        .expect_err("alice created in default");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Lists are filtered; get, stop and delete of the other's VM are NOT_FOUND, worded as for
    // a VM that does not exist.
    let names = |vms: Vec<fabric_proto::v1::Vm>| {
        let mut n: Vec<String> = vms.into_iter().map(|v| v.spec.unwrap().name).collect();
        n.sort();
        n
    };
    let listed = alice.list_vms(ListVmsRequest::default()).await.unwrap();
    assert_eq!(names(listed.into_inner().vms), ["a1"]);
    let listed = bob.list_vms(ListVmsRequest::default()).await.unwrap();
    assert_eq!(names(listed.into_inner().vms), ["b1"]);
    let listed = watcher.list_vms(ListVmsRequest::default()).await.unwrap();
    assert_eq!(names(listed.into_inner().vms), ["a1", "b1"]);
    let nonexistent = alice
        .get_vm(GetVmRequest {
            id: "vm-0000000000000000".into(),
        })
        .await
        .expect_err("a VM that does not exist");
    let get = alice
        .get_vm(GetVmRequest { id: b1.id.clone() })
        .await
        .expect_err("alice got b1");
    assert_eq!(get.code(), Code::NotFound);
    assert_eq!(
        get.message().replace(&b1.id, "ID"),
        nonexistent.message().replace("vm-0000000000000000", "ID"),
        "existence leaks through the message"
    );
    let stop = alice
        .stop_vm(StopVmRequest { id: b1.id.clone() })
        .await
        .expect_err("alice stopped b1");
    assert_eq!(stop.code(), Code::NotFound, "{stop:?}");
    let delete = alice
        .delete_vm(DeleteVmRequest { id: b1.id.clone() })
        .await
        .expect_err("alice deleted b1");
    assert_eq!(delete.code(), Code::NotFound, "{delete:?}");
    let delete = bob
        .delete_vm(DeleteVmRequest { id: a1.id.clone() })
        .await
        .expect_err("bob deleted a1");
    assert_eq!(delete.code(), Code::NotFound, "{delete:?}");
    // A cluster-wide viewer sees both, and may change neither.
    watcher
        .get_vm(GetVmRequest { id: a1.id.clone() })
        .await
        .expect("the viewer sees a1");
    watcher
        .get_vm(GetVmRequest { id: b1.id.clone() })
        .await
        .expect("the viewer sees b1");
    // Alice's own VM: she may stop and delete it.
    alice
        .delete_vm(DeleteVmRequest { id: a1.id.clone() })
        .await
        .expect("alice deletes a1");

    // Bob's watch shows his VM's events and nothing of alice's.
    let mut seen = Vec::new();
    while let Ok(Some(Ok(event))) = tokio::time::timeout(
        Duration::from_millis(1500),
        tokio_stream::StreamExt::next(&mut bob_events),
    )
    .await
    {
        seen.push(event);
    }
    assert!(seen.iter().any(|e| e.vm_id == b1.id), "{seen:?}");
    assert!(
        seen.iter()
            .all(|e| e.vm_id != a1.id && !e.message.contains("VM a1")),
        "bob saw alice's VM: {seen:?}"
    );

    // The isolation refusals are audited as NOT_FOUND.
    let mut root = cluster.root().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries = root
        .list_audit(ListAuditRequest {
            identity: "user/alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    for rpc in ["StopVm", "DeleteVm"] {
        assert!(
            entries.iter().any(|e| e.rpc.ends_with(rpc)
                && e.code == Code::NotFound as i32
                && e.target == format!("vm/{}", b1.id)
                && e.project == "p2"
                && e.request_sha256.len() == 64),
            "{rpc} refusal not audited: {entries:?}"
        );
    }
    // Alice's delete is audited with its outcome OK.
    assert!(
        entries.iter().any(|e| e.rpc.ends_with("DeleteVm")
            && e.code == 0
            && e.target == format!("vm/{}", a1.id)),
        "{entries:?}"
    );

    // Quotas: p1 may have 2 vCPUs; a third is refused, naming the quota and the figures.
    cluster.ok(&[
        "project", "quota", "set", "p1", "--vcpus", "2", "--vms", "5",
    ]);
    let mut two = in_project("q1", "p1");
    two.spec.as_mut().unwrap().vcpus = 2;
    alice.create_vm(two).await.expect("within the quota");
    let refused = alice
        .create_vm(in_project("q2", "p1"))
        .await
        .expect_err("over the quota");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.message(),
        "project p1: 1 vCPUs requested, 2 of 2 in use (quota vcpus=2)"
    );
    let shown = cluster.ok(&["project", "quota", "get", "p1"]);
    assert!(shown.contains("vcpus 2 of 2"), "{shown}");
    // A viewer may not set quotas; the refusal says which role it takes.
    let out = Command::new(workspace_bin("fabricctl"))
        .args(["--controller", &format!("127.0.0.1:{}", cluster.port)])
        .arg("--tls-dir")
        .arg(cluster.dir.path().join("user-wendy"))
        .args([
            "--identity",
            "wendy",
            "project",
            "quota",
            "set",
            "p1",
            "--vcpus",
            "100",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // role list shows the bindings.
    let bindings = cluster.ok(&["role", "list"]);
    for want in [
        "alice", "operator", "p1", "bob", "p2", "wendy", "viewer", "admin",
    ] {
        assert!(bindings.contains(want), "{want}: {bindings}");
    }
}

/// `--audit-retention-entries` bounds the log: a flood of refused calls leaves at most that
/// many refusals in the store, and evicts no change (they are counted apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_stays_within_the_audit_retention() {
    let cluster = Cluster::start(&["--audit-retention-entries", "50"]);
    // A change made before the flood.
    cluster.ok(&[
        "role",
        "bind",
        "keeper",
        "--role",
        "viewer",
        "--project",
        "kp",
    ]);
    let nobody = {
        let out = cluster.dir.path().join("nobody");
        cluster.pki.user("nobody", &out, "1h");
        ComputeClient::new(as_user(cluster.port, &out, "nobody").await)
    };
    // `fabricctl audit --follow` prints entries as they come.
    let mut follower = std::process::Command::new(workspace_bin("fabricctl"))
        .args(["--controller", &format!("127.0.0.1:{}", cluster.port)])
        .arg("--tls-dir")
        .arg(&cluster.pki.dir)
        .args(["-o", "json", "audit", "--follow", "--user", "nobody"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let _ = nobody.clone().get_vm(GetVmRequest::default()).await;
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("audit --follow printed the refusal");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["identity"], "user/nobody", "{line}");
    assert_eq!(entry["rpc"], "/fabric.v1.Compute/GetVm", "{line}");
    assert_eq!(entry["code"], "PERMISSION_DENIED", "{line}");
    let _ = follower.kill();
    let _ = follower.wait();
    for _ in 0..400 {
        let refused = nobody
            .clone()
            .list_vms(ListVmsRequest::default())
            .await
            .expect_err("no binding, no call");
        assert_eq!(refused.code(), Code::PermissionDenied);
    }
    // Beyond its burst, nobody's refusals are counted: an entry says how many more.
    let mut root = cluster.root().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let entries = root
            .list_audit(ListAuditRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        if entries.iter().any(|e| {
            e.identity == "user/nobody"
                && e.rpc == "audit"
                && e.message.contains("more refused calls from user/nobody")
        }) {
            break entries;
        }
        assert!(std::time::Instant::now() < deadline, "{entries:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let refusals = entries.iter().filter(|e| e.code != 0).count();
    assert!(refusals <= 50, "{refusals} refusals kept");
    assert!(refusals >= 40, "{refusals} refusals kept");
    assert!(entries.len() <= 100, "{} entries kept", entries.len());
    assert!(entries.iter().any(|e| e.identity == "user/nobody"));
    assert!(
        entries
            .iter()
            .any(|e| e.rpc == "/fabric.v1.Compute/BindRole"
                && e.target == "user/keeper"
                && e.code == 0),
        "the change before the flood was evicted: {entries:?}"
    );
}

/// Pushes `bytes` as `name`'s `role` file, in `project` (empty: the server's default).
async fn push(
    channel: Channel,
    name: &str,
    project: &str,
    role: fabric_proto::v1::ImageFileRole,
    bytes: &[u8],
) -> Result<fabric_proto::v1::PushImageResponse, tonic::Status> {
    use fabric_proto::v1::images_client::ImagesClient;
    use fabric_proto::v1::push_image_request::Part;
    use fabric_proto::v1::{PushImageHeader, PushImageRequest};
    use sha2::Digest;
    let messages = vec![
        PushImageRequest {
            part: Some(Part::Header(PushImageHeader {
                image_name: name.into(),
                role: role as i32,
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
                size_bytes: bytes.len() as u64,
                file_name: "k.bin".into(),
                project: project.into(),
            })),
        },
        PushImageRequest {
            part: Some(Part::Data(bytes.to_vec())),
        },
    ];
    ImagesClient::new(channel)
        .push_image(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// An image belongs to the project it was first pushed in: an operator of another project
/// cannot replace its files (the kernel the owner's VMs boot), a cluster-wide image takes
/// pushes from cluster-wide operators only, and each refusal is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cannot_replace_another_projects_image() {
    use fabric_proto::v1::images_client::ImagesClient;
    use fabric_proto::v1::{ImageFileRole, ListImagesRequest};
    let cluster = Cluster::start(&[]);
    cluster.user("op1", "operator", Some("p1")).await;
    cluster.user("op2", "operator", Some("p2")).await;
    let op3 = cluster.user("op3", "operator", Some("p1")).await;
    drop(op3);
    cluster.ok(&[
        "role",
        "bind",
        "op3",
        "--role",
        "operator",
        "--project",
        "p2",
    ]);
    let channel = |name: &str| {
        let dir = cluster.dir.path().join(format!("user-{name}"));
        let name = name.to_string();
        let port = cluster.port;
        async move { as_user(port, &dir, &name).await }
    };
    let (op1, op2, op3) = (
        channel("op1").await,
        channel("op2").await,
        channel("op3").await,
    );
    let root = unix_channel(&cluster.socket).await;

    let pushed = push(op1.clone(), "base", "", ImageFileRole::Kernel, b"p1 kernel")
        .await
        .expect("op1 creates base");
    assert_eq!(pushed.image.unwrap().project, "p1");
    for asked in ["", "p1", "p2"] {
        let refused = push(op2.clone(), "base", asked, ImageFileRole::Kernel, b"evil")
            .await
            .expect_err("op2 replaces p1's kernel");
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{asked}: {refused:?}"
        );
        assert!(refused.message().contains("project p1"), "{refused:?}");
    }
    // Nor can op2 create an image in p1.
    let refused = push(op2.clone(), "other", "p1", ImageFileRole::Kernel, b"evil")
        .await
        .expect_err("op2 creates in p1");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // The owner may push again; op2's own image is p2's.
    push(
        op1.clone(),
        "base",
        "",
        ImageFileRole::Initramfs,
        b"p1 initramfs",
    )
    .await
    .expect("the owner pushes");
    let mine = push(op2.clone(), "mine", "", ImageFileRole::Kernel, b"p2 kernel")
        .await
        .expect("op2 creates its own");
    assert_eq!(mine.image.unwrap().project, "p2");
    // An operator of two projects names the new image's project.
    let refused = push(op3.clone(), "two", "", ImageFileRole::Kernel, b"x")
        .await
        .expect_err("which project?");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    push(op3.clone(), "two", "p2", ImageFileRole::Kernel, b"x")
        .await
        .expect("op3 names p2");
    // A cluster-wide image (root, no project) takes no push from a project operator.
    let shared = push(root.clone(), "shared", "", ImageFileRole::Kernel, b"shared")
        .await
        .expect("root creates a cluster-wide image");
    assert_eq!(shared.image.unwrap().project, "");
    let refused = push(op1.clone(), "shared", "", ImageFileRole::Kernel, b"evil")
        .await
        .expect_err("op1 replaces the cluster-wide image");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    push(
        root.clone(),
        "base",
        "",
        ImageFileRole::Kernel,
        b"root kernel",
    )
    .await
    .expect("a cluster-wide admin pushes to any image");

    // base's kernel is still one its owner or root pushed, never op2's.
    let images = ImagesClient::new(op2.clone())
        .list_images(ListImagesRequest {
            name: "base".into(),
        })
        .await
        .expect("reads stay open")
        .into_inner()
        .images;
    let kernel = images[0]
        .files
        .iter()
        .find(|f| f.role() == ImageFileRole::Kernel)
        .unwrap();
    use sha2::Digest;
    assert_eq!(
        kernel.sha256,
        hex::encode(sha2::Sha256::digest(b"root kernel"))
    );
    assert_eq!(images[0].project, "p1");

    // Every refusal of op2 is in the audit log.
    let mut root_compute = cluster.root().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = root_compute
            .list_audit(ListAuditRequest {
                identity: "user/op2".into(),
                page_size: 5000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        let refused = entries
            .iter()
            .filter(|e| {
                e.rpc == "/fabric.v1.Images/PushImage" && e.code == Code::PermissionDenied as i32
            })
            .count();
        if refused == 4 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{entries:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next event of `stream` within 10 s (None: the stream ended; Err: it ended with one).
async fn next_event(
    stream: &mut tonic::Streaming<fabric_proto::v1::Event>,
) -> Result<Option<fabric_proto::v1::Event>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event or the stream's end within 10 s")
}

/// A project-scoped watcher gets the deletion of its project's VM, also when the VM was
/// created before it started watching (the deletion is filtered by the project the event
/// carries, not by a look-up of a VM that is gone), and nothing of another project's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_watcher_sees_its_vms_deletion_and_nothing_of_others() {
    use fabric_proto::v1::EventKind;
    let cluster = Cluster::start(&[]);
    let mut viewer = cluster.user("pam", "viewer", Some("p1")).await;
    let mut root = cluster.root().await;
    let other = root
        .create_vm(in_project("other", "p2"))
        .await
        .unwrap()
        .into_inner();
    let mine = root
        .create_vm(in_project("mine", "p1"))
        .await
        .unwrap()
        .into_inner();
    let mut events = viewer
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("pam watches")
        .into_inner();
    for vm in [&other, &mine] {
        root.delete_vm(DeleteVmRequest { id: vm.id.clone() })
            .await
            .unwrap();
    }
    loop {
        let event = next_event(&mut events)
            .await
            .expect("the stream goes on")
            .expect("the stream goes on");
        assert_ne!(event.vm_id, other.id, "another project's event: {event:?}");
        if event.kind() == EventKind::VmDeleted {
            assert_eq!(event.vm_id, mine.id, "{event:?}");
            break;
        }
    }
}

/// An open event stream follows its caller's role bindings: unbound, the caller's stream
/// ends with PERMISSION_DENIED (audited) and carries nothing of what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbound_watchers_stream_ends_with_permission_denied() {
    use fabric_proto::v1::EventKind;
    let cluster = Cluster::start(&[]);
    let mut viewer = cluster.user("vic", "viewer", Some("p1")).await;
    let mut root = cluster.root().await;
    let mut events = viewer
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("vic watches")
        .into_inner();
    let first = root
        .create_vm(in_project("first", "p1"))
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = next_event(&mut events).await.unwrap().unwrap();
        if (event.kind(), &event.vm_id) == (EventKind::VmCreated, &first.id) {
            break;
        }
    }

    // Another binding of vic's elsewhere changes nothing for this stream.
    cluster.ok(&["role", "bind", "vic", "--role", "viewer", "--project", "p9"]);
    cluster.ok(&[
        "role",
        "unbind",
        "vic",
        "--role",
        "viewer",
        "--project",
        "p1",
    ]);
    // vic still views p9: a VM of p1 is no longer shown, one of p9 is.
    let hidden = root
        .create_vm(in_project("hidden", "p1"))
        .await
        .unwrap()
        .into_inner();
    let shown = root
        .create_vm(in_project("shown", "p9"))
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = next_event(&mut events).await.unwrap().unwrap();
        assert_ne!(event.vm_id, hidden.id, "{event:?}");
        if event.vm_id == shown.id {
            break;
        }
    }

    cluster.ok(&[
        "role",
        "unbind",
        "vic",
        "--role",
        "viewer",
        "--project",
        "p9",
    ]);
    let after = root
        .create_vm(in_project("after", "p9"))
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match next_event(&mut events).await {
            Ok(Some(event)) => assert_ne!(event.vm_id, after.id, "{event:?}"),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = root
            .list_audit(ListAuditRequest {
                identity: "user/vic".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        if entries.iter().any(|e| {
            e.rpc == "/fabric.v1.Compute/WatchEvents" && e.code == Code::PermissionDenied as i32
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{entries:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One identity holds at most MAX_EVENT_WATCHERS_PER_CALLER streams: the next is refused
/// naming the limit, another user still watches, and a closed stream frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_take_every_event_watcher_slot() {
    let per_caller = fabric_controller::compute::MAX_EVENT_WATCHERS_PER_CALLER;
    assert!(per_caller < fabric_controller::compute::MAX_EVENT_WATCHERS);
    let cluster = Cluster::start(&[]);
    let greedy = cluster.user("greedy", "viewer", None).await;
    let mut other = cluster.user("other", "viewer", None).await;
    let mut held = Vec::new();
    for _ in 0..per_caller {
        held.push(
            greedy
                .clone()
                .watch_events(WatchEventsRequest::default())
                .await
                .expect("within the cap")
                .into_inner(),
        );
    }
    for _ in 0..3 {
        let refused = greedy
            .clone()
            .watch_events(WatchEventsRequest::default())
            .await
            .expect_err("over the cap");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused
                .message()
                .contains(&format!("{per_caller} event watchers")),
            "{refused:?}"
        );
    }
    other
        .watch_events(WatchEventsRequest::default())
        .await
        .expect("another user still watches");
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match greedy
            .clone()
            .watch_events(WatchEventsRequest::default())
            .await
        {
            Ok(stream) => {
                held.push(stream.into_inner());
                break;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        assert!(std::time::Instant::now() < deadline, "the slot came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
