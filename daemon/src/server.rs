//! The Unix socket server: binding (or inheriting) the listener, one task
//! per connection, the handshake, pipelined request handling, and a
//! graceful drain on shutdown. This is the only module that touches client
//! streams.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, SinkExt, StreamExt};
use kms_client::proto::codec::Decoded;
use kms_client::proto::{
    CodecError, ErrorCode, ErrorReply, Execution, Frame, FrameCodec, Request, Response, PROTOCOL_VERSION,
};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::keys::Caller;
use crate::observe::{Observation, Subject};
use crate::ops::{self, Answer, Daemon};

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("socket {path}: another kmsd is already listening there")]
    InUse { path: PathBuf },
    #[error("socket {path} exists and is not a socket; remove it or choose another path")]
    NotSocket { path: PathBuf },
    #[error("socket {path}: {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("LISTEN_FDS: {0}")]
    Inherited(String),
}

/// A bound listener and whether we own its path (and so remove it on exit).
#[derive(Debug)]
pub struct Listener {
    pub listener: UnixListener,
    pub path: Option<PathBuf>,
}

impl Listener {
    /// Binds `path` with mode 0660, replacing a stale socket left by a
    /// crash but never a live one or a non-socket file.
    ///
    /// # Errors
    /// [`BindError`] naming the path and what to fix.
    pub fn bind(path: &Path) -> Result<Self, BindError> {
        let io = |op| {
            move |source| BindError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("cannot create parent directory"))?;
        }
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(io("cannot bind"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io("cannot chmod"))?;
        Ok(Self {
            listener,
            path: Some(path.to_path_buf()),
        })
    }

    /// The socket passed by systemd socket activation, if any.
    ///
    /// # Errors
    /// `Inherited` when `LISTEN_FDS` is set for us but unusable.
    pub fn inherited() -> Result<Option<Self>, BindError> {
        let Some(fd) = crate::notify::listen_fd().map_err(BindError::Inherited)? else {
            return Ok(None);
        };
        fd.set_nonblocking(true)
            .map_err(|e| BindError::Inherited(e.to_string()))?;
        let listener = UnixListener::from_std(fd).map_err(|e| BindError::Inherited(e.to_string()))?;
        Ok(Some(Self { listener, path: None }))
    }
}

pub(crate) fn remove_stale(path: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotSocket {
            path: path.to_path_buf(),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(BindError::InUse {
            path: path.to_path_buf(),
        });
    }
    tracing::info!(path = %path.display(), "removing stale socket left by an earlier run");
    std::fs::remove_file(path).map_err(|source| BindError::Io {
        op: "cannot remove stale socket",
        path: path.into(),
        source,
    })
}

/// What one local caller may cost the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame, in bytes, both ways; also the most a connection
    /// buffers before a frame is complete.
    pub max_frame: usize,
    /// Connections open at once, in all.
    pub max_connections: usize,
    /// Connections open at once per uid.
    pub max_connections_per_uid: usize,
    /// Time from connect to a complete `Hello`.
    pub handshake_timeout: Duration,
    /// Time a connection may stay without a request.
    pub idle_timeout: Duration,
    /// Time a request may take to arrive once its first byte has.
    pub frame_timeout: Duration,
}

/// Open connections per uid, and refusals not yet logged.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    per_uid: parking_lot::Mutex<HashMap<u32, usize>>,
    total: std::sync::atomic::AtomicUsize,
    refused: AtomicU64,
    last_log: parking_lot::Mutex<Option<Instant>>,
}

/// A connection's place in [`Admission`], given back on drop.
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    uid: u32,
}

