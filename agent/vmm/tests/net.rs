//! virtio-net end to end, over a tap inside a network namespace each test makes for itself
//! (the tap, its address, fabric-vmm and every packet stay in there; the namespace and the tap
//! are removed when the test ends, pass or fail):
//!
//! - the freestanding test guest (`fabric.test=net`) sends a frame that the test reads from the
//!   tap with a raw socket, and receives the answer the test sends back: a frame crosses the
//!   tap both ways;
//! - the default guest kernel configures its NIC from `ip=` and answers ping from the
//!   namespace (kernel-level: guest user space cannot run on hosts where KVM is emulated, see
//!   `shared/KVM-HOST.md`).

use fabric_test_support::guest as common;
use fabric_test_support::netns::NetNs;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, MsgFlags};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{kvm_available, tail, vmm_binary, Image, BOOT_TIMEOUT};

/// IEEE 802 "local experimental" EtherType, which the test guest's scenario uses.
const ETHERTYPE_TEST: u16 = 0x88b5;
/// What the test guest sends, and the start of what it expects back (images/testguest/net.c).
const GUEST_PAYLOAD: &[u8] = b"fabric-testguest net: guest to host";
const HOST_PREFIX: &str = "fabric-testguest net: host to guest";
/// The test guest's MAC, given on the command line so the test can check it on the wire.
const GUEST_MAC: [u8; 6] = [0x02, 0xfb, 0x00, 0x00, 0x00, 0x01];
/// The answer's source: any locally administered address.
const HOST_MAC: [u8; 6] = [0x02, 0xfb, 0x00, 0x00, 0x00, 0x02];
/// The test guest needs milliseconds; this bounds a hang.
const TESTGUEST_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique suffix per test in this process: pid and a counter.
fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// An AF_PACKET socket bound to one interface and one EtherType: it receives what comes in on
/// the interface (from the VMM, for a tap) and sends frames out of it (to the VMM).
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(ns: &NetNs, ifname: &str, ethertype: u16) -> PacketSocket {
        ns.run_inside(|| {
            // Raw socket(2) and bind(2): nix's take neither an arbitrary EtherType as the
            // protocol nor a sockaddr_ll built here.
            // SAFETY: plain socket(2); the result is checked before use.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ethertype.to_be()),
                )
            };
            assert!(
                raw >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a socket we just opened and own from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let index = nix::net::if_::if_nametoindex(ifname)
                .unwrap_or_else(|e| panic!("no interface {ifname:?} in the namespace: {e}"));
            // SAFETY: all-zero bytes are a valid `sockaddr_ll`.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ethertype.to_be();
            addr.sll_ifindex = index as i32;
            // SAFETY: `addr` is a live `sockaddr_ll` and the length given is its size.
            let ret = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
            PacketSocket { fd }
        })
    }

    /// The next frame, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let wait = PollTimeout::try_from(left.min(Duration::from_secs(1))).expect("1 s fits");
            if !poll(&mut fds, wait).is_ok_and(|ready| ready > 0) {
                continue;
            }
            let mut buf = vec![0u8; 2048];
            if let Ok(n @ 1..) = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }

    fn send(&self, frame: &[u8]) {
        // The socket is bound, so the kernel sends out of the bound interface.
        let n = send(self.fd.as_raw_fd(), frame, MsgFlags::empty()).expect("send on the tap");
        assert_eq!(n, frame.len(), "send on the tap: short");
    }
}

