//! `nonce ‖ ciphertext ‖ tag`: the one place that lays out and splits what
//! AES-GCM produces, for every user of it in the workspace: blobs
//! ([`crate::blob`]), the daemon's sealed store records, and the
//! filesystem's blocks (whose XAES-256-GCM derives an AES-256-GCM per
//! nonce and then uses these functions on its part of the nonce).
//!
//! Generic over the cipher, so the nonce length is the cipher's; the tag
//! always follows the ciphertext (detached tags, encrypted in place).

use aes_gcm::aead::generic_array::typenum::Unsigned;
use aes_gcm::aead::{AeadCore, AeadInPlace, Nonce, Tag};
use zeroize::Zeroizing;

/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;

/// Why sealed bytes did not open: too short to hold a nonce and a tag, or
/// the tag does not authenticate them (wrong key, nonce or additional data,
/// altered bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed bytes do not authenticate")]
pub struct OpenError;

fn nonce_len<A: AeadCore>() -> usize {
    A::NonceSize::USIZE
}

fn tag_len<A: AeadCore>() -> usize {
    A::TagSize::USIZE
}

/// Encrypts `out[from..]` in place under `nonce` and appends the tag, so
/// that `out[from..]` becomes `ciphertext ‖ tag`.
///
/// # Panics
/// When `nonce` is not the cipher's nonce length, or for a message over
/// AES-GCM's limit of 64 GiB.
pub fn seal_parts<A: AeadInPlace>(cipher: &A, nonce: &[u8], aad: &[u8], out: &mut Vec<u8>, from: usize) {
    let tag = cipher
        .encrypt_in_place_detached(Nonce::<A>::from_slice(nonce), aad, &mut out[from..])
        .expect("AES-GCM encryption fails only for inputs over 64 GiB");
    out.extend_from_slice(&tag);
}

/// Opens `ciphertext ‖ tag` in place under `nonce`; returns the plaintext,
/// which is the front of `sealed`. On failure `sealed` is left as it was
/// or unspecified.
///
/// # Errors
/// `OpenError` when `sealed` is shorter than a tag or does not
/// authenticate.
pub fn open_parts<'a, A: AeadInPlace>(
    cipher: &A,
    nonce: &[u8],
    aad: &[u8],
    sealed: &'a mut [u8],
) -> Result<&'a mut [u8], OpenError> {
    let body_len = sealed.len().checked_sub(tag_len::<A>()).ok_or(OpenError)?;
    let (body, tag) = sealed.split_at_mut(body_len);
    cipher
        .decrypt_in_place_detached(Nonce::<A>::from_slice(nonce), aad, body, Tag::<A>::from_slice(tag))
        .map_err(|_| OpenError)?;
    Ok(body)
}

/// Appends `nonce ‖ ciphertext ‖ tag` of `plaintext` to `out`.
///
/// # Panics
/// As [`seal_parts`].
pub fn seal<A: AeadInPlace>(cipher: &A, nonce: &[u8], aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    out.reserve(nonce.len() + plaintext.len() + tag_len::<A>());
    out.extend_from_slice(nonce);
    let from = out.len();
    out.extend_from_slice(plaintext);
    seal_parts(cipher, nonce, aad, out, from);
}

/// Opens `nonce ‖ ciphertext ‖ tag` into a new buffer, wiped on drop.
///
/// # Errors
/// `OpenError` when `sealed` is shorter than a nonce and a tag or does not
/// authenticate.
pub fn open<A: AeadInPlace>(cipher: &A, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    if sealed.len() < nonce_len::<A>() + tag_len::<A>() {
        return Err(OpenError);
    }
    let (nonce, rest) = sealed.split_at(nonce_len::<A>());
    let mut buf = Zeroizing::new(rest.to_vec());
    let len = open_parts(cipher, nonce, aad, &mut buf)?.len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::Aes256Gcm;

    fn cipher() -> Aes256Gcm {
        Aes256Gcm::new(&[7u8; 32].into())
    }

    #[test]
    fn layout_is_nonce_ciphertext_tag_as_aes_gcm_writes_it() {
        let nonce = [3u8; 12];
        let mut out = b"prefix".to_vec();
        seal(&cipher(), &nonce, b"ad", b"secret", &mut out);
        let whole = cipher()
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: b"secret",
                    aad: b"ad",
                },
            )
            .unwrap();
        assert_eq!(out, [&b"prefix"[..], &nonce, &whole].concat());
        assert_eq!(TAG_LEN, tag_len::<Aes256Gcm>());
        assert_eq!(&open(&cipher(), b"ad", &out[6..]).unwrap()[..], b"secret");
    }

    #[test]
    fn tampering_short_input_and_wrong_aad_fail() {
        let mut out = Vec::new();
        seal(&cipher(), &[1u8; 12], b"ad", b"0123456789", &mut out);
        for i in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(open(&cipher(), b"ad", &bad), Err(OpenError), "bit {i}");
        }
        assert_eq!(open(&cipher(), b"other", &out), Err(OpenError));
        assert_eq!(open(&cipher(), b"ad", &out[..27]), Err(OpenError));
        assert_eq!(open_parts(&cipher(), &[1u8; 12], b"ad", &mut [0u8; 15]), Err(OpenError));
    }

    #[test]
    fn parts_open_in_place() {
        let mut out = b"plain".to_vec();
        seal_parts(&cipher(), &[2u8; 12], b"", &mut out, 0);
        assert_eq!(out.len(), 5 + TAG_LEN);
        assert_eq!(open_parts(&cipher(), &[2u8; 12], b"", &mut out).unwrap(), b"plain");
    }
}
