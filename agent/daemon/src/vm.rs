//! One task per VM: it owns the VM's record and running instance, and converges them to what
//! the controller wants (the assignment, received through a watch channel) and what the lease
//! allows (the fence). Every transition is written to the record on disk and to the VM's
//! observed state, which heartbeats and the Agent service report.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fabric_proto::v1::{Assignment, DesiredState, ObservedPhase, ObservedVm, RestartPolicy};
use tokio::sync::watch;

use super::backend::{Balloon, Instance, StartRequest};
use super::record::VmRecord;
use super::Host;

/// How often a running instance is looked at: its guest's memory statistics reach the
/// balancer within this (plus the guest's 1 s statistics period and the balancer's step).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// An instance that ran this long before exiting resets the back-off.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent knows of a VM, for heartbeats and the Agent service.
#[derive(Debug, Clone, Default)]
pub struct VmView {
    pub assignment: Option<Assignment>,
    pub observed: ObservedVm,
    pub socket: Option<PathBuf>,
    pub console: Option<PathBuf>,
    /// The running instance's balloon, for the memory balancer.
    pub balloon: Option<Arc<dyn Balloon>>,
}

/// The wait before restart attempt `failures` (1, 2, ...): 0.5 s doubling up to 30 s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (Duration::from_millis(500) * (1u32 << exp)).min(MAX_BACKOFF)
}

/// The status message while a start is pending after `what` happened: it says when, as a
/// delay and as a time (heartbeats repeat the message long after it was written).
pub fn retry_message(what: &str, wait: Duration, now: SystemTime) -> String {
    let at = prost_types::Timestamp::from(now + wait);
    format!(
        "{what}; starting again in {:.1} s (at {at})",
        wait.as_secs_f64()
    )
}

/// Whether an exit is followed by a restart under `policy`.
pub fn restarts(policy: RestartPolicy, clean: bool) -> bool {
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => !clean,
        RestartPolicy::Always | RestartPolicy::Unspecified => true,
    }
}

pub(super) struct Supervisor {
    pub host: Arc<Host>,
    pub vm_id: String,
    pub dir: PathBuf,
    pub desired: watch::Receiver<Option<Assignment>>,
    pub view: Arc<Mutex<VmView>>,
    pub record: VmRecord,
    pub instance: Option<Box<dyn Instance>>,
    /// The fence epoch when `instance` was started or adopted: an instance from an earlier
    /// epoch is stopped even when the fence has already been lifted again (a revoke followed
    /// at once by a new registration and assignment set must not slip past it).
    pub instance_epoch: u64,
}

enum Wake {
    Changed,
    Gone,
}

