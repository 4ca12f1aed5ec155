//! The encrypted filesystems kmsd mounts: a [`KeySource`] over the key
//! service (in-process, no socket), mounting each `[[mount]]` at start
//! (after clearing a mountpoint a crash left behind), `fs versions` and
//! `fs rewrap`, and unmounting on stop.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_client::blob::BlobHeader;
use kms_client::proto::{Context, ErrorCode, ErrorReply, FsRewrapInfo, FsVersionsInfo, MountInfo};
use kms_fuse::{Dek, KeyError, KeySource, MountHandle, MountOptions};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::config::MountConfig;
use crate::keys::policy::Access;
use crate::keys::{Caller, Error, KeyService};

/// Data keys for one filesystem, from one key of the key service.
#[derive(Debug)]
pub struct ServiceKeys {
    keys: Arc<KeyService>,
    key_id: Uuid,
}

impl ServiceKeys {
    /// Keys for the filesystem encrypted under `key_id`.
    pub fn new(keys: Arc<KeyService>, key_id: Uuid) -> Self {
        Self { keys, key_id }
    }
}

fn key_error(e: Error) -> KeyError {
    let message = crate::keys::error::error_chain(&e);
    match e.code() {
        ErrorCode::PermissionDenied => KeyError::Denied(message),
        ErrorCode::DecryptFailed => KeyError::DecryptFailed(message),
        _ => KeyError::Unavailable(message),
    }
}

fn dek_from(bytes: &[u8]) -> Result<Dek, KeyError> {
    let arr: [u8; kms_fuse::keys::DEK_LEN] = bytes
        .try_into()
        .map_err(|_| KeyError::DecryptFailed("wrapped key has the wrong length".into()))?;
    let dek = Dek::from_bytes(arr);
    let mut arr = arr;
    zeroize::Zeroize::zeroize(&mut arr);
    Ok(dek)
}

impl KeySource for ServiceKeys {
    fn key_id(&self) -> Uuid {
        self.key_id
    }

    fn new_dek(&self, ctx: &Context) -> Result<(Dek, Vec<u8>), KeyError> {
        let (dek, blob) = self
            .keys
            .generate_data_key(&Caller::internal(), &self.key_id.to_string(), ctx)
            .map_err(key_error)?;
        Ok((dek_from(&dek)?, blob.blob))
    }

    fn unwrap_dek(&self, ctx: &Context, blob: &[u8]) -> Result<Dek, KeyError> {
        let dek = self
            .keys
            .unwrap_for_key(&Caller::internal(), self.key_id, blob, ctx)
            .map_err(key_error)?;
        dek_from(&dek)
    }

    fn rewrap(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, KeyError> {
        let header = BlobHeader::parse(blob).map_err(|e| KeyError::DecryptFailed(e.to_string()))?;
        if header.key_id != self.key_id {
            return Err(KeyError::DecryptFailed(
                "the header's key is not this filesystem's key".into(),
            ));
        }
        self.keys
            .re_encrypt(&Caller::internal(), blob, ctx, None, None)
            .map(|sealed| sealed.blob)
            .map_err(key_error)
    }

    fn active_version(&self) -> Result<u32, KeyError> {
        let entry = self.keys.entry(&self.key_id.to_string()).map_err(key_error)?;
        Ok(entry.record.active().version)
    }
}

/// Why a mount could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {target}: key {key:?} does not exist; create it with `kmsctl key create --name {key}`")]
    NoKey { target: PathBuf, key: String },
    #[error("mount {target}: cannot create {path}")]
    Dir {
        target: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {target}: the mountpoint is busy ({reason}); unmount or empty it, or choose another target")]
    Busy { target: PathBuf, reason: &'static str },
    #[error("mount {target}: cannot clear a stale mountpoint")]
    Stale {
        target: PathBuf,
        #[source]
        source: kms_fuse::Error,
    },
    #[error("mount {target}: the kernel refused the mount (is /dev/fuse available and is the target busy?)")]
    Mount {
        target: PathBuf,
        #[source]
        source: kms_fuse::Error,
    },
}

/// Refuses a mountpoint that already has something mounted on it or that
/// holds files (they would be hidden under the encrypted view).
fn check_free(target: &Path) -> Result<(), MountError> {
    use std::os::unix::fs::MetadataExt;
    let busy = |reason| MountError::Busy {
        target: target.to_path_buf(),
        reason,
    };
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let parent = target.parent().unwrap_or(Path::new("/"));
    if dev(target).is_some() && dev(target) != dev(parent) {
        return Err(busy("something is already mounted there"));
    }
    if std::fs::read_dir(target).is_ok_and(|mut d| d.next().is_some()) {
        return Err(busy("it is not empty"));
    }
    Ok(())
}

/// One live mount.
#[derive(Debug)]
struct Live {
    info: MountInfo,
    source: PathBuf,
    target: PathBuf,
    keys: Arc<ServiceKeys>,
    handle: Option<MountHandle>,
}

/// Every filesystem this daemon serves.
#[derive(Debug, Default)]
pub struct Mounts {
    live: Mutex<Vec<Live>>,
}

impl Mounts {
    /// Mounts every configured filesystem, in order. On failure, what was
    /// already mounted is unmounted again.
    ///
    /// # Errors
    /// The first [`MountError`].
    pub fn mount_all(keys: &Arc<KeyService>, configs: &[MountConfig]) -> Result<Self, MountError> {
        let mounts = Self::default();
        for cfg in configs {
            mounts.mount_one(keys, cfg)?;
        }
        Ok(mounts)
    }

    /// Mounts one filesystem.
    ///
    /// # Errors
    /// See [`MountError`].
    pub fn mount_one(&self, keys: &Arc<KeyService>, cfg: &MountConfig) -> Result<(), MountError> {
        let target = cfg.target.clone();
        let entry = keys.entry(&cfg.key).map_err(|_| MountError::NoKey {
            target: target.clone(),
            key: cfg.key.clone(),
        })?;
        // First: a mountpoint left by a crash cannot even be stat'ed.
        kms_fuse::recover_stale_mount(&target).map_err(|source| MountError::Stale {
            target: target.clone(),
            source,
        })?;
        for dir in [&cfg.source, &cfg.target] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| MountError::Dir {
                    target: target.clone(),
                    path: dir.clone(),
                    source,
                })?;
        }
        kms_fuse::recover_stale_mount(&target).map_err(|source| MountError::Stale {
            target: target.clone(),
            source,
        })?;
        check_free(&target)?;
        let source_keys = Arc::new(ServiceKeys::new(keys.clone(), entry.record.id));
        let opts = MountOptions {
            fs_name: format!("kmsd:{}", cfg.key),
            ..MountOptions::default()
        };
        let handle =
            kms_fuse::mount(&cfg.source, &target, source_keys.clone(), &opts).map_err(|source| MountError::Mount {
                target: target.clone(),
                source,
            })?;
        let info = MountInfo {
            source: cfg.source.display().to_string(),
            target: target.display().to_string(),
            key: cfg.key.clone(),
        };
        self.live.lock().push(Live {
            info,
            source: cfg.source.clone(),
            target,
            keys: source_keys,
            handle: Some(handle),
        });
        Ok(())
    }

