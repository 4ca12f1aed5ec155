//! The filesystem's operations, independent of the FUSE wire: each returns
//! `Result<T, Error>` and the adapter in [`crate::adapter`] replies.
//!
//! Namespace operations act on the backing directory through the `O_PATH`
//! descriptors of the [`InodeTable`]; regular-file data goes through one
//! shared [`EncryptedFile`] per open inode, whose DEK is unwrapped at the
//! first open and dropped (zeroized) at the last release.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fchmodat, fstat, fstatat, mknodat, utimensat, FchmodatFlags};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::statvfs::{fstatvfs, Statvfs};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid, UnlinkatFlags};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::fault;
use crate::file::EncryptedFile;
use crate::format::{self, Layout};
use crate::inode::{InodeTable, Node, DEFAULT_FD_CACHE, ROOT};
use crate::journal::{Journal, JOURNAL_FILE};
use crate::keys::KeySource;
use crate::names::{self, Backing, DirId, Kind, NameKeys};
use crate::stats::{FsOp, FsStats};
use crate::tamper::TamperLog;
use crate::xattr;

/// Whether a mount encrypts names (FORMAT.md, "Names").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NameMode {
    /// Not chosen (a configuration from before names were encrypted):
    /// encrypted names for a new (empty) backing directory; an existing
    /// directory with files but without `kmsd.names` stays plain, with an
    /// error in the log (that is also what a directory whose `kmsd.names`
    /// was deleted looks like).
    #[default]
    Auto,
    /// Encrypted names, required: a new directory gets them, and a
    /// directory with files but without `kmsd.names` is refused rather than
    /// written with plain names.
    Encrypted,
    /// Plain names; refused on a directory that has `kmsd.names`.
    Plain,
}

/// Longest long-name part read (a short-form string is at most 363 bytes).
const PART_MAX: usize = 512;

/// Who is asking (from the FUSE request header).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Attribute changes of one `setattr`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    /// A size change by a caller without `CAP_FSETID`: clear the set-id
    /// bits as the kernel would (the mount handles killpriv itself).
    pub kill_suidgid: bool,
}

/// One directory entry of an open directory snapshot.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub kind: FileType,
    pub ino: u64,
    /// The entry's name in the backing directory (for a lookup without
    /// encrypting the name again).
    pub backing: OsString,
}

/// See [`EncryptedFs::before_removal`].
#[derive(Default)]
struct Removal {
    ino: Option<u64>,
    file: Option<(File, crate::keys::FileId)>,
}

#[derive(Debug)]
struct OpenEntry {
    file: Arc<EncryptedFile>,
    handles: u64,
    /// Keeps the inode's `O_PATH` descriptor open while the file is: an
    /// unlinked open file cannot be reopened by handle.
    node: Arc<Node>,
}

/// The encrypted filesystem over one backing directory.
pub struct EncryptedFs {
    keys: Arc<dyn KeySource>,
    /// Seals after which a version 1 file moves to a fresh DEK (lowered
    /// by tests).
    rekey_at: u64,
    nodes: InodeTable,
    open: Mutex<HashMap<u64, OpenEntry>>,
    /// Inodes being opened: a second opener of one waits for the first
    /// and then finds its entry, so an inode never gets two
    /// `EncryptedFile`s (one opened from the disk before the other's
    /// writes, inserted after its release, would hold a stale size or,
    /// after a key change, a DEK the header no longer names).
    /// Each gate remembers its holder's failure: openers that waited for
    /// it fail with the same error at once instead of each trying (and
    /// each waiting out the key timeout while kmsd is away) in turn.
    opening: Mutex<HashMap<u64, Arc<Mutex<Option<i32>>>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_dir: AtomicU64,
    /// Rate limit of tamper warnings.
    tamper: TamperLog,
    stats: Arc<FsStats>,
    /// Format layout of regular files by FUSE inode (never reused), so
    /// that `stat` of a closed file reads its header's version only once.
    layouts: Mutex<HashMap<u64, Layout>>,
    /// The backing root carries [`V2_ONLY_XATTR`]: every file is format
    /// version 2, so sizes need no header read (see FORMAT.md, "Size").
    only_v2: AtomicBool,
    /// The backing root, for updating that attribute.
    source: PathBuf,
    /// The name keys when names are encrypted.
    names: Option<NameKeys>,
    /// Directory ids by FUSE inode (never reused); bounded like `layouts`.
    /// An entry is only ever what is on disk: added after the id file was
    /// read or written, dropped before a directory's bookkeeping is cleared.
    dir_ids: Mutex<HashMap<u64, DirId>>,
    /// Held while a directory gets a new id, so that two repairs of one
    /// directory cannot both write one (the second would remove the first's).
    id_repair: Mutex<()>,
    /// Bumped whenever an id file is about to go or was put back: an id
    /// read before that is not cached (it may be one the disk lost).
    id_gen: AtomicU64,
    /// The undo journal in the backing root (FORMAT.md, "The undo
    /// journal"); `None` when that name holds something else.
    journal: Option<Arc<Journal>>,
}

/// Whether `name` in the root of a plain-named mount is one of the mount's
/// own files, which users cannot see or make (with encrypted names no
/// entry can have these names).
fn reserved_plain_root_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b == JOURNAL_FILE.as_bytes() || b == names::ROOT_FILE.as_bytes() || b.starts_with(names::ROOT_TMP.as_bytes())
}

/// Extended attribute of a backing root that has only ever held format
/// version 2 files (value `"2"`). A `trusted.` name: only `CAP_SYS_ADMIN`
/// can set it, and the mount never passes `trusted.` names through.
pub const V2_ONLY_XATTR: &str = "trusted.kmsd.format";

/// Whether `dir` carries [`V2_ONLY_XATTR`] = "2"; if it has no attribute
/// and is empty, tries to set it (a fresh backing directory can only ever
/// get version 2 files from this release).
fn v2_only_marker(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let name = std::ffi::CString::new(V2_ONLY_XATTR).expect("no NUL");
    let mut value = [0u8; 8];
    // SAFETY: NUL-terminated path and name; `value` is writable for its length.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    if n >= 0 {
        return &value[..n as usize] == b"2";
    }
    let empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
    // SAFETY: NUL-terminated path and name; the value is a 1-byte slice.
    empty
        && unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                b"2".as_ptr().cast(),
                1,
                libc::XATTR_CREATE,
            )
        } == 0
}

/// Entries of the layout cache before it is cleared (bounds its memory).
const LAYOUT_CACHE_MAX: usize = 65_536;

impl std::fmt::Debug for EncryptedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedFs")
            .field("open_files", &self.open.lock().len())
            .finish_non_exhaustive()
    }
}

/// The id a directory had before its bookkeeping was cleared, to put
/// back when the removal or rename then fails.
#[derive(Debug)]
struct IdUndo(Option<DirId>);

impl IdUndo {
    fn restore(self, dir: &OwnedFd) {
        if let Some(id) = self.0 {
            let name = OsStr::new(names::DIR_ID_FILE);
            let point = "dirid.restore.before-rename";
            let _ = names::write_atomic(dir.as_fd(), "kmsd.dirid.tmp.", name, &id, true, point);
        }
    }
}

/// What mkdir, mknod or symlink made, for [`EncryptedFs::open_made`].
#[derive(Debug, Clone, Copy)]
enum Made<'a> {
    Dir,
    Node(SFlag),
    Symlink(&'a [u8]),
}

fn o_path() -> OFlag {
    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn stat_fd(fd: &OwnedFd) -> Result<FileStat> {
    Ok(fstat(fd)?)
}

fn stat_node(node: &Node) -> Result<FileStat> {
    let flags = AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW;
    Ok(fstatat(node.fd(), "", flags)?)
}

/// Clears S_ISUID, and S_ISGID when the group may execute, as the kernel
/// does when a caller without `CAP_FSETID` writes or truncates a file, or
/// anyone changes its owner. The mount asks the kernel to leave this to it
/// (`FUSE_HANDLE_KILLPRIV_V2`), which saves a `getxattr` round trip per
/// write.
fn kill_suidgid(node: &Node) -> Result<()> {
    let mode = stat_node(node)?.st_mode;
    let mut kill = libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        kill |= libc::S_ISGID;
    }
    if mode & kill == 0 {
        return Ok(());
    }
    let mode = Mode::from_bits_truncate((mode & !kill) & 0o7777);
    fchmodat(AT_FDCWD, &node.proc_path(), mode, FchmodatFlags::FollowSymlink)?;
    Ok(())
}

fn kind_of(mode: u32) -> FileType {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        SFlag::S_IFIFO => FileType::NamedPipe,
        SFlag::S_IFSOCK => FileType::Socket,
        SFlag::S_IFCHR => FileType::CharDevice,
        SFlag::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::new(0, nsec)
    }
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::from_duration(d),
            Err(e) => TimeSpec::new(-(e.duration().as_secs_f64().ceil() as i64), 0),
        },
    }
}

