//! The etcd store: the daemons of a fleet share one zone's keys through an
//! etcd cluster. etcd sees ciphertext and ids only:
//!
//! - `<prefix>meta`: the sealed meta (schema, root-key check);
//! - `<prefix>keys/<id>`: the sealed record (`sealed`, as the file store
//!   writes it); its [`Revision`] is the key's etcd `mod_revision`;
//! - `<prefix>names/<token>`: the name index, `token` standing for the
//!   name ([`RootKey::name_token`]), the value the sealed id;
//! - `<prefix>leader/<lease>`: one key per running daemon, bound to its
//!   lease (`leader.rs`; etcd's election keeps them);
//! - `<prefix>restoring`: present while `kmsd restore` or `kmsd migrate`
//!   fills the prefix ([`EtcdStore::open_for_restore`]). While it exists a
//!   daemon does not open the store, and every daemon write compares that
//!   it is absent, so that no daemon serves or changes half a zone.
//!
//! Every change is one transaction that compares the revision the caller
//! read (and, for a new name, that the name is free); the store's own
//! writes are left out of its change stream, which is an etcd watch from
//! the revision of the last load, opened again after a break and replaced
//! by a full reload when etcd compacted the revisions it needed.
//!
//! The etcd client runs on a runtime of the store's own (one thread): the
//! [`KeyStore`] calls block on it, each within the request timeout, so
//! that they may come from any thread, inside another runtime or not.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity, KeyValue,
    TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions, WatchResponse,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::root::RootKey;
use super::schema::CURRENT;
use super::{
    io_err, sealed, Change, ChangeStream, EtcdError, Health, KeyStore, Revision, StoreError, Stored, MAX_RECORD_LEN,
};
use crate::keys::model::KeyRecord;

/// Magic of a sealed name-index value.
const NAME_MAGIC: &[u8; 8] = b"KMSDNAME";
/// Records read per request by `load`.
const PAGE: i64 = 16;
/// Largest answer accepted from etcd: a page of records at their limit.
const MAX_ANSWER: usize = (PAGE as usize + 1) * (MAX_RECORD_LEN + 4096);
/// First and longest pause before a broken watch is opened again.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Own writes remembered for the watch to skip, at most.
const OWN_WRITES_KEPT: usize = 4096;
/// Changes buffered for a slow reader of the stream.
const STREAM_BUFFER: usize = 256;

/// Where and how to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs of the members (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Prefix of every key this store writes; ends with `/`.
    pub prefix: String,
    /// TLS towards etcd, for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one request may take before it fails as `unavailable`.
    pub request_timeout: Duration,
}

/// TLS files (PEM) for etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signs the members' certificates.
    pub ca: PathBuf,
    /// This daemon's client certificate and key, when etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The etcd store.
#[derive(Debug)]
pub struct EtcdStore {
    io: Io,
    etcd: Etcd,
    /// etcd's revision at the last load (or at open): where `changes`
    /// starts.
    loaded_at: Mutex<i64>,
}

impl EtcdStore {
    /// Connects to etcd and checks (or, in an empty prefix, creates) the
    /// store's meta. Does not retry: the caller decides how long to wait
    /// for etcd.
    ///
    /// # Errors
    /// `Etcd` when etcd does not answer, `WrongRootKey`, `NewerSchema`,
    /// `Corrupt` for the meta; `Io` for unreadable TLS files.
    pub fn open(settings: &EtcdSettings, root: RootKey) -> Result<Self, StoreError> {
        Self::connect(settings, root, false)
    }

    /// Opens the prefix for `kmsd restore` or `kmsd migrate`: refused while
    /// any daemon runs on it (a key under `<prefix>leader/`) or when it
    /// holds a key; then marked as being restored (`<prefix>restoring`,
    /// in the same transaction as those checks). With `resume`, a prefix
    /// that a restore left marked is emptied first (everything in it came
    /// from that restore); without, it is refused. This store's own
    /// writes do not compare the marker.
    ///
    /// # Errors
    /// As [`open`](Self::open); `DaemonsAlive`, `NotEmpty`, `Restoring`.
    pub fn open_for_restore(settings: &EtcdSettings, root: RootKey, resume: bool) -> Result<Self, StoreError> {
        let store = Self::connect_only(settings, root, true)?;
        store.io.run(store.etcd.clone().begin_restore(resume))?;
        let at = store.io.run(store.etcd.clone().open_meta())?;
        *store.loaded_at.lock() = at;
        Ok(store)
    }

