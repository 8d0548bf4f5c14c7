//! The KVM backend: every VM is a `fabric-vmm` process, started in its own session (so
//! signals aimed at the agent never reach it) and its own cgroup, with its files in the VM's
//! directory. The agent is not needed for the VM to keep running: it watches the process
//! through a pidfd and talks to it over its control socket, both of which a restarted agent
//! can open again.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fabric_proto::v1::vmm_client::VmmClient;
use fabric_proto::v1::{
    GetMemoryStatsRequest, GetStateRequest, SetBalloonTargetRequest, ShutdownRequest, VmSpec,
    VmmState,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use tonic::transport::Channel;

use super::backend::{Balloon, Exit, Hypervisor, Instance, Probe, StartRequest};
use super::cgroup::{Cgroups, Limits};
use super::config::Config;
use super::images::{check_sha256, ImageCache};
use super::network::{self, Subnet};
use super::process::{self, PidFd};
use super::record::VmRecord;

/// The kernel command line every VM starts with; `root=`, `ip=` and the spec's own
/// parameters follow (the kernel takes the last of a repeated parameter).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";
/// Largest VM the agent accepts (a sanity bound on controller input).
const MAX_VCPUS: u32 = 254;
const MAX_MEMORY_MIB: u64 = 4 << 20;
/// File names in a VM's directory.
pub const CONTROL_SOCKET: &str = "control.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
const ROOTFS_FILE: &str = "rootfs.img";
/// The lease file in the data directory.
pub const LEASE_FILE: &str = "lease.json";

/// The KVM backend.
pub struct Kvm {
    vmm_binary: PathBuf,
    images: Arc<ImageCache>,
    cgroups: Cgroups,
    bridge: String,
    network: String,
    subnet: Subnet,
    /// VM addresses in use on this host.
    ips: Mutex<BTreeSet<Ipv4Addr>>,
    bridge_ready: tokio::sync::Mutex<bool>,
    /// The host's lease, which each fabric-vmm enforces on its own.
    lease_file: PathBuf,
}

impl Kvm {
    pub fn new(config: &Config, images: Arc<ImageCache>) -> Kvm {
        Kvm {
            vmm_binary: config.vmm_binary.clone(),
            images,
            cgroups: Cgroups::new(&config.cgroup_parent),
            bridge: config.bridge.clone(),
            network: config.network.clone(),
            subnet: config.vm_subnet,
            ips: Mutex::new(BTreeSet::new()),
            bridge_ready: tokio::sync::Mutex::new(false),
            lease_file: config.data_dir.join(LEASE_FILE),
        }
    }

    fn ips(&self) -> std::sync::MutexGuard<'_, BTreeSet<Ipv4Addr>> {
        self.ips.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's address: the one it had, or the lowest free one.
    fn address_for(&self, record: &mut VmRecord) -> Result<Ipv4Addr, String> {
        let mut ips = self.ips();
        if let Some(ip) = record.ip.filter(|ip| self.subnet.contains(*ip)) {
            ips.insert(ip);
            return Ok(ip);
        }
        let ip = self
            .subnet
            .allocate(&ips)
            .ok_or_else(|| format!("no free address left in {}", self.subnet))?;
        ips.insert(ip);
        record.ip = Some(ip);
        Ok(ip)
    }

    async fn ensure_bridge(&self) -> Result<(), String> {
        let mut ready = self.bridge_ready.lock().await;
        if !*ready || !network::interface_exists(&self.bridge) {
            network::ensure_bridge(&self.bridge, &self.subnet)
                .await
                .map_err(|e| e.to_string())?;
            *ready = true;
        }
        Ok(())
    }

    async fn prepare_and_spawn(
        &self,
        request: StartRequest<'_>,
    ) -> Result<Box<dyn Instance>, String> {
        let StartRequest {
            spec,
            dir,
            record,
            progress,
            proceed,
        } = request;
        check_spec(spec, &self.network)?;
        let memory = spec.memory.unwrap_or_default();
        let max_mib = effective_max(&memory);
        let image = spec.image.clone().unwrap_or_default();

        progress("pulling kernel");
        let kernel = self.images.ensure(&image.kernel_sha256).await?;
        let initrd = if image.initramfs_sha256.is_empty() {
            None
        } else {
            progress("pulling initramfs");
            Some(self.images.ensure(&image.initramfs_sha256).await?)
        };
        let mut disks: Vec<(PathBuf, bool)> = Vec::new();
        if !image.rootfs_sha256.is_empty() {
            progress("pulling rootfs");
            let cached = self.images.ensure(&image.rootfs_sha256).await?;
            let path = dir.join(ROOTFS_FILE);
            if !path.exists() {
                progress("copying rootfs");
                let (src, dst) = (cached.clone(), path.clone());
                tokio::task::spawn_blocking(move || super::disk::copy_image(&src, &dst))
                    .await
                    .map_err(|e| format!("disk copy task: {e}"))??;
            }
            disks.push((path, false));
        }
        for (index, disk) in spec.disks.iter().enumerate() {
            use fabric_proto::v1::disk_spec::Source;
            let path = dir.join(format!("disk-{index}.img"));
            match &disk.source {
                Some(Source::ImageSha256(digest)) => {
                    progress(&format!("pulling disk {index}"));
                    let cached = self.images.ensure(digest).await?;
                    if !path.exists() {
                        let (src, dst) = (cached.clone(), path.clone());
                        tokio::task::spawn_blocking(move || super::disk::copy_image(&src, &dst))
                            .await
                            .map_err(|e| format!("disk copy task: {e}"))??;
                    }
                }
                Some(Source::SizeMib(size)) => super::disk::create_sparse(&path, *size)?,
                None => return Err(format!("disk {index}: no source (image or size)")),
            }
            disks.push((path, disk.read_only));
        }

        let mut cmdline = BASE_CMDLINE.to_string();
        if !image.rootfs_sha256.is_empty() {
            cmdline.push_str(" root=/dev/vda rw");
        }
        let mut nets = Vec::new();
        if !spec.nics.is_empty() {
            progress("setting up network");
            self.ensure_bridge().await?;
            let ip = self.address_for(record)?;
            cmdline.push_str(&format!(
                " ip={ip}::{}:{}::eth0:off",
                self.subnet.gateway(),
                self.subnet.netmask()
            ));
            for (index, nic) in spec.nics.iter().enumerate() {
                let tap = network::tap_name(&record.vm_id, index);
                let ours = record.taps.contains(&tap);
                network::create_tap(&tap, &self.bridge, ours)
                    .await
                    .map_err(|e| e.to_string())?;
                if !ours {
                    // Saved at once: an agent killed before the VM's record is saved again
                    // would otherwise find its own tap "taken" at every start after.
                    record.taps.push(tap.clone());
                    record.save(&dir)?;
                }
                let mac = if nic.mac.is_empty() {
                    network::default_mac(&record.vm_id, index)
                } else {
                    nic.mac.clone()
                };
                nets.push(format!("tap={tap},mac={mac}"));
            }
        }
        if !spec.kernel_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.kernel_cmdline);
        }

        progress("creating cgroup");
        let cgroup = self.cgroups.create(
            &record.vm_id,
            Limits {
                memory_mib: max_mib,
                vcpus: spec.vcpus,
            },
        )?;
        let join_fds = cgroup.join_fds()?;
        // One VMM per VM: whatever still runs in the VM's cgroup (a VMM that an earlier agent
        // started without recording it, and that adoption did not take) ends first.
        self.kill_cgroup(&record.vm_id).await?;

        let socket = dir.join(CONTROL_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let mut args: Vec<OsString> = vec![
            "--kernel".into(),
            kernel.into(),
            "--cmdline".into(),
            cmdline.into(),
            "--vcpus".into(),
            spec.vcpus.to_string().into(),
            "--memory".into(),
            max_mib.to_string().into(),
            "--console".into(),
            dir.join(CONSOLE_LOG).into(),
            "--control-socket".into(),
            socket.clone().into(),
            "--vm-id".into(),
            record.vm_id.clone().into(),
            "--lease-file".into(),
            self.lease_file.clone().into(),
            "--rng".into(),
            "--balloon".into(),
            "deflate-on-oom=on,free-page-reporting=on,stats-period=1".into(),
        ];
        if let Some(initrd) = initrd {
            args.push("--initrd".into());
            args.push(initrd.into());
        }
        for (path, read_only) in &disks {
            let mut arg: OsString = "--disk=".into();
            arg.push(path);
            if *read_only {
                arg.push(",ro");
            }
            args.push(arg);
        }
        for net in nets {
            args.push(format!("--net={net}").into());
        }

        progress("starting fabric-vmm");
        let log_path = dir.join(VMM_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut command = Command::new(&self.vmm_binary);
        command
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let raw_fds: Vec<i32> = join_fds.iter().map(|fd| fd.as_raw_fd()).collect();
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe calls (setsid, setrlimit, write; nix's wrappers add no allocation,
        // and its errors convert to io::Error without one) on file descriptors opened before
        // the fork and still open in the child, which `borrow_raw` requires.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid()?;
                // No core dump: it would hold the guest's memory, written into the VM's
                // directory (uncounted host disk, and the guest's data where it does not
                // belong).
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)?;
                for &fd in &raw_fds {
                    if nix::unistd::write(BorrowedFd::borrow_raw(fd), b"0")? != 1 {
                        return Err(std::io::ErrorKind::WriteZero.into());
                    }
                }
                Ok(())
            });
        }
        // The intent, durable before the spawn: an agent killed between the spawn and the
        // record of the pid leaves a VMM that its successor must find (in the VM's cgroup).
        record.spawning = true;
        record.pid = None;
        record.pid_start_ticks = None;
        record
            .save(&dir)
            .map_err(|e| format!("cannot record the start before it: {e}"))?;
        // The last look before the spawn: the start may have been decided long ago.
        if let Err(why) = proceed() {
            record.spawning = false;
            let _ = record.save(&dir);
            return Err(why);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vmm_binary.display()))?;
        drop(join_fds);
        let pid = child.id();
        crate::testhook::kill_point("after-spawn");
        // The pidfd takes over watching and reaping; std's Child is not waited on.
        drop(child);
        let pidfd = PidFd::open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let started_at = fabric_proto::clock::now();
        record.pid = Some(pid);
        record.pid_start_ticks = process::start_ticks(pid);
        record.started_at_ms = Some(process::unix_ms(started_at));
        record.spawning = false;
        if let Err(err) = record.save(&dir) {
            // The VMM runs and is found again by its cgroup if the agent dies now.
            tracing::error!(vm = %record.vm_id, error = %err, "cannot save the VM record");
        }
        let balloon_mib = max_mib.saturating_sub(effective_startup(&memory));
        Ok(Box::new(KvmInstance {
            pidfd,
            started_at,
            balloon: Arc::new(KvmBalloon::new(socket.clone())),
            socket,
            log: log_path,
            exit: None,
            client: None,
            initial_balloon_mib: (balloon_mib > 0).then_some(balloon_mib),
        }))
    }
}