/// A `dev_t` from the kernel's 32-bit FUSE encoding (`new_encode_dev`:
/// minor low 8 bits, major next 12, minor's high bits above).
fn dev_from_fuse(rdev: u32) -> libc::dev_t {
    let major = (rdev >> 8) & 0xfff;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Sets a symlink's own times: `utimensat` on its `O_PATH` descriptor with
/// an empty path (`/proc/self/fd/N` would follow the link). Kernels whose
/// `utimensat` refuses `AT_EMPTY_PATH` answer `EINVAL`.
fn set_link_times(node: &Node, atime: &TimeSpec, mtime: &TimeSpec) -> Result<()> {
    let times = [*atime.as_ref(), *mtime.as_ref()];
    let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: the descriptor is open for the call, the path is a valid C
    // string and `times` holds the two timespecs utimensat reads.
    let ret = unsafe { libc::utimensat(node.fd().as_raw_fd(), c"".as_ptr(), times.as_ptr(), flags) };
    if ret != 0 {
        return Err(Error::Sys(nix::Error::last()));
    }
    Ok(())
}

/// The chain of causes of an error, for logs.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl EncryptedFs {
    /// A filesystem over `source` whose DEKs come from `keys`.
    ///
    /// # Errors
    /// `source` cannot be opened as a directory.
    pub fn new(source: &Path, keys: Arc<dyn KeySource>) -> Result<Self> {
        Self::with_fd_cache(source, keys, DEFAULT_FD_CACHE)
    }

    /// [`EncryptedFs::new`] caching at most `fd_cache` inode descriptors
    /// (see [`crate::inode`]).
    ///
    /// # Errors
    /// `source` cannot be opened as a directory.
    pub fn with_fd_cache(source: &Path, keys: Arc<dyn KeySource>, fd_cache: usize) -> Result<Self> {
        Self::with_options(source, keys, fd_cache, NameMode::Plain)
    }

    /// [`EncryptedFs::with_fd_cache`] with names per `names` (see
    /// [`NameMode`]).
    ///
    /// # Errors
    /// `source` cannot be opened as a directory; its `kmsd.names` is
    /// damaged or its key does not unwrap; `names` is plain but the
    /// directory has encrypted names.
    pub fn with_options(source: &Path, keys: Arc<dyn KeySource>, fd_cache: usize, names: NameMode) -> Result<Self> {
        let root = openat(AT_FDCWD, source, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())?;
        let st = stat_fd(&root)?;
        // Before the root file is made: an empty directory is version 2 only.
        let only_v2 = v2_only_marker(source);
        let name_keys = names::open_root(&root, keys.as_ref(), names != NameMode::Plain).map_err(|e| {
            tracing::error!(source = %source.display(), error = %describe(&e), "cannot use encrypted names");
            Error::Sys(nix::Error::EIO)
        })?;
        match (&name_keys, names) {
            (Some(_), NameMode::Plain) => {
                tracing::error!(source = %source.display(), "names = \"plain\" but the backing directory has encrypted names");
                return Err(Error::Sys(nix::Error::EINVAL));
            }
            (None, NameMode::Encrypted) => {
                tracing::error!(
                    source = %source.display(),
                    "names = \"encrypted\" but the backing directory holds files and no kmsd.names (a plain directory, \
                     or one whose name key was deleted): refusing to mount rather than write names in clear"
                );
                return Err(Error::Sys(nix::Error::EINVAL));
            }
            (None, NameMode::Auto) => tracing::error!(
                source = %source.display(),
                "backing directory holds files and no kmsd.names: names stay plain (if it had encrypted names, its \
                 kmsd.names was deleted: set names = \"encrypted\" to refuse; FORMAT.md, \"Converting a plain mount\")"
            ),
            _ => {}
        }
        // A read-only backing directory, say, has no journal: logged, and
        // the mount serves it as before (FORMAT.md, "The undo journal").
        let journal = Journal::open(&root, source)
            .unwrap_or_else(|e| {
                tracing::error!(source = %source.display(), error = %e, "cannot open the undo journal: running without it");
                None
            })
            .map(Arc::new);
        Ok(Self {
            journal,
            names: name_keys,
            dir_ids: Mutex::new(HashMap::new()),
            id_repair: Mutex::new(()),
            id_gen: AtomicU64::new(0),
            keys,
            rekey_at: crate::file::V1_REKEY_AT,
            nodes: InodeTable::new(root, &st, fd_cache),
            open: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_dir: AtomicU64::new(1),
            tamper: TamperLog::default(),
            stats: Arc::default(),
            layouts: Mutex::new(HashMap::new()),
            only_v2: AtomicBool::new(only_v2),
            source: source.to_path_buf(),
        })
    }

    /// A version 1 file turned up in a backing directory marked as holding
    /// only version 2 files: stop trusting the mark, and remove it.
    fn distrust_v2_mark(&self, file: &EncryptedFile) {
        if !self.only_v2.swap(false, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(path = %file.path().display(), "a format version 1 file in a backing directory marked as version 2 only; sizes now come from file headers");
        let path = std::ffi::CString::new(self.source.as_os_str().as_encoded_bytes());
        let name = std::ffi::CString::new(V2_ONLY_XATTR).expect("no NUL");
        if let Ok(path) = path {
            // SAFETY: NUL-terminated path and name.
            unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
        }
    }

    /// The counters of this filesystem (shared: they outlive it).
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Logs `e` (tampering once per backing path and rate limited, see
    /// [`crate::tamper`], but counted every time) and returns its errno.
    pub fn report(&self, op: &str, e: &Error) -> fuser::Errno {
        if let Some(path) = e.tamper_path() {
            self.stats.tamper_detected();
            self.tamper.warn(path, || {
                tracing::warn!(path = %path.display(), error = %describe(e), "{op}: refusing to serve tampered or undecryptable file");
            });
        } else if let Error::Key { .. } = e {
            tracing::warn!(error = %describe(e), "{op}: data key unavailable");
        } else if let Error::SealBudget { path } = e {
            self.tamper.warn(path, || {
                tracing::warn!(path = %path.display(), "{op}: a format version 1 file used up its nonce budget; copy it through the mount (the copy is version 2) to write it again");
            });
        } else {
            tracing::debug!(error = %describe(e), "{op} failed");
        }
        fuser::Errno::from(e)
    }

    /// A name, target or xattr that does not authenticate: counted, and
    /// logged once per backing path (rate limited).
    fn name_tampered(&self, path: &Path, what: &str) {
        self.stats.tamper_detected();
        self.tamper.warn(path, || {
            tracing::warn!(path = %path.display(), "{what} does not authenticate: tampered, or moved from another directory; ignored");
        });
    }

    /// The id of directory `ino` (its node `dir`). An empty directory
    /// without a valid id (a kill between the two steps of mkdir or
    /// rmdir) gets a new one; one with encrypted entries never does.
    fn dir_id(&self, keys: &NameKeys, ino: u64, dir: &Node) -> Result<DirId> {
        if ino == ROOT {
            return Ok(*keys.root_id());
        }
        if let Some(id) = self.dir_ids.lock().get(&ino) {
            return Ok(*id);
        }
        let gen = self.id_gen.load(Ordering::SeqCst);
        let id = match names::read_dir_id(dir.fd()) {
            Ok(id) => id,
            Err(nix::Error::ENOENT | nix::Error::EIO) => return self.repair_dir_id(ino, dir),
            Err(nix::Error::ENOTDIR) => return Err(Error::Sys(nix::Error::ENOTDIR)),
            Err(e) => return Err(e.into()),
        };
        self.cache_dir_id(ino, id, gen);
        Ok(id)
    }

    /// Caches `id`, read or written while the id generation was `gen`,
    /// unless an id file went or came back since.
    fn cache_dir_id(&self, ino: u64, id: DirId, gen: u64) {
        let mut ids = self.dir_ids.lock();
        if self.id_gen.load(Ordering::SeqCst) != gen {
            return;
        }
        if ids.len() >= LAYOUT_CACHE_MAX {
            ids.clear();
        }
        ids.insert(ino, id);
    }

    /// [`Self::dir_id`] of a directory whose id file is missing or
    /// damaged: a new id if it holds no entry, else `EIO` (logged). One
    /// repair at a time, reading the disk again under the lock: a repair
    /// that ran meanwhile is taken, never overwritten.
    fn repair_dir_id(&self, ino: u64, dir: &Node) -> Result<DirId> {
        let _repairing = self.id_repair.lock();
        // Removed while this waited (an rmdir holds the lock): nothing to
        // repair.
        if fstat(dir.fd())?.st_nlink == 0 {
            return Err(Error::Sys(nix::Error::ENOENT));
        }
        let gen = self.id_gen.load(Ordering::SeqCst);
        let tampered = |e: nix::Error| {
            self.name_tampered(&dir.backing_path().join(names::DIR_ID_FILE), "directory id");
            Error::Sys(if e == nix::Error::ENOENT { nix::Error::EIO } else { e })
        };
        let id = match names::read_dir_id(dir.fd()) {
            Ok(id) => id,
            Err(e @ (nix::Error::ENOENT | nix::Error::EIO)) => {
                if self.holds_entries(dir)? {
                    return Err(tampered(e));
                }
                fault::point("dirid.repair")?;
                let file = OsStr::new(names::DIR_ID_FILE);
                match nix::unistd::unlinkat(dir.fd(), file, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(nix::Error::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(path = %dir.backing_path().display(), "empty directory without an id (interrupted mkdir or rmdir): given a new one");
                names::write_dir_id(dir.fd())?
            }
            Err(e) => return Err(e.into()),
        };
        self.cache_dir_id(ino, id, gen);
        Ok(id)
    }

    /// Drops the cached id of the directory open as `dir` (its backing
    /// inode), before its id file is removed and after it was put back;
    /// ids being read meanwhile are not cached.
    fn forget_dir_id(&self, dir: &OwnedFd) -> Result<()> {
        let ino = self.nodes.ino_of(&stat_fd(dir)?);
        let mut ids = self.dir_ids.lock();
        self.id_gen.fetch_add(1, Ordering::SeqCst);
        if let Some(ino) = ino {
            ids.remove(&ino);
        }
        Ok(())
    }

    /// Puts back the id [`Self::clear_bookkeeping`] removed, after the
    /// removal or rename it was cleared for failed.
    fn undo_clear(&self, dir: &OwnedFd, undo: IdUndo) {
        undo.restore(dir);
        // Whether or not it is back, the disk is what the next use reads.
        let _ = self.forget_dir_id(dir);
    }

    /// Whether the backing directory holds any encrypted entry.
    fn holds_entries(&self, dir: &Node) -> Result<bool> {
        for item in std::fs::read_dir(dir.proc_path())? {
            if !matches!(names::classify(&item?.file_name()), Kind::Reserved) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The backing form of `name` in directory `ino` (`dir`).
    fn backing(&self, ino: u64, dir: &Node, name: &OsStr) -> Result<Backing> {
        let Some(keys) = &self.names else {
            if ino == ROOT && reserved_plain_root_name(name) {
                return Err(Error::Sys(nix::Error::EPERM));
            }
            return Ok(Backing::Short(name.to_os_string()));
        };
        let id = self.dir_id(keys, ino, dir)?;
        Ok(keys.encrypt_name(&id, name).map_err(nix::Error::from)?)
    }

    /// Writes the long-name part of `b` (if long) into `dir`: before the
    /// entry is made, so that a kill leaves at most an orphan part.
    fn write_part(dir: &Node, b: &Backing) -> Result<()> {
        if let Backing::Long { part, content, .. } = b {
            let point = "part.before-rename";
            names::write_atomic(dir.fd(), "kmsd.L.tmp.", part, content.as_bytes(), false, point)?;
        }
        Ok(())
    }

    /// Makes the entry of `b` with `make`, its long-name part (if long)
    /// first; if `make` fails and no entry has that name, the part goes
    /// again (a kill in between leaves an orphan part, which is ignored).
    ///
    /// `point` is the fault point between the two (long names only).
    fn with_part<T>(dir: &Node, b: &Backing, point: &str, make: impl FnOnce() -> nix::Result<T>) -> Result<T> {
        Self::write_part(dir, b)?;
        if b.part().is_some() {
            fault::point(point)?;
        }
        make().map_err(|e| {
            let gone = fstatat(dir.fd(), b.entry(), AtFlags::AT_SYMLINK_NOFOLLOW) == Err(nix::Error::ENOENT);
            if gone {
                Self::remove_part(dir, b);
            }
            Error::Sys(e)
        })
    }

    /// Removes the long-name part of `b` (if long) after its entry went.
    fn remove_part(dir: &Node, b: &Backing) {
        if let Some(part) = b.part() {
            let _ = nix::unistd::unlinkat(dir.fd(), part, UnlinkatFlags::NoRemoveDir);
        }
    }

    /// The plaintext name of the backing entry `entry` of directory `ino`,
    /// `None` for bookkeeping files and (logged) entries that do not
    /// authenticate.
    fn plain_name(&self, keys: &NameKeys, id: &DirId, dir: &Node, entry: &OsStr) -> Result<Option<OsString>> {
        let plain = match names::classify(entry) {
            Kind::Reserved => return Ok(None),
            Kind::Short(short) => keys.decrypt_name(id, short),
            Kind::Long(hash) => match names::read_small(dir.fd(), &names::part_of(entry), PART_MAX) {
                Ok(content) => keys.decrypt_long(id, hash, &content),
                // A missing or damaged part is tampering; running out of
                // descriptors or memory is not, and fails the listing
                // rather than shortening it.
                Err(nix::Error::ENOENT | nix::Error::EIO | nix::Error::ELOOP | nix::Error::EFBIG) => {
                    Err(names::NameError::Auth)
                }
                Err(e) => return Err(Error::Sys(e)),
            },
        };
        Ok(plain
            .inspect_err(|_| self.name_tampered(&dir.backing_path().join(entry), "name"))
            .ok())
    }

    fn attr(&self, ino: u64, st: &FileStat) -> FileAttr {
        let kind = kind_of(st.st_mode);
        let size = if kind == FileType::RegularFile {
            self.plain_size(ino, st.st_size as u64)
        } else if kind == FileType::Symlink && self.names.is_some() {
            names::target_plain_len(st.st_size as u64)
        } else {
            st.st_size as u64
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: format::BLOCK_SIZE as u32,
            flags: 0,
        }
    }

    /// The plaintext size: the open file's (exact while writes are in
    /// flight) or derived from the backing length and the file's format
    /// version (0 if either is invalid; reads will then fail with EIO).
    fn plain_size(&self, ino: u64, backing_len: u64) -> u64 {
        let open = self.open.lock().get(&ino).map(|e| e.file.clone());
        if let Some(file) = open {
            return file.size();
        }
        self.layout_of(ino)
            .and_then(|layout| layout.plain_len(backing_len).ok())
            .unwrap_or(0)
    }

    /// The format layout of regular file `ino`, from its header's first
    /// bytes on first use.
    fn layout_of(&self, ino: u64) -> Option<Layout> {
        if self.only_v2.load(Ordering::Relaxed) {
            return Some(Layout::V2);
        }
        if let Some(layout) = self.layouts.lock().get(&ino) {
            return Some(*layout);
        }
        let node = self.nodes.get(ino).ok()?;
        // The magic link names the node's own inode; no atime update where
        // we may avoid it (O_NOATIME needs ownership or CAP_FOWNER).
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let path = node.proc_path();
        let fd = nix::fcntl::open(&path, flags | OFlag::O_NOATIME, Mode::empty())
            .or_else(|_| nix::fcntl::open(&path, flags, Mode::empty()))
            .ok()?;
        let layout = crate::file::backing_layout(&File::from(fd))?;
        let mut layouts = self.layouts.lock();
        if layouts.len() >= LAYOUT_CACHE_MAX {
            layouts.clear();
        }
        layouts.insert(ino, layout);
        Some(layout)
    }

    /// Looks `name` up in `parent` and takes a kernel reference to it.
    ///
    /// # Errors
    /// Backing errors (`ENOENT` ...).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        self.stats.op(FsOp::Lookup);
        if parent == ROOT && self.names.is_none() && reserved_plain_root_name(name) {
            return Err(Error::Sys(nix::Error::ENOENT));
        }
        let node = self.nodes.get(parent)?;
        let b = self.backing(parent, &node, name)?;
        self.lookup_in(&node, b.entry())
    }

    /// Looks up an entry by its backing name (from [`DirEntry::backing`]).
    ///
    /// # Errors
    /// Backing errors (`ENOENT` ...).
    pub fn lookup_backing(&self, parent: u64, backing: &OsStr) -> Result<FileAttr> {
        self.stats.op(FsOp::Lookup);
        let parent = self.nodes.get(parent)?;
        self.lookup_in(&parent, backing)
    }

    fn lookup_in(&self, parent: &Node, name: &OsStr) -> Result<FileAttr> {
        let fd = openat(parent.fd(), name, o_path(), Mode::empty())?;
        let st = stat_fd(&fd)?;
        let ino = self.nodes.remember(fd, &st);
        Ok(self.attr(ino, &st))
    }

    /// Drops kernel references.
    pub fn forget(&self, ino: u64, n: u64) {
        self.nodes.forget(ino, n);
    }

    /// Attributes of `ino`.
    ///
    /// # Errors
    /// Unknown inode or backing errors.
    pub fn getattr(&self, ino: u64) -> Result<FileAttr> {
        self.stats.op(FsOp::Getattr);
        let node = self.nodes.get(ino)?;
        Ok(self.attr(ino, &stat_node(&node)?))
    }

    /// Applies `set` (owner first, so a later mode keeps its set-id bits).
    ///
    /// # Errors
    /// Backing errors; `EISDIR`/`EINVAL` for size on a non-file; data
    /// errors of the truncation.
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> Result<FileAttr> {
        let node = self.nodes.get(ino)?;
        if set.uid.is_some() || set.gid.is_some() {
            let flags = AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW;
            let (uid, gid) = (set.uid.map(Uid::from_raw), set.gid.map(Gid::from_raw));
            fchownat(node.fd(), "", uid, gid, flags)?;
            // A change of owner or group drops the set-id bits of a file,
            // for every caller, as on ext4.
            if !node.is_symlink() && kind_of(stat_node(&node)?.st_mode) != FileType::Directory {
                kill_suidgid(&node)?;
            }
        }
        if let (Some(mode), false) = (set.mode, node.is_symlink()) {
            let mode = Mode::from_bits_truncate(mode & 0o7777);
            fchmodat(AT_FDCWD, &node.proc_path(), mode, FchmodatFlags::FollowSymlink)?;
        }
        if let Some(size) = set.size {
            if set.kill_suidgid {
                kill_suidgid(&node)?;
            }
            self.truncate(ino, &node, size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let (a, m) = (timespec(set.atime), timespec(set.mtime));
            if node.is_symlink() {
                set_link_times(&node, &a, &m)?;
            } else {
                utimensat(AT_FDCWD, &node.proc_path(), &a, &m, UtimensatFlags::FollowSymlink)?;
            }
        }
        self.getattr(ino)
    }

    fn truncate(&self, ino: u64, node: &Node, size: u64) -> Result<()> {
        if !node.is_file() {
            return Err(Error::Sys(nix::Error::EINVAL));
        }
        let file = self.acquire(ino)?;
        let result = file.truncate(size);
        self.release(ino);
        result
    }

    /// Target of a symlink.
    ///
    /// # Errors
    /// Not a symlink, or backing errors.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let node = self.nodes.get(ino)?;
        let target = nix::fcntl::readlinkat(node.fd(), "")?.into_vec();
        let Some(keys) = &self.names else {
            return Ok(target);
        };
        keys.decrypt_target(&target).map_err(|e| {
            self.name_tampered(&node.backing_path(), "symlink target");
            Error::Sys(e.into())
        })
    }

    /// Gives the node behind `fd`, which root just created, to the caller
    /// and sets its exact mode (the kernel already applied the caller's
    /// umask; ours must not count), then takes the kernel's reference to
    /// it. Everything goes through `fd`: a name looked up again could have
    /// been swapped by anyone who can write into the backing directory.
    fn adopt(&self, caller: Caller, parent: &Node, fd: OwnedFd, mode: Option<u32>) -> Result<FileAttr> {
        let parent_st = stat_node(parent)?;
        let setgid_parent = parent_st.st_mode & libc::S_ISGID != 0;
        if caller.uid != 0 || caller.gid != 0 {
            let gid = (!setgid_parent).then(|| Gid::from_raw(caller.gid));
            let flags = AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW;
            fchownat(&fd, "", Some(Uid::from_raw(caller.uid)), gid, flags)?;
        }
        let st = stat_fd(&fd)?;
        if let Some(mut mode) = mode {
            if kind_of(st.st_mode) == FileType::Directory && setgid_parent {
                mode |= libc::S_ISGID;
            }
            // Names the inode behind `fd`, not a path in the backing dir.
            let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            let mode = Mode::from_bits_truncate(mode & 0o7777);
            fchmodat(AT_FDCWD, &path, mode, FchmodatFlags::FollowSymlink)?;
        }
        let st = stat_fd(&fd)?;
        let ino = self.nodes.remember(fd, &st);
        Ok(self.attr(ino, &st))
    }

    /// Opens `name`, which mkdir, mknod or symlink just made in `parent`,
    /// as `O_PATH` without following it, and checks on that descriptor that
    /// it is what was made: its type, owned by our euid, permissions within
    /// those it was made with, and for a directory empty, otherwise one
    /// link (and for a symlink, its target). These cannot create and open
    /// in one step, so the name could have been swapped in between; then
    /// this logs and fails with `EIO`, and nothing is changed.
    fn open_made(&self, parent: &Node, name: &OsStr, made: Made<'_>) -> Result<OwnedFd> {
        let resolve = ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_NO_XDEV;
        let fd = match openat2(parent.fd(), name, OpenHow::new().flags(o_path()).resolve(resolve)) {
            Err(nix::Error::ENOSYS) => openat(parent.fd(), name, o_path(), Mode::empty())?,
            fd => fd?,
        };
        let st = stat_fd(&fd)?;
        let (kind, perm) = match made {
            Made::Dir => (SFlag::S_IFDIR, 0o700 | libc::S_ISGID),
            Made::Node(kind) => (kind, 0o600),
            Made::Symlink(_) => (SFlag::S_IFLNK, 0o777),
        };
        let ours = st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
            && st.st_uid == nix::unistd::geteuid().as_raw()
            && st.st_mode & 0o7777 & !perm == 0
            && match made {
                Made::Dir => {
                    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
                    std::fs::read_dir(path)?.next().is_none()
                }
                Made::Node(_) => st.st_nlink == 1,
                Made::Symlink(target) => st.st_nlink == 1 && nix::fcntl::readlinkat(&fd, "")?.as_bytes() == target,
            };
        if !ours {
            let path = parent.backing_path().join(name);
            tracing::warn!(path = %path.display(), "a node just created was replaced before it was given to its owner; left as it is");
            return Err(Error::Sys(nix::Error::EIO));
        }
        Ok(fd)
    }

    /// Creates a directory.
    ///
    /// # Errors
    /// Backing errors.
    pub fn mkdir(&self, caller: Caller, parent: u64, name: &OsStr, mode: u32) -> Result<FileAttr> {
        self.stats.op(FsOp::Mkdir);
        let parent_ino = parent;
        let parent = self.nodes.get(parent)?;
        let b = self.backing(parent_ino, &parent, name)?;
        Self::with_part(&parent, &b, "mkdir.after-part", || {
            nix::sys::stat::mkdirat(parent.fd(), b.entry(), Mode::from_bits_truncate(0o700))
        })?;
        fault::point("mkdir.after-entry")?;
        let fd = self.open_made(&parent, b.entry(), Made::Dir)?;
        // A kill before the id is written leaves an empty directory
        // without one, which gets an id when first needed.
        let gen = self.id_gen.load(Ordering::SeqCst);
        let id = match self.names {
            Some(_) => Some(names::write_dir_id(fd.as_fd())?),
            None => None,
        };
        fault::point("mkdir.after-id")?;
        let attr = self.adopt(caller, &parent, fd, Some(mode))?;
        if let Some(id) = id {
            self.cache_dir_id(attr.ino.0, id, gen);
        }
        Ok(attr)
    }

    /// Creates a fifo, socket, device node or (empty, encrypted) regular
    /// file. `rdev` is the device number in the kernel's FUSE encoding.
    ///
    /// Devices are made as on ext4: the kernel sends the request only for
    /// callers with `CAP_MKNOD`, and the mount is `nodev`, so the node is
    /// inert there. (The backing directory is not `nodev`; it is the
    /// daemon's and only root should reach it.)
    ///
    /// # Errors
    /// Backing or key errors (`EPERM` if the daemon lacks `CAP_MKNOD`).
    pub fn mknod(&self, caller: Caller, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> Result<FileAttr> {
        let kind = SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFREG {
            let (attr, fh) = self.create(caller, parent, name, mode)?;
            self.release(fh);
            return Ok(attr);
        }
        let dev = match kind {
            SFlag::S_IFIFO | SFlag::S_IFSOCK => 0,
            SFlag::S_IFCHR | SFlag::S_IFBLK => dev_from_fuse(rdev),
            _ => return Err(Error::Sys(nix::Error::EINVAL)),
        };
        let parent_ino = parent;
        let parent = self.nodes.get(parent)?;
        let b = self.backing(parent_ino, &parent, name)?;
        Self::with_part(&parent, &b, "mknod.after-part", || {
            mknodat(parent.fd(), b.entry(), kind, Mode::from_bits_truncate(0o600), dev)
        })?;
        let fd = self.open_made(&parent, b.entry(), Made::Node(kind))?;
        self.adopt(caller, &parent, fd, Some(mode))
    }

    /// Creates a symlink.
    ///
    /// # Errors
    /// Backing errors.
    pub fn symlink(&self, caller: Caller, parent: u64, name: &OsStr, target: &Path) -> Result<FileAttr> {
        let parent_ino = parent;
        let parent = self.nodes.get(parent)?;
        let b = self.backing(parent_ino, &parent, name)?;
        let target = match &self.names {
            Some(keys) => keys
                .encrypt_target(target.as_os_str().as_bytes())
                .map_err(nix::Error::from)?,
            None => target.as_os_str().as_bytes().to_vec(),
        };
        Self::with_part(&parent, &b, "symlink.after-part", || {
            nix::unistd::symlinkat(OsStr::from_bytes(&target), parent.fd(), b.entry())
        })?;
        let fd = self.open_made(&parent, b.entry(), Made::Symlink(&target))?;
        self.adopt(caller, &parent, fd, None)
    }

    /// Removes a non-directory. An open file stays readable through its
    /// descriptor until the last release.
    ///
    /// # Errors
    /// Backing errors.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.stats.op(FsOp::Unlink);
        let parent_ino = parent;
        let parent = self.nodes.get(parent)?;
        let b = self.backing(parent_ino, &parent, name)?;
        let gone = self.before_removal(&parent, b.entry());
        nix::unistd::unlinkat(parent.fd(), b.entry(), UnlinkatFlags::NoRemoveDir)?;
        self.after_removal(&parent, gone);
        if b.part().is_some() {
            fault::point("unlink.after-entry")?;
        }
        Self::remove_part(&parent, &b);
        Ok(())
    }

    /// What an unlink of, or a rename over, the entry `name` of `dir` may
    /// take the last link of, read before it: the FUSE inode if the kernel
    /// knows it (its cached descriptor must then not keep the space, see
    /// [`InodeTable::uncache_if_unlinked`]), and, if undo journal records
    /// of its backing inode wait, the file opened and its id (the records
    /// of a deleted file are never resolved by an open: see
    /// [`Journal::forget_file`]).
    fn before_removal(&self, dir: &Node, name: &OsStr) -> Removal {
        let Ok(st) = fstatat(dir.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            return Removal::default();
        };
        let journaled = st.st_mode & libc::S_IFMT == libc::S_IFREG
            && self.journal.as_ref().is_some_and(|j| j.has_pending_inode(st.st_ino));
        Removal {
            ino: self.nodes.ino_of(&st),
            file: journaled.then(|| Self::file_and_id(dir, name, &st)).flatten(),
        }
    }

    /// The regular file `name` of `dir`, if it is still the inode of `st`,
    /// and its file id. Opened as `O_PATH` first and reopened only as that
    /// regular file ([`crate::admin::reopen_regular`]): a link, FIFO or
    /// device swapped in is never opened.
    fn file_and_id(dir: &Node, name: &OsStr, st: &FileStat) -> Option<(File, crate::keys::FileId)> {
        let entry = crate::admin::open_entry(dir.fd(), name).ok()?;
        let now = fstat(&entry).ok()?;
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
            return None;
        }
        let file = crate::admin::reopen_regular(entry.as_fd(), false).ok()?;
        let mut bytes = vec![0u8; format::HEADER_LEN];
        let n = crate::file::read_up_to(&file, &mut bytes, 0).ok()?;
        let id = format::Header::decode(&bytes[..n]).ok()?.file_id;
        Some((file, id))
    }

    /// After the removal `r` from `dir` (whether it succeeded or not): if
    /// it took the last link, the inode's cached descriptor closes and its
    /// journal records go, after the removal is made durable (`dir`
    /// fsynced): a durable record cleared before a power cut that brings
    /// the file back would leave that file's torn block unrepaired.
    fn after_removal(&self, dir: &Node, r: Removal) {
        if let Some((file, id)) = r.file {
            if let (Ok(st), Some(journal)) = (fstat(&file), &self.journal) {
                if journal.covers(file.as_fd()) {
                    // Every removal of a name of a file with records is
                    // made durable, not only the last: on a filesystem
                    // with per-file logs an earlier one could otherwise
                    // come back after a power cut without the records.
                    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
                    let synced = openat(dir.fd(), ".", flags, Mode::empty())
                        .map_err(std::io::Error::from)
                        .and_then(|d| File::from(d).sync_all());
                    match synced {
                        Ok(()) if st.st_nlink == 0 => journal.forget_file(&id, st.st_ino),
                        Ok(()) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot fsync a directory: the journal records of a file deleted from it stay")
                        }
                    }
                }
            }
        }
        if let Some(ino) = r.ino {
            self.nodes.uncache_if_unlinked(ino);
        }
    }

    /// Removes an empty directory.
    ///
    /// # Errors
    /// Backing errors.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.stats.op(FsOp::Rmdir);
        let parent_ino = parent;
        let parent = self.nodes.get(parent)?;
        let b = self.backing(parent_ino, &parent, name)?;
        if self.names.is_none() {
            nix::unistd::unlinkat(parent.fd(), b.entry(), UnlinkatFlags::RemoveDir)?;
            return Ok(());
        }
        let dir = crate::admin::open_entry(parent.fd(), b.entry())?;
        if kind_of(fstat(&dir)?.st_mode) != FileType::Directory {
            return Err(Error::Sys(nix::Error::ENOTDIR));
        }
        // No repair of an id runs while the id is gone for this removal: a
        // listing of this directory meanwhile would give it a new id, and
        // the removal would then fail with ENOTEMPTY.
        let _no_repair = self.id_repair.lock();
        let undo = self.clear_bookkeeping(&dir)?;
        let removed = fault::point("rmdir.after-clear")
            .and_then(|()| nix::unistd::unlinkat(parent.fd(), b.entry(), UnlinkatFlags::RemoveDir));
        if let Err(e) = removed {
            self.undo_clear(&dir, undo);
            return Err(e.into());
        }
        if b.part().is_some() {
            fault::point("rmdir.after-entry")?;
        }
        Self::remove_part(&parent, &b);
        Ok(())
    }

    /// Empties a directory of the mount's bookkeeping (its id last) so
    /// that the backing `rmdir` or rename over it can succeed; `ENOTEMPTY`
    /// (and nothing removed) if it holds any entry. A kill in between
    /// leaves an empty directory without an id (FORMAT.md, "Directory
    /// ids").
    fn clear_bookkeeping(&self, dir: &OwnedFd) -> Result<IdUndo> {
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let listed = std::fs::read_dir(&path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<HashSet<OsString>>>()?;
        let present = |n: &OsStr| listed.contains(n);
        if !listed.iter().all(|n| names::removable(n, &present)) {
            return Err(Error::Sys(nix::Error::ENOTEMPTY));
        }
        let id = names::read_dir_id(dir.as_fd()).ok();
        let id_file = OsStr::new(names::DIR_ID_FILE);
        for name in listed.iter().filter(|n| n.as_os_str() != id_file) {
            let _ = nix::unistd::unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        // From here until the directory is gone (or its id restored) the
        // disk has no id: the cache must not answer with the old one.
        self.forget_dir_id(dir)?;
        fault::point("clear.before-id")?;
        match nix::unistd::unlinkat(dir, id_file, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(IdUndo(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames with `renameat2` flags (`NOREPLACE`, `EXCHANGE`).
    ///
    /// # Errors
    /// `EINVAL` for other flags (whiteouts), backing errors.
    pub fn rename(&self, from: (u64, &OsStr), to: (u64, &OsStr), flags: u32) -> Result<()> {
        self.stats.op(FsOp::Rename);
        let allowed = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        let flags = RenameFlags::from_bits(flags)
            .filter(|f| allowed.contains(*f))
            .ok_or(Error::Sys(nix::Error::EINVAL))?;
        let (old_dir, new_dir) = (self.nodes.get(from.0)?, self.nodes.get(to.0)?);
        let bf = self.backing(from.0, &old_dir, from.1)?;
        let bt = self.backing(to.0, &new_dir, to.1)?;
        let replaced = if flags.is_empty() {
            self.before_removal(&new_dir, bt.entry())
        } else {
            Removal::default()
        };
        let renamed = self.rename_entries(from, to, flags, (&old_dir, &new_dir), (&bf, &bt));
        self.after_removal(&new_dir, replaced);
        renamed
    }

    fn rename_entries(
        &self,
        from: (u64, &OsStr),
        to: (u64, &OsStr),
        flags: RenameFlags,
        (old_dir, new_dir): (&Node, &Node),
        (bf, bt): (&Backing, &Backing),
    ) -> Result<()> {
        if self.names.is_none() {
            nix::fcntl::renameat2(old_dir.fd(), bf.entry(), new_dir.fd(), bt.entry(), flags)?;
            return Ok(());
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        // Two links of one inode: rename(2) does nothing and succeeds, so
        // nothing else may happen either (removing the source's long-name
        // part would leave its entry unlisted).
        if flags.is_empty() {
            let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
            if let (Ok(a), Ok(b)) = (
                fstatat(old_dir.fd(), bf.entry(), nofollow),
                fstatat(new_dir.fd(), bt.entry(), nofollow),
            ) {
                if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) {
                    return Ok(());
                }
            }
        }
        // A rename over an empty directory: its bookkeeping goes first.
        let mut cleared = None;
        let mut _no_repair = None;
        if flags.is_empty() {
            let nofollow = AtFlags::AT_SYMLINK_NOFOLLOW;
            let is_dir = |dir: &Node, name: &OsStr| {
                fstatat(dir.fd(), name, nofollow).is_ok_and(|st| kind_of(st.st_mode) == FileType::Directory)
            };
            let same = from.0 == to.0 && bf.entry() == bt.entry();
            if !same && is_dir(new_dir, bt.entry()) && is_dir(old_dir, bf.entry()) {
                let target = crate::admin::open_entry(new_dir.fd(), bt.entry())?;
                // As in rmdir: no id repair until the rename or its undo.
                _no_repair = Some(self.id_repair.lock());
                let undo = self.clear_bookkeeping(&target)?;
                cleared = Some((target, undo));
            }
        }
        let renamed = || {
            fault::point(if cleared.is_some() {
                "rename.after-clear"
            } else {
                "rename.before-entry"
            })?;
            nix::fcntl::renameat2(old_dir.fd(), bf.entry(), new_dir.fd(), bt.entry(), flags)
        };
        let renamed = if exchange {
            renamed().map_err(Error::Sys)
        } else {
            Self::with_part(new_dir, bt, "rename.after-part", renamed)
        };
        if let Err(e) = renamed {
            if let Some((target, undo)) = cleared {
                self.undo_clear(&target, undo);
            }
            return Err(e);
        }
        let same_part = from.0 == to.0 && bf.part() == bt.part();
        if !exchange && !same_part && bf.part().is_some() {
            fault::point("rename.after-entry")?;
            Self::remove_part(old_dir, bf);
        }
        Ok(())
    }

    /// Adds a hard link to `ino` (same backing inode, so same header and DEK).
    ///
    /// # Errors
    /// Backing errors.
    pub fn link(&self, ino: u64, new_parent: u64, name: &OsStr) -> Result<FileAttr> {
        let node = self.nodes.get(ino)?;
        let parent = self.nodes.get(new_parent)?;
        let b = self.backing(new_parent, &parent, name)?;
        let follow = AtFlags::AT_SYMLINK_FOLLOW;
        Self::with_part(&parent, &b, "link.after-part", || {
            nix::unistd::linkat(AT_FDCWD, &node.proc_path(), parent.fd(), b.entry(), follow)
        })?;
        self.lookup_in(&parent, b.entry())
    }

    /// Creates and opens a new encrypted file; returns its attributes and
    /// file handle.
    ///
    /// # Errors
    /// Backing errors or the key source refusing a new DEK (the half-made
    /// backing file is removed).
    pub fn create(&self, caller: Caller, parent: u64, name: &OsStr, mode: u32) -> Result<(FileAttr, u64)> {
        self.stats.op(FsOp::Create);
        let parent_ino = parent;
        let parent = self.nodes.get(parent)?;
        let b = self.backing(parent_ino, &parent, name)?;
        let name = b.entry();
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let fd = Self::with_part(&parent, &b, "create.after-part", || {
            openat(parent.fd(), name, flags, Mode::from_bits_truncate(0o600))
        })?;
        fault::point("create.after-entry")?;
        let made = stat_fd(&fd)?;
        let result = self.init_created(caller, &parent, File::from(fd), mode);
        if result.is_err() {
            // Only while the name still holds the file made above (this
            // narrows, but cannot close, the window for a swap).
            let still = openat(parent.fd(), name, o_path(), Mode::empty()).and_then(|fd| fstat(&fd));
            if still.is_ok_and(|st| (st.st_dev, st.st_ino) == (made.st_dev, made.st_ino)) {
                let _ = nix::unistd::unlinkat(parent.fd(), name, UnlinkatFlags::NoRemoveDir);
                // The entry is gone, so its long-name part goes too (the
                // kernel holds the directory: no other create of this name
                // runs meanwhile). Left behind, parts would pile up.
                Self::remove_part(&parent, &b);
            }
        }
        result
    }

    fn init_created(&self, caller: Caller, parent: &Node, file: File, mode: u32) -> Result<(FileAttr, u64)> {
        // The file itself, by its descriptor (`/proc/self/fd/N` names the
        // inode): O_PATH for the inode table.
        let proc = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let fd = openat(AT_FDCWD, &proc, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())?;
        let (made, held) = (fstat(&file)?, stat_fd(&fd)?);
        if (made.st_dev, made.st_ino) != (held.st_dev, held.st_ino) {
            return Err(Error::Sys(nix::Error::EIO));
        }
        let encrypted = EncryptedFile::create(file, self.keys.as_ref())?.with_journal(self.journal.clone());
        let attr = self.adopt(caller, parent, fd, Some(mode))?;
        let ino = attr.ino.0;
        let node = self.nodes.get(ino).inspect_err(|_| self.nodes.forget(ino, 1))?;
        let mut open = self.open.lock();
        let entry = open.entry(ino).or_insert_with(|| OpenEntry {
            file: Arc::new(encrypted),
            handles: 0,
            node,
        });
        entry.handles += 1;
        Ok((attr, ino))
    }

    /// Opens `ino`; the handle is the inode number (one shared
    /// [`EncryptedFile`] per inode).
    ///
    /// # Errors
    /// Not a regular file, a damaged header, or no DEK.
    pub fn open(&self, ino: u64) -> Result<u64> {
        self.stats.op(FsOp::Open);
        self.acquire(ino)?;
        Ok(ino)
    }

    /// The open file of `ino`, unwrapping its DEK on first open, plus one
    /// handle.
    fn acquire(&self, ino: u64) -> Result<Arc<EncryptedFile>> {
        if let Some(file) = self.reuse(ino) {
            return Ok(file);
        }
        let gate = self.opening.lock().entry(ino).or_default().clone();
        let result = {
            let mut failed = gate.lock();
            match (self.reuse(ino), *failed) {
                (Some(file), _) => Ok(file),
                (None, Some(errno)) => Err(Error::Sys(nix::Error::from_raw(errno))),
                (None, None) => {
                    let result = self.open_fresh(ino);
                    if let Err(e) = &result {
                        *failed = Some(e.errno());
                    }
                    result
                }
            }
        };
        let mut opening = self.opening.lock();
        // The map's and this one: nobody else waits at this gate.
        if Arc::strong_count(&gate) == 2 {
            opening.remove(&ino);
        }
        result
    }

    /// The open file of `ino`, if there is one, with one more handle.
    fn reuse(&self, ino: u64) -> Option<Arc<EncryptedFile>> {
        let mut open = self.open.lock();
        let entry = open.get_mut(&ino)?;
        entry.handles += 1;
        self.stats.dek_cache(true);
        Some(entry.file.clone())
    }

    fn open_fresh(&self, ino: u64) -> Result<Arc<EncryptedFile>> {
        let node = self.nodes.get(ino)?;
        if !node.is_file() {
            return Err(Error::Sys(nix::Error::EISDIR));
        }
        let path = node.proc_path();
        let file = OpenOptions::new().read(true).write(true).open(&path);
        let file = file.or_else(|_| File::open(&path))?;
        let fresh = EncryptedFile::open_journaled(file, self.keys.as_ref(), self.journal.clone())?
            .with_key_changes(self.keys.clone())
            .with_rekey_at(self.rekey_at);
        if fresh.layout() != Layout::V2 {
            self.distrust_v2_mark(&fresh);
        }
        self.stats.dek_cache(false);
        let mut open = self.open.lock();
        let entry = open.entry(ino).or_insert_with(|| OpenEntry {
            file: Arc::new(fresh),
            handles: 0,
            node,
        });
        entry.handles += 1;
        Ok(entry.file.clone())
    }

    /// Drops one handle; the DEK goes with the last.
    pub fn release(&self, ino: u64) {
        let mut open = self.open.lock();
        if let Some(entry) = open.get_mut(&ino) {
            entry.handles -= 1;
            if entry.handles == 0 {
                // The file goes (and saves its key change walk) under the
                // lock, so that a next open of the inode finds it gone.
                let Some(node) = open.remove(&ino).map(|closed| closed.node) else {
                    return;
                };
                drop(open);
                // The last close of a file with no name left: its space
                // comes back now, not when the kernel forgets the inode.
                if fstat(node.fd()).is_ok_and(|st| st.st_nlink == 0) {
                    drop(node);
                    self.nodes.uncache_if_unlinked(ino);
                }
            }
        }
    }

    fn opened(&self, ino: u64) -> Result<Arc<EncryptedFile>> {
        let open = self.open.lock();
        let entry = open.get(&ino).ok_or(Error::Sys(nix::Error::EBADF))?;
        Ok(entry.file.clone())
    }

    /// Reads plaintext.
    ///
    /// # Errors
    /// `EIO` on tampering, backing errors.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.stats.op(FsOp::Read);
        let data = self.opened(ino)?.read(offset, size)?;
        self.stats.read(data.len());
        Ok(data)
    }

    /// Writes plaintext; returns the bytes written (all of them).
    ///
    /// # Errors
    /// As [`EncryptedFs::read`].
    pub fn write(&self, ino: u64, offset: u64, data: &[u8], kill_setid: bool) -> Result<u32> {
        self.stats.op(FsOp::Write);
        if kill_setid {
            kill_suidgid(&*self.nodes.get(ino)?)?;
        }
        self.opened(ino)?.write(offset, data)?;
        self.stats.written(data.len());
        Ok(data.len() as u32)
    }

    /// Flushes an open file to stable storage.
    ///
    /// # Errors
    /// Backing `fsync` errors.
    pub fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        self.stats.op(FsOp::Fsync);
        self.opened(ino)?.sync(datasync)
    }

    /// Flushes a directory's entries (creates, renames, unlinks in it) to
    /// stable storage: `fsync` of the backing directory.
    ///
    /// # Errors
    /// Not a directory, or the backing `fsync` fails.
    pub fn fsyncdir(&self, ino: u64, datasync: bool) -> Result<()> {
        self.stats.op(FsOp::Fsync);
        let node = self.nodes.get(ino)?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let dir = File::from(openat(node.fd(), ".", flags, Mode::empty())?);
        if datasync {
            dir.sync_data()?;
        } else {
            dir.sync_all()?;
        }
        Ok(())
    }

    /// Snapshots a directory's entries; returns the handle.
    ///
    /// # Errors
    /// Backing errors.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        self.stats.op(FsOp::Readdir);
        let node = self.nodes.get(ino)?;
        let parent_ino = if ino == ROOT { ROOT } else { ino };
        let mut entries = vec![
            DirEntry {
                name: ".".into(),
                kind: FileType::Directory,
                ino,
                backing: ".".into(),
            },
            DirEntry {
                name: "..".into(),
                kind: FileType::Directory,
                ino: parent_ino,
                backing: "..".into(),
            },
        ];
        // The directory's id once, and its failure fails the listing: a
        // directory whose names cannot be read must not list as empty (a
        // sync or cleanup tool would act on that).
        let keys_and_id = match &self.names {
            None => None,
            Some(keys) => Some((keys, self.dir_id(keys, ino, &node)?)),
        };
        for item in std::fs::read_dir(node.proc_path())? {
            let item = item?;
            let backing = item.file_name();
            let name = match &keys_and_id {
                None if ino == ROOT && reserved_plain_root_name(&backing) => continue,
                None => backing.clone(),
                Some((keys, id)) => match self.plain_name(keys, id, &node, &backing)? {
                    Some(name) => name,
                    None => continue,
                },
            };
            let kind = FileType::from_std(item.file_type()?).unwrap_or(FileType::RegularFile);
            entries.push(DirEntry {
                name,
                kind,
                ino: item.ino(),
                backing,
            });
        }
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// The snapshot of an open directory.
    ///
    /// # Errors
    /// `EBADF` for an unknown handle.
    pub fn dir_entries(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        let dirs = self.dirs.lock();
        dirs.get(&fh).cloned().ok_or(Error::Sys(nix::Error::EBADF))
    }

    /// Forgets a directory snapshot.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    /// Statistics of the backing filesystem.
    ///
    /// # Errors
    /// Backing errors.
    pub fn statfs(&self) -> Result<Statvfs> {
        let root = self.nodes.get(ROOT)?;
        Ok(fstatvfs(root.fd())?)
    }

    /// The longest name through the mount, for `statfs`: 255 with
    /// encrypted names (the long form holds any name on a backing
    /// filesystem with shorter ones), else the backing filesystem's.
    pub fn name_max(&self, backing: u64) -> u64 {
        match self.names {
            Some(_) => names::NAME_MAX as u64,
            None => backing,
        }
    }

    /// `access(2)` by mode bits (owner, group, other; supplementary groups
    /// are not known). Only used without `default_permissions`.
    ///
    /// # Errors
    /// `EACCES` when denied.
    pub fn access(&self, caller: Caller, ino: u64, mask: i32) -> Result<()> {
        let st = stat_node(&*self.nodes.get(ino)?)?;
        let want = (mask & 0o7) as u32;
        let granted = if caller.uid == 0 {
            let any_x = st.st_mode & 0o111 != 0 || kind_of(st.st_mode) == FileType::Directory;
            0o6 | if any_x { 0o1 } else { 0 }
        } else if caller.uid == st.st_uid {
            (st.st_mode >> 6) & 0o7
        } else if caller.gid == st.st_gid {
            (st.st_mode >> 3) & 0o7
        } else {
            st.st_mode & 0o7
        };
        if want & !granted != 0 {
            return Err(Error::Sys(nix::Error::EACCES));
        }
        Ok(())
    }

    /// `getxattr` for `user.*` names.
    ///
    /// # Errors
    /// See [`xattr::get`].
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>> {
        let node = self.nodes.get(ino)?;
        let Some(keys) = &self.names else {
            return xattr::get(&node.proc_path(), name, size);
        };
        let backing = keys.encrypt_xattr_name(name).map_err(|_| nix::Error::ENODATA)?;
        let sealed = xattr::get(&node.proc_path(), &backing, xattr::VALUE_MAX)?;
        let value = keys.open_xattr_value(&backing, &sealed).map_err(|e| {
            self.name_tampered(&node.backing_path(), "extended attribute value");
            nix::Error::from(e)
        })?;
        match size {
            0 => Ok(vec![0u8; value.len()]),
            n if (n as usize) < value.len() => Err(Error::Sys(nix::Error::ERANGE)),
            _ => Ok(value),
        }
    }

    /// `listxattr`, `user.*` names only.
    ///
    /// # Errors
    /// See [`xattr::list`].
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let node = self.nodes.get(ino)?;
        let list = xattr::list(&node.proc_path())?;
        let Some(keys) = &self.names else {
            return Ok(list);
        };
        let mut out = Vec::new();
        for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            match keys.decrypt_xattr_name(name) {
                Ok(plain) => {
                    out.extend_from_slice(&plain);
                    out.push(0);
                }
                Err(_) => self.name_tampered(&node.backing_path(), "extended attribute name"),
            }
        }
        Ok(out)
    }

    /// `setxattr` for `user.*` names.
    ///
    /// # Errors
    /// See [`xattr::set`].
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let node = self.nodes.get(ino)?;
        let Some(keys) = &self.names else {
            return xattr::set(&node.proc_path(), name, value, flags);
        };
        let backing = keys.encrypt_xattr_name(name).map_err(|_| nix::Error::ERANGE)?;
        let sealed = keys.seal_xattr_value(&backing, value).map_err(|_| nix::Error::E2BIG)?;
        xattr::set(&node.proc_path(), &backing, &sealed, flags)
    }

    /// `removexattr` for `user.*` names.
    ///
    /// # Errors
    /// See [`xattr::remove`].
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        let node = self.nodes.get(ino)?;
        let name = match &self.names {
            Some(keys) => keys.encrypt_xattr_name(name).map_err(|_| nix::Error::ENODATA)?,
            None => name.to_os_string(),
        };
        xattr::remove(&node.proc_path(), &name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MemoryKeySource;

    const ROOT_CALLER: Caller = Caller { uid: 0, gid: 0 };

    fn fs() -> (tempfile::TempDir, EncryptedFs) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        let fs = EncryptedFs::new(dir.path(), keys).unwrap();
        (dir, fs)
    }

    fn enc_fs() -> (tempfile::TempDir, Arc<MemoryKeySource>, EncryptedFs) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        let fs = EncryptedFs::with_options(dir.path(), keys.clone(), 16, NameMode::Encrypted).unwrap();
        (dir, keys, fs)
    }

    fn listing(fs: &EncryptedFs, ino: u64) -> Vec<OsString> {
        let dh = fs.opendir(ino).unwrap();
        let mut names: Vec<_> = fs.dir_entries(dh).unwrap().iter().map(|e| e.name.clone()).collect();
        fs.releasedir(dh);
        names.sort();
        names
    }

    /// Every name in the backing tree, recursively.
    fn backing_names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                out.extend(backing_names(&e.path()));
            }
        }
        out
    }

    #[test]
    fn encrypted_names_round_trip_and_hide_plaintext() {
        let (dir, _keys, fs) = enc_fs();
        assert!(dir.path().join(names::ROOT_FILE).exists());
        assert!(
            fs.only_v2.load(Ordering::Relaxed),
            "a new encrypted mount is version 2 only"
        );
        let long = "é".repeat(127) + "x";
        let d = fs
            .mkdir(ROOT_CALLER, ROOT, OsStr::new("MARKER-dir"), 0o755)
            .unwrap()
            .ino
            .0;
        let (f, fh) = fs.create(ROOT_CALLER, d, OsStr::new("MARKER-file"), 0o600).unwrap();
        fs.write(fh, 0, b"data", false).unwrap();
        fs.release(fh);
        let (_, fh) = fs.create(ROOT_CALLER, d, OsStr::new(&long), 0o600).unwrap();
        fs.release(fh);
        let target = Path::new("/MARKER/target");
        let ln = fs
            .symlink(ROOT_CALLER, ROOT, OsStr::new("MARKER-link"), target)
            .unwrap();
        assert_eq!(
            ln.size,
            target.as_os_str().len() as u64,
            "st_size is the plaintext length"
        );
        assert_eq!(fs.readlink(ln.ino.0).unwrap(), target.as_os_str().as_bytes());
        assert_eq!(listing(&fs, ROOT), [".", "..", "MARKER-dir", "MARKER-link"]);
        assert_eq!(
            listing(&fs, d),
            [
                OsString::from("."),
                "..".into(),
                "MARKER-file".into(),
                long.clone().into()
            ]
        );
        assert_eq!(fs.lookup(d, OsStr::new("MARKER-file")).unwrap().ino, f.ino);
        assert_eq!(fs.lookup(d, OsStr::new(&long)).unwrap().kind, FileType::RegularFile);
        let too_long = "x".repeat(256);
        assert_eq!(
            fs.lookup(d, OsStr::new(&too_long)).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        // Renames across directories, long to short and back.
        fs.rename((d, OsStr::new(&long)), (ROOT, OsStr::new("short")), 0)
            .unwrap();
        fs.rename((d, OsStr::new("MARKER-file")), (ROOT, OsStr::new(&long)), 0)
            .unwrap();
        assert_eq!(listing(&fs, d), [".", ".."]);
        let ino = fs.lookup(ROOT, OsStr::new(&long)).unwrap().ino.0;
        let fh = fs.open(ino).unwrap();
        assert_eq!(fs.read(fh, 0, 10).unwrap(), b"data");
        fs.release(fh);
        // xattrs
        fs.setxattr(ino, OsStr::new("user.MARKER"), b"MARKER-value", 0).unwrap();
        assert_eq!(fs.listxattr(ino).unwrap(), b"user.MARKER\0");
        assert_eq!(fs.getxattr(ino, OsStr::new("user.MARKER"), 0).unwrap().len(), 12);
        assert_eq!(
            fs.getxattr(ino, OsStr::new("user.MARKER"), 64).unwrap(),
            b"MARKER-value"
        );
        assert_eq!(
            fs.getxattr(ino, OsStr::new("user.MARKER"), 3).unwrap_err().errno(),
            libc::ERANGE
        );
        let all = backing_names(dir.path()).join("\n");
        assert!(!all.contains("MARKER") && !all.contains('é'), "{all}");
        // Long-name part cleaned up with its entry; the directory goes.
        fs.unlink(ROOT, OsStr::new(&long)).unwrap();
        fs.rmdir(ROOT, OsStr::new("MARKER-dir")).unwrap();
        let left = backing_names(dir.path());
        assert_eq!(left.len(), 4, "root file, journal, short, link: {left:?}");
        // A failed rename or create to a long name leaves no part behind.
        let e = fs.rename((ROOT, OsStr::new("absent")), (ROOT, OsStr::new(&long)), 0);
        assert_eq!(e.unwrap_err().errno(), libc::ENOENT);
        assert_eq!(
            fs.mkdir(ROOT_CALLER, 999, OsStr::new(&long), 0o755)
                .unwrap_err()
                .errno(),
            libc::ESTALE
        );
        assert_eq!(backing_names(dir.path()), left);
    }

    #[test]
    fn rmdir_refuses_non_empty_and_rename_replaces_empty_directories() {
        let (_dir, _keys, fs) = enc_fs();
        let a = fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("a"), 0o755).unwrap().ino.0;
        fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("b"), 0o755).unwrap();
        let (_, fh) = fs.create(ROOT_CALLER, a, OsStr::new("f"), 0o600).unwrap();
        fs.release(fh);
        assert_eq!(fs.rmdir(ROOT, OsStr::new("a")).unwrap_err().errno(), libc::ENOTEMPTY);
        assert_eq!(
            fs.rename((ROOT, OsStr::new("b")), (ROOT, OsStr::new("a")), 0)
                .unwrap_err()
                .errno(),
            libc::ENOTEMPTY
        );
        assert_eq!(listing(&fs, a), [".", "..", "f"], "target's id kept");
        fs.rename((ROOT, OsStr::new("a")), (ROOT, OsStr::new("b")), 0).unwrap();
        assert_eq!(listing(&fs, ROOT), [".", "..", "b"]);
        let moved = fs.lookup(ROOT, OsStr::new("b")).unwrap().ino.0;
        assert_eq!(listing(&fs, moved), [".", "..", "f"]);
    }

    /// A create whose key request fails removes its long name's part with
    /// the half-made entry: nothing is left in the backing directory.
    #[test]
    fn a_failed_create_of_a_long_name_leaves_no_part() {
        let (dir, keys, fs) = enc_fs();
        let before: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        keys.set_available(false);
        let long = "n".repeat(240);
        assert!(fs.create(ROOT_CALLER, ROOT, OsStr::new(&long), 0o600).is_err());
        keys.set_available(true);
        let after: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(before, after, "a part or entry was left behind");
    }

    #[test]
    fn an_empty_directory_without_id_gets_one_and_a_full_one_answers_eio() {
        let (dir, _keys, fs) = enc_fs();
        let d = fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("d"), 0o755).unwrap().ino.0;
        let (_, fh) = fs.create(ROOT_CALLER, d, OsStr::new("f"), 0o600).unwrap();
        fs.release(fh);
        fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("e"), 0o755).unwrap();
        drop(fs);
        // Remove both ids behind the mount's back (as a kill between the
        // steps of an rmdir would for the empty one).
        for id in walkdir_ids(dir.path()) {
            std::fs::remove_file(id).unwrap();
        }
        let fs = EncryptedFs::with_options(dir.path(), _keys, 16, NameMode::Encrypted).unwrap();
        let e = fs.lookup(ROOT, OsStr::new("e")).unwrap().ino.0;
        let (_, fh) = fs.create(ROOT_CALLER, e, OsStr::new("new"), 0o600).unwrap();
        fs.release(fh);
        assert_eq!(listing(&fs, e), [".", "..", "new"]);
        let d = fs.lookup(ROOT, OsStr::new("d")).unwrap().ino.0;
        assert_eq!(fs.lookup(d, OsStr::new("f")).unwrap_err().errno(), libc::EIO);
        assert!(fs.create(ROOT_CALLER, d, OsStr::new("g"), 0o600).is_err());
        // Never listed as empty: a sync or cleanup tool would act on that.
        assert_eq!(fs.opendir(d).unwrap_err().errno(), libc::EIO);
        assert!(fs.stats().snapshot().tamper_detections > 0);
    }

    fn walkdir_ids(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.push(e.path().join(names::DIR_ID_FILE));
            }
        }
        out
    }

    /// FORMAT.md, "The undo journal": in a plain mount the root names of
    /// the mount's own files cannot be seen, made or renamed onto (else a
    /// user could write into the journal, or make `kmsd.names` and turn
    /// the mount's names encrypted at its next start); elsewhere they are
    /// ordinary names.
    #[test]
    fn a_plain_mount_reserves_its_own_root_names() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        let fs = EncryptedFs::with_options(dir.path(), keys, 16, NameMode::Plain).unwrap();
        assert!(dir.path().join(JOURNAL_FILE).is_file(), "the journal is made");
        for name in [JOURNAL_FILE, names::ROOT_FILE, "kmsd.names.tmp.x"] {
            let n = OsStr::new(name);
            assert_eq!(fs.lookup(ROOT, n).unwrap_err().errno(), libc::ENOENT, "{name}");
            assert_eq!(
                fs.create(ROOT_CALLER, ROOT, n, 0o600).unwrap_err().errno(),
                libc::EPERM,
                "{name}"
            );
            assert_eq!(
                fs.mkdir(ROOT_CALLER, ROOT, n, 0o700).unwrap_err().errno(),
                libc::EPERM,
                "{name}"
            );
            let (_, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("mine"), 0o600).unwrap();
            fs.release(fh);
            let e = fs.rename((ROOT, OsStr::new("mine")), (ROOT, n), 0).unwrap_err();
            assert_eq!(e.errno(), libc::EPERM, "{name}");
            fs.unlink(ROOT, OsStr::new("mine")).unwrap();
        }
        assert_eq!(listing(&fs, ROOT), [".", ".."], "the journal is not listed");
        let sub = fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("sub"), 0o700).unwrap().ino.0;
        let (_, fh) = fs.create(ROOT_CALLER, sub, OsStr::new(JOURNAL_FILE), 0o600).unwrap();
        fs.release(fh);
        assert_eq!(listing(&fs, sub), [".", "..", JOURNAL_FILE]);
    }

    #[test]
    fn plain_setting_on_encrypted_dir_is_refused_and_a_full_plain_dir_stays_plain() {
        let (dir, keys, fs) = enc_fs();
        drop(fs);
        assert!(EncryptedFs::with_options(dir.path(), keys.clone(), 16, NameMode::Plain).is_err());
        let plain = tempfile::tempdir().unwrap();
        std::fs::create_dir(plain.path().join("old-dir")).unwrap();
        let fs = EncryptedFs::with_options(plain.path(), keys.clone(), 16, NameMode::Auto).unwrap();
        assert!(fs.names.is_none());
        assert!(!plain.path().join(names::ROOT_FILE).exists());
        assert_eq!(listing(&fs, ROOT), [".", "..", "old-dir"]);
        drop(fs);
        // Required: a directory with files but no name key is refused, so
        // deleting kmsd.names cannot turn a mount's new names plain.
        assert!(EncryptedFs::with_options(plain.path(), keys.clone(), 16, NameMode::Encrypted).is_err());
        let (enc, _, fs) = enc_fs();
        let (_, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("a"), 0o600).unwrap();
        fs.release(fh);
        drop(fs);
        std::fs::remove_file(enc.path().join(names::ROOT_FILE)).unwrap();
        assert!(EncryptedFs::with_options(enc.path(), keys.clone(), 16, NameMode::Encrypted).is_err());
        assert!(
            !enc.path().join(names::ROOT_FILE).exists(),
            "no new name key over old names"
        );
        // A fresh filesystem's root holds an empty lost+found: still new.
        let fresh = tempfile::tempdir().unwrap();
        std::fs::create_dir(fresh.path().join("lost+found")).unwrap();
        let fs = EncryptedFs::with_options(fresh.path(), keys, 16, NameMode::Encrypted).unwrap();
        assert!(fs.names.is_some());
    }

    #[test]
    fn create_write_read_and_plaintext_size() {
        let (dir, fs) = fs();
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("a"), 0o640).unwrap();
        assert_eq!(attr.perm, 0o640);
        assert_eq!(fs.write(fh, 5000, b"hello", false).unwrap(), 5);
        assert_eq!(fs.getattr(fh).unwrap().size, 5005);
        fs.release(fh);
        assert_eq!(fs.getattr(attr.ino.0).unwrap().size, 5005);
        let fh = fs.open(attr.ino.0).unwrap();
        assert_eq!(fs.read(fh, 4998, 100).unwrap(), b"\0\0hello");
        fs.release(fh);
        let backing = std::fs::read(dir.path().join("a")).unwrap();
        assert!(!backing.windows(5).any(|w| w == b"hello"));
    }

    fn marked(dir: &Path) -> bool {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let name = std::ffi::CString::new(V2_ONLY_XATTR).unwrap();
        // SAFETY: NUL-terminated path and name, no buffer (size query).
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) == 1 }
    }

    fn fixture_keys() -> Arc<MemoryKeySource> {
        let id = uuid::Uuid::from_u128(0x6b6d_7364_0000_4000_8000_0000_0000_0001);
        Arc::new(MemoryKeySource::from_versions(id, &[[0x11; 32], [0x22; 32]]))
    }

    fn copy_v1_fixture(dir: &Path, name: &str) {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/v1")
            .join(name);
        std::fs::copy(from, dir.join(name)).unwrap();
    }

    #[test]
    fn an_empty_backing_dir_is_marked_version_2_only_and_a_full_one_is_not() {
        let (dir, _fs) = fs();
        assert!(marked(dir.path()), "fresh backing dir gets the mark");
        let full = tempfile::tempdir().unwrap();
        copy_v1_fixture(full.path(), "multi");
        let fs = EncryptedFs::new(full.path(), fixture_keys()).unwrap();
        assert!(!marked(full.path()));
        let attr = fs.lookup(ROOT, OsStr::new("multi")).unwrap();
        assert_eq!(attr.size, 10_000, "size from the header's version");
    }

    #[test]
    fn a_version_1_file_in_a_marked_dir_removes_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let fs = EncryptedFs::new(dir.path(), fixture_keys()).unwrap();
        assert!(marked(dir.path()));
        copy_v1_fixture(dir.path(), "multi");
        let ino = fs.lookup(ROOT, OsStr::new("multi")).unwrap().ino.0;
        let fh = fs.open(ino).unwrap();
        assert_eq!(
            fs.read(fh, 0, 20_000).unwrap().len(),
            10_000,
            "contents always read right"
        );
        fs.release(fh);
        assert!(!marked(dir.path()), "the mark is gone");
        assert_eq!(fs.getattr(ino).unwrap().size, 10_000, "sizes come from headers again");
        assert!(!EncryptedFs::new(dir.path(), fixture_keys())
            .unwrap()
            .only_v2
            .load(Ordering::Relaxed));
    }

    /// The mount moves a version 1 file to a fresh DEK through its own
    /// writes (threshold lowered to 8 seals), and the file reads the same.
    #[test]
    fn a_mounted_version_1_file_moves_to_a_fresh_dek() {
        let dir = tempfile::tempdir().unwrap();
        copy_v1_fixture(dir.path(), "multi");
        let keys = fixture_keys();
        let mut fs = EncryptedFs::new(dir.path(), keys.clone()).unwrap();
        fs.rekey_at = 8;
        let blobs = || {
            let header = crate::format::Header::decode(&std::fs::read(dir.path().join("multi")).unwrap()).unwrap();
            header
                .slots
                .iter()
                .flatten()
                .map(|s| s.blob.clone())
                .collect::<Vec<_>>()
        };
        let before = blobs();
        let ino = fs.lookup(ROOT, OsStr::new("multi")).unwrap().ino.0;
        let fh = fs.open(ino).unwrap();
        let mut model = fs.read(fh, 0, 20_000).unwrap();
        for i in 0..20u8 {
            fs.write(fh, u64::from(i) * 100, &[i], false).unwrap();
            model[usize::from(i) * 100] = i;
        }
        fs.release(fh);
        let after = blobs();
        assert_eq!(after.len(), 2);
        assert!(after.iter().all(|b| !before.contains(b)), "both slots hold a new blob");
        let file =
            crate::file::EncryptedFile::open(std::fs::File::open(dir.path().join("multi")).unwrap(), keys.as_ref())
                .unwrap();
        assert_eq!(
            file.read(0, 20_000).unwrap(),
            model,
            "every block under the new DEK alone"
        );
    }

    /// A key source for races: an unwrap waits, once, for a signal (an open
    /// held in the middle), and fails while `away`; unwraps are counted.
    #[derive(Default)]
    struct HeldKeys {
        inner: MemoryKeySource,
        hold: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        away: std::sync::atomic::AtomicBool,
        unwraps: std::sync::atomic::AtomicUsize,
    }

    impl KeySource for HeldKeys {
        fn key_id(&self) -> uuid::Uuid {
            self.inner.key_id()
        }
        fn new_dek(
            &self,
            ctx: &kms_client::proto::Context,
        ) -> std::result::Result<(crate::keys::Dek, Vec<u8>), crate::keys::KeyError> {
            self.inner.new_dek(ctx)
        }
        fn unwrap_dek(
            &self,
            ctx: &kms_client::proto::Context,
            blob: &[u8],
        ) -> std::result::Result<crate::keys::Dek, crate::keys::KeyError> {
            self.unwraps.fetch_add(1, Ordering::SeqCst);
            let hold = self.hold.lock().take();
            if let Some(rx) = hold {
                let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
            }
            if self.away.load(Ordering::SeqCst) {
                return Err(crate::keys::KeyError::Unavailable("away".into()));
            }
            self.inner.unwrap_dek(ctx, blob)
        }
        fn rewrap(
            &self,
            ctx: &kms_client::proto::Context,
            blob: &[u8],
        ) -> std::result::Result<Vec<u8>, crate::keys::KeyError> {
            self.inner.rewrap(ctx, blob)
        }
        fn active_version(&self) -> std::result::Result<u32, crate::keys::KeyError> {
            self.inner.active_version()
        }
    }

    /// A file `f` holding `data`, on a filesystem whose next unwraps wait
    /// until the returned sender sends.
    #[allow(clippy::type_complexity)]
    fn held_open(
        data: &[u8],
    ) -> (
        tempfile::TempDir,
        Arc<HeldKeys>,
        Arc<EncryptedFs>,
        u64,
        std::sync::mpsc::Sender<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let keys = Arc::new(HeldKeys::default());
        let fs = Arc::new(EncryptedFs::new(dir.path(), keys.clone()).unwrap());
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("f"), 0o600).unwrap();
        fs.write(fh, 0, data, false).unwrap();
        fs.release(fh);
        *keys.hold.lock() = Some(rx);
        (dir, keys, fs, attr.ino.0, tx)
    }

    /// Issue 13 rule 3 (an open fails after the key timeout, never hangs):
    /// openers of one inode queued behind a first open whose key request
    /// fails get its error at once, rather than each waiting out its own
    /// timeout in turn (k openers would wait k timeouts).
    #[test]
    fn openers_waiting_for_a_failed_open_share_its_error() {
        let (_dir, keys, fs, ino, tx) = held_open(b"");
        keys.away.store(true, Ordering::SeqCst);
        keys.unwraps.store(0, Ordering::SeqCst);
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let fs = fs.clone();
                let t = std::thread::spawn(move || fs.open(ino).map(|_| ()).map_err(|e| e.errno()));
                std::thread::sleep(std::time::Duration::from_millis(50));
                t
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        tx.send(()).unwrap();
        for t in openers {
            assert_eq!(t.join().unwrap(), Err(libc::EIO));
        }
        assert_eq!(
            keys.unwraps.load(Ordering::SeqCst),
            1,
            "one key request for the four openers"
        );
    }

    /// Two opens of one inode at once: the second waits for the first and
    /// shares its file, so it never holds a state read before the first
    /// one's writes (before, it could open from the disk, wait, and be put
    /// in place after the first was written to and released, with a stale
    /// size: the appended bytes were then invisible through it).
    #[test]
    fn an_open_racing_another_open_and_a_write_shares_one_file() {
        let (_dir, _keys, fs, ino, tx) = held_open(b"first");
        // B: held inside its unwrap, after it read the file's size.
        let b = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.open(ino).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        // A: opens, appends and closes while B is held (before the fix),
        // or waits for B (after it).
        let a = {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let fh = fs.open(ino).unwrap();
                fs.write(fh, 5, b" second", false).unwrap();
                fs.release(fh);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        tx.send(()).unwrap();
        let fh = b.join().unwrap();
        a.join().unwrap();
        assert_eq!(fs.read(fh, 0, 100).unwrap(), b"first second");
        fs.release(fh);
    }

    #[test]
    fn fsyncdir_syncs_directories_and_refuses_files() {
        let (_dir, fs) = fs();
        let attr = fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("d"), 0o755).unwrap();
        fs.fsyncdir(ROOT, false).unwrap();
        fs.fsyncdir(attr.ino.0, true).unwrap();
        let (file, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("f"), 0o600).unwrap();
        fs.release(fh);
        assert_eq!(fs.fsyncdir(file.ino.0, false).unwrap_err().errno(), libc::ENOTDIR);
    }

    #[test]
    fn unlinked_open_file_stays_readable() {
        let (_dir, fs) = fs();
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("a"), 0o600).unwrap();
        fs.write(fh, 0, b"still here", false).unwrap();
        fs.unlink(ROOT, OsStr::new("a")).unwrap();
        assert_eq!(fs.read(fh, 0, 64).unwrap(), b"still here");
        assert_eq!(fs.getattr(attr.ino.0).unwrap().nlink, 0);
        fs.release(fh);
        assert!(fs.lookup(ROOT, OsStr::new("a")).is_err());
    }

    /// Descriptors of this process naming inodes under `dir` with no link
    /// left.
    fn deleted_fds(dir: &Path) -> Vec<PathBuf> {
        let prefix = dir.as_os_str().as_encoded_bytes();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| {
                let fd = e.ok()?.path();
                let target = std::fs::read_link(&fd).ok()?;
                let unlinked = std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&fd).ok()?) == 0;
                (unlinked && target.as_os_str().as_encoded_bytes().starts_with(prefix)).then_some(target)
            })
            .collect()
    }

    /// A deleted file's space comes back when its last name goes (or its
    /// last open closes), as on a local filesystem, not when the kernel
    /// forgets the inode: the descriptor cache keeps no deleted inode open.
    /// (A full backing filesystem stayed full after `rm` until a FORGET
    /// arrived.)
    #[test]
    fn a_deleted_file_keeps_no_descriptor_once_closed() {
        let (dir, fs) = fs();
        if !fs.nodes.uses_handles() {
            return; // descriptors are pinned without handles (not root)
        }
        let mut inos = Vec::new();
        for name in ["a", "b", "c", "t", "l"] {
            let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new(name), 0o600).unwrap();
            fs.write(fh, 0, &[7; 9000], false).unwrap();
            fs.release(fh);
            inos.push(attr.ino.0);
        }
        fs.link(inos[4], ROOT, OsStr::new("l2")).unwrap();
        fs.unlink(ROOT, OsStr::new("a")).unwrap();
        fs.rename((ROOT, OsStr::new("b")), (ROOT, OsStr::new("t")), 0).unwrap();
        fs.unlink(ROOT, OsStr::new("l")).unwrap();
        let fh = fs.open(inos[2]).unwrap();
        fs.unlink(ROOT, OsStr::new("c")).unwrap();
        assert_eq!(
            deleted_fds(dir.path()).len(),
            2,
            "the open file's two descriptors only: {:?}",
            deleted_fds(dir.path())
        );
        assert_eq!(fs.read(fh, 0, 10).unwrap(), [7; 10]);
        fs.release(fh);
        assert_eq!(deleted_fds(dir.path()), Vec::<PathBuf>::new());
        // A file with a link left keeps working through its cached entry.
        assert_eq!(fs.getattr(inos[4]).unwrap().nlink, 1);
    }

    /// Journal records of a file deleted (or replaced by a rename) before
    /// it was opened again are dropped, durable ones durably: no open can
    /// resolve them, and they used to keep their slots for good (durable
    /// ones across boots) until the journal filled and writes went on
    /// unprotected. A file with a link left keeps its records.
    #[test]
    fn journal_records_of_a_deleted_file_are_dropped() {
        let (dir, fs) = fs();
        let mut inos = HashMap::new();
        for name in ["f", "g", "r", "x"] {
            let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new(name), 0o600).unwrap();
            fs.write(fh, 0, b"data", false).unwrap();
            fs.release(fh);
            inos.insert(name, attr.ino.0);
        }
        fs.link(inos["g"], ROOT, OsStr::new("g2")).unwrap();
        drop(fs);
        // Records a kill left: for f an ordinary and a durable one, for g
        // and r a durable one each.
        let root = File::open(dir.path()).unwrap();
        let journal = Journal::open(&OwnedFd::from(root), dir.path()).unwrap().unwrap();
        for (name, durable) in [("f", false), ("f", true), ("g", true), ("r", true)] {
            let file = File::open(dir.path().join(name)).unwrap();
            let mut bytes = vec![0u8; format::HEADER_LEN];
            let n = crate::file::read_up_to(&file, &mut bytes, 0).unwrap();
            let record = crate::journal::Record {
                boot: [0; 16],
                file_id: format::Header::decode(&bytes[..n]).unwrap().file_id,
                ino: std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap()),
                old_len: 0,
                written: [(0, 0), (0, 0)],
                blocks: vec![(0, Vec::new())],
            };
            let slot = if durable {
                journal.begin_durable(&record)
            } else {
                journal.begin(&record)
            };
            // Never finished: the record stays, as after a kill.
            let _left = slot.unwrap().unwrap();
        }
        journal.sync().unwrap();
        drop(journal);

        let fs = EncryptedFs::new(dir.path(), Arc::new(MemoryKeySource::default())).unwrap();
        let pending = |fs: &EncryptedFs| fs.journal.as_ref().unwrap().usage().1;
        assert_eq!(pending(&fs), 4);
        for name in ["f", "g", "r", "x"] {
            fs.lookup(ROOT, OsStr::new(name)).unwrap();
        }
        fs.unlink(ROOT, OsStr::new("f")).unwrap();
        assert_eq!(pending(&fs), 2, "f's two records go");
        fs.unlink(ROOT, OsStr::new("g")).unwrap();
        assert_eq!(pending(&fs), 2, "g2 is still a link of g's inode");
        fs.rename((ROOT, OsStr::new("x")), (ROOT, OsStr::new("r")), 0).unwrap();
        assert_eq!(pending(&fs), 1, "r was replaced");
        drop(fs);
        let root = File::open(dir.path()).unwrap();
        let journal = Journal::open(&OwnedFd::from(root), dir.path()).unwrap().unwrap();
        assert_eq!(
            journal.usage().1,
            1,
            "the slots were cleared on disk, not only in memory"
        );
    }

    #[test]
    fn unlinked_open_file_outlives_the_descriptor_cache() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        let fs = EncryptedFs::with_fd_cache(dir.path(), keys, 1).unwrap();
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("a"), 0o600).unwrap();
        fs.write(fh, 0, b"still here", false).unwrap();
        fs.unlink(ROOT, OsStr::new("a")).unwrap();
        for name in ["b", "c", "d"] {
            let (_, other) = fs.create(ROOT_CALLER, ROOT, OsStr::new(name), 0o600).unwrap();
            fs.release(other);
        }
        let set = SetAttr {
            mode: Some(0o640),
            ..SetAttr::default()
        };
        let after = fs.setattr(attr.ino.0, &set).unwrap();
        assert_eq!((after.nlink, after.perm, after.size), (0, 0o640, 10));
        assert_eq!(fs.read(fh, 0, 64).unwrap(), b"still here");
        fs.release(fh);
        if fs.nodes.uses_handles() {
            // Closed and evicted: the deleted inode is gone.
            fs.lookup(ROOT, OsStr::new("b")).unwrap();
            assert!(fs.getattr(attr.ino.0).is_err());
        }
    }

    #[test]
    fn readdir_lists_entries_and_setattr_truncates() {
        let (_dir, fs) = fs();
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("f"), 0o600).unwrap();
        fs.write(fh, 0, &[7u8; 9000], false).unwrap();
        fs.release(fh);
        fs.mkdir(ROOT_CALLER, ROOT, OsStr::new("d"), 0o755).unwrap();
        let set = SetAttr {
            size: Some(10),
            mode: Some(0o604),
            ..SetAttr::default()
        };
        let after = fs.setattr(attr.ino.0, &set).unwrap();
        assert_eq!((after.size, after.perm), (10, 0o604));
        let dh = fs.opendir(ROOT).unwrap();
        let mut names: Vec<_> = fs.dir_entries(dh).unwrap().iter().map(|e| e.name.clone()).collect();
        names.sort();
        assert_eq!(names, [".", "..", "d", "f"]);
        fs.releasedir(dh);
    }

    #[test]
    fn tampering_is_logged_once_per_path_and_is_eio() {
        let (_dir, fs) = fs();
        let e = Error::Tampered {
            path: PathBuf::from("/backing/f"),
            source: format::FormatError::BlockAuth(0),
        };
        assert_eq!(fs.report("read", &e), fuser::Errno::EIO);
        assert_eq!(fs.report("read", &e), fuser::Errno::EIO);
        let later = std::time::Instant::now() + Duration::from_secs(5);
        let path = Path::new("/backing/f");
        assert_eq!(fs.tamper.admit(path, later), crate::tamper::Verdict::Repeat);
        assert_eq!(fs.stats().snapshot().tamper_detections, 2);
    }

    #[test]
    fn first_open_misses_the_dek_cache_later_opens_hit() {
        let (_dir, fs) = fs();
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("a"), 0o600).unwrap();
        fs.write(fh, 0, b"hello", false).unwrap();
        fs.release(fh);
        let ino = attr.ino.0;
        let (a, b) = (fs.open(ino).unwrap(), fs.open(ino).unwrap());
        assert_eq!(fs.read(a, 0, 64).unwrap(), b"hello");
        fs.release(a);
        fs.release(b);
        let s = fs.stats().snapshot();
        assert_eq!((s.dek_cache_misses, s.dek_cache_hits), (1, 1));
        assert_eq!((s.bytes_written, s.bytes_read), (5, 5));
        assert!(s.ops.contains(&("open", 2)) && s.ops.contains(&("create", 1)) && s.ops.contains(&("read", 1)));
    }
}