    /// Removes the restore's marker: the prefix is whole and daemons may
    /// serve it.
    ///
    /// # Errors
    /// `Etcd`.
    pub fn finish_restore(&self) -> Result<(), StoreError> {
        let etcd = self.etcd.clone();
        self.io.run(async move {
            let kv = etcd.client.kv_client();
            let marker = etcd.marker_key();
            etcd.call("cannot remove the restore's marker", || {
                let (mut kv, marker) = (kv.clone(), marker.clone());
                async move { kv.delete(marker, None).await }
            })
            .await
            .map(drop)
        })
    }

    fn connect(settings: &EtcdSettings, root: RootKey, restoring: bool) -> Result<Self, StoreError> {
        let store = Self::connect_only(settings, root, restoring)?;
        let at = store.io.run(store.etcd.clone().open_meta())?;
        *store.loaded_at.lock() = at;
        Ok(store)
    }

    fn connect_only(settings: &EtcdSettings, root: RootKey, restoring: bool) -> Result<Self, StoreError> {
        let io = Io::new()?;
        let endpoints = settings.endpoints.join(",");
        let options = connect_options(settings)?;
        let urls = settings.endpoints.clone();
        let client = io
            .run(Client::connect(urls, Some(options)))
            .map_err(|e| etcd_err("cannot connect", &endpoints, e.into()))?;
        let etcd = Etcd {
            client,
            prefix: settings.prefix.clone().into(),
            endpoints: endpoints.into(),
            timeout: settings.request_timeout,
            root: Arc::new(root),
            own: Arc::default(),
            problem: Arc::default(),
            failed: Arc::default(),
            probing: Arc::default(),
            restoring,
            meta_created: Arc::default(),
        };
        Ok(Self {
            io,
            etcd,
            loaded_at: Mutex::new(0),
        })
    }

    /// The prefix of this store's keys.
    pub fn prefix(&self) -> &str {
        &self.etcd.prefix
    }
}

impl KeyStore for EtcdStore {
    fn load(&self) -> Result<Vec<Stored>, StoreError> {
        let (records, at) = self.io.run(self.etcd.clone().load())?;
        *self.loaded_at.lock() = at;
        Ok(records)
    }

    fn get(&self, id: Uuid) -> Result<Option<Stored>, StoreError> {
        self.io.run(self.etcd.clone().read(id))
    }

    fn put(&self, record: &KeyRecord, expected: Option<Revision>) -> Result<Revision, StoreError> {
        self.io.run(self.etcd.clone().put(record.clone(), expected))
    }

    fn delete(&self, id: Uuid, expected: Revision) -> Result<(), StoreError> {
        self.io.run(self.etcd.clone().delete(id, expected))
    }

    /// An etcd watch from the revision after the last load; the store's
    /// own writes are left out. Meant for one reader at a time.
    fn changes(&self) -> ChangeStream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let from = *self.loaded_at.lock() + 1;
        self.io.spawn(self.etcd.clone().follow(from, tx));
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (c, rx))
        }))
    }

    /// Unhealthy while the change stream is broken, or since a request
    /// failed for want of etcd until one succeeds: etcd does not answer,
    /// changes fail, data operations go on from memory.
    fn health(&self) -> Health {
        Health {
            backend: "etcd",
            problem: (self.etcd.problem.lock().clone()).or_else(|| self.etcd.failed.lock().clone()),
        }
    }
}

/// The store's runtime: one thread for the etcd client and the watch.
#[derive(Debug)]
struct Io(Option<tokio::runtime::Runtime>);

