//! A zone's snapshot: every record of a store, as the `backup` operation
//! hands it to `kmsctl backup` (which seals it, `kms_client::backup`) and
//! as `kmsd restore` reads it back.
//!
//! ```text
//! 0..8    magic "KMSDSNAP"
//! 8..12   u32 BE  snapshot version = 1
//! 12..    postcard of { zone: String, schema: u32, taken_at: u64,
//!                       records: Vec<bytes> }
//! ```
//!
//! Each record is the body of store schema `schema` (`schema::encode`,
//! with revision 0): the same field-by-field types the stores seal, so a
//! snapshot keeps everything a record holds (versions with their material,
//! origins and times, epoch, serial, replicas, tombstones) and a later kmsd
//! reads an older snapshot with that schema's decoder. Revisions are the
//! store's own and are not kept: the target store assigns new ones.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::schema::{self, CURRENT};
use super::{sealed, StoreError, Stored};
use crate::keys::model::KeyRecord;

const MAGIC: &[u8; 8] = b"KMSDSNAP";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 12;

/// The records of a snapshot, read back.
#[derive(Debug)]
pub struct Snapshot {
    /// The zone it was taken in.
    pub zone: String,
    /// When (Unix seconds, the daemon's clock).
    pub taken_at: u64,
    pub records: Vec<KeyRecord>,
}

#[derive(Serialize, Deserialize)]
struct Body {
    zone: String,
    schema: u32,
    taken_at: u64,
    records: Vec<Vec<u8>>,
}

impl Drop for Body {
    fn drop(&mut self) {
        self.records.zeroize();
    }
}

/// Why a snapshot cannot be read (its backup file opened, so it is what
/// some kmsd wrote, or a newer one).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a kmsd snapshot")]
    NotASnapshot,
    #[error("snapshot version {0}: written by a newer kmsd; restore it with that release")]
    Version(u32),
    #[error("cannot decode the snapshot")]
    Decode(#[source] postcard::Error),
    #[error("record {index} of the snapshot")]
    Record {
        index: usize,
        #[source]
        source: StoreError,
    },
    #[error("key {0} appears twice in the snapshot")]
    Duplicate(uuid::Uuid),
}

/// The snapshot of `records` (as a store holds them) of `zone`.
///
/// # Errors
/// `Schema` when a record cannot be encoded.
pub fn encode(zone: &str, taken_at: u64, records: &[Stored]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let mut body = Body {
        zone: zone.to_string(),
        schema: CURRENT,
        taken_at,
        records: Vec::with_capacity(records.len()),
    };
    for s in records {
        let encoded = schema::encode(0, &s.record).map_err(|source| StoreError::Schema {
            path: format!("snapshot key {}", s.record.id).into(),
            source,
        })?;
        body.records.push(encoded.to_vec());
    }
    let mut out = Zeroizing::new(Vec::new());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    let encoded = Zeroizing::new(postcard::to_allocvec(&body).map_err(|e| StoreError::Schema {
        path: "snapshot".into(),
        source: schema::SchemaError::Encode(e),
    })?);
    out.extend_from_slice(&encoded);
    Ok(out)
}

/// Reads a snapshot back, checking every record as a store checks what it
/// reads and that no key appears twice.
///
/// # Errors
/// [`SnapshotError`].
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let version = u32::from_be_bytes(bytes[8..12].try_into().expect("four bytes"));
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let mut body: Body = postcard::from_bytes(&bytes[HEADER_LEN..]).map_err(SnapshotError::Decode)?;
    let mut records = Vec::with_capacity(body.records.len());
    let mut seen = std::collections::HashSet::new();
    for (index, raw) in body.records.iter().enumerate() {
        let at = std::path::PathBuf::from("the snapshot");
        let record = schema::decode(body.schema, raw)
            .map_err(|source| StoreError::Schema {
                path: at.clone(),
                source,
            })
            .and_then(|d| sealed::check_record(d.record, &at))
            .map_err(|source| SnapshotError::Record { index, source })?;
        if !seen.insert(record.id) {
            return Err(SnapshotError::Duplicate(record.id));
        }
        records.push(record);
    }
    Ok(Snapshot {
        zone: std::mem::take(&mut body.zone),
        taken_at: body.taken_at,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::store::conformance::record;
    use crate::keys::store::Revision;

    #[test]
    fn round_trip_keeps_every_record_whole() {
        use crate::keys::store::conformance::changed;
        let mut a = changed(&changed(&record("a")));
        a.serial = 7;
        a.epoch = 2;
        // A tombstone: a replica deleted in this zone, no versions.
        let mut b = record("b");
        b.role = kms_client::proto::KeyRole::Replica {
            primary_zone: "zone-p".into(),
        };
        b.versions.clear();
        b.deleted_at = Some(5_000);
        let stored: Vec<Stored> = [a.clone(), b.clone()]
            .into_iter()
            .map(|record| Stored {
                revision: Revision::new(9),
                record,
            })
            .collect();
        let bytes = encode("zone-a", 123, &stored).unwrap();
        let snap = decode(&bytes).unwrap();
        assert_eq!((snap.zone.as_str(), snap.taken_at), ("zone-a", 123));
        assert_eq!(snap.records, vec![a, b]);
    }

    #[test]
    fn a_duplicate_or_a_foreign_header_is_refused() {
        let one = Stored {
            revision: Revision::new(1),
            record: record("a"),
        };
        let bytes = encode("z", 1, &[one.clone(), one]).unwrap();
        assert!(matches!(decode(&bytes), Err(SnapshotError::Duplicate(_))));
        assert!(matches!(
            decode(b"KMSDKEY2\0\0\0\x01"),
            Err(SnapshotError::NotASnapshot)
        ));
        let mut v2 = encode("z", 1, &[]).unwrap().to_vec();
        v2[11] = 2;
        assert!(matches!(decode(&v2), Err(SnapshotError::Version(2))));
        assert!(matches!(decode(&v2[..11]), Err(SnapshotError::NotASnapshot)));
    }
}
