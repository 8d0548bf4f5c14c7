//! bench/devices: block and network throughput of fabric-vmm's virtio devices next to QEMU's
//! (`-M microvm`, virtio-mmio, `cache=none,aio=threads`, tap with `vhost=off`), driven from
//! inside the guest by the freestanding test guest (`images/testguest`, scenarios in `bench.c`):
//!
//! - `blk-write`: sequential 128 KiB writes, 32 in flight, over a fresh sparse raw file
//!   (1 GiB by default), then a flush;
//! - `blk-read`: the same reads over a fresh file preallocated with `fallocate`;
//! - `net-tx`: the guest sends 1514-byte frames as fast as its TX queue allows, into a tap in a
//!   network namespace made for the run;
//! - `net-rx`: this program floods 1514-byte frames into the tap from an AF_PACKET socket inside
//!   that namespace (keeping at most [`RX_WINDOW`] frames queued in the tap, so none are dropped
//!   there), and the guest counts them until it has the wanted amount.
//!
//! Each run is timed on the host's monotonic clock between the guest's console lines
//! `testguest: bench start` and `testguest: bench end bytes=N`, so boot is not counted. Runs
//! alternate between the VMMs; the table gives the median of each. Every network namespace is
//! removed when its run ends, also when it fails or the benchmark is interrupted.
//!
//! Run by hand (`bench/devices`), not in CI.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use fabric_bench::median;

/// IEEE 802 "local experimental" EtherType: what the test guest counts on RX.
const ETHERTYPE_BENCH: u16 = 0x88b5;
/// An Ethernet frame of a 1500-byte MTU, without FCS.
const FRAME_LEN: usize = 1514;
/// The guest's MAC, given to both VMMs.
const GUEST_MAC: [u8; 6] = [0x02, 0xfb, 0x00, 0x00, 0x00, 0x01];
/// The source of the host's frames.
const HOST_MAC: [u8; 6] = [0x02, 0xfb, 0x00, 0x00, 0x00, 0x02];
/// Frames the RX flood keeps queued in the tap at most: below the tap's queue of 1000
/// (txqueuelen), which drops what does not fit.
const RX_WINDOW: u64 = 512;
/// Frames sent between two looks at the tap's counters.
const RX_BURST: u64 = 64;

#[derive(Parser, Debug)]
#[command(about = "virtio-blk and virtio-net throughput of fabric-vmm against QEMU microvm")]
struct Args {
    /// Runs per VMM and workload.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which VMMs, comma separated: fabric, qemu-microvm.
    #[arg(long, default_value = "fabric,qemu-microvm", value_delimiter = ',')]
    vmms: Vec<String>,
    /// Which workloads, comma separated: blk-write, blk-read, net-tx, net-rx.
    #[arg(
        long,
        default_value = "blk-write,blk-read,net-tx,net-rx",
        value_delimiter = ','
    )]
    workloads: Vec<String>,
    /// Size of the raw disk file the block workloads go over, in MiB.
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// MiB each network workload moves.
    #[arg(long, default_value_t = 256)]
    net_mib: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// The fabric-vmm binary.
    #[arg(long, default_value = "target/release/fabric-vmm")]
    fabric_vmm: PathBuf,
    /// The test guest (images/build.sh output).
    #[arg(long, default_value = "images/out/testguest.elf")]
    testguest: PathBuf,
    /// Where the disk files go (a fresh temp dir inside it per run).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Give up on one run after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    BlkWrite,
    BlkRead,
    NetTx,
    NetRx,
}

