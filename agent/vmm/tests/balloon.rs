//! The balloon end to end, driven over the control socket: `SetBalloonTarget` moves the guest's
//! balloon, the pages it gives up leave the VMM process's resident memory, and
//! `GetMemoryStats` returns the guest's own statistics.
//!
//! Two guests: the freestanding test guest's `balloon` scenario (`images/testguest/balloon.c`),
//! a driver whose memory use and statistics are known exactly, which touches 128 MiB and then
//! follows the host's target; and the default Linux guest kernel, whose virtio-balloon driver
//! reports its real numbers and inflates on request (kernel-level, see `shared/KVM-HOST.md`).

use fabric_test_support::guest::{runtime, Guest, GuestSpec, Image, BOOT_TIMEOUT};
use fabric_test_support::process::rss_kib;
use fabric_test_support::testguest;
use fabric_test_support::{image_or_skip, skip_without_kvm};

use std::path::Path;
use std::time::{Duration, Instant};

use fabric_proto::v1::vmm_client::VmmClient;
use fabric_proto::v1::{GetMemoryStatsRequest, MemoryStats, SetBalloonTargetRequest};
use fabric_vmm_api::client;
use tonic::transport::Channel;

/// What `images/testguest/balloon.c` reports (its STAT_* constants).
const TG_SWAP_IN: u64 = 11 * 4096;
const TG_SWAP_OUT: u64 = 22 * 4096;
const TG_MAJFLT: u64 = 33;
const TG_MINFLT_BASE: u64 = 4400;
const TG_CACHES: u64 = 5 << 20;
/// The test guest touches this much and gives it all to the balloon.
const TG_TOUCH_MIB: u64 = 128;
const TG_MEMORY_MIB: u64 = 256;
/// The test guest boots in milliseconds; this bounds each wait for it.
const TG_TIMEOUT: Duration = Duration::from_secs(60);

/// Resident memory of the running fabric-vmm `pid`, KiB.
fn vmm_rss_kib(pid: u32) -> u64 {
    rss_kib(pid).unwrap_or_else(|| panic!("no VmRSS for fabric-vmm {pid}: has it exited?"))
}

/// When the guest posted the statistics, as (seconds, nanoseconds).
fn stamp(stats: &MemoryStats) -> (i64, i32) {
    let at = stats.updated_at.expect("updated_at");
    (at.seconds, at.nanos)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Connects to the control socket, retrying while the VMM brings it up.
fn connect(rt: &tokio::runtime::Runtime, socket: &Path) -> VmmClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rt.block_on(client::connect(socket)) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(err) => panic!("control socket {}: {err}", socket.display()),
        }
    }
}

fn memory_stats(rt: &tokio::runtime::Runtime, c: &mut VmmClient<Channel>) -> MemoryStats {
    rt.block_on(c.get_memory_stats(GetMemoryStatsRequest {}))
        .expect("GetMemoryStats")
        .into_inner()
        .stats
        .expect("GetMemoryStats returned no stats")
}

/// Sets the target; returns (target, actual) from the reply.
fn set_target(rt: &tokio::runtime::Runtime, c: &mut VmmClient<Channel>, mib: u64) -> (u64, u64) {
    let reply = rt
        .block_on(c.set_balloon_target(SetBalloonTargetRequest {
            balloon_target_mib: mib,
        }))
        .expect("SetBalloonTarget")
        .into_inner();
    (reply.balloon_target_mib, reply.balloon_actual_mib)
}

