//! A power-loss harness in the manner of LazyFS (which Jepsen uses to test
//! databases): a FUSE passthrough filesystem over a real directory that
//! remembers what has been made durable, and on [`LazyFs::power_cut`]
//! throws away everything else, as losing power would.
//!
//! # What it models
//!
//! Every operation is applied to the backing directory at once, so readers
//! see it. Beside that, the harness keeps in memory the *durable image*:
//!
//! - **File data.** The contents (and length) of a regular file as of its
//!   last `fsync`/`fdatasync` are durable; writes and truncates since are
//!   not. A file never fsynced is durably empty.
//! - **Directory entries.** The entries of a directory (name -> inode) as
//!   of its last `fsync` (`FSYNCDIR`) are durable; creates, mkdirs,
//!   symlinks, links, renames and unlinks since are not. Fsyncing a file
//!   does *not* make its name durable (POSIX does not promise it; ext4
//!   often does). A rename is durable in the source directory once that is
//!   fsynced, and in the target once that is, so fsyncing only the target
//!   leaves both names after a cut (a real journal commits the two
//!   together).
//! - **Metadata.** Mode, owner and group are taken when the inode is
//!   fsynced or its parent directory is.
//!
//! A power cut unmounts, empties the backing directory (the root directory
//! itself and its extended attributes stay), and rebuilds it from the
//! durable image: directories, file contents, symlinks, hard links.
//!
//! [`LazyFs::in_temp_with_name_max`] also refuses names longer than a
//! given length, as a filesystem with short names would.
//!
//! # What it does not model
//!
//! Torn or reordered writes inside a file (a cut drops all unsynced bytes of
//! a file, never some of them), partially persisted data, `sync(2)` or
//! `syncfs`, extended attributes below the root (they are lost on a cut),
//! timestamps (not restored), special files (FIFOs, sockets, devices: not
//! supported), `fallocate`, and the page cache of the kernel above (the
//! harness is mounted without writeback cache: a `write` returns once the
//! backing file has it). Open files are not an issue: the users of the
//! harness must be stopped (SIGKILL) before a cut.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

const ROOT: u64 = 1;
const TTL: Duration = Duration::ZERO;

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
}

#[derive(Debug, Clone)]
struct DurableInode {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Counters of what the harness saw (for reports and sanity checks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub fsyncs: u64,
    pub fsyncdirs: u64,
    pub writes: u64,
    pub cuts: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Current path (relative to the backing root) of each inode handed out.
    paths: HashMap<u64, PathBuf>,
    /// Backing (st_dev, st_ino) -> inode number handed out.
    by_backing: HashMap<(u64, u64), u64>,
    next_ino: u64,
    /// The durable image: every inode a durable entry may name.
    durable: HashMap<u64, DurableInode>,
    /// Durable entries of each directory.
    entries: HashMap<u64, BTreeMap<OsString, u64>>,
    open: HashMap<u64, File>,
    next_fh: u64,
    stats: Stats,
}

impl State {
    fn ino_for(&mut self, md: &fs::Metadata, path: PathBuf) -> u64 {
        let next = &mut self.next_ino;
        let ino = *self.by_backing.entry((md.dev(), md.ino())).or_insert_with(|| {
            *next += 1;
            *next
        });
        self.paths.insert(ino, path);
        ino
    }

    /// Forgets the backing inode of `md` if this removal freed it, so that
    /// a new file reusing the backing number gets a new inode here.
    fn forget_if_gone(&mut self, md: &fs::Metadata) {
        if md.is_dir() || md.nlink() <= 1 {
            self.by_backing.remove(&(md.dev(), md.ino()));
        }
    }

    fn durable_of(md: &fs::Metadata, kind: Kind) -> DurableInode {
        DurableInode {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        }
    }

    /// Reads the whole backing tree as durable (a fresh mount, or just
    /// after a cut).
    fn scan(root: &Path) -> io::Result<Self> {
        let mut st = Self {
            next_ino: ROOT,
            next_fh: 1,
            ..Self::default()
        };
        let md = fs::symlink_metadata(root)?;
        st.by_backing.insert((md.dev(), md.ino()), ROOT);
        st.paths.insert(ROOT, PathBuf::new());
        st.durable.insert(ROOT, Self::durable_of(&md, Kind::Dir));
        st.scan_dir(root, Path::new(""), ROOT)?;
        Ok(st)
    }