impl Admission {
    pub(crate) fn admit(self: &Arc<Self>, uid: u32, limits: &Limits) -> Option<Admitted> {
        let mut per_uid = self.per_uid.lock();
        let mine = per_uid.entry(uid).or_insert(0);
        if *mine >= limits.max_connections_per_uid || self.total.load(Ordering::Relaxed) >= limits.max_connections {
            if *mine == 0 {
                per_uid.remove(&uid);
            }
            return None;
        }
        *mine += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Admitted {
            admission: self.clone(),
            uid,
        })
    }

    /// Counts a refusal; logs at most one line a second, with the count.
    pub(crate) fn refused(&self, uid: u32, limits: &Limits) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(
                uid,
                refused = n,
                max = limits.max_connections,
                max_per_uid = limits.max_connections_per_uid,
                "connections refused: too many open (in all or for this uid)"
            );
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_uid = self.admission.per_uid.lock();
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a mount process kmsd started may ask on its channel: what a
/// filesystem needs of its key, nothing else.
const MOUNT_CHANNEL_OPS: [kms_client::proto::op::Op; 4] = {
    use kms_client::proto::op::Op;
    [Op::GenerateDataKey, Op::GenerateDataKeys, Op::Unwrap, Op::ReEncrypt]
};

/// Connections kmsd made itself for the mount processes it started
/// (`children.rs`), each with the key of the child's filesystem: served
/// with kmsd's own authority over that key only
/// ([`Caller::internal_for_key`]: it may use the key whatever its policy,
/// as the filesystems of `[[mount]]` could when kmsd served them
/// in-process) and only for [`MOUNT_CHANNEL_OPS`]. Nothing else can reach
/// such a stream, so they are outside the per-uid limits and the idle
/// timeout.
pub type Trusted = tokio::sync::mpsc::UnboundedReceiver<(std::os::unix::net::UnixStream, String)>;

