//! bench/boot: boots the default guest again and again with fabric-vmm, QEMU `-M microvm` and
//! QEMU `-M pc` (same kernel, initramfs and command line, KVM), and prints side by side the time
//! from process start to the ready marker, the time from a stop request to process exit, and each
//! VMM's own memory (process PSS minus the PSS of guest RAM), with the ratios to fabric-vmm.
//!
//! Run by hand (`bench/boot`), not in CI: each boot takes ~30 s where KVM is emulated.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fabric_bench::interrupt::catch_signals;
use fabric_bench::stats::median;
use fabric_bench::vmm::{self, Boot, ConsoleVmm, VmmArgs, VmmKind};

#[derive(Parser, Debug)]
#[command(about = "Boot time and memory of fabric-vmm against QEMU")]
struct Args {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Which VMMs, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fabric,qemu-microvm,qemu-pc"
    )]
    vmms: Vec<VmmKind>,
    #[command(flatten)]
    vmm: VmmArgs,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The guest image directory (images/build.sh output).
    #[arg(long, default_value = "images/out")]
    image: PathBuf,
    /// Give up on one boot after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

struct Image {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    marker: String,
}

fn load_image(dir: &Path) -> anyhow::Result<Image> {
    let image = fabric_test_support::image::Image::load_from(dir)?;
    Ok(Image {
        kernel: image.kernel(),
        initramfs: image.use_initramfs().then(|| image.initramfs()),
        cmdline: image.cmdline(),
        marker: image.ready_marker(),
    })
}

struct Sample {
    boot: Duration,
    stop: Option<Duration>,
    overhead_kib: Option<u64>,
}

/// One booted VMM, its control socket (fabric-vmm's API or QEMU's QMP) and its directory,
/// removed once the VMM is gone.
struct Running {
    vmm: ConsoleVmm,
    control: PathBuf,
    _dir: tempfile::TempDir,
}

fn spawn(vmm: VmmKind, args: &Args, image: &Image, run: usize) -> anyhow::Result<Running> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fabric-boot-bench-{vmm}-{run}-"))
        .tempdir()?;
    let control = dir.path().join("control.sock");
    let boot = Boot {
        kernel: &image.kernel,
        cmdline: &image.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.vmm.memory,
    };
    let cmd = match vmm {
        VmmKind::Fabric => {
            let mut c = vmm::fabric_vmm(Command::new(&args.vmm.fabric_vmm), &boot);
            c.arg("--control-socket").arg(&control);
            if let Some(initrd) = &image.initramfs {
                c.arg("--initrd").arg(initrd);
            }
            c
        }
        VmmKind::QemuMicrovm | VmmKind::QemuPc => {
            let machine = if vmm == VmmKind::QemuPc {
                "pc"
            } else {
                "microvm"
            };
            let mut c = vmm::qemu(Command::new("qemu-system-x86_64"), machine, &boot);
            c.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", control.display()));
            if let Some(initrd) = &image.initramfs {
                c.arg("-initrd").arg(initrd);
            }
            c
        }
    };
    let vmm = ConsoleVmm::spawn(cmd, dir.path().join("stderr.log"))
        .with_context(|| format!("starting {vmm}"))?;
    Ok(Running {
        vmm,
        control,
        _dir: dir,
    })
}

/// PSS of the whole process and of guest RAM (the anonymous mapping the size of guest memory).
fn memory_kib(pid: u32, guest_mib: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let guest_kib = guest_mib * 1024;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    let mut anonymous = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            anonymous = line.split_whitespace().nth(5).is_none();
            size = 0;
        } else if first == "Size:" {
            size = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if first == "Pss:" {
            let pss: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += pss;
            if anonymous && size >= guest_kib && size <= guest_kib + 4096 {
                guest = guest.max(pss);
            }
        }
    }
    Some((total, guest))
}

fn qmp(socket: &Path, command: &str) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).context("QMP connect")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // greeting
    for cmd in [r#"{"execute":"qmp_capabilities"}"#, command] {
        writeln!(writer, "{cmd}")?;
        line.clear();
        reader.read_line(&mut line)?;
        if line.contains("\"error\"") {
            bail!("QMP {cmd}: {line}");
        }
    }
    Ok(())
}