impl Kvm {
    /// SIGKILLs every process in the VM's cgroup and waits (up to 5 s) until it is empty.
    async fn kill_cgroup(&self, vm_id: &str) -> Result<(), String> {
        let strays = self.cgroups.procs(vm_id);
        if strays.is_empty() {
            return Ok(());
        }
        tracing::warn!(vm = %vm_id, pids = ?strays, "processes of the VM still run in its cgroup: killing them before the start");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.cgroups.procs(vm_id);
            if left.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "processes {left:?} of the VM still run in its cgroup and do not end"
                ));
            }
            for pid in left {
                if let Ok(fd) = PidFd::open(pid) {
                    let _ = fd.signal(nix::sys::signal::Signal::SIGKILL);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn effective_startup(memory: &fabric_proto::v1::MemorySpec) -> u64 {
    memory.startup_mib
}

fn effective_max(memory: &fabric_proto::v1::MemorySpec) -> u64 {
    if memory.maximum_mib == 0 {
        memory.startup_mib
    } else {
        memory.maximum_mib
    }
}

/// Checks what the KVM backend needs from a spec, with a message naming the field.
pub fn check_spec(spec: &VmSpec, network: &str) -> Result<(), String> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(format!("vcpus {}: must be 1..={MAX_VCPUS}", spec.vcpus));
    }
    let memory = spec.memory.unwrap_or_default();
    let max = effective_max(&memory);
    let min = if memory.minimum_mib == 0 {
        memory.startup_mib
    } else {
        memory.minimum_mib
    };
    if memory.startup_mib == 0
        || max > MAX_MEMORY_MIB
        || min > memory.startup_mib
        || memory.startup_mib > max
    {
        return Err(format!(
            "memory startup {} / minimum {} / maximum {} MiB: need 0 < minimum <= startup <= maximum <= {MAX_MEMORY_MIB}",
            memory.startup_mib, memory.minimum_mib, memory.maximum_mib
        ));
    }
    let image = spec.image.clone().unwrap_or_default();
    if image.kernel_sha256.is_empty() {
        return Err("image: no kernel digest".to_string());
    }
    for digest in [
        &image.kernel_sha256,
        &image.initramfs_sha256,
        &image.rootfs_sha256,
    ] {
        if !digest.is_empty() {
            check_sha256(digest).map_err(|e| format!("image: {e}"))?;
        }
    }
    if spec.nics.len() > network::MAX_NICS {
        return Err(format!(
            "{} NICs: at most {}",
            spec.nics.len(),
            network::MAX_NICS
        ));
    }
    for (index, nic) in spec.nics.iter().enumerate() {
        if nic.network != network {
            return Err(format!(
                "nic {index}: network {:?} is not on this host (it serves {network:?})",
                nic.network
            ));
        }
        if !nic.mac.is_empty() {
            network::check_mac(&nic.mac).map_err(|e| format!("nic {index}: {e}"))?;
        }
    }
    if spec.kernel_cmdline.contains(['\0', '\n']) {
        return Err("kernel_cmdline: contains a NUL or newline".to_string());
    }
    Ok(())
}

