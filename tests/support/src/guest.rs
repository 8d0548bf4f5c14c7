//! Harness for tests that run real fabric-vmm processes: the default guest image from
//! `images/out` or the freestanding test guest, optionally inside a network namespace, a
//! private temp dir per VM, and cleanup of the process when the test ends, pass or fail.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a guest may take to reach a console line. Guest kernels take ~30 s on hosts where
/// KVM is emulated (`shared/KVM-HOST.md`), longer when several boot at once on two cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(400);

pub use crate::image::Image;

/// Returns false (after saying so loudly) when this host has no usable /dev/kvm.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(err) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({err}); this test needs KVM");
            println!("SKIPPED {test}: /dev/kvm is not usable here ({err})");
            false
        }
    }
}

/// Returns from the calling test, after saying why, where this host has no usable `/dev/kvm`:
/// the first line of every test that runs fabric-vmm.
#[macro_export]
macro_rules! skip_without_kvm {
    ($test:expr) => {
        if !$crate::guest::kvm_available($test) {
            return;
        }
    };
}

/// [`skip_without_kvm!`], then the guest image the test boots ([`Image::built`]).
#[macro_export]
macro_rules! image_or_skip {
    ($test:expr) => {{
        $crate::skip_without_kvm!($test);
        $crate::image::Image::built()
    }};
}

/// The fabric-vmm binary cargo built for these tests.
pub fn vmm_binary() -> PathBuf {
    crate::cluster::workspace_bin("fabric-vmm")
}

/// Runs `vmm`, a fabric-vmm command line the VMM must refuse, with no console: asserts that it
/// exits with status 1 and does not panic, and returns what it printed on stderr.
pub fn refusal(vmm: &mut Command) -> String {
    let out = vmm
        .args(["--console", "off"])
        .output()
        .expect("run fabric-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{vmm:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{vmm:?}: {stderr}");
    stderr
}

/// Guests of one test binary boot one at a time: on a two-core host where KVM is emulated,
/// several multi-vCPU guests at once slow each other down by minutes, and a test measures what
/// its guest's kernel did, not how the host shares its cores.
static BOOT_SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A running fabric-vmm with its console and log in a private directory; killed (by its own
/// pid) when dropped.
pub struct Guest {
    _slot: std::sync::MutexGuard<'static, ()>,
    child: Child,
    pub dir: tempfile::TempDir,
    pub console: PathBuf,
    pub stderr: PathBuf,
    pub socket: PathBuf,
    status: Option<ExitStatus>,
}

/// What to boot. [`Guest::boot`] fills what is not set from the image, [`Guest::testguest`]
/// from the test guest.
pub struct GuestSpec<'a> {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Appended to the command line.
    pub extra_cmdline: &'a str,
    pub kernel: Option<PathBuf>,
    /// Replaces the default command line entirely.
    pub cmdline: Option<String>,
    /// Extra fabric-vmm arguments (devices).
    pub vmm_args: &'a [&'a str],
    /// Runs fabric-vmm inside this network namespace (`ip netns exec`, which execs it: the
    /// pid stays the VMM's).
    pub netns: Option<&'a str>,
    /// Whether [`Guest::boot`] passes the image's initramfs where the image uses one (not for
    /// a guest whose root is a disk).
    pub initramfs: bool,
}

impl Default for GuestSpec<'_> {
    fn default() -> Self {
        GuestSpec {
            vcpus: 1,
            memory_mib: 256,
            extra_cmdline: "",
            kernel: None,
            cmdline: None,
            vmm_args: &[],
            netns: None,
            initramfs: true,
        }
    }
}

impl Guest {
    /// Boots the image's Linux guest (its kernel, command line and, where the image uses one,
    /// its initramfs) as `spec` changes it.
    pub fn boot(image: &Image, spec: GuestSpec<'_>) -> Guest {
        let kernel = spec.kernel.clone().unwrap_or_else(|| image.kernel());
        let cmdline = spec.cmdline.clone().unwrap_or_else(|| image.cmdline());
        let initrd = (spec.initramfs && image.use_initramfs()).then(|| image.initramfs());
        Guest::start(kernel, cmdline, initrd, &spec)
    }

