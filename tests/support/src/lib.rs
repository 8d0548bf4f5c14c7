//! What every test binary and bench of the workspace shares: the guest image, real
//! `fabric-vmm` guests, test hosts in network namespaces running `fabric-agent`, a fake
//! controller for the agent's tests, whole test clusters, and waiting for states.
//!
//! - [`image`]: the guest image `images/build.sh` made (manifest, kernel, initramfs, parsers).
//! - [`guest`]: one `fabric-vmm` process with its console in a file, killed on drop.
//! - [`testguest`]: the freestanding device-test guest's ELF and what it prints.
//! - [`host`]: a `fabric-agent` in a network namespace of its own, with its bridge and cgroups.
//! - [`hostlink`]: a fake controller serving `HostLink` and `Images` to an agent under test.
//! - [`cluster`]: a real controller and simulated hosts over Unix sockets.
//! - [`compute`]: what tests ask the controller's Compute API again and again, and waiting.
//! - [`vmspec`]: the VM specs and assignments tests and benches ask for.
//! - [`netcluster`]: a real controller and real-KVM hosts, each in its own namespace.
//! - [`nemesis`]: the fault-injection harness that hunts double runs (a cluster of KVM and
//!   simulated hosts, a workload, faults from a seed, a sampler, a checker, a verdict).
//! - [`netns`]: network namespaces a test makes for itself, taps and raw packet sockets.
//! - [`process`]: what `/proc` says about a process, and finding a test's processes.
//!
//! A test that runs fabric-vmm starts with [`skip_without_kvm!`] (or [`image_or_skip!`] when it
//! boots the guest image), which returns early, saying why, on a host without `/dev/kvm`.
//!
//! It depends on no crate of the workspace but the protocol and `fabric-vmm-api` (the lease
//! file the nemesis's sampler reads), so every crate's tests may use it. The binaries it starts are the workspace's own, found by [`cluster::workspace_bin`]:
//! `cargo test --workspace` builds them; a single crate's tests need `cargo build --workspace`
//! first.

pub mod cluster;
pub mod compute;
pub mod guest;
pub mod host;
pub mod hostlink;
pub mod image;
pub mod nemesis;
pub mod netcluster;
pub mod netns;
pub mod pki;
pub mod process;
pub mod python;
pub mod testguest;
pub mod vmspec;
