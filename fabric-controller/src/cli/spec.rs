//! What `fabricctl vm create` sends: a `CreateVmRequest` built from a spec file (YAML or
//! JSON) or from flags. The controller checks the values and names the bad field in its
//! INVALID_ARGUMENT; this module only rejects what a `VmSpec` cannot express (unknown keys,
//! two sources for one disk, a label without `=`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use fabric_proto::v1::{
    disk_spec, BootImage, CreateVmRequest, DesiredState, DiskSpec, MemorySpec, NicSpec, Placement,
    RestartPolicy, VmSpec,
};
use serde::Deserialize;

/// The long help of `vm create`: the spec file format.
pub const SPEC_HELP: &str = "\
Create a VM from a spec file (-f FILE, `-` for stdin) or from flags.

The spec file is YAML or JSON with these keys (unknown keys are an error):

  name: web-1                   # unique: lowercase letters, digits, '-'
  project: web                  # default: `default` (roles and quotas are per project)
  vcpus: 2
  memory:                       # or the shorthand `memory_mib: 512` (static memory)
    startup_mib: 512            # required
    minimum_mib: 256            # default: startup_mib
    maximum_mib: 1024           # default: startup_mib
    buffer_percent: 20          # 0..=2000
    weight: 5000                # 1..=10000
  image:                        # a pushed image name, or digests (or both:
    name: alpine                #  digests given win over the name's)
    kernel_sha256: ...
    initramfs_sha256: ...
    rootfs_sha256: ...
  kernel_cmdline: quiet         # appended to the agent's command line
  nics:
    - network: default
      mac: 52:54:00:12:34:56    # default: derived from the VM id
  disks:                        # after the rootfs: /dev/vdb, /dev/vdc, ...
    - size_mib: 1024            # a new empty disk, or
    - image_sha256: ...         #  a copy of a pushed image file
      read_only: true
  placement:
    zone: dc1
    availability_set: web
    labels: {app: web}
    anti_affinity_labels: {app: web}
  restart_policy: always        # always, on-failure or never
  desired_state: running        # running or stopped

`fabricctl vm get NAME -o json` prints the same keys under `spec`.";

/// `vm create` arguments: a spec file, or the spec as flags.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("spec-flags").multiple(true))]
pub struct CreateArgs {
    /// Spec file, YAML or JSON; `-` reads standard input.
    #[arg(short = 'f', long, value_name = "FILE", conflicts_with = "spec-flags")]
    pub file: Option<PathBuf>,
    /// VM name.
    #[arg(long, group = "spec-flags", required_unless_present = "file")]
    pub name: Option<String>,
    /// The project the VM belongs to (default: "default"); overrides the spec file's.
    #[arg(long)]
    pub project: Option<String>,
    /// Number of vCPUs.
    #[arg(long, group = "spec-flags", required_unless_present = "file")]
    pub vcpus: Option<u32>,
    /// Memory at boot, MiB.
    #[arg(
        long,
        value_name = "MIB",
        group = "spec-flags",
        required_unless_present = "file"
    )]
    pub memory: Option<u64>,
    /// Lowest the balloon may shrink the VM to, MiB (default: --memory).
    #[arg(long, value_name = "MIB", group = "spec-flags")]
    pub memory_min: Option<u64>,
    /// Highest the VM may grow to, MiB (default: --memory).
    #[arg(long, value_name = "MIB", group = "spec-flags")]
    pub memory_max: Option<u64>,
    /// Name of a pushed image (kernel, initramfs and rootfs).
    #[arg(long, value_name = "NAME", group = "spec-flags")]
    pub image: Option<String>,
    /// sha256 of a pushed kernel.
    #[arg(long, value_name = "SHA256", group = "spec-flags")]
    pub kernel: Option<String>,
    /// sha256 of a pushed initramfs.
    #[arg(long, value_name = "SHA256", group = "spec-flags")]
    pub initramfs: Option<String>,
    /// sha256 of a pushed root filesystem image.
    #[arg(long, value_name = "SHA256", group = "spec-flags")]
    pub rootfs: Option<String>,
    /// Extra kernel command line.
    #[arg(long, value_name = "STR", group = "spec-flags")]
    pub cmdline: Option<String>,
    /// A NIC on this network (repeatable, in guest order).
    #[arg(long, value_name = "NETWORK", group = "spec-flags")]
    pub nic: Vec<String>,
    /// A new empty disk of this size, MiB (repeatable, in guest order).
    #[arg(long, value_name = "MIB", group = "spec-flags")]
    pub disk_size: Vec<u64>,
    /// Zone the VM must run in.
    #[arg(long, group = "spec-flags")]
    pub zone: Option<String>,
    /// Availability set: its VMs are spread over fault and update domains.
    #[arg(long, value_name = "NAME", group = "spec-flags")]
    pub availability_set: Option<String>,
    /// A label of the VM, KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE", group = "spec-flags")]
    pub label: Vec<String>,
    /// Never share a host with a VM labelled KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE", group = "spec-flags")]
    pub anti_affinity: Vec<String>,
    /// What the agent does when the VM exits.
    #[arg(long, value_enum, group = "spec-flags")]
    pub restart_policy: Option<RestartPolicyName>,
    /// Create the VM stopped (also overrides a spec file's desired_state).
    #[arg(long)]
    pub stopped: bool,
}

