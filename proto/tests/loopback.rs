//! The generated clients and servers talk to each other over real HTTP/2 on
//! 127.0.0.1, next to the standard health and reflection services built by
//! `fabric_proto::standard_services`.
//!
//! The test servers are small but not mocks of the assertions: the image
//! store checks sizes and sha256 digests and serves back what was pushed,
//! the console honours offsets and tails, and so on.

#[allow(dead_code)] // each test binary uses a different part of the samples
mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use fabric_proto::v1::agent_client::AgentClient;
use fabric_proto::v1::agent_server::{Agent, AgentServer};
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::compute_server::{Compute, ComputeServer};
use fabric_proto::v1::host_link_client::HostLinkClient;
use fabric_proto::v1::host_link_server::{HostLink, HostLinkServer};
use fabric_proto::v1::images_client::ImagesClient;
use fabric_proto::v1::images_server::{Images, ImagesServer};
use fabric_proto::v1::vmm_client::VmmClient;
use fabric_proto::v1::vmm_server::{Vmm, VmmServer};
use fabric_proto::v1::*;
use fabric_test_support::hostlink::{pull_image_responses, sha256_hex, stream_of, ServerStream};
use prost::Message;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

fn not_needed<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not exercised by this test"))
}

/// Bound to every test so that a hung stream fails instead of blocking.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

// ---- Compute: VMs in memory, names unique ----

#[derive(Default)]
struct TestCompute {
    vms: Mutex<HashMap<String, Vm>>,
}

#[tonic::async_trait]
impl Compute for TestCompute {
    async fn create_vm(&self, request: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let mut vms = self
            .vms
            .lock()
            .expect("no test panics while holding the lock");
        if vms
            .values()
            .any(|vm| vm.spec.as_ref().map(|s| &s.name) == Some(&spec.name))
        {
            return Err(Status::already_exists(format!("vm name {}", spec.name)));
        }
        let id = format!("vm-{}", vms.len() + 1);
        let vm = Vm {
            id: id.clone(),
            spec: Some(spec),
            status: Some(VmStatus {
                desired_state: request.desired_state,
                phase: VmPhase::Pending as i32,
                reason: "no host registered".to_owned(),
                ..Default::default()
            }),
            generation: 1,
            created_at: Some(ts(1_700_000_000)),
            updated_at: Some(ts(1_700_000_000)),
            disk_mib: 0,
        };
        vms.insert(id, vm.clone());
        Ok(Response::new(vm))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        let id = request.into_inner().id;
        let vms = self
            .vms
            .lock()
            .expect("no test panics while holding the lock");
        vms.get(&id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("vm {id}")))
    }

    async fn list_vms(
        &self,
        _: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        not_needed()
    }

    async fn delete_vm(
        &self,
        _: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        not_needed()
    }

    async fn start_vm(&self, _: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        not_needed()
    }

    async fn stop_vm(&self, _: Request<StopVmRequest>) -> Result<Response<Vm>, Status> {
        not_needed()
    }

    async fn list_hosts(
        &self,
        _: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        Ok(Response::new(list_hosts_response()))
    }

    async fn get_host(&self, _: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        not_needed()
    }

    async fn cordon_host(&self, _: Request<CordonHostRequest>) -> Result<Response<Host>, Status> {
        not_needed()
    }

    async fn uncordon_host(
        &self,
        _: Request<UncordonHostRequest>,
    ) -> Result<Response<Host>, Status> {
        not_needed()
    }

    async fn drain_host(&self, _: Request<DrainHostRequest>) -> Result<Response<Host>, Status> {
        not_needed()
    }

    async fn remove_host(
        &self,
        _: Request<RemoveHostRequest>,
    ) -> Result<Response<RemoveHostResponse>, Status> {
        not_needed()
    }

    async fn revoke_host(
        &self,
        _: Request<fabric_proto::v1::RevokeHostRequest>,
    ) -> Result<Response<fabric_proto::v1::RevokeHostResponse>, Status> {
        not_needed()
    }

    async fn reinstate_host(
        &self,
        _: Request<fabric_proto::v1::ReinstateHostRequest>,
    ) -> Result<Response<fabric_proto::v1::ReinstateHostResponse>, Status> {
        not_needed()
    }

    async fn bind_role(
        &self,
        _: Request<fabric_proto::v1::BindRoleRequest>,
    ) -> Result<Response<fabric_proto::v1::BindRoleResponse>, Status> {
        not_needed()
    }

    async fn unbind_role(
        &self,
        _: Request<fabric_proto::v1::UnbindRoleRequest>,
    ) -> Result<Response<fabric_proto::v1::UnbindRoleResponse>, Status> {
        not_needed()
    }

    async fn list_role_bindings(
        &self,
        _: Request<fabric_proto::v1::ListRoleBindingsRequest>,
    ) -> Result<Response<fabric_proto::v1::ListRoleBindingsResponse>, Status> {
        not_needed()
    }

    async fn set_quota(
        &self,
        _: Request<fabric_proto::v1::SetQuotaRequest>,
    ) -> Result<Response<fabric_proto::v1::ProjectQuota>, Status> {
        not_needed()
    }

    async fn get_quota(
        &self,
        _: Request<fabric_proto::v1::GetQuotaRequest>,
    ) -> Result<Response<fabric_proto::v1::ProjectQuota>, Status> {
        not_needed()
    }

    async fn list_audit(
        &self,
        _: Request<fabric_proto::v1::ListAuditRequest>,
    ) -> Result<Response<fabric_proto::v1::ListAuditResponse>, Status> {
        not_needed()
    }

    async fn create_join_token(
        &self,
        _: Request<fabric_proto::v1::CreateJoinTokenRequest>,
    ) -> Result<Response<fabric_proto::v1::CreateJoinTokenResponse>, Status> {
        not_needed()
    }

    async fn list_join_tokens(
        &self,
        _: Request<fabric_proto::v1::ListJoinTokensRequest>,
    ) -> Result<Response<fabric_proto::v1::ListJoinTokensResponse>, Status> {
        not_needed()
    }

    type WatchEventsStream = ServerStream<Event>;

    /// Three events after `since_sequence`, about the requested VM.
    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let WatchEventsRequest {
            since_sequence,
            vm_id,
            ..
        } = request.into_inner();
        let events = (since_sequence + 1..=since_sequence + 3)
            .map(|sequence| Event {
                vm_id: vm_id.clone(),
                ..event(sequence)
            })
            .collect();
        Ok(Response::new(stream_of(events)))
    }
}

