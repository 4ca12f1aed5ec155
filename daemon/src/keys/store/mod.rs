//! Persistence of key records. The key service writes through the
//! [`KeyStore`] trait: load every record, write or delete one with a
//! compare-and-swap on its [`Revision`], and hear about changes made by
//! other writers. [`FileStore`] keeps one sealed file per key under the
//! state directory (one daemon); [`EtcdStore`] keeps the same sealed
//! records in etcd (a fleet). Both seal with `sealed`; the records are the
//! store's own types ([`schema`]), never the wire types.
//!
//! Every implementation must pass the suite in `conformance` (built for
//! tests and with the `conformance` feature); `memory` is a multi-writer
//! store for tests.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod etcd;
mod file;
#[cfg(any(test, feature = "conformance"))]
pub mod memory;
mod root;
pub mod schema;
mod sealed;

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::Stream;
use uuid::Uuid;

use super::model::KeyRecord;

pub use etcd::{EtcdError, EtcdSettings, EtcdStore, EtcdTls};
pub use file::{lock_state_dir, CrashPoint, FileStore};
pub use root::{check_private, mode_of, read_key_file, RootKey, ROOT_KEY_LEN};

/// Largest encoded record a store accepts, in bytes: about 20 000 versions,
/// i.e. decades of daily rotation, and below etcd's default request limit.
pub const MAX_RECORD_LEN: usize = 1 << 20;

/// A record's revision: assigned by the store at each write (a store may
/// number them as it likes, e.g. etcd's `mod_revision`). A later write of a
/// store has a greater revision than every earlier one it made or reported,
/// so that a reader can drop a change older than what it holds. A store
/// never gives the same record the same revision twice while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(u64);

impl Revision {
    /// The revision numbered `n`.
    pub fn new(n: u64) -> Self {
        Self(n)
    }

    /// Its number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revision {}", self.0)
    }
}

/// A record as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub revision: Revision,
    pub record: KeyRecord,
}

/// A change made by another writer of the same store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A record was created or replaced.
    Put(Box<Stored>),
    /// A record was deleted; `revision` is the one it had.
    Deleted { id: Uuid, revision: Revision },
    /// The store could not say what changed (e.g. etcd compacted the
    /// history a watch needed): these are all its records as of `at`. A
    /// record held at a revision after `at` is newer than this snapshot;
    /// one held at or before `at` and absent here was deleted.
    Reloaded { at: Revision, records: Vec<Stored> },
}

/// The changes made by other writers, in the order the store applied them.
pub type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

/// Where the key service keeps its records.
///
/// Calls block (they are durable before they return) and may come from
/// several threads at once; an implementation serialises what it must.
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Every record, with its revision.
    ///
    /// # Errors
    /// The store cannot be read, or a record is corrupt (named).
    fn load(&self) -> Result<Vec<Stored>, StoreError>;

    /// The record `id` as the store holds it now, if any.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    fn get(&self, id: Uuid) -> Result<Option<Stored>, StoreError> {
        Ok(self.load()?.into_iter().find(|s| s.record.id == id))
    }

    /// Writes `record` durably if the store holds it at `expected` (`None`:
    /// if the store does not hold it), and returns its new revision.
    /// Otherwise nothing changes.
    ///
    /// A store with several writers also refuses a record whose name
    /// another record holds (`NameTaken`); with one writer, the key
    /// service's own index keeps names unique.
    ///
    /// # Errors
    /// `Conflict` when the stored revision is not `expected`, `NameTaken`,
    /// `TooLarge` when the encoded record exceeds [`MAX_RECORD_LEN`], `Io`
    /// or `Etcd`.
    fn put(&self, record: &KeyRecord, expected: Option<Revision>) -> Result<Revision, StoreError>;

    /// Deletes the record `id` durably if the store holds it at `expected`.
    ///
    /// # Errors
    /// `Conflict` when it is at another revision or absent, `Io`.
    fn delete(&self, id: Uuid, expected: Revision) -> Result<(), StoreError>;

    /// The changes other writers make from now on; never this store's own.
    /// A single-writer store's stream never yields.
    fn changes(&self) -> ChangeStream;
}

/// Why a store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the root key does not open this key store ({path}); is it the key the store was created with?")]
    WrongRootKey { path: PathBuf },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} cannot be read")]
    Schema {
        path: PathBuf,
        #[source]
        source: schema::SchemaError,
    },
    #[error("{path} is at store schema {found}, newer than the {supported} this kmsd reads; run a newer kmsd")]
    NewerSchema { path: PathBuf, found: u32, supported: u32 },
    #[error("key file {path} is invalid: {reason}")]
    BadRootKey { path: PathBuf, reason: String },
    #[error("state directory {path} is in use by another kmsd")]
    Locked { path: PathBuf },
    #[error("{path} {problem}; fix it with: {fix}")]
    Insecure {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("key {id} was changed by another writer: expected {}, found {}", show(*expected), show(*found))]
    Conflict {
        id: Uuid,
        expected: Option<Revision>,
        found: Option<Revision>,
    },
    #[error("key {id}'s record is {len} bytes, over the store's limit of {limit}")]
    TooLarge { id: Uuid, len: usize, limit: usize },
    #[error("another key of the store is named {name:?}")]
    NameTaken { name: String },
    #[error("etcd at {endpoints}: {op}")]
    Etcd {
        op: String,
        endpoints: String,
        #[source]
        source: etcd::EtcdError,
    },
}

fn show(r: Option<Revision>) -> String {
    r.map_or_else(|| "no record".to_string(), |r| r.to_string())
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
