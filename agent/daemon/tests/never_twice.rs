//! Two paths to a second copy of a VM in the agent's own start-up of a VM (issue 14), each
//! with a real `fabric-vmm` running the test guest, against the in-test controller
//! (`tests/support/src/hostlink.rs`):
//!
//! - the agent is killed between spawning a VMM and recording its pid: the restarted agent
//!   must find that VMM (in the VM's cgroup) and adopt it, not start a second one;
//! - a start whose preparation (here an image pull) outlives a fencing, during which the VM
//!   was moved away: the agent must not spawn it once the preparation is done.
//!
//! A sampler looks at the host's `fabric-vmm` processes every 10 ms throughout.
//!
//! And the opposite failure, a VM lost for nothing: a host whose disk is full keeps its lease
//! and its VMs (issue 15).

use fabric_test_support::{host, hostlink, skip_without_kvm, testguest, vmspec};

use std::time::{Duration, Instant};

use fabric_proto::v1::{Assignment, ObservedPhase, RestartPolicy, VmSpec};
use fabric_vmm_api::lease::LeaseFile;
use host::{HostOptions, TestHost, AGENT_TIMEOUT};
use hostlink::FakeController;

/// A test guest that keeps running (the memload scenario holds its last phase).
fn running_guest(vm_id: &str, kernel_sha256: &str) -> Assignment {
    let spec = vmspec::vm_spec(
        vm_id,
        vmspec::memory(64, 0, 0),
        "testguest",
        kernel_sha256,
        RestartPolicy::Always,
    );
    vmspec::assignment(
        vm_id,
        VmSpec {
            kernel_cmdline: format!("{} memload.phases=8:1", testguest::cmdline("memload")),
            ..spec
        },
    )
}

fn phase(vm: &fabric_proto::v1::ObservedVm) -> ObservedPhase {
    ObservedPhase::try_from(vm.phase).unwrap_or(ObservedPhase::Unspecified)
}

fn agent_log(host: &TestHost) -> String {
    std::fs::read_to_string(&host.log_path).unwrap_or_default()
}

