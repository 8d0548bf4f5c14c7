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
