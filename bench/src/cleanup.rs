//! What a benchmark run made on the host, and removing it. A run works in one directory and
//! names its network namespaces and cgroups after one prefix (`PREFIX` or `PREFIX-...`); its
//! processes are those whose command line names the directory. That is enough to find it all
//! again without any bookkeeping, which matters because the release profile aborts on panic:
//! no `Drop` runs then, so [`remove_on_panic`] removes whatever run is [`register`]ed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use fabric_test_support::process;

/// The cgroup v1 controllers a run's agents make cgroups in.
const CGROUP_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuset", "pids"];

/// What one run made: its directory, and the prefix of its namespaces' and cgroups' names.
#[derive(Clone, Debug)]
pub struct Made {
    pub dir: PathBuf,
    pub prefix: String,
}

static REGISTERED: Mutex<Option<Made>> = Mutex::new(None);

/// Sets (or, with None, clears) the run that a panic removes.
pub fn register(made: Option<Made>) {
    *REGISTERED.lock().unwrap_or_else(|e| e.into_inner()) = made;
}

/// The run that a panic would remove.
pub fn registered() -> Option<Made> {
    REGISTERED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// After the default report of a panic, removes the [`registered`] run.
pub fn remove_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if let Some(made) = registered() {
            made.remove_everything();
        }
    }));
}

impl Made {
    fn is_ours(&self, name: &str) -> bool {
        name == self.prefix || name.starts_with(&format!("{}-", self.prefix))
    }

    /// Live processes whose command line names the run's directory (controller, agents,
    /// fabric-vmm), with their command lines.
    pub fn processes(&self) -> Vec<(u32, String)> {
        process::naming(&self.dir.display().to_string())
            .into_iter()
            .map(|(pid, args)| (pid, args.join(" ")))
            .collect()
    }

    /// The run's network namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| self.is_ours(n))
            .collect()
    }

    /// The run's cgroups (cgroup v1: `<controller>/<prefix>...`, with the VMs' below them).
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for controller in CGROUP_CONTROLLERS {
            let root = Path::new("/sys/fs/cgroup").join(controller);
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                if self.is_ours(&entry.file_name().to_string_lossy()) {
                    found.push(entry.path());
                }
            }
        }
        found
    }

    /// Removes everything of the run: processes (SIGKILL), cgroups, namespaces, the directory.
    pub fn remove_everything(&self) {
        for (pid, _) in self.processes() {
            // SAFETY: kill with a pid whose command line names this run's own directory.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(300));
        for cgroup in self.cgroups() {
            if let Ok(children) = std::fs::read_dir(&cgroup) {
                for child in children.flatten() {
                    if child.path().is_dir() {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&cgroup);
        }
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// What is left of the run (nothing, once it is removed).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (pid, cmdline) in self.processes() {
            left.push(format!("process {pid}: {cmdline}"));
        }
        for ns in self.namespaces() {
            left.push(format!("network namespace {ns}"));
        }
        for cgroup in self.cgroups() {
            left.push(format!("cgroup {}", cgroup.display()));
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }

    /// Checks that nothing of the run is left once its owner removed it, and says so (as
    /// `bench`); what is left is listed, then removed. True when nothing was left.
    pub fn check_removed(&self, bench: &str) -> bool {
        let left = self.leftovers();
        if left.is_empty() {
            eprintln!(
                "{bench}: {}: cleaned up (no process, namespace, cgroup or file left)",
                self.prefix
            );
            return true;
        }
        eprintln!("{bench}: LEFT BEHIND:\n  {}", left.join("\n  "));
        self.remove_everything();
        false
    }
}
