//! Boots the default guest kernel with virtio devices and checks what the guest kernel did with
//! them: both disks probed with their sizes, the read-only rootfs mounted as the root
//! filesystem, the entropy device read by the kernel's hwrng core.
//!
//! On hosts without hardware virtualization guest user space cannot run (`shared/KVM-HOST.md`),
//! so the checks are on the guest kernel's console and the VMM's own log.

use fabric_test_support::guest::{refusal, tail, vmm_binary, Guest, GuestSpec, BOOT_TIMEOUT};
use fabric_test_support::image_or_skip;

use std::path::Path;
use std::process::Command;

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
    let image = image_or_skip!("two_disks_and_rng");
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
    let rootfs_ro = format!("{},ro", rootfs.display());
    let scratch_arg = scratch.display().to_string();
    let mut guest = Guest::boot(
        &image,
        GuestSpec {
            cmdline: Some(cmdline),
            vmm_args: &["--disk", &rootfs_ro, "--disk", &scratch_arg, "--rng"],
            // The root is the first disk.
            initramfs: false,
            ..Default::default()
        },
    );

    let console = guest.wait_console("VFS: Mounted root (ext4 filesystem) readonly", BOOT_TIMEOUT);
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
    guest.wait_for(rng_used, BOOT_TIMEOUT, |_, log| log.contains(rng_used));

    // Linux's drivers never trip the transport's or the devices' checks.
    guest.assert_no_device_complaints();
    eprintln!(
        "two_disks_and_rng: checked the guest kernel ({})",
        image.userspace_note()
    );
}

#[test]
fn a_disk_that_cannot_be_opened_is_a_config_error() {
    let image = image_or_skip!("disk_cannot_be_opened");
    let with_disk = |disk: &str| {
        refusal(
            Command::new(vmm_binary())
                .arg("--kernel")
                .arg(image.kernel())
                .args(["--disk", disk]),
        )
    };
    let stderr = with_disk("/nonexistent/disk.img,ro");
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        "fabric-vmm: --disk /nonexistent/disk.img: cannot open: No such file or directory (os error 2)"
    );

    let stderr = with_disk("/tmp/x.img,readonly");
    assert!(stderr.contains("unknown option \"readonly\""), "{stderr}");
}
