//! The undo journal: `kmsd.journal` in the backing root keeps the old
//! sealed bytes of the blocks a write rewrites in place while it keeps some
//! of their old plaintext, so that a kill tearing that `pwrite` (Linux may
//! cut it at a page boundary when a fatal signal arrives) loses none of
//! those bytes. Layout and reasoning: FORMAT.md, "The undo journal".
//!
//! Slots are fixed size (a record's CRC-like check is SHA-256 cut to 8 bytes); a write takes a free one, writes its record, writes
//! its blocks in place and clears the slot's magic. Records found when the
//! filesystem starts stay in memory, by file id, until that file is next
//! opened, which puts back the blocks that no longer authenticate
//! ([`crate::file::EncryptedFile::open_journaled`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use parking_lot::Mutex;

use sha2::{Digest, Sha256};

use crate::keys::FileId;

/// The journal's name in the backing root.
pub const JOURNAL_FILE: &str = "kmsd.journal";
/// Bytes per slot: three pages, room for two blocks of either layout.
pub const SLOT_LEN: u64 = 3 * 4096;
const MAGIC: &[u8; 8] = b"KMSJRNL1";
/// Slots the journal may grow to. Writes beyond it (more concurrent writers
/// plus pending records than this) go unprotected, with a warning.
pub const MAX_SLOTS: u64 = 1024;
/// The most blocks one record holds.
pub const MAX_BLOCKS: usize = 2;
/// The largest sealed block a record holds (a version 2 block).
const MAX_BLOCK_LEN: usize = 4096 + 40;

/// What a write is about to change: the file (its id and backing inode),
/// its backing length before the write, the two ranges of blocks (first,
/// last; inclusive) it writes in place, and the blocks (index, sealed bytes
/// as on disk) whose old plaintext it keeps in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub file_id: FileId,
    pub ino: u64,
    pub old_len: u64,
    pub written: [(u64, u64); 2],
    pub blocks: Vec<(u64, Vec<u8>)>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.blocks.iter().map(|b| b.1.len() + 10).sum::<usize>());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.file_id);
        out.extend_from_slice(&self.ino.to_be_bytes());
        out.extend_from_slice(&self.old_len.to_be_bytes());
        for (first, last) in self.written {
            out.extend_from_slice(&first.to_be_bytes());
            out.extend_from_slice(&last.to_be_bytes());
        }
        out.extend_from_slice(&(self.blocks.len() as u16).to_be_bytes());
        for (index, bytes) in &self.blocks {
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(bytes);
        }
        let check = check(&out);
        out.extend_from_slice(&check);
        out
    }

    /// A record from a slot's bytes; `None` for a free, torn or foreign slot.
    fn decode(slot: &[u8]) -> Option<Self> {
        let mut rest = slot;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = rest.split_at_checked(n)?;
            rest = tail;
            Some(head)
        };
        if take(8)? != MAGIC {
            return None;
        }
        let file_id: FileId = take(16)?.try_into().ok()?;
        let mut u64_at = || Some(u64::from_be_bytes(take(8)?.try_into().ok()?));
        let ino = u64_at()?;
        let old_len = u64_at()?;
        let written = [(u64_at()?, u64_at()?), (u64_at()?, u64_at()?)];
        let count = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
        if count == 0 || count > MAX_BLOCKS {
            return None;
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let index = u64::from_be_bytes(take(8)?.try_into().ok()?);
            let len = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
            if len > MAX_BLOCK_LEN {
                return None;
            }
            blocks.push((index, take(len)?.to_vec()));
        }
        let stored = take(CHECK_LEN)?;
        let body = slot.len() - rest.len() - CHECK_LEN;
        (check(&slot[..body])[..] == *stored).then_some(Self {
            file_id,
            ino,
            old_len,
            written,
            blocks,
        })
    }
}

const CHECK_LEN: usize = 8;

/// The integrity check of a record: the first 8 bytes of its SHA-256 (a
/// torn or stale slot, not an attacker: records authenticate by their
/// blocks' tags).
fn check(bytes: &[u8]) -> [u8; CHECK_LEN] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest[..CHECK_LEN]);
    out
}

/// A record found when the journal was opened, not yet resolved.
#[derive(Debug)]
pub struct Pending {
    pub slot: u64,
    pub record: Record,
}

