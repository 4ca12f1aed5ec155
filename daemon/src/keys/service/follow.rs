//! The changes other writers make to the store (the daemons of an etcd
//! fleet), applied to the keyring.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::keys::store::{Change, Revision, Stored};

use super::{KeyEntry, KeyService, Keyring};

impl KeyService {
    /// Applies the changes other writers make to the store (the daemons of
    /// an etcd fleet) to the keyring, until `shutdown` or the end of the
    /// stream. The stream is opened at the call, so nothing changed after
    /// it is missed; with the file store it never yields.
    pub fn follow(self: Arc<Self>, shutdown: CancellationToken) -> impl std::future::Future<Output = ()> + Send {
        let mut changes = self.store.changes();
        async move {
            loop {
                let change = tokio::select! {
                    c = changes.next() => match c {
                        Some(c) => c,
                        None => return,
                    },
                    () = shutdown.cancelled() => return,
                };
                // The writer lock may be held across a store write.
                let svc = self.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || svc.apply_change(change)).await {
                    tracing::error!(error = %e, "applying a change from the store panicked");
                }
            }
        }
    }

    /// Applies one change made by another writer of the store.
    pub fn apply_change(&self, change: Change) {
        let _writer = self.writer.lock();
        match change {
            Change::Put(stored) => self.adopt(*stored),
            Change::Deleted { id, revision } => self.forget(id, Some(revision)),
            Change::Reloaded { at, records } => {
                let held: Vec<(Uuid, Revision)> = (self.ring.load().by_id.iter())
                    .map(|(id, slot)| (*id, slot.load().revision))
                    .collect();
                for (id, revision) in held {
                    if revision <= at && !records.iter().any(|s| s.record.id == id) {
                        self.forget(id, Some(revision));
                    }
                }
                for stored in records {
                    self.adopt(stored);
                }
            }
        }
    }

    /// Takes `stored` into the keyring unless the keyring holds that key at
    /// the same or a later revision. Callers hold the writer lock.
    pub(super) fn adopt(&self, stored: Stored) {
        if stored.record.deleted_at.is_some() {
            // Another daemon of the zone turned a deleted replica into a
            // tombstone.
            let id = stored.record.id;
            self.remove_from_ring(id);
            let mut ring = Keyring::clone(&self.ring.load());
            ring.take(stored);
            self.ring.store(Arc::new(ring));
            return;
        }
        let ring = self.ring.load();
        let current = ring.by_id.get(&stored.record.id).map(|slot| slot.load_full());
        if current.as_ref().is_some_and(|c| c.revision >= stored.revision) {
            return;
        }
        let id = stored.record.id;
        let entry = KeyEntry::new(stored.record, stored.revision, current.as_deref());
        match (&current, ring.by_id.get(&id)) {
            (Some(c), Some(slot)) if c.record.name == entry.record.name => slot.store(Arc::new(entry)),
            _ => {
                let mut ring = Keyring::clone(&ring);
                ring.by_name.retain(|_, v| *v != id);
                ring.insert(entry);
                self.ring.store(Arc::new(ring));
            }
        }
        self.notify_changed();
    }

    /// Drops the key `id` from the keyring, unless it holds a revision
    /// newer than `deleted` (the revision the deleted record had; `None`:
    /// the store no longer holds it). Callers hold the writer lock.
    pub(super) fn forget(&self, id: Uuid, deleted: Option<Revision>) {
        if self.ring.load().tombstones.contains_key(&id) {
            let mut ring = Keyring::clone(&self.ring.load());
            ring.tombstones.remove(&id);
            self.ring.store(Arc::new(ring));
        }
        let held = self.ring.load().by_id.get(&id).map(|slot| slot.load().revision);
        match (held, deleted) {
            (None, _) => {}
            (Some(held), Some(deleted)) if held > deleted => {}
            _ => self.remove_from_ring(id),
        }
    }
}
