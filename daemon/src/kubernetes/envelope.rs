//! What the KMS v2 plugin adds around a kmsd blob, free of I/O: the size
//! limits, the encryption context every ciphertext is bound to, the
//! `key_id` naming a key version, the annotations, and the checks a
//! `Decrypt` request passes before its ciphertext is opened.

use std::collections::HashMap;

use kms_client::blob::{BlobHeader, HEADER_LEN, TAG_LEN};
use kms_client::proto::Context;
use uuid::Uuid;

/// The plugin API version `Status` reports; kube-apiserver checks it
/// against its provider's `apiVersion`.
pub const API_VERSION: &str = "v2";
/// `healthz` of a healthy plugin.
pub const HEALTHY: &str = "ok";
/// Largest plaintext `Encrypt` takes. kube-apiserver sends a 32-byte DEK
/// seed; this leaves room and keeps the ciphertext within
/// [`MAX_CIPHERTEXT`].
pub const MAX_PLAINTEXT: usize = 512;
/// Largest ciphertext kube-apiserver accepts from a plugin (and so the
/// largest `Decrypt` takes).
pub const MAX_CIPHERTEXT: usize = 1024;
/// Largest `key_id` kube-apiserver accepts.
pub const MAX_KEY_ID: usize = 1024;
/// Annotation keys and values together stay below this (kube-apiserver's
/// limit for what `Encrypt` returns; also what `Decrypt` takes back).
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// Largest gRPC message decoded: a `Decrypt` at every limit above fits.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Annotation holding the key version a ciphertext was sealed under.
pub const VERSION_ANNOTATION: &str = "version.kmsd.io";
/// Annotation holding the id of the key.
pub const KEY_ANNOTATION: &str = "key.kmsd.io";
/// The encryption context (additional data) of every ciphertext made for
/// Kubernetes: a blob wrapped for another purpose is refused here, and one
/// made here does not open without this context elsewhere.
pub const CONTEXT_KEY: &str = "kmsd.io/purpose";
/// Its value.
pub const CONTEXT_VALUE: &str = "kubernetes-kms-v2";

const _: () = assert!(HEADER_LEN + MAX_PLAINTEXT + TAG_LEN <= MAX_CIPHERTEXT);

/// The context of every Kubernetes ciphertext.
pub fn context() -> Context {
    Context::from([(CONTEXT_KEY.to_string(), CONTEXT_VALUE.to_string())])
}

/// A version of a key: what a `key_id` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyVersion {
    pub key: Uuid,
    pub version: u32,
}

impl KeyVersion {
    /// `kmsd:<key id>:<version>`. Key ids are random and a key's version
    /// numbers are never given twice (a rotation adds the next, and each
    /// promotion epoch numbers from its own range), so a `key_id` never
    /// names two different materials, and it changes on every rotation.
    pub fn key_id(&self) -> String {
        format!("kmsd:{}:{}", self.key, self.version)
    }

    /// The annotations `Encrypt` returns: the key and the version, also
    /// readable in the blob's header, stored beside it by kube-apiserver
    /// for whoever inspects etcd.
    pub fn annotations(&self) -> HashMap<String, Vec<u8>> {
        HashMap::from([
            (KEY_ANNOTATION.to_string(), self.key.to_string().into_bytes()),
            (VERSION_ANNOTATION.to_string(), self.version.to_string().into_bytes()),
        ])
    }
}

/// Why a request was refused before reaching the key service.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{what} of {len} bytes is outside {min}..={max}")]
    Size {
        what: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("ciphertext is not a kmsd ciphertext")]
    NotABlob,
    #[error("ciphertext was made under key {found}, not this plugin's key")]
    OtherKey { found: Uuid },
    #[error("key_id does not match the ciphertext (it was made under {expected:?})")]
    KeyIdMismatch { expected: String },
    #[error("annotation {name} does not match the ciphertext")]
    AnnotationMismatch { name: &'static str },
}

fn within(what: &'static str, len: usize, min: usize, max: usize) -> Result<(), Refusal> {
    if (min..=max).contains(&len) {
        Ok(())
    } else {
        Err(Refusal::Size { what, len, min, max })
    }
}

/// Checks an `Encrypt` plaintext's size.
///
/// # Errors
/// `Size` for an empty or oversized plaintext.
pub fn check_plaintext(plaintext: &[u8]) -> Result<(), Refusal> {
    within("plaintext", plaintext.len(), 1, MAX_PLAINTEXT)
}

