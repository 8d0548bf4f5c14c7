//! Mutual TLS on a real loopback listener (`fabric_proto::tls`): the caller's identity reaches
//! the service; a client without a certificate, with one of another CA, with an expired one,
//! or with one carrying two identities never gets an answer; a renewed server certificate is
//! served without a restart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use fabric_proto::tls::{self, Identity, Issued, TlsFiles};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CLUSTER: &str = "test";
const DAY: Duration = Duration::from_secs(86_400);

fn request(identity: &Identity) -> tls::Request<'_> {
    tls::Request {
        identity,
        dns_names: &[],
        ips: &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        backdate: Duration::ZERO,
        lifetime: DAY,
    }
}

fn write(dir: &Path, name: &str, ca: &Issued, issued: &Issued) -> TlsFiles {
    let files = TlsFiles::in_dir(dir, name);
    std::fs::write(&files.ca, &ca.cert_pem).unwrap();
    std::fs::write(&files.cert, &issued.cert_pem).unwrap();
    tls::write_private(&files.key, &issued.key_pem).unwrap();
    files
}

/// A health server behind mTLS that answers only user/alice (PERMISSION_DENIED to others).
async fn serve(server: &TlsFiles) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server.server_config().expect("server config");
    let (_reporter, health) = fabric_proto::health_service(&[]).await;
    let only_alice = |request: tonic::Request<()>| {
        let caller = tls::caller(&request)?;
        if caller == Identity::User("alice".into()) {
            Ok(request)
        } else {
            Err(tonic::Status::permission_denied(format!("{caller}")))
        }
    };
    tokio::spawn(
        fabric_proto::server()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health, only_alice,
            ))
            .serve_with_incoming(tls::incoming(listener, config, CLUSTER.into())),
    );
    addr
}

async fn check(addr: SocketAddr, tls: ClientTlsConfig) -> Result<(), String> {
    let channel: Channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test]
async fn only_callers_with_a_certificate_of_the_cluster_ca_are_served() {
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = tls::new_ca(CLUSTER, DAY).unwrap();
    let controller = tls::issue(&ca, CLUSTER, &request(&Identity::Controller)).unwrap();
    let server = write(dir.path(), "controller", &ca, &controller);
    assert_eq!(server.identity().unwrap(), Identity::Controller);
    assert_eq!(server.cluster().unwrap(), CLUSTER);
    let addr = serve(&server).await;

    // alice: served, and the service saw who she is.
    let alice = tls::issue(&ca, CLUSTER, &request(&Identity::User("alice".into()))).unwrap();
    let alice = write(dir.path(), "alice", &ca, &alice);
    check(addr, alice.client_config().unwrap())
        .await
        .expect("alice is served");
    // bob: a good certificate, refused by the service by identity.
    let bob = tls::issue(&ca, CLUSTER, &request(&Identity::User("bob".into()))).unwrap();
    let bob = write(dir.path(), "bob", &ca, &bob);
    let refused = check(addr, bob.client_config().unwrap()).await.unwrap_err();
    assert!(
        refused.starts_with("PermissionDenied: user/bob"),
        "{refused}"
    );

    // No client certificate.
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.cert_pem))
        .domain_name(tls::CONTROLLER_DNS_NAME);
    check(addr, anonymous)
        .await
        .expect_err("a client without a certificate was served");

    // A certificate of another CA, for the same identity.
    let other_ca = tls::new_ca(CLUSTER, DAY).unwrap();
    let forged = tls::issue(
        &other_ca,
        CLUSTER,
        &request(&Identity::User("alice".into())),
    )
    .unwrap();
    let forged_dir = tempfile::tempdir().unwrap();
    let forged = write(forged_dir.path(), "alice", &ca, &forged);
    check(addr, forged.client_config().unwrap())
        .await
        .expect_err("another CA's certificate was served");

    // An expired certificate: valid for an hour, two hours ago.
    let expired = tls::issue(
        &ca,
        CLUSTER,
        &tls::Request {
            backdate: Duration::from_secs(7200),
            lifetime: Duration::from_secs(3600),
            ..request(&Identity::User("alice".into()))
        },
    )
    .unwrap();
    let expired_dir = tempfile::tempdir().unwrap();
    let expired = write(expired_dir.path(), "alice", &ca, &expired);
    check(addr, expired.client_config().unwrap())
        .await
        .expect_err("an expired certificate was served");

    // A certificate of the same CA for another cluster's identity.
    let foreign = tls::issue(&ca, "other", &request(&Identity::User("alice".into()))).unwrap();
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = write(foreign_dir.path(), "alice", &ca, &foreign);
    check(addr, foreign.client_config().unwrap())
        .await
        .expect_err("another cluster's identity was served");

    // A server that is not the controller (a host's certificate has no DNS name) is not
    // trusted by clients that expect the controller.
    let host = tls::issue(&ca, CLUSTER, &request(&Identity::Host("h1".into()))).unwrap();
    let host_dir = tempfile::tempdir().unwrap();
    let impostor = serve(&write(host_dir.path(), "host", &ca, &host)).await;
    check(impostor, alice.client_config().unwrap())
        .await
        .expect_err("a host's certificate passed for the controller");
}

