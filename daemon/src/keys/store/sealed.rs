//! The sealed form of what a store writes, shared by every backend so that
//! a record is the same bytes wherever it is kept:
//!
//! - a key record: its schema's magic, a random nonce and AES-256-GCM under
//!   the root key of the schema body (record and revision), with the magic
//!   and the key id as additional data;
//! - the store's meta: [`META_MAGIC`] and, sealed, [`META_CHECK`] and the
//!   schema number (schema 1 wrote its own magic and no number).
//!
//! Backends differ only in where the bytes go and how they name them; `at`
//! is that place, for errors.

use std::path::Path;

use uuid::Uuid;

use super::root::RootKey;
use super::schema::{self, v1, CURRENT, META_CHECK, META_MAGIC};
use super::{Revision, StoreError, Stored, MAX_RECORD_LEN};
use crate::keys::model::KeyRecord;

/// `record` at `revision`, sealed in the current schema.
///
/// # Errors
/// `TooLarge` when the body exceeds [`MAX_RECORD_LEN`]; `Schema` if it
/// cannot be encoded.
pub(super) fn seal_record(root: &RootKey, revision: u64, record: &KeyRecord, at: &Path) -> Result<Vec<u8>, StoreError> {
    let body = schema::encode(revision, record).map_err(|source| StoreError::Schema {
        path: at.into(),
        source,
    })?;
    if body.len() > MAX_RECORD_LEN {
        return Err(StoreError::TooLarge {
            id: record.id,
            len: body.len(),
            limit: MAX_RECORD_LEN,
        });
    }
    let magic = schema::key_magic(CURRENT).expect("the current schema has a magic");
    Ok(root.seal(magic, record.id.as_bytes(), &body))
}

/// Opens the sealed record of key `id`, which must be at `schema`, and
/// checks that it is that key's and that its versions ascend from 1 (only
/// a tombstone, a replica deleted in this zone, has none).
///
/// # Errors
/// `Corrupt` (another schema, does not authenticate, not this key's, bad
/// versions), `NewerSchema`, `Schema` when the body does not decode.
pub(super) fn open_record(root: &RootKey, id: Uuid, data: &[u8], schema: u32, at: &Path) -> Result<Stored, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: at.into(),
        reason,
    };
    match schema::schema_of(data) {
        Some(found) if found != schema => {
            return Err(corrupt(format!("a schema {found} record in a schema {schema} store")));
        }
        _ => {}
    }
    let magic = schema::key_magic(schema).ok_or_else(|| StoreError::NewerSchema {
        path: at.into(),
        found: schema,
        supported: CURRENT,
    })?;
    let plain = root
        .open(magic, id.as_bytes(), data)
        .ok_or_else(|| corrupt("does not authenticate".into()))?;
    let decoded = schema::decode(schema, &plain).map_err(|source| StoreError::Schema {
        path: at.into(),
        source,
    })?;
    if decoded.record.id != id {
        return Err(corrupt("record does not match its file".into()));
    }
    Ok(Stored {
        revision: Revision::new(decoded.revision),
        record: check_record(decoded.record, at)?,
    })
}

/// `record` if it is whole: versions ascending from 1 (only a tombstone, a
/// replica deleted in this zone, has none).
///
/// # Errors
/// `Corrupt`, naming `at`.
pub(super) fn check_record(record: KeyRecord, at: &Path) -> Result<KeyRecord, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: at.into(),
        reason: reason.into(),
    };
    if record.versions.is_empty() && record.deleted_at.is_none() {
        return Err(corrupt("record does not match its file"));
    }
    let ascending = record.versions.windows(2).all(|w| w[0].version < w[1].version);
    if !ascending || record.versions.first().is_some_and(|v| v.version != 1) {
        return Err(corrupt("versions are not ascending from 1"));
    }
    Ok(record)
}

/// The sealed meta of a store at `schema`.
pub(super) fn seal_meta(root: &RootKey, schema: u32) -> Vec<u8> {
    let plain = [META_CHECK, &schema.to_be_bytes()].concat();
    root.seal(META_MAGIC, b"", &plain)
}

/// The schema a sealed meta names.
///
/// # Errors
/// `WrongRootKey` when it does not open, `Corrupt` when it is not a meta.
pub(super) fn open_meta(root: &RootKey, data: &[u8], at: &Path) -> Result<u32, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: at.into(),
        reason: reason.into(),
    };
    let wrong_key = || StoreError::WrongRootKey { path: at.into() };
    if data.starts_with(v1::META_MAGIC) {
        let plain = root.open(v1::META_MAGIC, b"", data).ok_or_else(wrong_key)?;
        return if &plain[..] == v1::META_CHECK {
            Ok(1)
        } else {
            Err(corrupt("unexpected check value"))
        };
    }
    if !data.starts_with(META_MAGIC) {
        return Err(corrupt("not a kmsd store meta file"));
    }
    let plain = root.open(META_MAGIC, b"", data).ok_or_else(wrong_key)?;
    let number = plain
        .strip_prefix(META_CHECK)
        .and_then(|n| <[u8; 4]>::try_from(n).ok())
        .ok_or_else(|| corrupt("unexpected check value"))?;
    Ok(u32::from_be_bytes(number))
}
