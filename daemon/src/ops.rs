//! Maps each protocol request onto the key service and each outcome onto a
//! response. No I/O here: the connection code decides where to run it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kms_client::proto::{
    DataKey, ErrorCode, ErrorReply, Request, Response, Secret, StatusInfo, StoreStatusInfo, PROTOCOL_VERSION,
};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::crypto::Sealed;
use crate::keys::service::DataKeyPair;
use crate::keys::{self, Caller, KeyService};
use crate::leader::Leadership;
use crate::mounts::Mounts;
use crate::observe::Observers;
use crate::replication::Replicator;

/// The daemon's shared state, seen by every connection.
#[derive(Debug)]
pub struct Daemon {
    pub keys: Arc<KeyService>,
    pub started: Instant,
    pub connections: AtomicU64,
    /// Connections refused by the server's limits.
    pub connections_refused: AtomicU64,
    pub mounts: Arc<Mounts>,
    /// Multi-zone replication, when peers are configured.
    pub replication: Option<Arc<Replicator>>,
    /// Told about every answered request (metrics, audit).
    pub observers: Observers,
    /// Whether this daemon runs its zone's scheduled work (etcd fleets
    /// elect one; alone, it always does).
    pub leadership: Leadership,
}

impl Daemon {
    /// State around an opened key service and its mounts.
    pub fn new(keys: Arc<KeyService>, mounts: Arc<Mounts>) -> Self {
        Self {
            keys,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            mounts,
            replication: None,
            observers: Observers::default(),
            leadership: Leadership::sole(),
        }
    }

    /// Adds multi-zone replication.
    pub fn with_replication(mut self, r: Arc<Replicator>) -> Self {
        self.replication = Some(r);
        self
    }

    /// The `Hello` reply.
    pub fn hello(&self) -> Response {
        Response::Hello {
            server: server_version(),
            protocol: PROTOCOL_VERSION,
            zone: self.keys.zone().to_string(),
        }
    }

    fn status(&self) -> Response {
        Response::Status(StatusInfo {
            server: server_version(),
            zone: self.keys.zone().to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            keys: self.keys.key_count() as u64,
            connections: self.connections.load(Ordering::Relaxed),
            mounts: self.mounts.infos(),
        })
    }
}

impl Daemon {
    fn store_status(&self) -> Response {
        let health = self.keys.store_health();
        Response::StoreStatus(StoreStatusInfo {
            backend: health.backend.to_string(),
            problem: health.problem,
            leader: self.leadership.is_leader(),
        })
    }
}

/// `kmsd/<version>`.
pub fn server_version() -> String {
    format!("kmsd/{}", env!("CARGO_PKG_VERSION"))
}

/// A response and, when it carries blobs sealed just now (encrypt, wrap,
/// generate, re-encrypt and their batches), the key and version the key
/// service sealed them under, for the observers.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub response: Response,
    pub sealed_with: Option<(Uuid, u32)>,
}

impl From<Response> for Answer {
    fn from(response: Response) -> Self {
        Self {
            response,
            sealed_with: None,
        }
    }
}

fn reply<T>(r: keys::Result<T>, ok: impl FnOnce(T) -> Response) -> Answer {
    match r {
        Ok(v) => ok(v).into(),
        Err(e) => Response::Error(e.into()).into(),
    }
}

/// What the key service sealed: a blob, a data key, or a batch of either,
/// every blob of a batch under the same key version.
trait SealedWith {
    fn sealed_with(&self) -> Option<&Sealed>;
}

impl SealedWith for Sealed {
    fn sealed_with(&self) -> Option<&Sealed> {
        Some(self)
    }
}

impl SealedWith for DataKeyPair {
    fn sealed_with(&self) -> Option<&Sealed> {
        Some(&self.1)
    }
}

impl<T: SealedWith> SealedWith for Vec<T> {
    fn sealed_with(&self) -> Option<&Sealed> {
        self.first().and_then(SealedWith::sealed_with)
    }
}

