//! Multi-zone keys between daemons: `key replicate`, the replication
//! frames other zones send us, and (in [`tasks`]) the background pushes
//! from primaries and pulls by replicas.
//!
//! Invariants: a frame's sending zone is the one its channel authenticated
//! (mutual TLS, or the uid of a Unix-socket peer), never what it claims;
//! key material leaves the daemon only inside such a channel; every change
//! is persisted through the key service before it is acknowledged; no lock
//! is held across a network call; a replica only ever takes versions in
//! order from its primary.

pub mod listener;
pub mod message;
pub mod tasks;
pub mod tls;
pub mod transport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kms_client::proto::{ErrorCode, ErrorReply, KeyInfo, ReplicationFrame, Request, Response};
use uuid::Uuid;

use crate::keys::error::error_chain;
use crate::keys::replica::KeyExport;
use crate::keys::{self, Caller, KeyService};
use message::Message;
use transport::{PeerError, PeerTransport};

/// Why `key replicate` failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Key(#[from] keys::Error),
    #[error("{0}")]
    Zone(String),
    #[error("cannot replicate to zone {zone}")]
    Peer {
        zone: String,
        #[source]
        source: PeerError,
    },
}

impl From<ReplicateError> for ErrorReply {
    fn from(e: ReplicateError) -> Self {
        match e {
            ReplicateError::Key(k) => k.into(),
            ReplicateError::Zone(msg) => ErrorReply::new(ErrorCode::InvalidArgument, msg),
            ReplicateError::Peer {
                zone,
                source: PeerError::Refused { reply, .. },
            } => ErrorReply::new(
                reply.code,
                format!("zone {zone} refused the replica: {}", reply.message),
            ),
            e @ ReplicateError::Peer { .. } => ErrorReply::new(ErrorCode::Unavailable, error_chain(&e)),
        }
    }
}

/// Outcome counters, exported by [`crate::metrics`] as `kmsd_replication_pushes_total{outcome="ok|refused|failed"}`,
/// `kmsd_replication_pulls_total{outcome="ok|failed"}` and
/// `kmsd_replication_frames_rejected_total`, and the replica lag as
/// `kmsd_replica_lag_versions{key,zone}` from [`replica_lag`].
#[derive(Debug, Default)]
pub struct ReplicationStats {
    pub pushes_ok: AtomicU64,
    pub pushes_refused: AtomicU64,
    pub pushes_failed: AtomicU64,
    pub pulls_ok: AtomicU64,
    pub pulls_failed: AtomicU64,
    pub frames_rejected: AtomicU64,
}