    /// How many filesystems are mounted.
    pub fn count(&self) -> usize {
        self.live.lock().len()
    }

    /// What is mounted, for `status`.
    pub fn infos(&self) -> Vec<MountInfo> {
        self.live.lock().iter().map(|l| l.info.clone()).collect()
    }

    /// The counters of every live mount, by target, for the metrics.
    pub fn stats(&self) -> Vec<(String, kms_fuse::FsStatsSnapshot)> {
        let live = self.live.lock();
        live.iter()
            .filter_map(|l| Some((l.info.target.clone(), l.handle.as_ref()?.stats().snapshot())))
            .collect()
    }

    /// The backing dir and key source of the mount at `target`, after
    /// checking that `caller` may `access` its key.
    fn find(
        &self,
        keys: &KeyService,
        caller: &Caller,
        target: &str,
        access: Access,
    ) -> Result<(PathBuf, Arc<ServiceKeys>), ErrorReply> {
        let wanted = Path::new(target);
        let live = self.live.lock();
        let l = live
            .iter()
            .find(|l| l.target == wanted || l.target.canonicalize().is_ok_and(|t| t == wanted))
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::Unavailable,
                    format!("no encrypted filesystem is mounted at {target}"),
                )
            })?;
        keys.authorize(caller, &l.keys.key_id.to_string(), access)?;
        Ok((l.source.clone(), l.keys.clone()))
    }

    /// Counts files per key version under the mount at `target`.
    ///
    /// # Errors
    /// Unknown mount, permission, or an unreadable backing dir.
    pub fn versions(&self, keys: &KeyService, caller: &Caller, target: &str) -> Result<FsVersionsInfo, ErrorReply> {
        let (source, fs_keys) = self.find(keys, caller, target, Access::Read)?;
        kms_fuse::admin::versions(&source, fs_keys.as_ref()).map_err(fs_error)
    }

    /// Re-wraps every older header under the mount at `target`.
    ///
    /// # Errors
    /// Unknown mount, permission, or an unreadable backing dir.
    pub fn rewrap(
        &self,
        keys: &KeyService,
        caller: &Caller,
        target: &str,
        progress: impl FnMut(u64, u64),
    ) -> Result<FsRewrapInfo, ErrorReply> {
        let (source, fs_keys) = self.find(keys, caller, target, Access::Admin)?;
        kms_fuse::admin::rewrap(&source, fs_keys.as_ref(), progress).map_err(fs_error)
    }

    /// Unmounts everything (lazily where busy).
    pub fn unmount_all(&self) {
        let mut live = self.live.lock();
        for l in live.iter_mut() {
            if let Some(h) = l.handle.take() {
                match h.unmount() {
                    Ok(()) => tracing::info!(target = %l.target.display(), "unmounted"),
                    Err(e) => tracing::warn!(target = %l.target.display(), error = %e, "mount busy; detached lazily"),
                }
            }
        }
        live.clear();
    }
}

fn fs_error(e: kms_fuse::Error) -> ErrorReply {
    ErrorReply::new(ErrorCode::Unavailable, crate::keys::error::error_chain(&e))
}
