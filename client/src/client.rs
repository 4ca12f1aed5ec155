//! Async client: one connection (a Unix socket, or any byte stream such as
//! the TLS stream between zones) shared by many tasks.
//!
//! Requests are pipelined. A caller takes a fresh id, registers a channel
//! for it in the pending map, and writes its frame under the writer lock; a
//! background task reads every frame and routes it by id to its caller.
//! `Progress` frames go to the caller and keep the entry; the final response
//! removes it. When the connection ends, the reader marks the map closed
//! and fails every pending call, so no call waits forever, and later calls
//! fail at once. A call whose future is dropped removes its own entry; a
//! late reply to it is discarded.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use zeroize::Zeroizing;

use crate::error::ClientError;
use crate::ops::{self, ClientOptions, GeneratedDataKey, Op, ServerInfo, UnwrapItem};
use crate::proto::codec::Decoded;
use crate::proto::{
    CodecError, Context, CreateKey, Frame, FrameCodec, FsRewrapInfo, FsVersionsInfo, KeyInfo, Request, Response,
    RotationEntry, StatusInfo,
};

/// Any stream the client can speak the protocol over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

type ReadPart = Box<dyn AsyncRead + Send + Unpin>;
type WritePart = Box<dyn AsyncWrite + Send + Unpin>;
type Writer = FramedWrite<WritePart, FrameCodec<Request, Response>>;
type Reader = FramedRead<ReadPart, FrameCodec<Request, Response>>;

/// What the reader delivers to a waiting call.
#[derive(Debug)]
enum Event {
    Progress {
        done: u64,
        total: u64,
    },
    /// Boxed: a `Response` is large, progress events are not.
    Final(Box<Result<Response, ClientError>>),
}

/// Calls waiting for replies. Once `closed`, nothing new may register:
/// that is what guarantees a call never waits on a dead connection.
#[derive(Debug, Default)]
struct Pending {
    calls: HashMap<u64, mpsc::UnboundedSender<Event>>,
    closed: bool,
    /// Why the connection ended, when the daemon or the codec said so.
    cause: Option<Arc<ClientError>>,
}

