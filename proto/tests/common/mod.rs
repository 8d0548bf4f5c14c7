//! Fully populated sample values of every `fabric.v1` message that crosses
//! an RPC, shared by the round-trip and loopback tests. "Fully populated"
//! is checked, not assumed: `roundtrip.rs` verifies against the descriptor
//! set that every field of every sample is present on the wire.

use fabric_proto::v1::*;
use prost_types::{Duration, Timestamp};

/// A timestamp with non-zero seconds and nanoseconds.
pub fn ts(seconds: i64) -> Timestamp {
    Timestamp {
        seconds,
        nanos: 250_000_000,
    }
}

/// A duration with non-zero seconds and nanoseconds.
pub fn dur(seconds: i64) -> Duration {
    Duration {
        seconds,
        nanos: 500_000_000,
    }
}

pub const KERNEL_SHA256: &str = "1111111111111111111111111111111111111111111111111111111111111111";
pub const INITRAMFS_SHA256: &str =
    "2222222222222222222222222222222222222222222222222222222222222222";
pub const ROOTFS_SHA256: &str = "3333333333333333333333333333333333333333333333333333333333333333";

pub fn resources(cpus: u32, memory_mib: u64) -> Resources {
    Resources {
        cpus,
        memory_mib,
        disk_mib: 64 * 1024,
    }
}

pub fn memory_spec() -> MemorySpec {
    MemorySpec {
        startup_mib: 1024,
        minimum_mib: 512,
        maximum_mib: 4096,
        buffer_percent: 20,
        weight: 5000,
    }
}

pub fn vm_spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.to_owned(),
        project: "web".to_owned(),
        vcpus: 2,
        memory: Some(memory_spec()),
        image: Some(BootImage {
            name: "alpine-3.20".to_owned(),
            kernel_sha256: KERNEL_SHA256.to_owned(),
            initramfs_sha256: INITRAMFS_SHA256.to_owned(),
            rootfs_sha256: ROOTFS_SHA256.to_owned(),
        }),
        kernel_cmdline: "quiet loglevel=3".to_owned(),
        nics: vec![NicSpec {
            network: "default".to_owned(),
            mac: "52:54:00:12:34:56".to_owned(),
        }],
        disks: vec![
            DiskSpec {
                source: Some(disk_spec::Source::SizeMib(10_240)),
                read_only: true,
            },
            DiskSpec {
                source: Some(disk_spec::Source::ImageSha256(ROOTFS_SHA256.to_owned())),
                read_only: true,
            },
        ],
        placement: Some(Placement {
            zone: "zone-a".to_owned(),
            availability_set: "web".to_owned(),
            anti_affinity_labels: [("app".to_owned(), "web".to_owned())].into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
        }),
        restart_policy: RestartPolicy::OnFailure as i32,
    }
}

pub fn memory_stats() -> MemoryStats {
    MemoryStats {
        swap_in_bytes: Some(4096),
        swap_out_bytes: Some(8192),
        major_faults: Some(12),
        minor_faults: Some(34_567),
        free_bytes: Some(512 << 20),
        total_bytes: Some(3 << 30),
        available_bytes: Some(1 << 30),
        disk_caches_bytes: Some(256 << 20),
        hugetlb_allocations: Some(1),
        hugetlb_failures: Some(2),
        balloon_actual_mib: 1024,
        balloon_target_mib: 1000,
        updated_at: Some(ts(1_700_000_100)),
    }
}

pub fn observed_vm(vm_id: &str) -> ObservedVm {
    ObservedVm {
        vm_id: vm_id.to_owned(),
        phase: ObservedPhase::Running as i32,
        pid: 4242,
        started_at: Some(ts(1_700_000_000)),
        message: "guest booted".to_owned(),
        last_error: "vmm exited with status 1".to_owned(),
        restart_count: 1,
        memory: Some(memory_stats()),
        generation: 3,
        memory_balance: Some(VmMemoryBalance {
            target_mib: 1500,
            demand_mib: Some(1100),
            reason: "host short: shared by weight".to_owned(),
            pressured: true,
        }),
    }
}

