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

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode};
use parking_lot::{Condvar, Mutex};

use sha2::{Digest, Sha256};

use crate::file::read_up_to;
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
/// The longest range of blocks a record may name (a FUSE write is at most
/// 128 KiB, 33 blocks).
pub const MAX_RANGE: u64 = 1024;

/// This boot's id (`/proc/sys/kernel/random/boot_id`), all zeros if it
/// cannot be read (then no record is ever trusted across a restart: a zero
/// boot id never matches, see [`Journal::open`]).
pub fn boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
        .map_or([0; 16], |u| *u.as_bytes())
}

/// The boot id of a *durable* record: written and fsynced before its
/// write, cleared and fsynced after the file was, so it is never older than
/// the file and holds across a power cut (a key change's re-seals, whose
/// blocks hold bytes fsynced earlier; FORMAT.md). Boot ids are random
/// UUIDs (version 4), never all ones.
pub const DURABLE: [u8; 16] = [0xFF; 16];

/// What a write is about to change: the file (its id and backing inode),
/// its backing length before the write, the two ranges of blocks (first,
/// last; inclusive) it writes in place, and the blocks (index, sealed bytes
/// as on disk) whose old plaintext it keeps in part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The boot the write happened in: records of another boot are
    /// dropped (a power cut, not a kill, came between; the journal is not
    /// fsynced and may be older than the file). [`DURABLE`] records hold
    /// in every boot.
    pub boot: [u8; 16],
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
        out.extend_from_slice(&self.boot);
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
        let boot: [u8; 16] = take(16)?.try_into().ok()?;
        let file_id: FileId = take(16)?.try_into().ok()?;
        let mut u64_at = || Some(u64::from_be_bytes(take(8)?.try_into().ok()?));
        let ino = u64_at()?;
        let old_len = u64_at()?;
        let written = [(u64_at()?, u64_at()?), (u64_at()?, u64_at()?)];
        // A write through the mount spans at most 33 blocks; a longer range
        // is not one of ours, and would make its check read without bound.
        if written
            .iter()
            .any(|&(first, last)| last < first || last - first > MAX_RANGE)
        {
            return None;
        }
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
            boot,
            file_id,
            ino,
            old_len,
            written,
            blocks,
        })
    }
}

/// The id of the mount `fd` is on (`statx` `STATX_MNT_ID`).
fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    // SAFETY: all-zero bytes are a valid `statx` (integers only).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, a NUL-terminated empty path with
    // AT_EMPTY_PATH, and `stx` writable for the call.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    (r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
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
    /// Files whose records an opener is resolving: other openers wait.
    resolving: HashSet<FileId>,
    /// Slots whose clearing failed, by file: their records are stale
    /// while they stay, so the file takes no write until they clear.
    stuck: HashMap<FileId, Vec<u64>>,
    /// Whether "journal full" was logged.
    warned: bool,
}

/// The undo journal of one backing directory.
#[derive(Debug)]
pub struct Journal {
    file: File,
    /// The device of the journal's filesystem: records name files by inode
    /// number, which is unique on one filesystem only, so only files on
    /// this one use the journal ([`Journal::covers`]).
    dev: u64,
    /// The journal's mount, when its filesystem is overlayfs.
    overlay_mount: Option<u64>,
    path: PathBuf,
    boot: [u8; 16],
    state: Mutex<State>,
    resolved: Condvar,
}

/// A slot holding the record of a write in progress: [`Journal::finish`]
/// clears it once every block was written in place.
#[derive(Debug)]
#[must_use]
pub struct Slot(u64);

/// Held by the opener resolving a file's records; others wait until it
/// is dropped.
#[derive(Debug)]
pub struct Resolving<'a> {
    journal: &'a Journal,
    file_id: FileId,
    /// Whether this opener marked the file (it had records).
    owns: bool,
    /// The records to resolve.
    pub records: Vec<Pending>,
}

impl Drop for Resolving<'_> {
    fn drop(&mut self) {
        if !self.owns {
            return;
        }
        let mut s = self.journal.state.lock();
        for p in self.records.drain(..) {
            s.pending.entry(p.record.file_id).or_default().push(p);
        }
        s.resolving.remove(&self.file_id);
        drop(s);
        self.journal.resolved.notify_all();
    }
}

