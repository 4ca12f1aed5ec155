//! kmsd's side of the encrypted filesystems, which it does not serve
//! itself (ARCHITECTURE.md, "Processes"): it finds the mount processes by
//! their admin sockets (`mounts/*.sock` beside its own socket), and relays
//! `fs versions`, `fs rewrap` and `fs-stats` to them after checking the
//! caller against the mount key's policy.
//!
//! [`ServiceKeys`], a [`KeySource`] over the key service in this process,
//! is for tests and tools that open a backing folder next to a key store
//! (the store fixtures); kmsd itself never mounts.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kms_client::blob::BlobHeader;
use kms_client::proto::{Context, ErrorCode, ErrorReply, FsRewrapInfo, FsStatsInfo, FsVersionsInfo, MountInfo};
use kms_client::{BlockingClient, ClientError, ClientOptions};
use kms_fuse::{Dek, KeyError, KeySource};
use uuid::Uuid;

use crate::keys::policy::Access;
use crate::keys::{Caller, Error, KeyService};

/// How long a mount process may take to answer `Status` or `fs-stats`.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Data keys for one filesystem, from one key of the key service.
#[derive(Debug)]
pub struct ServiceKeys {
    keys: Arc<KeyService>,
    key_id: Uuid,
}

impl ServiceKeys {
    /// Keys for the filesystem encrypted under `key_id`.
    pub fn new(keys: Arc<KeyService>, key_id: Uuid) -> Self {
        Self { keys, key_id }
    }
}

fn key_error(e: Error) -> KeyError {
    let message = crate::keys::error::error_chain(&e);
    match e.code() {
        ErrorCode::PermissionDenied => KeyError::Denied(message),
        ErrorCode::DecryptFailed => KeyError::DecryptFailed(message),
        _ => KeyError::Unavailable(message),
    }
}

fn dek_from(bytes: &[u8]) -> Result<Dek, KeyError> {
    let arr: [u8; kms_fuse::keys::DEK_LEN] = bytes
        .try_into()
        .map_err(|_| KeyError::DecryptFailed("wrapped key has the wrong length".into()))?;
    let dek = Dek::from_bytes(arr);
    let mut arr = arr;
    zeroize::Zeroize::zeroize(&mut arr);
    Ok(dek)
}

impl KeySource for ServiceKeys {
    fn key_id(&self) -> Uuid {
        self.key_id
    }

    fn new_dek(&self, ctx: &Context) -> Result<(Dek, Vec<u8>), KeyError> {
        let (dek, blob) = self
            .keys
            .generate_data_key(&Caller::internal(), &self.key_id.to_string(), ctx)
            .map_err(key_error)?;
        Ok((dek_from(&dek)?, blob.blob))
    }

    fn unwrap_dek(&self, ctx: &Context, blob: &[u8]) -> Result<Dek, KeyError> {
        let dek = self
            .keys
            .unwrap_for_key(&Caller::internal(), self.key_id, blob, ctx)
            .map_err(key_error)?;
        dek_from(&dek)
    }

    fn rewrap(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, KeyError> {
        let header = BlobHeader::parse(blob).map_err(|e| KeyError::DecryptFailed(e.to_string()))?;
        if header.key_id != self.key_id {
            return Err(KeyError::DecryptFailed(
                "the header's key is not this filesystem's key".into(),
            ));
        }
        self.keys
            .re_encrypt(&Caller::internal(), blob, ctx, None, None)
            .map(|sealed| sealed.blob)
            .map_err(key_error)
    }

    fn active_version(&self) -> Result<u32, KeyError> {
        let entry = self.keys.entry(&self.key_id.to_string()).map_err(key_error)?;
        Ok(entry.record.active().version)
    }
}

/// Whether a listener accepts connections at `path`, without blocking:
/// a listener whose backlog is full counts as not answering instead of
/// holding the caller (this runs beside kmsd's watchdog pings).
fn answers(path: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    UnixAddr::new(path).is_ok_and(|addr| connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).is_ok())
}

/// The mount processes kmsd relays to, found by their admin sockets.
#[derive(Debug, Default)]
pub struct Mounts {
    /// `mounts/` beside kmsd's socket; `None`: no mounts (unit tests).
    dir: Option<PathBuf>,
}

/// One mount process that answered.
struct Found {
    info: MountInfo,
    client: BlockingClient,
}

