//! Multi-zone replication as the key service sees it: a primary adds,
//! exports, confirms and releases its replicas; a replica zone accepts
//! exports, keeps tombstones and hands back the versions a demoted
//! primary made.

use std::sync::Arc;

use uuid::Uuid;

use crate::keys::error::{Error, Result};
use crate::keys::model::KeyVersion;
use crate::keys::policy::{Access, Caller};
use crate::keys::replica::{self, KeyExport};

use super::{name_taken, KeyEntry, KeyService, Keyring};

/// What a replica zone did with an export: the active version it now
/// holds, and the versions it held that the export lacks (only when it
/// follows a newly promoted primary: see [`replica::apply`]).
#[derive(Debug)]
pub struct Accepted {
    pub active: u32,
    pub orphans: Vec<KeyVersion>,
}

/// Most replicas one peer zone may create in this zone.
const MAX_REPLICAS_PER_ZONE: usize = 10_000;

impl KeyService {
    /// Starts replicating a key to `zone`: adds `zone` as an unconfirmed
    /// replica, makes the key primary, persists that, and returns the
    /// export to push and whether `zone` was new. The caller pushes it
    /// without holding any lock, then calls [`record_confirmed`] or
    /// [`cancel_replica`].
    ///
    /// [`record_confirmed`]: Self::record_confirmed
    /// [`cancel_replica`]: Self::cancel_replica
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied` (needs admin), and those of
    /// [`replica::add_replica`]; `Unavailable` if it cannot be stored.
    pub fn begin_replica(&self, caller: &Caller, key_ref: &str, zone: &str) -> Result<(KeyExport, bool)> {
        let ((id, added), _) = self.mutate(caller, key_ref, Access::Admin, |k, _| {
            Ok((k.id, replica::add_replica(k, zone)?))
        })?;
        // Exported from the record as stored, with the serial it was given
        // (a push of an older serial would be refused as stale).
        Ok((self.export_for_replica(id, zone)?, added))
    }

    /// Forgets a replica in `zone` that never confirmed (its first push
    /// failed).
    ///
    /// # Errors
    /// `NotFound`, `Unavailable`.
    pub fn cancel_replica(&self, id: Uuid, zone: &str) -> Result<()> {
        self.mutate_internal(id, |k, _| {
            replica::drop_unconfirmed_replica(k, zone);
            Ok(())
        })
    }

    /// On a primary: the replica in `zone` confirmed holding `version`.
    ///
    /// # Errors
    /// `NotFound`, `InvalidArgument` (see [`replica::confirm`]),
    /// `Unavailable`.
    pub fn record_confirmed(&self, id: Uuid, zone: &str, version: u32) -> Result<()> {
        self.mutate_internal(id, |k, _| replica::confirm(k, zone, version))
    }

    /// On a primary: the export for its replica in `zone`.
    ///
    /// # Errors
    /// `NotFound` when the key does not exist here or `zone` holds no
    /// replica of it.
    pub fn export_for_replica(&self, id: Uuid, zone: &str) -> Result<KeyExport> {
        let e = self.entry(&id.to_string())?;
        let r = &e.record;
        if r.role != kms_client::proto::KeyRole::Primary || !r.replicas.iter().any(|x| x.zone == zone) {
            return Err(Error::NotFound(format!(
                "{id} (as a primary with a replica in zone {zone})"
            )));
        }
        Ok(replica::export(r))
    }

    /// On a replica: creates the replica or applies the primary's newer
    /// versions, durably, and returns the active version now held.
    ///
    /// # Errors
    /// `InvalidArgument` when the export does not come from `from_zone`,
    /// names a key that is not its replica here, conflicts with the versions
    /// held, or takes a name already used here; `Unavailable`.
    pub fn accept_replica(&self, export: &KeyExport, from_zone: &str) -> Result<Accepted> {
        if export.primary_zone != from_zone || from_zone == self.zone {
            return Err(Error::InvalidArgument(format!(
                "zone {from_zone} sent key {} whose primary is in zone {}",
                export.id, export.primary_zone
            )));
        }
        let _writer = self.writer.lock();
        if let Some(t) = self.ring.load().tombstones.get(&export.id) {
            return Err(Error::Forbidden(format!(
                "key {} was deleted in zone {} at {}; its primary zone {} must stop replicating it here: \
                 kmsctl key unreplicate {} --zone {}",
                export.id, self.zone, t.deleted_at, t.primary_zone, export.id, self.zone
            )));
        }
        self.retrying(|| match self.entry(&export.id.to_string()) {
            Ok(current) => self.apply_replica(export, &current),
            Err(_) => self.create_replica(export),
        })
    }

    /// On a replica zone, when the primary in `from_zone` unreplicates key
    /// `id` from it: forgets the replica (the primary keeps every version)
    /// or its tombstone. Idempotent.
    ///
    /// # Errors
    /// `InvalidArgument` when the key here is not a replica of `from_zone`;
    /// `Unavailable`.
    pub fn release_replica(&self, id: Uuid, from_zone: &str) -> Result<()> {
        let _writer = self.writer.lock();
        let ring = self.ring.load_full();
        if let Some(t) = ring.tombstones.get(&id) {
            if t.primary_zone != from_zone {
                return Err(Error::InvalidArgument(format!(
                    "key {id} here was a replica of zone {}, not of zone {from_zone}",
                    t.primary_zone
                )));
            }
            self.store.delete(id, t.revision).map_err(Error::Unavailable)?;
            let mut ring = Keyring::clone(&ring);
            ring.tombstones.remove(&id);
            self.ring.store(Arc::new(ring));
            tracing::info!(key = %id, primary_zone = from_zone, "tombstone of a deleted replica released by its primary");
            return Ok(());
        }
        let Ok(current) = self.entry(&id.to_string()) else {
            return Ok(());
        };
        match &current.record.role {
            kms_client::proto::KeyRole::Replica { primary_zone } if primary_zone == from_zone => {
                self.store.delete(id, current.revision).map_err(Error::Unavailable)?;
                self.remove_from_ring(id);
                tracing::info!(key = %id, primary_zone = from_zone, "replica removed: its primary stopped replicating it here");
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "key {id} here is not a replica of zone {from_zone}"
            ))),
        }
    }

    /// On a primary: checks that the caller may administer the key and that
    /// `zone` holds a replica of it; returns the key id.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `NotPrimary`, `InvalidArgument`.
    pub fn begin_unreplicate(&self, caller: &Caller, key_ref: &str, zone: &str) -> Result<Uuid> {
        let e = self.authorize(caller, key_ref, Access::Admin)?;
        let r = &e.record;
        if let kms_client::proto::KeyRole::Replica { primary_zone } = &r.role {
            return Err(Error::NotPrimary {
                key: r.label(),
                primary_zone: primary_zone.clone(),
            });
        }
        if !r.replicas.iter().any(|x| x.zone == zone) {
            return Err(Error::InvalidArgument(format!(
                "key {} has no replica in zone {zone}",
                r.label()
            )));
        }
        Ok(r.id)
    }

    /// On a primary: forgets the replica in `zone` (after that zone let it
    /// go); a key left without replicas is single-zone again.
    ///
    /// # Errors
    /// `NotFound`, `Unavailable`.
    pub fn finish_unreplicate(&self, id: Uuid, zone: &str) -> Result<()> {
        self.mutate_internal(id, |k, _| {
            k.replicas.retain(|r| r.zone != zone);
            if k.replicas.is_empty() && k.role == kms_client::proto::KeyRole::Primary {
                k.role = kms_client::proto::KeyRole::SingleZone;
            }
            Ok(())
        })
    }

    fn apply_replica(&self, export: &KeyExport, current: &KeyEntry) -> Result<Accepted> {
        let mut rec = current.record.clone();
        let was_primary = !matches!(rec.role, kms_client::proto::KeyRole::Replica { .. });
        let orphans = replica::apply(&mut rec, export)?;
        let active = rec.active().version;
        if was_primary {
            tracing::warn!(key = %rec.id, new_primary_zone = %export.primary_zone, epoch = export.epoch, orphans = orphans.len(), "this zone is no longer the key's primary: demoted to a replica");
        }
        if rec != current.record {
            self.replace(rec, current)?;
        }
        Ok(Accepted { active, orphans })
    }

    /// On a primary: the versions a demoted former primary created while
    /// cut off (see [`replica::adopt`]).
    ///
    /// # Errors
    /// `NotFound`, `InvalidArgument` (a differing version), `Unavailable`.
    pub fn adopt_versions(&self, id: Uuid, orphans: &[KeyVersion]) -> Result<()> {
        self.mutate_internal(id, |k, _| replica::adopt(k, orphans).map(drop))
    }

    fn create_replica(&self, export: &KeyExport) -> Result<Accepted> {
        if let Some(name) = &export.name {
            if self.ring.load().by_name.contains_key(name) {
                return Err(Error::InvalidArgument(format!(
                    "zone {} cannot hold a replica of key {name:?}: another key has that name here",
                    self.zone
                )));
            }
        }
        let rec = replica::new_replica(export, &self.zone)?;
        // A peer zone may create replicas here, but not without bound.
        let from_zone = |e: &KeyEntry| matches!(&e.record.role, kms_client::proto::KeyRole::Replica { primary_zone } if *primary_zone == export.primary_zone);
        let held = self.ring.load().by_id.values().filter(|s| from_zone(&s.load())).count();
        if held >= MAX_REPLICAS_PER_ZONE {
            return Err(Error::ReplicaQuota {
                zone: export.primary_zone.clone(),
                limit: MAX_REPLICAS_PER_ZONE,
            });
        }
        let active = rec.active().version;
        let revision = self.store.put(&rec, None).map_err(name_taken)?;
        tracing::info!(key = %rec.id, primary_zone = %export.primary_zone, version = active, "replica created");
        self.insert(rec, revision);
        Ok(Accepted {
            active,
            orphans: Vec::new(),
        })
    }

    /// On a primary: every (key, replica zone, confirmed version) whose
    /// replica has not confirmed the active version.
    pub fn replicas_behind(&self) -> Vec<(Uuid, String, Option<u32>)> {
        self.records()
            .filter(|r| r.role == kms_client::proto::KeyRole::Primary)
            .flat_map(|r| {
                let id = r.id;
                replica::behind(&r).into_iter().map(move |(z, v)| (id, z, v))
            })
            .collect()
    }

    /// Every replica held here: (key, primary zone, active version).
    pub fn replicas_held(&self) -> Vec<(Uuid, String, u32)> {
        self.records()
            .filter_map(|r| match &r.role {
                kms_client::proto::KeyRole::Replica { primary_zone } => {
                    Some((r.id, primary_zone.clone(), r.active().version))
                }
                _ => None,
            })
            .collect()
    }
}
