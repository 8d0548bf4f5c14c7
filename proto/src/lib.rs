//! The `fabric.v1` gRPC contract: messages, clients and servers generated
//! from `proto/fabric/v1/*.proto`, plus what every Fabric gRPC server serves
//! besides its own service (health checking and server reflection).
//!
//! Five services make up the contract:
//!
//! - `fabric.v1.Compute`: the operator API of the controller (VMs, hosts,
//!   events); fabricctl is its client.
//! - `fabric.v1.HostLink`: agents register with the controller, hold a lease
//!   by heartbeats and watch the VMs assigned to their host.
//! - `fabric.v1.Images`: the controller's content-addressed image store.
//! - `fabric.v1.Agent`: each agent's local view of its host, with consoles.
//! - `fabric.v1.Vmm`: each fabric-vmm's control endpoint on a Unix socket.
//!
//! A server builds its standard companions with [`standard_services`] and
//! adds them next to its own service; on a Unix socket it serves the
//! connections of [`unix::incoming`], which any gRPC client can call (see
//! [`unix`] for the `:authority` that gRPC C-core sends there):
//!
//! ```no_run
//! # async fn serve(
//! #     compute: impl fabric_proto::v1::compute_server::Compute,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use fabric_proto::v1::compute_server::ComputeServer;
//!
//! let standard = fabric_proto::standard_services(&[fabric_proto::COMPUTE_SERVICE]).await;
//! let listener = tokio::net::UnixListener::bind("/run/fabric/controller.sock")?;
//! tonic::transport::Server::builder()
//!     .add_service(standard.health)
//!     .add_service(standard.reflection)
//!     .add_service(standard.reflection_v1alpha)
//!     .add_service(ComputeServer::new(compute))
//!     .serve_with_incoming(fabric_proto::unix::incoming(listener))
//!     .await?;
//! # Ok(())
//! # }
//! ```

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tonic_reflection::server::v1alpha::{
    ServerReflection as ServerReflectionV1Alpha,
    ServerReflectionServer as ServerReflectionServerV1Alpha,
};

pub mod clock;
pub mod tls;
pub mod unix;

/// Streams (calls in flight) one client connection may have open at once on a Fabric server:
/// beyond it the client's new calls wait for one to end (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// How often a server pings an idle connection, and how long it waits for the answer before
/// it closes the connection: a client that vanished without closing frees what it held.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// What [`server`] wraps every service in: see [`bound_status`].
pub type StatusLayer = tower::util::MapResponseLayer<
    fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
>;

/// The server builder of [`server`].
pub type FabricServer =
    tonic::transport::Server<tower::layer::util::Stack<StatusLayer, tower::layer::util::Identity>>;

/// The server builder every Fabric daemon starts from: bounded streams per connection and
/// HTTP/2 keepalive, so that neither a greedy client nor a vanished one holds resources
/// without limit, and refusals a client can read ([`bound_status`]). (Message sizes are
/// limited per service: tonic decodes at most 4 MiB.)
pub fn server() -> FabricServer {
    server_with_keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
}

/// [`server`] pinging idle connections every `interval` and closing one whose answer has not
/// come `timeout` after a ping (tests use short ones; the daemons use [`server`]).
pub fn server_with_keepalive(
    interval: std::time::Duration,
    timeout: std::time::Duration,
) -> FabricServer {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_keepalive_interval(Some(interval))
        .http2_keepalive_timeout(Some(timeout))
        .tcp_keepalive(Some(interval))
        .layer(tower::util::MapResponseLayer::new(
            bound_status as fn(_) -> _,
        ))
}

/// The longest status message a Fabric server sends, bytes: longer ones keep their first and
/// last halves. gRPC C-core clients (Python, C++, Ruby, PHP) refuse response metadata over
/// 8 KiB (soft) to 16 KiB (hard) and then report their own RESOURCE_EXHAUSTED instead of the
/// server's status; a refusal that quotes what it refuses would otherwise not reach them.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// How tonic's INTERNAL statuses for a request message it could not decode begin. (Broken
/// gRPC framing, e.g. a compressed flag without an encoding, stays INTERNAL: the gRPC
/// specification asks for that code.)
const UNDECODABLE: [&str; 2] = [
    "failed to decode Protobuf message",
    "Missing request message.",
];

