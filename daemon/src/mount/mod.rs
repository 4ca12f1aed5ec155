//! The mount process (`kmsd mount NAME`): one encrypted filesystem, served
//! with the privileges mounting needs and no key but the data keys of its
//! open files. It is a client of kmsd ([`keys::ClientKeys`]) and answers
//! kmsd on its admin socket ([`admin`]). ARCHITECTURE.md, "Processes".
//!
//! Start: reach kmsd and resolve the key, clear a stale mountpoint, check
//! the target is free, mount, open the admin socket, say READY=1 (systemd).
//! Stop: on SIGTERM or SIGINT, close the admin socket and unmount.

pub mod admin;
pub mod keys;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::proto::MountInfo;
use kms_fuse::{KeySource, MountHandle, MountOptions};
use nix::sys::signal::{SigSet, Signal};
use serde::Deserialize;

/// Where `kmsd mount NAME` reads its settings: `DIR/NAME.toml`.
pub const MOUNTS_DIR: &str = "/etc/kmsd/mounts";

/// kmsd's socket unless the settings say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kmsd/kmsd.sock";

/// A mount process's settings (`/etc/kmsd/mounts/NAME.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSettings {
    /// Backing directory holding the encrypted files.
    pub source: PathBuf,
    /// Mountpoint.
    pub target: PathBuf,
    /// Key (name or id) whose active version wraps new files' DEKs; this
    /// process's user must be allowed to use it.
    pub key: String,
    /// kmsd's socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// How long a key request (an open, a create) waits for kmsd before
    /// it fails with EIO, in seconds.
    #[serde(default = "default_key_timeout")]
    pub key_timeout_secs: u64,
    /// Log filter; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Encrypted (default) or plain names.
    #[serde(default)]
    pub names: Names,
}

/// `names = "encrypted" | "plain"`, or unset (`auto`): whether the backing
/// directory has encrypted names. Unset, a new (empty) directory gets them
/// and one with files but no name key stays plain (a configuration older
/// than encrypted names), logged as an error; `"encrypted"` refuses such a
/// directory instead, so that deleting its `kmsd.names` cannot make a
/// mount write names in clear; `"plain"` on an encrypted one is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Names {
    #[default]
    Auto,
    Encrypted,
    Plain,
}

impl Names {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Names::Auto => "auto",
            Names::Encrypted => "encrypted",
            Names::Plain => "plain",
        }
    }
}

impl From<Names> for kms_fuse::NameMode {
    fn from(n: Names) -> Self {
        match n {
            Names::Auto => kms_fuse::NameMode::Auto,
            Names::Encrypted => kms_fuse::NameMode::Encrypted,
            Names::Plain => kms_fuse::NameMode::Plain,
        }
    }
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

fn default_key_timeout() -> u64 {
    10
}

fn default_log_level() -> String {
    "info".into()
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read mount settings")]
    Load(#[from] config::ConfigError),
    #[error("mount setting {setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
}

impl MountSettings {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// Unreadable file, unknown or invalid settings.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let file = config::File::from(path).format(config::FileFormat::Toml).required(true);
        let s: Self = config::Config::builder().add_source(file).build()?.try_deserialize()?;
        s.validate()?;
        Ok(s)
    }

    /// Settings given on the command line (kmsd's children).
    ///
    /// # Errors
    /// Invalid values.
    pub fn new(
        source: PathBuf,
        target: PathBuf,
        key: String,
        socket: PathBuf,
        names: Names,
    ) -> Result<Self, SettingsError> {
        let s = Self {
            source,
            target,
            key,
            socket,
            names,
            key_timeout_secs: default_key_timeout(),
            log_level: default_log_level(),
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks every value.
    ///
    /// # Errors
    /// `Invalid` naming the setting.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |setting, reason: &str| SettingsError::Invalid {
            setting,
            reason: reason.into(),
        };
        for (setting, p) in [
            ("source", &self.source),
            ("target", &self.target),
            ("socket", &self.socket),
        ] {
            if !p.is_absolute() {
                return Err(bad(setting, "must be an absolute path"));
            }
        }
        if self.source.starts_with(&self.target) || self.target.starts_with(&self.source) {
            return Err(bad("target", "source and target must not contain each other"));
        }
        if self.key.is_empty() {
            return Err(bad("key", "must name a key"));
        }
        if !(1..=3600).contains(&self.key_timeout_secs) {
            return Err(bad("key_timeout_secs", "must be 1 .. 3600"));
        }
        Ok(())
    }

    /// The admin socket of the mount named `name`: `mounts/NAME.sock`
    /// beside kmsd's socket, where kmsd looks for it.
    pub fn admin_socket(&self, name: &str) -> PathBuf {
        admin_dir(&self.socket).join(format!("{name}.sock"))
    }
}

/// The folder of mount processes' admin sockets for kmsd at `socket`.
pub fn admin_dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/")).join("mounts")
}

