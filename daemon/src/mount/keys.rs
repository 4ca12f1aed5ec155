//! The mount process's [`KeySource`]: kmsd over its socket, like any other
//! caller. Data keys are generated, unwrapped and re-wrapped by kmsd under
//! the file's context; this process never sees key material, only the
//! data keys of the files it has open.
//!
//! Dialled connections are pooled (one per concurrent key request). A
//! request that meets a lost connection (kmsd restarting) is retried on a
//! new one until `timeout` has passed since it began, then fails
//! `Unavailable`, which the filesystem answers EIO: an open waits for kmsd,
//! but never hangs. A child of kmsd instead gets one connection from kmsd
//! (`children.rs`) and uses only that one: when it breaks, kmsd is gone
//! and so is the child.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kms_client::blob::BlobHeader;
use kms_client::proto::{Context, ErrorCode};
use kms_client::{BlockingClient, ClientError, ClientOptions};
use kms_fuse::keys::{file_context, FileId};
use kms_fuse::{Dek, KeyError, KeySource};
use parking_lot::{Condvar, Mutex};
use rand::RngCore;
use uuid::Uuid;

/// Pause between attempts to reach kmsd.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Connections one mount process holds to kmsd at most, in use or idle.
/// kmsd limits connections per uid (`limits.max_connections_per_uid`,
/// 32), and every mount process under systemd is root: more key requests
/// than this at once wait for a connection (within the key timeout)
/// rather than take root's whole allowance.
pub const MAX_CONNECTIONS: usize = 4;

/// The context of the probe that finds the key's id and active version.
fn probe_context() -> Context {
    [("kmsd-mount.probe".to_string(), "1".to_string())].into()
}

/// How the mount process reaches kmsd.
#[derive(Debug)]
enum Conns {
    /// Dials kmsd's socket; idle connections wait here.
    Dial {
        socket: PathBuf,
        idle: Mutex<Vec<BlockingClient>>,
        /// Requests holding a connection (at most [`MAX_CONNECTIONS`]).
        busy: Mutex<usize>,
        freed: Condvar,
    },
    /// The one connection kmsd gave its child.
    Given(Mutex<BlockingClient>),
}

/// Data keys for one filesystem from kmsd.
#[derive(Debug)]
pub struct ClientKeys {
    conns: Conns,
    key_id: Uuid,
    timeout: Duration,
    /// kmsd's change file (`crate::changes`); without it no key is made
    /// ahead.
    changes: Option<PathBuf>,
    ahead: Mutex<Ahead>,
}

/// Keys of new files made ahead, in one request, valid while kmsd's change
/// file reads as `token` and for [`AHEAD_MAX_AGE`] at most.
struct Ahead {
    token: Vec<u8>,
    format: u16,
    made: Instant,
    /// The next batch's size: doubles each time one is used up, halves when
    /// one expires unused.
    batch: usize,
    keys: Vec<(FileId, Dek, Vec<u8>)>,
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("keys", &self.keys.len())
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// Smallest and largest batch of keys made ahead.
const AHEAD_MIN: usize = 4;
const AHEAD_MAX: usize = 64;

/// How long a key made ahead may wait for its file. Keys made ahead are
/// data keys of files that do not exist yet; they are zeroized when dropped.
const AHEAD_MAX_AGE: Duration = Duration::from_secs(30);

impl ClientKeys {
    /// Reaches kmsd at `socket` (waiting up to `timeout` for it) and finds
    /// the id of `key` (a name or an id) by generating a throw-away data
    /// key, which also proves that this process may use it.
    ///
    /// # Errors
    /// kmsd unreachable within `timeout`, the key unknown or not usable by
    /// this process.
    pub fn connect(socket: &Path, key: &str, timeout: Duration) -> Result<Self, KeyError> {
        let conns = Conns::Dial {
            socket: socket.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            busy: Mutex::new(0),
            freed: Condvar::new(),
        };
        Self::with(conns, key, timeout)
    }

    /// Like [`connect`](Self::connect), over the connection `stream` that
    /// kmsd handed its child.
    ///
    /// # Errors
    /// The handshake fails, the key is unknown.
    pub fn given(stream: UnixStream, key: &str, timeout: Duration) -> Result<Self, KeyError> {
        let c = stream
            .set_read_timeout(Some(timeout))
            .map_err(ClientError::from)
            .and_then(|()| BlockingClient::handshake(stream, &options()))
            .map_err(|e| key_error(&e, Path::new("(inherited connection)")))?;
        Self::with(Conns::Given(Mutex::new(c)), key, timeout)
    }

    fn with(conns: Conns, key: &str, timeout: Duration) -> Result<Self, KeyError> {
        let mut keys = Self {
            conns,
            key_id: Uuid::nil(),
            timeout,
            changes: None,
            ahead: Mutex::new(Ahead {
                token: Vec::new(),
                format: 0,
                made: Instant::now(),
                batch: AHEAD_MIN,
                keys: Vec::new(),
            }),
        };
        keys.key_id = keys.probe(key)?.key_id;
        Ok(keys)
    }