pub fn host_usage() -> HostUsage {
    HostUsage {
        running_vms: 3,
        vcpus: 6,
        memory_used_mib: 20_000,
        memory_available_mib: 44_000,
        vm_memory_mib: 9_000,
        disk_total_mib: 400_000,
        disk_available_mib: 120_000,
        memory_pressure: Some(MemoryPressure {
            some_avg10_percent: 1.5,
            full_avg10_percent: 0.25,
        }),
        memory_balance: Some(HostMemoryBalance {
            budget_mib: 8192,
            demand_mib: 7000,
            wanted_mib: 9000,
            assigned_mib: 8192,
            minimum_mib: 4096,
            short: true,
            pressured_vms: 2,
        }),
    }
}

pub fn vm(id: &str, name: &str) -> Vm {
    Vm {
        id: id.to_owned(),
        spec: Some(vm_spec(name)),
        status: Some(VmStatus {
            desired_state: DesiredState::Running as i32,
            phase: VmPhase::Running as i32,
            host_id: "host-1".to_owned(),
            reason: "restarted after crash".to_owned(),
            observed: Some(observed_vm(id)),
            phase_changed_at: Some(ts(1_700_000_050)),
        }),
        generation: 3,
        created_at: Some(ts(1_699_999_000)),
        updated_at: Some(ts(1_700_000_050)),
        disk_mib: 10_240 + 32,
    }
}

pub fn host(id: &str) -> Host {
    Host {
        id: id.to_owned(),
        name: "rack1-node7".to_owned(),
        zone: "zone-a".to_owned(),
        fault_domain: 1,
        update_domain: 2,
        capacity: Some(resources(64, 262_144)),
        allocatable: Some(resources(60, 253_952)),
        allocated: Some(resources(12, 24_576)),
        usage: Some(host_usage()),
        labels: [("cpu".to_owned(), "epyc".to_owned())].into(),
        state: HostState::Cordoned as i32,
        cordoned: true,
        cordon_reason: "RMA ticket 1234".to_owned(),
        agent_address: "10.0.0.7:7001".to_owned(),
        last_heartbeat_at: Some(ts(1_700_000_200)),
        lease_expires_at: Some(ts(1_700_000_210)),
        registered_at: Some(ts(1_699_000_000)),
        agent_session: 3,
        agent_session_held: true,
        agent_boot_id: "6a1c0e3b-2f4d-4c8e-9b7a-1d2e3f405162".to_owned(),
    }
}

pub fn event(sequence: u64) -> Event {
    Event {
        sequence,
        time: Some(ts(1_700_000_000 + sequence as i64)),
        kind: EventKind::VmPhaseChanged as i32,
        vm_id: "vm-1".to_owned(),
        host_id: "host-1".to_owned(),
        reason: "GuestBooted".to_owned(),
        message: "vm-1 is running on host-1".to_owned(),
        vm_phase: VmPhase::Running as i32,
        host_state: HostState::Ready as i32,
    }
}

pub fn assignment(vm_id: &str, name: &str) -> Assignment {
    Assignment {
        vm_id: vm_id.to_owned(),
        spec: Some(vm_spec(name)),
        desired_state: DesiredState::Stopped as i32,
        generation: 7,
    }
}

pub fn image_file(role: ImageFileRole, sha256: &str, size_bytes: u64) -> ImageFile {
    ImageFile {
        role: role as i32,
        sha256: sha256.to_owned(),
        size_bytes,
        file_name: "bzImage".to_owned(),
        pushed_at: Some(ts(1_700_000_300)),
    }
}

pub fn image(name: &str) -> Image {
    Image {
        name: name.to_owned(),
        files: vec![
            image_file(ImageFileRole::Kernel, KERNEL_SHA256, 12 << 20),
            image_file(ImageFileRole::Initramfs, INITRAMFS_SHA256, 3 << 20),
        ],
        project: "web".to_owned(),
    }
}

pub fn local_vm(vm_id: &str) -> LocalVm {
    LocalVm {
        vm_id: vm_id.to_owned(),
        spec: Some(vm_spec("web-1")),
        desired_state: DesiredState::Running as i32,
        generation: 3,
        observed: Some(observed_vm(vm_id)),
        vmm_socket_path: format!("/run/fabric/vms/{vm_id}/vmm.sock"),
    }
}

// ---- Compute ----

pub fn create_vm_request() -> CreateVmRequest {
    CreateVmRequest {
        spec: Some(vm_spec("web-1")),
        desired_state: DesiredState::Stopped as i32,
    }
}

