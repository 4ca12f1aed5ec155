//! Administration of keys: create, describe, list, enable and disable,
//! deletion, rotation settings, manual rotation and promotion.

use std::sync::Arc;

use kms_client::proto::{CreateKey, KeyInfo, KeyKind, Principal, RotationEntry, DEFAULT_ROTATION_DAYS};
use uuid::Uuid;

use crate::keys::error::{Error, Result};
use crate::keys::lifecycle;
use crate::keys::model::{validate_description, validate_name, validate_period, KeyRecord, RotationSchedule};
use crate::keys::policy::{allowed, Access, Caller};
use crate::keys::replica;
use crate::keys::rotation;

use super::{name_taken, KeyEntry, KeyService};

impl KeyService {
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
}

impl KeyService {
    /// A consistent snapshot of every record of the zone's store (tombstones
    /// included), material included, for `kmsctl backup`: read from the
    /// store, not the keyring, under the writer lock (the file store's
    /// records at one moment; etcd's at one revision). A backup holds every
    /// key's material, which a global admin may otherwise manage but not
    /// use: only global admins that could read the store and the root key
    /// anyway (root, or kmsd's own user) may take one; never the daemon's
    /// own callers (mount processes).
    ///
    /// # Errors
    /// `PermissionDenied`; `Unavailable` when the store cannot be read.
    pub fn snapshot(&self, caller: &Caller) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let own = caller.uid == 0 || caller.uid == nix::unistd::geteuid().as_raw();
        if caller.is_internal() || !own || !caller.matches(&self.admins.load()) {
            tracing::warn!(
                uid = caller.uid,
                pid = caller.pid,
                "backup refused: not a global admin running as root or as kmsd's user"
            );
            return Err(Error::PermissionDenied {
                uid: caller.uid,
                action: "back up",
                key: "the zone's keys (global admins that are root or kmsd's user only)".into(),
            });
        }
        let records = {
            let _writer = self.writer.lock();
            self.store.load().map_err(Error::Unavailable)?
        };
        let snapshot =
            crate::keys::store::snapshot::encode(&self.zone, self.clock.now(), &records).map_err(Error::Unavailable)?;
        tracing::info!(uid = caller.uid, keys = records.len(), "backup snapshot taken");
        Ok(snapshot)
    }

    /// The key store's health (`status`, metrics).
    pub fn store_health(&self) -> crate::keys::store::Health {
        self.store.health()
    }
}