#[tokio::test]
async fn a_renewed_server_certificate_is_served_without_a_restart() {
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = tls::new_ca(CLUSTER, DAY).unwrap();
    // The first certificate expires in 3 s.
    let short = tls::issue(
        &ca,
        CLUSTER,
        &tls::Request {
            lifetime: Duration::from_secs(3),
            ..request(&Identity::Controller)
        },
    )
    .unwrap();
    let server = write(dir.path(), "controller", &ca, &short);
    let addr = serve(&server).await;
    let alice = tls::issue(&ca, CLUSTER, &request(&Identity::User("alice".into()))).unwrap();
    let alice = write(dir.path(), "alice", &ca, &alice);
    check(addr, alice.client_config().unwrap())
        .await
        .expect("served before expiry");
    // Renewed on disk; the old one then expires.
    let renewed = tls::issue(&ca, CLUSTER, &request(&Identity::Controller)).unwrap();
    std::fs::write(&server.cert, &renewed.cert_pem).unwrap();
    tls::write_private(&server.key, &renewed.key_pem).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    check(addr, alice.client_config().unwrap())
        .await
        .expect("served with the renewed certificate");
}

#[test]
fn a_certificate_has_exactly_one_identity_of_its_cluster() {
    for (uri, expected) in [
        ("spiffe://c1/controller", Ok(Identity::Controller)),
        ("spiffe://c1/host/h-1", Ok(Identity::Host("h-1".into()))),
        ("spiffe://c1/user/ops", Ok(Identity::User("ops".into()))),
        ("spiffe://c2/user/ops", Err("not an identity of cluster")),
        ("spiffe://c1/user/", Err("1..=63")),
        ("spiffe://c1/user/a/b", Err("1..=63")),
        ("spiffe://c1/user/Ops", Err("1..=63")),
        ("spiffe://c1/admin/x", Err("not controller")),
        ("spiffe://c1/controller/x", Err("not controller")),
    ] {
        match (Identity::from_uri(uri, "c1"), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{uri}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{uri}: {got}"),
            (got, want) => panic!("{uri}: {got:?}, wanted {want:?}"),
        }
    }
    // Two URI SANs: refused.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://c1/user/a".try_into().unwrap()),
        rcgen::SanType::URI("spiffe://c1/controller".try_into().unwrap()),
    ];
    let cert = params.self_signed(&key).unwrap();
    let err = Identity::from_certificate(cert.der(), "c1").unwrap_err();
    assert!(err.contains("2 identities"), "{err}");
    assert!(tls::check_name("cluster", &"a".repeat(64)).is_err());
}

/// A client that opens connections and never shakes hands holds at most
/// MAX_HANDSHAKES_PER_ADDRESS of them, each for HANDSHAKE_TIMEOUT at most; one more from it is
/// closed at once instead of waiting in the accept queue, and once its idle ones go others
/// are served.
#[tokio::test]
async fn idle_connections_from_one_address_cannot_hold_the_listener() {
    use tokio::io::AsyncReadExt;
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = tls::new_ca(CLUSTER, DAY).unwrap();
    let controller = tls::issue(&ca, CLUSTER, &request(&Identity::Controller)).unwrap();
    let addr = serve(&write(dir.path(), "controller", &ca, &controller)).await;
    let mut idle = Vec::new();
    for _ in 0..tls::MAX_HANDSHAKES_PER_ADDRESS {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut one_more = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), one_more.read(&mut byte))
        .await
        .expect("the connection over the bound was left waiting");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let alice = tls::issue(&ca, CLUSTER, &request(&Identity::User("alice".into()))).unwrap();
    let alice = write(dir.path(), "alice", &ca, &alice);
    check(addr, alice.client_config().unwrap())
        .await
        .expect("served once the idle connections went");
}

