//! What travels between zones: the [`Message`]s of the replication
//! protocol, encoded with postcard into a [`ReplicationFrame`].
//!
//! A frame is not sealed by us: it only ever travels inside an
//! authenticated channel, mutual TLS between hosts or a Unix socket on one
//! host, and that channel names the sending zone (see `ARCHITECTURE.md`,
//! "Zones"). The frame's `from_zone` is a claim that must equal it.

use kms_client::proto::ReplicationFrame;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::model::KeyVersion;
use crate::keys::replica::KeyExport;

/// One replication message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Primary to replica: the whole key; create it or take the new versions.
    Push(KeyExport),
    /// Replica to primary: the replica now durably holds `version`; a
    /// former primary that was just demoted also sends back the versions
    /// it created while cut off, for the new primary to adopt.
    Ack {
        key: Uuid,
        version: u32,
        orphans: Vec<KeyVersion>,
    },
    /// Replica to primary: send me the key.
    Pull { key: Uuid },
    /// Primary to replica: the answer to a `Pull`.
    Export(KeyExport),
    /// Primary to replica: the key is no longer replicated to you; forget
    /// your replica (or its tombstone).
    Release { key: Uuid },
    /// Replica to primary: the answer to a `Release`.
    Released { key: Uuid },
}

/// Why a frame could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("cannot encode the replication message")]
    Encode(#[source] postcard::Error),
    #[error("the replication message does not decode")]
    Decode(#[source] postcard::Error),
}

/// The frame carrying `msg` from zone `from` to zone `to`.
///
/// # Errors
/// `Encode` if the message cannot be serialised.
pub fn frame(from: &str, to: &str, msg: &Message) -> Result<ReplicationFrame, MessageError> {
    Ok(ReplicationFrame {
        from_zone: from.to_string(),
        to_zone: to.to_string(),
        message: postcard::to_allocvec(msg).map_err(MessageError::Encode)?,
    })
}

/// The message a frame carries. Its zones are the caller's to check.
///
/// # Errors
/// `Decode` for bytes this build does not understand.
pub fn read(frame: &ReplicationFrame) -> Result<Message, MessageError> {
    postcard::from_bytes(&frame.message).map_err(MessageError::Decode)
}

/// Clears a frame's message bytes (they may hold key material) once read.
pub fn wipe(frame: ReplicationFrame) {
    drop(Zeroizing::new(frame.message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage_is_an_error() {
        let msg = Message::Pull { key: Uuid::new_v4() };
        let f = frame("a", "b", &msg).unwrap();
        assert_eq!((f.from_zone.as_str(), f.to_zone.as_str()), ("a", "b"));
        assert_eq!(read(&f).unwrap(), msg);
        let mut bad = f;
        bad.message = vec![0xff; 9];
        assert!(matches!(read(&bad), Err(MessageError::Decode(_))));
    }

    #[test]
    fn material_is_not_visible_in_debug() {
        use crate::keys::model::{KeyRecord, RotationSchedule};
        use kms_client::proto::KeyKind;
        let rec = KeyRecord::new(Uuid::new_v4(), KeyKind::Customer, "a", RotationSchedule::off(365), 0);
        let material = *rec.active().material.expose();
        let export = crate::keys::replica::export(&rec);
        assert!(format!("{export:?}").contains("redacted"));
        let f = frame("a", "b", &Message::Push(export)).unwrap();
        assert!(!format!("{f:?}").contains(&format!("{:?}", &material[..4])));
    }
}