impl Io {
    fn new() -> Result<Self, StoreError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kmsd-etcd")
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
            .map_err(io_err("cannot start the etcd client's thread", Path::new("etcd")))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives as long as the store")
            .handle()
    }

    /// Runs `fut` on the store's runtime and waits for it; usable from any
    /// thread, since the waiting thread does not drive the future.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        match futures::executor::block_on(self.handle().spawn(fut)) {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.handle().spawn(fut);
    }
}

impl Drop for Io {
    /// Stops the client and the watch without waiting for them, which is
    /// allowed from inside another runtime too.
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// How the store (and the election) connect to etcd: timeouts, pings,
/// leader required, TLS.
///
/// # Errors
/// `Io` for unreadable TLS files.
pub fn connect_options(settings: &EtcdSettings) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(settings.connect_timeout)
        // Pings find a member that vanished under an open watch; etcd
        // refuses pings more often than every 5 s or with no stream open.
        .with_keep_alive(Duration::from_secs(10), settings.request_timeout)
        .with_require_leader(true);
    if let Some(tls) = &settings.tls {
        let read = |p: &Path| std::fs::read(p).map_err(io_err("cannot read", p));
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(t);
    }
    Ok(options)
}

fn etcd_err(op: impl Into<String>, endpoints: &str, source: EtcdError) -> StoreError {
    StoreError::Etcd {
        op: op.into(),
        endpoints: endpoints.to_string(),
        source,
    }
}

/// Where an etcd key is, for errors that name a place.
fn at(key: &str) -> PathBuf {
    PathBuf::from(format!("etcd:{key}"))
}

/// The store's connection and what its tasks share; cheap to clone.
#[derive(Clone)]
struct Etcd {
    client: Client,
    prefix: Arc<str>,
    endpoints: Arc<str>,
    timeout: Duration,
    root: Arc<RootKey>,
    /// etcd revisions of this store's own writes not yet passed by the
    /// watch. A write holds the lock from before its transaction until its
    /// revision is noted, so the watch cannot report it as another's.
    own: Arc<tokio::sync::Mutex<BTreeSet<i64>>>,
    /// Why the watch is broken (etcd unreachable), while it is.
    problem: Arc<Mutex<Option<String>>>,
    /// Why the last request failed for want of etcd (unreachable, timed
    /// out), until a request succeeds.
    failed: Arc<Mutex<Option<String>>>,
    /// Whether a task asks etcd until it answers, to clear `failed` when
    /// no other request comes.
    probing: Arc<std::sync::atomic::AtomicBool>,
    /// Whether this is a restore's store, whose writes do not compare the
    /// restore marker (a daemon's all do).
    restoring: bool,
    /// The create revision of the meta key when this store opened it (0
    /// before): a daemon's every write compares it, so a daemon left
    /// running while its prefix was wiped and restored writes nothing into
    /// the restored zone (its memory and root key may be of the old one).
    meta_created: Arc<std::sync::atomic::AtomicI64>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// How a watch ended without an error.
enum Ended {
    /// Nobody reads the stream any more.
    Dropped,
    /// etcd no longer holds the revisions the watch needed.
    Compacted(i64),
}

impl Etcd {
    fn meta_key(&self) -> String {
        format!("{}meta", self.prefix)
    }

    fn keys_prefix(&self) -> String {
        format!("{}keys/", self.prefix)
    }

    fn names_prefix(&self) -> String {
        format!("{}names/", self.prefix)
    }

    fn marker_key(&self) -> String {
        format!("{}restoring", self.prefix)
    }

    /// Where the running daemons' election keys are (`leader.rs`).
    fn daemons_prefix(&self) -> String {
        format!("{}leader/", self.prefix)
    }

    fn restoring_error(&self) -> StoreError {
        StoreError::Restoring {
            place: format!("etcd prefix {}", self.prefix),
            marker: self.marker_key(),
        }
    }

    /// For a daemon's write: the marker is absent, and the meta key is the
    /// one this daemon opened.
    fn no_restore(&self) -> Vec<Compare> {
        if self.restoring {
            return Vec::new();
        }
        let mut when = vec![Compare::create_revision(self.marker_key(), CompareOp::Equal, 0)];
        let meta = self.meta_created.load(std::sync::atomic::Ordering::SeqCst);
        if meta > 0 {
            when.push(Compare::create_revision(self.meta_key(), CompareOp::Equal, meta));
        }
        when
    }