/// As [`reply`], for an operation that sealed, telling which key version.
fn sealed<T: SealedWith>(r: keys::Result<T>, ok: impl FnOnce(T) -> Response) -> Answer {
    let sealed_with = r.as_ref().ok().and_then(T::sealed_with).map(|s| (s.key_id, s.version));
    Answer {
        sealed_with,
        ..reply(r, ok)
    }
}

/// Handles one request after the handshake, on whatever thread its
/// [`Execution`](kms_client::proto::Execution) asks for; `progress(done,
/// total)` hears how a long request (`fs rewrap`) advances.
pub fn handle(d: &Daemon, caller: &Caller, req: Request, progress: impl FnMut(u64, u64)) -> Answer {
    let k = &*d.keys;
    match req {
        Request::Hello { .. } => d.hello().into(),
        Request::Status => d.status().into(),
        Request::CreateKey(c) => reply(k.create_key(caller, &c), Response::Key),
        Request::DescribeKey { key } => reply(k.describe(caller, &key), Response::Key),
        Request::ListKeys => Response::Keys(k.list(caller)).into(),
        Request::EnableKey { key } => reply(k.enable_key(caller, &key), Response::Key),
        Request::DisableKey { key } => reply(k.disable_key(caller, &key), Response::Key),
        Request::ScheduleDeletion { key, days } => reply(k.schedule_deletion(caller, &key, days), Response::Key),
        Request::CancelDeletion { key } => reply(k.cancel_deletion(caller, &key), Response::Key),
        Request::RotateKey { key } => reply(k.rotate(caller, &key), Response::Key),
        Request::PromoteKey { key } => reply(k.promote(caller, &key), Response::Key),
        Request::ListRotations { key } => reply(k.rotations(caller, &key), Response::Rotations),
        Request::EnableRotation { key, period_days } => {
            reply(k.enable_rotation(caller, &key, period_days), Response::Key)
        }
        Request::DisableRotation { key } => reply(k.disable_rotation(caller, &key), Response::Key),
        Request::Encrypt {
            key,
            plaintext,
            context,
        } => sealed(k.encrypt(caller, &key, &plaintext, &context), |s| {
            Response::Blob(s.blob)
        }),
        Request::Decrypt { blob, context } => {
            reply(k.decrypt(caller, &blob, &context), |p| Response::Plaintext(p.into()))
        }
        Request::Wrap { key, dek, context } => sealed(k.wrap(caller, &key, &dek, &context), |s| Response::Blob(s.blob)),
        Request::Unwrap { blob, context } => {
            reply(k.unwrap(caller, &blob, &context), |p| Response::Plaintext(p.into()))
        }
        Request::GenerateDataKey {
            key,
            context,
            with_plaintext,
        } => sealed(k.generate_data_key(caller, &key, &context), |dk| {
            Response::DataKey(data_key(dk, with_plaintext))
        }),
        Request::ReEncrypt {
            blob,
            context,
            to,
            to_context,
        } => sealed(
            k.re_encrypt(caller, &blob, &context, to.as_deref(), to_context.as_ref()),
            |s| Response::Blob(s.blob),
        ),
        Request::WrapBatch { key, deks, context } => {
            sealed(k.wrap_batch(caller, &key, &unwrapped(deks), &context), |ss| {
                Response::Blobs(ss.into_iter().map(|s| s.blob).collect())
            })
        }
        Request::UnwrapBatch { blobs, context } => reply(k.unwrap_batch(caller, &blobs, &context), |rs| {
            Response::Plaintexts(
                rs.into_iter()
                    .map(|r| r.map(Secret::from).map_err(ErrorReply::from))
                    .collect(),
            )
        }),
        Request::GenerateDataKeyBatch {
            key,
            count,
            context,
            with_plaintext,
        } => sealed(
            k.generate_data_key_batch(caller, &key, count as usize, &context),
            |dks| Response::DataKeys(dks.into_iter().map(|dk| data_key(dk, with_plaintext)).collect()),
        ),
        // With peers configured the server hands these (`Execution::Peers`)
        // to the replicator.
        Request::ReplicateKey { .. } | Request::Replication(_) | Request::UnreplicateKey { .. } => {
            unavailable("multi-zone replication is not configured here: no [[peer]]").into()
        }
        Request::FsVersions { mount } => match d.mounts.versions(k, caller, &mount) {
            Ok(v) => Response::FsVersions(v),
            Err(e) => Response::Error(e),
        }
        .into(),
        Request::FsRewrap { mount } => rewrap(d, caller, &mount, progress).into(),
        Request::FsStats => Response::FsStats(d.mounts.stats()).into(),
        Request::GenerateDataKeys {
            key,
            contexts,
            with_plaintext,
        } => sealed(k.generate_data_keys(caller, &key, &contexts), |dks| {
            Response::DataKeys(dks.into_iter().map(|dk| data_key(dk, with_plaintext)).collect())
        }),
        Request::StoreStatus => d.store_status().into(),
        Request::Backup => reply(k.snapshot(caller), |s| Response::Backup(s.into())),
    }
}

