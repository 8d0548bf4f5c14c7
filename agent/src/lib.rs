//! The host side of Fabric.
//!
//! - [`vmm`]: the virtual machine monitor run as `fabric-vmm`, one process per VM, on KVM.
//!   Its core (boot, vCPUs, devices) is synchronous; only its thin control endpoint is async.
//! - [`host`]: the host daemon run as `fabric-agent`: registers with the controller, holds the
//!   host's lease, and runs the VMs assigned to the host as `fabric-vmm` processes.

pub mod host;
pub mod lease;
pub mod vmm;