/// Restart policies by their short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicyName {
    Always,
    #[serde(alias = "on_failure")]
    OnFailure,
    Never,
}

impl From<RestartPolicyName> for RestartPolicy {
    fn from(name: RestartPolicyName) -> RestartPolicy {
        match name {
            RestartPolicyName::Always => RestartPolicy::Always,
            RestartPolicyName::OnFailure => RestartPolicy::OnFailure,
            RestartPolicyName::Never => RestartPolicy::Never,
        }
    }
}

/// Desired states by their short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredStateName {
    Running,
    Stopped,
}

/// Why a spec cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file cannot be read.
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The spec file is not a spec (syntax, types, unknown keys).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value a VmSpec cannot hold.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A spec file. Every key is optional here: a missing one is reported by the controller,
/// which names it the way the API does (`spec.vcpus`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub vcpus: u32,
    pub memory: Option<MemoryFile>,
    pub memory_mib: Option<u64>,
    pub image: Option<ImageFile>,
    #[serde(default)]
    pub kernel_cmdline: String,
    #[serde(default)]
    pub nics: Vec<NicFile>,
    #[serde(default)]
    pub disks: Vec<DiskFile>,
    pub placement: Option<PlacementFile>,
    pub restart_policy: Option<RestartPolicyName>,
    pub desired_state: Option<DesiredStateName>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    #[serde(default)]
    pub startup_mib: u64,
    #[serde(default)]
    pub minimum_mib: u64,
    #[serde(default)]
    pub maximum_mib: u64,
    #[serde(default)]
    pub buffer_percent: u32,
    #[serde(default)]
    pub weight: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub kernel_sha256: String,
    #[serde(default)]
    pub initramfs_sha256: String,
    #[serde(default)]
    pub rootfs_sha256: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicFile {
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub mac: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    pub size_mib: Option<u64>,
    pub image_sha256: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementFile {
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub availability_set: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub anti_affinity_labels: BTreeMap<String, String>,
}

impl SpecFile {
    /// Parses a spec; JSON when it looks like JSON (for serde_json's messages), else YAML.
    pub fn parse(text: &str, path: &str) -> Result<SpecFile, SpecError> {
        let parsed = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_norway::from_str(text).map_err(|e| e.to_string())
        };
        parsed.map_err(|message| SpecError::Parse {
            path: path.to_string(),
            message,
        })
    }

    /// Reads and parses a spec file; `-` is standard input.
    pub fn read(path: &Path) -> Result<SpecFile, SpecError> {
        let shown = path.display().to_string();
        let text = if path == Path::new("-") {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|error| SpecError::Read {
            path: shown.clone(),
            error,
        })?;
        SpecFile::parse(&text, &shown)
    }

    /// The request this spec asks for.
    pub fn into_request(self) -> Result<CreateVmRequest, SpecError> {
        let memory = match (self.memory, self.memory_mib) {
            (Some(_), Some(_)) => {
                return Err(invalid("memory_mib", "give memory or memory_mib, not both"))
            }
            (Some(m), None) => Some(MemorySpec {
                startup_mib: m.startup_mib,
                minimum_mib: m.minimum_mib,
                maximum_mib: m.maximum_mib,
                buffer_percent: m.buffer_percent,
                weight: m.weight,
            }),
            (None, Some(mib)) => Some(MemorySpec {
                startup_mib: mib,
                ..Default::default()
            }),
            (None, None) => None,
        };
        let disks = self
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, disk)| {
                let source = match (disk.size_mib, disk.image_sha256) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            format!("disks[{i}]"),
                            "give size_mib or image_sha256, not both",
                        ))
                    }
                    (Some(size), None) => Some(disk_spec::Source::SizeMib(size)),
                    (None, Some(digest)) => Some(disk_spec::Source::ImageSha256(digest)),
                    // The controller names the field.
                    (None, None) => None,
                };
                Ok(DiskSpec {
                    source,
                    read_only: disk.read_only,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = VmSpec {
            name: self.name,
            project: self.project,
            vcpus: self.vcpus,
            memory,
            image: self.image.map(|i| BootImage {
                name: i.name,
                kernel_sha256: i.kernel_sha256,
                initramfs_sha256: i.initramfs_sha256,
                rootfs_sha256: i.rootfs_sha256,
            }),
            kernel_cmdline: self.kernel_cmdline,
            nics: self
                .nics
                .into_iter()
                .map(|n| NicSpec {
                    network: n.network,
                    mac: n.mac,
                })
                .collect(),
            disks,
            placement: self.placement.map(|p| Placement {
                zone: p.zone,
                availability_set: p.availability_set,
                anti_affinity_labels: p.anti_affinity_labels.into_iter().collect(),
                labels: p.labels.into_iter().collect(),
            }),
            restart_policy: self
                .restart_policy
                .map_or(0, |r| RestartPolicy::from(r) as i32),
        };
        let desired_state = match self.desired_state {
            None => DesiredState::Unspecified,
            Some(DesiredStateName::Running) => DesiredState::Running,
            Some(DesiredStateName::Stopped) => DesiredState::Stopped,
        };
        Ok(CreateVmRequest {
            spec: Some(spec),
            desired_state: desired_state as i32,
        })
    }
}

