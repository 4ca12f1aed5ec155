//! The backup file: a zone's snapshot (as kmsd's `backup` operation
//! returns it, opaque here) sealed under an operator's backup key.
//!
//! ```text
//! 0..8    magic "KMSDBKUP"
//! 8..12   u32 BE  format version = 1
//! 12..24  nonce (random)
//! 24..    AES-256-GCM ciphertext of the snapshot || 16-byte tag
//! AAD = bytes 0..12
//! ```
//!
//! One AEAD over the whole snapshot: a flipped bit anywhere, a truncated
//! file or another key fails to open, and nothing of it is used. The
//! backup key is 32 random bytes in a file of its own (mode 0600, owned by
//! the caller or root), never the root key, so that a backup can be kept
//! apart from the hosts.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::aead;

/// First bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"KMSDBKUP";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Length of a backup key.
pub const KEY_LEN: usize = 32;
/// Largest backup file read (a zone's snapshot fits in one protocol
/// frame, far below this).
pub const MAX_FILE_LEN: u64 = 256 << 20;

const HEADER_LEN: usize = 12;
const NONCE_LEN: usize = 12;

/// Why a backup file does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    #[error("not a kmsd backup file (no KMSDBKUP header)")]
    NotABackup,
    #[error("backup format version {0}, this build reads version {VERSION}")]
    Version(u32),
    #[error("the backup does not authenticate: it was altered or truncated, or the backup key is not the one it was made with")]
    DoesNotOpen,
}

/// Why a backup key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read backup key {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backup key {path} must hold exactly {KEY_LEN} bytes (make one with: head -c 32 /dev/urandom > FILE; chmod 600 FILE)")]
    Length { path: std::path::PathBuf },
    #[error("backup key {path} may be read by others (mode {mode:o}); fix it with: chmod 600 {path}")]
    Insecure { path: std::path::PathBuf, mode: u32 },
    #[error("backup key {path} is not a regular file")]
    NotAFile { path: std::path::PathBuf },
    #[error("backup key {path} belongs to uid {owner}, neither this user (uid {me}) nor root; fix it with: chown {me} {path}")]
    Owner {
        path: std::path::PathBuf,
        owner: u32,
        me: u32,
    },
}

/// Reads a backup key file: a regular file (not a symlink, FIFO or
/// device) of exactly [`KEY_LEN`] bytes, readable by its owner only, and
/// owned by the caller (effective uid) or root, as ssh requires of a
/// private key: a key another user owns, that user can change or swap.
///
/// # Errors
/// [`KeyFileError`].
pub fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(KeyFileError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Insecure {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
    f.take(KEY_LEN as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(KeyFileError::Length {
            path: path.to_path_buf(),
        });
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&VERSION.to_be_bytes());
    h
}

/// Seals `snapshot` under `key` into the bytes of a backup file.
pub fn seal(key: &[u8; KEY_LEN], snapshot: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let header = header();
    let mut out = header.to_vec();
    aead::seal(&cipher, &nonce, &header, snapshot, &mut out);
    out
}

/// Opens the bytes of a backup file with `key`: the snapshot.
///
/// # Errors
/// [`BackupError`]: not a backup, another format version, or it does not
/// authenticate (altered, truncated, wrong key).
pub fn open(key: &[u8; KEY_LEN], file: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    if file.len() < HEADER_LEN || &file[..8] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let version = u32::from_be_bytes(file[8..12].try_into().expect("four bytes"));
    if version != VERSION {
        return Err(BackupError::Version(version));
    }
    let cipher = Aes256Gcm::new(key.into());
    aead::open(&cipher, &file[..HEADER_LEN], &file[HEADER_LEN..]).map_err(|_| BackupError::DoesNotOpen)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key file must be a regular file readable by its owner only: not
    /// a FIFO (which would also block the reader).
    #[test]
    fn key_files_readable_by_others_or_not_regular_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("k");
        std::fs::write(&good, [7u8; KEY_LEN]).unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*read_key_file(&good).unwrap(), [7u8; KEY_LEN]);
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(read_key_file(&good), Err(KeyFileError::Insecure { .. })));
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg("-m")
            .arg("600")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(matches!(read_key_file(&fifo), Err(KeyFileError::NotAFile { .. })));
    }

    /// A key file another user owns is refused, whatever its mode; the
    /// caller's own (here root's) is read. Needs root to give a file away.
    #[test]
    fn key_files_owned_by_another_user_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test gives a file to another user: run it as root under CI"
            );
            eprintln!("skipping: not root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, [7u8; KEY_LEN]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*read_key_file(&key).unwrap(), [7u8; KEY_LEN]);
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        nix::unistd::chown(&key, nobody, None).unwrap();
        match read_key_file(&key) {
            Err(
                e @ KeyFileError::Owner {
                    owner: 65534, me: 0, ..
                },
            ) => {
                assert!(e.to_string().contains("chown 0"), "{e}")
            }
            other => panic!("a key of uid 65534 read by root: {other:?}"),
        }
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        assert!(read_key_file(&key).is_ok());
    }

    #[test]
    fn round_trip_and_layout() {
        let key = [9u8; KEY_LEN];
        let file = seal(&key, b"snapshot");
        assert_eq!(&file[..8], MAGIC);
        assert_eq!(&file[8..12], &1u32.to_be_bytes());
        assert_eq!(file.len(), 12 + 12 + 8 + 16);
        assert_eq!(&open(&key, &file).unwrap()[..], b"snapshot");
        assert_ne!(seal(&key, b"snapshot"), file, "a fresh nonce each time");
    }

    #[test]
    fn every_flipped_bit_a_truncation_or_another_key_is_refused() {
        let key = [9u8; KEY_LEN];
        let file = seal(&key, b"0123456789abcdef");
        for i in 0..file.len() * 8 {
            let mut bad = file.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(open(&key, &bad).is_err(), "bit {i}");
        }
        for len in 0..file.len() {
            assert!(open(&key, &file[..len]).is_err(), "truncated to {len}");
        }
        assert_eq!(open(&[8u8; KEY_LEN], &file), Err(BackupError::DoesNotOpen));
        let mut v2 = file.clone();
        v2[11] = 2;
        assert_eq!(open(&key, &v2), Err(BackupError::Version(2)));
        assert_eq!(
            open(&key, b"KMSDKEY2xxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            Err(BackupError::NotABackup)
        );
    }
}
