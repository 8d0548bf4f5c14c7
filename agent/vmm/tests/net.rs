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

use fabric_test_support::guest::{refusal, vmm_binary, Guest, GuestSpec, BOOT_TIMEOUT};
use fabric_test_support::netns::{mac_text, NetNs, PacketSocket};
use fabric_test_support::testguest;
use fabric_test_support::{image_or_skip, skip_without_kvm};

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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

/// A namespace of this test's own, removed (with its taps) when it drops.
fn netns() -> NetNs {
    NetNs::new(&format!("fabric-net-{}", unique())).expect("a network namespace")
}

/// A new tap in `ns`, up, with `address` (CIDR) if given.
fn add_tap(ns: &mut NetNs, address: Option<&str>) -> String {
    let tap = format!("fbt{}", unique());
    ns.add_tap(&tap, address).expect("a tap");
    tap
}

#[test]
fn testguest_frame_crosses_the_tap_both_ways() {
    skip_without_kvm!("net: testguest frame both ways");
    let mut ns = netns();
    let tap = add_tap(&mut ns, None);
    // Open before the guest starts, so its frame cannot come too early.
    let socket = ns
        .run_inside(|| PacketSocket::bind(&tap, ETHERTYPE_TEST))
        .expect("a packet socket on the tap");
    let net_arg = format!("tap={tap},mac={}", mac_text(&GUEST_MAC));
    let mut vmm = Guest::testguest(
        "net",
        GuestSpec {
            memory_mib: 64,
            vmm_args: &["--net", &net_arg],
            netns: Some(ns.name()),
            ..Default::default()
        },
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
    socket.send(&answer).expect("send the answer on the tap");

    let status = vmm.expect_exit(TESTGUEST_TIMEOUT);
    let console = vmm.console_text();
    let verdict = testguest::verdict(&console, "net")
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
    let image = image_or_skip!("net: guest kernel answers ping");
    let mut ns = netns();
    let tap = add_tap(&mut ns, Some("10.77.0.1/24"));
    let mac = [0x02, 0xfb, 0x00, 0x00, 0x00, 0x0a];
    let net_arg = format!("tap={tap},mac={}", mac_text(&mac));
    let mut vmm = Guest::boot(
        &image,
        GuestSpec {
            extra_cmdline: "ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off",
            vmm_args: &["--net", &net_arg],
            netns: Some(ns.name()),
            initramfs: false,
            ..Default::default()
        },
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

    let out = ns
        .command("ping")
        .args(["-c", "3", "-W", "5", "10.77.0.2"])
        .output()
        .expect("run ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ping 10.77.0.2 from {}: {}\n{stdout}{}\n{}",
        ns,
        out.status,
        String::from_utf8_lossy(&out.stderr),
        vmm.report()
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default();
    assert!(summary.contains(" 0% packet loss"), "{stdout}");
    eprintln!("net: ping 10.77.0.2 in {ns}: {summary}");

    // Linux's driver never trips the device's or the transport's checks.
    vmm.assert_no_device_complaints();
    eprintln!("net: kernel-level checks ({})", image.userspace_note());
    drop(vmm);
    drop(ns);
}

#[test]
fn a_tap_that_cannot_be_opened_is_a_config_error() {
    skip_without_kvm!("net: missing tap");
    let mut ns = netns();
    let missing = format!("fbx{}", unique());
    let stderr = refused_tap(&ns, &missing);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "fabric-vmm: --net tap={missing}: cannot open tap {missing}: no such network interface"
        )),
        "{stderr}"
    );

    // A tap another process holds is busy.
    let tap = add_tap(&mut ns, None);
    let _hold = ns.run_inside(|| Ok(hold_tap(&tap))).expect("hold the tap");
    let stderr = refused_tap(&ns, &tap);
    assert!(
        stderr.contains(&format!("--net tap={tap}: cannot open tap {tap}: "))
            && stderr.contains("busy"),
        "{stderr}"
    );
}

/// What fabric-vmm in `ns` says when it cannot have `tap` (it must refuse to start).
fn refused_tap(ns: &NetNs, tap: &str) -> String {
    refusal(
        ns.command(vmm_binary())
            .arg("--kernel")
            .arg(testguest::elf())
            .args(["--net", &format!("tap={tap}")]),
    )
}

/// Attaches to `tap` the way fabric-vmm does, so that it is busy for anyone else.
fn hold_tap(tap: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // SAFETY: all-zero bytes are a valid `ifreq`.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(tap.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the live `ifreq` passed.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    assert_eq!(
        ret,
        0,
        "TUNSETIFF {tap}: {}",
        std::io::Error::last_os_error()
    );
    file
}
