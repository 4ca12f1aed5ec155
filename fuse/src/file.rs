//! One open encrypted file: random-access plaintext reads and writes on top
//! of a backing file descriptor, using the pure functions of [`format`].
//!
//! The plaintext size lives under a per-file `RwLock`: reads share it, and
//! writes and truncates hold it exclusively, so concurrent writers of one
//! file never interleave their read-modify-write of a block or of the
//! last-block flag, while different files never contend. The DEK is held
//! here for as long as the file is open and zeroized when this is dropped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;
use rand::RngCore;

use crate::error::{Error, Result};
use crate::format::{
    self, block_len, block_offset, last_index, open_block_in_place, seal_block, BlockKey, FormatError, Header,
    BLOCK_OVERHEAD, BLOCK_SIZE, HEADER_LEN,
};
use crate::keys::{Dek, FileId, KeySource};

/// Blocks sealed and written per `pwrite` when a write spans many blocks.
const CHUNK_BLOCKS: u64 = 64;

/// An open encrypted file.
#[derive(Debug)]
pub struct EncryptedFile {
    file: File,
    path: PathBuf,
    file_id: FileId,
    /// The DEK's expanded cipher, built once when the file is opened; the
    /// key schedule is zeroized on drop.
    key: BlockKey,
    size: RwLock<u64>,
}

/// What a write puts into its range.
#[derive(Clone, Copy)]
enum Source<'a> {
    Data(&'a [u8]),
    Zeros(u64),
}

impl Source<'_> {
    fn len(&self) -> u64 {
        match self {
            Source::Data(d) => d.len() as u64,
            Source::Zeros(n) => *n,
        }
    }
}

impl EncryptedFile {
    /// Turns a new, empty backing file into an empty encrypted file with a
    /// fresh DEK from `keys`.
    ///
    /// # Errors
    /// The key source refuses, or the header cannot be written.
    pub fn create(file: File, path: PathBuf, keys: &dyn KeySource) -> Result<Self> {
        let mut file_id = FileId::default();
        rand::rngs::OsRng.fill_bytes(&mut file_id);
        let (dek, blob) = keys.new_dek(&file_id).map_err(|source| Error::Key {
            path: path.clone(),
            source,
        })?;
        let header = Header::new(file_id, blob).map_err(|source| Error::Tampered {
            path: path.clone(),
            source,
        })?;
        let mut bytes = header.encode();
        bytes.extend(seal_block(&BlockKey::new(&dek), &file_id, 0, true, &[]));
        file.write_all_at(&bytes, 0)?;
        Ok(Self::assemble(file, path, file_id, dek, 0))
    }

    /// Opens an existing encrypted file: reads its header and unwraps its DEK.
    ///
    /// # Errors
    /// A damaged header or length (`Tampered`), or a DEK that does not
    /// unwrap (`Key`).
    pub fn open(file: File, path: PathBuf, keys: &dyn KeySource) -> Result<Self> {
        let tampered = |source| Error::Tampered {
            path: path.clone(),
            source,
        };
        let mut bytes = vec![0u8; HEADER_LEN];
        let n = read_up_to(&file, &mut bytes, 0)?;
        let header = Header::decode(&bytes[..n]).map_err(tampered)?;
        let size = format::plain_len(file.metadata()?.len()).map_err(tampered)?;
        let (_, slot) = header.current().map_err(tampered)?;
        let dek = keys
            .unwrap_dek(&header.file_id, &slot.blob)
            .map_err(|source| Error::Key {
                path: path.clone(),
                source,
            })?;
        Ok(Self::assemble(file, path, header.file_id, dek, size))
    }

    fn assemble(file: File, path: PathBuf, file_id: FileId, dek: Dek, size: u64) -> Self {
        Self {
            file,
            path,
            file_id,
            key: BlockKey::new(&dek),
            size: RwLock::new(size),
        }
    }

    /// The backing path this file was opened at (for logs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current plaintext size.
    pub fn size(&self) -> u64 {
        *self.size.read()
    }

