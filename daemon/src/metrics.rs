//! The Prometheus endpoint (`[metrics] listen`) and what it reports.
//!
//! - [`install`] binds the exporter and makes it the global recorder.
//! - [`RequestMetrics`] is the [`Observer`] of answered requests. Its
//!   handles are registered once at start for every (operation, outcome)
//!   pair, so recording a request is a table lookup and an atomic add: no
//!   lock and no label allocation on the hot path.
//! - [`run_state`] copies what describes state (keys, versions,
//!   connections, replication, filesystems) into gauges and counters every
//!   few seconds and after key changes, never per request.
//!
//! Series (all prefixed `kmsd_`; see README "Metrics"):
//! `requests_total{op,outcome}`, `request_duration_seconds{op}`,
//! `bytes_encrypted_total`, `bytes_decrypted_total`,
//! `rotations_total{kind}`, `connections_open`, `connections_refused_total`, `keys{state}`,
//! `key_versions{key,name}`, `replication_pushes_total{outcome}`,
//! `replication_pulls_total{outcome}`, `replication_frames_rejected_total`,
//! `replica_lag_versions{key,zone}`, `fs_operations_total{mount,op}`,
//! `fs_dek_cache_total{mount,result}`, `fs_tamper_detections_total{mount}`,
//! `fs_bytes_total{mount,direction}`, `build_info{version}`; and
//! `kubernetes_requests_total{method,outcome}`, counted by the Kubernetes
//! plugin (`kubernetes/plugin.rs`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use kms_client::proto::{ErrorCode, KeyInfo, KeyState, Op, Response};

use crate::keys::Caller;
use crate::observe::{Observation, Observer};
use crate::ops::Daemon;

/// Outcomes: `ok`, then every error code in `ErrorCode::ALL` order.
const OUTCOMES: usize = 1 + ErrorCode::ALL.len();

/// Histogram buckets of request durations: 10µs to 1s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
];

/// How often [`run_state`] refreshes the state gauges at the latest.
const STATE_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest pause between two refreshes, however often keys change.
const STATE_MIN_GAP: Duration = Duration::from_millis(500);

/// Start-up failures of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr} (metrics.listen; \"\" turns metrics off)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a metrics recorder is already installed in this process")]
    AlreadyInstalled,
}

/// How often histogram samples are folded into buckets. Until then each
/// sample is kept (about 24 bytes), so at 150k requests/s this bounds the
/// backlog to a few MiB instead of the exporter's default 5 s worth.
const UPKEEP: Duration = Duration::from_secs(1);

/// Gauges not set for this long leave the scrape: the versions of a deleted
/// key, the lag of a replica no longer configured. [`refresh`] sets every
/// live gauge (build info included) well within it.
const GAUGE_IDLE: Duration = Duration::from_secs(30);

/// The exporter configuration: our buckets, an HTTP listener on `addr`.
fn builder(gauge_idle: Duration) -> PrometheusBuilder {
    PrometheusBuilder::new()
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(gauge_idle))
        .set_buckets_for_metric(Matcher::Full("kmsd_request_duration_seconds".into()), &DURATION_BUCKETS)
        .expect("DURATION_BUCKETS is not empty")
}

/// The metrics endpoint: the process-wide recorder, and the address it is
/// served on, which a configuration reload may change or turn off. Its
/// tasks (listener, connections, upkeep) run on the daemon's tracker and
/// end at [`Endpoint::close`].
#[derive(Debug)]
pub struct Endpoint {
    handle: PrometheusHandle,
    /// The address served and the token that stops serving it.
    serving: parking_lot::Mutex<Option<(SocketAddr, CancellationToken)>>,
    tasks: TaskTracker,
    /// Cancelled by [`Endpoint::close`]; the parent of every `serving` token.
    closed: CancellationToken,
}

