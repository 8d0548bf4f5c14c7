//! Hosts join with one-time tokens and renew their certificates (issue 16), against a real
//! fabric-controller on loopback with mutual TLS: the refusals of every bad token, an agent
//! that starts with only the cluster's ca.pem and a token, and certificates of seconds that
//! renew while the host stays Ready. (A real guest kept running through renewals:
//! tests/e2e_renewal.rs.)

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fabric_proto::tls::{self, Identity, TlsFiles};
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::host_link_client::HostLinkClient;
use fabric_proto::v1::{
    CreateJoinTokenRequest, JoinHostRequest, ListVmsRequest, RenewCertificateRequest,
};
use fabric_test_support::cluster::{unix_channel, workspace_bin, Controller, Timing};
use fabric_test_support::hostlink::registration;
use fabric_test_support::pki::Pki;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn channel(port: u16, tls: ClientTlsConfig) -> Channel {
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// A HostLink client without a client certificate, trusting the cluster CA of `dir`.
fn anonymous(port: u16, dir: &Path) -> HostLinkClient<Channel> {
    let config = TlsFiles::in_dir(dir, "controller")
        .anonymous_client_config()
        .unwrap();
    HostLinkClient::new(channel(port, config))
}

fn as_identity(port: u16, dir: &Path, name: &str) -> Channel {
    channel(port, TlsFiles::in_dir(dir, name).client_config().unwrap())
}

/// JoinHost with a new key's CSR: the certificate and the key, or the refusal.
async fn join(
    client: &mut HostLinkClient<Channel>,
    token: &str,
    name: &str,
) -> Result<(String, String), tonic::Status> {
    let (csr_pem, key_pem) = tls::new_csr().unwrap();
    // The listener may still be starting: only UNAVAILABLE is retried.
    for _ in 0..50 {
        let result = client
            .join_host(JoinHostRequest {
                token: token.to_string(),
                host_name: name.to_string(),
                csr_pem: csr_pem.clone(),
            })
            .await;
        match result {
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other.map(|r| (r.into_inner().certificate_pem, key_pem)),
        }
    }
    panic!("the controller never answered JoinHost");
}

async fn create_token(
    client: &mut ComputeClient<Channel>,
    name: &str,
    ttl_seconds: u64,
) -> Result<String, tonic::Status> {
    client
        .create_join_token(CreateJoinTokenRequest {
            host_name: name.to_string(),
            ttl_seconds,
        })
        .await
        .map(|r| r.into_inner().token)
}

fn expect_refused(result: Result<(String, String), tonic::Status>, code: Code, text: &str) {
    match result {
        Ok(_) => panic!("a certificate was issued; expected {code:?} ({text})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(text), "{status:?}");
        }
    }
}

fn fabricctl(args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("fabricctl"))
        .args(args)
        .output()
        .expect("run fabricctl")
}