/// A mount name: 1-64 characters from A-Z a-z 0-9 `-` `_` `.`, not
/// starting with a dot (it names the admin socket and the settings file).
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Why a mount could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
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
    #[error("mount {target}: {} is not safe to mount by: {reason}", path.display())]
    Untrusted {
        target: PathBuf,
        path: PathBuf,
        reason: String,
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

fn clear_stale(target: &Path) -> Result<(), MountError> {
    kms_fuse::recover_stale_mount(target)
        .map(|_| ())
        .map_err(|source| MountError::Stale {
            target: target.to_path_buf(),
            source,
        })
}

/// Resolves `path` (absolute) one component at a time and refuses it unless
/// no other user can redirect it: every directory on the way (and every
/// symlink, which is followed) is owned by root or by this process's user,
/// and no directory is writable by group or others unless it is sticky
/// (like `/tmp`, where only the owner of an entry may rename it, and the
/// entry itself must then pass). Returns the path with every symlink
/// resolved. With `missing_ok`, components from the first missing one on
/// are appended as they are (the caller creates them, then checks again).
///
/// Root mounts, creates, detaches and later walks these paths by name: a
/// directory a user could swap for a symlink would let that user choose
/// where root mounts or what it detaches (over `/etc`, say).
pub fn trusted_path(path: &Path, missing_ok: bool) -> Result<PathBuf, String> {
    use std::collections::VecDeque;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Component;
    const MAX_LINKS: usize = 40;
    let euid = nix::unistd::geteuid().as_raw();
    let check = |p: &Path, m: &std::fs::Metadata| -> Result<(), String> {
        if m.uid() != 0 && m.uid() != euid {
            return Err(format!("{} is owned by uid {}", p.display(), m.uid()));
        }
        let mode = m.permissions().mode();
        if !m.file_type().is_symlink() && mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "{} is writable by others (mode {:o})",
                p.display(),
                mode & 0o7777
            ));
        }
        Ok(())
    };
    if !path.is_absolute() {
        return Err("the path is not absolute".into());
    }
    let root = Path::new("/");
    check(root, &std::fs::symlink_metadata(root).map_err(|e| e.to_string())?)?;
    let mut resolved = PathBuf::from("/");
    let mut pending: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push = |pending: &mut VecDeque<std::ffi::OsString>, p: &Path, front: bool| {
        let parts: Vec<_> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        if front {
            for part in parts.into_iter().rev() {
                pending.push_front(part);
            }
        } else {
            pending.extend(parts);
        }
    };
    push(&mut pending, path, false);
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let next = resolved.join(&part);
        let m = match std::fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => {
                resolved.push(part);
                resolved.extend(pending.drain(..));
                return Ok(resolved);
            }
            Err(e) => return Err(format!("{}: {e}", next.display())),
        };
        check(&next, &m)?;
        if m.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err("too many symbolic links".into());
            }
            let to = std::fs::read_link(&next).map_err(|e| format!("{}: {e}", next.display()))?;
            if to.is_absolute() {
                resolved = PathBuf::from("/");
            }
            push(&mut pending, &to, true);
        } else if m.is_dir() {
            resolved = next;
        } else {
            return Err(format!("{} is not a directory", next.display()));
        }
    }
    Ok(resolved)
}

