//! Device tests with the freestanding test guest (`images/testguest`, built by `images/build.sh`
//! into `images/out/testguest.elf`).
//!
//! The test guest is a few KiB of C with no Linux: it boots in milliseconds where a Linux guest
//! takes ~30 s on hosts with emulated KVM (`shared/KVM-HOST.md`), drives one device the way a
//! driver would (the scenario named by `fabric.test=NAME` on the command line), prints
//! `testguest: NAME: PASS ...` or `testguest: NAME: FAIL reason` on the serial console and
//! resets the machine, so fabric-vmm exits with status 0. Each test checks the verdict and, where
//! the scenario changes the host's side (a disk file), the host's side too.

use fabric_test_support::guest::{tail, Guest, GuestSpec};
use fabric_test_support::skip_without_kvm;
use fabric_test_support::testguest;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// A scenario takes well under a second; this only bounds a guest or VMM that hangs.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `blk-write` puts its pattern: 4096 bytes of `i * 7 + 3` at sector 8.
const PATTERN_OFFSET: usize = 8 * 512;
const PATTERN_LEN: usize = 4096;

/// The scratch disks: 1 MiB.
const DISK_SIZE: usize = 1 << 20;

/// What one fabric-vmm run of a scenario left behind.
struct Run {
    status: ExitStatus,
    console: String,
    vmm_log: String,
    elapsed: Duration,
}

impl Run {
    /// The verdict line, or a panic that shows the console and the VMM's log.
    fn verdict(&self, scenario: &str) -> &str {
        testguest::verdict(&self.console, scenario)
            .unwrap_or_else(|| panic!("no verdict for {scenario}\n{}", self.report()))
    }

    /// Asserts a clean exit and a PASS; returns the text after "PASS".
    fn assert_pass(&self, scenario: &str) -> &str {
        assert!(
            self.status.success(),
            "fabric-vmm exited with {} (want 0: the guest resets when done)\n{}",
            self.status,
            self.report()
        );
        let verdict = self.verdict(scenario);
        assert!(
            verdict.starts_with("PASS"),
            "scenario {scenario}: {verdict}\n{}",
            self.report()
        );
        eprintln!("{scenario}: {verdict} ({} ms)", self.elapsed.as_millis());
        verdict["PASS".len()..].trim()
    }

    fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- vmm log ---\n{}",
            tail(&self.console),
            tail(&self.vmm_log)
        )
    }
}

/// Boots the test guest on scenario `name` in 64 MiB with `device_args` added to fabric-vmm's
/// command line, and waits for the VMM to exit (killing it, by its PID, after
/// [`RUN_TIMEOUT`]).
fn run_scenario(name: &str, device_args: &[&str]) -> Run {
    let start = Instant::now();
    let mut guest = Guest::testguest(
        name,
        GuestSpec {
            memory_mib: 64,
            vmm_args: device_args,
            ..Default::default()
        },
    );
    let status = guest.expect_exit(RUN_TIMEOUT);
    Run {
        status,
        console: guest.console_text(),
        vmm_log: guest.stderr_text(),
        elapsed: start.elapsed(),
    }
}

fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fabric-testguest-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// A scratch disk of [`DISK_SIZE`] bytes, every byte `fill`.
fn scratch_disk(dir: &Path, fill: u8) -> PathBuf {
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![fill; DISK_SIZE]).expect("write scratch disk");
    path
}

/// The `--disk` value for `path` with `suffix` (",ro") after it.
fn disk_spec(path: &Path, suffix: &str) -> String {
    format!("{}{suffix}", path.display())
}

#[test]
fn hello_boots_and_reads_the_zero_page() {
    skip_without_kvm!("testguest hello");
    let run = run_scenario("hello", &[]);
    let detail = run.assert_pass("hello");
    assert!(
        run.console.contains("testguest: start hello"),
        "no start line\n{}",
        run.report()
    );
    // 64 MiB less the legacy hole (0x9fc00..0x100000) and nothing else.
    let ram_kib: u64 = detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ram="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ram=N in {detail:?}"));
    assert!(
        (60 * 1024..=64 * 1024).contains(&ram_kib),
        "the guest saw {ram_kib} KiB of RAM in the e820 map, want about 64 MiB: {detail:?}"
    );
    assert!(
        detail.contains("e820 entries=") && !detail.contains("e820 entries=0 "),
        "no e820 entries: {detail:?}"
    );
}

#[test]
fn unknown_scenario_fails_cleanly() {
    skip_without_kvm!("testguest unknown scenario");
    let run = run_scenario("no-such-scenario", &[]);
    assert!(run.status.success(), "{}\n{}", run.status, run.report());
    let verdict = run.verdict("no-such-scenario");
    assert!(
        verdict.starts_with("FAIL unknown scenario"),
        "{verdict}\n{}",
        run.report()
    );
}

