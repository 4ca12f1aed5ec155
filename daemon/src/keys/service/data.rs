//! Data operations on the keyring: encrypt, decrypt, wrap, unwrap, their
//! batches, data-key generation and re-encryption. No store write here.

use std::sync::Arc;

use kms_client::blob::BlobHeader;
use kms_client::proto::{Context, MAX_DEK, MAX_PLAINTEXT};
use rand::RngCore;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::crypto::{self, Sealed};
use crate::keys::error::{Error, Result};
use crate::keys::policy::{Access, Caller};

use super::{KeyEntry, KeyService};

/// A generated data key: plaintext (zeroized on drop) and its blob.
pub type DataKeyPair = (Zeroizing<Vec<u8>>, Sealed);

/// Length of generated data keys.
pub const DATA_KEY_LEN: usize = 32;

impl KeyService {
    /// The key, if the caller may use it and it is enabled.
    fn usable(&self, caller: &Caller, key_ref: &str) -> Result<Arc<KeyEntry>> {
        let e = self.entry(key_ref)?;
        self.check(caller, &e.record, Access::Use)?;
        e.record.ensure_usable()?;
        Ok(e)
    }

    /// Encrypts up to 64 KiB under the key's active version; returns the
    /// blob with the key and version it used.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `Disabled`, `InvalidArgument` (size).
    pub fn encrypt(&self, caller: &Caller, key_ref: &str, plaintext: &[u8], ctx: &Context) -> Result<Sealed> {
        check_len("plaintext", plaintext.len(), 0, MAX_PLAINTEXT)?;
        Ok(self.usable(caller, key_ref)?.seal(plaintext, ctx))
    }

    /// Wraps a caller's DEK (1..=1024 bytes) under the active version.
    ///
    /// # Errors
    /// As [`encrypt`](Self::encrypt).
    pub fn wrap(&self, caller: &Caller, key_ref: &str, dek: &[u8], ctx: &Context) -> Result<Sealed> {
        check_len("data key", dek.len(), 1, MAX_DEK)?;
        Ok(self.usable(caller, key_ref)?.seal(dek, ctx))
    }

    /// Wraps many DEKs under one key with one lookup and one access check.
    ///
    /// # Errors
    /// As [`wrap`](Self::wrap), for the whole batch.
    pub fn wrap_batch(&self, caller: &Caller, key_ref: &str, deks: &[Vec<u8>], ctx: &Context) -> Result<Vec<Sealed>> {
        check_len("batch", deks.len(), 1, kms_client::proto::MAX_BATCH)?;
        for d in deks {
            check_len("data key", d.len(), 1, MAX_DEK)?;
        }
        let e = self.usable(caller, key_ref)?;
        Ok(deks.iter().map(|d| e.seal(d, ctx)).collect())
    }

    /// Generates a random 32-byte data key; returns it and its blob.
    ///
    /// # Errors
    /// As [`encrypt`](Self::encrypt).
    pub fn generate_data_key(&self, caller: &Caller, key_ref: &str, ctx: &Context) -> Result<DataKeyPair> {
        let e = self.usable(caller, key_ref)?;
        Ok(new_data_key(&e, ctx))
    }

    /// Generates `count` data keys under one key.
    ///
    /// # Errors
    /// As [`generate_data_key`](Self::generate_data_key); `InvalidArgument`
    /// for a count of 0 or over the batch limit.
    pub fn generate_data_key_batch(
        &self,
        caller: &Caller,
        key_ref: &str,
        count: usize,
        ctx: &Context,
    ) -> Result<Vec<DataKeyPair>> {
        check_len("batch", count, 1, kms_client::proto::MAX_BATCH)?;
        let e = self.usable(caller, key_ref)?;
        Ok((0..count).map(|_| new_data_key(&e, ctx)).collect())
    }

    /// Generates one data key per context, all under one key with one
    /// lookup and one access check, each bound to its own context.
    ///
    /// # Errors
    /// As [`generate_data_key`](Self::generate_data_key); `InvalidArgument`
    /// for no context or more than the batch limit.
    pub fn generate_data_keys(&self, caller: &Caller, key_ref: &str, ctxs: &[Context]) -> Result<Vec<DataKeyPair>> {
        check_len("batch", ctxs.len(), 1, kms_client::proto::MAX_BATCH)?;
        let e = self.usable(caller, key_ref)?;
        Ok(ctxs.iter().map(|ctx| new_data_key(&e, ctx)).collect())
    }