impl Resolving<'_> {
    /// A record was resolved: its slot is cleared and freed; a durable
    /// record's clearing is made durable too (the caller fsynced the file
    /// first), or it could come back after a power cut and undo later
    /// writes of its block.
    pub fn resolved(&mut self, index: usize) {
        let p = self.records.remove(index);
        if p.record.boot == DURABLE {
            self.journal.finish_durable(vec![Slot(p.slot)], &p.record.file_id);
        } else {
            self.journal.finish(Slot(p.slot), &p.record.file_id);
        }
    }
}

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
        // One mount per backing directory uses it: a second one would take
        // the first one's slots and undo its writes in progress.
        // SAFETY: a valid descriptor; flock takes no pointers.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            tracing::error!(path = %path.display(), "the undo journal is in use by another process (is this backing directory mounted twice?): running without it");
            return Ok(None);
        }
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
        let boot = boot_id();
        let mut other_boot = 0;
        let mut buf = vec![0u8; SLOT_LEN as usize];
        for slot in 0..state.slots {
            let n = read_up_to(&file, &mut buf, slot * SLOT_LEN)?;
            let head = &buf[..n.min(MAGIC.len())];
            match Record::decode(&buf[..n]) {
                Some(record) if (record.boot == boot && boot != [0; 16]) || record.boot == DURABLE => {
                    state
                        .pending
                        .entry(record.file_id)
                        .or_default()
                        .push(Pending { slot, record });
                }
                Some(_) => {
                    other_boot += 1;
                    state.free.push(slot);
                }
                // Free: never used, cleared, or a record a kill tore.
                None if head.iter().all(|&b| b == 0) || *head == MAGIC[..head.len()] => state.free.push(slot),
                None => {
                    tracing::error!(path = %path.display(), slot, "not a journal (a slot holds something else): running without the undo journal");
                    return Ok(None);
                }
            }
        }
        // Lowest slots first, so the file stays as small as the load.
        state.free.sort_unstable_by(|a, b| b.cmp(a));
        if other_boot > 0 {
            tracing::info!(path = %path.display(), records = other_boot, "undo journal: records of an earlier boot dropped (after a power cut FORMAT.md's power-loss rule applies)");
        }
        let pending: usize = state.pending.values().map(Vec::len).sum();
        if pending > 0 {
            tracing::info!(path = %path.display(), records = pending, "undo journal holds records of writes a kill interrupted; each is resolved when its file is next opened");
        }
        let overlay_mount = nix::sys::statfs::fstatfs(&file)
            .is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
            .then(|| mount_id(file.as_fd()))
            .flatten();
        Ok(Some(Self {
            file,
            dev: md.dev(),
            overlay_mount,
            path,
            boot,
            state: Mutex::new(state),
            resolved: Condvar::new(),
        }))
    }

    /// Writes `record` into a free slot (the journal grows by one if none
    /// is). `None` when the journal is full: the write goes on unprotected.
    ///
    /// # Errors
    /// The record cannot be written; the caller must not write in place.
    pub fn begin(&self, record: &Record) -> std::io::Result<Option<Slot>> {
        self.begin_as(record, self.boot)
    }

    /// [`Journal::begin`] for a record that must hold across a power cut,
    /// written as [`DURABLE`]. The caller makes it durable with
    /// [`Journal::sync`] before writing in place, and fsyncs the file
    /// before [`Journal::finish_durable`].
    ///
    /// # Errors
    /// As `begin`.
    pub fn begin_durable(&self, record: &Record) -> std::io::Result<Option<Slot>> {
        self.begin_as(record, DURABLE)
    }

    /// Flushes the journal to stable storage.
    ///
    /// # Errors
    /// The `fdatasync` fails.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// [`Journal::finish`] of durable records, made durable with one
    /// fsync: a record that came back after a power cut could undo later
    /// writes of its block. If that fails the slots stay taken, as when
    /// one cannot be cleared.
    pub fn finish_durable(&self, slots: Vec<Slot>, file_id: &FileId) {
        let cleared = slots
            .iter()
            .all(|slot| self.file.write_all_at(&[0u8; 8], slot.0 * SLOT_LEN).is_ok())
            && self.file.sync_data().is_ok();
        let mut s = self.state.lock();
        if cleared {
            s.free.extend(slots.iter().map(|slot| slot.0));
        } else {
            tracing::error!(path = %self.path.display(), "cannot clear durable undo journal records; the file's writes fail until they clear");
            s.stuck
                .entry(*file_id)
                .or_default()
                .extend(slots.iter().map(|slot| slot.0));
        }
    }

    fn begin_as(&self, record: &Record, boot: [u8; 16]) -> std::io::Result<Option<Slot>> {
        let mut record = record.clone();
        record.boot = boot;
        let bytes = record.encode();
        debug_assert!(bytes.len() as u64 <= SLOT_LEN);
        let slot = {
            let mut s = self.state.lock();
            if let Some(stuck) = s.stuck.remove(&record.file_id) {
                let (mut cleared, mut left): (Vec<u64>, Vec<u64>) = stuck
                    .into_iter()
                    .partition(|&slot| self.file.write_all_at(&[0u8; 8], slot * SLOT_LEN).is_ok());
                // Durable records among them must stay cleared.
                if !cleared.is_empty() && self.file.sync_data().is_err() {
                    left.append(&mut cleared);
                }
                s.free.extend(cleared);
                if !left.is_empty() {
                    s.stuck.insert(record.file_id, left);
                    return Err(std::io::Error::other(
                        "the undo journal cannot clear an earlier record of this file",
                    ));
                }
            }
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
                // Maybe half written: cleared before reuse, like any.
                self.finish(Slot(slot), &record.file_id);
                Err(e)
            }
        }
    }

    /// The write of `slot` is done: its record goes (one 8-byte write,
    /// which a signal cannot cut) and the slot is free again. If even that
    /// fails the record, now stale, must never be applied: the slot stays
    /// taken and the file takes no more writes until it clears.
    pub fn finish(&self, slot: Slot, file_id: &FileId) {
        let cleared = self.file.write_all_at(&[0u8; 8], slot.0 * SLOT_LEN).is_ok();
        let mut s = self.state.lock();
        if cleared {
            s.free.push(slot.0);
        } else {
            tracing::error!(path = %self.path.display(), "cannot clear an undo journal slot; the file's writes fail until it clears");
            s.stuck.entry(*file_id).or_default().push(slot.0);
        }
    }

    /// The records of `file_id` left by an earlier run, to resolve; while
    /// the returned guard lives, other openers of the file wait here.
    pub fn take(&self, file_id: &FileId) -> Resolving<'_> {
        let mut s = self.state.lock();
        while s.resolving.contains(file_id) {
            self.resolved.wait(&mut s);
        }
        let records = s.pending.remove(file_id).unwrap_or_default();
        let owns = !records.is_empty();
        if owns {
            s.resolving.insert(*file_id);
        }
        Resolving {
            journal: self,
            file_id: *file_id,
            owns,
            records,
        }
    }

    /// Whether the file `file` may use the journal: only one on the
    /// journal's own filesystem. Another filesystem below the backing root
    /// (a btrfs snapshot, say, with the same inode numbers and the same
    /// file ids) has inode numbers of its own, so a record could not tell
    /// its files from the root filesystem's. Writes to files elsewhere go
    /// on without the journal, and without key changes.
    ///
    /// The journal's filesystem is its device number, except on overlayfs,
    /// where files of one overlay report the device of the layer they came
    /// from (a file from a lower layer keeps that layer's device even once
    /// copied up): there it is the overlay's mount.
    pub fn covers(&self, file: BorrowedFd<'_>) -> bool {
        match fstat(file) {
            Ok(st) if st.st_dev == self.dev => true,
            Ok(_) => self.overlay_mount.is_some() && mount_id(file) == self.overlay_mount,
            Err(_) => false,
        }
    }

    /// Whether records of a backing inode numbered `ino` wait to be
    /// resolved (checked, in memory, before a removal reads the file's id).
    pub fn has_pending_inode(&self, ino: u64) -> bool {
        let s = self.state.lock();
        !s.pending.is_empty() && s.pending.values().flatten().any(|p| p.record.ino == ino)
    }

    /// The file `file_id`, backing inode `ino`, lost its last link: its
    /// records can never be resolved, and would otherwise keep their slots
    /// for good (durable ones across boots), until the journal filled.
    /// Their slots are cleared (durable ones durably) and freed. Records an
    /// opener is resolving are left to it.
    pub fn forget_file(&self, file_id: &FileId, ino: u64) {
        let gone: Vec<Pending> = {
            let mut s = self.state.lock();
            if s.resolving.contains(file_id) {
                return;
            }
            let Some(records) = s.pending.remove(file_id) else {
                return;
            };
            let (gone, kept): (Vec<Pending>, Vec<Pending>) = records.into_iter().partition(|p| p.record.ino == ino);
            if !kept.is_empty() {
                s.pending.insert(*file_id, kept);
            }
            gone
        };
        if gone.is_empty() {
            return;
        }
        tracing::info!(path = %self.path.display(), records = gone.len(), "undo journal: records of a deleted file dropped");
        let (durable, plain): (Vec<Pending>, Vec<Pending>) = gone.into_iter().partition(|p| p.record.boot == DURABLE);
        for p in plain {
            self.finish(Slot(p.slot), file_id);
        }
        if !durable.is_empty() {
            self.finish_durable(durable.into_iter().map(|p| Slot(p.slot)).collect(), file_id);
        }
    }

    /// Slots in the file and records waiting (for tests and stats).
    pub fn usage(&self) -> (u64, usize) {
        let s = self.state.lock();
        (s.slots, s.pending.values().map(Vec::len).sum())
    }
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
            boot: boot_id(),
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
        j.finish(done, &[1; 16]);
        // Reused: the finished slot, not a third one.
        let again = j.begin(&record(4, 1)).unwrap().unwrap();
        j.finish(again, &[4; 16]);
        assert_eq!(j.usage(), (2, 0));
        drop(left); // a kill: never finished
        drop(j);
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        assert_eq!(j.usage(), (2, 1));
        assert!(j.take(&[1; 16]).records.is_empty());
        // Not resolved: the record waits for the next opener.
        drop(j.take(&[2; 16]));
        let mut found = j.take(&[2; 16]);
        assert_eq!(found.records.len(), 1);
        assert_eq!(found.records[0].record, record(2, 2));
        found.resolved(0);
        drop(found);
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

    /// A record written in another boot is dropped: a power cut came
    /// between, and the unsynced journal may be older than the file.
    #[test]
    fn records_of_another_boot_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let fd = root(dir.path());
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        let slot = j.begin(&record(5, 1)).unwrap().unwrap();
        let _never_finished = slot;
        drop(j);
        // The same record as another boot wrote it.
        let mut old = record(5, 1);
        old.boot = [9; 16];
        let bytes = old.encode();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all_at(&bytes, 0).unwrap();
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        assert_eq!(j.usage(), (1, 0));
        assert!(j.take(&[5; 16]).records.is_empty());
    }

    /// Two openers of one file after a restart: the second waits until the
    /// first has resolved the records, and then finds none.
    #[test]
    fn a_second_opener_waits_for_the_first_to_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let fd = root(dir.path());
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        let _never_finished = j.begin(&record(6, 1)).unwrap().unwrap();
        drop(j);
        let j = Journal::open(&fd, dir.path()).unwrap().unwrap();
        let mut first = j.take(&[6; 16]);
        assert_eq!(first.records.len(), 1);
        std::thread::scope(|s| {
            let second = s.spawn(|| j.take(&[6; 16]).records.len());
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(!second.is_finished(), "the second opener waits");
            first.resolved(0);
            drop(first);
            assert_eq!(second.join().unwrap(), 0);
        });
    }

    /// A second process on the same backing directory gets no journal.
    #[test]
    fn one_process_per_journal() {
        let dir = tempfile::tempdir().unwrap();
        let fd = root(dir.path());
        let _first = Journal::open(&fd, dir.path()).unwrap().unwrap();
        assert!(Journal::open(&fd, dir.path()).unwrap().is_none());
    }
}
