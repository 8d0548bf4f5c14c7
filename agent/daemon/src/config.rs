//! The agent's configuration: a TOML file (`--config`), with command-line flags overriding it.
//! Every field has a default that suits a bare-metal host run by systemd, except the
//! controller's address, which has to be given.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::network::Subnet;

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// Real guests: one fabric-vmm process per VM on /dev/kvm.
    Kvm,
    /// Simulated VMs (records only) for scale tests of the control plane.
    Sim,
}

/// Host resources kept back from VMs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
    /// Space on the data directory's filesystem that VM disks and logs never get, MiB
    /// (besides the image cache's budget): for the agent's records and lease, and slack.
    #[serde(default = "default_disk_reserve_mib")]
    pub disk_mib: u64,
}

/// The disk space kept back from VMs by default, MiB.
pub const DEFAULT_DISK_RESERVE_MIB: u64 = 1024;

fn default_disk_reserve_mib() -> u64 {
    DEFAULT_DISK_RESERVE_MIB
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve {
            cpus: 0,
            memory_mib: 0,
            disk_mib: DEFAULT_DISK_RESERVE_MIB,
        }
    }
}

/// Settings of the simulated backend.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Time from an assignment to the simulated VM running.
    pub start_delay_ms: u64,
    /// A simulated guest's demand (memory in use) as a share of its startup memory
    /// (0..=100), unless its placement label `fabric.sim/memory-demand-mib` gives it in MiB
    /// (see `crate::sim`).
    pub memory_used_percent: u8,
    /// The capacity a hollow host announces (CPUs); 0: the real machine's.
    pub cpus: u32,
    /// The capacity a hollow host announces (memory, MiB); 0: the real machine's.
    pub memory_mib: u64,
    /// The disk a hollow host announces (its data directory's filesystem, MiB); 0: the real
    /// one's.
    pub disk_mib: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            start_delay_ms: 500,
            memory_used_percent: 40,
            cpus: 0,
            memory_mib: 0,
            disk_mib: 0,
        }
    }
}

/// The memory balancer (`[memory]`): see `crate::balancer`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Balance memory between the VMs with their balloons every half second.
    pub balancer: bool,
    /// How fast memory is taken from a guest, MiB per second (given back at once).
    pub rate_mib_per_s: u64,
    /// Memory the VMs may use in all, MiB; 0: the host's memory less `[reserve]`.
    pub budget_mib: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            balancer: true,
            rate_mib_per_s: 256,
            budget_mib: 0,
        }
    }
}

/// The file format: every key optional.
/// The image cache's default size, MiB.
pub const DEFAULT_IMAGE_CACHE_MIB: u64 = 16 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    controller: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    name: Option<String>,
    machine_id: Option<String>,
    zone: Option<String>,
    fault_domain: Option<u32>,
    update_domain: Option<u32>,
    data_dir: Option<PathBuf>,
    hypervisor: Option<HypervisorKind>,
    vmm_binary: Option<PathBuf>,
    bridge: Option<String>,
    network: Option<String>,
    vm_subnet: Option<String>,
    cgroup_parent: Option<String>,
    stop_timeout_secs: Option<u64>,
    image_cache_mib: Option<u64>,
    tls_dir: Option<PathBuf>,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    reserve: Option<Reserve>,
    labels: Option<BTreeMap<String, String>>,
    admins: Option<Vec<String>>,
    sim: Option<SimConfig>,
    memory: Option<MemoryConfig>,
}

