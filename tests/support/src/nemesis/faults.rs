//! The nemesis proper: faults of a random kind, at a random moment, for a random time, one
//! after another, every choice drawn from the seed. Each fault is healed before the next,
//! and [`heal_everything`] leaves the cluster whole at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::{ip_quiet, Cluster, HostKind, KILL_AT_ENV};
use super::rng::Rng;
use super::History;

/// Every kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL an agent, start it again after a while.
    AgentKill,
    /// SIGSTOP an agent, SIGCONT it after a while.
    AgentPause,
    /// SIGKILL a fabric-vmm (its agent restarts it).
    VmmKill,
    /// SIGSTOP a fabric-vmm, SIGCONT it after a while.
    VmmPause,
    /// SIGKILL the controller, start it again after a while.
    ControllerKill,
    /// SIGSTOP the controller, SIGCONT it after a while.
    ControllerPause,
    /// A host's uplink down, both ways.
    Partition,
    /// The host cannot reach the controller (a blackhole route in the host's namespace).
    PartitionHostToController,
    /// The controller cannot reach the host (a blackhole route in the datacenter namespace).
    PartitionControllerToHost,
    /// The controller's store throttled to a few write IOPS (cgroup v1 blkio).
    SlowDisk,
    /// An agent restarted with `FABRIC_TEST_KILL_AT=<point>`, a VM start provoked on it, then
    /// restarted without.
    KillAtAfterSpawn,
    KillAtDuringPull,
    KillAtDuringCopy,
    /// An agent's lease clock jumps forward (a suspend), through its offset file.
    BoottimeJump,
    /// An agent's or the controller's wall clock jumps back or forth, through its offset file.
    WallclockJump,
}

impl Fault {
    pub const ALL: [Fault; 15] = [
        Fault::AgentKill,
        Fault::AgentPause,
        Fault::VmmKill,
        Fault::VmmPause,
        Fault::ControllerKill,
        Fault::ControllerPause,
        Fault::Partition,
        Fault::PartitionHostToController,
        Fault::PartitionControllerToHost,
        Fault::SlowDisk,
        Fault::KillAtAfterSpawn,
        Fault::KillAtDuringPull,
        Fault::KillAtDuringCopy,
        Fault::BoottimeJump,
        Fault::WallclockJump,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::AgentKill => "agent-kill",
            Fault::AgentPause => "agent-pause",
            Fault::VmmKill => "vmm-kill",
            Fault::VmmPause => "vmm-pause",
            Fault::ControllerKill => "controller-kill",
            Fault::ControllerPause => "controller-pause",
            Fault::Partition => "partition",
            Fault::PartitionHostToController => "partition-host-to-controller",
            Fault::PartitionControllerToHost => "partition-controller-to-host",
            Fault::SlowDisk => "slow-disk",
            Fault::KillAtAfterSpawn => "kill-at-after-spawn",
            Fault::KillAtDuringPull => "kill-at-during-pull",
            Fault::KillAtDuringCopy => "kill-at-during-copy",
            Fault::BoottimeJump => "boottime-jump",
            Fault::WallclockJump => "wallclock-jump",
        }
    }

    pub fn by_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the fault needs a KVM host (fabric-vmm processes, image pulls, disk copies).
    fn needs_kvm(self) -> bool {
        matches!(
            self,
            Fault::VmmKill
                | Fault::VmmPause
                | Fault::KillAtAfterSpawn
                | Fault::KillAtDuringPull
                | Fault::KillAtDuringCopy
        )
    }

    fn kill_point(self) -> Option<&'static str> {
        match self {
            Fault::KillAtAfterSpawn => Some("after-spawn"),
            Fault::KillAtDuringPull => Some("during-pull"),
            Fault::KillAtDuringCopy => Some("during-copy"),
            _ => None,
        }
    }
}

/// How long faults last and how far apart they are, milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct FaultTiming {
    pub gap_ms: (u64, u64),
    pub hold_ms: (u64, u64),
}

impl Default for FaultTiming {
    fn default() -> Self {
        FaultTiming {
            gap_ms: (300, 3000),
            hold_ms: (500, 6000),
        }
    }
}