/// Size of annotations as kube-apiserver counts them: keys plus values.
pub fn annotations_size(annotations: &HashMap<String, Vec<u8>>) -> usize {
    annotations.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Checks a `Decrypt` request against the ciphertext it carries, before
/// anything is opened: the sizes, that it is a blob of `key` (this
/// plugin's key), and that the `key_id` and the kmsd annotations it came
/// back with (when present) name the version in the blob's header. Other
/// annotations are not kmsd's and are ignored. The blob's authentication
/// tag covers its header, so a key_id or annotation altered in etcd is
/// caught here and an altered blob when it is opened.
///
/// # Errors
/// The first [`Refusal`] found.
pub fn check_decrypt(
    key: Uuid,
    ciphertext: &[u8],
    key_id: &str,
    annotations: &HashMap<String, Vec<u8>>,
) -> Result<KeyVersion, Refusal> {
    within("ciphertext", ciphertext.len(), 1, MAX_CIPHERTEXT)?;
    within("key_id", key_id.len(), 0, MAX_KEY_ID)?;
    within("annotations", annotations_size(annotations), 0, MAX_ANNOTATIONS - 1)?;
    let header = BlobHeader::parse(ciphertext).map_err(|_| Refusal::NotABlob)?;
    if header.key_id != key {
        return Err(Refusal::OtherKey { found: header.key_id });
    }
    let made = KeyVersion {
        key: header.key_id,
        version: header.version,
    };
    if !key_id.is_empty() && key_id != made.key_id() {
        return Err(Refusal::KeyIdMismatch {
            expected: made.key_id(),
        });
    }
    let expected = [
        (KEY_ANNOTATION, made.key.to_string()),
        (VERSION_ANNOTATION, made.version.to_string()),
    ];
    for (name, value) in expected {
        if annotations.get(name).is_some_and(|given| given != value.as_bytes()) {
            return Err(Refusal::AnnotationMismatch { name });
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(key: Uuid, version: u32, plaintext_len: usize) -> Vec<u8> {
        let mut b = BlobHeader {
            key_id: key,
            version,
            nonce: [7; 12],
        }
        .to_bytes()
        .to_vec();
        b.resize(HEADER_LEN + plaintext_len + TAG_LEN, 0);
        b
    }

    #[test]
    fn key_ids_name_key_and_version() {
        let key = Uuid::new_v4();
        let v1 = KeyVersion { key, version: 1 };
        let v2 = KeyVersion { key, version: 2 };
        assert_ne!(v1.key_id(), v2.key_id());
        assert_eq!(v2.key_id(), format!("kmsd:{key}:2"));
        assert!(v2.key_id().len() <= MAX_KEY_ID);
    }

    #[test]
    fn annotations_are_fully_qualified_and_small() {
        let a = KeyVersion {
            key: Uuid::new_v4(),
            version: u32::MAX,
        }
        .annotations();
        for k in a.keys() {
            let labels: Vec<&str> = k.split('.').collect();
            assert!(labels.len() >= 3, "{k} is not fully qualified");
            assert!(labels.iter().all(|l| !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')));
        }
        assert!(annotations_size(&a) < MAX_ANNOTATIONS);
    }

    #[test]
    fn plaintext_limits() {
        assert!(check_plaintext(&[0; 32]).is_ok());
        assert!(check_plaintext(&[0; MAX_PLAINTEXT]).is_ok());
        assert!(matches!(check_plaintext(&[]), Err(Refusal::Size { .. })));
        assert!(matches!(
            check_plaintext(&[0; MAX_PLAINTEXT + 1]),
            Err(Refusal::Size { .. })
        ));
    }

    #[test]
    fn decrypt_checks_size_key_key_id_and_annotations() {
        let key = Uuid::new_v4();
        let b = blob(key, 3, 32);
        let made = KeyVersion { key, version: 3 };
        let none = HashMap::new();
        assert_eq!(check_decrypt(key, &b, &made.key_id(), &made.annotations()), Ok(made));
        assert_eq!(check_decrypt(key, &b, "", &none), Ok(made));
        let err = check_decrypt(key, &b, &KeyVersion { key, version: 2 }.key_id(), &none);
        assert!(matches!(err, Err(Refusal::KeyIdMismatch { .. })), "{err:?}");
        let mut a = made.annotations();
        a.insert(VERSION_ANNOTATION.into(), b"2".to_vec());
        assert_eq!(
            check_decrypt(key, &b, "", &a),
            Err(Refusal::AnnotationMismatch {
                name: VERSION_ANNOTATION
            })
        );
        let other = Uuid::new_v4();
        assert_eq!(
            check_decrypt(other, &b, "", &none),
            Err(Refusal::OtherKey { found: key })
        );
        assert_eq!(check_decrypt(key, &b[..10], "", &none), Err(Refusal::NotABlob));
        assert!(matches!(
            check_decrypt(key, &blob(key, 3, MAX_CIPHERTEXT), "", &none),
            Err(Refusal::Size { what: "ciphertext", .. })
        ));
        assert!(matches!(
            check_decrypt(key, &b, &"k".repeat(MAX_KEY_ID + 1), &none),
            Err(Refusal::Size { what: "key_id", .. })
        ));
        let big = HashMap::from([("x.example.com".to_string(), vec![0; MAX_ANNOTATIONS])]);
        assert!(matches!(
            check_decrypt(key, &b, "", &big),
            Err(Refusal::Size {
                what: "annotations",
                ..
            })
        ));
        // Annotations that are not kmsd's are left alone.
        let foreign = HashMap::from([("note.example.com".to_string(), b"x".to_vec())]);
        assert_eq!(check_decrypt(key, &b, "", &foreign), Ok(made));
    }
}