/// Calls GetMemoryStats until `done` holds; panics with `report()` after `timeout`.
fn wait_stats(
    rt: &tokio::runtime::Runtime,
    c: &mut VmmClient<Channel>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&MemoryStats) -> bool,
    report: impl Fn() -> String,
) -> (MemoryStats, Duration) {
    let start = Instant::now();
    loop {
        let stats = memory_stats(rt, c);
        if done(&stats) {
            return (stats, start.elapsed());
        }
        if start.elapsed() > timeout {
            panic!(
                "{what}: not after {timeout:?}; last stats {stats:?}\n{}",
                report()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The test guest's `balloon` scenario in [`TG_MEMORY_MIB`], with `balloon_args` (its
/// `--balloon` device); waits until the guest has touched its 128 MiB.
fn balloon_testguest(balloon_args: &[&str]) -> Guest {
    let mut guest = Guest::testguest(
        "balloon",
        GuestSpec {
            memory_mib: TG_MEMORY_MIB,
            vmm_args: balloon_args,
            ..Default::default()
        },
    );
    guest.wait_console("touched 128 MiB", TG_TIMEOUT);
    guest
}

/// The image's Linux guest in 256 MiB with a balloon that reports free pages; waits until
/// it has booted.
fn balloon_linux_guest(image: &Image) -> Guest {
    let mut guest = Guest::boot(
        image,
        GuestSpec {
            memory_mib: 256,
            vmm_args: &["--balloon", "free-page-reporting=on"],
            ..Default::default()
        },
    );
    guest.wait_console(&image.ready_marker(), BOOT_TIMEOUT);
    guest
}

#[test]
fn testguest_inflation_returns_its_memory_to_the_host_and_statistics_round_trip() {
    skip_without_kvm!("balloon testguest");
    let mut vmm = balloon_testguest(&["--balloon"]);
    let pid = vmm.pid();
    let rt = runtime();
    let mut c = connect(&rt, &vmm.socket);

    // The guest's first statistics, posted before DRIVER_OK; each call asks for fresh ones.
    let first = memory_stats(&rt, &mut c);
    assert!(first.updated_at.is_some(), "no statistics: {first:?}");
    assert_eq!(first.swap_in_bytes, Some(TG_SWAP_IN), "{first:?}");
    assert_eq!(first.swap_out_bytes, Some(TG_SWAP_OUT), "{first:?}");
    assert_eq!(first.major_faults, Some(TG_MAJFLT), "{first:?}");
    assert_eq!(first.disk_caches_bytes, Some(TG_CACHES), "{first:?}");
    let total = first.total_bytes.expect("total");
    assert!(
        (250 << 20..=TG_MEMORY_MIB << 20).contains(&total),
        "total {total} is not the guest's RAM (about {TG_MEMORY_MIB} MiB)"
    );
    assert_eq!(first.free_bytes, Some(total - (TG_TOUCH_MIB << 20)));
    assert_eq!(
        first.hugetlb_allocations, None,
        "a tag the guest did not send"
    );
    let first_minflt = first.minor_faults.expect("minor faults");
    assert!(first_minflt >= TG_MINFLT_BASE, "{first:?}");
    let second = memory_stats(&rt, &mut c);
    let second_minflt = second.minor_faults.expect("minor faults");
    assert!(
        second_minflt > first_minflt && stamp(&second) > stamp(&first),
        "GetMemoryStats did not bring fresh statistics: {first:?} then {second:?}"
    );
    assert_eq!(
        (second.balloon_target_mib, second.balloon_actual_mib),
        (0, 0)
    );

    // Inflate: the guest gives its 128 MiB back; the VMM's RSS falls by that much.
    let rss_before = vmm_rss_kib(pid);
    assert!(
        rss_before >= TG_TOUCH_MIB * 1024,
        "RSS {rss_before} KiB before inflating: the guest's touch did not commit memory"
    );
    assert_eq!(set_target(&rt, &mut c, TG_TOUCH_MIB).0, TG_TOUCH_MIB);
    let (inflated, took) = wait_stats(
        &rt,
        &mut c,
        "balloon actual reaches 128 MiB",
        TG_TIMEOUT,
        |s| s.balloon_actual_mib == TG_TOUCH_MIB,
        || vmm.report(),
    );
    let rss_after = vmm_rss_kib(pid);
    let dropped = rss_before.saturating_sub(rss_after);
    eprintln!(
        "testguest balloon: RSS {:.1} MiB before, {:.1} MiB after inflating {TG_TOUCH_MIB} MiB \
         (dropped {:.1} MiB; guest acknowledged in {} ms)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        dropped as f64 / 1024.0,
        took.as_millis()
    );
    assert!(
        dropped >= TG_TOUCH_MIB * 1024 * 9 / 10,
        "RSS dropped by {dropped} KiB, want at least 90% of {TG_TOUCH_MIB} MiB\n{}",
        vmm.report()
    );
    assert_eq!(inflated.balloon_target_mib, TG_TOUCH_MIB);

    // The guest keeps running: it answers with fresh numbers that count the balloon.
    let (fresh, _) = wait_stats(
        &rt,
        &mut c,
        "statistics that count the inflated balloon",
        TG_TIMEOUT,
        |s| s.free_bytes == Some(total),
        || vmm.report(),
    );
    assert!(fresh.minor_faults > second.minor_faults, "{fresh:?}");
    eprintln!(
        "testguest balloon: stats free {:.1} MiB of {:.1} MiB after inflation",
        mib(fresh.free_bytes.unwrap_or_default()),
        mib(total)
    );

    // Target 0: the guest deflates, checks the pages it gave read as zeros, and finishes.
    assert_eq!(set_target(&rt, &mut c, 0).0, 0);
    let status = vmm.expect_exit(TG_TIMEOUT);
    let console = vmm.console_text();
    assert!(status.success(), "{status}\n{}", vmm.report());
    let verdict = testguest::verdict(&console, "balloon")
        .filter(|v| v.starts_with("PASS"))
        .unwrap_or_else(|| panic!("no PASS\n{}", vmm.report()));
    eprintln!("testguest balloon: {verdict}");
    vmm.assert_no_device_complaints();
    assert!(
        console.contains("testguest: balloon: inflated to 32768 pages")
            && console.contains("testguest: balloon: deflated to 0 pages"),
        "{}",
        vmm.report()
    );
}

#[test]
fn a_stats_period_refreshes_statistics_without_being_asked() {
    skip_without_kvm!("balloon stats period");
    let vmm = balloon_testguest(&["--balloon", "stats-period=1"]);
    let rt = runtime();
    let mut c = connect(&rt, &vmm.socket);
    // The first periodic refresh (the period starts when the driver is ready).
    let deadline = Instant::now() + Duration::from_secs(30);
    while memory_stats(&rt, &mut c).minor_faults.is_none() {
        assert!(
            Instant::now() < deadline,
            "no periodic statistics in 30 s\n{}",
            vmm.report()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The test guest counts the refreshes it was asked for in its minor-fault figure.
    let mut count = || {
        memory_stats(&rt, &mut c)
            .minor_faults
            .expect("minor faults")
            - TG_MINFLT_BASE
    };
    // With a period, GetMemoryStats returns what the periodic refreshes brought: asking does
    // not make the guest refresh (back to back, two asks agree; a periodic refresh may land
    // between the first two, never also between the next two).
    let (a, b) = (count(), count());
    let c2 = count();
    assert!(
        a == b || b == c2,
        "asking refreshed the statistics: {a}, {b}, {c2}\n{}",
        vmm.report()
    );
    // And the guest is asked about once a second, counted over a measured interval (so a slow
    // start does not count).
    let from = Instant::now();
    let before = count();
    std::thread::sleep(Duration::from_secs(3));
    let after = count();
    let secs = from.elapsed().as_secs_f64();
    let refreshes = after - before;
    assert!(
        refreshes >= 1 && refreshes as f64 <= secs.ceil() + 1.0,
        "{refreshes} refreshes in {secs:.1} s with a 1 s period\n{}",
        vmm.report()
    );
}

#[test]
fn a_linux_guest_reports_its_statistics_and_inflates_on_request() {
    let image = image_or_skip!("balloon linux");
    let guest = balloon_linux_guest(&image);
    let pid = guest.pid();
    let rt = runtime();
    let mut c = connect(&rt, &guest.socket);
    let report = || guest.report();

    // The driver posts statistics at probe; each GetMemoryStats asks for fresh ones.
    let (before, took) = wait_stats(
        &rt,
        &mut c,
        "statistics from the guest kernel",
        Duration::from_secs(60),
        |s| s.total_bytes.is_some() && s.free_bytes.is_some(),
        report,
    );
    let total = before.total_bytes.unwrap_or_default();
    let free = before.free_bytes.unwrap_or_default();
    eprintln!(
        "linux balloon: stats after {} ms: total {:.1} MiB, free {:.1} MiB, available {:?}, caches {:?}",
        took.as_millis(),
        mib(total),
        mib(free),
        before.available_bytes.map(mib),
        before.disk_caches_bytes.map(mib)
    );
    assert!(
        (160 << 20..=256 << 20).contains(&total),
        "total {total} bytes is not about the guest's 256 MiB\n{}",
        report()
    );
    assert!(free > 0 && free <= total, "free {free} of {total}");

    // Inflate by 64 MiB: the guest acknowledges it, its fresh statistics count it, and the
    // host does not pay for the pages the guest allocated for the balloon.
    let rss_before = vmm_rss_kib(pid);
    assert_eq!(set_target(&rt, &mut c, 64), (64, 0));
    let (_, took) = wait_stats(
        &rt,
        &mut c,
        "balloon actual reaches 64 MiB",
        Duration::from_secs(180),
        |s| s.balloon_actual_mib == 64,
        report,
    );
    let (after, _) = wait_stats(
        &rt,
        &mut c,
        "guest total memory less the balloon",
        Duration::from_secs(60),
        |s| s.total_bytes.is_some_and(|t| t + (60 << 20) <= total),
        report,
    );
    let rss_after = vmm_rss_kib(pid);
    eprintln!(
        "linux balloon: 64 MiB inflated in {} ms; guest total {:.1} -> {:.1} MiB; RSS {:.1} -> {:.1} MiB",
        took.as_millis(),
        mib(total),
        mib(after.total_bytes.unwrap_or_default()),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB while the balloon inflated\n{}",
        report()
    );

    // Deflate; the freed pages merge and the guest reports them (page reporting waits 2 s).
    assert_eq!(set_target(&rt, &mut c, 0).0, 0);
    wait_stats(
        &rt,
        &mut c,
        "balloon actual back to 0",
        Duration::from_secs(180),
        |s| s.balloon_actual_mib == 0,
        report,
    );
    let reported = "virtio-balloon: guest reported free pages";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !guest.stderr_text().contains(reported) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = guest.stderr_text();
    assert!(log.contains(reported), "no free page report\n{}", report());
    // Linux's driver never trips the device's checks.
    guest.assert_no_device_complaints();
    eprintln!(
        "linux balloon: {} ({})",
        log.lines()
            .find(|l| l.contains(reported))
            .unwrap_or_default()
            .trim(),
        image.userspace_note()
    );
}