impl ReplicationStats {
    fn count_push(&self, r: &Result<u32, PeerError>) {
        let c = match r {
            Ok(_) => &self.pushes_ok,
            Err(PeerError::Refused { .. }) => &self.pushes_refused,
            Err(_) => &self.pushes_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lag in versions of each replica of a primary key: (zone, versions
/// behind); a replica that never confirmed lags by the whole history.
pub fn replica_lag(k: &KeyInfo) -> Vec<(String, u32)> {
    k.replicas
        .iter()
        .map(|r| {
            let confirmed = r.confirmed_version.unwrap_or(0);
            // Counted, not subtracted: numbers jump at each promotion epoch.
            let behind = k.versions.iter().filter(|v| v.version > confirmed).count();
            (r.zone.clone(), u32::try_from(behind).unwrap_or(u32::MAX))
        })
        .collect()
}

/// Timing of the background work.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Between a replica's pulls from its primary.
    pub pull_interval: Duration,
    /// Longest pause between retries of a failed push.
    pub retry_max: Duration,
}

/// A configured peer zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub zone: String,
    /// The uid its daemon runs as, for a peer on this host's Unix sockets;
    /// a frame arriving on our socket from this uid comes from `zone`.
    pub uid: Option<u32>,
}

/// The replication state of one daemon.
#[derive(Debug)]
pub struct Replicator {
    keys: Arc<KeyService>,
    peers: Vec<Peer>,
    transport: Arc<dyn PeerTransport>,
    settings: Settings,
    /// Outcome counters (see [`ReplicationStats`]).
    pub stats: ReplicationStats,
    /// Test hook (`KMSDTEST_FAULT=kill-before-push`), compiled in only with
    /// the `test-faults` feature: SIGKILL ourselves after a new version was
    /// persisted and before it is pushed to a replica that already holds an
    /// older one.
    #[cfg(feature = "test-faults")]
    kill_before_push: bool,
}

impl Replicator {
    /// Replication for `keys` with the zones `peers` reached through
    /// `transport`.
    pub fn new(keys: Arc<KeyService>, peers: Vec<Peer>, transport: Arc<dyn PeerTransport>, settings: Settings) -> Self {
        Self {
            keys,
            peers,
            transport,
            settings,
            stats: ReplicationStats::default(),
            #[cfg(feature = "test-faults")]
            kill_before_push: std::env::var("KMSDTEST_FAULT").is_ok_and(|v| v == "kill-before-push"),
        }
    }

    /// The `kill-before-push` fault point (see `kill_before_push`).
    #[cfg(feature = "test-faults")]
    pub(crate) fn fault_before_push(&self, id: Uuid, zone: &str) {
        if self.kill_before_push {
            tracing::warn!(key = %id, zone, "test fault: SIGKILL before push");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// No fault points in a build without `test-faults`.
    #[cfg(not(feature = "test-faults"))]
    pub(crate) fn fault_before_push(&self, _id: Uuid, _zone: &str) {}

    /// This daemon's zone.
    pub fn zone(&self) -> &str {
        self.keys.zone()
    }

    fn is_peer(&self, zone: &str) -> bool {
        self.peers.iter().any(|p| p.zone == zone)
    }

    /// The zone whose daemon runs as `uid` (a Unix-socket peer).
    fn zone_of_uid(&self, uid: u32) -> Option<&str> {
        self.peers.iter().find(|p| p.uid == Some(uid)).map(|p| p.zone.as_str())
    }

    /// Answers `ReplicateKey` and `Replication` requests from local callers
    /// on the Unix socket; a panic becomes an `internal` error for this
    /// request only.
    pub async fn handle(&self, caller: &Caller, req: Request) -> Response {
        // kmsd's own callers (the trusted channels of the mount processes
        // it starts) never speak for a zone nor replicate.
        if caller.is_internal() {
            return error(
                ErrorCode::PermissionDenied,
                "replication is not for kmsd's internal callers",
            );
        }
        let fut = async {
            match req {
                Request::ReplicateKey { key, zone } => match self.replicate(caller, &key, &zone).await {
                    Ok(info) => Response::Key(info),
                    Err(e) => Response::Error(e.into()),
                },
                Request::UnreplicateKey { key, zone } => match self.unreplicate(caller, &key, &zone).await {
                    Ok(info) => Response::Key(info),
                    Err(e) => Response::Error(e.into()),
                },
                Request::Replication(frame) => match self.zone_of_uid(caller.uid) {
                    Some(zone) => self.on_frame(zone, frame).await,
                    None => {
                        let (uid, pid) = (caller.uid, caller.pid);
                        let claimed = crate::observe::bounded(&frame.from_zone);
                        self.stats.frames_rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(uid, pid, claimed_zone = %claimed, "replication frame from a uid that is no peer zone's ([[peer]] uid); refused");
                        error(
                            ErrorCode::PermissionDenied,
                            format!("uid {uid} is not the uid of a configured peer zone ([[peer]] uid)"),
                        )
                    }
                },
                other => error(
                    ErrorCode::Internal,
                    format!("{} is not a replication request", other.op()),
                ),
            }
        };
        std::panic::AssertUnwindSafe(fut)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!(uid = caller.uid, "replication handler panicked; answered internal");
                error(ErrorCode::Internal, "internal error during replication")
            })
    }

    /// Answers a request from the daemon of `zone`, as authenticated by
    /// mutual TLS: only replication frames are served there.
    pub async fn handle_peer(&self, zone: &str, req: Request) -> Response {
        match req {
            Request::Replication(frame) => std::panic::AssertUnwindSafe(self.on_frame(zone, frame))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!(zone, "replication handler panicked; answered internal");
                    error(ErrorCode::Internal, "internal error during replication")
                }),
            other => error(
                ErrorCode::PermissionDenied,
                format!("the peering port serves replication frames only, not {}", other.op()),
            ),
        }
    }

