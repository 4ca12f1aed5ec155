//! Data keys and where they come from.
//!
//! The filesystem never sees key material other than per-file data keys
//! (DEKs). It asks a [`KeySource`] to wrap a fresh DEK for a new file and to
//! unwrap the blob stored in a file's header. The daemon implements the
//! trait against its key service; [`MemoryKeySource`] implements it with
//! real AES-256-GCM and versioned in-memory master keys for tests.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use kms_client::blob::{self, BlobHeader};
use kms_client::proto::Context;
use parking_lot::RwLock;
use rand::RngCore;
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Random identifier of one encrypted file, stored in its header and bound
/// into its wrapped DEK and every block.
pub type FileId = [u8; 16];

/// Length of a data key (AES-256).
pub const DEK_LEN: usize = 32;

/// The encryption-context key under which the file id is bound into a
/// wrapped DEK. Implementors of [`KeySource`] should use [`file_context`].
pub const FILE_ID_CONTEXT_KEY: &str = "kms-fuse.file-id";

/// A per-file data key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Dek([u8; DEK_LEN]);

impl Dek {
    /// Wraps existing key bytes.
    pub fn from_bytes(bytes: [u8; DEK_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh random key from the OS generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; DEK_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The key bytes, for handing to a cipher.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek([redacted])")
    }
}

/// Why a key operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key service cannot be reached or the key is not usable now.
    #[error("key service unavailable: {0}")]
    Unavailable(String),
    /// The caller may not use the key.
    #[error("key access denied: {0}")]
    Denied(String),
    /// The blob is not a valid wrapping for this file (tampered, foreign,
    /// wrong context, unknown version).
    #[error("unwrap failed: {0}")]
    DecryptFailed(String),
}

/// Where the filesystem gets its data keys.
///
/// Every blob must bind the file id into its encryption context (see
/// [`file_context`]), so that a header copied onto another file fails to
/// unwrap.
pub trait KeySource: Send + Sync + 'static {
    /// The key whose versions wrap this filesystem's DEKs.
    fn key_id(&self) -> Uuid;

    /// A fresh DEK and its blob wrapped by the active version under the
    /// encryption context `ctx` (a [`file_context`]).
    ///
    /// # Errors
    /// The key is unavailable or access is denied.
    fn new_dek(&self, ctx: &Context) -> Result<(Dek, Vec<u8>), KeyError>;

    /// The key of a new file of format `format_version`: a fresh file id,
    /// and a fresh DEK wrapped by the active version under that file's
    /// [`file_context`]. A source may make these ahead (the mount process
    /// does, in batches), as long as none outlives a change of the key.
    ///
    /// # Errors
    /// As [`KeySource::new_dek`].
    fn new_file_key(&self, format_version: u16) -> Result<(FileId, Dek, Vec<u8>), KeyError> {
        let mut file_id = FileId::default();
        rand::rngs::OsRng.fill_bytes(&mut file_id);
        let (dek, blob) = self.new_dek(&file_context(&file_id, format_version))?;
        Ok((file_id, dek, blob))
    }

    /// Unwraps a header's blob under the encryption context `ctx`.
    ///
    /// # Errors
    /// The blob does not open under `ctx`, or the key is unavailable.
    fn unwrap_dek(&self, ctx: &Context, blob: &[u8]) -> Result<Dek, KeyError>;

    /// Re-wraps `blob` (same DEK, same context) under the active version.
    ///
    /// # Errors
    /// As [`KeySource::unwrap_dek`].
    fn rewrap(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, KeyError>;

    /// The version new wraps use.
    ///
    /// # Errors
    /// The key is unavailable.
    fn active_version(&self) -> Result<u32, KeyError>;
}

/// The encryption-context key under which the format version of a file
/// (from version 2 on) is bound into its wrapped DEK.
pub const FORMAT_CONTEXT_KEY: &str = "kms-fuse.format";

/// The encryption context that binds a blob to one file and its format
/// version: `{file-id}` for version 1 (as written by earlier releases),
/// `{file-id, format}` from version 2 on, so that a header whose version
/// byte was changed no longer unwraps.
pub fn file_context(file_id: &FileId, format_version: u16) -> Context {
    let hex: String = file_id.iter().map(|b| format!("{b:02x}")).collect();
    let mut ctx: Context = [(FILE_ID_CONTEXT_KEY.to_string(), hex)].into();
    if format_version >= 2 {
        ctx.insert(FORMAT_CONTEXT_KEY.to_string(), format_version.to_string());
    }
    ctx
}

/// A [`KeySource`] with versioned master keys held in memory. Blobs use the
/// exact kms-client layout, so version accounting and rewrap are real.
pub struct MemoryKeySource {
    key_id: Uuid,
    versions: RwLock<Vec<Zeroizing<[u8; 32]>>>,
    available: AtomicBool,
}

