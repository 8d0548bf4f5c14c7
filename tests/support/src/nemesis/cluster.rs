//! The nemesis's cluster: the layout of [`crate::netcluster`] (a "datacenter" namespace with
//! the controller at 10.99.0.1 on a bridge, one namespace per host with its uplink `eth0`),
//! with real-KVM hosts and simulated hosts side by side, environment variables for every
//! agent and for the controller (the test-only hooks), and the controller's store on an ext4
//! file system of its own on a loop device, in a blkio cgroup, so that a fault can make its
//! disk slow for real.
//!
//! Everything is named after one unique prefix and removed on drop, also on a panic:
//! processes (by pid), cgroups, namespaces, the mount and the loop device, files.
//! [`cleanup_leftovers`] removes the mount, the loop device and the blkio cgroup of a run
//! given only its prefix and directory (for a program that aborts on panic).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::cluster::{path_appears, workspace_bin, Process, Timing};
use crate::process;

/// Runs `ip` with `args`; panics on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip` with `args`; whether it succeeded (for healing what may already be healed).
pub fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What runs the host's VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// fabric-vmm processes with real guests.
    Kvm,
    /// The agent's simulated backend (records only).
    Sim,
}

/// One host: a namespace, an agent, its data and its test-only clock files.
pub struct Host {
    pub index: usize,
    pub name: String,
    pub kind: HostKind,
    pub ns: String,
    pub dir: PathBuf,
    pub address: String,
    pub agent: Option<Process>,
    /// Environment variables every start of this agent gets.
    pub env: Vec<(String, String)>,
    /// `FABRIC_TEST_BOOTTIME_OFFSET_FILE` of this agent, and the value in it (it only grows).
    pub boottime_file: PathBuf,
    pub boottime_ms: u64,
    /// `FABRIC_TEST_WALLCLOCK_OFFSET_FILE` of this agent.
    pub wallclock_file: PathBuf,
    pub cgroup_parent: String,
    starts: usize,
}

impl Host {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn lease_file(&self) -> PathBuf {
        self.data_dir().join("lease.json")
    }

    /// The agent's Agent service (a Unix socket, reachable from outside the namespace).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// fabric-vmm processes of this host: (pid, VM id from --vm-id).
    pub fn vmms(&self) -> Vec<(u32, String)> {
        process::naming(&format!("{}/", self.data_dir().display()))
            .into_iter()
            .filter(|(_, args)| process::is_fabric_vmm(args))
            .map(|(pid, args)| (pid, arg_after(&args, "--vm-id")))
            .collect()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.pid()).filter(|p| *p != 0)
    }
}

/// The argument after `flag` in a command line (empty if none).
pub fn arg_after(args: &[String], flag: &str) -> String {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default()
}

/// The controller's disk: a file on a loop device with ext4, mounted.
struct LoopDisk {
    major: u64,
    minor: u64,
}

/// What the nemesis's cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub kvm_hosts: usize,
    pub sim_hosts: usize,
    pub timing: Timing,
    /// Environment variables of every agent (each host also gets its own clock files).
    pub agent_env: Vec<(String, String)>,
    /// More environment variables for one host's agent: (host index, name, value).
    pub host_env: Vec<(usize, String, String)>,
    /// Environment variables of the controller.
    pub controller_env: Vec<(String, String)>,
    /// The controller's memory-relief window, seconds (0: off), and the memory balancer's
    /// budget on simulated hosts (MiB; 0: their memory): a small budget makes hosts short of
    /// memory, and the controller then moves VMs off them.
    pub relief_window_s: f64,
    pub sim_budget_mib: u64,
    /// vCPUs and memory (MiB) of a simulated host.
    pub sim_cpus: u32,
    pub sim_memory_mib: u64,
}

