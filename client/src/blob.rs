//! The ciphertext blob layout shared by the daemon (which makes and opens
//! blobs) and by clients and the filesystem (which only read the header to
//! learn which key and version a blob needs), and the one sealing and
//! opening of it ([`seal`], [`open`]) that the daemon and the filesystem's
//! in-memory key source both use.
//!
//! ```text
//! 0      u8      format = 1
//! 1..17  [u8;16] key id
//! 17..21 u32 BE  key version
//! 21..33 [u8;12] nonce
//! 33..   AES-256-GCM ciphertext || 16-byte tag
//! AAD = bytes 0..33 || canonical encryption context
//! ```

use aes_gcm::Aes256Gcm;
use rand::RngCore;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::aead::{self, OpenError};
use crate::proto::Context;

/// The only blob format this crate knows.
pub const BLOB_FORMAT: u8 = 1;
/// Length of the clear header (format, key id, version, nonce).
pub const HEADER_LEN: usize = 33;
/// Length of the GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Where the nonce starts: `nonce ‖ ciphertext ‖ tag` follows the format,
/// the key id and the version.
const NONCE_AT: usize = HEADER_LEN - NONCE_LEN;
/// Length of the GCM tag.
pub const TAG_LEN: usize = aead::TAG_LEN;
/// Shortest possible blob: header and tag around an empty plaintext.
pub const MIN_BLOB_LEN: usize = HEADER_LEN + TAG_LEN;

/// Why a byte string is not a blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("blob too short ({0} bytes, at least {MIN_BLOB_LEN} needed)")]
    TooShort(usize),
    #[error("unknown blob format {0}")]
    UnknownFormat(u8),
    #[error("blob names key version 0, which never exists")]
    VersionZero,
}

/// The clear part of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    pub key_id: Uuid,
    pub version: u32,
    pub nonce: [u8; NONCE_LEN],
}

impl BlobHeader {
    /// Reads the header of `blob`, checking only its shape.
    ///
    /// # Errors
    /// A blob that is too short, of an unknown format, or names version 0.
    pub fn parse(blob: &[u8]) -> Result<Self, BlobError> {
        if blob.len() < MIN_BLOB_LEN {
            return Err(BlobError::TooShort(blob.len()));
        }
        if blob[0] != BLOB_FORMAT {
            return Err(BlobError::UnknownFormat(blob[0]));
        }
        let key_id = Uuid::from_bytes(blob[1..17].try_into().expect("16 bytes"));
        let version = u32::from_be_bytes(blob[17..21].try_into().expect("4 bytes"));
        if version == 0 {
            return Err(BlobError::VersionZero);
        }
        let nonce = blob[21..33].try_into().expect("12 bytes");
        Ok(Self { key_id, version, nonce })
    }

    /// The 33 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = BLOB_FORMAT;
        out[1..17].copy_from_slice(self.key_id.as_bytes());
        out[17..21].copy_from_slice(&self.version.to_be_bytes());
        out[21..33].copy_from_slice(&self.nonce);
        out
    }
}

/// The additional authenticated data of a blob: its header followed by the
/// canonical encoding of the context (pairs in key order, each string as a
/// u32 BE length and its bytes), so that `{a=b}` and `{ab=}` differ.
pub fn aad(header: &[u8; HEADER_LEN], context: &Context) -> Vec<u8> {
    let extra: usize = context.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + extra);
    out.extend_from_slice(header);
    for (k, v) in context {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

/// Encrypts `plaintext` under `cipher`, the material of key `key_id` at
/// `version`, into a blob with a fresh random nonce.
///
/// # Panics
/// For a plaintext over AES-GCM's limit of 64 GiB.
pub fn seal(cipher: &Aes256Gcm, key_id: Uuid, version: u32, plaintext: &[u8], context: &Context) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let header = BlobHeader { key_id, version, nonce }.to_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&header[..NONCE_AT]);
    aead::seal(cipher, &nonce, &aad(&header, context), plaintext, &mut out);
    out
}

/// Decrypts a blob under `cipher`, which the caller chose by the key and
/// version its header names.
///
/// # Errors
/// `OpenError` when it is shorter than a header, or its tag does not
/// verify: wrong context, altered bytes, or a blob made under other
/// material.
pub fn open(cipher: &Aes256Gcm, blob: &[u8], context: &Context) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let header: &[u8; HEADER_LEN] = blob.get(..HEADER_LEN).ok_or(OpenError)?.try_into().expect("sliced");
    aead::open(cipher, &aad(header, context), &blob[NONCE_AT..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlobHeader {
        BlobHeader {
            key_id: Uuid::from_bytes([7; 16]),
            version: 3,
            nonce: [9; 12],
        }
    }

    #[test]
    fn header_round_trips() {
        let mut blob = sample().to_bytes().to_vec();
        blob.extend_from_slice(&[0; TAG_LEN]);
        assert_eq!(BlobHeader::parse(&blob).unwrap(), sample());
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert_eq!(BlobHeader::parse(&[1; 10]), Err(BlobError::TooShort(10)));
        let mut blob = sample().to_bytes().to_vec();
        blob.extend_from_slice(&[0; TAG_LEN]);
        blob[0] = 2;
        assert_eq!(BlobHeader::parse(&blob), Err(BlobError::UnknownFormat(2)));
        blob[0] = 1;
        blob[17..21].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(BlobHeader::parse(&blob), Err(BlobError::VersionZero));
    }

    #[test]
    fn context_encoding_is_unambiguous() {
        let h = sample().to_bytes();
        let a: Context = [("a".to_string(), "b".to_string())].into();
        let b: Context = [("ab".to_string(), String::new())].into();
        assert_ne!(aad(&h, &a), aad(&h, &b));
        assert_eq!(aad(&h, &Context::new()), h.to_vec());
    }

    proptest::proptest! {
        /// Any byte string is a header or a clear error, never a panic.
        #[test]
        fn parsing_arbitrary_bytes_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..128)) {
            if let Ok(h) = BlobHeader::parse(&data) {
                proptest::prop_assert_eq!(&h.to_bytes()[..], &data[..HEADER_LEN]);
            }
        }
    }
}