    /// Whether the answer `index` of a failed transaction shows a meta key
    /// other than the one this daemon opened.
    fn replaced(&self, resp: &TxnResponse, index: usize) -> bool {
        let meta = self.meta_created.load(std::sync::atomic::Ordering::SeqCst);
        !self.restoring && meta > 0 && first_kv(resp, index).map_or(0, |kv| kv.create_revision()) != meta
    }

    fn replaced_error(&self) -> StoreError {
        StoreError::Replaced {
            place: format!("etcd prefix {}", self.prefix),
        }
    }

    /// Whether the answer `index` of a failed transaction found the marker.
    fn marker_found(&self, resp: &TxnResponse, index: usize) -> bool {
        !self.restoring && first_kv(resp, index).is_some()
    }

    /// How many keys are under `prefix`: a count-only get.
    fn count(prefix: String) -> TxnOp {
        TxnOp::get(prefix, Some(GetOptions::new().with_prefix().with_count_only()))
    }

    /// The marker check and mark of [`EtcdStore::open_for_restore`].
    async fn begin_restore(self, resume: bool) -> Result<(), StoreError> {
        let marker = self.marker_key();
        let no_daemon = Compare::create_revision(self.daemons_prefix(), CompareOp::Equal, 0).with_prefix();
        let found = self.get("cannot read the restore marker", &marker, None).await?;
        let interrupted = found.kvs().first().map(KeyValue::create_revision);
        let txn = match interrupted {
            Some(_) if !resume => return Err(self.restoring_error()),
            Some(created) => {
                tracing::warn!(%marker, "an earlier restore did not finish: emptying the prefix and starting again");
                let all = || Some(DeleteOptions::new().with_prefix());
                Txn::new()
                    .when([
                        Compare::create_revision(marker.clone(), CompareOp::Equal, created),
                        no_daemon,
                    ])
                    .and_then([
                        TxnOp::delete(self.keys_prefix(), all()),
                        TxnOp::delete(self.names_prefix(), all()),
                        TxnOp::delete(self.meta_key(), None),
                    ])
            }
            None => {
                // A meta this root key does not open is refused before the
                // marker is written (keys wiped, meta left).
                let meta = self.meta_key();
                let found = self.get("cannot read the store's meta", &meta, None).await?;
                if let Some(m) = found.kvs().first() {
                    sealed::open_meta(&self.root, m.value(), &at(&meta))?;
                }
                let note = format!("kmsd restore (pid {}) is filling this prefix", std::process::id());
                Txn::new()
                    .when([
                        Compare::create_revision(marker.clone(), CompareOp::Equal, 0),
                        no_daemon,
                        Compare::create_revision(self.keys_prefix(), CompareOp::Equal, 0).with_prefix(),
                    ])
                    .and_then([TxnOp::put(marker.clone(), note, None)])
            }
        };
        let txn = txn.or_else([
            TxnOp::get(marker.clone(), Some(GetOptions::new().with_keys_only())),
            Self::count(self.daemons_prefix()),
            Self::count(self.keys_prefix()),
        ]);
        let resp = self.txn("cannot mark the prefix as being restored", txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let counts: Vec<i64> = (resp.op_responses().into_iter())
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.count(),
                _ => 0,
            })
            .collect();
        let place = format!("etcd prefix {}", self.prefix);
        match counts[..] {
            [_, daemons, _] if daemons > 0 => Err(StoreError::DaemonsAlive {
                place,
                marker: self.daemons_prefix(),
                count: daemons,
            }),
            [_, _, keys] if keys > 0 && interrupted.is_none() => Err(StoreError::NotEmpty { place, count: keys }),
            // The marker came or went meanwhile: another restore runs.
            _ => Err(self.restoring_error()),
        }
    }

