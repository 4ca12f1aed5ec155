//! kmsd: a local key-management sidecar.
//!
//! [`keys`] holds the key service; the rest of the crate puts it on a Unix
//! socket, schedules its rotations and mounts its filesystems.

pub mod app;
pub mod config;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod mounts;
pub mod notify;
pub mod observe;
pub mod ops;
pub mod replication;
pub mod scheduler;
pub mod server;
