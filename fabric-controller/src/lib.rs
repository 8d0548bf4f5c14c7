//! The Fabric controller: durable desired state, placement and healing.
//!
//! - [`store`]: the durable key-value store (redb by default; etcd-shaped).
//! - [`controller`]: the in-memory model over the store and every mutation of it.
//! - [`compute`], [`hostlink`], [`images`]: the gRPC services for operators, agents and
//!   image transfers.
//! - [`reconcile`]: the level-triggered loop that places, heals and drains.
//! - [`scheduler`]: the pure placement library, fed by [`placement`].
//! - [`join`]: join tokens and the host certificates the controller signs.
//! - [`events`]: the event feed; [`validate`]: operator input checks.

pub mod audit;
pub mod authz;
pub mod cli;
pub mod compute;
pub mod controller;
pub mod events;
pub mod hostlink;
pub mod images;
pub mod join;
pub mod placement;
pub mod reconcile;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod validate;
