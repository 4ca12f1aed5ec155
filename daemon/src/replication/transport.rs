//! How replication frames reach another zone's daemon, over a channel that
//! proves which zone answers. [`PeerTransport`] is the seam (tests deliver
//! frames in memory); [`ZoneTransport`] speaks the ordinary kmsd protocol
//! either inside mutual TLS to the zone's `address` (the server's
//! certificate must name the zone, see [`super::tls`]) or to the zone's
//! Unix socket on this host, whose listening process must run as the
//! zone's configured uid.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kms_client::proto::{ErrorReply, ReplicationFrame, Request, Response};
use kms_client::{Client, ClientError, ClientOptions};
use tokio::net::{TcpStream, UnixStream};

use super::tls::PeerTls;

/// Why a frame did not get a verified answer from a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no peer is configured for zone {0}")]
    UnknownZone(String),
    #[error("zone {zone} is unreachable")]
    Unreachable {
        zone: String,
        #[source]
        source: ClientError,
    },
    #[error("cannot connect to zone {zone} at {at}")]
    Connect {
        zone: String,
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at zone {zone}'s socket runs as uid {found}, not the configured uid {expected}")]
    WrongUid { zone: String, found: u32, expected: u32 },
    #[error("zone {zone} did not answer within {secs} s")]
    Timeout { zone: String, secs: u64 },
    #[error("zone {zone} refused: {reply}")]
    Refused { zone: String, reply: ErrorReply },
    #[error("zone {zone} answered with an unexpected {kind}")]
    Unexpected { zone: String, kind: &'static str },
    #[error("the answer from zone {zone} does not decode")]
    BadMessage {
        zone: String,
        #[source]
        source: super::message::MessageError,
    },
}

/// Sends one replication frame to the daemon of `zone` and returns its
/// sealed answer. Implementations own connection handling and timeouts.
pub trait PeerTransport: Send + Sync + std::fmt::Debug {
    /// Sends `frame` to `zone`; the answer comes from that zone's daemon,
    /// as authenticated by the channel.
    ///
    /// # Errors
    /// [`PeerError`] other than `BadMessage` (decoding is the caller's).
    fn send<'a>(&'a self, zone: &'a str, frame: ReplicationFrame)
        -> BoxFuture<'a, Result<ReplicationFrame, PeerError>>;
}

/// How one zone is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Mutual TLS to `HOST:PORT`.
    Tls { address: String },
    /// The zone's Unix socket on this host; its daemon runs as `uid`.
    Unix { socket: PathBuf, uid: u32 },
}

/// Every configured zone, one cached connection each.
#[derive(Debug)]
pub struct ZoneTransport {
    routes: HashMap<String, Route>,
    tls: Option<Arc<PeerTls>>,
    options: ClientOptions,
    timeout: Duration,
    /// One slot per zone, each with its own lock: connecting to a slow
    /// zone holds up only the calls to that zone.
    clients: HashMap<String, tokio::sync::Mutex<Option<Client>>>,
}

impl ZoneTransport {
    /// A transport for `routes` (zone -> route); `tls` is required by `Tls`
    /// routes. Every connect and call gives up after `timeout`.
    pub fn new(routes: HashMap<String, Route>, tls: Option<Arc<PeerTls>>, max_frame: usize, timeout: Duration) -> Self {
        let options = ClientOptions {
            max_frame,
            client_name: format!("kmsd-replication/{}", env!("CARGO_PKG_VERSION")),
        };
        let clients = routes
            .keys()
            .map(|z| (z.clone(), tokio::sync::Mutex::new(None)))
            .collect();
        Self {
            routes,
            tls,
            options,
            timeout,
            clients,
        }
    }

    async fn client(&self, zone: &str) -> Result<Client, PeerError> {
        let (Some(slot), Some(route)) = (self.clients.get(zone), self.routes.get(zone)) else {
            return Err(PeerError::UnknownZone(zone.to_string()));
        };
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let client = tokio::time::timeout(self.timeout, self.connect(zone, route))
            .await
            .map_err(|_| self.timed_out(zone))??;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn connect(&self, zone: &str, route: &Route) -> Result<Client, PeerError> {
        let unreachable = |source| PeerError::Unreachable {
            zone: zone.to_string(),
            source,
        };
        match route {
            Route::Unix { socket, uid } => {
                let connect = |source| PeerError::Connect {
                    zone: zone.to_string(),
                    at: socket.display().to_string(),
                    source,
                };
                let stream = UnixStream::connect(socket).await.map_err(connect)?;
                let found = stream.peer_cred().map_err(connect)?.uid();
                if found != *uid {
                    return Err(PeerError::WrongUid {
                        zone: zone.to_string(),
                        found,
                        expected: *uid,
                    });
                }
                Client::handshake(stream, &self.options).await.map_err(unreachable)
            }
            Route::Tls { address } => {
                let connect = |source| PeerError::Connect {
                    zone: zone.to_string(),
                    at: address.clone(),
                    source,
                };
                let tls = self
                    .tls
                    .as_ref()
                    .ok_or_else(|| PeerError::UnknownZone(zone.to_string()))?;
                let connector = tls.connector(zone).map_err(|e| connect(std::io::Error::other(e)))?;
                let tcp = TcpStream::connect(address.as_str()).await.map_err(connect)?;
                let _ = tcp.set_nodelay(true);
                let stream = connector.connect(PeerTls::server_name(), tcp).await.map_err(connect)?;
                Client::handshake_over(stream, &self.options).await.map_err(unreachable)
            }
        }
    }

    fn timed_out(&self, zone: &str) -> PeerError {
        PeerError::Timeout {
            zone: zone.to_string(),
            secs: self.timeout.as_secs(),
        }
    }

    async fn call(&self, zone: &str, frame: ReplicationFrame) -> Result<ReplicationFrame, PeerError> {
        let client = self.client(zone).await?;
        let answer = tokio::time::timeout(self.timeout, client.call(Request::Replication(frame))).await;
        let result = match answer {
            Err(_) => Err(self.timed_out(zone)),
            Ok(r) => read_answer(zone, r),
        };
        if matches!(result, Err(PeerError::Unreachable { .. } | PeerError::Timeout { .. })) {
            if let Some(slot) = self.clients.get(zone) {
                *slot.lock().await = None;
            }
        }
        result
    }
}

fn read_answer(zone: &str, r: Result<Response, ClientError>) -> Result<ReplicationFrame, PeerError> {
    let zone = zone.to_string();
    match r {
        Ok(Response::Replication(f)) => Ok(f),
        Ok(other) => Err(PeerError::Unexpected {
            zone,
            kind: other.kind_name(),
        }),
        Err(ClientError::Server(reply)) => Err(PeerError::Refused { zone, reply }),
        Err(source) => Err(PeerError::Unreachable { zone, source }),
    }
}

impl PeerTransport for ZoneTransport {
    fn send<'a>(
        &'a self,
        zone: &'a str,
        frame: ReplicationFrame,
    ) -> BoxFuture<'a, Result<ReplicationFrame, PeerError>> {
        Box::pin(self.call(zone, frame))
    }
}
