//! Dynamic memory on one host (issue 8): the real stack — a `fabric-controller` (its store in a
//! temp dir) and one `fabric-agent` in a network namespace made for the run, configured with
//! `[memory] budget_mib` — runs V VMs whose maximums add up to more than the budget, and their
//! guests drive a memory load whose peaks add up to more than the budget too, though the demand
//! at any instant fits. The same load runs with the agent's balancer on and off (`[memory]
//! balancer = false`), each on a fresh stack.
//!
//! The guests are the freestanding test guest's `memload` scenario (`images/testguest/
//! memload.c`), which is a virtio-balloon driver (follows the target, answers statistics
//! requests with Linux's way of counting, free page reporting) and a workload: phases of N MiB
//! for T s on the host's clock, staggered so that each VM peaks alone. A workload page it cannot
//! get at once is waited for (pressure, printed with its start and end); no page for
//! `--oom-ms` is a guest OOM kill. Guest user space cannot run on these machines
//! (`shared/KVM-HOST.md`), which is why the load comes from the test guest.
//!
//! Every `--sample-ms` the benchmark reads each fabric-vmm's resident memory, each balloon's
//! target and size (the VMM's control socket, `GetMemoryStats`) and the guests' new console
//! lines. It reports, per mode: the overcommit ratio (sum of maximums over the budget), host
//! memory in use (sum of the VMMs' RSS) against the budget, the time a pressured VM waits for
//! its memory, guest OOM kills, and how long the balloons take to settle after a demand step.
//! Everything it makes (processes, namespace, cgroups, files) is removed at the end, also on
//! an error, Ctrl-C or a panic, and it checks that nothing is left.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use fabric_bench::cleanup::{self, Made};
use fabric_bench::interrupt::until_interrupted;
use fabric_bench::require_kvm;
use fabric_bench::stats::{percentile, secs};
use fabric_proto::v1::vmm_client::VmmClient;
use fabric_proto::v1::GetMemoryStatsRequest;
use fabric_test_support::cluster::{controller_command, wait_for_path, workspace_bin, Process};
use fabric_test_support::process::{cpu_secs, loadavg, rss_kib};
use fabric_test_support::testguest::{self, MemloadEvent};
use tonic::transport::Channel;

#[derive(Parser, Clone, Debug)]
#[command(
    about = "Dynamic memory on one host: an overcommitted memory load with the balancer on and off"
)]
struct Args {
    /// VMs on the host.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    /// Memory the host's VMs may use together (`[memory] budget_mib`), MiB.
    #[arg(long, default_value_t = 1024)]
    budget_mib: u64,
    /// Each VM's maximum (its guest RAM), MiB.
    #[arg(long, default_value_t = 512)]
    maximum_mib: u64,
    /// Each VM's minimum, MiB.
    #[arg(long, default_value_t = 128)]
    minimum_mib: u64,
    /// Each VM's startup memory, MiB: what it has without a balancer. The default shares the
    /// budget equally.
    #[arg(long)]
    startup_mib: Option<u64>,
    /// The workload's demand while a VM is not at its peak, MiB.
    #[arg(long, default_value_t = 64)]
    base_mib: u64,
    /// The workload's demand at a VM's peak, MiB.
    #[arg(long, default_value_t = 400)]
    peak_mib: u64,
    /// How long a peak lasts, s.
    #[arg(long, default_value_t = 15)]
    peak_secs: u64,
    /// Between one VM's peak and the next one's, s.
    #[arg(long, default_value_t = 2)]
    gap_secs: u64,
    /// Times each VM peaks.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// From the start of the load to the first peak (the balancer sizes the idle VMs), s.
    #[arg(long, default_value_t = 15)]
    lead_secs: u64,
    /// After the last peak, s.
    #[arg(long, default_value_t = 15)]
    tail_secs: u64,
    /// A guest allocation that gets no page for this long is an OOM kill, ms.
    #[arg(long, default_value_t = 10_000)]
    oom_ms: u64,
    /// Sampling period, ms.
    #[arg(long, default_value_t = 250)]
    sample_ms: u64,
    /// Which runs, in order: `on` (the balancer), `off` (`[memory] balancer = false`, each VM
    /// at its startup memory), `none` (no reclaim: balancer off, VMs at their maximum, guests
    /// without free page reporting).
    #[arg(long, value_delimiter = ',', default_value = "on,off,none")]
    modes: Vec<Mode>,
    /// Keep the guests' consoles, the daemons' logs and the samples (CSV) in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// The agent's memory balancer on.
    On,
    /// `[memory] balancer = false`: each VM keeps its startup memory (the guests still report
    /// free pages).
    Off,
    /// No reclaim at all: balancer off, each VM starts at its maximum (no balloon), and the
    /// guests do not use free page reporting: what the load needs if nothing is reclaimed.
    None,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::On => "balancer on",
            Mode::Off => "balancer off",
            Mode::None => "no reclaim",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Off => "off",
            Mode::None => "none",
        }
    }
    fn balancer(self) -> bool {
        self == Mode::On
    }
    fn free_page_reporting(self) -> bool {
        self != Mode::None
    }
}