    /// `key replicate KEY --zone ZONE`: persists the new replica as pending,
    /// pushes the key, records the confirmation. If the push fails the
    /// pending replica is forgotten and the error returned.
    ///
    /// # Errors
    /// [`ReplicateError`]: key rules, unknown or own zone, peer failures.
    pub async fn replicate(&self, caller: &Caller, key: &str, zone: &str) -> Result<KeyInfo, ReplicateError> {
        self.check_target(zone)?;
        let (c, k, z) = (caller.clone(), key.to_string(), zone.to_string());
        let (export, added) = self.blocking(move |s| s.begin_replica(&c, &k, &z)).await?;
        let id = export.id;
        match self.push(zone, export).await {
            Ok(version) => {
                let z = zone.to_string();
                self.blocking(move |s| s.record_confirmed(id, &z, version)).await?;
                tracing::info!(key = %id, zone, version, "key replicated");
                self.tell_other_replicas(id, zone).await;
                Ok(self.keys.describe(caller, &id.to_string())?)
            }
            Err(source) => {
                tracing::warn!(key = %id, zone, error = %error_chain(&source), "replication failed");
                if added {
                    let z = zone.to_string();
                    self.blocking(move |s| s.cancel_replica(id, &z)).await?;
                }
                Err(ReplicateError::Peer {
                    zone: zone.to_string(),
                    source,
                })
            }
        }
    }

    /// `key unreplicate KEY --zone ZONE` on the primary: the zone forgets its
    /// replica (or the tombstone of one deleted there), then the primary
    /// forgets the zone. If the zone cannot be reached nothing changes.
    ///
    /// # Errors
    /// [`ReplicateError`]: key rules, unknown zone, peer failures.
    pub async fn unreplicate(&self, caller: &Caller, key: &str, zone: &str) -> Result<KeyInfo, ReplicateError> {
        self.check_target(zone)?;
        let (c, k, z) = (caller.clone(), key.to_string(), zone.to_string());
        let id = self.blocking(move |s| s.begin_unreplicate(&c, &k, &z)).await?;
        let peer = |source| ReplicateError::Peer {
            zone: zone.to_string(),
            source,
        };
        match self.exchange(zone, &Message::Release { key: id }).await.map_err(peer)? {
            Message::Released { key } if key == id => {}
            _ => {
                return Err(peer(PeerError::Unexpected {
                    zone: zone.to_string(),
                    kind: "message instead of a release",
                }))
            }
        }
        let z = zone.to_string();
        self.blocking(move |s| s.finish_unreplicate(id, &z)).await?;
        tracing::info!(key = %id, zone, "key no longer replicated to zone");
        self.tell_other_replicas(id, zone).await;
        Ok(self.keys.describe(caller, &id.to_string())?)
    }

    /// Pushes key `id` to its replicas other than `except` after its list
    /// of replicas changed, so that every replica knows every other (a
    /// replica promoted later must know whom to serve). Best effort: a
    /// zone that is down learns it at its next pull.
    async fn tell_other_replicas(&self, id: Uuid, except: &str) {
        let Ok(entry) = self.keys.entry(&id.to_string()) else {
            return;
        };
        let zones: Vec<String> = entry.record.replicas.iter().map(|r| r.zone.clone()).collect();
        for z in zones.iter().filter(|z| *z != except) {
            if let Err(e) = self.push_current(id, z).await {
                tracing::info!(key = %id, zone = %z, error = %error_chain(&e), "could not tell a replica about the new replica list; it learns it at its next pull");
            }
        }
    }

    fn check_target(&self, zone: &str) -> Result<(), ReplicateError> {
        if !crate::config::zone_name_ok(zone) {
            return Err(ReplicateError::Zone(format!(
                "invalid zone name ({} bytes): zones are named with 1 to 64 characters from A-Z a-z 0-9 -",
                zone.len()
            )));
        }
        if zone == self.zone() {
            return Err(ReplicateError::Zone(format!(
                "zone {zone} is this daemon's own zone; replicate to another zone"
            )));
        }
        if !self.is_peer(zone) {
            let known: Vec<&str> = self.peers.iter().map(|p| p.zone.as_str()).collect();
            return Err(ReplicateError::Zone(format!(
                "unknown zone {zone}; configured peers: {}",
                known.join(", ")
            )));
        }
        Ok(())
    }