    /// Makes the keys of new files ahead, in batches, while kmsd's change
    /// file at `path` (`crate::changes`) says no key changed since.
    pub fn with_changes(mut self, path: PathBuf) -> Self {
        self.changes = Some(path);
        self
    }

    /// A new file's key made now, in its own request.
    fn one_file_key(&self, format_version: u16) -> Result<(FileId, Dek, Vec<u8>), KeyError> {
        let mut file_id = FileId::default();
        rand::rngs::OsRng.fill_bytes(&mut file_id);
        let (dek, blob) = self.new_dek(&file_context(&file_id, format_version))?;
        Ok((file_id, dek, blob))
    }

    /// `batch` new files' keys in one request.
    fn file_keys(&self, format_version: u16, batch: usize) -> Result<Vec<(FileId, Dek, Vec<u8>)>, KeyError> {
        let ids: Vec<FileId> = (0..batch)
            .map(|_| {
                let mut id = FileId::default();
                rand::rngs::OsRng.fill_bytes(&mut id);
                id
            })
            .collect();
        let contexts: Vec<Context> = ids.iter().map(|id| file_context(id, format_version)).collect();
        let key = self.key_id.to_string();
        let made = self.call(|c| c.generate_data_keys(&key, &contexts, true))?;
        if made.len() != batch {
            return Err(KeyError::Unavailable(format!(
                "kmsd made {} data keys for {batch} files",
                made.len()
            )));
        }
        ids.into_iter()
            .zip(made)
            .map(|(id, dk)| {
                self.check_key(&dk.blob)?;
                let plain = dk
                    .plaintext
                    .as_ref()
                    .ok_or_else(|| KeyError::Unavailable("kmsd sent no data key".into()))?;
                Ok((id, dek_from(plain)?, dk.blob.clone()))
            })
            .collect()
    }

    /// The header of a fresh blob of `key`'s active version.
    fn probe(&self, key: &str) -> Result<BlobHeader, KeyError> {
        let dk = self.call(|c| c.generate_data_key(key, &probe_context(), false))?;
        BlobHeader::parse(&dk.blob).map_err(|e| KeyError::Unavailable(format!("kmsd sent a bad blob: {e}")))
    }

    /// A new connection whose handshake, too, gives up at `deadline`: a
    /// socket that accepts into its backlog and never answers (socket
    /// activation while kmsd is not ready, a hung kmsd) must not hold a
    /// FUSE thread past the key timeout.
    fn connect_one(socket: &Path, deadline: Instant) -> Result<BlockingClient, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        let left = time_left(deadline);
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))?;
        BlockingClient::handshake(stream, &options())
    }

    /// Runs `f` on a connection to kmsd.
    fn call<T>(&self, f: impl Fn(&mut BlockingClient) -> Result<T, ClientError>) -> Result<T, KeyError> {
        match &self.conns {
            Conns::Dial {
                socket,
                idle,
                busy,
                freed,
            } => {
                let deadline = Instant::now() + self.timeout;
                let mut n = busy.lock();
                while *n >= MAX_CONNECTIONS {
                    if freed.wait_until(&mut n, deadline).timed_out() {
                        return Err(KeyError::Unavailable(format!(
                            "all {MAX_CONNECTIONS} connections to kmsd stayed busy for {:?}",
                            self.timeout
                        )));
                    }
                }
                *n += 1;
                drop(n);
                let result = self.dial_call(socket, idle, deadline, f);
                *busy.lock() -= 1;
                freed.notify_one();
                result
            }
            Conns::Given(c) => {
                let mut c = c.lock();
                let result = f(&mut c);
                if c.is_broken() {
                    // The only connection this child has cannot be used
                    // again (a reply may still come): every later open
                    // would fail while kmsd is well. Exit, so that kmsd
                    // starts a fresh child on a fresh connection.
                    tracing::error!(error = ?result.as_ref().err(), "the connection from kmsd broke; exiting so that kmsd starts this mount again");
                    std::process::exit(1);
                }
                result.map_err(|e| key_error(&e, Path::new("(inherited connection)")))
            }
        }
    }

    /// Runs `f` on a pooled connection, retrying on a fresh one while the
    /// connection is what failed and `timeout` has not passed.
    fn dial_call<T>(
        &self,
        socket: &Path,
        idle: &Mutex<Vec<BlockingClient>>,
        deadline: Instant,
        f: impl Fn(&mut BlockingClient) -> Result<T, ClientError>,
    ) -> Result<T, KeyError> {
        loop {
            let pooled = idle.lock().pop();
            let conn = pooled.map_or_else(|| Self::connect_one(socket, deadline), Ok);
            // Each attempt waits only for what is left of the deadline.
            let conn = conn.and_then(|c| c.set_read_timeout(Some(time_left(deadline))).map(|()| c));
            let attempt = match conn {
                Ok(mut c) => f(&mut c).map(|v| (v, c)).map_err(|e| (e, None)),
                Err(e) => Err((e, None::<BlockingClient>)),
            };
            match attempt {
                Ok((v, c)) => {
                    give_back(idle, c);
                    return Ok(v);
                }
                Err((e, _)) if e.is_connection_error() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "kmsd unreachable; retrying");
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err((e, _)) => return Err(key_error(&e, socket)),
            }
        }
    }

    /// Refuses a blob of another key before it reaches kmsd, where this
    /// process may be allowed to use other keys too.
    fn check_key(&self, blob: &[u8]) -> Result<(), KeyError> {
        let header = BlobHeader::parse(blob).map_err(|e| KeyError::DecryptFailed(e.to_string()))?;
        if header.key_id != self.key_id {
            return Err(KeyError::DecryptFailed(
                "the header's key is not this filesystem's key".into(),
            ));
        }
        Ok(())
    }
}