    fn key_of(&self, id: Uuid) -> String {
        format!("{}keys/{id}", self.prefix)
    }

    fn name_key(&self, name: &str) -> String {
        let token: String = self.root.name_token(name).iter().map(|b| format!("{b:02x}")).collect();
        format!("{}names/{token}", self.prefix)
    }

    fn err(&self, op: impl Into<String>, source: EtcdError) -> StoreError {
        etcd_err(op, &self.endpoints, source)
    }

    /// The request `attempt` makes, failing as `Etcd` naming `op` when it
    /// fails or takes longer than the request timeout; made again while it
    /// was never sent ([`retry_unsent`]).
    async fn call<T, F, Fut>(&self, op: impl Into<String>, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = match tokio::time::timeout(self.timeout, retry_unsent(attempt)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(op, e.into())),
            Err(_) => Err(self.err(op, EtcdError::Timeout(self.timeout))),
        };
        match &result {
            Ok(_) => *self.failed.lock() = None,
            Err(e) if unavailable(e) => {
                *self.failed.lock() = Some(crate::keys::error::error_chain(e));
                if !self.probing.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    tokio::spawn(self.clone().probe());
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Asks etcd (a count of the meta key) with a backoff until it answers
    /// or another request succeeded, then clears `failed`.
    async fn probe(self) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let mut pause = BACKOFF_MIN;
            while self.failed.lock().is_some() {
                tokio::time::sleep(pause).await;
                let mut kv = self.client.kv_client();
                let ask = kv.get(self.meta_key(), Some(GetOptions::new().with_count_only()));
                if let Ok(Ok(_)) = tokio::time::timeout(self.timeout, ask).await {
                    *self.failed.lock() = None;
                }
                pause = (pause * 2).min(BACKOFF_MAX);
            }
            self.probing.store(false, SeqCst);
            // A failure noted after the loop looked, while this still
            // counted as probing: go on.
            if self.failed.lock().is_none() || self.probing.swap(true, SeqCst) {
                return;
            }
        }
    }

