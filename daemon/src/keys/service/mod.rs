//! The key service: the keyring in memory, the rules, the store, and the
//! access checks, behind one API that the server, the scheduler and the
//! filesystem call.
//!
//! One type over one keyring; its methods are grouped by concern: this
//! module holds the keyring, opening, lookups, access checks and the write
//! path every change takes (`mutate`, `retrying`, `replace`); `admin` the
//! administration of keys, `schedule` automatic rotations and deletions,
//! `replication` what multi-zone replication asks of a key, `follow` the
//! changes of other writers, `data` the cryptographic operations.
//!
//! Concurrency: readers load the current [`KeyEntry`] of a key through an
//! `ArcSwap` and never take a lock that a writer holds across I/O. Writers
//! (rare: admin operations, rotations) are serialised by one mutex, build
//! the new record, persist it durably, and only then swap it in; readers
//! meanwhile keep using the previous entry, so an unwrap never waits on a
//! rotation's fsync.
//!
//! Other writers (the daemons of an etcd fleet): a write that loses the
//! store's compare-and-swap reloads the key and runs again
//! ([`MAX_ATTEMPTS`] at most), and [`KeyService::follow`] applies their
//! changes to the keyring. Either way a change older than the one held is
//! dropped, by revision.

mod admin;
mod data;
mod follow;
mod replication;
mod schedule;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::model::MAX_NAME_LEN;
use arc_swap::ArcSwap;
use kms_client::proto::{
    Context, KeyInfo, KeyKind, Policy, Principal, UnixTime, DEFAULT_KEY_NAME, DEFAULT_ROTATION_DAYS,
};
use parking_lot::Mutex;
use rand::Rng;
use uuid::Uuid;

use super::clock::Clock;
use super::crypto::{self, Sealed, VersionCiphers};
use super::error::{Error, Result};
use super::model::{KeyRecord, RotationSchedule};
use super::policy::{allowed, Access, Caller};
use super::store::{FileStore, KeyStore, Revision, RootKey, StoreError, Stored};

pub use data::{DataKeyPair, DATA_KEY_LEN};
pub use replication::Accepted;
pub use schedule::DueReport;

/// How many times an operation runs when another writer of the store
/// changed its key first (each time on the record reloaded from the store).
pub(crate) const MAX_ATTEMPTS: usize = 16;

/// One key as readers see it: the record, the store's revision of it, and
/// its initialised ciphers.
#[derive(Debug)]
pub struct KeyEntry {
    pub record: KeyRecord,
    revision: Revision,
    ciphers: VersionCiphers,
}

impl KeyEntry {
    fn new(record: KeyRecord, revision: Revision, previous: Option<&KeyEntry>) -> Self {
        let ciphers = VersionCiphers::build(&record, previous.map(|p| &p.ciphers));
        Self {
            record,
            revision,
            ciphers,
        }
    }

    fn seal(&self, plaintext: &[u8], context: &Context) -> Sealed {
        let active = self.record.active().version;
        let cipher = self.ciphers.get(active).expect("ciphers cover every version");
        crypto::seal(cipher, self.record.id, active, plaintext, context)
    }
}

type Slot = Arc<ArcSwap<KeyEntry>>;

/// Id and name indexes; replaced whole when keys are created or deleted.
#[derive(Debug, Default, Clone)]
struct Keyring {
    by_id: HashMap<Uuid, Slot>,
    by_name: HashMap<String, Uuid>,
    /// Replicas deleted in this zone (`KeyRecord::deleted_at`): never
    /// served, kept so that their primary's pushes are refused.
    tombstones: HashMap<Uuid, Tombstone>,
}

/// What is left of a replica deleted in this zone.
#[derive(Debug, Clone)]
struct Tombstone {
    primary_zone: String,
    deleted_at: UnixTime,
    revision: Revision,
}

impl Keyring {
    /// Takes a record read from the store: a tombstone, or a key to serve.
    fn take(&mut self, s: Stored) {
        match (s.record.deleted_at, &s.record.role) {
            (Some(deleted_at), kms_client::proto::KeyRole::Replica { primary_zone }) => {
                let t = Tombstone {
                    primary_zone: primary_zone.clone(),
                    deleted_at,
                    revision: s.revision,
                };
                self.tombstones.insert(s.record.id, t);
            }
            _ => self.insert(KeyEntry::new(s.record, s.revision, None)),
        }
    }

    fn insert(&mut self, entry: KeyEntry) {
        if let Some(name) = &entry.record.name {
            self.by_name.insert(name.clone(), entry.record.id);
        }
        self.by_id
            .insert(entry.record.id, Arc::new(ArcSwap::from_pointee(entry)));
    }
}

