//! A server on a Unix socket that serves through `fabric_proto::unix::incoming`
//! still answers tonic clients (which send a valid `:authority` and let h2
//! encode their headers with Huffman codes and the HPACK table), and serves
//! reflection in both versions. gRPC C-core clients, whose `:authority` is
//! what the rewriting is for, are exercised with Python grpcio in
//! `tests/tests/grpc_clients.rs`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tonic::transport::{Channel, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn serve(socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind the test socket");
    let standard = fabric_proto::standard_services(&[fabric_proto::AGENT_SERVICE]).await;
    let router = Server::builder()
        .add_service(standard.health)
        .add_service(standard.reflection)
        .add_service(standard.reflection_v1alpha);
    tokio::spawn(router.serve_with_incoming(fabric_proto::unix::incoming(listener)));
}

async fn connect(socket: &Path) -> Channel {
    fabric_test_support::host::uds_channel(socket)
        .await
        .expect("connect to the test socket")
}

#[tokio::test]
async fn tonic_clients_are_served_through_the_header_rewriting() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("server.sock");
        serve(&socket).await;
        let mut health = HealthClient::new(connect(&socket).await);

        // Many calls on one connection, each with metadata that h2's
        // encoder adds to its HPACK table and evicts again: the decoder
        // under h2 must follow the table through every eviction.
        for call in 0..200 {
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: fabric_proto::AGENT_SERVICE.to_owned(),
            });
            let tag = format!("{call:04}-{}", "t".repeat(700));
            request
                .metadata_mut()
                .insert("x-call", tag.parse().expect("ASCII metadata"));
            request.metadata_mut().insert(
                "x-constant",
                "the same on every call".parse().expect("ASCII"),
            );
            let status = health
                .check(request)
                .await
                .expect("health check")
                .into_inner();
            assert_eq!(status.status, ServingStatus::Serving as i32, "call {call}");
        }
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn reflection_v1alpha_lists_and_describes_what_v1_does() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("server.sock");
        serve(&socket).await;
        let mut reflection = ServerReflectionClient::new(connect(&socket).await);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("fabric.v1.Agent".to_owned()),
            MessageRequest::FileContainingSymbol("grpc.reflection.v1.ServerReflection".to_owned()),
        ]
        .map(|request| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        });
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("reflection call")
            .into_inner();
        let mut next = async || {
            answers
                .message()
                .await
                .expect("reflection answer")
                .and_then(|a| a.message_response)
                .expect("an answer")
        };

        let MessageResponse::ListServicesResponse(list) = next().await else {
            panic!("ListServices answered something else");
        };
        let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
        let expected: BTreeSet<String> = [
            fabric_proto::AGENT_SERVICE,
            fabric_proto::HEALTH_SERVICE,
            fabric_proto::REFLECTION_SERVICE,
            fabric_proto::REFLECTION_V1ALPHA_SERVICE,
        ]
        .map(str::to_owned)
        .into();
        assert_eq!(listed, expected);
        for _ in 0..2 {
            let answer = next().await;
            let MessageResponse::FileDescriptorResponse(files) = answer else {
                panic!("expected file descriptors, got {answer:?}");
            };
            assert!(!files.file_descriptor_proto.is_empty());
        }
    })
    .await
    .expect("test finished in time");
}

/// A server from `fabric_proto::server()` holds at most `MAX_CONCURRENT_STREAMS` calls of one
/// connection open: 300 health watches (streams that stay open) on one connection, and only
/// that many are answered; the rest wait until one ends, and are answered then.
#[tokio::test]
async fn one_connection_gets_at_most_the_stream_limit() {
    tokio::time::timeout(TEST_TIMEOUT * 2, async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("server.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let standard = fabric_proto::standard_services(&[fabric_proto::AGENT_SERVICE]).await;
        let router = fabric_proto::server().add_service(standard.health);
        tokio::spawn(router.serve_with_incoming(fabric_proto::unix::incoming(listener)));
        let channel = connect(&socket).await;
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut watches = Vec::new();
        for _ in 0..300 {
            let mut health = HealthClient::new(channel.clone());
            let answered = answered.clone();
            watches.push(tokio::spawn(async move {
                let mut stream = health
                    .watch(HealthCheckRequest {
                        service: fabric_proto::AGENT_SERVICE.to_owned(),
                    })
                    .await
                    .expect("watch")
                    .into_inner();
                stream.message().await.expect("a status").expect("open");
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Held open until the test ends it.
                let _ = stream.message().await;
            }));
        }
        let count = || answered.load(std::sync::atomic::Ordering::SeqCst);
        let limit = fabric_proto::MAX_CONCURRENT_STREAMS as usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while count() < limit && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count(), limit, "answered watches on one connection");
        // Ending some lets as many waiting ones in.
        for watch in watches.iter().take(10) {
            watch.abort();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while count() < limit + 10 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(count(), limit + 10);
        for watch in watches {
            watch.abort();
        }
    })
    .await
    .expect("the test timed out");
}
