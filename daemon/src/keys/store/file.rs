//! The file store: one file per key under `STATE/keys/`, each sealed with
//! AES-256-GCM under the 32-byte root key, plus `STATE/store.meta` holding
//! the store's schema and a check value, so that a wrong root key is
//! refused at open even when no key exists yet.
//!
//! Every write is `write tmp -> fsync -> rename -> fsync dir`, so a kill at
//! any instant leaves either the old or the new file, never a torn one. The
//! store is locked (`flock` on `STATE/lock`) so that two daemons never share
//! it: this store is the only writer, its revisions live in memory beside
//! the files (and in each file), and its change stream never yields.
//!
//! A store at an older schema is migrated at open (`migrate`).
//!
//! `kmsd restore` fills the store through [`FileStore::open_for_restore`],
//! which writes the marker `STATE/restoring` before the first record and
//! [`FileStore::finish_restore`] removes it after the last; while it
//! exists, [`FileStore::open`] refuses the store (a restore cut off
//! half-way left it), so that no daemon serves half a zone.

mod migrate;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use uuid::Uuid;

use super::root::{check_private, RootKey};
use super::schema::CURRENT;
use super::{io_err, sealed, ChangeStream, KeyStore, Revision, StoreError, Stored};
use crate::keys::model::KeyRecord;

/// Where a simulated crash stops the store, as if the process died there
/// (set only by tests, through `crash_at` and `open_crashing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// A key write: half of the temporary file written.
    TornTemp,
    /// A key write: the temporary file complete and synced, not renamed.
    BeforeRename,
    /// A key write: renamed over the old file, the directory not synced.
    BeforeDirSync,
    /// Migration: the first record staged.
    MigrationStaged,
    /// Migration: every record staged, `store.meta` not rewritten.
    MigrationBeforeCommit,
    /// Migration: `store.meta` rewritten, no record moved into `keys/`.
    MigrationCommitted,
    /// Migration: the first record moved into `keys/`.
    MigrationMoved,
}

/// Stops here if `crash` says so, leaving everything as it is.
fn crash_point(crash: Option<CrashPoint>, here: CrashPoint, path: &Path) -> Result<(), StoreError> {
    if crash == Some(here) {
        let source = std::io::Error::other(format!("simulated crash at {here:?}"));
        return Err(io_err("simulated crash", path)(source));
    }
    Ok(())
}

/// The marker of a restore in progress, in the state directory.
pub const RESTORE_MARKER: &str = "restoring";

/// Revisions of the records on disk. `last` only grows, so a revision is
/// never handed out twice while the store is open.
#[derive(Debug, Default)]
struct Revisions {
    by_id: HashMap<Uuid, u64>,
    last: u64,
}

/// The on-disk store.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    keys_dir: PathBuf,
    root: RootKey,
    revisions: Mutex<Revisions>,
    crash: Mutex<Option<CrashPoint>>,
    _lock: File,
}

impl FileStore {
    /// Opens (creating if needed, mode 0700) the store in `dir`, migrating
    /// it if it is at an older schema.
    ///
    /// # Errors
    /// `Locked` if another process holds it, `WrongRootKey`, `NewerSchema`,
    /// `Corrupt` or `Schema` naming the bad file, or `Io`.
    pub fn open(dir: &Path, root: RootKey) -> Result<Self, StoreError> {
        Self::open_inner(dir, root, None)
    }

    /// [`open`](Self::open), stopping at `crash` during a migration.
    ///
    /// # Errors
    /// As `open`; a simulated crash is an `Io` error.
    #[cfg(any(test, feature = "conformance"))]
    pub fn open_crashing(dir: &Path, root: RootKey, crash: CrashPoint) -> Result<Self, StoreError> {
        Self::open_inner(dir, root, Some(crash))
    }

    fn open_inner(dir: &Path, root: RootKey, crash: Option<CrashPoint>) -> Result<Self, StoreError> {
        let store = Self::locked(dir, root)?;
        if migrate::exists(&store.marker_path())? {
            return Err(store.restoring());
        }
        store.open_schema(crash)?;
        store.scan()?;
        Ok(store)
    }