/// Installs the global recorder (always: recording is cheap, and a reload
/// may turn the endpoint on) and serves it on `addr` (nothing when `None`),
/// with its tasks on `tasks`. Must run inside the Tokio runtime.
///
/// # Errors
/// The address cannot be bound (busy, not local); a recorder is already
/// installed.
pub fn install(addr: Option<SocketAddr>, tasks: &TaskTracker) -> Result<Arc<Endpoint>, MetricsError> {
    let recorder = builder(GAUGE_IDLE).build_recorder();
    let handle = recorder.handle();
    let endpoint = Arc::new(Endpoint {
        handle,
        serving: parking_lot::Mutex::new(None),
        tasks: tasks.clone(),
        closed: CancellationToken::new(),
    });
    endpoint.listen(addr)?;
    set_recorder(recorder)?;
    describe();
    let (upkeep, closed) = (endpoint.handle.clone(), endpoint.closed.clone());
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(UPKEEP) => upkeep.run_upkeep(),
                _ = closed.cancelled() => return,
            }
        }
    });
    Ok(endpoint)
}

impl Endpoint {
    /// Serves on `addr`, or stops serving for `None`. The new address is
    /// bound before the old one is let go, so a failure changes nothing.
    ///
    /// # Errors
    /// `Listen` when `addr` cannot be bound.
    pub fn listen(&self, addr: Option<SocketAddr>) -> Result<(), MetricsError> {
        let mut serving = self.serving.lock();
        if serving.as_ref().map(|(a, _)| *a) == addr {
            return Ok(());
        }
        let next = match addr {
            Some(addr) => {
                let bind = || {
                    let l = std::net::TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                };
                let listener = bind().map_err(|source| MetricsError::Listen { addr, source })?;
                tracing::info!(%addr, "serving Prometheus metrics");
                let stop = self.closed.child_token();
                let server = Server {
                    handle: self.handle.clone(),
                    tasks: self.tasks.clone(),
                    closed: self.closed.clone(),
                };
                self.tasks.spawn(server.serve(listener, stop.clone()));
                Some((addr, stop))
            }
            None => None,
        };
        if let Some((old, stop)) = serving.take() {
            stop.cancel();
            tracing::info!(addr = %old, "no longer serving metrics there");
        }
        *serving = next;
        Ok(())
    }

    /// Stops serving for good and ends the endpoint's tasks (at shutdown,
    /// once the socket's clients are answered).
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// What the task serving one address needs.
struct Server {
    handle: PrometheusHandle,
    tasks: TaskTracker,
    /// Ends the connections too (the endpoint is closed).
    closed: CancellationToken,
}

impl Server {
    /// Answers `GET /metrics` with the rendered text, one request per
    /// connection, each bounded in size and time, until `stop` (another
    /// address, or none). Connections already accepted are answered unless
    /// the endpoint closes.
    async fn serve(self, listener: tokio::net::TcpListener, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (handle, closed) = (self.handle.clone(), self.closed.clone());
            self.tasks.spawn(async move {
                let answered = tokio::time::timeout(Duration::from_secs(10), answer(stream, &handle));
                tokio::select! {
                    _ = answered => {}
                    _ = closed.cancelled() => {}
                }
            });
        }
    }
}

async fn answer(mut stream: tokio::net::TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET / ");
    let (status, body) = if wanted {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "not found\n".into())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

fn set_recorder(recorder: PrometheusRecorder) -> Result<(), MetricsError> {
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)
}

/// Help texts, the build info and the series that should read 0 rather
/// than be absent before their first event.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("kmsd_requests_total", "Answered requests by operation and outcome");
    describe_histogram!(
        "kmsd_request_duration_seconds",
        Unit::Seconds,
        "Time from decoded request to response"
    );
    describe_counter!(
        "kmsd_bytes_encrypted_total",
        Unit::Bytes,
        "Plaintext bytes encrypted or wrapped"
    );
    describe_counter!(
        "kmsd_bytes_decrypted_total",
        Unit::Bytes,
        "Plaintext bytes decrypted or unwrapped"
    );
    describe_counter!("kmsd_rotations_total", "Key rotations by kind (manual, automatic)");
    describe_gauge!("kmsd_connections_open", "Client connections open");
    describe_counter!(
        "kmsd_connections_refused_total",
        "Client connections closed at accept by [limits] (too many in all or for one uid)"
    );
    describe_gauge!("kmsd_keys", "Keys by state");
    describe_gauge!("kmsd_key_versions", "Versions held per key");
    describe_gauge!("kmsd_build_info", "Always 1; the labels name the build");
    describe_gauge!(
        "kmsd_store_up",
        "1 while the key store answers (etcd: the change stream is open), else 0"
    );
    describe_gauge!(
        "kmsd_leader",
        "1 while this daemon runs its zone's scheduled rotations, deletions and replication"
    );
    describe_counter!(
        "kmsd_replication_pushes_total",
        "Pushes of key versions to replica zones by outcome"
    );
    describe_counter!("kmsd_replication_pulls_total", "Pulls from primary zones by outcome");
    describe_counter!(
        "kmsd_replication_frames_rejected_total",
        "Replication frames refused from peers"
    );
    describe_gauge!(
        "kmsd_replica_lag_versions",
        "Versions a replica zone is behind its primary key"
    );
    describe_counter!(
        "kmsd_fs_operations_total",
        "Encrypted filesystem operations by mount and kind"
    );
    describe_counter!("kmsd_fs_dek_cache_total", "File opens by DEK cache result (hit, miss)");
    describe_counter!(
        "kmsd_fs_tamper_detections_total",
        "Reads refused because a file was tampered with"
    );
    describe_counter!(
        "kmsd_fs_bytes_total",
        Unit::Bytes,
        "Plaintext bytes read and written through mounts"
    );
    build_info();
    for kind in ["manual", "automatic"] {
        counter!("kmsd_rotations_total", "kind" => kind).absolute(0);
    }
}