/// Mounts `source` at `target` with data keys from `keys`, after clearing
/// a mountpoint a dead mount process left behind and creating both
/// folders (mode 0700) if needed. `fs_name` shows in the mount table.
///
/// # Errors
/// See [`MountError`].
pub fn mount_fs(
    source: &Path,
    target: &Path,
    fs_name: &str,
    keys: Arc<dyn KeySource>,
    names: Names,
) -> Result<MountHandle, MountError> {
    let untrusted = |path: &Path| {
        let target = target.to_path_buf();
        let path = path.to_path_buf();
        move |reason| MountError::Untrusted { target, path, reason }
    };
    // The folder that holds the mountpoint first: the mountpoint itself may
    // be a stale mount left by a crash, which cannot even be stat'ed.
    let (Some(parent), Some(leaf)) = (target.parent(), target.file_name()) else {
        return Err(untrusted(target)("it has no parent folder".into()));
    };
    let target = &trusted_path(parent, true).map_err(untrusted(parent))?.join(leaf);
    let source = &trusted_path(source, true).map_err(untrusted(source))?;
    clear_stale(target)?;
    for dir in [source, target] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| MountError::Dir {
                target: target.to_path_buf(),
                path: dir.to_path_buf(),
                source: e,
            })?;
    }
    // Again, now that every component exists (one a user created first, in
    // a sticky folder, is refused here), and mount by the resolved paths.
    let target = &trusted_path(target, false).map_err(untrusted(target))?;
    let source = &trusted_path(source, false).map_err(untrusted(source))?;
    clear_stale(target)?;
    check_free(target)?;
    let opts = MountOptions {
        fs_name: fs_name.to_string(),
        names: names.into(),
        ..MountOptions::default()
    };
    kms_fuse::mount(source, target, keys, &opts).map_err(|e| MountError::Mount {
        target: target.to_path_buf(),
        source: e,
    })
}

/// Why the mount process stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("mount {name}: cannot reach kmsd or use key {key:?}")]
    Keys {
        name: String,
        key: String,
        #[source]
        source: kms_fuse::KeyError,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("mount {name}: admin socket {}", path.display())]
    Admin {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for signals")]
    Signals(#[source] nix::Error),
    #[error("mount {name}: {} was unmounted from outside", target.display())]
    Lost { name: String, target: PathBuf },
}

/// How often the mount process looks whether its filesystem is still
/// mounted while it waits for a signal.
const SERVING_CHECK: Duration = Duration::from_millis(250);

/// Waits for SIGTERM or SIGINT (blocked in every thread) while the mount
/// serves. `None`: the mount stopped serving first (unmounted from outside,
/// or its session failed), and this process should exit so that systemd, or
/// kmsd for its child, mounts it again instead of leaving a process that
/// serves nothing.
fn wait_while_serving(signals: &SigSet, handle: &MountHandle) -> Result<Option<Signal>, RunError> {
    let pause = libc::timespec {
        tv_sec: 0,
        tv_nsec: i64::try_from(SERVING_CHECK.as_nanos()).unwrap_or(250_000_000),
    };
    loop {
        // SAFETY: `signals` is a valid, initialised sigset_t and `pause` a
        // valid timespec, both alive for the call; no siginfo is asked for.
        let n = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &pause) };
        if n > 0 {
            return Signal::try_from(n).map(Some).map_err(RunError::Signals);
        }
        match nix::Error::last() {
            nix::Error::EAGAIN | nix::Error::EINTR => {}
            e => return Err(RunError::Signals(e)),
        }
        if !handle.is_serving() {
            return Ok(None);
        }
    }
}

