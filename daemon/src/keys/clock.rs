//! Time behind a trait, so that rotation and deletion schedules are tested
//! by moving a clock rather than by sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kms_client::proto::UnixTime;

/// Seconds in a day.
pub const DAY: u64 = 86_400;

/// A source of "now" in Unix seconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> UnixTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `t`.
    pub fn at(t: UnixTime) -> Self {
        Self(AtomicU64::new(t))
    }

    /// Sets the time.
    pub fn set(&self, t: UnixTime) {
        self.0.store(t, Ordering::SeqCst);
    }

    /// Moves the clock forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }

    /// Moves the clock forward by `days` days.
    pub fn advance_days(&self, days: u64) {
        self.advance(days * DAY);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at(100);
        assert_eq!(c.now(), 100);
        c.advance_days(1);
        assert_eq!(c.now(), 100 + DAY);
        c.set(5);
        assert_eq!(c.now(), 5);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > 1_577_836_800);
    }
}
