//! The VMs the tests and benchmarks ask for: one builder of a [`VmSpec`] for the fields every
//! test sets (name, memory, boot image, restart policy), the rest left to `..` updates, and
//! the [`Assignment`] an agent under test receives.

use fabric_proto::v1::{Assignment, BootImage, DesiredState, MemorySpec, RestartPolicy, VmSpec};

/// A kernel digest for VMs whose kernel is never run (simulated hosts, the controller alone).
pub fn placeholder_sha256() -> String {
    "0".repeat(64)
}

/// `startup_mib` of memory, and, when not 0, the `minimum_mib` and `maximum_mib` the memory
/// balancer keeps the VM within.
pub fn memory(startup_mib: u64, minimum_mib: u64, maximum_mib: u64) -> MemorySpec {
    MemorySpec {
        startup_mib,
        minimum_mib,
        maximum_mib,
        ..Default::default()
    }
}

/// VM `name` of 1 vCPU and `memory`, booting the kernel `kernel_sha256` of image `image_name`,
/// restarted as `restart_policy` says.
pub fn vm_spec(
    name: &str,
    memory: MemorySpec,
    image_name: &str,
    kernel_sha256: &str,
    restart_policy: RestartPolicy,
) -> VmSpec {
    VmSpec {
        name: name.to_string(),
        vcpus: 1,
        memory: Some(memory),
        image: Some(BootImage {
            name: image_name.to_string(),
            kernel_sha256: kernel_sha256.to_string(),
            ..Default::default()
        }),
        restart_policy: restart_policy as i32,
        ..Default::default()
    }
}

/// VM `name` of 1 vCPU and 256 MiB, with a kernel that is never run (see
/// [`placeholder_sha256`]): what simulated hosts and the controller's own tests place.
pub fn simulated_vm(name: &str) -> VmSpec {
    vm_spec(
        name,
        memory(256, 0, 0),
        "",
        &placeholder_sha256(),
        RestartPolicy::Unspecified,
    )
}

/// `spec` assigned to run as `vm_id`, at generation 1.
pub fn assignment(vm_id: &str, spec: VmSpec) -> Assignment {
    Assignment {
        vm_id: vm_id.to_string(),
        spec: Some(spec),
        desired_state: DesiredState::Running as i32,
        generation: 1,
    }
}
