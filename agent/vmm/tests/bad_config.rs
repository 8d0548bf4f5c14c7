//! Every bad configuration gets one clear line on stderr and exit status 1, never a panic.

use fabric_test_support::guest as common;
use fabric_test_support::skip_without_kvm;

use std::path::Path;
use std::process::Command;

/// fabric-vmm with `args` exits with status 1, its last line on stderr saying `message`.
fn assert_refused(args: &[&str], message: &str) {
    let stderr = common::refusal(Command::new(common::vmm_binary()).args(args));
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fabric-vmm: ") && last.contains(message),
        "args {args:?}: expected one line with {message:?}, got:\n{stderr}"
    );
}

/// A sparse file of `len` bytes named `name` in `dir`; its path.
fn sparse_file(dir: &Path, name: &str, len: u64) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len))
        .expect("sparse file");
    path.to_str().expect("utf8").to_string()
}

fn kernel() -> String {
    let image = common::Image::built();
    image.kernel().to_string_lossy().into_owned()
}

#[test]
fn missing_kernel() {
    skip_without_kvm!("missing_kernel");
    assert_refused(
        &["--kernel", "/nonexistent/bzImage"],
        "kernel /nonexistent/bzImage: cannot read: No such file or directory",
    );
}

#[test]
fn unreadable_kernel() {
    skip_without_kvm!("unreadable_kernel");
    // A directory cannot be read as a file, even by root.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().to_string_lossy().into_owned();
    assert_refused(&["--kernel", &path], "cannot read: is a directory");
}

#[test]
fn file_that_is_not_a_kernel() {
    skip_without_kvm!("not_a_kernel");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "not a kernel at all\n".repeat(100)).expect("write");
    assert_refused(&["--kernel", path.to_str().expect("utf8")], "not a kernel");
}

#[test]
fn memory_zero_and_more_than_the_host() {
    skip_without_kvm!("memory");
    let k = kernel();
    assert_refused(
        &["--kernel", &k, "--memory", "0"],
        "memory 0 MiB: must be at least 64 MiB",
    );
    assert_refused(
        &["--kernel", &k, "--memory", "100000000"],
        "memory 100000000 MiB: more than the host has",
    );
}

#[test]
fn vcpus_zero_and_above_kvm_maximum() {
    skip_without_kvm!("vcpus");
    let k = kernel();
    assert_refused(&["--kernel", &k, "--vcpus", "0"], "vcpus 0");
    assert_refused(
        &["--kernel", &k, "--vcpus", "100000"],
        "vcpus 100000: above the maximum of",
    );
}

#[test]
fn command_line_too_long() {
    skip_without_kvm!("cmdline");
    let k = kernel();
    let long = "x".repeat(3000);
    assert_refused(
        &["--kernel", &k, "--cmdline", &long],
        "kernel command line is 3000 bytes: too long for the boot protocol",
    );
}

#[test]
fn initramfs_that_does_not_fit() {
    skip_without_kvm!("initrd");
    let k = kernel();
    let dir = tempfile::tempdir().expect("tmp");
    let refused_in_256_mib = |initrd: &str, message: &str| {
        assert_refused(
            &["--kernel", &k, "--memory", "256", "--initrd", initrd],
            message,
        );
    };
    // Larger than all of guest memory: refused before anything is built.
    let huge = sparse_file(dir.path(), "huge.cpio", 512 << 20);
    refused_in_256_mib(&huge, "does not fit");
    // Smaller than memory, but no room between the kernel and the top of RAM.
    let big = sparse_file(dir.path(), "big.cpio", 250 << 20);
    refused_in_256_mib(&big, "does not fit in guest memory");
    assert!(Path::new(&k).exists());
}