/// The status of a call refused before it answered (a trailers-only response), made readable
/// to any client: its message at most [`MAX_STATUS_MESSAGE`] bytes (the start and the end,
/// where the limit is named, kept), tonic's OUT_OF_RANGE for a message larger than the
/// server decodes ("decoded message length too large ... the limit is: 4194304 bytes") made
/// RESOURCE_EXHAUSTED, the code gRPC (and every other implementation) gives it, and tonic's
/// INTERNAL for a request that does not decode made INVALID_ARGUMENT.
pub fn bound_status(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let too_large = status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large");
    // tonic answers a request message it cannot decode (or a unary call without one) with
    // INTERNAL, which says the server failed: the caller's bytes did, so INVALID_ARGUMENT.
    let undecodable = status.code() == tonic::Code::Internal
        && UNDECODABLE
            .iter()
            .any(|prefix| status.message().starts_with(prefix));
    if !too_large && !undecodable && status.message().len() <= MAX_STATUS_MESSAGE {
        return response;
    }
    let code = if too_large {
        tonic::Code::ResourceExhausted
    } else if undecodable {
        tonic::Code::InvalidArgument
    } else {
        status.code()
    };
    let bounded = tonic::Status::with_details(
        code,
        bound_message(status.message()),
        status.details().to_vec().into(),
    );
    if bounded.add_header(response.headers_mut()).is_err() {
        // Not expected (the message is percent-encoded): say only the code.
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from(code as i32));
        response.headers_mut().remove("grpc-message");
    }
    response
}

/// `message` if at most [`MAX_STATUS_MESSAGE`] bytes, else its first and last
/// `MAX_STATUS_MESSAGE / 2 - 8` bytes (at character boundaries) around " […] ".
fn bound_message(message: &str) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message.to_owned();
    }
    let half = MAX_STATUS_MESSAGE / 2 - 8;
    let mut head = half;
    while !message.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = message.len() - half;
    while !message.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} […] {}", &message[..head], &message[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: tonic::Status) -> tonic::Status {
        let response = bound_status(status.into_http());
        tonic::Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn long_status_messages_keep_their_start_and_end() {
        let long = format!("labels {:?}: values 0..=63", "é".repeat(50_000));
        let status = refusal(tonic::Status::invalid_argument(long.clone()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            status.message().len()
        );
        assert!(
            status.message().starts_with("labels \"éé"),
            "{}",
            status.message()
        );
        assert!(
            status.message().ends_with("éé\": values 0..=63"),
            "{}",
            status.message()
        );
        let short = refusal(tonic::Status::not_found("no VM with id \"x\""));
        assert_eq!(short.message(), "no VM with id \"x\"");
        assert_eq!(short.code(), tonic::Code::NotFound);
    }

    #[test]
    fn a_message_over_the_limit_is_resource_exhausted() {
        let status = refusal(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5242975 bytes, the limit is: \
             4194304 bytes",
        ));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("4194304"));
        let other = refusal(tonic::Status::out_of_range("offset 9 beyond the file"));
        assert_eq!(other.code(), tonic::Code::OutOfRange);
    }
}

/// Messages, clients (`v1::compute_client::ComputeClient`, ...) and servers
/// (`v1::compute_server::ComputeServer`, ...) of the `fabric.v1` package.
pub mod v1 {
    // The generated code follows prost's and tonic's conventions, not ours;
    // its doc comments are the .proto comments, verbatim.
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("fabric.v1");
}

/// The encoded `google.protobuf.FileDescriptorSet` of the `fabric.v1` files
/// and their imports, with source comments, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fabric_v1_descriptor_set.bin"));

/// Fully qualified name of the operator API served by the controller.
pub const COMPUTE_SERVICE: &str = v1::compute_server::SERVICE_NAME;
/// Fully qualified name of the agent-to-controller API.
pub const HOST_LINK_SERVICE: &str = v1::host_link_server::SERVICE_NAME;
/// Fully qualified name of the image store served by the controller.
pub const IMAGES_SERVICE: &str = v1::images_server::SERVICE_NAME;
/// Fully qualified name of the local API served by each agent.
pub const AGENT_SERVICE: &str = v1::agent_server::SERVICE_NAME;
/// Fully qualified name of the control API served by each fabric-vmm.
pub const VMM_SERVICE: &str = v1::vmm_server::SERVICE_NAME;