/// A fabric-vmm running inside a namespace, its console and log in a private directory; killed
/// (by its own PID) when dropped.
struct Vmm {
    child: Child,
    _dir: tempfile::TempDir,
    console: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Vmm {
    fn start(ns: &NetNs, kernel: &Path, cmdline: &str, memory_mib: u32, extra: &[String]) -> Vmm {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fabric-net-test-{}-", unique()))
            .tempdir()
            .expect("temp dir");
        let console = dir.path().join("console.log");
        let log = dir.path().join("vmm.log");
        let child = ns
            .command(vmm_binary())
            .arg("--kernel")
            .arg(kernel)
            .arg("--cmdline")
            .arg(cmdline)
            .args(["--vcpus", "1", "--memory", &memory_mib.to_string()])
            .arg("--console")
            .arg(&console)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn ip netns exec fabric-vmm");
        Vmm {
            child,
            _dir: dir,
            console,
            log,
            status: None,
        }
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- vmm log ---\n{}",
            tail(&self.console_text()),
            tail(&self.log_text())
        )
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until the console holds `needle`; panics if the VMM exits first or time runs out.
    fn wait_console(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console_text().contains(needle) {
                return;
            }
            if let Some(status) = self.exited() {
                if self.console_text().contains(needle) {
                    return;
                }
                panic!(
                    "fabric-vmm exited ({status}) before the console showed {needle:?}\n{}",
                    self.report()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console after {timeout:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fabric-vmm still running after {timeout:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // Only our own child, by its PID.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn testguest_elf() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/out/testguest.elf");
    assert!(
        path.is_file(),
        "{} is missing: build it with `bash images/build.sh`",
        path.display()
    );
    path
}

#[test]
fn testguest_frame_crosses_the_tap_both_ways() {
    if !kvm_available("net: testguest frame both ways") {
        return;
    }
    let mut ns = NetNs::new("fabric-net");
    let tap = ns.add_tap(None);
    // Open before the guest starts, so its frame cannot come too early.
    let socket = PacketSocket::open(&ns, &tap, ETHERTYPE_TEST);
    let net_arg = format!("tap={tap},mac={}", mac_text(&GUEST_MAC));
    let mut vmm = Vmm::start(
        &ns,
        &testguest_elf(),
        "fabric.test=net",
        64,
        &["--net".into(), net_arg],
    );

    // Guest to host: the frame as the guest built it, with the MAC from the config space.
    let frame = socket
        .recv(TESTGUEST_TIMEOUT)
        .unwrap_or_else(|| panic!("no frame from the guest on {tap}\n{}", vmm.report()));
    assert_eq!(frame[0..6], [0xff; 6], "broadcast destination");
    assert_eq!(
        frame[6..12],
        GUEST_MAC,
        "source is the MAC given with --net"
    );
    assert_eq!(frame[12..14], ETHERTYPE_TEST.to_be_bytes());
    assert_eq!(
        &frame[14..],
        GUEST_PAYLOAD,
        "payload: {:?}",
        String::from_utf8_lossy(&frame[14..])
    );

    // Host to guest: an answer with a payload the guest cannot know in advance.
    let answer_text = format!("{HOST_PREFIX} {}", unique());
    let mut answer = Vec::new();
    answer.extend_from_slice(&GUEST_MAC);
    answer.extend_from_slice(&HOST_MAC);
    answer.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    answer.extend_from_slice(answer_text.as_bytes());
    socket.send(&answer);

    let status = vmm.wait_exit(TESTGUEST_TIMEOUT);
    let console = vmm.console_text();
    let verdict = console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("testguest: net: "))
        .find(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no verdict\n{}", vmm.report()))
        .to_string();
    assert!(
        status.success(),
        "fabric-vmm exited with {status}\n{}",
        vmm.report()
    );
    assert!(verdict.starts_with("PASS"), "{verdict}\n{}", vmm.report());
    assert!(
        verdict.contains(&format!("\"{answer_text}\"")) && verdict.contains(&mac_text(&HOST_MAC)),
        "the guest did not get the answer {answer_text:?} from {}: {verdict}",
        mac_text(&HOST_MAC)
    );
    eprintln!("net: {verdict}");
    drop(vmm);
    drop(ns);
}

#[test]
fn the_guest_kernel_configures_its_nic_and_answers_ping_in_the_namespace() {
    if !kvm_available("net: guest kernel answers ping") {
        return;
    }
    let image = Image::load();
    let mut ns = NetNs::new("fabric-net");
    let tap = ns.add_tap(Some("10.77.0.1/24"));
    let mac = [0x02, 0xfb, 0x00, 0x00, 0x00, 0x0a];
    let cmdline = format!(
        "{} ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off",
        image.cmdline()
    );
    let mut vmm = Vmm::start(
        &ns,
        &image.kernel(),
        &cmdline,
        256,
        &["--net".into(), format!("tap={tap},mac={}", mac_text(&mac))],
    );
    vmm.wait_console("IP-Config: Complete:", BOOT_TIMEOUT);
    vmm.wait_console(&image.ready_marker(), BOOT_TIMEOUT);
    let console = vmm.console_text();
    for want in [
        format!("hwaddr={}", mac_text(&mac)),
        "ipaddr=10.77.0.2".to_string(),
    ] {
        assert!(
            console.contains(&want),
            "no {want:?} on the console\n{}",
            vmm.report()
        );
    }

    let out = run(ns.command("ping").args(["-c", "3", "-W", "5", "10.77.0.2"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ping 10.77.0.2 from {}: {}\n{stdout}{}\n{}",
        ns.name,
        out.status,
        String::from_utf8_lossy(&out.stderr),
        vmm.report()
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default();
    assert!(summary.contains(" 0% packet loss"), "{stdout}");
    eprintln!("net: ping 10.77.0.2 in {}: {summary}", ns.name);

    // Linux's driver never trips the device's or the transport's checks.
    let log = vmm.log_text();
    for complaint in [
        "chain refused",
        "misuse refused",
        "needs a reset",
        "cannot start",
    ] {
        assert!(
            !log.contains(complaint),
            "VMM log has {complaint:?}:\n{log}"
        );
    }
    if image.userspace() {
        eprintln!("net: kernel-level checks (user space runs here too)");
    } else {
        eprintln!("net: kernel-level checks (guest user space cannot run here)");
    }
    drop(vmm);
    drop(ns);
}

#[test]
fn a_tap_that_cannot_be_opened_is_a_config_error() {
    if !kvm_available("net: missing tap") {
        return;
    }
    let mut ns = NetNs::new("fabric-net");
    let missing = format!("fbx{}", unique());
    let out = run(ns
        .command(vmm_binary())
        .arg("--kernel")
        .arg(testguest_elf())
        .args(["--console", "off", "--net", &format!("tap={missing}")]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "fabric-vmm: --net tap={missing}: cannot open tap {missing}: no such network interface"
        )),
        "{stderr}"
    );

    // A tap another process holds is busy.
    let tap = ns.add_tap(None);
    let _hold = ns.run_inside(|| hold_tap(&tap));
    let out = run(ns
        .command(vmm_binary())
        .arg("--kernel")
        .arg(testguest_elf())
        .args(["--console", "off", "--net", &format!("tap={tap}")]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--net tap={tap}: cannot open tap {tap}: "))
            && stderr.contains("busy"),
        "{stderr}"
    );
}

/// Attaches to `tap` the way fabric-vmm does, so that it is busy for anyone else.
fn hold_tap(tap: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
    // SAFETY: all-zero bytes are a valid `ifreq`.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(tap.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the live `ifreq` passed, on an open /dev/net/tun.
    unsafe { tun_set_iff(file.as_raw_fd(), &mut request) }
        .unwrap_or_else(|e| panic!("TUNSETIFF {tap}: {}", std::io::Error::from(e)));
    file
}
