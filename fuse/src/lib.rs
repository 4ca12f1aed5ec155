//! kms-fuse: kmsd's transparent encrypting filesystem.
//!
//! - [`format`]: the on-disk layout of an encrypted file, as pure functions.
//! - [`keys`]: data keys and the [`keys::KeySource`] that wraps them.

pub mod error;
pub mod file;
pub mod format;
pub mod fs;
pub mod inode;
pub mod keys;
mod xattr;
