//! The on-disk format of one encrypted file, as pure functions.
//!
//! ```text
//! header (HEADER_LEN = 512 bytes)
//!   0..8     magic "KMSFUSE\0"
//!   8..10    u16 BE format version (1 or 2; this crate writes 2)
//!   10..26   file id (16 random bytes)
//!   26..32   zero
//!   32..272  slot 0 \  each: u64 BE sequence | u16 BE blob length |
//!   272..512 slot 1 /        blob (zero padded) | u32 BE CRC-32 of the rest
//! blocks, from HEADER_LEN, each `Layout::disk_block_size` except the last:
//!   v2: nonce (24) || XAES-256-GCM(plaintext, up to 4096 bytes) || tag (16)
//!   v1: nonce (12) || AES-256-GCM(plaintext, up to 4096 bytes) || tag (16)
//!   AAD = file id || u64 BE block index || u8 last-block flag
//! ```
//!
//! Every file has at least one block: the empty file is one sealed block
//! with no plaintext. The last block carries the last-block flag, so cutting
//! a file at a block boundary (down to the bare header included) is
//! detected. A non-final block whose bytes are all zero is a hole and reads
//! as zeros, so extending a file writes nothing for the gap. See
//! `fuse/FORMAT.md` for the reasoning.

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::Aes256;
use kms_client::aead;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::gcm::Gcm;
use crate::keys::{Dek, FileId};

/// Plaintext bytes per block.
pub const BLOCK_SIZE: usize = 4096;
/// GCM tag stored after each block's ciphertext.
pub const TAG_LEN: usize = aead::TAG_LEN;
/// Random nonce stored in front of each block (current layout).
pub const NONCE_LEN: usize = Layout::V2.nonce_len();
/// Bytes a block adds to its plaintext on disk (current layout).
pub const BLOCK_OVERHEAD: usize = Layout::V2.overhead();
/// On-disk size of a full block (current layout).
pub const DISK_BLOCK_SIZE: usize = Layout::V2.disk_block_size();
/// First bytes of every encrypted file.
pub const MAGIC: [u8; 8] = *b"KMSFUSE\0";
/// The format version of files made before sparse holes and extended
/// nonces; still read and written.
pub const FORMAT_V1: u16 = 1;
/// The format version this crate gives new files.
pub const FORMAT_VERSION: u16 = 2;
/// Magic, version, file id and padding in front of the slots.
pub const PREFIX_LEN: usize = 32;
/// One header slot holding a sequence number and a wrapped DEK.
pub const SLOT_LEN: usize = 240;
/// Longest wrapped-DEK blob a slot can hold.
pub const MAX_BLOB_LEN: usize = SLOT_LEN - 8 - 2 - 4;
/// Total header length; data blocks start here.
pub const HEADER_LEN: usize = PREFIX_LEN + 2 * SLOT_LEN;

/// Why bytes on disk are not a valid file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("header too short ({0} bytes)")]
    HeaderTooShort(usize),
    #[error("bad magic: not an encrypted file")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error("no valid key slot in header")]
    NoValidSlot,
    #[error("wrapped key too long ({0} bytes)")]
    BlobTooLong(usize),
    #[error("backing length {0} is not a valid encrypted length")]
    BadLength(u64),
    #[error("block {0} is too short")]
    BlockTooShort(u64),
    #[error("block {0} failed authentication")]
    BlockAuth(u64),
}

/// Block geometry and cipher of one format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 12-byte random nonces, AES-256-GCM under the DEK.
    V1,
    /// 24-byte random nonces, XAES-256-GCM under the DEK.
    V2,
}

impl Layout {
    /// The layout of a format version.
    ///
    /// # Errors
    /// An unknown version.
    pub fn of_version(version: u16) -> Result<Self, FormatError> {
        match version {
            FORMAT_V1 => Ok(Self::V1),
            FORMAT_VERSION => Ok(Self::V2),
            v => Err(FormatError::UnsupportedVersion(v)),
        }
    }

    /// The format version number of this layout.
    pub const fn version(self) -> u16 {
        match self {
            Self::V1 => FORMAT_V1,
            Self::V2 => FORMAT_VERSION,
        }
    }

