//! Schema 1, frozen: the key record exactly as kmsd wrote it before the
//! store had a schema of its own, when the file held the postcard of the
//! service's `KeyRecord` with the wire types of that release inside.
//!
//! Postcard is not self-describing: the order of fields and variants and
//! every type below *are* the format. Never edit them; schema 1 is only
//! read, by the migration to the current schema. A key file of this schema
//! starts with [`KEY_MAGIC`]; its store's meta file with [`META_MAGIC`]
//! and holds [`META_CHECK`], sealed, and no schema number.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Secret;

/// First bytes of a schema-1 key file.
pub const KEY_MAGIC: &[u8; 8] = b"KMSDKEY1";
/// First bytes of a schema-1 `store.meta`.
pub const META_MAGIC: &[u8; 8] = b"KMSDMET1";
/// The sealed content of a schema-1 `store.meta`.
pub const META_CHECK: &[u8] = b"kmsd root key check v1";

/// Everything kmsd kept about a key.
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