// ---- HostLink: one host, a fixed assignment history ----

struct TestHostLink;

#[tonic::async_trait]
impl HostLink for TestHostLink {
    async fn register_host(
        &self,
        request: Request<RegisterHostRequest>,
    ) -> Result<Response<RegisterHostResponse>, Status> {
        let machine_id = request.into_inner().machine_id;
        let prefix = machine_id.get(..8).ok_or_else(|| {
            Status::invalid_argument(format!("machine_id {machine_id:?} is too short"))
        })?;
        Ok(Response::new(register_host_response(&format!(
            "host-{prefix}"
        ))))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        if request.get_ref().host_id.is_empty() {
            return Err(Status::not_found("unknown host"));
        }
        Ok(Response::new(heartbeat_response()))
    }

    type WatchAssignmentsStream = ServerStream<AssignmentUpdate>;

    /// The full set {vm-1}, then vm-2 added, then vm-1 removed.
    async fn watch_assignments(
        &self,
        _: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let updates = vec![
            AssignmentUpdate {
                generation: 10,
                full: true,
                upserts: vec![assignment("vm-1", "web-1")],
                removed_vm_ids: vec![],
                continued: false,
            },
            AssignmentUpdate {
                generation: 11,
                full: false,
                upserts: vec![assignment("vm-2", "web-2")],
                removed_vm_ids: vec![],
                continued: false,
            },
            AssignmentUpdate {
                generation: 12,
                full: false,
                upserts: vec![],
                removed_vm_ids: vec!["vm-1".to_owned()],
                continued: false,
            },
        ];
        Ok(Response::new(stream_of(updates)))
    }

    async fn join_host(
        &self,
        _: Request<fabric_proto::v1::JoinHostRequest>,
    ) -> Result<Response<fabric_proto::v1::JoinHostResponse>, Status> {
        Err(Status::unimplemented("not needed by these tests"))
    }

