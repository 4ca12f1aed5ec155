//! The filesystem layer's error type and its translation to errno at the
//! FUSE boundary.

use std::io;
use std::path::PathBuf;

use crate::format::FormatError;
use crate::keys::KeyError;

/// Everything that can go wrong below the FUSE adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A backing-file system call failed; its errno is passed on.
    #[error("backing file operation failed")]
    Io(#[from] io::Error),
    /// A system call (or a refusal we express as an errno) failed.
    #[error("system call failed")]
    Sys(#[from] nix::Error),
    /// The backing file is not a valid encrypted file: tampered or corrupt.
    #[error("tampered or corrupt file {}", path.display())]
    Tampered {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    /// The file's data key could not be obtained.
    #[error("data key unavailable for {}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    /// A format version 1 file has made as many seals under its data key
    /// as its 96-bit random nonces allow (FORMAT.md, "Layout") without
    /// moving to a fresh one: it takes no more writes until its key change
    /// can start or it is copied into a version 2 file.
    #[error("{} has used its nonce budget (format version 1): copy it to write it again", path.display())]
    SealBudget { path: PathBuf },
    /// Mounting or unmounting failed.
    #[error("mount operation failed on {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno a caller of the mount sees.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Sys(e) => *e as i32,
            Error::Tampered { .. } | Error::SealBudget { .. } => libc::EIO,
            Error::Key { source, .. } => match source {
                KeyError::Denied(_) => libc::EACCES,
                KeyError::Unavailable(_) | KeyError::DecryptFailed(_) => libc::EIO,
            },
            Error::Mount { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The backing path to log once, for errors that mean "this file is
    /// damaged or its key is wrong" rather than an ordinary failure.
    pub fn tamper_path(&self) -> Option<&PathBuf> {
        match self {
            Error::Tampered { path, .. } => Some(path),
            Error::Key {
                path,
                source: KeyError::DecryptFailed(_),
            } => Some(path),
            _ => None,
        }
    }
}

impl From<&Error> for fuser::Errno {
    fn from(e: &Error) -> Self {
        fuser::Errno::from_i32(e.errno())
    }
}

/// Result of the filesystem layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tamper_and_key_errors_map_to_eio_or_eacces() {
        let path = PathBuf::from("/x");
        let t = Error::Tampered {
            path: path.clone(),
            source: FormatError::BadMagic,
        };
        assert_eq!(t.errno(), libc::EIO);
        assert!(t.tamper_path().is_some());
        let denied = Error::Key {
            path,
            source: KeyError::Denied("no".into()),
        };
        assert_eq!(denied.errno(), libc::EACCES);
        assert!(denied.tamper_path().is_none());
        assert_eq!(Error::Sys(nix::Error::ENOENT).errno(), libc::ENOENT);
        let io = Error::from(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(fuser::Errno::from(&io), fuser::Errno::ENOSPC);
    }
}
