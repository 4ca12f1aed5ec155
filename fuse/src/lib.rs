//! kms-fuse: kmsd's transparent encrypting filesystem.
//!
//! - [`format`]: the on-disk layout of an encrypted file, as pure functions.
//! - [`keys`]: data keys and the [`keys::KeySource`] that wraps them.
//! - [`file`]: one open encrypted file (random-access plaintext I/O).
//! - [`fs`]: the filesystem operations; [`adapter`]: their FUSE binding.
//! - [`mount`]: mount, unmount, stale-mount recovery.
//! - [`admin`]: `fs versions` and `fs rewrap` over a backing directory.
//! - [`stats`]: counters of a mounted filesystem, for the daemon's metrics;
//!   [`tamper`]: the rate limit of its tamper warnings.
//! - `fault`: named crash points of the end-to-end tests (feature
//!   `test-faults` only).

pub mod adapter;
pub mod admin;
pub mod error;
mod fault;
pub mod file;
pub mod format;
pub mod fs;
mod gcm;
pub mod inode;
pub mod journal;
pub mod keys;
pub mod mount;
pub mod names;
pub mod stats;
pub mod tamper;
mod xattr;

pub use error::Error;
pub use fs::NameMode;
pub use keys::{Dek, FileId, KeyError, KeySource, MemoryKeySource};
pub use mount::{mount, recover_stale_mount, MountHandle, MountOptions};
pub use stats::{FsOp, FsStats, FsStatsSnapshot};
