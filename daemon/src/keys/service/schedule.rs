//! Scheduled work: automatic rotations and deletions whose time has come.

use std::sync::Arc;

use kms_client::proto::UnixTime;
use uuid::Uuid;

use crate::keys::error::{Error, Result};
use crate::keys::lifecycle;
use crate::keys::model::KeyRecord;
use crate::keys::rotation;

use super::{KeyService, Keyring, Tombstone};

/// What one pass of [`KeyService::run_due`] did.
#[derive(Debug, Default)]
pub struct DueReport {
    /// (key, new version) for each automatic rotation.
    pub rotated: Vec<(Uuid, u32)>,
    /// Keys deleted because their waiting period ended.
    pub deleted: Vec<Uuid>,
    /// Due work that failed (e.g. disk full); retried on the next pass.
    pub failed: Vec<(Uuid, Error)>,
}

impl KeyService {
    /// The earliest time at which [`run_due`](Self::run_due) has work.
    pub fn next_due(&self) -> Option<UnixTime> {
        let ring = self.ring.load();
        ring.by_id
            .values()
            .filter_map(|slot| {
                let e = slot.load();
                let r = &e.record;
                let rotation = (rotation::rotation_due(r, UnixTime::MAX))
                    .then_some(r.rotation.next_at)
                    .flatten();
                let deletion = match r.state {
                    kms_client::proto::KeyState::PendingDeletion { delete_at } => Some(delete_at),
                    _ => None,
                };
                rotation.into_iter().chain(deletion).min()
            })
            .min()
    }

    /// Performs every automatic rotation and deletion due at `now`: one
    /// rotation per key however many periods were missed.
    pub fn run_due(&self, now: UnixTime) -> DueReport {
        self.run_due_while(now, || true)
    }

    /// As [`run_due`](Self::run_due), checking `go_on()` before each key
    /// and stopping when it is false (this daemon no longer leads).
    ///
    /// Safe against another daemon doing the same at once: each key's
    /// work is decided on the record it is written over, and a write over
    /// a record another daemon changed first is refused by the store; the
    /// key is then read again and its due work decided anew, so a due
    /// rotation happens once.
    pub fn run_due_while(&self, now: UnixTime, go_on: impl Fn() -> bool) -> DueReport {
        let mut report = DueReport::default();
        let ids: Vec<Uuid> = self.ring.load().by_id.keys().copied().collect();
        for id in ids.into_iter().take_while(|_| go_on()) {
            if let Err(e) = self.run_due_key(id, now, &mut report) {
                tracing::error!(key = %id, error = %crate::keys::error::error_chain(&e), "scheduled work failed; will retry");
                report.failed.push((id, e));
            }
        }
        report
    }

    fn run_due_key(&self, id: Uuid, now: UnixTime, report: &mut DueReport) -> Result<()> {
        let _writer = self.writer.lock();
        self.retrying(|| self.run_due_once(id, now, report))
    }

    fn run_due_once(&self, id: Uuid, now: UnixTime, report: &mut DueReport) -> Result<()> {
        let Ok(current) = self.entry(&id.to_string()) else {
            return Ok(());
        };
        if lifecycle::deletion_due(&current.record, now) {
            if let kms_client::proto::KeyRole::Replica { primary_zone } = &current.record.role {
                // Material gone, but the zone remembers, so the primary's
                // next push does not bring the replica back.
                let tomb = KeyRecord {
                    name: None,
                    description: String::new(),
                    versions: Vec::new(),
                    replicas: Vec::new(),
                    deleted_at: Some(now),
                    ..current.record.clone()
                };
                let revision = self
                    .store
                    .put(&tomb, Some(current.revision))
                    .map_err(Error::Unavailable)?;
                let t = Tombstone {
                    primary_zone: primary_zone.clone(),
                    deleted_at: now,
                    revision,
                };
                self.remove_from_ring(id);
                let mut ring = Keyring::clone(&self.ring.load());
                ring.tombstones.insert(id, t);
                self.ring.store(Arc::new(ring));
            } else {
                self.store.delete(id, current.revision).map_err(Error::Unavailable)?;
                self.remove_from_ring(id);
            }
            tracing::info!(key = %id, "key deleted after its waiting period");
            report.deleted.push(id);
            return Ok(());
        }
        let mut rec = current.record.clone();
        if let Some(v) = rotation::rotate_automatic(&mut rec, now) {
            self.replace(rec, &current)?;
            tracing::info!(key = %id, version = v, "automatic rotation");
            report.rotated.push((id, v));
        }
        Ok(())
    }
}
