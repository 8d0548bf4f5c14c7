//! Table-driven tests of every filter and scorer, the unplaceable message,
//! the bookkeeping, and a seeded property test of the fast path against the
//! full scan.

use super::*;

const GIB: u64 = 1024;

fn host(
    id: &str,
    zone: &str,
    fault_domain: u32,
    update_domain: u32,
    cpus: u32,
    memory_mib: u64,
) -> HostSpec {
    HostSpec {
        id: id.to_owned(),
        zone: zone.to_owned(),
        fault_domain,
        update_domain,
        allocatable_cpus: cpus,
        allocatable_memory_mib: memory_mib,
        allocatable_disk_mib: None,
        labels: Labels::new(),
        state: HostState::Ready,
    }
}

fn in_state(mut spec: HostSpec, state: HostState) -> HostSpec {
    spec.state = state;
    spec
}

fn vm(vcpus: u32, memory_mib: u64) -> Demand {
    Demand {
        vcpus,
        memory_minimum_mib: memory_mib,
        ..Demand::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn with_labels(mut d: Demand, pairs: &[(&str, &str)]) -> Demand {
    d.labels = labels(pairs);
    d
}

fn with_anti(mut d: Demand, pairs: &[(&str, &str)]) -> Demand {
    d.anti_affinity_labels = labels(pairs);
    d
}

fn in_zone(mut d: Demand, zone: &str) -> Demand {
    d.zone = zone.to_owned();
    d
}

fn in_set(mut d: Demand, set: &str) -> Demand {
    d.availability_set = set.to_owned();
    d
}

fn spread(mut d: Demand) -> Demand {
    d.strategy = Strategy::Spread;
    d
}

fn cluster(config: SchedulerConfig, hosts: &[HostSpec], vms: &[(&str, &str, Demand)]) -> Scheduler {
    let mut s = Scheduler::new(config);
    for h in hosts {
        s.add_host(h.clone()).expect("add host");
    }
    for (vm_id, host_id, demand) in vms {
        s.assign(vm_id, host_id, demand).expect("assign");
    }
    s
}

/// What `place` returns, as text: the host id, or the unplaceable message.
fn outcome(s: &Scheduler, d: &Demand) -> String {
    match s.place(d) {
        Ok(decision) => decision.host_id,
        Err(unplaceable) => unplaceable.to_string(),
    }
}

/// `(vm id, host id, demand)` of a VM already on a host.
type Assignment = (&'static str, &'static str, Demand);

struct Case {
    name: &'static str,
    hosts: Vec<HostSpec>,
    vms: Vec<Assignment>,
    demand: Demand,
    expected: &'static str,
}

fn run(config: SchedulerConfig, cases: Vec<Case>) {
    for case in cases {
        let s = cluster(config, &case.hosts, &case.vms);
        assert_eq!(
            outcome(&s, &case.demand),
            case.expected,
            "case: {}",
            case.name
        );
        // The exact search agrees on feasibility.
        assert_eq!(
            s.place(&case.demand).is_ok(),
            s.place_exhaustive(&case.demand).is_ok(),
            "case: {}",
            case.name
        );
    }
}

#[test]
fn filters() {
    let big = |id: &'static str| host(id, "z1", 0, 0, 16, 64 * GIB);
    run(
        SchedulerConfig::default(),
        vec![
            Case {
                name: "only the ready host accepts",
                hosts: vec![
                    in_state(big("a"), HostState::Cordoned),
                    in_state(big("b"), HostState::Draining),
                    in_state(big("c"), HostState::Suspect),
                    in_state(big("d"), HostState::Dead),
                    big("e"),
                ],
                vms: vec![],
                demand: vm(1, GIB),
                expected: "e",
            },
            Case {
                name: "each state has its reason",
                hosts: vec![
                    in_state(big("a"), HostState::Cordoned),
                    in_state(big("b"), HostState::Draining),
                    in_state(big("c"), HostState::Suspect),
                    in_state(big("d"), HostState::Dead),
                ],
                vms: vec![],
                demand: vm(1, GIB),
                expected: "0/4 hosts: 1 cordoned, 1 dead, 1 draining, 1 not ready",
            },
            Case {
                name: "zone",
                hosts: vec![big("a"), host("b", "z2", 0, 0, 16, 64 * GIB)],
                vms: vec![],
                demand: in_zone(vm(1, GIB), "z2"),
                expected: "b",
            },
            Case {
                name: "unknown zone",
                hosts: vec![big("a"), host("b", "z2", 0, 0, 16, 64 * GIB)],
                vms: vec![],
                demand: in_zone(vm(1, GIB), "z9"),
                expected: "0/2 hosts: 2 wrong zone",
            },
            Case {
                name: "cpu fits under the overcommit ratio (16 x 4 = 64)",
                hosts: vec![big("a")],
                vms: vec![("v1", "a", vm(60, GIB))],
                demand: vm(4, GIB),
                expected: "a",
            },
            Case {
                name: "cpu one vCPU over the ratio",
                hosts: vec![big("a")],
                vms: vec![("v1", "a", vm(60, GIB))],
                demand: vm(5, GIB),
                expected: "0/1 hosts: 1 insufficient cpu",
            },
            Case {
                name: "memory counts minimums, not maximums",
                hosts: vec![host("a", "z1", 0, 0, 16, 8 * GIB)],
                vms: vec![(
                    "v1",
                    "a",
                    vm(1, 0).with_memory_spec(6 * GIB, 4 * GIB, 8 * GIB),
                )],
                demand: vm(1, 0).with_memory_spec(8 * GIB, 4 * GIB, 8 * GIB),
                expected: "a",
            },
            Case {
                name: "memory minimum defaults to startup",
                hosts: vec![host("a", "z1", 0, 0, 16, 8 * GIB)],
                vms: vec![("v1", "a", vm(1, 0).with_memory_spec(4 * GIB, 0, 0))],
                demand: vm(1, 0).with_memory_spec(4 * GIB + 1, 0, 8 * GIB),
                expected: "0/1 hosts: 1 insufficient memory",
            },
            Case {
                name: "anti-affinity avoids a host with a matching VM",
                hosts: vec![big("a"), big("b")],
                vms: vec![("v1", "a", with_labels(vm(1, GIB), &[("app", "web")]))],
                demand: with_anti(vm(1, GIB), &[("app", "web")]),
                expected: "b",
            },
            Case {
                name: "anti-affinity on another value does not conflict",
                hosts: vec![big("a"), big("b")],
                vms: vec![("v1", "a", with_labels(vm(1, GIB), &[("app", "db")]))],
                demand: with_anti(vm(1, GIB), &[("app", "web")]),
                expected: "a",
            },
            Case {
                name: "anti-affinity is symmetric: the rule of the VM already there",
                hosts: vec![big("a"), big("b")],
                vms: vec![("v1", "a", with_anti(vm(1, GIB), &[("app", "web")]))],
                demand: with_labels(vm(1, GIB), &[("app", "web")]),
                expected: "b",
            },
            Case {
                name: "anti-affinity refusing the only host",
                hosts: vec![big("a")],
                vms: vec![("v1", "a", with_anti(vm(1, GIB), &[("app", "web")]))],
                demand: with_labels(vm(1, GIB), &[("app", "web"), ("tier", "1")]),
                expected: "0/1 hosts: 1 anti-affinity",
            },
            Case {
                name: "a host is counted under its first failing filter",
                hosts: vec![
                    in_state(host("a", "z2", 0, 0, 1, GIB), HostState::Cordoned),
                    host("b", "z2", 0, 0, 1, GIB),
                    host("c", "z1", 0, 0, 1, GIB),
                ],
                vms: vec![],
                demand: in_zone(vm(8, 8 * GIB), "z1"),
                expected: "0/3 hosts: 1 cordoned, 1 insufficient cpu, 1 wrong zone",
            },
            Case {
                name: "no hosts",
                hosts: vec![],
                vms: vec![],
                demand: vm(1, GIB),
                expected: "0/0 hosts: no hosts",
            },
        ],
    );
}

#[test]
fn unplaceable_message_and_counts() {
    // 12 hosts: 7 too small, 3 cordoned, 2 holding a VM that repels this one.
    let mut hosts = Vec::new();
    for i in 0..7 {
        hosts.push(host(&format!("small-{i}"), "z1", 0, 0, 8, GIB));
    }
    for i in 0..3 {
        hosts.push(in_state(
            host(&format!("cordoned-{i}"), "z1", 0, 0, 8, 64 * GIB),
            HostState::Cordoned,
        ));
    }
    let mut vms = Vec::new();
    for i in 0..2 {
        hosts.push(host(&format!("busy-{i}"), "z1", 0, 0, 8, 64 * GIB));
    }
    vms.push(("v0", "busy-0", with_labels(vm(1, GIB), &[("app", "db")])));
    vms.push(("v1", "busy-1", with_labels(vm(1, GIB), &[("app", "db")])));
    let s = cluster(SchedulerConfig::default(), &hosts, &vms);
    let err = s
        .place(&with_anti(vm(2, 4 * GIB), &[("app", "db")]))
        .expect_err("unplaceable");
    assert_eq!(
        err.to_string(),
        "0/12 hosts: 7 insufficient memory, 3 cordoned, 2 anti-affinity"
    );
    assert_eq!(err.hosts(), 12);
    assert_eq!(err.count(FilterReason::InsufficientMemory), 7);
    assert_eq!(err.count(FilterReason::WrongZone), 0);

    for (counts, expected) in [
        (
            vec![
                (FilterReason::Cordoned, 3),
                (FilterReason::FaultDomainAlreadyUsed, 2),
                (FilterReason::InsufficientMemory, 7),
            ],
            "0/12 hosts: 7 insufficient memory, 3 cordoned, 2 fault domain already used",
        ),
        // Equal counts sort by name; repeated reasons add up; zeros vanish.
        (
            vec![
                (FilterReason::WrongZone, 2),
                (FilterReason::Dead, 1),
                (FilterReason::Dead, 1),
                (FilterReason::AntiAffinity, 0),
            ],
            "0/12 hosts: 2 dead, 2 wrong zone",
        ),
        (vec![], "0/12 hosts: no hosts"),
    ] {
        assert_eq!(Unplaceable::new(12, counts).to_string(), expected);
    }
}

#[test]
fn cpu_overcommit_ratio() {
    for (ratio, cpus, fits, does_not_fit) in [
        (4.0, 16, 64, 65),
        (1.0, 16, 16, 17),
        (1.5, 3, 4, 5), // floor(4.5)
        (0.5, 16, 8, 9),
        (f64::NAN, 16, 16, 17),
        (0.0, 16, 16, 17),
        (-2.0, 16, 16, 17),
        (f64::INFINITY, 16, 16, 17),
    ] {
        let config = SchedulerConfig {
            cpu_overcommit: ratio,
            ..SchedulerConfig::default()
        };
        let s = cluster(config, &[host("a", "z1", 0, 0, cpus, 64 * GIB)], &[]);
        assert_eq!(
            outcome(&s, &vm(fits, GIB)),
            "a",
            "ratio {ratio}: {fits} vCPUs fit"
        );
        assert_eq!(
            outcome(&s, &vm(does_not_fit, GIB)),
            "0/1 hosts: 1 insufficient cpu",
            "ratio {ratio}: {does_not_fit} vCPUs do not fit"
        );
    }
}

#[test]
fn scorers() {
    let equal = |id: &str| host(id, "z1", 0, 0, 16, 16 * GIB);
    let no_headroom = SchedulerConfig {
        weights: ScoreWeights {
            fit: 1.0,
            memory_headroom: 0.0,
        },
        ..SchedulerConfig::default()
    };
    let headroom_heavy = SchedulerConfig {
        weights: ScoreWeights {
            fit: 1.0,
            memory_headroom: 5.0,
        },
        ..SchedulerConfig::default()
    };
    let no_weights = SchedulerConfig {
        weights: ScoreWeights {
            fit: f64::NAN,
            memory_headroom: 0.0,
        },
        ..SchedulerConfig::default()
    };
    // a: half full; b: a quarter full; c: empty.
    let loaded = || vec![("v1", "a", vm(4, 8 * GIB)), ("v2", "b", vm(2, 4 * GIB))];
    // "a" is fuller, but its dynamic VM may grow by 8 GiB and only 7 GiB
    // stay free; "b" has static VMs only.
    let dynamic_on_a = || {
        vec![
            (
                "v1",
                "a",
                vm(2, 0).with_memory_spec(8 * GIB, 8 * GIB, 16 * GIB),
            ),
            ("v2", "b", vm(2, 5 * GIB)),
        ]
    };
    let cases: Vec<(&str, SchedulerConfig, Vec<Assignment>, Demand, &str)> = vec![
        (
            "bin-pack prefers the fullest host",
            no_headroom,
            loaded(),
            vm(1, GIB),
            "a",
        ),
        (
            "spread prefers the emptiest host",
            no_headroom,
            loaded(),
            spread(vm(1, GIB)),
            "c",
        ),
        (
            "bin-pack counts minimums only",
            no_headroom,
            dynamic_on_a(),
            vm(1, GIB),
            "a",
        ),
        (
            "memory headroom steers away from a host whose VMs may grow",
            headroom_heavy,
            dynamic_on_a(),
            vm(1, GIB),
            "b",
        ),
        (
            "memory headroom is neutral for static VMs",
            headroom_heavy,
            loaded(),
            vm(1, GIB),
            "a",
        ),
        (
            "ties go to the smallest host id",
            no_headroom,
            vec![],
            vm(1, GIB),
            "a",
        ),
        (
            "zero and NaN weights: all tie",
            no_weights,
            loaded(),
            vm(1, GIB),
            "a",
        ),
        (
            "spread ties go to the smallest id too",
            no_weights,
            loaded(),
            spread(vm(1, GIB)),
            "a",
        ),
    ];
    for (name, config, vms, demand, expected) in cases {
        let s = cluster(config, &[equal("c"), equal("b"), equal("a")], &vms);
        assert_eq!(outcome(&s, &demand), expected, "case: {name}");
        assert_eq!(
            s.place_exhaustive(&demand)
                .map(|d| d.host_id)
                .ok()
                .as_deref(),
            Some(expected),
            "exhaustive, case: {name}"
        );
    }
}

#[test]
fn candidate_limit_trades_score_for_speed() {
    // Best fit by memory is "tight" (CPU nearly empty); "cpu-full" has more
    // free memory but ends up fuller overall, the better bin-pack score.
    let hosts = [
        host("tight", "z1", 0, 0, 64, 10 * GIB),
        host("cpu-full", "z1", 0, 0, 4, 12 * GIB),
    ];
    let vms = [("v1", "cpu-full", vm(15, 0))];
    let demand = vm(1, 8 * GIB);
    let limited = |k| SchedulerConfig {
        candidate_limit: k,
        weights: ScoreWeights {
            fit: 1.0,
            memory_headroom: 0.0,
        },
        ..SchedulerConfig::default()
    };
    assert_eq!(
        outcome(&cluster(limited(1), &hosts, &vms), &demand),
        "tight"
    );
    assert_eq!(
        outcome(&cluster(limited(2), &hosts, &vms), &demand),
        "cpu-full"
    );
    assert_eq!(
        outcome(&cluster(limited(0), &hosts, &vms), &demand),
        "cpu-full"
    );
}

/// Places and assigns `count` VMs of a set; returns their hosts.
fn place_set(s: &mut Scheduler, set: &str, count: usize, demand: &Demand) -> Vec<String> {
    (0..count)
        .map(|i| {
            let d = in_set(demand.clone(), set);
            let decision = s.place(&d).unwrap_or_else(|e| panic!("{set} #{i}: {e}"));
            s.assign(&format!("{set}-{i}"), &decision.host_id, &d)
                .expect("assign");
            decision.host_id
        })
        .collect()
}

#[test]
fn availability_set_spreads_over_fault_and_update_domains() {
    // 3 fault domains x 3 update domains, one host each; ids say where.
    let mut hosts = Vec::new();
    for fd in 0..3 {
        for ud in 0..3 {
            hosts.push(host(&format!("f{fd}u{ud}"), "z1", fd, ud, 16, 64 * GIB));
        }
    }
    let mut s = cluster(SchedulerConfig::default(), &hosts, &[]);
    let placed = place_set(&mut s, "web", 3, &vm(1, GIB));
    let fds: std::collections::BTreeSet<char> =
        placed.iter().map(|h| h.as_bytes()[1] as char).collect();
    let uds: std::collections::BTreeSet<char> =
        placed.iter().map(|h| h.as_bytes()[3] as char).collect();
    assert_eq!(fds.len(), 3, "distinct fault domains: {placed:?}");
    assert_eq!(uds.len(), 3, "distinct update domains: {placed:?}");

    // Every fault domain is used once: the next VMs fill them round-robin.
    let more = place_set(&mut s, "web2", 6, &vm(1, GIB));
    for fd in ['0', '1', '2'] {
        assert_eq!(
            more.iter()
                .filter(|h| h.as_bytes()[1] as char == fd)
                .count(),
            2,
            "{more:?}"
        );
    }

    // Another set, or no set, is not constrained by "web": bin-pack packs.
    let plain = s.place(&vm(1, GIB)).expect("plain");
    let other = place_set(&mut s, "db", 1, &vm(1, GIB));
    assert_eq!(other[0], plain.host_id);

    // The explanation names the spread filters for a placeable VM: with one
    // VM of "solo" placed, the 3 hosts of its fault domain are refused, then
    // the 2 others of its update domain; 4 hosts accept.
    place_set(&mut s, "solo", 1, &vm(1, GIB));
    let verdicts = s.explain(&in_set(vm(1, GIB), "solo"));
    let rejected = |reason| {
        verdicts
            .iter()
            .filter(|v| v.rejected_by == Some(reason))
            .count()
    };
    assert_eq!(
        rejected(FilterReason::FaultDomainAlreadyUsed),
        3,
        "{verdicts:?}"
    );
    assert_eq!(
        rejected(FilterReason::UpdateDomainAlreadyUsed),
        2,
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.iter().filter(|v| v.rejected_by.is_none()).count(),
        4
    );
}

#[test]
fn availability_set_uses_a_used_fault_domain_only_when_the_unused_are_full() {
    let hosts = [
        host("f0", "z1", 0, 0, 16, 4 * GIB),
        host("f1", "z1", 1, 1, 16, 4 * GIB),
        host("f2-full", "z1", 2, 2, 16, GIB),
    ];
    let mut s = cluster(SchedulerConfig::default(), &hosts, &[]);
    let placed = place_set(&mut s, "web", 2, &vm(1, 2 * GIB));
    assert_ne!(placed[0], placed[1]);
    // f2 has no room: the third VM shares a used fault domain.
    let d = in_set(vm(1, 2 * GIB), "web");
    let decision = s.place(&d).expect("relaxed");
    assert!(decision.host_id == "f0" || decision.host_id == "f1");
    let verdicts = s.explain(&d);
    assert_eq!(
        verdicts[2].rejected_by,
        Some(FilterReason::InsufficientMemory)
    );

    // A fault domain with room and no set VM is preferred over bin-packing.
    s.update_host(host("f2-full", "z1", 2, 2, 16, 8 * GIB))
        .expect("grow");
    assert_eq!(s.place(&d).expect("f2").host_id, "f2-full");
}

#[test]
fn availability_set_spreads_update_domains_within_one_fault_domain() {
    let hosts: Vec<HostSpec> = (0..3)
        .map(|ud| host(&format!("u{ud}"), "z1", 0, ud, 16, 64 * GIB))
        .collect();
    let mut s = cluster(SchedulerConfig::default(), &hosts, &[]);
    let mut placed = place_set(&mut s, "web", 3, &vm(1, GIB));
    placed.sort();
    assert_eq!(placed, ["u0", "u1", "u2"]);
}

#[test]
fn fault_domains_are_per_zone() {
    // Fault domain 0 of z1 and of z2 are different racks.
    let hosts = [
        host("a", "z1", 0, 0, 16, 64 * GIB),
        host("b", "z2", 0, 0, 16, 64 * GIB),
    ];
    let mut s = cluster(SchedulerConfig::default(), &hosts, &[]);
    let mut placed = place_set(&mut s, "web", 2, &vm(1, GIB));
    placed.sort();
    assert_eq!(placed, ["a", "b"]);
}

#[test]
fn assign_and_release_are_exact_inverses() {
    let hosts = [
        host("a", "z1", 0, 0, 16, 64 * GIB),
        host("b", "z1", 1, 1, 16, 64 * GIB),
        in_state(host("c", "z2", 0, 0, 16, 64 * GIB), HostState::Cordoned),
    ];
    let mut s = cluster(SchedulerConfig::default(), &hosts, &[]);
    s.assign("base", "a", &with_labels(vm(2, GIB), &[("app", "db")]))
        .expect("assign");
    let before = s.fingerprint();
    let demand = in_set(
        with_anti(
            with_labels(
                vm(3, 0).with_memory_spec(4 * GIB, 2 * GIB, 8 * GIB),
                &[("app", "db"), ("x", "y")],
            ),
            &[("app", "web")],
        ),
        "set",
    );
    for (vm_id, host_id) in [("v1", "a"), ("v2", "b"), ("v3", "c")] {
        s.assign(vm_id, host_id, &demand).expect("assign");
    }
    assert_eq!(
        s.allocation("a"),
        Some(Allocation {
            vcpus: 5,
            memory_mib: 3 * GIB,
            disk_mib: 0,
            vms: 2
        })
    );
    assert_eq!(s.vm_host("v3"), Some("c"));
    assert_ne!(s.fingerprint(), before);
    for (vm_id, host_id) in [("v2", "b"), ("v1", "a"), ("v3", "c")] {
        assert_eq!(s.release(vm_id).as_deref(), Ok(host_id));
    }
    assert_eq!(s.fingerprint(), before);
    assert_eq!(s.vm_count(), 1);
}

/// Disk is reserved like memory, in full: the disks of a host's VMs and the new one's must
/// fit in what the host offers; a host that does not say what it offers is not judged on
/// disk; release gives the space back.
#[test]
fn disk_is_reserved_in_full() {
    let with_disk = |d: u64| Demand {
        disk_mib: d,
        ..vm(1, GIB)
    };
    let offering = |id: &str, disk: Option<u64>| HostSpec {
        allocatable_disk_mib: disk,
        ..host(id, "z1", 0, 0, 16, 64 * GIB)
    };
    let mut s = cluster(
        SchedulerConfig::default(),
        &[offering("a", Some(100 * GIB))],
        &[("v1", "a", with_disk(60 * GIB))],
    );
    assert_eq!(s.allocation("a").map(|a| a.disk_mib), Some(60 * GIB));
    assert_eq!(outcome(&s, &with_disk(40 * GIB)), "a");
    assert_eq!(
        outcome(&s, &with_disk(40 * GIB + 1)),
        "0/1 hosts: 1 insufficient disk"
    );
    assert_eq!(
        s.explain(&with_disk(50 * GIB))[0].rejected_by,
        Some(FilterReason::InsufficientDisk)
    );
    // Memory is judged first: a host short of both is counted under memory.
    assert_eq!(
        outcome(
            &s,
            &Demand {
                disk_mib: 50 * GIB,
                ..vm(1, 65 * GIB)
            }
        ),
        "0/1 hosts: 1 insufficient memory"
    );
    s.add_host(offering("b", None)).expect("add b");
    assert_eq!(outcome(&s, &with_disk(u64::MAX)), "b");
    s.release("v1").expect("release");
    assert_eq!(s.allocation("a").map(|a| a.disk_mib), Some(0));
    assert_eq!(
        s.place_exhaustive(&Demand {
            strategy: Strategy::BinPack,
            ..with_disk(100 * GIB)
        })
        .map(|d| d.host_id),
        Ok("a".to_string())
    );
}

#[test]
fn bookkeeping_errors() {
    let mut s = cluster(
        SchedulerConfig::default(),
        &[host("a", "z1", 0, 0, 16, 64 * GIB)],
        &[],
    );
    assert_eq!(
        s.add_host(host("a", "z1", 0, 0, 1, 1)),
        Err(SchedulerError::HostExists("a".into()))
    );
    assert_eq!(
        s.update_host(host("nope", "z1", 0, 0, 1, 1)),
        Err(SchedulerError::UnknownHost("nope".into()))
    );
    assert_eq!(
        s.assign("v", "nope", &vm(1, 1)),
        Err(SchedulerError::UnknownHost("nope".into()))
    );
    s.assign("v", "a", &vm(1, 1)).expect("assign");
    assert_eq!(
        s.assign("v", "a", &vm(1, 1)),
        Err(SchedulerError::AlreadyAssigned {
            vm_id: "v".into(),
            host_id: "a".into()
        })
    );
    assert_eq!(s.release("w"), Err(SchedulerError::UnknownVm("w".into())));
    assert_eq!(
        s.set_host_state("nope", HostState::Dead),
        Err(SchedulerError::UnknownHost("nope".into()))
    );
    assert_eq!(
        s.remove_host("nope"),
        Err(SchedulerError::UnknownHost("nope".into()))
    );
    assert_eq!(
        SchedulerError::AlreadyAssigned {
            vm_id: "v".into(),
            host_id: "a".into()
        }
        .to_string(),
        "vm v: already assigned to host a"
    );
}

#[test]
fn host_changes_keep_the_snapshot_consistent() {
    let hosts = [
        host("a", "z1", 0, 0, 16, 64 * GIB),
        host("b", "z1", 1, 1, 16, 64 * GIB),
    ];
    let mut s = cluster(SchedulerConfig::default(), &hosts, &[]);
    let d = in_set(with_labels(vm(1, GIB), &[("app", "web")]), "web");
    s.assign("v1", "a", &d).expect("assign");
    s.assign("v2", "a", &d).expect("assign");
    let empty = s.fingerprint();

    // Cordon and uncordon: candidates follow the state.
    s.set_host_state("a", HostState::Cordoned).expect("cordon");
    assert_eq!(outcome(&s, &in_zone(vm(1, GIB), "z1")), "b");
    s.set_host_state("b", HostState::Draining).expect("drain");
    assert_eq!(
        outcome(&s, &vm(1, GIB)),
        "0/2 hosts: 1 cordoned, 1 draining"
    );
    s.set_host_state("a", HostState::Ready).expect("uncordon");
    s.set_host_state("b", HostState::Ready).expect("ready");
    assert_eq!(s.fingerprint(), empty);

    // Moving "a" to b's fault domain moves the set's counts with it.
    s.update_host(host("a", "z1", 1, 1, 16, 64 * GIB))
        .expect("move");
    assert!(
        s.fingerprint()
            .contains("set web vms 2 [\"z1/fd1:2\"] [\"z1/ud1:2\"]"),
        "{}",
        s.fingerprint()
    );
    s.update_host(host("a", "z1", 0, 0, 16, 64 * GIB))
        .expect("move back");
    assert_eq!(s.fingerprint(), empty);

    // Shrinking allocatable below what is allocated: nothing fits, nothing panics.
    s.update_host(host("a", "z1", 0, 0, 0, 0)).expect("shrink");
    assert_eq!(outcome(&s, &in_zone(vm(0, 0), "z1")), "b");
    s.set_host_state("b", HostState::Dead).expect("dead");
    assert_eq!(
        outcome(&s, &vm(0, 0)),
        "0/2 hosts: 1 dead, 1 insufficient cpu"
    );

    // Removing a host releases its VMs.
    assert_eq!(
        s.remove_host("a"),
        Ok(vec!["v1".to_owned(), "v2".to_owned()])
    );
    assert_eq!(s.vm_count(), 0);
    assert_eq!(s.host_count(), 1);
    assert!(!s.fingerprint().contains("set web"));
    assert!(s.fingerprint().contains("pairs 0 vms 0"));
}

#[test]
fn nonsense_inputs_do_not_panic() {
    let huge = Demand {
        vcpus: u32::MAX,
        memory_minimum_mib: u64::MAX,
        memory_maximum_mib: u64::MAX,
        ..Demand::default()
    };
    let empty = Scheduler::default();
    assert_eq!(outcome(&empty, &huge), "0/0 hosts: no hosts");
    assert!(empty.explain(&huge).is_empty());

    let config = SchedulerConfig {
        cpu_overcommit: 1e300,
        weights: ScoreWeights {
            fit: f64::INFINITY,
            memory_headroom: f64::NEG_INFINITY,
        },
        candidate_limit: 0,
    };
    let mut s = cluster(
        config,
        &[
            host("zero", "", 0, 0, 0, 0),
            host("max", "", u32::MAX, u32::MAX, u32::MAX, u64::MAX - 1),
        ],
        &[],
    );
    assert_eq!(s.config().cpu_overcommit, 1e300);
    assert_eq!(s.config().weights.fit, 0.0);
    assert_eq!(
        outcome(&s, &huge),
        "0/2 hosts: 1 insufficient cpu, 1 insufficient memory"
    );
    s.assign("big", "max", &huge)
        .expect("assign regardless of fit");
    s.assign("big2", "max", &huge).expect("saturates");
    assert_eq!(outcome(&s, &vm(0, 0)), "zero");
    s.release("big").expect("release");
    s.release("big2").expect("release");
    assert_eq!(outcome(&s, &vm(1, 1)), "max");
    s.set_config(SchedulerConfig::default());
    assert_eq!(s.config().cpu_overcommit, 4.0);
}

/// SplitMix64: a seeded generator, enough for property tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_demand(rng: &mut Rng) -> Demand {
    let zones = ["", "", "z0", "z1", "z2", "nowhere"];
    let apps = ["web", "db", "cache"];
    let mut d = vm(rng.below(24) as u32, rng.below(24 * GIB));
    d.memory_maximum_mib = d.memory_minimum_mib + rng.below(2) * rng.below(8 * GIB);
    d.zone = zones[rng.below(zones.len() as u64) as usize].to_owned();
    if rng.chance(40) {
        d.availability_set = format!("set{}", rng.below(3));
    }
    if rng.chance(40) {
        d.labels = labels(&[("app", apps[rng.below(3) as usize])]);
    }
    if rng.chance(25) {
        d.anti_affinity_labels = labels(&[("app", apps[rng.below(3) as usize])]);
    }
    if rng.chance(30) {
        d.strategy = Strategy::Spread;
    }
    if rng.chance(50) {
        d.disk_mib = rng.below(64 * GIB);
    }
    d
}

/// Random clusters and demands: the fast path never returns a host the full
/// scan rejects, finds a host whenever the full scan does, and with no
/// candidate limit picks exactly the full scan's best.
#[test]
fn fast_path_agrees_with_the_full_scan() {
    let mut rng = Rng(0x5eed_fab1c);
    let states = [
        HostState::Ready,
        HostState::Ready,
        HostState::Ready,
        HostState::Cordoned,
        HostState::Suspect,
        HostState::Dead,
        HostState::Draining,
    ];
    let (mut placed, mut unplaceable) = (0, 0);
    for round in 0..300 {
        let limit = [0usize, 1, 2, 5][rng.below(4) as usize];
        let config = SchedulerConfig {
            cpu_overcommit: [1.0, 2.0, 4.0][rng.below(3) as usize],
            candidate_limit: limit,
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(config);
        let host_count = rng.below(40);
        for h in 0..host_count {
            let mut spec = host(
                &format!("h{h:02}"),
                &format!("z{}", rng.below(3)),
                rng.below(4) as u32,
                rng.below(3) as u32,
                rng.below(33) as u32,
                rng.below(96 * GIB),
            );
            spec.state = states[rng.below(states.len() as u64) as usize];
            if rng.chance(70) {
                spec.allocatable_disk_mib = Some(rng.below(512 * GIB));
            }
            s.add_host(spec).expect("add");
        }
        let mut vm_ids = Vec::new();
        for step in 0..120 {
            let demand = random_demand(&mut rng);
            let fast = s.place_fast_only(&demand);
            let full = s.place_exhaustive(&demand);
            let context = format!("round {round} step {step} limit {limit} demand {demand:?}");
            assert_eq!(
                fast.is_some(),
                full.is_ok(),
                "{context}: fast {fast:?} full {full:?}"
            );
            if let Some(fast) = &fast {
                let verdicts = s.explain(&demand);
                let verdict = verdicts
                    .iter()
                    .find(|v| v.host_id == fast.host_id)
                    .expect("known host");
                assert_eq!(
                    verdict.rejected_by, None,
                    "{context}: fast chose a rejected host"
                );
                if limit == 0 {
                    let full = full.as_ref().expect("full");
                    assert_eq!(fast.host_id, full.host_id, "{context}");
                    assert_eq!(fast.score, full.score, "{context}");
                }
                assert_eq!(s.place(&demand).as_ref(), Ok(fast), "{context}");
            } else {
                let err = s.place(&demand).expect_err("unplaceable");
                assert_eq!(err.hosts(), host_count as usize);
                assert_eq!(
                    err.reasons().iter().map(|(_, n)| n).sum::<usize>(),
                    host_count as usize,
                    "{context}"
                );
            }
            // Evolve the cluster: assign (sometimes ignoring the decision,
            // as a snapshot rebuilt from the store may), release, flip states.
            match (fast, rng.below(10)) {
                (Some(decision), 0..=5) => {
                    let id = format!("vm{round}-{step}");
                    let before = rng.chance(10).then(|| s.fingerprint());
                    s.assign(&id, &decision.host_id, &demand).expect("assign");
                    if let Some(before) = before {
                        s.release(&id).expect("release");
                        assert_eq!(s.fingerprint(), before, "{context}: release is exact");
                    } else {
                        vm_ids.push(id);
                    }
                    placed += 1;
                }
                (_, 6) if host_count > 0 => {
                    let id = format!("forced{round}-{step}");
                    s.assign(&id, &format!("h{:02}", rng.below(host_count)), &demand)
                        .expect("assign");
                    vm_ids.push(id);
                }
                (_, 7) if !vm_ids.is_empty() => {
                    let id = vm_ids.swap_remove(rng.below(vm_ids.len() as u64) as usize);
                    s.release(&id).expect("release");
                }
                (_, 8) if host_count > 0 => {
                    let state = states[rng.below(states.len() as u64) as usize];
                    s.set_host_state(&format!("h{:02}", rng.below(host_count)), state)
                        .expect("state");
                }
                (None, _) => unplaceable += 1,
                _ => {}
            }
        }
    }
    // The generator covers both outcomes well.
    assert!(
        placed > 5_000 && unplaceable > 2_000,
        "placed {placed} unplaceable {unplaceable}"
    );
}
