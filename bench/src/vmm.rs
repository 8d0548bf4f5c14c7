//! The VMMs the comparison benchmarks run side by side, fabric-vmm and QEMU ([`VmmKind`]),
//! booting the same guest with its serial console on stdout, and [`ConsoleVmm`], the running
//! process whose console lines are read as they come, each with the instant it was read.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::interrupt::check_interrupted;
use fabric_test_support::host::tail_lines;

/// A VMM a comparison runs, as `--vmms` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum VmmKind {
    /// fabric-vmm.
    Fabric,
    /// QEMU `-M microvm` (virtio-mmio, no PCI, no keyboard controller).
    QemuMicrovm,
    /// QEMU `-M pc`.
    QemuPc,
}

impl VmmKind {
    /// The name `--vmms` takes.
    pub fn name(self) -> &'static str {
        match self {
            VmmKind::Fabric => "fabric",
            VmmKind::QemuMicrovm => "qemu-microvm",
            VmmKind::QemuPc => "qemu-pc",
        }
    }

    /// The name a table gives it.
    pub fn title(self) -> &'static str {
        match self {
            VmmKind::Fabric => "fabric-vmm",
            VmmKind::QemuMicrovm => "QEMU microvm",
            VmmKind::QemuPc => "QEMU pc",
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// The command-line flags of every comparison: which fabric-vmm to measure, and how much
/// memory its guests get (and QEMU's).
#[derive(clap::Args, Debug)]
pub struct VmmArgs {
    /// The fabric-vmm binary.
    #[arg(long, default_value = "target/release/fabric-vmm")]
    pub fabric_vmm: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
}

/// What a VMM boots: the same for every VMM of a comparison.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// `program` (fabric-vmm, perhaps run through `ip netns exec`) booting `boot`, its console on
/// stdout; devices and the control socket are the caller's to add.
pub fn fabric_vmm(mut program: Command, boot: &Boot) -> Command {
    program
        .arg("--kernel")
        .arg(boot.kernel)
        .args(["--cmdline", boot.cmdline])
        .args(["--vcpus", &boot.vcpus.to_string()])
        .args(["--memory", &boot.memory_mib.to_string()])
        .args(["--console", "stdout"]);
    program
}

/// `program` (QEMU, perhaps run through `ip netns exec`) booting `boot` on KVM as machine
/// `machine`, its serial console on stdout, no other device, no reboot.
pub fn qemu(mut program: Command, machine: &str, boot: &Boot) -> Command {
    // CX16 is hidden as fabric-vmm hides it; QEMU 7.2 cannot set IA32_ARCH_CAPABILITIES on a
    // software-nested KVM and aborts unless the feature is off.
    program
        .args(["-M", machine, "-enable-kvm"])
        .args(["-cpu", "host,-cx16,-arch-capabilities"])
        .args(["-smp", &boot.vcpus.to_string()])
        .args(["-m", &boot.memory_mib.to_string()])
        .arg("-kernel")
        .arg(boot.kernel)
        .args(["-append", boot.cmdline])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"]);
    program
}

/// A VMM process and its console lines; killed (by its own pid) and reaped on drop.
pub struct ConsoleVmm {
    pub child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    stderr: PathBuf,
    /// Every console line read so far.
    pub console: Vec<String>,
}

impl ConsoleVmm {
    /// Starts `cmd` with its stdout read line by line and its stderr in the file `stderr`.
    pub fn spawn(mut cmd: Command, stderr: PathBuf) -> Result<ConsoleVmm> {
        let err_file = File::create(&stderr).with_context(|| stderr.display().to_string())?;
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
        Ok(ConsoleVmm {
            child,
            lines,
            stderr,
            console: Vec::new(),
        })
    }

    /// Waits for the console line that `wanted` accepts (it may also fail the wait, for a
    /// line that says the guest failed); returns when it was read and the line. Fails at
    /// `deadline`, when the VMM exits first, or on Ctrl-C.
    pub fn wait_line(
        &mut self,
        what: &str,
        deadline: Instant,
        mut wanted: impl FnMut(&str) -> Result<bool>,
    ) -> Result<(Instant, String)> {
        loop {
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {what} on the console in time{}", self.report());
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok((at, line)) => {
                    let line = line.trim_end().to_string();
                    self.console.push(line.clone());
                    if wanted(&line).map_err(|e| e.context(self.report()))? {
                        return Ok((at, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("the VMM exited ({status}) before {what}{}", self.report());
                }
            }
        }
    }

    /// Waits up to `timeout` for the VMM to exit; whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The last console lines and the last lines of stderr, for error messages.
    pub fn report(&self) -> String {
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let indent = |text: String| text.replace('\n', "\n    ");
        format!(
            "\n  console:\n    {}\n  stderr:\n    {}",
            indent(tail_lines(&self.console.join("\n"), 15)),
            indent(tail_lines(&stderr, 15))
        )
    }
}

impl Drop for ConsoleVmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