    /// Reads up to `len` bytes at `offset`; short only at end of file.
    ///
    /// # Errors
    /// I/O errors, or `Tampered` when a block does not authenticate.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let size = self.size.read();
        let end = (*size).min(offset.saturating_add(u64::from(len)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let key = &self.key;
        let first = offset / BLOCK_SIZE as u64;
        let plain = self.read_blocks(key, *size, first, (end - 1) / BLOCK_SIZE as u64)?;
        let skip = (offset - first * BLOCK_SIZE as u64) as usize;
        let mut plain = plain;
        plain.truncate(skip + (end - offset) as usize);
        if skip > 0 {
            plain.drain(..skip);
        }
        Ok(plain)
    }

    /// Decrypts blocks `first..=last` of a file of `size` bytes in one read.
    fn read_blocks(&self, key: &BlockKey, size: u64, first: u64, last: u64) -> Result<Vec<u8>> {
        let start = block_offset(first);
        let end = block_offset(last) + (block_len(size, last) + BLOCK_OVERHEAD) as u64;
        let mut disk = vec![0u8; (end - start) as usize];
        if read_up_to(&self.file, &mut disk, start)? != disk.len() {
            return Err(self.tampered(FormatError::BadLength(start)));
        }
        let final_index = last_index(size);
        let mut out = Vec::with_capacity((last - first + 1) as usize * BLOCK_SIZE);
        for index in first..=last {
            let at = (block_offset(index) - start) as usize;
            let len = block_len(size, index) + BLOCK_OVERHEAD;
            let block = &mut disk[at..at + len];
            let plain = open_block_in_place(key, &self.file_id, index, index == final_index, block)
                .map_err(|e| self.tampered(e))?;
            out.extend_from_slice(plain);
        }
        Ok(out)
    }

    fn tampered(&self, source: FormatError) -> Error {
        Error::Tampered {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `data` at `offset`, growing the file (with zeros in any gap).
    ///
    /// # Errors
    /// I/O errors, or `Tampered` when a block it must merge with is damaged.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut size = self.size.write();
        self.apply(&mut size, offset, Source::Data(data))
    }

    /// Sets the plaintext size, zero-filling when growing.
    ///
    /// # Errors
    /// As [`EncryptedFile::write`].
    pub fn truncate(&self, new_size: u64) -> Result<()> {
        let mut size = self.size.write();
        if new_size > *size {
            let old = *size;
            return self.apply(&mut size, old, Source::Zeros(new_size - old));
        }
        if new_size < *size {
            self.shrink(&mut size, new_size)?;
        }
        Ok(())
    }

    /// Flushes the backing file to stable storage.
    ///
    /// # Errors
    /// The backing `fsync` fails.
    pub fn sync(&self, datasync: bool) -> Result<()> {
        let _size = self.size.read();
        if datasync {
            self.file.sync_data()?;
        } else {
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// Re-seals the new final block with the last-block flag, then cuts the
    /// backing file.
    fn shrink(&self, size: &mut u64, new_size: u64) -> Result<()> {
        let key = &self.key;
        let index = last_index(new_size);
        let keep = block_len(new_size, index);
        let mut plain = if keep > 0 {
            self.read_blocks(key, *size, index, index)?
        } else {
            Vec::new()
        };
        plain.truncate(keep);
        let sealed = seal_block(key, &self.file_id, index, true, &plain);
        self.file.write_all_at(&sealed, block_offset(index))?;
        self.file.set_len(format::disk_len(new_size))?;
        *size = new_size;
        Ok(())
    }

    /// Rewrites every block touched by writing `src` at `offset`: the
    /// written blocks, any gap up to them, and the old final block (whose
    /// last-block flag changes when the file grows).
    fn apply(&self, size: &mut u64, offset: u64, src: Source<'_>) -> Result<()> {
        let len = src.len();
        if len == 0 {
            return Ok(());
        }
        let old = *size;
        let end = offset.checked_add(len).ok_or(Error::Sys(nix::Error::EFBIG))?;
        let new = old.max(end);
        let mut first = offset / BLOCK_SIZE as u64;
        if new > old {
            first = first.min(last_index(old));
        }
        let last = last_index(new);
        let key = &self.key;
        let span = Span { old, new, offset, src };
        let mut chunk = first;
        while chunk <= last {
            let chunk_last = (chunk + CHUNK_BLOCKS - 1).min(last);
            self.write_chunk(key, &span, chunk, chunk_last)?;
            chunk = chunk_last + 1;
        }
        *size = new;
        Ok(())
    }

    fn write_chunk(&self, key: &BlockKey, span: &Span<'_>, first: u64, last: u64) -> Result<()> {
        let mut out = Vec::new();
        for index in first..=last {
            let plain = self.merged_block(key, span, index)?;
            let is_last = index == last_index(span.new);
            out.extend(seal_block(key, &self.file_id, index, is_last, &plain));
        }
        self.file.write_all_at(&out, block_offset(first))?;
        Ok(())
    }

    /// The new plaintext of block `index`: old contents (if the write does
    /// not cover the whole block), zeros beyond the old end, then `src`.
    fn merged_block(&self, key: &BlockKey, span: &Span<'_>, index: u64) -> Result<Vec<u8>> {
        let block_start = index * BLOCK_SIZE as u64;
        let new_len = block_len(span.new, index);
        let old_len = block_len(span.old, index);
        let from = span.offset.max(block_start);
        let to = (span.offset + span.src.len()).min(block_start + new_len as u64);
        let covered = from <= block_start && to >= block_start + new_len as u64;
        let mut plain = vec![0u8; new_len];
        if !covered && old_len > 0 {
            let old = self.read_blocks(key, span.old, index, index)?;
            plain[..old_len].copy_from_slice(&old);
        }
        if let (Source::Data(data), true) = (span.src, from < to) {
            let src = (from - span.offset) as usize..(to - span.offset) as usize;
            let dst = (from - block_start) as usize..(to - block_start) as usize;
            plain[dst].copy_from_slice(&data[src]);
        } else if from < to {
            plain[(from - block_start) as usize..(to - block_start) as usize].fill(0);
        }
        Ok(plain)
    }
}

/// The geometry of one write.
struct Span<'a> {
    old: u64,
    new: u64,
    offset: u64,
    src: Source<'a>,
}

/// Reads until `buf` is full or end of file; returns the bytes read.
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
    use crate::keys::MemoryKeySource;

    fn fresh(keys: &MemoryKeySource) -> (tempfile::TempDir, EncryptedFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (dir, EncryptedFile::create(file, path, keys).unwrap())
    }

    fn reopen(f: &EncryptedFile, keys: &MemoryKeySource) -> Result<EncryptedFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.path)
            .unwrap();
        EncryptedFile::open(file, f.path.clone(), keys)
    }

