//! Rotation rules, as pure functions on a [`KeyRecord`]: manual rotation
//! (at most 10, never on the default key or a replica), automatic rotation
//! settings (period fixed while enabled), and what is due at a given time.

use kms_client::proto::{KeyRole, KeyState, Origin, UnixTime, MANUAL_ROTATION_LIMIT};

use super::clock::DAY;
use super::error::{Error, Result};
use super::material::Material;
use super::model::{validate_period, KeyRecord, KeyVersion, RotationSchedule};

/// Refuses rotation and its settings on keys that do not own their schedule.
fn ensure_schedule_owner(key: &KeyRecord, what: &str) -> Result<()> {
    if key.is_default() {
        return Err(Error::Forbidden(format!(
            "the default organization key is platform-managed: {what} is not allowed"
        )));
    }
    if let KeyRole::Replica { primary_zone } = &key.role {
        return Err(Error::NotPrimary {
            key: key.label(),
            primary_zone: primary_zone.clone(),
        });
    }
    Ok(())
}

/// Appends a fresh version; it becomes active at once.
fn add_version(key: &mut KeyRecord, origin: Origin, now: UnixTime) -> Option<u32> {
    // An epoch has room for 2^24 versions; at most 10 manual rotations
    // and one automatic rotation a day cannot fill it, but a version
    // numbered past the epoch's range (refused on arrival, see
    // `replica::apply`) must not make this panic.
    let version = key.next_version()?;
    key.versions.push(KeyVersion {
        version,
        created_at: now,
        origin,
        material: Material::random(),
    });
    Some(version)
}

/// A manual rotation: the new version is active at once; the automatic
/// schedule does not move.
///
/// # Errors
/// `Forbidden` (default key), `NotPrimary` (replica), `Disabled`,
/// `LimitExceeded` after 10 manual rotations.
pub fn rotate_manual(key: &mut KeyRecord, now: UnixTime) -> Result<u32> {
    ensure_schedule_owner(key, "manual rotation")?;
    key.ensure_usable()?;
    if key.manual_rotations >= MANUAL_ROTATION_LIMIT {
        return Err(Error::LimitExceeded {
            key: key.label(),
            limit: MANUAL_ROTATION_LIMIT,
        });
    }
    let version = add_version(key, Origin::Manual, now).ok_or_else(|| Error::LimitExceeded {
        key: key.label(),
        limit: 1 << super::model::EPOCH_SHIFT,
    })?;
    key.manual_rotations += 1;
    Ok(version)
}

/// Is an automatic rotation due at `now`? Only enabled keys that own their
/// schedule rotate; a disabled key's overdue rotation waits until it is
/// enabled again.
pub fn rotation_due(key: &KeyRecord, now: UnixTime) -> bool {
    key.state == KeyState::Enabled
        && !matches!(key.role, KeyRole::Replica { .. })
        && key.rotation.enabled
        && key.rotation.next_at.is_some_and(|t| t <= now)
}

/// Performs the due automatic rotation: one new version however many periods
/// were missed, next one a full period after `now`.
///
/// Returns the new version, or `None` if nothing was due.
pub fn rotate_automatic(key: &mut KeyRecord, now: UnixTime) -> Option<u32> {
    if !rotation_due(key, now) {
        return None;
    }
    let Some(v) = add_version(key, Origin::Automatic, now) else {
        tracing::error!(key = %key.label(), "no version number left in this epoch; automatic rotation skipped");
        key.rotation.next_at = Some(now + u64::from(key.rotation.period_days) * DAY);
        return None;
    };
    key.rotation.next_at = Some(now + u64::from(key.rotation.period_days) * DAY);
    Some(v)
}

/// Enables automatic rotation with `period` days (default 365). Enabling
/// with the same period is a no-op; a different period while enabled is
/// refused.
///
/// Returns whether anything changed.
///
/// # Errors
/// `Forbidden`, `NotPrimary`, `InvalidArgument` for a bad period,
/// `RotationEnabled` when enabled with another period.
pub fn enable_rotation(key: &mut KeyRecord, period: Option<u32>, now: UnixTime) -> Result<bool> {
    ensure_schedule_owner(key, "changing the rotation schedule")?;
    let period = period.unwrap_or(kms_client::proto::DEFAULT_ROTATION_DAYS);
    validate_period(period)?;
    if key.rotation.enabled {
        if key.rotation.period_days == period {
            return Ok(false);
        }
        return Err(Error::RotationEnabled {
            period: key.rotation.period_days,
        });
    }
    key.rotation = RotationSchedule::every(period, now);
    Ok(true)
}