impl Hypervisor for Kvm {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn start<'a>(
        &'a self,
        request: StartRequest<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, String>> {
        self.prepare_and_spawn(request).boxed()
    }

    fn adopt(&self, record: &mut VmRecord, dir: &Path) -> Option<Box<dyn Instance>> {
        if let Some(ip) = record.ip {
            self.ips().insert(ip);
        }
        let socket = dir.join(CONTROL_SOCKET);
        let socket_arg = socket.display().to_string();
        // A VMM of this VM: in its cgroup (or recorded), and started for its control socket.
        let vmm_of_vm = |pid: u32| process::cmdline(pid).is_some_and(|c| c.contains(&socket_arg));
        let recorded = record
            .pid
            .zip(record.pid_start_ticks)
            .filter(|&(pid, ticks)| process::start_ticks(pid) == Some(ticks) && vmm_of_vm(pid));
        // The recorded VMM first; else one the previous agent started but did not record.
        let in_cgroup = self.cgroups.procs(&record.vm_id);
        let mut candidates: Vec<(u32, Option<u64>)> = recorded
            .map(|(pid, ticks)| (pid, Some(ticks)))
            .into_iter()
            .collect();
        candidates.extend(
            in_cgroup
                .iter()
                .filter(|&&pid| Some(pid) != record.pid && vmm_of_vm(pid))
                .map(|&pid| (pid, process::start_ticks(pid))),
        );
        record.spawning = false;
        let mut adopted: Option<(PidFd, u64)> = None;
        for (pid, ticks) in candidates {
            let Some(ticks) = ticks else { continue };
            let Ok(pidfd) = PidFd::open(pid) else {
                continue;
            };
            // The pid could have been reused between the check and the open: check again now
            // that the pidfd pins the process.
            if process::start_ticks(pid) != Some(ticks) || !vmm_of_vm(pid) || pidfd.has_exited() {
                continue;
            }
            adopted = Some((pidfd, ticks));
            break;
        }
        // Anything else in the VM's cgroup is a second VMM of the VM (or a child that had not
        // yet become one when its agent died): it ends, one VMM per VM.
        let keep = adopted.as_ref().map(|(fd, _)| fd.pid());
        for pid in in_cgroup.into_iter().filter(|&pid| Some(pid) != keep) {
            tracing::warn!(vm = %record.vm_id, pid, "killing a second process of the VM found in its cgroup");
            if let Ok(fd) = PidFd::open(pid) {
                let _ = fd.signal(nix::sys::signal::Signal::SIGKILL);
            }
        }
        let Some((pidfd, ticks)) = adopted else {
            record.pid = None;
            record.pid_start_ticks = None;
            return None;
        };
        let pid = pidfd.pid();
        if record.pid != Some(pid) {
            tracing::warn!(vm = %record.vm_id, pid, "found a VMM the previous agent started but did not record: adopting it");
            record.pid = Some(pid);
            record.pid_start_ticks = Some(ticks);
            record.started_at_ms = process::start_time(pid).map(process::unix_ms);
        }
        let started_at = record
            .started_at_ms
            .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .or_else(|| process::start_time(pid))
            .unwrap_or_else(SystemTime::now);
        Some(Box::new(KvmInstance {
            pidfd,
            started_at,
            balloon: Arc::new(KvmBalloon::new(socket.clone())),
            socket,
            log: dir.join(VMM_LOG),
            exit: None,
            client: None,
            initial_balloon_mib: None,
        }))
    }