/// What is left until `deadline`, at least 1 ms (a zero timeout means
/// none to the socket).
fn time_left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn give_back(idle: &Mutex<Vec<BlockingClient>>, c: BlockingClient) {
    let mut idle = idle.lock();
    if !c.is_broken() && idle.len() < MAX_CONNECTIONS {
        idle.push(c);
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        client_name: format!("kmsd-mount/{}", env!("CARGO_PKG_VERSION")),
        ..ClientOptions::default()
    }
}

/// A client error as the filesystem sees it.
fn key_error(e: &ClientError, socket: &Path) -> KeyError {
    let message = chain(e);
    match e.code() {
        Some(ErrorCode::PermissionDenied) => KeyError::Denied(message),
        Some(ErrorCode::DecryptFailed) => KeyError::DecryptFailed(message),
        _ if e.is_connection_error() => KeyError::Unavailable(format!("kmsd at {}: {message}", socket.display())),
        _ => KeyError::Unavailable(message),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn dek_from(bytes: &[u8]) -> Result<Dek, KeyError> {
    let mut arr: [u8; kms_fuse::keys::DEK_LEN] = bytes
        .try_into()
        .map_err(|_| KeyError::DecryptFailed("data key has the wrong length".into()))?;
    let dek = Dek::from_bytes(arr);
    zeroize::Zeroize::zeroize(&mut arr);
    Ok(dek)
}

impl KeySource for ClientKeys {
    fn key_id(&self) -> Uuid {
        self.key_id
    }

    fn new_dek(&self, ctx: &Context) -> Result<(Dek, Vec<u8>), KeyError> {
        let key = self.key_id.to_string();
        let dk = self.call(|c| c.generate_data_key(&key, ctx, true))?;
        let plain = dk
            .plaintext
            .as_ref()
            .ok_or_else(|| KeyError::Unavailable("kmsd sent no data key".into()))?;
        Ok((dek_from(plain)?, dk.blob.clone()))
    }

    /// A key made ahead if one is valid, else a new batch (the first of it
    /// for this file). The change file is read first, and a key is used
    /// only if the file still reads as when the key was asked for: kmsd
    /// replaces it after any change to any key, before it answers the
    /// request that made the change, so a file created after `key rotate`
    /// or `key disable` has returned never gets a key made before.
    fn new_file_key(&self, format_version: u16) -> Result<(FileId, Dek, Vec<u8>), KeyError> {
        let Some(token) = self.changes.as_deref().and_then(crate::changes::read) else {
            return self.one_file_key(format_version);
        };
        let mut ahead = self.ahead.lock();
        if ahead.token != token || ahead.format != format_version {
            ahead.keys.clear();
        } else if ahead.made.elapsed() > AHEAD_MAX_AGE && !ahead.keys.is_empty() {
            ahead.keys.clear();
            ahead.batch = (ahead.batch / 2).max(AHEAD_MIN);
        }
        if let Some(k) = ahead.keys.pop() {
            return Ok(k);
        }
        let batch = ahead.batch;
        let mut keys = self.file_keys(format_version, batch)?;
        let first = keys.pop().expect("a batch has at least one key");
        ahead.keys = keys;
        ahead.token = token;
        ahead.format = format_version;
        ahead.made = Instant::now();
        ahead.batch = (batch * 2).min(AHEAD_MAX);
        Ok(first)
    }

    fn unwrap_dek(&self, ctx: &Context, blob: &[u8]) -> Result<Dek, KeyError> {
        self.check_key(blob)?;
        let plain = self.call(|c| c.unwrap(blob, ctx))?;
        dek_from(&plain)
    }

    fn rewrap(&self, ctx: &Context, blob: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.check_key(blob)?;
        self.call(|c| c.re_encrypt(blob, ctx, None, None))
    }

    fn active_version(&self) -> Result<u32, KeyError> {
        Ok(self.probe(&self.key_id.to_string())?.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kmsd's socket accepting into its backlog and never answering (socket
    /// activation while kmsd is not ready): the request gives up after the
    /// key timeout, handshake included, instead of holding a FUSE thread.
    #[test]
    fn a_socket_that_never_answers_fails_within_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsd.sock");
        let _silent = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let start = Instant::now();
            let r = ClientKeys::connect(&path, "k", Duration::from_millis(500));
            tx.send((r.map(|_| ()), start.elapsed())).unwrap();
        });
        let (r, took) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("still waiting 5 s into a 0.5 s timeout");
        assert!(matches!(r, Err(KeyError::Unavailable(_))), "{r:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
