//! The controller's side of the scheduler: converts stored hosts and VMs into the
//! scheduler's plain inputs and keeps its snapshot in step with the store.

use fabric_proto::v1::{Host, HostState, Vm};

use crate::scheduler::{self, Demand, HostSpec, SchedulerConfig, Strategy};

/// Placement label that asks for the spread strategy instead of bin-packing.
pub const STRATEGY_LABEL: &str = "fabric.placement/strategy";

pub struct Placer {
    scheduler: scheduler::Scheduler,
}

/// A host's state as the scheduler knows it.
pub fn host_state(state: HostState) -> scheduler::HostState {
    match state {
        HostState::Ready | HostState::Unspecified => scheduler::HostState::Ready,
        HostState::Suspect => scheduler::HostState::Suspect,
        HostState::Dead => scheduler::HostState::Dead,
        HostState::Cordoned => scheduler::HostState::Cordoned,
        HostState::Draining => scheduler::HostState::Draining,
    }
}

/// The host disk space a VM's logs may take, MiB: fabric-vmm's log and the console, each
/// rotated once at 8 MiB.
pub const LOG_DISK_MIB: u64 = 32;

/// The host disk space a VM's spec asks for on its own, MiB: its sparse disks at full size
/// and its logs. The sizes of image files (rootfs, image disks) come on top: the controller
/// adds them at CreateVm into `Vm.disk_mib`.
pub fn spec_disk_mib(spec: &fabric_proto::v1::VmSpec) -> u64 {
    use fabric_proto::v1::disk_spec::Source;
    spec.disks
        .iter()
        .filter_map(|d| match d.source {
            Some(Source::SizeMib(size)) => Some(size),
            _ => None,
        })
        .fold(LOG_DISK_MIB, u64::saturating_add)
}

/// The host disk space a VM reserves, MiB: `Vm.disk_mib`, and at least what its spec alone
/// asks for (a VM stored before disk accounting has no `disk_mib`).
pub fn disk_mib(vm: &Vm) -> u64 {
    let from_spec = vm.spec.as_ref().map_or(LOG_DISK_MIB, spec_disk_mib);
    vm.disk_mib.max(from_spec)
}

/// What a VM asks of its host.
pub fn demand(vm: &Vm) -> Demand {
    let spec = vm.spec.clone().unwrap_or_default();
    let memory = spec.memory.unwrap_or_default();
    let placement = spec.placement.unwrap_or_default();
    let strategy = match placement.labels.get(STRATEGY_LABEL).map(String::as_str) {
        Some("spread") => Strategy::Spread,
        _ => Strategy::BinPack,
    };
    // Availability sets and labels are a project's own: a VM of another project neither
    // repels nor is repelled by them, and so cannot probe where this project's VMs run.
    let project = match spec.project.as_str() {
        "" => crate::authz::DEFAULT_PROJECT,
        p => p,
    };
    let scoped = |pairs: std::collections::HashMap<String, String>| {
        pairs
            .into_iter()
            .map(|(k, v)| (format!("{project}/{k}"), v))
            .collect()
    };
    let availability_set = match placement.availability_set.as_str() {
        "" => String::new(),
        set => format!("{project}/{set}"),
    };
    Demand {
        vcpus: spec.vcpus,
        zone: placement.zone,
        availability_set,
        anti_affinity_labels: scoped(placement.anti_affinity_labels),
        labels: scoped(placement.labels),
        strategy,
        disk_mib: disk_mib(vm),
        ..Demand::default()
    }
    .with_memory_spec(memory.startup_mib, memory.minimum_mib, memory.maximum_mib)
}

impl Placer {
    pub fn new(cpu_overcommit: f64) -> Placer {
        Placer {
            scheduler: scheduler::Scheduler::new(SchedulerConfig {
                cpu_overcommit,
                ..SchedulerConfig::default()
            }),
        }
    }

