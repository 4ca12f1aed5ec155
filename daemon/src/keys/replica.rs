//! Multi-zone rules, as pure functions on a [`KeyRecord`]: what a primary
//! exports to its replicas ([`KeyExport`]), how a replica is created from an
//! export and how it takes later versions (in order, idempotently, never a
//! gap and never a version the primary does not have), and how a primary
//! tracks its replicas' confirmed versions.
//!
//! No I/O and no network here: the service persists the results and the
//! daemon's replication module moves exports between zones, sealed.

use kms_client::proto::{KeyKind, KeyRole, KeyState, Policy, ReplicaInfo, UnixTime};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{Error, Result};
use super::model::{KeyRecord, KeyVersion, RotationSchedule};

/// Everything a replica needs from its primary, material included. Only
/// ever serialised inside a sealed replication frame; `Debug` redacts the
/// material (through [`KeyVersion`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExport {
    pub id: Uuid,
    pub name: Option<String>,
    pub description: String,
    pub kind: KeyKind,
    pub primary_zone: String,
    pub created_at: UnixTime,
    pub policy: Policy,
    pub rotation: RotationSchedule,
    pub manual_rotations: u32,
    /// Every version, 1..=n in order.
    pub versions: Vec<KeyVersion>,
    /// Every zone holding a replica (for `key describe` on the replicas).
    pub replica_zones: Vec<String>,
    /// The primary's promotion epoch and change serial when exported: a
    /// replica takes only exports newer than the last it applied.
    pub epoch: u32,
    pub serial: u64,
}

impl KeyExport {
    /// The newest version carried.
    pub fn active_version(&self) -> u32 {
        self.versions.last().map_or(0, |v| v.version)
    }
}

/// Exports a primary (or single-zone) key, which lives in `key.zone`.
pub fn export(key: &KeyRecord) -> KeyExport {
    KeyExport {
        id: key.id,
        name: key.name.clone(),
        description: key.description.clone(),
        kind: key.kind,
        primary_zone: key.zone.clone(),
        created_at: key.created_at,
        policy: key.policy.clone(),
        rotation: key.rotation.clone(),
        manual_rotations: key.manual_rotations,
        versions: key.versions.clone(),
        replica_zones: key.replicas.iter().map(|r| r.zone.clone()).collect(),
        epoch: key.epoch,
        serial: key.serial,
    }
}

/// May `key` get a replica in `zone`? Adds `zone` as a replica not yet
/// confirmed and makes the key primary. Returns whether `zone` is new.
///
/// # Errors
/// `Forbidden` for the default organization key, `NotPrimary` for a
/// replica, `InvalidArgument` for the key's own zone.
pub fn add_replica(key: &mut KeyRecord, zone: &str) -> Result<bool> {
    if key.is_default() {
        return Err(Error::Forbidden(
            "the default organization key is platform-managed and exists in every zone: it cannot be replicated"
                .to_string(),
        ));
    }
    if let KeyRole::Replica { primary_zone } = &key.role {
        return Err(Error::NotPrimary {
            key: key.label(),
            primary_zone: primary_zone.clone(),
        });
    }
    if zone == key.zone {
        return Err(Error::InvalidArgument(format!(
            "key {} already lives in zone {zone}; replicate it to another zone",
            key.label()
        )));
    }
    key.role = KeyRole::Primary;
    if key.replicas.iter().any(|r| r.zone == zone) {
        return Ok(false);
    }
    key.replicas.push(ReplicaInfo {
        zone: zone.to_string(),
        confirmed_version: None,
    });
    Ok(true)
}

/// Undoes [`add_replica`] after the first push failed, unless the replica
/// confirmed something meanwhile. A key left without replicas is
/// single-zone again.
pub fn drop_unconfirmed_replica(key: &mut KeyRecord, zone: &str) {
    key.replicas.retain(|r| r.zone != zone || r.confirmed_version.is_some());
    if key.replicas.is_empty() && key.role == KeyRole::Primary {
        key.role = KeyRole::SingleZone;
    }
}