impl Supervisor {
    fn observe(&self, f: impl FnOnce(&mut ObservedVm)) {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut view.observed);
    }

    fn set_phase(&self, phase: ObservedPhase, message: impl Into<String>) {
        let message = message.into();
        let vm_id = &self.vm_id;
        tracing::info!(vm = %vm_id, phase = ?phase, "{message}");
        self.observe(|o| {
            o.phase = phase as i32;
            o.message = message;
        });
    }

    fn set_error(&mut self, error: &str) {
        self.record.last_error = error.to_string();
        let error = error.to_string();
        self.observe(|o| o.last_error = error);
    }

    fn save(&self) {
        if let Err(err) = self.record.save(&self.dir) {
            tracing::error!(vm = %self.vm_id, error = %err, "cannot save the VM record");
        }
    }

    fn instance_gone(&mut self) {
        self.record.pid = None;
        self.record.pid_start_ticks = None;
        self.record.started_at_ms = None;
        self.observe(|o| {
            o.pid = 0;
            o.started_at = None;
            o.memory = None;
            // The balancer's decision was for the instance that ended.
            o.memory_balance = None;
        });
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.socket = None;
        view.balloon = None;
    }

    fn instance_started(&mut self) {
        let Some(instance) = &self.instance else {
            return;
        };
        let pid = instance.pid();
        let started = instance.started_at();
        let socket = instance.socket_path();
        let balloon = instance.balloon();
        self.observe(|o| {
            o.pid = pid;
            o.started_at = Some(prost_types::Timestamp::from(started));
            o.memory_balance = None;
        });
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.socket = socket;
        view.balloon = balloon;
    }

    /// Waits for the assignment or the fence to change (or for `deadline`).
    async fn wait_change(&mut self, deadline: Option<Instant>) -> Wake {
        let mut fence = self.host.fence_rx();
        fence.borrow_and_update();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.desired.changed() => if changed.is_err() { Wake::Gone } else { Wake::Changed },
            _ = fence.changed() => Wake::Changed,
            _ = sleep => Wake::Changed,
        }
    }

    pub async fn run(mut self) {
        if self.instance.is_some() {
            self.instance_started();
            self.set_phase(ObservedPhase::Running, "re-adopted a running fabric-vmm");
        }
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        // Set when the restart policy left the VM stopped: the generation it stopped at.
        let mut held: Option<u64> = None;
        let mut restarting = false;
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let want = self.desired.borrow_and_update().clone();
            let fence = self.host.fence_state();
            // Started before a fencing that is already over: stopped all the same, then
            // started again at once (below).
            let from_old_epoch = self.instance.is_some() && self.instance_epoch != fence.epoch;
            // What runs is stopped when the lease is not valid (or it is from before a
            // fencing); nothing is started until the assignments have been read as well
            // (`FenceState`): a restarted agent keeps the VMMs it re-adopted on a valid lease,
            // but starts nothing on the strength of its records.
            let fenced = !fence.lease_valid || from_old_epoch;
            let starts_fenced = fence.fenced();
            let Some(assignment) = want else {
                if self.remove().await {
                    return;
                }
                continue;
            };
            if self.record.assignment().as_ref() != Some(&assignment) {
                if let Err(err) = std::fs::create_dir_all(&self.dir) {
                    tracing::error!(vm = %self.vm_id, dir = %self.dir.display(), error = %err, "cannot create the VM directory");
                }
                self.record.set_assignment(&assignment);
                self.save();
            }
            {
                let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
                view.assignment = Some(assignment.clone());
                view.observed.generation = assignment.generation;
            }
            if held.is_some_and(|g| g != assignment.generation) {
                held = None;
                failures = 0;
                retry_at = None;
            }
            let stopped_wanted = assignment.desired_state() == DesiredState::Stopped;
            if stopped_wanted
                || fenced
                || held.is_some()
                || (self.instance.is_none() && starts_fenced)
            {
                if let Some(mut instance) = self.instance.take() {
                    // The fence's stop is immediate: the controller may place the VM
                    // elsewhere once the lease and the margin have run out, and the margin
                    // is no time for a guest's shutdown.
                    let exit = if fenced {
                        self.set_phase(ObservedPhase::Stopping, "fenced: killing the VM");
                        instance.kill().await
                    } else {
                        self.set_phase(ObservedPhase::Stopping, "stopping: desired state STOPPED");
                        instance.stop(self.host.config.stop_timeout).await
                    };
                    tracing::info!(vm = %self.vm_id, "{}", exit.description);
                    self.instance_gone();
                    self.save();
                    if fenced {
                        self.set_error(
                            "fenced: the host's lease expired or the controller disowned the host; the VM was stopped",
                        );
                    }
                    self.set_phase(
                        ObservedPhase::Stopped,
                        if fenced {
                            "stopped by the fence: lease expired or revoked"
                        } else {
                            "stopped as desired"
                        },
                    );
                } else if fenced || starts_fenced {
                    self.set_phase(
                        ObservedPhase::Stopped,
                        "not running: waiting for a valid lease and the controller's assignments",
                    );
                } else if stopped_wanted {
                    self.set_phase(ObservedPhase::Stopped, "stopped as desired");
                }
                if from_old_epoch && !fence.fenced() && !stopped_wanted && held.is_none() {
                    continue;
                }
                if let Wake::Gone = self.wait_change(None).await {
                    return;
                }
                continue;
            }

            if self.instance.is_none() {
                if let Some(t) = retry_at {
                    if Instant::now() < t {
                        if let Wake::Gone = self.wait_change(Some(t)).await {
                            return;
                        }
                        continue;
                    }
                    retry_at = None;
                }
                match self.start(&assignment, fence.epoch).await {
                    Ok(()) => {
                        // Checked against the epoch the start was decided in: a fencing
                        // during the start stops it at the next turn of the loop.
                        self.instance_epoch = fence.epoch;
                        if restarting {
                            self.record.restart_count += 1;
                            let count = self.record.restart_count;
                            self.observe(|o| o.restart_count = count);
                        }
                        restarting = false;
                        self.save();
                    }
                    Err(_) if self.may_start(&assignment, fence.epoch).is_err() => {
                        // Not a failure: the loop looks at what is wanted now.
                        self.save();
                        continue;
                    }
                    Err(err) => {
                        failures += 1;
                        let wait = backoff(failures);
                        retry_at = Some(Instant::now() + wait);
                        self.set_error(&err);
                        self.save();
                        // STARTING, not FAILED: the agent starts it again by itself, and the
                        // controller takes FAILED as "will not run here" (a VM being moved or
                        // stopped is released on it). A FAILED report here could let the VM
                        // start elsewhere while this retry is still due.
                        self.set_phase(
                            ObservedPhase::Starting,
                            retry_message(
                                &format!("start failed: {err}"),
                                wait,
                                fabric_proto::clock::now(),
                            ),
                        );
                        continue;
                    }
                }
            }

            let Some(instance) = self.instance.as_mut() else {
                continue;
            };
            tokio::select! {
                exit = instance.exited() => {
                    let ran = instance.started_at().elapsed().unwrap_or_default();
                    self.instance = None;
                    self.instance_gone();
                    if ran >= STABLE_AFTER {
                        failures = 0;
                    }
                    if !exit.clean {
                        self.set_error(&exit.description);
                    }
                    let policy = assignment
                        .spec
                        .as_ref()
                        .map(|s| s.restart_policy())
                        .unwrap_or(RestartPolicy::Unspecified);
                    if restarts(policy, exit.clean) {
                        failures += 1;
                        let wait = backoff(failures);
                        retry_at = Some(Instant::now() + wait);
                        restarting = true;
                        self.set_phase(
                            ObservedPhase::Starting,
                            retry_message(
                                &format!("{} (policy {})", exit.description, policy.as_str_name()),
                                wait,
                                fabric_proto::clock::now(),
                            ),
                        );
                    } else {
                        held = Some(assignment.generation);
                        let phase = if exit.clean { ObservedPhase::Stopped } else { ObservedPhase::Failed };
                        self.set_phase(phase, format!("{}; not restarted (policy {})", exit.description, policy.as_str_name()));
                    }
                    self.save();
                }
                changed = self.desired.changed() => if changed.is_err() { return },
                _ = fence_changed(&self.host) => {},
                _ = probe.tick() => {
                    let seen = instance.probe().await;
                    let phase = if seen.running { ObservedPhase::Running } else { ObservedPhase::Starting };
                    let message = seen.message.unwrap_or_else(|| if seen.running { "running".into() } else { "booting".into() });
                    self.observe(|o| {
                        o.phase = phase as i32;
                        o.message = message;
                        o.memory = seen.memory;
                    });
                }
            }
        }
    }

    /// Whether a start decided in fence epoch `epoch` for `assignment` may still go ahead:
    /// the VM is still assigned here and wanted running (the same generation), and the fence
    /// has not been raised since. Asked right before the spawn, after a preparation that may
    /// have taken long (a host partitioned meanwhile, declared dead and registered again may
    /// no longer hold the VM: it may be running elsewhere).
    fn may_start(&self, assignment: &Assignment, epoch: u64) -> Result<(), String> {
        check_start(
            &self.host.fence_state(),
            epoch,
            self.desired.borrow().as_ref(),
            assignment,
        )
    }

    async fn start(&mut self, assignment: &Assignment, epoch: u64) -> Result<(), String> {
        let spec = assignment
            .spec
            .clone()
            .ok_or_else(|| "assignment without a spec".to_string())?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        self.set_phase(ObservedPhase::Starting, "preparing");
        let view = self.view.clone();
        let vm_id = self.vm_id.clone();
        let progress = move |message: &str| {
            tracing::info!(vm = %vm_id, "{message}");
            let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
            view.observed.message = message.to_string();
        };
        let backend = self.host.backend.clone();
        let (host, desired, wanted) = (self.host.clone(), self.desired.clone(), assignment.clone());
        let vm_id = self.vm_id.clone();
        let proceed = move || {
            check_start(
                &host.fence_state(),
                epoch,
                desired.borrow().as_ref(),
                &wanted,
            )
            .inspect_err(|why| tracing::info!(vm = %vm_id, "start abandoned: {why}"))
        };
        let result = backend
            .start(StartRequest {
                spec: &spec,
                dir: self.dir.clone(),
                record: &mut self.record,
                progress: &progress,
                proceed: &proceed,
            })
            .await;
        // Whatever was allocated before a failure is in the record, for cleanup.
        self.save();
        let instance = result?;
        self.instance = Some(instance);
        self.instance_started();
        self.set_phase(ObservedPhase::Starting, "booting");
        Ok(())
    }

    /// Stops and forgets the VM. Returns false when it was assigned again meanwhile.
    async fn remove(&mut self) -> bool {
        if let Some(mut instance) = self.instance.take() {
            let fence = self.host.fence_state();
            // Started before a fencing (or fenced now): the controller may have placed it
            // elsewhere already; it ends at once, as the fence ends VMs.
            let exit = if fence.fenced() || self.instance_epoch != fence.epoch {
                self.set_phase(
                    ObservedPhase::Stopping,
                    "removed from this host while fenced: killing",
                );
                instance.kill().await
            } else {
                self.set_phase(ObservedPhase::Stopping, "removed from this host: stopping");
                instance.stop(self.host.config.stop_timeout).await
            };
            tracing::info!(vm = %self.vm_id, "{}", exit.description);
            self.instance_gone();
        }
        let backend = self.host.backend.clone();
        if let Err(err) = backend.cleanup(&self.record).await {
            tracing::error!(vm = %self.vm_id, error = %err, "cleanup incomplete");
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(vm = %self.vm_id, dir = %self.dir.display(), error = %err, "cannot remove the VM directory");
            }
        }
        if self.host.forget_if_removed(&self.vm_id, &self.desired) {
            tracing::info!(vm = %self.vm_id, "removed");
            return true;
        }
        self.record = VmRecord::new(&self.vm_id, self.host.backend.name());
        false
    }
}

