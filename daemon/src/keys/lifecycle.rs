//! Key state rules: enable, disable, scheduled deletion (7–30 days, default
//! 30, cancellable until then). The default organization key refuses all of
//! them but enable (it is never disabled).

use kms_client::proto::{KeyState, UnixTime};

use super::clock::DAY;
use super::error::{Error, Result};
use super::model::KeyRecord;

/// Allowed deletion waiting periods, in days.
pub const DELETION_DAYS: std::ops::RangeInclusive<u32> = 7..=30;
/// Default deletion waiting period, in days.
pub const DEFAULT_DELETION_DAYS: u32 = 30;

fn ensure_not_default(key: &KeyRecord, what: &str) -> Result<()> {
    if key.is_default() {
        return Err(Error::Forbidden(format!(
            "the default organization key is platform-managed: {what} is not allowed"
        )));
    }
    Ok(())
}

fn ensure_not_pending(key: &KeyRecord, what: &str) -> Result<()> {
    if let KeyState::PendingDeletion { .. } = key.state {
        return Err(Error::Disabled {
            key: key.label(),
            state: format!("{}; cancel the deletion before you {what} it", key.state),
        });
    }
    Ok(())
}

/// Enables a disabled key. Returns whether anything changed.
///
/// # Errors
/// `Disabled` while deletion is pending (cancel it first).
pub fn enable_key(key: &mut KeyRecord) -> Result<bool> {
    ensure_not_pending(key, "enable")?;
    let changed = key.state != KeyState::Enabled;
    key.state = KeyState::Enabled;
    Ok(changed)
}

/// Disables a key: it serves nothing until enabled again.
///
/// # Errors
/// `Forbidden` for the default key; `Disabled` while deletion is pending.
pub fn disable_key(key: &mut KeyRecord) -> Result<bool> {
    ensure_not_default(key, "disabling")?;
    ensure_not_pending(key, "disable")?;
    let changed = key.state != KeyState::Disabled;
    key.state = KeyState::Disabled;
    Ok(changed)
}

/// Schedules deletion `days` (7–30, default 30) after `now`. Returns the
/// deletion time.
///
/// # Errors
/// `Forbidden` for the default key, `InvalidArgument` for a bad period,
/// `Disabled` if deletion is already pending.
pub fn schedule_deletion(key: &mut KeyRecord, days: Option<u32>, now: UnixTime) -> Result<UnixTime> {
    ensure_not_default(key, "deletion")?;
    let days = days.unwrap_or(DEFAULT_DELETION_DAYS);
    if !DELETION_DAYS.contains(&days) {
        return Err(Error::InvalidArgument(format!(
            "deletion waiting period {days} days is outside {}..={} days",
            DELETION_DAYS.start(),
            DELETION_DAYS.end()
        )));
    }
    ensure_not_pending(key, "reschedule")?;
    let delete_at = now + u64::from(days) * DAY;
    key.state = KeyState::PendingDeletion { delete_at };
    Ok(delete_at)
}

/// Cancels a pending deletion; the key comes back disabled, as in a cloud
/// KMS, so that nothing starts using it by surprise.
///
/// # Errors
/// `InvalidArgument` when no deletion is pending.
pub fn cancel_deletion(key: &mut KeyRecord) -> Result<()> {
    match key.state {
        KeyState::PendingDeletion { .. } => {
            key.state = KeyState::Disabled;
            Ok(())
        }
        _ => Err(Error::InvalidArgument(format!(
            "key {} has no pending deletion",
            key.label()
        ))),
    }
}

/// Is the key due for deletion at `now`?
pub fn deletion_due(key: &KeyRecord, now: UnixTime) -> bool {
    matches!(key.state, KeyState::PendingDeletion { delete_at } if delete_at <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::model::RotationSchedule;
    use kms_client::proto::{ErrorCode, KeyKind};
    use uuid::Uuid;

    const T0: UnixTime = 1_700_000_000;

    fn key(kind: KeyKind) -> KeyRecord {
        KeyRecord::new(Uuid::new_v4(), kind, "a", RotationSchedule::every(365, T0), T0)
    }

    #[test]
    fn deletion_waits_between_7_and_30_days() {
        let mut k = key(KeyKind::Customer);
        for bad in [0, 6, 31] {
            assert_eq!(
                schedule_deletion(&mut k, Some(bad), T0).unwrap_err().code(),
                ErrorCode::InvalidArgument
            );
        }
        assert_eq!(k.state, KeyState::Enabled);
        assert_eq!(schedule_deletion(&mut k, None, T0).unwrap(), T0 + 30 * DAY);
        assert!(!deletion_due(&k, T0 + 30 * DAY - 1));
        assert!(deletion_due(&k, T0 + 30 * DAY));
        let mut k = key(KeyKind::Customer);
        assert_eq!(schedule_deletion(&mut k, Some(7), T0).unwrap(), T0 + 7 * DAY);
    }

    #[test]
    fn cancelled_deletion_leaves_key_disabled() {
        let mut k = key(KeyKind::Customer);
        schedule_deletion(&mut k, Some(7), T0).unwrap();
        assert_eq!(enable_key(&mut k).unwrap_err().code(), ErrorCode::Disabled);
        cancel_deletion(&mut k).unwrap();
        assert_eq!(k.state, KeyState::Disabled);
        assert!(!deletion_due(&k, T0 + 100 * DAY));
        assert_eq!(cancel_deletion(&mut k).unwrap_err().code(), ErrorCode::InvalidArgument);
        assert!(enable_key(&mut k).unwrap());
    }

    #[test]
    fn default_key_refuses_disable_and_deletion() {
        let mut k = key(KeyKind::DefaultOrganization);
        assert_eq!(disable_key(&mut k).unwrap_err().code(), ErrorCode::Forbidden);
        assert_eq!(
            schedule_deletion(&mut k, None, T0).unwrap_err().code(),
            ErrorCode::Forbidden
        );
        assert_eq!(k.state, KeyState::Enabled);
    }

    #[test]
    fn enable_disable_report_changes() {
        let mut k = key(KeyKind::Customer);
        assert!(!enable_key(&mut k).unwrap());
        assert!(disable_key(&mut k).unwrap());
        assert!(!disable_key(&mut k).unwrap());
        assert!(enable_key(&mut k).unwrap());
    }
}
