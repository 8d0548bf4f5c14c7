//! Trust (issue 16) against a real fabric-controller: its TCP listener speaks mutual TLS only,
//! with certificates made by `fabricctl pki`; a caller's certificate decides what it may call,
//! and a host's certificate acts for that host only.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fabric_proto::tls::TlsFiles;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::host_link_client::HostLinkClient;
use fabric_proto::v1::images_client::ImagesClient;
use fabric_proto::v1::{
    HeartbeatRequest, ListVmsRequest, PullImageRequest, RegisterHostRequest,
    WatchAssignmentsRequest,
};
use fabric_test_support::cluster::{controller_command, unix_channel, workspace_bin};
use fabric_test_support::hostlink::registration;
use fabric_test_support::pki::{free_port, Pki};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

async fn tls_channel(port: u16, tls: ClientTlsConfig) -> Result<Channel, String> {
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn as_identity(port: u16, dir: &Path, name: &str) -> Channel {
    let config = TlsFiles::in_dir(dir, name).client_config().unwrap();
    tls_channel(port, config).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_who_their_certificates_say_and_act_only_as_that() {
    fabric_proto::tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "trust", &["127.0.0.1"]);

    // No --tls-dir: a TCP listener is refused at start, saying why.
    let port = free_port();
    let out = controller_command(
        &workspace_bin("fabric-controller"),
        &dir.path().join("plain.sock"),
        &dir.path().join("plain"),
    )
    .args(["--listen", &format!("127.0.0.1:{port}")])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mutual TLS only"), "{stderr}");

    let (_controller, socket) = pki.controller(dir.path(), port, &[]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the Unix socket is root's only");

    // fabricctl over TCP with the admin's certificate; without one it is refused.
    let fabricctl = |args: &[&str]| {
        Command::new(workspace_bin("fabricctl"))
            .args(["--controller", &format!("127.0.0.1:{port}")])
            .args(args)
            .output()
            .unwrap()
    };
    let out = fabricctl(&["--tls-dir", pki.dir.to_str().unwrap(), "host", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fabricctl(&["host", "list"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a client certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No client certificate: through the handshake (to join with a token), but every other
    // call is refused UNAUTHENTICATED, saying why.
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read_to_string(pki.dir.join("ca.pem")).unwrap(),
        ))
        .domain_name(fabric_proto::tls::CONTROLLER_DNS_NAME);
    let channel = tls_channel(port, anonymous)
        .await
        .expect("an anonymous handshake");
    let refused = ComputeClient::new(channel.clone())
        .list_vms(ListVmsRequest::default())
        .await
        .expect_err("served without a certificate");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no client certificate"),
        "{refused:?}"
    );
    let refused = HostLinkClient::new(channel)
        .register_host(registration("anonymous"))
        .await
        .expect_err("an anonymous registration");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // Plain HTTP/2 to the TLS port: no answer either.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(ComputeClient::new(channel)
            .list_vms(ListVmsRequest::default())
            .await
            .is_err());
    }
    // An expired certificate.
    let expired = pki.user("late", &dir.path().join("late"), "1s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = TlsFiles::in_dir(&expired, "late").client_config().unwrap();
    if let Ok(channel) = tls_channel(port, late).await {
        assert!(
            ComputeClient::new(channel)
                .list_vms(ListVmsRequest::default())
                .await
                .is_err(),
            "served with an expired certificate"
        );
    }

    // Host a registers as itself, not as b; a user may not call HostLink; a host may not call
    // Compute.
    let a_dir = pki.host("trust-a", &dir.path().join("a"));
    let mut as_a = HostLinkClient::new(as_identity(port, &a_dir, "host").await);
    let a = as_a
        .register_host(registration("trust-a"))
        .await
        .expect("a registers as itself")
        .into_inner();
    let refused = as_a
        .register_host(registration("trust-b"))
        .await
        .expect_err("a registered as b");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("host/trust-a may not act as host \"trust-b\""),
        "{refused:?}"
    );
    // b's certificate presenting a's machine id must not rename a's record and take its VMs.
    let b_dir = pki.host("trust-b", &dir.path().join("b"));
    let refused = HostLinkClient::new(as_identity(port, &b_dir, "host").await)
        .register_host(RegisterHostRequest {
            machine_id: "machine-trust-a".into(),
            ..registration("trust-b")
        })
        .await
        .expect_err("b took a's record");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // b exists (registered by root on the Unix socket); a may not heartbeat or watch for it.
    let b = HostLinkClient::new(unix_channel(&socket).await)
        .register_host(registration("trust-b"))
        .await
        .expect("local-root registers b")
        .into_inner();
    let refused = as_a
        .heartbeat(HeartbeatRequest {
            host_id: b.host_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("a heartbeat for b");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = as_a
        .watch_assignments(WatchAssignmentsRequest {
            host_id: b.host_id.clone(),
            session: 0,
        })
        .await
        .expect_err("a watched b's assignments");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    as_a.heartbeat(HeartbeatRequest {
        host_id: a.host_id.clone(),
        session: a.session,
        ..Default::default()
    })
    .await
    .expect("a heartbeats for itself");
    let refused = ComputeClient::new(as_identity(port, &a_dir, "host").await)
        .list_vms(ListVmsRequest::default())
        .await
        .expect_err("a host listed VMs");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let ops = pki.user("ops", &dir.path().join("ops"), "1h");
    let refused = HostLinkClient::new(as_identity(port, &ops, "ops").await)
        .register_host(registration("ops"))
        .await
        .expect_err("a user registered a host");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Without a role binding a user calls nothing; with one it may.
    let refused = ComputeClient::new(as_identity(port, &ops, "ops").await)
        .list_vms(ListVmsRequest::default())
        .await
        .expect_err("a user without a role listed VMs");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    ComputeClient::new(unix_channel(&socket).await)
        .bind_role(fabric_proto::v1::BindRoleRequest {
            binding: Some(fabric_proto::v1::RoleBinding {
                user: "ops".into(),
                role: fabric_proto::v1::Role::Viewer as i32,
                project: String::new(),
            }),
        })
        .await
        .expect("local-root binds a role");
    ComputeClient::new(as_identity(port, &ops, "ops").await)
        .list_vms(ListVmsRequest::default())
        .await
        .expect("a viewer lists VMs");

    // A host pulls only the image files of its own VMs: a file that exists but that no VM
    // of host a uses is NOT_FOUND to a, as a missing one is; root pulls it.
    let file = dir.path().join("kernel.bin");
    std::fs::write(&file, b"not really a kernel, but bytes to pull").unwrap();
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(&file).unwrap(),
    ));
    let out = Command::new(workspace_bin("fabricctl"))
        .args(["--controller", &format!("unix:{}", socket.display())])
        .args(["image", "push"])
        .arg(&file)
        .args(["--name", "other", "--role", "kernel"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pull = |channel: Channel| {
        let sha256 = sha256.clone();
        async move {
            let mut stream = ImagesClient::new(channel)
                .pull_image(PullImageRequest { sha256, offset: 0 })
                .await?
                .into_inner();
            stream.message().await.map(|_| ())
        }
    };
    let refused = pull(as_identity(port, &a_dir, "host").await)
        .await
        .expect_err("a pulled an image none of its VMs uses");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    pull(unix_channel(&socket).await)
        .await
        .expect("root pulls any image");

    // Each refusal of host a acting as b, and of its pull, is in the audit log.
    let expected = [
        (
            "/fabric.v1.HostLink/RegisterHost",
            "host/trust-b",
            tonic::Code::PermissionDenied,
        ),
        (
            "/fabric.v1.HostLink/Heartbeat",
            "host/trust-b",
            tonic::Code::PermissionDenied,
        ),
        (
            "/fabric.v1.HostLink/WatchAssignments",
            "host/trust-b",
            tonic::Code::PermissionDenied,
        ),
        (
            "/fabric.v1.Images/PullImage",
            "sha256/",
            tonic::Code::NotFound,
        ),
    ];
    let mut audit = ComputeClient::new(unix_channel(&socket).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = audit
            .list_audit(fabric_proto::v1::ListAuditRequest {
                identity: "host/trust-a".into(),
                page_size: 5000,
                ..Default::default()
            })
            .await
            .expect("the audit log")
            .into_inner()
            .entries;
        let missing: Vec<_> = expected
            .iter()
            .filter(|(rpc, target, code)| {
                !entries.iter().any(|e| {
                    e.rpc == *rpc && e.target.starts_with(target) && e.code == *code as i32
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not audited: {missing:?}\nentries of host/trust-a: {entries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `fabricctl host revoke NAME`: the host's calls are refused from then on, so its lease ends
/// and, once it is DEAD, its VM runs on the other host; it cannot register again (it stays
/// DEAD while its agent keeps trying) until it is reinstated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_host_is_fenced_and_its_vms_run_elsewhere() {
    use fabric_proto::v1::{GetHostRequest, HostState, RevokeHostRequest};
    use fabric_test_support::cluster::{Controller, SimHost, SimHostSpec, Timing};
    use fabric_test_support::compute::{create_vm, eventually, ready_hosts, running_placement};
    fabric_proto::tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "revoke", &["127.0.0.1"]);
    let port = free_port();
    let controller = Controller::start_with_args(
        &dir.path().join("controller"),
        Timing::default(),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls-dir",
            pki.dir.to_str().unwrap(),
        ],
    );
    let address = format!("https://127.0.0.1:{port}");
    let mut hosts = Vec::new();
    for name in ["revoke-h1", "revoke-h2"] {
        let tls = pki.host(name, &dir.path().join(format!("{name}-tls")));
        hosts.push(SimHost::start_spec(
            &dir.path().join(name),
            &address,
            &SimHostSpec::new(name, 0, 0).with_tls(&tls),
        ));
    }
    let mut client = controller.compute().await;
    let ids = ready_hosts(&client, 2, Duration::from_secs(30)).await;
    let vm = create_vm(
        &client,
        fabric_test_support::vmspec::simulated_vm("revoked-web"),
    )
    .await
    .expect("create");
    let placement = eventually(Duration::from_secs(30), "the VM running", || {
        let (client, ids) = (client.clone(), vec![vm.clone()]);
        async move { running_placement(&client, &ids).await }
    })
    .await;
    let first = placement[&vm].clone();
    let name = ids
        .iter()
        .find(|(_, id)| **id == first)
        .map(|(name, _)| name.clone())
        .unwrap();

    // An assignment stream the host holds open is ended by the revocation.
    let host_tls = dir.path().join(format!("{name}-tls"));
    let mut open_stream = HostLinkClient::new(as_identity(port, &host_tls, "host").await)
        .watch_assignments(WatchAssignmentsRequest {
            host_id: first.clone(),
            session: 0,
        })
        .await
        .expect("the host watches its assignments")
        .into_inner();
    // A user's certificate without the admin role may not revoke.
    let ops = pki.user("ops", &dir.path().join("ops"), "1h");
    let refused = ComputeClient::new(as_identity(port, &ops, "ops").await)
        .revoke_host(RevokeHostRequest {
            name: name.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("a user revoked a host");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // A join token made for the host before its revocation goes with it.
    let token = client
        .create_join_token(fabric_proto::v1::CreateJoinTokenRequest {
            host_name: name.clone(),
            ttl_seconds: 600,
        })
        .await
        .expect("a join token")
        .into_inner();
    let revoked = client
        .revoke_host(RevokeHostRequest {
            name: name.clone(),
            reason: "stolen disk".into(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert!(revoked.newly_revoked);
    // The revocation is in the audit log (committed with it), as is the user's refusal.
    let audit = client
        .list_audit(fabric_proto::v1::ListAuditRequest::default())
        .await
        .expect("audit")
        .into_inner()
        .entries;
    assert!(
        audit
            .iter()
            .any(|e| e.rpc == "/fabric.v1.Compute/RevokeHost"
                && e.identity == "local-root"
                && e.code == 0
                && e.target == format!("host-name/{name}")
                && e.request_sha256.len() == 64),
        "{audit:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match open_stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the open assignment stream went on after the revocation");
    assert!(
        matches!(&ended, Err(s) if s.code() == tonic::Code::PermissionDenied),
        "{ended:?}"
    );
    eventually(Duration::from_secs(60), "the VM running elsewhere", || {
        let (client, ids, first) = (client.clone(), vec![vm.clone()], first.clone());
        async move {
            let placement = running_placement(&client, &ids).await?;
            (placement.values().all(|host| *host != first)).then_some(())
        }
    })
    .await;
    let state = |client: &mut ComputeClient<Channel>| {
        let (mut client, id) = (client.clone(), first.clone());
        async move {
            client
                .get_host(GetHostRequest { id })
                .await
                .unwrap()
                .into_inner()
                .state()
        }
    };
    assert_eq!(state(&mut client).await, HostState::Dead);
    // Its agent keeps trying; it stays out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state(&mut client).await, HostState::Dead);
    let log = std::fs::read_to_string(dir.path().join(&name).join("agent.log")).unwrap();
    assert!(log.contains("revoked"), "the agent was not told why");

    let tokens = client
        .list_join_tokens(fabric_proto::v1::ListJoinTokensRequest {})
        .await
        .expect("tokens")
        .into_inner()
        .tokens;
    let before = token
        .info
        .as_ref()
        .map(|t| t.id.clone())
        .unwrap_or_default();
    assert!(
        tokens.iter().all(|t| t.id != before),
        "the revoked host's token outlived the revocation: {tokens:?}"
    );

    client
        .reinstate_host(fabric_proto::v1::ReinstateHostRequest { name: name.clone() })
        .await
        .expect("reinstate");
    // Its certificate from before the revocation (a stolen key's, for all the controller
    // knows) is refused still: the host stays out until it has a new one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state(&mut client).await, HostState::Dead);
    let refused = HostLinkClient::new(as_identity(port, &host_tls, "host").await)
        .heartbeat(HeartbeatRequest {
            host_id: first.clone(),
            ..Default::default()
        })
        .await
        .expect_err("an old certificate served after the reinstatement");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("reinstated"), "{refused:?}");
    // With a certificate issued now, it comes back.
    let index = hosts.iter().position(|h| h.name == name).unwrap();
    hosts[index].process.kill9();
    pki.host(&name, &host_tls);
    hosts[index] = SimHost::start_spec(
        &dir.path().join(&name),
        &address,
        &SimHostSpec::new(&name, 0, 0).with_tls(&host_tls),
    );
    eventually(Duration::from_secs(30), "the host back", || {
        let mut client = client.clone();
        async move { (state(&mut client).await == HostState::Ready).then_some(()) }
    })
    .await;
}

/// `--bootstrap-admin NAME` binds NAME once per store: an admin's `role unbind` of it stands
/// when the controller restarts with the same flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_admin_is_bound_once() {
    fabric_proto::tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "bootstrap", &["127.0.0.1"]);
    let port = free_port();
    let admin = |port: u16| {
        let dir = pki.dir.clone();
        async move { ComputeClient::new(as_identity(port, &dir, "admin").await) }
    };
    let (controller, socket) = pki.controller(dir.path(), port, &[]);
    admin(port)
        .await
        .list_vms(ListVmsRequest::default())
        .await
        .expect("the bootstrap admin is bound");
    ComputeClient::new(unix_channel(&socket).await)
        .unbind_role(fabric_proto::v1::UnbindRoleRequest {
            binding: Some(fabric_proto::v1::RoleBinding {
                user: "admin".into(),
                role: fabric_proto::v1::Role::Admin as i32,
                project: String::new(),
            }),
        })
        .await
        .expect("root unbinds the admin");
    drop(controller);
    let (_controller, _socket) = pki.controller(dir.path(), port, &[]);
    let refused = admin(port)
        .await
        .list_vms(ListVmsRequest::default())
        .await
        .expect_err("the restart bound the admin again");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}