impl fmt::Debug for MemoryKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryKeySource")
            .field("key_id", &self.key_id)
            .field("versions", &self.versions.read().len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryKeySource {
    fn default() -> Self {
        Self::new(Uuid::new_v4())
    }
}

impl MemoryKeySource {
    /// A key with one random version.
    pub fn new(key_id: Uuid) -> Self {
        let source = Self {
            key_id,
            versions: RwLock::new(Vec::new()),
            available: AtomicBool::new(true),
        };
        source.rotate();
        source
    }

    /// A key whose versions 1, 2, ... have exactly `materials`, for
    /// fixtures that must read the same in every run.
    ///
    /// # Panics
    /// `materials` is empty.
    pub fn from_versions(key_id: Uuid, materials: &[[u8; 32]]) -> Self {
        assert!(!materials.is_empty(), "a key has at least one version");
        Self {
            key_id,
            versions: RwLock::new(materials.iter().map(|m| Zeroizing::new(*m)).collect()),
            available: AtomicBool::new(true),
        }
    }

    /// Adds a new random version and makes it active; returns its number.
    pub fn rotate(&self) -> u32 {
        let mut material = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(material.as_mut());
        let mut versions = self.versions.write();
        versions.push(material);
        versions.len() as u32
    }

    /// Makes every operation fail with [`KeyError::Unavailable`] (or work
    /// again), to test how the filesystem copes with a missing daemon.
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::SeqCst);
    }

    fn check_available(&self) -> Result<(), KeyError> {
        if self.available.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(KeyError::Unavailable("memory key source switched off".into()))
        }
    }

    fn cipher(&self, version: u32) -> Option<Aes256Gcm> {
        let versions = self.versions.read();
        let material = versions.get(version.checked_sub(1)? as usize)?;
        Some(Aes256Gcm::new(material.as_ref().into()))
    }

    fn wrap(&self, ctx: &Context, dek: &Dek) -> Result<Vec<u8>, KeyError> {
        let version = self.active_version()?;
        let cipher = self.cipher(version).expect("active version exists");
        Ok(blob::seal(&cipher, self.key_id, version, dek.expose(), ctx))
    }

    fn open(&self, ctx: &Context, blob_bytes: &[u8]) -> Result<Dek, KeyError> {
        let fail = |why: &str| KeyError::DecryptFailed(why.to_string());
        let header = BlobHeader::parse(blob_bytes).map_err(|e| fail(&e.to_string()))?;
        if header.key_id != self.key_id {
            return Err(fail("blob belongs to another key"));
        }
        let cipher = self.cipher(header.version).ok_or_else(|| fail("unknown key version"))?;
        let plain = blob::open(&cipher, blob_bytes, ctx).map_err(|_| fail("authentication failed"))?;
        let bytes: [u8; DEK_LEN] = plain.as_slice().try_into().map_err(|_| fail("wrong data key length"))?;
        Ok(Dek::from_bytes(bytes))
    }
}

impl KeySource for MemoryKeySource {
    fn key_id(&self) -> Uuid {
        self.key_id
    }

    fn new_dek(&self, ctx: &Context) -> Result<(Dek, Vec<u8>), KeyError> {
        self.check_available()?;
        let dek = Dek::generate();
        let blob = self.wrap(ctx, &dek)?;
        Ok((dek, blob))
    }

    fn unwrap_dek(&self, ctx: &Context, blob: &[u8]) -> Result<Dek, KeyError> {
        self.check_available()?;
        self.open(ctx, blob)
    }

    fn rewrap(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.check_available()?;
        let dek = self.open(ctx, blob)?;
        self.wrap(ctx, &dek)
    }

    fn active_version(&self) -> Result<u32, KeyError> {
        self.check_available()?;
        Ok(self.versions.read().len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dek_debug_is_redacted() {
        let dek = Dek::from_bytes([0xab; DEK_LEN]);
        assert_eq!(format!("{dek:?}"), "Dek([redacted])");
    }

    #[test]
    fn wrap_unwrap_round_trip_and_version() {
        let keys = MemoryKeySource::default();
        let id = [1u8; 16];
        let (dek, blob) = keys.new_dek(&file_context(&id, 2)).unwrap();
        assert_eq!(BlobHeader::parse(&blob).unwrap().version, 1);
        assert_eq!(keys.unwrap_dek(&file_context(&id, 2), &blob).unwrap(), dek);
    }

    #[test]
    fn blob_is_bound_to_its_file_id() {
        let keys = MemoryKeySource::default();
        let (_, blob) = keys.new_dek(&file_context(&[1u8; 16], 2)).unwrap();
        let err = keys.unwrap_dek(&file_context(&[2u8; 16], 2), &blob).unwrap_err();
        assert!(matches!(err, KeyError::DecryptFailed(_)));
    }

    #[test]
    fn rotation_keeps_old_blobs_and_rewrap_moves_them() {
        let keys = MemoryKeySource::default();
        let id = [3u8; 16];
        let (dek, old) = keys.new_dek(&file_context(&id, 2)).unwrap();
        assert_eq!(keys.rotate(), 2);
        assert_eq!(keys.unwrap_dek(&file_context(&id, 2), &old).unwrap(), dek);
        let new = keys.rewrap(&file_context(&id, 2), &old).unwrap();
        assert_eq!(BlobHeader::parse(&new).unwrap().version, 2);
        assert_eq!(keys.unwrap_dek(&file_context(&id, 2), &new).unwrap(), dek);
    }

    #[test]
    fn flipped_bit_and_foreign_key_fail() {
        let keys = MemoryKeySource::default();
        let id = [4u8; 16];
        let (_, mut blob) = keys.new_dek(&file_context(&id, 2)).unwrap();
        let other = MemoryKeySource::default();
        assert!(other.unwrap_dek(&file_context(&id, 2), &blob).is_err());
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(keys.unwrap_dek(&file_context(&id, 2), &blob).is_err());
    }

    #[test]
    fn unavailable_source_refuses() {
        let keys = MemoryKeySource::default();
        keys.set_available(false);
        assert!(matches!(
            keys.new_dek(&file_context(&[0; 16], 2)),
            Err(KeyError::Unavailable(_))
        ));
    }
}