#[derive(Debug, Default)]
struct State {
    /// Slots in the file.
    slots: u64,
    /// Slots free for a new record.
    free: Vec<u64>,
    /// Records found at open, by file.
    pending: HashMap<FileId, Vec<Pending>>,
    /// Whether "journal full" was logged.
    warned: bool,
}

/// The undo journal of one backing directory.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
}

/// A slot holding the record of a write in progress: [`Journal::finish`]
/// clears it once every block was written in place.
#[derive(Debug)]
#[must_use]
pub struct Slot(u64);

impl Journal {
    /// Opens (or creates, mode 0600) `kmsd.journal` in the backing root
    /// `root` without following links, and reads the records a kill left.
    /// `None`, logged, when the name holds something else than a journal
    /// (a plain mount's own file of that name is never written to).
    ///
    /// # Errors
    /// The journal cannot be created or read.
    pub fn open(root: &OwnedFd, root_path: &Path) -> std::io::Result<Option<Self>> {
        let path = root_path.join(JOURNAL_FILE);
        // Never open what is there unless it is a regular file (opening a
        // device or a FIFO can block or act).
        match nix::sys::stat::fstatat(root.as_fd(), JOURNAL_FILE, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => {
                tracing::error!(path = %path.display(), "not a regular file: running without the undo journal");
                return Ok(None);
            }
            Ok(_) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = match openat(root.as_fd(), JOURNAL_FILE, flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => fd,
            Err(nix::Error::ELOOP | nix::Error::EISDIR | nix::Error::ENXIO) => {
                tracing::error!(path = %path.display(), "not a regular file: running without the undo journal");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let file = File::from(fd);
        let md = file.metadata()?;
        let euid = nix::unistd::geteuid().as_raw();
        if !md.file_type().is_file() || md.uid() != euid || md.nlink() != 1 || md.mode() & 0o077 != 0 {
            tracing::error!(
                path = %path.display(),
                "not a private regular file of this process's user with one link: running without the undo journal"
            );
            return Ok(None);
        }
        let len = md.len();
        // A length between slots is a growth a kill cut short: that last
        // slot is free.
        if len > MAX_SLOTS * SLOT_LEN {
            tracing::error!(path = %path.display(), len, "not a journal (length): running without the undo journal");
            return Ok(None);
        }
        let mut state = State {
            slots: len.div_ceil(SLOT_LEN),
            ..State::default()
        };
        let mut buf = vec![0u8; SLOT_LEN as usize];
        for slot in 0..state.slots {
            let n = read_up_to(&file, &mut buf, slot * SLOT_LEN)?;
            match Record::decode(&buf[..n]) {
                Some(record) => state
                    .pending
                    .entry(record.file_id)
                    .or_default()
                    .push(Pending { slot, record }),
                None if buf[..n].iter().all(|&b| b == 0) || buf[..8] == [0; 8] => state.free.push(slot),
                None if buf[..MAGIC.len()] == *MAGIC => state.free.push(slot),
                None => {
                    tracing::error!(path = %path.display(), slot, "not a journal (a slot holds something else): running without the undo journal");
                    return Ok(None);
                }
            }
        }
        // Lowest slots first, so the file stays as small as the load.
        state.free.sort_unstable_by(|a, b| b.cmp(a));
        let pending: usize = state.pending.values().map(Vec::len).sum();
        if pending > 0 {
            tracing::info!(path = %path.display(), records = pending, "undo journal holds records of writes a kill interrupted; each is resolved when its file is next opened");
        }
        Ok(Some(Self {
            file,
            path,
            state: Mutex::new(state),
        }))
    }

    /// Writes `record` into a free slot (the journal grows by one if none
    /// is). `None` when the journal is full: the write goes on unprotected.
    ///
    /// # Errors
    /// The record cannot be written; the caller must not write in place.
    pub fn begin(&self, record: &Record) -> std::io::Result<Option<Slot>> {
        let bytes = record.encode();
        debug_assert!(bytes.len() as u64 <= SLOT_LEN);
        let slot = {
            let mut s = self.state.lock();
            match s.free.pop() {
                Some(slot) => slot,
                None if s.slots < MAX_SLOTS => {
                    s.slots += 1;
                    s.slots - 1
                }
                None => {
                    if !std::mem::replace(&mut s.warned, true) {
                        tracing::warn!(path = %self.path.display(), "undo journal full: writes go on without it until records are resolved");
                    }
                    return Ok(None);
                }
            }
        };
        match self.file.write_all_at(&bytes, slot * SLOT_LEN) {
            Ok(()) => Ok(Some(Slot(slot))),
            Err(e) => {
                self.release(slot);
                Err(e)
            }
        }
    }

    /// The write of `slot` is done: its record goes (one 8-byte write,
    /// which a signal cannot cut) and the slot is free again. If even that
    /// fails the slot stays taken; its record is resolved after a restart.
    pub fn finish(&self, slot: Slot) {
        if self.file.write_all_at(&[0u8; 8], slot.0 * SLOT_LEN).is_ok() {
            self.release(slot.0);
        }
    }

    /// The records of `file_id` left by an earlier run, to resolve.
    pub fn take(&self, file_id: &FileId) -> Vec<Pending> {
        self.state.lock().pending.remove(file_id).unwrap_or_default()
    }

    /// Whether records of earlier runs are waiting for `file_id`.
    pub fn has_pending(&self, file_id: &FileId) -> bool {
        self.state.lock().pending.contains_key(file_id)
    }

    /// A pending record was resolved: its slot is cleared and freed.
    pub fn resolved(&self, pending: Pending) {
        self.finish(Slot(pending.slot));
    }

    /// A pending record could not be resolved now: it waits for the next
    /// open of its file.
    pub fn unresolved(&self, pending: Pending) {
        let mut s = self.state.lock();
        s.pending.entry(pending.record.file_id).or_default().push(pending);
    }

    fn release(&self, slot: u64) {
        self.state.lock().free.push(slot);
    }

    /// Slots in the file and records waiting (for tests and stats).
    pub fn usage(&self) -> (u64, usize) {
        let s = self.state.lock();
        (s.slots, s.pending.values().map(Vec::len).sum())
    }
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(dir: &Path) -> OwnedFd {
        openat(
            nix::fcntl::AT_FDCWD,
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap()
    }

    fn record(id: u8, blocks: usize) -> Record {
        Record {
            file_id: [id; 16],
            ino: 77,
            old_len: 512 + 4136 + 7,
            written: [(0, 9), (9, 9)],
            blocks: (0..blocks).map(|i| (i as u64 * 9, vec![id ^ i as u8; 4136])).collect(),
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        for n in 1..=MAX_BLOCKS {
            let r = record(3, n);
            let bytes = r.encode();
            assert!(bytes.len() as u64 <= SLOT_LEN);
            assert_eq!(Record::decode(&bytes), Some(r.clone()));
            for cut in [0, 8, 30, bytes.len() - 1] {
                assert_eq!(Record::decode(&bytes[..cut]), None, "cut at {cut}");
            }
            let mut flipped = bytes.clone();
            flipped[40] ^= 1;
            assert_eq!(Record::decode(&flipped), None);
        }
    }

    #[test]
    fn a_record_left_behind_is_found_by_its_file_and_finished_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let fd = root(dir.path());
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        let done = j.begin(&record(1, 1)).unwrap().unwrap();
        let left = j.begin(&record(2, 2)).unwrap().unwrap();
        j.finish(done);
        // Reused: the finished slot, not a third one.
        let again = j.begin(&record(4, 1)).unwrap().unwrap();
        j.finish(again);
        assert_eq!(j.usage(), (2, 0));
        drop(left); // a kill: never finished
        drop(j);
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        assert_eq!(j.usage(), (2, 1));
        assert!(j.take(&[1; 16]).is_empty());
        let found = j.take(&[2; 16]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].record, record(2, 2));
        j.resolved(found.into_iter().next().unwrap());
        drop(j);
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        assert_eq!(j.usage(), (2, 0));
    }

    #[test]
    fn a_file_of_that_name_that_is_not_a_journal_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let fd = root(dir.path());
        let path = dir.path().join(JOURNAL_FILE);
        std::fs::write(&path, b"someone's file").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert!(Journal::open(&fd, dir.path()).unwrap().is_none());
        std::fs::write(&path, vec![7u8; SLOT_LEN as usize]).unwrap();
        assert!(Journal::open(&fd, dir.path()).unwrap().is_none());
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; SLOT_LEN as usize]);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        assert!(Journal::open(&fd, dir.path()).unwrap().is_none());
    }
}
