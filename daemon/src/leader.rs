//! Who runs a zone's singleton work: scheduled rotations and deletions,
//! and the pushes and pulls of multi-zone keys.
//!
//! With the file store a daemon is alone with its keys and always leads
//! ([`Leadership::sole`]). An etcd fleet elects one daemon per store prefix
//! ([`campaign`]): each daemon grants itself a lease of `lease_ttl`, keeps
//! it alive, and campaigns with it on etcd's election `<prefix>leader`;
//! etcd makes the oldest live candidate the leader. A daemon that dies
//! stops renewing, etcd drops its lease after the TTL, and the next
//! candidate leads. A leader that cannot renew (etcd unreachable, lease
//! gone) stops leading at once, before the lease can have expired at etcd:
//! it steps down when its last renewal etcd confirmed is
//! [`STEP_DOWN`] of the TTL old. A leader also watches its own election
//! key: deleted by hand (`etcdctl del --prefix`), it steps down at once and
//! campaigns again with a new lease, so that the daemons that campaign
//! again elect one leader and every running daemon has a key there again
//! (`kmsd restore` counts them). Leadership is not what keeps work exactly
//! once (two daemons may both lead for a moment across a partition): every
//! write is a compare-and-swap on the record's revision, and due work is
//! decided again on the record read back after a conflict.
//!
//! [`while_leading`] runs a task only while this daemon leads, and stops
//! it (cancel, then wait) as soon as it does not.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::keys::error::error_chain;
use crate::keys::store::{etcd_connect_options, retry_unsent, EtcdSettings, StoreError};

/// Fraction of the TTL after the last confirmed renewal at which a leader
/// steps down (the lease lives at least a TTL after it).
const STEP_DOWN: f64 = 2.0 / 3.0;
/// Renewals per TTL.
const RENEWALS_PER_TTL: u32 = 4;
/// First and longest pause before a failed campaign is tried again.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a leaving daemon waits for etcd to revoke its lease.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether this daemon leads its zone now; cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// Keeps the sender of a daemon that always leads, so that it never
    /// appears to stop.
    _sole: Option<Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// A daemon alone with its store: it always leads.
    pub fn sole() -> Self {
        let (tx, rx) = watch::channel(true);
        Self {
            rx,
            _sole: Some(Arc::new(tx)),
        }
    }

    /// A leadership that `tx` decides.
    fn following(tx: &watch::Sender<bool>) -> Self {
        Self {
            rx: tx.subscribe(),
            _sole: None,
        }
    }

    /// Whether this daemon leads now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this daemon leads; false when it never will again (the
    /// election ended).
    async fn acquired(&mut self) -> bool {
        self.rx.wait_for(|l| *l).await.is_ok()
    }

    /// Waits until this daemon no longer leads.
    async fn lost(&mut self) {
        let _ = self.rx.wait_for(|l| !*l).await;
    }
}

/// Runs `task(stop)` whenever this daemon leads, until `shutdown`: it is
/// started when leadership is won and stopped (`stop` cancelled, then
/// awaited) as soon as it is lost, and started again at the next win.
pub async fn while_leading<F, Fut>(mut leadership: Leadership, shutdown: CancellationToken, mut task: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            won = leadership.acquired() => if !won { return },
            () = shutdown.cancelled() => return,
        }
        let stop = shutdown.child_token();
        let run = task(stop.clone());
        tokio::pin!(run);
        tokio::select! {
            () = &mut run => {
                if shutdown.is_cancelled() {
                    return;
                }
            }
            () = leadership.lost() => {
                stop.cancel();
                run.await;
            }
        }
    }
}

/// The election of the fleet sharing `settings.prefix`: the leadership it
/// decides, and the task that campaigns (run it on the daemon's runtime
/// until `shutdown`; it resigns on the way out).
pub fn campaign(
    settings: &EtcdSettings,
    ttl: Duration,
    shutdown: CancellationToken,
) -> (Leadership, impl Future<Output = ()> + Send + 'static) {
    let (tx, _) = watch::channel(false);
    let leadership = Leadership::following(&tx);
    let election = Election {
        settings: settings.clone(),
        name: format!("{}leader", settings.prefix),
        who: identity(),
        ttl: ttl.max(Duration::from_secs(1)),
        tx,
    };
    (leadership, election.run(shutdown))
}

/// What a daemon calls itself in the election (etcd stores it in the
/// leader's key): host name and pid.
fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host} pid {}", std::process::id())
}

struct Election {
    settings: EtcdSettings,
    name: String,
    who: String,
    ttl: Duration,
    tx: watch::Sender<bool>,
}

/// Why a term ended.
#[derive(Debug, thiserror::Error)]
enum TermError {
    #[error("etcd")]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("etcd no longer holds this daemon's lease")]
    LeaseGone,
    #[error("no lease renewal confirmed by etcd for {0:?}")]
    Silent(Duration),
    #[error("etcd ended the lease's keep-alive stream or the watch of the election key")]
    Closed,
    #[error("this daemon's election key was deleted (not by its lease's expiry)")]
    KeyGone,
}

