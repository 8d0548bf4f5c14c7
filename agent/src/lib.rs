//! The host side of Fabric.
//!
//! - [`vmm`]: the virtual machine monitor run as `fabric-vmm`, one process per VM, on KVM.
//!   Its core (boot, vCPUs, devices) is synchronous; only its thin control endpoint is async.
//! - The host daemon `fabric-agent` (issue 5) lives beside it and drives `fabric-vmm` processes.

pub mod vmm;