/// The key service.
pub struct KeyService {
    zone: String,
    clock: Arc<dyn Clock>,
    store: Arc<dyn KeyStore>,
    ring: ArcSwap<Keyring>,
    admins: ArcSwap<Vec<Principal>>,
    /// Customer keys one uid may administer here (0: no limit).
    keys_per_uid: std::sync::atomic::AtomicUsize,
    writer: Mutex<()>,
    changed: tokio::sync::Notify,
    /// Bumped after every persisted change; replication watches it.
    generation: tokio::sync::watch::Sender<u64>,
    /// Told of every change before the request that made it is answered
    /// (kmsd publishes it to mount processes: `crate::changes`).
    on_change: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("zone", &self.zone)
            .field("keys", &self.key_count())
            .finish()
    }
}

impl KeyService {
    /// Opens the file store in `state_dir` (migrating it if it is at an
    /// older schema), loads every key and creates the default organization
    /// key on first start.
    ///
    /// # Errors
    /// Any [`StoreError`]: wrong root key, corrupt file, locked, I/O.
    pub fn open(state_dir: &Path, root: RootKey, zone: &str, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::with_store(Arc::new(FileStore::open(state_dir, root)?), zone, clock)
    }

    /// Loads every key from `store` and creates the default organization
    /// key if it holds none.
    ///
    /// # Errors
    /// Any [`StoreError`] of loading or of writing the default key.
    pub fn with_store(store: Arc<dyn KeyStore>, zone: &str, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let svc = Self {
            zone: zone.to_string(),
            clock,
            store,
            ring: ArcSwap::from_pointee(Keyring::default()),
            admins: ArcSwap::from_pointee(Vec::new()),
            keys_per_uid: std::sync::atomic::AtomicUsize::new(0),
            writer: Mutex::new(()),
            changed: tokio::sync::Notify::new(),
            generation: tokio::sync::watch::Sender::new(0),
            on_change: std::sync::OnceLock::new(),
        };
        svc.load_all()?;
        svc.ensure_default_key()?;
        Ok(svc)
    }

    /// Replaces the keyring by every record of the store.
    fn load_all(&self) -> Result<(), StoreError> {
        let mut ring = Keyring::default();
        for s in self.store.load()? {
            ring.take(s);
        }
        self.ring.store(Arc::new(ring));
        Ok(())
    }

    /// Creates the default organization key unless the store holds one. In
    /// a fleet starting at once, another daemon may create it first (its
    /// name is then taken): the store is read again and holds it.
    fn ensure_default_key(&self) -> Result<(), StoreError> {
        let mut attempts = 0;
        loop {
            let ring = self.ring.load();
            if ring.by_id.values().any(|s| s.load().record.is_default()) {
                return Ok(());
            }
            match self.create_default_key() {
                Err(StoreError::NameTaken { .. }) if attempts < MAX_ATTEMPTS => {
                    attempts += 1;
                    self.load_all()?;
                }
                other => return other,
            }
        }
    }

    fn create_default_key(&self) -> Result<(), StoreError> {
        let now = self.clock.now();
        let sched = RotationSchedule::every(DEFAULT_ROTATION_DAYS, now);
        let mut rec = KeyRecord::new(Uuid::new_v4(), KeyKind::DefaultOrganization, &self.zone, sched, now);
        rec.name = Some(DEFAULT_KEY_NAME.to_string());
        rec.description = "default organization key (platform-managed)".to_string();
        rec.policy = Policy {
            public_use: true,
            ..Policy::default()
        };
        let revision = self.store.put(&rec, None)?;
        self.insert(rec, revision);
        Ok(())
    }

    /// This daemon's zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The clock the service reads.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Number of keys held.
    pub fn key_count(&self) -> usize {
        self.ring.load().by_id.len()
    }

    /// Replaces the global admins (config load and reload).
    pub fn set_admins(&self, admins: Vec<Principal>) {
        self.admins.store(Arc::new(admins));
    }

    /// Sets how many customer keys one uid may administer here (0: no
    /// limit); replicas, which other zones create, do not count.
    pub fn set_keys_per_uid(&self, limit: usize) {
        self.keys_per_uid.store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves when a key changed in a way that may move the schedule.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A receiver that sees a new value after every persisted change to any
    /// key (the hook the replication task waits on).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Calls `hook` after every change to any key held in memory, on the
    /// thread that made it, before the request that made it is answered.
    /// Set once; later calls are ignored.
    pub fn on_change(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(hook));
    }

    fn notify_changed(&self) {
        self.changed.notify_one();
        let mut now = 0;
        self.generation.send_modify(|g| {
            *g = g.wrapping_add(1);
            now = *g;
        });
        if let Some(hook) = self.on_change.get() {
            hook(now);
        }
    }