    /// Adds or updates a host with its current state.
    pub fn sync_host(&mut self, host: &Host, state: HostState) {
        let allocatable = host.allocatable.unwrap_or_default();
        let spec = HostSpec {
            id: host.id.clone(),
            zone: host.zone.clone(),
            fault_domain: host.fault_domain,
            update_domain: host.update_domain,
            allocatable_cpus: allocatable.cpus,
            allocatable_memory_mib: allocatable.memory_mib,
            allocatable_disk_mib: (allocatable.disk_mib > 0).then_some(allocatable.disk_mib),
            labels: host.labels.clone().into_iter().collect(),
            state: host_state(state),
        };
        let result = if self.scheduler.host(&spec.id).is_some() {
            self.scheduler.update_host(spec)
        } else {
            self.scheduler.add_host(spec)
        };
        if let Err(e) = result {
            tracing::warn!(host = %host.id, error = %e, "scheduler bookkeeping");
        }
    }

    /// Counts a VM on its host (replacing any earlier count of it).
    pub fn assign(&mut self, vm: &Vm, host_id: &str) {
        let _ = self.scheduler.release(&vm.id);
        if let Err(e) = self.scheduler.assign(&vm.id, host_id, &demand(vm)) {
            tracing::warn!(vm = %vm.id, host = %host_id, error = %e, "scheduler bookkeeping");
        }
    }

    /// Stops counting a VM.
    pub fn release(&mut self, vm_id: &str) {
        // Releasing a VM the scheduler does not count is a no-op.
        let _ = self.scheduler.release(vm_id);
    }

    /// The snapshot itself, for the questions beyond `place` (memory relief).
    pub fn scheduler_mut(&mut self) -> &mut scheduler::Scheduler {
        &mut self.scheduler
    }

    /// The host for a VM, or why none fits.
    pub fn place(&self, vm: &Vm) -> Result<String, String> {
        self.scheduler
            .place(&demand(vm))
            .map(|d| d.host_id)
            .map_err(|u| u.to_string())
    }

    /// The host for a VM on any host but `avoid`, or why none fits.
    pub fn place_avoiding(&mut self, vm: &Vm, avoid: &str) -> Result<String, String> {
        self.scheduler
            .place_elsewhere(&vm.id, &demand(vm), avoid)
            .map(|d| d.host_id)
            .map_err(|u| u.to_string())
    }
}

#[cfg(test)]
mod project_scope_tests {
    use super::*;

    fn vm(project: &str) -> Vm {
        let mut spec = fabric_proto::v1::VmSpec {
            project: project.into(),
            vcpus: 1,
            ..Default::default()
        };
        spec.placement = Some(fabric_proto::v1::Placement {
            availability_set: "web".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
            anti_affinity_labels: [("app".to_string(), "db".to_string())].into(),
            ..Default::default()
        });
        Vm {
            spec: Some(spec),
            ..Default::default()
        }
    }

    /// Two projects' VMs with the same labels, anti-affinity and set share none of them in
    /// the scheduler's eyes; within a project they do (and "" is the default project).
    #[test]
    fn labels_and_sets_are_a_projects_own() {
        let (p1, p2) = (demand(&vm("p1")), demand(&vm("p2")));
        assert_ne!(p1.availability_set, p2.availability_set);
        assert!(p1
            .labels
            .iter()
            .all(|(k, v)| p2.anti_affinity_labels.get(k) != Some(v)));
        assert!(p2
            .labels
            .iter()
            .all(|(k, v)| p1.anti_affinity_labels.get(k) != Some(v)));
        let again = demand(&vm("p1"));
        assert_eq!(p1.availability_set, again.availability_set);
        assert!(p1
            .labels
            .iter()
            .all(|(k, v)| again.anti_affinity_labels.get(k) == Some(v)));
        assert_eq!(
            demand(&vm("")).availability_set,
            demand(&vm("default")).availability_set
        );
    }
}