/// Command-line flags; each overrides the file's key of the same name.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "fabric-agent",
    version,
    about = "The Fabric host agent: runs the VMs the fabric controller assigns to this host"
)]
pub struct Flags {
    /// TOML configuration file (see agent/dist/fabric-agent.toml in the repository).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The controller: `https://HOST:PORT` (mutual TLS, with --tls-dir) or `unix:/PATH`.
    #[arg(long)]
    pub controller: Option<String>,
    /// Where to serve the Agent service: `HOST:PORT` (mutual TLS, with --tls-dir) or
    /// `unix:/PATH` (root only).
    #[arg(long)]
    pub listen: Option<String>,
    /// The host's certificate: a directory with ca.pem, host.pem and host-key.pem
    /// (`fabricctl pki issue --host NAME` makes one). Needed for any TCP address.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// A file holding a one-time join token (`fabricctl host token create --name NAME`):
    /// used when tls_dir has ca.pem but no host.pem yet, to get this host's certificate.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// Host name registered with the controller (default: the kernel's host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Stable machine identity (default: /etc/machine-id).
    #[arg(long)]
    pub machine_id: Option<String>,
    /// Directory for images, VM directories and the agent's state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// `kvm` (default) or `sim` (simulated VMs for scale tests).
    #[arg(long, value_enum)]
    pub hypervisor: Option<HypervisorKind>,
    /// The fabric-vmm executable (default: next to fabric-agent, else on PATH).
    #[arg(long)]
    pub vmm_binary: Option<PathBuf>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub controller: String,
    pub listen: String,
    /// The host's certificate directory (ca.pem, host.pem, host-key.pem), for TCP.
    pub tls_dir: Option<PathBuf>,
    /// A one-time join token, for a first start with ca.pem but no host.pem in tls_dir.
    pub join_token: Option<JoinToken>,
    /// The Agent service address registered with the controller.
    pub advertise: String,
    pub name: String,
    pub machine_id: String,
    pub zone: String,
    pub fault_domain: u32,
    pub update_domain: u32,
    pub data_dir: PathBuf,
    pub hypervisor: HypervisorKind,
    pub vmm_binary: PathBuf,
    pub bridge: String,
    pub network: String,
    pub vm_subnet: Subnet,
    pub cgroup_parent: String,
    pub stop_timeout: Duration,
    /// Size the image cache is trimmed to (least recently used first), MiB.
    pub image_cache_mib: u64,
    pub reserve: Reserve,
    pub labels: BTreeMap<String, String>,
    /// Users whose certificates may call the Agent service (besides the controller and root
    /// on the Unix socket): the cluster's admins, named here because the agent does not
    /// read the controller's role bindings. Empty by default: deny.
    pub admins: Vec<String>,
    pub sim: SimConfig,
    pub memory: MemoryConfig,
}

/// A join token, kept out of every log and debug print.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(text: &str) -> JoinToken {
        JoinToken(text.trim().to_string())
    }

    /// The token itself, for the one request that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// The longest join token text read from a file or the configuration, bytes (the form is
/// 94 bytes).
pub const MAX_JOIN_TOKEN: usize = 256;

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