impl Mounts {
    /// The mount processes whose admin sockets are in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir: Some(dir) }
    }

    /// The admin sockets present, sorted (live or not).
    fn sockets(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect();
        out.sort();
        out
    }

    /// Every mount process that answers `Status`, with its connection.
    fn found(&self) -> Vec<Found> {
        self.sockets().iter().filter_map(|p| Self::ask(p)).collect()
    }

    fn ask(path: &Path) -> Option<Found> {
        // Timeouts before the handshake: a socket that accepts into its
        // backlog and never answers must not hold this thread.
        let stream = UnixStream::connect(path).ok()?;
        stream.set_read_timeout(Some(ADMIN_TIMEOUT)).ok()?;
        stream.set_write_timeout(Some(ADMIN_TIMEOUT)).ok()?;
        let mut client = BlockingClient::handshake(stream, &ClientOptions::default()).ok()?;
        let info = client.status().ok()?.mounts.into_iter().next()?;
        Some(Found { info, client })
    }

    /// How many mount processes accept connections (no handshake: this is
    /// the STATUS= line, checked every second).
    pub fn count(&self) -> usize {
        self.sockets().iter().filter(|p| answers(p)).count()
    }

    /// What is mounted, for `status`.
    pub fn infos(&self) -> Vec<MountInfo> {
        self.found().into_iter().map(|f| f.info).collect()
    }

    /// The counters of every mount, for the metrics.
    pub fn stats(&self) -> Vec<FsStatsInfo> {
        self.found()
            .into_iter()
            .filter_map(|mut f| f.client.fs_stats().ok())
            .flatten()
            .collect()
    }

    /// The mount process serving `target`, after checking that `caller`
    /// may `access` its key. Its connection has no read timeout: walks
    /// take as long as the backing folder needs.
    fn find(&self, keys: &KeyService, caller: &Caller, target: &str, access: Access) -> Result<Found, ErrorReply> {
        let wanted = Path::new(target);
        let found = self
            .found()
            .into_iter()
            // Mount processes report their target resolved, and kmsctl
            // resolves its argument: a string comparison, no lookup from
            // here (one under a mountpoint would wait for that mount).
            .find(|f| Path::new(&f.info.target) == wanted)
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::Unavailable,
                    format!("no encrypted filesystem is mounted at {target}"),
                )
            })?;
        keys.authorize(caller, &found.info.key, access)?;
        found.client.set_read_timeout(None).map_err(relay_error)?;
        Ok(found)
    }

    /// Counts files per key version under the mount at `target`.
    ///
    /// # Errors
    /// Unknown mount, permission, or the mount process's error.
    pub fn versions(&self, keys: &KeyService, caller: &Caller, target: &str) -> Result<FsVersionsInfo, ErrorReply> {
        let mut f = self.find(keys, caller, target, Access::Read)?;
        f.client.fs_versions(&f.info.target).map_err(relay_error)
    }

    /// Re-wraps every older header under the mount at `target`.
    ///
    /// # Errors
    /// Unknown mount, permission, or the mount process's error.
    pub fn rewrap(
        &self,
        keys: &KeyService,
        caller: &Caller,
        target: &str,
        progress: impl FnMut(u64, u64),
    ) -> Result<FsRewrapInfo, ErrorReply> {
        let mut f = self.find(keys, caller, target, Access::Admin)?;
        f.client
            .fs_rewrap_with_progress(&f.info.target, progress)
            .map_err(relay_error)
    }
}

/// A mount process's refusal as it gave it; anything else `unavailable`.
fn relay_error(e: impl Into<ClientError>) -> ErrorReply {
    match e.into() {
        ClientError::Server(reply) => reply,
        other => ErrorReply::new(
            ErrorCode::Unavailable,
            format!(
                "the mount process did not answer: {}",
                crate::keys::error::error_chain(&other)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A socket that accepts into its backlog and never answers (a hung
    /// or half-started mount process) costs the relay its timeout, not
    /// the thread.
    #[test]
    fn a_mount_socket_that_never_answers_does_not_hold_the_relay() {
        let dir = tempfile::tempdir().unwrap();
        let _silent = std::os::unix::net::UnixListener::bind(dir.path().join("x.sock")).unwrap();
        let mounts = Mounts::new(dir.path().to_path_buf());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let start = Instant::now();
            let infos = mounts.infos();
            tx.send((infos.len(), mounts.count(), start.elapsed())).unwrap();
        });
        let (found, _, took) = rx
            .recv_timeout(ADMIN_TIMEOUT * 3)
            .expect("the relay is still waiting for a socket that never answers");
        assert_eq!(found, 0);
        assert!(took >= ADMIN_TIMEOUT / 2, "{took:?}");
    }
}