    fn scan_dir(&mut self, root: &Path, rel: &Path, dir: u64) -> io::Result<()> {
        let mut entries = BTreeMap::new();
        for e in fs::read_dir(root.join(rel))? {
            let e = e?;
            let child_rel = rel.join(e.file_name());
            let md = fs::symlink_metadata(root.join(&child_rel))?;
            let seen = self.by_backing.contains_key(&(md.dev(), md.ino()));
            let ino = self.ino_for(&md, child_rel.clone());
            entries.insert(e.file_name(), ino);
            if seen {
                continue;
            }
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File(fs::read(root.join(&child_rel))?)
            } else if ft.is_symlink() {
                Kind::Symlink(fs::read_link(root.join(&child_rel))?)
            } else {
                continue;
            };
            self.durable.insert(ino, Self::durable_of(&md, kind));
            if ft.is_dir() {
                self.scan_dir(root, &child_rel, ino)?;
            }
        }
        self.entries.insert(dir, entries);
        Ok(())
    }

    /// Replaces the backing tree with the durable image.
    fn rebuild(&self, root: &Path) -> io::Result<()> {
        for e in fs::read_dir(root)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                fs::remove_dir_all(e.path())?;
            } else {
                fs::remove_file(e.path())?;
            }
        }
        let mut made = HashMap::new();
        let mut dirs = HashSet::from([ROOT]);
        self.make(root, ROOT, &mut made, &mut dirs)
    }

    fn make(&self, path: &Path, dir: u64, made: &mut HashMap<u64, PathBuf>, dirs: &mut HashSet<u64>) -> io::Result<()> {
        let Some(entries) = self.entries.get(&dir) else {
            return Ok(());
        };
        for (name, &ino) in entries {
            let Some(node) = self.durable.get(&ino) else {
                continue;
            };
            let p = path.join(name);
            if let Some(first) = made.get(&ino) {
                if !matches!(node.kind, Kind::Dir) {
                    fs::hard_link(first, &p)?;
                }
                continue;
            }
            match &node.kind {
                Kind::Dir => {
                    if !dirs.insert(ino) {
                        continue;
                    }
                    fs::DirBuilder::new().mode(0o700).create(&p)?;
                    self.make(&p, ino, made, dirs)?;
                }
                Kind::File(data) => fs::write(&p, data)?,
                Kind::Symlink(target) => std::os::unix::fs::symlink(target, &p)?,
            }
            std::os::unix::fs::lchown(&p, Some(node.uid), Some(node.gid))?;
            if !matches!(node.kind, Kind::Symlink(_)) {
                fs::set_permissions(&p, fs::Permissions::from_mode(node.mode))?;
            }
            made.insert(ino, p);
        }
        Ok(())
    }
}

/// The `fuser` filesystem; [`LazyFs`] is what tests hold.
#[derive(Debug)]
struct Passthrough {
    root: PathBuf,
    state: Arc<Mutex<State>>,
    /// Longest name, shorter than the backing filesystem's when set: a
    /// filesystem with short names, for tests of what runs on one.
    name_max: Option<usize>,
}

fn time(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, md: &fs::Metadata) -> FileAttr {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_file() {
        FileType::RegularFile
    } else {
        FileType::NamedPipe
    };
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn last_error<T>(ret: isize) -> io::Result<T>
where
    T: TryFrom<isize>,
{
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        T::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }
}

