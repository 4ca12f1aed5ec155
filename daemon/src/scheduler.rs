//! The rotation and deletion scheduler: sleeps until the next due time,
//! does what is due through [`KeyService::run_due`], and re-plans whenever
//! a key changes. Due work that failed (e.g. disk full) is retried after a
//! pause rather than in a tight loop. What each pass did goes to the audit
//! log.
//!
//! In an etcd fleet it runs only on the daemon that leads the zone
//! (`leader::while_leading`), which cancels `shutdown` the moment
//! leadership is lost: a pass then stops before its next key.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::keys::KeyService;

/// Longest sleep, so that a wall-clock jump is noticed within this time.
const MAX_SLEEP: Duration = Duration::from_secs(600);
/// Pause before retrying due work that failed.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Runs until `shutdown`.
pub async fn run(keys: Arc<KeyService>, audit: Arc<AuditLog>, shutdown: CancellationToken) {
    loop {
        let now = keys.now();
        let (k, stop) = (keys.clone(), shutdown.clone());
        let pass = move || k.run_due_while(now, || !stop.is_cancelled());
        let failed = match tokio::task::spawn_blocking(pass).await {
            Ok(report) => {
                audit.record_due(&report);
                crate::metrics::automatic_rotations(report.rotated.len());
                !report.failed.is_empty()
            }
            Err(e) => {
                tracing::error!(error = %e, "scheduler pass panicked");
                true
            }
        };
        let wait = next_wait(keys.next_due(), keys.now(), failed);
        tracing::debug!(secs = wait.as_secs(), "scheduler sleeping");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = keys.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// How long to sleep given the next due time.
fn next_wait(next_due: Option<u64>, now: u64, failed: bool) -> Duration {
    let until = next_due.map_or(MAX_SLEEP, |t| Duration::from_secs(t.saturating_sub(now)));
    let until = if failed { until.max(RETRY_AFTER) } else { until };
    until.min(MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_due_capped_and_backs_off_after_failure() {
        assert_eq!(next_wait(Some(110), 100, false), Duration::from_secs(10));
        assert_eq!(next_wait(Some(90), 100, false), Duration::ZERO);
        assert_eq!(next_wait(Some(90), 100, true), RETRY_AFTER);
        assert_eq!(next_wait(None, 100, false), MAX_SLEEP);
        assert_eq!(next_wait(Some(100 + 86_400), 100, false), MAX_SLEEP);
    }
}