    fn kill_all(&self, vm_id: &str) -> BoxFuture<'_, Result<(), String>> {
        let vm_id = vm_id.to_string();
        async move { self.kill_cgroup(&vm_id).await }.boxed()
    }

    fn cleanup<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), String>> {
        async move {
            let mut errors = Vec::new();
            for tap in &record.taps {
                if let Err(e) = network::delete_tap(tap).await {
                    errors.push(e.to_string());
                }
            }
            if let Err(e) = self.cgroups.remove(&record.vm_id).await {
                errors.push(e);
            }
            if let Some(ip) = record.ip {
                self.ips().remove(&ip);
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        }
        .boxed()
    }
}

/// One fabric-vmm process.
struct KvmInstance {
    pidfd: PidFd,
    started_at: SystemTime,
    socket: PathBuf,
    log: PathBuf,
    exit: Option<Exit>,
    client: Option<VmmClient<Channel>>,
    /// Balloon target to set once the VMM answers (memory maximum above startup).
    initial_balloon_mib: Option<u64>,
    /// The memory balancer's way to the VMM's balloon (its own connection).
    balloon: Arc<KvmBalloon>,
}

/// Sets a fabric-vmm's balloon target over its control socket. It keeps one connection,
/// opened at the first request and again after a failure (a restarted VMM has a new socket
/// at the same path), apart from the instance's own (probes, shutdown) so that the balancer
/// never waits behind a slow probe.
struct KvmBalloon {
    socket: PathBuf,
    client: tokio::sync::Mutex<Option<VmmClient<Channel>>>,
}

