//! What travels between zones and how it is protected: the [`Message`]s of
//! the replication protocol, sealed with AES-256-GCM under the shared
//! peering key into a [`ReplicationFrame`]. The additional data binds both
//! zone names (`"kmsd-replication-v1" || from || 0 || to`), so a frame
//! sealed for one pair of zones, or replayed in the other direction, does
//! not verify. Zone names cannot contain a NUL byte, so the binding is
//! unambiguous.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use kms_client::proto::ReplicationFrame;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::replica::KeyExport;
use crate::keys::store::{read_key_file, StoreError};

/// Domain separation for the additional data.
pub const AAD_PREFIX: &[u8] = b"kmsd-replication-v1";

/// The peering key shared by every zone's daemon. Never printed.
pub struct PeerKey(Aes256Gcm);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey([redacted])")
    }
}

impl PeerKey {
    /// A peering key from raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(bytes.into()))
    }

    /// Reads a peering key file: 32 raw bytes or 64 hex digits.
    ///
    /// # Errors
    /// `Io` if unreadable, `BadRootKey` if it has another shape.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::from_bytes(&*read_key_file(path)?))
    }
}

/// One replication message. Only ever seen sealed on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Primary to replica: the whole key; create it or take the new versions.
    Push(KeyExport),
    /// Replica to primary: the replica now durably holds `version`.
    Ack { key: Uuid, version: u32 },
    /// Replica to primary: send me the key.
    Pull { key: Uuid },
    /// Primary to replica: the answer to a `Pull`.
    Export(KeyExport),
}

/// Why a frame could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot encode the replication message")]
    Encode(#[source] postcard::Error),
    #[error("the frame does not verify under the peering key for zones {from} -> {to}")]
    Verify { from: String, to: String },
    #[error("the verified frame does not decode")]
    Decode(#[source] postcard::Error),
}

fn aad(from: &str, to: &str) -> Vec<u8> {
    [AAD_PREFIX, from.as_bytes(), &[0], to.as_bytes()].concat()
}

/// Seals `msg` from zone `from` to zone `to`.
///
/// # Errors
/// `Encode` if the message cannot be serialised.
pub fn seal(key: &PeerKey, from: &str, to: &str, msg: &Message) -> Result<ReplicationFrame, SealError> {
    let plain = Zeroizing::new(postcard::to_allocvec(msg).map_err(SealError::Encode)?);
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = aad(from, to);
    let sealed = key
        .0
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: &plain, aad: &aad })
        .expect("AES-GCM encryption of a small message cannot fail");
    Ok(ReplicationFrame {
        from_zone: from.to_string(),
        to_zone: to.to_string(),
        nonce,
        sealed,
    })
}

/// Opens a frame with the zones it claims.
///
/// # Errors
/// `Verify` for another peering key, altered bytes or other zones;
/// `Decode` for a message this build does not understand.
pub fn open(key: &PeerKey, frame: &ReplicationFrame) -> Result<Message, SealError> {
    let aad = aad(&frame.from_zone, &frame.to_zone);
    let payload = Payload {
        msg: &frame.sealed,
        aad: &aad,
    };
    let plain =
        Zeroizing::new(
            key.0
                .decrypt(Nonce::from_slice(&frame.nonce), payload)
                .map_err(|_| SealError::Verify {
                    from: frame.from_zone.clone(),
                    to: frame.to_zone.clone(),
                })?,
        );
    postcard::from_bytes(&plain).map_err(SealError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PeerKey {
        PeerKey::from_bytes(&[b; 32])
    }

    #[test]
    fn round_trip_and_binding() {
        let msg = Message::Pull { key: Uuid::new_v4() };
        let f = seal(&key(1), "a", "b", &msg).unwrap();
        assert_eq!(open(&key(1), &f).unwrap(), msg);
        assert!(matches!(open(&key(2), &f), Err(SealError::Verify { .. })));
        let mut swapped = f.clone();
        std::mem::swap(&mut swapped.from_zone, &mut swapped.to_zone);
        assert!(open(&key(1), &swapped).is_err());
        let mut moved = f.clone();
        moved.to_zone = "c".into();
        assert!(open(&key(1), &moved).is_err());
        let mut flipped = f;
        flipped.sealed[0] ^= 1;
        assert!(open(&key(1), &flipped).is_err());
    }

    #[test]
    fn material_is_not_visible_in_the_frame_or_debug() {
        use crate::keys::model::{KeyRecord, RotationSchedule};
        use kms_client::proto::KeyKind;
        let rec = KeyRecord::new(Uuid::new_v4(), KeyKind::Customer, "a", RotationSchedule::off(365), 0);
        let material = *rec.active().material.expose();
        let export = crate::keys::replica::export(&rec);
        assert!(format!("{export:?}").contains("redacted"));
        let f = seal(&key(1), "a", "b", &Message::Push(export)).unwrap();
        assert!(!f.sealed.windows(32).any(|w| w == material));
        assert!(!format!("{f:?}").contains(&format!("{:?}", &material[..4])));
    }
}
