//! The surface of `fabric-vmm` that the host daemon links, and no more: the daemon starts
//! `fabric-vmm` as a separate process and talks to it only through these.
//!
//! - [`lease`]: the host's lease as a file, renewed by the agent and watched by every VMM.
//! - [`client`]: a gRPC client of a VMM's control socket (`fabric.v1.Vmm`).
//! - [`fs::write_atomic`]: how both replace a small file so a reader never sees half of it.
//!
//! No device model, no KVM: `cargo tree -p fabric-agent` shows none.

pub mod client;
pub mod fs;
pub mod lease;
