//! The Fabric controller.
