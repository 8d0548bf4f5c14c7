//! The checker: what the samples and the history of acknowledged calls must satisfy, as
//! functions of plain data so that a self-test can feed them made-up observations.
//!
//! - [`double_runs`]: a VM with two or more live copies in one sample.
//! - [`lost_writes`]: an acknowledged create, delete, stop or start that the controller's
//!   final state does not reflect.
//! - [`lost_vms`]: a VM whose desired state is RUNNING that runs nowhere after the settle
//!   period (PENDING only counts as capacity when the controller says no host fits).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use fabric_proto::v1::{DesiredState, VmPhase};

/// One live copy of a VM at one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCopy {
    /// The host's name.
    pub host: String,
    /// The fabric-vmm's pid (0 on a simulated host).
    pub pid: u32,
    /// How it was seen: `vmm state R`, `agent RUNNING`, `silent agent (last RUNNING)`, ...
    pub seen: String,
}

/// One sample: the live copies of every VM that has at least one, at `at_ms` from the start.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at_ms: u64,
    pub copies: BTreeMap<String, Vec<LiveCopy>>,
}

/// A VM with two or more live copies at one sample.
#[derive(Debug, Clone)]
pub struct DoubleRun {
    pub at_ms: u64,
    pub vm: String,
    pub copies: Vec<LiveCopy>,
}

impl std::fmt::Display for DoubleRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let copies: Vec<String> = self
            .copies
            .iter()
            .map(|c| format!("{} pid {} ({})", c.host, c.pid, c.seen))
            .collect();
        write!(
            f,
            "t={:.3}s VM {} has {} live copies: {}",
            self.at_ms as f64 / 1000.0,
            self.vm,
            self.copies.len(),
            copies.join("; ")
        )
    }
}

/// Every VM of `sample` with more than one live copy (on two hosts, or two VMMs on one).
pub fn double_runs(sample: &Sample) -> Vec<DoubleRun> {
    sample
        .copies
        .iter()
        .filter(|(_, copies)| copies.len() > 1)
        .map(|(vm, copies)| DoubleRun {
            at_ms: sample.at_ms,
            vm: vm.clone(),
            copies: copies.clone(),
        })
        .collect()
}

/// What the workload asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Create,
    Delete,
    Stop,
    Start,
    Cordon,
    Uncordon,
    Drain,
}

impl OpKind {
    pub const ALL: [OpKind; 7] = [
        OpKind::Create,
        OpKind::Delete,
        OpKind::Stop,
        OpKind::Start,
        OpKind::Cordon,
        OpKind::Uncordon,
        OpKind::Drain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Delete => "delete",
            OpKind::Stop => "stop",
            OpKind::Start => "start",
            OpKind::Cordon => "cordon",
            OpKind::Uncordon => "uncordon",
            OpKind::Drain => "drain",
        }
    }
}

/// One call of the workload: its request, when, and its result. `ok` is an acknowledged write.
#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    /// The VM's id (for a create: the id the controller returned; empty if it failed).
    pub vm: String,
    /// The VM's name (creates) or the host's name (cordon, uncordon, drain).
    pub name: String,
    pub invoked_ms: u64,
    pub completed_ms: u64,
    pub ok: bool,
    /// The error of a call that was not acknowledged.
    pub error: String,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:.3}s..{:.3}s] {} {} {} -> {}",
            self.invoked_ms as f64 / 1000.0,
            self.completed_ms as f64 / 1000.0,
            self.kind.name(),
            self.vm,
            self.name,
            if self.ok { "ok" } else { &self.error }
        )
    }
}

/// A VM as the controller has it at the end.
#[derive(Debug, Clone)]
pub struct FinalVm {
    pub id: String,
    pub name: String,
    pub desired: DesiredState,
    pub phase: VmPhase,
    pub host_id: String,
    pub reason: String,
}

/// An acknowledged write the final state does not reflect.
#[derive(Debug, Clone)]
pub struct LostWrite {
    pub vm: String,
    pub what: String,
}

fn desired_of(kind: OpKind) -> Option<DesiredState> {
    match kind {
        OpKind::Create | OpKind::Start => Some(DesiredState::Running),
        OpKind::Stop => Some(DesiredState::Stopped),
        _ => None,
    }
}

fn effective(d: DesiredState) -> DesiredState {
    if d == DesiredState::Unspecified {
        DesiredState::Running
    } else {
        d
    }
}