    /// Boots the freestanding test guest on `scenario` (see [`crate::testguest`]).
    pub fn testguest(scenario: &str, spec: GuestSpec<'_>) -> Guest {
        let kernel = spec.kernel.clone().unwrap_or_else(crate::testguest::elf);
        let cmdline = spec
            .cmdline
            .clone()
            .unwrap_or_else(|| crate::testguest::cmdline(scenario));
        Guest::start(kernel, cmdline, None, &spec)
    }

    fn start(
        kernel: PathBuf,
        mut cmdline: String,
        initrd: Option<PathBuf>,
        spec: &GuestSpec<'_>,
    ) -> Guest {
        let slot = BOOT_SLOT.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("fabric-vmm-test-")
            .tempdir()
            .expect("temp dir");
        let console = dir.path().join("console.log");
        let stderr = dir.path().join("vmm.log");
        let socket = dir.path().join("control.sock");
        if !spec.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(spec.extra_cmdline);
        }
        let mut cmd = match spec.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(vmm_binary());
                cmd
            }
            None => Command::new(vmm_binary()),
        };
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--vcpus")
            .arg(spec.vcpus.to_string())
            .arg("--memory")
            .arg(spec.memory_mib.to_string())
            .arg("--console")
            .arg(&console)
            .arg("--control-socket")
            .arg(&socket)
            .arg("--vm-id")
            .arg("test-vm");
        if let Some(initrd) = initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        cmd.args(spec.vmm_args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn fabric-vmm");
        Guest {
            _slot: slot,
            child,
            dir,
            console,
            stderr,
            socket,
            status: None,
        }
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The tails of the console and of the VMM's log, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- vmm log ---\n{}",
            tail(&self.console_text()),
            tail(&self.stderr_text())
        )
    }

    /// Asserts that the guest's drivers never tripped the checks of the virtio transport or
    /// of a device: fabric-vmm logs each refusal, and none is expected from a working driver.
    pub fn assert_no_device_complaints(&self) {
        let log = self.stderr_text();
        for complaint in [
            "chain refused",
            "request refused",
            "misuse refused",
            "needs a reset",
            "cannot start",
        ] {
            assert!(
                !log.contains(complaint),
                "VMM log has {complaint:?}:\n{log}"
            );
        }
    }

    /// The VMM's exit status once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until the console holds `needle` and returns the console; panics with the
    /// console and the VMM's log if the VMM exits first or the time runs out.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for(needle, timeout, |console, _| console.contains(needle))
    }

    /// Waits until `found(console, vmm log)` holds and returns the console; panics with both
    /// if the VMM exits first or the time runs out.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        found: impl Fn(&str, &str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text();
            if found(&text, &self.stderr_text()) {
                return text;
            }
            if let Some(status) = self.exited() {
                // One last look: the VMM may have written it just before it exited.
                let text = self.console_text();
                if found(&text, &self.stderr_text()) {
                    return text;
                }
                panic!(
                    "fabric-vmm exited ({status}) before {what:?}\n--- console ---\n{}\n--- vmm log ---\n{}",
                    tail(&text),
                    self.stderr_text()
                );
            }
            if Instant::now() >= deadline {
                // Where the guest is: fabric-vmm logs every vCPU's registers on SIGUSR2.
                // SAFETY: kill(2) on our own child's pid, which has not been reaped.
                unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGUSR2) };
                std::thread::sleep(Duration::from_secs(1));
                panic!(
                    "no {what:?} after {timeout:?}\n--- console ---\n{}\n--- vmm log ---\n{}",
                    tail(&text),
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the VMM to exit; None if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM to exit and returns how; panics with the console and the VMM's log
    /// if it still runs after `timeout` (the drop then kills it).
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "fabric-vmm still running after {timeout:?}\n{}",
                self.report()
            )
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // Only our own child, by its PID.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of a console, for failure messages.
pub fn tail(text: &str) -> String {
    crate::host::tail_lines(text, 40)
}

/// A tokio runtime for control-socket calls from synchronous tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