impl Workload {
    fn parse(name: &str) -> anyhow::Result<Workload> {
        Ok(match name {
            "blk-write" => Workload::BlkWrite,
            "blk-read" => Workload::BlkRead,
            "net-tx" => Workload::NetTx,
            "net-rx" => Workload::NetRx,
            other => bail!("unknown workload {other:?}: use blk-write, blk-read, net-tx or net-rx"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Workload::BlkWrite => "blk-write",
            Workload::BlkRead => "blk-read",
            Workload::NetTx => "net-tx",
            Workload::NetRx => "net-rx",
        }
    }

    /// The test guest's scenario.
    fn scenario(self) -> &'static str {
        match self {
            Workload::BlkWrite => "blk-bench-write",
            Workload::BlkRead => "blk-bench-read",
            Workload::NetTx => "net-bench-tx",
            Workload::NetRx => "net-bench-rx",
        }
    }

    fn describe(self, args: &Args) -> String {
        match self {
            Workload::BlkWrite => format!(
                "blk write: {} MiB sequential, 128 KiB × 32 in flight, then flush",
                args.disk_mib
            ),
            Workload::BlkRead => format!(
                "blk read: {} MiB sequential (fallocated file), 128 KiB × 32 in flight",
                args.disk_mib
            ),
            Workload::NetTx => format!("net tx: {} MiB in 1514-byte frames", args.net_mib),
            Workload::NetRx => format!("net rx: {} MiB in 1514-byte frames", args.net_mib),
        }
    }
}

// --- interruption ---------------------------------------------------------------------------

/// Set by SIGINT or SIGTERM: every wait gives up, so the namespaces and files are removed.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// --- network namespace and tap --------------------------------------------------------------

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// A network namespace with one tap, made for one run and removed on drop.
struct NetNs {
    name: String,
    tap: String,
}

impl NetNs {
    fn new() -> anyhow::Result<NetNs> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("fabric-devbench-{}-{n}", std::process::id());
        let out = run(Command::new("ip").args(["netns", "add", &name]))?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // From here on, drop removes the namespace whatever fails next.
        let ns = NetNs {
            name,
            tap: format!("fbb{}-{n}", std::process::id() % 100_000),
        };
        ns.must(&["ip", "tuntap", "add", "dev", &ns.tap, "mode", "tap"])?;
        // No IPv6: the host sends nothing on the tap by itself.
        // (Absent when the host has no IPv6: nothing to turn off then.)
        let _ = ns.must(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{}.disable_ipv6=1", ns.tap),
        ]);
        ns.must(&["ip", "link", "set", &ns.tap, "up"])?;
        Ok(ns)
    }

    /// `program` inside the namespace (`ip netns exec` execs it: the PID is the program's).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn must(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = run(self.command(args[0]).args(&args[1..]))?;
        if !out.status.success() {
            bail!(
                "in {}: {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Moves the calling thread into the namespace (`setns` changes only the calling thread).
    fn enter(&self) -> anyhow::Result<()> {
        let path = Path::new("/run/netns").join(&self.name);
        let ns = File::open(&path).with_context(|| path.display().to_string())?;
        // SAFETY: `ns` is an open namespace file; setns only changes this thread.
        let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if ret != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(self.command("ip").args(["link", "del", &self.tap]));
        match run(Command::new("ip").args(["netns", "del", &self.name])) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => eprintln!("warning: ip netns del {}: {err:#}", self.name),
        }
    }
}

/// The tap's counters as the namespace sees them (`/proc/thread-self/net/dev`; the calling
/// thread must be in the namespace): frames handed to the VMM and frames the tap dropped.
fn tap_counters(tap: &str) -> anyhow::Result<TapCounters> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != tap {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() < 12 {
            bail!("/proc/net/dev: short line for {tap}: {line:?}");
        }
        // Receive: bytes packets errs drop fifo frame compressed multicast, then transmit.
        return Ok(TapCounters {
            rx_packets: v[1],
            tx_packets: v[9],
            tx_dropped: v[11],
        });
    }
    bail!("/proc/net/dev has no {tap}")
}

#[derive(Debug, Clone, Copy, Default)]
struct TapCounters {
    /// Frames the VMM wrote into the tap.
    rx_packets: u64,
    /// Frames the VMM read from the tap.
    tx_packets: u64,
    /// Frames the tap dropped on the way to the VMM (its queue was full).
    tx_dropped: u64,
}