/// Acknowledged writes missing from `final_vms`. Calls that were not acknowledged may or may
/// not have taken effect (a timeout, a controller that died with the answer unsent), so a VM
/// with such a call whose effect would differ is not judged on that point. Returns the lost
/// writes and how many checks were left open that way.
pub fn lost_writes(ops: &[Op], final_vms: &[FinalVm]) -> (Vec<LostWrite>, usize) {
    let exists: BTreeMap<&str, &FinalVm> = final_vms.iter().map(|v| (v.id.as_str(), v)).collect();
    let ids: BTreeSet<&str> = ops
        .iter()
        .filter(|o| desired_of(o.kind).is_some() || o.kind == OpKind::Delete)
        .map(|o| o.vm.as_str())
        .filter(|id| !id.is_empty())
        .collect();
    let mut lost = Vec::new();
    let mut open = 0;
    for id in ids {
        let mine: Vec<&Op> = ops.iter().filter(|o| o.vm == id).collect();
        let acked_delete = mine
            .iter()
            .find(|o| o.kind == OpKind::Delete && o.ok)
            .copied();
        let unacked_delete = mine.iter().any(|o| o.kind == OpKind::Delete && !o.ok);
        let acked_create = mine
            .iter()
            .find(|o| o.kind == OpKind::Create && o.ok)
            .copied();
        let found = exists.get(id);
        if let Some(delete) = acked_delete {
            if found.is_some() {
                lost.push(LostWrite {
                    vm: id.to_string(),
                    what: format!("acknowledged delete ({delete}) but the VM still exists"),
                });
            }
            continue;
        }
        let Some(create) = acked_create else { continue };
        let Some(vm) = found else {
            if unacked_delete {
                open += 1;
            } else {
                lost.push(LostWrite {
                    vm: id.to_string(),
                    what: format!(
                        "acknowledged create ({create}) but the controller has no such VM"
                    ),
                });
            }
            continue;
        };
        // The last acknowledged power call decides, unless a call that was not acknowledged
        // (which may have landed at any time after it was sent) asks otherwise.
        let power: Vec<&&Op> = mine
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Create | OpKind::Start | OpKind::Stop))
            .collect();
        let Some(last) = power.iter().rev().find(|o| o.ok) else {
            continue;
        };
        let want = desired_of(last.kind).unwrap_or(DesiredState::Running);
        let doubt = power
            .iter()
            .any(|o| !o.ok && desired_of(o.kind) != Some(want));
        if doubt {
            open += 1;
            continue;
        }
        if effective(vm.desired) != want {
            lost.push(LostWrite {
                vm: id.to_string(),
                what: format!(
                    "last acknowledged call {last} wants {want:?}, the controller has {:?}",
                    vm.desired
                ),
            });
        }
    }
    (lost, open)
}

/// Whether a PENDING VM's reason says that no host can hold it.
pub fn is_capacity(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    r.contains("insufficient") || r.contains("no host") || r.contains("not enough")
}

/// VMs whose desired state is RUNNING with no live copy in `last`, the sample taken after
/// the settle period: (lost, PENDING for lack of capacity), each with what the controller
/// says.
pub fn lost_vms(final_vms: &[FinalVm], last: &Sample) -> (Vec<String>, Vec<String>) {
    let mut lost = Vec::new();
    let mut capacity = Vec::new();
    for vm in final_vms {
        if effective(vm.desired) != DesiredState::Running || last.copies.contains_key(&vm.id) {
            continue;
        }
        let what = format!(
            "{} ({}): controller says {:?} on {:?}{}",
            vm.id,
            vm.name,
            vm.phase,
            vm.host_id,
            if vm.reason.is_empty() {
                String::new()
            } else {
                format!(", reason {:?}", vm.reason)
            }
        );
        if vm.phase == VmPhase::Pending && is_capacity(&vm.reason) {
            capacity.push(what);
        } else {
            lost.push(what);
        }
    }
    (lost, capacity)
}

