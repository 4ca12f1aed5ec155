//! One report per answered request, for metrics and the audit log: what was
//! asked (operation, caller, key, version), how it ended, and how long it
//! took. The server builds an [`Observation`] around each request and hands
//! it to every [`Observer`]; observers must be cheap and must never block.

use std::sync::Arc;
use std::time::Duration;

use kms_client::proto::{Op, Request, Response};
use uuid::Uuid;

use crate::keys::Caller;

/// What is known about a request before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The operation (its descriptor says how it is audited).
    pub op: Op,
    /// The key as the caller named it, or the key id a blob names.
    pub key: Option<String>,
    /// The key version a blob names (decrypt, unwrap, re-encrypt input).
    pub version: Option<u32>,
    /// Plaintext bytes the request carries (encrypt, wrap).
    pub plaintext_in: usize,
}

impl Subject {
    /// Reads the subject off a request, before it is consumed, as the
    /// protocol's operation descriptors say ([`Request::op`],
    /// [`Request::target`]).
    pub fn of(req: &Request) -> Self {
        let (key, version) = req.target().key_and_version();
        Self {
            op: req.op(),
            key: key.map(|k| bounded(&k)),
            version,
            plaintext_in: req.plaintext_len(),
        }
    }
}

/// Most bytes of a caller's key text kept for logs, metrics and audit
/// lines; key names are at most 64 characters and ids 36, so only a
/// reference that matches no key is ever cut.
pub const MAX_KEY_TEXT: usize = 128;

/// `key` as logs and audit lines show it: control characters replaced by
/// `?` (escaped they would take six bytes each), cut to [`MAX_KEY_TEXT`]
/// bytes on a character boundary, with `…` and the full length when cut.
pub fn bounded(key: &str) -> String {
    let mut out = String::with_capacity(key.len().min(MAX_KEY_TEXT + 24));
    for c in key.chars() {
        if out.len() + c.len_utf8() > MAX_KEY_TEXT {
            out.push_str(&format!("…({} bytes)", key.len()));
            return out;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

/// One answered request.
#[derive(Debug)]
pub struct Observation<'a> {
    pub subject: &'a Subject,
    pub caller: &'a Caller,
    pub response: &'a Response,
    /// The key and version the key service sealed the answer's blobs
    /// under (encrypt, wrap, generate, re-encrypt and their batches).
    pub sealed_with: Option<(Uuid, u32)>,
    pub elapsed: Duration,
}

impl Observation<'_> {
    /// `ok`, or the error code (`not-found`, `decrypt-failed`, ...).
    pub fn outcome(&self) -> &'static str {
        match self.response {
            Response::Error(e) => e.code.as_str(),
            _ => "ok",
        }
    }

    /// The key id and version the answer names, where it names one: the
    /// key of a key-info answer and its active version, or the key and
    /// version its blobs were sealed under. Falls back to the request's
    /// subject.
    pub fn key_and_version(&self) -> (Option<String>, Option<u32>) {
        let answered = match self.response {
            Response::Key(k) => Some((k.id, k.active_version)),
            _ => self.sealed_with,
        };
        answered.map_or_else(
            || (self.subject.key.clone(), self.subject.version),
            |(id, version)| (Some(id.to_string()), Some(version)),
        )
    }
}

/// Something that wants to hear about every answered request.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Called once per answered request, on the request's thread.
    fn observe(&self, o: &Observation<'_>);
}

/// The observers of one daemon.
#[derive(Debug, Default, Clone)]
pub struct Observers(Vec<Arc<dyn Observer>>);

impl Observers {
    /// Adds an observer.
    pub fn push(&mut self, o: Arc<dyn Observer>) {
        self.0.push(o);
    }

    /// Whether nobody listens (then the server skips building observations).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reports one answered request to every observer.
    pub fn observe(&self, o: &Observation<'_>) {
        for obs in &self.0 {
            obs.observe(o);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bounded_key_text() {
        assert_eq!(super::bounded("app"), "app");
        assert_eq!(super::bounded("a\u{7}b"), "a?b");
        let long = "é".repeat(100);
        let b = super::bounded(&long);
        assert!(
            b.len() <= super::MAX_KEY_TEXT + 24 && b.ends_with("…(200 bytes)"),
            "{b}"
        );
    }

    use super::*;
    use kms_client::proto::{Context, ErrorCode, ErrorReply};

    #[test]
    fn subject_reads_keys_and_blob_versions() {
        let wrap = Request::Wrap {
            key: "app".into(),
            dek: vec![0; 32].into(),
            context: Context::new(),
        };
        let s = Subject::of(&wrap);
        assert_eq!((s.op, s.key.as_deref(), s.plaintext_in), (Op::Wrap, Some("app"), 32));
        let mut blob = kms_client::blob::BlobHeader {
            key_id: uuid::Uuid::nil(),
            version: 7,
            nonce: [0; 12],
        }
        .to_bytes()
        .to_vec();
        blob.extend_from_slice(&[0; 16]);
        let s = Subject::of(&Request::Unwrap {
            blob: blob.clone(),
            context: Context::new(),
        });
        assert_eq!(
            (s.key.clone(), s.version),
            (Some(uuid::Uuid::nil().to_string()), Some(7))
        );
        let caller = Caller::process(1, 1, Some(2));
        let err = Response::Error(ErrorReply::new(ErrorCode::DecryptFailed, "x"));
        let o = Observation {
            subject: &s,
            caller: &caller,
            response: &err,
            sealed_with: None,
            elapsed: Duration::ZERO,
        };
        assert_eq!(o.outcome(), "decrypt-failed");
        assert_eq!(o.key_and_version().1, Some(7));
        let ok = Response::Blob(blob);
        let o = Observation {
            subject: &s,
            caller: &caller,
            response: &ok,
            sealed_with: None,
            elapsed: Duration::ZERO,
        };
        assert_eq!(o.outcome(), "ok");
        // What the key service sealed under wins over the request's subject.
        let id = uuid::Uuid::new_v4();
        let sealed = Observation {
            sealed_with: Some((id, 3)),
            ..o
        };
        assert_eq!(sealed.key_and_version(), (Some(id.to_string()), Some(3)));
    }
}
