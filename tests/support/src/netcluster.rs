//! A cluster of real hosts on one machine for end-to-end tests: a network namespace for the
//! "datacenter network" (a bridge, the controller at 10.99.0.1) and one namespace per host
//! (its uplink `eth0` at 10.99.0.(10+i) on that bridge, its own VM bridge, a fabric-agent
//! running real guests through fabric-vmm). The same layout as `scripts/cluster-up`.
//!
//! Everything it makes is named with a unique prefix and removed when it drops, also when
//! the test fails: processes (by pid, checked to belong to this cluster), cgroups,
//! namespaces (with the bridges, veths and taps inside), files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fabric_proto::v1::compute_client::ComputeClient;
use tonic::transport::Channel;

use crate::cluster::{unix_channel, wait_for_path, workspace_bin, Process, Timing};
use crate::host::tail_lines;
use crate::image::Image;
use crate::process;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host: a namespace, an agent, its data.
pub struct NetHost {
    pub index: usize,
    pub name: String,
    pub ns: String,
    pub dir: PathBuf,
    pub address: String,
    pub fault_domain: u32,
    pub update_domain: u32,
    pub agent: Option<Process>,
    pub cgroup_parent: String,
}

impl NetHost {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory of VM `vm_id` on this host.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.data_dir().join("vms").join(vm_id)
    }

    pub fn console(&self, vm_id: &str) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.vm_dir(vm_id).join("console.log")).unwrap_or_default(),
        )
        .into_owned()
    }

    /// A field of the VM's record (`vm.json`): "pid", "ip", ...
    pub fn record(&self, vm_id: &str, field: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.vm_dir(vm_id).join("vm.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json.get(field).filter(|v| !v.is_null()).cloned()
    }

    /// fabric-vmm processes of this host: (pid, VM id from --vm-id).
    pub fn vmms(&self) -> Vec<(u32, String)> {
        process::naming(&self.data_dir().display().to_string())
            .into_iter()
            .filter(|(_, args)| process::is_fabric_vmm(args))
            .map(|(pid, args)| {
                let vm = args
                    .iter()
                    .position(|a| a == "--vm-id")
                    .and_then(|i| args.get(i + 1))
                    .cloned()
                    .unwrap_or_default();
                (pid, vm)
            })
            .collect()
    }

    /// Cuts the host's uplink (its agent and VMs keep running).
    pub fn partition(&self) {
        ip(&["-n", &self.ns, "link", "set", "eth0", "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.ns, "link", "set", "eth0", "up"]);
    }

    /// SIGKILL the agent and every VMM of the host: the machine died.
    pub fn kill(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            agent.kill9();
        }
        for (pid, _) in self.vmms() {
            // SAFETY: kill with a pid checked above to be one of this host's fabric-vmm.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    /// Pings `address` from inside the host's namespace.
    pub fn ping(&self, address: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "ping", "-c", "1", "-W", "2", address,
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// The cluster.
pub struct NetCluster {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub net_ns: String,
    pub timing: Timing,
    pub controller: Option<Process>,
    pub hosts: Vec<NetHost>,
    /// The cluster's CA and the controller's certificate (mutual TLS on its TCP listener).
    pub pki: crate::pki::Pki,
    /// More controller flags (e.g. `--host-cert-ttl 6s`).
    pub controller_args: Vec<String>,
    /// Agents get their certificates by joining with a token (their tls_dir starts with
    /// only ca.pem), not from `fabricctl pki issue`.
    pub join_with_tokens: bool,
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

impl NetCluster {
    /// A cluster of `hosts` hosts, host i in fault domain i % `fault_domains` and update
    /// domain i % `update_domains`.
    pub fn start(
        hosts: usize,
        fault_domains: u32,
        update_domains: u32,
        timing: Timing,
    ) -> NetCluster {
        Self::start_with(hosts, fault_domains, update_domains, timing, &[], false)
    }

    /// [`start`](Self::start), with more controller flags and, when `join_with_tokens`,
    /// agents that join with a token made by `fabricctl host token create`.
    pub fn start_with(
        hosts: usize,
        fault_domains: u32,
        update_domains: u32,
        timing: Timing,
        controller_args: &[&str],
        join_with_tokens: bool,
    ) -> NetCluster {
        let prefix = format!(
            "fe{}{}",
            std::process::id() % 10000,
            CLUSTERS.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("fabric-{prefix}-"))
            .tempdir()
            .expect("temp dir");
        let net_ns = format!("{prefix}-net");
        let pki = crate::pki::Pki::init(&dir.path().join("pki"), &prefix, &["10.99.0.1"]);
        let mut cluster = NetCluster {
            prefix: prefix.clone(),
            dir,
            net_ns: net_ns.clone(),
            timing,
            controller: None,
            hosts: Vec::new(),
            pki,
            controller_args: controller_args.iter().map(|a| a.to_string()).collect(),
            join_with_tokens,
        };
        ip(&["netns", "add", &net_ns]);
        ip(&["-n", &net_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &net_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net_ns, "addr", "add", "10.99.0.1/24", "dev", "br0"]);
        ip(&["-n", &net_ns, "link", "set", "br0", "up"]);
        for i in 0..hosts {
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
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let dir = cluster.dir.path().join(format!("h{i}"));
            std::fs::create_dir_all(&dir).expect("host dir");
            cluster.hosts.push(NetHost {
                index: i,
                name: format!("{prefix}-h{i}"),
                ns: ns.clone(),
                dir,
                address,
                fault_domain: i as u32 % fault_domains.max(1),
                update_domain: i as u32 % update_domains.max(1),
                agent: None,
                cgroup_parent: ns,
            });
        }
        cluster.start_controller();
        for i in 0..hosts {
            cluster.start_agent(i);
        }
        cluster
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("controller.sock")
    }

    pub fn start_controller(&mut self) {
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.net_ns))
            .arg(workspace_bin("fabric-controller"))
            .args(["--listen", "10.99.0.1:7070", "--listen"])
            .arg(format!("unix:{}", socket.display()))
            .arg("--data-dir")
            .arg(self.dir.path().join("controller"))
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
            .args(&self.controller_args)
            .env("FABRIC_LOG", "info");
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.dir.path().join(format!("controller-{n}.log"));
        self.controller = Some(Process::spawn("fabric-controller", command, log));
        wait_for_path(&socket, Duration::from_secs(30));
    }

    pub fn kill9_controller(&mut self) {
        if let Some(c) = self.controller.as_mut() {
            c.kill9();
        }
        self.controller = None;
    }

    pub fn start_agent(&mut self, i: usize) {
        let host = &self.hosts[i];
        let tls = host.dir.join("tls");
        let mut join = String::new();
        if !tls.join("host.pem").exists() {
            if self.join_with_tokens {
                // As an operator joins a machine: the CA certificate copied, a token made.
                std::fs::create_dir_all(&tls).expect("tls dir");
                std::fs::copy(self.pki.dir.join("ca.pem"), tls.join("ca.pem")).expect("ca.pem");
                let token = self.fabricctl(&["host", "token", "create", "--name", &host.name]);
                let file = host.dir.join("join-token");
                std::fs::write(&file, token).expect("token file");
                join = format!("join_token_file = \"{}\"\n", file.display());
            } else {
                self.pki.host(&host.name, &tls);
            }
        }
        let config = format!(
            r#"controller = "https://10.99.0.1:7070"
tls_dir = "{tls}"
{join}listen = "unix:{listen}"
name = "{name}"
machine_id = "{name}"
zone = "z1"
fault_domain = {fd}
update_domain = {ud}
data_dir = "{data}"
hypervisor = "kvm"
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
            tls = tls.display(),
            listen = host.dir.join("agent.sock").display(),
            name = host.name,
            fd = host.fault_domain,
            ud = host.update_domain,
            data = host.data_dir().display(),
            vmm = workspace_bin("fabric-vmm").display(),
            cg = host.cgroup_parent,
        );
        let path = host.dir.join("agent.toml");
        std::fs::write(&path, config).expect("agent config");
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", host.ns))
            .arg(workspace_bin("fabric-agent"))
            .arg("--config")
            .arg(&path)
            .env("FABRIC_LOG", "info");
        let n = std::fs::read_dir(&host.dir).map(|d| d.count()).unwrap_or(0);
        let log = host.dir.join(format!("agent-{n}.log"));
        let name = format!("fabric-agent {}", host.name);
        self.hosts[i].agent = Some(Process::spawn(&name, command, log));
    }

    pub async fn compute(&self) -> ComputeClient<Channel> {
        ComputeClient::new(unix_channel(&self.socket()).await)
    }

    /// Runs fabricctl against the cluster; returns stdout, panics with stderr on failure.
    pub fn fabricctl(&self, args: &[&str]) -> String {
        let out = Command::new(workspace_bin("fabricctl"))
            .arg("--controller")
            .arg(format!("unix:{}", self.socket().display()))
            .args(args)
            .output()
            .expect("run fabricctl");
        assert!(
            out.status.success(),
            "fabricctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pushes the guest image's kernel (and its initramfs, where the image uses one) as the
    /// image "default".
    pub fn push_guest_image(&self, image: &Image) {
        let mut files = vec![(image.kernel(), "kernel")];
        if image.use_initramfs() {
            files.push((image.initramfs(), "initramfs"));
        }
        for (path, role) in files {
            let path = path.to_str().expect("a UTF-8 image path");
            self.fabricctl(&["image", "push", path, "--name", "default", "--role", role]);
        }
    }

    /// Creates VM `name` of 1 vCPU and `memory_mib` booting image "default" with `cmdline`,
    /// one NIC on the default network and `extra` fabricctl flags; its id.
    pub fn create_vm(&self, name: &str, memory_mib: u32, cmdline: &str, extra: &[&str]) -> String {
        let memory = memory_mib.to_string();
        let mut args = vec!["vm", "create", "--name", name, "--image", "default"];
        args.extend(["--vcpus", "1", "--memory", &memory, "--cmdline", cmdline]);
        args.extend(["--nic", "default", "-o", "json"]);
        args.extend(extra);
        let out = self.fabricctl(&args);
        let json: serde_json::Value = serde_json::from_str(&out).expect("vm create -o json");
        json["id"].as_str().expect("vm create: an id").to_string()
    }

    /// The host (index) whose controller id is `host_id`, by name.
    pub fn host_by_name(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for host in &mut self.hosts {
            if panicking {
                for (pid, vm) in host.vmms() {
                    eprintln!("--- {} VM {vm} (pid {pid}) console tail ---", host.name);
                    eprintln!("{}", tail_lines(&host.console(&vm), 5));
                }
            }
            host.agent = None; // kills the agent
            for (pid, _) in host.vmms() {
                // SAFETY: kill with a pid checked to be this cluster's fabric-vmm.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        self.controller = None;
        std::thread::sleep(Duration::from_millis(300));
        for host in &self.hosts {
            for controller in ["memory", "cpu"] {
                let parent = Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(&host.cgroup_parent);
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for child in children.flatten() {
                        if child.path().is_dir() {
                            let _ = std::fs::remove_dir(child.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(&parent);
            }
            let _ = Command::new("ip").args(["netns", "del", &host.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.net_ns])
            .output();
    }
}
