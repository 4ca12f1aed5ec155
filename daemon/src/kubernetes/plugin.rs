//! The three calls of the KMS v2 plugin API. Each runs as the caller the
//! kernel named (`SO_PEERCRED`, in the request's extensions), through the
//! same path as a `wrap` or `unwrap` on kmsd's own socket: the key's
//! policy, `ops::handle`, and the observers (audit log, metrics).

use std::sync::Arc;
use std::time::Instant;

use kms_client::proto::{ErrorCode, ErrorReply, Request, Response, Secret};
use rand::RngCore;
use tonic::{Code, Status};
use zeroize::Zeroizing;

use super::envelope::{self, KeyVersion, Refusal};
use super::proto::key_management_service_server::KeyManagementService;
use super::proto::{DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse};
use crate::keys::Caller;
use crate::observe::{bounded, Observation, Subject};
use crate::ops::{self, Daemon};

/// The plugin: the daemon and the key that seals the cluster's DEK seeds.
#[derive(Debug)]
pub struct Plugin {
    daemon: Arc<Daemon>,
    key: String,
}

impl Plugin {
    pub fn new(daemon: Arc<Daemon>, key: String) -> Self {
        Self { daemon, key }
    }

    /// Runs `req` as `caller` and reports it to the observers, as the
    /// socket server does for each frame.
    fn observed(&self, caller: &Caller, req: Request) -> ops::Answer {
        let subject = (!self.daemon.observers.is_empty()).then(|| Subject::of(&req));
        let started = Instant::now();
        let answer = ops::handle_guarded(&self.daemon, caller, req, |_, _| {});
        if let Some(subject) = &subject {
            self.daemon.observers.observe(&Observation {
                subject,
                caller,
                response: &answer.response,
                sealed_with: answer.sealed_with,
                elapsed: started.elapsed(),
            });
        }
        answer
    }

    /// Wraps `plaintext` under the active version of the key.
    fn seal(&self, caller: &Caller, plaintext: &[u8]) -> Result<(Vec<u8>, KeyVersion), ErrorReply> {
        let req = Request::Wrap {
            key: self.key.clone(),
            dek: Secret::from(plaintext.to_vec()),
            context: envelope::context(),
        };
        match self.observed(caller, req) {
            ops::Answer {
                response: Response::Blob(blob),
                sealed_with: Some((key, version)),
            } => Ok((blob, KeyVersion { key, version })),
            ops::Answer {
                response: Response::Error(e),
                ..
            } => Err(e),
            _ => Err(ErrorReply::new(ErrorCode::Internal, "wrap answered something else")),
        }
    }

    /// Unwraps a blob already checked to be of this plugin's key.
    fn open(&self, caller: &Caller, blob: Vec<u8>) -> Result<Zeroizing<Vec<u8>>, ErrorReply> {
        let req = Request::Unwrap {
            blob,
            context: envelope::context(),
        };
        match self.observed(caller, req).response {
            Response::Plaintext(p) => Ok(p.into_zeroizing()),
            Response::Error(e) => Err(e),
            _ => Err(ErrorReply::new(ErrorCode::Internal, "unwrap answered something else")),
        }
    }

    /// The id of this plugin's key, as kmsd knows it now.
    fn key_uuid(&self) -> Result<uuid::Uuid, ErrorReply> {
        Ok(self.daemon.keys.entry(&self.key).map_err(ErrorReply::from)?.record.id)
    }

    /// A round trip through the key as `caller`: a random probe wrapped
    /// and unwrapped. The key version it was sealed under, or why not.
    fn probe(&self, caller: &Caller) -> Result<KeyVersion, String> {
        let mut probe = Zeroizing::new(vec![0u8; 32]);
        rand::thread_rng().fill_bytes(&mut probe);
        let key = bounded(&self.key);
        let (blob, made) = self.seal(caller, &probe).map_err(|e| {
            format!(
                "kmsd: cannot encrypt with key {key:?}: {}: {}",
                e.code.as_str(),
                e.message
            )
        })?;
        let back = self.open(caller, blob).map_err(|e| {
            format!(
                "kmsd: cannot decrypt with key {key:?}: {}: {}",
                e.code.as_str(),
                e.message
            )
        })?;
        if *back != *probe {
            return Err(format!("kmsd: key {key:?} did not decrypt what it encrypted"));
        }
        Ok(made)
    }
}

/// The caller tonic found on the connection (see `listener.rs`).
fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no peer credentials on this connection"))
}