/// Opens `path` with open(2) `flags` (and `mode` when creating).
fn open_raw(path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open(2) just returned this descriptor, which nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The flags a backing file is opened with for kernel `flags`: always
/// readable (fsync reads it back), never appending (the kernel gives the
/// offset), never creating.
fn backing_flags(flags: i32) -> i32 {
    (flags & !(libc::O_ACCMODE | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY)) | libc::O_RDWR
}

impl Passthrough {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, st: &State, ino: u64) -> io::Result<PathBuf> {
        st.paths.get(&ino).map(|p| self.root.join(p)).ok_or_else(enoent)
    }

    fn child(&self, st: &State, parent: u64, name: &OsStr) -> io::Result<(PathBuf, PathBuf)> {
        if self.name_max.is_some_and(|max| name.len() > max) {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        let rel = st.paths.get(&parent).ok_or_else(enoent)?.join(name);
        Ok((self.root.join(&rel), rel))
    }

    /// Stats a (just made or looked up) child and hands out its inode.
    fn entry(&self, st: &mut State, rel: PathBuf) -> io::Result<FileAttr> {
        let md = fs::symlink_metadata(self.root.join(&rel))?;
        let ino = st.ino_for(&md, rel);
        Ok(attr(ino, &md))
    }

    fn reply_entry(&self, r: io::Result<FileAttr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_empty(r: io::Result<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr_inner(
        &self,
        st: &State,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        times: [Option<TimeOrNow>; 2],
        fh: Option<FileHandle>,
    ) -> io::Result<fs::Metadata> {
        let path = self.path(st, ino)?;
        let file = fh.and_then(|fh| st.open.get(&fh.0));
        if let Some(mode) = mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid)?;
        }
        if let Some(size) = size {
            match file {
                Some(f) => f.set_len(size)?,
                None => open_raw(&path, libc::O_WRONLY, 0)?.set_len(size)?,
            }
        }
        if times.iter().any(Option::is_some) {
            let ts = times.map(|t| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    libc::timespec {
                        tv_sec: d.as_secs() as libc::time_t,
                        tv_nsec: d.subsec_nanos() as libc::c_long,
                    }
                }
            });
            let c = cstr(&path)?;
            // SAFETY: `c` is NUL-terminated and `ts` holds two timespecs.
            let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
            last_error::<isize>(r as isize)?;
        }
        match file {
            Some(f) => f.metadata(),
            None => fs::symlink_metadata(&path),
        }
    }

    /// Makes a file's current contents durable.
    fn fsync_inner(&self, st: &mut State, ino: u64, fh: FileHandle) -> io::Result<()> {
        let (data, md) = match st.open.get(&fh.0) {
            // Through /proc: also right for a file unlinked since its open.
            Some(f) => (fs::read(format!("/proc/self/fd/{}", f.as_raw_fd()))?, f.metadata()?),
            None => {
                let p = self.path(st, ino)?;
                (fs::read(&p)?, fs::symlink_metadata(&p)?)
            }
        };
        st.durable.insert(ino, State::durable_of(&md, Kind::File(data)));
        st.stats.fsyncs += 1;
        Ok(())
    }

    /// Makes a directory's current entries durable.
    fn fsyncdir_inner(&self, st: &mut State, ino: u64) -> io::Result<()> {
        let rel = st
            .paths
            .get(&ino)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let dir = self.root.join(&rel);
        let md = fs::symlink_metadata(&dir)?;
        let mut entries = BTreeMap::new();
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let child_rel = rel.join(e.file_name());
            let cmd = fs::symlink_metadata(self.root.join(&child_rel))?;
            let child = st.ino_for(&cmd, child_rel.clone());
            let ft = cmd.file_type();
            let fresh = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File(Vec::new())
            } else if ft.is_symlink() {
                Kind::Symlink(fs::read_link(self.root.join(&child_rel))?)
            } else {
                continue;
            };
            let node = st
                .durable
                .entry(child)
                .or_insert_with(|| State::durable_of(&cmd, fresh));
            node.mode = cmd.mode() & 0o7777;
            node.uid = cmd.uid();
            node.gid = cmd.gid();
            entries.insert(e.file_name(), child);
        }
        st.entries.insert(ino, entries);
        let node = st
            .durable
            .entry(ino)
            .or_insert_with(|| State::durable_of(&md, Kind::Dir));
        node.mode = md.mode() & 0o7777;
        st.stats.fsyncdirs += 1;
        Ok(())
    }
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.lock();
        let r = self.child(&st, parent.0, name);
        let r = r.and_then(|(_, rel)| self.entry(&mut st, rel));
        self.reply_entry(r, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.lock();
        let md = match fh.and_then(|fh| st.open.get(&fh.0)) {
            Some(f) => f.metadata(),
            None => match self.path(&st, ino.0) {
                Ok(p) => fs::symlink_metadata(p),
                Err(e) => return reply.error(errno(&e)),
            },
        };
        match md {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let st = self.lock();
        match self.setattr_inner(&st, ino.0, mode, uid, gid, size, [atime, mtime], fh) {
            Ok(md) => reply.attr(&TTL, &attr(ino.0, &md)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.lock();
        match self.path(&st, ino.0) {
            Ok(p) => match fs::read_link(p) {
                Ok(t) => reply.data(t.as_os_str().as_bytes()),
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut st = self.lock();
        let r = self.child(&st, parent.0, name).and_then(|(p, rel)| {
            fs::DirBuilder::new().mode(mode & !umask & 0o7777).create(p)?;
            self.entry(&mut st, rel)
        });
        self.reply_entry(r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.lock();
        let r = self.child(&st, parent.0, name).and_then(|(p, _)| {
            let md = fs::symlink_metadata(&p)?;
            fs::remove_file(&p)?;
            st.forget_if_gone(&md);
            Ok(())
        });
        Self::reply_empty(r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.lock();
        let r = self.child(&st, parent.0, name).and_then(|(p, _)| {
            let md = fs::symlink_metadata(&p)?;
            fs::remove_dir(&p)?;
            st.forget_if_gone(&md);
            Ok(())
        });
        Self::reply_empty(r, reply);
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut st = self.lock();
        let r = self.child(&st, parent.0, link_name).and_then(|(p, rel)| {
            std::os::unix::fs::symlink(target, p)?;
            self.entry(&mut st, rel)
        });
        self.reply_entry(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.lock();
        let r = (|| -> io::Result<()> {
            let (from, from_rel) = self.child(&st, parent.0, name)?;
            let (to, to_rel) = self.child(&st, newparent.0, newname)?;
            let replaced = fs::symlink_metadata(&to).ok();
            let nflags = nix::fcntl::RenameFlags::from_bits_truncate(flags.bits());
            nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, &from, nix::fcntl::AT_FDCWD, &to, nflags)?;
            let exchange = nflags.contains(nix::fcntl::RenameFlags::RENAME_EXCHANGE);
            if !exchange {
                if let Some(md) = replaced {
                    st.forget_if_gone(&md);
                }
            }
            for p in st.paths.values_mut() {
                if let Ok(rest) = p.strip_prefix(&from_rel) {
                    *p = to_rel.join(rest);
                } else if exchange {
                    if let Ok(rest) = p.strip_prefix(&to_rel) {
                        *p = from_rel.join(rest);
                    }
                }
            }
            Ok(())
        })();
        Self::reply_empty(r, reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let mut st = self.lock();
        let r = (|| -> io::Result<FileAttr> {
            let src = self.path(&st, ino.0)?;
            let (p, rel) = self.child(&st, newparent.0, newname)?;
            fs::hard_link(src, p)?;
            self.entry(&mut st, rel)
        })();
        self.reply_entry(r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.lock();
        let r = (|| -> io::Result<u64> {
            let p = self.path(&st, ino.0)?;
            let f = open_raw(&p, backing_flags(flags.0), 0)?;
            st.next_fh += 1;
            let fh = st.next_fh;
            st.open.insert(fh, f);
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let st = self.lock();
        let Some(f) = st.open.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match f.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..n]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.lock();
        let Some(f) = st.open.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        match f.write_all_at(data, offset) {
            Ok(()) => {
                st.stats.writes += 1;
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().open.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut st = self.lock();
        let r = self.fsync_inner(&mut st, ino.0, fh);
        Self::reply_empty(r, reply);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut st = self.lock();
        let r = (|| -> io::Result<Vec<(u64, FileType, OsString)>> {
            let rel = st
                .paths
                .get(&ino.0)
                .cloned()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
            let mut out = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ];
            let mut names: Vec<OsString> = fs::read_dir(self.root.join(&rel))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for name in names {
                let child_rel = rel.join(&name);
                let Ok(md) = fs::symlink_metadata(self.root.join(&child_rel)) else {
                    continue;
                };
                let a = attr(st.ino_for(&md, child_rel), &md);
                out.push((a.ino.0, a.kind, name));
            }
            Ok(out)
        })();
        match r {
            Ok(list) => {
                for (i, (ino, kind, name)) in list.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut st = self.lock();
        let r = self.fsyncdir_inner(&mut st, ino.0);
        Self::reply_empty(r, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                self.name_max.map_or(s.name_max() as u32, |m| m as u32),
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let st = self.lock();
        let r = (|| -> io::Result<()> {
            let p = cstr(&self.path(&st, ino.0)?)?;
            let n = cstr(Path::new(name))?;
            // SAFETY: NUL-terminated path and name; `value` is valid for its length.
            let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
            last_error::<isize>(r as isize).map(drop)
        })();
        Self::reply_empty(r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let st = self.lock();
        let r = (|| -> io::Result<Vec<u8>> {
            let p = cstr(&self.path(&st, ino.0)?)?;
            let n = cstr(Path::new(name))?;
            let mut buf = vec![0u8; size as usize];
            // SAFETY: NUL-terminated path and name; `buf` is writable for its length.
            let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            let len: usize = last_error(r)?;
            if size == 0 {
                return Ok(vec![0; len]);
            }
            buf.truncate(len);
            Ok(buf)
        })();
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let st = self.lock();
        let r = (|| -> io::Result<Vec<u8>> {
            let p = cstr(&self.path(&st, ino.0)?)?;
            let mut buf = vec![0u8; size as usize];
            // SAFETY: NUL-terminated path; `buf` is writable for its length.
            let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            let len: usize = last_error(r)?;
            if size == 0 {
                return Ok(vec![0; len]);
            }
            buf.truncate(len);
            Ok(buf)
        })();
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let st = self.lock();
        let r = (|| -> io::Result<()> {
            let p = cstr(&self.path(&st, ino.0)?)?;
            let n = cstr(Path::new(name))?;
            // SAFETY: NUL-terminated path and name.
            let r = unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) };
            last_error::<isize>(r as isize).map(drop)
        })();
        Self::reply_empty(r, reply);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.lock();
        let r = (|| -> io::Result<(FileAttr, u64)> {
            let (p, rel) = self.child(&st, parent.0, name)?;
            let excl = flags & libc::O_EXCL;
            let f = open_raw(&p, backing_flags(flags) | libc::O_CREAT | excl, mode & !umask & 0o7777)?;
            let a = self.entry(&mut st, rel)?;
            st.next_fh += 1;
            let fh = st.next_fh;
            st.open.insert(fh, f);
            Ok((a, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// A mounted harness: the mountpoint is where the code under test works;
/// [`power_cut`](Self::power_cut) drops whatever it has not made durable.
#[derive(Debug)]
pub struct LazyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    state: Arc<Mutex<State>>,
    name_max: Option<usize>,
    _dirs: Option<(tempfile::TempDir, tempfile::TempDir)>,
}

fn mount_session(
    backing: &Path,
    mountpoint: &Path,
    state: &Arc<Mutex<State>>,
    name_max: Option<usize>,
) -> io::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("lazyfs".into()),
        MountOption::Subtype("lazyfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(4);
    let fs = Passthrough {
        root: backing.to_path_buf(),
        state: state.clone(),
        name_max,
    };
    fuser::spawn_mount(fs, mountpoint, &config)
}

impl LazyFs {
    /// Mounts the harness over `backing` at `mountpoint`; what `backing`
    /// holds now counts as durable.
    ///
    /// # Errors
    /// The backing tree cannot be read, or the kernel refuses the mount.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Self> {
        let state = Arc::new(Mutex::new(State::scan(backing)?));
        let session = mount_session(backing, mountpoint, &state, None)?;
        Ok(Self {
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
            state,
            name_max: None,
            _dirs: None,
        })
    }

    /// [`in_temp`](Self::in_temp) whose names hold at most `name_max`
    /// bytes: longer ones are `ENAMETOOLONG`, and `statfs` says `name_max`.
    ///
    /// # Errors
    /// As [`mount`](Self::mount).
    pub fn in_temp_with_name_max(name_max: usize) -> io::Result<Self> {
        let mut fs = Self::in_temp()?;
        if let Some(s) = fs.session.take() {
            s.umount_and_join()?;
        }
        fs.name_max = Some(name_max);
        fs.session = Some(mount_session(&fs.backing, &fs.mountpoint, &fs.state, fs.name_max)?);
        Ok(fs)
    }

    /// Mounts the harness over a fresh, empty temporary folder (mode 0700),
    /// at another temporary folder; both are removed on drop.
    ///
    /// # Errors
    /// As [`mount`](Self::mount).
    pub fn in_temp() -> io::Result<Self> {
        let backing = tempfile::Builder::new().prefix("lazyfs-backing-").tempdir()?;
        let mnt = tempfile::Builder::new().prefix("lazyfs-mnt-").tempdir()?;
        // tempfile leaves the umask's mode (0755); kmsd wants its state
        // directory private.
        fs::set_permissions(backing.path(), fs::Permissions::from_mode(0o700))?;
        let mut fs = Self::mount(backing.path(), mnt.path())?;
        fs._dirs = Some((backing, mnt));
        Ok(fs)
    }

    /// Where the code under test works.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The real directory underneath.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// What the harness has seen since it was created.
    pub fn stats(&self) -> Stats {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// Cuts the power: unmounts (every user must be gone: SIGKILL them and
    /// unmount what stacks on top first), replaces the backing tree with
    /// the durable image, and mounts again.
    ///
    /// # Errors
    /// The unmount fails (the harness is busy), or rebuilding or mounting
    /// fails.
    pub fn power_cut(&mut self) -> io::Result<()> {
        if let Some(s) = self.session.take() {
            s.umount_and_join()?;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.rebuild(&self.backing)?;
        let mut fresh = State::scan(&self.backing)?;
        fresh.stats = st.stats;
        fresh.stats.cuts += 1;
        *st = fresh;
        drop(st);
        self.session = Some(mount_session(
            &self.backing,
            &self.mountpoint,
            &self.state,
            self.name_max,
        )?);
        Ok(())
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if s.umount_and_join().is_err() {
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