/// The result of a run.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub seed: u64,
    /// Time faults were injected, and the whole run with the settle period, seconds.
    pub fault_secs: f64,
    pub total_secs: f64,
    pub hosts: String,
    pub ops: BTreeMap<&'static str, (usize, usize)>,
    /// Memory-relief moves the controller started.
    pub relief_moves: u64,
    pub faults: BTreeMap<String, usize>,
    pub samples: u64,
    pub controller_samples: u64,
    pub double_runs: Vec<DoubleRun>,
    /// Samples with at least one double run.
    pub double_run_samples: u64,
    pub lost_writes: Vec<LostWrite>,
    pub open_checks: usize,
    pub lost_vms: Vec<String>,
    pub pending_capacity: Vec<String>,
    pub vms_checked: usize,
    /// Where the full history (ops, faults, violations) was written.
    pub log: String,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        self.double_runs.is_empty() && self.lost_writes.is_empty() && self.lost_vms.is_empty()
    }

    /// The verdict as a Markdown table, with the violations after it.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "| nemesis | |");
        let _ = writeln!(t, "|---|---|");
        let _ = writeln!(
            t,
            "| seed | {} (replay: `--seed {}`) |",
            self.seed, self.seed
        );
        let _ = writeln!(t, "| cluster | {} |", self.hosts);
        let _ = writeln!(
            t,
            "| duration | {:.0} s of faults, {:.0} s in all |",
            self.fault_secs, self.total_secs
        );
        let ops: Vec<String> = self
            .ops
            .iter()
            .map(|(k, (n, ok))| format!("{k} {ok}/{n}"))
            .collect();
        let _ = writeln!(
            t,
            "| operations (acknowledged/issued) | {} |",
            ops.join(", ")
        );
        let _ = writeln!(
            t,
            "| memory-relief moves (started by the controller) | {} |",
            self.relief_moves
        );
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let total: usize = self.faults.values().sum();
        let _ = writeln!(t, "| faults ({total}) | {} |", faults.join(", "));
        let _ = writeln!(
            t,
            "| samples | {} (every ~20 ms), controller views {} |",
            self.samples, self.controller_samples
        );
        let _ = writeln!(
            t,
            "| **double runs** | {} (in {} samples) |",
            self.double_runs.len(),
            self.double_run_samples
        );
        let _ = writeln!(
            t,
            "| **lost acknowledged writes** | {} ({} checks left open by unacknowledged calls) |",
            self.lost_writes.len(),
            self.open_checks
        );
        let _ = writeln!(
            t,
            "| **lost VMs** | {} of {} VMs ({} PENDING for lack of capacity) |",
            self.lost_vms.len(),
            self.vms_checked,
            self.pending_capacity.len()
        );
        let _ = writeln!(
            t,
            "| verdict | {} |",
            if self.clean() { "clean" } else { "NOT CLEAN" }
        );
        for d in self.double_runs.iter().take(20) {
            let _ = writeln!(t, "double run: {d}");
        }
        for w in &self.lost_writes {
            let _ = writeln!(t, "lost write: VM {}: {}", w.vm, w.what);
        }
        for v in &self.lost_vms {
            let _ = writeln!(t, "lost VM: {v}");
        }
        for v in &self.pending_capacity {
            let _ = writeln!(t, "pending (capacity): {v}");
        }
        if !self.log.is_empty() {
            let _ = writeln!(t, "history: {}", self.log);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(host: &str, pid: u32) -> LiveCopy {
        LiveCopy {
            host: host.into(),
            pid,
            seen: "test".into(),
        }
    }

    fn op(kind: OpKind, vm: &str, at: u64, ok: bool) -> Op {
        Op {
            kind,
            vm: vm.into(),
            name: String::new(),
            invoked_ms: at,
            completed_ms: at + 1,
            ok,
            error: if ok { String::new() } else { "timeout".into() },
        }
    }

    fn vm(id: &str, desired: DesiredState, phase: VmPhase) -> FinalVm {
        FinalVm {
            id: id.into(),
            name: id.into(),
            desired,
            phase,
            host_id: String::new(),
            reason: String::new(),
        }
    }

    #[test]
    fn two_live_copies_are_a_double_run() {
        let mut s = Sample {
            at_ms: 1234,
            ..Default::default()
        };
        s.copies.insert("vm-a".into(), vec![copy("h0", 10)]);
        assert!(double_runs(&s).is_empty());
        s.copies
            .insert("vm-b".into(), vec![copy("h0", 11), copy("h1", 0)]);
        let d = double_runs(&s);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].vm, "vm-b");
        assert!(d[0].to_string().contains("h1"));
    }

    #[test]
    fn a_missing_acknowledged_create_is_a_lost_write() {
        let ops = vec![
            op(OpKind::Create, "vm-a", 0, true),
            op(OpKind::Create, "vm-b", 1, true),
            op(OpKind::Stop, "vm-b", 2, true),
            op(OpKind::Create, "vm-c", 3, true),
            op(OpKind::Delete, "vm-c", 4, true),
        ];
        let good = vec![
            vm("vm-a", DesiredState::Running, VmPhase::Running),
            vm("vm-b", DesiredState::Stopped, VmPhase::Stopped),
        ];
        assert!(lost_writes(&ops, &good).0.is_empty());
        let (lost, _) = lost_writes(&ops, &good[1..]);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].vm, "vm-a");
        let wrong = vec![
            vm("vm-a", DesiredState::Running, VmPhase::Running),
            vm("vm-b", DesiredState::Running, VmPhase::Running),
            vm("vm-c", DesiredState::Running, VmPhase::Running),
        ];
        let (lost, _) = lost_writes(&ops, &wrong);
        assert_eq!(lost.len(), 2, "{lost:?}");
        // An unacknowledged start after the stop leaves vm-b's state open.
        let mut ops = ops;
        ops.push(op(OpKind::Start, "vm-b", 5, false));
        let (lost, open) = lost_writes(&ops, &wrong);
        assert_eq!((lost.len(), open), (1, 1), "{lost:?}");
    }

    #[test]
    fn a_desired_running_vm_running_nowhere_is_lost() {
        let mut last = Sample::default();
        last.copies.insert("vm-a".into(), vec![copy("h0", 1)]);
        let mut pending = vm("vm-c", DesiredState::Running, VmPhase::Pending);
        pending.reason = "3 hosts: insufficient cpu".into();
        let vms = vec![
            vm("vm-a", DesiredState::Running, VmPhase::Running),
            vm("vm-b", DesiredState::Running, VmPhase::Running),
            pending,
            vm("vm-d", DesiredState::Stopped, VmPhase::Stopped),
        ];
        let (lost, capacity) = lost_vms(&vms, &last);
        assert_eq!(lost.len(), 1);
        assert!(lost[0].starts_with("vm-b"));
        assert_eq!(capacity.len(), 1);
    }
}
