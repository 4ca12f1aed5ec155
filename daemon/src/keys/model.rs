//! The key record: everything kmsd keeps about one key, material included.
//! Records are plain data; the rules that change them live in `rotation`
//! and `lifecycle`, and the service swaps whole records atomically.

use kms_client::proto::{
    KeyInfo, KeyKind, KeyRole, KeyState, Origin, Policy, ReplicaInfo, RotationEntry, RotationInfo, UnixTime,
    VersionInfo, DEFAULT_KEY_NAME, MANUAL_ROTATION_LIMIT,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::clock::DAY;
use super::error::{Error, Result};
use super::material::Material;

/// Longest key name.
pub const MAX_NAME_LEN: usize = 64;

/// Version numbers are fenced by promotion epoch: the versions a key's
/// primary creates in epoch `e` are numbered from `e << EPOCH_SHIFT` + 1
/// (epoch 0: from 1). Two zones that were primary in different epochs
/// therefore never create two different versions with the same number,
/// even if the old primary kept rotating while cut off from the zone that
/// was promoted.
pub const EPOCH_SHIFT: u32 = 24;
/// Highest promotion epoch (so that every epoch's range fits in a u32).
pub const MAX_EPOCH: u32 = 255;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 256;
/// Shortest and longest automatic rotation period, in days.
pub const ROTATION_PERIOD_DAYS: std::ops::RangeInclusive<u32> = 1..=3650;

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: u32,
    pub created_at: UnixTime,
    pub origin: Origin,
    pub material: Material,
}

/// Automatic rotation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationSchedule {
    pub enabled: bool,
    /// The period in days (kept while disabled, for display only).
    pub period_days: u32,
    /// When the next automatic rotation is due; `None` while disabled.
    pub next_at: Option<UnixTime>,
}

impl RotationSchedule {
    /// Enabled with `period_days`, first due one period after `now`.
    pub fn every(period_days: u32, now: UnixTime) -> Self {
        Self {
            enabled: true,
            period_days,
            next_at: Some(now + u64::from(period_days) * DAY),
        }
    }

    /// Disabled.
    pub fn off(period_days: u32) -> Self {
        Self {
            enabled: false,
            period_days,
            next_at: None,
        }
    }
}

/// Everything kmsd keeps about a key. Not serialisable on purpose: the
/// store writes its own schema types (`store::schema`), replication a
/// `KeyExport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: Uuid,
    pub name: Option<String>,
    pub description: String,
    pub kind: KeyKind,
    pub zone: String,
    pub role: KeyRole,
    pub state: KeyState,
    pub created_at: UnixTime,
    pub policy: Policy,
    pub rotation: RotationSchedule,
    pub manual_rotations: u32,
    /// Versions in ascending order; never shrinks.
    pub versions: Vec<KeyVersion>,
    /// Replicas of a primary key, with their last confirmed version.
    pub replicas: Vec<ReplicaInfo>,
    /// On a primary (or single-zone key): grows with every change stored,
    /// and travels in exports. On a replica: the serial of the last export
    /// applied, so an older export (a replayed frame) is refused.
    pub serial: u64,
    /// Promotion epoch: 0 for the first primary, one more for each
    /// `key promote`. Exports carry it; a zone never takes an export of a
    /// lower epoch than the one it holds.
    pub epoch: u32,
    /// `Some(time)` for a tombstone: a replica deleted in this zone. Its
    /// versions (and so its material) are gone and it is never served;
    /// it only makes the zone refuse the primary's pushes until the
    /// primary unreplicates the key from this zone.
    pub deleted_at: Option<UnixTime>,
}

impl KeyRecord {
    /// A new key with one fresh version.
    pub fn new(id: Uuid, kind: KeyKind, zone: &str, rotation: RotationSchedule, now: UnixTime) -> Self {
        let first = KeyVersion {
            version: 1,
            created_at: now,
            origin: Origin::Initial,
            material: Material::random(),
        };
        Self {
            id,
            name: None,
            description: String::new(),
            kind,
            zone: zone.to_string(),
            role: KeyRole::SingleZone,
            state: KeyState::Enabled,
            created_at: now,
            policy: Policy::default(),
            rotation,
            manual_rotations: 0,
            versions: vec![first],
            replicas: Vec::new(),
            serial: 0,
            epoch: 0,
            deleted_at: None,
        }
    }

    /// The version used for all new encryption: the newest.
    pub fn active(&self) -> &KeyVersion {
        self.versions.last().expect("a key always has at least one version")
    }

    /// A version by number (versions are in ascending order, but not
    /// contiguous once a key has been promoted: see [`EPOCH_SHIFT`]).
    pub fn version(&self, v: u32) -> Option<&KeyVersion> {
        self.versions
            .binary_search_by_key(&v, |x| x.version)
            .ok()
            .map(|i| &self.versions[i])
    }

    /// The number the next version of this key gets: one more than the
    /// newest if that one is of this key's epoch, else the first number of
    /// the epoch. `None` when the epoch's range is used up (2^24 versions).
    pub fn next_version(&self) -> Option<u32> {
        let base = self
            .epoch
            .checked_shl(EPOCH_SHIFT)
            .filter(|_| self.epoch <= MAX_EPOCH)?;
        let last = self.active().version;
        let next = if last > base { last.checked_add(1)? } else { base + 1 };
        (next >> EPOCH_SHIFT == self.epoch).then_some(next)
    }

