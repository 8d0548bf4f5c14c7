//! fabricctl against a live fabric-controller process on a Unix socket: every command runs as
//! the real binary, and its table text, JSON and exit status are checked.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A fabric-controller child with its own socket and data directory, killed on drop (also
/// when a test panics).
struct Controller {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Controller {
    fn start(extra: &[&str]) -> Controller {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("controller.sock");
        let log = std::fs::File::create(dir.path().join("controller.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_fabric-controller"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fabric-controller");
        let controller = Controller { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if controller.socket.exists() && controller.run(&["image", "list"]).status.success() {
                return controller;
            }
            assert!(
                Instant::now() < deadline,
                "the controller did not come up:\n{}",
                controller.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fabricctl"));
        command
            .arg("--controller")
            .arg(self.address())
            .args(args)
            .env_remove("FABRIC_CONTROLLER");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run fabricctl")
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "fabricctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// The JSON document a command prints with `-o json`.
    fn json(&self, args: &[&str]) -> Value {
        let mut with_json = args.to_vec();
        with_json.extend(["-o", "json"]);
        let text = self.ok(&with_json);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// The one-line error of a command that must fail.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "fabricctl {args:?} succeeded");
        assert!(
            output.stdout.is_empty(),
            "{args:?} printed {:?}",
            output.stdout
        );
        assert!(
            stderr.starts_with("fabricctl: ") && stderr.lines().count() == 1,
            "{args:?}: {stderr:?}"
        );
        stderr.trim_end().to_string()
    }

    /// Polls `vm get` until `done` holds for its JSON.
    fn wait_vm(&self, vm: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.json(&["vm", "get", vm]);
            if done(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{vm}: never {what}: {value:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

/// The rows of a table whose first column is `key`, split on whitespace.
fn table_row<'a>(table: &'a str, key: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&key))
        .unwrap_or_else(|| panic!("no row {key} in\n{table}"))
}

fn names(list: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = list
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|vm| vm["spec"]["name"].as_str().expect("a name"))
        .collect();
    names.sort();
    names
}

#[test]
fn images_vms_and_events() {
    let controller = Controller::start(&[]);
    let files = tempfile::tempdir().expect("tempdir");

    // A fake kernel over two chunks: what is stored is what was pushed.
    let kernel = random_bytes((1 << 20) + 4321);
    let kernel_sha = hex::encode(Sha256::digest(&kernel));
    let kernel_path = write(files.path(), "bzImage", &kernel);
    let kernel_arg = kernel_path.to_str().expect("utf-8 path");
    let pushed = controller.json(&[
        "image", "push", kernel_arg, "--name", "tiny", "--role", "kernel",
    ]);
    assert_eq!(pushed["image"]["name"], "tiny");
    assert_eq!(pushed["pushed"][0]["sha256"], kernel_sha.as_str());
    assert_eq!(pushed["pushed"][0]["size_bytes"], kernel.len() as u64);
    assert_eq!(pushed["pushed"][0]["role"], "kernel");
    assert_eq!(pushed["pushed"][0]["already_stored"], false);
    let again = controller.ok(&[
        "image", "push", kernel_arg, "--name", "tiny", "--role", "kernel",
    ]);
    assert!(again.contains("already stored"), "{again}");
    let error = controller.fails(&["image", "push", kernel_arg, "--name", "tiny"]);
    assert!(error.contains("--role"), "{error}");

    let images = controller.json(&["image", "list"]);
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images:#}");
    assert_eq!(images[0]["files"][0]["sha256"], kernel_sha.as_str());
    assert_eq!(images[0]["files"][0]["file_name"], "bzImage");
    let table = controller.ok(&["image", "list"]);
    let row = table_row(&table, "tiny");
    assert_eq!(row[1..3], ["kernel", "bzImage"], "{table}");
    assert!(row.contains(&kernel_sha.as_str()), "{table}");

    // A VM from a YAML spec file, resolving the image name.
    let spec = write(
        files.path(),
        "web.yaml",
        b"name: web\nvcpus: 2\nmemory: {startup_mib: 512, minimum_mib: 256, maximum_mib: 1024}\n\
          image: {name: tiny}\nnics: [{network: default}]\ndisks: [{size_mib: 64}]\n\
          placement: {zone: z1, labels: {app: web}}\nrestart_policy: on-failure\n",
    );
    let web = controller.json(&["vm", "create", "-f", spec.to_str().expect("utf-8 path")]);
    let web_id = web["id"].as_str().expect("an id").to_string();
    assert!(web_id.starts_with("vm-"), "{web:#}");
    assert_eq!(web["spec"]["image"]["kernel_sha256"], kernel_sha.as_str());
    assert_eq!(web["spec"]["memory"]["minimum_mib"], 256);
    assert_eq!(web["spec"]["memory"]["maximum_mib"], 1024);
    assert_eq!(web["spec"]["placement"]["labels"]["app"], "web");
    assert_eq!(web["spec"]["restart_policy"], "on-failure");
    assert_eq!(web["spec"]["disks"][0]["size_mib"], 64);
    assert_eq!(
        web["spec"]["nics"][0]["mac"].as_str().map(str::len),
        Some(17),
        "the controller fills the MAC: {web:#}"
    );
    assert_eq!(web["status"]["desired_state"], "running");
    assert_eq!(web["status"]["phase"], "pending");

    // One from flags, by digest, created stopped; the table shows it.
    let table = controller.ok(&[
        "vm",
        "create",
        "--name",
        "db",
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--kernel",
        &kernel_sha,
        "--nic",
        "default",
        "--label",
        "tier=db",
        "--stopped",
    ]);
    let row = table_row(&table, "ID");
    assert_eq!(
        row,
        ["ID", "NAME", "PROJECT", "PHASE", "HOST", "VCPUS", "MEMORY", "AGE", "REASON"]
    );
    let db_row = table
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(
        db_row[1..7],
        ["db", "default", "stopped", "-", "1", "256MiB"],
        "{table}"
    );

    // Refusals: the gRPC code name and the controller's message, on one line.
    let error = controller.fails(&[
        "vm", "create", "--name", "web", "--vcpus", "1", "--memory", "128", "--image", "tiny",
    ]);
    assert_eq!(
        error,
        r#"fabricctl: ALREADY_EXISTS: a VM named "web" already exists"#
    );
    let zero = write(
        files.path(),
        "zero.yaml",
        b"name: zero\nvcpus: 0\nmemory_mib: 128\nimage: {name: tiny}\n",
    );
    let error = controller.fails(&["vm", "create", "-f", zero.to_str().expect("utf-8")]);
    assert!(
        error.starts_with("fabricctl: INVALID_ARGUMENT: spec.vcpus"),
        "{error}"
    );
    let typo = write(files.path(), "typo.yaml", b"name: typo\ncpus: 2\n");
    let error = controller.fails(&["vm", "create", "-f", typo.to_str().expect("utf-8")]);
    assert!(error.contains("unknown field `cpus`"), "{error}");

    // Without hosts, web stays pending and says why.
    let pending = controller.wait_vm("web", "explained", |vm| {
        vm["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("0/0 hosts"))
    });
    assert_eq!(pending["status"]["phase"], "pending");
    assert_eq!(pending["status"]["host_id"], "");
    let by_id = controller.json(&["vm", "get", &web_id]);
    assert_eq!(by_id["spec"]["name"], "web");
    let details = controller.ok(&["vm", "get", "web"]);
    assert!(
        details.contains(&web_id) && details.contains("0/0 hosts"),
        "{details}"
    );

    // Lists and their filters.
    assert_eq!(names(&controller.json(&["vm", "list"])), ["db", "web"]);
    assert_eq!(
        names(&controller.json(&["vm", "list", "--phase", "stopped"])),
        ["db"]
    );
    assert_eq!(
        names(&controller.json(&["vm", "list", "--name", "web"])),
        ["web"]
    );
    let table = controller.ok(&["vm", "list"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    let row = table_row(&table, &web_id);
    assert_eq!(
        row[1..6],
        ["web", "default", "pending", "-", "2"],
        "{table}"
    );
    assert!(table.contains("0/0 hosts"), "{table}");

    // Desired state both ways, by name and by id.
    let stopped = controller.json(&["vm", "stop", "web"]);
    assert_eq!(stopped["status"]["desired_state"], "stopped");
    let started = controller.json(&["vm", "start", &web_id]);
    assert_eq!(started["status"]["desired_state"], "running");
    assert_eq!(started["generation"], 3);

    // Delete, then both names for it are gone.
    let deleted = controller.json(&["vm", "delete", "web"]);
    assert_eq!(deleted["id"], web_id.as_str());
    assert_eq!(
        controller.fails(&["vm", "get", "web"]),
        r#"fabricctl: NOT_FOUND: no VM named "web""#
    );
    let error = controller.fails(&["vm", "get", &web_id]);
    assert!(error.starts_with("fabricctl: NOT_FOUND: "), "{error}");
    assert_eq!(names(&controller.json(&["vm", "list"])), ["db"]);

    // The event feed tells web's story, in order.
    let events = controller.json(&["events", "--vm", &web_id]);
    let kinds: Vec<&str> = events
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["kind"].as_str().expect("a kind"))
        .collect();
    let position = |kind: &str| {
        kinds
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {kinds:?}"))
    };
    assert_eq!(position("vm_created"), 0, "{kinds:?}");
    assert!(position("vm_unplaceable") < position("vm_desired_state_changed"));
    assert_eq!(kinds.last(), Some(&"vm_deleted"), "{kinds:?}");
    assert!(events
        .as_array()
        .expect("an array")
        .iter()
        .all(|e| e["vm_id"] == web_id.as_str()));
    let table = controller.ok(&["events"]);
    assert_eq!(
        table_row(&table, "SEQ"),
        ["SEQ", "TIME", "KIND", "VM", "HOST", "MESSAGE"]
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("VM_CREATED") && l.contains(&web_id)),
        "{table}"
    );
    assert!(table.contains("VM_DELETED"), "{table}");

    // --follow streams what happens next, one JSON object per line.
    let mut follow = controller
        .command(&["events", "--follow", "-o", "json", "--since", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start events --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // The stream is open once the backlog (db's events, since 0 may replay them) settles;
    // a VM created after that must arrive either way.
    std::thread::sleep(Duration::from_millis(500));
    let late = controller.json(&[
        "vm", "create", "--name", "late", "--vcpus", "1", "--memory", "128", "--image", "tiny",
    ]);
    let late_id = late["id"].as_str().expect("an id").to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .expect("events --follow printed no vm_created for the new VM");
        let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if event["vm_id"] == late_id.as_str() && event["kind"] == "vm_created" {
            break event;
        }
    };
    assert!(seen["sequence"].as_u64().is_some_and(|s| s > 0), "{seen}");
    assert!(
        seen["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{seen}"
    );
    let _ = follow.kill();
    let _ = follow.wait();
}

#[test]
fn hosts_cordon_uncordon_drain() {
    // A long lease: the fake host below never heartbeats.
    let controller = Controller::start(&["--lease-ttl", "120", "--heartbeat-interval", "1"]);
    assert_eq!(controller.json(&["host", "list"]), Value::Array(Vec::new()));
    let table = controller.ok(&["host", "list"]);
    assert_eq!(table.lines().count(), 1, "only the header: {table}");
    assert_eq!(
        table_row(&table, "ID"),
        [
            "ID",
            "NAME",
            "ZONE",
            "FD",
            "UD",
            "STATE",
            "CPUS",
            "MEMORY(MiB)",
            "VMS",
            "HEARTBEAT"
        ]
    );

    let (runtime, mut link) = fake_agent_link(&controller);
    let host_id = register(
        &runtime,
        &mut link,
        fabric_proto::v1::RegisterHostRequest {
            machine_id: "machine-1".into(),
            fault_domain: 3,
            update_domain: 4,
            capacity: Some(resources(32, 65536)),
            allocatable: Some(resources(30, 60000)),
            agent_address: "127.0.0.1:7071".into(),
            ..fake_host("node-1")
        },
    );

    let table = controller.ok(&["host", "list"]);
    let row = table_row(&table, &host_id);
    assert_eq!(
        row[1..9],
        ["node-1", "z1", "3", "4", "ready", "0/30", "0/60000", "0"],
        "{table}"
    );
    let host = controller.json(&["host", "get", "node-1"]);
    assert_eq!(host["id"], host_id.as_str());
    assert_eq!(host["state"], "ready");
    assert_eq!(host["allocatable"]["memory_mib"], 60000);
    assert_eq!(host["capacity"]["cpus"], 32);
    let details = controller.ok(&["host", "get", &host_id]);
    assert!(
        details.contains("node-1") && details.contains("ready"),
        "{details}"
    );
    let error = controller.fails(&["host", "get", "node-9"]);
    assert_eq!(error, r#"fabricctl: NOT_FOUND: no host named "node-9""#);

    // A VM lands on the only host; `vm list --host` finds it by the host's name.
    controller.ok(&[
        "vm",
        "create",
        "--name",
        "app",
        "--vcpus",
        "2",
        "--memory",
        "1024",
        "--kernel",
        &"ab".repeat(32),
    ]);
    controller.wait_vm("app", "placed", |vm| {
        vm["status"]["host_id"] == host_id.as_str()
    });
    assert_eq!(
        names(&controller.json(&["vm", "list", "--host", "node-1"])),
        ["app"]
    );
    let host = controller.json(&["host", "get", "node-1"]);
    assert_eq!(host["allocated"]["cpus"], 2, "{host:#}");
    assert_eq!(host["allocated"]["memory_mib"], 1024, "{host:#}");

    let cordoned = controller.json(&["host", "cordon", "node-1", "--reason", "RMA 1234"]);
    assert_eq!(cordoned["state"], "cordoned");
    assert_eq!(cordoned["cordoned"], true);
    assert_eq!(cordoned["cordon_reason"], "RMA 1234");
    let listed = controller.json(&["host", "list", "--state", "cordoned"]);
    assert_eq!(listed[0]["id"], host_id.as_str());
    assert_eq!(
        controller.json(&["host", "list", "--state", "ready"]),
        Value::Array(Vec::new())
    );

    let uncordoned = controller.json(&["host", "uncordon", &host_id]);
    assert_eq!(uncordoned["state"], "ready");
    assert_eq!(uncordoned["cordoned"], false);
    let table = controller.ok(&["host", "list", "--zone", "z1"]);
    assert_eq!(table_row(&table, &host_id)[5], "ready", "{table}");
    assert_eq!(
        controller.json(&["host", "list", "--zone", "z2"]),
        Value::Array(Vec::new())
    );

    let drained = controller.json(&["host", "drain", "node-1", "--reason", "kernel upgrade"]);
    assert_eq!(drained["state"], "draining");
    assert_eq!(drained["cordoned"], true);
    assert_eq!(drained["cordon_reason"], "kernel upgrade");

    // The host's story is in its events.
    let events = controller.json(&["events", "--host", "node-1"]);
    let mut states: Vec<&str> = events
        .as_array()
        .expect("an array")
        .iter()
        .filter(|e| e["kind"] == "host_state_changed")
        .map(|e| e["host_state"].as_str().expect("a state"))
        .collect();
    // The controller may announce a state more than once (the RPC and the reconciler).
    states.dedup();
    assert!(
        states.ends_with(&["cordoned", "ready", "draining"]),
        "{events:#}"
    );
    assert_eq!(events[0]["kind"], "host_registered", "{events:#}");
}

#[test]
fn an_unreachable_controller_is_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nobody.sock");
    let output = Command::new(env!("CARGO_BIN_EXE_fabricctl"))
        .args(["vm", "list"])
        .env("FABRIC_CONTROLLER", format!("unix:{}", socket.display()))
        .output()
        .expect("run fabricctl");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!(
            "fabricctl: cannot reach the controller at unix:{}",
            socket.display()
        )) && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// A controller for hosts that a test plays itself over HostLink: a long lease (they
/// heartbeat only when told) and no memory relief.
fn controller_for_fake_hosts() -> Controller {
    Controller::start(&[
        "--lease-ttl",
        "120",
        "--heartbeat-interval",
        "1",
        "--memory-relief-window",
        "0",
    ])
}

/// A runtime and a HostLink client to `controller`, to play agents with.
fn fake_agent_link(
    controller: &Controller,
) -> (
    tokio::runtime::Runtime,
    fabric_proto::v1::host_link_client::HostLinkClient<tonic::transport::Channel>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let link = runtime.block_on(async {
        let channel = fabric_controller::cli::connect(&controller.address(), None)
            .await
            .expect("connect");
        fabric_proto::v1::host_link_client::HostLinkClient::new(channel)
    });
    (runtime, link)
}

fn resources(cpus: u32, memory_mib: u64) -> fabric_proto::v1::Resources {
    fabric_proto::v1::Resources {
        cpus,
        memory_mib,
        disk_mib: 0,
    }
}

/// Host `name` of zone z1 (machine `machine-NAME`, 8 CPUs, 8 GiB).
fn fake_host(name: &str) -> fabric_proto::v1::RegisterHostRequest {
    fabric_proto::v1::RegisterHostRequest {
        machine_id: format!("machine-{name}"),
        name: name.into(),
        zone: "z1".into(),
        capacity: Some(resources(8, 8192)),
        allocatable: Some(resources(8, 8192)),
        ..Default::default()
    }
}

/// Registers (again) the host `request` describes; its id.
fn register(
    runtime: &tokio::runtime::Runtime,
    link: &mut fabric_proto::v1::host_link_client::HostLinkClient<tonic::transport::Channel>,
    request: fabric_proto::v1::RegisterHostRequest,
) -> String {
    runtime
        .block_on(link.register_host(request))
        .expect("register")
        .into_inner()
        .host_id
}

/// Registers (again) the host `name` (see [`fake_host`]); its id.
fn register_fake_host(
    runtime: &tokio::runtime::Runtime,
    link: &mut fabric_proto::v1::host_link_client::HostLinkClient<tonic::transport::Channel>,
    name: &str,
) -> String {
    register_fake_host_session(runtime, link, name, 0).0
}

/// [`register_fake_host`] presenting `previous_session` (as an agent restarted on its own data
/// does, so that its new session is not held): the host id and the new session.
fn register_fake_host_session(
    runtime: &tokio::runtime::Runtime,
    link: &mut fabric_proto::v1::host_link_client::HostLinkClient<tonic::transport::Channel>,
    name: &str,
    previous_session: u64,
) -> (String, u64) {
    let response = runtime
        .block_on(link.register_host(fabric_proto::v1::RegisterHostRequest {
            previous_session,
            ..fake_host(name)
        }))
        .expect("register")
        .into_inner();
    (response.host_id, response.session)
}

#[test]
fn top_shows_memory_per_host_and_vm() {
    use fabric_proto::v1::{
        HeartbeatRequest, HostMemoryBalance, HostUsage, MemoryStats, ObservedPhase, ObservedVm,
        VmMemoryBalance,
    };

    // This is about what fabricctl shows: the hosts report only when told, nothing moves.
    let controller = controller_for_fake_hosts();
    let (runtime, mut link) = fake_agent_link(&controller);
    let host_a = register_fake_host(&runtime, &mut link, "node-a");
    let host_b = register_fake_host(&runtime, &mut link, "node-b");

    // Two dynamic-memory VMs; bin-packing puts them on one host.
    for (name, minimum, maximum) in [("small", "256", "1024"), ("big", "512", "2048")] {
        controller.ok(&[
            "vm",
            "create",
            "--name",
            name,
            "--vcpus",
            "1",
            "--memory",
            minimum,
            "--memory-min",
            minimum,
            "--memory-max",
            maximum,
            "--kernel",
            &"ab".repeat(32),
        ]);
    }
    let small = controller.wait_vm("small", "placed", |vm| vm["status"]["host_id"] != "");
    let big = controller.wait_vm("big", "placed", |vm| vm["status"]["host_id"] != "");
    let busy = small["status"]["host_id"]
        .as_str()
        .expect("a host")
        .to_string();
    assert_eq!(big["status"]["host_id"], busy.as_str(), "bin-packed");
    let (busy_name, idle_id, idle_name) = if busy == host_a {
        ("node-a", host_b.clone(), "node-b")
    } else {
        ("node-b", host_a.clone(), "node-a")
    };
    let id = |vm: &Value| vm["id"].as_str().expect("an id").to_string();
    let observed =
        |vm_id: String, target: u64, demand: Option<u64>, balloon: u64, pressured| ObservedVm {
            vm_id,
            phase: ObservedPhase::Running as i32,
            memory: Some(MemoryStats {
                balloon_actual_mib: balloon,
                balloon_target_mib: balloon,
                ..Default::default()
            }),
            memory_balance: Some(VmMemoryBalance {
                target_mib: target,
                demand_mib: demand,
                reason: if pressured {
                    "pressure: major faults".into()
                } else {
                    "host short: shared by weight".into()
                },
                pressured,
            }),
            ..Default::default()
        };
    let heartbeat = |link: &mut fabric_proto::v1::host_link_client::HostLinkClient<_>,
                     short: bool| {
        runtime
            .block_on(link.heartbeat(HeartbeatRequest {
                host_id: busy.clone(),
                usage: Some(HostUsage {
                    running_vms: 2,
                    memory_balance: Some(HostMemoryBalance {
                        budget_mib: 1536,
                        demand_mib: 1300,
                        wanted_mib: if short { 1700 } else { 1500 },
                        assigned_mib: 1536,
                        minimum_mib: 768,
                        short,
                        pressured_vms: 1,
                    }),
                    ..Default::default()
                }),
                vms: vec![
                    observed(id(&small), 480, Some(400), 544, false),
                    observed(id(&big), 1056, Some(900), 992, true),
                ],
                ..Default::default()
            }))
            .expect("heartbeat");
    };
    heartbeat(&mut link, true);

    let text = controller.ok(&["top"]);
    println!("{text}");
    let mut blocks = text.split("\n\n");
    let hosts = blocks.next().expect("the hosts table");
    let vms = blocks.next().expect("the VMs table");
    assert_eq!(
        table_row(hosts, "HOST"),
        [
            "HOST",
            "STATE",
            "BUDGET(MiB)",
            "ASSIGNED",
            "WANTED",
            "DEMAND",
            "SHORT",
            "PRESSURED"
        ]
    );
    assert_eq!(
        table_row(hosts, busy_name)[1..],
        ["ready", "1536", "1536", "1700", "1300", "yes", "1"],
        "{text}"
    );
    assert_eq!(
        table_row(hosts, idle_name)[1..],
        ["ready", "-", "-", "-", "-", "-", "-"],
        "a host without a balance: {text}"
    );
    assert_eq!(
        table_row(vms, "VM"),
        [
            "VM",
            "HOST",
            "MIN-MAX(MiB)",
            "TARGET",
            "DEMAND",
            "BALLOON",
            "PRESSURE",
            "REASON"
        ]
    );
    // VMs by host, then name: big before small.
    let vm_rows: Vec<&str> = vms.lines().skip(1).collect();
    assert_eq!(vm_rows.len(), 2, "{text}");
    assert!(vm_rows[0].starts_with("big "), "{text}");
    assert_eq!(
        table_row(vms, "big")[1..],
        [
            busy_name,
            "512-2048",
            "1056",
            "900",
            "992",
            "yes",
            "pressure:",
            "major",
            "faults"
        ],
        "{text}"
    );
    assert_eq!(
        table_row(vms, "small")[1..7],
        [busy_name, "256-1024", "480", "400", "544", "no"],
        "{text}"
    );

    let top = controller.json(&["top"]);
    let json_hosts = top["hosts"].as_array().expect("hosts");
    assert_eq!(json_hosts.len(), 2, "{top:#}");
    let busy_json = json_hosts
        .iter()
        .find(|h| h["id"] == busy.as_str())
        .expect("the busy host");
    assert_eq!(busy_json["name"], busy_name);
    assert_eq!(busy_json["memory_balance"]["budget_mib"], 1536);
    assert_eq!(busy_json["memory_balance"]["wanted_mib"], 1700);
    assert_eq!(busy_json["memory_balance"]["short"], true);
    assert_eq!(busy_json["memory_balance"]["pressured_vms"], 1);
    let idle_json = json_hosts
        .iter()
        .find(|h| h["id"] == idle_id.as_str())
        .expect("the idle host");
    assert_eq!(idle_json["memory_balance"], Value::Null);
    let small_json = top["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["name"] == "small")
        .expect("small");
    assert_eq!(small_json["host"], busy_name);
    assert_eq!(small_json["host_id"], busy.as_str());
    assert_eq!(small_json["minimum_mib"], 256);
    assert_eq!(small_json["maximum_mib"], 1024);
    assert_eq!(small_json["memory_balance"]["target_mib"], 480);
    assert_eq!(small_json["memory_balance"]["demand_mib"], 400);
    assert_eq!(small_json["memory_balance"]["pressured"], false);
    assert_eq!(small_json["balloon_actual_mib"], 544);

    // --host: that host and its VMs only.
    let only_idle = controller.json(&["top", "--host", idle_name]);
    assert_eq!(only_idle["hosts"].as_array().map(Vec::len), Some(1));
    assert_eq!(only_idle["vms"], Value::Array(Vec::new()), "{only_idle:#}");
    let only_busy = controller.ok(&["top", "--host", busy_name]);
    assert!(
        !only_busy.contains(idle_name) && only_busy.contains("small"),
        "{only_busy}"
    );
    let error = controller.fails(&["top", "--host", "node-z"]);
    assert_eq!(error, r#"fabricctl: NOT_FOUND: no host named "node-z""#);

    // The host's memory story is in its events: short, then fits again, with the figures.
    // Fitting again counts once three heartbeats in a row over two intervals (1 s here) say
    // so: one report is not enough.
    let memory_events = || {
        let events = controller.json(&["events", "--host", busy_name]);
        let memory: Vec<(String, String)> = events
            .as_array()
            .expect("an array")
            .iter()
            .filter(|e| e["kind"] == "host_memory")
            .map(|e| {
                (
                    e["reason"].as_str().expect("a reason").to_string(),
                    e["message"].as_str().expect("a message").to_string(),
                )
            })
            .collect();
        (events, memory)
    };
    heartbeat(&mut link, false);
    let (events, memory) = memory_events();
    assert_eq!(memory.len(), 1, "fits after one report: {events:#}");
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1000));
        heartbeat(&mut link, false);
    }
    let (events, memory) = memory_events();
    assert_eq!(memory.len(), 2, "{events:#}");
    assert_eq!(memory[0].0, "MemoryShort");
    assert!(
        memory[0].1.contains(busy_name)
            && memory[0].1.contains("want 1700 MiB of a 1536 MiB budget"),
        "{}",
        memory[0].1
    );
    assert_eq!(memory[1].0, "MemoryFits");
    assert!(memory[1].1.contains("want 1500 MiB"), "{}", memory[1].1);
    let details = controller.ok(&["host", "get", busy_name]);
    assert!(
        details.contains("budget 1536 MiB, wanted 1500 MiB") && details.contains("fits"),
        "{details}"
    );
}

/// An agent that restarts while one of its VMs is being stopped for a move (here a drain;
/// memory relief takes the same path) must not have that VM placed elsewhere before it has
/// reported it stopped: the restarted agent re-adopts the still running VMM, and the stop it
/// acknowledged before the restart says nothing about what the new session has seen. Only
/// once the new session has acknowledged the stop and reports the VM stopped does it move.
#[test]
fn a_vm_stopping_for_a_drain_stays_put_when_its_agent_registers_again() {
    use fabric_proto::v1::host_link_client::HostLinkClient;
    use fabric_proto::v1::{
        AssignmentUpdate, DesiredState, HeartbeatRequest, ObservedPhase, ObservedVm,
        WatchAssignmentsRequest,
    };

    let controller = controller_for_fake_hosts();
    let (runtime, mut link) = fake_agent_link(&controller);
    let (source, session) = register_fake_host_session(&runtime, &mut link, "node-a", 0);
    register_fake_host(&runtime, &mut link, "node-b");
    controller.ok(&["host", "cordon", "node-b"]);
    controller.ok(&[
        "vm",
        "create",
        "--name",
        "mover",
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--kernel",
        &"ab".repeat(32),
    ]);
    let vm = controller.wait_vm("mover", "placed on node-a", |vm| {
        vm["status"]["host_id"] == source.as_str()
    });
    let vm_id = vm["id"].as_str().expect("an id").to_string();

    // The agent's session: its assignments, up to the one that says how `vm_id` should be.
    let watch = |link: &mut HostLinkClient<_>| {
        runtime
            .block_on(link.watch_assignments(WatchAssignmentsRequest {
                host_id: source.clone(),
                session: 0,
            }))
            .expect("watch")
            .into_inner()
    };
    let next_for = |stream: &mut tonic::Streaming<AssignmentUpdate>, desired: DesiredState| {
        runtime.block_on(async {
            loop {
                let update = tokio::time::timeout(Duration::from_secs(20), stream.message())
                    .await
                    .expect("an assignment update in time")
                    .expect("the stream")
                    .expect("an update");
                let wanted = update
                    .upserts
                    .iter()
                    .any(|a| a.vm_id == vm_id && a.desired_state() == desired);
                if wanted {
                    return update.generation;
                }
            }
        })
    };
    let heartbeat = |link: &mut HostLinkClient<_>, phase: ObservedPhase, acked: u64| {
        runtime
            .block_on(link.heartbeat(HeartbeatRequest {
                host_id: source.clone(),
                vms: vec![ObservedVm {
                    vm_id: vm_id.clone(),
                    phase: phase as i32,
                    generation: vm["generation"].as_u64().unwrap_or(0),
                    ..Default::default()
                }],
                assignments_generation: acked,
                ..Default::default()
            }))
            .expect("heartbeat");
    };
    let host_of = || {
        let vm = controller.json(&["vm", "get", "mover"]);
        vm["status"]["host_id"].as_str().unwrap_or("").to_string()
    };

    let mut stream = watch(&mut link);
    let running_at = next_for(&mut stream, DesiredState::Running);
    heartbeat(&mut link, ObservedPhase::Running, running_at);

    // Drain node-a: the agent acknowledges the stop; the guest takes its time to shut down.
    controller.ok(&["host", "uncordon", "node-b"]);
    controller.ok(&["host", "drain", "node-a"]);
    let stop_at = next_for(&mut stream, DesiredState::Stopped);
    heartbeat(&mut link, ObservedPhase::Stopping, stop_at);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(host_of(), source, "moved while still stopping");

    // The agent restarts: a new registration continuing its session (so not held), the VMM
    // still running (it re-adopts it).
    drop(stream);
    register_fake_host_session(&runtime, &mut link, "node-a", session);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        host_of(),
        source,
        "moved before the restarted agent said anything about it:\n{}",
        controller.log()
    );

    // The new session: the stop again, acknowledged, and the VM reported stopped: now it
    // moves to node-b.
    let mut stream = watch(&mut link);
    let stop_again_at = next_for(&mut stream, DesiredState::Stopped);
    heartbeat(&mut link, ObservedPhase::Stopped, stop_again_at);
    controller.wait_vm("mover", "moved to node-b", |vm| {
        let host = vm["status"]["host_id"].as_str().unwrap_or("");
        !host.is_empty() && host != source
    });
}

/// One agent session per host. A second registration of a machine (another agent with the
/// same machine id) supersedes the first session: that session's heartbeats and assignment
/// streams are refused, marked `fabric-session: superseded`; the new session gets no
/// assignments while the old lease may be live. A registration that continues the current
/// session (an agent restarted on its own data) gets them at once.
#[test]
fn a_second_registration_of_a_machine_supersedes_the_first_session() {
    use fabric_proto::v1::host_link_client::HostLinkClient;
    use fabric_proto::v1::{HeartbeatRequest, WatchAssignmentsRequest};

    let controller = controller_for_fake_hosts();
    let (runtime, mut link) = fake_agent_link(&controller);
    let (host, first) = register_fake_host_session(&runtime, &mut link, "node-a", 0);
    let (again, second) = register_fake_host_session(&runtime, &mut link, "node-a", 0);
    assert_eq!(again, host, "one machine, one host");
    assert!(second > first, "sessions grow: {first} then {second}");

    let superseded = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get(fabric_proto::SESSION_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("superseded"),
            "{status:?}"
        );
    };
    let heartbeat = |link: &mut HostLinkClient<_>, session: u64| {
        runtime.block_on(link.heartbeat(HeartbeatRequest {
            host_id: host.clone(),
            session,
            ..Default::default()
        }))
    };
    superseded(heartbeat(&mut link, first).expect_err("the old session's heartbeat"));
    heartbeat(&mut link, second).expect("the current session's heartbeat");

    let first_message_within = |link: &mut HostLinkClient<_>, host_id: &str, session: u64| {
        runtime.block_on(async {
            let mut stream = link
                .watch_assignments(WatchAssignmentsRequest {
                    host_id: host_id.to_string(),
                    session,
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>(
                tokio::time::timeout(Duration::from_secs(1), stream.message())
                    .await
                    .is_ok(),
            )
        })
    };
    superseded(first_message_within(&mut link, &host, first).expect_err("the old session's watch"));
    assert!(
        !first_message_within(&mut link, &host, second).expect("watch"),
        "the new session got its assignments while the old lease may be live"
    );

    // An agent restarted on its own data continues its session: not held.
    let (other, session) = register_fake_host_session(&runtime, &mut link, "node-b", 0);
    let (_, continued) = register_fake_host_session(&runtime, &mut link, "node-b", session);
    assert!(
        first_message_within(&mut link, &other, continued).expect("watch"),
        "a continued session was held"
    );
}
