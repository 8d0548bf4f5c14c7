//! A test host for fabric-agent tests: a network namespace the test makes, a private temp dir
//! with the agent's configuration, data directory and log, and the agent process running in
//! that namespace (the test's own child, so its pid is the agent's).
//!
//! Dropping a `TestHost` (also when the test panics) kills the agent and every fabric-vmm it
//! started (found through the VMs' `vm.json` and through command lines naming this host's data
//! directory, each checked to be a fabric-vmm first), removes the host's cgroups, then deletes
//! the namespace with everything in it, and prints the logs if the test failed
//! (`FABRIC_TEST_LOG_DIR=DIR` keeps every agent log in DIR).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fabric_proto::v1::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::netns::NetNs;
use crate::process;

/// How long the agent may take to bring up its local API or to register.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The bridge the agent makes in the namespace, and what it serves.
pub const BRIDGE: &str = "fabbr0";
pub const NETWORK: &str = "default";
pub const VM_SUBNET: &str = "10.200.0.0/24";
pub const GATEWAY: &str = "10.200.0.1";
/// Memory the test hosts keep for themselves (`[reserve] memory_mib`).
pub const RESERVE_MEMORY_MIB: u64 = 512;
/// The cgroup v1 controllers the agent puts each VM in.
pub const CGROUP_CONTROLLERS: [&str; 2] = ["memory", "cpu"];

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_index() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// The last `lines` lines of `text`.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How the agent of a test host is configured.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// "kvm" or "sim".
    pub hypervisor: &'static str,
    /// Graceful shutdown time before the agent forces a VM off.
    pub stop_timeout_secs: u64,
    /// The simulated backend's start delay.
    pub sim_start_delay_ms: u64,
    /// `[memory] balancer`: the memory balancer runs.
    pub memory_balancer: bool,
    /// `[memory] budget_mib`; 0: the host's memory less its reserve.
    pub memory_budget_mib: u64,
    /// `image_cache_mib`: the image cache's budget (1 GiB unless set).
    pub image_cache_mib: u64,
    /// `[reserve] disk_mib`: disk kept back from VMs (the agent's default unless set).
    pub disk_reserve_mib: u64,
}

impl HostOptions {
    pub fn kvm() -> HostOptions {
        HostOptions {
            hypervisor: "kvm",
            stop_timeout_secs: 5,
            sim_start_delay_ms: 100,
            memory_balancer: true,
            memory_budget_mib: 0,
            // 1 GiB: the test guests are small, and the host offers VMs its free disk
            // less this budget.
            image_cache_mib: 1024,
            disk_reserve_mib: 1024,
        }
    }

    pub fn sim() -> HostOptions {
        HostOptions {
            hypervisor: "sim",
            ..HostOptions::kvm()
        }
    }
}

/// A process identified by pid and start time, so that a reused pid is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    start_ticks: u64,
}

impl Proc {
    /// The live fabric-vmm with this pid, if there is one.
    pub fn fabric_vmm(pid: u32) -> Option<Proc> {
        let stat = process::stat(pid)?;
        if stat.state == 'Z' || !process::is_fabric_vmm(&process::cmdline(pid)) {
            return None;
        }
        Some(Proc {
            pid,
            start_ticks: stat.start,
        })
    }

    /// Whether this very process still runs (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        process::stat(self.pid).is_some_and(|s| s.state != 'Z' && s.start == self.start_ticks)
    }

    /// Sends SIGKILL to this process if it is still the one captured.
    pub fn kill9(&self) {
        if self.alive() {
            // SAFETY: plain kill(2) on a pid just checked to be the process we mean.
            let ret = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            assert_eq!(
                ret,
                0,
                "kill -9 {}: {}",
                self.pid,
                std::io::Error::last_os_error()
            );
        }
    }

    /// Waits until the process is gone; false if it is still there after `timeout`.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// Every pid number found in a JSON document under a key named "pid".