impl Args {
    fn startup(&self, mode: Mode) -> u64 {
        if mode == Mode::None {
            return self.maximum_mib;
        }
        self.startup_mib.unwrap_or_else(|| {
            (self.budget_mib / self.vms.max(1) as u64).clamp(self.minimum_mib, self.maximum_mib)
        })
    }
    /// One peak slot: a peak and the gap after it.
    fn slot_ms(&self) -> u64 {
        (self.peak_secs + self.gap_secs) * 1000
    }
    /// From the start of the load to its end.
    fn load_ms(&self) -> u64 {
        self.lead_secs * 1000
            + self.rounds * self.vms as u64 * self.slot_ms()
            + self.tail_secs * 1000
    }
    /// VM `i`'s phases (MiB, ms): base until its slot, its peak, base until its slot in the
    /// next round, and so on; the last phase holds.
    fn phases(&self, i: usize) -> Vec<(u64, u64)> {
        let mut phases = Vec::new();
        let first = self.lead_secs * 1000 + i as u64 * self.slot_ms();
        let cycle = self.vms as u64 * self.slot_ms();
        let peak = self.peak_secs * 1000;
        phases.push((self.base_mib, first));
        for round in 0..self.rounds {
            phases.push((self.peak_mib, peak));
            let rest = if round + 1 < self.rounds {
                cycle - peak
            } else {
                1000
            };
            phases.push((self.base_mib, rest));
        }
        phases
    }
    fn check(&self) -> Result<()> {
        ensure!(self.vms >= 2, "--vms: at least 2");
        ensure!(
            self.minimum_mib <= self.startup(Mode::On)
                && self.startup(Mode::On) <= self.maximum_mib,
            "need minimum <= startup <= maximum"
        );
        ensure!(
            self.peak_mib > self.base_mib,
            "--peak-mib must exceed --base-mib"
        );
        ensure!(
            self.peak_mib + 32 <= self.maximum_mib,
            "--peak-mib must leave the guest 32 MiB of its maximum (the guest keeps 16 MiB)"
        );
        ensure!(
            self.peak_secs >= 1 && self.rounds >= 1,
            "--peak-secs, --rounds: at least 1"
        );
        ensure!(self.sample_ms >= 50, "--sample-ms: at least 50");
        ensure!(!self.modes.is_empty(), "--modes: at least one");
        Ok(())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// --- the stack ---------------------------------------------------------------------------------

/// A controller and one agent (in its own network namespace) for one run.
struct Stack {
    made: Made,
    controller: Option<Process>,
    agent: Option<Process>,
}

impl Stack {
    fn start(args: &Args, mode: Mode, n: usize) -> Result<Stack> {
        let prefix = format!("fmem{}{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("fabric-{prefix}"));
        let made = Made {
            dir: dir.clone(),
            prefix: prefix.clone(),
        };
        ensure!(
            made.leftovers().is_empty(),
            "{} or netns {prefix} exists already",
            dir.display()
        );
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        cleanup::register(Some(made.clone()));
        let mut stack = Stack {
            made,
            controller: None,
            agent: None,
        };
        let socket = dir.join("controller.sock");
        let controller = controller_command(
            &workspace_bin("fabric-controller"),
            &socket,
            &dir.join("controller"),
        );
        stack.controller = Some(Process::spawn(
            "fabric-controller",
            controller,
            dir.join("controller.log"),
        ));
        wait_for_path(&socket, Duration::from_secs(30));

        let ip = |a: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(a).output().context("run ip")?;
            ensure!(
                out.status.success(),
                "ip {}: {}",
                a.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        ip(&["netns", "add", &prefix])?;
        ip(&["-n", &prefix, "link", "set", "lo", "up"])?;
        let config = format!(
            r#"controller = "unix:{socket}"
listen = "unix:{dir}/agent.sock"
name = "{prefix}"
machine_id = "{prefix}"
zone = "z1"
data_dir = "{dir}/agent"
hypervisor = "kvm"
vmm_binary = "{vmm}"
bridge = "fabric0"
network = "default"
vm_subnet = "10.100.0.0/24"
cgroup_parent = "{prefix}"
stop_timeout_secs = 10
[reserve]
cpus = 0
memory_mib = 1024
[memory]
balancer = {balancer}
budget_mib = {budget}
"#,
            socket = socket.display(),
            dir = dir.display(),
            vmm = workspace_bin("fabric-vmm").display(),
            balancer = mode.balancer(),
            budget = args.budget_mib,
        );
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config).context("write agent.toml")?;
        // nsenter joins only the network namespace (`ip netns exec` would remount /sys and
        // hide the cgroup hierarchies from the agent).
        let mut agent = Command::new("nsenter");
        agent
            .arg(format!("--net=/run/netns/{prefix}"))
            .arg(workspace_bin("fabric-agent"))
            .arg("--config")
            .arg(&config_path)
            .env("FABRIC_LOG", "info");
        stack.agent = Some(Process::spawn("fabric-agent", agent, dir.join("agent.log")));
        Ok(stack)
    }

    fn dir(&self) -> &Path {
        &self.made.dir
    }

    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.dir().join("agent").join("vms").join(vm_id)
    }

    /// Runs fabricctl against the controller; its stdout.
    fn fabricctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(workspace_bin("fabricctl"))
            .arg("--controller")
            .arg(format!(
                "unix:{}",
                self.dir().join("controller.sock").display()
            ))
            .args(args)
            .output()
            .context("run fabricctl")?;
        ensure!(
            out.status.success(),
            "fabricctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_host_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let hosts = self
                .fabricctl(&["host", "list", "-o", "json"])
                .unwrap_or_default();
            if hosts.to_ascii_lowercase().contains("\"ready\"") {
                return Ok(());
            }
            ensure!(
                start.elapsed() < timeout,
                "the host is not READY after {timeout:?}; agent log:\n{}",
                self.agent
                    .as_ref()
                    .map(|a| a.log_tail(20))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Copies logs and consoles to `keep/<mode>`.
    fn keep(&self, keep: &Path, mode: Mode) -> Result<()> {
        let to = keep.join(mode.name());
        std::fs::create_dir_all(&to).with_context(|| format!("create {}", to.display()))?;
        for name in ["controller.log", "agent.log", "agent.toml"] {
            let _ = std::fs::copy(self.dir().join(name), to.join(name));
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The agent first (it would start VMs again), then whatever fabric-vmm it left.
        self.agent = None;
        self.controller = None;
        self.made.remove_everything();
        if self.made.check_removed("memory-bench") {
            cleanup::register(None);
        }
    }
}

// --- the guests' console lines ----------------------------------------------------------------

/// One memload event of VM `vm`.
#[derive(Debug, Clone)]
struct GuestEvent {
    vm: usize,
    event: MemloadEvent,
}

impl GuestEvent {
    fn parse(vm: usize, line: &str) -> Option<GuestEvent> {
        Some(GuestEvent {
            vm,
            event: MemloadEvent::parse(line)?,
        })
    }
}

impl std::ops::Deref for GuestEvent {
    type Target = MemloadEvent;

    fn deref(&self) -> &MemloadEvent {
        &self.event
    }
}

/// Follows one console file.
struct Console {
    path: PathBuf,
    offset: u64,
    partial: String,
    text: String,
}

impl Console {
    fn new(path: PathBuf) -> Console {
        Console {
            path,
            offset: 0,
            partial: String::new(),
            text: String::new(),
        }
    }

    /// The complete lines written since the last call.
    fn read_lines(&mut self) -> Vec<String> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        let chunk = String::from_utf8_lossy(&buf).replace('\r', "");
        self.text.push_str(&chunk);
        self.partial.push_str(&chunk);
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = lines.pop().unwrap_or_default();
        lines
    }
}

// --- one run -------------------------------------------------------------------------------------

/// One sample: when, and per VM the VMM's RSS and the balloon (target, actual), MiB.
#[derive(Debug, Clone)]
struct Sample {
    t: u64,
    rss_mib: Vec<f64>,
    balloon: Vec<Option<(u64, u64)>>,
}

struct Run {
    mode: Mode,
    start_ms: u64,
    end_ms: u64,
    samples: Vec<Sample>,
    events: Vec<GuestEvent>,
    verdicts: Vec<String>,
    load_before: String,
    load_after: String,
    /// Mean CPU share of the fabric-vmm processes over the load.
    vmm_cpu: f64,
}

fn rss_mib(pid: u32) -> Option<f64> {
    rss_kib(pid).map(|kib| kib as f64 / 1024.0)
}

fn vm_pid(stack: &Stack, vm_id: &str) -> Option<u32> {
    let text = std::fs::read_to_string(stack.vm_dir(vm_id).join("vm.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("pid")?.as_u64().map(|p| p as u32)
}

async fn balloon_of(client: &mut Option<VmmClient<Channel>>, socket: &Path) -> Option<(u64, u64)> {
    if client.is_none() {
        *client = tokio::time::timeout(
            Duration::from_millis(500),
            fabric_vmm_api::client::connect(socket),
        )
        .await
        .ok()?
        .ok();
    }
    let c = client.as_mut()?;
    let reply = tokio::time::timeout(
        Duration::from_millis(500),
        c.get_memory_stats(GetMemoryStatsRequest {}),
    )
    .await;
    match reply {
        Ok(Ok(r)) => r
            .into_inner()
            .stats
            .map(|s| (s.balloon_target_mib, s.balloon_actual_mib)),
        _ => {
            *client = None;
            None
        }
    }
}

async fn run_mode(args: &Args, mode: Mode, n: usize, testguest: &Path) -> Result<Run> {
    let stack = Stack::start(args, mode, n)?;
    eprintln!(
        "memory-bench: {}: controller and agent ({}) in {}",
        mode.label(),
        stack.made.prefix,
        stack.dir().display()
    );
    let result = drive(args, mode, &stack, testguest).await;
    if let Some(keep) = &args.keep {
        stack.keep(keep, mode)?;
    }
    if result.is_err() {
        if let Some(agent) = &stack.agent {
            eprintln!("--- agent log tail ---\n{}", agent.log_tail(20));
        }
    }
    drop(stack);
    result
}

async fn drive(args: &Args, mode: Mode, stack: &Stack, testguest: &Path) -> Result<Run> {
    stack.wait_host_ready(Duration::from_secs(60))?;
    let guest = testguest.to_str().context("test guest path")?;
    stack.fabricctl(&[
        "image", "push", guest, "--name", "memload", "--role", "kernel",
    ])?;
    // The load starts on the host's clock once every guest is up.
    let start_ms = unix_ms() + 10_000;
    let end_ms = start_ms + args.load_ms();
    let mut vms = Vec::new();
    for i in 0..args.vms {
        let phases: Vec<String> = args
            .phases(i)
            .iter()
            .map(|(mib, ms)| format!("{mib}:{}.{}", ms / 1000, ms % 1000 / 100))
            .collect();
        let cmdline = format!(
            "fabric.test=memload memload.start={start_ms} memload.phases={} memload.oom_ms={} \
             memload.reporting={}",
            phases.join(","),
            args.oom_ms,
            u8::from(mode.free_page_reporting())
        );
        let out = stack.fabricctl(&[
            "vm",
            "create",
            "--name",
            &format!("memload-{i}"),
            "--vcpus",
            "1",
            "--memory",
            &args.startup(mode).to_string(),
            "--memory-min",
            &args.minimum_mib.to_string(),
            "--memory-max",
            &args.maximum_mib.to_string(),
            "--image",
            "memload",
            "--cmdline",
            &cmdline,
            "--restart-policy",
            "never",
            "-o",
            "json",
        ])?;
        let json: serde_json::Value = serde_json::from_str(&out).context("vm create -o json")?;
        vms.push(json["id"].as_str().context("vm create: no id")?.to_string());
    }

    let mut consoles: Vec<Console> = vms
        .iter()
        .map(|id| Console::new(stack.vm_dir(id).join("console.log")))
        .collect();
    let mut events: Vec<GuestEvent> = Vec::new();
    let mut pids: Vec<Option<u32>> = vec![None; vms.len()];
    let mut ready = vec![false; vms.len()];
    while unix_ms() < start_ms {
        for (i, console) in consoles.iter_mut().enumerate() {
            for line in console.read_lines() {
                if let Some(e) = GuestEvent::parse(i, &line) {
                    ready[i] |= e.kind == "ready";
                    events.push(e);
                }
                ensure!(!line.contains("memload: FAIL"), "VM {i}: {}", line.trim());
            }
            if pids[i].is_none() {
                pids[i] = vm_pid(stack, &vms[i]);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        ready.iter().all(|r| *r) && pids.iter().all(Option::is_some),
        "not every guest was up when the load began: ready {ready:?}, pids {pids:?}"
    );
    let pids: Vec<u32> = pids.into_iter().flatten().collect();
    eprintln!(
        "memory-bench: {}: {} guests up; the load runs {:.0} s",
        mode.label(),
        vms.len(),
        args.load_ms() as f64 / 1000.0
    );
    let load_before = loadavg();
    let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).collect();
    let sockets: Vec<PathBuf> = vms
        .iter()
        .map(|id| stack.vm_dir(id).join("control.sock"))
        .collect();
    let mut clients: Vec<Option<VmmClient<Channel>>> = vec![None; vms.len()];
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(args.sample_ms));
    let mut last_progress = 0;
    while unix_ms() < end_ms {
        tick.tick().await;
        let t = unix_ms();
        let mut balloon = Vec::new();
        for (client, socket) in clients.iter_mut().zip(&sockets) {
            balloon.push(balloon_of(client, socket).await);
        }
        let rss: Vec<f64> = pids.iter().map(|p| rss_mib(*p).unwrap_or(0.0)).collect();
        samples.push(Sample {
            t,
            rss_mib: rss,
            balloon,
        });
        for (i, console) in consoles.iter_mut().enumerate() {
            for line in console.read_lines() {
                if let Some(e) = GuestEvent::parse(i, &line) {
                    if matches!(e.kind.as_str(), "wait-start" | "wait-end" | "oom-kill") {
                        eprintln!(
                            "memory-bench: {} +{:.1}s VM {i}: {}",
                            mode.label(),
                            e.t.saturating_sub(start_ms) as f64 / 1000.0,
                            line.trim().trim_start_matches("testguest: memload: ")
                        );
                    }
                    events.push(e);
                }
                ensure!(!line.contains("memload: FAIL"), "VM {i}: {}", line.trim());
            }
        }
        let progress = (t.saturating_sub(start_ms) * 10 / args.load_ms().max(1)).min(10);
        if progress > last_progress {
            last_progress = progress;
            let sum: f64 = samples
                .last()
                .map(|s| s.rss_mib.iter().sum())
                .unwrap_or(0.0);
            eprintln!(
                "memory-bench: {}: {}% of the load, VMMs' RSS {sum:.0} MiB, load {}",
                mode.label(),
                progress * 10,
                loadavg()
            );
        }
    }
    let load_after = loadavg();
    let secs = args.load_ms() as f64 / 1000.0 + 10.0;
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, before)| (cpu_secs(*p).unwrap_or(*before) - before) / secs)
        .collect();
    let vmm_cpu = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64;

    // Stop the VMs (fabric-vmm's Shutdown is Ctrl-Alt-Del: the guests print their verdicts),
    // then delete them.
    for id in &vms {
        stack.fabricctl(&["vm", "stop", id])?;
    }
    let mut verdicts = vec![String::new(); vms.len()];
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while verdicts.iter().any(String::is_empty) && Instant::now() < stop_deadline {
        for (i, console) in consoles.iter_mut().enumerate() {
            for line in console.read_lines() {
                if let Some(e) = GuestEvent::parse(i, &line) {
                    events.push(e);
                }
                if line.contains("memload: PASS") || line.contains("memload: FAIL") {
                    verdicts[i] = line.trim().trim_start_matches("testguest: ").to_string();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(keep) = &args.keep {
        let to = keep.join(mode.name());
        std::fs::create_dir_all(&to)?;
        for (i, console) in consoles.iter().enumerate() {
            std::fs::write(to.join(format!("console-{i}.log")), &console.text)?;
        }
        write_samples(&to.join("samples.csv"), &samples, start_ms)?;
    }
    for id in &vms {
        stack.fabricctl(&["vm", "delete", id])?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while vms.iter().any(|id| stack.vm_dir(id).exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    events.sort_by_key(|e| (e.t, e.vm));
    Ok(Run {
        mode,
        start_ms,
        end_ms,
        samples,
        events,
        verdicts,
        load_before,
        load_after,
        vmm_cpu,
    })
}

fn write_samples(path: &Path, samples: &[Sample], start_ms: u64) -> Result<()> {
    let vms = samples.first().map(|s| s.rss_mib.len()).unwrap_or(0);
    let mut csv = String::from("t_s,rss_sum_mib");
    for i in 0..vms {
        csv.push_str(&format!(",rss{i}_mib,balloon{i}_target_mib,balloon{i}_mib"));
    }
    csv.push('\n');
    for s in samples {
        csv.push_str(&format!(
            "{:.3},{:.1}",
            (s.t as f64 - start_ms as f64) / 1000.0,
            s.rss_mib.iter().sum::<f64>()
        ));
        for i in 0..vms {
            let (target, actual) = match s.balloon.get(i).copied().flatten() {
                Some((t, a)) => (t.to_string(), a.to_string()),
                None => (String::new(), String::new()),
            };
            csv.push_str(&format!(",{:.1},{target},{actual}", s.rss_mib[i]));
        }
        csv.push('\n');
    }
    std::fs::write(path, csv).with_context(|| format!("write {}", path.display()))
}

// --- analysis -------------------------------------------------------------------------------------

/// Seconds as the table prints them.
fn seconds(v: f64) -> String {
    secs(v, " s")
}

/// A VM's demand rising to its peak, and what followed until its next phase.
#[derive(Debug, Clone)]
struct Rise {
    vm: usize,
    at: u64,
    /// The workload had all its memory this long after the step (None: never).
    got_all: Option<u64>,
    /// It waited (pressure): for how long, and whether the wait ended with the memory.
    waited: Option<(u64, bool)>,
    oom_kill: bool,
    /// From the start of the wait to the host's first new (smaller) balloon target, and how
    /// many smaller targets it set until the wait ended.
    reaction: Option<u64>,
    deflate_steps: usize,
}

#[derive(Debug, Default)]
struct Summary {
    rss_peak: f64,
    rss_mean: f64,
    over_budget_s: f64,
    assigned_peak: u64,
    rises: Vec<Rise>,
    oom_kills: u64,
    corrupt: u64,
    /// Per demand step (either direction): balloons settled after this long (None: still
    /// moving or short of their targets at the next step).
    convergence: Vec<(bool, Option<u64>)>,
    balloon_moves: usize,
}

fn summarize(args: &Args, run: &Run) -> Summary {
    let mut s = Summary::default();
    let window: Vec<&Sample> = run
        .samples
        .iter()
        .filter(|x| x.t >= run.start_ms && x.t <= run.end_ms)
        .collect();
    let sums: Vec<f64> = window.iter().map(|x| x.rss_mib.iter().sum()).collect();
    s.rss_peak = sums.iter().copied().fold(0.0, f64::max);
    s.rss_mean = sums.iter().sum::<f64>() / sums.len().max(1) as f64;
    s.over_budget_s = window
        .windows(2)
        .zip(&sums)
        .filter(|(_, sum)| **sum > args.budget_mib as f64)
        .map(|(w, _)| (w[1].t - w[0].t) as f64 / 1000.0)
        .fold(0.0, |a, b| a + b);
    s.assigned_peak = window
        .iter()
        .filter(|x| x.balloon.iter().all(Option::is_some))
        .map(|x| {
            x.balloon
                .iter()
                .flatten()
                .map(|(_, actual)| args.maximum_mib.saturating_sub(*actual))
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0);

    let events: Vec<&GuestEvent> = run
        .events
        .iter()
        .filter(|e| e.t >= run.start_ms.saturating_sub(5_000))
        .collect();
    // Demand steps: the guests' own phase changes after the load began.
    let steps: Vec<&GuestEvent> = events
        .iter()
        .copied()
        .filter(|e| e.kind == "phase" && e.num("index").unwrap_or(0) > 0)
        .collect();
    for step in &steps {
        if step.num("demand_mib") != Some(args.peak_mib) {
            continue;
        }
        let next_phase = steps
            .iter()
            .find(|e| e.vm == step.vm && e.t > step.t)
            .map(|e| e.t)
            .unwrap_or(u64::MAX);
        let mine = || {
            events
                .iter()
                .copied()
                .filter(|e| e.vm == step.vm && e.t >= step.t && e.t < next_phase)
        };
        let got_all = mine()
            .find(|e| e.kind == "grown" && e.num("have_mib") == Some(args.peak_mib))
            .map(|e| e.t - step.t);
        let waited = mine().find(|e| e.kind == "wait-end").map(|e| {
            (
                e.num("waited_ms").unwrap_or(0),
                e.fields.get("reason").is_some_and(|r| r == "satisfied"),
            )
        });
        let oom_kill = mine().any(|e| e.kind == "oom-kill");
        let waited = match (waited, oom_kill) {
            (None, true) => mine()
                .find(|e| e.kind == "oom-kill")
                .map(|e| (e.num("waited_ms").unwrap_or(0), false)),
            (w, _) => w,
        };
        let wait_start = mine().find(|e| e.kind == "wait-start").map(|e| e.t);
        let wait_end = wait_start.and_then(|t| waited.map(|(ms, _)| t + ms));
        let (mut reaction, mut deflate_steps) = (None, 0);
        if let (Some(from), Some(to)) = (wait_start, wait_end) {
            let mut target = run
                .events
                .iter()
                .rfind(|e| e.vm == step.vm && e.kind == "balloon" && e.t < from)
                .and_then(|e| e.num("target_mib"));
            for e in mine().filter(|e| e.kind == "balloon" && e.t >= from && e.t <= to) {
                let new = e.num("target_mib");
                if new.is_some() && target.is_some() && new < target {
                    reaction.get_or_insert(e.t - from);
                    deflate_steps += 1;
                }
                target = new.or(target);
            }
        }
        s.rises.push(Rise {
            reaction,
            deflate_steps,
            vm: step.vm,
            at: step.t,
            got_all,
            waited,
            oom_kill,
        });
    }
    s.oom_kills = events.iter().filter(|e| e.kind == "oom-kill").count() as u64;
    s.corrupt = (0..args.vms)
        .filter_map(|vm| {
            events
                .iter()
                .rev()
                .find(|e| e.vm == vm && e.kind == "status")
                .and_then(|e| e.num("corrupt"))
        })
        .sum();

    // Convergence: per demand step of a VM, its balloon's last move before the VM's next step,
    // if by then the balloon is at its target.
    let balloon_events: Vec<&GuestEvent> =
        run.events.iter().filter(|e| e.kind == "balloon").collect();
    s.balloon_moves = balloon_events
        .iter()
        .filter(|e| e.t >= run.start_ms)
        .count();
    let at_target = |e: &GuestEvent| e.num("target_mib") == e.num("actual_mib");
    for step in &steps {
        let next = steps
            .iter()
            .find(|e| e.vm == step.vm && e.t > step.t)
            .map(|e| e.t)
            .unwrap_or(run.end_ms);
        let before = balloon_events
            .iter()
            .rfind(|e| e.vm == step.vm && e.t < step.t);
        let during: Vec<&&GuestEvent> = balloon_events
            .iter()
            .filter(|e| e.vm == step.vm && e.t >= step.t && e.t < next)
            .collect();
        let rise = step.num("demand_mib") == Some(args.peak_mib);
        s.convergence.push((
            rise,
            match during.last() {
                Some(last) if at_target(last) => Some(last.t - step.t),
                Some(_) => None,
                None if before.is_none_or(|e| at_target(e)) => Some(0),
                None => None,
            },
        ));
    }
    s
}

fn mib(v: f64) -> String {
    format!("{v:.0} MiB")
}

fn report(args: &Args, runs: &[Run]) -> bool {
    let summaries: Vec<Summary> = runs.iter().map(|r| summarize(args, r)).collect();
    let budget = args.budget_mib as f64;
    let sum_max = args.vms as u64 * args.maximum_mib;
    let sum_peaks = args.vms as u64 * args.peak_mib;
    let instant = args.peak_mib + (args.vms as u64 - 1) * args.base_mib;
    println!();
    println!(
        "Settings: 1 host, `[memory] budget_mib = {}`; {} VMs of 1 vCPU, minimum {} / maximum {} \
         MiB, startup {} MiB (no reclaim: {} MiB), each running the freestanding test guest's \
         `memload` (a virtio-balloon driver with statistics and free page reporting, and a \
         workload). Load: each VM needs {} MiB, and {} MiB for {} s once per round, one VM after \
         the other ({} s apart), {} rounds: the VMs' peaks add up to {} MiB, the demand at any \
         instant to at most {} MiB. A guest allocation that gets no page for {} s is an OOM kill. \
         Modes: balancer on; balancer off (`[memory] balancer = false`: each VM keeps its startup \
         memory, guests still report free pages); no reclaim (balancer off, VMs at their maximum, \
         guests without free page reporting). Sampled every {} ms.",
        args.budget_mib,
        args.vms,
        args.minimum_mib,
        args.maximum_mib,
        args.startup(Mode::On),
        args.startup(Mode::None),
        args.base_mib,
        args.peak_mib,
        args.peak_secs,
        args.peak_secs + args.gap_secs,
        args.rounds,
        sum_peaks,
        instant,
        args.oom_ms as f64 / 1000.0,
        args.sample_ms
    );
    println!();
    print!("| |");
    for r in runs {
        print!(" {} |", r.mode.label());
    }
    println!();
    print!("|---|");
    for _ in runs {
        print!("---:|");
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&Run, &Summary) -> String| {
        print!("| {name} |");
        for (r, s) in runs.iter().zip(&summaries) {
            print!(" {} |", f(r, s));
        }
        println!();
    };
    row("overcommit: Σ maximum / budget", &|_, _| {
        format!(
            "{:.2}× ({sum_max} / {} MiB)",
            sum_max as f64 / budget,
            args.budget_mib
        )
    });
    row("load: Σ of the VMs' peaks / budget", &|_, _| {
        format!("{:.2}× ({sum_peaks} MiB)", sum_peaks as f64 / budget)
    });
    row("host memory in use (Σ VMM RSS): peak", &|_, s| {
        format!("{} ({:.2}× budget)", mib(s.rss_peak), s.rss_peak / budget)
    });
    row("host memory in use: mean", &|_, s| {
        format!("{} ({:.2}× budget)", mib(s.rss_mean), s.rss_mean / budget)
    });
    row("time above the budget", &|_, s| {
        format!("{:.1} s", s.over_budget_s)
    });
    row(
        "memory given to guests (Σ maximum − balloon): peak",
        &|_, s| format!("{} MiB", s.assigned_peak),
    );
    row("demand rises to a peak / with pressure (waits)", &|_, s| {
        format!(
            "{} / {}",
            s.rises.len(),
            s.rises.iter().filter(|r| r.waited.is_some()).count()
        )
    });
    row(
        "**time for a pressured VM to get its memory** (wait start → all of it): p50 / max",
        &|_, s| {
            let done: Vec<f64> = s
                .rises
                .iter()
                .filter_map(|r| r.waited)
                .filter(|(_, ok)| *ok)
                .map(|(ms, _)| ms as f64 / 1000.0)
                .collect();
            let never = s
                .rises
                .iter()
                .filter(|r| r.waited.is_some_and(|(_, ok)| !ok))
                .count();
            let mut text = format!(
                "{} / {}",
                seconds(percentile(&done, 0.5)),
                seconds(percentile(&done, 1.0))
            );
            if never > 0 {
                text.push_str(&format!(
                    "; never in {never} of {}",
                    s.rises.iter().filter(|r| r.waited.is_some()).count()
                ));
            }
            text
        },
    );
    row(
        "… of which: wait start → first smaller balloon target: p50 / max; targets set",
        &|r, s| {
            if !r.mode.balancer() {
                return "–".to_string();
            }
            let reaction: Vec<f64> = s
                .rises
                .iter()
                .filter_map(|r| r.reaction)
                .map(|ms| ms as f64 / 1000.0)
                .collect();
            let steps: Vec<f64> = s
                .rises
                .iter()
                .filter(|r| r.reaction.is_some())
                .map(|r| r.deflate_steps as f64)
                .collect();
            format!(
                "{} / {}; {:.0}–{:.0} per wait",
                seconds(percentile(&reaction, 0.5)),
                seconds(percentile(&reaction, 1.0)),
                percentile(&steps, 0.0),
                percentile(&steps, 1.0)
            )
        },
    );
    row(
        "demand rise → the VM has all of it: p50 / max",
        &|_, s| {
            let got: Vec<f64> = s
                .rises
                .iter()
                .filter_map(|r| r.got_all)
                .map(|ms| ms as f64 / 1000.0)
                .collect();
            let never = s.rises.iter().filter(|r| r.got_all.is_none()).count();
            let mut text = format!(
                "{} / {}",
                seconds(percentile(&got, 0.5)),
                seconds(percentile(&got, 1.0))
            );
            if never > 0 {
                text.push_str(&format!("; never in {never} of {}", s.rises.len()));
            }
            text
        },
    );
    row("**guest OOM kills**", &|_, s| {
        format!("**{}**", s.oom_kills)
    });
    for (rise, name) in [
        (true, "**convergence** after a rise (a VM's demand step → its balloon at the target, still): p50 / max"),
        (false, "**convergence** after a drop: p50 / max"),
    ] {
        row(name, &|r, s| {
            if !r.mode.balancer() {
                return format!(
                    "– (balloons stay at maximum − startup; {} moves)",
                    s.balloon_moves
                );
            }
            let these: Vec<Option<u64>> = s
                .convergence
                .iter()
                .filter(|(r, _)| *r == rise)
                .map(|(_, c)| *c)
                .collect();
            let done: Vec<f64> = these
                .iter()
                .flatten()
                .map(|ms| *ms as f64 / 1000.0)
                .collect();
            let open = these.iter().filter(|c| c.is_none()).count();
            let mut text = format!("{} / {}", seconds(percentile(&done, 0.5)), seconds(percentile(&done, 1.0)));
            if open > 0 {
                text.push_str(&format!(
                    "; not settled before the VM's next step in {open} of {}",
                    these.len()
                ));
            }
            text
        });
    }
    row("workload pages that lost their contents", &|_, s| {
        s.corrupt.to_string()
    });
    row("fabric-vmm CPU, mean per VM", &|r, _| {
        format!("{:.0}% of a core", r.vmm_cpu * 100.0)
    });
    row("load average before → after", &|r, _| {
        format!("{} → {}", r.load_before, r.load_after)
    });
    println!();
    let mut met = true;
    for (r, s) in runs.iter().zip(&summaries) {
        if !r.mode.balancer() {
            continue;
        }
        let ratio = sum_max as f64 / budget;
        let pressured: Vec<f64> = s
            .rises
            .iter()
            .filter_map(|r| r.waited)
            .map(|(ms, ok)| {
                if ok {
                    ms as f64 / 1000.0
                } else {
                    f64::INFINITY
                }
            })
            .collect();
        let slowest_wait = pressured.iter().copied().fold(0.0, f64::max);
        let convergence = s
            .convergence
            .iter()
            .map(|(_, c)| c.map(|ms| ms as f64 / 1000.0).unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max);
        let ok_ratio = ratio >= 2.0;
        let ok_oom = s.oom_kills == 0;
        // Convergence as issue 8's real-guest test words it: a guest that needs memory has it
        // within 3 s. The settling that follows (the surplus a pressured VM was given going
        // back after its pressure hold) costs no guest anything and is reported beside it.
        let ok_time = slowest_wait < 3.0;
        met &= ok_ratio && ok_oom && ok_time;
        println!(
            "Target (balancer on): 2× overcommit {} ({ratio:.2}×), zero guest OOM kills {} ({}), \
             convergence under 3 s {} (slowest pressured VM to its memory: {}). \
             Full settling, the pressure grant's surplus taken back after the hold: {} at worst.",
            if ok_ratio { "met" } else { "NOT met" },
            if ok_oom { "met" } else { "NOT met" },
            s.oom_kills,
            if ok_time { "met" } else { "NOT met" },
            seconds(slowest_wait),
            seconds(convergence),
        );
    }
    println!();
    for (r, s) in runs.iter().zip(&summaries) {
        println!("{}: demand rises (s after the load began):", r.mode.label());
        for rise in &s.rises {
            println!(
                "  VM {} at +{:.1}: {}{}{}{}",
                rise.vm,
                rise.at.saturating_sub(r.start_ms) as f64 / 1000.0,
                match rise.got_all {
                    Some(ms) => format!(
                        "had all {} MiB after {:.2} s",
                        args.peak_mib,
                        ms as f64 / 1000.0
                    ),
                    None => format!("never had all {} MiB", args.peak_mib),
                },
                match rise.waited {
                    Some((ms, true)) => format!(", waited {:.2} s", ms as f64 / 1000.0),
                    Some((ms, false)) => format!(", waited {:.2} s in vain", ms as f64 / 1000.0),
                    None => String::new(),
                },
                if rise.oom_kill { ", OOM kill" } else { "" },
                match rise.reaction {
                    Some(ms) => format!(
                        "; first smaller balloon target {:.2} s into the wait, {} in all",
                        ms as f64 / 1000.0,
                        rise.deflate_steps
                    ),
                    None => String::new(),
                }
            );
        }
        let steps: Vec<String> = s
            .convergence
            .iter()
            .map(|(rise, c)| {
                let arrow = if *rise { "↑" } else { "↓" };
                match c {
                    Some(ms) => format!("{arrow}{:.1}", *ms as f64 / 1000.0),
                    None => format!("{arrow}open"),
                }
            })
            .collect();
        println!("  settling after each demand step, s: {}", steps.join(" "));
        for v in &r.verdicts {
            println!("  guest verdict: {v}");
        }
    }
    met
}

async fn bench(args: &Args) -> Result<Vec<Run>> {
    let testguest = testguest::elf();
    let mut runs = Vec::new();
    for (n, mode) in args.modes.iter().enumerate() {
        let run = run_mode(args, *mode, n, &testguest).await?;
        runs.push(run);
    }
    Ok(runs)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    args.check()?;
    require_kvm()?;
    for bin in [
        "fabric-controller",
        "fabricctl",
        "fabric-agent",
        "fabric-vmm",
    ] {
        workspace_bin(bin);
    }
    cleanup::remove_on_panic();
    let result = until_interrupted(bench(&args)).await;
    // An interrupted run's stack was dropped with the future; anything left is removed here.
    if let Some(made) = cleanup::registered() {
        made.remove_everything();
        let left = made.leftovers();
        if !left.is_empty() {
            bail!("left behind:\n  {}", left.join("\n  "));
        }
    }
    let runs = result?;
    if !report(&args, &runs) {
        eprintln!("memory-bench: the target is not met (see above)");
    }
    Ok(())
}
