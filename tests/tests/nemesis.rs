//! The nemesis in the suite (issue 14, "never twice, proven"): a real controller, one real-KVM
//! host running the freestanding test guest and three simulated hosts, each host in its own
//! network namespace; a workload of creates, deletes, stops, starts, cordons and drains; faults
//! from a fixed seed at random moments (agents, fabric-vmm processes and the controller killed
//! and paused, partitions both ways and one way, a slow controller disk, an agent killed at a
//! point of a VM start, lease-clock and wall-clock jumps). Every ~20 ms a sampler records each
//! live copy of each VM; the verdict must be clean: never two live copies of one VM, no
//! acknowledged write lost, no VM that should run running nowhere once the faults stop.
//!
//! The checker's own test feeds it made-up samples and histories, so that a clean verdict is
//! known to mean something.

use std::time::{Duration, Instant};

use fabric_proto::v1::{DesiredState, VmPhase};
use fabric_test_support::nemesis::checker::{
    double_runs, lost_vms, lost_writes, FinalVm, LiveCopy, Op, OpKind, Sample, Verdict,
};
use fabric_test_support::nemesis::{self, Config};

fn copy(host: &str, pid: u32) -> LiveCopy {
    LiveCopy {
        host: host.into(),
        pid,
        seen: "made up".into(),
    }
}

/// The checker flags what it must: two live copies in one sample, an acknowledged create
/// that the controller lost, a VM that should run and runs nowhere; and the verdict is then
/// not clean.
#[test]
fn the_checker_flags_a_double_run_a_lost_create_and_a_lost_vm() {
    let mut sample = Sample {
        at_ms: 4200,
        ..Default::default()
    };
    sample.copies.insert("vm-1".into(), vec![copy("kvm0", 101)]);
    sample
        .copies
        .insert("vm-2".into(), vec![copy("kvm0", 102), copy("sim1", 0)]);
    let doubles = double_runs(&sample);
    assert_eq!(doubles.len(), 1, "{doubles:?}");
    assert_eq!(doubles[0].vm, "vm-2");

    let ops = vec![
        Op {
            kind: OpKind::Create,
            vm: "vm-1".into(),
            name: "a".into(),
            invoked_ms: 0,
            completed_ms: 10,
            ok: true,
            error: String::new(),
        },
        Op {
            kind: OpKind::Create,
            vm: "vm-3".into(),
            name: "c".into(),
            invoked_ms: 20,
            completed_ms: 30,
            ok: true,
            error: String::new(),
        },
    ];
    let vm1 = FinalVm {
        id: "vm-1".into(),
        name: "a".into(),
        desired: DesiredState::Running,
        phase: VmPhase::Running,
        host_id: "h".into(),
        reason: String::new(),
    };
    let (lost, _) = lost_writes(&ops, std::slice::from_ref(&vm1));
    assert_eq!(
        lost.len(),
        1,
        "the create of vm-3 was acknowledged: {lost:?}"
    );
    assert_eq!(lost[0].vm, "vm-3");

    let mut nowhere = vm1.clone();
    nowhere.id = "vm-4".into();
    let (lost_vm, _) = lost_vms(&[vm1, nowhere], &sample);
    assert_eq!(lost_vm.len(), 1);

    let verdict = Verdict {
        double_runs: doubles,
        lost_writes: lost,
        lost_vms: lost_vm,
        ..Default::default()
    };
    assert!(!verdict.clean());
    let table = verdict.table();
    assert!(
        table.contains("NOT CLEAN") && table.contains("vm-2"),
        "{table}"
    );
}

/// Two fixed seeds, 45 s of faults each: a clean verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_with_fixed_seeds_never_runs_a_vm_twice() {
    fabric_test_support::skip_without_kvm!("nemesis_with_fixed_seeds_never_runs_a_vm_twice");
    // The guest every KVM VM boots; says how to build it when missing.
    fabric_test_support::testguest::elf();
    let started = Instant::now();
    let mut tables = Vec::new();
    for seed in [14, 1414] {
        let mut config = Config::new(seed, Duration::from_secs(45));
        config.settle_time = Duration::from_secs(60);
        let verdict = nemesis::run(&config).await.expect("the nemesis ran");
        let table = verdict.table();
        println!("{table}");
        assert!(
            verdict.clean(),
            "seed {seed}: the verdict is not clean:\n{table}"
        );
        tables.push(table);
    }
    println!(
        "nemesis: {} seeds clean in {:.0} s",
        tables.len(),
        started.elapsed().as_secs_f64()
    );
}
