//! The change file: how mount processes learn, without asking kmsd, that a
//! key may have changed (rotated, disabled, its policy edited).
//!
//! A mount process makes the data keys of its next new files ahead, in one
//! request (`generate-data-keys`), so that creating a file costs no round
//! trip to kmsd. Those keys must not outlive a change of the key: a file
//! created after `key rotate` has returned must be wrapped by the new
//! version, and one created after `key disable` must fail. So kmsd replaces
//! `changes/generation`, beside its socket, after every change to any key
//! it holds, before it answers the request that made the change; a mount
//! process reads the file before it uses a key made ahead, and drops them
//! all when the file says something else than when they were made.
//!
//! The file is replaced by rename, so a reader sees the old or the new
//! content, never a mix. It holds a random id of this kmsd run and a
//! counter, so a restarted kmsd never repeats an earlier content.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rand::RngCore;

/// The file's name in its folder.
pub const FILE: &str = "generation";

/// Where the change file of the kmsd whose socket is `socket` lives.
pub fn dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/")).join("changes")
}

/// kmsd's writer of the change file.
#[derive(Debug)]
pub struct ChangeFile {
    dir: PathBuf,
    run: String,
    /// Serialises writers; holds whether the last write failed (logged once).
    failing: Mutex<bool>,
}

impl ChangeFile {
    /// Creates `dir` (mode 0755) if needed and publishes a first content.
    ///
    /// # Errors
    /// The folder cannot be created or written.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        let mut run = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut run);
        let this = Self {
            dir: dir.to_path_buf(),
            run: run.iter().map(|b| format!("{b:02x}")).collect(),
            failing: Mutex::new(false),
        };
        this.write(0)?;
        Ok(this)
    }

    /// Publishes change number `generation`. A failure is logged (once
    /// until it works again): mount processes then stop using keys made
    /// ahead only when they expire.
    pub fn publish(&self, generation: u64) {
        let mut failing = self.failing.lock();
        match self.write(generation) {
            Ok(()) => *failing = false,
            Err(e) if !*failing => {
                *failing = true;
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot publish a key change to mount processes");
            }
            Err(_) => {}
        }
    }

    fn write(&self, generation: u64) -> std::io::Result<()> {
        let tmp = self.dir.join(".generation.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        writeln!(f, "{} {generation}", self.run)?;
        drop(f);
        // No fsync: the folder is under /run (memory), and a reader only
        // compares contents.
        std::fs::rename(&tmp, self.dir.join(FILE))
    }
}

/// What the change file at `path` says now, for comparison only (at most
/// 128 bytes; `None` if it cannot be read, in which case the reader makes
/// no key ahead).
pub fn read(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let mut buf = Vec::with_capacity(64);
    f.take(128).read_to_end(&mut buf).ok()?;
    (!buf.is_empty()).then_some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_and_every_run_reads_differently() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("changes");
        let a = ChangeFile::create(&d).unwrap();
        let first = read(&d.join(FILE)).unwrap();
        a.publish(1);
        let second = read(&d.join(FILE)).unwrap();
        assert_ne!(first, second);
        a.publish(1);
        assert_eq!(read(&d.join(FILE)).unwrap(), second, "same change, same content");
        // A restarted kmsd starts its count again, under another run id.
        let b = ChangeFile::create(&d).unwrap();
        b.publish(1);
        assert_ne!(read(&d.join(FILE)).unwrap(), second);
        assert!(read(&d.join("missing")).is_none());
    }
}
