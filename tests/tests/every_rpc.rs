//! Every RPC of every service a daemon serves over TCP, read from the services' descriptors
//! (so a method added tomorrow is called too), is refused to a caller without a client
//! certificate: the controller's Compute, HostLink and Images, the agent's Agent, and both
//! daemons' health and reflection. Real processes, real TLS on loopback. The same calls with
//! an admin's certificate reach the services, which shows the refusals are the TLS layer's
//! and not a dead listener's.

use std::path::Path;
use std::time::Duration;

use fabric_proto::tls::{Identity, TlsFiles};
use fabric_test_support::cluster::{SimHost, SimHostSpec};
use fabric_test_support::pki::{free_port, Pki};
use prost::Message;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// `/package.Service/Method` of every method of `services`, from the descriptor sets.
fn methods(services: &[&str]) -> Vec<String> {
    let sets = [
        fabric_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut paths = Vec::new();
    for set in sets {
        let set = prost_types::FileDescriptorSet::decode(set).expect("a descriptor set");
        for file in set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                if services.contains(&full.as_str()) {
                    for method in &service.method {
                        paths.push(format!("/{full}/{}", method.name()));
                    }
                }
            }
        }
    }
    paths
}

/// Calls `path` with an empty message (valid for every message type), as a stream so one
/// call shape fits unary and streaming methods alike; the status of the call.
async fn call(channel: Channel, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(format!("not ready: {e}"));
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let request = tonic::Request::new(tokio_stream::once(()));
    let path = path.parse().expect("a method path");
    // A watch that was accepted and has nothing to say yet is served: 3 s is enough to
    // tell it from a refusal, which comes at once.
    let result = tokio::time::timeout(Duration::from_secs(3), async {
        let mut stream = grpc.streaming(request, path, codec).await?.into_inner();
        // A streaming answer: its first message, or its end.
        stream.message().await.map(|_| ())
    })
    .await;
    match result {
        Err(_) => tonic::Status::deadline_exceeded("no answer in 3 s"),
        Ok(Ok(())) => tonic::Status::ok(""),
        Ok(Err(status)) => status,
    }
}

fn endpoint(port: u16, tls: ClientTlsConfig) -> Channel {
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// A client that trusts the cluster CA and presents no certificate.
fn anonymous(ca: &Path, server: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca).unwrap(),
        ))
        .domain_name(server)
}

/// A refusal to a caller without a certificate: the call is UNAUTHENTICATED, or (where the
/// server requires a certificate at the handshake: the agent) the handshake fails. The one
/// method a caller without a certificate may reach (a join, with a token) must still refuse
/// an empty request.
fn refused_without_certificate(
    path: &str,
    status: &tonic::Status,
    handshake_refuses: bool,
) -> Result<(), String> {
    // In TLS 1.3 the client ends its handshake first; the server's refusal of it reaches
    // the client as the connection closing under its first call.
    let handshake = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) && std::error::Error::source(status)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    match status.code() {
        Code::Unauthenticated => Ok(()),
        _ if handshake && handshake_refuses => Ok(()),
        Code::InvalidArgument | Code::PermissionDenied if path.ends_with("/JoinHost") => Ok(()),
        _ => Err(format!("{path}: {status:?}")),
    }
}

