//! The nemesis: a Jepsen-style hunt for double runs. A cluster (one real controller, real-KVM
//! hosts running the freestanding test guest, simulated hosts, each host in its own network
//! namespace), a workload of API calls, faults injected at random moments, a sampler that
//! records every live copy of every VM every ~20 ms, a checker, and a verdict.
//!
//! - [`cluster`]: the hosts, the controller, its store on a loop device (slow-disk faults).
//! - [`workload`]: creates, deletes, stops, starts, cordons, uncordons, drains; recorded.
//! - [`faults`]: kills, pauses, partitions (both ways, one way), a slow disk, an agent killed
//!   at a chosen point of a VM start, lease-clock and wall-clock jumps.
//! - [`sampler`]: what "live" means, sampled.
//! - [`checker`]: double runs, lost acknowledged writes, lost VMs; the [`Verdict`] table.
//! - [`rng`]: the seeded generator every random choice comes from.
//!
//! Every choice (operation, fault, target, moment, duration) comes from the seed, printed
//! first, so a failing run can be replayed (`--seed`); the interleaving with the daemons'
//! own timing is of course not replayed exactly.

pub mod checker;
pub mod cluster;
pub mod faults;
pub mod rng;
pub mod sampler;
pub mod workload;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{ListVmsRequest, RestartPolicy, VmSpec};

pub use checker::Verdict;
use checker::{FinalVm, OpKind};
use cluster::{Cluster, ClusterSpec};
use faults::{Fault, FaultTiming};
use rng::Rng;
use sampler::{HostInfo, Sampler};
use workload::Client;

use crate::cluster::{unix_channel, Timing};

/// The run's history: every operation, fault, controller view change and violation, one
/// line each, stamped with the time since the run started.
pub struct History {
    start: Instant,
    file: Mutex<std::fs::File>,
    pub path: PathBuf,
    /// Also print violations on stderr as they happen.
    echo: bool,
}

impl History {
    pub fn create(path: &Path, echo: bool) -> std::io::Result<History> {
        Ok(History {
            start: Instant::now(),
            file: Mutex::new(std::fs::File::create(path)?),
            path: path.to_owned(),
            echo,
        })
    }

    /// Milliseconds since the start.
    pub fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn line(&self, what: &str) {
        let line = format!("t={:>9.3}s {what}\n", self.ms() as f64 / 1000.0);
        if self.echo && (what.starts_with("DOUBLE") || what.starts_with("fault")) {
            eprint!("nemesis: {line}");
        }
        let _ = self
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(line.as_bytes());
    }
}

/// A run of the nemesis.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// How long faults are injected (the workload runs as long).
    pub fault_time: Duration,
    /// The longest wait, after the faults, for every VM to run again.
    pub settle_time: Duration,
    pub kvm_hosts: usize,
    pub sim_hosts: usize,
    /// VMs the workload keeps, about.
    pub vms: usize,
    pub memory_mib: u64,
    /// The controller's memory-relief window, seconds (0: no memory-relief moves).
    pub relief_window_s: f64,
    pub timing: Timing,
    pub faults: Vec<Fault>,
    pub fault_timing: FaultTiming,
    /// Fault streams injecting at once (each from its own stream of the seed), so faults
    /// overlap.
    pub nemeses: usize,
    /// Pause between two workload calls, ms.
    pub workload_gap_ms: (u64, u64),
    pub agent_env: Vec<(String, String)>,
    /// More variables for one agent: (host index, name, value); KVM hosts come first.
    pub host_env: Vec<(usize, String, String)>,
    pub controller_env: Vec<(String, String)>,
    /// Where the history (and, after a run that is not clean, the daemons' logs) go.
    pub log_dir: PathBuf,
    /// Print faults and double runs on stderr as they happen.
    pub echo: bool,
    /// Called with the cluster's prefix and directory once it exists (a benchmark registers
    /// them to be removed if it aborts).
    pub on_start: Option<fn(&str, &Path)>,
}

impl Config {
    /// The defaults: 1 KVM host, 3 simulated hosts, 6 VMs, every fault, 1 s heartbeats, a
    /// 2 s lease, a 1 s fencing margin (as bench/failover).
    pub fn new(seed: u64, fault_time: Duration) -> Config {
        Config {
            seed,
            fault_time,
            settle_time: Duration::from_secs(60),
            kvm_hosts: 1,
            sim_hosts: 3,
            vms: 6,
            memory_mib: 64,
            relief_window_s: 3.0,
            timing: Timing {
                lease_ttl: 2.0,
                heartbeat_interval: 1.0,
                fencing_margin: 1.0,
            },
            faults: Fault::ALL.to_vec(),
            fault_timing: FaultTiming::default(),
            nemeses: 2,
            workload_gap_ms: (200, 1500),
            agent_env: Vec::new(),
            host_env: Vec::new(),
            controller_env: Vec::new(),
            log_dir: std::env::temp_dir(),
            echo: true,
            on_start: None,
        }
    }
}