impl Config {
    /// Reads `flags.config` (if given) and applies the flags over it.
    pub fn load(flags: Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                Self::parse_file(&text).map_err(|error| ConfigError::Parse {
                    path: path.clone(),
                    error,
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(file, flags)
    }

    fn parse_file(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Parses a TOML configuration without flags (for tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file = Self::parse_file(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            error,
        })?;
        Self::merge(file, Flags::default())
    }

    fn merge(file: FileConfig, flags: Flags) -> Result<Config, ConfigError> {
        let controller = flags
            .controller
            .or(file.controller)
            .ok_or_else(|| invalid("no controller address: set `controller` or --controller"))?;
        let tls_dir = flags.tls_dir.or(file.tls_dir);
        let controller_address = super::connect::Address::parse(&controller)
            .map_err(|e| invalid(format!("controller: {e}")))?;
        // TCP only with mutual TLS: without a certificate, the Agent service is local.
        let listen = flags.listen.or(file.listen).unwrap_or_else(|| {
            if tls_dir.is_some() {
                "0.0.0.0:7071".to_string()
            } else {
                "unix:/run/fabric/agent.sock".to_string()
            }
        });
        let listen_address =
            super::connect::Address::parse(&listen).map_err(|e| invalid(format!("listen: {e}")))?;
        if tls_dir.is_none() {
            for (key, address) in [
                ("controller", &controller_address),
                ("listen", &listen_address),
            ] {
                if let super::connect::Address::Tcp(_) = address {
                    return Err(invalid(format!(
                        "{key}: a TCP address needs the host's certificate: set tls_dir (fabricctl pki issue --host NAME makes one)"
                    )));
                }
            }
        }
        let admins = file.admins.unwrap_or_default();
        if admins.len() > 64 {
            return Err(invalid(format!(
                "admins: {} names; at most 64",
                admins.len()
            )));
        }
        for admin in &admins {
            fabric_proto::tls::check_name("admins: user", admin).map_err(invalid)?;
        }
        let join_token_file = flags.join_token_file.or(file.join_token_file);
        let join_token = match (file.join_token, join_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "join_token and join_token_file: give one of them, not both",
                ))
            }
            (Some(text), None) => Some(JoinToken::new(&text)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| invalid(format!("join_token_file {}: {e}", path.display())))?;
                Some(JoinToken::new(&text))
            }
            (None, None) => None,
        };
        if let Some(token) = &join_token {
            if token.expose().is_empty() || token.expose().len() > MAX_JOIN_TOKEN {
                // The message never shows the token.
                return Err(invalid(format!(
                    "the join token: 1..={MAX_JOIN_TOKEN} bytes (fabricctl host token create prints one)"
                )));
            }
            if tls_dir.is_none() {
                return Err(invalid(
                    "a join token needs tls_dir (with the cluster's ca.pem): the certificate is written there",
                ));
            }
        }
        let advertise = file.advertise.unwrap_or_else(|| listen.clone());
        let name = match flags.name.or(file.name) {
            Some(name) => name,
            None => read_trimmed("/proc/sys/kernel/hostname")
                .map_err(|e| invalid(format!("name not set and no host name: {e}")))?,
        };
        if name.is_empty() || name.len() > 253 {
            return Err(invalid(format!(
                "name {name:?}: must be 1..=253 characters"
            )));
        }
        let machine_id = match flags.machine_id.or(file.machine_id) {
            Some(id) => id,
            None => read_trimmed("/etc/machine-id").map_err(|e| {
                invalid(format!(
                    "machine_id not set and /etc/machine-id unreadable: {e}"
                ))
            })?,
        };
        if machine_id.is_empty() {
            return Err(invalid("machine_id is empty"));
        }
        let vmm_binary = match flags.vmm_binary.or(file.vmm_binary) {
            Some(path) => path,
            None => default_vmm_binary(),
        };
        let subnet_text = file
            .vm_subnet
            .unwrap_or_else(|| "10.100.0.0/24".to_string());
        let vm_subnet =
            Subnet::parse(&subnet_text).map_err(|e| invalid(format!("vm_subnet: {e}")))?;
        let bridge = file.bridge.unwrap_or_else(|| "fabric0".to_string());
        super::network::check_ifname(&bridge).map_err(|e| invalid(format!("bridge: {e}")))?;
        let cgroup_parent = file.cgroup_parent.unwrap_or_else(|| "fabric".to_string());
        if !super::is_safe_name(&cgroup_parent) {
            return Err(invalid(format!(
                "cgroup_parent {cgroup_parent:?}: use letters, digits, '.', '_' and '-'"
            )));
        }
        let sim = file.sim.unwrap_or_default();
        if sim.memory_used_percent > 100 {
            return Err(invalid("sim.memory_used_percent must be 0..=100"));
        }
        let memory = file.memory.unwrap_or_default();
        if memory.rate_mib_per_s == 0 {
            return Err(invalid(
                "memory.rate_mib_per_s must be at least 1 (MiB per second)",
            ));
        }
        Ok(Config {
            controller,
            listen,
            tls_dir,
            join_token,
            advertise,
            name,
            machine_id,
            zone: file.zone.unwrap_or_default(),
            fault_domain: file.fault_domain.unwrap_or(0),
            update_domain: file.update_domain.unwrap_or(0),
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/fabric")),
            hypervisor: flags
                .hypervisor
                .or(file.hypervisor)
                .unwrap_or(HypervisorKind::Kvm),
            vmm_binary,
            bridge,
            network: file.network.unwrap_or_else(|| "default".to_string()),
            vm_subnet,
            cgroup_parent,
            stop_timeout: Duration::from_secs(file.stop_timeout_secs.unwrap_or(30)),
            image_cache_mib: file.image_cache_mib.unwrap_or(DEFAULT_IMAGE_CACHE_MIB),
            reserve: file.reserve.unwrap_or_default(),
            labels: file.labels.unwrap_or_default(),
            admins,
            sim,
            memory,
        })
    }

    /// The gateway address VMs route through: the subnet's first host address, on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.vm_subnet.gateway()
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// fabric-vmm next to this executable when it is there, else by name from PATH.
fn default_vmm_binary() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let beside = dir.join("fabric-vmm");
            if beside.is_file() {
                return beside;
            }
        }
    }
    PathBuf::from("fabric-vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_and_flags_override_it() {
        let text = r#"
            controller = "http://10.0.0.1:7070"
            listen = "unix:/run/fabric/agent.sock"
            tls_dir = "/etc/fabric/tls"
            name = "host-1"
            machine_id = "abc"
            zone = "z1"
            fault_domain = 3
            update_domain = 1
            data_dir = "/srv/fabric"
            hypervisor = "sim"
            bridge = "br-vms"
            vm_subnet = "10.9.0.0/16"
            cgroup_parent = "fabric-x"
            stop_timeout_secs = 5
            [reserve]
            cpus = 2
            memory_mib = 2048
            disk_mib = 512
            [labels]
            rack = "r7"
            [sim]
            start_delay_ms = 10
            [memory]
            balancer = false
            rate_mib_per_s = 64
            budget_mib = 4096
        "#;
        let file = Config::parse_file(text).expect("parses");
        let flags = Flags {
            name: Some("other".into()),
            ..Flags::default()
        };
        let config = Config::merge(file, flags).expect("valid");
        assert_eq!(config.name, "other");
        assert_eq!(config.fault_domain, 3);
        assert_eq!(config.hypervisor, HypervisorKind::Sim);
        assert_eq!(config.reserve.memory_mib, 2048);
        assert_eq!(config.reserve.disk_mib, 512);
        assert_eq!(config.labels["rack"], "r7");
        assert_eq!(config.sim.start_delay_ms, 10);
        assert_eq!(config.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(config.stop_timeout, Duration::from_secs(5));
        assert_eq!(
            config.memory,
            MemoryConfig {
                balancer: false,
                rate_mib_per_s: 64,
                budget_mib: 4096,
            }
        );
    }

    #[test]
    fn the_memory_balancer_is_on_by_default() {
        let config =
            Config::from_toml("controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"")
                .expect("valid");
        assert_eq!(config.memory, MemoryConfig::default());
        assert!(config.memory.balancer);
        assert_eq!(config.memory.rate_mib_per_s, 256);
        assert_eq!(
            config.memory.budget_mib, 0,
            "0: the host's allocatable memory"
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            ("controller = \"http://x:1\"\nbogus = 1", "unknown field"),
            ("listen = \"x:1\"\nmachine_id = \"m\"\nname = \"n\"", "no controller"),
            (
                "controller = \"ftp://x\"\nmachine_id = \"m\"\nname = \"n\"",
                "controller",
            ),
            (
                "controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"\nvm_subnet = \"10.0.0.0/31\"",
                "vm_subnet",
            ),
            (
                "controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"\nbridge = \"a-very-long-bridge-name\"",
                "bridge",
            ),
            (
                "controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"\ncgroup_parent = \"../x\"",
                "cgroup_parent",
            ),
            ("controller = \"unix:/c\"\nhypervisor = \"xen\"", "hypervisor"),
            (
                "controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"\n[memory]\nrate_mib_per_s = 0",
                "rate_mib_per_s",
            ),
            (
                "controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"\n[memory]\nrate = 1",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn tcp_needs_a_certificate_and_without_one_the_agent_listens_locally() {
        let err = Config::from_toml(
            "controller = \"http://10.0.0.1:7070\"\nmachine_id = \"m\"\nname = \"n\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("set tls_dir"), "{err}");
        let config =
            Config::from_toml("controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"")
                .expect("valid");
        assert_eq!(config.listen, "unix:/run/fabric/agent.sock");
        let err = Config::from_toml(
            "controller = \"unix:/c\"\nlisten = \"0.0.0.0:7071\"\nmachine_id = \"m\"\nname = \"n\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("listen: a TCP address"), "{err}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../dist/fabric-agent.toml");
        let file = Config::parse_file(text).expect("agent/dist/fabric-agent.toml parses");
        let flags = Flags {
            name: Some("h".into()),
            machine_id: Some("m".into()),
            ..Flags::default()
        };
        let config = Config::merge(file, flags).expect("and is valid");
        assert_eq!(config.controller, "https://10.0.0.1:7070");
        assert_eq!(config.tls_dir, Some(PathBuf::from("/etc/fabric/tls")));
    }

    #[test]
    fn a_join_token_is_read_once_and_never_printed() {
        let base = "controller = \"https://10.0.0.1:7070\"\ntls_dir = \"/etc/fabric/tls\"\nmachine_id = \"m\"\nname = \"n\"\n";
        let config =
            Config::from_toml(&format!("{base}join_token = \" fabric-join.abc.def\\n\"")).unwrap();
        let token = config.join_token.clone().expect("a token");
        assert_eq!(token.expose(), "fabric-join.abc.def");
        let printed = format!("{config:?}");
        assert!(!printed.contains("fabric-join.abc"), "{printed}");
        // From a file (the flag or the key); not both ways at once; not without tls_dir.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "fabric-join.x.y\n").unwrap();
        let config =
            Config::from_toml(&format!("{base}join_token_file = \"{}\"", file.display())).unwrap();
        assert_eq!(config.join_token.unwrap().expose(), "fabric-join.x.y");
        let err = Config::from_toml(&format!(
            "{base}join_token = \"a\"\njoin_token_file = \"{}\"",
            file.display()
        ))
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = Config::from_toml(
            "controller = \"unix:/c\"\nmachine_id = \"m\"\nname = \"n\"\njoin_token = \"t\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs tls_dir"), "{err}");
        let err =
            Config::from_toml(&format!("{base}join_token = \"{}\"", "x".repeat(300))).unwrap_err();
        assert!(!err.to_string().contains("xxxx"), "{err}");
        let err = Config::from_toml(&format!(
            "{base}join_token_file = \"{}\"",
            dir.path().join("missing").display()
        ))
        .unwrap_err();
        assert!(err.to_string().contains("join_token_file"), "{err}");
    }
}