/// Fully qualified names of the five `fabric.v1` services.
pub const SERVICE_NAMES: [&str; 5] = [
    COMPUTE_SERVICE,
    HOST_LINK_SERVICE,
    IMAGES_SERVICE,
    AGENT_SERVICE,
    VMM_SERVICE,
];

/// Metadata key of a HostLink refusal whose value `superseded` says another agent session
/// holds the host now (another agent registered with the same machine id): the refused agent
/// stops its VMs and does not register again on its own.
pub const SESSION_METADATA: &str = "fabric-session";

/// Fully qualified name of the standard gRPC health checking service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// Fully qualified name of the standard gRPC server reflection service (v1).
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";
/// Fully qualified name of the server reflection service's first version,
/// v1alpha: what grpcio-reflection's stock client, grpc_cli and older
/// grpcurl releases ask. grpc-go serves both versions too.
pub const REFLECTION_V1ALPHA_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The services every Fabric gRPC server adds next to its own.
pub struct StandardServices<R, A> {
    /// Changes what `health` reports; keep it to mark services NOT_SERVING
    /// during shutdown or while a dependency (e.g. the store) is down.
    pub health_reporter: HealthReporter,
    /// `grpc.health.v1.Health`, reporting the served services as SERVING.
    pub health: HealthServer<HealthService>,
    /// `grpc.reflection.v1.ServerReflection`, so that `grpcurl list` and
    /// `grpcurl describe` work without .proto files.
    pub reflection: ServerReflectionServer<R>,
    /// `grpc.reflection.v1alpha.ServerReflection`: the same answers, for the
    /// clients that only know the first version.
    pub reflection_v1alpha: ServerReflectionServerV1Alpha<A>,
}

/// Builds the health and reflection services of a server that serves the
/// `serving` services (fully qualified names, from [`SERVICE_NAMES`]).
///
/// Health reports each of `serving`, and the whole server (""), as SERVING.
/// Reflection (both versions) lists `serving`, the health service and both
/// reflection services, and describes every `fabric.v1` type.
pub async fn standard_services(
    serving: &[&str],
) -> StandardServices<impl ServerReflection, impl ServerReflectionV1Alpha> {
    let (health_reporter, health) = health_service(serving).await;
    StandardServices {
        health_reporter,
        health,
        reflection: reflection_service(serving),
        reflection_v1alpha: reflection_v1alpha_service(serving),
    }
}

/// The health service alone: its reporter and the `grpc.health.v1.Health`
/// server, with each of `serving` set to SERVING.
pub async fn health_service(serving: &[&str]) -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    for service in serving {
        reporter
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    (reporter, server)
}

/// The reflection service (v1) alone, listing `serving`, the health service
/// and both reflection services.
pub fn reflection_service(serving: &[&str]) -> ServerReflectionServer<impl ServerReflection> {
    // The descriptor sets are produced at build time by protox, tonic-health
    // and tonic-reflection, not read from any input, and a test builds this
    // service: failing here is a build defect, not a runtime condition.
    reflection_builder(serving)
        .build_v1()
        .expect("descriptor sets compiled into fabric-proto are valid")
}

/// The reflection service (v1alpha) alone, answering as
/// [`reflection_service`] does.
pub fn reflection_v1alpha_service(
    serving: &[&str],
) -> ServerReflectionServerV1Alpha<impl ServerReflectionV1Alpha> {
    // As in reflection_service: a build defect if it fails.
    reflection_builder(serving)
        .build_v1alpha()
        .expect("descriptor sets compiled into fabric-proto are valid")
}

/// What both reflection versions know: the `fabric.v1` files, health, and
/// both reflection protocols (each version's builder adds only its own, so
/// that one could not describe the other it lists).
fn reflection_builder(serving: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .with_service_name(HEALTH_SERVICE)
        .with_service_name(REFLECTION_SERVICE)
        .with_service_name(REFLECTION_V1ALPHA_SERVICE);
    for service in serving {
        builder = builder.with_service_name(*service);
    }
    builder
}