/// The memory balancer's budget on simulated hosts when memory relief is on: VMs of up to
/// [`DEMAND_MAX_MIB`] each make a host of a few of them short, and the controller moves one.
pub const SIM_BUDGET_MIB: u64 = 1024;
pub const DEMAND_MAX_MIB: u64 = 450;

/// The VMs the nemesis runs: the freestanding test guest's `clock` scenario, which idles in
/// 100 ms sleeps for years (`fabric.mib` sleeps), cheap on CPU even under emulation. Their
/// memory may grow to 512 MiB; on simulated hosts each wants a demand of its own (from its
/// name, 32..=DEMAND_MAX_MIB MiB), so that hosts run short and memory-relief moves happen.
pub fn guest_spec(name: &str, memory_mib: u64) -> VmSpec {
    let mut spec = crate::vmspec::vm_spec(
        name,
        crate::vmspec::memory(memory_mib, 0, memory_mib.max(512)),
        "default",
        "",
        RestartPolicy::Unspecified,
    );
    spec.kernel_cmdline = "fabric.test=clock fabric.mib=100000000000".to_string();
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let demand = 32 + hash % (DEMAND_MAX_MIB - 31);
    spec.placement = Some(fabric_proto::v1::Placement {
        labels: [(
            "fabric.sim/memory-demand-mib".to_string(),
            demand.to_string(),
        )]
        .into(),
        ..Default::default()
    });
    spec
}