    async fn txn(&self, op: impl Into<String>, txn: Txn) -> Result<TxnResponse, StoreError> {
        let kv = self.client.kv_client();
        self.call(op, || {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn get(
        &self,
        op: impl Into<String>,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        let kv = self.client.kv_client().max_decoding_message_size(MAX_ANSWER);
        self.call(op, || {
            let (mut kv, key, options) = (kv.clone(), key.as_bytes().to_vec(), options.clone());
            async move { kv.get(key, options).await }
        })
        .await
    }

    /// Creates the meta in an empty prefix, or checks the one there.
    /// Returns etcd's revision.
    async fn open_meta(self) -> Result<i64, StoreError> {
        let key = self.meta_key();
        let empty = Compare::create_revision(self.keys_prefix(), CompareOp::Equal, 0).with_prefix();
        let mut when = vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0), empty];
        when.extend(self.no_restore());
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key.clone(), sealed::seal_meta(&self.root, CURRENT), None)])
            .or_else([
                TxnOp::get(key.clone(), None),
                TxnOp::get(self.marker_key(), Some(GetOptions::new().with_keys_only())),
            ]);
        let resp = self.txn("cannot read the store's meta", txn).await?;
        let revision = header_revision(&resp);
        if resp.succeeded() {
            self.meta_created.store(revision, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(prefix = %self.prefix, "created a new key store in etcd");
            return Ok(revision);
        }
        if self.marker_found(&resp, 1) {
            return Err(self.restoring_error());
        }
        let Some(kv) = first_kv(&resp, 0) else {
            return Err(StoreError::Corrupt {
                path: at(&key),
                reason: "missing, but key records exist under the prefix".into(),
            });
        };
        match sealed::open_meta(&self.root, kv.value(), &at(&key))? {
            CURRENT => {
                self.meta_created
                    .store(kv.create_revision(), std::sync::atomic::Ordering::SeqCst);
                Ok(revision)
            }
            found if found > CURRENT => Err(StoreError::NewerSchema {
                path: at(&key),
                found,
                supported: CURRENT,
            }),
            found => Err(StoreError::Corrupt {
                path: at(&key),
                reason: format!("schema {found}, which no kmsd wrote to etcd"),
            }),
        }
    }

    /// Every record, read in pages at one revision, and that revision.
    async fn load(self) -> Result<(Vec<Stored>, i64), StoreError> {
        let end = format!("{}keys0", self.prefix); // '0' follows '/'
        let kv = self.client.kv_client().max_decoding_message_size(MAX_ANSWER);
        let (mut out, mut revision, mut next) = (Vec::new(), 0, self.keys_prefix().into_bytes());
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision != 0 {
                options = options.with_revision(revision);
            }
            let resp = self
                .call("cannot read the keys", || {
                    let (mut kv, next, options) = (kv.clone(), next.clone(), options.clone());
                    async move { kv.get(next, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push(self.decode(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => next = [last.key(), b"\0"].concat(),
                _ => return Ok((out, revision)),
            }
        }
    }

    /// The record `id`, if etcd holds it.
    async fn read(self, id: Uuid) -> Result<Option<Stored>, StoreError> {
        let key = self.key_of(id);
        let resp = self.get(format!("cannot read key {id}"), &key, None).await?;
        resp.kvs().first().map(|kv| self.decode(kv)).transpose()
    }

    fn decode(&self, kv: &KeyValue) -> Result<Stored, StoreError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let id = key
            .strip_prefix(&self.keys_prefix())
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| StoreError::Corrupt {
                path: at(&key),
                reason: "the name is not a key id".into(),
            })?;
        let stored = sealed::open_record(&self.root, id, kv.value(), CURRENT, &at(&key))?;
        Ok(Stored {
            revision: revision_of(kv),
            record: stored.record,
        })
    }

    fn name_entry(&self, name: &str, id: Uuid) -> (String, Vec<u8>) {
        let key = self.name_key(name);
        let value = self.root.seal(NAME_MAGIC, key.as_bytes(), id.as_bytes());
        (key, value)
    }

    async fn put(self, record: KeyRecord, expected: Option<Revision>) -> Result<Revision, StoreError> {
        let id = record.id;
        let key = self.key_of(id);
        // The body's revision field is the file store's; here etcd's
        // mod_revision is the revision, known only once written.
        let value = sealed::seal_record(&self.root, 0, &record, &at(&key))?;
        let new_name = record.name.as_deref();
        let mut when: Vec<Compare> = self.no_restore();
        let mut then = vec![TxnOp::put(key.clone(), value, None)];
        let old_name = match expected {
            None => {
                when.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                None
            }
            Some(rev) => {
                let old = self.clone().read(id).await?;
                let found = old.as_ref().map(|s| s.revision);
                if found != expected {
                    return Err(StoreError::Conflict { id, expected, found });
                }
                when.push(Compare::mod_revision(key.clone(), CompareOp::Equal, etcd_rev(rev)));
                old.and_then(|s| s.record.name)
            }
        };
        if old_name.as_deref() != new_name {
            if let Some(old) = &old_name {
                then.push(TxnOp::delete(self.name_key(old), None));
            }
            if let Some(name) = new_name {
                let (name_key, name_value) = self.name_entry(name, id);
                when.push(Compare::create_revision(name_key.clone(), CompareOp::Equal, 0));
                then.push(TxnOp::put(name_key, name_value, None));
            }
        }
        let txn = Txn::new().when(when).and_then(then).or_else(self.after_refusal(key));
        let resp = self.write(format!("cannot write key {id}"), txn).await?;
        if resp.succeeded() {
            return Ok(Revision::new(header_revision(&resp) as u64));
        }
        if self.marker_found(&resp, 1) {
            return Err(self.restoring_error());
        }
        if self.replaced(&resp, 2) {
            return Err(self.replaced_error());
        }
        let found = first_kv(&resp, 0).as_ref().map(revision_of);
        match (found == expected, new_name) {
            (true, Some(name)) => Err(StoreError::NameTaken { name: name.to_string() }),
            _ => Err(StoreError::Conflict { id, expected, found }),
        }
    }

    async fn delete(self, id: Uuid, expected: Revision) -> Result<(), StoreError> {
        let key = self.key_of(id);
        let old = self.clone().read(id).await?;
        let found = old.as_ref().map(|s| s.revision);
        let Some(old) = old.filter(|s| s.revision == expected) else {
            return Err(StoreError::Conflict {
                id,
                expected: Some(expected),
                found,
            });
        };
        let mut then = vec![TxnOp::delete(key.clone(), None)];
        if let Some(name) = &old.record.name {
            then.push(TxnOp::delete(self.name_key(name), None));
        }
        let mut when = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, etcd_rev(expected))];
        when.extend(self.no_restore());
        let txn = Txn::new().when(when).and_then(then).or_else(self.after_refusal(key));
        let resp = self.write(format!("cannot delete key {id}"), txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        if self.marker_found(&resp, 1) {
            return Err(self.restoring_error());
        }
        if self.replaced(&resp, 2) {
            return Err(self.replaced_error());
        }
        Err(StoreError::Conflict {
            id,
            expected: Some(expected),
            found: first_kv(&resp, 0).as_ref().map(revision_of),
        })
    }

    /// What a refused write reads: the record `key`, and the marker.
    fn after_refusal(&self, key: String) -> [TxnOp; 3] {
        [
            TxnOp::get(key, None),
            TxnOp::get(self.marker_key(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(self.meta_key(), Some(GetOptions::new().with_keys_only())),
        ]
    }

    /// Runs a writing transaction and notes its revision as this store's
    /// own before the watch can look at it.
    async fn write(&self, op: String, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut own = self.own.lock().await;
        let resp = self.txn(op, txn).await?;
        if resp.succeeded() {
            own.insert(header_revision(&resp));
            // Without a reader nothing passes them: keep the newest.
            while own.len() > OWN_WRITES_KEPT {
                own.pop_first();
            }
        }
        Ok(resp)
    }

    /// Feeds `tx` with other writers' changes from revision `next` on,
    /// until nobody reads it; opens the watch again after a break, and
    /// reloads everything when etcd compacted what it needed.
    async fn follow(self, mut next: i64, tx: mpsc::Sender<Change>) {
        let mut backoff = BACKOFF_MIN;
        // Set at a break, cleared by `watch` at the first answer after it.
        let mut broken = false;
        loop {
            let why = match self.watch(&mut next, &tx, &mut broken).await {
                Ok(Ended::Dropped) => return,
                Ok(Ended::Compacted(compacted)) => {
                    tracing::warn!(
                        from = next,
                        compacted,
                        "etcd compacted the changes this daemon had not seen; reloading every key"
                    );
                    match self.reload(&mut next, &tx).await {
                        Ok(true) => continue,
                        Ok(false) => return,
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if broken {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                let error = crate::keys::error::error_chain(&why);
                tracing::warn!(
                    %error,
                    "lost etcd's change stream; changes to keys fail until etcd answers, data operations go on"
                );
                *self.problem.lock() = Some(error);
                broken = true;
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = tx.closed() => return,
            }
        }
    }

    /// One watch from `next`, until it breaks or nobody reads.
    async fn watch(&self, next: &mut i64, tx: &mpsc::Sender<Change>, broken: &mut bool) -> Result<Ended, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*next)
            .with_prev_key()
            .with_progress_notify();
        let client = self.client.watch_client().max_decoding_message_size(MAX_ANSWER);
        let prefix = self.keys_prefix();
        let mut stream = self
            .call("cannot watch the keys", || {
                let (mut client, prefix, options) = (client.clone(), prefix.clone(), options.clone());
                async move { client.watch(prefix, Some(options)).await }
            })
            .await?;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = tx.closed() => return Ok(Ended::Dropped),
            };
            let op = "the watch of the keys broke";
            let resp = message
                .map_err(|e| self.err(op, e.into()))?
                .ok_or_else(|| self.err(op, EtcdError::Protocol("etcd closed the stream".into())))?;
            if resp.compact_revision() > 0 {
                return Ok(Ended::Compacted(resp.compact_revision()));
            }
            if resp.canceled() {
                let reason = format!("etcd cancelled the watch: {}", resp.cancel_reason());
                return Err(self.err(op, EtcdError::Protocol(reason)));
            }
            if std::mem::take(broken) {
                tracing::info!(from = *next, "etcd answers again; following its changes");
                *self.problem.lock() = None;
            }
            if !self.forward(&resp, next, tx).await {
                return Ok(Ended::Dropped);
            }
        }
    }

    /// Sends the changes of `resp` that are not this store's own; false
    /// when nobody reads any more.
    async fn forward(&self, resp: &WatchResponse, next: &mut i64, tx: &mpsc::Sender<Change>) -> bool {
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            *next = revision + 1;
            let mine = {
                let mut own = self.own.lock().await;
                let mine = own.remove(&revision);
                own.retain(|r| *r > revision);
                mine
            };
            if mine {
                continue;
            }
            let change = match event.event_type() {
                EventType::Put => match self.decode(kv) {
                    Ok(stored) => Change::Put(Box::new(stored)),
                    Err(e) => {
                        tracing::error!(error = %e, "a change in etcd cannot be read; ignored");
                        continue;
                    }
                },
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some(id) = key
                        .strip_prefix(&self.keys_prefix())
                        .and_then(|s| Uuid::parse_str(s).ok())
                    else {
                        continue;
                    };
                    let was = event.prev_kv().map_or(revision - 1, KeyValue::mod_revision);
                    Change::Deleted {
                        id,
                        revision: Revision::new(was as u64),
                    }
                }
            };
            if tx.send(change).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Reads every record and sends them as `Reloaded`; the watch goes on
    /// after the snapshot. False when nobody reads any more.
    async fn reload(&self, next: &mut i64, tx: &mpsc::Sender<Change>) -> Result<bool, StoreError> {
        let (records, at) = self.clone().load().await?;
        self.own.lock().await.retain(|r| *r > at);
        *next = at + 1;
        let change = Change::Reloaded {
            at: Revision::new(at as u64),
            records,
        };
        Ok(tx.send(change).await.is_ok())
    }
}

/// Attempts of one request that was never sent (see [`retry_unsent`]).
const UNSENT_ATTEMPTS: usize = 8;

/// The request `attempt` makes, made again (up to [`UNSENT_ATTEMPTS`]
/// times) while it fails without having been sent: etcd-client balances
/// over lazily connected members, so a request may be handed to a member
/// that is down and fail at its connect, while the others answer. Such a
/// request reached no member, so making it again cannot apply it twice;
/// any other outcome is returned as it is.
///
/// # Errors
/// The last attempt's.
pub async fn retry_unsent<T, F, Fut>(mut attempt: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(e) if tries < UNSENT_ATTEMPTS && never_sent(&e) => tries += 1,
            done => return done,
        }
    }
}

/// Whether `e` says etcd could not be reached or did not answer in time
/// (not that it refused the request).
fn unavailable(e: &StoreError) -> bool {
    use tonic::Code;
    match e {
        StoreError::Etcd { source, .. } => match source {
            EtcdError::Timeout(_) => true,
            EtcdError::Client(etcd_client::Error::GRpcStatus(s)) => {
                matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
            }
            EtcdError::Client(etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => true,
            _ => false,
        },
        _ => false,
    }
}

/// Whether `e` says the request never left this process: the connection
/// to the member it was given could not be made (refused, timed out).
fn never_sent(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        if s.is::<tonic::ConnectError>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn header_revision(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

/// The first key-value of the `index`th (get) answer of a transaction.
fn first_kv(resp: &TxnResponse, index: usize) -> Option<KeyValue> {
    match resp.op_responses().into_iter().nth(index)? {
        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
        _ => None,
    }
}

fn revision_of(kv: &KeyValue) -> Revision {
    Revision::new(u64::try_from(kv.mod_revision()).unwrap_or(0))
}

fn etcd_rev(r: Revision) -> i64 {
    i64::try_from(r.get()).unwrap_or(i64::MAX)
}
