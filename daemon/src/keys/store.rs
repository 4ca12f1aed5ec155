//! The durable key store: one file per key under `STATE/keys/`, each sealed
//! with AES-256-GCM under the 32-byte root key, plus `STATE/store.meta`
//! holding a check value so that a wrong root key is refused at open even
//! when no key exists yet.
//!
//! Every write is `write tmp -> fsync -> rename -> fsync dir`, so a kill at
//! any instant leaves either the old or the new file, never a torn one. The
//! store is locked (`flock` on `STATE/lock`) so that two daemons never share
//! it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::model::KeyRecord;

pub mod schema;

const KEY_MAGIC: &[u8; 8] = b"KMSDKEY1";
const META_MAGIC: &[u8; 8] = b"KMSDMET1";
const META_CHECK: &[u8] = b"kmsd root key check v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length of a root key.
pub const ROOT_KEY_LEN: usize = 32;

/// Why the store could not be opened or written.
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
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The root key: encrypts everything at rest. Never printed.
pub struct RootKey(Aes256Gcm);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey([redacted])")
    }
}

impl RootKey {
    /// A root key from raw bytes.
    pub fn from_bytes(bytes: &[u8; ROOT_KEY_LEN]) -> Self {
        Self(Aes256Gcm::new(bytes.into()))
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

    fn seal(&self, magic: &[u8; 8], id: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(8 + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(magic);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let aad = [&magic[..], id].concat();
        let tag = self
            .0
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[8 + NONCE_LEN..])
            .expect("AES-GCM encryption of a small record cannot fail");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a sealed file body; `None` when it does not authenticate.
    fn open(&self, magic: &[u8; 8], id: &[u8], data: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if data.len() < 8 + NONCE_LEN + TAG_LEN || &data[..8] != magic {
            return None;
        }
        let (body, tag) = data[8 + NONCE_LEN..].split_at(data.len() - 8 - NONCE_LEN - TAG_LEN);
        let mut plain = Zeroizing::new(body.to_vec());
        let aad = [&magic[..], id].concat();
        let nonce = Nonce::from_slice(&data[8..8 + NONCE_LEN]);
        self.0
            .decrypt_in_place_detached(nonce, &aad, &mut plain, Tag::from_slice(tag))
            .ok()?;
        Some(plain)
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

/// The on-disk store. Reads everything at open; writes one key file per
/// mutation.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    keys_dir: PathBuf,
    root: RootKey,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed, mode 0700) the store in `dir` and loads
    /// every key.
    ///
    /// # Errors
    /// `Locked` if another process holds it, `WrongRootKey`, `Corrupt`
    /// naming the bad file, or `Io`.
    pub fn open(dir: &Path, root: RootKey) -> Result<(Self, Vec<KeyRecord>), StoreError> {
        let keys_dir = dir.join("keys");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&keys_dir)
            .map_err(io_err("cannot create", &keys_dir))?;
        check_private(dir)?;
        check_private(&keys_dir)?;
        let lock = lock_dir(dir)?;
        let store = Self {
            dir: dir.to_path_buf(),
            keys_dir,
            root,
            _lock: lock,
        };
        store.check_meta()?;
        let keys = store.load_all()?;
        Ok((store, keys))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join("store.meta")
    }

    fn check_meta(&self) -> Result<(), StoreError> {
        let path = self.meta_path();
        match fs::read(&path) {
            Ok(data) => match self.root.open(META_MAGIC, b"", &data) {
                Some(plain) if &plain[..] == META_CHECK => Ok(()),
                Some(_) => Err(StoreError::Corrupt {
                    path,
                    reason: "unexpected check value".into(),
                }),
                None if data.starts_with(META_MAGIC) => Err(StoreError::WrongRootKey { path }),
                None => Err(StoreError::Corrupt {
                    path,
                    reason: "not a kmsd store meta file".into(),
                }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.init_meta(),
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    fn init_meta(&self) -> Result<(), StoreError> {
        let has_keys = fs::read_dir(&self.keys_dir)
            .map_err(io_err("cannot list", &self.keys_dir))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".key"));
        if has_keys {
            return Err(StoreError::Corrupt {
                path: self.meta_path(),
                reason: "missing, but key files exist; restore it from backup".into(),
            });
        }
        let sealed = self.root.seal(META_MAGIC, b"", META_CHECK);
        write_atomic(&self.dir, "store.meta", &sealed)
    }

    fn load_all(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.keys_dir).map_err(io_err("cannot list", &self.keys_dir))? {
            let path = entry.map_err(io_err("cannot list", &self.keys_dir))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".tmp") {
                // A write interrupted before its rename: the old file is intact.
                fs::remove_file(&path).map_err(io_err("cannot remove stale", &path))?;
            } else if let Some(stem) = name.strip_suffix(".key") {
                out.push(self.load_key(&path, stem)?);
            }
        }
        Ok(out)
    }

    fn load_key(&self, path: &Path, stem: &str) -> Result<KeyRecord, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        };
        let id = Uuid::parse_str(stem).map_err(|_| corrupt("file name is not a key id"))?;
        let data = fs::read(path).map_err(io_err("cannot read", path))?;
        let plain = self
            .root
            .open(KEY_MAGIC, id.as_bytes(), &data)
            .ok_or_else(|| corrupt("does not authenticate"))?;
        let record: KeyRecord = postcard::from_bytes(&plain).map_err(|_| corrupt("cannot decode key record"))?;
        if record.id != id || record.versions.is_empty() {
            return Err(corrupt("record does not match its file"));
        }
        let in_order = record
            .versions
            .iter()
            .enumerate()
            .all(|(i, v)| v.version as usize == i + 1);
        if !in_order {
            return Err(corrupt("versions are not 1..=n"));
        }
        Ok(record)
    }

    /// Writes one key durably.
    ///
    /// # Errors
    /// `Io` (e.g. disk full); the previous file is then untouched.
    pub fn save(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let plain = Zeroizing::new(postcard::to_allocvec(key).map_err(|e| StoreError::Corrupt {
            path: self.key_path(key.id),
            reason: format!("cannot encode: {e}"),
        })?);
        let sealed = self.root.seal(KEY_MAGIC, key.id.as_bytes(), &plain);
        write_atomic(&self.keys_dir, &format!("{}.key", key.id), &sealed)
    }

    /// Removes one key durably.
    ///
    /// # Errors
    /// `Io`.
    pub fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        let path = self.key_path(id);
        fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        sync_dir(&self.keys_dir)
    }

    fn key_path(&self, id: Uuid) -> PathBuf {
        self.keys_dir.join(format!("{id}.key"))
    }
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

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path: dir.into() }),
        Err(fs::TryLockError::Error(e)) => Err(io_err("cannot lock", &path)(e)),
    }
}

