//! The inode table: FUSE inode numbers mapped to `O_PATH` descriptors of
//! backing inodes.
//!
//! Holding a descriptor rather than a path means renames (of the file or of
//! any directory above it) and unlinks need no bookkeeping, and an inode
//! cannot be reused by the backing filesystem while the kernel still knows
//! it. Backing `(dev, ino)` pairs map to one FUSE inode, so hard links share
//! an inode (and a page cache). Entries live until the kernel forgets them.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::stat::{FileStat, SFlag};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// FUSE's root inode number.
pub const ROOT: u64 = 1;

/// One backing inode the kernel knows about.
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
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The backing path now, for logs (may end in " (deleted)").
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

#[derive(Debug)]
struct Entry {
    node: Arc<Node>,
    key: (u64, u64),
    nlookup: u64,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

/// All inodes the kernel currently holds references to.
#[derive(Debug)]
pub struct InodeTable {
    inner: Mutex<Inner>,
}

fn key_of(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

impl InodeTable {
    /// A table holding only the root, which is never forgotten.
    pub fn new(root: OwnedFd, st: &FileStat) -> Self {
        let mut inner = Inner {
            next: ROOT + 1,
            ..Inner::default()
        };
        let node = Arc::new(Node {
            fd: root,
            mode: st.st_mode,
        });
        inner.by_key.insert(key_of(st), ROOT);
        inner.nodes.insert(
            ROOT,
            Entry {
                node,
                key: key_of(st),
                nlookup: 1,
            },
        );
        Self {
            inner: Mutex::new(inner),
        }
    }

    /// The node for `ino`.
    ///
    /// # Errors
    /// `ESTALE` when the kernel names an inode it has forgotten.
    pub fn get(&self, ino: u64) -> Result<Arc<Node>> {
        let inner = self.inner.lock();
        let entry = inner.nodes.get(&ino).ok_or(Error::Sys(nix::Error::ESTALE))?;
        Ok(entry.node.clone())
    }

    /// Records one more kernel reference to the inode behind `fd` (whose
    /// stat is `st`) and returns its number. An already known inode keeps
    /// its first descriptor; `fd` is then closed.
    pub fn remember(&self, fd: OwnedFd, st: &FileStat) -> u64 {
        let mut inner = self.inner.lock();
        if let Some(&ino) = inner.by_key.get(&key_of(st)) {
            inner.nodes.get_mut(&ino).expect("indexed").nlookup += 1;
            return ino;
        }
        let ino = inner.next;
        inner.next += 1;
        let node = Arc::new(Node { fd, mode: st.st_mode });
        inner.by_key.insert(key_of(st), ino);
        let key = key_of(st);
        inner.nodes.insert(ino, Entry { node, key, nlookup: 1 });
        ino
    }

    /// Drops `n` kernel references; the descriptor closes at zero.
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
            inner.nodes.remove(&ino);
            inner.by_key.remove(&key);
        }
    }

    /// Number of inodes held, the root included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::{fstat, Mode};

    fn path_fd(p: &std::path::Path) -> (OwnedFd, FileStat) {
        let fd = open(p, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let st = fstat(&fd).unwrap();
        (fd, st)
    }

    #[test]
    fn same_backing_inode_gets_same_number_and_counts_lookups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let (root, st) = path_fd(dir.path());
        let table = InodeTable::new(root, &st);
        let (fa, sa) = path_fd(&dir.path().join("a"));
        let (fb, sb) = path_fd(&dir.path().join("b"));
        let ino = table.remember(fa, &sa);
        assert_eq!(table.remember(fb, &sb), ino);
        assert!(table.get(ino).unwrap().is_file());
        table.forget(ino, 1);
        assert!(table.get(ino).is_ok());
        table.forget(ino, 1);
        assert!(table.get(ino).is_err());
        table.forget(ROOT, 100);
        assert_eq!(table.len(), 1);
    }
}