/// The rule of [`Supervisor::may_start`]: Ok when a start decided in fence epoch
/// `epoch` for `started` may go ahead, else why not.
pub fn check_start(
    fence: &super::FenceState,
    epoch: u64,
    desired: Option<&Assignment>,
    started: &Assignment,
) -> Result<(), String> {
    if fence.epoch != epoch || !fence.lease_valid {
        return Err("the host was fenced while the VM was being prepared".to_string());
    }
    if fence.fenced() {
        return Err("the host's assignments have not been read since it was fenced".to_string());
    }
    match desired {
        None => Err("the VM was removed from this host while it was being prepared".to_string()),
        Some(now) if now.desired_state() == DesiredState::Stopped => {
            Err("the VM's desired state became STOPPED while it was being prepared".to_string())
        }
        Some(now) if now.generation != started.generation => Err(format!(
            "the VM's assignment changed (generation {} to {}) while it was being prepared",
            started.generation, now.generation
        )),
        Some(_) => Ok(()),
    }
}

async fn fence_changed(host: &Host) {
    let mut fence = host.fence_rx();
    fence.borrow_and_update();
    let _ = fence.changed().await;
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(fabric_proto::clock::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_pending_retry_says_when() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            retry_message("start failed: no kernel", Duration::from_millis(2500), now),
            "start failed: no kernel; starting again in 2.5 s (at 2027-01-15T08:00:02.500Z)"
        );
    }

    #[test]
    fn policies() {
        assert!(restarts(RestartPolicy::Always, true));
        assert!(restarts(RestartPolicy::Unspecified, false));
        assert!(restarts(RestartPolicy::OnFailure, false));
        assert!(!restarts(RestartPolicy::OnFailure, true));
        assert!(!restarts(RestartPolicy::Never, false));
    }
}