    async fn renew_certificate(
        &self,
        _: Request<fabric_proto::v1::RenewCertificateRequest>,
    ) -> Result<Response<fabric_proto::v1::RenewCertificateResponse>, Status> {
        Err(Status::unimplemented("not needed by these tests"))
    }
}

// ---- Images: a verifying, content-addressed store in memory ----

/// Data chunk size of PullImage; small so that a test file spans chunks.
const PULL_CHUNK_BYTES: usize = 1024;

#[derive(Default)]
struct TestImages {
    files: Mutex<HashMap<String, Vec<u8>>>,
}

#[tonic::async_trait]
impl Images for TestImages {
    async fn push_image(
        &self,
        request: Request<Streaming<PushImageRequest>>,
    ) -> Result<Response<PushImageResponse>, Status> {
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(push_image_request::Part::Header(header)) => header,
            _ => return Err(Status::invalid_argument("first message must be a header")),
        };
        let mut data = Vec::new();
        while let Some(message) = parts.message().await? {
            match message.part {
                Some(push_image_request::Part::Data(chunk)) => data.extend_from_slice(&chunk),
                _ => return Err(Status::invalid_argument("expected data after the header")),
            }
        }
        if data.len() as u64 != header.size_bytes {
            return Err(Status::invalid_argument(format!(
                "declared {} bytes, received {}",
                header.size_bytes,
                data.len()
            )));
        }
        let digest = sha256_hex(&data);
        if digest != header.sha256 {
            return Err(Status::invalid_argument(format!(
                "declared sha256 {}, received {digest}",
                header.sha256
            )));
        }
        let already_stored = self
            .files
            .lock()
            .expect("no test panics while holding the lock")
            .insert(digest.clone(), data)
            .is_some();
        let file = ImageFile {
            role: header.role,
            sha256: digest,
            size_bytes: header.size_bytes,
            file_name: header.file_name,
            pushed_at: Some(ts(1_700_000_000)),
        };
        Ok(Response::new(PushImageResponse {
            image: Some(Image {
                name: header.image_name,
                files: vec![file.clone()],
                project: header.project,
            }),
            file: Some(file),
            already_stored,
        }))
    }

    async fn list_images(
        &self,
        _: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        not_needed()
    }

    async fn delete_image(
        &self,
        _: Request<DeleteImageRequest>,
    ) -> Result<Response<DeleteImageResponse>, Status> {
        not_needed()
    }

    type PullImageStream = ServerStream<PullImageResponse>;

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let files = self
            .files
            .lock()
            .expect("no test panics while holding the lock");
        let sha256 = &request.get_ref().sha256;
        let data = files
            .get(sha256)
            .ok_or_else(|| Status::not_found(format!("no file with sha256 {sha256}")))?;
        Ok(Response::new(pull_image_responses(
            request.get_ref(),
            data,
            PULL_CHUNK_BYTES,
        )?))
    }
}

// ---- Agent: one VM with a fixed console log ----

const CONSOLE_LOG: &[u8] = b"Linux version 6.6\nfabric guest ready\nlogin: ";
/// Console chunk size; small so that a stream spans several chunks.
const CONSOLE_CHUNK_BYTES: usize = 8;

struct TestAgent;

#[tonic::async_trait]
impl Agent for TestAgent {
    async fn list_local_vms(
        &self,
        _: Request<ListLocalVmsRequest>,
    ) -> Result<Response<ListLocalVmsResponse>, Status> {
        Ok(Response::new(ListLocalVmsResponse {
            vms: vec![local_vm("vm-1")],
        }))
    }

    async fn get_local_vm(
        &self,
        request: Request<GetLocalVmRequest>,
    ) -> Result<Response<LocalVm>, Status> {
        match request.into_inner().vm_id.as_str() {
            "vm-1" => Ok(Response::new(local_vm("vm-1"))),
            other => Err(Status::not_found(format!("vm {other} is not on this host"))),
        }
    }

    type StreamConsoleStream = ServerStream<ConsoleChunk>;

