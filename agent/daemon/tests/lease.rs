//! The agent's lease and fence against the timing faults that could run a VM twice (issue 14),
//! on simulated hosts (no guest boots) against the in-test controller
//! (`tests/support/src/hostlink.rs`):
//!
//! - a restarted agent with a still-valid lease file starts nothing until it has read the
//!   current assignment set; what that set no longer holds is removed when it arrives.

use fabric_test_support::{host, hostlink};

use std::time::Duration;

use fabric_proto::v1::{
    Assignment, BootImage, DesiredState, MemorySpec, ObservedPhase, ObservedVm, RestartPolicy,
    VmSpec,
};
use host::{HostOptions, TestHost, AGENT_TIMEOUT};
use hostlink::FakeController;

fn phase(vm: &ObservedVm) -> ObservedPhase {
    ObservedPhase::try_from(vm.phase).unwrap_or(ObservedPhase::Unspecified)
}

/// A simulated VM (restart policy `always`); the simulated backend never reads its kernel.
fn sim_assignment(vm_id: &str) -> Assignment {
    Assignment {
        vm_id: vm_id.to_string(),
        spec: Some(VmSpec {
            name: vm_id.to_string(),
            vcpus: 1,
            memory: Some(MemorySpec {
                startup_mib: 256,
                ..Default::default()
            }),
            image: Some(BootImage {
                name: "default".into(),
                kernel_sha256: "0".repeat(64),
                ..Default::default()
            }),
            restart_policy: RestartPolicy::Always as i32,
            ..Default::default()
        }),
        desired_state: DesiredState::Running as i32,
        generation: 1,
    }
}

/// A simulated VM does not survive its agent (nothing to re-adopt), and the record says it
/// should run under restart policy `always`: what a KVM host has after a VMM died while the
/// agent was down. The restarted agent finds a still-valid lease file; before it has read the
/// current assignments it must not start the VM (the controller may have moved it meanwhile),
/// and a VM the current set no longer holds is removed as soon as the set arrives.
#[test]
fn a_restarted_agent_starts_nothing_until_it_has_read_the_current_assignments() {
    let mut host = TestHost::new(HostOptions::sim());
    // A lease long enough to be valid across the restart.
    let controller = FakeController::start_with(
        &host.controller_socket,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    controller.set_assignments(vec![sim_assignment("kept"), sim_assignment("moved")]);
    for vm_id in ["kept", "moved"] {
        controller.wait_observed(vm_id, Duration::from_secs(30), |o| {
            phase(o) == ObservedPhase::Running
        });
    }

    host.kill9();
    let lease = fabric_vmm_api::lease::LeaseFile::read(&host.data_dir.join("lease.json"))
        .expect("the lease file");
    assert!(
        lease.remaining() > Duration::from_secs(30),
        "the lease file is not valid across the restart: {lease:?}"
    );
    // Meanwhile the controller moved "moved" elsewhere; the restarted agent hears nothing of
    // it until the stream answers.
    controller.withhold_assignments();
    controller.set_assignments(vec![sim_assignment("kept")]);
    let mark = controller.mark();
    host.restart();
    controller.wait_registrations(&host.machine_id, 2, AGENT_TIMEOUT);
    // Five heartbeats (about 5 s, fifty times the simulated start delay) with the stream open
    // and silent: neither VM may run.
    controller.wait_heartbeat(mark + 5, Duration::from_secs(30), "five heartbeats", |_| {
        true
    });
    for vm_id in ["kept", "moved"] {
        let history = controller.observed_history(vm_id, mark);
        assert!(
            !history.is_empty(),
            "{vm_id} not reported after the restart"
        );
        for (seq, o) in &history {
            assert!(
                phase(o) != ObservedPhase::Running && o.started_at.is_none(),
                "{vm_id} was started (heartbeat #{seq}) before the restarted agent read the current assignments: {o:#?}"
            );
        }
        let (_, last) = history.last().expect("a report");
        assert!(
            last.message.contains("waiting for"),
            "{vm_id}: the report does not say what it waits for: {last:?}"
        );
    }
    assert!(
        controller.open_watch_streams() >= 1,
        "the restarted agent has no assignment stream open"
    );

    // The current set arrives: "kept" starts, "moved" is gone from the host.
    let released = controller.mark();
    controller.release_assignments();
    controller.wait_observed_after(released, "kept", Duration::from_secs(30), |o| {
        phase(o) == ObservedPhase::Running
    });
    controller.wait_heartbeat(
        released,
        Duration::from_secs(30),
        "\"moved\" no longer reported",
        |hb| hb.vms.iter().all(|vm| vm.vm_id != "moved"),
    );
    assert!(
        controller
            .observed_history("moved", mark)
            .iter()
            .all(|(_, o)| phase(o) != ObservedPhase::Running),
        "\"moved\" ran on the restarted host"
    );
    assert!(
        !host.vm_dir("moved").exists(),
        "\"moved\" left its directory"
    );
    host.assert_agent_running();
}