impl Pending {
    fn closed_error(&self) -> ClientError {
        ClientError::Closed {
            cause: self.cause.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // The map stays consistent even if a holder panicked.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, id: u64) -> Result<mpsc::UnboundedReceiver<Event>, ClientError> {
        let mut pending = self.lock();
        if pending.closed {
            return Err(pending.closed_error());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        pending.calls.insert(id, tx);
        Ok(rx)
    }

    fn forget(&self, id: u64) {
        self.lock().calls.remove(&id);
    }

    /// Routes one response to its caller.
    fn route(&self, frame: Frame<Response>) {
        let mut pending = self.lock();
        match frame.body {
            // Id 0 is never used by this client: an error for it concerns
            // the whole connection (e.g. an oversized frame) and is the
            // cause reported when the connection then closes.
            Response::Error(reply) if frame.id == 0 => {
                pending.cause = Some(Arc::new(ClientError::Server(reply)));
            }
            Response::Progress { done, total } => {
                if let Some(tx) = pending.calls.get(&frame.id) {
                    let _ = tx.send(Event::Progress { done, total });
                }
            }
            body => {
                if let Some(tx) = pending.calls.remove(&frame.id) {
                    let _ = tx.send(Event::Final(Box::new(Ok(body))));
                }
            }
        }
    }

    /// Fails one call (a reply that did not decode).
    fn fail(&self, id: u64, error: ClientError) {
        if let Some(tx) = self.lock().calls.remove(&id) {
            let _ = tx.send(Event::Final(Box::new(Err(error))));
        }
    }

    /// Marks the connection dead and fails every pending call.
    fn close(&self, cause: Option<Arc<ClientError>>) {
        let mut pending = self.lock();
        pending.closed = true;
        if pending.cause.is_none() {
            pending.cause = cause;
        }
        let cause = pending.cause.clone();
        for (_, tx) in pending.calls.drain() {
            let error = ClientError::Closed { cause: cause.clone() };
            let _ = tx.send(Event::Final(Box::new(Err(error))));
        }
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Removes a call's pending entry however the call ends (reply, error, or
/// its future being dropped).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.forget(self.id);
    }
}

/// The connection: writer, pending map, id source and the reader task.
struct Connection {
    writer: tokio::sync::Mutex<Writer>,
    shared: Arc<Shared>,
    /// Starts at 1: id 0 means "unknown" in replies to undecodable frames.
    next_id: AtomicU64,
    reader: AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    fn start((read_half, write_half): (ReadPart, WritePart), max_frame: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let reader = FramedRead::new(read_half, FrameCodec::new(max_frame));
        let task = tokio::spawn(read_loop(reader, Arc::clone(&shared)));
        Self {
            writer: tokio::sync::Mutex::new(FramedWrite::new(write_half, FrameCodec::new(max_frame))),
            shared,
            next_id: AtomicU64::new(1),
            reader: task.abort_handle(),
        }
    }

    async fn call(&self, request: Request, mut on_progress: impl FnMut(u64, u64)) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rx = self.shared.register(id)?;
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        self.send(Frame { id, body: request }).await?;
        loop {
            match rx.recv().await {
                Some(Event::Progress { done, total }) => on_progress(done, total),
                Some(Event::Final(result)) => return (*result).and_then(ops::final_response),
                None => return Err(self.shared.lock().closed_error()),
            }
        }
    }

    async fn send(&self, frame: Frame<Request>) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().await;
        match writer.send(frame).await {
            Ok(()) => Ok(()),
            // Nothing was written: the connection is still in sync.
            Err(e @ CodecError::Oversized { .. }) | Err(e @ CodecError::Encode(_)) => Err(e.into()),
            Err(CodecError::Io(e)) => {
                // A frame may be half written: nobody can use the stream now.
                self.shared.close(None);
                Err(ClientError::Io(e))
            }
        }
    }
}

async fn read_loop(mut reader: Reader, shared: Arc<Shared>) {
    let cause = loop {
        match reader.next().await {
            Some(Ok(Decoded::Frame(frame))) => shared.route(frame),
            Some(Ok(Decoded::Malformed { id, reason })) => {
                let msg = format!("response does not decode: {reason}");
                shared.fail(id, ClientError::UnexpectedResponse(msg));
            }
            Some(Err(e)) => break Some(Arc::new(ClientError::Codec(e))),
            None => break None,
        }
    };
    shared.close(cause);
}

