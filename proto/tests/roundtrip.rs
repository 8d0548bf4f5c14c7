//! Every message that crosses a `fabric.v1` RPC survives encode → decode
//! unchanged, with every field populated.
//!
//! Two checks keep this test honest as the contract grows: each sample is
//! verified against the compiled descriptor set to have every field present
//! on the wire (recursively, one member per oneof), and every request,
//! response and stream message of every service must have a sample here.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;

use common::*;
use fabric_proto::v1::*;
use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// Encodes `value`, decodes it back, asserts both are equal, and returns the
/// encoding for the populated check.
fn round_trip<M: Message + Default + PartialEq + Debug>(value: M) -> Vec<u8> {
    let encoded = value.encode_to_vec();
    let decoded = M::decode(encoded.as_slice()).expect("a message we encoded decodes");
    assert_eq!(decoded, value);
    assert_eq!(decoded.encode_to_vec(), encoded, "re-encoding is stable");
    encoded
}

/// One sample per message (two where a oneof has alternatives worth
/// covering): (fully qualified proto name, encoding).
fn samples() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // Compute
        ("fabric.v1.CreateVmRequest", round_trip(create_vm_request())),
        ("fabric.v1.Vm", round_trip(vm("vm-1", "web-1"))),
        (
            "fabric.v1.GetVmRequest",
            round_trip(GetVmRequest {
                id: "vm-1".to_owned(),
            }),
        ),
        ("fabric.v1.ListVmsRequest", round_trip(list_vms_request())),
        ("fabric.v1.ListVmsResponse", round_trip(list_vms_response())),
        (
            "fabric.v1.DeleteVmRequest",
            round_trip(DeleteVmRequest {
                id: "vm-1".to_owned(),
            }),
        ),
        (
            "fabric.v1.DeleteVmResponse",
            round_trip(DeleteVmResponse {}),
        ),
        (
            "fabric.v1.StartVmRequest",
            round_trip(StartVmRequest {
                id: "vm-1".to_owned(),
            }),
        ),
        (
            "fabric.v1.StopVmRequest",
            round_trip(StopVmRequest {
                id: "vm-1".to_owned(),
            }),
        ),
        (
            "fabric.v1.ListHostsRequest",
            round_trip(list_hosts_request()),
        ),
        (
            "fabric.v1.ListHostsResponse",
            round_trip(list_hosts_response()),
        ),
        (
            "fabric.v1.GetHostRequest",
            round_trip(GetHostRequest {
                id: "host-1".to_owned(),
            }),
        ),
        ("fabric.v1.Host", round_trip(host("host-1"))),
        (
            "fabric.v1.CordonHostRequest",
            round_trip(CordonHostRequest {
                id: "host-1".to_owned(),
                reason: "RMA ticket 1234".to_owned(),
            }),
        ),
        (
            "fabric.v1.UncordonHostRequest",
            round_trip(UncordonHostRequest {
                id: "host-1".to_owned(),
            }),
        ),
        (
            "fabric.v1.DrainHostRequest",
            round_trip(DrainHostRequest {
                id: "host-1".to_owned(),
                reason: "kernel upgrade".to_owned(),
            }),
        ),
        (
            "fabric.v1.DeleteImageRequest",
            round_trip(DeleteImageRequest {
                name: "alpine-3.20".to_owned(),
            }),
        ),
        (
            "fabric.v1.DeleteImageResponse",
            round_trip(DeleteImageResponse {
                removed_sha256: vec!["ab".repeat(32)],
                freed_bytes: 4096,
            }),
        ),
        (
            "fabric.v1.RemoveHostRequest",
            round_trip(RemoveHostRequest {
                id: "host-1".to_owned(),
            }),
        ),
        (
            "fabric.v1.RemoveHostResponse",
            round_trip(RemoveHostResponse {}),
        ),
        (
            "fabric.v1.RevokeHostRequest",
            round_trip(RevokeHostRequest {
                name: "host-1".to_owned(),
                reason: "stolen disk".to_owned(),
            }),
        ),
        (
            "fabric.v1.RevokeHostResponse",
            round_trip(RevokeHostResponse {
                newly_revoked: true,
            }),
        ),
        (
            "fabric.v1.ReinstateHostRequest",
            round_trip(ReinstateHostRequest {
                name: "host-1".to_owned(),
            }),
        ),
        (
            "fabric.v1.ReinstateHostResponse",
            round_trip(ReinstateHostResponse { was_revoked: true }),
        ),
        ("fabric.v1.RoleBinding", round_trip(role_binding())),
        (
            "fabric.v1.BindRoleRequest",
            round_trip(fabric_proto::v1::BindRoleRequest {
                binding: Some(role_binding()),
            }),
        ),
        (
            "fabric.v1.BindRoleResponse",
            round_trip(fabric_proto::v1::BindRoleResponse { newly_bound: true }),
        ),
        (
            "fabric.v1.UnbindRoleRequest",
            round_trip(fabric_proto::v1::UnbindRoleRequest {
                binding: Some(role_binding()),
            }),
        ),
        (
            "fabric.v1.UnbindRoleResponse",
            round_trip(fabric_proto::v1::UnbindRoleResponse { was_bound: true }),
        ),
        (
            "fabric.v1.ListRoleBindingsRequest",
            round_trip(fabric_proto::v1::ListRoleBindingsRequest {
                user: "alice".to_owned(),
            }),
        ),
        (
            "fabric.v1.ListRoleBindingsResponse",
            round_trip(fabric_proto::v1::ListRoleBindingsResponse {
                bindings: vec![role_binding()],
            }),
        ),
        ("fabric.v1.ProjectQuota", round_trip(project_quota())),
        (
            "fabric.v1.SetQuotaRequest",
            round_trip(fabric_proto::v1::SetQuotaRequest {
                quota: Some(project_quota()),
            }),
        ),
        (
            "fabric.v1.GetQuotaRequest",
            round_trip(fabric_proto::v1::GetQuotaRequest {
                project: "p1".to_owned(),
            }),
        ),
        ("fabric.v1.AuditEntry", round_trip(audit_entry())),
        (
            "fabric.v1.ListAuditRequest",
            round_trip(fabric_proto::v1::ListAuditRequest {
                after_sequence: 7,
                since: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                identity: "user/alice".to_owned(),
                project: "p1".to_owned(),
                page_size: 100,
            }),
        ),
        (
            "fabric.v1.ListAuditResponse",
            round_trip(fabric_proto::v1::ListAuditResponse {
                entries: vec![audit_entry()],
                last_sequence: 8,
            }),
        ),
        (
            "fabric.v1.CreateJoinTokenRequest",
            round_trip(CreateJoinTokenRequest {
                host_name: "host-1".to_owned(),
                ttl_seconds: 3600,
            }),
        ),
        (
            "fabric.v1.CreateJoinTokenResponse",
            round_trip(CreateJoinTokenResponse {
                token: "fabric-join.0123456789abcdef.secret".to_owned(),
                info: Some(join_token()),
            }),
        ),
        ("fabric.v1.JoinToken", round_trip(join_token())),
        (
            "fabric.v1.ListJoinTokensRequest",
            round_trip(ListJoinTokensRequest {}),
        ),
        (
            "fabric.v1.ListJoinTokensResponse",
            round_trip(ListJoinTokensResponse {
                tokens: vec![join_token()],
            }),
        ),
        (
            "fabric.v1.WatchEventsRequest",
            round_trip(watch_events_request()),
        ),
        ("fabric.v1.Event", round_trip(event(42))),
        // HostLink
        (
            "fabric.v1.RegisterHostRequest",
            round_trip(register_host_request()),
        ),
        (
            "fabric.v1.RegisterHostResponse",
            round_trip(register_host_response("host-1")),
        ),
        (
            "fabric.v1.HeartbeatRequest",
            round_trip(heartbeat_request("host-1")),
        ),
        (
            "fabric.v1.HeartbeatResponse",
            round_trip(heartbeat_response()),
        ),
        (
            "fabric.v1.WatchAssignmentsRequest",
            round_trip(WatchAssignmentsRequest {
                host_id: "host-1".to_owned(),
                session: 3,
            }),
        ),
        (
            "fabric.v1.AssignmentUpdate",
            round_trip(assignment_update(8)),
        ),
        (
            "fabric.v1.JoinHostRequest",
            round_trip(JoinHostRequest {
                token: "fabric-join.0123456789abcdef.secret".to_owned(),
                host_name: "host-1".to_owned(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".to_owned(),
            }),
        ),
        (
            "fabric.v1.JoinHostResponse",
            round_trip(JoinHostResponse {
                certificate_pem: "-----BEGIN CERTIFICATE-----".to_owned(),
            }),
        ),
        (
            "fabric.v1.RenewCertificateRequest",
            round_trip(RenewCertificateRequest {
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".to_owned(),
            }),
        ),
        (
            "fabric.v1.RenewCertificateResponse",
            round_trip(RenewCertificateResponse {
                certificate_pem: "-----BEGIN CERTIFICATE-----".to_owned(),
            }),
        ),
        // Images
        (
            "fabric.v1.PushImageRequest",
            round_trip(PushImageRequest {
                part: Some(push_image_request::Part::Header(push_image_header(
                    KERNEL_SHA256,
                    12 << 20,
                ))),
            }),
        ),
        (
            "fabric.v1.PushImageRequest",
            round_trip(PushImageRequest {
                part: Some(push_image_request::Part::Data(vec![0x7f, b'E', b'L', b'F'])),
            }),
        ),
        (
            "fabric.v1.PushImageResponse",
            round_trip(push_image_response()),
        ),
        (
            "fabric.v1.ListImagesRequest",
            round_trip(ListImagesRequest {
                name: "alpine-3.20".to_owned(),
            }),
        ),
        (
            "fabric.v1.ListImagesResponse",
            round_trip(ListImagesResponse {
                images: vec![image("alpine-3.20"), image("debian-12")],
            }),
        ),
        (
            "fabric.v1.PullImageRequest",
            round_trip(PullImageRequest {
                sha256: KERNEL_SHA256.to_owned(),
                offset: 4096,
            }),
        ),
        (
            "fabric.v1.PullImageResponse",
            round_trip(PullImageResponse {
                part: Some(pull_image_response::Part::Header(pull_image_header())),
            }),
        ),
        (
            "fabric.v1.PullImageResponse",
            round_trip(PullImageResponse {
                part: Some(pull_image_response::Part::Data(vec![1, 2, 3])),
            }),
        ),
        // Agent
        (
            "fabric.v1.ListLocalVmsRequest",
            round_trip(ListLocalVmsRequest {}),
        ),
        (
            "fabric.v1.ListLocalVmsResponse",
            round_trip(ListLocalVmsResponse {
                vms: vec![local_vm("vm-1"), local_vm("vm-2")],
            }),
        ),
        (
            "fabric.v1.GetLocalVmRequest",
            round_trip(GetLocalVmRequest {
                vm_id: "vm-1".to_owned(),
            }),
        ),
        ("fabric.v1.LocalVm", round_trip(local_vm("vm-1"))),
        (
            "fabric.v1.StreamConsoleRequest",
            round_trip(StreamConsoleRequest {
                vm_id: "vm-1".to_owned(),
                start: Some(stream_console_request::Start::Offset(1024)),
                follow: true,
            }),
        ),
        (
            "fabric.v1.StreamConsoleRequest",
            round_trip(StreamConsoleRequest {
                vm_id: "vm-1".to_owned(),
                start: Some(stream_console_request::Start::TailBytes(4096)),
                follow: true,
            }),
        ),
        (
            "fabric.v1.ConsoleChunk",
            round_trip(ConsoleChunk {
                offset: 1024,
                data: b"login: ".to_vec(),
            }),
        ),
        // Vmm
        ("fabric.v1.GetStateRequest", round_trip(GetStateRequest {})),
        (
            "fabric.v1.GetStateResponse",
            round_trip(get_state_response()),
        ),
        (
            "fabric.v1.ShutdownRequest",
            round_trip(ShutdownRequest {
                timeout: Some(dur(30)),
            }),
        ),
        (
            "fabric.v1.ShutdownResponse",
            round_trip(ShutdownResponse {
                path: ShutdownPath::Forced as i32,
                elapsed: Some(dur(30)),
            }),
        ),
        ("fabric.v1.PauseRequest", round_trip(PauseRequest {})),
        ("fabric.v1.PauseResponse", round_trip(PauseResponse {})),
        ("fabric.v1.ResumeRequest", round_trip(ResumeRequest {})),
        ("fabric.v1.ResumeResponse", round_trip(ResumeResponse {})),
        (
            "fabric.v1.SetBalloonTargetRequest",
            round_trip(SetBalloonTargetRequest {
                balloon_target_mib: 2048,
            }),
        ),
        (
            "fabric.v1.SetBalloonTargetResponse",
            round_trip(SetBalloonTargetResponse {
                balloon_target_mib: 2048,
                balloon_actual_mib: 1536,
            }),
        ),
        (
            "fabric.v1.GetMemoryStatsRequest",
            round_trip(GetMemoryStatsRequest {}),
        ),
        (
            "fabric.v1.GetMemoryStatsResponse",
            round_trip(GetMemoryStatsResponse {
                stats: Some(memory_stats()),
            }),
        ),
    ]
}

