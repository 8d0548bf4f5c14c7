//! `scripts/cluster-up` and `scripts/cluster-down` as an operator runs them: a simulated
//! 3-host cluster (each host a network namespace with its own agent) comes up with every host
//! ready in its fault and update domain, places an availability set one VM per fault domain,
//! and once torn down leaves no namespace, process, cgroup or state directory behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fabric_test_support::cluster::workspace_bin;
use serde_json::Value;

/// A cluster made by `scripts/cluster-up`; `scripts/cluster-down` runs on drop unless the test
/// already ran it, so a failing test leaves nothing behind either.
struct ScriptCluster {
    name: String,
    state: PathBuf,
    bin_dir: PathBuf,
    torn_down: bool,
}

impl ScriptCluster {
    fn new(name: &str) -> ScriptCluster {
        let bin_dir = workspace_bin("fabric-agent")
            .parent()
            .expect("the target directory")
            .to_owned();
        ScriptCluster {
            name: name.to_string(),
            state: Path::new("/run/fabric-cluster").join(name),
            bin_dir,
            torn_down: false,
        }
    }

    fn script(&self, script: &str, args: &[&str]) -> Output {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts")
            .join(script);
        Command::new(&path)
            .args(args)
            .env("FABRIC_BIN_DIR", &self.bin_dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }

    fn up(&self, args: &[&str]) -> Output {
        let mut all = vec!["--name", &self.name, "--no-build"];
        all.extend_from_slice(args);
        self.script("cluster-up", &all)
    }

    fn down(&mut self) -> Output {
        self.torn_down = true;
        self.script("cluster-down", &["--name", &self.name])
    }

    /// `fabricctl ... -o json` against the cluster's operator socket.
    fn fabricctl(&self, args: &[&str]) -> Value {
        let output = Command::new(self.bin_dir.join("fabricctl"))
            .arg("--controller")
            .arg(format!(
                "unix:{}",
                self.state.join("controller.sock").display()
            ))
            .args(args)
            .args(["-o", "json"])
            .output()
            .expect("running fabricctl");
        assert!(
            output.status.success(),
            "fabricctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("fabricctl printed JSON")
    }

    /// Pids of the processes whose command line names the state directory.
    fn processes(&self) -> Vec<(u32, String)> {
        let needle = format!("{}/", self.state.display());
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                found.push((pid, cmdline));
            }
        }
        found
    }

    /// Network namespaces named after the cluster.
    fn namespaces(&self) -> Vec<String> {
        let output = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let prefix = format!("{}-", self.name);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|ns| ns.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    /// The hosts' cgroup directories (v1 memory and cpu hierarchies, and v2).
    fn cgroups(&self) -> Vec<PathBuf> {
        let prefix = format!("{}-h", self.name);
        let mut found = Vec::new();
        for root in [
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup",
        ] {
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(entry.path());
                }
            }
        }
        found
    }
}

impl Drop for ScriptCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in [
                "controller.log",
                "h1/agent.log",
                "h2/agent.log",
                "h3/agent.log",
            ] {
                let text = std::fs::read_to_string(self.state.join(log)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "--- last lines of {log} ---\n{}",
                    lines[lines.len().saturating_sub(20)..].join("\n")
                );
            }
        }
        if !self.torn_down {
            let output = self.down();
            eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn cluster_up_places_an_availability_set_and_cluster_down_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: cluster scripts need root (network namespaces, cgroups)");
        return;
    }
    // Unique per test process (names are at most 8 characters).
    let name = format!("fcs{}", std::process::id() % 100_000);
    let mut cluster = ScriptCluster::new(&name);

    let up = cluster.up(&["--hosts", "3", "--hypervisor", "sim"]);
    assert!(up.status.success(), "cluster-up failed:\n{}", text(&up));

    let hosts = cluster.fabricctl(&["host", "list"]);
    let hosts = hosts.as_array().expect("a host list");
    let mut seen: Vec<(String, String, u64, u64)> = hosts
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                h["state"].as_str().unwrap_or_default().to_string(),
                h["fault_domain"].as_u64().unwrap_or(u64::MAX),
                h["update_domain"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    seen.sort();
    // Three fault domains (one per host) and the default two update domains.
    let expected: Vec<(String, String, u64, u64)> = [(1, 0, 0), (2, 1, 1), (3, 2, 0)]
        .iter()
        .map(|&(i, fd, ud)| (format!("{name}-h{i}"), "ready".to_string(), fd, ud))
        .collect();
    assert_eq!(seen, expected, "hosts after cluster-up");

    // A second cluster-up of the same name is refused and names the way out.
    let again = cluster.up(&["--hosts", "1", "--hypervisor", "sim"]);
    assert!(!again.status.success(), "a second cluster-up succeeded");
    assert!(
        text(&again).contains("cluster-down"),
        "refusal does not mention cluster-down:\n{}",
        text(&again)
    );

    // Simulated VMs never read their image, so any kernel digest will do.
    let kernel = "0".repeat(64);
    for i in 1..=3 {
        let vm_name = format!("web-{i}");
        cluster.fabricctl(&[
            "vm",
            "create",
            "--name",
            &vm_name,
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--kernel",
            &kernel,
            "--availability-set",
            "web",
        ]);
    }
    let start = Instant::now();
    let vms = loop {
        let vms = cluster.fabricctl(&["vm", "list"]);
        let list = vms.as_array().cloned().unwrap_or_default();
        if list.len() == 3
            && list
                .iter()
                .all(|vm| vm["status"]["phase"].as_str() == Some("running"))
        {
            break list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the 3 VMs are not all running after 30 s: {vms:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let fault_domain_of = |host_id: &str| {
        hosts
            .iter()
            .find(|h| h["id"].as_str() == Some(host_id))
            .and_then(|h| h["fault_domain"].as_u64())
            .unwrap_or_else(|| panic!("VM on unknown host {host_id}"))
    };
    let domains: BTreeSet<u64> = vms
        .iter()
        .map(|vm| fault_domain_of(vm["status"]["host_id"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        domains,
        BTreeSet::from([0, 1, 2]),
        "the availability set is not one VM per fault domain"
    );

    // The daemons run detached, and are what "nothing left" below is about.
    let running = cluster.processes();
    assert_eq!(
        running.len(),
        4,
        "expected the controller and 3 agents: {running:#?}"
    );
    assert_eq!(cluster.namespaces().len(), 4, "{:?}", cluster.namespaces());

    let down = cluster.down();
    assert!(
        down.status.success(),
        "cluster-down failed:\n{}",
        text(&down)
    );
    assert!(
        text(&down).contains("deleting 3 VMs"),
        "cluster-down did not delete the VMs:\n{}",
        text(&down)
    );
    assert_eq!(
        cluster.namespaces(),
        Vec::<String>::new(),
        "namespaces left"
    );
    assert_eq!(cluster.processes(), Vec::new(), "processes left");
    assert_eq!(cluster.cgroups(), Vec::<PathBuf>::new(), "cgroups left");
    assert!(!cluster.state.exists(), "{} left", cluster.state.display());

    // Once more: nothing to do, and it says so.
    let again = cluster.down();
    assert!(
        again.status.success(),
        "second cluster-down:\n{}",
        text(&again)
    );
    assert!(
        text(&again).contains("no network namespaces"),
        "second cluster-down:\n{}",
        text(&again)
    );
}
