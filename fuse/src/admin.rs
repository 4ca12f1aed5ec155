//! `fs versions` and `fs rewrap`: walks over a backing directory that read
//! and write only file headers, never data blocks.
//!
//! Both work on the backing directory directly and may run while it is
//! mounted: a rewrap writes only the older header slot, which the mount
//! never reads after a file is open, and the mount never writes headers of
//! existing files.
//!
//! Anyone who can write into the backing directory is assumed hostile, and
//! these walks run as root, so they never open a path twice: the root is
//! opened once (`O_NOFOLLOW`), every entry is opened relative to its
//! parent's descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
//! | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` as `O_PATH | O_NOFOLLOW`, and
//! what happens next depends only on `fstat` of that descriptor: a
//! directory is listed and descended through it, a regular file is
//! reopened for I/O through `/proc/self/fd/N` (its inode, not a name), and
//! anything else (symlinks, FIFOs, sockets, devices) is left alone without
//! ever being opened for reading or writing. Paths are kept for log
//! messages only.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kms_client::blob::BlobHeader;
use kms_client::proto::{FsRewrapInfo, FsVersionsInfo};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};

use crate::error::{Error, Result};
use crate::format::{encode_slot, slot_offset, Header, HEADER_LEN};
use crate::keys::{file_context, KeyError, KeySource};

/// Directories nested deeper than this below the root are not walked
/// (each level holds one descriptor while it is listed); each one skipped
/// is logged and counted as not examined.
pub const MAX_DEPTH: usize = 256;

/// Tries of an `openat2` that reports a concurrent rename (`EAGAIN`).
const OPENAT2_TRIES: usize = 8;

