//! The store's own record types, one module per schema, and the
//! conversions between them and the key service's [`KeyRecord`].
//!
//! Rules that keep every store ever written readable:
//!
//! - A schema module (`v1`, `v2`) names no type of `client/src/proto` or
//!   of the service's model: a wire change cannot reach the disk by
//!   accident (a test reads their source to hold this).
//! - A released schema never changes (a golden-bytes test per schema). A
//!   new field is a new schema `vN+1`, with [`CURRENT`] moved to it, a
//!   conversion of schema N to the service's record in `convert`, and a
//!   fixture of the release that wrote schema N.
//! - Conversions destructure every struct field by field, so that a field
//!   added to the model or to a wire type fails to compile there instead of
//!   being dropped on the way to disk.
//!
//! Every schema decodes to the service's record; only the current one
//! encodes. A key file names its schema by its magic; `store.meta` names the
//! store's (see [`META_MAGIC`]).

mod convert;
pub mod v1;
pub mod v2;
pub mod version;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::keys::model::KeyRecord;

pub use super::error::SchemaError;
pub use version::CURRENT;

/// First bytes of `store.meta` from schema 2 on. The format of the meta
/// file itself never changes: this magic, a nonce, and sealed
/// [`META_CHECK`] followed by the schema number (u32, big-endian), so that
/// any later kmsd can say which schema a store is at.
pub const META_MAGIC: &[u8; 8] = b"KMSDMETA";
/// The check value sealed in `store.meta` from schema 2 on.
pub const META_CHECK: &[u8] = b"kmsd store meta";

/// Key material as every schema stores it: 32 bytes, zeroized on drop,
/// never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
pub struct Secret(pub [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A record read from a key file: its revision (schema 1 had none: 1) and
/// the record.
#[derive(Debug)]
pub struct Decoded {
    pub revision: u64,
    pub record: KeyRecord,
}

/// The magic that starts a key file of `schema`.
pub fn key_magic(schema: u32) -> Option<&'static [u8; 8]> {
    match schema {
        1 => Some(v1::KEY_MAGIC),
        2 => Some(v2::KEY_MAGIC),
        _ => None,
    }
}

/// The schema of a key file, from its first bytes.
pub fn schema_of(data: &[u8]) -> Option<u32> {
    (1..=CURRENT).find(|s| key_magic(*s).is_some_and(|m| data.starts_with(m)))
}

/// Decodes the (opened) body of a key file of `schema`.
///
/// # Errors
/// `Unknown` schema, or `Decode` when the bytes are not such a record.
pub fn decode(schema: u32, body: &[u8]) -> Result<Decoded, SchemaError> {
    let err = |source| SchemaError::Decode { schema, source };
    match schema {
        1 => {
            let r: v1::KeyRecord = postcard::from_bytes(body).map_err(err)?;
            Ok(Decoded {
                revision: 1,
                record: r.into(),
            })
        }
        2 => {
            let b: v2::FileBody = postcard::from_bytes(body).map_err(err)?;
            Ok(Decoded {
                revision: b.revision,
                record: b.record.into(),
            })
        }
        other => Err(SchemaError::Unknown(other)),
    }
}

/// Encodes a record and its revision as the body of a key file of the
/// current schema.
///
/// # Errors
/// `Encode` (not expected: every type here is plain data).
pub fn encode(revision: u64, record: &KeyRecord) -> Result<Zeroizing<Vec<u8>>, SchemaError> {
    let body = v2::FileBody {
        revision,
        record: record.into(),
    };
    postcard::to_allocvec(&body)
        .map(Zeroizing::new)
        .map_err(SchemaError::Encode)
}

#[cfg(test)]
mod tests;
