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
pub mod error;
mod etcd;
mod file;
#[cfg(any(test, feature = "conformance"))]
pub mod memory;
mod revision;
mod root;
pub mod schema;
mod sealed;
pub mod snapshot;

use std::fmt;
use std::pin::Pin;

use futures::Stream;
use uuid::Uuid;

use super::model::KeyRecord;

use error::io_err;
pub use error::{EtcdError, StoreError};
pub use etcd::{connect_options as etcd_connect_options, retry_unsent, EtcdSettings, EtcdStore, EtcdTls};
pub use file::{lock_state_dir, CrashPoint, FileStore};
pub use revision::Revision;
pub use root::{check_private, mode_of, read_key_file, RootKey, ROOT_KEY_LEN};

/// Largest encoded record a store accepts, in bytes: about 20 000 versions,
/// i.e. decades of daily rotation, and below etcd's default request limit.
pub const MAX_RECORD_LEN: usize = 1 << 20;

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

    /// What kind of store this is and whether it is reachable now (for
    /// `status` and the metrics).
    fn health(&self) -> Health {
        Health {
            backend: "file",
            problem: None,
        }
    }
}

/// A store's health as `status` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `file` or `etcd`.
    pub backend: &'static str,
    /// Why it cannot be reached now, if it cannot.
    pub problem: Option<String>,
}
