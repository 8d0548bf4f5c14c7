//! Every bad configuration gets one clear line on stderr and exit status 1, never a panic.

use fabric_test_support::guest as common;
use fabric_test_support::skip_without_kvm;

use std::path::Path;
use std::process::Command;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn run_vmm(args: &[&str]) -> Outcome {
    let out = Command::new(common::vmm_binary())
        .args(args)
        .args(["--console", "off"])
        .output()
        .expect("run fabric-vmm");
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_refused(args: &[&str], message: &str) {
    let out = run_vmm(args);
    assert_eq!(out.code, Some(1), "args {args:?}: stderr {}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fabric-vmm: ") && last.contains(message),
        "args {args:?}: expected one line with {message:?}, got:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

fn kernel() -> String {
    let image = common::Image::load();
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
    // Larger than all of guest memory: refused before anything is built.
    let huge = dir.path().join("huge.cpio");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(512 << 20))
        .expect("sparse file");
    assert_refused(
        &[
            "--kernel",
            &k,
            "--memory",
            "256",
            "--initrd",
            huge.to_str().expect("utf8"),
        ],
        "does not fit",
    );
    // Smaller than memory, but no room between the kernel and the top of RAM.
    let big = dir.path().join("big.cpio");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(250 << 20))
        .expect("sparse file");
    assert_refused(
        &[
            "--kernel",
            &k,
            "--memory",
            "256",
            "--initrd",
            big.to_str().expect("utf8"),
        ],
        "does not fit in guest memory",
    );
    assert!(Path::new(&k).exists());
}