/// Runs `fs rewrap`, reporting progress through `progress(done, total)`.
fn rewrap(d: &Daemon, caller: &Caller, mount: &str, progress: impl FnMut(u64, u64)) -> Response {
    match d.mounts.rewrap(&d.keys, caller, mount, progress) {
        Ok(r) => Response::FsRewrap(r),
        Err(e) => Response::Error(e),
    }
}

fn data_key((dek, sealed): DataKeyPair, with_plaintext: bool) -> DataKey {
    DataKey {
        blob: sealed.blob,
        plaintext: with_plaintext.then(|| dek.into()),
    }
}

/// The DEKs of a batch as the key service takes them: moved, not copied,
/// out of their secret wrappers into a list that is still wiped on drop.
fn unwrapped(deks: Vec<Secret>) -> Zeroizing<Vec<Vec<u8>>> {
    Zeroizing::new(
        deks.into_iter()
            .map(|d| std::mem::take(&mut *d.into_zeroizing()))
            .collect(),
    )
}

fn unavailable(msg: &str) -> Response {
    Response::Error(ErrorReply::new(ErrorCode::Unavailable, msg))
}

/// Runs [`handle`], turning a panic into an `internal` error for this
/// request only.
pub fn handle_guarded(d: &Daemon, caller: &Caller, req: Request, progress: impl FnMut(u64, u64)) -> Answer {
    let op = req.op().name();
    guarded(op, caller, || handle(d, caller, req, progress))
}

/// Runs `f`; a panic inside it is logged and answered `internal`, and the
/// daemon goes on serving.
fn guarded(op: &str, caller: &Caller, f: impl FnOnce() -> Answer) -> Answer {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            tracing::error!(
                op,
                uid = caller.uid,
                pid = caller.pid,
                "request handler panicked; answered internal"
            );
            Response::Error(ErrorReply::new(
                ErrorCode::Internal,
                format!("internal error while handling {op}"),
            ))
            .into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_is_an_internal_error_for_that_request_only() {
        let caller = Caller::process(1, 1, Some(1));
        let r = guarded("wrap", &caller, || panic!("bug in one request"));
        assert!(matches!(
            r.response,
            Response::Error(ErrorReply {
                code: ErrorCode::Internal,
                ..
            })
        ));
        assert_eq!(
            guarded("status", &caller, || Response::Done.into()),
            Response::Done.into()
        );
    }

    #[test]
    fn a_store_failure_reaches_the_client_with_each_cause_once() {
        use crate::keys::store::StoreError;
        let e = keys::Error::Unavailable(StoreError::Io {
            op: "cannot write",
            path: "/var/lib/kmsd/keys/k.tmp".into(),
            source: std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        });
        crate::testutil::assert_states_cause_once(&e);
        let reply = ErrorReply::from(e);
        assert_eq!(reply.code, ErrorCode::Unavailable);
        assert_eq!(
            reply.message,
            "key store unavailable: /var/lib/kmsd/keys/k.tmp: cannot write: No space left on device (os error 28)"
        );
        // What kmsctl prints: the code, then the message, each once.
        let shown = kms_client::ClientError::Server(reply).to_string();
        assert_eq!(shown.matches("No space left on device").count(), 1, "{shown}");
        assert_eq!(shown.matches("cannot write").count(), 1, "{shown}");
    }
}