fn tls_controller(dir: &Path, pki_dir: &Path, port: u16, extra: &[&str]) -> Controller {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--tls-dir",
        pki_dir.to_str().unwrap(),
        "--bootstrap-admin",
        "admin",
    ];
    args.extend(extra);
    Controller::start_with_args(dir, Timing::default(), &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_scoped_to_a_name_and_expire() {
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "joins", &["127.0.0.1"]);
    let port = free_port();
    let controller = tls_controller(
        &dir.path().join("controller"),
        &pki.dir,
        port,
        &["--host-cert-ttl", "1h"],
    );
    let mut root = controller.compute().await;
    let mut anon = anonymous(port, &pki.dir);

    // No token, a malformed one: UNAUTHENTICATED, no certificate.
    expect_refused(
        join(&mut anon, "", "join-a").await,
        Code::Unauthenticated,
        "a join token is required",
    );
    expect_refused(
        join(&mut anon, "fabric-join.zz.yy", "join-a").await,
        Code::Unauthenticated,
        "not a join token",
    );

    // A token for join-a, made by root on the Unix socket with fabricctl.
    let socket = format!("unix:{}", controller.socket.display());
    let out = fabricctl(&[
        "--controller",
        &socket,
        "host",
        "token",
        "create",
        "--name",
        "join-a",
        "--ttl",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_a = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token_a.starts_with("fabric-join."), "{token_a}");
    let secret_a = token_a.rsplit('.').next().unwrap().to_string();

    // A wrong secret for a real id; an unknown id.
    let mut wrong = token_a.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    expect_refused(
        join(&mut anon, &wrong, "join-a").await,
        Code::Unauthenticated,
        "unknown token or wrong secret",
    );
    expect_refused(
        join(
            &mut anon,
            &format!("fabric-join.0000000000000000.{secret_a}"),
            "join-a",
        )
        .await,
        Code::Unauthenticated,
        "unknown token or wrong secret",
    );
    // A's token cannot get B's certificate (and is not spent by trying).
    expect_refused(
        join(&mut anon, &token_a, "join-b").await,
        Code::PermissionDenied,
        "the join token is for host \"join-a\", not \"join-b\"",
    );
    // A CSR that is not one spends nothing either.
    let refused = anon
        .join_host(JoinHostRequest {
            token: token_a.clone(),
            host_name: "join-a".into(),
            csr_pem: "not a CSR".into(),
        })
        .await
        .expect_err("a certificate for garbage");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = anon
        .join_host(JoinHostRequest {
            token: token_a.clone(),
            host_name: "join-a".into(),
            csr_pem: "x".repeat(tls::MAX_CSR_PEM + 1),
        })
        .await
        .expect_err("an oversized CSR");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // The right name: the certificate of host/join-a, whatever the CSR says.
    let (cert, key) = join(&mut anon, &token_a, "join-a")
        .await
        .expect("join-a joins");
    assert_eq!(
        tls::identity_of_pem(&cert, "joins"),
        Ok(Identity::Host("join-a".into()))
    );
    let (from, to) = tls::validity(&cert).unwrap();
    let lifetime = to.duration_since(from).unwrap();
    assert!(
        lifetime >= Duration::from_secs(3600) && lifetime <= Duration::from_secs(3700),
        "{lifetime:?}"
    );
    // Used once: refused the second time.
    expect_refused(
        join(&mut anon, &token_a, "join-a").await,
        Code::Unauthenticated,
        "already used",
    );

    // The certificate works: join-a registers as itself over mutual TLS.
    let host_dir = dir.path().join("join-a");
    std::fs::create_dir_all(&host_dir).unwrap();
    let files = TlsFiles::in_dir(&host_dir, "host");
    std::fs::copy(pki.dir.join("ca.pem"), &files.ca).unwrap();
    std::fs::write(&files.cert, &cert).unwrap();
    tls::write_private(&files.key, &key).unwrap();
    let mut as_a = HostLinkClient::new(as_identity(port, &host_dir, "host"));
    as_a.register_host(registration("join-a"))
        .await
        .expect("join-a registers with its joined certificate");
    // ... and renews its own certificate (a new key); the renewed one is for join-a too.
    let (csr, _) = tls::new_csr().unwrap();
    let renewed = as_a
        .renew_certificate(RenewCertificateRequest { csr_pem: csr })
        .await
        .expect("renew")
        .into_inner()
        .certificate_pem;
    assert_eq!(
        tls::identity_of_pem(&renewed, "joins"),
        Ok(Identity::Host("join-a".into()))
    );
    assert_ne!(renewed, cert);
    // ... but not again at once: renewals are spaced (a tenth of the lifetime, ≤ 1 min).
    let (csr, _) = tls::new_csr().unwrap();
    let refused = as_a
        .renew_certificate(RenewCertificateRequest { csr_pem: csr })
        .await
        .expect_err("renewed twice in a row");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // An expired token: refused, and removed.
    let short = create_token(&mut root, "join-c", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expect_refused(
        join(&mut anon, &short, "join-c").await,
        Code::Unauthenticated,
        "expired",
    );
    expect_refused(
        join(&mut anon, &short, "join-c").await,
        Code::Unauthenticated,
        "unknown token",
    );

    // A user (the admin's certificate, over TCP) makes tokens too; a ttl over 7 days and a
    // bad name are refused; a host may not make one.
    let mut admin = ComputeClient::new(as_identity(port, &pki.dir, "admin"));
    let token_b = create_token(&mut admin, "join-b", 600).await.unwrap();
    let refused = create_token(&mut admin, "join-b", 7 * 86_400 + 1)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = create_token(&mut admin, "Not_A_Name", 60)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = create_token(
        &mut ComputeClient::new(as_identity(port, &host_dir, "host")),
        "x",
        60,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Without a certificate, nothing but JoinHost: UNAUTHENTICATED, saying why.
    let refused = anon
        .register_host(registration("join-b"))
        .await
        .expect_err("an anonymous registration");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no client certificate"),
        "{refused:?}"
    );
    let (csr, _) = tls::new_csr().unwrap();
    let refused = anon
        .renew_certificate(RenewCertificateRequest {
            csr_pem: csr.clone(),
        })
        .await
        .expect_err("an anonymous renewal");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let config = TlsFiles::in_dir(&pki.dir, "controller")
        .anonymous_client_config()
        .unwrap();
    let refused = ComputeClient::new(channel(port, config.clone()))
        .list_vms(ListVmsRequest::default())
        .await
        .expect_err("anonymous listed VMs");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = ComputeClient::new(channel(port, config))
        .create_join_token(CreateJoinTokenRequest {
            host_name: "evil".into(),
            ttl_seconds: 60,
        })
        .await
        .expect_err("anonymous made a token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A user and root cannot renew a host certificate (users are refused HostLink; root
    // has no host identity).
    let refused = HostLinkClient::new(as_identity(port, &pki.dir, "admin"))
        .renew_certificate(RenewCertificateRequest {
            csr_pem: csr.clone(),
        })
        .await
        .expect_err("a user renewed");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = HostLinkClient::new(unix_channel(&controller.socket).await)
        .renew_certificate(RenewCertificateRequest { csr_pem: csr })
        .await
        .expect_err("root renewed a host certificate");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A revoked host can neither get a token nor use one made before: the revocation
    // deleted its tokens.
    root.revoke_host(fabric_proto::v1::RevokeHostRequest {
        name: "join-b".into(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    expect_refused(
        join(&mut anon, &token_b, "join-b").await,
        Code::Unauthenticated,
        "unknown token",
    );
    let refused = create_token(&mut root, "join-b", 60).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // The list: names and expiry, never a secret.
    let out = fabricctl(&[
        "--controller",
        &socket,
        "host",
        "token",
        "list",
        "-o",
        "json",
    ]);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("join-a") && !listed.contains("join-b"),
        "{listed}"
    );
    assert!(!listed.contains(&secret_a), "a secret was listed: {listed}");
    assert!(
        !listed.contains("join-c"),
        "the expired token was listed: {listed}"
    );
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let used = json
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["host_name"] == "join-a")
        .unwrap();
    assert!(used["used_at"].is_string(), "{used}");
    // The store keeps only the hash: the secret is nowhere in the controller's files.
    drop(controller);
    let store = std::fs::read(dir.path().join("controller/data/store.redb")).unwrap();
    assert!(
        !store
            .windows(secret_a.len())
            .any(|w| w == secret_a.as_bytes()),
        "the token's secret is in the store"
    );
}

/// Without a client certificate, every method of every service the controller serves (and
/// those it does not) is refused UNAUTHENTICATED, before any handler reads the request; only
/// JoinHost reaches its handler, which wants a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_but_join_refuses_a_caller_without_a_certificate() {
    use prost::Message;
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "anon", &["127.0.0.1"]);
    let port = free_port();
    let _controller = tls_controller(&dir.path().join("controller"), &pki.dir, port, &[]);
    let config = TlsFiles::in_dir(&pki.dir, "controller")
        .anonymous_client_config()
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel(port, config));
    let set = prost_types::FileDescriptorSet::decode(fabric_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut paths: Vec<String> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    format!("/{}.{}/{}", file.package(), service.name(), method.name())
                })
            })
        })
        .collect();
    paths.extend([
        "/grpc.health.v1.Health/Check".to_string(),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_string(),
        "/fabric.v1.Nothing/Here".to_string(),
    ]);
    assert!(paths.len() > 30, "{paths:?}");
    for path in &paths {
        let mut refused = None;
        for _ in 0..50 {
            // The listener may still be starting: wait for it.
            if tokio::time::timeout(Duration::from_secs(5), grpc.ready())
                .await
                .is_ok_and(|r| r.is_ok())
            {
                let result = grpc
                    .unary(
                        tonic::Request::new(()),
                        tonic::codegen::http::uri::PathAndQuery::from_maybe_shared(path.clone())
                            .unwrap(),
                        tonic_prost::ProstCodec::<(), ()>::default(),
                    )
                    .await;
                match result {
                    Err(status) if status.code() == Code::Unavailable => {}
                    other => {
                        refused = Some(other);
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let status = match refused {
            Some(Err(status)) => status,
            other => panic!("{path}: served without a certificate: {other:?}"),
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{path}: {status:?}");
        let why = if path == "/fabric.v1.HostLink/JoinHost" {
            "a join token is required"
        } else {
            "no client certificate"
        };
        assert!(status.message().contains(why), "{path}: {status:?}");
    }
}

/// A certificate that expires while its connection stays open: the handshake checked it,
/// but the calls made after its expiry are refused, so a host that failed to renew cannot go
/// on over an old connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_refused_once_its_certificate_expired() {
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "expiry", &["127.0.0.1"]);
    let port = free_port();
    let controller = tls_controller(
        &dir.path().join("controller"),
        &pki.dir,
        port,
        &["--host-cert-ttl", "3s"],
    );
    let mut root = controller.compute().await;
    let token = create_token(&mut root, "short-1", 60).await.unwrap();
    let (cert, key) = join(&mut anonymous(port, &pki.dir), &token, "short-1")
        .await
        .expect("join");
    let host_dir = dir.path().join("short-1");
    std::fs::create_dir_all(&host_dir).unwrap();
    let files = TlsFiles::in_dir(&host_dir, "host");
    std::fs::copy(pki.dir.join("ca.pem"), &files.ca).unwrap();
    std::fs::write(&files.cert, &cert).unwrap();
    tls::write_private(&files.key, &key).unwrap();
    let (_, not_after) = tls::validity(&cert).unwrap();
    let mut client = HostLinkClient::new(as_identity(port, &host_dir, "host"));
    let registered = client
        .register_host(registration("short-1"))
        .await
        .expect("registers while valid")
        .into_inner();
    // Past its notAfter, the same channel (the same HTTP/2 connection) is refused.
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(300)).await;
    let refused = client
        .heartbeat(fabric_proto::v1::HeartbeatRequest {
            host_id: registered.host_id,
            session: registered.session,
            ..Default::default()
        })
        .await
        .expect_err("a heartbeat with an expired certificate");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("has expired"), "{refused:?}");
}