    /// Opens the store in `dir` for `kmsd restore`: locked (no kmsd runs on
    /// it), checked to hold no key, and marked as being restored (the
    /// marker written and synced before this returns). With `resume`, a
    /// store a restore left marked is emptied first (everything in it came
    /// from that restore); without, it is refused.
    ///
    /// # Errors
    /// As [`open`](Self::open); `NotEmpty` when it holds keys, `Restoring`
    /// when marked and not `resume`.
    pub fn open_for_restore(dir: &Path, root: RootKey, resume: bool) -> Result<Self, StoreError> {
        let store = Self::locked(dir, root)?;
        let marker = store.marker_path();
        let interrupted = migrate::exists(&marker)?;
        if interrupted && !resume {
            return Err(store.restoring());
        }
        if interrupted {
            tracing::warn!(marker = %marker.display(), "an earlier restore did not finish: emptying the store and starting again");
            store.empty()?;
        }
        store.open_schema(None)?;
        let held = store.scan()?.len();
        if held > 0 {
            return Err(StoreError::NotEmpty {
                place: format!("file store {}", dir.display()),
                count: held as i64,
            });
        }
        if !interrupted {
            let note = format!("kmsd restore (pid {}) is filling this store\n", std::process::id());
            write_atomic(dir, RESTORE_MARKER, note.as_bytes(), None)?;
        }
        Ok(store)
    }

    /// Removes the restore's marker (durably): the store is whole and a
    /// daemon may serve it.
    ///
    /// # Errors
    /// `Io`.
    pub fn finish_restore(&self) -> Result<(), StoreError> {
        let marker = self.marker_path();
        fs::remove_file(&marker).map_err(io_err("cannot remove", &marker))?;
        sync_dir(&self.dir)
    }

    fn marker_path(&self) -> PathBuf {
        self.dir.join(RESTORE_MARKER)
    }

    fn restoring(&self) -> StoreError {
        StoreError::Restoring {
            place: format!("file store {}", self.dir.display()),
            marker: self.marker_path().display().to_string(),
        }
    }

    /// Removes every key file, the meta and a migration's staging folder.
    fn empty(&self) -> Result<(), StoreError> {
        let dir = &self.keys_dir;
        for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
            let path = entry.map_err(io_err("cannot list", dir))?.path();
            fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        }
        sync_dir(dir)?;
        let staging = self.staging_dir();
        if migrate::exists(&staging)? {
            fs::remove_dir_all(&staging).map_err(io_err("cannot remove", &staging))?;
        }
        let meta = self.meta_path();
        if migrate::exists(&meta)? {
            fs::remove_file(&meta).map_err(io_err("cannot remove", &meta))?;
        }
        sync_dir(&self.dir)
    }

    /// The store in `dir`, created if needed (mode 0700), checked private
    /// and locked; nothing read yet.
    fn locked(dir: &Path, root: RootKey) -> Result<Self, StoreError> {
        let keys_dir = dir.join("keys");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&keys_dir)
            .map_err(io_err("cannot create", &keys_dir))?;
        check_private(dir)?;
        check_private(&keys_dir)?;
        let lock = lock_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            keys_dir,
            root,
            revisions: Mutex::new(Revisions::default()),
            crash: Mutex::new(None),
            _lock: lock,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the next key write stop at `point`, as if the process died.
    #[cfg(any(test, feature = "conformance"))]
    pub fn crash_at(&self, point: CrashPoint) {
        *self.crash.lock() = Some(point);
    }

    /// Reads every record and remembers their revisions.
    fn scan(&self) -> Result<Vec<Stored>, StoreError> {
        let stored = self.read_records(&self.keys_dir, CURRENT)?;
        let mut revs = self.revisions.lock();
        revs.by_id = stored.iter().map(|s| (s.record.id, s.revision.get())).collect();
        let newest = revs.by_id.values().copied().max().unwrap_or(0);
        revs.last = revs.last.max(newest);
        Ok(stored)
    }

    /// Every `<id>.key` in `dir`, which must all be at `schema`; removes
    /// the temporary files of writes cut off before their rename.
    fn read_records(&self, dir: &Path, schema: u32) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
            let path = entry.map_err(io_err("cannot list", dir))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".tmp") {
                // A write interrupted before its rename: the old file is intact.
                fs::remove_file(&path).map_err(io_err("cannot remove stale", &path))?;
            } else if let Some(stem) = name.strip_suffix(".key") {
                out.push(self.read_record(&path, stem, schema)?);
            }
        }
        Ok(out)
    }

    fn read_record(&self, path: &Path, stem: &str, schema: u32) -> Result<Stored, StoreError> {
        let id = Uuid::parse_str(stem).map_err(|_| StoreError::Corrupt {
            path: path.into(),
            reason: "file name is not a key id".into(),
        })?;
        let data = fs::read(path).map_err(io_err("cannot read", path))?;
        sealed::open_record(&self.root, id, &data, schema, path)
    }

    /// The sealed key file of `record` at `revision`, in the current schema.
    fn seal_record(&self, revision: u64, record: &KeyRecord) -> Result<Vec<u8>, StoreError> {
        sealed::seal_record(&self.root, revision, record, &self.key_path(record.id))
    }

    fn key_path(&self, id: Uuid) -> PathBuf {
        self.keys_dir.join(key_file_name(id))
    }
}

