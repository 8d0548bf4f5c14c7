//! The harness every benchmark in `src/bin/` runs on, so that each binary holds only what it
//! measures:
//!
//! - [`stats`]: medians, nearest-rank percentiles, seconds for the tables.
//! - [`interrupt`]: Ctrl-C and SIGTERM end a run through its normal path, so that what it
//!   made is removed.
//! - [`cleanup`]: what a run made on the host (processes, namespaces, cgroups, a directory),
//!   removed also when a panic aborts the program, and checked to be gone.
//! - [`vmm`]: fabric-vmm and QEMU booting the same guest, their consoles read line by line.
//!
//! Clusters, hosts, guest images and `/proc` come from `fabric_test_support`, as in the tests.

pub mod cleanup;
pub mod interrupt;
pub mod stats;
pub mod vmm;

use anyhow::Context;

/// Fails unless `/dev/kvm` can be opened for reading and writing: every benchmark that boots
/// a guest checks this first.
pub fn require_kvm() -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("/dev/kvm is not usable; this benchmark boots real guests")?;
    Ok(())
}