/// Takes `trusted` connections at once, accepts others once `open` is
/// cancelled (kmsd has started: clients connecting earlier wait in the
/// backlog) and within `limits`, until `shutdown`; then waits for every
/// connection to finish the requests it has already received.
pub async fn run(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    limits: Limits,
    shutdown: CancellationToken,
    mut trusted: Trusted,
    open: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let admission = Arc::new(Admission::default());
    let mut accepting = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = open.cancelled(), if !accepting => accepting = true,
            Some((stream, key)) = trusted.recv() => {
                match stream.set_nonblocking(true).and_then(|()| UnixStream::from_std(stream)) {
                    Ok(stream) => {
                        let caller = Caller::internal_for_key(&key);
                        let conn = connection(stream, caller, None, daemon.clone(), limits, shutdown.clone());
                        tracker.spawn(conn);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot serve a mount process's connection"),
                }
            }
            accepted = listener.accept(), if accepting => match accepted {
                Ok((stream, _)) => {
                    let Some(caller) = caller_of(&stream) else {
                        tracing::warn!("connection without peer credentials refused");
                        continue;
                    };
                    let Some(place) = admission.admit(caller.uid, &limits) else {
                        admission.refused(caller.uid, &limits);
                        daemon.connections_refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    tracker.spawn(connection(stream, caller, Some(place), daemon.clone(), limits, shutdown.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// The caller behind a stream: uid, gid and pid from `SO_PEERCRED` and
/// the supplementary groups from `SO_PEERGROUPS`, both captured by the
/// kernel when the peer connected (reading `/proc/PID` after accept would
/// lend a reused pid's groups).
pub(crate) fn caller_of(stream: &UnixStream) -> Option<Caller> {
    let cred = stream.peer_cred().ok()?;
    let mut caller = Caller::process(cred.uid(), cred.gid(), cred.pid());
    caller.groups = peer_groups(stream).ok()?;
    Some(caller)
}

/// `getsockopt(SO_PEERGROUPS)`: the peer's supplementary groups at
/// connect time.
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // NGROUPS_MAX is 65536; start small and grow to what the kernel asks.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| std::io::Error::other("too many groups"))?;
        // SAFETY: `groups` is a live, writable buffer of exactly `len`
        // bytes; the kernel writes at most `len` bytes and stores the size
        // it needs (or used) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > 65_536 {
            return Err(err);
        }
        groups.resize(n, 0);
    }
}

type Conn = Framed<UnixStream, FrameCodec<Response, Request>>;

struct ConnGuard<'a>(&'a Daemon);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: UnixStream,
    caller: Caller,
    // `None` for a trusted connection (see [`Trusted`]).
    place: Option<Admitted>,
    daemon: Arc<Daemon>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let trusted = place.is_none();
    daemon.connections.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(&daemon);
    let mut conn = Session {
        framed: Framed::new(stream, FrameCodec::new(limits.max_frame)),
        greeted: false,
        caller,
        limits,
        trusted,
        connected: Instant::now(),
    };
    let _place = place;
    if let Err(e) = conn.serve(&daemon, &shutdown).await {
        tracing::debug!(uid = conn.caller.uid, pid = conn.caller.pid, error = %e, "connection ended");
    }
}

struct Session {
    framed: Conn,
    greeted: bool,
    caller: Caller,
    limits: Limits,
    /// kmsd's own mount processes: no idle timeout.
    trusted: bool,
    /// For the handshake timeout, which frames before `Hello` do not reset.
    connected: Instant,
}

/// What to do after a frame.
enum Next {
    Continue,
    Close,
}

impl Session {
    /// Reads frames and answers them in order. Replies are buffered while
    /// more pipelined requests are immediately available and flushed when
    /// the input runs dry.
    async fn serve(&mut self, daemon: &Arc<Daemon>, shutdown: &CancellationToken) -> Result<(), CodecError> {
        loop {
            let item = match self.framed.next().now_or_never() {
                Some(item) => item,
                None => {
                    self.framed.flush().await?;
                    tokio::select! {
                        item = self.next_in_time() => match item {
                            Ok(item) => item,
                            Err(why) => {
                                tracing::info!(uid = self.caller.uid, pid = self.caller.pid, "connection closed: {why}");
                                return Ok(());
                            }
                        },
                        _ = shutdown.cancelled() => return self.drain(daemon).await,
                    }
                }
            };
            let Some(item) = item else {
                return self.framed.flush().await;
            };
            if let Next::Close = self.on_item(daemon, item).await? {
                return self.framed.flush().await;
            }
        }
    }

    /// The next frame, within the connection's deadlines: a `Hello` within
    /// the handshake timeout, a request within the idle timeout, and once
    /// a frame has begun, the rest of it within the frame timeout (so a
    /// caller cannot park a half-sent frame in our buffer).
    async fn next_in_time(&mut self) -> Result<Option<Result<Decoded<Request>, CodecError>>, &'static str> {
        const TICK: Duration = Duration::from_millis(250);
        let waiting = Instant::now();
        let mut partial: Option<Instant> = None;
        loop {
            match tokio::time::timeout(TICK, self.framed.next()).await {
                Ok(item) => return Ok(item),
                Err(_) => {
                    let now = Instant::now();
                    if self.framed.read_buffer().is_empty() && !self.framed.codec().in_frame() {
                        partial = None;
                    } else if partial.is_none() {
                        partial = Some(now);
                    }
                    if partial.is_some_and(|t| now - t >= self.limits.frame_timeout) {
                        return Err("a request did not arrive whole within the frame timeout");
                    }
                    if !self.greeted && now - self.connected >= self.limits.handshake_timeout {
                        return Err("no Hello within the handshake timeout");
                    }
                    if !self.trusted && partial.is_none() && now - waiting >= self.limits.idle_timeout {
                        return Err("idle");
                    }
                }
            }
        }
    }

    /// Answers the requests already received, then closes.
    async fn drain(&mut self, daemon: &Arc<Daemon>) -> Result<(), CodecError> {
        while let Some(Some(item)) = self.framed.next().now_or_never() {
            if let Next::Close = self.on_item(daemon, item).await? {
                break;
            }
        }
        self.framed.flush().await
    }

    async fn on_item(
        &mut self,
        daemon: &Arc<Daemon>,
        item: Result<Decoded<Request>, CodecError>,
    ) -> Result<Next, CodecError> {
        match item {
            Ok(Decoded::Frame(frame)) => self.on_frame(daemon, frame).await,
            Ok(Decoded::Malformed { id, reason }) => {
                // Debug only: a caller sending garbage must not fill the log.
                tracing::debug!(uid = self.caller.uid, pid = self.caller.pid, %reason, "malformed frame");
                let msg = format!("request does not decode: {reason}");
                self.send(id, error(ErrorCode::Malformed, msg)).await?;
                Ok(Next::Continue)
            }
            Err(CodecError::Oversized { max }) => {
                tracing::warn!(
                    uid = self.caller.uid,
                    pid = self.caller.pid,
                    max,
                    "oversized frame; closing connection"
                );
                let msg = format!("frame larger than {max} bytes; closing connection");
                self.send(0, error(ErrorCode::Malformed, msg)).await?;
                Ok(Next::Close)
            }
            Err(e) => Err(e),
        }
    }

    async fn on_frame(&mut self, daemon: &Arc<Daemon>, frame: Frame<Request>) -> Result<Next, CodecError> {
        let Frame { id, body } = frame;
        if !self.greeted {
            return self.on_hello(daemon, id, body).await;
        }
        if self.caller.key_scope().is_some() && !MOUNT_CHANNEL_OPS.contains(&body.op()) {
            let msg = format!(
                "{} is not served on a mount process's channel: it serves its key's data operations only",
                body.op()
            );
            self.send(id, error(ErrorCode::PermissionDenied, msg)).await?;
            return Ok(Next::Continue);
        }
        let subject = (!daemon.observers.is_empty()).then(|| Subject::of(&body));
        let started = Instant::now();
        let answer = self.answer(daemon, id, body).await?;
        if let Some(subject) = &subject {
            daemon.observers.observe(&Observation {
                subject,
                caller: &self.caller,
                response: &answer.response,
                sealed_with: answer.sealed_with,
                elapsed: started.elapsed(),
            });
        }
        self.send(id, answer.response).await?;
        Ok(Next::Continue)
    }

    /// Runs a request after the handshake where its operation's
    /// [`Execution`] says.
    async fn answer(&mut self, daemon: &Arc<Daemon>, id: u64, body: Request) -> Result<Answer, CodecError> {
        let caller = &self.caller;
        Ok(match body.op().info().execution {
            Execution::Inline => ops::handle_guarded(daemon, caller, body, |_, _| {}),
            Execution::Blocking => {
                let (d, c) = (daemon.clone(), caller.clone());
                tokio::task::spawn_blocking(move || ops::handle_guarded(&d, &c, body, |_, _| {}))
                    .await
                    .unwrap_or_else(|_| error(ErrorCode::Internal, "request task failed").into())
            }
            Execution::BlockingWithProgress => return self.with_progress(daemon, id, body).await,
            Execution::Peers => match &daemon.replication {
                Some(r) => r.handle(caller, body).await.into(),
                None => ops::handle_guarded(daemon, caller, body, |_, _| {}),
            },
        })
    }

    /// A blocking request that sends `Progress` frames (at most five a
    /// second) before the final reply.
    async fn with_progress(&mut self, daemon: &Arc<Daemon>, id: u64, body: Request) -> Result<Answer, CodecError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (d, c) = (daemon.clone(), self.caller.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut last: Option<std::time::Instant> = None;
            ops::handle_guarded(&d, &c, body, |done, total| {
                if done == total || last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(200)) {
                    last = Some(std::time::Instant::now());
                    let _ = tx.send((done, total));
                }
            })
        });
        while let Some((done, total)) = rx.recv().await {
            self.send(id, Response::Progress { done, total }).await?;
            self.framed.flush().await?;
        }
        Ok(task
            .await
            .unwrap_or_else(|_| error(ErrorCode::Internal, "request task failed").into()))
    }

    async fn on_hello(&mut self, daemon: &Daemon, id: u64, body: Request) -> Result<Next, CodecError> {
        match body {
            Request::Hello { protocol, .. } if protocol == PROTOCOL_VERSION => {
                self.greeted = true;
                self.send(id, daemon.hello()).await?;
                Ok(Next::Continue)
            }
            Request::Hello { protocol, client } => {
                let msg = format!("{client} speaks protocol {protocol}; this kmsd speaks {PROTOCOL_VERSION}");
                self.send(id, error(ErrorCode::UnsupportedProtocol, msg)).await?;
                Ok(Next::Close)
            }
            _ => {
                self.send(id, error(ErrorCode::Malformed, "the first request must be Hello"))
                    .await?;
                Ok(Next::Continue)
            }
        }
    }

    /// Queues a reply; an unencodable (too large) reply becomes an error.
    async fn send(&mut self, id: u64, body: Response) -> Result<(), CodecError> {
        match self.framed.feed(Frame { id, body }).await {
            Err(CodecError::Oversized { max }) => {
                let msg = format!(
                    "reply larger than the {max}-byte frame limit; send a smaller batch (a backup: raise max_frame)"
                );
                self.framed
                    .feed(Frame {
                        id,
                        body: error(ErrorCode::InvalidArgument, msg),
                    })
                    .await
            }
            other => other,
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyService, ManualClock, RootKey};
    use kms_client::proto::{Context, CreateKey};

    /// A mount process kmsd started may use its filesystem's key, whatever
    /// its policy, and nothing else: no other key, no key management.
    #[tokio::test]
    async fn a_childs_channel_serves_its_keys_data_operations_only() {
        let dir = crate::testutil::private_dir().unwrap();
        let clock = Arc::new(ManualClock::at(1_750_000_000));
        let keys = Arc::new(KeyService::open(dir.path(), RootKey::from_bytes(&[9; 32]), "z", clock).unwrap());
        let owner = Caller::process(1000, 1000, Some(1));
        for name in ["fs", "other"] {
            let create = CreateKey {
                name: Some(name.into()),
                ..CreateKey::default()
            };
            keys.create_key(&owner, &create).unwrap();
        }
        let other_blob = keys.wrap(&owner, "other", &[1; 32], &Context::new()).unwrap().blob;
        let daemon = Arc::new(Daemon::new(keys, Arc::new(crate::mounts::Mounts::default())));
        let listener = UnixListener::bind(dir.path().join("s.sock")).unwrap();
        let limits = Limits {
            max_frame: 1 << 20,
            max_connections: 8,
            max_connections_per_uid: 8,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run(
            listener,
            daemon,
            limits,
            shutdown.clone(),
            rx,
            CancellationToken::new(),
        ));
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        tx.send((ours, "fs".to_string())).unwrap();
        let client = tokio::task::spawn_blocking(move || {
            let mut c = kms_client::BlockingClient::handshake(theirs, &kms_client::ClientOptions::default()).unwrap();
            let ctx = Context::new();
            let dk = c
                .generate_data_key("fs", &ctx, true)
                .expect("its own key, whatever the policy");
            c.unwrap(&dk.blob, &ctx).expect("its own blob");
            let code = |e: kms_client::ClientError| e.code();
            assert_eq!(
                code(c.generate_data_key("other", &ctx, true).unwrap_err()),
                Some(ErrorCode::PermissionDenied)
            );
            assert_eq!(
                code(c.unwrap(&other_blob, &ctx).unwrap_err()),
                Some(ErrorCode::PermissionDenied)
            );
            assert_eq!(
                code(c.schedule_deletion("fs", None).unwrap_err()),
                Some(ErrorCode::PermissionDenied)
            );
            assert_eq!(
                code(c.disable_key("other").unwrap_err()),
                Some(ErrorCode::PermissionDenied)
            );
            assert_eq!(code(c.list_keys().unwrap_err()), Some(ErrorCode::PermissionDenied));
        });
        client.await.unwrap();
        shutdown.cancel();
        server.await.unwrap();
    }
}
