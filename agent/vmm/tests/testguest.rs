//! Device tests with the freestanding test guest (`images/testguest`, built by `images/build.sh`
//! into `images/out/testguest.elf`).
//!
//! The test guest is a few KiB of C with no Linux: it boots in milliseconds where a Linux guest
//! takes ~30 s on hosts with emulated KVM (`shared/KVM-HOST.md`), drives one device the way a
//! driver would (the scenario named by `fabric.test=NAME` on the command line), prints
//! `testguest: NAME: PASS ...` or `testguest: NAME: FAIL reason` on the serial console and
//! resets the machine, so fabric-vmm exits with status 0. Each test checks the verdict and, where
//! the scenario changes the host's side (a disk file), the host's side too.

use fabric_test_support::guest as common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, tail, vmm_binary};

/// A scenario takes well under a second; this only bounds a guest or VMM that hangs.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `blk-write` puts its pattern: 4096 bytes of `i * 7 + 3` at sector 8.
const PATTERN_OFFSET: usize = 8 * 512;
const PATTERN_LEN: usize = 4096;

/// The scratch disks: 1 MiB.
const DISK_SIZE: usize = 1 << 20;

fn testguest_elf() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/out/testguest.elf");
    assert!(
        path.is_file(),
        "{} is missing: build it with `bash images/build.sh` (its testguest stage takes a second)",
        path.display()
    );
    path
}

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
        let prefix = format!("testguest: {scenario}: ");
        self.console
            .lines()
            .map(str::trim_end)
            .filter_map(|l| l.strip_prefix(&prefix))
            .find(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
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

    /// The lines a scenario printed between its start and its verdict.
    fn notes(&self, scenario: &str) -> Vec<String> {
        let prefix = format!("testguest: {scenario}: ");
        self.console
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix(&prefix))
            .filter(|l| !l.starts_with("PASS") && !l.starts_with("FAIL"))
            .map(str::to_owned)
            .collect()
    }

    fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- vmm log ---\n{}",
            tail(&self.console),
            tail(&self.vmm_log)
        )
    }
}

/// Boots the test guest on scenario `name` with `device_args` added to fabric-vmm's command line,
/// in `dir`, and waits for the VMM to exit (killing it, by its PID, after [`RUN_TIMEOUT`]).
fn run_scenario(dir: &Path, name: &str, device_args: &[OsString]) -> Run {
    let console = dir.join("console.log");
    let vmm_log = dir.join("vmm.log");
    let start = Instant::now();
    let mut child = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(testguest_elf())
        .arg("--cmdline")
        .arg(format!("fabric.test={name}"))
        .arg("--memory")
        .arg("64")
        .arg("--console")
        .arg(&console)
        .args(device_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&vmm_log).expect("vmm log file"))
        .spawn()
        .expect("spawn fabric-vmm");
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for fabric-vmm") {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            // Only our own child, by its PID.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scenario {name}: fabric-vmm still running after {RUN_TIMEOUT:?}: killed it\n--- console ---\n{}\n--- vmm log ---\n{}",
                tail(&read(&console)),
                tail(&read(&vmm_log))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        console: read(&console),
        vmm_log: read(&vmm_log),
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

fn disk_arg(path: &Path, suffix: &str) -> Vec<OsString> {
    let mut spec = path.as_os_str().to_owned();
    spec.push(suffix);
    vec!["--disk".into(), spec]
}

#[test]
fn hello_boots_and_reads_the_zero_page() {
    if !kvm_available("testguest hello") {
        return;
    }
    let dir = temp_dir("hello");
    let run = run_scenario(dir.path(), "hello", &[]);
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
    if !kvm_available("testguest unknown scenario") {
        return;
    }
    let dir = temp_dir("unknown");
    let run = run_scenario(dir.path(), "no-such-scenario", &[]);
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
    if !kvm_available("testguest rng") {
        return;
    }
    let dir = temp_dir("rng");
    let run = run_scenario(dir.path(), "rng", &["--rng".into()]);
    run.assert_pass("rng");
}

#[test]
fn blk_write_reaches_the_disk_file() {
    if !kvm_available("testguest blk-write") {
        return;
    }
    let dir = temp_dir("blk-write");
    let disk = scratch_disk(dir.path(), 0);
    let run = run_scenario(dir.path(), "blk-write", &disk_arg(&disk, ""));
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
    if !kvm_available("testguest blk-ro") {
        return;
    }
    let dir = temp_dir("blk-ro");
    let disk = scratch_disk(dir.path(), 0x5c);
    let run = run_scenario(dir.path(), "blk-ro", &disk_arg(&disk, ",ro"));
    run.assert_pass("blk-ro");
    let contents = std::fs::read(&disk).expect("read disk");
    assert!(
        contents.len() == DISK_SIZE && contents.iter().all(|&b| b == 0x5c),
        "the read-only disk file changed"
    );
}

#[test]
fn blk_get_id_returns_a_serial() {
    if !kvm_available("testguest blk-id") {
        return;
    }
    let dir = temp_dir("blk-id");
    let disk = scratch_disk(dir.path(), 0);
    let run = run_scenario(dir.path(), "blk-id", &disk_arg(&disk, ""));
    let detail = run.assert_pass("blk-id");
    assert!(detail.starts_with("id \""), "{detail:?}");
}

#[test]
fn hostile_blk_requests_leave_the_device_serving() {
    if !kvm_available("testguest hostile-blk") {
        return;
    }
    let dir = temp_dir("hostile-blk");
    let disk = scratch_disk(dir.path(), 0x33);
    let run = run_scenario(dir.path(), "hostile-blk", &disk_arg(&disk, ""));
    run.assert_pass("hostile-blk");
    // One line per sub-case, each saying what the device did.
    let notes = run.notes("hostile-blk");
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