/// A controller without the CA key cannot sign: join says which file is missing. The number
/// of tokens is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_key_nothing_is_signed_and_tokens_are_bounded() {
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "nokey", &["127.0.0.1"]);
    let tls_dir = dir.path().join("controller-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    for file in ["ca.pem", "controller.pem", "controller-key.pem"] {
        std::fs::copy(pki.dir.join(file), tls_dir.join(file)).unwrap();
    }
    let port = free_port();
    let controller = tls_controller(&dir.path().join("controller"), &tls_dir, port, &[]);
    let mut root = controller.compute().await;
    let token = create_token(&mut root, "nokey-a", 600).await.unwrap();
    let mut anon = anonymous(port, &tls_dir);
    let refused = join(&mut anon, &token, "nokey-a").await;
    expect_refused(refused, Code::FailedPrecondition, "ca-key.pem is missing");

    let limit = fabric_controller::join::MAX_JOIN_TOKENS;
    for i in 1..limit {
        create_token(&mut root, &format!("bulk-{i}"), 600)
            .await
            .unwrap_or_else(|e| panic!("token {i}: {e:?}"));
    }
    let refused = create_token(&mut root, "one-too-many", 600)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("join tokens exist"),
        "{refused:?}"
    );
}

/// An agent given only the cluster's ca.pem and a token joins, registers and stays Ready
/// while its certificate of a few seconds is renewed again and again; the token and the
/// key never reach its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_only_the_ca_and_a_token_joins_and_renews() {
    use fabric_proto::v1::{HostState, ListHostsRequest};
    use fabric_test_support::cluster::{SimHost, SimHostSpec};
    use fabric_test_support::compute::{eventually, ready_hosts};
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "joiner", &["127.0.0.1"]);
    let port = free_port();
    let controller = tls_controller(
        &dir.path().join("controller"),
        &pki.dir,
        port,
        &["--host-cert-ttl", "6s"],
    );
    let mut root = controller.compute().await;
    let token = create_token(&mut root, "joiner-1", 600).await.unwrap();
    let tls_dir = dir.path().join("joiner-1-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::copy(pki.dir.join("ca.pem"), tls_dir.join("ca.pem")).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let host_dir = dir.path().join("joiner-1");
    let _host = SimHost::start_spec(
        &host_dir,
        &format!("https://127.0.0.1:{port}"),
        &SimHostSpec::new("joiner-1", 0, 0)
            .with_tls(&tls_dir)
            .with_join_token_file(&token_file),
    );
    ready_hosts(&root, 1, Duration::from_secs(30)).await;
    let files = TlsFiles::in_dir(&tls_dir, "host");
    assert_eq!(files.identity(), Ok(Identity::Host("joiner-1".into())));
    let mode = |path: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&files.key), 0o600, "the host key is the owner's only");

    // Renewals: host.pem changes at least twice, the host Ready all along.
    let first = std::fs::read_to_string(&files.cert).unwrap();
    let mut seen = vec![first];
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while seen.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "host.pem renewed {} times in 40 s",
            seen.len() - 1
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hosts = root
            .list_hosts(ListHostsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .hosts;
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            hosts[0].state(),
            HostState::Ready,
            "the host left Ready during renewals"
        );
        if let Ok(now) = std::fs::read_to_string(&files.cert) {
            if seen.last() != Some(&now) && now.contains("END CERTIFICATE") {
                seen.push(now);
            }
        }
    }
    // Past the first certificates' lifetime, still Ready: the renewed ones are in use.
    eventually(Duration::from_secs(5), "the host Ready", || {
        let mut root = root.clone();
        async move {
            let hosts = root
                .list_hosts(ListHostsRequest::default())
                .await
                .ok()?
                .into_inner()
                .hosts;
            (hosts.first()?.state() == HostState::Ready).then_some(())
        }
    })
    .await;
    let log = std::fs::read_to_string(host_dir.join("agent.log")).unwrap();
    assert!(log.contains("joined: host certificate written"), "{log}");
    assert!(log.contains("host certificate renewed"), "{log}");
    let secret = token.rsplit('.').next().unwrap();
    assert!(!log.contains(secret), "the token is in the agent's log");
    assert!(!log.contains("PRIVATE KEY"), "a key is in the agent's log");
    // The controller's log neither.
    for entry in std::fs::read_dir(dir.path().join("controller")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains(secret), "the token is in {}", path.display());
        }
    }
}

/// `--host-cert-ttl` beyond a year (or 0) is refused at start, naming the bound.
#[test]
fn a_host_certificate_lifetime_over_a_year_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "ttl", &["127.0.0.1"]);
    for ttl in ["400d", "0s"] {
        let out = fabric_test_support::cluster::controller_command(
            &workspace_bin("fabric-controller"),
            &dir.path().join("c.sock"),
            &dir.path().join("data"),
        )
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(&pki.dir)
        .args(["--host-cert-ttl", ttl])
        .output()
        .unwrap();
        assert!(!out.status.success(), "started with --host-cert-ttl {ttl}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("at most 365 days") || stderr.contains("from 1 s"),
            "{ttl}: {stderr}"
        );
    }
}