    /// Nonce bytes in front of each block.
    pub const fn nonce_len(self) -> usize {
        match self {
            Self::V1 => 12,
            Self::V2 => 24,
        }
    }

    /// Bytes a block adds to its plaintext on disk.
    pub const fn overhead(self) -> usize {
        self.nonce_len() + TAG_LEN
    }

    /// On-disk size of a full block.
    pub const fn disk_block_size(self) -> usize {
        BLOCK_SIZE + self.overhead()
    }

    /// Byte offset of block `index` in the backing file.
    pub fn block_offset(self, index: u64) -> u64 {
        HEADER_LEN as u64 + index * self.disk_block_size() as u64
    }

    /// Backing length of a file of `size` plaintext bytes.
    pub fn disk_len(self, size: u64) -> u64 {
        let blocks = last_index(size) + 1;
        HEADER_LEN as u64 + blocks * self.overhead() as u64 + size
    }

    /// Largest plaintext size whose backing length fits a file offset
    /// (`i64`). The backing filesystem usually allows much less (ext4:
    /// 16 TiB) and then answers `EFBIG` itself.
    pub fn max_size(self) -> u64 {
        let blocks = (i64::MAX as u64 - HEADER_LEN as u64) / self.disk_block_size() as u64;
        blocks * BLOCK_SIZE as u64
    }

    /// Plaintext size of a backing file of `len` bytes.
    ///
    /// # Errors
    /// No length of plaintext gives `len` (shorter than header and one
    /// empty block, or a last block shorter than its overhead).
    pub fn plain_len(self, len: u64) -> Result<u64, FormatError> {
        let overhead = self.overhead() as u64;
        let disk_block = self.disk_block_size() as u64;
        if len < HEADER_LEN as u64 + overhead {
            return Err(FormatError::BadLength(len));
        }
        let payload = len - HEADER_LEN as u64;
        let blocks = payload.div_ceil(disk_block);
        let last_disk = payload - (blocks - 1) * disk_block;
        if last_disk < overhead {
            return Err(FormatError::BadLength(len));
        }
        Ok(payload - blocks * overhead)
    }
}

/// One header slot: a wrapped DEK and the sequence number that orders it
/// against the other slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub seq: u64,
    pub blob: Vec<u8>,
}

/// A decoded file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub file_id: FileId,
    pub slots: [Option<Slot>; 2],
}

impl Header {
    /// The header of a new file (current format version): `blob` in slot 0
    /// with sequence 1.
    ///
    /// # Errors
    /// The blob does not fit a slot.
    pub fn new(file_id: FileId, blob: Vec<u8>) -> Result<Self, FormatError> {
        check_blob_len(&blob)?;
        Ok(Self {
            version: FORMAT_VERSION,
            file_id,
            slots: [Some(Slot { seq: 1, blob }), None],
        })
    }

    /// The block layout of this file.
    ///
    /// # Errors
    /// An unknown version (never for a decoded header).
    pub fn layout(&self) -> Result<Layout, FormatError> {
        Layout::of_version(self.version)
    }

    /// The `HEADER_LEN` bytes of this header; empty slots are zeros, which
    /// never pass the slot checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.version.to_be_bytes());
        out[10..26].copy_from_slice(&self.file_id);
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot {
                let start = slot_offset(i) as usize;
                out[start..start + SLOT_LEN].copy_from_slice(&encode_slot(slot));
            }
        }
        out
    }

    /// Parses a header; a slot that fails its checksum (torn write) is
    /// treated as empty.
    ///
    /// # Errors
    /// Too short, wrong magic or version, or no valid slot.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let version = peek_version(bytes)?;
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::HeaderTooShort(bytes.len()));
        }
        let file_id = bytes[10..26].try_into().expect("16 bytes");
        let slot = |i: usize| {
            let start = slot_offset(i) as usize;
            decode_slot(&bytes[start..start + SLOT_LEN])
        };
        let header = Self {
            version,
            file_id,
            slots: [slot(0), slot(1)],
        };
        header.current()?;
        Ok(header)
    }

    /// Index and contents of the slot with the highest sequence number.
    ///
    /// # Errors
    /// Both slots are empty or torn.
    pub fn current(&self) -> Result<(usize, &Slot), FormatError> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .max_by_key(|(_, s)| s.seq)
            .ok_or(FormatError::NoValidSlot)
    }

    /// Where and what to write to replace the older slot with `blob`: the
    /// slot index and its `SLOT_LEN` bytes. The current slot is untouched,
    /// so a torn write leaves the header readable.
    ///
    /// # Errors
    /// No current slot, or the blob does not fit.
    pub fn next_slot(&self, blob: Vec<u8>) -> Result<(usize, Slot), FormatError> {
        check_blob_len(&blob)?;
        let (current, slot) = self.current()?;
        let seq = slot.seq + 1;
        Ok((1 - current, Slot { seq, blob }))
    }
}

