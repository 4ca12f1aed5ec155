//! `fs versions` and `fs rewrap`: walks over a backing directory that read
//! and write only file headers, never data blocks.
//!
//! Both work on the backing directory directly and may run while it is
//! mounted: a rewrap writes only the older header slot, which the mount
//! never reads after a file is open, and the mount never writes headers of
//! existing files.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use kms_client::blob::BlobHeader;
use kms_client::proto::{FsRewrapInfo, FsVersionsInfo};

use crate::error::{Error, Result};
use crate::format::{encode_slot, slot_offset, Header, HEADER_LEN};
use crate::keys::{KeyError, KeySource};

/// Every regular file under `root` once (hard links deduplicated), without
/// following symlinks, in a stable order.
///
/// # Errors
/// A directory cannot be read.
pub fn regular_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

fn read_header(file: &File) -> std::io::Result<Option<Header>> {
    let mut bytes = vec![0u8; HEADER_LEN];
    let n = file.read_at(&mut bytes, 0)?;
    Ok(Header::decode(&bytes[..n]).ok())
}

/// The key version of the current slot of `path`'s header, if it is a
/// readable header of a blob of `key`.
fn file_version(path: &Path, key: uuid::Uuid) -> Option<u32> {
    let header = read_header(&File::open(path).ok()?).ok()??;
    let (_, slot) = header.current().ok()?;
    let blob = BlobHeader::parse(&slot.blob).ok()?;
    (blob.key_id == key).then_some(blob.version)
}

/// Counts files per key version under `root`.
///
/// # Errors
/// The directory walk fails or the key source cannot name its active
/// version.
pub fn versions(root: &Path, keys: &dyn KeySource) -> Result<FsVersionsInfo> {
    let key_id = keys.key_id();
    let active_version = keys.active_version().map_err(|source| Error::Key {
        path: root.to_path_buf(),
        source,
    })?;
    let mut counts = BTreeMap::new();
    let mut unreadable = 0;
    for path in regular_files(root)? {
        match file_version(&path, key_id) {
            Some(v) => *counts.entry(v).or_insert(0u64) += 1,
            None => unreadable += 1,
        }
    }
    Ok(FsVersionsInfo {
        key_id,
        active_version,
        counts: counts.into_iter().collect(),
        unreadable,
    })
}

/// What happened to one file during a rewrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrapped {
    Done,
    AlreadyCurrent,
}

/// Re-wraps every header under `root` whose blob is older than the active
/// version, calling `progress(done, total)` after each file. Files that
/// fail are counted and logged, and the walk goes on.
///
/// # Errors
/// The directory walk fails or the active version is unknown.
pub fn rewrap(root: &Path, keys: &dyn KeySource, mut progress: impl FnMut(u64, u64)) -> Result<FsRewrapInfo> {
    let active = keys.active_version().map_err(|source| Error::Key {
        path: root.to_path_buf(),
        source,
    })?;
    let files = regular_files(root)?;
    let total = files.len() as u64;
    let mut info = FsRewrapInfo {
        rewrapped: 0,
        already_current: 0,
        failed: 0,
    };
    for (i, path) in files.iter().enumerate() {
        match rewrap_file(path, keys, active) {
            Ok(Rewrapped::Done) => info.rewrapped += 1,
            Ok(Rewrapped::AlreadyCurrent) => info.already_current += 1,
            Err(e) => {
                info.failed += 1;
                tracing::warn!(path = %path.display(), error = %crate::fs::describe(&e), "rewrap failed");
            }
        }
        progress(i as u64 + 1, total);
    }
    Ok(info)
}

/// Re-wraps one file: the new blob goes into the older slot with the next
/// sequence number, then `fdatasync`. The current slot is never written,
/// so a kill at any point leaves a valid header.
///
/// # Errors
/// A damaged header, a key source failure, or a new blob that does not
/// unwrap to the same DEK (then nothing is written).
pub fn rewrap_file(path: &Path, keys: &dyn KeySource, active: u32) -> Result<Rewrapped> {
    let tampered = |source| Error::Tampered {
        path: path.to_path_buf(),
        source,
    };
    let key_err = |source| Error::Key {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut bytes = vec![0u8; HEADER_LEN];
    let n = file.read_at(&mut bytes, 0)?;
    let header = Header::decode(&bytes[..n]).map_err(tampered)?;
    let (_, slot) = header.current().map_err(tampered)?;
    let blob = BlobHeader::parse(&slot.blob).map_err(|e| key_err(KeyError::DecryptFailed(e.to_string())))?;
    if blob.key_id == keys.key_id() && blob.version == active {
        return Ok(Rewrapped::AlreadyCurrent);
    }
    let new_blob = keys.rewrap(&header.file_id, &slot.blob).map_err(key_err)?;
    let before = keys.unwrap_dek(&header.file_id, &slot.blob).map_err(key_err)?;
    let after = keys.unwrap_dek(&header.file_id, &new_blob).map_err(key_err)?;
    if before != after {
        let why = "re-wrapped blob holds a different key".to_string();
        return Err(key_err(KeyError::DecryptFailed(why)));
    }
    let (index, next) = header.next_slot(new_blob).map_err(tampered)?;
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
        EncryptedFile::create(file, path, keys).unwrap().write(0, data).unwrap();
    }

    fn read(path: &Path, keys: &MemoryKeySource) -> Vec<u8> {
        let file = OpenOptions::new().read(true).open(path).unwrap();
        let f = EncryptedFile::open(file, path.to_path_buf(), keys).unwrap();
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
        rewrap_file(&path, &keys, 2).unwrap();
        keys.rotate();
        // Simulate a kill halfway through writing the next slot (slot 0).
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xAA; 100], slot_offset(0)).unwrap();
        assert_eq!(read(&path, &keys), b"data");
        assert_eq!(versions(dir.path(), &keys).unwrap().counts, vec![(2, 1)]);
        assert_eq!(rewrap_file(&path, &keys, 3).unwrap(), Rewrapped::Done);
        assert_eq!(versions(dir.path(), &keys).unwrap().counts, vec![(3, 1)]);
        assert_eq!(read(&path, &keys), b"data");
    }
}