/// Message descriptors of the compiled contract, by fully qualified name
/// with a leading dot (".fabric.v1.Vm"), nested types included.
struct Descriptors {
    messages: HashMap<String, DescriptorProto>,
    set: FileDescriptorSet,
}

impl Descriptors {
    fn load() -> Self {
        let set = FileDescriptorSet::decode(fabric_proto::FILE_DESCRIPTOR_SET)
            .expect("FILE_DESCRIPTOR_SET decodes");
        let mut messages = HashMap::new();
        for file in &set.file {
            let prefix = format!(".{}", file.package());
            for message in &file.message_type {
                Self::add(&prefix, message, &mut messages);
            }
        }
        Descriptors { messages, set }
    }

    fn add(prefix: &str, message: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            Self::add(&name, nested, out);
        }
        out.insert(name, message.clone());
    }

    /// Records in `problems` every field of `type_name` (and, recursively,
    /// of its message-typed fields) absent from `encoded`. Well-known types
    /// are exempt: a zero `nanos` is a legitimate value.
    fn check_populated(
        &self,
        type_name: &str,
        encoded: &[u8],
        path: &str,
        problems: &mut Vec<String>,
    ) {
        if type_name.starts_with(".google.protobuf.") {
            return;
        }
        let Some(descriptor) = self.messages.get(type_name) else {
            problems.push(format!("{path}: no descriptor for {type_name}"));
            return;
        };
        let fields = match wire_fields(encoded) {
            Ok(fields) => fields,
            Err(error) => {
                problems.push(format!("{path}: malformed encoding: {error}"));
                return;
            }
        };
        let present: BTreeSet<u32> = fields.iter().map(|(number, _)| *number).collect();

        // Members of a real oneof need only one present per group; proto3
        // `optional` fields sit in synthetic oneofs but must be present.
        let mut oneof_groups: HashMap<i32, Vec<&str>> = HashMap::new();
        let mut oneof_present: BTreeSet<i32> = BTreeSet::new();
        for field in &descriptor.field {
            let number = field.number() as u32;
            match field.oneof_index {
                Some(group) if !field.proto3_optional() => {
                    oneof_groups.entry(group).or_default().push(field.name());
                    if present.contains(&number) {
                        oneof_present.insert(group);
                    }
                }
                _ if !present.contains(&number) => {
                    problems.push(format!("{path}.{} is not set", field.name()));
                }
                _ => {}
            }
        }
        for (group, members) in oneof_groups {
            if !oneof_present.contains(&group) {
                problems.push(format!("{path}: none of oneof {members:?} is set"));
            }
        }

        for (number, value) in fields {
            let Some(field) = descriptor
                .field
                .iter()
                .find(|field| field.number() as u32 == number)
            else {
                problems.push(format!("{path}: unknown field number {number}"));
                continue;
            };
            if field.r#type() == Type::Message {
                if let WireValue::Bytes(nested) = value {
                    let nested_path = format!("{path}.{}", field.name());
                    self.check_populated(field.type_name(), nested, &nested_path, problems);
                }
            }
        }
    }

    /// Fully qualified names (without leading dot) of every input and
    /// output message of every `fabric.v1` RPC.
    fn rpc_messages(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for file in self.set.file.iter().filter(|f| f.package() == "fabric.v1") {
            for service in &file.service {
                for method in &service.method {
                    for type_name in [method.input_type(), method.output_type()] {
                        names.insert(type_name.trim_start_matches('.').to_owned());
                    }
                }
            }
        }
        names
    }
}