    fn all(f: &EncryptedFile) -> Vec<u8> {
        f.read(0, u32::MAX).unwrap()
    }

    #[test]
    fn empty_file_is_header_and_one_block() {
        let keys = MemoryKeySource::default();
        let (_d, f) = fresh(&keys);
        let len = std::fs::metadata(&f.path).unwrap().len();
        assert_eq!(len, (HEADER_LEN + BLOCK_OVERHEAD) as u64);
        assert_eq!(reopen(&f, &keys).unwrap().size(), 0);
    }

    #[test]
    fn writes_match_a_model_across_reopen() {
        let keys = MemoryKeySource::default();
        let (_d, f) = fresh(&keys);
        let mut model = Vec::new();
        let ops: [(u64, usize); 8] = [
            (0, 10),
            (4090, 20),
            (20_000, 5),
            (100, 9000),
            (0, 4096),
            (8192, 4096),
            (30_000, 1),
            (29_999, 3),
        ];
        for (i, (off, len)) in ops.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8 | 1).collect();
            f.write(off, &data).unwrap();
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
            assert_eq!(all(&f), model, "after op {i}");
        }
        assert_eq!(all(&reopen(&f, &keys).unwrap()), model);
        assert_eq!(f.read(29_998, 100).unwrap(), model[29_998..]);
    }

    #[test]
    fn truncate_shrinks_and_grows_with_zeros() {
        let keys = MemoryKeySource::default();
        let (_d, f) = fresh(&keys);
        let data: Vec<u8> = (0..10_000).map(|i| (i % 200) as u8 + 1).collect();
        f.write(0, &data).unwrap();
        for size in [8192u64, 5000, 4096, 4095, 0, 1, 12_345] {
            let before = all(&f);
            f.truncate(size).unwrap();
            let mut expect = before.clone();
            expect.resize(size as usize, 0);
            assert_eq!(all(&f), expect, "size {size}");
            assert_eq!(all(&reopen(&f, &keys).unwrap()), expect, "reopen {size}");
        }
    }

    #[test]
    fn header_copied_from_another_file_fails() {
        let keys = MemoryKeySource::default();
        let (_d1, a) = fresh(&keys);
        let (_d2, b) = fresh(&keys);
        a.write(0, b"secret a").unwrap();
        b.write(0, b"secret b").unwrap();
        let header_b = std::fs::read(&b.path).unwrap()[..HEADER_LEN].to_vec();
        a.file.write_all_at(&header_b, 0).unwrap();
        let reopened = reopen(&a, &keys).unwrap();
        assert!(matches!(reopened.read(0, 8), Err(Error::Tampered { .. })));
    }

    #[test]
    fn wrong_file_id_in_blob_context_fails_to_unwrap() {
        let keys = MemoryKeySource::default();
        let (_d, a) = fresh(&keys);
        let mut bytes = std::fs::read(&a.path).unwrap();
        bytes[10] ^= 1; // file id no longer matches the blob's context
        std::fs::write(&a.path, &bytes).unwrap();
        assert!(matches!(reopen(&a, &keys), Err(Error::Key { .. })));
    }
}