pub fn list_vms_request() -> ListVmsRequest {
    ListVmsRequest {
        host_id: "host-1".to_owned(),
        name: "web-1".to_owned(),
        phase: VmPhase::Pending as i32,
        page_size: 100,
        page_token: "vm-100".to_owned(),
    }
}

pub fn list_vms_response() -> ListVmsResponse {
    ListVmsResponse {
        vms: vec![vm("vm-1", "web-1"), vm("vm-2", "web-2")],
        next_page_token: "vm-2".to_owned(),
    }
}

pub fn list_hosts_request() -> ListHostsRequest {
    ListHostsRequest {
        zone: "zone-a".to_owned(),
        state: HostState::Ready as i32,
        page_size: 50,
        page_token: "host-50".to_owned(),
    }
}

pub fn list_hosts_response() -> ListHostsResponse {
    ListHostsResponse {
        hosts: vec![host("host-1"), host("host-2")],
        next_page_token: "host-2".to_owned(),
    }
}

pub fn watch_events_request() -> WatchEventsRequest {
    WatchEventsRequest {
        since_sequence: 41,
        vm_id: "vm-1".to_owned(),
        host_id: "host-1".to_owned(),
    }
}

// ---- HostLink ----

pub fn register_host_request() -> RegisterHostRequest {
    RegisterHostRequest {
        machine_id: "4f0c3c7e2b9a4d1e8f6a5b4c3d2e1f00".to_owned(),
        name: "rack1-node7".to_owned(),
        zone: "zone-a".to_owned(),
        fault_domain: 1,
        update_domain: 2,
        capacity: Some(resources(64, 262_144)),
        allocatable: Some(resources(60, 253_952)),
        labels: [("cpu".to_owned(), "epyc".to_owned())].into(),
        agent_address: "10.0.0.7:7001".to_owned(),
        agent_version: "0.1.0".to_owned(),
        previous_session: 2,
        boot_id: "6a1c0e3b-2f4d-4c8e-9b7a-1d2e3f405162".to_owned(),
    }
}

pub fn register_host_response(host_id: &str) -> RegisterHostResponse {
    RegisterHostResponse {
        host_id: host_id.to_owned(),
        lease_ttl: Some(dur(10)),
        heartbeat_interval: Some(dur(2)),
        lease_expires_at: Some(ts(1_700_000_010)),
        session: 3,
    }
}

pub fn heartbeat_request(host_id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        host_id: host_id.to_owned(),
        capacity: Some(resources(64, 262_144)),
        usage: Some(host_usage()),
        vms: vec![observed_vm("vm-1"), observed_vm("vm-2")],
        assignments_generation: 7,
        session: 3,
    }
}

pub fn heartbeat_response() -> HeartbeatResponse {
    HeartbeatResponse {
        lease_ttl: Some(dur(10)),
        lease_expires_at: Some(ts(1_700_000_020)),
    }
}

pub fn assignment_update(generation: u64) -> AssignmentUpdate {
    AssignmentUpdate {
        generation,
        full: true,
        upserts: vec![assignment("vm-1", "web-1")],
        removed_vm_ids: vec!["vm-9".to_owned()],
        continued: true,
    }
}

// ---- Images ----

pub fn push_image_header(sha256: &str, size_bytes: u64) -> PushImageHeader {
    PushImageHeader {
        image_name: "alpine-3.20".to_owned(),
        role: ImageFileRole::Kernel as i32,
        sha256: sha256.to_owned(),
        size_bytes,
        file_name: "bzImage".to_owned(),
        project: "web".to_owned(),
    }
}

pub fn push_image_response() -> PushImageResponse {
    PushImageResponse {
        image: Some(image("alpine-3.20")),
        file: Some(image_file(ImageFileRole::Kernel, KERNEL_SHA256, 12 << 20)),
        already_stored: true,
    }
}

pub fn pull_image_header() -> PullImageHeader {
    PullImageHeader {
        sha256: KERNEL_SHA256.to_owned(),
        size_bytes: 12 << 20,
        offset: 4096,
    }
}

// ---- Vmm ----

pub fn get_state_response() -> GetStateResponse {
    GetStateResponse {
        vm_id: "vm-1".to_owned(),
        state: VmmState::Running as i32,
        vcpus: 2,
        memory_mib: 4096,
        pid: 4242,
        started_at: Some(ts(1_700_000_000)),
        uptime: Some(dur(3600)),
        boot_time: Some(Duration {
            seconds: 0,
            nanos: 180_000_000,
        }),
    }
}