    /// Runs a key-service call (which may fsync) off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&KeyService) -> keys::Result<T> + Send + 'static,
    ) -> keys::Result<T> {
        let keys = self.keys.clone();
        tokio::task::spawn_blocking(move || f(&keys))
            .await
            .unwrap_or_else(|_| Err(keys::Error::Internal("replication task failed".to_string())))
    }

    /// Sends one message to `zone` and reads its answer.
    async fn exchange(&self, zone: &str, msg: &Message) -> Result<Message, PeerError> {
        let bad = |source| PeerError::BadMessage {
            zone: zone.to_string(),
            source,
        };
        let frame = message::frame(self.zone(), zone, msg).map_err(bad)?;
        let answer = self.transport.send(zone, frame).await?;
        if answer.from_zone != zone || answer.to_zone != self.zone() {
            return Err(PeerError::Unexpected {
                zone: zone.to_string(),
                kind: "frame for other zones",
            });
        }
        let read = message::read(&answer).map_err(bad);
        message::wipe(answer);
        read
    }

    /// Pushes `export` to its replica in `zone`; returns the version the
    /// replica confirmed.
    async fn push(&self, zone: &str, export: KeyExport) -> Result<u32, PeerError> {
        let id = export.id;
        let r = match self.exchange(zone, &Message::Push(export)).await {
            Ok(Message::Ack { key, version, orphans }) if key == id => {
                if orphans.is_empty() {
                    Ok(version)
                } else {
                    tracing::warn!(key = %id, zone, versions = orphans.len(), "a former primary sent back versions it created while cut off; adopting them");
                    let keys = self.keys.clone();
                    let adopted = tokio::task::spawn_blocking(move || keys.adopt_versions(id, &orphans)).await;
                    match adopted {
                        Ok(Ok(())) => Ok(version),
                        Ok(Err(e)) => Err(PeerError::Unexpected {
                            zone: zone.to_string(),
                            kind: if matches!(e, keys::Error::InvalidArgument(_)) {
                                "conflicting versions from a former primary"
                            } else {
                                "versions that could not be stored"
                            },
                        }),
                        Err(_) => Err(PeerError::Unexpected {
                            zone: zone.to_string(),
                            kind: "versions that could not be stored",
                        }),
                    }
                }
            }
            Ok(_) => Err(PeerError::Unexpected {
                zone: zone.to_string(),
                kind: "message instead of an acknowledgement",
            }),
            Err(e) => Err(e),
        };
        self.stats.count_push(&r);
        r
    }

    /// Pushes the current state of primary key `id` to its replica in
    /// `zone` and records the confirmation.
    ///
    /// # Errors
    /// As [`ReplicateError`].
    pub async fn push_current(&self, id: Uuid, zone: &str) -> Result<u32, ReplicateError> {
        let z = zone.to_string();
        let export = self.blocking(move |s| s.export_for_replica(id, &z)).await?;
        let version = self.push(zone, export).await.map_err(|source| ReplicateError::Peer {
            zone: zone.to_string(),
            source,
        })?;
        let z = zone.to_string();
        self.blocking(move |s| s.record_confirmed(id, &z, version)).await?;
        Ok(version)
    }

    /// Asks the primary in `primary_zone` for key `id` and applies what it
    /// sends; returns the active version now held.
    ///
    /// # Errors
    /// As [`ReplicateError`].
    pub async fn pull(&self, id: Uuid, primary_zone: &str) -> Result<u32, ReplicateError> {
        let peer = |source| ReplicateError::Peer {
            zone: primary_zone.to_string(),
            source,
        };
        let r = self.exchange(primary_zone, &Message::Pull { key: id }).await;
        let c = if r.is_ok() {
            &self.stats.pulls_ok
        } else {
            &self.stats.pulls_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
        let export = match r.map_err(peer)? {
            Message::Export(e) if e.id == id => e,
            _ => {
                return Err(peer(PeerError::Unexpected {
                    zone: primary_zone.to_string(),
                    kind: "message instead of an export",
                }))
            }
        };
        let z = primary_zone.to_string();
        Ok(self.blocking(move |s| s.accept_replica(&export, &z)).await?.active)
    }

    /// One frame from the daemon of zone `from` (authenticated by the
    /// channel): do its zones match, then the message itself.
    async fn on_frame(&self, from: &str, frame: ReplicationFrame) -> Response {
        let msg = self.admit(from, &frame);
        message::wipe(frame);
        let msg = match msg {
            Ok(msg) => msg,
            Err(reply) => {
                self.stats.frames_rejected.fetch_add(1, Ordering::Relaxed);
                return Response::Error(reply);
            }
        };
        let answer = match msg {
            Message::Push(export) => self.on_push(export, from).await,
            Message::Pull { key } => self.on_pull(key, from).await,
            Message::Release { key } => {
                let z = from.to_string();
                self.blocking(move |s| s.release_replica(key, &z))
                    .await
                    .map(|()| Message::Released { key })
                    .map_err(ErrorReply::from)
            }
            Message::Ack { .. } | Message::Export(_) | Message::Released { .. } => Err(ErrorReply::new(
                ErrorCode::InvalidArgument,
                "acknowledgements and exports are answers, not requests",
            )),
        };
        match answer.and_then(|m| self.frame_to(from, &m)) {
            Ok(frame) => Response::Replication(frame),
            Err(reply) => {
                tracing::warn!(zone = %from, error = %reply, "replication request refused");
                Response::Error(reply)
            }
        }
    }

    /// Checks that the frame claims the authenticated zone and is for us.
    fn admit(&self, from: &str, frame: &ReplicationFrame) -> Result<Message, ErrorReply> {
        let claimed = &crate::observe::bounded(&frame.from_zone);
        if !self.is_peer(from) {
            tracing::warn!(zone = %from, "replication frame from a zone that is not a configured peer; refused");
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!("zone {from} is not a configured peer of zone {}", self.zone()),
            ));
        }
        if claimed != from {
            tracing::warn!(zone = %from, claimed_zone = %claimed, "replication frame claims another zone than its sender's; refused");
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!("the frame claims zone {claimed} but comes from zone {from}"),
            ));
        }
        if frame.to_zone != self.zone() {
            let to = crate::observe::bounded(&frame.to_zone);
            tracing::warn!(zone = %from, to_zone = %to, "replication frame for another zone; refused");
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!("this is zone {}, not zone {to}", self.zone()),
            ));
        }
        message::read(frame).map_err(|e| {
            tracing::warn!(zone = %from, error = %error_chain(&e), "replication frame does not decode; refused");
            ErrorReply::new(ErrorCode::InvalidArgument, error_chain(&e))
        })
    }

    fn frame_to(&self, zone: &str, msg: &Message) -> Result<ReplicationFrame, ErrorReply> {
        message::frame(self.zone(), zone, msg).map_err(|e| ErrorReply::new(ErrorCode::Internal, error_chain(&e)))
    }

    async fn on_push(&self, export: KeyExport, from: &str) -> Result<Message, ErrorReply> {
        let (id, z) = (export.id, from.to_string());
        let accepted = self
            .blocking(move |s| s.accept_replica(&export, &z))
            .await
            .map_err(ErrorReply::from)?;
        tracing::debug!(key = %id, primary_zone = from, version = accepted.active, "replica up to date");
        Ok(Message::Ack {
            key: id,
            version: accepted.active,
            orphans: accepted.orphans,
        })
    }

    async fn on_pull(&self, id: Uuid, from: &str) -> Result<Message, ErrorReply> {
        let z = from.to_string();
        let export = self
            .blocking(move |s| s.export_for_replica(id, &z))
            .await
            .map_err(ErrorReply::from)?;
        Ok(Message::Export(export))
    }
}

