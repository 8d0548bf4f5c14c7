//! Emulated devices and the buses that route guest port and MMIO accesses to them.
//!
//! A device is a plain state machine behind [`BusDevice`]: reads and writes at an offset from
//! its base. Its effects on the outside (interrupts, reset requests, console output) go through
//! small handles given at construction, so each device is unit-tested without KVM.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;

pub use bus::{Bus, BusDevice};
