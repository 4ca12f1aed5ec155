//! The background half of replication.
//!
//! - [`run_pushes`] (primaries): whenever a key changes, and at start, every
//!   replica that has not confirmed its primary's active version gets the
//!   key pushed; failures are retried with exponential backoff. So a
//!   version persisted just before a crash is pushed after the restart.
//! - [`run_pulls`] (replicas): at start and every `pull_interval`, each
//!   replica asks its primary for the key, so a replica that was down
//!   catches up even if its primary gave up pushing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Replicator;
use crate::keys::error::error_chain;

/// Pause between pushes to a zone that deleted its replica (refused
/// `forbidden`).
const PARKED: Duration = Duration::from_secs(3600);

/// Whether a push was refused because the zone deleted its replica.
fn refused_as_deleted(e: &super::ReplicateError) -> bool {
    matches!(
        e,
        super::ReplicateError::Peer {
            source: super::transport::PeerError::Refused { reply, .. },
            ..
        } if reply.code == kms_client::proto::ErrorCode::Forbidden
    )
}

/// First pause after a failed push; doubles up to `retry_max`.
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// When a (key, zone) push may next be tried, and the pause after that.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: Instant,
    delay: Duration,
}

impl Backoff {
    fn after_failure(prev: Option<Backoff>, now: Instant, max: Duration) -> Self {
        let delay = prev.map_or(FIRST_RETRY, |b| (b.delay * 2).min(max)).min(max);
        Self {
            next: now + delay,
            delay,
        }
    }
}

type Pending = HashMap<(Uuid, String), Backoff>;

/// Pushes to lagging replicas until `shutdown`.
pub async fn run_pushes(r: Arc<Replicator>, shutdown: CancellationToken) {
    let mut changes = r.keys.subscribe();
    let mut backoff = Pending::new();
    loop {
        push_round(&r, &mut backoff).await;
        let now = Instant::now();
        let until = backoff.values().map(|b| b.next).min();
        let wait = until.map_or(r.settings.pull_interval, |t| t.saturating_duration_since(now));
        tokio::select! {
            res = changes.changed() => if res.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One pass over the replicas that are behind and not backing off.
async fn push_round(r: &Replicator, backoff: &mut Pending) {
    let behind = r.keys.replicas_behind();
    backoff.retain(|(id, zone), _| behind.iter().any(|(i, z, _)| i == id && z == zone));
    for (id, zone, confirmed) in behind {
        let key = (id, zone);
        if backoff.get(&key).is_some_and(|b| b.next > Instant::now()) {
            continue;
        }
        if confirmed.is_some() {
            r.fault_before_push(id, &key.1);
        }
        match r.push_current(id, &key.1).await {
            Ok(version) => {
                tracing::info!(key = %id, zone = %key.1, version, previously = ?confirmed, "replica caught up");
                backoff.remove(&key);
            }
            Err(e) if refused_as_deleted(&e) => {
                // The zone deleted its replica: retrying will not help until
                // an operator unreplicates the key, so ask once an hour.
                if backoff.get(&key).is_none_or(|b| b.delay < PARKED) {
                    tracing::warn!(key = %id, zone = %key.1, error = %error_chain(&e), "the zone deleted its replica; pushes paused until `kmsctl key unreplicate`");
                }
                let b = Backoff {
                    next: Instant::now() + PARKED,
                    delay: PARKED,
                };
                backoff.insert(key, b);
            }
            Err(e) => {
                let b = Backoff::after_failure(backoff.get(&key).copied(), Instant::now(), r.settings.retry_max);
                tracing::warn!(key = %id, zone = %key.1, retry_in_ms = b.delay.as_millis() as u64, error = %error_chain(&e), "push failed");
                backoff.insert(key, b);
            }
        }
    }
}

/// Pulls every replica from its primary, at start and periodically.
pub async fn run_pulls(r: Arc<Replicator>, shutdown: CancellationToken) {
    loop {
        for (id, primary, had) in r.keys.replicas_held() {
            match r.pull(id, &primary).await {
                Ok(now) if now > had => {
                    tracing::info!(key = %id, primary_zone = %primary, from = had, to = now, "replica caught up from its primary")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(key = %id, primary_zone = %primary, error = %error_chain(&e), "pull failed; will retry")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(r.settings.pull_interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let now = Instant::now();
        let max = Duration::from_secs(1);
        let mut b = Backoff::after_failure(None, now, max);
        assert_eq!(b.delay, FIRST_RETRY);
        let mut seen = vec![b.delay];
        for _ in 0..5 {
            b = Backoff::after_failure(Some(b), now, max);
            seen.push(b.delay);
        }
        assert_eq!(seen[1], FIRST_RETRY * 2);
        assert_eq!(*seen.last().unwrap(), max);
        assert_eq!(b.next, now + max);
    }
}
