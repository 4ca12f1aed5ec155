//! Mounting and unmounting: the only module that talks to the kernel's
//! mount machinery.
//!
//! As root, fuser mounts with `mount(2)` directly, so no `fusermount3` is
//! needed. The mount uses `default_permissions` (the kernel checks file
//! modes) and `allow_other` (other users reach it at all).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use nix::mount::{umount2, MntFlags};

use crate::adapter::FuseAdapter;
use crate::error::{Error, Result};
use crate::fs::{EncryptedFs, NameMode};
use crate::keys::KeySource;
use crate::stats::FsStats;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Threads serving requests (each with its own `/dev/fuse` clone).
    pub threads: usize,
    /// How long the kernel may cache attributes and entries.
    pub ttl: Duration,
    /// Let users other than the mounter in (`allow_other`).
    pub allow_other: bool,
    /// Name shown in the mount table.
    pub fs_name: String,
    /// How many `O_PATH` descriptors of backing inodes stay open at most
    /// (least recently used first out; others are reopened by file handle).
    /// See [`crate::inode`] for the full bound and when it does not hold.
    pub fd_cache: usize,
    /// Encrypted or plain names (see [`NameMode`]).
    pub names: NameMode,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            threads: 8,
            ttl: Duration::from_secs(1),
            allow_other: true,
            fs_name: "kms-fuse".to_string(),
            fd_cache: crate::inode::DEFAULT_FD_CACHE,
            names: NameMode::default(),
        }
    }
}

/// A live mount. Dropping it unmounts (lazily if the mount is busy).
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    target: PathBuf,
    stats: Arc<FsStats>,
}

fn mount_error(target: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Mount {
        path: target.to_path_buf(),
        source,
    }
}

/// The fuser configuration for `opts`.
pub fn fuser_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("kms-fuse".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    config
}

/// Mounts the encrypted view of `source` at `target`.
///
/// # Errors
/// `source` is not a directory, or the kernel refuses the mount.
pub fn mount(source: &Path, target: &Path, keys: Arc<dyn KeySource>, opts: &MountOptions) -> Result<MountHandle> {
    raise_fd_limit();
    let fs = EncryptedFs::with_options(source, keys, opts.fd_cache, opts.names)?;
    let stats = fs.stats();
    let adapter = FuseAdapter::new(fs, opts.ttl, opts.threads.max(1));
    let session = fuser::spawn_mount(adapter, target, &fuser_config(opts)).map_err(mount_error(target))?;
    tracing::info!(source = %source.display(), target = %target.display(), "mounted");
    Ok(MountHandle {
        session: Some(session),
        target: target.to_path_buf(),
        stats,
    })
}

impl MountHandle {
    /// Where this is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The filesystem's counters.
    pub fn stats(&self) -> &FsStats {
        &self.stats
    }

    /// Whether the kernel still sends this mount requests: false once it
    /// was unmounted, from outside too (`umount`, `fusermount -u`), or its
    /// session failed. A process serving only this mount should then exit,
    /// so that its supervisor mounts it again.
    pub fn is_serving(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.guard.is_finished())
    }

    /// The filesystem's counters, to read from another thread.
    pub fn shared_stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Unmounts and waits for the serving threads to finish.
    ///
    /// # Errors
    /// The mount is busy (`EBUSY`): it is then detached lazily, and goes
    /// away when its last user does.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if session.guard.is_finished() {
            // Unmounted from outside already: no unmount to make (it would
            // fail), and no lazy detach of whatever the mountpoint shows now.
            return session.join().map_err(mount_error(&self.target));
        }
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(source) => {
                let _ = umount2(&self.target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
                Err(mount_error(&self.target)(source))
            }
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(target = %self.target.display(), error = %crate::fs::describe(&e), "unmount failed; detached lazily");
        }
    }
}

/// Clears a mountpoint left behind by a daemon that died ("Transport
/// endpoint is not connected") with a lazy unmount. Returns whether
/// anything was detached.
///
/// # Errors
/// The detach itself fails.
pub fn recover_stale_mount(target: &Path) -> Result<bool> {
    if !is_dead_fuse_mount(target) {
        return Ok(false);
    }
    umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)?;
    tracing::warn!(target = %target.display(), "detached stale FUSE mount");
    Ok(true)
}

/// A FUSE mount whose daemon is gone answers `ENOTCONN`. `stat` alone can
/// miss it (the kernel may still hold the root's attributes in its cache),
/// so `statfs`, which is never cached, is asked too.
fn is_dead_fuse_mount(target: &Path) -> bool {
    let stat_dead = matches!(std::fs::metadata(target), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    stat_dead || matches!(nix::sys::statfs::statfs(target), Err(nix::Error::ENOTCONN))
}

/// Allows as many descriptors as the hard limit permits. The mount's own
/// use is bounded by [`MountOptions::fd_cache`] plus what users hold open
/// (see [`crate::inode`]), but the default soft limit (1024) is no more than
/// the default cache, and files held open through the mount, two
/// descriptors each, are bounded only by the users' limits. Where file
/// handles are unusable every known inode holds a descriptor, as they all
/// did before the cache.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard
    // limit needs no privilege.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_asks_for_permissions_and_threads() {
        let c = fuser_config(&MountOptions::default());
        assert!(c.mount_options.contains(&MountOption::DefaultPermissions));
        assert_eq!(c.acl, SessionACL::All);
        assert_eq!(c.n_threads, Some(8));
        assert!(c.clone_fd);
    }

    #[test]
    fn healthy_directory_is_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!recover_stale_mount(dir.path()).unwrap());
    }
}