/// A key service error as a gRPC status, its code kept in the message.
fn status(e: ErrorReply) -> Status {
    let code = match e.code {
        ErrorCode::PermissionDenied | ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::Disabled | ErrorCode::NotFound => Code::FailedPrecondition,
        ErrorCode::InvalidArgument | ErrorCode::DecryptFailed | ErrorCode::Malformed => Code::InvalidArgument,
        ErrorCode::LimitExceeded => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, format!("kmsd: {}: {}", e.code.as_str(), e.message))
}

fn refused(r: Refusal) -> Status {
    Status::invalid_argument(format!("kmsd: {r}"))
}

/// Counts a call by method and outcome, and logs a failure with
/// kube-apiserver's request uid.
fn outcome<T>(method: &'static str, caller: &Caller, uid: &str, r: &Result<T, Status>) {
    let outcome = match r {
        Ok(_) => "ok",
        Err(s) => {
            // Debug only: a caller sending garbage must not fill the log
            // (the audit log has every refusal).
            tracing::debug!(
                method,
                uid = caller.uid,
                pid = caller.pid,
                request = %bounded(uid),
                error = %s.message(),
                "kubernetes plugin call failed"
            );
            code_name(s.code())
        }
    };
    metrics::counter!("kmsd_kubernetes_requests_total", "method" => method, "outcome" => outcome).increment(1);
}

/// A gRPC code as a metrics label.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid-argument",
        Code::PermissionDenied => "permission-denied",
        Code::FailedPrecondition => "failed-precondition",
        Code::ResourceExhausted => "resource-exhausted",
        Code::Unavailable => "unavailable",
        Code::Unauthenticated => "unauthenticated",
        _ => "internal",
    }
}

#[tonic::async_trait]
impl KeyManagementService for Plugin {
    async fn status(&self, req: tonic::Request<StatusRequest>) -> Result<tonic::Response<StatusResponse>, Status> {
        let caller = caller(&req)?;
        // Unhealthy is an answer, not an error: kube-apiserver shows
        // healthz in its own health check.
        let (healthz, key_id, label) = match self.probe(&caller) {
            Ok(made) => (envelope::HEALTHY.to_string(), made.key_id(), "ok"),
            Err(why) => (why, String::new(), "unhealthy"),
        };
        metrics::counter!("kmsd_kubernetes_requests_total", "method" => "status", "outcome" => label).increment(1);
        Ok(tonic::Response::new(StatusResponse {
            version: envelope::API_VERSION.to_string(),
            healthz,
            key_id,
        }))
    }

    async fn encrypt(&self, req: tonic::Request<EncryptRequest>) -> Result<tonic::Response<EncryptResponse>, Status> {
        let caller = caller(&req)?;
        let EncryptRequest { plaintext, uid } = req.into_inner();
        let plaintext = Zeroizing::new(plaintext);
        let r = envelope::check_plaintext(&plaintext)
            .map_err(refused)
            .and_then(|()| self.seal(&caller, &plaintext).map_err(status))
            .and_then(|(ciphertext, made)| {
                if ciphertext.len() > envelope::MAX_CIPHERTEXT {
                    return Err(Status::internal("kmsd: ciphertext over kube-apiserver's limit"));
                }
                Ok(EncryptResponse {
                    ciphertext,
                    key_id: made.key_id(),
                    annotations: made.annotations(),
                })
            });
        outcome("encrypt", &caller, &uid, &r);
        r.map(tonic::Response::new)
    }