fn build_info() {
    gauge!("kmsd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Counts automatic rotations done by the scheduler.
pub fn automatic_rotations(n: usize) {
    if n > 0 {
        counter!("kmsd_rotations_total", "kind" => "automatic").increment(n as u64);
    }
}

/// Request counters and durations, recorded without locks.
#[derive(Debug)]
pub struct RequestMetrics {
    /// `Op::ALL.len() * OUTCOMES` counters, a row per operation.
    requests: Vec<Counter>,
    /// One histogram per operation, in `Op::ALL` order.
    durations: Vec<Histogram>,
    encrypted: Counter,
    decrypted: Counter,
    manual_rotations: Counter,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `ok`, then the error codes, as label values.
fn outcome_names() -> impl Iterator<Item = &'static str> {
    std::iter::once("ok").chain(ErrorCode::ALL.iter().map(|c| c.as_str()))
}

fn outcome_index(r: &Response) -> usize {
    match r {
        Response::Error(e) => 1 + ErrorCode::ALL.iter().position(|c| *c == e.code).unwrap_or(0),
        _ => 0,
    }
}

impl RequestMetrics {
    /// Registers every handle with the recorder installed now; call after
    /// [`install`].
    pub fn new() -> Self {
        let mut requests = Vec::with_capacity(Op::ALL.len() * OUTCOMES);
        for op in Op::ALL {
            for outcome in outcome_names() {
                requests.push(counter!("kmsd_requests_total", "op" => op.name(), "outcome" => outcome));
            }
        }
        let durations = Op::ALL
            .iter()
            .map(|op| metrics::histogram!("kmsd_request_duration_seconds", "op" => op.name()))
            .collect();
        Self {
            requests,
            durations,
            encrypted: counter!("kmsd_bytes_encrypted_total"),
            decrypted: counter!("kmsd_bytes_decrypted_total"),
            manual_rotations: counter!("kmsd_rotations_total", "kind" => "manual"),
        }
    }

    /// What a successful answer did: plaintext bytes in or out, a manual
    /// rotation.
    fn count_effects(&self, o: &Observation<'_>) {
        match (o.subject.op, o.response) {
            (Op::Encrypt | Op::Wrap | Op::WrapBatch, Response::Blob(_) | Response::Blobs(_)) => {
                self.encrypted.increment(o.subject.plaintext_in as u64);
            }
            (_, Response::Plaintext(p)) => self.decrypted.increment(p.len() as u64),
            (_, Response::Plaintexts(ps)) => {
                let n: usize = ps.iter().filter_map(|p| p.as_ref().ok()).map(|p| p.len()).sum();
                self.decrypted.increment(n as u64);
            }
            (Op::RotateKey, Response::Key(_)) => self.manual_rotations.increment(1),
            _ => {}
        }
    }
}

impl Observer for RequestMetrics {
    fn observe(&self, o: &Observation<'_>) {
        let i = o.subject.op.index();
        self.requests[i * OUTCOMES + outcome_index(o.response)].increment(1);
        self.durations[i].record(o.elapsed.as_secs_f64());
        self.count_effects(o);
    }
}

/// Refreshes the state series until `shutdown`: right away, after key
/// changes (at most every [`STATE_MIN_GAP`]) and every [`STATE_INTERVAL`].
pub async fn run_state(daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let mut changes = daemon.keys.subscribe();
    loop {
        let d = daemon.clone();
        if tokio::task::spawn_blocking(move || refresh(&d)).await.is_err() {
            tracing::error!("metrics refresh panicked");
        }
        tokio::select! {
            _ = tokio::time::sleep(STATE_MIN_GAP) => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(STATE_INTERVAL - STATE_MIN_GAP) => {}
            _ = changes.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One pass over the state series.
pub fn refresh(d: &Daemon) {
    build_info();
    gauge!("kmsd_connections_open").set(d.connections.load(Ordering::Relaxed) as f64);
    metrics::counter!("kmsd_connections_refused_total").absolute(d.connections_refused.load(Ordering::Relaxed));
    let keys = d.keys.list(&Caller::internal());
    key_gauges(&keys);
    let up = d.keys.store_health().problem.is_none();
    gauge!("kmsd_store_up").set(if up { 1.0 } else { 0.0 });
    gauge!("kmsd_leader").set(if d.leadership.is_leader() { 1.0 } else { 0.0 });
    if let Some(r) = &d.replication {
        replication(&r.stats, &keys);
    }
    for stats in d.mounts.stats() {
        fs_counters(&stats);
    }
}

fn state_name(s: KeyState) -> &'static str {
    match s {
        KeyState::Enabled => "enabled",
        KeyState::Disabled => "disabled",
        KeyState::PendingDeletion { .. } => "pending-deletion",
    }
}

fn key_gauges(keys: &[KeyInfo]) {
    let mut by_state = [("enabled", 0u32), ("disabled", 0), ("pending-deletion", 0)];
    for k in keys {
        if let Some(slot) = by_state.iter_mut().find(|(s, _)| *s == state_name(k.state)) {
            slot.1 += 1;
        }
        // Ids only: whoever reaches the endpoint must not learn key names
        // (`key list` shows a caller only the keys it may use).
        gauge!("kmsd_key_versions", "key" => k.id.to_string()).set(f64::from(k.versions.len() as u32));
    }
    for (state, n) in by_state {
        gauge!("kmsd_keys", "state" => state).set(f64::from(n));
    }
}

fn replication(s: &crate::replication::ReplicationStats, keys: &[KeyInfo]) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    for (outcome, c) in [
        ("ok", &s.pushes_ok),
        ("refused", &s.pushes_refused),
        ("failed", &s.pushes_failed),
    ] {
        counter!("kmsd_replication_pushes_total", "outcome" => outcome).absolute(get(c));
    }
    for (outcome, c) in [("ok", &s.pulls_ok), ("failed", &s.pulls_failed)] {
        counter!("kmsd_replication_pulls_total", "outcome" => outcome).absolute(get(c));
    }
    counter!("kmsd_replication_frames_rejected_total").absolute(get(&s.frames_rejected));
    for k in keys {
        for (zone, lag) in crate::replication::replica_lag(k) {
            gauge!("kmsd_replica_lag_versions", "key" => k.id.to_string(), "zone" => zone).set(f64::from(lag));
        }
    }
}

fn fs_counters(s: &kms_client::proto::FsStatsInfo) {
    let m = || s.mount.clone();
    for (op, n) in &s.ops {
        counter!("kmsd_fs_operations_total", "mount" => m(), "op" => op.clone()).absolute(*n);
    }
    for (result, n) in [("hit", s.dek_cache_hits), ("miss", s.dek_cache_misses)] {
        counter!("kmsd_fs_dek_cache_total", "mount" => m(), "result" => result).absolute(n);
    }
    counter!("kmsd_fs_tamper_detections_total", "mount" => m()).absolute(s.tamper_detections);
    for (direction, n) in [("read", s.bytes_read), ("written", s.bytes_written)] {
        counter!("kmsd_fs_bytes_total", "mount" => m(), "direction" => direction).absolute(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Subject;
    use kms_client::proto::{Context, ErrorReply, Request};
    use metrics_exporter_prometheus::PrometheusHandle;

    fn local() -> (PrometheusRecorder, PrometheusHandle) {
        local_idle(GAUGE_IDLE)
    }

    fn local_idle(gauge_idle: Duration) -> (PrometheusRecorder, PrometheusHandle) {
        let recorder = builder(gauge_idle).build_recorder();
        let handle = recorder.handle();
        (recorder, handle)
    }

    fn observe(m: &RequestMetrics, req: &Request, response: Response) {
        let subject = Subject::of(req);
        let caller = Caller::process(1, 1, Some(2));
        m.observe(&Observation {
            subject: &subject,
            caller: &caller,
            response: &response,
            sealed_with: None,
            elapsed: Duration::from_micros(30),
        });
    }

    fn wrap(dek_len: usize) -> Request {
        Request::Wrap {
            key: "app".into(),
            dek: vec![0; dek_len].into(),
            context: Context::new(),
        }
    }

    fn unwrap_req() -> Request {
        Request::Unwrap {
            blob: vec![1, 2, 3],
            context: Context::new(),
        }
    }

    /// A daemon with two keys, one of them disabled and rotated once.
    fn daemon() -> (tempfile::TempDir, Daemon) {
        use crate::keys::{KeyService, ManualClock, RootKey};
        let dir = crate::testutil::private_dir().unwrap();
        let clock = Arc::new(ManualClock::at(1_750_000_000));
        let keys = KeyService::open(dir.path(), RootKey::from_bytes(&[42; 32]), "z", clock).unwrap();
        let admin = Caller::internal();
        for name in ["app", "old"] {
            let req = kms_client::proto::CreateKey {
                name: Some(name.into()),
                ..Default::default()
            };
            keys.create_key(&admin, &req).unwrap();
        }
        keys.rotate(&admin, "old").unwrap();
        keys.disable_key(&admin, "old").unwrap();
        let d = Daemon::new(Arc::new(keys), Arc::new(crate::mounts::Mounts::default()));
        (dir, d)
    }

    fn has(body: &str, line: &str) -> bool {
        body.lines().any(|l| l == line)
    }

    #[test]
    fn counts_requests_by_op_and_outcome_with_bytes_and_durations() {
        let (recorder, handle) = local();
        let m = metrics::with_local_recorder(&recorder, RequestMetrics::new);
        for _ in 0..3 {
            observe(&m, &wrap(32), Response::Blob(vec![0; 80]));
        }
        observe(&m, &unwrap_req(), Response::Plaintext(vec![0; 32].into()));
        let failed = Response::Error(ErrorReply::new(ErrorCode::DecryptFailed, "x"));
        observe(&m, &unwrap_req(), failed);
        observe(&m, &Request::RotateKey { key: "app".into() }, Response::Done);
        let body = handle.render();
        for line in [
            r#"kmsd_requests_total{op="wrap",outcome="ok"} 3"#,
            r#"kmsd_requests_total{op="unwrap",outcome="ok"} 1"#,
            r#"kmsd_requests_total{op="unwrap",outcome="decrypt-failed"} 1"#,
            r#"kmsd_requests_total{op="key-rotate",outcome="ok"} 1"#,
            r#"kmsd_requests_total{op="status",outcome="internal"} 0"#,
            "kmsd_bytes_encrypted_total 96",
            "kmsd_bytes_decrypted_total 32",
            r#"kmsd_request_duration_seconds_bucket{op="wrap",le="0.00001"} 0"#,
            r#"kmsd_request_duration_seconds_bucket{op="wrap",le="0.00005"} 3"#,
            r#"kmsd_request_duration_seconds_count{op="wrap"} 3"#,
        ] {
            assert!(has(&body, line), "missing {line} in\n{body}");
        }
        // Only a `Key` answer is a rotation; `Done` above is not.
        assert!(has(&body, r#"kmsd_rotations_total{kind="manual"} 0"#), "{body}");
    }

    #[test]
    fn a_successful_key_rotate_counts_a_manual_rotation() {
        let (recorder, handle) = local();
        let m = metrics::with_local_recorder(&recorder, RequestMetrics::new);
        let err = Response::Error(ErrorReply::new(ErrorCode::LimitExceeded, "x"));
        observe(&m, &Request::RotateKey { key: "app".into() }, err);
        assert!(has(&handle.render(), r#"kmsd_rotations_total{kind="manual"} 0"#));
        let (_dir, d) = daemon();
        let key = d.keys.list(&Caller::internal()).remove(0);
        observe(&m, &Request::RotateKey { key: "app".into() }, Response::Key(key));
        assert!(has(&handle.render(), r#"kmsd_rotations_total{kind="manual"} 1"#));
    }

    #[test]
    fn batch_bytes_count_only_successful_items() {
        let (recorder, handle) = local();
        let m = metrics::with_local_recorder(&recorder, RequestMetrics::new);
        let req = Request::WrapBatch {
            key: "app".into(),
            deks: vec![vec![0; 32].into(), vec![0; 16].into()],
            context: Context::new(),
        };
        observe(&m, &req, Response::Blobs(vec![vec![0; 80], vec![0; 64]]));
        let items = vec![
            Ok(vec![0; 32].into()),
            Err(ErrorReply::new(ErrorCode::DecryptFailed, "x")),
        ];
        let req = Request::UnwrapBatch {
            blobs: vec![],
            context: Context::new(),
        };
        observe(&m, &req, Response::Plaintexts(items));
        let body = handle.render();
        assert!(has(&body, "kmsd_bytes_encrypted_total 48"), "{body}");
        assert!(has(&body, "kmsd_bytes_decrypted_total 32"), "{body}");
    }

    #[test]
    fn every_outcome_and_op_is_preregistered_once() {
        let (recorder, handle) = local();
        let _m = metrics::with_local_recorder(&recorder, RequestMetrics::new);
        let body = handle.render();
        let series = body.lines().filter(|l| l.starts_with("kmsd_requests_total{")).count();
        assert_eq!(series, Op::ALL.len() * OUTCOMES);
        for op in Op::ALL {
            let line = format!(r#"kmsd_requests_total{{op="{op}",outcome="ok"}} 0"#);
            assert!(has(&body, &line), "missing {line}");
        }
    }

    #[test]
    fn refresh_reports_keys_by_state_versions_and_connections() {
        let (recorder, handle) = local();
        let (_dir, d) = daemon();
        d.connections.store(3, Ordering::Relaxed);
        metrics::with_local_recorder(&recorder, || refresh(&d));
        let body = handle.render();
        let old = d.keys.describe(&Caller::internal(), "old").unwrap().id;
        for line in [
            // `app` and the default key every store holds.
            r#"kmsd_keys{state="enabled"} 2"#.to_string(),
            r#"kmsd_keys{state="disabled"} 1"#.to_string(),
            r#"kmsd_keys{state="pending-deletion"} 0"#.to_string(),
            format!(r#"kmsd_key_versions{{key="{old}"}} 2"#),
            "kmsd_connections_open 3".to_string(),
        ] {
            assert!(has(&body, &line), "missing {line} in\n{body}");
        }
    }

    #[test]
    fn gauges_left_unset_leave_the_scrape_but_refreshed_ones_stay() {
        let (recorder, handle) = local_idle(Duration::from_millis(100));
        let (_dir, d) = daemon();
        metrics::with_local_recorder(&recorder, || {
            gauge!("kmsd_key_versions", "key" => "deleted").set(1.0);
            refresh(&d);
        });
        assert!(handle.render().contains(r#"key="deleted""#));
        std::thread::sleep(Duration::from_millis(300));
        metrics::with_local_recorder(&recorder, || refresh(&d));
        let body = handle.render();
        assert!(!body.contains(r#"key="deleted""#), "{body}");
        assert!(body.contains("kmsd_build_info{"), "{body}");
        assert!(has(&body, r#"kmsd_keys{state="disabled"} 1"#), "{body}");
    }

    #[tokio::test]
    async fn closing_the_endpoint_ends_every_task_it_started() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (_recorder, handle) = local();
        let tasks = TaskTracker::new();
        let endpoint = Endpoint {
            handle,
            serving: parking_lot::Mutex::new(None),
            tasks: tasks.clone(),
            closed: CancellationToken::new(),
        };
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        endpoint.listen(Some(addr)).unwrap();
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        scrape.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        // A client that connects and says nothing holds a connection task.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tasks.len() >= 2, "listener and the silent connection: {}", tasks.len());
        endpoint.close();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("every endpoint task ends at close");
    }

    #[tokio::test]
    async fn a_busy_address_is_an_error_naming_the_setting() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = busy.local_addr().unwrap();
        let err = install(Some(addr), &TaskTracker::new()).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("metrics.listen") && text.contains(&addr.to_string()),
            "{text}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}