/// How long a balloon request (connect and call) may take.
const BALLOON_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl KvmBalloon {
    fn new(socket: PathBuf) -> KvmBalloon {
        KvmBalloon {
            socket,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn send(&self, balloon_target_mib: u64) -> Result<(), String> {
        let mut client = self.client.lock().await;
        let sent = async {
            if client.is_none() {
                let connected = fabric_vmm_api::client::connect(&self.socket)
                    .await
                    .map_err(|e| format!("control socket {}: {e}", self.socket.display()))?;
                *client = Some(connected);
            }
            let connected = client
                .as_mut()
                .ok_or_else(|| "control socket: not connected".to_string())?;
            connected
                .set_balloon_target(SetBalloonTargetRequest { balloon_target_mib })
                .await
                .map_err(|s| format!("SetBalloonTarget: {}", s.message()))?;
            Ok::<(), String>(())
        };
        let result = match tokio::time::timeout(BALLOON_REQUEST_TIMEOUT, sent).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "SetBalloonTarget: no answer within {BALLOON_REQUEST_TIMEOUT:?}"
            )),
        };
        if result.is_err() {
            // The next request connects again.
            *client = None;
        }
        result
    }
}

impl std::fmt::Debug for KvmBalloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmBalloon")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Balloon for KvmBalloon {
    fn set_target(&self, balloon_target_mib: u64) -> BoxFuture<'_, Result<(), String>> {
        self.send(balloon_target_mib).boxed()
    }
}