    /// Resolves a UUID or a name to the key's current entry.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn entry(&self, key_ref: &str) -> Result<Arc<KeyEntry>> {
        let ring = self.ring.load();
        let id = match Uuid::parse_str(key_ref) {
            Ok(id) => id,
            // No key has such a name; say so without echoing it.
            Err(_) if key_ref.len() > MAX_NAME_LEN || key_ref.chars().any(char::is_control) => {
                return Err(Error::InvalidArgument(format!(
                    "invalid key reference ({} bytes): a key is named by its id or by a name of at most \
                     {MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ / -",
                    key_ref.len()
                )))
            }
            Err(_) => *ring
                .by_name
                .get(key_ref)
                .ok_or_else(|| Error::NotFound(key_ref.to_string()))?,
        };
        let slot = ring
            .by_id
            .get(&id)
            .ok_or_else(|| Error::NotFound(key_ref.to_string()))?;
        Ok(slot.load_full())
    }

    fn check(&self, caller: &Caller, rec: &KeyRecord, access: Access) -> Result<()> {
        if allowed(caller, rec, &self.admins.load(), access) {
            return Ok(());
        }
        tracing::warn!(uid = caller.uid, pid = caller.pid, key = %rec.id, access = access.verb(), "permission denied");
        Err(Error::PermissionDenied {
            uid: caller.uid,
            action: access.verb(),
            key: rec.label(),
        })
    }

    fn insert(&self, rec: KeyRecord, revision: Revision) {
        let mut ring = Keyring::clone(&self.ring.load());
        ring.insert(KeyEntry::new(rec, revision, None));
        self.ring.store(Arc::new(ring));
        self.notify_changed();
    }

    /// Applies `f` to a copy of the key's record; persists and swaps it in
    /// if it changed. Returns `f`'s result and the key as it now is.
    fn mutate<T>(
        &self,
        caller: &Caller,
        key_ref: &str,
        access: Access,
        mut f: impl FnMut(&mut KeyRecord, UnixTime) -> Result<T>,
    ) -> Result<(T, KeyInfo)> {
        let _writer = self.writer.lock();
        self.retrying(|| {
            let current = self.entry(key_ref)?;
            self.check(caller, &current.record, access)?;
            let mut rec = current.record.clone();
            let out = f(&mut rec, self.clock.now())?;
            let info = rec.info();
            if rec != current.record {
                self.replace(rec, &current)?;
            }
            Ok((out, info))
        })
    }

    /// Runs `op`, and again each time the store refuses its write because
    /// another writer changed the key first: the key is reloaded from the
    /// store before each new attempt, so `op` decides on the newest record.
    /// Callers hold the writer lock.
    fn retrying<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        for attempt in 1.. {
            match op() {
                Err(Error::Unavailable(StoreError::Conflict { id, .. })) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(key = %id, attempt, "another writer changed the key first; reloading it");
                    self.reload(id)?;
                    // Writers that keep colliding take turns.
                    let pause = rand::thread_rng().gen_range(0..=attempt as u64 * 2);
                    std::thread::sleep(std::time::Duration::from_millis(pause));
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// Reads the key `id` from the store into the keyring.
    pub(crate) fn reload(&self, id: Uuid) -> Result<()> {
        match self.store.get(id).map_err(Error::Unavailable)? {
            Some(stored) => self.adopt(stored),
            None => self.forget(id, None),
        }
        Ok(())
    }

    /// Persists `rec` over `current` (compare-and-swap on the revision read
    /// with it) and swaps it in. Callers hold the writer lock. A key this
    /// zone is primary for gets the next serial (see `KeyRecord::serial`);
    /// a replica keeps the one of the export it applied.
    fn replace(&self, mut rec: KeyRecord, current: &KeyEntry) -> Result<()> {
        if !matches!(rec.role, kms_client::proto::KeyRole::Replica { .. }) {
            rec.serial = current.record.serial + 1;
        }
        let revision = self
            .store
            .put(&rec, Some(current.revision))
            .map_err(Error::Unavailable)?;
        let ring = self.ring.load();
        if let Some(slot) = ring.by_id.get(&rec.id) {
            slot.store(Arc::new(KeyEntry::new(rec, revision, Some(current))));
        }
        self.notify_changed();
        Ok(())
    }

    /// The store, to open a second service over it in tests.
    #[cfg(test)]
    pub(crate) fn store_for_test(&self) -> Arc<dyn KeyStore> {
        self.store.clone()
    }

    /// Holds the writer lock, as a rotation does across its fsync.
    #[cfg(test)]
    pub(crate) fn writer_lock_for_test(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.writer.lock()
    }

    fn remove_from_ring(&self, id: Uuid) {
        let mut ring = Keyring::clone(&self.ring.load());
        ring.by_id.remove(&id);
        ring.by_name.retain(|_, v| *v != id);
        self.ring.store(Arc::new(ring));
        self.notify_changed();
    }

    fn records(&self) -> impl Iterator<Item = KeyRecord> {
        let ring = self.ring.load_full();
        let all: Vec<KeyRecord> = ring.by_id.values().map(|s| s.load().record.clone()).collect();
        all.into_iter()
    }

    fn mutate_internal(&self, id: Uuid, f: impl FnMut(&mut KeyRecord, UnixTime) -> Result<()>) -> Result<()> {
        self.mutate(&Caller::internal(), &id.to_string(), Access::Admin, f)
            .map(|_| ())
    }
}

/// A store's refusal of a create: a taken name is the caller's mistake,
/// anything else the store's.
fn name_taken(e: StoreError) -> Error {
    match e {
        StoreError::NameTaken { name } => Error::InvalidArgument(format!("a key named {name:?} already exists")),
        other => Error::Unavailable(other),
    }
}
