//! The root key, which seals everything the file store writes, and the
//! checks on the files that hold secrets (root key, peering key, state
//! directory): owned by kmsd's user, closed to everyone else.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use hmac::{Hmac, Mac};
use kms_client::aead;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::file::sync_parent;
use super::{io_err, StoreError};

const NONCE_LEN: usize = 12;
/// Length of a root key.
pub const ROOT_KEY_LEN: usize = 32;

/// The root key: encrypts everything at rest. Never printed.
pub struct RootKey {
    cipher: Aes256Gcm,
    /// Keys the name index of a shared store (see [`RootKey::name_token`]).
    names: Zeroizing<[u8; 32]>,
}

/// What the name index key is derived for (HMAC-SHA-256 of this under the
/// root key); a new derivation takes a new label.
const NAMES_LABEL: &[u8] = b"kmsd key-name index 1";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey([redacted])")
    }
}

impl RootKey {
    /// A root key from raw bytes.
    pub fn from_bytes(bytes: &[u8; ROOT_KEY_LEN]) -> Self {
        Self {
            cipher: Aes256Gcm::new(bytes.into()),
            names: Zeroizing::new(hmac(bytes, NAMES_LABEL)),
        }
    }

    /// A token that stands for a key name where the name itself must not
    /// appear (etcd's key names): HMAC-SHA-256 of the name under a key
    /// derived from the root key. Equal names give equal tokens; without
    /// the root key a token says nothing about its name.
    pub(super) fn name_token(&self, name: &str) -> [u8; 32] {
        hmac(&*self.names, name.as_bytes())
    }

    /// Reads a root key file: exactly 32 raw bytes, or 64 hex digits with
    /// an optional trailing newline.
    ///
    /// # Errors
    /// `Io` if unreadable, `BadRootKey` if it has another shape.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::from_bytes(&*read_key_file(path)?))
    }

    /// Creates a new random root key file with mode 0600 (fails if it
    /// exists), written durably.
    ///
    /// # Errors
    /// `Io` when the file exists or cannot be written.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut *key);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("cannot create root key", path))?;
        f.write_all(&*key)
            .and_then(|()| f.sync_all())
            .map_err(io_err("cannot write root key", path))?;
        sync_parent(path)?;
        Ok(Self::from_bytes(&key))
    }

    /// `magic || nonce || AES-256-GCM(plain) || tag`, with `magic || id` as
    /// additional data.
    pub(super) fn seal(&self, magic: &[u8; 8], id: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(8 + NONCE_LEN + plain.len() + aead::TAG_LEN);
        out.extend_from_slice(magic);
        aead::seal(&self.cipher, &nonce, &[&magic[..], id].concat(), plain, &mut out);
        out
    }

    /// Opens a sealed file body; `None` when it does not authenticate.
    pub(super) fn open(&self, magic: &[u8; 8], id: &[u8], data: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let sealed = data.strip_prefix(magic)?;
        aead::open(&self.cipher, &[&magic[..], id].concat(), sealed).ok()
    }
}

/// Reads a 32-byte key file (root key, peering key): exactly 32 raw bytes,
/// or 64 hex digits with an optional trailing newline.
///
/// # Errors
/// `Io` if unreadable, `BadRootKey` if it has another shape.
pub fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>, StoreError> {
    check_private(path)?;
    let raw = Zeroizing::new(fs::read(path).map_err(io_err("cannot read key file", path))?);
    let bad = || StoreError::BadRootKey {
        path: path.into(),
        reason: "expected 32 bytes or 64 hex digits".into(),
    };
    let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    if raw.len() == ROOT_KEY_LEN {
        key.copy_from_slice(&raw);
    } else {
        let text = std::str::from_utf8(&raw).map_err(|_| bad())?;
        decode_hex(text.trim_end(), &mut key).ok_or_else(bad)?;
    }
    Ok(key)
}

fn decode_hex(text: &str, out: &mut [u8; ROOT_KEY_LEN]) -> Option<()> {
    if text.len() != ROOT_KEY_LEN * 2 || !text.is_ascii() {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

/// Refuses a path that is not owned by this process's user or that others
/// may read or write: key material must not sit where another user can
/// reach it.
///
/// # Errors
/// `Insecure` naming the path, the problem and the command that fixes it.
pub fn check_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(io_err("cannot stat", path))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StoreError::Insecure {
            path: path.into(),
            problem: format!("is owned by uid {}, not by kmsd's uid {me}", meta.uid()),
            fix: format!("chown -R {me} {}", path.display()),
        });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        let want = if meta.is_dir() { "700" } else { "600" };
        return Err(StoreError::Insecure {
            path: path.into(),
            problem: format!("has mode {mode:04o}, open to other users"),
            fix: format!("chmod {want} {}", path.display()),
        });
    }
    Ok(())
}

/// Permission bits of a path, for checks and tests.
///
/// # Errors
/// `Io` if the path cannot be inspected.
pub fn mode_of(path: &Path) -> Result<u32, StoreError> {
    Ok(fs::metadata(path)
        .map_err(io_err("cannot stat", path))?
        .permissions()
        .mode()
        & 0o7777)
}
