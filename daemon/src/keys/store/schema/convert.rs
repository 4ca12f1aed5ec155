//! Explicit conversions between the schemas and the key service's record,
//! the only place where the store meets the model's (and so the wire's)
//! types. Every struct is destructured whole: a field added on either side
//! stops the build here until someone decides how it is stored.

use kms_client::proto::{KeyKind, KeyRole, KeyState, Origin, Policy, Principal, ReplicaInfo};

use super::{v1, v2, Secret};
use crate::keys::material::Material;
use crate::keys::model::{KeyRecord, KeyVersion, RotationSchedule};

// ---- schema 1 -> model (read only) -----------------------------------------

impl From<v1::KeyRecord> for KeyRecord {
    fn from(r: v1::KeyRecord) -> Self {
        let v1::KeyRecord {
            id,
            name,
            description,
            kind,
            zone,
            role,
            state,
            created_at,
            policy,
            rotation,
            manual_rotations,
            versions,
            replicas,
        } = r;
        let v1::Policy {
            users,
            admins,
            public_use,
        } = policy;
        let v1::RotationSchedule {
            enabled,
            period_days,
            next_at,
        } = rotation;
        KeyRecord {
            id,
            name,
            description,
            kind: match kind {
                v1::KeyKind::Customer => KeyKind::Customer,
                v1::KeyKind::DefaultOrganization => KeyKind::DefaultOrganization,
            },
            zone,
            role: match role {
                v1::KeyRole::SingleZone => KeyRole::SingleZone,
                v1::KeyRole::Primary => KeyRole::Primary,
                v1::KeyRole::Replica { primary_zone } => KeyRole::Replica { primary_zone },
            },
            state: match state {
                v1::KeyState::Enabled => KeyState::Enabled,
                v1::KeyState::Disabled => KeyState::Disabled,
                v1::KeyState::PendingDeletion { delete_at } => KeyState::PendingDeletion { delete_at },
            },
            created_at,
            policy: Policy {
                users: users.into_iter().map(principal_from_v1).collect(),
                admins: admins.into_iter().map(principal_from_v1).collect(),
                public_use,
            },
            rotation: RotationSchedule {
                enabled,
                period_days,
                next_at,
            },
            manual_rotations,
            versions: versions.into_iter().map(version_from_v1).collect(),
            replicas: replicas
                .into_iter()
                .map(
                    |v1::ReplicaInfo {
                         zone,
                         confirmed_version,
                     }| ReplicaInfo {
                        zone,
                        confirmed_version,
                    },
                )
                .collect(),
            // Schema 1 had no serials, epochs or tombstones: every key
            // starts at serial 0 of epoch 0, alive.
            serial: 0,
            epoch: 0,
            deleted_at: None,
        }
    }
}

fn principal_from_v1(p: v1::Principal) -> Principal {
    match p {
        v1::Principal::Uid(u) => Principal::Uid(u),
        v1::Principal::Gid(g) => Principal::Gid(g),
    }
}

fn version_from_v1(v: v1::KeyVersion) -> KeyVersion {
    KeyVersion {
        version: v.version,
        created_at: v.created_at,
        origin: match v.origin {
            v1::Origin::Initial => Origin::Initial,
            v1::Origin::Automatic => Origin::Automatic,
            v1::Origin::Manual => Origin::Manual,
            v1::Origin::Replicated => Origin::Replicated,
        },
        material: material_from(&v.material),
    }
}

fn material_from(s: &Secret) -> Material {
    Material::from_bytes(s.0)
}

// ---- schema 2 <-> model ----------------------------------------------------------

impl From<v2::KeyRecord> for KeyRecord {
    fn from(r: v2::KeyRecord) -> Self {
        let v2::KeyRecord {
            id,
            name,
            description,
            kind,
            zone,
            role,
            state,
            created_at,
            policy,
            rotation,
            manual_rotations,
            versions,
            replicas,
            serial,
            epoch,
            deleted_at,
        } = r;
        let v2::Policy {
            users,
            admins,
            public_use,
        } = policy;
        let v2::RotationSchedule {
            enabled,
            period_days,
            next_at,
        } = rotation;
        KeyRecord {
            id,
            name,
            description,
            kind: match kind {
                v2::KeyKind::Customer => KeyKind::Customer,
                v2::KeyKind::DefaultOrganization => KeyKind::DefaultOrganization,
            },
            zone,
            role: match role {
                v2::KeyRole::SingleZone => KeyRole::SingleZone,
                v2::KeyRole::Primary => KeyRole::Primary,
                v2::KeyRole::Replica { primary_zone } => KeyRole::Replica { primary_zone },
            },
            state: match state {
                v2::KeyState::Enabled => KeyState::Enabled,
                v2::KeyState::Disabled => KeyState::Disabled,
                v2::KeyState::PendingDeletion { delete_at } => KeyState::PendingDeletion { delete_at },
            },
            created_at,
            policy: Policy {
                users: users.into_iter().map(principal_from_v2).collect(),
                admins: admins.into_iter().map(principal_from_v2).collect(),
                public_use,
            },
            rotation: RotationSchedule {
                enabled,
                period_days,
                next_at,
            },
            manual_rotations,
            versions: versions.into_iter().map(version_from_v2).collect(),
            replicas: replicas
                .into_iter()
                .map(
                    |v2::ReplicaInfo {
                         zone,
                         confirmed_version,
                     }| ReplicaInfo {
                        zone,
                        confirmed_version,
                    },
                )
                .collect(),
            serial,
            epoch,
            deleted_at,
        }
    }
}

