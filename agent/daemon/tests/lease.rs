//! The agent's lease and fence against the timing faults that could run a VM twice (issue 14),
//! on simulated hosts (no guest boots) against the in-test controller
//! (`tests/support/src/hostlink.rs`):
//!
//! - a restarted agent with a still-valid lease file starts nothing until it has read the
//!   current assignment set; what that set no longer holds is removed when it arrives;
//! - a heartbeat answered after a suspend (CLOCK_BOOTTIME jumped, CLOCK_MONOTONIC did not; made
//!   with the test-only clock offset `FABRIC_TEST_BOOTTIME_OFFSET_FILE`) does not renew the
//!   lease: the host fences.

use fabric_test_support::{host, hostlink};

use std::time::{Duration, Instant};

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

fn agent_log(host: &TestHost) -> String {
    std::fs::read_to_string(&host.log_path).unwrap_or_default()
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

/// A host suspended with a heartbeat in flight: CLOCK_BOOTTIME goes on while it sleeps,
/// CLOCK_MONOTONIC does not, and the answer comes at once after the wake-up. The lease ran out
/// during the suspend (the controller may have declared the host dead and moved its VMs), so
/// the answer must not renew it and the host must fence. The suspend is shown to the agent
/// with the test-only offset on its lease clock; the machine's clocks are untouched.
#[test]
fn a_heartbeat_answered_after_a_suspend_does_not_renew_the_lease() {
    let mut host = TestHost::new(HostOptions::sim());
    let offset_file = host.dir.path().join("boottime-offset-ms");
    std::fs::write(&offset_file, "0").expect("offset file");
    host.agent_env.push((
        "FABRIC_TEST_BOOTTIME_OFFSET_FILE".into(),
        offset_file.display().to_string(),
    ));
    let controller = FakeController::start_with(
        &host.controller_socket,
        Duration::from_secs(4),
        Duration::from_secs(1),
    );
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    controller.set_assignments(vec![sim_assignment("sim-a")]);
    let before = controller.wait_observed("sim-a", Duration::from_secs(30), |o| {
        phase(o) == ObservedPhase::Running
    });

    // A heartbeat is in flight...
    controller.hold_heartbeats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while controller.heartbeats_held() == 0 {
        assert!(Instant::now() < deadline, "no heartbeat arrived to hold");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mark = controller.mark();
    // ...the host sleeps for an hour, wakes, and the answer arrives at once.
    std::fs::write(&offset_file, "3600000").expect("offset file");
    controller.release_heartbeats();

    let fenced = controller.wait_observed_after(mark, "sim-a", Duration::from_secs(20), |o| {
        phase(o) != ObservedPhase::Running && o.last_error.contains("fenced")
    });
    assert_eq!(fenced.pid, 0, "{fenced:?}");
    let log = agent_log(&host);
    assert!(
        log.contains("a heartbeat answer came after its lease had run out"),
        "the late answer was not refused; agent log:\n{}",
        host::tail_lines(&log, 40)
    );
    // Later heartbeats, sent after the wake-up, renew the lease; the VM runs again once the
    // assignments have been read again.
    let after = controller.wait_observed_after(mark, "sim-a", Duration::from_secs(30), |o| {
        phase(o) == ObservedPhase::Running && o.started_at != before.started_at
    });
    assert!(after.started_at.is_some(), "{after:?}");
    host.assert_agent_running();
}