/// The format version of a file from its first 10 bytes (magic and
/// version), so that a size can be computed without reading the rest.
///
/// # Errors
/// Too short, wrong magic, or an unknown version.
pub fn peek_version(bytes: &[u8]) -> Result<u16, FormatError> {
    if bytes.len() < 10 {
        return Err(FormatError::HeaderTooShort(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    Layout::of_version(version)?;
    Ok(version)
}

fn check_blob_len(blob: &[u8]) -> Result<(), FormatError> {
    if blob.len() > MAX_BLOB_LEN {
        return Err(FormatError::BlobTooLong(blob.len()));
    }
    Ok(())
}

/// Byte offset of slot `i` in the file.
pub fn slot_offset(i: usize) -> u64 {
    (PREFIX_LEN + i * SLOT_LEN) as u64
}

/// The `SLOT_LEN` bytes of a slot. The blob must fit (see [`Header::new`]).
pub fn encode_slot(slot: &Slot) -> [u8; SLOT_LEN] {
    let mut out = [0u8; SLOT_LEN];
    out[..8].copy_from_slice(&slot.seq.to_be_bytes());
    out[8..10].copy_from_slice(&(slot.blob.len() as u16).to_be_bytes());
    out[10..10 + slot.blob.len()].copy_from_slice(&slot.blob);
    let crc = crc32(&out[..SLOT_LEN - 4]);
    out[SLOT_LEN - 4..].copy_from_slice(&crc.to_be_bytes());
    out
}

/// A slot from its bytes, or `None` when empty or torn.
pub fn decode_slot(bytes: &[u8]) -> Option<Slot> {
    let bytes: &[u8; SLOT_LEN] = bytes.try_into().ok()?;
    let stored = u32::from_be_bytes(bytes[SLOT_LEN - 4..].try_into().expect("4 bytes"));
    if crc32(&bytes[..SLOT_LEN - 4]) != stored {
        return None;
    }
    let seq = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let len = u16::from_be_bytes([bytes[8], bytes[9]]) as usize;
    if seq == 0 || len > MAX_BLOB_LEN {
        return None;
    }
    Some(Slot {
        seq,
        blob: bytes[10..10 + len].to_vec(),
    })
}

/// CRC-32 (IEEE) of a key slot: both slots are checked at every open.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// XAES-256-GCM (C2SP): AES-256-GCM under a key derived from the DEK and
/// the first 12 bytes of a 24-byte nonce, with the other 12 as the GCM
/// nonce. Random 24-byte nonces can be used for about 2^80 messages under
/// one DEK, where plain GCM's random 12-byte nonces allow 2^32.
///
/// The derivation is NIST SP 800-108r1 counter-mode KDF with CMAC-AES-256,
/// which for these fixed 16-byte inputs is two AES block encryptions with
/// the CMAC subkey K1 folded in. RustCrypto ships XAES only in the
/// pre-release aes-gcm 0.11; this is the same construction over aes 0.8,
/// with ring's AES-GCM ([`crate::gcm`]), checked against the C2SP test
/// vectors below.
struct Xaes {
    aes: Aes256,
    k1: [u8; 16],
}

impl Xaes {
    fn new(dek: &Dek) -> Self {
        let aes = Aes256::new(dek.expose().into());
        let mut l = aes::Block::default();
        aes.encrypt_block(&mut l);
        let mut k1 = [0u8; 16];
        let l = u128::from_be_bytes(l.into());
        let shifted = (l << 1) ^ if l >> 127 == 1 { 0x87 } else { 0 };
        k1.copy_from_slice(&shifted.to_be_bytes());
        Self { aes, k1 }
    }

    /// The AES-256-GCM instance for a nonce's first 12 bytes.
    fn derive(&self, prefix: &[u8]) -> Gcm {
        let mut key = Zeroizing::new([0u8; 32]);
        for (i, half) in key.chunks_mut(16).enumerate() {
            let mut m = aes::Block::default();
            m[1] = i as u8 + 1;
            m[2] = b'X';
            m[4..].copy_from_slice(prefix);
            for (b, k) in m.iter_mut().zip(self.k1) {
                *b ^= k;
            }
            self.aes.encrypt_block(&mut m);
            half.copy_from_slice(&m);
        }
        Gcm::new(&key)
    }
}

impl Drop for Xaes {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.k1);
    }
}

enum Cipher {
    Gcm(Gcm),
    Xaes(Box<Xaes>),
}

/// A DEK's cipher for one file's layout, expanded once per open file rather
/// than per block. Key schedules are zeroized on drop.
pub struct BlockKey {
    layout: Layout,
    cipher: Cipher,
}

impl std::fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockKey({:?}, [redacted])", self.layout)
    }
}

