//! kmsd: a local key-management sidecar.
//!
//! [`keys`] holds the key service; the rest of the crate puts it on a Unix
//! socket, schedules its rotations and mounts its filesystems.

pub mod keys;