/// One field occurrence on the wire.
enum WireValue<'a> {
    /// Varint, fixed32 or fixed64.
    Scalar,
    /// Length-delimited: a string, bytes, a message or a packed array.
    Bytes(&'a [u8]),
}

/// Splits a protobuf encoding into (field number, value) pairs, in order.
fn wire_fields(mut buf: &[u8]) -> Result<Vec<(u32, WireValue<'_>)>, String> {
    fn varint(buf: &mut &[u8]) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".to_owned())
    }
    fn take<'a>(buf: &mut &'a [u8], len: usize) -> Result<&'a [u8], String> {
        if buf.len() < len {
            return Err(format!("field of {len} bytes, {} left", buf.len()));
        }
        let (head, rest) = buf.split_at(len);
        *buf = rest;
        Ok(head)
    }

    let mut fields = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = u32::try_from(key >> 3).map_err(|_| format!("field number {key}"))?;
        let value = match key & 7 {
            0 => varint(&mut buf).map(|_| WireValue::Scalar)?,
            1 => take(&mut buf, 8).map(|_| WireValue::Scalar)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|e| e.to_string())?;
                WireValue::Bytes(take(&mut buf, len)?)
            }
            5 => take(&mut buf, 4).map(|_| WireValue::Scalar)?,
            wire_type => return Err(format!("unexpected wire type {wire_type}")),
        };
        fields.push((number, value));
    }
    Ok(fields)
}