/// Counts the memory-relief moves the controller starts (VM_EVICTED events with reason
/// `MemoryRelief`), following its event stream across its restarts.
struct ReliefCounter {
    moves: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn relief_counter(socket: PathBuf, history: Arc<History>) -> ReliefCounter {
    let moves = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = moves.clone();
    let task = tokio::spawn(async move {
        loop {
            let mut c = ComputeClient::new(unix_channel(&socket).await);
            if let Ok(stream) = c
                .watch_events(fabric_proto::v1::WatchEventsRequest::default())
                .await
            {
                let mut stream = stream.into_inner();
                while let Ok(Some(event)) = stream.message().await {
                    if event.kind() == fabric_proto::v1::EventKind::VmEvicted
                        && event.reason == "MemoryRelief"
                    {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        history.line(&format!("relief move: {}", event.message));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    ReliefCounter { moves, task }
}

/// What the controller has at the end.
async fn final_vms(socket: &Path) -> Option<Vec<FinalVm>> {
    let mut c = ComputeClient::new(unix_channel(socket).await);
    let vms = tokio::time::timeout(
        Duration::from_secs(5),
        c.list_vms(ListVmsRequest::default()),
    )
    .await
    .ok()?
    .ok()?
    .into_inner()
    .vms;
    Some(
        vms.into_iter()
            .map(|v| {
                let s = v.status.unwrap_or_default();
                FinalVm {
                    name: v.spec.map(|s| s.name).unwrap_or_default(),
                    desired: s.desired_state(),
                    phase: s.phase(),
                    host_id: s.host_id,
                    reason: s.reason,
                    id: v.id,
                }
            })
            .collect(),
    )
}

/// Copies the daemons' logs of the cluster in `from` to `to`.
fn keep_logs(from: &Path, to: &Path) {
    let _ = std::fs::create_dir_all(to);
    let mut dirs = vec![from.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && name.starts_with('h') && dir == from {
                dirs.push(path);
            } else if name.ends_with(".log") {
                let prefix = dir
                    .strip_prefix(from)
                    .ok()
                    .and_then(|p| p.to_str())
                    .filter(|p| !p.is_empty())
                    .map(|p| format!("{p}-"))
                    .unwrap_or_default();
                let _ = std::fs::copy(&path, to.join(format!("{prefix}{name}")));
            }
        }
    }
}

/// The fault threads: stopped and awaited when dropped, also when the run panics, so that
/// none outlives the cluster (they hold it) and the cluster is removed.
struct Nemeses {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<std::collections::BTreeMap<String, usize>>>,
}

impl Drop for Nemeses {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Runs the nemesis as `config` says; the verdict.
pub async fn run(config: &Config) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let seed = config.seed;
    eprintln!(
        "nemesis: seed {seed} (replay with --seed {seed}); {} KVM + {} simulated hosts, {} VMs, {:?} of faults",
        config.kvm_hosts, config.sim_hosts, config.vms, config.fault_time
    );
    std::fs::create_dir_all(&config.log_dir)?;
    let history = Arc::new(History::create(
        &config
            .log_dir
            .join(format!("nemesis-{seed}-{}.log", std::process::id())),
        config.echo,
    )?);
    history.line(&format!("seed {seed}"));
    let spec = ClusterSpec {
        kvm_hosts: config.kvm_hosts,
        sim_hosts: config.sim_hosts,
        timing: config.timing,
        agent_env: config.agent_env.clone(),
        host_env: config.host_env.clone(),
        controller_env: config.controller_env.clone(),
        sim_cpus: 4,
        sim_memory_mib: 8192,
        relief_window_s: config.relief_window_s,
        sim_budget_mib: if config.relief_window_s > 0.0 {
            SIM_BUDGET_MIB
        } else {
            0
        },
    };
    let cluster = tokio::task::block_in_place(|| Cluster::start(&spec));
    if let Some(on_start) = config.on_start {
        on_start(&cluster.prefix, cluster.path());
    }
    let socket = cluster.socket();
    let cluster_dir = cluster.path().to_path_buf();
    let host_names: Vec<String> = cluster.hosts.iter().map(|h| h.name.clone()).collect();
    let infos: Vec<HostInfo> = cluster
        .hosts
        .iter()
        .map(|h| HostInfo {
            name: h.name.clone(),
            kind: h.kind,
            data_dir: h.data_dir(),
            socket: h.socket(),
        })
        .collect();
    let cluster = Arc::new(Mutex::new(cluster));
    let result = drive(
        config,
        &cluster,
        &history,
        socket,
        cluster_dir.clone(),
        host_names,
        infos,
    )
    .await;
    let mut verdict = match result {
        Ok(v) => v,
        Err(e) => {
            keep_logs(
                &cluster_dir,
                &config.log_dir.join(format!("nemesis-{seed}-logs")),
            );
            return Err(e);
        }
    };
    if !verdict.clean() {
        let to = config.log_dir.join(format!("nemesis-{seed}-logs"));
        keep_logs(&cluster_dir, &to);
        history.line(&format!("daemons' logs kept in {}", to.display()));
    }
    tokio::task::block_in_place(move || drop(cluster));
    verdict.total_secs = started.elapsed().as_secs_f64();
    verdict.log = history.path.display().to_string();
    Ok(verdict)
}

async fn drive(
    config: &Config,
    cluster: &Arc<Mutex<Cluster>>,
    history: &Arc<History>,
    socket: PathBuf,
    cluster_dir: PathBuf,
    host_names: Vec<String>,
    infos: Vec<HostInfo>,
) -> anyhow::Result<Verdict> {
    let seed = config.seed;
    let hosts = infos.len();
    let compute = ComputeClient::new(unix_channel(&socket).await);
    crate::compute::ready_hosts(&compute, hosts, Duration::from_secs(60)).await;
    history.line("all hosts READY");
    {
        let c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        let kernel = crate::testguest::elf();
        c.fabricctl(&[
            "image",
            "push",
            &kernel.display().to_string(),
            "--name",
            "default",
            "--role",
            "kernel",
        ])
        .map_err(anyhow::Error::msg)?;
        // A root disk too, so that a VM start on a KVM host copies one (the kill-at
        // during-copy point); the test guest ignores it.
        let rootfs = crate::image::image_dir().join("rootfs.ext4");
        if config.kvm_hosts > 0 && rootfs.is_file() {
            c.fabricctl(&[
                "image",
                "push",
                &rootfs.display().to_string(),
                "--name",
                "default",
                "--role",
                "rootfs",
            ])
            .map_err(anyhow::Error::msg)?;
        }
    }
    let sampler = Sampler::start(infos, cluster_dir, socket.clone(), history.clone());
    let relief = relief_counter(socket.clone(), history.clone());
    let ops = Arc::new(Mutex::new(Vec::new()));
    let client = Client {
        socket: socket.clone(),
        history: history.clone(),
        ops: ops.clone(),
    };
    let memory = config.memory_mib;
    let mut vms = Vec::new();
    for i in 0..config.vms {
        let name = format!("nem-init-{i}");
        let op = client
            .call(OpKind::Create, "", &name, Some(&guest_spec(&name, memory)))
            .await;
        if op.ok {
            vms.push(op.vm);
        }
    }
    // Let them start before the first fault (not required: the checker does not care).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let live = sampler.last().copies.len();
        if live >= vms.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    history.line(&format!(
        "{} of {} initial VMs live after {:?}; faults start",
        sampler.last().copies.len(),
        vms.len(),
        t.elapsed()
    ));

    let fault_start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workload = tokio::spawn(workload::run(
        client.clone(),
        Rng::stream(seed, 1),
        config.vms,
        move |name| guest_spec(name, memory),
        vms,
        host_names.clone(),
        config.workload_gap_ms,
        stop.clone(),
    ));
    let mut nemeses = Nemeses {
        stop: stop.clone(),
        threads: (0..config.nemeses.max(1))
            .map(|k| {
                let (cluster, stop, history) = (cluster.clone(), stop.clone(), history.clone());
                let (kinds, timing) = (config.faults.clone(), config.fault_timing);
                let rng = Rng::stream(seed, 2 + k as u64);
                std::thread::spawn(move || faults::run(cluster, rng, kinds, timing, stop, history))
            })
            .collect(),
    };
    tokio::time::sleep(config.fault_time).await;
    stop.store(true, Ordering::SeqCst);
    let _ = workload.await;
    let mut fault_counts = std::collections::BTreeMap::new();
    for nemesis in std::mem::take(&mut nemeses.threads) {
        let counts = tokio::task::spawn_blocking(move || nemesis.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a nemesis thread panicked"))?;
        for (kind, n) in counts {
            *fault_counts.entry(kind).or_insert(0) += n;
        }
    }
    let fault_secs = fault_start.elapsed().as_secs_f64();
    history.line("faults stop; settling");
    tokio::task::block_in_place(|| faults::heal_everything(cluster, history));

    // Uncordon every host (recorded like the workload's calls), then wait for the VMs.
    let settle_start = Instant::now();
    loop {
        let ids = client.host_ids().await;
        if ids.len() == hosts || settle_start.elapsed() > Duration::from_secs(30) {
            for name in &host_names {
                if let Some(id) = ids.get(name) {
                    client.call(OpKind::Uncordon, id, name, None).await;
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let quiet =
        Duration::from_secs_f64((config.timing.lease_ttl + config.timing.fencing_margin) * 2.0);
    let final_state = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(now) = final_vms(&socket).await else {
            if settle_start.elapsed() > config.settle_time {
                anyhow::bail!("the controller does not answer ListVms after the faults");
            }
            continue;
        };
        let (lost, _) = checker::lost_vms(&now, &sampler.last());
        if (lost.is_empty() && settle_start.elapsed() >= quiet)
            || settle_start.elapsed() > config.settle_time
        {
            break now;
        }
    };
    history.line(&format!("settled after {:?}", settle_start.elapsed()));
    let last = sampler.last();
    let state = sampler.stop().await;
    relief.task.abort();
    let relief_moves = relief.moves.load(std::sync::atomic::Ordering::SeqCst);
    let ops = ops.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (lost_writes, open_checks) = checker::lost_writes(&ops, &final_state);
    let (lost_vms, pending_capacity) = checker::lost_vms(&final_state, &last);
    let mut op_counts = std::collections::BTreeMap::new();
    for kind in OpKind::ALL {
        let mine: Vec<_> = ops.iter().filter(|o| o.kind == kind).collect();
        op_counts.insert(
            kind.name(),
            (mine.len(), mine.iter().filter(|o| o.ok).count()),
        );
    }
    let kvm = config.kvm_hosts;
    let verdict = Verdict {
        seed,
        fault_secs,
        total_secs: 0.0,
        hosts: format!(
            "{kvm} KVM + {} simulated hosts, ~{} VMs, {} overlapping fault streams; heartbeat {} s, lease TTL {} s, fencing margin {} s",
            config.sim_hosts,
            config.vms,
            config.nemeses.max(1),
            config.timing.heartbeat_interval,
            config.timing.lease_ttl,
            config.timing.fencing_margin
        ),
        ops: op_counts,
        relief_moves,
        faults: fault_counts,
        samples: state.samples,
        controller_samples: state.controller_samples,
        double_runs: state.double_runs,
        double_run_samples: state.double_run_samples,
        lost_writes,
        open_checks,
        lost_vms,
        pending_capacity,
        vms_checked: final_state.len(),
        log: String::new(),
    };
    for w in &verdict.lost_writes {
        history.line(&format!("LOST WRITE: VM {}: {}", w.vm, w.what));
    }
    for v in &verdict.lost_vms {
        history.line(&format!("LOST VM: {v}"));
    }
    Ok(verdict)
}