impl BlockKey {
    /// Expands `dek` for sealing blocks of the current layout.
    pub fn new(dek: &Dek) -> Self {
        Self::for_layout(dek, Layout::V2)
    }

    /// Expands `dek` for sealing blocks of `layout`.
    pub fn for_layout(dek: &Dek, layout: Layout) -> Self {
        let cipher = match layout {
            Layout::V1 => Cipher::Gcm(Gcm::new(dek.expose())),
            Layout::V2 => Cipher::Xaes(Box::new(Xaes::new(dek))),
        };
        Self { layout, cipher }
    }

    /// The layout this key seals.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Runs `f` with the GCM instance and 12-byte GCM nonce for a stored
    /// nonce.
    fn with_gcm<R>(&self, nonce: &[u8], f: impl FnOnce(&Gcm, &[u8]) -> R) -> R {
        match &self.cipher {
            Cipher::Gcm(g) => f(g, nonce),
            Cipher::Xaes(x) => f(&x.derive(&nonce[..12]), &nonce[12..]),
        }
    }
}

fn block_aad(file_id: &FileId, index: u64, last: bool) -> [u8; 25] {
    let mut aad = [0u8; 25];
    aad[..16].copy_from_slice(file_id);
    aad[16..24].copy_from_slice(&index.to_be_bytes());
    aad[24] = u8::from(last);
    aad
}

/// Seals one block (at most `BLOCK_SIZE` bytes) under a fresh random nonce.
pub fn seal_block(key: &BlockKey, file_id: &FileId, index: u64, last: bool, plaintext: &[u8]) -> Vec<u8> {
    assert!(plaintext.len() <= BLOCK_SIZE, "block larger than BLOCK_SIZE");
    let nonce_len = key.layout.nonce_len();
    let mut nonce = [0u8; NONCE_LEN];
    // From the kernel for every block (getrandom(2), 3.5 % of the mount
    // process in a sequential-write profile): a user-space generator would
    // repeat its output after a VM snapshot is restored or cloned, and a
    // repeated nonce under one DEK breaks GCM; the kernel reseeds on that.
    rand::rngs::OsRng.fill_bytes(&mut nonce[..nonce_len]);
    let nonce = &nonce[..nonce_len];
    let mut out = Vec::with_capacity(plaintext.len() + key.layout.overhead());
    out.extend_from_slice(nonce);
    out.extend_from_slice(plaintext);
    let aad = block_aad(file_id, index, last);
    key.with_gcm(nonce, |gcm, n| aead::seal_parts(gcm, n, &aad, &mut out, nonce_len));
    out
}

/// Opens one on-disk block, checking its position and last-block flag.
///
/// # Errors
/// The block is shorter than its overhead or fails authentication.
pub fn open_block(
    key: &BlockKey,
    file_id: &FileId,
    index: u64,
    last: bool,
    disk: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let mut buf = disk.to_vec();
    let nonce_len = key.layout.nonce_len();
    let len = open_block_in_place(key, file_id, index, last, &mut buf)?.len();
    buf.copy_within(nonce_len..nonce_len + len, 0);
    buf.truncate(len);
    Ok(buf)
}

