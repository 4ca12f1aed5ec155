//! The key service: the keyring in memory, the rules, the store, and the
//! access checks, behind one API that the server, the scheduler and the
//! filesystem call.
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

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::model::MAX_NAME_LEN;
use arc_swap::ArcSwap;
use futures::StreamExt;
use kms_client::blob::BlobHeader;
use kms_client::proto::{
    Context, CreateKey, KeyInfo, KeyKind, Policy, Principal, RotationEntry, UnixTime, DEFAULT_KEY_NAME,
    DEFAULT_ROTATION_DAYS, MAX_DEK, MAX_PLAINTEXT,
};
use parking_lot::Mutex;
use rand::{Rng, RngCore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::clock::Clock;
use super::crypto::{self, VersionCiphers};
use super::error::{Error, Result};
use super::lifecycle;
use super::model::{validate_description, validate_name, validate_period, KeyRecord, KeyVersion, RotationSchedule};
use super::policy::{allowed, Access, Caller};
use super::replica::{self, KeyExport};
use super::rotation;
use super::store::{Change, FileStore, KeyStore, Revision, RootKey, StoreError, Stored};

/// A generated data key: plaintext (zeroized on drop) and its blob.
pub type DataKeyPair = (Zeroizing<Vec<u8>>, Vec<u8>);

/// Length of generated data keys.
pub const DATA_KEY_LEN: usize = 32;

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

    fn seal(&self, plaintext: &[u8], context: &Context) -> Vec<u8> {
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

/// What a replica zone did with an export: the active version it now
/// holds, and the versions it held that the export lacks (only when it
/// follows a newly promoted primary: see [`replica::apply`]).
#[derive(Debug)]
pub struct Accepted {
    pub active: u32,
    pub orphans: Vec<KeyVersion>,
}

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

    fn check_quota(&self, caller: &Caller) -> Result<()> {
        let limit = self.keys_per_uid.load(std::sync::atomic::Ordering::Relaxed);
        if limit == 0 || caller.is_internal() {
            return Ok(());
        }
        let me = Principal::Uid(caller.uid);
        let ring = self.ring.load();
        let held = ring
            .by_id
            .values()
            .filter(|e| {
                let r = &e.load().record;
                r.kind == KeyKind::Customer
                    && !matches!(r.role, kms_client::proto::KeyRole::Replica { .. })
                    && r.policy.admins.contains(&me)
            })
            .take(limit)
            .count();
        if held >= limit {
            return Err(Error::QuotaExceeded { uid: caller.uid, limit });
        }
        Ok(())
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

    fn notify_changed(&self) {
        self.changed.notify_one();
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
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

    // ---- administration -------------------------------------------------

    /// Creates a customer key; the caller gets use and admin on it.
    ///
    /// # Errors
    /// `InvalidArgument` (name, description, period, name taken),
    /// `Unavailable` if it cannot be stored.
    pub fn create_key(&self, caller: &Caller, req: &CreateKey) -> Result<KeyInfo> {
        if let Some(name) = &req.name {
            validate_name(name)?;
        }
        validate_description(&req.description)?;
        let now = self.clock.now();
        let schedule = match req.rotation {
            None => RotationSchedule::every(DEFAULT_ROTATION_DAYS, now),
            Some(None) => RotationSchedule::off(DEFAULT_ROTATION_DAYS),
            Some(Some(days)) => {
                validate_period(days)?;
                RotationSchedule::every(days, now)
            }
        };
        let _writer = self.writer.lock();
        self.check_quota(caller)?;
        if let Some(name) = &req.name {
            if self.ring.load().by_name.contains_key(name) {
                return Err(Error::InvalidArgument(format!("a key named {name:?} already exists")));
            }
        }
        let mut rec = KeyRecord::new(Uuid::new_v4(), KeyKind::Customer, &self.zone, schedule, now);
        rec.name.clone_from(&req.name);
        rec.description.clone_from(&req.description);
        if !caller.is_internal() {
            rec.policy.users = vec![Principal::Uid(caller.uid)];
            rec.policy.admins = vec![Principal::Uid(caller.uid)];
        }
        let revision = self.store.put(&rec, None).map_err(name_taken)?;
        let info = rec.info();
        self.insert(rec, revision);
        Ok(info)
    }

    /// Describes a key.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub fn describe(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        let e = self.entry(key_ref)?;
        self.check(caller, &e.record, Access::Read)?;
        Ok(e.record.info())
    }

    /// The key, if `caller` has `access` to it (for callers outside this
    /// service, such as the filesystem admin commands).
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub fn authorize(&self, caller: &Caller, key_ref: &str, access: Access) -> Result<Arc<KeyEntry>> {
        let e = self.entry(key_ref)?;
        self.check(caller, &e.record, access)?;
        Ok(e)
    }

    /// Lists the keys the caller may read, oldest first.
    pub fn list(&self, caller: &Caller) -> Vec<KeyInfo> {
        let admins = self.admins.load();
        let ring = self.ring.load();
        let mut out: Vec<KeyInfo> = ring
            .by_id
            .values()
            .map(|s| s.load_full())
            .filter(|e| allowed(caller, &e.record, &admins, Access::Read))
            .map(|e| e.record.info())
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.name, a.id).cmp(&(b.created_at, &b.name, b.id)));
        out
    }

    /// Rotation history of a key.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub fn rotations(&self, caller: &Caller, key_ref: &str) -> Result<Vec<RotationEntry>> {
        let e = self.entry(key_ref)?;
        self.check(caller, &e.record, Access::Read)?;
        Ok(e.record.rotations())
    }

    /// Manually rotates a key; returns the key with its new active version.
    ///
    /// # Errors
    /// See [`rotation::rotate_manual`]; `Unavailable` if it cannot be stored.
    pub fn rotate(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        Ok(self.mutate(caller, key_ref, Access::Admin, rotation::rotate_manual)?.1)
    }

    /// Enables automatic rotation.
    ///
    /// # Errors
    /// See [`rotation::enable_rotation`].
    pub fn enable_rotation(&self, caller: &Caller, key_ref: &str, period: Option<u32>) -> Result<KeyInfo> {
        Ok(self
            .mutate(caller, key_ref, Access::Admin, |k, now| {
                rotation::enable_rotation(k, period, now)
            })?
            .1)
    }

    /// Disables automatic rotation.
    ///
    /// # Errors
    /// See [`rotation::disable_rotation`].
    pub fn disable_rotation(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        Ok(self
            .mutate(caller, key_ref, Access::Admin, |k, _| rotation::disable_rotation(k))?
            .1)
    }

    /// Enables a key.
    ///
    /// # Errors
    /// See [`lifecycle::enable_key`].
    pub fn enable_key(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        Ok(self
            .mutate(caller, key_ref, Access::Admin, |k, _| lifecycle::enable_key(k))?
            .1)
    }

    /// Disables a key.
    ///
    /// # Errors
    /// See [`lifecycle::disable_key`].
    pub fn disable_key(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        Ok(self
            .mutate(caller, key_ref, Access::Admin, |k, _| lifecycle::disable_key(k))?
            .1)
    }

    /// Schedules a key's deletion.
    ///
    /// # Errors
    /// See [`lifecycle::schedule_deletion`].
    pub fn schedule_deletion(&self, caller: &Caller, key_ref: &str, days: Option<u32>) -> Result<KeyInfo> {
        Ok(self
            .mutate(caller, key_ref, Access::Admin, |k, now| {
                lifecycle::schedule_deletion(k, days, now)
            })?
            .1)
    }

    /// Cancels a key's pending deletion (the key stays disabled).
    ///
    /// # Errors
    /// See [`lifecycle::cancel_deletion`].
    pub fn cancel_deletion(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        Ok(self
            .mutate(caller, key_ref, Access::Admin, |k, _| lifecycle::cancel_deletion(k))?
            .1)
    }

    // ---- schedule ---------------------------------------------------------

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
        let mut report = DueReport::default();
        let ids: Vec<Uuid> = self.ring.load().by_id.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.run_due_key(id, now, &mut report) {
                tracing::error!(key = %id, error = %super::error::error_chain(&e), "scheduled work failed; will retry");
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

    fn remove_from_ring(&self, id: Uuid) {
        let mut ring = Keyring::clone(&self.ring.load());
        ring.by_id.remove(&id);
        ring.by_name.retain(|_, v| *v != id);
        self.ring.store(Arc::new(ring));
        self.notify_changed();
    }

    // ---- other writers ------------------------------------------------------

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
    fn adopt(&self, stored: Stored) {
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
    fn forget(&self, id: Uuid, deleted: Option<Revision>) {
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

    // ---- replication --------------------------------------------------------

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

    /// `key promote` in a replica zone: see [`replica::promote`].
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied` (needs admin), `InvalidArgument` (not
    /// a replica), `Unavailable`.
    pub fn promote(&self, caller: &Caller, key_ref: &str) -> Result<KeyInfo> {
        let ((), info) = self.mutate(caller, key_ref, Access::Admin, |k, _| replica::promote(k))?;
        tracing::info!(key = %info.id, epoch = ?info.role, "promoted: this zone is now the key's primary");
        Ok(info)
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

    fn records(&self) -> impl Iterator<Item = KeyRecord> {
        let ring = self.ring.load_full();
        let all: Vec<KeyRecord> = ring.by_id.values().map(|s| s.load().record.clone()).collect();
        all.into_iter()
    }

    fn mutate_internal(&self, id: Uuid, f: impl FnMut(&mut KeyRecord, UnixTime) -> Result<()>) -> Result<()> {
        self.mutate(&Caller::internal(), &id.to_string(), Access::Admin, f)
            .map(|_| ())
    }

    // ---- cryptography -----------------------------------------------------

    /// The key, if the caller may use it and it is enabled.
    fn usable(&self, caller: &Caller, key_ref: &str) -> Result<Arc<KeyEntry>> {
        let e = self.entry(key_ref)?;
        self.check(caller, &e.record, Access::Use)?;
        e.record.ensure_usable()?;
        Ok(e)
    }

    /// Encrypts up to 64 KiB under the key's active version.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `Disabled`, `InvalidArgument` (size).
    pub fn encrypt(&self, caller: &Caller, key_ref: &str, plaintext: &[u8], ctx: &Context) -> Result<Vec<u8>> {
        check_len("plaintext", plaintext.len(), 0, MAX_PLAINTEXT)?;
        Ok(self.usable(caller, key_ref)?.seal(plaintext, ctx))
    }

    /// Wraps a caller's DEK (1..=1024 bytes) under the active version.
    ///
    /// # Errors
    /// As [`encrypt`](Self::encrypt).
    pub fn wrap(&self, caller: &Caller, key_ref: &str, dek: &[u8], ctx: &Context) -> Result<Vec<u8>> {
        check_len("data key", dek.len(), 1, MAX_DEK)?;
        Ok(self.usable(caller, key_ref)?.seal(dek, ctx))
    }

    /// Wraps many DEKs under one key with one lookup and one access check.
    ///
    /// # Errors
    /// As [`wrap`](Self::wrap), for the whole batch.
    pub fn wrap_batch(&self, caller: &Caller, key_ref: &str, deks: &[Vec<u8>], ctx: &Context) -> Result<Vec<Vec<u8>>> {
        check_len("batch", deks.len(), 1, kms_client::proto::MAX_BATCH)?;
        for d in deks {
            check_len("data key", d.len(), 1, MAX_DEK)?;
        }
        let e = self.usable(caller, key_ref)?;
        Ok(deks.iter().map(|d| e.seal(d, ctx)).collect())
    }

    /// Generates a random 32-byte data key; returns it and its blob.
    ///
    /// # Errors
    /// As [`encrypt`](Self::encrypt).
    pub fn generate_data_key(&self, caller: &Caller, key_ref: &str, ctx: &Context) -> Result<DataKeyPair> {
        let e = self.usable(caller, key_ref)?;
        Ok(new_data_key(&e, ctx))
    }

    /// Generates `count` data keys under one key.
    ///
    /// # Errors
    /// As [`generate_data_key`](Self::generate_data_key); `InvalidArgument`
    /// for a count of 0 or over the batch limit.
    pub fn generate_data_key_batch(
        &self,
        caller: &Caller,
        key_ref: &str,
        count: usize,
        ctx: &Context,
    ) -> Result<Vec<DataKeyPair>> {
        check_len("batch", count, 1, kms_client::proto::MAX_BATCH)?;
        let e = self.usable(caller, key_ref)?;
        Ok((0..count).map(|_| new_data_key(&e, ctx)).collect())
    }

    /// Decrypts a blob with whichever version of whichever key it names.
    ///
    /// # Errors
    /// `DecryptFailed` (not a blob, unknown key or version, wrong context,
    /// altered bytes), `PermissionDenied`, `Disabled`.
    pub fn decrypt(&self, caller: &Caller, blob: &[u8], ctx: &Context) -> Result<Zeroizing<Vec<u8>>> {
        self.open_blob(caller, blob, ctx, None)
    }

    /// Unwraps a DEK; the same as [`decrypt`](Self::decrypt).
    ///
    /// # Errors
    /// As [`decrypt`](Self::decrypt).
    pub fn unwrap(&self, caller: &Caller, blob: &[u8], ctx: &Context) -> Result<Zeroizing<Vec<u8>>> {
        self.open_blob(caller, blob, ctx, None)
    }

    /// Unwraps many blobs, each with its own result.
    pub fn unwrap_batch(
        &self,
        caller: &Caller,
        blobs: &[Vec<u8>],
        ctx: &Context,
    ) -> Result<Vec<Result<Zeroizing<Vec<u8>>>>> {
        check_len("batch", blobs.len(), 1, kms_client::proto::MAX_BATCH)?;
        Ok(blobs.iter().map(|b| self.open_blob(caller, b, ctx, None)).collect())
    }

    /// Opens a blob that must belong to key `expect` (the filesystem's key).
    ///
    /// # Errors
    /// As [`decrypt`](Self::decrypt); `DecryptFailed` for another key's blob.
    pub fn unwrap_for_key(
        &self,
        caller: &Caller,
        expect: Uuid,
        blob: &[u8],
        ctx: &Context,
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.open_blob(caller, blob, ctx, Some(expect))
    }

    /// Decrypts `blob` and encrypts the plaintext under the active version of
    /// `to` (default: the blob's own key) with `to_ctx` (default: `ctx`).
    /// The plaintext never leaves the daemon.
    ///
    /// # Errors
    /// As [`decrypt`](Self::decrypt) for the source, as
    /// [`encrypt`](Self::encrypt) for the destination.
    pub fn re_encrypt(
        &self,
        caller: &Caller,
        blob: &[u8],
        ctx: &Context,
        to: Option<&str>,
        to_ctx: Option<&Context>,
    ) -> Result<Vec<u8>> {
        let plain = self.open_blob(caller, blob, ctx, None)?;
        let dest = match to {
            Some(key_ref) => self.usable(caller, key_ref)?,
            None => self.usable(
                caller,
                &BlobHeader::parse(blob).expect("opened above").key_id.to_string(),
            )?,
        };
        Ok(dest.seal(&plain, to_ctx.unwrap_or(ctx)))
    }

    fn open_blob(
        &self,
        caller: &Caller,
        blob: &[u8],
        ctx: &Context,
        expect: Option<Uuid>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let header = BlobHeader::parse(blob).map_err(|_| Error::DecryptFailed("not a kmsd ciphertext blob"))?;
        if expect.is_some_and(|id| id != header.key_id) {
            return Err(Error::DecryptFailed("the blob belongs to another key"));
        }
        let ring = self.ring.load();
        let slot = ring
            .by_id
            .get(&header.key_id)
            .ok_or(Error::DecryptFailed("the blob names a key that does not exist here"))?;
        let e = slot.load();
        self.check(caller, &e.record, Access::Use)?;
        e.record.ensure_usable()?;
        let cipher = e
            .ciphers
            .get(header.version)
            .ok_or(Error::DecryptFailed("the blob names a key version that does not exist"))?;
        crypto::open(cipher, blob, ctx)
    }
}

fn new_data_key(e: &KeyEntry, ctx: &Context) -> DataKeyPair {
    let mut dek = Zeroizing::new(vec![0u8; DATA_KEY_LEN]);
    rand::thread_rng().fill_bytes(&mut dek);
    let blob = e.seal(&dek, ctx);
    (dek, blob)
}

/// A store's refusal of a create: a taken name is the caller's mistake,
/// anything else the store's.
fn name_taken(e: StoreError) -> Error {
    match e {
        StoreError::NameTaken { name } => Error::InvalidArgument(format!("a key named {name:?} already exists")),
        other => Error::Unavailable(other),
    }
}

fn check_len(what: &str, len: usize, min: usize, max: usize) -> Result<()> {
    if len < min || len > max {
        return Err(Error::InvalidArgument(format!(
            "{what} of {len} bytes/items is outside {min}..={max}"
        )));
    }
    Ok(())
}
