//! `kmsd restore` and `kmsd migrate`: fill an empty key store, with kmsd
//! stopped, from a backup file or from the file store.
//!
//! - restore: the backup file (at most [`MAX_FILE_LEN`] bytes) is opened
//!   with the backup key and every record is read and checked before the
//!   target store is touched, so a tampered file or a wrong key writes
//!   nothing. The target is the store the configuration names (`[store]
//!   backend`), which must hold no key; each record is sealed again under
//!   the configuration's root key, which may differ from the one the
//!   backup was taken under.
//! - migrate: the file store in `state_dir` (locked, so no kmsd may run on
//!   it) is read with the root key and written into the etcd prefix the
//!   configuration names, which must hold no key. The files stay where
//!   they are.
//!
//! Records keep everything (versions and their material, origins, epoch,
//! serial, replicas, tombstones); only the store's revisions are new.
//!
//! The target is refused while a daemon runs on it (the file store's lock;
//! in etcd, a key under `<prefix>leader/`: every running daemon keeps one)
//! and when it holds a key. It is marked as being restored (the file
//! `state_dir/restoring`, or the etcd key `<prefix>restoring`) before the
//! first record is written, and the mark is removed after the last: no
//! daemon starts on a marked store. A run cut off half-way leaves the
//! mark; running again with `--resume` empties the store and fills it from
//! the start.

use std::io::Read;
use std::path::{Path, PathBuf};

use kms_client::backup::{self, BackupError, KeyFileError, MAX_FILE_LEN};

use crate::app::root_key_path;
use crate::config::{Backend, Config};
use crate::keys::model::KeyRecord;
use crate::keys::store::snapshot::{self, SnapshotError};
use crate::keys::store::{EtcdStore, FileStore, KeyStore, StoreError};
use crate::keys::RootKey;

/// Why a restore or a migration did nothing, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_FILE_LEN} bytes: not a backup kmsd wrote", path.display())]
    TooLarge { path: PathBuf },
    #[error("backup {}", path.display())]
    Backup {
        path: PathBuf,
        #[source]
        source: BackupError,
    },
    #[error("backup {}", path.display())]
    Snapshot {
        path: PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("the backup is of zone {found:?}, the configuration's zone is {expected:?}")]
    Zone { found: String, expected: String },
    #[error("no root key")]
    RootKey(#[source] Box<crate::app::StartError>),
    #[error("{what}")]
    Store {
        what: String,
        #[source]
        source: StoreError,
    },
    #[error("{0}")]
    Usage(String),
}

/// What was written.
#[derive(Debug)]
pub struct Report {
    /// Where to: `file store DIR` or `etcd PREFIX`.
    pub target: String,
    /// Records written (tombstones included).
    pub keys: usize,
}

/// `kmsd restore --from FILE --backup-key KEYFILE` into the store `cfg`
/// names.
///
/// # Errors
/// [`RestoreError`]; everything about the backup is checked before the
/// store is opened.
pub fn restore(cfg: &Config, from: &Path, key_file: &Path, resume: bool) -> Result<Report, RestoreError> {
    let key = backup::read_key_file(key_file)?;
    let sealed = read_bounded(from)?;
    let plain = backup::open(&key, &sealed).map_err(|source| RestoreError::Backup {
        path: from.to_path_buf(),
        source,
    })?;
    let snap = snapshot::decode(&plain).map_err(|source| RestoreError::Snapshot {
        path: from.to_path_buf(),
        source,
    })?;
    if snap.zone != cfg.zone {
        return Err(RestoreError::Zone {
            found: snap.zone,
            expected: cfg.zone.clone(),
        });
    }
    let root = load_root(cfg)?;
    let (store, target) = open_target(cfg, root, resume)?;
    fill(&store, &target, &snap.records)?;
    tracing::info!(%target, keys = snap.records.len(), taken_at = snap.taken_at, "backup restored");
    Ok(Report {
        target,
        keys: snap.records.len(),
    })
}