/// The cluster.
pub struct Cluster {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub net_ns: String,
    pub timing: Timing,
    pub controller: Option<Process>,
    pub controller_env: Vec<(String, String)>,
    pub controller_wallclock_file: PathBuf,
    pub hosts: Vec<Host>,
    sim_cpus: u32,
    sim_memory_mib: u64,
    relief_window_s: f64,
    sim_budget_mib: u64,
    disk: Option<LoopDisk>,
    blkio: Option<PathBuf>,
    controller_starts: usize,
    /// The cluster's CA and the controller's certificate (mutual TLS on its TCP listener).
    pub pki: crate::pki::Pki,
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// The environment variable of the test-only wall-clock offset (agent and controller).
pub const WALLCLOCK_OFFSET_ENV: &str = "FABRIC_TEST_WALLCLOCK_OFFSET_FILE";
/// The environment variable of the test-only lease-clock offset (agent).
pub const BOOTTIME_OFFSET_ENV: &str = "FABRIC_TEST_BOOTTIME_OFFSET_FILE";
/// The environment variable that makes an agent SIGKILL itself at a point of a VM start.
pub const KILL_AT_ENV: &str = "FABRIC_TEST_KILL_AT";

fn blkio_dir(prefix: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup/blkio").join(format!("{prefix}-ctl"))
}

fn disk_image(dir: &Path) -> PathBuf {
    dir.join("controller.img")
}

fn disk_mount(dir: &Path) -> PathBuf {
    dir.join("controller-disk")
}

/// Removes the controller's mount, loop device and blkio cgroup of the run `prefix` working
/// in `dir`, whatever is left of them (its processes must be gone first).
pub fn cleanup_leftovers(prefix: &str, dir: &Path) {
    let mount = disk_mount(dir);
    if is_mounted(&mount) {
        let _ = run("umount", &[&mount.display().to_string()]);
        if is_mounted(&mount) {
            let _ = run("umount", &["-l", &mount.display().to_string()]);
        }
    }
    let image = disk_image(dir).display().to_string();
    if let Ok(list) = run("losetup", &["-j", &image]) {
        for line in list.lines() {
            if let Some(device) = line.split(':').next() {
                let _ = run("losetup", &["-d", device]);
            }
        }
    }
    let _ = std::fs::remove_dir(blkio_dir(prefix));
}

fn is_mounted(path: &Path) -> bool {
    let target = path.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target.as_str()))
}