/// Disables automatic rotation. Returns whether anything changed.
///
/// # Errors
/// `Forbidden` (default key), `NotPrimary` (replica).
pub fn disable_rotation(key: &mut KeyRecord) -> Result<bool> {
    ensure_schedule_owner(key, "disabling automatic rotation")?;
    if !key.rotation.enabled {
        return Ok(false);
    }
    key.rotation = RotationSchedule::off(key.rotation.period_days);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_client::proto::{ErrorCode, KeyKind};
    use uuid::Uuid;

    const T0: UnixTime = 1_700_000_000;

    fn customer() -> KeyRecord {
        KeyRecord::new(
            Uuid::new_v4(),
            KeyKind::Customer,
            "a",
            RotationSchedule::every(365, T0),
            T0,
        )
    }

    fn default_key() -> KeyRecord {
        KeyRecord::new(
            Uuid::new_v4(),
            KeyKind::DefaultOrganization,
            "a",
            RotationSchedule::every(365, T0),
            T0,
        )
    }

    fn replica() -> KeyRecord {
        let mut k = customer();
        k.role = KeyRole::Replica {
            primary_zone: "zone-a".into(),
        };
        k
    }

    #[test]
    fn ten_manual_rotations_then_limit_exceeded() {
        let mut k = customer();
        for i in 0..10 {
            assert_eq!(rotate_manual(&mut k, T0 + i).unwrap(), i as u32 + 2);
        }
        let err = rotate_manual(&mut k, T0 + 11).unwrap_err();
        assert_eq!(err.code(), ErrorCode::LimitExceeded);
        assert_eq!(k.versions.len(), 11, "a refused rotation adds no version");
        assert_eq!(k.manual_rotations, 10);
    }

    #[test]
    fn manual_rotation_does_not_move_schedule() {
        let mut k = customer();
        let before = k.rotation.clone();
        rotate_manual(&mut k, T0 + 100 * DAY).unwrap();
        assert_eq!(k.rotation, before);
        assert_eq!(k.active().origin, Origin::Manual);
    }

    #[test]
    fn new_version_is_active_and_old_kept() {
        let mut k = customer();
        let v1 = k.active().material.clone();
        rotate_manual(&mut k, T0 + 1).unwrap();
        assert_eq!(k.active().version, 2);
        assert_eq!(k.version(1).unwrap().material, v1);
        assert_ne!(k.active().material, v1);
    }

    #[test]
    fn period_change_refused_while_enabled() {
        let mut k = customer();
        assert!(
            !enable_rotation(&mut k, Some(365), T0).unwrap(),
            "same period is a no-op"
        );
        assert!(!enable_rotation(&mut k, None, T0).unwrap(), "default period is 365");
        let err = enable_rotation(&mut k, Some(90), T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::RotationEnabled);
        assert_eq!(k.rotation.period_days, 365);
        assert!(disable_rotation(&mut k).unwrap());
        assert!(k.rotation.next_at.is_none());
        assert!(enable_rotation(&mut k, Some(90), T0 + 5).unwrap());
        assert_eq!(k.rotation.period_days, 90);
        assert_eq!(k.rotation.next_at, Some(T0 + 5 + 90 * DAY));
    }

    #[test]
    fn bad_periods_refused() {
        let mut k = customer();
        disable_rotation(&mut k).unwrap();
        assert_eq!(
            enable_rotation(&mut k, Some(0), T0).unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            enable_rotation(&mut k, Some(3651), T0).unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        assert!(!k.rotation.enabled);
    }

    #[test]
    fn default_key_refuses_manual_rotation_and_schedule_changes() {
        let mut k = default_key();
        let before = k.clone();
        assert_eq!(rotate_manual(&mut k, T0).unwrap_err().code(), ErrorCode::Forbidden);
        assert_eq!(disable_rotation(&mut k).unwrap_err().code(), ErrorCode::Forbidden);
        assert_eq!(
            enable_rotation(&mut k, Some(365), T0).unwrap_err().code(),
            ErrorCode::Forbidden
        );
        assert_eq!(
            enable_rotation(&mut k, Some(30), T0).unwrap_err().code(),
            ErrorCode::Forbidden
        );
        let msg = rotate_manual(&mut k, T0).unwrap_err().to_string();
        assert!(msg.contains("platform-managed"), "{msg}");
        assert_eq!(k, before);
    }

    #[test]
    fn default_key_still_rotates_automatically() {
        let mut k = default_key();
        assert_eq!(rotate_automatic(&mut k, T0 + 365 * DAY), Some(2));
        assert_eq!(k.active().origin, Origin::Automatic);
    }

    #[test]
    fn replica_refuses_rotation_naming_primary_zone() {
        let mut k = replica();
        let err = rotate_manual(&mut k, T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotPrimary);
        assert!(err.to_string().contains("zone-a"));
        assert_eq!(disable_rotation(&mut k).unwrap_err().code(), ErrorCode::NotPrimary);
        assert_eq!(
            enable_rotation(&mut k, None, T0).unwrap_err().code(),
            ErrorCode::NotPrimary
        );
        assert_eq!(
            rotate_automatic(&mut k, T0 + 400 * DAY),
            None,
            "replicas never rotate on their own"
        );
    }

    #[test]
    fn disabled_key_refuses_manual_rotation() {
        let mut k = customer();
        k.state = KeyState::Disabled;
        assert_eq!(rotate_manual(&mut k, T0).unwrap_err().code(), ErrorCode::Disabled);
        assert_eq!(k.manual_rotations, 0);
    }

    #[test]
    fn automatic_rotation_only_when_due_and_once_for_missed_periods() {
        let mut k = customer();
        assert_eq!(rotate_automatic(&mut k, T0 + 364 * DAY), None);
        let late = T0 + 3 * 365 * DAY + 10;
        assert_eq!(rotate_automatic(&mut k, late), Some(2));
        assert_eq!(rotate_automatic(&mut k, late), None, "missed periods rotate once");
        assert_eq!(k.rotation.next_at, Some(late + 365 * DAY));
    }

    #[test]
    fn disabled_rotation_or_key_never_rotates() {
        let mut k = customer();
        disable_rotation(&mut k).unwrap();
        assert_eq!(rotate_automatic(&mut k, T0 + 1000 * DAY), None);
        let mut k = customer();
        k.state = KeyState::Disabled;
        assert_eq!(rotate_automatic(&mut k, T0 + 1000 * DAY), None);
    }
}
