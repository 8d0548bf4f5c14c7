//! fabric-vmm: runs one virtual machine on KVM.
//!
//! Exit status: 0 when the guest stopped (reset, poweroff, or a Shutdown request),
//! 1 when the configuration is bad or the VM could not be built, 2 when the guest failed
//! while running (e.g. an instruction KVM could not emulate).
//!
//! SIGUSR2 makes every vCPU log its registers on stderr (the guest keeps running): where a
//! guest that stopped making progress is.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use fabric_vmm::builder::{build_vm, open_kvm};
use fabric_vmm::config::{ConsoleOutput, VmRequest};
use fabric_vmm::control::ControlServer;
use fabric_vmm::logging::{log_layer, LogWriter};
use fabric_vmm::runner::{
    block_dump_signal, control_channel, run_vm, Command, ControlSender, VmInfo,
};
use fabric_vmm::vcpu::{set_lease_expiry, ExitReason};
use fabric_vmm_api::lease::LeaseFile;

/// Runs one virtual machine on KVM.
#[derive(Parser, Debug)]
#[command(name = "fabric-vmm", version)]
struct Args {
    /// Kernel image: a bzImage or an ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (initramfs) to pass to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 pci=off")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Where the serial console goes: a file path, `stdout`, or `off`.
    #[arg(long, default_value = "stdout")]
    console: ConsoleOutput,
    /// Unix socket to serve the fabric.v1.Vmm control API on.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// The VM's id, reported by GetState.
    #[arg(long, default_value = "")]
    vm_id: String,
    /// The host's lease file (written by fabric-agent): the guest is stopped when the lease
    /// runs out, even if the agent is gone, so a VM the controller moves elsewhere never runs
    /// twice. Without it the VM runs until it is stopped.
    #[arg(long, value_name = "PATH")]
    lease_file: Option<PathBuf>,
    /// A virtio-blk disk over a raw image file: `PATH`, with `,ro` to open it read-only (the
    /// guest sees a read-only disk) and `,cache=none` (default: O_DIRECT, the host page cache
    /// is used only where the filesystem has no direct I/O or a request is not aligned for it)
    /// or `,cache=writeback` (through the host page cache). Repeatable; the guest names them
    /// vda, vdb, ... in this order.
    #[arg(long = "disk", value_name = "PATH[,ro][,cache=none|writeback]")]
    disks: Vec<String>,
    /// A virtio-net NIC over an existing tap device, opened by name (create it first, e.g.
    /// `ip tuntap add dev NAME mode tap`). Without `mac=` the guest gets a locally administered
    /// MAC derived from the tap's name. Repeatable; the guest names them eth0, eth1, ...
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-balloon device (SetBalloonTarget and GetMemoryStats on the control socket),
    /// with options `deflate-on-oom=on`, `free-page-reporting=on` and `stats-period=SECONDS`
    /// (0, the default: the guest refreshes its statistics at each GetMemoryStats).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    balloon: Option<String>,
}

fn main() -> ExitCode {
    let start = Instant::now();
    // Before any thread exists, so that SIGUSR2 (log every vCPU's state) reaches the event
    // loop in every thread instead of ending the process.
    if let Err(err) = block_dump_signal() {
        eprintln!("fabric-vmm: cannot block SIGUSR2: {err}");
        return ExitCode::from(1);
    }
    init_logging();
    let args = Args::parse();
    match run(args, start) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fabric-vmm: {}", one_line(&err));
            ExitCode::from(1)
        }
    }
}

/// The log on stderr, bounded: each call site rate-limited, the file rotated
/// ([`fabric_vmm::logging`]): a guest drives much of what is logged.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    LogWriter::init();
    let env = tracing_subscriber::EnvFilter::try_from_env("FABRIC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(log_layer(
            env,
            || LogWriter,
            std::io::stderr().is_terminal(),
        ))
        .init();
}

/// Stops the guest once the lease in `path` runs out. The agent renews the file; a file that
/// cannot be read keeps the last lease seen.
fn enforce_lease(path: &Path, mut lease: LeaseFile, control: &ControlSender) {
    loop {
        set_lease_expiry(lease.expiry_boottime_ns());
        let left = lease.remaining();
        if left.is_zero() {
            tracing::warn!(lease = %path.display(), "the host's lease expired: stopping the guest (fenced)");
            if let Err(err) = control.call(Command::ForceStop) {
                tracing::debug!(error = %err, "stop after the lease expired");
            }
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
        match LeaseFile::read(path) {
            Ok(renewed) => lease = renewed,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the lease; keeping the last one")
            }
        }
    }
}

/// The error and its causes on one line, without repeating a cause that an outer message
/// already quotes (most of ours do, to name the value that failed).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(args: Args, start: Instant) -> anyhow::Result<ExitCode> {
    let kvm = open_kvm()?;
    let console_input = args.console == ConsoleOutput::Stdout;
    let config = VmRequest {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        console: args.console,
        control_socket: args.control_socket,
        disks: args.disks,
        nets: args.nets,
        rng: args.rng,
        balloon: args.balloon,
    }
    .validate(kvm.get_max_vcpus() as u32)?;

    let lease = match &args.lease_file {
        Some(path) => {
            let lease = LeaseFile::read(path).map_err(anyhow::Error::msg)?;
            if lease.remaining().is_zero() {
                anyhow::bail!(
                    "the host's lease in {} has expired: not starting the guest",
                    path.display()
                );
            }
            // Checked by every vCPU before each entry into the guest from the first on.
            set_lease_expiry(lease.expiry_boottime_ns());
            Some((path.clone(), lease))
        }
        None => None,
    };
    let vm = build_vm(&kvm, &config, start)?;
    tracing::info!(
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        kernel = %config.kernel.display(),
        entry = format_args!("{:#x}", vm.kernel.entry.0),
        guest_decompresses = vm.kernel.guest_decompresses,
        cpu_profile = ?vm.cpu_profile,
        setup_ms = start.elapsed().as_millis() as u64,
        "VM built"
    );
    let info = VmInfo::new(config.vcpus, config.memory_mib, start, vm.boot_time.clone());
    let (control_tx, control_rx) = control_channel()?;
    if let Some((path, lease)) = lease {
        let control = control_tx.clone();
        std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || enforce_lease(&path, lease, &control))?;
    }
    let control = match &config.control_socket {
        Some(path) => Some(ControlServer::start(
            path,
            args.vm_id,
            info.clone(),
            control_tx,
            vm.balloon.clone(),
        )?),
        None => None,
    };

    let reason = run_vm(vm, &info, control_rx, console_input)?;
    if let Some(control) = control {
        control.stop(Duration::from_secs(2));
    }
    Ok(match reason {
        ExitReason::GuestStopped(how) => {
            tracing::info!(how, "guest stopped");
            ExitCode::SUCCESS
        }
        ExitReason::Forced => {
            tracing::info!("guest stopped by a forced shutdown");
            ExitCode::SUCCESS
        }
        ExitReason::Failed(why) => {
            eprintln!("fabric-vmm: guest failed: {why}");
            ExitCode::from(2)
        }
    })
}
