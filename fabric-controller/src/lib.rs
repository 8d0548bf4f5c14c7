//! The Fabric controller.

pub mod scheduler;
pub mod store;
