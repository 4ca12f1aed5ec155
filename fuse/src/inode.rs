//! The inode table: FUSE inode numbers mapped to backing inodes, with a
//! bounded number of open descriptors.
//!
//! # Why file handles and a cache
//!
//! Operations act on backing inodes through `O_PATH` descriptors rather
//! than paths: renames (of the file or of any directory above it) and
//! unlinks then need no bookkeeping. But the kernel may keep any number of
//! FUSE inodes alive (it forgets them only under memory pressure), so one
//! descriptor per known inode is unbounded: a user creating 20,000 files
//! used up kmsd's descriptors, and key requests, served by the same
//! process, then failed with `EMFILE`.
//!
//! So each entry keeps, instead of a descriptor, the backing inode's kernel
//! *file handle* (`name_to_handle_at`), which names the inode (number and
//! generation) independently of any path, plus its `(dev, ino)` and mode.
//! Descriptors live only in a least-recently-used cache of
//! [`MountOptions::fd_cache`](crate::MountOptions::fd_cache) entries; a
//! miss reopens the inode with `open_by_handle_at` (which needs
//! `CAP_DAC_READ_SEARCH`, so root) and checks that `(dev, ino)` and the
//! file type still match. A handle that no longer opens (the inode was
//! deleted, or its number reused: the generation differs) answers `ESTALE`.
//!
//! A [`Node`] is handed out as an `Arc`: a caller holding it (for a `*at`
//! call or a `/proc/self/fd/N` path) keeps its descriptor open even if the
//! cache evicts the entry meanwhile, and the table hands the same `Node` to
//! other callers while anyone holds it. Open files hold their `Node` for as
//! long as they are open (see `crate::fs`), so an open file that has been
//! unlinked keeps answering `getattr`/`setattr` although its handle may
//! no longer open.
//!
//! A cached descriptor of an inode with no link left would keep its space
//! allocated on the backing filesystem (a full disk stayed full after `rm`
//! until the kernel forgot the inode). So the unlink or rename that takes
//! an inode's last name, and the last release of an open file with no name,
//! close its cached descriptor ([`InodeTable::uncache_if_unlinked`]).
//!
//! The descriptors held by the filesystem are therefore at most: the
//! cache's capacity; the root's two (its `O_PATH` descriptor and the
//! `mount_fd` of `open_by_handle_at`, which must not be `O_PATH`); one per
//! other backing mount below the root (registered when first met through
//! its root directory); those held by requests in flight (at most four per
//! serving thread: three, plus with encrypted names a directory-id or
//! long-name file being read or written); and two per open file (its `EncryptedFile` and its
//! pinned `Node`). The last term is what users hold open through the mount,
//! bounded by their own descriptor limits, not by what they create, plus
//! files users have closed whose `RELEASE` the kernel has not sent yet.
//! That second part has no bound: the kernel queues `RELEASE` as a
//! background request, without waiting and without limit, and sends at
//! most `max_background` (threads − 2) background requests at once, behind
//! the requests processes wait on. So many threads opening and closing
//! many distinct files can keep thousands of files open here: 128 threads
//! opening and closing 6,400 files in turn held up to 12,800 descriptors;
//! over 38,400 files they reached the 20,000 limit of the machine kmsd was
//! tested on, and opens through the mount failed with `EMFILE` until the
//! storm stopped (the queue then drained within seconds). kmsd's own descriptors are in another process
//! (ARCHITECTURE.md, "Processes"), so key requests are not
//! affected. gocryptfs, which also holds a descriptor per open file, is
//! exposed the same way. The table's entries themselves (a handle of at most 128 bytes, usually 8 to
//! 12, and some bookkeeping) are memory only, as many as inodes the kernel
//! knows.
//!
//! # Where handles do not work
//!
//! If the backing filesystem has no file handles (`name_to_handle_at`
//! fails) or kmsd may not open them (`open_by_handle_at` answers `EPERM`
//! when not root, e.g. `kmsd --dev` as a user), the table falls back to
//! pinning one descriptor per known inode, as before, and says so in a log
//! line: the filesystem's descriptors are then *not* bounded. The same
//! holds for a single inode whose handle cannot be taken.
//!
//! # Inode numbers
//!
//! Backing `(dev, ino)` pairs map to one FUSE inode, so hard links share an
//! inode (and a page cache). Because descriptors are no longer held, the
//! backing filesystem may reuse the number of a deleted inode while the
//! kernel still knows the old one; a lookup whose handle differs from the
//! known entry's (another generation) therefore gets a new FUSE inode.
//! Entries live until the kernel forgets them.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// FUSE's root inode number.
pub const ROOT: u64 = 1;