#[test]
fn every_sample_round_trips_with_every_field_populated() {
    let descriptors = Descriptors::load();
    let mut problems = Vec::new();
    for (name, encoded) in samples() {
        descriptors.check_populated(&format!(".{name}"), &encoded, name, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "samples leave fields unset:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_rpc_message_of_every_service_has_a_sample() {
    let descriptors = Descriptors::load();
    let rpc_messages = descriptors.rpc_messages();
    let sampled: BTreeSet<String> = samples()
        .into_iter()
        .map(|(name, _)| name.to_owned())
        .collect();
    let missing: Vec<&String> = rpc_messages.difference(&sampled).collect();
    assert!(
        missing.is_empty(),
        "RPC messages without a sample: {missing:?}"
    );
    // 27 RPCs use 48 distinct messages; far fewer would mean the descriptor
    // walk is broken and the check above vacuous.
    assert!(
        rpc_messages.len() >= 48,
        "only {} RPC messages found",
        rpc_messages.len()
    );
}

#[test]
fn the_populated_check_catches_an_unset_field() {
    // The check above must be able to fail: drop one nested field.
    let mut incomplete = vm("vm-1", "web-1");
    if let Some(spec) = incomplete.spec.as_mut() {
        spec.kernel_cmdline.clear();
    }
    let mut problems = Vec::new();
    Descriptors::load().check_populated(
        ".fabric.v1.Vm",
        &round_trip(incomplete),
        "Vm",
        &mut problems,
    );
    assert_eq!(problems, ["Vm.spec.kernel_cmdline is not set"]);
}

#[test]
fn service_names_match_the_descriptor_set() {
    let descriptors = Descriptors::load();
    let mut in_descriptors: Vec<String> = descriptors
        .set
        .file
        .iter()
        .filter(|f| f.package() == "fabric.v1")
        .flat_map(|f| f.service.iter().map(|s| format!("fabric.v1.{}", s.name())))
        .collect();
    in_descriptors.sort();
    let mut constants: Vec<String> = fabric_proto::SERVICE_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    constants.sort();
    assert_eq!(constants, in_descriptors);
}

fn role_binding() -> fabric_proto::v1::RoleBinding {
    fabric_proto::v1::RoleBinding {
        user: "alice".to_owned(),
        role: fabric_proto::v1::Role::Operator as i32,
        project: "p1".to_owned(),
    }
}

fn project_quota() -> fabric_proto::v1::ProjectQuota {
    fabric_proto::v1::ProjectQuota {
        project: "p1".to_owned(),
        vcpus: 8,
        memory_mib: 8192,
        vms: 4,
        used_vcpus: 6,
        used_memory_mib: 4096,
        used_vms: 3,
    }
}

fn audit_entry() -> fabric_proto::v1::AuditEntry {
    fabric_proto::v1::AuditEntry {
        sequence: 8,
        time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        identity: "user/alice".to_owned(),
        roles: vec!["operator@p1".to_owned()],
        project: "p1".to_owned(),
        rpc: "/fabric.v1.Compute/DeleteVm".to_owned(),
        target: "vm/vm-0123456789abcdef".to_owned(),
        code: 5,
        message: "no VM with id".to_owned(),
        request_sha256: "ab".repeat(32),
    }
}

fn join_token() -> JoinToken {
    JoinToken {
        id: "0123456789abcdef".to_owned(),
        host_name: "host-1".to_owned(),
        expires_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        created_by: "user/admin".to_owned(),
        used_at: Some(prost_types::Timestamp {
            seconds: 1_600_000_000,
            nanos: 0,
        }),
    }
}
