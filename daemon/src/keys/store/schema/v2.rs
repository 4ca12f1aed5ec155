//! Schema 2, the current one: the key record in the store's own types,
//! and the body of a key file, which carries the record's revision.
//!
//! Postcard is not self-describing: the order of fields and variants and
//! every type below *are* the format. Once released these types never
//! change; a change is schema 3, with a conversion from this one (see
//! `super`). A key file of this schema starts with [`KEY_MAGIC`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Secret;

/// First bytes of a schema-2 key file.
pub const KEY_MAGIC: &[u8; 8] = b"KMSDKEY2";

/// What a key file seals: the record and the revision the store gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileBody {
    pub revision: u64,
    pub record: KeyRecord,
}

/// Everything kmsd keeps about a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: Uuid,
    pub name: Option<String>,
    pub description: String,
    pub kind: KeyKind,
    pub zone: String,
    pub role: KeyRole,
    pub state: KeyState,
    pub created_at: u64,
    pub policy: Policy,
    pub rotation: RotationSchedule,
    pub manual_rotations: u32,
    pub versions: Vec<KeyVersion>,
    pub replicas: Vec<ReplicaInfo>,
    pub serial: u64,
    pub epoch: u32,
    pub deleted_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    Customer,
    DefaultOrganization,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyRole {
    SingleZone,
    Primary,
    Replica { primary_zone: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion { delete_at: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub users: Vec<Principal>,
    pub admins: Vec<Principal>,
    pub public_use: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Principal {
    Uid(u32),
    Gid(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationSchedule {
    pub enabled: bool,
    pub period_days: u32,
    pub next_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: u32,
    pub created_at: u64,
    pub origin: Origin,
    pub material: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    Initial,
    Automatic,
    Manual,
    Replicated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub zone: String,
    pub confirmed_version: Option<u32>,
}