    async fn stream_console(
        &self,
        request: Request<StreamConsoleRequest>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        let len = CONSOLE_LOG.len() as u64;
        let start = match request.into_inner().start {
            None => 0,
            Some(stream_console_request::Start::Offset(offset)) => offset.min(len),
            Some(stream_console_request::Start::TailBytes(tail)) => len.saturating_sub(tail),
        };
        let chunks = CONSOLE_LOG[start as usize..]
            .chunks(CONSOLE_CHUNK_BYTES)
            .enumerate()
            .map(|(index, data)| ConsoleChunk {
                offset: start + (index * CONSOLE_CHUNK_BYTES) as u64,
                data: data.to_vec(),
            })
            .collect();
        Ok(Response::new(stream_of(chunks)))
    }
}

// ---- Vmm: a guest that honours Ctrl-Alt-Del if given time ----

struct TestVmm;

#[tonic::async_trait]
impl Vmm for TestVmm {
    async fn get_state(
        &self,
        _: Request<GetStateRequest>,
    ) -> Result<Response<GetStateResponse>, Status> {
        Ok(Response::new(get_state_response()))
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let graceful = request
            .into_inner()
            .timeout
            .is_some_and(|timeout| timeout.seconds > 0 || timeout.nanos > 0);
        let path = if graceful {
            ShutdownPath::Graceful
        } else {
            ShutdownPath::Forced
        };
        Ok(Response::new(ShutdownResponse {
            path: path as i32,
            elapsed: Some(dur(1)),
        }))
    }

    async fn pause(&self, _: Request<PauseRequest>) -> Result<Response<PauseResponse>, Status> {
        Ok(Response::new(PauseResponse {}))
    }

    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<ResumeResponse>, Status> {
        Ok(Response::new(ResumeResponse {}))
    }

    async fn set_balloon_target(
        &self,
        request: Request<SetBalloonTargetRequest>,
    ) -> Result<Response<SetBalloonTargetResponse>, Status> {
        // Clamp to the guest RAM size of get_state_response().
        let target = request.into_inner().balloon_target_mib.min(4096);
        Ok(Response::new(SetBalloonTargetResponse {
            balloon_target_mib: target,
            balloon_actual_mib: 0,
        }))
    }

    async fn get_memory_stats(
        &self,
        _: Request<GetMemoryStatsRequest>,
    ) -> Result<Response<GetMemoryStatsResponse>, Status> {
        Ok(Response::new(GetMemoryStatsResponse {
            stats: Some(memory_stats()),
        }))
    }
}

// ---- harness ----

/// Serves the five test services (or only the Agent service) with the
/// standard health and reflection services on an ephemeral loopback port,
/// and returns a channel to it.
async fn serve(all_services: bool) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr: SocketAddr = listener.local_addr().expect("listener has an address");

    let serving: &[&str] = if all_services {
        &fabric_proto::SERVICE_NAMES
    } else {
        &[fabric_proto::AGENT_SERVICE]
    };
    let standard = fabric_proto::standard_services(serving).await;
    let mut router = Server::builder()
        .add_service(standard.health)
        .add_service(standard.reflection)
        .add_service(standard.reflection_v1alpha)
        .add_service(AgentServer::new(TestAgent));
    if all_services {
        router = router
            .add_service(ComputeServer::new(TestCompute::default()))
            .add_service(HostLinkServer::new(TestHostLink))
            .add_service(ImagesServer::new(TestImages::default()))
            .add_service(VmmServer::new(TestVmm));
    }
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));

    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect()
        .await
        .expect("connect to the loopback server")
}

async fn health_of(channel: &Channel, service: &str) -> Result<i32, Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status)
}

async fn reflect(channel: &Channel, request: MessageRequest) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    responses
        .message()
        .await
        .expect("reflection response")
        .and_then(|r| r.message_response)
        .expect("a reflection answer")
}

/// The single file descriptor a reflection request answers with.
async fn file_from(channel: &Channel, request: MessageRequest) -> prost_types::FileDescriptorProto {
    let answer = reflect(channel, request).await;
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        panic!("expected file descriptors, got {answer:?}");
    };
    let [file] = files.file_descriptor_proto.as_slice() else {
        panic!(
            "expected one file, got {}",
            files.file_descriptor_proto.len()
        );
    };
    prost_types::FileDescriptorProto::decode(file.as_slice()).expect("a file descriptor")
}

