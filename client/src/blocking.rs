//! Blocking client over a std `UnixStream`, for callers without an async
//! runtime (the `kmsctl` CLI, scripts, FFI-style embedders).
//!
//! One request at a time: write a frame, read frames until the final
//! response with that id. Frame bodies are made by the same
//! [`encode_body`]/[`decode_body`] helpers as the async codec; this module
//! only adds the u32 big-endian length prefix and enforces the frame limit
//! in both directions. After a transport error, a timeout, or a reply that
//! cannot be matched to the request, the stream may be mid-frame: the
//! client then refuses further calls (reconnect to continue).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::ClientError;
use crate::ops::{self, ClientOptions, GeneratedDataKey, Op, ServerInfo, UnwrapItem};
use crate::proto::codec::{decode_body, encode_body, Decoded};
use crate::proto::{
    CodecError, Context, CreateKey, Frame, FsRewrapInfo, FsStatsInfo, FsVersionsInfo, KeyInfo, Request, Response,
    RotationEntry, StatusInfo, StoreStatusInfo,
};

/// Length of the frame length prefix.
const PREFIX_LEN: usize = 4;

/// Writes one frame: u32 BE length, then `body`.
///
/// # Errors
/// [`CodecError::Oversized`] (nothing written) if `body` is longer than
/// `max`; I/O errors.
pub fn write_frame(w: &mut impl Write, body: &[u8], max: usize) -> Result<(), ClientError> {
    if body.len() > max {
        return Err(CodecError::Oversized { max }.into());
    }
    let len = u32::try_from(body.len()).map_err(|_| CodecError::Oversized { max })?;
    let mut buf = Zeroizing::new(Vec::with_capacity(PREFIX_LEN + body.len()));
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame body. The buffer is zeroized on drop: it may hold
/// plaintext.
///
/// # Errors
/// [`ClientError::Closed`] on end of stream before a frame starts,
/// [`CodecError::Oversized`] if the announced length exceeds `max`, I/O
/// errors (including `UnexpectedEof` inside a frame).
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match r.read_exact(&mut prefix) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ClientError::closed()),
        other => other?,
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(CodecError::Oversized { max }.into());
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    r.read_exact(&mut body)?;
    Ok(body)
}

/// The framed stream and its request ids.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    max_frame: usize,
    /// Starts at 1: id 0 means "unknown" in replies to undecodable frames.
    next_id: u64,
    /// Set while an exchange is incomplete; stays set if it failed midway.
    broken: bool,
}

impl Conn {
    fn call(&mut self, request: Request, on_progress: &mut dyn FnMut(u64, u64)) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::closed());
        }
        let id = self.next_id;
        self.next_id += 1;
        let body = Zeroizing::new(encode_body(&Frame { id, body: request })?);
        self.broken = true;
        write_frame(&mut self.stream, &body, self.max_frame)?;
        self.read_reply(id, on_progress)
    }

    fn read_reply(&mut self, id: u64, on_progress: &mut dyn FnMut(u64, u64)) -> Result<Response, ClientError> {
        loop {
            let frame = read_frame(&mut self.stream, self.max_frame)?;
            match decode_body::<Response>(&frame) {
                Decoded::Frame(f) if f.id == id => match f.body {
                    Response::Progress { done, total } => on_progress(done, total),
                    body => {
                        self.broken = false;
                        return Ok(body);
                    }
                },
                Decoded::Frame(f) => return Err(stray_reply(f, id)),
                Decoded::Malformed { id: got, reason } => {
                    self.broken = got != id;
                    let msg = format!("response does not decode: {reason}");
                    return Err(ClientError::UnexpectedResponse(msg));
                }
            }
        }
    }
}

/// A reply for another id: a connection-level error (id 0) or a server bug.
fn stray_reply(frame: Frame<Response>, want: u64) -> ClientError {
    match frame.body {
        Response::Error(reply) if frame.id == 0 => ClientError::Closed {
            cause: Some(Arc::new(ClientError::Server(reply))),
        },
        body => ClientError::UnexpectedResponse(format!(
            "{} for request {} while waiting for {want}",
            body.kind_name(),
            frame.id
        )),
    }
}

/// A blocking kmsd client: one connection, one request at a time.
#[derive(Debug)]
pub struct BlockingClient {
    conn: Conn,
    server: ServerInfo,
}

