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
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use fabric_bench::interrupt::{catch_signals, check_interrupted, interrupted};
use fabric_bench::stats::median;
use fabric_bench::vmm::{self, Boot, ConsoleVmm, VmmArgs, VmmKind};
use fabric_test_support::netns::{mac_text, NetNs, PacketSocket};

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
    /// Which VMMs, comma separated (not qemu-pc: its devices are PCI).
    #[arg(long, value_delimiter = ',', default_value = "fabric,qemu-microvm")]
    vmms: Vec<VmmKind>,
    /// Which workloads, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "blk-write,blk-read,net-tx,net-rx"
    )]
    workloads: Vec<Workload>,
    /// Size of the raw disk file the block workloads go over, in MiB.
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// MiB each network workload moves.
    #[arg(long, default_value_t = 256)]
    net_mib: u64,
    #[command(flatten)]
    vmm: VmmArgs,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Workload {
    BlkWrite,
    BlkRead,
    NetTx,
    NetRx,
}

impl Workload {
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

// --- network namespace and tap --------------------------------------------------------------

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace with one tap, made for one run and removed on drop.
struct BenchNet {
    ns: NetNs,
    tap: String,
}

impl BenchNet {
    fn new() -> anyhow::Result<BenchNet> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let mut ns = NetNs::new(&format!("fabric-devbench-{}-{n}", std::process::id()))?;
        let tap = format!("fbb{}-{n}", std::process::id() % 100_000);
        ns.add_tap(&tap, None)?;
        Ok(BenchNet { ns, tap })
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

/// What the RX flood did.
#[derive(Debug, Default)]
struct FloodStats {
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// Sends frames to the guest from inside the namespace until `stop`, keeping at most
/// [`RX_WINDOW`] of them queued in the tap.
fn flood(net: &BenchNet, stop: &AtomicBool, stats: &FloodStats) -> anyhow::Result<()> {
    net.ns.enter()?;
    let socket = PacketSocket::bind(&net.tap, ETHERTYPE_BENCH)?;
    let mut frame = Vec::with_capacity(FRAME_LEN);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&HOST_MAC);
    frame.extend_from_slice(&ETHERTYPE_BENCH.to_be_bytes());
    frame.extend((0..FRAME_LEN - 14).map(|i| i as u8));
    let base = tap_counters(&net.tap)?;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && !interrupted() {
        let now = tap_counters(&net.tap)?;
        let dropped = now.tx_dropped.saturating_sub(base.tx_dropped);
        let gone = now.tx_packets.saturating_sub(base.tx_packets) + dropped;
        stats.dropped.store(dropped, Ordering::Relaxed);
        if sent.saturating_sub(gone) + RX_BURST > RX_WINDOW {
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        for _ in 0..RX_BURST {
            if let Err(err) = socket.send(&frame) {
                if err.raw_os_error() == Some(libc::ENOBUFS) {
                    break;
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                bail!("send on {}: {err}", net.tap);
            }
            sent += 1;
        }
        stats.sent.store(sent, Ordering::Relaxed);
    }
    Ok(())
}

// --- one run --------------------------------------------------------------------------------

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
    vmm: VmmKind,
    args: &Args,
    workload: Workload,
    net: Option<&BenchNet>,
    disk: Option<&Path>,
) -> anyhow::Result<Command> {
    let mib = match workload {
        Workload::BlkWrite | Workload::BlkRead => args.disk_mib,
        Workload::NetTx | Workload::NetRx => args.net_mib,
    };
    let cmdline = format!("fabric.test={} fabric.mib={mib}", workload.scenario());
    let program: PathBuf = match vmm {
        VmmKind::Fabric => args.vmm.fabric_vmm.clone(),
        VmmKind::QemuMicrovm => "qemu-system-x86_64".into(),
        VmmKind::QemuPc => bail!("{vmm}: use fabric or qemu-microvm"),
    };
    let program = match net {
        Some(net) => net.ns.command(&program),
        None => Command::new(&program),
    };
    let boot = Boot {
        kernel: &args.testguest,
        cmdline: &cmdline,
        vcpus: 1,
        memory_mib: args.vmm.memory,
    };
    let mac = mac_text(&GUEST_MAC);
    let mut cmd;
    if vmm == VmmKind::Fabric {
        cmd = vmm::fabric_vmm(program, &boot);
        if let Some(disk) = disk {
            cmd.arg("--disk").arg(disk);
        }
        if let Some(net) = net {
            cmd.args(["--net", &format!("tap={},mac={mac}", net.tap)]);
        }
    } else {
        // acpi=off: only then does microvm append its virtio_mmio.device= entries to the
        // command line (with ACPI on it describes the devices in ACPI tables instead).
        // isa-debug-exit ends QEMU when the guest is done: microvm has no i8042 to reset
        // through.
        cmd = vmm::qemu(program, "microvm,x-option-roms=off,acpi=off", &boot);
        cmd.args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
        if let Some(disk) = disk {
            let mut drive = std::ffi::OsString::from("id=d0,file=");
            drive.push(disk);
            drive.push(",format=raw,if=none,cache=none,aio=threads");
            cmd.arg("-drive")
                .arg(drive)
                .args(["-device", "virtio-blk-device,drive=d0"]);
        }
        if let Some(net) = net {
            cmd.args([
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                    net.tap
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

/// Waits for the test guest's console line starting with `prefix`; a line saying that the
/// scenario failed ends the wait.
fn guest_line(
    vmm: &mut ConsoleVmm,
    prefix: &str,
    deadline: Instant,
) -> anyhow::Result<(Instant, String)> {
    vmm.wait_line(prefix, deadline, |line| {
        if line.contains(": FAIL") {
            bail!("the guest failed: {line}");
        }
        Ok(line.starts_with(prefix))
    })
}

fn sample(vmm: VmmKind, args: &Args, workload: Workload, run: usize) -> anyhow::Result<Sample> {
    let scratch = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix(&format!("fabric-devbench-{vmm}-{}-{run}-", workload.name()))
        .tempdir_in(&scratch)
        .with_context(|| format!("temp dir in {}", scratch.display()))?;
    let disk = dir.path().join("disk.raw");
    let (net, disk) = match workload {
        Workload::BlkWrite => {
            make_disk(&disk, args.disk_mib, false)?;
            (None, Some(disk.as_path()))
        }
        Workload::BlkRead => {
            make_disk(&disk, args.disk_mib, true)?;
            (None, Some(disk.as_path()))
        }
        Workload::NetTx | Workload::NetRx => (Some(BenchNet::new()?), None),
    };
    let cmd = command_for(vmm, args, workload, net.as_ref(), disk)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut vmm_proc = ConsoleVmm::spawn(cmd, dir.path().join("stderr.log"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let flood_stats = Arc::new(FloodStats::default());
    let mut detail = String::new();
    let result = std::thread::scope(|scope| -> anyhow::Result<(Instant, Instant, u64)> {
        let mut sender = None;
        if workload == Workload::NetRx {
            guest_line(&mut vmm_proc, "testguest: bench ready", deadline)?;
            let (net, stop, stats) = (net.as_ref(), &stop, &flood_stats);
            sender = Some(scope.spawn(move || match net {
                Some(net) => flood(net, stop, stats),
                None => Ok(()),
            }));
        }
        let waited = (|| {
            let (start, _) = guest_line(&mut vmm_proc, "testguest: bench start", deadline)?;
            let (end, line) = guest_line(&mut vmm_proc, "testguest: bench end bytes=", deadline)?;
            let bytes = line
                .rsplit('=')
                .next()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| anyhow!("cannot read the byte count in {line:?}"))?;
            let verdict = format!("testguest: {}: PASS", workload.scenario());
            guest_line(&mut vmm_proc, &verdict, deadline)?;
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
    // The guest is done: the VMM ends by itself.
    if !vmm_proc.wait_exit(Duration::from_secs(20)) {
        eprintln!("  warning: the VMM did not exit after the guest finished: killed it");
    }
    match workload {
        Workload::NetRx => {
            detail = format!(
                "host sent {} frames, tap dropped {}",
                flood_stats.sent.load(Ordering::Relaxed),
                flood_stats.dropped.load(Ordering::Relaxed)
            );
        }
        Workload::NetTx => {
            if let Some(net) = net.as_ref() {
                let counters = net.ns.run_inside(|| tap_counters(&net.tap))?;
                detail = format!("tap received {} frames", counters.rx_packets);
            }
        }
        _ => {}
    }
    drop(vmm_proc);
    drop(net);
    Ok(Sample {
        bytes,
        elapsed: end.duration_since(start),
        detail,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    catch_signals();
    let workloads = &args.workloads;
    if !args.testguest.is_file() {
        bail!(
            "{}: missing; build it with `bash images/build.sh`",
            args.testguest.display()
        );
    }
    println!(
        "devices bench: {} runs, VMMs {}, 1 vCPU, {} MiB, test guest {}",
        args.runs,
        args.vmms
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(", "),
        args.vmm.memory,
        args.testguest.display()
    );
    for w in workloads {
        println!("  {}", w.describe(&args));
    }
    let mut results: BTreeMap<(Workload, VmmKind), Vec<f64>> = BTreeMap::new();
    for run in 0..args.runs {
        for &workload in workloads {
            for &vmm in &args.vmms {
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
                            .entry((workload, vmm))
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
        .map(|v| format!("{} MB/s (median)", v.title()))
        .collect();
    let ratio = args.vmms.len() == 2;
    println!(
        "| workload | {}{} |",
        titles.join(" | "),
        if ratio {
            format!(" | {} / {}", args.vmms[0].title(), args.vmms[1].title())
        } else {
            String::new()
        }
    );
    println!(
        "|---|{}{}",
        "---:|".repeat(args.vmms.len()),
        if ratio { "---:|" } else { "" }
    );
    for &workload in workloads {
        let medians: Vec<Option<f64>> = args
            .vmms
            .iter()
            .map(|v| median(results.get(&(workload, *v)).cloned().unwrap_or_default()))
            .collect();
        let cells: Vec<String> = args
            .vmms
            .iter()
            .zip(&medians)
            .map(|(v, m)| {
                let n = results.get(&(workload, *v)).map_or(0, Vec::len);
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