/// `kmsd migrate`: the file store in `cfg.state_dir` into the etcd prefix
/// `cfg` names.
///
/// # Errors
/// [`RestoreError`]: not an etcd configuration, the file store cannot be
/// read (locked by a running kmsd, wrong root key), etcd not empty.
pub fn migrate(cfg: &Config, resume: bool) -> Result<Report, RestoreError> {
    if cfg.store.backend != Backend::Etcd {
        return Err(RestoreError::Usage(
            "kmsd migrate moves the file store in state_dir into etcd: the configuration must say \
             [store] backend = \"etcd\" and where etcd is"
                .into(),
        ));
    }
    let dir = &cfg.state_dir;
    let source = FileStore::open(dir, load_root(cfg)?).map_err(|source| RestoreError::Store {
        what: format!("cannot open the file store {}", dir.display()),
        source,
    })?;
    let records: Vec<KeyRecord> = source
        .load()
        .map_err(|source| RestoreError::Store {
            what: format!("cannot read the file store {}", dir.display()),
            source,
        })?
        .into_iter()
        .map(|s| s.record)
        .collect();
    if records.is_empty() {
        return Err(RestoreError::Usage(format!(
            "the file store {} holds no key: nothing to migrate",
            dir.display()
        )));
    }
    let (store, target) = open_etcd(cfg, load_root(cfg)?, resume)?;
    fill(&store, &target, &records)?;
    tracing::info!(%target, keys = records.len(), from = %dir.display(), "file store migrated into etcd");
    Ok(Report {
        target,
        keys: records.len(),
    })
}

fn load_root(cfg: &Config) -> Result<RootKey, RestoreError> {
    let path = root_key_path(cfg).map_err(|e| RestoreError::RootKey(Box::new(e)))?;
    RootKey::load(&path).map_err(|source| RestoreError::Store {
        what: "cannot load the root key".into(),
        source,
    })
}

/// The whole file, refused past [`MAX_FILE_LEN`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, RestoreError> {
    let err = |source| RestoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes).map_err(err)?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(RestoreError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// A store being filled, marked as being restored until [`finish`].
enum Target {
    File(Box<FileStore>),
    Etcd(Box<EtcdStore>),
}

impl Target {
    fn store(&self) -> &dyn KeyStore {
        match self {
            Self::File(s) => &**s,
            Self::Etcd(s) => &**s,
        }
    }

    fn finish(&self) -> Result<(), StoreError> {
        match self {
            Self::File(s) => s.finish_restore(),
            Self::Etcd(s) => s.finish_restore(),
        }
    }
}

fn open_target(cfg: &Config, root: RootKey, resume: bool) -> Result<(Target, String), RestoreError> {
    match cfg.store.backend {
        Backend::File => {
            let dir = &cfg.state_dir;
            let store = FileStore::open_for_restore(dir, root, resume).map_err(|source| RestoreError::Store {
                what: format!("cannot restore into the file store {}", dir.display()),
                source,
            })?;
            Ok((Target::File(Box::new(store)), format!("file store {}", dir.display())))
        }
        Backend::Etcd => open_etcd(cfg, root, resume),
    }
}

fn open_etcd(cfg: &Config, root: RootKey, resume: bool) -> Result<(Target, String), RestoreError> {
    let settings = cfg.etcd_settings();
    let target = format!("etcd prefix {}", settings.prefix);
    let store = EtcdStore::open_for_restore(&settings, root, resume).map_err(|source| RestoreError::Store {
        what: format!("cannot fill {target}"),
        source,
    })?;
    Ok((Target::Etcd(Box::new(store)), target))
}

/// Writes every record into `target` (checked empty and marked when
/// opened), then removes its mark.
fn fill(target: &Target, name: &str, records: &[KeyRecord]) -> Result<(), RestoreError> {
    for (i, r) in records.iter().enumerate() {
        fault_half_way(i, records.len());
        target.store().put(r, None).map_err(|source| RestoreError::Store {
            what: format!("cannot write key {} into {name}", r.id),
            source,
        })?;
    }
    target.finish().map_err(|source| RestoreError::Store {
        what: format!("cannot mark {name} as restored"),
        source,
    })
}

/// Test hook (`KMSDTEST_FAULT=kill-mid-restore`), compiled in only with the
/// `test-faults` feature: SIGKILL this process when half of the records
/// are written.
#[cfg(feature = "test-faults")]
fn fault_half_way(written: usize, total: usize) {
    if written == total / 2 && std::env::var("KMSDTEST_FAULT").is_ok_and(|v| v == "kill-mid-restore") {
        tracing::warn!(written, total, "test fault: SIGKILL half-way through the restore");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(feature = "test-faults"))]
fn fault_half_way(_written: usize, _total: usize) {}
