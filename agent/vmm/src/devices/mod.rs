//! Emulated devices and the buses that route guest port and MMIO accesses to them.
//!
//! A device is a plain state machine behind [`BusDevice`]: reads and writes at an offset from
//! its base. Its effects on the outside (interrupts, reset requests, console output) go through
//! small handles given at construction, so each device is unit-tested without KVM.
//!
//! Devices that have work to do outside register accesses (virtio queues notified through
//! ioeventfds, taps) are also an [`EventSubscriber`]: the runner's epoll loop watches the
//! file descriptors they name and calls them back, so that work never runs on a vCPU thread.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::os::fd::RawFd;

pub use bus::{Bus, BusDevice};

/// Something the VMM's event loop serves: it watches `event_fds` for readability and calls
/// `handle_event` with the one that became readable. The set of fds is fixed when the loop
/// starts; a subscriber whose work depends on its state (e.g. a device not yet activated)
/// checks it in `handle_event`. The fds are watched edge-triggered: `handle_event` consumes
/// what woke it (reads the eventfd, reads the tap until it would block) or keeps track of the
/// work left itself, since the same readiness is not reported twice.
pub trait EventSubscriber: Send {
    /// The file descriptors to watch.
    fn event_fds(&self) -> Vec<RawFd>;
    /// `fd`, one of `event_fds`, is readable. Must not block.
    fn handle_event(&mut self, fd: RawFd);
}