    /// Decrypts a blob with whichever version of whichever key it names.
    ///
    /// # Errors
    /// `DecryptFailed` (not a blob, unknown key or version, wrong context,
    /// altered bytes), `PermissionDenied`, `Disabled`.
    pub fn decrypt(&self, caller: &Caller, blob: &[u8], ctx: &Context) -> Result<Zeroizing<Vec<u8>>> {
        self.open_blob(caller, blob, ctx, None)
    }

    /// Unwraps a DEK; the same as [`decrypt`](Self::decrypt).
    ///
    /// # Errors
    /// As [`decrypt`](Self::decrypt).
    pub fn unwrap(&self, caller: &Caller, blob: &[u8], ctx: &Context) -> Result<Zeroizing<Vec<u8>>> {
        self.decrypt(caller, blob, ctx)
    }

    /// Unwraps many blobs, each with its own result.
    pub fn unwrap_batch(
        &self,
        caller: &Caller,
        blobs: &[Vec<u8>],
        ctx: &Context,
    ) -> Result<Vec<Result<Zeroizing<Vec<u8>>>>> {
        check_len("batch", blobs.len(), 1, kms_client::proto::MAX_BATCH)?;
        Ok(blobs.iter().map(|b| self.decrypt(caller, b, ctx)).collect())
    }

    /// Opens a blob that must belong to key `expect` (the filesystem's key).
    ///
    /// # Errors
    /// As [`decrypt`](Self::decrypt); `DecryptFailed` for another key's blob.
    pub fn unwrap_for_key(
        &self,
        caller: &Caller,
        expect: Uuid,
        blob: &[u8],
        ctx: &Context,
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.open_blob(caller, blob, ctx, Some(expect))
    }

    /// Decrypts `blob` and encrypts the plaintext under the active version of
    /// `to` (default: the blob's own key) with `to_ctx` (default: `ctx`).
    /// The plaintext never leaves the daemon.
    ///
    /// # Errors
    /// As [`decrypt`](Self::decrypt) for the source, as
    /// [`encrypt`](Self::encrypt) for the destination.
    pub fn re_encrypt(
        &self,
        caller: &Caller,
        blob: &[u8],
        ctx: &Context,
        to: Option<&str>,
        to_ctx: Option<&Context>,
    ) -> Result<Sealed> {
        let plain = self.decrypt(caller, blob, ctx)?;
        let dest = match to {
            Some(key_ref) => self.usable(caller, key_ref)?,
            None => self.usable(
                caller,
                &BlobHeader::parse(blob).expect("opened above").key_id.to_string(),
            )?,
        };
        Ok(dest.seal(&plain, to_ctx.unwrap_or(ctx)))
    }

    fn open_blob(
        &self,
        caller: &Caller,
        blob: &[u8],
        ctx: &Context,
        expect: Option<Uuid>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let header = BlobHeader::parse(blob).map_err(|_| Error::DecryptFailed("not a kmsd ciphertext blob"))?;
        if expect.is_some_and(|id| id != header.key_id) {
            return Err(Error::DecryptFailed("the blob belongs to another key"));
        }
        let ring = self.ring.load();
        let slot = ring
            .by_id
            .get(&header.key_id)
            .ok_or(Error::DecryptFailed("the blob names a key that does not exist here"))?;
        let e = slot.load();
        self.check(caller, &e.record, Access::Use)?;
        e.record.ensure_usable()?;
        let cipher = e
            .ciphers
            .get(header.version)
            .ok_or(Error::DecryptFailed("the blob names a key version that does not exist"))?;
        crypto::open(cipher, blob, ctx)
    }
}

fn new_data_key(e: &KeyEntry, ctx: &Context) -> DataKeyPair {
    let mut dek = Zeroizing::new(vec![0u8; DATA_KEY_LEN]);
    rand::thread_rng().fill_bytes(&mut dek);
    let blob = e.seal(&dek, ctx);
    (dek, blob)
}

fn check_len(what: &str, len: usize, min: usize, max: usize) -> Result<()> {
    if len < min || len > max {
        return Err(Error::InvalidArgument(format!(
            "{what} of {len} bytes/items is outside {min}..={max}"
        )));
    }
    Ok(())
}