fn signal(pid: u32, sig: i32) {
    if pid != 0 {
        // SAFETY: every pid signalled here is a process the cluster started and still owns
        // (agent, controller) or a fabric-vmm found by its command line naming the cluster.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// Sleeps `d`, waking early when `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

fn lock(cluster: &Mutex<Cluster>) -> std::sync::MutexGuard<'_, Cluster> {
    cluster.lock().unwrap_or_else(|e| e.into_inner())
}

/// Injects faults until `stop` is set; the count per kind.
pub fn run(
    cluster: Arc<Mutex<Cluster>>,
    mut rng: Rng,
    kinds: Vec<Fault>,
    timing: FaultTiming,
    stop: Arc<AtomicBool>,
    history: Arc<History>,
) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let has_kvm = lock(&cluster).hosts.iter().any(|h| h.kind == HostKind::Kvm);
    let kinds: Vec<Fault> = kinds
        .into_iter()
        .filter(|k| has_kvm || !k.needs_kvm())
        .collect();
    if kinds.is_empty() {
        return counts;
    }
    loop {
        nap(rng.millis(timing.gap_ms.0, timing.gap_ms.1), &stop);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let kind = kinds[rng.index(kinds.len())];
        let hold = rng.millis(timing.hold_ms.0, timing.hold_ms.1);
        if let Some(what) = inject(&cluster, &mut rng, kind, hold, &stop, &history) {
            *counts.entry(what).or_default() += 1;
        }
    }
    counts
}

/// Starts the controller again, up to three times; says so in the history.
fn restart_controller(c: &mut Cluster, history: &History) {
    for attempt in 1..=3 {
        if c.start_controller() {
            return;
        }
        let tail = c
            .controller
            .as_ref()
            .map(|p| p.log_tail(10))
            .unwrap_or_default();
        history.line(&format!(
            "HARNESS: the controller did not start (attempt {attempt}):\n{tail}"
        ));
    }
}

