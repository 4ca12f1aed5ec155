//! Envelope crypto on blobs: AES-256-GCM under one key version, with the
//! blob header and the canonical encryption context as AAD
//! (layout in [`kms_client::blob`]).
//!
//! Ciphers are built once per key version (see [`VersionCiphers`]) so that
//! no request pays for key expansion.

use std::sync::Arc;

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use kms_client::blob;
use kms_client::proto::Context;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::error::{Error, Result};
use super::model::KeyRecord;

/// The initialised cipher of each version of one key, by version number
/// (ascending, as the record's versions).
#[derive(Clone)]
pub struct VersionCiphers(Vec<(u32, Arc<Aes256Gcm>)>);

impl std::fmt::Debug for VersionCiphers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VersionCiphers({} versions, [redacted])", self.0.len())
    }
}

impl VersionCiphers {
    /// Ciphers for every version of `key`, reusing those of `previous`
    /// (an older snapshot of the same key) where they exist.
    pub fn build(key: &KeyRecord, previous: Option<&VersionCiphers>) -> Self {
        let out = key
            .versions
            .iter()
            .map(|v| {
                let reused = previous.and_then(|p| p.find(v.version)).cloned();
                let cipher = reused.unwrap_or_else(|| Arc::new(Aes256Gcm::new(v.material.expose().into())));
                (v.version, cipher)
            })
            .collect();
        Self(out)
    }

    fn find(&self, version: u32) -> Option<&Arc<Aes256Gcm>> {
        let i = self.0.binary_search_by_key(&version, |(v, _)| *v).ok()?;
        Some(&self.0[i].1)
    }

    /// The cipher of `version`, if that version exists.
    pub fn get(&self, version: u32) -> Option<&Aes256Gcm> {
        self.find(version).map(|c| &**c)
    }
}

/// A blob and the key version that sealed it, so that whoever reports the
/// operation (metrics, audit) is told them instead of parsing them back
/// out of the bytes. Reads as the blob's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub blob: Vec<u8>,
    pub key_id: Uuid,
    pub version: u32,
}

impl std::ops::Deref for Sealed {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.blob
    }
}

impl AsRef<[u8]> for Sealed {
    fn as_ref(&self) -> &[u8] {
        &self.blob
    }
}

/// Encrypts `plaintext` under `cipher` (key `key_id`, `version`) into a blob.
pub fn seal(cipher: &Aes256Gcm, key_id: Uuid, version: u32, plaintext: &[u8], context: &Context) -> Sealed {
    Sealed {
        blob: blob::seal(cipher, key_id, version, plaintext, context),
        key_id,
        version,
    }
}

/// Decrypts a blob whose header was already parsed and whose key version's
/// cipher was found.
///
/// # Errors
/// `DecryptFailed` when the tag does not verify: wrong context, altered
/// bytes, or a blob made under other material.
pub fn open(cipher: &Aes256Gcm, blob: &[u8], context: &Context) -> Result<Zeroizing<Vec<u8>>> {
    blob::open(cipher, blob, context)
        .map_err(|_| Error::DecryptFailed("authentication failed (wrong context, altered blob, or another key's blob)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::material::Material;
    use kms_client::blob::{BlobHeader, HEADER_LEN, TAG_LEN};

    fn cipher(m: &Material) -> Aes256Gcm {
        Aes256Gcm::new(m.expose().into())
    }

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn seal_open_round_trip_with_layout() {
        let m = Material::random();
        let id = Uuid::new_v4();
        let blob = seal(&cipher(&m), id, 7, b"secret", &ctx(&[("app", "x")]));
        assert_eq!(blob.len(), HEADER_LEN + 6 + TAG_LEN);
        let h = BlobHeader::parse(&blob).unwrap();
        assert_eq!((h.key_id, h.version), (id, 7));
        assert_eq!((blob.key_id, blob.version), (id, 7), "seal says what it used");
        let out = open(&cipher(&m), &blob, &ctx(&[("app", "x")])).unwrap();
        assert_eq!(&out[..], b"secret");
    }

    #[test]
    fn ciphers_are_built_once_per_version_and_reused_across_rotations() {
        use crate::keys::model::{KeyRecord, RotationSchedule};
        let mut key = KeyRecord::new(
            Uuid::new_v4(),
            kms_client::proto::KeyKind::Customer,
            "z",
            RotationSchedule::every(365, 0),
            0,
        );
        let before = VersionCiphers::build(&key, None);
        crate::keys::rotation::rotate_manual(&mut key, 1).unwrap();
        let after = VersionCiphers::build(&key, Some(&before));
        assert!(
            Arc::ptr_eq(&before.0[0].1, &after.0[0].1),
            "version 1's cipher is reused, not expanded again"
        );
        assert_eq!(after.0.len(), 2);
        assert!(after.get(3).is_none() && after.get(0).is_none());
    }

    #[test]
    fn nonces_are_fresh() {
        let m = Material::random();
        let a = seal(&cipher(&m), Uuid::nil(), 1, b"x", &Context::new());
        let b = seal(&cipher(&m), Uuid::nil(), 1, b"x", &Context::new());
        assert_ne!(a, b);
    }

    #[test]
    fn every_flipped_bit_fails() {
        let m = Material::random();
        let c = cipher(&m);
        let blob = seal(&c, Uuid::new_v4(), 1, b"0123456789", &Context::new());
        for i in 0..blob.len() * 8 {
            let mut bad = blob.to_vec();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(open(&c, &bad, &Context::new()).is_err(), "bit {i}");
        }
    }

    #[test]
    fn wrong_context_or_material_fails() {
        let m = Material::random();
        let blob = seal(&cipher(&m), Uuid::new_v4(), 1, b"k", &ctx(&[("a", "1")]));
        for c in [ctx(&[]), ctx(&[("a", "2")]), ctx(&[("a", "1"), ("b", "")])] {
            assert_eq!(
                open(&cipher(&m), &blob, &c).unwrap_err().code(),
                kms_client::proto::ErrorCode::DecryptFailed
            );
        }
        assert!(open(&cipher(&Material::random()), &blob, &ctx(&[("a", "1")])).is_err());
    }
}
