//! Why a store could not be opened, read or written. This module names no
//! record type, so that the key service's error can wrap a [`StoreError`]
//! without the store's errors depending back on the key model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

use super::revision::Revision;
use super::schema::version::CURRENT;

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
        source: SchemaError,
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
    #[error(
        "{place} is being restored (marker {marker}): no kmsd serves it until the restore finishes; \
         if no kmsd restore is running any more, run it again with --resume"
    )]
    Restoring { place: String, marker: String },
    #[error("{place} was emptied and filled again (restored) since this kmsd opened it: restart this kmsd to serve what it holds now")]
    Replaced { place: String },
    #[error("{count} kmsd daemon(s) run on {place} (their keys under {marker}); stop every kmsd of the zone first")]
    DaemonsAlive { place: String, marker: String, count: i64 },
    #[error("{place} already holds {count} key(s); restore and migrate fill only an empty store (stop kmsd, empty it, run again)")]
    NotEmpty { place: String, count: i64 },
    #[error("etcd at {endpoints}: {op}")]
    Etcd {
        op: String,
        endpoints: String,
        #[source]
        source: EtcdError,
    },
}

fn show(r: Option<Revision>) -> String {
    r.map_or_else(|| "no record".to_string(), |r| r.to_string())
}

pub(super) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Why a record could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema {0} is not one this kmsd knows (1..={CURRENT})")]
    Unknown(u32),
    #[error("cannot decode a schema {schema} record")]
    Decode {
        schema: u32,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode a schema {CURRENT} record")]
    Encode(#[source] postcard::Error),
}

/// Why etcd did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(transparent)]
    Client(#[from] etcd_client::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Protocol(String),
}
