//! Boots the default guest kernel with virtio devices and checks what the guest kernel did with
//! them: both disks probed with their sizes, the read-only rootfs mounted as the root
//! filesystem, the entropy device read by the kernel's hwrng core.
//!
//! On hosts without hardware virtualization guest user space cannot run (`shared/KVM-HOST.md`),
//! so the checks are on the guest kernel's console and the VMM's own log.

use fabric_test_support::guest as common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, tail, vmm_binary, Image, BOOT_TIMEOUT};

/// A fabric-vmm with extra arguments, its console and log in a private directory; killed (by
/// its own PID) when dropped.
struct Vmm {
    child: Child,
    /// Holds the console and log; removed when the VMM is dropped.
    _dir: tempfile::TempDir,
    console: PathBuf,
    log: PathBuf,
}

impl Vmm {
    fn start(image: &Image, cmdline: &str, extra_args: &[String], dir: tempfile::TempDir) -> Vmm {
        let console = dir.path().join("console.log");
        let log = dir.path().join("vmm.log");
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--kernel")
            .arg(image.kernel())
            .arg("--cmdline")
            .arg(cmdline)
            .args(["--vcpus", "1", "--memory", "256"])
            .arg("--console")
            .arg(&console)
            .args(extra_args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn fabric-vmm");
        Vmm {
            child,
            _dir: dir,
            console,
            log,
        }
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `found(console, log)` holds; panics with both if the time runs out or the
    /// VMM exits first.
    fn wait_for(&mut self, what: &str, found: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let (console, log) = (self.console_text(), self.log_text());
            if found(&console, &log) {
                return;
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            // One last look: the VMM may have written it just before it exited.
            if exited && found(&self.console_text(), &self.log_text()) {
                return;
            }
            if exited || Instant::now() >= deadline {
                panic!(
                    "{} waiting for {what}\n--- console ---\n{}\n--- vmm log ---\n{log}",
                    if exited {
                        "fabric-vmm exited"
                    } else {
                        "timed out"
                    },
                    tail(&console)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sectors(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
        / 512
}

/// The line Linux's virtio_blk prints for disk `name` of `sectors` sectors.
fn probe_line(name: &str, sectors: u64) -> String {
    format!("[{name}] {sectors} 512-byte logical blocks")
}

#[test]
fn two_disks_are_probed_with_their_sizes_and_the_read_only_rootfs_becomes_root() {
    if !kvm_available("two_disks_and_rng") {
        return;
    }
    let image = Image::load();
    let rootfs = image.dir.join("rootfs.ext4");
    let dir = tempfile::Builder::new()
        .prefix("fabric-virtio-test-")
        .tempdir()
        .expect("temp dir");
    // A sparse scratch disk of a size unlike the rootfs's, so the two probe lines differ.
    let scratch = dir.path().join("scratch.img");
    std::fs::File::create(&scratch)
        .and_then(|f| f.set_len(40 << 20))
        .expect("scratch disk");
    let cmdline = image.cmdline().replace("root=/dev/vdz", "root=/dev/vda ro");
    assert!(cmdline.contains("root=/dev/vda ro"), "{cmdline}");
    let args = vec![
        "--disk".to_string(),
        format!("{},ro", rootfs.display()),
        "--disk".to_string(),
        scratch.display().to_string(),
        "--rng".to_string(),
    ];
    let mut vmm = Vmm::start(&image, &cmdline, &args, dir);

    let mounted = "VFS: Mounted root (ext4 filesystem) readonly";
    vmm.wait_for(mounted, |console, _| console.contains(mounted));
    let console = vmm.console_text();
    for (name, path) in [("vda", &rootfs), ("vdb", &scratch)] {
        let want = probe_line(name, sectors(path));
        assert!(
            console.contains(&want),
            "no {want:?} on the console:\n{}",
            tail(&console)
        );
    }
    assert!(
        console.contains("EXT4-fs (vda): mounted filesystem"),
        "{}",
        tail(&console)
    );

    // The hwrng core reads from a new RNG as soon as it registers.
    let rng_used = "virtio-rng: guest requested entropy";
    vmm.wait_for(rng_used, |_, log| log.contains(rng_used));

    // Linux's drivers never trip the transport's or the devices' checks.
    let log = vmm.log_text();
    for complaint in [
        "misuse refused",
        "request refused",
        "needs a reset",
        "cannot start",
    ] {
        assert!(
            !log.contains(complaint),
            "VMM log has {complaint:?}:\n{log}"
        );
    }
    if image.userspace() {
        eprintln!("two_disks_and_rng: checked the guest kernel (user space runs here too)");
    } else {
        eprintln!("two_disks_and_rng: kernel-only checks (guest user space cannot run here)");
    }
    drop(vmm);
}

#[test]
fn a_disk_that_cannot_be_opened_is_a_config_error() {
    if !kvm_available("disk_cannot_be_opened") {
        return;
    }
    let image = Image::load();
    let out = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(image.kernel())
        .args(["--console", "off", "--disk", "/nonexistent/disk.img,ro"])
        .output()
        .expect("run fabric-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        "fabric-vmm: --disk /nonexistent/disk.img: cannot open: No such file or directory (os error 2)"
    );

    let out = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(image.kernel())
        .args(["--console", "off", "--disk", "/tmp/x.img,readonly"])
        .output()
        .expect("run fabric-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown option \"readonly\""), "{stderr}");
}