/// An async kmsd client. Cheap to clone; clones share one connection and
/// may call concurrently from any number of tasks.
#[derive(Clone)]
pub struct Client {
    conn: Arc<Connection>,
    server: Arc<ServerInfo>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    /// Connects to the daemon's socket with default options and performs
    /// the `Hello` handshake.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if the socket cannot be opened,
    /// [`ClientError::UnsupportedProtocol`] if the daemon refuses our
    /// protocol version, or any transport error during the handshake.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(path, &ClientOptions::default()).await
    }

    /// Like [`Client::connect`], with explicit options.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(path: impl AsRef<Path>, options: &ClientOptions) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).await.map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::handshake(stream, options).await
    }

    /// Performs the handshake on an already connected stream (an inherited
    /// socket, or one end of a socket pair in tests). Must be called inside
    /// a tokio runtime: it spawns the reader task.
    ///
    /// # Errors
    /// As [`Client::connect`], minus `Connect`.
    pub async fn handshake(stream: UnixStream, options: &ClientOptions) -> Result<Self, ClientError> {
        // A Unix stream splits without a lock.
        let (r, w) = stream.into_split();
        Self::handshake_parts((Box::new(r), Box::new(w)), options).await
    }

    /// Like [`Client::handshake`], over any byte stream (the daemons of two
    /// zones speak the protocol inside TLS).
    ///
    /// # Errors
    /// As [`Client::handshake`].
    pub async fn handshake_over(stream: impl Stream, options: &ClientOptions) -> Result<Self, ClientError> {
        let (r, w) = tokio::io::split(stream);
        Self::handshake_parts((Box::new(r), Box::new(w)), options).await
    }

    async fn handshake_parts(parts: (ReadPart, WritePart), options: &ClientOptions) -> Result<Self, ClientError> {
        let conn = Connection::start(parts, options.max_frame);
        let reply = conn.call(ops::hello(&options.client_name), |_, _| {}).await;
        let server = ops::check_hello(reply)?;
        Ok(Self {
            conn: Arc::new(conn),
            server: Arc::new(server),
        })
    }

    /// What the daemon said about itself in the handshake.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server
    }

    /// True once the connection has ended; every call then fails at once.
    pub fn is_closed(&self) -> bool {
        self.conn.shared.is_closed()
    }

    /// Sends one request and waits for its final response, ignoring
    /// progress frames.
    ///
    /// # Errors
    /// [`ClientError::Server`] for an error reply; [`ClientError::Closed`]
    /// if the connection ends first; codec and I/O errors.
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        self.conn.call(request, |_, _| {}).await
    }

    /// Like [`Client::call`], passing every `Progress { done, total }`
    /// frame that precedes the final response to `on_progress`.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_with_progress(
        &self,
        request: Request,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<Response, ClientError> {
        self.conn.call(request, on_progress).await
    }

    async fn run<T>(&self, op: Op<T>) -> Result<T, ClientError> {
        let response = self.call(op.request).await?;
        (op.parse)(response)
    }

    /// Daemon status.
    ///
    /// # Errors
    /// As [`Client::call`], or [`ClientError::UnexpectedResponse`].
    pub async fn status(&self) -> Result<StatusInfo, ClientError> {
        self.run(ops::status()).await
    }

    /// Creates a customer key.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn create_key(&self, params: CreateKey) -> Result<KeyInfo, ClientError> {
        self.run(ops::create_key(params)).await
    }

    /// Describes a key (by id or name).
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn describe_key(&self, key: &str) -> Result<KeyInfo, ClientError> {
        self.run(ops::describe_key(key)).await
    }

    /// Lists the keys the caller may see.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, ClientError> {
        self.run(ops::list_keys()).await
    }

    /// Enables a key. Returns the key when the daemon sends it back.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn enable_key(&self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::enable_key(key)).await
    }

    /// Disables a key.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn disable_key(&self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::disable_key(key)).await
    }

    /// Schedules deletion in `days` (7..=30, daemon default 30).
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn schedule_deletion(&self, key: &str, days: Option<u32>) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::schedule_deletion(key, days)).await
    }

    /// Cancels a scheduled deletion.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn cancel_deletion(&self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::cancel_deletion(key)).await
    }

    /// Replicates a key into another zone.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn replicate_key(&self, key: &str, zone: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::replicate_key(key, zone)).await
    }

    /// In a replica zone: makes this zone the key's primary (failover).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn promote_key(&self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::promote_key(key)).await
    }

    /// On the primary: stops replicating `key` to `zone`, whose replica is
    /// removed.
    ///
    /// # Errors
    /// As [`Client::call`]; `unavailable` when `zone` cannot be reached.
    pub async fn unreplicate_key(&self, key: &str, zone: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::unreplicate_key(key, zone)).await
    }

    /// Rotates a key now (manual rotation).
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn rotate_key(&self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::rotate_key(key)).await
    }

    /// Lists a key's versions with time and origin.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn list_rotations(&self, key: &str) -> Result<Vec<RotationEntry>, ClientError> {
        self.run(ops::list_rotations(key)).await
    }

    /// Enables automatic rotation (period in days, daemon default 365).
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn enable_rotation(&self, key: &str, period_days: Option<u32>) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::enable_rotation(key, period_days)).await
    }

    /// Disables automatic rotation.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn disable_rotation(&self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::disable_rotation(key)).await
    }

    /// Encrypts up to [`crate::proto::MAX_PLAINTEXT`] bytes; returns the blob.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn encrypt(&self, key: &str, plaintext: &[u8], context: &Context) -> Result<Vec<u8>, ClientError> {
        self.run(ops::encrypt(key, plaintext, context)).await
    }

    /// Decrypts a blob made by `encrypt`.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn decrypt(&self, blob: &[u8], context: &Context) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        self.run(ops::decrypt(blob, context)).await
    }

    /// Wraps a caller's data key.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn wrap(&self, key: &str, dek: &[u8], context: &Context) -> Result<Vec<u8>, ClientError> {
        self.run(ops::wrap(key, dek, context)).await
    }

    /// Unwraps a data key.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn unwrap(&self, blob: &[u8], context: &Context) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        self.run(ops::unwrap(blob, context)).await
    }

    /// Generates a fresh data key wrapped by `key`.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn generate_data_key(
        &self,
        key: &str,
        context: &Context,
        with_plaintext: bool,
    ) -> Result<GeneratedDataKey, ClientError> {
        self.run(ops::generate_data_key(key, context, with_plaintext)).await
    }

    /// Re-encrypts a blob to the active version of `to` (default: its own
    /// key) inside the daemon. `to_context` defaults to `context`.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn re_encrypt(
        &self,
        blob: &[u8],
        context: &Context,
        to: Option<&str>,
        to_context: Option<&Context>,
    ) -> Result<Vec<u8>, ClientError> {
        self.run(ops::re_encrypt(blob, context, to, to_context)).await
    }

    /// Wraps many data keys in one request.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn wrap_batch(
        &self,
        key: &str,
        deks: &[impl AsRef<[u8]>],
        context: &Context,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        self.run(ops::wrap_batch(key, deks, context)).await
    }

    /// Unwraps many blobs in one request; each item succeeds or fails alone.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn unwrap_batch(
        &self,
        blobs: &[impl AsRef<[u8]>],
        context: &Context,
    ) -> Result<Vec<UnwrapItem>, ClientError> {
        self.run(ops::unwrap_batch(blobs, context)).await
    }

    /// Generates `count` data keys in one request.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn generate_data_key_batch(
        &self,
        key: &str,
        count: u32,
        context: &Context,
        with_plaintext: bool,
    ) -> Result<Vec<GeneratedDataKey>, ClientError> {
        self.run(ops::generate_data_key_batch(key, count, context, with_plaintext))
            .await
    }

    /// Generates one data key per context in one request, each bound to
    /// its own context, all under the key's active version.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn generate_data_keys(
        &self,
        key: &str,
        contexts: &[Context],
        with_plaintext: bool,
    ) -> Result<Vec<GeneratedDataKey>, ClientError> {
        self.run(ops::generate_data_keys(key, contexts, with_plaintext)).await
    }

    /// Counts files per key version under a mount.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn fs_versions(&self, mount: &str) -> Result<FsVersionsInfo, ClientError> {
        self.run(ops::fs_versions(mount)).await
    }

    /// Re-wraps every file header under a mount to the active version.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn fs_rewrap(&self, mount: &str) -> Result<FsRewrapInfo, ClientError> {
        self.fs_rewrap_with_progress(mount, |_, _| {}).await
    }

    /// Like [`Client::fs_rewrap`], reporting progress as it goes.
    ///
    /// # Errors
    /// As [`Client::status`].
    pub async fn fs_rewrap_with_progress(
        &self,
        mount: &str,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<FsRewrapInfo, ClientError> {
        let op = ops::fs_rewrap(mount);
        let response = self.call_with_progress(op.request, on_progress).await?;
        (op.parse)(response)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{Encoder, Framed};

    use super::*;
    use crate::proto::{ErrorCode, ErrorReply, PROTOCOL_VERSION};

    type ServerSide = Framed<UnixStream, FrameCodec<Response, Request>>;

    const LIMIT: Duration = Duration::from_secs(5);

    async fn next_request(server: &mut ServerSide) -> Frame<Request> {
        match server.next().await {
            Some(Ok(Decoded::Frame(frame))) => frame,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    async fn reply(server: &mut ServerSide, id: u64, body: Response) {
        server.send(Frame { id, body }).await.unwrap();
    }

    /// A connected client and the fake server's end, past the handshake.
    async fn pair() -> (Client, ServerSide) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut server = Framed::new(b, FrameCodec::new(crate::proto::DEFAULT_MAX_FRAME));
        let options = ClientOptions::default();
        let answer = async {
            let hello = next_request(&mut server).await;
            assert!(matches!(
                hello.body,
                Request::Hello {
                    protocol: PROTOCOL_VERSION,
                    ..
                }
            ));
            let body = Response::Hello {
                server: "fake/1".into(),
                protocol: PROTOCOL_VERSION,
                zone: "test-zone".into(),
            };
            reply(&mut server, hello.id, body).await;
        };
        let (client, ()) = tokio::join!(Client::handshake(a, &options), answer);
        (client.unwrap(), server)
    }

    fn encrypt_request(tag: &str) -> Request {
        Request::Encrypt {
            key: "k".into(),
            plaintext: tag.as_bytes().into(),
            context: Context::new(),
        }
    }

    fn echo(frame: Frame<Request>) -> (u64, Response) {
        match frame.body {
            Request::Encrypt { plaintext, .. } => (frame.id, Response::Blob(plaintext.to_vec())),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn handshake_exposes_server_info() {
        let (client, _server) = pair().await;
        assert_eq!(client.server_info().zone, "test-zone");
        assert_eq!(client.server_info().server, "fake/1");
    }

    #[tokio::test]
    async fn handshake_refused_is_unsupported_protocol() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut server: ServerSide = Framed::new(b, FrameCodec::new(1024));
        let options = ClientOptions::default();
        let answer = async {
            let hello = next_request(&mut server).await;
            let refusal = ErrorReply::new(ErrorCode::UnsupportedProtocol, "want 9");
            reply(&mut server, hello.id, Response::Error(refusal)).await;
        };
        let (client, ()) = tokio::join!(Client::handshake(a, &options), answer);
        assert!(matches!(client, Err(ClientError::UnsupportedProtocol { .. })));
    }

    #[tokio::test]
    async fn out_of_order_replies_reach_their_callers() {
        let (client, mut server) = pair().await;
        let server_task = tokio::spawn(async move {
            let mut frames = Vec::new();
            for _ in 0..3 {
                frames.push(next_request(&mut server).await);
            }
            for frame in frames.into_iter().rev() {
                let (id, body) = echo(frame);
                reply(&mut server, id, body).await;
            }
            server
        });
        let calls = ["a", "b", "c"].map(|tag| {
            let client = client.clone();
            tokio::spawn(async move { (tag, client.call(encrypt_request(tag)).await) })
        });
        for call in calls {
            let (tag, result) = tokio::time::timeout(LIMIT, call).await.unwrap().unwrap();
            assert_eq!(result.unwrap(), Response::Blob(tag.as_bytes().to_vec()));
        }
        server_task.await.unwrap();
    }

    #[tokio::test]
    async fn progress_precedes_the_final_response() {
        let (client, mut server) = pair().await;
        tokio::spawn(async move {
            let frame = next_request(&mut server).await;
            for done in 1..=3 {
                reply(&mut server, frame.id, Response::Progress { done, total: 3 }).await;
            }
            let info = FsRewrapInfo {
                rewrapped: 3,
                already_current: 0,
                failed: 0,
            };
            reply(&mut server, frame.id, Response::FsRewrap(info)).await;
            server
        });
        let mut seen = Vec::new();
        let info = client
            .fs_rewrap_with_progress("/mnt", |done, total| seen.push((done, total)))
            .await
            .unwrap();
        assert_eq!(info.rewrapped, 3);
        assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);
    }

    #[tokio::test]
    async fn error_reply_is_a_server_error() {
        let (client, mut server) = pair().await;
        tokio::spawn(async move {
            let frame = next_request(&mut server).await;
            let e = ErrorReply::new(ErrorCode::NotFound, "no key named x");
            reply(&mut server, frame.id, Response::Error(e)).await;
            server
        });
        let err = client.describe_key("x").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound));
    }

    #[tokio::test]
    async fn pending_calls_fail_when_the_server_closes() {
        let (client, mut server) = pair().await;
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.call(encrypt_request(&i.to_string())).await })
            })
            .collect();
        for _ in 0..4 {
            next_request(&mut server).await;
        }
        drop(server);
        for call in calls {
            let result = tokio::time::timeout(LIMIT, call).await.unwrap().unwrap();
            assert!(matches!(result, Err(ClientError::Closed { .. })), "{result:?}");
        }
        assert!(client.is_closed());
        let later = tokio::time::timeout(LIMIT, client.status()).await.unwrap();
        assert!(matches!(later, Err(ClientError::Closed { .. })));
    }

    #[tokio::test]
    async fn connection_error_with_id_zero_is_the_close_cause() {
        let (client, mut server) = pair().await;
        tokio::spawn(async move {
            next_request(&mut server).await;
            let e = ErrorReply::new(ErrorCode::Malformed, "frame too large");
            reply(&mut server, 0, Response::Error(e)).await;
        });
        let err = client.status().await.unwrap_err();
        assert!(matches!(err, ClientError::Closed { cause: Some(_) }), "{err:?}");
        assert_eq!(err.code(), Some(ErrorCode::Malformed));
    }

    #[tokio::test]
    async fn undecodable_reply_fails_only_its_call() {
        let (client, mut server) = pair().await;
        let server_task = tokio::spawn(async move {
            let frame = next_request(&mut server).await;
            // The id, then an enum tag no Response has.
            let mut body = postcard::to_allocvec(&frame.id).unwrap();
            body.extend_from_slice(&[0xff, 0xff]);
            let mut raw = BytesMut::new();
            tokio_util::codec::LengthDelimitedCodec::new()
                .encode(bytes::Bytes::from(body), &mut raw)
                .unwrap();
            server.get_mut().write_all(&raw).await.unwrap();
            let frame = next_request(&mut server).await;
            let (id, body) = echo(frame);
            reply(&mut server, id, body).await;
            server
        });
        let err = client.status().await.unwrap_err();
        assert!(matches!(err, ClientError::UnexpectedResponse(_)), "{err:?}");
        let blob = client.encrypt("k", b"ok", &Context::new()).await.unwrap();
        assert_eq!(blob, b"ok");
        server_task.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_request_is_refused_locally_and_connection_survives() {
        let (client, mut server) = pair().await;
        tokio::spawn(async move {
            let (id, body) = echo(next_request(&mut server).await);
            reply(&mut server, id, body).await;
            server
        });
        let huge = vec![0u8; crate::proto::DEFAULT_MAX_FRAME + 1];
        let err = client.encrypt("k", &huge, &Context::new()).await.unwrap_err();
        assert!(matches!(err, ClientError::Codec(CodecError::Oversized { .. })));
        assert_eq!(client.encrypt("k", b"small", &Context::new()).await.unwrap(), b"small");
    }

    #[tokio::test]
    async fn cancelled_call_does_not_disturb_the_next() {
        let (client, mut server) = pair().await;
        let slow = client.call(encrypt_request("slow"));
        assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
        let server_task = tokio::spawn(async move {
            let late = next_request(&mut server).await;
            let next = next_request(&mut server).await;
            let (id, body) = echo(late);
            reply(&mut server, id, body).await;
            let (id, body) = echo(next);
            reply(&mut server, id, body).await;
            server
        });
        let fresh = client.call(encrypt_request("fresh")).await.unwrap();
        assert_eq!(fresh, Response::Blob(b"fresh".to_vec()));
        assert!(client.conn.shared.lock().calls.is_empty());
        server_task.await.unwrap();
    }
}