/// Under a systemd watchdog (`WatchdogSec=`), pings it only while the
/// filesystem answers: each round asks the mount itself for `statfs`, which
/// the kernel never caches, so a mount whose serving threads are all stuck,
/// or that is gone, stops the pings and systemd restarts the process.
fn start_watchdog(target: &Path) {
    let Some(every) = crate::notify::watchdog_interval() else {
        return;
    };
    let target = target.to_path_buf();
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || loop {
        match nix::sys::statfs::statfs(&target) {
            Ok(_) => crate::notify::watchdog(),
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "the mount does not answer; no watchdog ping")
            }
        }
        std::thread::sleep(every);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the watchdog thread; systemd will restart this process");
    }
}

/// Runs the mount named `name` until SIGTERM or SIGINT; its key requests
/// go over `given` (kmsd's connection to its child) if any, else to
/// kmsd's socket.
///
/// # Errors
/// See [`RunError`]; nothing stays mounted after an error.
pub fn run(name: &str, s: &MountSettings, given: Option<std::os::unix::net::UnixStream>) -> Result<(), RunError> {
    // Before any thread starts, so that every thread inherits the mask and
    // the signals wait for `wait` below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(RunError::Signals)?;
    let timeout = Duration::from_secs(s.key_timeout_secs);
    let keys = match given {
        Some(stream) => keys::ClientKeys::given(stream, &s.key, timeout),
        None => keys::ClientKeys::connect(&s.socket, &s.key, timeout),
    };
    let keys = keys
        .map_err(|source| RunError::Keys {
            name: name.into(),
            key: s.key.clone(),
            source,
        })?
        .with_changes(crate::changes::dir(&s.socket).join(crate::changes::FILE));
    let keys: Arc<dyn KeySource> = Arc::new(keys);
    let handle = mount_fs(&s.source, &s.target, &format!("kmsd:{}", s.key), keys.clone(), s.names)?;
    let path = s.admin_socket(name);
    let kmsd_uid = admin::kmsd_uid();
    let owner = nix::unistd::geteuid().is_root().then_some(kmsd_uid).flatten();
    let listener = admin::bind(&path, owner).map_err(|source| RunError::Admin {
        name: name.into(),
        path: path.clone(),
        source,
    })?;
    let admin = Arc::new(admin::Admin {
        info: MountInfo {
            source: s.source.display().to_string(),
            // Resolved, as kmsctl resolves the path it is given.
            target: handle.target().display().to_string(),
            key: s.key.clone(),
        },
        source: s.source.clone(),
        keys,
        stats: handle.shared_stats(),
        started: Instant::now(),
        kmsd_uid,
    });
    std::thread::Builder::new()
        .name("admin-accept".into())
        .spawn(move || admin::serve(listener, admin))
        .map_err(|source| RunError::Admin {
            name: name.into(),
            path: path.clone(),
            source,
        })?;
    tracing::info!(name, target = %s.target.display(), admin = %path.display(), "mount process ready");
    crate::notify::ready(&format!("serving {}", s.target.display()));
    start_watchdog(&s.target);
    let got = wait_while_serving(&signals, &handle);
    crate::notify::stopping();
    let _ = std::fs::remove_file(&path);
    match got? {
        Some(signal) => tracing::info!(%signal, "unmounting"),
        None => {
            tracing::error!(target = %s.target.display(), "the filesystem was unmounted from outside; exiting so that it is mounted again");
            return Err(RunError::Lost {
                name: name.into(),
                target: s.target.clone(),
            });
        }
    }
    match handle.unmount() {
        Ok(()) => tracing::info!(target = %s.target.display(), "unmounted"),
        Err(e) => tracing::warn!(target = %s.target.display(), error = %e, "mount busy; detached lazily"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<MountSettings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, toml).unwrap();
        MountSettings::load(&p)
    }

    #[test]
    fn settings_take_defaults_and_refuse_the_unknown_and_the_relative() {
        let s = settings("source = \"/var/lib/d\"\ntarget = \"/srv/d\"\nkey = \"app\"\n").unwrap();
        assert_eq!(s.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(s.key_timeout_secs, 10);
        assert_eq!(s.admin_socket("data"), Path::new("/run/kmsd/mounts/data.sock"));
        assert!(settings("source = \"/a\"\ntarget = \"/b\"\nkey = \"k\"\nextra = 1\n").is_err());
        let e = settings("source = \"a\"\ntarget = \"/b\"\nkey = \"k\"\n").unwrap_err();
        assert!(e.to_string().contains("source"), "{e}");
        let e = settings("source = \"/a\"\ntarget = \"/a/b\"\nkey = \"k\"\n").unwrap_err();
        assert!(e.to_string().contains("target"), "{e}");
    }

    /// Paths a user other than root (and this process's user) could
    /// redirect are refused; root-owned symlinks are followed.
    #[test]
    fn mount_paths_another_user_could_redirect_are_refused() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI is set but this test needs root");
            eprintln!("skipping: needs root to give folders to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let chown = |p: &Path| std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        // Fine: own folders, a root-owned symlink, missing components.
        std::fs::create_dir_all(base.join("ok/real")).unwrap();
        symlink(base.join("ok/real"), base.join("ok/link")).unwrap();
        assert_eq!(
            trusted_path(&base.join("ok/link"), false).unwrap(),
            base.join("ok/real")
        );
        assert_eq!(
            trusted_path(&base.join("ok/link/new/deeper"), true).unwrap(),
            base.join("ok/real/new/deeper")
        );
        assert!(trusted_path(&base.join("ok/link/new"), false).is_err());
        // A folder of another user: they could swap what is below it.
        std::fs::create_dir_all(base.join("theirs/mnt")).unwrap();
        chown(&base.join("theirs"));
        let e = trusted_path(&base.join("theirs/mnt"), false).unwrap_err();
        assert!(e.contains("owned by uid 65534"), "{e}");
        // A symlink another user made (in a sticky folder, as in /tmp).
        std::fs::create_dir(base.join("sticky")).unwrap();
        std::fs::set_permissions(base.join("sticky"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        symlink("/etc", base.join("sticky/mnt")).unwrap();
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &base.join("sticky/mnt"),
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(trusted_path(&base.join("sticky/mnt"), false).is_err());
        // The sticky folder itself is fine, and so is root's entry in it.
        std::fs::create_dir(base.join("sticky/mine")).unwrap();
        assert!(trusted_path(&base.join("sticky/mine"), false).is_ok());
        // Writable by others without the sticky bit: anyone can rename.
        std::fs::create_dir_all(base.join("open/mnt")).unwrap();
        std::fs::set_permissions(base.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = trusted_path(&base.join("open/mnt"), false).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        assert!(trusted_path(Path::new("relative"), true).is_err());
    }

    #[test]
    fn names_setting_defaults_to_auto_and_takes_encrypted_and_plain() {
        let base = "source = \"/a\"\ntarget = \"/b\"\nkey = \"k\"\n";
        assert_eq!(settings(base).unwrap().names, Names::Auto);
        let required = settings(&format!("{base}names = \"encrypted\"\n")).unwrap();
        assert_eq!(kms_fuse::NameMode::from(required.names), kms_fuse::NameMode::Encrypted);
        let plain = settings(&format!("{base}names = \"plain\"\n")).unwrap();
        assert_eq!(plain.names, Names::Plain);
        assert_eq!(kms_fuse::NameMode::from(plain.names), kms_fuse::NameMode::Plain);
        assert!(settings(&format!("{base}names = \"hidden\"\n")).is_err());
        let cfg = crate::config::Config::parse(&format!("[[mount]]\n{base}names = \"plain\"\n"), Default::default());
        assert_eq!(cfg.unwrap().mounts[0].names, Names::Plain);
    }

    #[test]
    fn names_are_file_names() {
        assert!(name_ok("data") && name_ok("srv-app.2"));
        assert!(!name_ok("") && !name_ok("../x") && !name_ok(".hidden") && !name_ok("a/b"));
    }
}