    /// The name if any, else the id: how errors refer to the key.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.to_string())
    }

    /// True for the platform-managed default organization key.
    pub fn is_default(&self) -> bool {
        self.kind == KeyKind::DefaultOrganization
    }

    /// Fails unless the key may serve cryptographic operations.
    ///
    /// # Errors
    /// `Disabled` for a disabled or pending-deletion key.
    pub fn ensure_usable(&self) -> Result<()> {
        match self.state {
            KeyState::Enabled => Ok(()),
            state => Err(Error::Disabled {
                key: self.label(),
                state: state.to_string(),
            }),
        }
    }

    /// The rotation block shown by `key describe`.
    pub fn rotation_info(&self) -> RotationInfo {
        let customer = self.kind == KeyKind::Customer;
        RotationInfo {
            enabled: self.rotation.enabled,
            period_days: self.rotation.enabled.then_some(self.rotation.period_days),
            next_rotation_at: self.rotation.next_at,
            manual_used: self.manual_rotations,
            manual_limit: if customer { MANUAL_ROTATION_LIMIT } else { 0 },
        }
    }

    /// What clients see: everything but the material.
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id,
            name: self.name.clone(),
            description: self.description.clone(),
            kind: self.kind,
            zone: self.zone.clone(),
            role: self.role.clone(),
            state: self.state,
            created_at: self.created_at,
            active_version: self.active().version,
            versions: self.versions.iter().map(version_info).collect(),
            rotation: self.rotation_info(),
            policy: self.policy.clone(),
            replicas: self.replicas.clone(),
        }
    }

    /// Rotation history: every version with its time and origin.
    pub fn rotations(&self) -> Vec<RotationEntry> {
        self.versions
            .iter()
            .map(|v| RotationEntry {
                version: v.version,
                at: v.created_at,
                origin: v.origin,
            })
            .collect()
    }
}

fn version_info(v: &KeyVersion) -> VersionInfo {
    VersionInfo {
        version: v.version,
        created_at: v.created_at,
        origin: v.origin,
    }
}

/// Checks a user-chosen key name: 1–64 of `[A-Za-z0-9._/-]`, not a UUID,
/// not the reserved default key name.
///
/// # Errors
/// `InvalidArgument` naming what is wrong.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok_char) {
        return Err(Error::InvalidArgument(format!(
            "invalid key name {name:?}: use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ / -"
        )));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(Error::InvalidArgument(format!("key name {name:?} looks like a key id")));
    }
    if name == DEFAULT_KEY_NAME {
        return Err(Error::InvalidArgument(format!("key name {name:?} is reserved")));
    }
    Ok(())
}

/// Checks a description's length.
///
/// # Errors
/// `InvalidArgument` when longer than 256 bytes.
pub fn validate_description(d: &str) -> Result<()> {
    if d.len() > MAX_DESCRIPTION_LEN {
        return Err(Error::InvalidArgument(format!(
            "description longer than {MAX_DESCRIPTION_LEN} bytes"
        )));
    }
    Ok(())
}

/// Checks an automatic rotation period.
///
/// # Errors
/// `InvalidArgument` outside 1..=3650 days.
pub fn validate_period(days: u32) -> Result<()> {
    if !ROTATION_PERIOD_DAYS.contains(&days) {
        return Err(Error::InvalidArgument(format!(
            "rotation period {days} days is outside {}..={} days",
            ROTATION_PERIOD_DAYS.start(),
            ROTATION_PERIOD_DAYS.end()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRecord {
        KeyRecord::new(
            Uuid::new_v4(),
            KeyKind::Customer,
            "z",
            RotationSchedule::every(365, 0),
            0,
        )
    }

    #[test]
    fn new_key_has_version_one_active() {
        let k = key();
        assert_eq!(k.active().version, 1);
        assert_eq!(k.versions[0].origin, Origin::Initial);
        assert!(k.version(0).is_none());
        assert!(k.version(2).is_none());
        assert_eq!(k.rotation.next_at, Some(365 * DAY));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("app/db-1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("has space").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert!(validate_name("default").is_err());
        assert!(validate_name(&Uuid::new_v4().to_string()).is_err());
    }

    #[test]
    fn info_never_contains_material() {
        let k = key();
        let json = format!("{:?}", k.info());
        let m = k.active().material.expose();
        assert!(!json.contains(&format!("{:?}", &m[..])));
        assert!(format!("{k:?}").contains("[redacted]"));
    }

    #[test]
    fn disabled_key_is_not_usable() {
        let mut k = key();
        assert!(k.ensure_usable().is_ok());
        k.state = KeyState::Disabled;
        assert_eq!(
            k.ensure_usable().unwrap_err().code(),
            kms_client::proto::ErrorCode::Disabled
        );
        k.state = KeyState::PendingDeletion { delete_at: 5 };
        assert_eq!(
            k.ensure_usable().unwrap_err().code(),
            kms_client::proto::ErrorCode::Disabled
        );
    }
}