/// Writes `dir/name` atomically and durably.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("cannot write", &tmp)(e));
    }
    fs::rename(&tmp, &dst).map_err(io_err("cannot rename into place", &dst))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync directory", dir))
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::model::RotationSchedule;
    use kms_client::proto::KeyKind;

    fn root(b: u8) -> RootKey {
        RootKey::from_bytes(&[b; 32])
    }

    fn record() -> KeyRecord {
        KeyRecord::new(
            Uuid::new_v4(),
            KeyKind::Customer,
            "z",
            RotationSchedule::every(365, 0),
            0,
        )
    }

    #[test]
    fn save_then_reopen_round_trips() {
        let dir = crate::testutil::private_dir().unwrap();
        let rec = record();
        {
            let (store, keys) = Store::open(dir.path(), root(1)).unwrap();
            assert!(keys.is_empty());
            store.save(&rec).unwrap();
        }
        let (_store, keys) = Store::open(dir.path(), root(1)).unwrap();
        assert_eq!(keys, vec![rec]);
    }

    #[test]
    fn wrong_root_key_is_refused_even_when_empty() {
        let dir = crate::testutil::private_dir().unwrap();
        drop(Store::open(dir.path(), root(1)).unwrap());
        let err = Store::open(dir.path(), root(2)).unwrap_err();
        assert!(matches!(err, StoreError::WrongRootKey { .. }), "{err}");
    }

    #[test]
    fn corrupt_key_file_is_named_at_open() {
        let dir = crate::testutil::private_dir().unwrap();
        let rec = record();
        {
            let (store, _) = Store::open(dir.path(), root(1)).unwrap();
            store.save(&rec).unwrap();
        }
        let path = dir.path().join("keys").join(format!("{}.key", rec.id));
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        fs::write(&path, &data).unwrap();
        let err = Store::open(dir.path(), root(1)).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { path: p, .. } if *p == path),
            "{err}"
        );
    }

    #[test]
    fn key_file_renamed_to_another_id_is_corrupt() {
        let dir = crate::testutil::private_dir().unwrap();
        let rec = record();
        {
            let (store, _) = Store::open(dir.path(), root(1)).unwrap();
            store.save(&rec).unwrap();
        }
        let keys = dir.path().join("keys");
        fs::rename(
            keys.join(format!("{}.key", rec.id)),
            keys.join(format!("{}.key", Uuid::new_v4())),
        )
        .unwrap();
        assert!(matches!(
            Store::open(dir.path(), root(1)),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn missing_meta_with_keys_is_corrupt_not_empty() {
        let dir = crate::testutil::private_dir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), root(1)).unwrap();
            store.save(&record()).unwrap();
        }
        fs::remove_file(dir.path().join("store.meta")).unwrap();
        assert!(matches!(
            Store::open(dir.path(), root(1)),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn leftover_tmp_files_are_removed() {
        let dir = crate::testutil::private_dir().unwrap();
        drop(Store::open(dir.path(), root(1)).unwrap());
        let tmp = dir.path().join("keys").join(".x.key.tmp");
        fs::write(&tmp, b"partial").unwrap();
        drop(Store::open(dir.path(), root(1)).unwrap());
        assert!(!tmp.exists());
    }

    #[test]
    fn second_open_is_locked_out() {
        let dir = crate::testutil::private_dir().unwrap();
        let _first = Store::open(dir.path(), root(1)).unwrap();
        assert!(matches!(
            Store::open(dir.path(), root(1)),
            Err(StoreError::Locked { .. })
        ));
    }

    #[test]
    fn a_state_dir_or_key_open_to_others_is_refused_with_the_fix() {
        let dir = crate::testutil::private_dir().unwrap();
        let state = dir.path().join("state");
        drop(Store::open(&state, root(1)).unwrap());
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        let err = Store::open(&state, root(1)).unwrap_err().to_string();
        assert!(err.contains("mode 0755") && err.contains("chmod 700"), "{err}");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        drop(Store::open(&state, root(1)).unwrap());
        let key = dir.path().join("root-key");
        RootKey::create(&key).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = RootKey::load(&key).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
        let err = Store::open(&state, root(1)).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534") && err.contains("chown"), "{err}");
    }

    #[test]
    fn files_have_tight_modes() {
        let dir = crate::testutil::private_dir().unwrap();
        let state = dir.path().join("state");
        let (store, _) = Store::open(&state, root(1)).unwrap();
        let rec = record();
        store.save(&rec).unwrap();
        assert_eq!(mode_of(&state.join("keys")).unwrap(), 0o700);
        assert_eq!(mode_of(&store.key_path(rec.id)).unwrap(), 0o600);
    }

    #[test]
    fn root_key_file_create_and_load() {
        let dir = crate::testutil::private_dir().unwrap();
        let path = dir.path().join("root-key");
        RootKey::create(&path).unwrap();
        assert_eq!(mode_of(&path).unwrap(), 0o600);
        assert_eq!(fs::read(&path).unwrap().len(), 32);
        RootKey::load(&path).unwrap();
        assert!(RootKey::create(&path).is_err(), "never overwrites a root key");
        let hex = dir.path().join("hex");
        fs::write(&hex, format!("{}\n", "ab".repeat(32))).unwrap();
        fs::set_permissions(&hex, fs::Permissions::from_mode(0o600)).unwrap();
        RootKey::load(&hex).unwrap();
        fs::write(&hex, "short").unwrap();
        assert!(matches!(RootKey::load(&hex), Err(StoreError::BadRootKey { .. })));
    }

    #[test]
    fn material_is_not_stored_in_clear() {
        let dir = crate::testutil::private_dir().unwrap();
        let rec = record();
        let (store, _) = Store::open(dir.path(), root(1)).unwrap();
        store.save(&rec).unwrap();
        let data = fs::read(store.key_path(rec.id)).unwrap();
        let m = rec.active().material.expose();
        assert!(!data.windows(32).any(|w| w == m));
    }
}