impl Election {
    async fn run(self, shutdown: CancellationToken) {
        let mut client: Option<Client> = None;
        let mut pause = BACKOFF_MIN;
        let mut lease = None;
        loop {
            let term = tokio::select! {
                t = self.term(&mut client, &mut lease) => t,
                () = shutdown.cancelled() => break,
            };
            // A term that led started from a clean slate: its end is not
            // one more failure in a row.
            if self.step_down() {
                pause = BACKOFF_MIN;
            }
            let e = term.expect_err("a term ends only with an error");
            tracing::warn!(error = %error_chain(&e), retry_in = ?pause, "not campaigning for the zone's scheduled work; trying again");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => break,
            }
            pause = match e {
                // The lease ran out, or the key was deleted, under a live
                // connection: at once.
                TermError::LeaseGone | TermError::KeyGone => BACKOFF_MIN,
                _ => (pause * 2).min(BACKOFF_MAX),
            };
        }
        let _ = self.step_down();
        // Leaving: let the next daemon lead now rather than after the TTL.
        if let (Some(c), Some(id)) = (client, lease) {
            let _ = tokio::time::timeout(REVOKE_TIMEOUT, c.lease_client().revoke(id)).await;
        }
    }

    /// Stops leading; whether it was leading.
    fn step_down(&self) -> bool {
        let was = self.tx.send_replace(false);
        if was {
            tracing::warn!(
                election = %self.name,
                "this daemon no longer runs the zone's scheduled rotations, deletions and replication"
            );
        }
        was
    }

    /// One term: grant a lease, campaign with it, lead while it lives.
    /// Returns only with why it ended.
    async fn term(&self, client: &mut Option<Client>, lease: &mut Option<i64>) -> Result<(), TermError> {
        let c = match client {
            Some(c) => c.clone(),
            None => {
                let options = etcd_connect_options(&self.settings)?;
                let c = Client::connect(self.settings.endpoints.clone(), Some(options)).await?;
                client.insert(c).clone()
            }
        };
        // A lease left by the last term may still make this daemon's old
        // candidate the leader at etcd: give it up so that the election
        // moves on now, not after the TTL.
        if let Some(old) = lease.take() {
            let _ = tokio::time::timeout(REVOKE_TIMEOUT, c.lease_client().revoke(old)).await;
        }
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let granted_at = Instant::now();
        let id = retry_unsent(|| {
            let mut leases = c.lease_client();
            async move { leases.grant(ttl_secs, None).await }
        })
        .await?
        .id();
        *lease = Some(id);
        let (mut keeper, mut answers) = retry_unsent(|| {
            let mut leases = c.lease_client();
            async move { leases.keep_alive(id).await }
        })
        .await?;
        let mut renewal = Renewal::new(self.ttl, granted_at);
        let mut ticks = tokio::time::interval(self.ttl / RENEWALS_PER_TTL);
        let campaign = retry_unsent(|| {
            let (mut election, name, who) = (c.election_client(), self.name.clone(), self.who.clone());
            async move { election.campaign(name, who, id).await }
        });
        tokio::pin!(campaign);
        // Set once leading: the watch of this daemon's election key.
        let mut own: Option<WatchStream> = None;
        // Between winning and leading: the read and watch of that key, run
        // here beside the renewals (a slow etcd must not starve them).
        let mut setup: Option<WatchSetup<'_>> = None;
        loop {
            tokio::select! {
                won = &mut campaign, if own.is_none() && setup.is_none() => {
                    let key = won?.leader().map(|l| l.key().to_vec()).ok_or(TermError::KeyGone)?;
                    setup = Some(Box::pin(watch_own_key(&c, key)));
                }
                watched = async { setup.as_mut().expect("guarded").await }, if setup.is_some() => {
                    setup = None;
                    own = Some(watched?);
                    // Lead only while the lease is surely alive at etcd.
                    if Instant::now() >= renewal.deadline() {
                        return Err(TermError::Silent(renewal.silence()));
                    }
                    self.tx.send_replace(true);
                    tracing::info!(election = %self.name, who = %self.who, "this daemon now runs the zone's scheduled rotations, deletions and replication");
                }
                event = next_message(own.as_mut()) => {
                    let resp = event?.ok_or(TermError::Closed)?;
                    if resp.canceled() || resp.compact_revision() > 0 {
                        return Err(TermError::Closed);
                    }
                    if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        return Err(TermError::KeyGone);
                    }
                }
                _ = ticks.tick() => {
                    keeper.keep_alive().await?;
                    renewal.sent(Instant::now());
                }
                answer = answers.message() => match answer? {
                    Some(a) if a.ttl() > 0 => renewal.confirmed(),
                    Some(_) => return Err(TermError::LeaseGone),
                    None => return Err(TermError::Closed),
                },
                () = tokio::time::sleep_until(renewal.deadline()) => {
                    return Err(TermError::Silent(renewal.silence()));
                }
            }
        }
    }
}

