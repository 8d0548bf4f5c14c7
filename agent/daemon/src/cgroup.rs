//! One cgroup per VM, so a VM's VMM process cannot take more memory or CPU than it was given.
//!
//! cgroup v1 (these hosts): the `memory` and `cpu` hierarchies, each with
//! `<parent>/<vm_id>` below its mount point. cgroup v2: `<parent>/<vm_id>` under the unified
//! mount, with the `memory` and `cpu` controllers enabled on the way down. The VMM joins its
//! cgroup before it execs (see [`VmCgroup::join_fds`]), so everything it allocates is
//! charged there.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Memory a VMM process needs beyond guest RAM (its own heap, stacks, device buffers, page
/// tables), MiB.
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// CFS period; quotas are in units of it.
const CPU_PERIOD_US: u64 = 100_000;

/// Where cgroups live on this host.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    parent: String,
    v2: bool,
}

/// The cgroup(s) of one VM.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    /// The directories: memory and cpu for v1, one for v2.
    pub dirs: Vec<PathBuf>,
}

/// Limits of one VM.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_mib: u64,
    pub vcpus: u32,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

impl Cgroups {
    /// The cgroups of this host under `/sys/fs/cgroup`, with VM groups below `parent`.
    pub fn new(parent: &str) -> Cgroups {
        Cgroups::with_root(Path::new("/sys/fs/cgroup"), parent)
    }

    fn with_root(root: &Path, parent: &str) -> Cgroups {
        Cgroups {
            root: root.to_owned(),
            parent: parent.to_string(),
            v2: root.join("cgroup.controllers").exists(),
        }
    }

    /// The directories a VM's cgroup has (whether or not they exist).
    pub fn dirs_of(&self, vm_id: &str) -> Vec<PathBuf> {
        if self.v2 {
            vec![self.root.join(&self.parent).join(vm_id)]
        } else {
            ["memory", "cpu"]
                .iter()
                .map(|c| self.root.join(c).join(&self.parent).join(vm_id))
                .collect()
        }
    }

    /// Creates (or reuses) the VM's cgroup and sets its limits.
    pub fn create(&self, vm_id: &str, limits: Limits) -> Result<VmCgroup, String> {
        let memory_bytes = (limits.memory_mib + VMM_OVERHEAD_MIB) * 1024 * 1024;
        // The vCPUs, plus half a CPU for the VMM's device and control threads.
        let quota = u64::from(limits.vcpus) * CPU_PERIOD_US + CPU_PERIOD_US / 2;
        let dirs = self.dirs_of(vm_id);
        if self.v2 {
            let parent = self.root.join(&self.parent);
            std::fs::create_dir_all(&parent)
                .map_err(|e| format!("cannot create cgroup {}: {e}", parent.display()))?;
            for dir in [&self.root, &parent] {
                write(&dir.join("cgroup.subtree_control"), "+memory +cpu")?;
            }
            let dir = &dirs[0];
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
            write(&dir.join("memory.max"), &memory_bytes.to_string())?;
            write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        } else {
            for dir in &dirs {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
            }
            write(
                &dirs[0].join("memory.limit_in_bytes"),
                &memory_bytes.to_string(),
            )?;
            write(
                &dirs[1].join("cpu.cfs_period_us"),
                &CPU_PERIOD_US.to_string(),
            )?;
            write(&dirs[1].join("cpu.cfs_quota_us"), &quota.to_string())?;
            write(
                &dirs[1].join("cpu.shares"),
                &(1024 * u64::from(limits.vcpus.max(1))).to_string(),
            )?;
        }
        Ok(VmCgroup { dirs })
    }

    /// Every process in the VM's cgroup (any of its hierarchies), in pid order: the VMM the
    /// agent started for it, whether or not its pid was recorded, and nothing else. Missing
    /// groups have none.
    pub fn procs(&self, vm_id: &str) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs_of(vm_id)
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Removes the VM's cgroup (its processes must have exited). Missing groups are fine.
    pub async fn remove(&self, vm_id: &str) -> Result<(), String> {
        for dir in self.dirs_of(vm_id) {
            remove_dir(&dir).await?;
        }
        Ok(())
    }
}

/// rmdir with a few retries: the kernel releases a cgroup's last task slightly after the
/// process is reaped.
async fn remove_dir(dir: &Path) -> Result<(), String> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!(dir = %dir.display(), error = %e, "cgroup busy; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("cannot remove cgroup {}: {e}", dir.display())),
        }
    }
}

impl VmCgroup {
    /// Opened `cgroup.procs` files: the child writes "0" to each between fork and exec, which
    /// moves it into the group before the VMM allocates anything.
    pub fn join_fds(&self) -> Result<Vec<OwnedFd>, String> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = Cgroups::with_root(dir.path(), "fab");
        assert_eq!(
            v1.dirs_of("vm"),
            [
                dir.path().join("memory/fab/vm"),
                dir.path().join("cpu/fab/vm")
            ]
        );
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory").unwrap();
        let v2 = Cgroups::with_root(dir.path(), "fab");
        assert_eq!(v2.dirs_of("vm"), [dir.path().join("fab/vm")]);
    }
}