fn json_pids(value: &serde_json::Value, out: &mut Vec<u32>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if key == "pid" {
                    if let Some(pid) = v.as_u64().and_then(|p| u32::try_from(p).ok()) {
                        if pid > 1 {
                            out.push(pid);
                        }
                    }
                }
                json_pids(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_pids(v, out)),
        _ => {}
    }
}

/// A tonic channel over the Unix socket at `path`.
pub async fn uds_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://fabric-agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// One agent host of a test.
pub struct TestHost {
    pub options: HostOptions,
    pub netns: NetNs,
    pub name: String,
    pub machine_id: String,
    pub cgroup_parent: String,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub agent_socket: PathBuf,
    /// Where the test's controller should listen (the agent is configured with it).
    pub controller_socket: PathBuf,
    pub log_path: PathBuf,
    /// Extra environment for the agent process (test-only knobs such as
    /// `FABRIC_TEST_BOOTTIME_OFFSET_FILE`), applied from its next start.
    pub agent_env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

impl TestHost {
    /// Makes the namespace, the directory and the configuration; the agent is not started.
    pub fn new(options: HostOptions) -> TestHost {
        let index = next_index();
        let pid = std::process::id();
        let netns = NetNs::new(&format!("fab-a{pid}-{index}")).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = tempfile::Builder::new()
            .prefix("fabric-agent-test-")
            .tempdir()
            .expect("temp dir");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let host = TestHost {
            options,
            name: format!("test-host-{pid}-{index}"),
            machine_id: format!("fabric-test-{pid}-{index}-{nanos}"),
            cgroup_parent: format!("fabric-test-{pid}-{index}"),
            data_dir: dir.path().join("data"),
            config_path: dir.path().join("agent.toml"),
            agent_socket: dir.path().join("agent.sock"),
            controller_socket: dir.path().join("controller.sock"),
            log_path: dir.path().join("agent.log"),
            dir,
            netns,
            agent_env: Vec::new(),
            child: None,
            starts: 0,
        };
        host.must(&["ip", "link", "set", "lo", "up"]);
        host.write_config();
        host
    }

    fn write_config(&self) {
        let config = format!(
            r#"controller = "unix:{controller}"
listen = "unix:{listen}"
name = "{name}"
machine_id = "{machine_id}"
zone = "z1"
fault_domain = 0
update_domain = 0
data_dir = "{data_dir}"
hypervisor = "{hypervisor}"
vmm_binary = "{vmm}"
bridge = "{BRIDGE}"
network = "{NETWORK}"
vm_subnet = "{VM_SUBNET}"
cgroup_parent = "{cgroup_parent}"
stop_timeout_secs = {stop_timeout}
image_cache_mib = {image_cache_mib}

[reserve]
cpus = 0
memory_mib = {RESERVE_MEMORY_MIB}
disk_mib = {disk_reserve_mib}

[labels]
rack = "r1"

[sim]
start_delay_ms = {sim_delay}

[memory]
balancer = {balancer}
budget_mib = {budget_mib}
"#,
            controller = self.controller_socket.display(),
            listen = self.agent_socket.display(),
            name = self.name,
            machine_id = self.machine_id,
            data_dir = self.data_dir.display(),
            hypervisor = self.options.hypervisor,
            vmm = crate::cluster::workspace_bin("fabric-vmm").display(),
            cgroup_parent = self.cgroup_parent,
            stop_timeout = self.options.stop_timeout_secs,
            sim_delay = self.options.sim_start_delay_ms,
            balancer = self.options.memory_balancer,
            image_cache_mib = self.options.image_cache_mib,
            disk_reserve_mib = self.options.disk_reserve_mib,
            budget_mib = self.options.memory_budget_mib,
        );
        std::fs::write(&self.config_path, config).expect("write agent.toml");
    }

    /// `program` run inside the namespace.
    pub fn ns_command(&self, program: impl AsRef<OsStr>) -> Command {
        self.netns.command(program)
    }