impl BlockingClient {
    /// Connects with default options and performs the `Hello` handshake.
    ///
    /// # Errors
    /// [`ClientError::Connect`] if the socket cannot be opened,
    /// [`ClientError::UnsupportedProtocol`] if the daemon refuses our
    /// protocol version, or any transport error during the handshake.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(path, &ClientOptions::default())
    }

    /// Like [`BlockingClient::connect`], with explicit options.
    ///
    /// # Errors
    /// As [`BlockingClient::connect`].
    pub fn connect_with(path: impl AsRef<Path>, options: &ClientOptions) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::handshake(stream, options)
    }

    /// Performs the handshake on an already connected stream.
    ///
    /// # Errors
    /// As [`BlockingClient::connect`], minus `Connect`.
    pub fn handshake(stream: UnixStream, options: &ClientOptions) -> Result<Self, ClientError> {
        let mut conn = Conn {
            stream,
            max_frame: options.max_frame,
            next_id: 1,
            broken: false,
        };
        let reply = conn.call(ops::hello(&options.client_name), &mut |_, _| {});
        let server = ops::check_hello(reply)?;
        Ok(Self { conn, server })
    }

    /// What the daemon said about itself in the handshake.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server
    }

    /// Limits how long one read may block (`None`: forever). A call that
    /// times out leaves the client unusable, since its reply may still come.
    ///
    /// # Errors
    /// If the socket refuses the option (a zero duration).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        Ok(self.conn.stream.set_read_timeout(timeout)?)
    }

    /// True once a failed exchange left the stream unusable.
    pub fn is_broken(&self) -> bool {
        self.conn.broken
    }

    /// Sends one request and waits for its final response, ignoring
    /// progress frames.
    ///
    /// # Errors
    /// [`ClientError::Server`] for an error reply; [`ClientError::Closed`]
    /// if the connection ended or is unusable; codec and I/O errors.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        self.call_with_progress(request, |_, _| {})
    }

    /// Like [`BlockingClient::call`], passing `Progress { done, total }`
    /// frames to `on_progress`.
    ///
    /// # Errors
    /// As [`BlockingClient::call`].
    pub fn call_with_progress(
        &mut self,
        request: Request,
        mut on_progress: impl FnMut(u64, u64),
    ) -> Result<Response, ClientError> {
        self.conn.call(request, &mut on_progress).and_then(ops::final_response)
    }

    fn run<T>(&mut self, op: Op<T>) -> Result<T, ClientError> {
        let response = self.call(op.request)?;
        (op.parse)(response)
    }

    /// Daemon status.
    ///
    /// # Errors
    /// As [`BlockingClient::call`], or [`ClientError::UnexpectedResponse`].
    pub fn status(&mut self) -> Result<StatusInfo, ClientError> {
        self.run(ops::status())
    }

    /// Creates a customer key.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn create_key(&mut self, params: CreateKey) -> Result<KeyInfo, ClientError> {
        self.run(ops::create_key(params))
    }

    /// Describes a key (by id or name).
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn describe_key(&mut self, key: &str) -> Result<KeyInfo, ClientError> {
        self.run(ops::describe_key(key))
    }

    /// Lists the keys the caller may see.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn list_keys(&mut self) -> Result<Vec<KeyInfo>, ClientError> {
        self.run(ops::list_keys())
    }

    /// Enables a key. Returns the key when the daemon sends it back.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn enable_key(&mut self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::enable_key(key))
    }

    /// Disables a key.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn disable_key(&mut self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::disable_key(key))
    }

    /// Schedules deletion in `days` (7..=30, daemon default 30).
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn schedule_deletion(&mut self, key: &str, days: Option<u32>) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::schedule_deletion(key, days))
    }

    /// Cancels a scheduled deletion.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn cancel_deletion(&mut self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::cancel_deletion(key))
    }

    /// Replicates a key into another zone.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn replicate_key(&mut self, key: &str, zone: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::replicate_key(key, zone))
    }

    /// On the primary: stops replicating `key` to `zone`, whose replica is
    /// removed.
    ///
    /// # Errors
    /// As [`BlockingClient::call`].
    pub fn unreplicate_key(&mut self, key: &str, zone: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::unreplicate_key(key, zone))
    }

    /// In a replica zone: makes this zone the key's primary (failover).
    ///
    /// # Errors
    /// As [`BlockingClient::call`].
    pub fn promote_key(&mut self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::promote_key(key))
    }

    /// Rotates a key now (manual rotation).
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn rotate_key(&mut self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::rotate_key(key))
    }

    /// Lists a key's versions with time and origin.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn list_rotations(&mut self, key: &str) -> Result<Vec<RotationEntry>, ClientError> {
        self.run(ops::list_rotations(key))
    }

    /// Enables automatic rotation (period in days, daemon default 365).
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn enable_rotation(&mut self, key: &str, period_days: Option<u32>) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::enable_rotation(key, period_days))
    }

    /// Disables automatic rotation.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn disable_rotation(&mut self, key: &str) -> Result<Option<KeyInfo>, ClientError> {
        self.run(ops::disable_rotation(key))
    }

    /// Encrypts up to [`crate::proto::MAX_PLAINTEXT`] bytes; returns the blob.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn encrypt(&mut self, key: &str, plaintext: &[u8], context: &Context) -> Result<Vec<u8>, ClientError> {
        self.run(ops::encrypt(key, plaintext, context))
    }

    /// Decrypts a blob made by `encrypt`.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn decrypt(&mut self, blob: &[u8], context: &Context) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        self.run(ops::decrypt(blob, context))
    }

    /// Wraps a caller's data key.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn wrap(&mut self, key: &str, dek: &[u8], context: &Context) -> Result<Vec<u8>, ClientError> {
        self.run(ops::wrap(key, dek, context))
    }

    /// Unwraps a data key.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn unwrap(&mut self, blob: &[u8], context: &Context) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        self.run(ops::unwrap(blob, context))
    }

    /// Generates a fresh data key wrapped by `key`.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn generate_data_key(
        &mut self,
        key: &str,
        context: &Context,
        with_plaintext: bool,
    ) -> Result<GeneratedDataKey, ClientError> {
        self.run(ops::generate_data_key(key, context, with_plaintext))
    }

    /// Re-encrypts a blob to the active version of `to` (default: its own
    /// key) inside the daemon. `to_context` defaults to `context`.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn re_encrypt(
        &mut self,
        blob: &[u8],
        context: &Context,
        to: Option<&str>,
        to_context: Option<&Context>,
    ) -> Result<Vec<u8>, ClientError> {
        self.run(ops::re_encrypt(blob, context, to, to_context))
    }

    /// Wraps many data keys in one request.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn wrap_batch(
        &mut self,
        key: &str,
        deks: &[impl AsRef<[u8]>],
        context: &Context,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        self.run(ops::wrap_batch(key, deks, context))
    }

    /// Unwraps many blobs in one request; each item succeeds or fails alone.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn unwrap_batch(
        &mut self,
        blobs: &[impl AsRef<[u8]>],
        context: &Context,
    ) -> Result<Vec<UnwrapItem>, ClientError> {
        self.run(ops::unwrap_batch(blobs, context))
    }

    /// Generates `count` data keys in one request.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn generate_data_key_batch(
        &mut self,
        key: &str,
        count: u32,
        context: &Context,
        with_plaintext: bool,
    ) -> Result<Vec<GeneratedDataKey>, ClientError> {
        self.run(ops::generate_data_key_batch(key, count, context, with_plaintext))
    }

    /// Generates one data key per context in one request, each bound to
    /// its own context, all under the key's active version.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn generate_data_keys(
        &mut self,
        key: &str,
        contexts: &[Context],
        with_plaintext: bool,
    ) -> Result<Vec<GeneratedDataKey>, ClientError> {
        self.run(ops::generate_data_keys(key, contexts, with_plaintext))
    }

    /// Counts files per key version under a mount.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn fs_versions(&mut self, mount: &str) -> Result<FsVersionsInfo, ClientError> {
        self.run(ops::fs_versions(mount))
    }

    /// The counters of every mounted filesystem.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn fs_stats(&mut self) -> Result<Vec<FsStatsInfo>, ClientError> {
        self.run(ops::fs_stats())
    }

    /// The key store's health and whether this daemon leads its zone.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn store_status(&mut self) -> Result<StoreStatusInfo, ClientError> {
        self.run(ops::store_status())
    }

    /// A consistent snapshot of the zone's keys, material included (global
    /// admins only): seal it at once with [`crate::backup::seal`].
    ///
    /// # Errors
    /// As [`BlockingClient::status`]; `permission-denied` for anyone but a
    /// global admin.
    pub fn backup(&mut self) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        self.run(ops::backup())
    }

    /// Re-wraps every file header under a mount to the active version.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn fs_rewrap(&mut self, mount: &str) -> Result<FsRewrapInfo, ClientError> {
        self.fs_rewrap_with_progress(mount, |_, _| {})
    }

    /// Like [`BlockingClient::fs_rewrap`], reporting progress as it goes.
    ///
    /// # Errors
    /// As [`BlockingClient::status`].
    pub fn fs_rewrap_with_progress(
        &mut self,
        mount: &str,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<FsRewrapInfo, ClientError> {
        let op = ops::fs_rewrap(mount);
        let response = self.call_with_progress(op.request, on_progress)?;
        (op.parse)(response)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::thread;

    use super::*;
    use crate::proto::{ErrorCode, ErrorReply, PROTOCOL_VERSION};

    const MAX: usize = crate::proto::DEFAULT_MAX_FRAME;

    /// The fake server's end of a socket pair.
    struct FakeServer(UnixStream);

    impl FakeServer {
        fn recv(&mut self) -> Option<Frame<Request>> {
            let body = read_frame(&mut self.0, MAX).ok()?;
            match decode_body(&body) {
                Decoded::Frame(f) => Some(f),
                Decoded::Malformed { reason, .. } => panic!("malformed request: {reason}"),
            }
        }

        fn send(&mut self, id: u64, body: Response) {
            let body = encode_body(&Frame { id, body }).unwrap();
            write_frame(&mut self.0, &body, MAX).unwrap();
        }

        fn hello(&mut self) {
            let hello = self.recv().unwrap();
            let body = Response::Hello {
                server: "fake/1".into(),
                protocol: PROTOCOL_VERSION,
                zone: "z".into(),
            };
            self.send(hello.id, body);
        }
    }

    /// A client connected to a fake server thread running `serve` after
    /// the handshake.
    fn with_server(serve: impl FnOnce(FakeServer) + Send + 'static) -> BlockingClient {
        let (a, b) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut server = FakeServer(b);
            server.hello();
            serve(server);
        });
        BlockingClient::handshake(a, &ClientOptions::default()).unwrap()
    }

    /// Answers `Encrypt` with its plaintext as the blob until the client leaves.
    fn echo(mut server: FakeServer) {
        while let Some(frame) = server.recv() {
            let body = match frame.body {
                Request::Encrypt { plaintext, .. } => Response::Blob(plaintext.to_vec()),
                _ => Response::Error(ErrorReply::new(ErrorCode::InvalidArgument, "echo only")),
            };
            server.send(frame.id, body);
        }
    }

    #[test]
    fn frames_round_trip_through_a_buffer() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello", 16).unwrap();
        assert_eq!(&buf[..4], &5u32.to_be_bytes());
        let body = read_frame(&mut Cursor::new(buf), 16).unwrap();
        assert_eq!(body.as_slice(), b"hello");
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let mut buf = Vec::new();
        let err = write_frame(&mut buf, &[0; 17], 16).unwrap_err();
        assert!(matches!(err, ClientError::Codec(CodecError::Oversized { max: 16 })));
        assert!(buf.is_empty());
        let mut input = Cursor::new(17u32.to_be_bytes().to_vec());
        let err = read_frame(&mut input, 16).unwrap_err();
        assert!(matches!(err, ClientError::Codec(CodecError::Oversized { max: 16 })));
    }

    #[test]
    fn end_of_stream_is_closed_but_a_cut_frame_is_io() {
        let err = read_frame(&mut Cursor::new(Vec::new()), 16).unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }));
        let mut cut = 8u32.to_be_bytes().to_vec();
        cut.extend_from_slice(b"abc");
        let err = read_frame(&mut Cursor::new(cut), 16).unwrap_err();
        assert!(matches!(err, ClientError::Io(_)));
    }

    #[test]
    fn calls_round_trip_and_errors_keep_the_connection() {
        let mut client = with_server(echo);
        assert_eq!(client.server_info().server, "fake/1");
        assert_eq!(client.encrypt("k", b"one", &Context::new()).unwrap(), b"one");
        let err = client.status().unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
        assert_eq!(client.encrypt("k", b"two", &Context::new()).unwrap(), b"two");
    }

    #[test]
    fn progress_is_delivered_before_the_result() {
        let mut client = with_server(|mut server| {
            let frame = server.recv().unwrap();
            server.send(frame.id, Response::Progress { done: 1, total: 2 });
            server.send(frame.id, Response::Progress { done: 2, total: 2 });
            let info = FsRewrapInfo {
                rewrapped: 2,
                already_current: 0,
                failed: 0,
            };
            server.send(frame.id, Response::FsRewrap(info));
        });
        let mut seen = Vec::new();
        let info = client.fs_rewrap_with_progress("/m", |d, t| seen.push((d, t))).unwrap();
        assert_eq!((info.rewrapped, seen), (2, vec![(1, 2), (2, 2)]));
    }

    #[test]
    fn server_closing_mid_call_fails_and_poisons() {
        let mut client = with_server(|mut server| {
            server.recv();
        });
        let err = client.status().unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");
        assert!(client.is_broken());
        assert!(matches!(client.status(), Err(ClientError::Closed { .. })));
    }

    #[test]
    fn read_timeout_fails_instead_of_hanging() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut client = with_server(move |mut server| {
            server.recv();
            let _ = rx.recv(); // hold the connection open without answering
        });
        client.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        assert!(matches!(client.status(), Err(ClientError::Io(_))));
        assert!(client.is_broken());
        drop(tx);
    }

    #[test]
    fn reply_for_another_id_is_unexpected() {
        let mut client = with_server(|mut server| {
            let frame = server.recv().unwrap();
            server.send(frame.id + 7, Response::Done);
        });
        let err = client.status().unwrap_err();
        assert!(matches!(err, ClientError::UnexpectedResponse(_)), "{err:?}");
        assert!(client.is_broken());
    }
}