/// Samples the VM's VMM processes every 10 ms for `period`: panics at the first sample with
/// more than `most` of them.
fn sample_vmms(host: &TestHost, vm_id: &str, period: Duration, most: usize) -> usize {
    let end = Instant::now() + period;
    let mut samples = 0;
    while Instant::now() < end {
        let vmms = host.vmm_processes_of(vm_id);
        assert!(
            vmms.len() <= most,
            "{vm_id}: {} fabric-vmm processes at once ({vmms:?}), at most {most} allowed\n{}",
            vmms.len(),
            host::tail_lines(&agent_log(host), 40)
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    samples
}

/// The agent dies (SIGKILL, from the test-only kill point `after-spawn`) right after it
/// started the VM's `fabric-vmm` and before it recorded the pid. Before the fix the restarted
/// agent did not know that VMM: it started a second one for the same VM (two guests on one
/// disk), and the orphan kept obeying the lease file the new agent renewed.
#[test]
fn a_vmm_whose_agent_died_before_recording_it_is_adopted_not_doubled() {
    skip_without_kvm!("a_vmm_whose_agent_died_before_recording_it_is_adopted_not_doubled");
    let mut host = TestHost::new(HostOptions::kvm());
    host.agent_env
        .push(("FABRIC_TEST_KILL_AT".into(), "after-spawn".into()));
    let controller = FakeController::start_with(
        &host.controller_socket,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    let kernel = controller.add_image_file(&testguest::elf());
    controller.set_assignments(vec![running_guest("orphan", &kernel)]);

    let deadline = Instant::now() + Duration::from_secs(60);
    while host.agent_exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not reach its kill point\n{}",
            host::tail_lines(&agent_log(&host), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphans = host.vmm_processes_of("orphan");
    assert_eq!(
        orphans.len(),
        1,
        "one fabric-vmm expected after the kill: {orphans:?}\n{}",
        host::tail_lines(&agent_log(&host), 40)
    );
    let orphan = orphans[0];
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(host.vm_dir("orphan").join("vm.json")).expect("the VM's record"),
    )
    .expect("a JSON record");
    assert!(
        record["pid"].is_null(),
        "the kill point is after the record of the pid: {record}"
    );

    host.agent_env.clear();
    host.restart();
    controller.wait_registrations(&host.machine_id, 2, AGENT_TIMEOUT);
    // The restarted agent reports the orphan as its VM, running.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sample_vmms(&host, "orphan", Duration::from_millis(100), 1);
        if let Some((_, o)) = controller.observed("orphan") {
            if o.pid == orphan.pid && phase(&o) == ObservedPhase::Running {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent does not report the orphan ({orphan:?}) running: {:?}\n{}",
            controller.observed("orphan"),
            host::tail_lines(&agent_log(&host), 40)
        );
    }
    // And never starts a second one.
    sample_vmms(&host, "orphan", Duration::from_secs(5), 1);
    assert!(orphan.alive(), "the orphan was not kept: {orphan:?}");
    assert!(
        agent_log(&host).contains("did not record: adopting it"),
        "the agent does not say it adopted an unrecorded VMM"
    );
    host.assert_agent_running();
}

/// A start whose image pull (held by the test) outlives the host's lease; meanwhile the
/// controller moves the VM away (the set the re-registered host reads no longer holds it).
/// Before the fix the agent, once the pull finished, spawned the VM all the same, and then
/// stopped it gracefully (the test host's 5 s; 40 s by default) while it could already run
/// elsewhere. Now it looks again right before the spawn and abandons the start.
#[test]
fn a_start_prepared_across_a_fencing_is_abandoned_when_the_vm_was_moved() {
    skip_without_kvm!("a_start_prepared_across_a_fencing_is_abandoned_when_the_vm_was_moved");
    let mut host = TestHost::new(HostOptions::kvm());
    let ttl = Duration::from_secs(2);
    let controller =
        FakeController::start_with(&host.controller_socket, ttl, Duration::from_millis(500));
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    let kernel = controller.add_image_file(&testguest::elf());
    controller.hold_pulls();
    controller.set_assignments(vec![running_guest("moving", &kernel)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while controller.pulls(&kernel) == 0 {
        assert!(
            Instant::now() < deadline,
            "the agent never pulled the kernel\n{}",
            host::tail_lines(&agent_log(&host), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The host loses its lease while the pull hangs...
    controller.hold_heartbeats();
    let lease_file = host.data_dir.join("lease.json");
    let deadline = Instant::now() + ttl * 10;
    while LeaseFile::read(&lease_file).is_ok_and(|l| !l.remaining().is_zero()) {
        assert!(Instant::now() < deadline, "the lease never ran out");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...the controller moves the VM elsewhere, and the host gets its lease back and reads a
    // set without the VM.
    controller.set_assignments(Vec::new());
    let opened = controller.watch_streams_opened();
    controller.release_heartbeats();
    let deadline = Instant::now() + Duration::from_secs(30);
    while controller.watch_streams_opened() == opened
        || !LeaseFile::read(&lease_file).is_ok_and(|l| !l.remaining().is_zero())
    {
        assert!(
            Instant::now() < deadline,
            "the host did not renew its lease and read its assignments again\n{}",
            host::tail_lines(&agent_log(&host), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));

    // The pull completes: nothing may start.
    controller.release_pulls();
    let samples = sample_vmms(&host, "moving", Duration::from_secs(8), 0);
    assert!(samples > 100, "too few samples: {samples}");
    let log = agent_log(&host);
    assert!(
        log.contains("start abandoned"),
        "the agent does not say it abandoned the start\n{}",
        host::tail_lines(&log, 40)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.vm_dir("moving").exists() {
        assert!(
            Instant::now() < deadline,
            "the moved VM's directory is still there\n{}",
            host::tail_lines(&agent_log(&host), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.assert_agent_running();
}

/// A tmpfs of `size` mounted at `path` for the test (lazily unmounted when dropped).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_owned())
    }

    /// Writes a file of zeros until the filesystem is full; its size.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        while let Ok(n) = file.write(&chunk) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        let _ = file.sync_all();
        written
    }
}

/// An ext4 filesystem in a file, mounted through a loop device (not tmpfs: a VMM writing a
/// guest's disk to tmpfs would have every page charged to its memory cgroup).
struct LoopFs {
    mount: std::path::PathBuf,
    _image_dir: tempfile::TempDir,
}

impl LoopFs {
    fn mount(path: &std::path::Path, size_mib: u64) -> LoopFs {
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("run {program}: {e}"));
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // No blocks reserved for root: the agent (root) would otherwise see less than it has.
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                image.as_os_str(),
            ],
        );
        std::fs::create_dir_all(path).unwrap();
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                path.as_os_str(),
            ],
        );
        LoopFs {
            mount: path.to_owned(),
            _image_dir: image_dir,
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Lazy, as the agent may still hold files there; the loop device (mounted with
        // autoclear) goes once the last of them is closed.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The agent's data directory on a small filesystem that the test then fills to the last
/// byte. The lease is renewed all the same (the lease file is overwritten in place), so the
/// VM keeps running. Before, each renewal wrote a new file and renamed it: with the disk full
/// no renewal reached the file, and fabric-vmm stopped its guest when the lease in it ran out.
#[test]
fn a_host_whose_disk_is_full_keeps_its_lease_and_its_vms() {
    skip_without_kvm!("a_host_whose_disk_is_full_keeps_its_lease_and_its_vms");
    let mut host = TestHost::new(HostOptions::kvm());
    let ttl = Duration::from_secs(2);
    let controller =
        FakeController::start_with(&host.controller_socket, ttl, Duration::from_millis(500));
    let disk = Tmpfs::mount(&host.data_dir, "64m");
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    let kernel = controller.add_image_file(&testguest::elf());
    controller.set_assignments(vec![running_guest("steady", &kernel)]);
    let running = controller.wait_observed("steady", Duration::from_secs(60), |o| {
        phase(o) == ObservedPhase::Running && o.pid != 0
    });
    let vmm = host.vmm_processes_of("steady");
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    assert_eq!(vmm[0].pid, running.pid);

    let filled = disk.fill();
    assert!(filled > 0, "nothing written to fill the disk");
    let lease_file = host.data_dir.join("lease.json");
    let expiry_before = LeaseFile::read(&lease_file)
        .expect("the lease")
        .expires_boottime_ns;
    // Four lease lifetimes on a full disk.
    let end = Instant::now() + ttl * 4;
    while Instant::now() < end {
        assert!(
            vmm[0].alive(),
            "the VM stopped on a full disk\n{}",
            host::tail_lines(&agent_log(&host), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lease = LeaseFile::read(&lease_file).expect("the lease");
    assert!(
        lease.expires_boottime_ns > expiry_before && !lease.remaining().is_zero(),
        "the lease was not renewed on the full disk: {lease:?}\n{}",
        host::tail_lines(&agent_log(&host), 40)
    );
    assert!(
        !agent_log(&host).contains("cannot persist the lease"),
        "{}",
        host::tail_lines(&agent_log(&host), 40)
    );
    host.assert_agent_running();
}

/// A guest that writes every sector of its disk, given all the disk its host offers (what the
/// controller would reserve for it at placement: the agent's registered allocatable disk less
/// the other VM's logs), fills its disk and not the host's: the data directory's filesystem
/// keeps free space, the other VM keeps running, and the lease keeps being renewed.
#[test]
fn a_guest_that_fills_its_disk_does_not_fill_the_hosts() {
    use fabric_proto::v1::{disk_spec, DiskSpec};
    skip_without_kvm!("a_guest_that_fills_its_disk_does_not_fill_the_hosts");
    const LOGS_MIB: u64 = 32;
    const RESERVE_MIB: u64 = 64;
    let mut host = TestHost::new(HostOptions {
        image_cache_mib: 16,
        disk_reserve_mib: RESERVE_MIB,
        ..HostOptions::kvm()
    });
    let ttl = Duration::from_secs(2);
    let controller =
        FakeController::start_with(&host.controller_socket, ttl, Duration::from_millis(500));
    let _disk = LoopFs::mount(&host.data_dir, 320);
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    let registration = controller.registrations().pop().expect("a registration");
    let offered = registration.allocatable.expect("allocatable").disk_mib;
    let total = registration.capacity.expect("capacity").disk_mib;
    assert!(
        (250..=320).contains(&total),
        "the data directory's filesystem: {total} MiB"
    );
    assert!(
        offered > 2 * LOGS_MIB && offered <= total - 16 - RESERVE_MIB,
        "offered {offered} MiB of {total}"
    );
    let kernel = controller.add_image_file(&testguest::elf());
    let filler_mib = offered - 2 * LOGS_MIB;
    let filler = vmspec::assignment(
        "filler",
        VmSpec {
            kernel_cmdline: testguest::cmdline("blk-bench-write"),
            disks: vec![DiskSpec {
                source: Some(disk_spec::Source::SizeMib(filler_mib)),
                read_only: false,
            }],
            ..vmspec::vm_spec(
                "filler",
                vmspec::memory(64, 0, 0),
                "testguest",
                &kernel,
                RestartPolicy::Never,
            )
        },
    );
    // And an image larger than the whole image cache: refused at the pull, as it would take
    // space the VMs were offered.
    let big = vec![0x5au8; 17 << 20];
    let big_digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&big))
    };
    controller.add_image_bytes(&big_digest, big);
    let mut too_big = running_guest("too-big", &kernel);
    too_big
        .spec
        .as_mut()
        .unwrap()
        .image
        .as_mut()
        .unwrap()
        .rootfs_sha256 = big_digest;
    controller.set_assignments(vec![running_guest("steady", &kernel), filler, too_big]);
    let refused = controller.wait_observed("too-big", Duration::from_secs(60), |o| {
        o.last_error.contains("more than this host's image cache")
    });
    assert!(
        refused.last_error.contains("17 MiB") && refused.last_error.contains("= 16)"),
        "{}",
        refused.last_error
    );
    let running = controller.wait_observed("steady", Duration::from_secs(60), |o| {
        phase(o) == ObservedPhase::Running && o.pid != 0
    });
    let console = host.vm_dir("filler").join("console.log");
    let deadline = Instant::now() + Duration::from_secs(300);
    let verdict = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if let Some(v) = testguest::verdict(&text, "blk-bench-write") {
            break v.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the filler did not finish
{}",
            host::tail_lines(&agent_log(&host), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(verdict.starts_with("PASS"), "{verdict}");
    let disk_file = host.vm_dir("filler").join("disk-0.img");
    let held =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&disk_file).unwrap()) * 512;
    assert!(
        held >= (filler_mib - 1) << 20,
        "the guest filled {held} bytes of its {filler_mib} MiB disk"
    );
    let fs = nix::sys::statvfs::statvfs(&host.data_dir).unwrap();
    let available_mib = (fs.blocks_available() * fs.fragment_size()) >> 20;
    // Left: the reserve, and the two VMs' log allowance they have hardly used (less the
    // test guest's kernel in the cache and a few log lines).
    assert!(
        available_mib >= RESERVE_MIB + 2 * LOGS_MIB - 8,
        "{available_mib} MiB left on the host's filesystem with the filler's disk full"
    );

    // Two lease lifetimes later the other VM still runs on its lease, the same process.
    let lease_file = host.data_dir.join("lease.json");
    let expiry_before = LeaseFile::read(&lease_file)
        .expect("the lease")
        .expires_boottime_ns;
    std::thread::sleep(ttl * 2);
    let lease = LeaseFile::read(&lease_file).expect("the lease");
    assert!(
        lease.expires_boottime_ns > expiry_before && !lease.remaining().is_zero(),
        "the lease was not renewed: {lease:?}"
    );
    let steady = controller.wait_observed("steady", Duration::from_secs(5), |o| {
        phase(o) == ObservedPhase::Running
    });
    assert_eq!(steady.pid, running.pid, "the other VM was restarted");
    // Nor does a crashing VMM write its guest's memory there: no core dumps.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", steady.pid)).unwrap();
    let core: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit")
        .split_whitespace()
        .collect();
    assert_eq!(core[4..6], ["0", "0"], "{core:?}");
    host.assert_agent_running();
}

/// Two agents on one data directory would both supervise its VMs (each could restart one
/// that exited): the second refuses to start, naming the first.
#[test]
fn a_second_agent_on_the_same_data_directory_refuses_to_start() {
    let mut host = TestHost::new(HostOptions::sim());
    let controller = FakeController::start(&host.controller_socket);
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    let first = host.agent_pid().expect("the first agent");
    let second = host
        .ns_command(fabric_test_support::cluster::workspace_bin("fabric-agent"))
        .arg("--config")
        .arg(host.dir.path().join("agent.toml"))
        .output()
        .expect("run a second agent");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second agent started: {stderr}"
    );
    assert!(
        stderr.contains("one agent per data directory") && stderr.contains(&first.to_string()),
        "{stderr}"
    );
    host.assert_agent_running();
}

/// A VM whose record cannot be read after an agent restart cannot be adopted: its VMM used to
/// run on unsupervised (obeying the lease the agent kept renewing) while the controller, told
/// nothing of it, could place the VM elsewhere. It is ended now.
#[test]
fn a_vmm_whose_record_is_unreadable_is_ended_not_left_running() {
    skip_without_kvm!("a_vmm_whose_record_is_unreadable_is_ended_not_left_running");
    let mut host = TestHost::new(HostOptions::kvm());
    let controller = FakeController::start_with(
        &host.controller_socket,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    host.start_agent();
    controller.wait_registrations(&host.machine_id, 1, AGENT_TIMEOUT);
    let kernel = controller.add_image_file(&testguest::elf());
    controller.set_assignments(vec![running_guest("garbled", &kernel)]);
    controller.wait_observed("garbled", Duration::from_secs(60), |o| {
        phase(o) == ObservedPhase::Running && o.pid != 0
    });
    let vmm = host.vmm_processes_of("garbled");
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    host.kill9();
    std::fs::write(host.vm_dir("garbled").join("vm.json"), "{ not json").unwrap();
    controller.withhold_assignments();
    host.restart();
    controller.wait_registrations(&host.machine_id, 2, AGENT_TIMEOUT);
    assert!(
        vmm[0].wait_gone(Duration::from_secs(20)),
        "the VMM of the unreadable record still runs\n{}",
        host::tail_lines(&agent_log(&host), 40)
    );
    host.assert_agent_running();
}