/// Records that the replica in `zone` holds `version` (one the key has).
/// Confirmations only move forward, so a late acknowledgement never hides
/// a newer one.
///
/// # Errors
/// `InvalidArgument` when `zone` is not a replica of `key` or `version`
/// is newer than the key's own.
pub fn confirm(key: &mut KeyRecord, zone: &str, version: u32) -> Result<()> {
    if key.version(version).is_none() {
        return Err(Error::InvalidArgument(format!(
            "zone {zone} confirmed version {version} of key {}, which has only {}",
            key.label(),
            key.active().version
        )));
    }
    let label = key.label();
    let r = key
        .replicas
        .iter_mut()
        .find(|r| r.zone == zone)
        .ok_or_else(|| Error::InvalidArgument(format!("zone {zone} holds no replica of key {label}")))?;
    r.confirmed_version = r.confirmed_version.max(Some(version));
    Ok(())
}

/// Replicas that have not confirmed the active version: (zone, confirmed).
pub fn behind(key: &KeyRecord) -> Vec<(String, Option<u32>)> {
    let active = key.active().version;
    key.replicas
        .iter()
        .filter(|r| r.confirmed_version.is_none_or(|v| v < active))
        .map(|r| (r.zone.clone(), r.confirmed_version))
        .collect()
}

/// Checks that an export's versions start at 1 and ascend (numbers jump
/// at each promotion epoch: see `model::EPOCH_SHIFT`).
fn check_versions(export: &KeyExport) -> Result<()> {
    // No epoch past the last, and no version numbered in an epoch later
    // than the export's own (see `model::EPOCH_SHIFT`).
    let in_range = export.epoch <= super::model::MAX_EPOCH
        && export
            .versions
            .iter()
            .all(|v| v.version >> super::model::EPOCH_SHIFT <= export.epoch);
    let ok = in_range
        && export.versions.first().is_some_and(|v| v.version == 1)
        && export.versions.windows(2).all(|w| w[0].version < w[1].version);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "the export of key {} does not hold ascending versions from 1",
            export.id
        )))
    }
}

/// A new replica in `zone` of the key `export`ed by its primary.
///
/// # Errors
/// `InvalidArgument` for a default-organization key or malformed versions.
pub fn new_replica(export: &KeyExport, zone: &str) -> Result<KeyRecord> {
    if export.kind != KeyKind::Customer {
        return Err(Error::InvalidArgument(
            "only customer keys can be replicated".to_string(),
        ));
    }
    check_versions(export)?;
    if let Some(name) = &export.name {
        super::model::validate_name(name)?;
    }
    super::model::validate_description(&export.description)?;
    Ok(KeyRecord {
        id: export.id,
        name: export.name.clone(),
        description: export.description.clone(),
        kind: export.kind,
        zone: zone.to_string(),
        role: KeyRole::Replica {
            primary_zone: export.primary_zone.clone(),
        },
        state: KeyState::Enabled,
        created_at: export.created_at,
        policy: export.policy.clone(),
        rotation: export.rotation.clone(),
        manual_rotations: export.manual_rotations,
        versions: export.versions.clone(),
        replicas: replica_list(export),
        serial: export.serial,
        epoch: export.epoch,
        deleted_at: None,
    })
}

fn replica_list(export: &KeyExport) -> Vec<ReplicaInfo> {
    export
        .replica_zones
        .iter()
        .map(|z| ReplicaInfo {
            zone: z.clone(),
            confirmed_version: None,
        })
        .collect()
}