/// Default capacity of the descriptor cache.
pub const DEFAULT_FD_CACHE: usize = 1024;

/// `MAX_HANDLE_SZ` of `<linux/exportfs.h>`.
const MAX_HANDLE_SZ: usize = 128;

/// One backing inode with an open `O_PATH` descriptor. The descriptor
/// closes when the last `Arc` of it is dropped.
#[derive(Debug)]
pub struct Node {
    fd: OwnedFd,
    mode: u32,
}

impl Node {
    /// The `O_PATH` descriptor, for `*at` calls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `/proc/self/fd/N`: reopens the inode itself, even when unlinked.
    /// Valid only while this `Node` is held.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The backing path now, for logs (may end in " (deleted)"; an inode
    /// reopened by handle whose name is not in the dentry cache may show a
    /// path relative to its filesystem's root).
    pub fn backing_path(&self) -> PathBuf {
        std::fs::read_link(self.proc_path()).unwrap_or_else(|_| self.proc_path())
    }

    /// Whether this is a regular (hence encrypted) file.
    pub fn is_file(&self) -> bool {
        self.mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
    }

    /// Whether this is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits()
    }
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    head: libc::file_handle,
    bytes: [u8; MAX_HANDLE_SZ],
}

impl RawHandle {
    fn empty() -> Self {
        Self {
            head: libc::file_handle {
                handle_bytes: MAX_HANDLE_SZ as libc::c_uint,
                handle_type: 0,
                f_handle: [],
            },
            bytes: [0; MAX_HANDLE_SZ],
        }
    }
}

/// A kernel file handle of a backing inode and the mount it was taken on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Handle {
    mount_id: libc::c_int,
    kind: libc::c_int,
    bytes: Box<[u8]>,
}