/// One fault, held for `hold` and healed; its name as counted (None if nothing was done).
fn inject(
    cluster: &Mutex<Cluster>,
    rng: &mut Rng,
    kind: Fault,
    hold: Duration,
    stop: &AtomicBool,
    history: &History,
) -> Option<String> {
    let hosts = lock(cluster).hosts.len();
    let h = rng.index(hosts);
    let name = lock(cluster).hosts[h].name.clone();
    let say = |what: &str| history.line(&format!("fault {}: {what}", kind.name()));
    match kind {
        Fault::AgentKill => {
            say(&format!("SIGKILL agent of {name}, restart after {hold:?}"));
            lock(cluster).kill9_agent(h);
            nap(hold, stop);
            lock(cluster).start_agent(h, &[]);
            say(&format!("agent of {name} started again"));
        }
        Fault::AgentPause => {
            let pid = lock(cluster).hosts[h].agent_pid()?;
            say(&format!("SIGSTOP agent of {name} (pid {pid}) for {hold:?}"));
            signal(pid, libc::SIGSTOP);
            nap(hold, stop);
            signal(pid, libc::SIGCONT);
            say(&format!("SIGCONT agent of {name}"));
        }
        Fault::VmmKill | Fault::VmmPause => {
            let vmms = lock(cluster).all_vmms();
            if vmms.is_empty() {
                return None;
            }
            let (host, pid, vm) = vmms[rng.index(vmms.len())].clone();
            let on = lock(cluster).hosts[host].name.clone();
            if kind == Fault::VmmKill {
                say(&format!("SIGKILL fabric-vmm {pid} of VM {vm} on {on}"));
                signal(pid, libc::SIGKILL);
            } else {
                say(&format!(
                    "SIGSTOP fabric-vmm {pid} of VM {vm} on {on} for {hold:?}"
                ));
                signal(pid, libc::SIGSTOP);
                nap(hold, stop);
                signal(pid, libc::SIGCONT);
                say(&format!("SIGCONT fabric-vmm {pid}"));
            }
        }
        Fault::ControllerKill => {
            say(&format!("SIGKILL controller, restart after {hold:?}"));
            lock(cluster).kill9_controller();
            nap(hold, stop);
            restart_controller(&mut lock(cluster), history);
            say("controller started again");
        }
        Fault::ControllerPause => {
            let pid = lock(cluster).controller_pid()?;
            say(&format!("SIGSTOP controller (pid {pid}) for {hold:?}"));
            signal(pid, libc::SIGSTOP);
            nap(hold, stop);
            signal(pid, libc::SIGCONT);
            say("SIGCONT controller");
        }
        Fault::Partition => {
            let ns = lock(cluster).hosts[h].ns.clone();
            say(&format!("{name} eth0 down for {hold:?}"));
            ip_quiet(&["-n", &ns, "link", "set", "eth0", "down"]);
            nap(hold, stop);
            ip_quiet(&["-n", &ns, "link", "set", "eth0", "up"]);
            say(&format!("{name} eth0 up"));
        }
        Fault::PartitionHostToController => {
            let ns = lock(cluster).hosts[h].ns.clone();
            say(&format!("{name} cannot reach the controller for {hold:?}"));
            ip_quiet(&["-n", &ns, "route", "add", "blackhole", "10.99.0.1/32"]);
            nap(hold, stop);
            ip_quiet(&["-n", &ns, "route", "del", "blackhole", "10.99.0.1/32"]);
            say(&format!("{name} reaches the controller again"));
        }
        Fault::PartitionControllerToHost => {
            let (net, address) = {
                let c = lock(cluster);
                (c.net_ns.clone(), c.hosts[h].address.clone())
            };
            let route = format!("{address}/32");
            say(&format!("the controller cannot reach {name} for {hold:?}"));
            ip_quiet(&["-n", &net, "route", "add", "blackhole", &route]);
            nap(hold, stop);
            ip_quiet(&["-n", &net, "route", "del", "blackhole", &route]);
            say(&format!("the controller reaches {name} again"));
        }
        Fault::SlowDisk => {
            let iops = rng.range(5, 20);
            let bps = rng.range(64, 1024) << 10;
            say(&format!(
                "controller store throttled to {iops} write IOPS, {} KiB/s for {hold:?}",
                bps >> 10
            ));
            if let Err(e) = lock(cluster).throttle_disk(iops, bps) {
                say(&format!("cannot throttle: {e}"));
                return None;
            }
            nap(hold, stop);
            let _ = lock(cluster).throttle_disk(0, 0);
            say("controller store unthrottled");
        }
        Fault::KillAtAfterSpawn | Fault::KillAtDuringPull | Fault::KillAtDuringCopy => {
            let point = kind.kill_point().unwrap_or_default();
            let kvm: Vec<usize> = lock(cluster)
                .hosts
                .iter()
                .filter(|h| h.kind == HostKind::Kvm)
                .map(|h| h.index)
                .collect();
            let h = kvm[rng.index(kvm.len())];
            let (name, data) = {
                let c = lock(cluster);
                (c.hosts[h].name.clone(), c.hosts[h].data_dir())
            };
            say(&format!(
                "restart agent of {name} with {KILL_AT_ENV}={point}"
            ));
            lock(cluster).kill9_agent(h);
            // Make the next start on this host reach the point: a pull needs the image out
            // of the cache, a copy needs the VM's rootfs copy gone.
            let vmms = lock(cluster).hosts[h].vmms();
            let victim = (!vmms.is_empty()).then(|| vmms[rng.index(vmms.len())].clone());
            if point == "during-pull" {
                let cached = std::fs::read_dir(data.join("images")).into_iter().flatten();
                for entry in cached.flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            if let (Some((_, vm)), "during-copy") = (&victim, point) {
                let _ = std::fs::remove_file(data.join("vms").join(vm).join("rootfs.img"));
            }
            let hooked = {
                let mut c = lock(cluster);
                c.start_agent(h, &[(KILL_AT_ENV.to_string(), point.to_string())]);
                c.hosts[h].agent_pid().unwrap_or(0)
            };
            // The restarted agent re-adopts its VMMs; one killed now is started again.
            nap(Duration::from_millis(1500), stop);
            if let Some((pid, vm)) = &victim {
                say(&format!(
                    "SIGKILL fabric-vmm {pid} of VM {vm} to provoke a start"
                ));
                signal(*pid, libc::SIGKILL);
            }
            let start = Instant::now();
            let mut fired = false;
            while start.elapsed() < Duration::from_secs(10) && !stop.load(Ordering::SeqCst) {
                // Only the agent started here, exiting on its own, counts (another fault
                // stream may have replaced it meanwhile).
                let exited = {
                    let mut c = lock(cluster);
                    match c.hosts[h].agent.as_mut() {
                        Some(a) if a.pid() == hooked => a
                            .child
                            .as_mut()
                            .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_)))),
                        _ => break,
                    }
                };
                if exited {
                    fired = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            say(&format!(
                "agent of {name} {} after {:?}; restarting it without {KILL_AT_ENV}",
                if fired {
                    "killed itself"
                } else {
                    "still running"
                },
                start.elapsed()
            ));
            nap(hold.min(Duration::from_secs(2)), stop);
            lock(cluster).kill9_agent(h);
            lock(cluster).start_agent(h, &[]);
            return Some(format!(
                "{}{}",
                kind.name(),
                if fired { "" } else { " (did not fire)" }
            ));
        }
        Fault::BoottimeJump => {
            let jump = rng.range(1000, 8000);
            let (file, total) = {
                let mut c = lock(cluster);
                let host = &mut c.hosts[h];
                host.boottime_ms += jump;
                (host.boottime_file.clone(), host.boottime_ms)
            };
            say(&format!(
                "lease clock of {name} jumps {jump} ms forward (offset {total} ms)"
            ));
            let _ = std::fs::write(file, total.to_string());
        }
        Fault::WallclockJump => {
            let magnitude = rng.range(1000, 120_000) as i64;
            let offset = if rng.chance(50) {
                -magnitude
            } else {
                magnitude
            };
            let (file, who) = if rng.chance(25) {
                let c = lock(cluster);
                (
                    c.controller_wallclock_file.clone(),
                    "the controller".to_string(),
                )
            } else {
                let c = lock(cluster);
                (
                    c.hosts[h].wallclock_file.clone(),
                    format!("agent of {name}"),
                )
            };
            say(&format!(
                "wall clock of {who} off by {offset} ms for {hold:?}"
            ));
            let _ = std::fs::write(&file, offset.to_string());
            nap(hold, stop);
            let _ = std::fs::write(&file, "0");
            say(&format!("wall clock of {who} back"));
        }
    }
    Some(kind.name().to_string())
}