/// Applies a later export from the primary to an existing replica: checks
/// that every version held here is identical in the export, takes the
/// versions that are new, and the primary's schedule, description and
/// replica list. Applying the same export twice changes nothing.
///
/// An export of a higher promotion epoch comes from a zone promoted since:
/// this zone follows it, even if it was the primary itself (it is demoted
/// to a replica). Versions held here that the export lacks are then kept
/// and returned, for the new primary to adopt: an old primary may have
/// rotated while cut off, and blobs made with those versions must keep
/// unwrapping. Their numbers cannot collide with the new primary's (see
/// `model::EPOCH_SHIFT`).
///
/// # Errors
/// `Stale` for an export older (by epoch, then serial) than the last one
/// applied: a replayed frame must not revert a description, a schedule or
/// a replica list. `InvalidArgument` when `key` is not a replica of the
/// export's primary (at the same epoch), the versions do not ascend from 1,
/// a version differs from the one held (a conflict that must not be papered
/// over), or, within one epoch, the export lacks versions held here.
pub fn apply(key: &mut KeyRecord, export: &KeyExport) -> Result<Vec<KeyVersion>> {
    let newer_epoch = export.epoch > key.epoch;
    let same_primary = matches!(&key.role, KeyRole::Replica { primary_zone } if *primary_zone == export.primary_zone);
    if key.id != export.id || !(same_primary || newer_epoch) {
        return Err(Error::InvalidArgument(format!(
            "key {} exists here and is not a replica of zone {}",
            key.label(),
            export.primary_zone
        )));
    }
    // A new primary must be a zone this one knows holds the key (one of
    // its replicas): a zone that never held it cannot take it over.
    if newer_epoch && !same_primary && !key.replicas.iter().any(|r| r.zone == export.primary_zone) {
        return Err(Error::InvalidArgument(format!(
            "zone {} claims key {} in a new epoch, but it is not one of the key's replica zones here",
            export.primary_zone,
            key.label()
        )));
    }
    check_versions(export)?;
    if (export.epoch, export.serial) < (key.epoch, key.serial) {
        return Err(Error::Stale {
            key: key.label(),
            got_epoch: export.epoch,
            got_serial: export.serial,
            held_epoch: key.epoch,
            held_serial: key.serial,
        });
    }
    let mut orphans = Vec::new();
    for held in &key.versions {
        match export.version_matches(held) {
            Some(true) => {}
            Some(false) => {
                return Err(Error::InvalidArgument(format!(
                    "version {} of key {} differs from the primary's; refusing the update",
                    held.version,
                    key.label()
                )))
            }
            None if newer_epoch => orphans.push(held.clone()),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "the export of key {} lacks version {} held here",
                    key.label(),
                    held.version
                )))
            }
        }
    }
    let mut versions = export.versions.clone();
    versions.extend(orphans.iter().cloned());
    versions.sort_by_key(|v| v.version);
    key.versions = versions;
    if newer_epoch {
        key.role = KeyRole::Replica {
            primary_zone: export.primary_zone.clone(),
        };
    }
    key.epoch = export.epoch;
    key.serial = export.serial;
    key.description.clone_from(&export.description);
    key.rotation = export.rotation.clone();
    key.manual_rotations = export.manual_rotations;
    key.replicas = replica_list(export);
    Ok(orphans)
}

/// `key promote` in a replica zone: this zone becomes the key's primary in
/// a new promotion epoch; the old primary and the other replicas become
/// its replicas (not yet confirmed). Like AWS's UpdatePrimaryRegion, for
/// when the primary zone is lost.
///
/// # Errors
/// `InvalidArgument` when the key is not a replica here, `LimitExceeded`
/// past the last epoch.
pub fn promote(key: &mut KeyRecord) -> Result<()> {
    let KeyRole::Replica { primary_zone } = key.role.clone() else {
        return Err(Error::InvalidArgument(format!(
            "key {} is not a replica in zone {}: only a replica can be promoted",
            key.label(),
            key.zone
        )));
    };
    if key.epoch >= super::model::MAX_EPOCH {
        return Err(Error::LimitExceeded {
            key: key.label(),
            limit: super::model::MAX_EPOCH,
        });
    }
    let mut zones: Vec<String> = key
        .replicas
        .iter()
        .map(|r| r.zone.clone())
        .filter(|z| *z != key.zone)
        .collect();
    if !zones.contains(&primary_zone) {
        zones.push(primary_zone);
    }
    key.replicas = zones
        .into_iter()
        .map(|zone| ReplicaInfo {
            zone,
            confirmed_version: None,
        })
        .collect();
    key.role = KeyRole::Primary;
    key.epoch += 1;
    Ok(())
}

/// On a primary: takes the versions a demoted old primary created while
/// cut off (see [`apply`]). Returns whether anything was added.
///
/// # Errors
/// `InvalidArgument` when one of them differs from a version held here.
pub fn adopt(key: &mut KeyRecord, orphans: &[KeyVersion]) -> Result<bool> {
    let mut added = false;
    // A former primary can only have made versions of an earlier epoch.
    let first_of_epoch = key.epoch << super::model::EPOCH_SHIFT;
    if let Some(v) = orphans.iter().find(|v| v.version == 0 || v.version > first_of_epoch) {
        return Err(Error::InvalidArgument(format!(
            "version {} of key {} sent back by a former primary is not of an earlier epoch",
            v.version,
            key.label()
        )));
    }
    for v in orphans {
        match key.version(v.version) {
            Some(held) if held == v => {}
            Some(_) => {
                return Err(Error::InvalidArgument(format!(
                    "version {} of key {} sent back by a former primary differs from the one held here",
                    v.version,
                    key.label()
                )))
            }
            None => {
                let at = key.versions.partition_point(|x| x.version < v.version);
                key.versions.insert(at, v.clone());
                added = true;
            }
        }
    }
    Ok(added)
}