fn request_stop(vmm: VmmKind, running: &Running) -> anyhow::Result<()> {
    match vmm {
        VmmKind::Fabric => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut client = fabric_vmm_api::client::connect(&running.control).await?;
                client
                    .shutdown(fabric_proto::v1::ShutdownRequest {
                        timeout: Some(prost_types::Duration {
                            seconds: 120,
                            nanos: 0,
                        }),
                    })
                    .await?;
                anyhow::Ok(())
            })
        }
        // The PC has an i8042: Ctrl-Alt-Del reaches the guest kernel, which resets.
        VmmKind::QemuPc => qmp(
            &running.control,
            r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"qcode","data":"alt"},{"type":"qcode","data":"delete"}]}}"#,
        ),
        // microvm has no keyboard controller: reset it from the monitor.
        VmmKind::QemuMicrovm => qmp(&running.control, r#"{"execute":"system_reset"}"#),
    }
}

fn sample(vmm: VmmKind, args: &Args, image: &Image, run: usize) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut running = spawn(vmm, args, image, run)?;
    let deadline = start + Duration::from_secs(args.timeout);
    running
        .vmm
        .wait_line("ready marker", deadline, |line| {
            Ok(line.contains(&image.marker))
        })
        .with_context(|| format!("{vmm}: within {} s", args.timeout))?;
    let boot = start.elapsed();
    let overhead_kib = memory_kib(running.vmm.child.id(), args.vmm.memory)
        .filter(|(_, guest)| *guest > 0)
        .map(|(total, guest)| total.saturating_sub(guest));
    let asked = Instant::now();
    let stop = match request_stop(vmm, &running) {
        Ok(()) => running
            .vmm
            .wait_exit(Duration::from_secs(180))
            .then(|| asked.elapsed()),
        Err(err) => {
            eprintln!("  {vmm}: stop request failed: {err:#}");
            None
        }
    };
    Ok(Sample {
        boot,
        stop,
        overhead_kib,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    catch_signals();
    let image = load_image(&args.image)?;
    println!(
        "boot bench: {} runs, {} vCPU, {} MiB, kernel {}, marker {:?}",
        args.runs,
        args.vcpus,
        args.vmm.memory,
        image.kernel.display(),
        image.marker
    );
    let mut results: BTreeMap<VmmKind, Vec<Sample>> = BTreeMap::new();
    for run in 0..args.runs {
        for &vmm in &args.vmms {
            match sample(vmm, &args, &image, run) {
                Ok(s) => {
                    println!(
                        "  run {run:>2} {vmm:<13} boot {:>6.2} s  stop {:>6}  own memory {:>8}",
                        s.boot.as_secs_f64(),
                        s.stop
                            .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                        s.overhead_kib
                            .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                    );
                    results.entry(vmm).or_default().push(s);
                }
                Err(err) => println!("  run {run:>2} {vmm:<13} FAILED: {err:#}"),
            }
        }
    }

    println!();
    println!(
        "| VMM | boots | boot to marker, median | min – max | stop → exit, median | VMM memory (PSS − guest), median |"
    );
    println!("|---|---|---|---|---|---|");
    let mut medians: BTreeMap<VmmKind, (f64, Option<f64>, Option<f64>)> = BTreeMap::new();
    for (vmm, samples) in &results {
        let boots: Vec<f64> = samples.iter().map(|s| s.boot.as_secs_f64()).collect();
        let min = boots.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = boots.iter().cloned().fold(0.0, f64::max);
        let boot = median(boots.clone()).unwrap_or(f64::NAN);
        let stop = median(
            samples
                .iter()
                .filter_map(|s| s.stop)
                .map(|d| d.as_secs_f64())
                .collect(),
        );
        let mem = median(
            samples
                .iter()
                .filter_map(|s| s.overhead_kib)
                .map(|k| k as f64 / 1024.0)
                .collect(),
        );
        println!(
            "| {vmm} | {} | {boot:.2} s | {min:.2} – {max:.2} s | {} | {} |",
            boots.len(),
            stop.map_or("-".into(), |s| format!("{s:.2} s")),
            mem.map_or("-".into(), |m| format!("{m:.1} MiB")),
        );
        medians.insert(*vmm, (boot, stop, mem));
    }
    if let Some((fb, fs, fm)) = medians.get(&VmmKind::Fabric).cloned() {
        println!();
        for (vmm, (b, s, m)) in &medians {
            if *vmm == VmmKind::Fabric {
                continue;
            }
            let ratio = |other: Option<f64>, ours: Option<f64>| match (other, ours) {
                (Some(o), Some(f)) if f > 0.0 => format!("{:.2}×", o / f),
                _ => "-".into(),
            };
            println!(
                "{vmm} / fabric-vmm: boot {:.2}×, stop {}, VMM memory {}",
                b / fb,
                ratio(*s, fs),
                ratio(*m, fm)
            );
        }
    }
    Ok(())
}