async fn check_all(
    port: u16,
    ca: &Path,
    server: &str,
    allowed: impl Fn(&str) -> ClientTlsConfig,
    services: &[&str],
    handshake_refuses: bool,
) -> usize {
    let paths = methods(services);
    for service in services {
        assert!(
            paths.iter().any(|p| p.starts_with(&format!("/{service}/"))),
            "no method of {service} in the descriptors"
        );
    }
    let mut wrong = Vec::new();
    for path in &paths {
        let status = call(endpoint(port, anonymous(ca, server)), path).await;
        if let Err(e) = refused_without_certificate(path, &status, handshake_refuses) {
            wrong.push(e);
        }
        // With a certificate the service allows (an admin's, a host's for HostLink) the call
        // passes TLS and authorization: whatever the service answers an empty request, it
        // is not the refusal above.
        let service = path.trim_start_matches('/').split('/').next().unwrap();
        let status = call(endpoint(port, allowed(service)), path).await;
        let transport = std::error::Error::source(&status)
            .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
        assert!(
            !transport
                && !matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
                )
                || path.ends_with("/JoinHost"),
            "{path} refused to a caller it serves: {status:?}"
        );
    }
    assert!(
        wrong.is_empty(),
        "served without a client certificate:\n{}",
        wrong.join("\n")
    );
    paths.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_without_a_client_certificate_is_refused() {
    fabric_proto::tls::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "everyrpc", &["127.0.0.1"]);
    let ca = pki.dir.join("ca.pem");
    let admin = TlsFiles::in_dir(&pki.dir, "admin");

    let port = free_port();
    let (controller, _socket) = pki.controller(dir.path(), port, &[]);

    let h0_tls = pki.host("h0", &dir.path().join("h0-tls"));
    let h0 = TlsFiles::in_dir(&h0_tls, "host");
    let served = check_all(
        port,
        &ca,
        fabric_proto::tls::CONTROLLER_DNS_NAME,
        |service| match service {
            fabric_proto::HOST_LINK_SERVICE => h0.client_config().unwrap(),
            _ => admin.client_config().unwrap(),
        },
        &[
            fabric_proto::COMPUTE_SERVICE,
            fabric_proto::HOST_LINK_SERVICE,
            fabric_proto::IMAGES_SERVICE,
            fabric_proto::HEALTH_SERVICE,
            fabric_proto::REFLECTION_SERVICE,
            fabric_proto::REFLECTION_V1ALPHA_SERVICE,
        ],
        // The controller completes the handshake without a certificate (for joins), so
        // every refusal must be the call's own UNAUTHENTICATED.
        false,
    )
    .await;
    println!("controller: {served} methods refused without a certificate");

    // An agent with its Agent service on TCP, its certificate naming it.
    let agent_port = free_port();
    let host_tls = pki.host("h1", &dir.path().join("h1-tls"));
    let host = SimHost::start_spec(
        &dir.path().join("h1"),
        &format!("https://127.0.0.1:{port}"),
        &SimHostSpec::new("h1", 0, 0)
            .with_tls(&host_tls)
            .with_listen(&format!("127.0.0.1:{agent_port}")),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", agent_port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent does not listen on {agent_port}:\n{}",
            host.process.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = check_all(
        agent_port,
        &ca,
        &fabric_proto::tls::host_dns_name("h1"),
        |_| {
            TlsFiles::in_dir(&pki.dir, "controller")
                .client_config_for(&Identity::Host("h1".into()))
                .unwrap()
        },
        &[
            fabric_proto::AGENT_SERVICE,
            fabric_proto::HEALTH_SERVICE,
            fabric_proto::REFLECTION_SERVICE,
            fabric_proto::REFLECTION_V1ALPHA_SERVICE,
        ],
        true,
    )
    .await;
    println!("agent: {served} methods refused without a certificate");

    // A user the agent's `admins` does not name is refused its Agent service.
    let status = call(
        endpoint(
            agent_port,
            admin
                .client_config_for(&Identity::Host("h1".into()))
                .unwrap(),
        ),
        "/fabric.v1.Agent/ListLocalVms",
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A client of h1's Agent service does not take another host's certificate for it.
    let h2_tls = pki.host("h2", &dir.path().join("h2-tls"));
    let status = call(
        endpoint(
            agent_port,
            admin
                .client_config_for(&Identity::Host("h2".into()))
                .unwrap(),
        ),
        "/grpc.health.v1.Health/Check",
    )
    .await;
    assert_ne!(status.code(), Code::Ok, "h1 passed for h2");
    drop(h2_tls);
    drop(host);
    drop(controller);
}