impl KeyExport {
    /// `Some(true)` if the export holds `v` identically, `Some(false)` if it
    /// holds a different version with that number, `None` if it lacks it.
    fn version_matches(&self, v: &KeyVersion) -> Option<bool> {
        let i = self.versions.binary_search_by_key(&v.version, |x| x.version).ok()?;
        Some(self.versions[i] == *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::rotation;
    use kms_client::proto::ErrorCode;

    fn primary() -> KeyRecord {
        let mut k = KeyRecord::new(
            Uuid::new_v4(),
            KeyKind::Customer,
            "a",
            RotationSchedule::every(365, 0),
            0,
        );
        k.name = Some("app".into());
        k
    }

    fn replica_of(p: &KeyRecord) -> KeyRecord {
        new_replica(&export(p), "b").unwrap()
    }

    #[test]
    fn replica_has_same_id_history_and_role() {
        let mut p = primary();
        rotation::rotate_manual(&mut p, 10).unwrap();
        assert!(add_replica(&mut p, "b").unwrap());
        let r = replica_of(&p);
        assert_eq!((r.id, r.zone.as_str()), (p.id, "b"));
        assert_eq!(r.rotations(), p.rotations());
        assert_eq!(r.versions, p.versions);
        assert_eq!(r.manual_rotations, 1);
        assert_eq!(
            r.role,
            KeyRole::Replica {
                primary_zone: "a".into()
            }
        );
        assert_eq!(p.role, KeyRole::Primary);
    }

    #[test]
    fn apply_takes_new_versions_in_order_and_is_idempotent() {
        let mut p = primary();
        add_replica(&mut p, "b").unwrap();
        let mut r = replica_of(&p);
        // (The service bumps the serial on every change it stores.)
        rotation::rotate_manual(&mut p, 10).unwrap();
        p.serial = 1;
        let older = export(&p);
        rotation::rotate_manual(&mut p, 20).unwrap();
        p.serial = 2;
        let e = export(&p);
        apply(&mut r, &e).unwrap();
        assert_eq!(r.versions, p.versions);
        assert_eq!(r.serial, 2);
        let before = r.clone();
        apply(&mut r, &e).unwrap();
        assert_eq!(r, before);
        // An older export (a replay, or a crossed answer) is refused and
        // changes nothing.
        assert!(matches!(apply(&mut r, &older), Err(Error::Stale { .. })));
        assert_eq!(r, before);
        // The same versions with an older description: refused as well.
        p.description = "new".into();
        p.serial = 3;
        apply(&mut r, &export(&p)).unwrap();
        assert_eq!(r.description, "new");
        assert!(matches!(apply(&mut r, &e), Err(Error::Stale { .. })));
        assert_eq!(r.description, "new");
    }

    #[test]
    fn gaps_and_conflicts_are_refused() {
        let mut p = primary();
        let mut r = replica_of(&p);
        rotation::rotate_manual(&mut p, 10).unwrap();
        let mut gap = export(&p);
        gap.versions.remove(0);
        assert_eq!(apply(&mut r, &gap).unwrap_err().code(), ErrorCode::InvalidArgument);
        let mut other = primary();
        other.id = p.id;
        let conflict = export(&other);
        assert_eq!(apply(&mut r, &conflict).unwrap_err().code(), ErrorCode::InvalidArgument);
        assert_eq!(r.versions.len(), 1);
        let mut wrong_primary = export(&p);
        wrong_primary.primary_zone = "c".into();
        assert!(apply(&mut r, &wrong_primary).is_err());
    }

    #[test]
    fn only_a_replica_zone_may_take_a_key_over_in_a_new_epoch() {
        let mut p = primary();
        add_replica(&mut p, "b").unwrap();
        let mut r = replica_of(&p);
        // Zone c, which never held the key, exports it with a higher epoch.
        let mut e = export(&p);
        e.primary_zone = "c".into();
        e.epoch = 1;
        assert_eq!(apply(&mut p, &e).unwrap_err().code(), ErrorCode::InvalidArgument);
        assert_eq!(p.role, KeyRole::Primary);
        // Zone b, a replica, promoted: the primary follows it.
        promote(&mut r).unwrap();
        let from_b = export(&r);
        assert!(apply(&mut p, &from_b).unwrap().is_empty());
        assert_eq!(
            p.role,
            KeyRole::Replica {
                primary_zone: "b".into()
            }
        );
    }

    #[test]
    fn exports_out_of_the_epoch_fences_and_bad_names_are_refused() {
        let mut p = primary();
        add_replica(&mut p, "b").unwrap();
        let mut r = replica_of(&p);
        // An epoch past the last.
        let mut e = export(&p);
        e.epoch = crate::keys::model::MAX_EPOCH + 1;
        assert!(apply(&mut r, &e).is_err());
        // A version numbered in a later epoch than the export's own.
        let mut e = export(&p);
        let mut v = e.versions[0].clone();
        v.version = 1 << crate::keys::model::EPOCH_SHIFT;
        e.versions.push(v);
        assert!(apply(&mut r, &e).is_err());
        assert!(new_replica(&e, "c").is_err());
        // A name no key may have here.
        let mut e = export(&p);
        e.name = Some("bad\nname".into());
        assert!(new_replica(&e, "c").is_err());
        assert_eq!(r.versions, p.versions);
    }

    #[test]
    fn a_primary_adopts_only_versions_of_an_earlier_epoch() {
        let mut p = primary();
        add_replica(&mut p, "b").unwrap();
        let mut stray = p.versions[0].clone();
        stray.version = 5;
        // At epoch 0 there is no earlier epoch.
        assert!(adopt(&mut p, std::slice::from_ref(&stray)).is_err());
        p.epoch = 1;
        assert!(adopt(&mut p, std::slice::from_ref(&stray)).unwrap());
        stray.version = u32::MAX;
        assert!(adopt(&mut p, std::slice::from_ref(&stray)).is_err());
        assert_eq!(p.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 5]);
    }

    #[test]
    fn a_key_out_of_version_numbers_refuses_to_rotate_instead_of_panicking() {
        let mut p = primary();
        p.versions[0].version = u32::MAX;
        assert_eq!(
            rotation::rotate_manual(&mut p, 10).unwrap_err().code(),
            ErrorCode::LimitExceeded
        );
        p.versions[0].version = (1 << crate::keys::model::EPOCH_SHIFT) - 1;
        assert_eq!(
            rotation::rotate_manual(&mut p, 10).unwrap_err().code(),
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn who_may_be_replicated() {
        let mut d = primary();
        d.kind = KeyKind::DefaultOrganization;
        assert_eq!(add_replica(&mut d, "b").unwrap_err().code(), ErrorCode::Forbidden);
        let mut p = primary();
        assert_eq!(add_replica(&mut p, "a").unwrap_err().code(), ErrorCode::InvalidArgument);
        let mut r = replica_of(&p);
        assert_eq!(add_replica(&mut r, "c").unwrap_err().code(), ErrorCode::NotPrimary);
        assert!(add_replica(&mut p, "b").unwrap());
        assert!(!add_replica(&mut p, "b").unwrap());
    }

    #[test]
    fn confirmations_only_move_forward_and_pending_can_be_dropped() {
        let mut p = primary();
        add_replica(&mut p, "b").unwrap();
        add_replica(&mut p, "c").unwrap();
        rotation::rotate_manual(&mut p, 10).unwrap();
        confirm(&mut p, "b", 2).unwrap();
        confirm(&mut p, "b", 1).unwrap();
        assert_eq!(p.replicas[0].confirmed_version, Some(2));
        assert!(confirm(&mut p, "b", 3).is_err());
        assert!(confirm(&mut p, "x", 1).is_err());
        assert_eq!(behind(&p), vec![("c".to_string(), None)]);
        drop_unconfirmed_replica(&mut p, "c");
        drop_unconfirmed_replica(&mut p, "b");
        assert_eq!(p.replicas.len(), 1);
        assert_eq!(p.role, KeyRole::Primary);
    }
}
