//! Processes of a test cluster on one machine: a `fabric-controller` and `fabric-agent`s
//! (simulated hosts here; see the agent's own tests for real guests), each with its own
//! directory under one temp dir, talking over Unix sockets. Every process is killed by PID
//! when its handle drops, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric_proto::v1::compute_client::ComputeClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::host::tail_lines;

/// A binary of this workspace, built by `cargo test --workspace` (or `cargo build`) next to
/// the test executable (`target/<profile>/deps/..`), or next to the running workspace binary
/// when that is not a test (a benchmark in `target/<profile>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let exe_dir = exe.parent().expect("target/<profile>/deps");
    let dir = if exe_dir.file_name().is_some_and(|n| n == "deps") {
        exe_dir.parent().expect("target/<profile>/deps")
    } else {
        exe_dir
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run the suite with `cargo test --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// A gRPC channel over a Unix socket.
pub async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::from_static("http://fabric.invalid").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        },
    ))
}

/// Waits until `path` exists (a socket being bound); panics after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    assert!(
        path_appears(path, timeout),
        "{} did not appear within {timeout:?}",
        path.display()
    );
}

/// Waits until `path` exists (a socket being bound); false if it does not within `timeout`.
pub fn path_appears(path: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `program` (a fabric-controller) listening on the Unix socket `socket` with its store in
/// `data_dir`, logging at `info`.
pub fn controller_command(program: &Path, socket: &Path, data_dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--data-dir")
        .arg(data_dir)
        .env("FABRIC_LOG", "info");
    command
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Process {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Process {
    /// Starts `command` as `name`, its stdout and stderr in the file `log`; panics if it
    /// cannot.
    pub fn spawn(name: &str, command: Command, log: PathBuf) -> Process {
        Self::try_spawn(name, command, log).unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    }

    /// [`spawn`](Self::spawn), failing instead of panicking.
    pub fn try_spawn(name: &str, mut command: Command, log: PathBuf) -> std::io::Result<Process> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Process {
            child: Some(child),
            log,
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail_lines(
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}) ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        self.kill9();
    }
}

/// Timing of the controller's leases, seconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_ttl: f64,
    pub heartbeat_interval: f64,
    pub fencing_margin: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_ttl: 2.0,
            heartbeat_interval: 0.5,
            fencing_margin: 1.5,
        }
    }
}

/// A controller process and its directory.
pub struct Controller {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub timing: Timing,
    /// More flags, kept across restarts (e.g. `--memory-relief-window 4`).
    pub extra_args: Vec<String>,
    /// Environment variables, kept across restarts (e.g. a test-only clock offset).
    pub env: Vec<(String, String)>,
    pub process: Process,
}

impl Controller {
    pub fn start(dir: &Path, timing: Timing) -> Controller {
        Self::start_with_args(dir, timing, &[])
    }

    /// A controller with more flags than the timing.
    pub fn start_with_args(dir: &Path, timing: Timing, extra_args: &[&str]) -> Controller {
        Self::start_with_env(dir, timing, extra_args, &[])
    }

    /// A controller with more flags and environment variables.
    pub fn start_with_env(
        dir: &Path,
        timing: Timing,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Controller {
        std::fs::create_dir_all(dir).expect("controller dir");
        let socket = dir.join("controller.sock");
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let process = Self::spawn(dir, &socket, timing, &extra_args, &env);
        Controller {
            dir: dir.to_owned(),
            socket,
            timing,
            extra_args,
            env,
            process,
        }
    }

    fn spawn(
        dir: &Path,
        socket: &Path,
        timing: Timing,
        extra_args: &[String],
        env: &[(String, String)],
    ) -> Process {
        let _ = std::fs::remove_file(socket);
        let mut command = controller_command(
            &workspace_bin("fabric-controller"),
            socket,
            &dir.join("data"),
        );
        command
            .arg("--lease-ttl")
            .arg(timing.lease_ttl.to_string())
            .arg("--heartbeat-interval")
            .arg(timing.heartbeat_interval.to_string())
            .arg("--fencing-margin")
            .arg(timing.fencing_margin.to_string())
            .args(extra_args)
            .envs(env.iter().map(|(k, v)| (k, v)));
        let log = dir.join(format!(
            "controller-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        ));
        let process = Process::spawn("fabric-controller", command, log);
        wait_for_path(socket, Duration::from_secs(30));
        process
    }

    /// SIGKILL, then start again on the same data.
    pub fn kill9_and_restart(&mut self) {
        self.process.kill9();
        self.process = Self::spawn(
            &self.dir,
            &self.socket,
            self.timing,
            &self.extra_args,
            &self.env,
        );
    }

    pub async fn compute(&self) -> ComputeClient<Channel> {
        ComputeClient::new(unix_channel(&self.socket).await)
    }

    pub fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

/// What a simulated host is: its name, where placement sees it, and its memory budget.
#[derive(Debug, Clone)]
pub struct SimHostSpec {
    pub name: String,
    /// Its placement zone (`z1` unless set).
    pub zone: String,
    pub fault_domain: u32,
    pub update_domain: u32,
    /// The memory its balancer shares among its VMs (`[memory] budget_mib`; 0: its 64 GiB)
    /// while the scheduler still sees 64 GiB: less makes a host that over-commits memory.
    pub memory_budget_mib: u64,
    /// Its `machine_id` (`machine-<name>` unless set): two hosts given the same one are a
    /// cloned machine.
    pub machine_id: Option<String>,
    /// The disk it announces (`[sim] disk_mib`; 1 TiB unless set), of which it offers VMs
    /// all but the agent's default 1 GiB reserve.
    pub disk_mib: u64,
    /// Its certificate directory (`tls_dir`), for a controller reached over TCP.
    pub tls_dir: Option<PathBuf>,
    /// Where its Agent service listens (`unix:<dir>/agent.sock` unless set; a TCP address
    /// needs `tls_dir`).
    pub listen: Option<String>,
    /// A file with a join token (`join_token_file`), for a `tls_dir` holding only ca.pem.
    pub join_token_file: Option<PathBuf>,
}

impl SimHostSpec {
    /// Host `name` in zone `z1`, with the whole 64 GiB as its memory budget.
    pub fn new(name: &str, fault_domain: u32, update_domain: u32) -> SimHostSpec {
        SimHostSpec {
            name: name.to_string(),
            zone: "z1".to_string(),
            fault_domain,
            update_domain,
            memory_budget_mib: 0,
            machine_id: None,
            disk_mib: 1 << 20,
            tls_dir: None,
            listen: None,
            join_token_file: None,
        }
    }

    /// A host presenting the certificate in `dir` (ca.pem, host.pem, host-key.pem).
    pub fn with_tls(mut self, dir: &Path) -> SimHostSpec {
        self.tls_dir = Some(dir.to_owned());
        self
    }

    /// A host serving its Agent service at `listen` (`127.0.0.1:PORT`: mutual TLS).
    pub fn with_listen(mut self, listen: &str) -> SimHostSpec {
        self.listen = Some(listen.to_string());
        self
    }

    /// A host that joins with the token in `file` (its `tls_dir` holds only ca.pem).
    pub fn with_join_token_file(mut self, file: &Path) -> SimHostSpec {
        self.join_token_file = Some(file.to_owned());
        self
    }

    /// A host announcing `disk_mib` of disk.
    pub fn with_disk(mut self, disk_mib: u64) -> SimHostSpec {
        self.disk_mib = disk_mib;
        self
    }

    /// A host presenting `machine_id` (as a machine cloned from another's image would).
    pub fn with_machine_id(mut self, machine_id: &str) -> SimHostSpec {
        self.machine_id = Some(machine_id.to_string());
        self
    }

    pub fn in_zone(mut self, zone: &str) -> SimHostSpec {
        self.zone = zone.to_string();
        self
    }

    pub fn with_memory_budget(mut self, memory_budget_mib: u64) -> SimHostSpec {
        self.memory_budget_mib = memory_budget_mib;
        self
    }
}

/// A simulated host: a fabric-agent with `hypervisor = "sim"`.
pub struct SimHost {
    pub name: String,
    pub dir: PathBuf,
    pub process: Process,
}

impl SimHost {
    pub fn start(
        dir: &Path,
        name: &str,
        controller: &str,
        fault_domain: u32,
        update_domain: u32,
    ) -> SimHost {
        Self::start_spec(
            dir,
            controller,
            &SimHostSpec::new(name, fault_domain, update_domain),
        )
    }

    /// A simulated host as `spec` says, its agent talking to `controller`.
    pub fn start_spec(dir: &Path, controller: &str, spec: &SimHostSpec) -> SimHost {
        std::fs::create_dir_all(dir).expect("host dir");
        let config = format!(
            r#"controller = "{controller}"
listen = "{listen}"
name = "{name}"
machine_id = "{machine_id}"
zone = "{zone}"
fault_domain = {fault_domain}
update_domain = {update_domain}
data_dir = "{data}"
hypervisor = "sim"
{tls}
[reserve]
cpus = 0
memory_mib = 0
[sim]
start_delay_ms = 100
cpus = 16
memory_mib = 65536
disk_mib = {disk_mib}
[memory]
budget_mib = {memory_budget_mib}
"#,
            name = spec.name,
            machine_id = spec
                .machine_id
                .clone()
                .unwrap_or_else(|| format!("machine-{}", spec.name)),
            zone = spec.zone,
            fault_domain = spec.fault_domain,
            update_domain = spec.update_domain,
            memory_budget_mib = spec.memory_budget_mib,
            disk_mib = spec.disk_mib,
            tls = spec
                .tls_dir
                .as_ref()
                .map(|d| format!("tls_dir = \"{}\"", d.display()))
                .into_iter()
                .chain(
                    spec.join_token_file
                        .as_ref()
                        .map(|f| format!("join_token_file = \"{}\"", f.display())),
                )
                .collect::<Vec<_>>()
                .join("\n"),
            listen = spec
                .listen
                .clone()
                .unwrap_or_else(|| format!("unix:{}", dir.join("agent.sock").display())),
            data = dir.join("data").display(),
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, config).expect("agent config");
        let mut command = Command::new(workspace_bin("fabric-agent"));
        command.arg("--config").arg(&path).env("FABRIC_LOG", "info");
        let process = Process::spawn(
            &format!("fabric-agent {}", spec.name),
            command,
            dir.join("agent.log"),
        );
        SimHost {
            name: spec.name.clone(),
            dir: dir.to_owned(),
            process,
        }
    }
}
