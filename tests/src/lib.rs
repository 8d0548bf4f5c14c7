//! Shared helpers for the end-to-end tests.

pub mod cluster;
pub mod image;
pub mod netcluster;