impl KvmInstance {
    async fn wait_exit(&mut self) -> Exit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        self.pidfd.wait().await;
        let exit = match self.pidfd.reap() {
            Some((true, description)) => Exit {
                clean: true,
                description: format!("fabric-vmm {description}"),
            },
            Some((false, description)) => Exit {
                clean: false,
                description: with_log_tail(format!("fabric-vmm {description}"), &self.log),
            },
            None => Exit {
                clean: false,
                description: with_log_tail(
                    "fabric-vmm exited (started by an earlier agent: exit status unknown)"
                        .to_string(),
                    &self.log,
                ),
            },
        };
        self.exit = Some(exit.clone());
        exit
    }

    async fn client(&mut self) -> Result<&mut VmmClient<Channel>, String> {
        if self.client.is_none() {
            let client = tokio::time::timeout(
                Duration::from_secs(2),
                fabric_vmm_api::client::connect(&self.socket),
            )
            .await
            .map_err(|_| "control socket: connect timed out".to_string())?
            .map_err(|e| format!("control socket: {e}"))?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "control socket: not connected".to_string())
    }

    async fn shutdown(&mut self, timeout: Duration) -> Exit {
        if self.pidfd.has_exited() {
            return self.wait_exit().await;
        }
        let graceful = async {
            let client = self.client().await?;
            client
                .shutdown(ShutdownRequest {
                    timeout: Some(prost_types::Duration {
                        seconds: timeout.as_secs() as i64,
                        nanos: timeout.subsec_nanos() as i32,
                    }),
                })
                .await
                .map_err(|s| format!("Shutdown: {}", s.message()))?;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(timeout + Duration::from_secs(5), graceful).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(pid = self.pidfd.pid(), error = %e, "graceful shutdown failed; killing")
            }
            Err(_) => tracing::warn!(
                pid = self.pidfd.pid(),
                "graceful shutdown timed out; killing"
            ),
        }
        if tokio::time::timeout(Duration::from_secs(5), self.pidfd.wait())
            .await
            .is_err()
        {
            if let Err(e) = self.pidfd.signal(nix::sys::signal::Signal::SIGKILL) {
                tracing::warn!(pid = self.pidfd.pid(), error = %e, "cannot kill fabric-vmm");
            }
        }
        let mut exit = self.wait_exit().await;
        // Ending by request is clean whatever the process's status.
        exit.clean = true;
        exit
    }

    async fn do_probe(&mut self) -> Probe {
        if self.pidfd.has_exited() {
            return Probe::default();
        }
        let state = async {
            let client = self.client().await?;
            let state =
                tokio::time::timeout(Duration::from_secs(2), client.get_state(GetStateRequest {}))
                    .await
                    .map_err(|_| "GetState timed out".to_string())?
                    .map_err(|s| format!("GetState: {}", s.message()))?
                    .into_inner();
            Ok::<_, String>(state)
        }
        .await;
        let state = match state {
            Ok(state) => state,
            Err(err) => {
                self.client = None;
                let age = self.started_at.elapsed().unwrap_or_default();
                return Probe {
                    running: false,
                    memory: None,
                    message: (age > Duration::from_secs(10))
                        .then(|| format!("VMM not answering: {err}")),
                };
            }
        };
        let running = matches!(
            state.state(),
            VmmState::Running | VmmState::Paused | VmmState::ShuttingDown
        );
        if running {
            if let Some(target) = self.initial_balloon_mib {
                if let Ok(client) = self.client().await {
                    let request = SetBalloonTargetRequest {
                        balloon_target_mib: target,
                    };
                    if client.set_balloon_target(request).await.is_ok() {
                        self.initial_balloon_mib = None;
                    }
                }
            }
        }
        let memory = match self.client().await {
            Ok(client) => tokio::time::timeout(
                Duration::from_secs(2),
                client.get_memory_stats(GetMemoryStatsRequest {}),
            )
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|r| r.into_inner().stats),
            Err(_) => None,
        };
        Probe {
            running,
            memory,
            message: None,
        }
    }
}

/// How much of a crashed fabric-vmm's log the agent reads for its last line: however long
/// the log (rotated at 8 MiB), never more.
const LOG_TAIL_BYTES: u64 = 4096;

/// Appends the last line fabric-vmm logged (its error, when it failed) to `text`: a line
/// within the log's last [`LOG_TAIL_BYTES`], or that much of a longer one.
fn with_log_tail(mut text: String, log: &Path) -> String {
    if let Some(data) = read_tail(log, LOG_TAIL_BYTES) {
        let tail = String::from_utf8_lossy(&data);
        if let Some(line) = tail.lines().rev().find(|l| !l.trim().is_empty()) {
            text.push_str(": ");
            text.push_str(line.trim());
        }
    }
    text
}

/// The last `bytes` of the file at `path` (never more in memory, however long the file).
fn read_tail(path: &Path, bytes: u64) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(bytes))).ok()?;
    let mut data = Vec::new();
    file.take(bytes).read_to_end(&mut data).ok()?;
    Some(data)
}

impl Instance for KvmInstance {
    fn pid(&self) -> u32 {
        self.pidfd.pid()
    }

    fn started_at(&self) -> SystemTime {
        self.started_at
    }

    fn socket_path(&self) -> Option<PathBuf> {
        Some(self.socket.clone())
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        self.wait_exit().boxed()
    }