fn principal_from_v2(p: v2::Principal) -> Principal {
    match p {
        v2::Principal::Uid(u) => Principal::Uid(u),
        v2::Principal::Gid(g) => Principal::Gid(g),
    }
}

fn version_from_v2(v: v2::KeyVersion) -> KeyVersion {
    KeyVersion {
        version: v.version,
        created_at: v.created_at,
        origin: match v.origin {
            v2::Origin::Initial => Origin::Initial,
            v2::Origin::Automatic => Origin::Automatic,
            v2::Origin::Manual => Origin::Manual,
            v2::Origin::Replicated => Origin::Replicated,
        },
        material: material_from(&v.material),
    }
}

impl From<&KeyRecord> for v2::KeyRecord {
    fn from(r: &KeyRecord) -> Self {
        let KeyRecord {
            id,
            name,
            description,
            kind,
            zone,
            role,
            state,
            created_at,
            policy,
            rotation,
            manual_rotations,
            versions,
            replicas,
            serial,
            epoch,
            deleted_at,
        } = r;
        let Policy {
            users,
            admins,
            public_use,
        } = policy;
        let RotationSchedule {
            enabled,
            period_days,
            next_at,
        } = rotation;
        v2::KeyRecord {
            id: *id,
            name: name.clone(),
            description: description.clone(),
            kind: match kind {
                KeyKind::Customer => v2::KeyKind::Customer,
                KeyKind::DefaultOrganization => v2::KeyKind::DefaultOrganization,
            },
            zone: zone.clone(),
            role: match role {
                KeyRole::SingleZone => v2::KeyRole::SingleZone,
                KeyRole::Primary => v2::KeyRole::Primary,
                KeyRole::Replica { primary_zone } => v2::KeyRole::Replica {
                    primary_zone: primary_zone.clone(),
                },
            },
            state: match *state {
                KeyState::Enabled => v2::KeyState::Enabled,
                KeyState::Disabled => v2::KeyState::Disabled,
                KeyState::PendingDeletion { delete_at } => v2::KeyState::PendingDeletion { delete_at },
            },
            created_at: *created_at,
            policy: v2::Policy {
                users: users.iter().map(principal_to_v2).collect(),
                admins: admins.iter().map(principal_to_v2).collect(),
                public_use: *public_use,
            },
            rotation: v2::RotationSchedule {
                enabled: *enabled,
                period_days: *period_days,
                next_at: *next_at,
            },
            manual_rotations: *manual_rotations,
            versions: versions.iter().map(version_to_v2).collect(),
            replicas: replicas
                .iter()
                .map(
                    |ReplicaInfo {
                         zone,
                         confirmed_version,
                     }| v2::ReplicaInfo {
                        zone: zone.clone(),
                        confirmed_version: *confirmed_version,
                    },
                )
                .collect(),
            serial: *serial,
            epoch: *epoch,
            deleted_at: *deleted_at,
        }
    }
}

fn principal_to_v2(p: &Principal) -> v2::Principal {
    match *p {
        Principal::Uid(u) => v2::Principal::Uid(u),
        Principal::Gid(g) => v2::Principal::Gid(g),
    }
}

fn version_to_v2(v: &KeyVersion) -> v2::KeyVersion {
    let KeyVersion {
        version,
        created_at,
        origin,
        material,
    } = v;
    v2::KeyVersion {
        version: *version,
        created_at: *created_at,
        origin: match origin {
            Origin::Initial => v2::Origin::Initial,
            Origin::Automatic => v2::Origin::Automatic,
            Origin::Manual => v2::Origin::Manual,
            Origin::Replicated => v2::Origin::Replicated,
        },
        material: Secret(*material.expose()),
    }
}