/// `/proc/self/fd/N`: names the inode behind `fd`, not a path in the
/// backing directory.
fn proc_fd(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Opens `name`, one entry read from the directory `dir`, as an `O_PATH`
/// descriptor of that entry itself: a symlink is not followed (the
/// descriptor is the link), ".." or a mount point is refused. Opening with
/// `O_PATH` has no effect on the inode (a FIFO is not opened).
///
/// Where the kernel has no `openat2` (`ENOSYS`), falls back to `openat`
/// with `O_NOFOLLOW`, which for a single name from `readdir` resolves the
/// same way except that it may cross into a mount point.
pub(crate) fn open_entry(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let resolve = ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV;
    let how = OpenHow::new().flags(flags).resolve(resolve);
    let mut result = Err(Errno::EAGAIN);
    for _ in 0..OPENAT2_TRIES {
        result = openat2(dir, name, how);
        match result {
            Err(Errno::EAGAIN) => continue,
            Err(Errno::ENOSYS) => return openat(dir, name, flags, Mode::empty()),
            _ => break,
        }
    }
    result
}

/// The names in the directory `dir` (any descriptor of it), sorted.
fn list(dir: BorrowedFd<'_>) -> std::io::Result<Vec<OsString>> {
    let mut names = std::fs::read_dir(proc_fd(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// Reopens the regular file behind `fd` (an `O_PATH` descriptor from a
/// walk) for reading, and writing if `write`, through `/proc/self/fd/N`,
/// and checks that the new descriptor is that same regular file.
/// `O_NONBLOCK` makes a lease held by someone else fail the open instead
/// of stalling the walk.
///
/// # Errors
/// `EINVAL` when `fd` is not a regular file or the reopened descriptor is
/// not the same inode; open errors.
pub fn reopen_regular(fd: BorrowedFd<'_>, write: bool) -> std::io::Result<File> {
    let before = fstat(fd)?;
    if file_type(&before) != SFlag::S_IFREG {
        return Err(Errno::EINVAL.into());
    }
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(proc_fd(fd))?;
    let after = fstat(&file)?;
    if file_type(&after) != SFlag::S_IFREG || (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) {
        return Err(Errno::EINVAL.into());
    }
    Ok(file)
}

/// What a walk could not look at: entries that exist but could not be
/// opened or listed (other than ones removed while the walk ran), mount
/// points, and directories deeper than [`MAX_DEPTH`]. Each is logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    pub not_examined: u64,
}

struct Frame {
    fd: OwnedFd,
    path: PathBuf,
    names: std::vec::IntoIter<OsString>,
}

/// Calls `visit(path, fd)` for every regular file under `root` once (hard
/// links deduplicated by `(dev, ino)`), in a stable order (depth first,
/// names sorted). `fd` is an `O_PATH` descriptor of the file found; `path`
/// is for log messages only and must not be opened. Symlinks are never
/// followed, mount points are not entered, and every directory is walked
/// at most once, so a walk ends even while the tree changes under it.
///
/// # Errors
/// `root` cannot be opened as a directory without following a symlink,
/// or cannot be listed.
pub fn walk(root: &Path, mut visit: impl FnMut(&Path, BorrowedFd<'_>)) -> Result<Walked> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let root_fd = openat(AT_FDCWD, root, flags, Mode::empty())?;
    let st = fstat(&root_fd)?;
    let names = list(root_fd.as_fd())?;
    // With encrypted names, the mount's bookkeeping files (names with a
    // `.`: the root file, directory ids, long-name parts) are not
    // encrypted files.
    let encrypted = names.iter().any(|n| n == crate::names::ROOT_FILE);
    let mut dirs = HashSet::from([(st.st_dev, st.st_ino)]);
    let mut files = HashSet::new();
    let mut walked = Walked::default();
    let mut not_examined = |path: &Path, why: &dyn std::fmt::Display| {
        tracing::warn!(path = %path.display(), error = %why, "backing directory walk: entry not examined");
        walked.not_examined += 1;
    };
    let mut stack = vec![Frame {
        fd: root_fd,
        path: root.to_path_buf(),
        names: names.into_iter(),
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.next() else {
            stack.pop();
            continue;
        };
        let path = frame.path.join(&name);
        let fd = match open_entry(frame.fd.as_fd(), &name) {
            Ok(fd) => fd,
            // Removed since the directory was listed.
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                not_examined(&path, &e);
                continue;
            }
        };
        let st = match fstat(&fd) {
            Ok(st) => st,
            Err(e) => {
                not_examined(&path, &e);
                continue;
            }
        };
        let key = (st.st_dev, st.st_ino);
        let at_root = stack.len() == 1;
        match file_type(&st) {
            SFlag::S_IFDIR => {
                if !dirs.insert(key) {
                    continue;
                }
                if stack.len() > MAX_DEPTH {
                    not_examined(&path, &"nested too deep");
                    continue;
                }
                match list(fd.as_fd()) {
                    Ok(names) => stack.push(Frame {
                        fd,
                        path,
                        names: names.into_iter(),
                    }),
                    Err(e) => not_examined(&path, &e),
                }
            }
            SFlag::S_IFREG if encrypted && crate::names::classify(&name) == crate::names::Kind::Reserved => {}
            // The undo journal (FORMAT.md); in a plain mount its name is
            // reserved at the root.
            SFlag::S_IFREG if at_root && name == crate::journal::JOURNAL_FILE => {}
            // (A hard link to a file already visited is skipped.)
            SFlag::S_IFREG if files.insert(key) => visit(&path, fd.as_fd()),
            // Symlinks, FIFOs, sockets, devices: only ever held as O_PATH.
            _ => {}
        }
    }
    Ok(walked)
}

fn read_header(file: &File) -> std::io::Result<Option<Header>> {
    let mut bytes = vec![0u8; HEADER_LEN];
    let n = file.read_at(&mut bytes, 0)?;
    Ok(Header::decode(&bytes[..n]).ok())
}

/// The key version of the current slot of `file`'s header, if it is a
/// readable header of a blob of `key`.
fn file_version(file: &File, key: uuid::Uuid) -> Option<u32> {
    let header = read_header(file).ok()??;
    let (_, slot) = header.current().ok()?;
    let blob = BlobHeader::parse(&slot.blob).ok()?;
    (blob.key_id == key).then_some(blob.version)
}

/// Counts files per key version under `root` (see [`walk`]). Files that
/// are not readable headers of this key, and entries the walk could not
/// examine, count as unreadable.
///
/// # Errors
/// The root cannot be opened or listed, or the key source cannot name its
/// active version.
pub fn versions(root: &Path, keys: &dyn KeySource) -> Result<FsVersionsInfo> {
    let key_id = keys.key_id();
    let active_version = keys.active_version().map_err(|source| Error::Key {
        path: root.to_path_buf(),
        source,
    })?;
    let mut counts = BTreeMap::new();
    let mut unreadable = 0;
    let walked = walk(root, |_, fd| {
        let file = reopen_regular(fd, false).ok();
        match file.and_then(|f| file_version(&f, key_id)) {
            Some(v) => *counts.entry(v).or_insert(0u64) += 1,
            None => unreadable += 1,
        }
    })?;
    Ok(FsVersionsInfo {
        key_id,
        active_version,
        counts: counts.into_iter().collect(),
        unreadable: unreadable + walked.not_examined,
    })
}

/// What happened to one file during a rewrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrapped {
    Done,
    AlreadyCurrent,
}

/// Re-wraps every header under `root` (see [`walk`]) whose blob is older
/// than the active version, calling `progress(done, total)` after each
/// file. Files that fail, and entries the walk could not examine, are
/// counted as failed and logged, and the walk goes on.
///
/// `total` comes from a first, counting walk; files that appear during
/// the rewrap raise it so that `done <= total` always holds.
///
/// # Errors
/// The root cannot be opened or listed, or the active version is unknown.
pub fn rewrap(root: &Path, keys: &dyn KeySource, mut progress: impl FnMut(u64, u64)) -> Result<FsRewrapInfo> {
    let active = keys.active_version().map_err(|source| Error::Key {
        path: root.to_path_buf(),
        source,
    })?;
    let names_file = rewrap_names_file(root, keys, active);
    let mut total = 0u64;
    walk(root, |_, _| total += 1)?;
    let mut done = 0u64;
    let mut info = FsRewrapInfo {
        rewrapped: 0,
        already_current: 0,
        failed: 0,
    };
    let walked = walk(root, |path, fd| {
        let result = reopen_regular(fd, true)
            .map_err(Error::from)
            .and_then(|file| rewrap_file(&file, path, keys, active));
        match result {
            Ok(Rewrapped::Done) => info.rewrapped += 1,
            Ok(Rewrapped::AlreadyCurrent) => info.already_current += 1,
            Err(e) => {
                info.failed += 1;
                tracing::warn!(path = %path.display(), error = %crate::fs::describe(&e), "rewrap failed");
            }
        }
        done += 1;
        total = total.max(done);
        progress(done, total);
    })?;
    info.failed += walked.not_examined;
    // The counts are of files; the name key shows only when it fails.
    match names_file {
        None | Some(Ok(Rewrapped::AlreadyCurrent)) => {}
        Some(Ok(Rewrapped::Done)) => tracing::info!("name key re-wrapped"),
        Some(Err(e)) => {
            info.failed += 1;
            tracing::warn!(error = %crate::fs::describe(&e), "rewrap of the name key failed");
        }
    }
    Ok(info)
}

/// Re-wraps the name key in `root/kmsd.names`, if there is one (same
/// slots and crash argument as a file header).
fn rewrap_names_file(root: &Path, keys: &dyn KeySource, active: u32) -> Option<Result<Rewrapped>> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = match openat(AT_FDCWD, root, flags, Mode::empty()) {
        Ok(dir) => dir,
        Err(e) => return Some(Err(e.into())),
    };
    let fd = match open_entry(dir.as_fd(), OsStr::new(crate::names::ROOT_FILE)) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return None,
        Err(e) => return Some(Err(e.into())),
    };
    let path = root.join(crate::names::ROOT_FILE);
    Some(
        reopen_regular(fd.as_fd(), true)
            .map_err(Error::from)
            .and_then(|file| rewrap_with(&file, &path, keys, active, crate::names::names_context)),
    )
}

/// Re-wraps one file, open for reading and writing (`path` is for errors
/// and logs only): the new blob goes into the older slot with the next
/// sequence number, then `fdatasync`. The current slot is never written,
/// so a kill at any point leaves a valid header.
///
/// # Errors
/// `EINVAL` if `file` is not a regular file, a damaged header, a key
/// source failure, or a new blob that does not unwrap to the same DEK
/// (then nothing is written).
pub fn rewrap_file(file: &File, path: &Path, keys: &dyn KeySource, active: u32) -> Result<Rewrapped> {
    rewrap_with(file, path, keys, active, |id| {
        file_context(id, crate::format::FORMAT_VERSION)
    })
}

/// [`rewrap_file`] for a header whose blob's context is `context(id)`
/// (format version 2 headers; version 1 files keep their own context).
fn rewrap_with(
    file: &File,
    path: &Path,
    keys: &dyn KeySource,
    active: u32,
    context: impl Fn(&crate::keys::FileId) -> kms_client::proto::Context,
) -> Result<Rewrapped> {
    let tampered = |source| Error::Tampered {
        path: path.to_path_buf(),
        source,
    };
    let key_err = |source| Error::Key {
        path: path.to_path_buf(),
        source,
    };
    if file_type(&fstat(file)?) != SFlag::S_IFREG {
        return Err(Error::Sys(Errno::EINVAL));
    }
    // Not over a key change in progress: its older slot holds the previous
    // DEK, which blocks not yet re-sealed still need.
    let mut bytes = vec![0u8; HEADER_LEN];
    let n = file.read_at(&mut bytes, 0)?;
    let header = Header::decode(&bytes[..n]).map_err(tampered)?;
    if header.version == crate::format::FORMAT_V1 && crate::file::v1_changing(&bytes[..n]) {
        tracing::warn!(path = %path.display(), "not re-wrapped: the file is moving to a fresh DEK; run fs rewrap again later");
        return Err(Error::Sys(Errno::EBUSY));
    }
    let (_, slot) = header.current().map_err(tampered)?;
    let blob = BlobHeader::parse(&slot.blob).map_err(|e| key_err(KeyError::DecryptFailed(e.to_string())))?;
    if blob.key_id == keys.key_id() && blob.version == active {
        return Ok(Rewrapped::AlreadyCurrent);
    }
    let ctx = if header.version == crate::format::FORMAT_VERSION {
        context(&header.file_id)
    } else {
        file_context(&header.file_id, header.version)
    };
    let new_blob = keys.rewrap(&ctx, &slot.blob).map_err(key_err)?;
    let before = keys.unwrap_dek(&ctx, &slot.blob).map_err(key_err)?;
    let after = keys.unwrap_dek(&ctx, &new_blob).map_err(key_err)?;
    if before != after {
        let why = "re-wrapped blob holds a different key".to_string();
        return Err(key_err(KeyError::DecryptFailed(why)));
    }
    let (index, next) = header.next_slot(new_blob).map_err(tampered)?;
    // The key requests above ran without the lock that orders header
    // writes in this process; under it, the header must be as read (a key
    // change may have started meanwhile).
    let _header = crate::file::HEADER_WRITES.lock();
    let mut now = vec![0u8; HEADER_LEN];
    let m = file.read_at(&mut now, 0)?;
    if now[..m] != bytes[..n] {
        tracing::warn!(path = %path.display(), "not re-wrapped: the header changed meanwhile; run fs rewrap again");
        return Err(Error::Sys(Errno::EBUSY));
    }
    file.write_all_at(&encode_slot(&next), slot_offset(index))?;
    file.sync_data()?;
    Ok(Rewrapped::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::EncryptedFile;
    use crate::keys::MemoryKeySource;

    fn make(dir: &Path, name: &str, keys: &MemoryKeySource, data: &[u8]) {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        EncryptedFile::create(file, keys).unwrap().write(0, data).unwrap();
    }

    fn read(path: &Path, keys: &MemoryKeySource) -> Vec<u8> {
        let file = OpenOptions::new().read(true).open(path).unwrap();
        let f = EncryptedFile::open(file, keys).unwrap();
        f.read(0, u32::MAX).unwrap()
    }

    #[test]
    fn versions_rotation_and_rewrap() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MemoryKeySource::default();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        make(dir.path(), "a", &keys, b"one");
        keys.rotate();
        make(dir.path(), "sub/b", &keys, b"two");
        std::fs::write(dir.path().join("junk"), b"not encrypted").unwrap();
        let v = versions(dir.path(), &keys).unwrap();
        assert_eq!(
            (v.active_version, v.counts.clone(), v.unreadable),
            (2, vec![(1, 1), (2, 1)], 1)
        );

        let before = std::fs::read(dir.path().join("a")).unwrap();
        let mut seen = Vec::new();
        let info = rewrap(dir.path(), &keys, |d, t| seen.push((d, t))).unwrap();
        assert_eq!((info.rewrapped, info.already_current, info.failed), (1, 1, 1));
        assert_eq!(seen.last(), Some(&(3, 3)));
        let after = std::fs::read(dir.path().join("a")).unwrap();
        assert_eq!(before[HEADER_LEN..], after[HEADER_LEN..], "data blocks untouched");
        assert_eq!(versions(dir.path(), &keys).unwrap().counts, vec![(2, 2)]);
        assert_eq!(read(&dir.path().join("a"), &keys), b"one");
        assert_eq!(read(&dir.path().join("sub/b"), &keys), b"two");
    }

    #[test]
    fn torn_rewrap_leaves_old_slot_readable() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MemoryKeySource::default();
        make(dir.path(), "a", &keys, b"data");
        keys.rotate();
        let path = dir.path().join("a");
        let rw = || OpenOptions::new().read(true).write(true).open(&path).unwrap();
        rewrap_file(&rw(), &path, &keys, 2).unwrap();
        keys.rotate();
        // Simulate a kill halfway through writing the next slot (slot 0).
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xAA; 100], slot_offset(0)).unwrap();
        assert_eq!(read(&path, &keys), b"data");
        assert_eq!(versions(dir.path(), &keys).unwrap().counts, vec![(2, 1)]);
        assert_eq!(rewrap_file(&rw(), &path, &keys, 3).unwrap(), Rewrapped::Done);
        assert_eq!(versions(dir.path(), &keys).unwrap().counts, vec![(3, 1)]);
        assert_eq!(read(&path, &keys), b"data");
    }

    fn walked(root: &Path) -> (Vec<PathBuf>, Walked) {
        let mut seen = Vec::new();
        let w = walk(root, |path, fd| {
            assert!(reopen_regular(fd, false).is_ok());
            seen.push(path.strip_prefix(root).unwrap().to_path_buf());
        })
        .unwrap();
        (seen, w)
    }

    #[test]
    fn walk_visits_regular_files_once_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("b"), b"").unwrap();
        std::fs::write(root.join("d/e/c"), b"").unwrap();
        std::fs::hard_link(root.join("b"), root.join("d/hard")).unwrap();
        std::os::unix::fs::symlink(root.join("d"), root.join("a-link")).unwrap();
        std::os::unix::fs::symlink("/", root.join("d/root-link")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let (seen, w) = walked(root);
        assert_eq!(seen, [Path::new("b"), Path::new("d/e/c")]);
        assert_eq!(w.not_examined, 0);
        // A symlink as the root is refused, not followed.
        assert!(walk(&root.join("a-link"), |_, _| {}).is_err());
    }

    #[test]
    fn walk_stops_descending_at_max_depth() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..MAX_DEPTH + 3 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), b"").unwrap();
        std::fs::write(dir.path().join("top"), b"").unwrap();
        let (seen, w) = walked(dir.path());
        assert_eq!((seen, w.not_examined), (vec![PathBuf::from("top")], 1));
        let keys = MemoryKeySource::default();
        assert_eq!(versions(dir.path(), &keys).unwrap().unreadable, 2);
    }

    #[test]
    fn fifo_is_neither_reopened_nor_rewrapped() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(AT_FDCWD, &fifo, flags, Mode::empty()).unwrap();
        let e = reopen_regular(fd.as_fd(), true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let keys = MemoryKeySource::default();
        assert_eq!(rewrap_file(&rw, &fifo, &keys, 1).unwrap_err().errno(), libc::EINVAL);
    }
}