/// Leaves nothing broken: every process continued and running, links up, routes gone, the
/// disk unthrottled, the wall clocks back. Called once every fault stream has ended.
pub fn heal_everything(cluster: &Mutex<Cluster>, history: &History) {
    let mut c = lock(cluster);
    if let Some(pid) = c.controller_pid() {
        signal(pid, libc::SIGCONT);
    }
    let exited = c
        .controller
        .as_mut()
        .and_then(|p| p.child.as_mut())
        .map(|child| matches!(child.try_wait(), Ok(Some(_))))
        .unwrap_or(true);
    if exited {
        history.line("heal: the controller was not running; starting it");
        restart_controller(&mut c, history);
    }
    for (_, pid, _) in c.all_vmms() {
        signal(pid, libc::SIGCONT);
    }
    let _ = c.throttle_disk(0, 0);
    let _ = std::fs::write(&c.controller_wallclock_file, "0");
    let net = c.net_ns.clone();
    for i in 0..c.hosts.len() {
        let (ns, address) = (c.hosts[i].ns.clone(), c.hosts[i].address.clone());
        ip_quiet(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip_quiet(&["-n", &ns, "route", "del", "blackhole", "10.99.0.1/32"]);
        ip_quiet(&[
            "-n",
            &net,
            "route",
            "del",
            "blackhole",
            &format!("{address}/32"),
        ]);
        let _ = std::fs::write(&c.hosts[i].wallclock_file, "0");
        match c.hosts[i].agent_pid() {
            Some(pid) => signal(pid, libc::SIGCONT),
            None => c.start_agent(i, &[]),
        }
        let dead = c.hosts[i]
            .agent
            .as_mut()
            .and_then(|a| a.child.as_mut())
            .map(|child| matches!(child.try_wait(), Ok(Some(_))))
            .unwrap_or(true);
        if dead {
            history.line(&format!(
                "heal: agent of {} had exited; started again",
                c.hosts[i].name
            ));
            c.kill9_agent(i);
            c.start_agent(i, &[]);
        }
    }
    history.line("heal: everything healed");
}
