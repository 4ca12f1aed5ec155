//! How replication frames reach another zone's daemon. [`PeerTransport`] is
//! the seam: today [`UnixTransport`] speaks the ordinary kmsd protocol to
//! the peer's Unix socket (same host, or a socket forwarded from another
//! host); a TCP/TLS transport can implement the same trait later without
//! touching the replication logic.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use kms_client::proto::{ErrorReply, ReplicationFrame, Request, Response};
use kms_client::{Client, ClientError, ClientOptions};

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
    #[error("zone {zone} did not answer within {secs} s")]
    Timeout { zone: String, secs: u64 },
    #[error("zone {zone} refused: {reply}")]
    Refused { zone: String, reply: ErrorReply },
    #[error("zone {zone} answered with an unexpected {kind}")]
    Unexpected { zone: String, kind: &'static str },
    #[error("the answer from zone {zone} does not verify")]
    BadSeal {
        zone: String,
        #[source]
        source: super::seal::SealError,
    },
}

/// Sends one replication frame to the daemon of `zone` and returns its
/// sealed answer. Implementations own connection handling and timeouts.
pub trait PeerTransport: Send + Sync + std::fmt::Debug {
    /// Sends `frame` to `zone`.
    ///
    /// # Errors
    /// [`PeerError`] other than `BadSeal` (verification is the caller's).
    fn send<'a>(&'a self, zone: &'a str, frame: ReplicationFrame)
        -> BoxFuture<'a, Result<ReplicationFrame, PeerError>>;
}

/// Peers reached through their Unix sockets, one cached connection each.
#[derive(Debug)]
pub struct UnixTransport {
    sockets: HashMap<String, PathBuf>,
    options: ClientOptions,
    timeout: Duration,
    clients: tokio::sync::Mutex<HashMap<String, Client>>,
}

impl UnixTransport {
    /// A transport for `sockets` (zone -> socket path). Every connect and
    /// call gives up after `timeout`.
    pub fn new(sockets: HashMap<String, PathBuf>, max_frame: usize, timeout: Duration) -> Self {
        let options = ClientOptions {
            max_frame,
            client_name: format!("kmsd-replication/{}", env!("CARGO_PKG_VERSION")),
        };
        Self {
            sockets,
            options,
            timeout,
            clients: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn client(&self, zone: &str) -> Result<Client, PeerError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(zone).filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let path = self
            .sockets
            .get(zone)
            .ok_or_else(|| PeerError::UnknownZone(zone.to_string()))?;
        let connect = Client::connect_with(path, &self.options);
        let client = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| self.timed_out(zone))?
            .map_err(|source| PeerError::Unreachable {
                zone: zone.to_string(),
                source,
            })?;
        clients.insert(zone.to_string(), client.clone());
        Ok(client)
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
            self.clients.lock().await.remove(zone);
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

impl PeerTransport for UnixTransport {
    fn send<'a>(
        &'a self,
        zone: &'a str,
        frame: ReplicationFrame,
    ) -> BoxFuture<'a, Result<ReplicationFrame, PeerError>> {
        Box::pin(self.call(zone, frame))
    }
}