async fn listed_services(channel: &Channel) -> BTreeSet<String> {
    match reflect(channel, MessageRequest::ListServices(String::new())).await {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("ListServices answered {other:?}"),
    }
}

// ---- tests ----

#[tokio::test]
async fn compute_unary_and_event_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut compute = ComputeClient::new(serve(true).await);

        let created = compute
            .create_vm(create_vm_request())
            .await
            .expect("CreateVm")
            .into_inner();
        assert_eq!(created.id, "vm-1");
        assert_eq!(created.spec, Some(vm_spec("web-1")));
        let status = created.status.clone().expect("status is set");
        assert_eq!(status.phase(), VmPhase::Pending);
        assert_eq!(status.desired_state(), DesiredState::Stopped);

        let duplicate = compute.create_vm(create_vm_request()).await;
        assert_eq!(
            duplicate.expect_err("same name").code(),
            Code::AlreadyExists
        );

        let fetched = compute
            .get_vm(GetVmRequest {
                id: created.id.clone(),
            })
            .await
            .expect("GetVm")
            .into_inner();
        assert_eq!(fetched, created);
        let missing = compute
            .get_vm(GetVmRequest {
                id: "vm-404".to_owned(),
            })
            .await;
        assert_eq!(missing.expect_err("unknown id").code(), Code::NotFound);

        let hosts = compute
            .list_hosts(list_hosts_request())
            .await
            .expect("ListHosts")
            .into_inner();
        assert_eq!(hosts, list_hosts_response());

        let unimplemented = compute.list_vms(list_vms_request()).await;
        assert_eq!(
            unimplemented.expect_err("test server").code(),
            Code::Unimplemented
        );

        let events: Vec<Event> = compute
            .watch_events(watch_events_request())
            .await
            .expect("WatchEvents")
            .into_inner()
            .collect::<Result<_, _>>()
            .await
            .expect("event stream");
        let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, [42, 43, 44]);
        assert!(events.iter().all(|e| e.vm_id == "vm-1"));
        assert_eq!(events[0], event(42));
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn host_link_register_heartbeat_and_assignment_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut host_link = HostLinkClient::new(serve(true).await);

        let registered = host_link
            .register_host(register_host_request())
            .await
            .expect("RegisterHost")
            .into_inner();
        assert_eq!(registered, register_host_response("host-4f0c3c7e"));

        let lease = host_link
            .heartbeat(heartbeat_request(&registered.host_id))
            .await
            .expect("Heartbeat")
            .into_inner();
        assert_eq!(lease, heartbeat_response());
        let unknown = host_link.heartbeat(heartbeat_request("")).await;
        assert_eq!(unknown.expect_err("no host id").code(), Code::NotFound);

        let updates: Vec<AssignmentUpdate> = host_link
            .watch_assignments(WatchAssignmentsRequest {
                host_id: registered.host_id,
                session: registered.session,
            })
            .await
            .expect("WatchAssignments")
            .into_inner()
            .collect::<Result<_, _>>()
            .await
            .expect("assignment stream");
        assert_eq!(updates.len(), 3);
        assert!(updates[0].full, "the first message is the complete set");
        assert!(updates[1..].iter().all(|u| !u.full));
        assert!(updates
            .windows(2)
            .all(|w| w[0].generation < w[1].generation));

        // Applying the stream as an agent would leaves exactly vm-2.
        let mut desired: HashMap<String, Assignment> = HashMap::new();
        for update in updates {
            if update.full {
                desired.clear();
            }
            for removed in &update.removed_vm_ids {
                desired.remove(removed);
            }
            for upsert in update.upserts {
                desired.insert(upsert.vm_id.clone(), upsert);
            }
        }
        let ids: Vec<&String> = desired.keys().collect();
        assert_eq!(ids, ["vm-2"]);
        assert_eq!(desired["vm-2"].spec, Some(vm_spec("web-2")));
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn images_push_then_pull_by_digest() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut images = ImagesClient::new(serve(true).await);
        let kernel: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = sha256_hex(&kernel);

        let push = |sha256: String| {
            let mut messages = vec![PushImageRequest {
                part: Some(push_image_request::Part::Header(push_image_header(
                    &sha256,
                    kernel.len() as u64,
                ))),
            }];
            messages.extend(kernel.chunks(700).map(|chunk| PushImageRequest {
                part: Some(push_image_request::Part::Data(chunk.to_vec())),
            }));
            tokio_stream::iter(messages)
        };

        let wrong = images.push_image(push(INITRAMFS_SHA256.to_owned())).await;
        assert_eq!(
            wrong.expect_err("digest mismatch").code(),
            Code::InvalidArgument
        );

        let pushed = images
            .push_image(push(digest.clone()))
            .await
            .expect("PushImage")
            .into_inner();
        let file = pushed.file.expect("file is set");
        assert_eq!(file.sha256, digest);
        assert_eq!(file.size_bytes, 3000);
        assert_eq!(file.role(), ImageFileRole::Kernel);
        assert!(!pushed.already_stored);
        let again = images
            .push_image(push(digest.clone()))
            .await
            .expect("PushImage again");
        assert!(again.into_inner().already_stored);

        let mut stream = images
            .pull_image(PullImageRequest {
                sha256: digest.clone(),
                offset: 100,
            })
            .await
            .expect("PullImage")
            .into_inner();
        let header = match stream
            .message()
            .await
            .expect("first message")
            .and_then(|m| m.part)
        {
            Some(pull_image_response::Part::Header(header)) => header,
            other => panic!("expected a header first, got {other:?}"),
        };
        assert_eq!(
            header,
            PullImageHeader {
                sha256: digest.clone(),
                size_bytes: 3000,
                offset: 100,
            }
        );
        let mut pulled = Vec::new();
        let mut chunks = 0;
        while let Some(message) = stream.message().await.expect("data message") {
            match message.part {
                Some(pull_image_response::Part::Data(data)) => pulled.extend_from_slice(&data),
                other => panic!("expected data, got {other:?}"),
            }
            chunks += 1;
        }
        assert_eq!(pulled, kernel[100..]);
        assert_eq!(chunks, 3, "2900 bytes in chunks of 1024");

        let unknown = images
            .pull_image(PullImageRequest {
                sha256: ROOTFS_SHA256.to_owned(),
                offset: 0,
            })
            .await;
        assert_eq!(unknown.expect_err("not stored").code(), Code::NotFound);
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn agent_local_vm_and_console_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut agent = AgentClient::new(serve(true).await);

        let vm = agent
            .get_local_vm(GetLocalVmRequest {
                vm_id: "vm-1".to_owned(),
            })
            .await
            .expect("GetLocalVm")
            .into_inner();
        assert_eq!(vm, local_vm("vm-1"));
        let listed = agent
            .list_local_vms(ListLocalVmsRequest {})
            .await
            .expect("ListLocalVms")
            .into_inner();
        assert_eq!(listed.vms, [local_vm("vm-1")]);

        let console = |start| {
            let mut agent = agent.clone();
            async move {
                let chunks: Vec<ConsoleChunk> = agent
                    .stream_console(StreamConsoleRequest {
                        vm_id: "vm-1".to_owned(),
                        start,
                        follow: false,
                    })
                    .await
                    .expect("StreamConsole")
                    .into_inner()
                    .collect::<Result<_, _>>()
                    .await
                    .expect("console stream");
                chunks
            }
        };

        let whole = console(None).await;
        assert!(whole.len() > 1, "the log spans several chunks");
        let mut expected_offset = 0;
        for chunk in &whole {
            assert_eq!(chunk.offset, expected_offset, "chunks are contiguous");
            expected_offset += chunk.data.len() as u64;
        }
        let text: Vec<u8> = whole.into_iter().flat_map(|c| c.data).collect();
        assert_eq!(text, CONSOLE_LOG);

        let tail = console(Some(stream_console_request::Start::TailBytes(7))).await;
        let tail_text: Vec<u8> = tail.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(tail_text, b"login: ");
        assert_eq!(tail[0].offset, CONSOLE_LOG.len() as u64 - 7);

        let from = console(Some(stream_console_request::Start::Offset(6))).await;
        assert_eq!(from[0].offset, 6);
        assert!(from[0].data.starts_with(b"version"));
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn vmm_state_shutdown_and_balloon() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut vmm = VmmClient::new(serve(true).await);

        let state = vmm
            .get_state(GetStateRequest {})
            .await
            .expect("GetState")
            .into_inner();
        assert_eq!(state, get_state_response());
        assert_eq!(state.state(), VmmState::Running);

        let graceful = vmm
            .shutdown(ShutdownRequest {
                timeout: Some(dur(30)),
            })
            .await
            .expect("Shutdown")
            .into_inner();
        assert_eq!(graceful.path(), ShutdownPath::Graceful);
        let forced = vmm
            .shutdown(ShutdownRequest { timeout: None })
            .await
            .expect("Shutdown")
            .into_inner();
        assert_eq!(forced.path(), ShutdownPath::Forced);

        let balloon = vmm
            .set_balloon_target(SetBalloonTargetRequest {
                balloon_target_mib: 10_000,
            })
            .await
            .expect("SetBalloonTarget")
            .into_inner();
        assert_eq!(balloon.balloon_target_mib, 4096, "clamped to guest RAM");

        let stats = vmm
            .get_memory_stats(GetMemoryStatsRequest {})
            .await
            .expect("GetMemoryStats")
            .into_inner();
        assert_eq!(stats.stats, Some(memory_stats()));
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn health_and_reflection_cover_all_five_services() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let channel = serve(true).await;

        for service in fabric_proto::SERVICE_NAMES.into_iter().chain([""]) {
            let status = health_of(&channel, service).await;
            assert_eq!(
                status.expect("health check"),
                ServingStatus::Serving as i32,
                "health of {service:?}"
            );
        }
        let unknown = health_of(&channel, "fabric.v1.Nope").await;
        assert_eq!(unknown.expect_err("not registered").code(), Code::NotFound);

        let listed = listed_services(&channel).await;
        let mut expected: BTreeSet<String> = fabric_proto::SERVICE_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect();
        expected.insert(fabric_proto::HEALTH_SERVICE.to_owned());
        expected.insert(fabric_proto::REFLECTION_SERVICE.to_owned());
        expected.insert(fabric_proto::REFLECTION_V1ALPHA_SERVICE.to_owned());
        assert_eq!(listed, expected);
        assert!(listed.contains("fabric.v1.Compute") && listed.contains("grpc.health.v1.Health"));

        // `grpcurl describe` asks for the file of a symbol, then for each
        // of its imports by name: all must resolve.
        let compute_file = file_from(
            &channel,
            MessageRequest::FileContainingSymbol("fabric.v1.Compute.CreateVm".to_owned()),
        )
        .await;
        assert_eq!(compute_file.name(), "fabric/v1/compute.proto");
        assert!(
            compute_file.service.iter().any(|s| s.name() == "Compute"),
            "compute.proto declares the Compute service"
        );
        assert_eq!(
            compute_file.dependency,
            ["fabric/v1/types.proto", "google/protobuf/timestamp.proto"]
        );
        for dependency in &compute_file.dependency {
            let file =
                file_from(&channel, MessageRequest::FileByFilename(dependency.clone())).await;
            assert_eq!(file.name(), dependency);
        }
    })
    .await
    .expect("test finished in time");
}

#[tokio::test]
async fn a_server_advertises_only_what_it_serves() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let channel = serve(false).await;

        let agent = health_of(&channel, fabric_proto::AGENT_SERVICE).await;
        assert_eq!(agent.expect("health check"), ServingStatus::Serving as i32);
        let compute = health_of(&channel, fabric_proto::COMPUTE_SERVICE).await;
        assert_eq!(compute.expect_err("not served").code(), Code::NotFound);

        let listed = listed_services(&channel).await;
        let expected: BTreeSet<String> = [
            fabric_proto::AGENT_SERVICE,
            fabric_proto::HEALTH_SERVICE,
            fabric_proto::REFLECTION_SERVICE,
            fabric_proto::REFLECTION_V1ALPHA_SERVICE,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(listed, expected);
    })
    .await
    .expect("test finished in time");
}