/// The controller's listener lets callers without a certificate through the handshake (to
/// join with a token): they are `anonymous`, which the authorization layer refuses with
/// UNAUTHENTICATED; a certificate of another CA, or an expired one, still fails the
/// handshake.
#[tokio::test]
async fn a_listener_open_to_anonymous_callers_still_refuses_bad_certificates() {
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = tls::new_ca(CLUSTER, DAY).unwrap();
    let controller = tls::issue(&ca, CLUSTER, &request(&Identity::Controller)).unwrap();
    let server = write(dir.path(), "controller", &ca, &controller);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server.server_config_allowing_anonymous().unwrap();
    let (_reporter, health) = fabric_proto::health_service(&[]).await;
    let policy: tls::Policy = std::sync::Arc::new(|_path: &str, caller: &Identity| match caller {
        Identity::User(_) => Ok(()),
        _ => Err("users only".to_string()),
    });
    tokio::spawn(
        fabric_proto::server()
            .layer(tls::AuthorizeLayer::new(policy))
            .add_service(health)
            .serve_with_incoming(tls::incoming(listener, config, CLUSTER.into())),
    );

    let alice = tls::issue(&ca, CLUSTER, &request(&Identity::User("alice".into()))).unwrap();
    let alice = write(dir.path(), "alice", &ca, &alice);
    check(addr, alice.client_config().unwrap())
        .await
        .expect("alice is served");
    let refused = check(addr, server.anonymous_client_config().unwrap())
        .await
        .unwrap_err();
    assert!(
        refused.starts_with("Unauthenticated: no client certificate"),
        "{refused}"
    );
    let other_ca = tls::new_ca(CLUSTER, DAY).unwrap();
    let forged = tls::issue(
        &other_ca,
        CLUSTER,
        &request(&Identity::User("alice".into())),
    )
    .unwrap();
    let forged_dir = tempfile::tempdir().unwrap();
    let forged = write(forged_dir.path(), "alice", &ca, &forged);
    let refused = check(addr, forged.client_config().unwrap())
        .await
        .expect_err("another CA's certificate was served");
    assert!(
        !refused.contains("Unauthenticated"),
        "got past the handshake: {refused}"
    );
    let expired = tls::issue(
        &ca,
        CLUSTER,
        &tls::Request {
            backdate: Duration::from_secs(7200),
            lifetime: Duration::from_secs(3600),
            ..request(&Identity::User("alice".into()))
        },
    )
    .unwrap();
    let expired_dir = tempfile::tempdir().unwrap();
    let expired = write(expired_dir.path(), "alice", &ca, &expired);
    let refused = check(addr, expired.client_config().unwrap())
        .await
        .expect_err("an expired certificate was served");
    assert!(
        !refused.contains("Unauthenticated"),
        "got past the handshake: {refused}"
    );
}

/// Connections without a certificate (which the controller lets through the handshake, for
/// joins) are few per address: one more than [`tls::MAX_ANONYMOUS_PER_ADDRESS`] is closed
/// after its handshake, the ones within stay open, and a caller with a certificate is still
/// served. (Without a bound, one client held 1,500 such connections and the controller ran
/// out of file descriptors.)
#[tokio::test]
async fn connections_without_a_certificate_are_few_per_address() {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = tls::new_ca(CLUSTER, DAY).unwrap();
    let controller = tls::issue(&ca, CLUSTER, &request(&Identity::Controller)).unwrap();
    let server = write(dir.path(), "controller", &ca, &controller);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server.server_config_allowing_anonymous().unwrap();
    let (_reporter, health) = fabric_proto::health_service(&[]).await;
    tokio::spawn(
        fabric_proto::server()
            .add_service(health)
            .serve_with_incoming(tls::incoming(listener, config, CLUSTER.into())),
    );

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let mut client =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(tls::provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from(tls::CONTROLLER_DNS_NAME).unwrap();
    let connect = || {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await
        }
    };
    let mut open = Vec::new();
    for _ in 0..tls::MAX_ANONYMOUS_PER_ADDRESS {
        open.push(connect().await.expect("a handshake without a certificate"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut byte = [0u8; 1];
    for stream in &mut open {
        // Open: the server waits for HTTP/2 (it sent its settings first, if anything).
        let mut closed = false;
        while let Ok(read) =
            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await
        {
            if matches!(read, Ok(0) | Err(_)) {
                closed = true;
                break;
            }
        }
        assert!(!closed, "a connection within the bound was closed");
    }
    if let Ok(mut extra) = connect().await {
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match extra.read(&mut byte).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the connection over the bound was left open"
        );
    }
    let alice = tls::issue(&ca, CLUSTER, &request(&Identity::User("alice".into()))).unwrap();
    let alice = write(dir.path(), "alice", &ca, &alice);
    check(addr, alice.client_config().unwrap())
        .await
        .expect("a caller with a certificate is still served");
}
