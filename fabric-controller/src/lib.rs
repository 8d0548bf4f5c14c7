//! The Fabric controller.

pub mod scheduler;
