//! An in-memory [`KeyStore`] with any number of writers on one backend,
//! for tests: it checks the conformance suite itself where the file store
//! cannot (a second writer, a change stream that yields, names unique
//! across writers), and lets a test change records behind a key service's
//! back.

use std::collections::HashMap;
use std::sync::Arc;

use futures::channel::mpsc;
use parking_lot::Mutex;
use uuid::Uuid;

use super::{schema, Change, ChangeStream, KeyStore, Revision, StoreError, Stored, MAX_RECORD_LEN};
use crate::keys::model::KeyRecord;

#[derive(Debug, Default)]
struct Shared {
    records: HashMap<Uuid, Stored>,
    last: u64,
    handles: usize,
    /// Each stream, with the handle that opened it.
    watchers: Vec<(usize, mpsc::UnboundedSender<Change>)>,
}

impl Shared {
    /// Sends `change` made through `by` to every other handle's streams.
    fn publish(&mut self, by: usize, change: &Change) {
        self.watchers
            .retain(|(handle, tx)| *handle == by || tx.unbounded_send(change.clone()).is_ok());
    }
}

/// The records that every [`MemoryStore`] made from it shares.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend(Arc<Mutex<Shared>>);

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new writer on this backend.
    pub fn store(&self) -> MemoryStore {
        let mut shared = self.0.lock();
        shared.handles += 1;
        MemoryStore {
            backend: self.clone(),
            handle: shared.handles,
        }
    }
}

/// One writer of a [`MemoryBackend`].
#[derive(Debug)]
pub struct MemoryStore {
    backend: MemoryBackend,
    handle: usize,
}

impl KeyStore for MemoryStore {
    fn load(&self) -> Result<Vec<Stored>, StoreError> {
        Ok(self.backend.0.lock().records.values().cloned().collect())
    }

    fn put(&self, record: &KeyRecord, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let len = schema::encode(0, record)
            .map_err(|source| StoreError::Schema {
                path: "memory".into(),
                source,
            })?
            .len();
        let mut shared = self.backend.0.lock();
        let found = shared.records.get(&record.id).map(|s| s.revision);
        if found != expected {
            return Err(StoreError::Conflict {
                id: record.id,
                expected,
                found,
            });
        }
        if len > MAX_RECORD_LEN {
            return Err(StoreError::TooLarge {
                id: record.id,
                len,
                limit: MAX_RECORD_LEN,
            });
        }
        if let Some(name) = &record.name {
            let taken = shared
                .records
                .values()
                .any(|s| s.record.id != record.id && s.record.name.as_ref() == Some(name));
            if taken {
                return Err(StoreError::NameTaken { name: name.clone() });
            }
        }
        shared.last += 1;
        let stored = Stored {
            revision: Revision::new(shared.last),
            record: record.clone(),
        };
        shared.records.insert(record.id, stored.clone());
        shared.publish(self.handle, &Change::Put(Box::new(stored.clone())));
        Ok(stored.revision)
    }

    fn delete(&self, id: Uuid, expected: Revision) -> Result<(), StoreError> {
        let mut shared = self.backend.0.lock();
        let found = shared.records.get(&id).map(|s| s.revision);
        if found != Some(expected) {
            return Err(StoreError::Conflict {
                id,
                expected: Some(expected),
                found,
            });
        }
        shared.records.remove(&id);
        shared.publish(self.handle, &Change::Deleted { id, revision: expected });
        Ok(())
    }

    fn changes(&self) -> ChangeStream {
        let (tx, rx) = mpsc::unbounded();
        self.backend.0.lock().watchers.push((self.handle, tx));
        Box::pin(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::store::conformance::Harness;

    struct MemoryHarness(MemoryBackend);

    impl Harness for MemoryHarness {
        type Store = MemoryStore;
        type Crash = ();

        fn open(&mut self) -> MemoryStore {
            self.0.store()
        }

        fn crash_points(&self) -> Vec<()> {
            Vec::new()
        }

        fn arm_crash(&self, _: &MemoryStore, (): ()) {}

        fn second_writer(&mut self, _: &MemoryStore) -> Option<MemoryStore> {
            Some(self.0.store())
        }
    }

    crate::key_store_conformance!(MemoryHarness(MemoryBackend::new()));
}