    fn stop(&mut self, timeout: Duration) -> BoxFuture<'_, Exit> {
        self.shutdown(timeout).boxed()
    }

    fn kill(&mut self) -> BoxFuture<'_, Exit> {
        async move {
            if let Err(e) = self.pidfd.signal(nix::sys::signal::Signal::SIGKILL) {
                tracing::warn!(pid = self.pidfd.pid(), error = %e, "cannot kill fabric-vmm");
            }
            let mut exit = self.wait_exit().await;
            exit.clean = true;
            exit
        }
        .boxed()
    }

    fn probe(&mut self) -> BoxFuture<'_, Probe> {
        self.do_probe().boxed()
    }

    fn balloon(&self) -> Option<Arc<dyn Balloon>> {
        Some(self.balloon.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::{BootImage, MemorySpec, NicSpec};

    fn spec() -> VmSpec {
        VmSpec {
            name: "a".into(),
            vcpus: 1,
            memory: Some(MemorySpec {
                startup_mib: 256,
                ..Default::default()
            }),
            image: Some(BootImage {
                kernel_sha256: "a".repeat(64),
                ..Default::default()
            }),
            nics: vec![NicSpec {
                network: "default".into(),
                mac: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        check_spec(&spec(), "default").unwrap();
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.vcpus = 0), "vcpus"),
            (Box::new(|s| s.memory = None), "memory"),
            (
                Box::new(|s| s.memory.as_mut().unwrap().maximum_mib = 128),
                "memory",
            ),
            (Box::new(|s| s.image = None), "kernel"),
            (
                Box::new(|s| s.image.as_mut().unwrap().rootfs_sha256 = "../x".into()),
                "sha256",
            ),
            (Box::new(|s| s.nics[0].network = "other".into()), "network"),
            (
                Box::new(|s| s.nics[0].mac = "ff:ff:ff:ff:ff:ff".into()),
                "MAC",
            ),
            (
                Box::new(|s| s.kernel_cmdline = "a\nb".into()),
                "kernel_cmdline",
            ),
        ];
        for (change, want) in cases {
            let mut s = spec();
            change(&mut s);
            let err = check_spec(&s, "default").unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    /// Bytes this thread has read through read(2) and the like so far.
    fn thread_read_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|n| n.parse().ok())
            .expect("rchar")
    }

    /// A crashed VMM's log of 10 MiB: the agent reads its last 4 KiB and no more, and takes
    /// the last line from it (or 4 KiB of a longer line).
    #[test]
    fn of_a_long_log_only_the_tail_is_read() {
        use std::io::Write;
        assert_eq!(LOG_TAIL_BYTES, 4096, "the figure docs/limits.md gives");
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("vmm.log");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&log).expect("log"));
        let mut written = 0;
        let mut n = 0;
        while written < 10 << 20 {
            let line = format!("2026-01-01T00:00:00Z INFO fabric_vmm: event {n}\n");
            file.write_all(line.as_bytes()).expect("write");
            written += line.len();
            n += 1;
        }
        file.write_all(b"ERROR fabric_vmm: the guest's memory could not be mapped\n\n")
            .expect("write");
        drop(file);
        let content = std::fs::read(&log).expect("read back");

        let before = thread_read_bytes();
        let tail = read_tail(&log, LOG_TAIL_BYTES).expect("the tail");
        let read = thread_read_bytes() - before;
        assert!(
            tail == content[content.len() - 4096..],
            "not the last 4 KiB: {} bytes, starting {:?}",
            tail.len(),
            String::from_utf8_lossy(&tail[..tail.len().min(80)])
        );
        assert!(read <= 2 * LOG_TAIL_BYTES, "{read} bytes read for the tail");
        assert_eq!(
            with_log_tail("fabric-vmm exited".into(), &log),
            "fabric-vmm exited: ERROR fabric_vmm: the guest's memory could not be mapped"
        );

        // One line of 10 MiB: 4 KiB of it.
        std::fs::write(&log, "x".repeat(10 << 20)).expect("write");
        let before = thread_read_bytes();
        let text = with_log_tail("exited".into(), &log);
        let read = thread_read_bytes() - before;
        assert_eq!(text.len(), "exited: ".len() + 4096);
        assert!(read <= 2 * LOG_TAIL_BYTES, "{read} bytes read for the tail");
        // A log shorter than the tail: all of it.
        std::fs::write(&log, "only line").expect("write");
        assert_eq!(read_tail(&log, LOG_TAIL_BYTES).unwrap(), b"only line");
        assert_eq!(read_tail(&dir.path().join("missing"), LOG_TAIL_BYTES), None);
    }
}