fn key_file_name(id: Uuid) -> String {
    format!("{id}.key")
}

impl KeyStore for FileStore {
    fn load(&self) -> Result<Vec<Stored>, StoreError> {
        self.scan()
    }

    fn put(&self, record: &KeyRecord, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let mut revs = self.revisions.lock();
        let found = revs.by_id.get(&record.id).copied().map(Revision::new);
        if found != expected {
            return Err(StoreError::Conflict {
                id: record.id,
                expected,
                found,
            });
        }
        revs.last += 1;
        let revision = revs.last;
        let sealed = self.seal_record(revision, record)?;
        let crash = self.crash.lock().take();
        write_atomic(&self.keys_dir, &key_file_name(record.id), &sealed, crash)?;
        revs.by_id.insert(record.id, revision);
        Ok(Revision::new(revision))
    }

    fn delete(&self, id: Uuid, expected: Revision) -> Result<(), StoreError> {
        let mut revs = self.revisions.lock();
        let found = revs.by_id.get(&id).copied().map(Revision::new);
        if found != Some(expected) {
            return Err(StoreError::Conflict {
                id,
                expected: Some(expected),
                found,
            });
        }
        let path = self.key_path(id);
        fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        revs.by_id.remove(&id);
        sync_dir(&self.keys_dir)
    }

    /// Never yields: the lock makes this store its files' only writer.
    fn changes(&self) -> ChangeStream {
        Box::pin(futures::stream::pending())
    }
}

/// Creates the state directory (mode 0700) if needed, checks that it is
/// private, and locks it as the file store does, for a daemon whose keys
/// are elsewhere (etcd) but whose audit log is there: the lock, held while
/// the returned file is open, keeps a second kmsd off it.
///
/// # Errors
/// `Locked` if another process holds it, `Insecure`, `Io`.
pub fn lock_state_dir(dir: &Path) -> Result<File, StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("cannot create", dir))?;
    check_private(dir)?;
    lock_dir(dir)
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

/// Writes `dir/name` atomically and durably; `crash` stops it part-way as
/// a dying process would (leaving its temporary file).
fn write_atomic(dir: &Path, name: &str, data: &[u8], crash: Option<CrashPoint>) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        if crash == Some(CrashPoint::TornTemp) {
            f.write_all(&data[..data.len() / 2])?;
            return Ok(());
        }
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("cannot write", &tmp)(e));
    }
    crash_point(crash, CrashPoint::TornTemp, &tmp)?;
    crash_point(crash, CrashPoint::BeforeRename, &tmp)?;
    fs::rename(&tmp, &dst).map_err(io_err("cannot rename into place", &dst))?;
    crash_point(crash, CrashPoint::BeforeDirSync, &dst)?;
    sync_dir(dir)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync directory", dir))
}

pub(super) fn sync_parent(path: &Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests;