    async fn decrypt(&self, req: tonic::Request<DecryptRequest>) -> Result<tonic::Response<DecryptResponse>, Status> {
        let caller = caller(&req)?;
        let DecryptRequest {
            ciphertext,
            uid,
            key_id,
            annotations,
        } = req.into_inner();
        let r = self
            .key_uuid()
            .map_err(status)
            .and_then(|key| envelope::check_decrypt(key, &ciphertext, &key_id, &annotations).map_err(refused))
            .and_then(|_| self.open(&caller, ciphertext).map_err(status))
            // Moved out, not copied: prost's buffer is the only copy left.
            .map(|mut plaintext| DecryptResponse {
                plaintext: std::mem::take(&mut *plaintext),
            });
        outcome("decrypt", &caller, &uid, &r);
        r.map(tonic::Response::new)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use kms_client::proto::CreateKey;

    use super::*;
    use crate::keys::{KeyService, ManualClock, RootKey};

    const OWNER: u32 = 1000;

    struct Fixture {
        _dir: tempfile::TempDir,
        keys: Arc<KeyService>,
        plugin: Plugin,
    }

    fn fixture() -> Fixture {
        let dir = crate::testutil::private_dir().unwrap();
        let clock = Arc::new(ManualClock::at(1_750_000_000));
        let keys = Arc::new(KeyService::open(dir.path(), RootKey::from_bytes(&[9; 32]), "zone-a", clock).unwrap());
        let create = CreateKey {
            name: Some("cluster".into()),
            ..CreateKey::default()
        };
        keys.create_key(&owner(), &create).unwrap();
        let mounts = Arc::new(crate::mounts::Mounts::new(dir.path().join("mounts")));
        let daemon = Arc::new(Daemon::new(keys.clone(), mounts));
        Fixture {
            _dir: dir,
            keys,
            plugin: Plugin::new(daemon, "cluster".into()),
        }
    }

    fn owner() -> Caller {
        Caller::process(OWNER, OWNER, Some(1))
    }

    fn as_caller<T>(caller: Option<Caller>, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        req
    }

    async fn status(f: &Fixture, caller: Caller) -> StatusResponse {
        f.plugin
            .status(as_caller(Some(caller), StatusRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    async fn encrypt(f: &Fixture, plaintext: &[u8]) -> Result<EncryptResponse, Status> {
        let req = EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: "r1".into(),
        };
        f.plugin
            .encrypt(as_caller(Some(owner()), req))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn decrypt(
        f: &Fixture,
        sealed: &EncryptResponse,
        annotations: HashMap<String, Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        let req = DecryptRequest {
            ciphertext: sealed.ciphertext.clone(),
            uid: "r2".into(),
            key_id: sealed.key_id.clone(),
            annotations,
        };
        f.plugin
            .decrypt(as_caller(Some(owner()), req))
            .await
            .map(|r| r.into_inner().plaintext)
    }

    #[tokio::test]
    async fn status_follows_rotation_and_the_key_state() {
        let f = fixture();
        let s = status(&f, owner()).await;
        assert_eq!((s.version.as_str(), s.healthz.as_str()), ("v2", "ok"));
        let first = s.key_id;
        f.keys.rotate(&owner(), "cluster").unwrap();
        let s = status(&f, owner()).await;
        assert_eq!(s.healthz, "ok");
        assert_ne!(s.key_id, first, "a rotation must change key_id");
        f.keys.disable_key(&owner(), "cluster").unwrap();
        let s = status(&f, owner()).await;
        assert!(s.healthz.contains("disabled"), "{}", s.healthz);
        assert_eq!(s.key_id, "");
        let stranger = status(&f, Caller::process(OWNER + 1, OWNER + 1, Some(2))).await;
        assert!(stranger.healthz.contains("permission-denied"), "{}", stranger.healthz);
    }

    #[tokio::test]
    async fn encrypt_and_decrypt_across_a_rotation() {
        let f = fixture();
        let old = encrypt(&f, &[1; 32]).await.unwrap();
        assert_eq!(old.key_id, status(&f, owner()).await.key_id);
        assert!(old.ciphertext.len() <= envelope::MAX_CIPHERTEXT);
        f.keys.rotate(&owner(), "cluster").unwrap();
        let new = encrypt(&f, &[2; 32]).await.unwrap();
        assert_ne!(new.key_id, old.key_id);
        assert_eq!(decrypt(&f, &old, old.annotations.clone()).await.unwrap(), [1; 32]);
        assert_eq!(decrypt(&f, &new, new.annotations.clone()).await.unwrap(), [2; 32]);
        let mut tampered = old.clone();
        *tampered.ciphertext.last_mut().unwrap() ^= 1;
        let err = decrypt(&f, &tampered, HashMap::new()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let err = encrypt(&f, &[0; envelope::MAX_PLAINTEXT + 1]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }

    #[tokio::test]
    async fn a_blob_wrapped_with_another_context_does_not_open() {
        let f = fixture();
        let other = kms_client::proto::Context::from([("app".to_string(), "db".to_string())]);
        let sealed = f.keys.wrap(&owner(), "cluster", &[3; 32], &other).unwrap();
        let made = EncryptResponse {
            ciphertext: sealed.blob,
            key_id: String::new(),
            annotations: HashMap::new(),
        };
        let err = decrypt(&f, &made, HashMap::new()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("decrypt-failed"), "{err:?}");
    }

    #[tokio::test]
    async fn a_call_without_peer_credentials_is_refused() {
        let f = fixture();
        let req = EncryptRequest {
            plaintext: vec![1; 32],
            uid: String::new(),
        };
        let err = f.plugin.encrypt(as_caller(None, req)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
}