/// Like [`open_block`], but decrypts inside `disk` (no allocation) and
/// returns the plaintext, which sits at `disk[nonce_len..]`. On failure the
/// buffer's ciphertext is left unspecified.
///
/// # Errors
/// As [`open_block`].
pub fn open_block_in_place<'a>(
    key: &BlockKey,
    file_id: &FileId,
    index: u64,
    last: bool,
    disk: &'a mut [u8],
) -> Result<&'a [u8], FormatError> {
    let layout = key.layout;
    if disk.len() < layout.overhead() || disk.len() > layout.disk_block_size() {
        return Err(FormatError::BlockTooShort(index));
    }
    let (nonce, sealed) = disk.split_at_mut(layout.nonce_len());
    let aad = block_aad(file_id, index, last);
    let plain = key
        .with_gcm(nonce, |gcm, n| aead::open_parts(gcm, n, &aad, sealed))
        .map_err(|_| FormatError::BlockAuth(index))?;
    Ok(plain)
}

/// Whether the bytes of a full non-final block are a hole (all zero: never
/// written, or sparse on disk). Sealed blocks are never all zero: their tag
/// would have to be 16 zero bytes.
pub fn is_hole(disk: &[u8]) -> bool {
    disk.iter().all(|&b| b == 0)
}

/// How many trailing-zero lengths [`open_stale_final`] tries: a sealed
/// record ends in that many zero bytes with probability 256^-n.
const STALE_FINAL_TRIES: usize = 24;

/// Opens a non-final block that is still an older *final* block of the same
/// file and index, zero-padded on disk: what a kill leaves when a file grew
/// (the new blocks were written, the old final block not yet re-sealed) or
/// shrank (the new final block was written, the cut not yet made). Returns
/// its plaintext padded with zeros to `BLOCK_SIZE`.
///
/// Only blocks sealed by this file's DEK for this index pass, so this
/// accepts nothing an attacker could not already do by restoring an older
/// copy of one block (see FORMAT.md, tamper table).
pub fn open_stale_final(key: &BlockKey, file_id: &FileId, index: u64, disk: &[u8]) -> Option<Vec<u8>> {
    let overhead = key.layout.overhead();
    let end = disk.iter().rposition(|&b| b != 0)? + 1;
    let shortest = end.max(overhead);
    for record in shortest..(shortest + STALE_FINAL_TRIES).min(disk.len() + 1) {
        if let Ok(mut plain) = open_block(key, file_id, index, true, &disk[..record]) {
            plain.resize(BLOCK_SIZE, 0);
            return Some(plain);
        }
    }
    None
}

/// Index of the last block of a file of `size` plaintext bytes.
pub fn last_index(size: u64) -> u64 {
    size.saturating_sub(1) / BLOCK_SIZE as u64
}