#[test]
fn rng_fills_a_buffer() {
    skip_without_kvm!("testguest rng");
    let run = run_scenario("rng", &["--rng"]);
    run.assert_pass("rng");
}

#[test]
fn blk_write_reaches_the_disk_file() {
    skip_without_kvm!("testguest blk-write");
    let dir = temp_dir("blk-write");
    let disk = scratch_disk(dir.path(), 0);
    let run = run_scenario("blk-write", &["--disk", &disk_spec(&disk, "")]);
    let detail = run.assert_pass("blk-write");
    let want_capacity = format!("capacity {} sectors", DISK_SIZE / 512);
    assert!(
        detail.contains(&want_capacity),
        "the guest did not see {want_capacity}: {detail:?}"
    );
    let contents = std::fs::read(&disk).expect("read disk");
    let pattern: Vec<u8> = (0..PATTERN_LEN).map(|i| (i * 7 + 3) as u8).collect();
    assert!(
        contents[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_LEN] == pattern[..],
        "the disk file does not hold the guest's pattern at offset {PATTERN_OFFSET}"
    );
    assert!(
        contents[..PATTERN_OFFSET].iter().all(|&b| b == 0)
            && contents[PATTERN_OFFSET + PATTERN_LEN..]
                .iter()
                .all(|&b| b == 0),
        "the disk file changed outside the {PATTERN_LEN} bytes the guest wrote"
    );
}

#[test]
fn blk_ro_refuses_writes() {
    skip_without_kvm!("testguest blk-ro");
    let dir = temp_dir("blk-ro");
    let disk = scratch_disk(dir.path(), 0x5c);
    let run = run_scenario("blk-ro", &["--disk", &disk_spec(&disk, ",ro")]);
    run.assert_pass("blk-ro");
    let contents = std::fs::read(&disk).expect("read disk");
    assert!(
        contents.len() == DISK_SIZE && contents.iter().all(|&b| b == 0x5c),
        "the read-only disk file changed"
    );
}

#[test]
fn blk_get_id_returns_a_serial() {
    skip_without_kvm!("testguest blk-id");
    let dir = temp_dir("blk-id");
    let disk = scratch_disk(dir.path(), 0);
    let run = run_scenario("blk-id", &["--disk", &disk_spec(&disk, "")]);
    let detail = run.assert_pass("blk-id");
    assert!(detail.starts_with("id \""), "{detail:?}");
}

#[test]
fn hostile_blk_requests_leave_the_device_serving() {
    skip_without_kvm!("testguest hostile-blk");
    let dir = temp_dir("hostile-blk");
    let disk = scratch_disk(dir.path(), 0x33);
    let run = run_scenario("hostile-blk", &["--disk", &disk_spec(&disk, "")]);
    run.assert_pass("hostile-blk");
    // One line per sub-case, each saying what the device did.
    let notes = testguest::notes(&run.console, "hostile-blk");
    for case in [
        "addr-outside-ram",
        "addr-len-overflow",
        "len-not-512",
        "sector-past-end",
        "sector-overflow",
        "desc-loop-readable",
        "desc-loop-writable",
        "next-out-of-range",
        "head-out-of-range",
        "status-readable",
        "transport-misuse",
    ] {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("{case}: "))),
            "no line for sub-case {case}\n{}",
            run.report()
        );
    }
    for note in &notes {
        eprintln!("  {note}");
    }
    let contents = std::fs::read(&disk).expect("read disk");
    assert!(
        contents.len() == DISK_SIZE && contents.iter().all(|&b| b == 0x33),
        "malformed read requests changed the disk file"
    );
}

/// A guest writing the block device's read-only configuration space 100,000 times: each write
/// is refused, the VMM logs a burst of the warning (not one per write: the host's disk is
/// not the guest's to fill), and the device keeps serving.
#[test]
fn a_config_space_flood_is_refused_without_flooding_the_log() {
    skip_without_kvm!("testguest config-flood");
    let dir = temp_dir("config-flood");
    let disk = scratch_disk(dir.path(), 0);
    let run = run_scenario("config-flood", &["--disk", &disk_spec(&disk, "")]);
    run.assert_pass("config-flood");
    let warnings = run.vmm_log.matches("read-only configuration space").count();
    assert!(
        (1..=fabric_vmm::logging::RATE_BURST as usize).contains(&warnings),
        "{warnings} warnings for 100,000 refused writes\n{}",
        run.report()
    );
    assert!(
        run.vmm_log.len() < 64 << 10,
        "the VMM logged {} bytes for the flood",
        run.vmm_log.len()
    );
}