/// Removes a cgroup directory and every cgroup below it.
fn remove_cgroup_tree(path: &Path) {
    if let Ok(children) = std::fs::read_dir(path) {
        for child in children.flatten() {
            if child.path().is_dir() {
                remove_cgroup_tree(&child.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

impl Cluster {
    /// Starts the cluster: namespaces, the controller's disk, the controller, the agents.
    pub fn start(spec: &ClusterSpec) -> Cluster {
        let prefix = format!(
            "nm{}{}",
            std::process::id() % 10000,
            CLUSTERS.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("fabric-{prefix}-"))
            .tempdir()
            .expect("temp dir");
        let net_ns = format!("{prefix}-net");
        let controller_wallclock_file = dir.path().join("controller-wallclock-offset-ms");
        std::fs::write(&controller_wallclock_file, "0").expect("offset file");
        let pki = crate::pki::Pki::init(&dir.path().join("pki"), &prefix, &["10.99.0.1"]);
        let mut cluster = Cluster {
            pki,
            prefix: prefix.clone(),
            net_ns: net_ns.clone(),
            timing: spec.timing,
            controller: None,
            controller_env: spec.controller_env.clone(),
            controller_wallclock_file,
            hosts: Vec::new(),
            sim_cpus: spec.sim_cpus,
            sim_memory_mib: spec.sim_memory_mib,
            relief_window_s: spec.relief_window_s,
            sim_budget_mib: spec.sim_budget_mib,
            disk: None,
            blkio: None,
            controller_starts: 0,
            dir,
        };
        ip(&["netns", "add", &net_ns]);
        ip(&["-n", &net_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &net_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net_ns, "addr", "add", "10.99.0.1/24", "dev", "br0"]);
        ip(&["-n", &net_ns, "link", "set", "br0", "up"]);
        let count = spec.kvm_hosts + spec.sim_hosts;
        for i in 0..count {
            let kind = if i < spec.kvm_hosts {
                HostKind::Kvm
            } else {
                HostKind::Sim
            };
            let ns = format!("{prefix}-h{i}");
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("h{i}");
            ip(&[
                "-n", &net_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &net_ns, "link", "set", &port, "master", "br0", "up"]);
            let address = format!("10.99.0.{}", 10 + i);
            let cidr = format!("{address}/24");
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let dir = cluster.dir.path().join(format!("h{i}"));
            std::fs::create_dir_all(&dir).expect("host dir");
            let boottime_file = dir.join("boottime-offset-ms");
            let wallclock_file = dir.join("wallclock-offset-ms");
            std::fs::write(&boottime_file, "0").expect("offset file");
            std::fs::write(&wallclock_file, "0").expect("offset file");
            cluster.hosts.push(Host {
                index: i,
                name: format!(
                    "{prefix}-{}{i}",
                    if kind == HostKind::Kvm { "kvm" } else { "sim" }
                ),
                kind,
                ns: ns.clone(),
                dir,
                address,
                agent: None,
                env: spec
                    .agent_env
                    .iter()
                    .cloned()
                    .chain(
                        spec.host_env
                            .iter()
                            .filter(|(h, _, _)| *h == i)
                            .map(|(_, k, v)| (k.clone(), v.clone())),
                    )
                    .collect(),
                boottime_file,
                boottime_ms: 0,
                wallclock_file,
                cgroup_parent: ns,
                starts: 0,
            });
        }
        cluster.make_disk();
        assert!(
            cluster.start_controller(),
            "the controller did not start:\n{}",
            cluster
                .controller
                .as_ref()
                .map(|c| c.log_tail(30))
                .unwrap_or_default()
        );
        for i in 0..count {
            cluster.start_agent(i, &[]);
        }
        cluster
    }

    fn make_disk(&mut self) {
        let image = disk_image(self.dir.path());
        let file = std::fs::File::create(&image).expect("disk image");
        file.set_len(256 << 20).expect("disk image size");
        drop(file);
        let device = run(
            "losetup",
            &["--find", "--show", &image.display().to_string()],
        )
        .expect("losetup");
        let mount = disk_mount(self.dir.path());
        std::fs::create_dir_all(&mount).expect("mount point");
        let rdev = std::fs::metadata(&device).expect("loop device").rdev();
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
        self.disk = Some(LoopDisk { major, minor });
        run("mkfs.ext4", &["-q", "-F", &device]).expect("mkfs.ext4");
        run("mount", &[&device, &mount.display().to_string()]).expect("mount");
        let blkio = blkio_dir(&self.prefix);
        std::fs::create_dir_all(&blkio).expect("blkio cgroup");
        self.blkio = Some(blkio);
    }

    /// The loop device of the controller's store, `MAJ:MIN`.
    pub fn disk_device(&self) -> String {
        self.disk
            .as_ref()
            .map(|d| format!("{}:{}", d.major, d.minor))
            .unwrap_or_default()
    }

    /// Limits (or with 0, 0 frees) the controller's writes to its store: IOPS and bytes/s.
    pub fn throttle_disk(&self, iops: u64, bps: u64) -> Result<(), String> {
        let Some(blkio) = &self.blkio else {
            return Err("no blkio cgroup".into());
        };
        let device = self.disk_device();
        for (file, value) in [
            ("blkio.throttle.write_iops_device", iops),
            ("blkio.throttle.write_bps_device", bps),
        ] {
            std::fs::write(blkio.join(file), format!("{device} {value}"))
                .map_err(|e| format!("{file}: {e}"))?;
        }
        Ok(())
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("controller.sock")
    }

    pub fn controller_pid(&self) -> Option<u32> {
        self.controller
            .as_ref()
            .map(|c| c.pid())
            .filter(|p| *p != 0)
    }

    /// Starts the controller (its store on the loop device, in the blkio cgroup), after
    /// killing the one running, if any: never two at once. False if its socket did not
    /// appear within 30 s (see its log).
    pub fn start_controller(&mut self) -> bool {
        self.kill9_controller();
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let data = disk_mount(self.dir.path()).join("data");
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.net_ns))
            .arg(workspace_bin("fabric-controller"))
            .args(["--listen", "10.99.0.1:7070", "--listen"])
            .arg(format!("unix:{}", socket.display()))
            .arg("--data-dir")
            .arg(&data)
            .arg("--tls-dir")
            .arg(&self.pki.dir)
            // pki init's first admin (`admin`) gets its role.
            .args(["--bootstrap-admin", "admin"])
            .arg("--lease-ttl")
            .arg(self.timing.lease_ttl.to_string())
            .arg("--heartbeat-interval")
            .arg(self.timing.heartbeat_interval.to_string())
            .arg("--fencing-margin")
            .arg(self.timing.fencing_margin.to_string())
            .arg("--memory-relief-window")
            .arg(self.relief_window_s.to_string())
            .env("FABRIC_LOG", "info")
            .env(WALLCLOCK_OFFSET_ENV, &self.controller_wallclock_file);
        for (k, v) in &self.controller_env {
            command.env(k, v);
        }
        self.controller_starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("controller-{}.log", self.controller_starts));
        let process = Process::spawn("fabric-controller", command, log);
        if let Some(blkio) = &self.blkio {
            // nsenter execs the controller: the pid is the controller's.
            let _ = std::fs::write(blkio.join("cgroup.procs"), process.pid().to_string());
        }
        self.controller = Some(process);
        path_appears(&socket, Duration::from_secs(30))
    }

    pub fn kill9_controller(&mut self) {
        if let Some(c) = self.controller.as_mut() {
            c.kill9();
        }
        self.controller = None;
    }

    /// Starts host `i`'s agent with its environment and `extra` variables, after killing the
    /// one running, if any: never two agents of one host at once.
    pub fn start_agent(&mut self, i: usize, extra: &[(String, String)]) {
        self.kill9_agent(i);
        let host = &self.hosts[i];
        let tls = host.dir.join("tls");
        if !tls.join("host.pem").exists() {
            self.pki.host(&host.name, &tls);
        }
        let common = format!(
            r#"controller = "https://10.99.0.1:7070"
tls_dir = "{tls}"
listen = "unix:{listen}"
name = "{name}"
machine_id = "{name}"
zone = "z1"
fault_domain = {i}
update_domain = {i}
data_dir = "{data}"
"#,
            tls = tls.display(),
            listen = host.socket().display(),
            name = host.name,
            data = host.data_dir().display(),
        );
        let backend = match host.kind {
            HostKind::Kvm => format!(
                r#"hypervisor = "kvm"
vmm_binary = "{vmm}"
bridge = "fabric0"
network = "default"
vm_subnet = "10.100.{i}.0/24"
cgroup_parent = "{cg}"
stop_timeout_secs = 5
image_cache_mib = 1024
[reserve]
cpus = 0
memory_mib = 512
"#,
                vmm = workspace_bin("fabric-vmm").display(),
                cg = host.cgroup_parent,
            ),
            HostKind::Sim => format!(
                r#"hypervisor = "sim"
[reserve]
cpus = 0
memory_mib = 0
[sim]
start_delay_ms = 100
cpus = {cpus}
memory_mib = {memory}
[memory]
budget_mib = {budget}
"#,
                cpus = self.sim_cpus,
                memory = self.sim_memory_mib,
                budget = self.sim_budget_mib,
            ),
        };
        let path = host.dir.join("agent.toml");
        std::fs::write(&path, format!("{common}{backend}")).expect("agent config");
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", host.ns))
            .arg(workspace_bin("fabric-agent"))
            .arg("--config")
            .arg(&path)
            .env("FABRIC_LOG", "info")
            .env(BOOTTIME_OFFSET_ENV, &host.boottime_file)
            .env(WALLCLOCK_OFFSET_ENV, &host.wallclock_file);
        for (k, v) in host.env.iter().chain(extra) {
            command.env(k, v);
        }
        let host = &mut self.hosts[i];
        host.starts += 1;
        let log = host.dir.join(format!("agent-{}.log", host.starts));
        let name = format!("fabric-agent {}", host.name);
        host.agent = Some(Process::spawn(&name, command, log));
    }

    pub fn kill9_agent(&mut self, i: usize) {
        if let Some(agent) = self.hosts[i].agent.as_mut() {
            agent.kill9();
        }
        self.hosts[i].agent = None;
    }

    /// Runs fabricctl against the cluster; its stdout.
    pub fn fabricctl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec![
            "--controller".to_string(),
            format!("unix:{}", self.socket().display()),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&workspace_bin("fabricctl").display().to_string(), &all)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every live fabric-vmm of the cluster: (host index, pid, VM id).
    pub fn all_vmms(&self) -> Vec<(usize, u32, String)> {
        let mut all = Vec::new();
        for (pid, args) in process::naming(&self.dir.path().display().to_string()) {
            if !process::is_fabric_vmm(&args) {
                continue;
            }
            let lease = arg_after(&args, "--lease-file");
            if let Some(h) = self
                .hosts
                .iter()
                .find(|h| lease.starts_with(&format!("{}/", h.data_dir().display())))
            {
                all.push((h.index, pid, arg_after(&args, "--vm-id")));
            }
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nothing stays stopped: a stopped process ignores SIGKILL until it is continued.
        for host in &mut self.hosts {
            if let Some(pid) = host.agent_pid() {
                // SAFETY: signals the agent this cluster started and still owns.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            host.agent = None; // kills it
        }
        for (_, pid, _) in self.all_vmms() {
            // SAFETY: kill with a pid checked to be this cluster's fabric-vmm.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::kill(pid as i32, libc::SIGCONT);
            }
        }
        if let Some(pid) = self.controller_pid() {
            // SAFETY: signals the controller this cluster started and still owns.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
        let _ = self.throttle_disk(0, 0);
        self.controller = None;
        std::thread::sleep(Duration::from_millis(300));
        for host in &self.hosts {
            for controller in ["memory", "cpu", "cpuset", "pids"] {
                remove_cgroup_tree(
                    &Path::new("/sys/fs/cgroup")
                        .join(controller)
                        .join(&host.cgroup_parent),
                );
            }
            let _ = Command::new("ip").args(["netns", "del", &host.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.net_ns])
            .output();
        cleanup_leftovers(&self.prefix, self.dir.path());
    }
}