/// `KEY=VALUE` flags as a map.
fn labels(flag: &str, values: &[String]) -> Result<HashMap<String, String>, SpecError> {
    values
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| invalid(format!("{flag} {pair:?}"), "expected KEY=VALUE"))
        })
        .collect()
}

impl CreateArgs {
    /// The CreateVm request these arguments describe.
    pub fn request(&self) -> Result<CreateVmRequest, SpecError> {
        let mut request = match &self.file {
            Some(path) => SpecFile::read(path)?.into_request()?,
            None => self.flags_request()?,
        };
        if self.stopped {
            request.desired_state = DesiredState::Stopped as i32;
        }
        if let (Some(project), Some(spec)) = (&self.project, request.spec.as_mut()) {
            spec.project = project.clone();
        }
        Ok(request)
    }

    fn flags_request(&self) -> Result<CreateVmRequest, SpecError> {
        let image = (self.image.is_some()
            || self.kernel.is_some()
            || self.initramfs.is_some()
            || self.rootfs.is_some())
        .then(|| BootImage {
            name: self.image.clone().unwrap_or_default(),
            kernel_sha256: self.kernel.clone().unwrap_or_default(),
            initramfs_sha256: self.initramfs.clone().unwrap_or_default(),
            rootfs_sha256: self.rootfs.clone().unwrap_or_default(),
        });
        let labels_given = labels("--label", &self.label)?;
        let anti_affinity = labels("--anti-affinity", &self.anti_affinity)?;
        let placement = (self.zone.is_some()
            || self.availability_set.is_some()
            || !labels_given.is_empty()
            || !anti_affinity.is_empty())
        .then(|| Placement {
            zone: self.zone.clone().unwrap_or_default(),
            availability_set: self.availability_set.clone().unwrap_or_default(),
            anti_affinity_labels: anti_affinity,
            labels: labels_given,
        });
        let spec = VmSpec {
            name: self.name.clone().unwrap_or_default(),
            project: self.project.clone().unwrap_or_default(),
            vcpus: self.vcpus.unwrap_or_default(),
            memory: self.memory.map(|startup_mib| MemorySpec {
                startup_mib,
                minimum_mib: self.memory_min.unwrap_or_default(),
                maximum_mib: self.memory_max.unwrap_or_default(),
                ..Default::default()
            }),
            image,
            kernel_cmdline: self.cmdline.clone().unwrap_or_default(),
            nics: self
                .nic
                .iter()
                .map(|network| NicSpec {
                    network: network.clone(),
                    mac: String::new(),
                })
                .collect(),
            disks: self
                .disk_size
                .iter()
                .map(|size| DiskSpec {
                    source: Some(disk_spec::Source::SizeMib(*size)),
                    read_only: false,
                })
                .collect(),
            placement,
            restart_policy: self
                .restart_policy
                .map_or(0, |r| RestartPolicy::from(r) as i32),
        };
        Ok(CreateVmRequest {
            spec: Some(spec),
            desired_state: DesiredState::Unspecified as i32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "
name: web-1
vcpus: 2
memory: {startup_mib: 512, minimum_mib: 256, maximum_mib: 1024, buffer_percent: 20, weight: 100}
image: {name: alpine, rootfs_sha256: abc}
kernel_cmdline: quiet
nics: [{network: default}, {network: storage, mac: '52:54:00:00:00:01'}]
disks: [{size_mib: 1024}, {image_sha256: def, read_only: true}]
placement:
  zone: dc1
  availability_set: web
  labels: {app: web}
  anti_affinity_labels: {app: web}
restart_policy: on-failure
desired_state: stopped
";

    #[test]
    fn every_key_reaches_the_spec() {
        let request = SpecFile::parse(FULL, "web.yaml")
            .unwrap()
            .into_request()
            .unwrap();
        assert_eq!(request.desired_state(), DesiredState::Stopped);
        let spec = request.spec.clone().unwrap();
        assert_eq!((spec.name.as_str(), spec.vcpus), ("web-1", 2));
        assert_eq!(
            spec.memory.unwrap(),
            MemorySpec {
                startup_mib: 512,
                minimum_mib: 256,
                maximum_mib: 1024,
                buffer_percent: 20,
                weight: 100
            }
        );
        let image = spec.image.clone().unwrap();
        assert_eq!(
            (image.name.as_str(), image.rootfs_sha256.as_str()),
            ("alpine", "abc")
        );
        assert_eq!(spec.kernel_cmdline, "quiet");
        assert_eq!(spec.nics[1].mac, "52:54:00:00:00:01");
        assert_eq!(spec.disks[0].source, Some(disk_spec::Source::SizeMib(1024)));
        assert_eq!(
            spec.disks[1],
            DiskSpec {
                source: Some(disk_spec::Source::ImageSha256("def".into())),
                read_only: true
            }
        );
        let placement = spec.placement.clone().unwrap();
        assert_eq!(placement.zone, "dc1");
        assert_eq!(placement.availability_set, "web");
        assert_eq!(placement.labels["app"], "web");
        assert_eq!(placement.anti_affinity_labels["app"], "web");
        assert_eq!(spec.restart_policy(), RestartPolicy::OnFailure);
    }

    #[test]
    fn json_and_the_memory_shorthand() {
        let request = SpecFile::parse(
            r#"{"name": "a", "vcpus": 1, "memory_mib": 256, "restart_policy": "on_failure"}"#,
            "a.json",
        )
        .unwrap()
        .into_request()
        .unwrap();
        let spec = request.spec.clone().unwrap();
        assert_eq!(spec.memory.unwrap().startup_mib, 256);
        assert_eq!(spec.restart_policy(), RestartPolicy::OnFailure);
        assert_eq!(request.desired_state(), DesiredState::Unspecified);
    }

    #[test]
    fn mistakes_name_the_key() {
        let cases = [
            ("name: a\ncpus: 2\n", "cpus"),
            ("placement: {zon: a}\n", "zon"),
            ("nics: [{network: a, vlan: 3}]\n", "vlan"),
            ("restart_policy: sometimes\n", "sometimes"),
            (r#"{"name": "a", "vcpu": 1}"#, "vcpu"),
            ("vcpus: many\n", "vcpus"),
        ];
        for (text, key) in cases {
            let err = SpecFile::parse(text, "f.yaml").unwrap_err().to_string();
            assert!(
                err.starts_with("f.yaml: ") && err.contains(key),
                "{text}: {err}"
            );
        }
        let conflicts = [
            ("memory_mib: 1\nmemory: {startup_mib: 1}\n", "memory_mib"),
            ("disks: [{size_mib: 1, image_sha256: a}]\n", "disks[0]"),
        ];
        for (text, field) in conflicts {
            let err = SpecFile::parse(text, "f.yaml")
                .unwrap()
                .into_request()
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(field), "{text}: {err}");
        }
    }

    #[test]
    fn labels_need_an_equals_sign() {
        let parsed = labels("--label", &["a=b".into(), "c=".into()]).unwrap();
        assert_eq!((parsed["a"].as_str(), parsed["c"].as_str()), ("b", ""));
        let err = labels("--label", &["ab".into()]).unwrap_err().to_string();
        assert_eq!(err, "--label \"ab\": expected KEY=VALUE");
    }
}