/// Removals and renames across backing mounts and hard links (from a
/// review of the journal's handling of deleted files).
#[cfg(test)]
mod removal_tests {
    use super::*;
    use crate::keys::MemoryKeySource;
    use std::os::unix::fs::MetadataExt;

    const ROOT_CALLER: Caller = Caller { uid: 0, gid: 0 };

    fn mount_tmpfs(at: &Path) {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs {}", at.display());
    }

    fn umount(at: &Path) {
        let _ = std::process::Command::new("umount").arg("-l").arg(at).status();
    }

    /// Records name a file by id and inode number, which another backing
    /// mount below the root (a btrfs snapshot or subvolume, a tmpfs) can
    /// repeat: deleting there a copy of a file with the same inode number
    /// dropped the original's records, which it still needed. Only files
    /// on the journal's own filesystem use it now.
    #[test]
    fn deleting_a_copy_on_another_mount_keeps_the_originals_records() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI needs root for this test");
            return;
        }
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        mount_tmpfs(&root);
        let sub = root.join("sub");
        std::fs::create_dir(&sub).unwrap();
        mount_tmpfs(&sub);
        let result = std::panic::catch_unwind(|| {
            let keys = Arc::new(MemoryKeySource::default());
            let fs = EncryptedFs::new(&root, keys.clone()).unwrap();
            let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("x"), 0o600).unwrap();
            fs.write(fh, 0, &[1; 9000], false).unwrap();
            fs.release(fh);
            let _ = attr;
            drop(fs);
            let x_ino = std::fs::metadata(root.join("x")).unwrap().ino();
            // A copy of x on the other mount with x's inode number.
            let mut i = 0;
            loop {
                let p = sub.join(format!("f{i}"));
                std::fs::write(&p, b"").unwrap();
                let ino = std::fs::metadata(&p).unwrap().ino();
                if ino == x_ino {
                    std::fs::copy(root.join("x"), &p).unwrap();
                    std::fs::rename(&p, sub.join("y")).unwrap();
                    break;
                }
                std::fs::remove_file(&p).unwrap();
                assert!(ino < x_ino, "cannot align inode numbers ({ino} > {x_ino})");
                i += 1;
            }
            assert_ne!(
                std::fs::metadata(root.join("x")).unwrap().dev(),
                std::fs::metadata(sub.join("y")).unwrap().dev()
            );
            // A record a kill left for x (the original).
            let rootfd = File::open(&root).unwrap();
            let journal = Journal::open(&OwnedFd::from(rootfd), &root).unwrap().unwrap();
            let file = File::open(root.join("x")).unwrap();
            let mut bytes = vec![0u8; format::HEADER_LEN];
            let n = crate::file::read_up_to(&file, &mut bytes, 0).unwrap();
            let record = crate::journal::Record {
                boot: [0; 16],
                file_id: format::Header::decode(&bytes[..n]).unwrap().file_id,
                ino: x_ino,
                old_len: 0,
                written: [(0, 0), (0, 0)],
                blocks: vec![(0, Vec::new())],
            };
            let _left = journal.begin_durable(&record).unwrap().unwrap();
            journal.sync().unwrap();
            drop(journal);

            let fs = EncryptedFs::new(&root, keys).unwrap();
            let pending = |fs: &EncryptedFs| fs.journal.as_ref().unwrap().usage().1;
            assert_eq!(pending(&fs), 1);
            let sub_ino = fs.lookup(ROOT, OsStr::new("sub")).unwrap().ino.0;
            let y = fs.lookup(sub_ino, OsStr::new("y")).unwrap().ino.0;
            // Opening the copy (same file id, same inode number) does not
            // resolve the original's records against it.
            let fh = fs.open(y).unwrap();
            fs.release(fh);
            assert_eq!(pending(&fs), 1, "the copy resolved the original's record");
            fs.unlink(sub_ino, OsStr::new("y")).unwrap();
            assert!(root.join("x").exists(), "the original is still there");
            assert_eq!(
                pending(&fs),
                1,
                "the original's record was dropped by deleting a copy on another mount"
            );
        });
        umount(&sub);
        umount(&root);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    /// Renaming a long name onto another link of the same inode does
    /// nothing, as rename(2) does: the source's long-name part used to be
    /// removed anyway, leaving its entry in the backing directory without a
    /// name (unlisted, never freed).
    #[test]
    fn a_rename_of_a_long_name_onto_its_own_hard_link_keeps_both_names() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        let fs = EncryptedFs::with_options(dir.path(), keys, 16, NameMode::Encrypted).unwrap();
        let long = "L".repeat(220);
        let (attr, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new(&long), 0o600).unwrap();
        fs.write(fh, 0, b"data", false).unwrap();
        fs.release(fh);
        fs.link(attr.ino.0, ROOT, OsStr::new("short")).unwrap();
        fs.rename((ROOT, OsStr::new(&long)), (ROOT, OsStr::new("short")), 0)
            .unwrap();
        // POSIX: both names still exist.
        assert!(fs.lookup(ROOT, OsStr::new("short")).is_ok());
        let dh = fs.opendir(ROOT).unwrap();
        let names: Vec<OsString> = fs.dir_entries(dh).unwrap().iter().map(|e| e.name.clone()).collect();
        fs.releasedir(dh);
        assert!(
            names.iter().any(|n| n == OsStr::new(&long)),
            "listing lost the long name: {names:?}; backing: {:?}",
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
        assert!(
            fs.lookup(ROOT, OsStr::new(&long)).is_ok(),
            "the long name lost its part; backing: {:?}",
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
    }

    /// An overlay's files report the device of the layer they came from: a
    /// file from a lower layer keeps that layer's device even once copied
    /// up, a new file has the upper layer's. Both are on the journal's
    /// filesystem (the overlay) and use it. `journal_in_lower`: the
    /// backing directory, journal included, was the lower layer (an image).
    fn overlay_covers(journal_in_lower: bool) -> (bool, bool) {
        let sh = |args: &[&str]| {
            let ok = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap()
                .success();
            assert!(ok, "{args:?}");
        };
        let t = tempfile::tempdir().unwrap();
        let (lo, up, m) = (t.path().join("lo"), t.path().join("up"), t.path().join("m"));
        for d in [&lo, &up, &m] {
            std::fs::create_dir(d).unwrap();
        }
        mount_tmpfs(&lo);
        mount_tmpfs(&up);
        std::fs::create_dir(up.join("u")).unwrap();
        std::fs::create_dir(up.join("w")).unwrap();
        let keys = Arc::new(MemoryKeySource::default());
        {
            let fs = EncryptedFs::new(&lo, keys.clone()).unwrap();
            let (_, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("old"), 0o600).unwrap();
            fs.write(fh, 0, &[1; 9000], false).unwrap();
            fs.release(fh);
        }
        if !journal_in_lower {
            std::fs::remove_file(lo.join(JOURNAL_FILE)).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},xino=off",
            lo.display(),
            up.join("u").display(),
            up.join("w").display()
        );
        sh(&["mount", "-t", "overlay", "overlay", "-o", &opts, m.to_str().unwrap()]);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let fs = EncryptedFs::new(&m, keys.clone()).unwrap();
            let journal = fs.journal.clone().expect("a journal on the overlay");
            let old = fs.lookup(ROOT, OsStr::new("old")).unwrap().ino.0;
            let fh = fs.open(old).unwrap(); // a writable open copies it up
            fs.write(fh, 10, &[2; 10], false).unwrap();
            fs.release(fh);
            let (_, fh) = fs.create(ROOT_CALLER, ROOT, OsStr::new("new"), 0o600).unwrap();
            fs.release(fh);
            let covered = |name: &str| journal.covers(File::open(m.join(name)).unwrap().as_fd());
            let dev = |name: &str| std::fs::metadata(m.join(name)).unwrap().dev();
            assert_ne!(
                dev("old"),
                dev("new"),
                "the layers' devices differ (what this test is about)"
            );
            (covered("old"), covered("new"))
        }));
        for d in [&m, &up, &lo] {
            umount(d);
        }
        result.unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    #[test]
    fn an_overlay_backing_directory_journals_files_of_every_layer() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI needs root for this test");
            return;
        }
        assert_eq!(overlay_covers(false), (true, true), "journal made on the overlay");
        assert_eq!(overlay_covers(true), (true, true), "journal from the lower layer");
    }
}
