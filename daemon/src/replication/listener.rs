//! The peering listener: other zones' daemons connect here over TCP with
//! mutual TLS ([`super::tls`]). The zone named by the client certificate
//! is the caller; only `Hello` and replication frames are served.
//!
//! Bounded per the configuration: at most 4 TLS handshakes in progress per
//! source address, `handshake_timeout` for each, then at most
//! `max_connections` authenticated peers at once (more are closed and
//! logged), `idle_timeout` between frames, and frames of at most
//! `max_frame` bytes.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kms_client::proto::codec::Decoded;
use kms_client::proto::{ErrorCode, ErrorReply, Frame, FrameCodec, Request, Response, PROTOCOL_VERSION};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::{zone_of, PeerTls};
use super::Replicator;

/// Limits of the peering listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_frame: usize,
}

/// Most TLS handshakes in progress from one source address.
const HANDSHAKES_PER_ADDRESS: usize = 4;

type Handshakes = Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One handshake in progress from an address, counted until dropped.
struct Handshaking {
    all: Handshakes,
    ip: std::net::IpAddr,
}

impl Handshaking {
    fn start(all: &Handshakes, ip: std::net::IpAddr) -> Option<Self> {
        let mut m = all.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Self { all: all.clone(), ip })
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut m = self.all.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts peers until `shutdown`, then waits for their connections to end.
pub async fn run(
    listener: TcpListener,
    tls: Arc<PeerTls>,
    replicator: Arc<Replicator>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshaking = Arc::new(parking_lot::Mutex::new(std::collections::HashMap::new()));
    let acceptor = tls.acceptor();
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "peering accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A handshake is not yet a peer: each source address may have only
        // a few in progress, and a connection slot is taken only once the
        // peer has proved its zone, so silent TCP connections from one
        // place cannot keep the zones out.
        let Some(handshake) = Handshaking::start(&handshaking, addr.ip()) else {
            tracing::debug!(%addr, "peering connection refused: too many handshakes from this address");
            continue;
        };
        let (acceptor, r, shutdown, slots) = (acceptor.clone(), replicator.clone(), shutdown.clone(), slots.clone());
        tracker.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let accepted = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
            drop(handshake);
            let Ok(_permit) = slots.try_acquire_owned() else {
                tracing::warn!(%addr, max = limits.max_connections, "peering connection refused: too many peer connections");
                return;
            };
            let tls = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%addr, error = %e, "peering TLS handshake failed; refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%addr, "peering TLS handshake timed out; closed");
                    return;
                }
            };
            let zone = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(zone_of);
            let Some(zone) = zone else {
                tracing::warn!(%addr, "peer certificate names no zone (SAN URI kmsd://zone/NAME); refused");
                return;
            };
            tracing::debug!(%addr, zone, "peer connected");
            let framed = Framed::new(tls, FrameCodec::<Response, Request>::new(limits.max_frame));
            serve(framed, &zone, &r, limits.idle_timeout, &shutdown).await;
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Answers frames one at a time until the peer leaves, idles out, breaks
/// the framing, or we shut down.
async fn serve<S>(
    mut framed: Framed<S, FrameCodec<Response, Request>>,
    zone: &str,
    r: &Replicator,
    idle: Duration,
    shutdown: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut greeted = false;
    loop {
        let item = tokio::select! {
            item = tokio::time::timeout(idle, framed.next()) => match item {
                Ok(Some(item)) => item,
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!(zone, "idle peer connection closed");
                    return;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (id, answer) = match item {
            Ok(Decoded::Frame(Frame { id, body })) => {
                let answer = match body {
                    Request::Hello { protocol, .. } if protocol == PROTOCOL_VERSION && !greeted => {
                        greeted = true;
                        Response::Hello {
                            server: format!("kmsd/{}", env!("CARGO_PKG_VERSION")),
                            protocol: PROTOCOL_VERSION,
                            zone: r.zone().to_string(),
                        }
                    }
                    _ if !greeted => error(
                        ErrorCode::UnsupportedProtocol,
                        &format!("the first request must be Hello with protocol {PROTOCOL_VERSION}"),
                    ),
                    body => r.handle_peer(zone, body).await,
                };
                (id, answer)
            }
            Ok(Decoded::Malformed { id, reason }) => {
                tracing::warn!(zone, %reason, "malformed frame from a peer");
                (
                    id,
                    error(ErrorCode::Malformed, &format!("request does not decode: {reason}")),
                )
            }
            Err(e) => {
                tracing::warn!(zone, error = %e, "peer connection broken; closed");
                return;
            }
        };
        let close = matches!(&answer, Response::Error(e) if e.code == ErrorCode::UnsupportedProtocol);
        if framed.send(Frame { id, body: answer }).await.is_err() || close {
            return;
        }
    }
}

fn error(code: ErrorCode, msg: &str) -> Response {
    Response::Error(ErrorReply::new(code, msg))
}