/// Plaintext length of block `index` in a file of `size` bytes (0 past the
/// end).
pub fn block_len(size: u64, index: u64) -> usize {
    let start = index * BLOCK_SIZE as u64;
    size.saturating_sub(start).min(BLOCK_SIZE as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: FileId = [7u8; 16];

    fn key() -> BlockKey {
        BlockKey::new(&Dek::from_bytes([5u8; 32]))
    }

    /// Seals a whole file's blocks the way the filesystem lays them out.
    fn seal_file(key: &BlockKey, id: &FileId, data: &[u8]) -> Vec<u8> {
        let size = data.len() as u64;
        let last = last_index(size);
        let mut out = Vec::new();
        for i in 0..=last {
            let start = i as usize * BLOCK_SIZE;
            let block = &data[start..start + block_len(size, i)];
            out.extend(seal_block(key, id, i, i == last, block));
        }
        out
    }

    /// Opens a file's blocks, deriving the size from their length.
    fn open_file(key: &BlockKey, id: &FileId, disk: &[u8]) -> Result<Vec<u8>, FormatError> {
        let size = Layout::V2.plain_len((HEADER_LEN + disk.len()) as u64)?;
        let last = last_index(size);
        let mut out = Vec::new();
        for i in 0..=last {
            let start = (Layout::V2.block_offset(i) as usize) - HEADER_LEN;
            let len = block_len(size, i) + BLOCK_OVERHEAD;
            out.extend(open_block(key, id, i, i == last, &disk[start..start + len])?);
        }
        Ok(out)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_at_every_boundary_size() {
        let key = key();
        for len in [0, 1, 4095, 4096, 4097, 8192, (1 << 20) + 1] {
            let data = sample(len);
            let disk = seal_file(&key, &ID, &data);
            assert_eq!(disk.len() as u64 + HEADER_LEN as u64, Layout::V2.disk_len(len as u64));
            assert_eq!(open_file(&key, &ID, &disk).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn size_math_is_inverse() {
        for size in (0..20_000u64).chain([1 << 20, (1 << 20) + 1, 1 << 33]) {
            assert_eq!(Layout::V2.plain_len(Layout::V2.disk_len(size)), Ok(size), "size {size}");
        }
    }

    #[test]
    fn impossible_lengths_are_refused() {
        let h = HEADER_LEN as u64;
        for len in [0, h, h + 27, h + DISK_BLOCK_SIZE as u64 + 27] {
            assert!(Layout::V2.plain_len(len).is_err(), "len {len}");
        }
    }

    #[test]
    fn flipped_byte_is_detected() {
        let key = key();
        let mut disk = seal_file(&key, &ID, &sample(5000));
        for pos in [0, 20, 4100, disk.len() - 1] {
            disk[pos] ^= 0x40;
            assert!(open_file(&key, &ID, &disk).is_err(), "pos {pos}");
            disk[pos] ^= 0x40;
        }
        assert!(open_file(&key, &ID, &disk).is_ok());
    }

    #[test]
    fn block_moved_within_file_is_detected() {
        let key = key();
        let mut disk = seal_file(&key, &ID, &sample(3 * BLOCK_SIZE + 10));
        let (a, b) = disk.split_at_mut(DISK_BLOCK_SIZE);
        a.swap_with_slice(&mut b[..DISK_BLOCK_SIZE]);
        assert_eq!(open_file(&key, &ID, &disk), Err(FormatError::BlockAuth(0)));
    }

    #[test]
    fn block_moved_between_files_is_detected() {
        let key = key();
        let other_id = [8u8; 16];
        let mut disk = seal_file(&key, &ID, &sample(2 * BLOCK_SIZE + 1));
        let other = seal_file(&key, &other_id, &sample(2 * BLOCK_SIZE + 1));
        disk[..DISK_BLOCK_SIZE].copy_from_slice(&other[..DISK_BLOCK_SIZE]);
        assert_eq!(open_file(&key, &ID, &disk), Err(FormatError::BlockAuth(0)));
    }

    #[test]
    fn truncation_at_block_boundary_is_detected() {
        let key = key();
        let disk = seal_file(&key, &ID, &sample(3 * BLOCK_SIZE));
        for blocks in 1..3 {
            let cut = &disk[..blocks * DISK_BLOCK_SIZE];
            let last = blocks as u64 - 1;
            assert_eq!(open_file(&key, &ID, cut), Err(FormatError::BlockAuth(last)));
        }
        assert!(open_file(&key, &ID, &[]).is_err(), "bare header");
    }

    #[test]
    fn zeroed_block_does_not_authenticate() {
        let key = key();
        let mut disk = seal_file(&key, &ID, &vec![0u8; 2 * BLOCK_SIZE + 5]);
        disk[..DISK_BLOCK_SIZE].fill(0);
        assert_eq!(open_file(&key, &ID, &disk), Err(FormatError::BlockAuth(0)));
    }

    #[test]
    fn header_round_trips_and_rewrap_uses_other_slot() {
        let header = Header::new(ID, vec![1; 81]).unwrap();
        let decoded = Header::decode(&header.encode()).unwrap();
        assert_eq!(decoded, header);
        let (i, slot) = decoded.next_slot(vec![2; 81]).unwrap();
        assert_eq!((i, slot.seq), (1, 2));
        let mut bytes = decoded.encode();
        let at = slot_offset(i) as usize;
        bytes[at..at + SLOT_LEN].copy_from_slice(&encode_slot(&slot));
        let after = Header::decode(&bytes).unwrap();
        assert_eq!(after.current().unwrap().1.blob, vec![2; 81]);
        let (j, next) = after.next_slot(vec![3; 81]).unwrap();
        assert_eq!((j, next.seq), (0, 3));
    }

    #[test]
    fn torn_slot_falls_back_to_the_other() {
        let mut header = Header::new(ID, vec![1; 81]).unwrap();
        let (i, slot) = header.next_slot(vec![2; 81]).unwrap();
        header.slots[i] = Some(slot);
        let mut bytes = header.encode();
        let at = slot_offset(i) as usize;
        bytes[at + 50] ^= 0xff; // torn write of the newer slot
        let decoded = Header::decode(&bytes).unwrap();
        assert_eq!(decoded.current().unwrap().1.blob, vec![1; 81]);
        let at0 = slot_offset(0) as usize;
        bytes[at0 + 3] ^= 1;
        assert_eq!(Header::decode(&bytes), Err(FormatError::NoValidSlot));
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = Header::new(ID, vec![1; 81]).unwrap().encode();
        assert_eq!(Header::decode(&good[..100]), Err(FormatError::HeaderTooShort(100)));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), Err(FormatError::BadMagic));
        let mut bad = good;
        bad[9] = 9;
        assert_eq!(Header::decode(&bad), Err(FormatError::UnsupportedVersion(9)));
        assert_eq!(
            Header::new(ID, vec![0; MAX_BLOB_LEN + 1]),
            Err(FormatError::BlobTooLong(MAX_BLOB_LEN + 1))
        );
    }

    #[test]
    fn xaes_matches_the_c2sp_test_vectors() {
        let cases: [([u8; 32], &[u8], &str); 2] = [
            ([1; 32], b"", "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"),
            (
                [3; 32],
                b"c2sp.org/XAES-256-GCM",
                "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d",
            ),
        ];
        for (key, aad, expect) in cases {
            let x = Xaes::new(&Dek::from_bytes(key));
            let nonce = b"ABCDEFGHIJKLMNOPQRSTUVWX";
            let mut buf = b"XAES-256-GCM".to_vec();
            let gcm = x.derive(&nonce[..12]);
            aead::seal_parts(&gcm, &nonce[12..], aad, &mut buf, 0);
            let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, expect);
        }
    }

    #[test]
    fn v1_layout_round_trips_and_differs_from_v2() {
        let dek = Dek::from_bytes([5u8; 32]);
        let v1 = BlockKey::for_layout(&dek, Layout::V1);
        let v2 = BlockKey::for_layout(&dek, Layout::V2);
        let a = seal_block(&v1, &ID, 3, false, b"abc");
        let b = seal_block(&v2, &ID, 3, false, b"abc");
        assert_eq!((a.len(), b.len()), (3 + 28, 3 + 40));
        assert_eq!(open_block(&v1, &ID, 3, false, &a).unwrap(), b"abc");
        assert_eq!(open_block(&v2, &ID, 3, false, &b).unwrap(), b"abc");
        assert!(open_block(&v1, &ID, 3, false, &b).is_err());
        for size in [0u64, 1, 4096, 4097, 1 << 30] {
            assert_eq!(Layout::V1.plain_len(Layout::V1.disk_len(size)), Ok(size));
        }
        assert_eq!(Layout::of_version(1), Ok(Layout::V1));
        assert_eq!(Layout::of_version(3), Err(FormatError::UnsupportedVersion(3)));
    }

    #[test]
    fn holes_are_all_zero_and_sealed_blocks_never_are() {
        let key = key();
        assert!(is_hole(&[0u8; DISK_BLOCK_SIZE]));
        let sealed = seal_block(&key, &ID, 0, false, &[0u8; BLOCK_SIZE]);
        assert!(!is_hole(&sealed));
    }

    #[test]
    fn an_older_final_block_in_an_inner_position_reads_padded() {
        let key = key();
        for len in [0usize, 1, 100, 4095, 4096] {
            let data = sample(len);
            let mut slot = seal_block(&key, &ID, 4, true, &data);
            slot.resize(DISK_BLOCK_SIZE, 0);
            let plain = open_stale_final(&key, &ID, 4, &slot).unwrap();
            assert_eq!(&plain[..len], &data[..], "len {len}");
            assert!(plain[len..].iter().all(|&b| b == 0) && plain.len() == BLOCK_SIZE);
            assert!(open_stale_final(&key, &ID, 5, &slot).is_none(), "other index");
            let inner = seal_block(&key, &ID, 4, false, &data);
            let mut inner_slot = inner.clone();
            inner_slot.resize(DISK_BLOCK_SIZE, 0);
            assert!(
                open_stale_final(&key, &ID, 4, &inner_slot).is_none(),
                "inner block is not final"
            );
        }
        // Bytes after the record that are not zero are not a padded record.
        let mut slot = seal_block(&key, &ID, 4, true, b"short");
        slot.resize(DISK_BLOCK_SIZE, 0xAA);
        assert!(open_stale_final(&key, &ID, 4, &slot).is_none());
    }

    #[test]
    fn max_size_fits_a_file_offset() {
        for layout in [Layout::V1, Layout::V2] {
            let max = layout.max_size();
            assert!(layout.disk_len(max) <= i64::MAX as u64);
            assert!(max > 999_999_999_999_999);
        }
    }

    #[test]
    fn crc32_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    proptest::proptest! {
        /// Any bytes are a header or a clear error, never a panic; a header
        /// that decodes has a current slot or says why not.
        #[test]
        fn header_decode_of_arbitrary_bytes_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok(h) = Header::decode(&data) {
                let _ = h.current();
            }
        }

        /// Arbitrary block bytes never panic and never authenticate.
        #[test]
        fn open_block_of_arbitrary_bytes_fails_cleanly(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            index in 0u64..4,
            last in proptest::bool::ANY,
        ) {
            let key = BlockKey::new(&Dek::from_bytes([3; 32]));
            proptest::prop_assert!(open_block(&key, &[1; 16], index, last, &data).is_err());
        }

        /// A valid header with some bytes changed (magic and version kept,
        /// so the slots and their CRCs are really parsed) decodes to a
        /// header whose current slot is one of the two written, or fails
        /// with `NoValidSlot`; a change inside one slot never makes the
        /// other slot's blob unreadable.
        #[test]
        fn mutated_valid_headers_fall_back_slot_by_slot(
            version in proptest::sample::select(vec![FORMAT_V1, FORMAT_VERSION]),
            edits in proptest::collection::vec((10usize..HEADER_LEN, proptest::num::u8::ANY), 0..6),
            second in proptest::bool::ANY,
        ) {
            let mut header = Header::new(ID, vec![1; 81]).unwrap();
            header.version = version;
            if second {
                let (i, slot) = header.next_slot(vec![2; 60]).unwrap();
                header.slots[i] = Some(slot);
            }
            let mut bytes = header.encode();
            for (at, value) in &edits {
                bytes[*at] ^= value | 1;
            }
            let touched = |i: usize| {
                let r = slot_offset(i) as usize..slot_offset(i) as usize + SLOT_LEN;
                edits.iter().any(|(at, _)| r.contains(at))
            };
            match Header::decode(&bytes) {
                Ok(h) => {
                    proptest::prop_assert_eq!(h.version, version);
                    let blob = &h.current().unwrap().1.blob;
                    proptest::prop_assert!(blob == &vec![1; 81] || blob == &vec![2; 60]);
                }
                Err(e) => {
                    proptest::prop_assert_eq!(e, FormatError::NoValidSlot);
                    proptest::prop_assert!(touched(0) && (touched(1) || !second));
                }
            }
        }

        /// Blocks sealed for one (index, flag) with a flipped bit anywhere,
        /// or opened at another index or flag, never authenticate.
        #[test]
        fn sealed_blocks_with_any_change_fail(
            len in 0usize..=BLOCK_SIZE,
            flip in proptest::num::usize::ANY,
            index in 0u64..1000,
            last in proptest::bool::ANY,
        ) {
            let key = key();
            let plain = sample(len);
            let mut disk = seal_block(&key, &ID, index, last, &plain);
            proptest::prop_assert_eq!(open_block(&key, &ID, index, last, &disk).unwrap(), plain);
            proptest::prop_assert!(open_block(&key, &ID, index + 1, last, &disk).is_err());
            proptest::prop_assert!(open_block(&key, &ID, index, !last, &disk).is_err());
            let at = flip % disk.len();
            disk[at] ^= 1 << (flip % 8);
            proptest::prop_assert!(open_block(&key, &ID, index, last, &disk).is_err());
        }
    }
}