    /// Runs a command in the namespace and panics if it fails; its stdout.
    pub fn must(&self, args: &[&str]) -> String {
        self.netns.run(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `ip addr show dev NAME` in the namespace; panics if there is no such link.
    pub fn addresses(&self, name: &str) -> String {
        self.must(&["ip", "addr", "show", "dev", name])
    }

    /// Makes a tap `name` in the namespace that the agent did not make (someone else's).
    pub fn add_foreign_tap(&self, name: &str) {
        self.must(&["ip", "tuntap", "add", "dev", name, "mode", "tap"]);
    }

    /// `ip link show dev NAME` in the namespace, or None if there is no such link.
    pub fn link(&self, name: &str) -> Option<String> {
        self.netns.link(name)
    }

    /// Names of every link in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.netns.links()
    }

    /// Starts (or starts again) the agent with the host's configuration.
    pub fn start_agent(&mut self) {
        assert!(
            self.child.is_none(),
            "the agent of {} is already running",
            self.name
        );
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("agent log");
        let _ = writeln!(log, "===== test: agent start #{} =====", self.starts);
        // The agent joins the namespace with setns(2) before exec rather than through `ip netns
        // exec`, which also remounts /sys for the namespace and so hides the cgroup v1
        // hierarchies under /sys/fs/cgroup that the agent needs; the network (netlink, /proc/net,
        // /proc/sys/net) is the namespace's either way.
        let netns_path = self.netns.path();
        let netns = std::fs::File::open(&netns_path)
            .unwrap_or_else(|e| panic!("{}: {e}", netns_path.display()));
        let netns_fd = netns.as_raw_fd();
        let mut command = Command::new(crate::cluster::workspace_bin("fabric-agent"));
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
        // which is async-signal-safe, on a descriptor that `netns` keeps open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .env("FABRIC_LOG", "info,fabric_agent=debug")
            .env("RUST_BACKTRACE", "1")
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn fabric-agent in the namespace");
        drop(netns);
        self.child = Some(child);
    }

    /// Alias of [`start_agent`](Self::start_agent) for a restart after a kill.
    pub fn restart(&mut self) {
        self.start_agent();
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's exit status if it has exited (it is then forgotten), None while it runs.
    pub fn agent_exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Panics (with the log) unless the agent is running.
    pub fn assert_agent_running(&mut self) {
        if let Some(status) = self.agent_exited() {
            panic!(
                "the agent of {} exited ({status})\n{}",
                self.name,
                self.report()
            );
        }
        assert!(
            self.child.is_some(),
            "the agent of {} was not started",
            self.name
        );
    }

    /// kill -9 of the agent, and reaping it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent running");
        // Only our own child, by its pid.
        child.kill().expect("kill -9 the agent");
        let _ = child.wait();
    }

    /// SIGTERM to the agent; returns how it exited (panics if it is still there after
    /// `timeout`, after killing it).
    pub fn sigterm(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: kill(2) on our own child's pid, which it keeps until we reap it.
        let ret = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(ret, 0, "SIGTERM: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within {timeout:?} of SIGTERM\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of the agent's local API, once it answers (retries until AGENT_TIMEOUT).
    pub async fn agent_client(&self) -> AgentClient<Channel> {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            match uds_channel(&self.agent_socket).await {
                Ok(channel) => return AgentClient::new(channel),
                Err(err) => {
                    if Instant::now() >= deadline {
                        panic!(
                            "agent socket {} does not answer after {AGENT_TIMEOUT:?}: {err}\n{}",
                            self.agent_socket.display(),
                            self.report()
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `<data_dir>/vms/<vm_id>`.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.data_dir.join("vms").join(vm_id)
    }

    /// `/sys/fs/cgroup/<controller>/<cgroup_parent>/<vm_id>`.
    pub fn cgroup_dir(&self, controller: &str, vm_id: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(&self.cgroup_parent)
            .join(vm_id)
    }

    /// Live fabric-vmm processes whose command line names this host's data directory.
    pub fn vmm_processes(&self) -> Vec<(Proc, Vec<String>)> {
        process::naming(&self.data_dir.to_string_lossy())
            .into_iter()
            .filter(|(_, cmdline)| process::is_fabric_vmm(cmdline))
            .filter_map(|(pid, cmdline)| Some((Proc::fabric_vmm(pid)?, cmdline)))
            .collect()
    }

    /// Live fabric-vmm processes of one VM: a command line naming its directory or its id.
    pub fn vmm_processes_of(&self, vm_id: &str) -> Vec<Proc> {
        let vm_dir = format!("{}/", self.vm_dir(vm_id).display());
        self.vmm_processes()
            .into_iter()
            .filter(|(_, cmdline)| {
                cmdline.iter().any(|a| a.contains(&vm_dir))
                    || cmdline
                        .windows(2)
                        .any(|w| w[0] == "--vm-id" && w[1] == vm_id)
            })
            .map(|(proc, _)| proc)
            .collect()
    }

    /// Whether `path` exists and is a Unix socket.
    pub fn is_socket(path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
    }

    /// The agent's log, the VMs' VMM logs and console tails: for failure messages.
    pub fn report(&self) -> String {
        let mut out = format!(
            "--- agent log ({}) ---\n{}\n",
            self.log_path.display(),
            tail_lines(
                &String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()),
                80
            )
        );
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join("vms")) {
            for entry in entries.flatten() {
                for (file, lines) in [("vmm.log", 20), ("console.log", 10)] {
                    let path = entry.path().join(file);
                    if let Ok(bytes) = std::fs::read(&path) {
                        out.push_str(&format!(
                            "--- {} ---\n{}\n",
                            path.display(),
                            tail_lines(&String::from_utf8_lossy(&bytes), lines)
                        ));
                    }
                }
            }
        }
        out
    }

    /// pids recorded in `<data_dir>/vms/*/vm.json`.
    fn recorded_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join("vms")) {
            for entry in entries.flatten() {
                let Ok(text) = std::fs::read_to_string(entry.path().join("vm.json")) else {
                    continue;
                };
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
                    json_pids(&value, &mut pids);
                }
            }
        }
        pids
    }

    /// Kills every fabric-vmm of this host (each checked to be a fabric-vmm first).
    fn kill_vmms(&self) {
        let mut procs: Vec<Proc> = self
            .recorded_pids()
            .into_iter()
            .filter_map(Proc::fabric_vmm)
            .collect();
        procs.extend(self.vmm_processes().into_iter().map(|(p, _)| p));
        procs.sort_by_key(|p| p.pid);
        procs.dedup();
        for proc in &procs {
            // SAFETY: kill(2) on a pid just checked to be a fabric-vmm this host started.
            unsafe { libc::kill(proc.pid as libc::pid_t, libc::SIGKILL) };
        }
        for proc in &procs {
            if !proc.wait_gone(Duration::from_secs(10)) {
                eprintln!("warning: fabric-vmm {} survived SIGKILL", proc.pid);
            }
        }
    }

    /// rmdir of a cgroup directory and its children (cgroup directories are removed with
    /// rmdir, not by deleting their files).
    fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    Self::remove_cgroup(&entry.path())?;
                }
            }
        }
        match std::fs::remove_dir(dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    fn remove_cgroups(&self) {
        for controller in ["memory", "cpu", "cpuacct", "cpuset", "pids"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&self.cgroup_parent);
            if !dir.exists() {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match Self::remove_cgroup(&dir) {
                    Ok(()) => break,
                    Err(err) if Instant::now() >= deadline => {
                        eprintln!("warning: rmdir {}: {err}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== test host {} (netns {}) =====\n{}",
                self.name,
                self.netns,
                self.report()
            );
        }
        // FABRIC_TEST_LOG_DIR=DIR keeps each host's agent log as DIR/<host name>.log.
        if let Some(keep) = std::env::var_os("FABRIC_TEST_LOG_DIR") {
            let keep = Path::new(&keep);
            let _ = std::fs::create_dir_all(keep);
            let _ = std::fs::copy(&self.log_path, keep.join(format!("{}.log", self.name)));
        }
        if let Some(mut child) = self.child.take() {
            // Only our own child, by its pid.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_vmms();
        self.remove_cgroups();
        // The namespace goes last, with the `netns` field.
    }
}
