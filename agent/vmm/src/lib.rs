//! fabric-vmm: a KVM virtual machine monitor built on the rust-vmm crates.
//!
//! One process runs one VM. [`config`] turns the command line into a checked [`VmConfig`];
//! [`builder`] assembles a VM from it (guest memory, kernel, boot parameters, vCPUs, devices);
//! [`runner`] runs it: one thread per vCPU, one epoll event loop for devices and control requests.
//! [`devices`] holds the emulated devices: the PC's serial port and i8042, and virtio-mmio devices
//! (block, rng, balloon) whose queue work runs on that event loop, never on a vCPU thread.
//! The [`control`] endpoint serves the `fabric.v1.Vmm` gRPC service on a Unix socket.

pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod logging;
pub mod memory;
pub mod runner;
pub mod vcpu;

pub use config::VmConfig;
