//! The Kubernetes KMS v2 plugin API (`v2.KeyManagementService`: `Status`,
//! `Encrypt`, `Decrypt`), served with tonic on its own Unix socket
//! (`[kubernetes] socket`) so that kube-apiserver seals its DEK seeds
//! under a kmsd key. This module owns the socket and its connections;
//! [`plugin`] the calls, [`envelope`] what is checked and returned around
//! a kmsd blob. Off unless configured.

pub mod envelope;
pub mod plugin;

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::KubernetesConfig;
use crate::keys::Caller;
use crate::ops::Daemon;
use crate::server::{Admission, Admitted, BindError, Limits};

/// The stubs built from `daemon/proto/kms_v2.proto` (package `v2`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("v2");
}

/// Most calls in flight on one connection (kube-apiserver multiplexes all
/// of its calls on one HTTP/2 connection).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// The plugin's bound socket and settings.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    key: String,
}

impl Listener {
    /// Binds `[kubernetes] socket` with its mode and group, replacing a
    /// stale socket but never a live one or another file.
    ///
    /// # Errors
    /// [`BindError`] naming the path and what to fix.
    pub fn bind(cfg: &KubernetesConfig, socket: &Path) -> Result<Self, BindError> {
        let io = |op| {
            move |source| BindError::Io {
                op,
                path: socket.to_path_buf(),
                source,
            }
        };
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent).map_err(io("cannot create parent directory"))?;
        }
        crate::server::remove_stale(socket)?;
        let listener = UnixListener::bind(socket).map_err(io("cannot bind"))?;
        if let Some(group) = &cfg.group {
            let gid = group_id(group).map_err(io("cannot find group"))?;
            std::os::unix::fs::lchown(socket, None, Some(gid)).map_err(io("cannot give the socket its group"))?;
        }
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(cfg.mode)).map_err(io("cannot chmod"))?;
        Ok(Self {
            listener,
            path: socket.to_path_buf(),
            key: cfg.key.clone(),
        })
    }
}

/// A group name or number.
fn group_id(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(io::Error::new(io::ErrorKind::NotFound, format!("no group {group:?}"))),
        Err(e) => Err(e.into()),
    }
}

/// A connection with the caller the kernel named when it connected, and
/// its place among the admitted connections (given back when it closes).
/// It must send its first bytes within `handshake_timeout` and then at
/// least every `idle_timeout` (kube-apiserver polls `Status` every minute
/// at most, and reconnects when it needs to): a peer that holds a place
/// and says nothing loses it.
struct PeerStream {
    stream: UnixStream,
    caller: Caller,
    _place: Admitted,
    quiet: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
}

impl PeerStream {
    fn new(stream: UnixStream, caller: Caller, place: Admitted, limits: &Limits) -> Self {
        Self {
            stream,
            caller,
            _place: place,
            quiet: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            idle_timeout: limits.idle_timeout,
        }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    /// Every request of the connection carries it in its extensions.
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let next = tokio::time::Instant::now() + self.idle_timeout;
                self.quiet.as_mut().reset(next);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.quiet.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the handshake or idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepted connections, each admitted within `[limits]` (its own count,
/// apart from kmsd's socket); a caller without credentials or over the
/// limits is closed at once.
fn incoming(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    limits: Limits,
) -> impl futures::Stream<Item = io::Result<PeerStream>> {
    let admission = Arc::new(Admission::default());
    futures::stream::unfold(listener, move |listener| {
        let (admission, daemon) = (admission.clone(), daemon.clone());
        async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "kubernetes socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(caller) = crate::server::caller_of(&stream) else {
                    tracing::warn!("kubernetes socket: connection without peer credentials refused");
                    continue;
                };
                let Some(place) = admission.admit(caller.uid, &limits) else {
                    admission.refused(caller.uid, &limits);
                    daemon
                        .connections_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                };
                return Some((Ok(PeerStream::new(stream, caller, place, &limits)), listener));
            }
        }
    })
}

/// Serves the plugin until `shutdown`, then lets the calls in flight
/// finish and removes the socket.
pub async fn run(listener: Listener, daemon: Arc<Daemon>, limits: Limits, shutdown: CancellationToken) {
    let Listener { listener, path, key } = listener;
    let service =
        proto::key_management_service_server::KeyManagementServiceServer::new(plugin::Plugin::new(daemon.clone(), key))
            .max_decoding_message_size(envelope::MAX_MESSAGE)
            .max_encoding_message_size(envelope::MAX_MESSAGE);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .http2_max_header_list_size(16 * 1024)
        .serve_with_incoming_shutdown(service, incoming(listener, daemon, limits), shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "kubernetes plugin server failed");
    }
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(path = %path.display(), error = %e, "cannot remove the kubernetes socket");
    }
}
