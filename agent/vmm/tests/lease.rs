//! fabric-vmm enforces the host's lease on its own (`--lease-file`): a guest stops when the
//! lease runs out even if no agent is there to stop it, keeps running while the lease is
//! renewed, and never starts on an expired lease.

use fabric_test_support::guest as common;

use std::time::{Duration, Instant};

use common::{Guest, GuestSpec, Image};
use fabric_test_support::skip_without_kvm;
use fabric_vmm_api::lease::LeaseFile;

#[test]
fn an_expired_lease_refuses_to_start() {
    skip_without_kvm!("an_expired_lease_refuses_to_start");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lease.json");
    LeaseFile::expiring_in(Duration::ZERO).write(&path).unwrap();
    let image = Image::built();
    let start = || {
        common::refusal(
            std::process::Command::new(common::vmm_binary())
                .arg("--kernel")
                .arg(image.kernel())
                .arg("--lease-file")
                .arg(&path),
        )
    };
    let stderr = start();
    assert!(
        stderr.contains("has expired: not starting the guest"),
        "{stderr}"
    );
    // A missing lease file is refused too.
    std::fs::remove_file(&path).unwrap();
    let stderr = start();
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn the_guest_runs_while_the_lease_is_renewed_and_stops_when_it_lapses() {
    skip_without_kvm!("the_guest_runs_while_the_lease_is_renewed_and_stops_when_it_lapses");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lease.json");
    let ttl = Duration::from_secs(3);
    LeaseFile::expiring_in(ttl).write(&path).unwrap();
    let lease_arg = path.to_string_lossy().into_owned();
    let image = Image::built();
    let mut guest = Guest::boot(
        &image,
        GuestSpec {
            vmm_args: &["--lease-file", &lease_arg],
            ..GuestSpec::default()
        },
    );
    // Renewed for twice the TTL: still running.
    let renewing = Instant::now();
    while renewing.elapsed() < ttl * 2 {
        LeaseFile::expiring_in(ttl).write(&path).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            guest.wait_exit(Duration::ZERO).is_none(),
            "the VMM exited while its lease was renewed:\n{}",
            guest.stderr_text()
        );
    }
    // No more renewals (the agent is gone): the guest stops within the TTL, plus the
    // VMM's 200 ms polling.
    let lapsed = Instant::now();
    let status = guest
        .wait_exit(ttl + Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "the VMM still runs after its lease lapsed:\n{}",
                guest.stderr_text()
            )
        });
    let took = lapsed.elapsed();
    assert!(status.success(), "{status:?}: {}", guest.stderr_text());
    assert!(
        took <= ttl + Duration::from_secs(2),
        "stopped {took:?} after the last renewal"
    );
    assert!(
        guest
            .stderr_text()
            .contains("lease expired: stopping the guest (fenced)"),
        "{}",
        guest.stderr_text()
    );
}