fn error(code: ErrorCode, msg: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, msg))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{OnceLock, Weak};

    use futures::future::BoxFuture;
    use kms_client::proto::{CreateKey, KeyRole};

    use super::*;
    use crate::keys::{ManualClock, RootKey};

    /// The uid zone `name`'s daemon runs as in these tests.
    fn uid_of(name: &str) -> u32 {
        990 + u32::from(name.as_bytes()[0] - b'a')
    }

    type Zones = Arc<OnceLock<HashMap<String, Weak<Replicator>>>>;

    thread_local! {
        /// Zones cut off from the others (current-thread tests only).
        static DOWN: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn cut_off(zones: &[&str]) {
        DOWN.with(|d| *d.borrow_mut() = zones.iter().map(|z| z.to_string()).collect());
    }

    /// Delivers frames in memory to the other zone's replicator as if they
    /// came through its Unix socket from the sender's uid: the replication
    /// logic without sockets.
    #[derive(Debug)]
    struct Loopback {
        from_uid: u32,
        zones: Zones,
    }

    impl PeerTransport for Loopback {
        fn send<'a>(
            &'a self,
            zone: &'a str,
            frame: ReplicationFrame,
        ) -> BoxFuture<'a, Result<ReplicationFrame, PeerError>> {
            Box::pin(async move {
                let me = self
                    .zones
                    .get()
                    .and_then(|m| m.iter().find(|(z, _)| uid_of(z) == self.from_uid));
                let down = DOWN.with(|d| d.borrow().clone());
                if down.iter().any(|d| d == zone || me.is_some_and(|(z, _)| z == d)) {
                    return Err(PeerError::Timeout {
                        zone: zone.to_string(),
                        secs: 0,
                    });
                }
                let peer = self.zones.get().and_then(|m| m.get(zone)).and_then(Weak::upgrade);
                let peer = peer.ok_or_else(|| PeerError::UnknownZone(zone.to_string()))?;
                let caller = Caller::process(self.from_uid, self.from_uid, None);
                match peer.handle(&caller, Request::Replication(frame)).await {
                    Response::Replication(f) => Ok(f),
                    Response::Error(reply) => Err(PeerError::Refused {
                        zone: zone.to_string(),
                        reply,
                    }),
                    other => Err(PeerError::Unexpected {
                        zone: zone.to_string(),
                        kind: other.kind_name(),
                    }),
                }
            })
        }
    }

    struct Zone {
        _dir: tempfile::TempDir,
        r: Arc<Replicator>,
    }

    fn zone(name: &str, all: &[&str], zones: &Zones) -> Zone {
        let dir = crate::testutil::private_dir().unwrap();
        let clock = Arc::new(ManualClock::at(1_750_000_000));
        let keys = KeyService::open(dir.path(), RootKey::from_bytes(&[1; 32]), name, clock).unwrap();
        let settings = Settings {
            pull_interval: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
        };
        let peers = all
            .iter()
            .filter(|z| **z != name)
            .map(|z| Peer {
                zone: z.to_string(),
                uid: Some(uid_of(z)),
            })
            .collect();
        let transport = Arc::new(Loopback {
            from_uid: uid_of(name),
            zones: zones.clone(),
        });
        let r = Replicator::new(Arc::new(keys), peers, transport, settings);
        Zone {
            _dir: dir,
            r: Arc::new(r),
        }
    }

    fn site(names: &[&str]) -> Vec<Zone> {
        let zones = Zones::default();
        let all: Vec<Zone> = names.iter().map(|n| zone(n, names, &zones)).collect();
        let map = names
            .iter()
            .zip(&all)
            .map(|(n, z)| (n.to_string(), Arc::downgrade(&z.r)))
            .collect();
        zones.set(map).unwrap();
        all
    }

    fn owner() -> Caller {
        Caller::process(1000, 1000, None)
    }

    fn create(z: &Zone) -> Uuid {
        let req = CreateKey {
            name: Some("app".into()),
            ..Default::default()
        };
        z.r.keys.create_key(&owner(), &req).unwrap().id
    }

    /// What `from` (a zone's uid) gets for `msg` sent to zone `to`, which
    /// the frame claims comes from `claim`.
    async fn send_as(to: &Zone, from: &str, claim: &str, msg: &Message) -> Response {
        let frame = message::frame(claim, to.r.zone(), msg).unwrap();
        let caller = Caller::process(uid_of(from), uid_of(from), None);
        to.r.handle(&caller, Request::Replication(frame)).await
    }

    fn code(r: Response) -> ErrorCode {
        match r {
            Response::Error(e) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn replicate_push_and_pull_through_the_transport_trait() {
        let z = site(&["a", "b"]);
        let (a, b) = (&z[0], &z[1]);
        create(a);
        let info = a.r.replicate(&owner(), "app", "b").await.unwrap();
        assert_eq!(info.role, KeyRole::Primary);
        assert_eq!(info.replicas[0].confirmed_version, Some(1));
        let id = info.id;
        a.r.keys.rotate(&owner(), "app").unwrap();
        assert_eq!(a.r.push_current(id, "b").await.unwrap(), 2);
        a.r.keys.rotate(&owner(), "app").unwrap();
        assert_eq!(b.r.pull(id, "a").await.unwrap(), 3);
        assert_eq!(
            b.r.keys.rotations(&owner(), "app").unwrap(),
            a.r.keys.rotations(&owner(), "app").unwrap()
        );
        assert_eq!(a.r.stats.pushes_ok.load(Ordering::Relaxed), 2);
        assert_eq!(b.r.stats.pulls_ok.load(Ordering::Relaxed), 1);
        let lag = replica_lag(&a.r.keys.describe(&owner(), "app").unwrap());
        assert_eq!(lag, vec![("b".to_string(), 1)]);
    }

    #[tokio::test]
    async fn a_frame_speaks_only_for_the_zone_that_sent_it() {
        let z = site(&["a", "b", "c"]);
        let (a, b, c) = (&z[0], &z[1], &z[2]);
        let id = create(a);
        a.r.replicate(&owner(), "app", "b").await.unwrap();
        // c's daemon claims to be b: refused before anything is read.
        let pull = Message::Pull { key: id };
        assert_eq!(code(send_as(a, "c", "b", &pull).await), ErrorCode::PermissionDenied);
        // As itself, c gets nothing: the key has no replica in c.
        assert_eq!(code(send_as(a, "c", "c", &pull).await), ErrorCode::NotFound);
        // b, which holds a replica, gets the export.
        assert!(matches!(send_as(a, "b", "b", &pull).await, Response::Replication(_)));
        // A uid that is no zone's, and a frame for another zone.
        let stranger = Caller::process(4242, 4242, None);
        let frame = message::frame("b", "a", &pull).unwrap();
        assert_eq!(
            code(a.r.handle(&stranger, Request::Replication(frame)).await),
            ErrorCode::PermissionDenied
        );
        let frame = message::frame("b", "c", &pull).unwrap();
        let as_b = Caller::process(uid_of("b"), uid_of("b"), None);
        assert_eq!(
            code(a.r.handle(&as_b, Request::Replication(frame)).await),
            ErrorCode::PermissionDenied
        );
        assert_eq!(a.r.stats.frames_rejected.load(Ordering::Relaxed), 3);
        // Over TLS the authenticated zone is passed in; the same rules hold.
        let frame = message::frame("b", "a", &pull).unwrap();
        assert_eq!(
            code(a.r.handle_peer("c", Request::Replication(frame)).await),
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            code(a.r.handle_peer("b", Request::Status).await),
            ErrorCode::PermissionDenied
        );
        // c pushing a's key to b (which holds the replica) is refused: only
        // the primary's zone may push it.
        let export = a.r.keys.export_for_replica(id, "b").unwrap();
        assert_eq!(
            code(send_as(b, "c", "c", &Message::Push(export.clone())).await),
            ErrorCode::InvalidArgument
        );
        let mut forged = export;
        forged.primary_zone = "c".into();
        assert_eq!(
            code(send_as(b, "c", "c", &Message::Push(forged)).await),
            ErrorCode::InvalidArgument
        );
        assert_eq!(b.r.keys.rotations(&owner(), "app").unwrap().len(), 1);
        let _ = c;
    }
    #[tokio::test]
    async fn a_replica_deleted_in_its_zone_stays_deleted_until_unreplicated() {
        let z = site(&["a", "b"]);
        let (a, b) = (&z[0], &z[1]);
        let id = create(a);
        a.r.replicate(&owner(), "app", "b").await.unwrap();
        // b's operator deletes b's replica; the waiting period passes.
        b.r.keys.schedule_deletion(&owner(), "app", Some(7)).unwrap();
        let report = b.r.keys.run_due(1_750_000_000 + 8 * 86_400);
        assert_eq!(report.deleted, vec![id]);
        assert_eq!(
            b.r.keys.describe(&owner(), "app").unwrap_err().code(),
            ErrorCode::NotFound
        );
        // The primary's next push is refused, and does not recreate it.
        a.r.keys.rotate(&owner(), "app").unwrap();
        let e = a.r.push_current(id, "b").await.unwrap_err();
        assert_eq!(ErrorReply::from(e).code, ErrorCode::Forbidden);
        assert!(b.r.keys.describe(&owner(), "app").is_err());
        // Also after a restart of b (the tombstone is stored).
        let reopened = KeyService::with_store(b.r.keys.store_for_test(), "b", Arc::new(ManualClock::at(1))).unwrap();
        let export = a.r.keys.export_for_replica(id, "b").unwrap();
        assert_eq!(
            reopened.accept_replica(&export, "a").unwrap_err().code(),
            ErrorCode::Forbidden
        );
        drop(reopened);
        // The primary lets the zone go: tombstone and replica entry gone.
        let info = a.r.unreplicate(&owner(), "app", "b").await.unwrap();
        assert_eq!((info.role, info.replicas.len()), (KeyRole::SingleZone, 0));
        // Now b may receive the key again, if the primary replicates it.
        a.r.replicate(&owner(), "app", "b").await.unwrap();
        assert_eq!(b.r.keys.rotations(&owner(), "app").unwrap().len(), 2);
    }

    #[tokio::test]
    async fn unreplicate_removes_a_live_replica_and_only_the_primary_may() {
        let z = site(&["a", "b", "c"]);
        let (a, b) = (&z[0], &z[1]);
        let id = create(a);
        a.r.replicate(&owner(), "app", "b").await.unwrap();
        a.r.replicate(&owner(), "app", "c").await.unwrap();
        // Not from a replica, not by a stranger, not for a zone without one.
        assert!(b.r.unreplicate(&owner(), "app", "c").await.is_err());
        let stranger = Caller::process(4242, 4242, None);
        let e = a.r.unreplicate(&stranger, "app", "b").await.unwrap_err();
        assert_eq!(ErrorReply::from(e).code, ErrorCode::PermissionDenied);
        // c, claiming to be the primary, cannot release b's replica.
        let release = Message::Release { key: id };
        assert!(matches!(send_as(b, "c", "c", &release).await, Response::Error(_)));
        assert!(b.r.keys.describe(&owner(), "app").is_ok());
        // The primary can.
        let info = a.r.unreplicate(&owner(), "app", "b").await.unwrap();
        let zones: Vec<_> = info.replicas.iter().map(|r| r.zone.as_str()).collect();
        assert_eq!((info.role, zones), (KeyRole::Primary, vec!["c"]));
        assert_eq!(
            b.r.keys.describe(&owner(), "app").unwrap_err().code(),
            ErrorCode::NotFound
        );
    }
    #[tokio::test]
    async fn promote_a_replica_and_the_old_primary_rejoins_without_a_fork() {
        let z = site(&["a", "b", "c"]);
        let (a, b, c) = (&z[0], &z[1], &z[2]);
        let id = create(a);
        a.r.replicate(&owner(), "app", "b").await.unwrap();
        a.r.replicate(&owner(), "app", "c").await.unwrap();
        a.r.keys.rotate(&owner(), "app").unwrap();
        a.r.push_current(id, "b").await.unwrap();
        a.r.push_current(id, "c").await.unwrap();
        let ctx = kms_client::proto::Context::new();
        let old = a.r.keys.wrap(&owner(), "app", b"before", &ctx).unwrap();

        // Zone a is cut off; b is promoted. Only replicas and admins may.
        cut_off(&["a"]);
        assert_eq!(
            a.r.keys.promote(&owner(), "app").unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        let stranger = Caller::process(4242, 4242, None);
        assert_eq!(
            b.r.keys.promote(&stranger, "app").unwrap_err().code(),
            ErrorCode::PermissionDenied
        );
        let info = b.r.keys.promote(&owner(), "app").unwrap();
        assert_eq!(info.role, KeyRole::Primary);
        let mut zones: Vec<_> = info.replicas.iter().map(|r| r.zone.clone()).collect();
        zones.sort();
        assert_eq!(zones, ["a", "c"]);

        // Meanwhile the cut-off old primary rotates (it cannot know), and
        // the new one rotates too: different version numbers.
        let partitioned = a.r.keys.rotate(&owner(), "app").unwrap().active_version;
        let during = a.r.keys.wrap(&owner(), "app", b"during", &ctx).unwrap();
        let promoted = b.r.keys.rotate(&owner(), "app").unwrap().active_version;
        assert_eq!(partitioned, 3);
        assert_eq!(promoted, (1 << crate::keys::model::EPOCH_SHIFT) + 1);
        b.r.push_current(id, "c").await.unwrap();
        // c follows b now; a's export of the old epoch is refused there.
        let old_export = a.r.keys.export_for_replica(id, "c").unwrap();
        assert_eq!(
            c.r.keys.accept_replica(&old_export, "a").unwrap_err().code(),
            ErrorCode::InvalidArgument
        );

        // a is back: b's push demotes it, and b adopts a's version 3.
        cut_off(&[]);
        b.r.push_current(id, "a").await.unwrap();
        let ka = a.r.keys.describe(&owner(), "app").unwrap();
        assert_eq!(
            ka.role,
            KeyRole::Replica {
                primary_zone: "b".into()
            }
        );
        assert_eq!(
            a.r.keys.rotate(&owner(), "app").unwrap_err().code(),
            ErrorCode::NotPrimary
        );
        b.r.push_current(id, "c").await.unwrap();
        let history = |zone: &Zone| {
            let k = zone.r.keys.entry("app").unwrap();
            k.record.versions.clone()
        };
        let (ha, hb, hc) = (history(a), history(b), history(c));
        let numbers: Vec<u32> = hb.iter().map(|v| v.version).collect();
        assert_eq!(numbers, [1, 2, 3, promoted]);
        assert!(
            ha == hb && hb == hc,
            "every zone holds the same versions, material included"
        );
        // Every blob made anywhere, before or during the split, unwraps in
        // every zone.
        let after = b.r.keys.wrap(&owner(), "app", b"after", &ctx).unwrap();
        for zone in [a, b, c] {
            for (blob, want) in [(&old, &b"before"[..]), (&during, b"during"), (&after, b"after")] {
                assert_eq!(&zone.r.keys.unwrap(&owner(), blob, &ctx).unwrap()[..], want);
            }
        }
    }
}