/// A leader's read and watch of its election key, under way.
type WatchSetup<'a> = std::pin::Pin<Box<dyn Future<Output = Result<WatchStream, TermError>> + Send + 'a>>;

/// The watch of this daemon's election `key`, won a moment ago: it must
/// still exist (a deletion before the campaign returned is caught here),
/// and any later deletion shows in the watch, which starts just after the
/// revision at which it was read.
async fn watch_own_key(c: &Client, key: Vec<u8>) -> Result<WatchStream, TermError> {
    let read = retry_unsent(|| {
        let (mut kv, key) = (c.kv_client(), key.clone());
        async move { kv.get(key, Some(GetOptions::new().with_keys_only())).await }
    })
    .await?;
    if read.kvs().is_empty() {
        return Err(TermError::KeyGone);
    }
    let from = read.header().map_or(0, |h| h.revision()) + 1;
    let options = WatchOptions::new().with_start_revision(from);
    Ok(retry_unsent(|| {
        let (mut w, key, options) = (c.watch_client(), key.clone(), options.clone());
        async move { w.watch(key, Some(options)).await }
    })
    .await?)
}

/// The next message of `watch`, or never without one.
async fn next_message(watch: Option<&mut WatchStream>) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match watch {
        Some(w) => w.message().await,
        None => std::future::pending().await,
    }
}

/// When the lease was last known alive at etcd: the send time of the
/// newest renewal etcd confirmed (etcd keeps the lease a TTL after it
/// received that renewal, which is later).
struct Renewal {
    ttl: Duration,
    alive_at: Instant,
    /// Send times of renewals not answered yet, oldest first (etcd
    /// answers in order).
    pending: VecDeque<Instant>,
}

impl Renewal {
    fn new(ttl: Duration, granted_at: Instant) -> Self {
        Self {
            ttl,
            alive_at: granted_at,
            pending: VecDeque::new(),
        }
    }

    fn sent(&mut self, at: Instant) {
        self.pending.push_back(at);
    }

    fn confirmed(&mut self) {
        if let Some(at) = self.pending.pop_front() {
            self.alive_at = self.alive_at.max(at);
        }
    }

    /// When to step down if nothing more is confirmed.
    fn deadline(&self) -> Instant {
        self.alive_at + self.ttl.mul_f64(STEP_DOWN)
    }

    fn silence(&self) -> Duration {
        self.alive_at.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_runs_only_while_leading() {
        let (tx, _) = watch::channel(false);
        let leadership = Leadership::following(&tx);
        let shutdown = CancellationToken::new();
        let (runs, running) = (
            Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let (r, g) = (runs.clone(), running.clone());
        let task = tokio::spawn(while_leading(leadership, shutdown.clone(), move |stop| {
            let (r, g) = (r.clone(), g.clone());
            async move {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                g.store(true, std::sync::atomic::Ordering::SeqCst);
                stop.cancelled().await;
                g.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }));
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0, "not before leading");
        tx.send_replace(true);
        settle().await;
        assert!(running.load(std::sync::atomic::Ordering::SeqCst));
        tx.send_replace(false);
        settle().await;
        assert!(
            !running.load(std::sync::atomic::Ordering::SeqCst),
            "stopped at once on losing"
        );
        tx.send_replace(true);
        settle().await;
        assert_eq!(
            runs.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "started again at the next win"
        );
        shutdown.cancel();
        task.await.unwrap();
        assert!(!running.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_sole_daemon_always_leads() {
        let mut l = Leadership::sole();
        assert!(l.is_leader());
        assert!(l.acquired().await);
        let lost = tokio::time::timeout(Duration::from_millis(100), l.lost()).await;
        assert!(lost.is_err(), "never loses");
    }

    #[test]
    fn a_leader_steps_down_before_its_lease_can_expire() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(6);
        let mut r = Renewal::new(ttl, t0);
        assert_eq!(r.deadline(), t0 + Duration::from_secs(4));
        r.sent(t0 + Duration::from_secs(1));
        r.sent(t0 + Duration::from_secs(2));
        r.confirmed();
        assert_eq!(
            r.deadline(),
            t0 + Duration::from_secs(5),
            "from the send time of the renewal confirmed"
        );
        r.confirmed();
        assert_eq!(r.deadline(), t0 + Duration::from_secs(6));
        r.confirmed();
        assert_eq!(
            r.deadline(),
            t0 + Duration::from_secs(6),
            "an answer to nothing sent moves nothing"
        );
        assert!(
            r.deadline() < t0 + Duration::from_secs(2) + ttl,
            "always before the lease can lapse"
        );
    }
}
