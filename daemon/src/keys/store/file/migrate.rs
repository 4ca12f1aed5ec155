//! `store.meta` and the migration of a store at an older schema, run at
//! open under the lock:
//!
//! 1. read every record with its schema's types (nothing is written if one
//!    is corrupt);
//! 2. write each, in the current schema, into `STATE/keys.schema<N>/`, then
//!    fsync that directory and the state directory;
//! 3. rewrite `store.meta` with the new schema number (tmp, fsync, rename,
//!    fsync dir): the commit point;
//! 4. move the staged files over the old ones in `keys/`, fsync `keys/`,
//!    remove the staging directory.
//!
//! Opening a store whose migration was cut off: before step 3 the meta
//! still names the old schema, so the staging directory is thrown away and
//! the migration starts again; after it, step 4 is finished (a rename is
//! atomic, so each file is in one of the two directories).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{crash_point, key_file_name, sync_dir, write_atomic, CrashPoint, FileStore};
use crate::keys::store::schema::CURRENT;
use crate::keys::store::{io_err, sealed, StoreError, Stored};

impl FileStore {
    pub(super) fn meta_path(&self) -> PathBuf {
        self.dir.join("store.meta")
    }

    pub(super) fn staging_dir(&self) -> PathBuf {
        self.dir.join(format!("keys.schema{CURRENT}"))
    }

    /// Checks the meta file (creating it in a new store) and brings the
    /// store to the current schema.
    pub(super) fn open_schema(&self, crash: Option<CrashPoint>) -> Result<(), StoreError> {
        let found = self.read_meta()?;
        if found > CURRENT {
            return Err(StoreError::NewerSchema {
                path: self.meta_path(),
                found,
                supported: CURRENT,
            });
        }
        let staging = self.staging_dir();
        if found < CURRENT {
            if exists(&staging)? {
                // An earlier attempt that never committed.
                fs::remove_dir_all(&staging).map_err(io_err("cannot remove", &staging))?;
            }
            let records = self.read_records(&self.keys_dir, found)?;
            self.stage(&records, &staging, crash)?;
            crash_point(crash, CrashPoint::MigrationBeforeCommit, &staging)?;
            self.write_meta(CURRENT)?;
            tracing::info!(from = found, to = CURRENT, keys = records.len(), "key store migrated");
            crash_point(crash, CrashPoint::MigrationCommitted, &staging)?;
        }
        if exists(&staging)? {
            self.finish(&staging, crash)?;
        }
        Ok(())
    }

    /// Writes `records` in the current schema into `staging`, durably.
    fn stage(&self, records: &[Stored], staging: &Path, crash: Option<CrashPoint>) -> Result<(), StoreError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(staging)
            .map_err(io_err("cannot create", staging))?;
        for s in records {
            let sealed = self.seal_record(s.revision.get(), &s.record)?;
            let path = staging.join(key_file_name(s.record.id));
            write_new(&path, &sealed)?;
            crash_point(crash, CrashPoint::MigrationStaged, &path)?;
        }
        sync_dir(staging)?;
        sync_dir(&self.dir)
    }

    /// Moves every staged file into `keys/` and removes `staging`.
    fn finish(&self, staging: &Path, crash: Option<CrashPoint>) -> Result<(), StoreError> {
        for entry in fs::read_dir(staging).map_err(io_err("cannot list", staging))? {
            let from = entry.map_err(io_err("cannot list", staging))?.path();
            let to = self.keys_dir.join(from.file_name().expect("a listed file has a name"));
            fs::rename(&from, &to).map_err(io_err("cannot move into place", &to))?;
            crash_point(crash, CrashPoint::MigrationMoved, &to)?;
        }
        // `keys/` first: a cut before the staging directory's removal is
        // durable may leave a file under both names, never under neither;
        // the staging directory is then removed with what is left in it.
        sync_dir(&self.keys_dir)?;
        fs::remove_dir_all(staging).map_err(io_err("cannot remove", staging))?;
        sync_dir(&self.dir)
    }

    /// The store's schema, from `store.meta`; a new store gets one at the
    /// current schema.
    fn read_meta(&self) -> Result<u32, StoreError> {
        let path = self.meta_path();
        match fs::read(&path) {
            Ok(data) => self.decode_meta(&path, &data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.init_meta()?;
                Ok(CURRENT)
            }
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    fn decode_meta(&self, path: &Path, data: &[u8]) -> Result<u32, StoreError> {
        sealed::open_meta(&self.root, data, path)
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
        self.write_meta(CURRENT)
    }

    fn write_meta(&self, schema: u32) -> Result<(), StoreError> {
        write_atomic(&self.dir, "store.meta", &sealed::seal_meta(&self.root, schema), None)
    }
}

pub(super) fn exists(path: &Path) -> Result<bool, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("cannot stat", path)(e)),
    }
}

/// Creates `path` (which must not exist) with `data`, synced.
fn write_new(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot create", path))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io_err("cannot write", path))
}