/// An AF_PACKET socket bound to the tap: what it sends goes to the VMM.
fn packet_socket(tap: &str) -> anyhow::Result<OwnedFd> {
    let ifname = CString::new(tap)?;
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETHERTYPE_BENCH.to_be()),
        )
    };
    if raw < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a socket we just opened and own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `ifname` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    if index == 0 {
        bail!("no interface {tap} in the namespace");
    }
    // SAFETY: all-zero bytes are a valid `sockaddr_ll`.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETHERTYPE_BENCH.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a live `sockaddr_ll` and the length given is its size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if ret != 0 {
        bail!("bind to {tap}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// What the RX flood did.
#[derive(Debug, Default)]
struct FloodStats {
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// Sends frames to the guest from inside the namespace until `stop`, keeping at most
/// [`RX_WINDOW`] of them queued in the tap.
fn flood(ns: &NetNs, stop: &AtomicBool, stats: &FloodStats) -> anyhow::Result<()> {
    ns.enter()?;
    let socket = packet_socket(&ns.tap)?;
    let mut frame = Vec::with_capacity(FRAME_LEN);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&ETHERTYPE_BENCH.to_be_bytes());
    frame.extend((0..FRAME_LEN - 14).map(|i| i as u8));
    let base = tap_counters(&ns.tap)?;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && !INTERRUPTED.load(Ordering::Relaxed) {
        let now = tap_counters(&ns.tap)?;
        let dropped = now.tx_dropped.saturating_sub(base.tx_dropped);
        let gone = now.tx_packets.saturating_sub(base.tx_packets) + dropped;
        stats.dropped.store(dropped, Ordering::Relaxed);
        if sent.saturating_sub(gone) + RX_BURST > RX_WINDOW {
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        for _ in 0..RX_BURST {
            // SAFETY: `frame` is a live buffer of `frame.len()` bytes; the socket is bound, so
            // the kernel sends out of the bound interface.
            let n =
                unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n != frame.len() as isize {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENOBUFS) {
                    break;
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                bail!("send on {}: {err}", ns.tap);
            }
            sent += 1;
        }
        stats.sent.store(sent, Ordering::Relaxed);
    }
    Ok(())
}

// --- one run --------------------------------------------------------------------------------

/// A VMM process and its console lines, each with the moment it was read; killed (by its own
/// PID) and reaped on drop.
struct Vmm {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    stderr: PathBuf,
    console: Vec<String>,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn spawn(mut cmd: Command, stderr: PathBuf) -> anyhow::Result<Vmm> {
        let err_file = File::create(&stderr)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Vmm {
            child,
            lines,
            stderr,
            console: Vec::new(),
        })
    }

    /// Waits for a console line starting with `prefix`; returns when it was read and the line.
    fn wait_line(&mut self, prefix: &str, deadline: Instant) -> anyhow::Result<(Instant, String)> {
        loop {
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {prefix:?} on the console in time{}", self.report());
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok((at, line)) => {
                    let line = line.trim_end().to_string();
                    self.console.push(line.clone());
                    if line.contains(": FAIL") {
                        bail!("the guest failed: {line}{}", self.report());
                    }
                    if line.starts_with(prefix) {
                        return Ok((at, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "the VMM exited ({status}) before {prefix:?}{}",
                        self.report()
                    );
                }
            }
        }
    }

    fn report(&self) -> String {
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail = |lines: Vec<&str>| {
            let n = lines.len().saturating_sub(15);
            lines[n..].join("\n    ")
        };
        format!(
            "\n  console:\n    {}\n  stderr:\n    {}",
            tail(self.console.iter().map(String::as_str).collect()),
            tail(stderr.lines().collect())
        )
    }

    /// Waits (a little) for the VMM to end by itself after the guest is done.
    fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("  warning: the VMM did not exit after the guest finished: killed it");
    }
}

/// The measured part of one run.
struct Sample {
    bytes: u64,
    elapsed: Duration,
    /// Extra facts worth a look (frames the tap saw, frames it dropped).
    detail: String,
}

impl Sample {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

fn command_for(
    vmm: &str,
    args: &Args,
    workload: Workload,
    ns: Option<&NetNs>,
    disk: Option<&Path>,
) -> anyhow::Result<Command> {
    let mib = match workload {
        Workload::BlkWrite | Workload::BlkRead => args.disk_mib,
        Workload::NetTx | Workload::NetRx => args.net_mib,
    };
    let cmdline = format!("fabric.test={} fabric.mib={mib}", workload.scenario());
    let program: PathBuf = match vmm {
        "fabric" => args.fabric_vmm.clone(),
        "qemu-microvm" => "qemu-system-x86_64".into(),
        other => bail!("unknown VMM {other:?}: use fabric or qemu-microvm"),
    };
    let mut cmd = match ns {
        Some(ns) => ns.command(&program),
        None => Command::new(&program),
    };
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if vmm == "fabric" {
        cmd.arg("--kernel")
            .arg(&args.testguest)
            .args(["--cmdline", &cmdline])
            .args(["--vcpus", "1", "--memory", &args.memory.to_string()])
            .args(["--console", "stdout"]);
        if let Some(disk) = disk {
            cmd.arg("--disk").arg(disk);
        }
        if let Some(ns) = ns {
            cmd.args(["--net", &format!("tap={},mac={mac}", ns.tap)]);
        }
    } else {
        // acpi=off: only then does microvm append its virtio_mmio.device= entries to the
        // command line (with ACPI on it describes the devices in ACPI tables instead).
        // -cx16 as fabric-vmm hides it; QEMU 7.2 cannot set IA32_ARCH_CAPABILITIES on a
        // software-nested KVM. isa-debug-exit ends QEMU when the guest is done: microvm has
        // no i8042 to reset through.
        cmd.args(["-M", "microvm,x-option-roms=off,acpi=off"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-enable-kvm", "-cpu", "host,-cx16,-arch-capabilities"])
            .args(["-smp", "1", "-m", &args.memory.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
            .arg("-kernel")
            .arg(&args.testguest)
            .args(["-append", &cmdline]);
        if let Some(disk) = disk {
            let mut drive = std::ffi::OsString::from("id=d0,file=");
            drive.push(disk);
            drive.push(",format=raw,if=none,cache=none,aio=threads");
            cmd.arg("-drive")
                .arg(drive)
                .args(["-device", "virtio-blk-device,drive=d0"]);
        }
        if let Some(ns) = ns {
            cmd.args([
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                    ns.tap
                ),
            ])
            .args(["-device", &format!("virtio-net-device,netdev=n0,mac={mac}")]);
        }
    }
    Ok(cmd)
}

/// A fresh raw disk file of `mib` MiB: sparse, or with every block allocated (fallocate).
fn make_disk(path: &Path, mib: u64, allocate: bool) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| path.display().to_string())?;
    let len = mib << 20;
    if allocate {
        // SAFETY: fallocate(2) on a file we own; the result is checked.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if ret != 0 {
            bail!(
                "fallocate {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    } else {
        file.set_len(len)?;
    }
    Ok(())
}

fn sample(vmm: &str, args: &Args, workload: Workload, run: usize) -> anyhow::Result<Sample> {
    let scratch = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix(&format!("fabric-devbench-{vmm}-{}-{run}-", workload.name()))
        .tempdir_in(&scratch)
        .with_context(|| format!("temp dir in {}", scratch.display()))?;
    let disk = dir.path().join("disk.raw");
    let (ns, disk) = match workload {
        Workload::BlkWrite => {
            make_disk(&disk, args.disk_mib, false)?;
            (None, Some(disk.as_path()))
        }
        Workload::BlkRead => {
            make_disk(&disk, args.disk_mib, true)?;
            (None, Some(disk.as_path()))
        }
        Workload::NetTx | Workload::NetRx => (Some(NetNs::new()?), None),
    };
    let cmd = command_for(vmm, args, workload, ns.as_ref(), disk)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut vmm_proc = Vmm::spawn(cmd, dir.path().join("stderr.log"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let flood_stats = Arc::new(FloodStats::default());
    let mut detail = String::new();
    let result = std::thread::scope(|scope| -> anyhow::Result<(Instant, Instant, u64)> {
        let mut sender = None;
        if workload == Workload::NetRx {
            vmm_proc.wait_line("testguest: bench ready", deadline)?;
            let (ns, stop, stats) = (ns.as_ref(), &stop, &flood_stats);
            sender = Some(scope.spawn(move || match ns {
                Some(ns) => flood(ns, stop, stats),
                None => Ok(()),
            }));
        }
        let waited = (|| {
            let (start, _) = vmm_proc.wait_line("testguest: bench start", deadline)?;
            let (end, line) = vmm_proc.wait_line("testguest: bench end bytes=", deadline)?;
            let bytes = line
                .rsplit('=')
                .next()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| anyhow!("cannot read the byte count in {line:?}"))?;
            let verdict = format!("testguest: {}: PASS", workload.scenario());
            vmm_proc.wait_line(&verdict, deadline)?;
            Ok((start, end, bytes))
        })();
        stop.store(true, Ordering::SeqCst);
        if let Some(sender) = sender {
            match sender.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) if waited.is_ok() => return Err(err.context("RX flood")),
                Ok(Err(err)) => eprintln!("  RX flood: {err:#}"),
                Err(_) => bail!("the RX flood thread panicked"),
            }
        }
        waited
    });
    let (start, end, bytes) = result?;
    vmm_proc.finish();
    match workload {
        Workload::NetRx => {
            detail = format!(
                "host sent {} frames, tap dropped {}",
                flood_stats.sent.load(Ordering::Relaxed),
                flood_stats.dropped.load(Ordering::Relaxed)
            );
        }
        Workload::NetTx => {
            if let Some(ns) = ns.as_ref() {
                let counters = std::thread::scope(|s| {
                    s.spawn(|| ns.enter().and_then(|()| tap_counters(&ns.tap)))
                        .join()
                        .map_err(|_| anyhow!("counter thread panicked"))?
                })?;
                detail = format!("tap received {} frames", counters.rx_packets);
            }
        }
        _ => {}
    }
    drop(vmm_proc);
    drop(ns);
    Ok(Sample {
        bytes,
        elapsed: end.duration_since(start),
        detail,
    })
}

fn vmm_title(vmm: &str) -> &str {
    match vmm {
        "fabric" => "fabric-vmm",
        "qemu-microvm" => "QEMU microvm",
        other => other,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    catch_signals();
    let workloads = args
        .workloads
        .iter()
        .map(|w| Workload::parse(w))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !args.testguest.is_file() {
        bail!(
            "{}: missing; build it with `bash images/build.sh`",
            args.testguest.display()
        );
    }
    println!(
        "devices bench: {} runs, VMMs {}, 1 vCPU, {} MiB, test guest {}",
        args.runs,
        args.vmms.join(", "),
        args.memory,
        args.testguest.display()
    );
    for w in &workloads {
        println!("  {}", w.describe(&args));
    }
    let mut results: BTreeMap<(Workload, String), Vec<f64>> = BTreeMap::new();
    for run in 0..args.runs {
        for &workload in &workloads {
            for vmm in &args.vmms {
                check_interrupted()?;
                match sample(vmm, &args, workload, run) {
                    Ok(s) => {
                        println!(
                            "  run {run} {:<9} {:<13} {:>8.1} MB/s  ({} bytes in {:.3} s{}{})",
                            workload.name(),
                            vmm,
                            s.mb_per_s(),
                            s.bytes,
                            s.elapsed.as_secs_f64(),
                            if s.detail.is_empty() { "" } else { "; " },
                            s.detail
                        );
                        results
                            .entry((workload, vmm.clone()))
                            .or_default()
                            .push(s.mb_per_s());
                    }
                    Err(err) => {
                        check_interrupted()?;
                        println!(
                            "  run {run} {:<9} {vmm:<13} FAILED: {err:#}",
                            workload.name()
                        )
                    }
                }
            }
        }
    }

    println!();
    let titles: Vec<String> = args
        .vmms
        .iter()
        .map(|v| format!("{} MB/s (median)", vmm_title(v)))
        .collect();
    let ratio = args.vmms.len() == 2;
    println!(
        "| workload | {}{} |",
        titles.join(" | "),
        if ratio {
            format!(
                " | {} / {}",
                vmm_title(&args.vmms[0]),
                vmm_title(&args.vmms[1])
            )
        } else {
            String::new()
        }
    );
    println!(
        "|---|{}{}",
        "---:|".repeat(args.vmms.len()),
        if ratio { "---:|" } else { "" }
    );
    for &workload in &workloads {
        let medians: Vec<Option<f64>> = args
            .vmms
            .iter()
            .map(|v| {
                median(
                    results
                        .get(&(workload, v.clone()))
                        .cloned()
                        .unwrap_or_default(),
                )
            })
            .collect();
        let cells: Vec<String> = args
            .vmms
            .iter()
            .zip(&medians)
            .map(|(v, m)| {
                let n = results.get(&(workload, v.clone())).map_or(0, Vec::len);
                m.map_or("failed".to_string(), |m| {
                    if n == args.runs {
                        format!("{m:.1}")
                    } else {
                        format!("{m:.1} ({n} of {} runs)", args.runs)
                    }
                })
            })
            .collect();
        let ratio_cell = match (ratio, medians.first(), medians.get(1)) {
            (true, Some(Some(a)), Some(Some(b))) if *b > 0.0 => format!(" | {:.2}×", a / b),
            (true, _, _) => " | -".to_string(),
            _ => String::new(),
        };
        println!(
            "| {} | {}{ratio_cell} |",
            workload.describe(&args),
            cells.join(" | ")
        );
    }
    Ok(())
}