impl Handle {
    /// The handle of the inode `fd` refers to.
    fn of(fd: BorrowedFd<'_>) -> nix::Result<Self> {
        let mut raw = RawHandle::empty();
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `fd` is open; the path is an empty NUL-terminated string
        // (with AT_EMPTY_PATH: the inode of `fd` itself); `raw.head` is
        // followed by MAX_HANDLE_SZ writable bytes, as `handle_bytes` says,
        // and `mount_id` is a valid, writable int.
        let r = unsafe {
            libc::name_to_handle_at(
                fd.as_raw_fd(),
                c"".as_ptr(),
                &mut raw.head,
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        nix::errno::Errno::result(r)?;
        let len = (raw.head.handle_bytes as usize).min(MAX_HANDLE_SZ);
        Ok(Self {
            mount_id,
            kind: raw.head.handle_type,
            bytes: raw.bytes[..len].into(),
        })
    }

    /// Opens the inode as `O_PATH`, through any descriptor on its mount.
    fn open(&self, mount_fd: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
        let mut raw = RawHandle::empty();
        raw.head.handle_bytes = self.bytes.len() as libc::c_uint;
        raw.head.handle_type = self.kind;
        raw.bytes[..self.bytes.len()].copy_from_slice(&self.bytes);
        let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `mount_fd` is open; `raw.head` is followed by the
        // `handle_bytes` bytes of the handle, and the kernel only reads it.
        let fd = unsafe { libc::open_by_handle_at(mount_fd.as_raw_fd(), &mut raw.head, flags) };
        let fd = nix::errno::Errno::result(fd)?;
        // SAFETY: a descriptor just returned by the kernel, owned by no one
        // else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// How an entry's descriptor is held.
#[derive(Debug)]
enum Hold {
    /// Reopened by handle when needed; the cache may hold it.
    Handle(Handle),
    /// Always open (the root, or no handle could be used).
    Pinned(Arc<Node>),
}

#[derive(Debug)]
struct Entry {
    hold: Hold,
    key: (u64, u64),
    mode: u32,
    nlookup: u64,
    /// The node while anyone (the cache, a request, an open file) holds it.
    live: Weak<Node>,
    /// Its cache slot, if cached: the stamp in `Cache::order` and the
    /// reference that keeps it open.
    cached: Option<(u64, Arc<Node>)>,
}

/// Least-recently-used order of the cached entries.
#[derive(Debug, Default)]
struct Cache {
    capacity: usize,
    /// Use stamp to inode number; the first is the least recently used.
    order: BTreeMap<u64, u64>,
    clock: u64,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
    cache: Cache,
    /// Whether inodes are reopened by handle (else all are pinned).
    handles: bool,
    /// A descriptor on each backing mount seen, for `open_by_handle_at`.
    mounts: HashMap<libc::c_int, Arc<OwnedFd>>,
}

/// All inodes the kernel currently holds references to.
#[derive(Debug)]
pub struct InodeTable {
    inner: Mutex<Inner>,
}

fn key_of(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn estale() -> Error {
    Error::Sys(nix::Error::ESTALE)
}

/// A descriptor on the mount of the directory `dir`, usable as the
/// `mount_fd` of `open_by_handle_at` (which refuses `O_PATH` descriptors).
fn mount_fd_of(dir: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    openat(dir, ".", flags, Mode::empty())
}

/// Whether handles of the root's filesystem can be taken and reopened (then
/// the root's handle and a `mount_fd` for its mount); the reason why not
/// otherwise.
fn probe_handles(root: &OwnedFd) -> std::result::Result<(Handle, OwnedFd), String> {
    let handle = Handle::of(root.as_fd()).map_err(|e| format!("name_to_handle_at: {e}"))?;
    let mount = mount_fd_of(root.as_fd()).map_err(|e| format!("opening the root: {e}"))?;
    handle
        .open(mount.as_fd())
        .map_err(|e| format!("open_by_handle_at: {e}"))?;
    Ok((handle, mount))
}

impl Inner {
    /// Makes `node` the most recently used entry `ino` (whose slot is
    /// `slot`), evicting the least recently used beyond capacity. Evicted
    /// descriptors close unless a caller still holds them.
    fn touch(&mut self, ino: u64, node: &Arc<Node>) {
        let stamp = self.cache.clock;
        self.cache.clock += 1;
        let Some(entry) = self.nodes.get_mut(&ino) else {
            return;
        };
        if let Some((old, _)) = entry.cached.take() {
            self.cache.order.remove(&old);
        }
        entry.cached = Some((stamp, node.clone()));
        self.cache.order.insert(stamp, ino);
        while self.cache.order.len() > self.cache.capacity {
            let Some((_, victim)) = self.cache.order.pop_first() else {
                break;
            };
            if let Some(e) = self.nodes.get_mut(&victim) {
                e.cached = None;
            }
        }
    }

    /// Removes `ino` from the cache (its descriptor closes unless held).
    fn uncache(&mut self, ino: u64) {
        if let Some((stamp, _)) = self.nodes.get_mut(&ino).and_then(|e| e.cached.take()) {
            self.cache.order.remove(&stamp);
        }
    }

    /// Whether handles taken on `handle`'s mount can be reopened. A new
    /// mount (below the backing directory) is registered when first met
    /// through a directory, `fd` (of mode `mode`); inodes met first on it
    /// otherwise stay pinned.
    fn knows_mount(&mut self, handle: &Handle, fd: &OwnedFd, mode: u32) -> bool {
        if self.mounts.contains_key(&handle.mount_id) {
            return true;
        }
        if mode & SFlag::S_IFMT.bits() != SFlag::S_IFDIR.bits() {
            return false;
        }
        let Ok(mount) = mount_fd_of(fd.as_fd()) else {
            return false;
        };
        if handle.open(mount.as_fd()).is_err() {
            return false;
        }
        self.mounts.insert(handle.mount_id, Arc::new(mount));
        tracing::debug!(mount_id = handle.mount_id, "backing mount registered for file handles");
        true
    }
}

impl InodeTable {
    /// A table holding only the root, which is never forgotten, caching at
    /// most `capacity` other descriptors.
    pub fn new(root: OwnedFd, st: &FileStat, capacity: usize) -> Self {
        let mut inner = Inner {
            next: ROOT + 1,
            cache: Cache {
                capacity,
                ..Cache::default()
            },
            ..Inner::default()
        };
        match probe_handles(&root) {
            Ok((handle, mount)) => {
                inner.mounts.insert(handle.mount_id, Arc::new(mount));
                inner.handles = true;
                tracing::debug!(capacity, "inodes reopened by file handle; descriptors cached");
            }
            Err(why) => tracing::warn!(
                reason = %why,
                "file handles unusable on the backing filesystem; every inode the kernel knows holds a descriptor (unbounded)"
            ),
        }
        let node = Arc::new(Node {
            fd: root,
            mode: st.st_mode,
        });
        inner.by_key.insert(key_of(st), ROOT);
        inner.nodes.insert(
            ROOT,
            Entry {
                live: Arc::downgrade(&node),
                hold: Hold::Pinned(node),
                key: key_of(st),
                mode: st.st_mode,
                nlookup: 1,
                cached: None,
            },
        );
        Self {
            inner: Mutex::new(inner),
        }
    }

    /// Whether inodes are reopened by file handle (descriptors bounded by
    /// the cache) rather than pinned.
    pub fn uses_handles(&self) -> bool {
        self.inner.lock().handles
    }

    /// The node for `ino`, reopened by handle if no descriptor of it is
    /// open. Hold it for as long as its descriptor is used.
    ///
    /// # Errors
    /// `ESTALE` when the kernel names an inode it has forgotten, or one
    /// whose backing inode is gone (deleted, or replaced under the same
    /// number); errors of `open_by_handle_at` (`EMFILE`...).
    pub fn get(&self, ino: u64) -> Result<Arc<Node>> {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let entry = inner.nodes.get(&ino).ok_or_else(estale)?;
        let handle = match &entry.hold {
            Hold::Pinned(node) => return Ok(node.clone()),
            Hold::Handle(h) => h,
        };
        if let Some(node) = entry.live.upgrade() {
            inner.touch(ino, &node);
            return Ok(node);
        }
        let mount = inner.mounts.get(&handle.mount_id).ok_or_else(estale)?;
        let fd = handle.open(mount.as_fd()).map_err(|e| match e {
            nix::Error::ENOENT => nix::Error::ESTALE,
            e => e,
        })?;
        let st = fstat(&fd)?;
        let fmt = SFlag::S_IFMT.bits();
        if key_of(&st) != entry.key || st.st_mode & fmt != entry.mode & fmt {
            return Err(estale());
        }
        let node = Arc::new(Node { fd, mode: st.st_mode });
        if let Some(e) = inner.nodes.get_mut(&ino) {
            e.live = Arc::downgrade(&node);
        }
        inner.touch(ino, &node);
        Ok(node)
    }

    /// The FUSE inode number of the backing inode whose stat is `st`, if
    /// the kernel knows it.
    pub fn ino_of(&self, st: &FileStat) -> Option<u64> {
        self.inner.lock().by_key.get(&key_of(st)).copied()
    }

    /// Records one more kernel reference to the inode behind `fd` (whose
    /// stat is `st`) and returns its number. `fd` becomes the cached
    /// descriptor of the inode if it has none open; otherwise it is closed.
    pub fn remember(&self, fd: OwnedFd, st: &FileStat) -> u64 {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let handle = if inner.handles {
            Handle::of(fd.as_fd())
                .inspect_err(|e| tracing::debug!(error = %e, "name_to_handle_at failed; descriptor pinned"))
                .ok()
        } else {
            None
        };
        let key = key_of(st);
        if let Some(&ino) = inner.by_key.get(&key) {
            let entry = inner.nodes.get_mut(&ino).expect("indexed");
            let same = match (&entry.hold, &handle) {
                (Hold::Handle(known), Some(new)) => known.kind == new.kind && known.bytes == new.bytes,
                _ => true,
            };
            if same {
                entry.nlookup += 1;
                if matches!(entry.hold, Hold::Handle(_)) && entry.live.strong_count() == 0 {
                    let node = Arc::new(Node { fd, mode: st.st_mode });
                    entry.live = Arc::downgrade(&node);
                    inner.touch(ino, &node);
                }
                return ino;
            }
            // The number now names another inode (the known one is gone):
            // a new FUSE inode; the old entry stays until forgotten.
        }
        let ino = inner.next;
        inner.next += 1;
        let handle = handle.filter(|h| inner.knows_mount(h, &fd, st.st_mode));
        let node = Arc::new(Node { fd, mode: st.st_mode });
        let hold = match handle {
            Some(h) => Hold::Handle(h),
            None => Hold::Pinned(node.clone()),
        };
        inner.by_key.insert(key, ino);
        inner.nodes.insert(
            ino,
            Entry {
                live: Arc::downgrade(&node),
                cached: None,
                hold,
                key,
                mode: st.st_mode,
                nlookup: 1,
            },
        );
        if matches!(inner.nodes[&ino].hold, Hold::Handle(_)) {
            inner.touch(ino, &node);
        }
        ino
    }

    /// Drops `n` kernel references; at zero the entry goes (and its
    /// descriptor closes unless a caller still holds it).
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut inner = self.inner.lock();
        let Some(entry) = inner.nodes.get_mut(&ino) else {
            return;
        };
        entry.nlookup = entry.nlookup.saturating_sub(n);
        if entry.nlookup == 0 {
            let key = entry.key;
            inner.uncache(ino);
            inner.nodes.remove(&ino);
            if inner.by_key.get(&key) == Some(&ino) {
                inner.by_key.remove(&key);
            }
        }
    }

    /// Closes the cached descriptor of `ino` if its backing inode has no
    /// link left, so that an unlinked file's space comes back when its last
    /// name goes (or its last open closes), as on a local filesystem,
    /// rather than when the kernel forgets the inode or the cache evicts
    /// it. The entry itself stays until forgotten; a later reopen of its
    /// handle answers `ESTALE`. A caller holding the [`Node`] keeps its
    /// descriptor open.
    pub fn uncache_if_unlinked(&self, ino: u64) {
        if ino == ROOT {
            return;
        }
        let Some((stamp, node)) = self.inner.lock().nodes.get(&ino).and_then(|e| e.cached.clone()) else {
            return;
        };
        if fstat(node.fd()).is_ok_and(|st| st.st_nlink == 0) {
            let mut inner = self.inner.lock();
            // Unless the entry was evicted and cached again meanwhile.
            if inner
                .nodes
                .get(&ino)
                .and_then(|e| e.cached.as_ref())
                .is_some_and(|c| c.0 == stamp)
            {
                inner.uncache(ino);
            }
        }
    }

    /// Number of inodes held, the root included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().nodes.len()
    }

    /// Number of descriptors in the cache.
    #[cfg(test)]
    pub(crate) fn cached(&self) -> usize {
        self.inner.lock().cache.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::{fstat, Mode};
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn path_fd(p: &Path) -> (OwnedFd, FileStat) {
        let fd = open(p, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let st = fstat(&fd).unwrap();
        (fd, st)
    }

    fn table(dir: &Path, capacity: usize) -> InodeTable {
        let (root, st) = path_fd(dir);
        InodeTable::new(root, &st, capacity)
    }

    /// A table reopening by handle, or `None` (test skipped) where handles
    /// are unusable (not root) and `CI` is unset.
    fn handle_table(dir: &Path, capacity: usize) -> Option<InodeTable> {
        let t = table(dir, capacity);
        if t.uses_handles() {
            return Some(t);
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but file handles are unusable here"
        );
        eprintln!("skipping: file handles unusable (not root?)");
        None
    }

    fn remember(t: &InodeTable, p: &Path) -> u64 {
        let (fd, st) = path_fd(p);
        t.remember(fd, &st)
    }

    #[test]
    fn same_backing_inode_gets_same_number_and_counts_lookups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let table = table(dir.path(), 8);
        let ino = remember(&table, &dir.path().join("a"));
        assert_eq!(remember(&table, &dir.path().join("b")), ino);
        assert!(table.get(ino).unwrap().is_file());
        table.forget(ino, 1);
        assert!(table.get(ino).is_ok());
        table.forget(ino, 1);
        assert!(table.get(ino).is_err());
        table.forget(ROOT, 100);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn eviction_closes_descriptors_and_reopen_finds_the_same_inode() {
        let dir = tempfile::tempdir().unwrap();
        let Some(table) = handle_table(dir.path(), 4) else {
            return;
        };
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink("target", dir.path().join("ln")).unwrap();
        let mut inos = Vec::new();
        let mut weak = Vec::new();
        for i in 0..50 {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, format!("{i}")).unwrap();
            let ino = remember(&table, &p);
            weak.push(Arc::downgrade(&table.get(ino).unwrap()));
            inos.push((ino, std::fs::metadata(&p).unwrap().ino()));
            assert!(table.cached() <= 4);
        }
        // All but the last four descriptors were closed: no one held them.
        assert_eq!(weak.iter().filter(|w| w.strong_count() > 0).count(), 4);
        assert_eq!(table.len(), 51);
        // Each reopens, by handle, as the same backing inode, even after
        // its directory entry moved.
        std::fs::rename(dir.path().join("f0"), dir.path().join("d/moved")).unwrap();
        for &(ino, backing) in &inos {
            let node = table.get(ino).unwrap();
            assert!(node.is_file());
            assert_eq!(fstat(node.fd()).unwrap().st_ino, backing);
            assert!(table.cached() <= 4);
        }
        // A held node survives eviction and is the one handed out again.
        let held = table.get(inos[0].0).unwrap();
        for &(ino, _) in &inos[1..10] {
            table.get(ino).unwrap();
        }
        assert!(Arc::ptr_eq(&held, &table.get(inos[0].0).unwrap()));
        assert!(held.backing_path().ends_with("d/moved"), "{:?}", held.backing_path());
        // Symlinks and directories reopen as themselves.
        let ln = remember(&table, &dir.path().join("ln"));
        let d = remember(&table, &dir.path().join("d"));
        for &(ino, _) in &inos[10..20] {
            table.get(ino).unwrap();
        }
        let link = table.get(ln).unwrap();
        assert!(link.is_symlink());
        assert_eq!(nix::fcntl::readlinkat(link.fd(), "").unwrap(), "target");
        assert_eq!(
            fstat(table.get(d).unwrap().fd()).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFDIR
        );
    }

    #[test]
    fn deleted_inode_is_stale_and_a_reused_number_is_a_new_inode() {
        let dir = tempfile::tempdir().unwrap();
        let Some(table) = handle_table(dir.path(), 1) else {
            return;
        };
        let a = dir.path().join("a");
        std::fs::write(&a, b"old").unwrap();
        let old_ino = std::fs::metadata(&a).unwrap().ino();
        let ino = remember(&table, &a);
        std::fs::remove_file(&a).unwrap();
        // Evict its descriptor: the deleted inode is then freed.
        std::fs::write(dir.path().join("c"), b"").unwrap();
        remember(&table, &dir.path().join("c"));
        let r = table.get(ino);
        assert!(matches!(r, Err(Error::Sys(nix::Error::ESTALE))), "{r:?}");
        // ext4 hands a freed inode number out again soon; tmpfs never does.
        let reused = (0..200).find_map(|i| {
            let p = dir.path().join(format!("n{i}"));
            std::fs::write(&p, b"new").unwrap();
            (std::fs::metadata(&p).unwrap().ino() == old_ino).then_some(p)
        });
        match reused {
            Some(p) => {
                let new = remember(&table, &p);
                assert_ne!(new, ino, "a new inode under a reused number got the old FUSE inode");
                assert!(table.get(ino).is_err());
                assert_eq!(fstat(table.get(new).unwrap().fd()).unwrap().st_ino, old_ino);
                // Forgetting the stale entry leaves the new one reachable.
                table.forget(ino, 1);
                assert_eq!(remember(&table, &p), new);
            }
            None => eprintln!("backing filesystem did not reuse the inode number; reuse not exercised"),
        }
    }

    #[test]
    fn same_number_with_another_handle_is_a_new_inode_and_reopen_checks_it() {
        // The generation check without relying on the allocator: `b`'s
        // descriptor presented under `a`'s (dev, ino).
        let dir = tempfile::tempdir().unwrap();
        let Some(table) = handle_table(dir.path(), 1) else {
            return;
        };
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let (fa, sa) = path_fd(&dir.path().join("a"));
        let (fb, _) = path_fd(&dir.path().join("b"));
        let a = table.remember(fa, &sa);
        let b = table.remember(fb, &sa);
        assert_ne!(a, b);
        // Once evicted, `b` reopens by its handle as an inode whose
        // (dev, ino) is not the one recorded: refused.
        remember(&table, &dir.path().join("c"));
        let r = table.get(b);
        assert!(matches!(r, Err(Error::Sys(nix::Error::ESTALE))), "{r:?}");
        assert!(table.get(a).unwrap().is_file());
    }

    #[test]
    fn without_handles_descriptors_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let table = table(dir.path(), 1);
        table.inner.lock().handles = false;
        let mut weak = Vec::new();
        for i in 0..5 {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, b"").unwrap();
            let ino = remember(&table, &p);
            weak.push((ino, Arc::downgrade(&table.get(ino).unwrap())));
        }
        assert!(weak.iter().all(|(_, w)| w.strong_count() > 0));
        let (ino, w) = &weak[0];
        table.forget(*ino, 1);
        assert_eq!(w.strong_count(), 0);
    }
}
