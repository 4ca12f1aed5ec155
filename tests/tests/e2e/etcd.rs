//! The etcd key store: the conformance suite on a real etcd, and fleets of
//! real kmsd daemons sharing one etcd (a single member or three).

use std::time::{Duration, Instant};

use futures::StreamExt;
use kms_tests::etcd::{etcd_available, Etcd};
use kmsd::keys::store::conformance::{self, Harness};
use kmsd::keys::store::{Change, EtcdSettings, EtcdStore, KeyStore};
use kmsd::keys::RootKey;

const ROOT: [u8; 32] = [0x5a; 32];

fn settings(etcd: &Etcd, prefix: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: etcd.endpoints(),
        prefix: prefix.to_string(),
        tls: None,
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
    }
}

/// The suite's backend: a single etcd member of its own, each test under
/// a prefix of its own.
struct EtcdHarness {
    etcd: Etcd,
    prefix: String,
}

impl EtcdHarness {
    fn new() -> Option<Self> {
        etcd_available().then(|| Self {
            etcd: Etcd::single(),
            prefix: format!("/conformance/{}/", uuid::Uuid::new_v4()),
        })
    }
}

impl Harness for EtcdHarness {
    type Store = EtcdStore;
    type Crash = ();

    fn open(&mut self) -> EtcdStore {
        EtcdStore::open(&settings(&self.etcd, &self.prefix), RootKey::from_bytes(&ROOT)).unwrap()
    }

    /// None: a write is one transaction.
    fn crash_points(&self) -> Vec<()> {
        Vec::new()
    }

    fn arm_crash(&self, _: &EtcdStore, (): ()) {}

    fn second_writer(&mut self, _: &EtcdStore) -> Option<EtcdStore> {
        Some(self.open())
    }
}

mod conformance_on_etcd {
    use super::*;

    kmsd::key_store_conformance!(match EtcdHarness::new() {
        Some(h) => h,
        None => return,
    });
}

/// A reader whose watch needs revisions etcd has compacted gets every
/// record again, as one `Reloaded`, and then the changes after it.
#[test]
fn a_watch_behind_a_compaction_reloads_everything() {
    let Some(mut h) = EtcdHarness::new() else { return };
    let reader = h.open();
    assert!(reader.load().unwrap().is_empty());
    let writer = h.open();
    let a = conformance::record("a");
    let ra = writer.put(&a, None).unwrap();
    let b = conformance::record("b");
    let rb = writer.put(&b, None).unwrap();
    writer.delete(b.id, rb).unwrap();
    h.etcd.compact();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut changes = reader.changes();
    let mut next = || {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), changes.next()).await })
            .expect("a change within 10 s")
            .expect("the stream goes on")
    };
    match next() {
        Change::Reloaded { at, records } => {
            assert!(at > ra, "the snapshot is after the last write");
            assert_eq!(records.len(), 1, "{records:?}");
            assert_eq!((records[0].revision, &records[0].record), (ra, &a));
        }
        other => panic!("expected Reloaded, got {other:?}"),
    }
    let c = conformance::record("c");
    let rc = writer.put(&c, None).unwrap();
    match next() {
        Change::Put(s) => assert_eq!((s.revision, s.record), (rc, c)),
        other => panic!("expected the change after the snapshot, got {other:?}"),
    }
}

/// A write that fails because etcd is down makes the store unhealthy
/// (what `status` and `kmsd_store_up` show), though no watch runs to
/// notice; once etcd answers again it is healthy without another write.
#[test]
fn a_write_that_finds_etcd_down_makes_the_store_unhealthy() {
    let Some(mut h) = EtcdHarness::new() else { return };
    let s = h.open();
    assert_eq!(s.health().problem, None);
    s.put(&conformance::record("before"), None).unwrap();
    h.etcd.stop(0);
    let err = s.put(&conformance::record("while down"), None).unwrap_err();
    assert!(matches!(err, kmsd::keys::StoreError::Etcd { .. }), "{err}");
    let problem = s.health().problem.expect("unhealthy after the failed write");
    assert!(problem.contains("cannot write key"), "{problem}");
    h.etcd.restart(0);
    h.etcd.wait_healthy(Duration::from_secs(30));
    let start = Instant::now();
    while s.health().problem.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "healthy again once etcd answers"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.put(&conformance::record("after"), None).unwrap();
}

/// etcd holds only ciphertext and ids: no key name, description or
/// material appears in any key or value it stores.
#[test]
fn etcd_sees_only_ciphertext_and_ids() {
    let Some(mut h) = EtcdHarness::new() else { return };
    let s = h.open();
    let mut r = conformance::record("a description etcd must not see");
    r.name = Some("a-name-etcd-must-not-see".into());
    s.put(&r, None).unwrap();
    let dump = h.etcd.dump(&h.prefix);
    assert_eq!(dump.len(), 3, "meta, the record, its name's entry: {dump:?}");
    for (key, value) in &dump {
        let rest = key.strip_prefix(&h.prefix).unwrap();
        assert!(
            rest == "meta"
                || rest == format!("keys/{}", r.id)
                || rest.strip_prefix("names/").is_some_and(|t| t.len() == 64),
            "unexpected key {key}"
        );
        for secret in [&b"must not see"[..], r.versions[0].material.expose()] {
            assert!(
                !value.windows(secret.len()).any(|w| w == secret),
                "{key} holds plaintext"
            );
        }
    }
}

// ---- fleets of real daemons ------------------------------------------------

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;

use kms_client::blocking::BlockingClient;
use kms_client::proto::{Context, CreateKey, ErrorCode, KeyKind, MANUAL_ROTATION_LIMIT};
use kms_tests::{wait_for, write_root_key, DaemonOptions, TestDaemon};

/// Daemons of one zone sharing one etcd and one root key.
struct Fleet {
    daemons: Vec<TestDaemon>,
    root: tempfile::TempDir,
    store: String,
    env: Vec<(String, String)>,
}

impl Fleet {
    fn start(etcd: &Etcd, n: usize) -> Self {
        let mut fleet = Self::new(etcd);
        for _ in 0..n {
            fleet.add();
        }
        fleet
    }

    /// No daemon yet: `store` and `env` may still change.
    fn new(etcd: &Etcd) -> Self {
        let root = tempfile::Builder::new().prefix("kmsd-fleet-").tempdir().unwrap();
        write_root_key(&root.path().join("root-key"));
        Self {
            daemons: Vec::new(),
            root,
            store: etcd.store_toml(None),
            env: Vec::new(),
        }
    }

    fn root_key(&self) -> std::path::PathBuf {
        self.root.path().join("root-key")
    }

    fn options(&self) -> DaemonOptions {
        DaemonOptions {
            zone: "fleet".into(),
            extra_config: self.store.clone(),
            root_key: Some(self.root_key()),
            env: self.env.clone(),
            ..DaemonOptions::default()
        }
    }

    /// A configuration file of this fleet for `kmsd restore` or `migrate`
    /// (state in `state`).
    fn config_file(&self, state: &std::path::Path) -> std::path::PathBuf {
        let path = self.root.path().join("offline.toml");
        let toml = format!(
            "zone = \"fleet\"\nstate_dir = {state:?}\nroot_key = {:?}\n{}",
            self.root_key(),
            self.store
        );
        std::fs::write(&path, toml).unwrap();
        path
    }

    /// Indexes of the daemons that say they lead.
    fn leaders(&self) -> Vec<usize> {
        (self.daemons.iter().enumerate())
            .filter(|(_, d)| {
                BlockingClient::connect(&d.socket).is_ok_and(|mut c| c.store_status().is_ok_and(|s| s.leader))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Waits until exactly one daemon leads; its index.
    fn one_leader(&self, within: Duration) -> (usize, Duration) {
        let mut leader = None;
        let took = eventually("exactly one leader", within, || {
            let l = self.leaders();
            leader = (l.len() == 1).then(|| l[0]);
            leader.is_some()
        });
        (leader.unwrap(), took)
    }

    /// Starts one more daemon of the fleet.
    fn add(&mut self) -> &TestDaemon {
        let d = TestDaemon::start_with(self.options());
        self.daemons.push(d);
        self.daemons.last().unwrap()
    }

    fn clients(&self) -> Vec<BlockingClient> {
        self.daemons.iter().map(TestDaemon::client).collect()
    }
}

fn create(c: &mut BlockingClient, name: &str) -> String {
    let req = CreateKey {
        name: Some(name.into()),
        ..CreateKey::default()
    };
    c.create_key(req).unwrap().id.to_string()
}

/// Polls `f` every millisecond until it holds; panics past `within`.
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Three daemons on a three-member etcd: one default key for all, and a
/// key created on any daemon is used on the others within a deadline
/// (the visibility latency is printed, not asserted).
#[test]
fn keys_created_on_one_daemon_serve_on_the_others() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::cluster();
    let fleet = Fleet::start(&etcd, 3);
    let mut clients = fleet.clients();
    let defaults: Vec<_> = (clients.iter_mut())
        .map(|c| {
            let keys = c.list_keys().unwrap();
            let defaults: Vec<_> = keys.iter().filter(|k| k.kind == KeyKind::DefaultOrganization).collect();
            assert_eq!(defaults.len(), 1, "one default key per store: {keys:?}");
            defaults[0].id
        })
        .collect();
    assert!(
        defaults.iter().all(|d| *d == defaults[0]),
        "the same default key everywhere"
    );

    let ctx = Context::new();
    let mut latencies = Vec::new();
    for i in 0..24 {
        let name = format!("k{i}");
        let (on, a, b) = (i % 3, (i + 1) % 3, (i + 2) % 3);
        create(&mut clients[on], &name);
        let created = Instant::now();
        let mut blob = None;
        for other in [a, b] {
            eventually(&format!("{name} on daemon {other}"), Duration::from_secs(10), || {
                match clients[other].wrap(&name, &[i as u8; 32], &ctx) {
                    Ok(w) => blob = Some(w),
                    Err(e) => assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}"),
                }
                blob.is_some()
            });
            latencies.push(created.elapsed());
        }
        let plain = clients[a].unwrap(blob.as_ref().unwrap(), &ctx).unwrap();
        assert_eq!(&plain[..], &[i as u8; 32]);
    }
    latencies.sort();
    eprintln!(
        "visibility of a new key on the other daemons ({} samples, 3-member etcd): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}

/// A daemon whose first etcd endpoint is a killed member starts on the
/// other two without a retry (the time it takes is printed, not asserted
/// beyond the harness's ready timeout), its watch never breaks, and it
/// serves changes.
#[test]
fn a_daemon_whose_first_etcd_endpoint_is_dead_starts_on_the_others() {
    const RUNS: usize = 8;
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::cluster();
    let mut fleet = Fleet::start(&etcd, 1);
    etcd.kill(0);
    // Member 0 may have led: the others elect a leader first (until then
    // etcd itself is unavailable, which is not what this measures).
    etcd.wait_healthy(Duration::from_secs(30));
    let (mut took, mut waits, mut broken, mut why) = (Vec::new(), 0, 0, String::new());
    for _ in 0..RUNS {
        let started = Instant::now();
        fleet.add();
        took.push(started.elapsed());
        let logs = fleet.daemons.last().unwrap().logs();
        waits += logs.matches("waiting for etcd before serving").count();
        broken += logs.matches("lost etcd's change stream").count();
        let failed =
            |l: &&str| l.contains("waiting for etcd before serving") || l.contains("lost etcd's change stream");
        why.extend(logs.lines().filter(failed).map(|l| format!("{l}\n")));
        let mut c = fleet.daemons.last().unwrap().client();
        eventually("a change through the live members", Duration::from_secs(30), || {
            c.create_key(CreateKey::default()).is_ok()
        });
        fleet.daemons.pop().unwrap().terminate();
    }
    took.sort();
    eprintln!(
        "start-up with the first of 3 etcd endpoints dead ({RUNS} runs): min {:?}, median {:?}, max {:?}; \
         {waits} start-up retries, {broken} watch breaks",
        took[0],
        took[RUNS / 2],
        took[RUNS - 1]
    );
    assert_eq!(
        (waits, broken),
        (0, 0),
        "a request given to the dead member is made again on a live one: no start-up retry, no watch break\n{why}"
    );
}

/// Fifteen manual rotations of one key at once, five from each of three
/// daemons: exactly the remaining allowance succeeds, the others are
/// limit-exceeded, and the versions made are unique and contiguous.
#[test]
fn concurrent_manual_rotations_across_the_fleet_keep_the_limit() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let fleet = Fleet::start(&etcd, 3);
    let mut clients = fleet.clients();
    let id = create(&mut clients[0], "contended");
    for c in &mut clients[1..] {
        eventually("the key on every daemon", Duration::from_secs(10), || {
            c.describe_key(&id).is_ok()
        });
    }
    const ROTATIONS: usize = 15;
    let barrier = Barrier::new(ROTATIONS);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ROTATIONS)
            .map(|i| {
                let (barrier, id) = (&barrier, &id);
                let mut c = fleet.daemons[i % 3].client();
                scope.spawn(move || {
                    barrier.wait();
                    c.rotate_key(id)
                        .map(|info| info.expect("the rotated key").active_version)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut versions: Vec<u32> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    versions.sort_unstable();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(versions.len(), MANUAL_ROTATION_LIMIT as usize, "{results:?}");
    assert_eq!(versions, (2..=11).collect::<Vec<_>>(), "unique and contiguous");
    assert!(
        refused.iter().all(|e| e.code() == Some(ErrorCode::LimitExceeded)),
        "{refused:?}"
    );
    for c in &mut clients {
        eventually("every daemon at version 11", Duration::from_secs(10), || {
            c.describe_key(&id).unwrap().active_version == 11
        });
        let rotations: Vec<u32> = c.list_rotations(&id).unwrap().iter().map(|r| r.version).collect();
        assert_eq!(rotations, (1..=11).collect::<Vec<_>>(), "one history for the fleet");
    }
}

/// SIGKILL of the etcd leader while three daemons serve data operations
/// and rotate keys: no data operation fails, no acknowledged version is
/// lost, and changes succeed again once etcd has a new leader.
#[test]
fn the_etcd_leader_killed_during_traffic() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::cluster();
    let mut fleet = Fleet::start(&etcd, 3);
    let mut admin = fleet.daemons[0].client();
    let keys: Vec<String> = (0..8).map(|i| create(&mut admin, &format!("t{i}"))).collect();
    for d in &fleet.daemons[1..] {
        let mut c = d.client();
        for k in &keys {
            eventually("every key everywhere", Duration::from_secs(10), || {
                c.describe_key(k).is_ok()
            });
        }
    }
    let stop = AtomicBool::new(false);
    let data_ops = AtomicUsize::new(0);
    let rotated = AtomicUsize::new(0);
    let (acked, unavailable) = std::thread::scope(|scope| {
        for d in &fleet.daemons {
            let (stop, data_ops, keys) = (&stop, &data_ops, &keys);
            let mut c = d.client();
            scope.spawn(move || {
                let ctx = Context::new();
                while !stop.load(Ordering::Relaxed) {
                    for k in keys {
                        let blob = c.wrap(k, &[9; 32], &ctx).expect("wrap never fails");
                        assert_eq!(&c.unwrap(&blob, &ctx).expect("unwrap never fails")[..], &[9; 32]);
                        data_ops.fetch_add(2, Ordering::Relaxed);
                    }
                }
            });
        }
        let rotator = scope.spawn(|| {
            let mut clients = fleet.clients();
            let (mut acked, mut unavailable) = (Vec::new(), 0);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < keys.len() * 9 {
                let key = &keys[n % keys.len()];
                match clients[n % 3].rotate_key(key) {
                    Ok(info) => {
                        acked.push((key.clone(), info.unwrap().active_version, Instant::now()));
                        n += 1;
                        rotated.store(n, Ordering::Relaxed);
                    }
                    Err(e) if e.code() == Some(ErrorCode::Unavailable) => unavailable += 1,
                    Err(e) => panic!("rotation of {key}: {e}"),
                }
                std::thread::sleep(Duration::from_millis(40));
            }
            (acked, unavailable)
        });
        // A few rotations before the kill, and most of the allowance (9 a
        // key) left for after it, however fast or slow this machine is.
        eventually("rotations before the kill", Duration::from_secs(20), || {
            rotated.load(Ordering::Relaxed) >= 3
        });
        let leader = etcd.leader().expect("a leader");
        eprintln!("killing etcd member {leader}, the leader");
        etcd.kill(leader);
        let killed = Instant::now();
        let at_kill = rotated.load(Ordering::Relaxed);
        // Until a rotation is acknowledged after the kill (at most 20 s;
        // the assertion below says if none was), then 2 s more of traffic.
        let _ = wait_for(Duration::from_secs(20), || {
            (rotated.load(Ordering::Relaxed) > at_kill).then_some(())
        });
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let (acked, unavailable) = rotator.join().unwrap();
        let after = acked.iter().filter(|(.., at)| *at > killed).count();
        assert!(after > 0, "rotations go on after the kill: {acked:?}");
        (acked, unavailable)
    });
    eprintln!(
        "{} data operations, {} rotations acknowledged, {unavailable} answered unavailable around the kill",
        data_ops.load(Ordering::Relaxed),
        acked.len()
    );
    // Changes succeed on every daemon.
    for (i, d) in fleet.daemons.iter().enumerate() {
        let mut c = d.client();
        let req = CreateKey {
            name: Some(format!("after-{i}")),
            ..CreateKey::default()
        };
        eventually("a change after the election", Duration::from_secs(30), || {
            c.create_key(req.clone()).is_ok()
        });
    }
    // Every acknowledged version is in etcd: a daemon started now loads
    // them all, and every running daemon holds them.
    let late = fleet.add().client();
    let mut clients = fleet.clients();
    clients.push(late);
    for (key, version, _) in &acked {
        for c in &mut clients {
            eventually(&format!("{key} v{version}"), Duration::from_secs(10), || {
                c.describe_key(key).unwrap().active_version >= *version
            });
        }
    }
    let mut per_key: std::collections::HashMap<&str, Vec<u32>> = Default::default();
    for (key, version, _) in &acked {
        per_key.entry(key).or_default().push(*version);
    }
    for versions in per_key.values_mut() {
        let n = versions.len();
        versions.sort_unstable();
        versions.dedup();
        assert_eq!(versions.len(), n, "no version acknowledged twice");
    }
}

/// etcd stopped, then started: data operations on known keys never fail;
/// changes fail with `unavailable` naming etcd while it is down and work
/// again after; the daemons catch up with each other's changes.
#[test]
fn etcd_stopped_then_started() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::single();
    let fleet = Fleet::start(&etcd, 2);
    let mut clients = fleet.clients();
    let id = create(&mut clients[0], "k");
    eventually("k on the second daemon", Duration::from_secs(10), || {
        clients[1].describe_key(&id).is_ok()
    });
    let ctx = Context::new();
    let data_ops = |c: &mut BlockingClient| {
        let blob = c.wrap(&id, &[3; 32], &ctx).expect("wrap");
        assert_eq!(&c.unwrap(&blob, &ctx).expect("unwrap")[..], &[3; 32]);
        let sealed = c.encrypt("k", b"secret", &ctx).expect("encrypt");
        assert_eq!(&c.decrypt(&sealed, &ctx).expect("decrypt")[..], b"secret");
        c.generate_data_key(&id, &ctx, true).expect("generate");
    };
    etcd.stop(0);
    for _ in 0..20 {
        for c in &mut clients {
            data_ops(c);
        }
    }
    let err = clients[0].rotate_key(&id).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(err.to_string().contains("etcd"), "the error names etcd: {err}");
    let err = clients[1].create_key(CreateKey::default()).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    for c in &mut clients {
        data_ops(c);
    }
    etcd.restart(0);
    etcd.wait_healthy(Duration::from_secs(30));
    eventually("a rotation once etcd is back", Duration::from_secs(30), || {
        clients[0].rotate_key(&id).is_ok()
    });
    eventually("the other daemon catching up", Duration::from_secs(30), || {
        clients[1].describe_key(&id).unwrap().active_version == 2
    });
    clients[1].rotate_key(&id).expect("changes from the other daemon too");
    eventually("and back", Duration::from_secs(10), || {
        clients[0].describe_key(&id).unwrap().active_version == 3
    });
    for c in &mut clients {
        data_ops(c);
    }
    // Shutdown does not wait for etcd.
    etcd.stop(0);
    drop(clients);
    let mut fleet = fleet;
    for d in &mut fleet.daemons {
        assert!(d.terminate().success(), "{}", d.logs());
    }
}

/// A daemon started while etcd is down says so, keeps trying, and serves
/// once etcd is up.
#[test]
fn a_daemon_started_while_etcd_is_down_waits_for_it() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::single();
    let fleet = Fleet::start(&etcd, 0);
    etcd.stop(0);
    let mut d = TestDaemon::launch(fleet.options());
    let said = wait_for(Duration::from_secs(20), || {
        d.logs().contains("waiting for etcd").then_some(())
    });
    assert!(said.is_some(), "no word of etcd:\n{}", d.logs());
    assert!(
        BlockingClient::connect(&d.socket).is_err(),
        "not serving before it has the keys"
    );
    etcd.restart(0);
    d.wait_ready_within(Duration::from_secs(30)).unwrap();
    let keys = d.client().list_keys().unwrap();
    assert_eq!(keys.len(), 1, "the default key: {keys:?}");
    assert!(d.terminate().success(), "{}", d.logs());
}

/// The store speaks TLS to etcd and presents a client certificate: it
/// works through it, a client without a certificate is refused, and a
/// daemon configured with `[store] ca, cert, key` serves.
#[test]
fn the_store_speaks_tls_to_etcd() {
    use kmsd::keys::store::EtcdTls;
    use kmsd::keys::StoreError;
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = kms_tests::pki::TestCa::new();
    let server = ca.issue_loopback(dir.path(), "etcd");
    let client = ca.issue_loopback(dir.path(), "kmsd");
    let etcd = Etcd::single_tls(server);
    let mut s = settings(&etcd, "/tls/");
    s.tls = Some(EtcdTls {
        ca: client.ca.clone(),
        identity: Some((client.cert.clone(), client.key.clone())),
    });
    let store = EtcdStore::open(&s, RootKey::from_bytes(&ROOT)).unwrap();
    let r = conformance::record("over TLS");
    let rev = store.put(&r, None).unwrap();
    assert_eq!(store.get(r.id).unwrap().unwrap().revision, rev);
    s.tls = Some(EtcdTls {
        ca: client.ca.clone(),
        identity: None,
    });
    match EtcdStore::open(&s, RootKey::from_bytes(&ROOT)) {
        Err(StoreError::Etcd { .. }) => {}
        other => panic!("etcd must refuse a client without a certificate: {other:?}"),
    }
    let extra = format!(
        "{}ca = {:?}\ncert = {:?}\nkey = {:?}\n",
        etcd.store_toml(None),
        client.ca,
        client.cert,
        client.key
    );
    let d = TestDaemon::start_with(DaemonOptions {
        extra_config: extra,
        ..DaemonOptions::default()
    });
    let id = create(&mut d.client(), "tls");
    assert!(etcd.endpoints()[0].starts_with("https://"));
    assert_eq!(d.client().describe_key(&id).unwrap().active_version, 1);
}

// ---- one scheduler per zone -------------------------------------------------

use kms_client::proto::Origin;

/// The lease TTL of the election tests, in seconds.
const LEASE_TTL: u64 = 2;

/// One daemon of three leads the zone's scheduled work. SIGKILL it: another
/// leads within the lease TTL (plus etcd's expiry tick). Then the fleet's
/// clock moves two days on (libfaketime reading a file, wall clock only):
/// the daily key rotates exactly once across the fleet, and a second
/// takeover does not rotate it again.
#[test]
fn the_scheduling_daemon_killed_another_takes_over_and_a_due_rotation_happens_once() {
    if !etcd_available() {
        return;
    }
    let libfaketime = crate::schedule::LIBFAKETIME;
    assert!(
        std::path::Path::new(libfaketime).exists(),
        "install the Debian package faketime"
    );
    let etcd = Etcd::single();
    let mut fleet = Fleet::new(&etcd);
    let clock = fleet.root.path().join("faketime");
    std::fs::write(&clock, "+0d\n").unwrap();
    fleet.store.push_str(&format!("lease_ttl_secs = {LEASE_TTL}\n"));
    fleet.env = vec![
        ("LD_PRELOAD".into(), libfaketime.into()),
        ("FAKETIME_TIMESTAMP_FILE".into(), clock.display().to_string()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    for _ in 0..3 {
        fleet.add();
    }
    let daily = CreateKey {
        name: Some("daily".into()),
        rotation: Some(Some(1)),
        ..CreateKey::default()
    };
    let id = fleet.daemons[0].client().create_key(daily).unwrap().id.to_string();
    for d in &fleet.daemons {
        let mut c = d.client();
        eventually("the key everywhere", Duration::from_secs(10), || {
            c.describe_key(&id).is_ok()
        });
    }
    let (first, _) = fleet.one_leader(Duration::from_secs(20));
    eprintln!("daemon {first} leads");
    let mut status = fleet.daemons[first].client();
    assert!(status.store_status().unwrap().leader);

    fleet.daemons.remove(first).kill9();
    let (second, took) = fleet.one_leader(Duration::from_secs(LEASE_TTL + 5));
    eprintln!(
        "after SIGKILL of the leader, daemon {second} of the survivors leads within {took:?} (lease TTL {LEASE_TTL} s)"
    );
    assert!(
        took <= Duration::from_secs(LEASE_TTL + 3),
        "takeover within the TTL and etcd's expiry tick: {took:?}"
    );

    // Two days later for every daemon.
    std::fs::write(&clock, "+2d\n").unwrap();
    // A change makes the leader's scheduler plan again at once (else within
    // its longest sleep, 10 minutes); repeated, because libfaketime reads
    // the file again only when its cache (1 s) has run out.
    let mut c = fleet.daemons[0].client();
    eventually("the due rotation on the leader", Duration::from_secs(30), || {
        c.create_key(CreateKey::default()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        c.describe_key(&id).unwrap().active_version == 2
    });
    for d in &fleet.daemons {
        let mut c = d.client();
        eventually("the due rotation", Duration::from_secs(15), || {
            c.describe_key(&id).unwrap().active_version == 2
        });
    }
    // The other leader takes over and runs a pass: nothing more is due.
    fleet.daemons.remove(second).kill9();
    let (_, took) = fleet.one_leader(Duration::from_secs(LEASE_TTL + 5));
    eprintln!("second takeover within {took:?}");
    std::thread::sleep(Duration::from_secs(2));
    fleet.daemons[0].client().create_key(CreateKey::default()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut c = fleet.daemons[0].client();
    let rotations = c.list_rotations(&id).unwrap();
    let origins: Vec<(u32, Origin)> = rotations.iter().map(|r| (r.version, r.origin)).collect();
    assert_eq!(
        origins,
        [(1, Origin::Initial), (2, Origin::Automatic)],
        "exactly one automatic rotation across the fleet"
    );
    // A fresh daemon does not lead while the other is alive, and says so.
    let late = fleet.add().client();
    drop(late);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fleet.leaders().len(), 1, "one leader with a newcomer");
}

/// Every daemon's election key deleted behind their backs (`etcdctl del
/// --prefix <prefix>leader/`): each notices, campaigns again, so that
/// within the lease TTL every daemon has a key again and exactly one leads
/// (and goes on being the only one).
#[test]
fn election_keys_deleted_under_the_fleet_one_leader_remains() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let mut fleet = Fleet::new(&etcd);
    fleet.store.push_str(&format!("lease_ttl_secs = {LEASE_TTL}\n"));
    for _ in 0..3 {
        fleet.add();
    }
    let (first, _) = fleet.one_leader(Duration::from_secs(20));
    let keys = || etcd.dump("/kmsd/fleet/leader/").len();
    eventually("a key per daemon", Duration::from_secs(10), || keys() == 3);
    etcd.delete_prefix("/kmsd/fleet/leader/");
    let deleted = Instant::now();
    eventually("a key per daemon again", Duration::from_secs(LEASE_TTL + 3), || {
        keys() == 3
    });
    let (now, _) = fleet.one_leader(Duration::from_secs(LEASE_TTL + 3));
    eprintln!(
        "election keys deleted: daemon {first} led, daemon {now} leads, {:?} after the deletion (lease TTL {LEASE_TTL} s)",
        deleted.elapsed()
    );
    let until = Instant::now() + Duration::from_secs(2 * LEASE_TTL);
    while Instant::now() < until {
        assert_eq!(fleet.leaders(), [now], "one leader, and only it");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The leader's etcd goes away: it stops leading (within the TTL), `status`
/// and the metric say the store is unavailable; when etcd is back one
/// daemon leads again and the store is healthy.
#[test]
fn without_etcd_nobody_leads_and_status_says_why() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::single();
    let mut fleet = Fleet::new(&etcd);
    fleet.store.push_str(&format!("lease_ttl_secs = {LEASE_TTL}\n"));
    fleet.add();
    fleet.add();
    fleet.one_leader(Duration::from_secs(20));
    etcd.stop(0);
    eventually("nobody leads without etcd", Duration::from_secs(LEASE_TTL + 3), || {
        fleet.leaders().is_empty()
    });
    let mut c = fleet.daemons[0].client();
    eventually("status names the store's problem", Duration::from_secs(30), || {
        c.store_status().unwrap().problem.is_some()
    });
    let o = fleet.daemons[0].kmsctl(&["status"], b"");
    assert!(o.status.success(), "{}", kms_tests::stderr(&o));
    let text = kms_tests::stdout(&o);
    assert!(text.contains("store:       etcd (unavailable"), "{text}");
    assert!(text.contains("scheduler:   no"), "{text}");
    etcd.restart(0);
    etcd.wait_healthy(Duration::from_secs(30));
    fleet.one_leader(Duration::from_secs(30));
    eventually("the store is healthy again", Duration::from_secs(30), || {
        c.store_status().unwrap().problem.is_none()
    });
}

// ---- backup, restore, migration ----------------------------------------------

use crate::backup::{backup, backup_key, check_history, make_history, restore};

/// A fleet's keys backed up with `kmsctl backup`, the prefix wiped, the
/// root key replaced, `kmsd restore` run: a new fleet under the new root
/// key unwraps every old blob on every daemon, histories intact. A
/// tampered backup writes nothing into etcd.
#[test]
fn backup_wipe_restore_under_another_root_key_on_etcd() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let mut fleet = Fleet::start(&etcd, 2);
    let history = make_history(&mut fleet.daemons[1].client());
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = (dir.path().join("fleet.kmsbak"), backup_key(dir.path(), "backup-key"));
    backup(&fleet.daemons[0], &file, &key);
    for d in &mut fleet.daemons {
        assert!(d.terminate().success());
    }
    fleet.daemons.clear();
    let state = dir.path().join("state");

    // Not empty: refused.
    let config = fleet.config_file(&state);
    let o = restore(&config, &file, &key);
    assert!(
        !o.status.success() && kms_tests::stderr(&o).contains("already holds"),
        "{}",
        kms_tests::stderr(&o)
    );

    // Wipe etcd and the root key.
    etcd.delete_prefix("/kmsd/fleet/");
    std::fs::remove_file(fleet.root_key()).unwrap();
    write_root_key(&fleet.root_key());
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 0x80;
    let tampered = dir.path().join("tampered.kmsbak");
    std::fs::write(&tampered, &bytes).unwrap();
    let o = restore(&config, &tampered, &key);
    assert!(
        !o.status.success() && kms_tests::stderr(&o).contains("does not authenticate"),
        "{}",
        kms_tests::stderr(&o)
    );
    assert!(etcd.dump("/kmsd/fleet/").is_empty(), "nothing written into etcd");

    let o = restore(&config, &file, &key);
    assert!(o.status.success(), "restore: {}", kms_tests::stderr(&o));
    for _ in 0..3 {
        fleet.add();
    }
    for d in &fleet.daemons {
        check_history(&mut d.client(), &history);
    }
}

/// While daemons run on the prefix, `kmsd restore` is refused even into
/// an emptied `keys/` (each daemon keeps a key under `<prefix>leader/`),
/// and a restore marker put under their feet makes their changes fail.
/// With them stopped, a restore SIGKILLed half-way leaves the marker: no
/// daemon starts, a plain second run is refused, `--resume` completes it
/// and the fleet serves every old blob.
#[test]
fn restore_refused_beside_live_daemons_and_a_cut_off_restore_resumes_on_etcd() {
    use crate::backup::{killed, restore_with};
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let mut fleet = Fleet::start(&etcd, 2);
    let history = make_history(&mut fleet.daemons[0].client());
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = (dir.path().join("fleet.kmsbak"), backup_key(dir.path(), "backup-key"));
    backup(&fleet.daemons[0], &file, &key);
    let config = fleet.config_file(&dir.path().join("state"));
    let marker = "/kmsd/fleet/restoring";
    let marked = || etcd.dump(marker).iter().any(|(k, _)| k == marker);

    etcd.delete_prefix("/kmsd/fleet/keys/");
    etcd.delete_prefix("/kmsd/fleet/names/");
    let o = restore(&config, &file, &key);
    assert!(
        !o.status.success() && kms_tests::stderr(&o).contains("2 kmsd daemon(s) run on"),
        "{}",
        kms_tests::stderr(&o)
    );
    assert!(!marked(), "a refused restore leaves no marker");
    assert!(etcd.dump("/kmsd/fleet/keys/").is_empty(), "and writes nothing");

    etcd.put(marker, b"a restore");
    let err = fleet.daemons[1].client().create_key(CreateKey::default()).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(err.to_string().contains("being restored"), "{err}");
    etcd.delete_prefix(marker);

    for d in &mut fleet.daemons {
        assert!(d.terminate().success());
    }
    fleet.daemons.clear();
    etcd.delete_prefix("/kmsd/fleet/");
    let o = restore_with(&config, &file, &key, true, false);
    assert!(killed(&o), "the fault point killed it: {}", kms_tests::stderr(&o));
    assert!(marked(), "a cut-off restore leaves its marker");
    let written = etcd.dump("/kmsd/fleet/keys/").len();
    assert!(written > 0 && written < history.key_count(), "half-way: {written}");
    let refused = TestDaemon::try_start_with(fleet.options()).expect_err("no daemon on a half restore");
    assert!(
        refused.contains("being restored") && refused.contains("--resume"),
        "{refused}"
    );
    let o = restore(&config, &file, &key);
    assert!(
        !o.status.success() && kms_tests::stderr(&o).contains("--resume"),
        "{}",
        kms_tests::stderr(&o)
    );
    let o = restore_with(&config, &file, &key, false, true);
    assert!(o.status.success(), "resume: {}", kms_tests::stderr(&o));
    assert!(!marked(), "removed once whole");
    for _ in 0..2 {
        fleet.add();
    }
    for d in &fleet.daemons {
        check_history(&mut d.client(), &history);
    }
}

/// `kmsd migrate` moves a file store into etcd; three daemons on it unwrap
/// every blob the file store's daemon made, with every history intact.
#[test]
fn migrate_a_file_store_into_etcd_every_blob_unwraps_on_three_daemons() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let mut fleet = Fleet::new(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut single = TestDaemon::start_with(DaemonOptions {
        zone: "fleet".into(),
        root_key: Some(fleet.root_key()),
        state_dir: Some(state.clone()),
        ..DaemonOptions::default()
    });
    let history = make_history(&mut single.client());
    let config = fleet.config_file(&state);
    let migrate = || {
        kms_tests::kmsd_offline(&[
            std::ffi::OsStr::new("--config"),
            config.as_os_str(),
            std::ffi::OsStr::new("migrate"),
        ])
    };
    let o = migrate();
    assert!(!o.status.success(), "not while a kmsd holds the file store");
    assert!(
        kms_tests::stderr(&o).contains("in use by another kmsd"),
        "{}",
        kms_tests::stderr(&o)
    );
    assert!(single.terminate().success());
    let o = migrate();
    assert!(o.status.success(), "migrate: {}", kms_tests::stderr(&o));
    let o = migrate();
    assert!(
        !o.status.success() && kms_tests::stderr(&o).contains("already holds"),
        "{}",
        kms_tests::stderr(&o)
    );
    for _ in 0..3 {
        fleet.add();
    }
    for d in &fleet.daemons {
        check_history(&mut d.client(), &history);
    }
    // The fleet goes on from there: a rotation on one is seen by all.
    fleet.daemons[2].client().rotate_key("k0").unwrap();
    for d in &fleet.daemons {
        let mut c = d.client();
        eventually("the rotation everywhere", Duration::from_secs(10), || {
            c.describe_key("k0").unwrap().active_version == 2
        });
    }
}

/// The election lease of `replication_is_run_by_the_zones_elected_daemon`.
const REPLICATION_TTL: u64 = 5;

/// Zone a is a fleet of two daemons on etcd, zone b one daemon; a key of
/// zone a is replicated to b. A rotation made on the daemon that does not
/// lead is pushed to b by the one that leads (the follower pushes
/// nothing); SIGKILL the leader, and the other daemon takes over the
/// pushes.
#[test]
fn replication_is_run_by_the_zones_elected_daemon() {
    use crate::zones::{create, replicate, Site};
    use kms_tests::{free_tcp_addr, metric, scrape};
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let site = Site::new();
    let root = site.dir.path().join("root-a");
    write_root_key(&root);
    let cert = site.cert("a");
    let metrics = [free_tcp_addr(), free_tcp_addr()];
    let daemon_of_a = |i: usize| {
        // Each listens for peers on an address of its own; zone b dials
        // the first, which is enough for its pulls.
        let listen = if i == 0 { site.addr("a") } else { free_tcp_addr() };
        let mut extra = "[replication]\npull_interval_secs = 3600\nretry_max_secs = 1\n".to_string();
        extra.push_str(&cert.peering_toml(&listen.to_string()));
        extra.push_str(&format!("[[peer]]\nzone = \"b\"\naddress = \"{}\"\n", site.addr("b")));
        extra.push_str(&etcd.store_toml(None));
        // A longer lease than the other tests': this one checks who pushes,
        // and a leader that steps down on a loaded machine (a 2 s lease goes
        // after 1.3 s without a confirmed renewal) would change who that is.
        extra.push_str(&format!("lease_ttl_secs = {REPLICATION_TTL}\n"));
        TestDaemon::start_with(DaemonOptions {
            zone: "a".into(),
            extra_config: extra,
            root_key: Some(root.clone()),
            env: vec![("KMSD_METRICS__LISTEN".into(), metrics[i].to_string())],
            ..DaemonOptions::default()
        })
    };
    let mut fleet = Fleet::new(&etcd);
    fleet.daemons = vec![daemon_of_a(0), daemon_of_a(1)];
    let b = site.start("b", &["a", "b"]);
    let (leader, _) = fleet.one_leader(Duration::from_secs(20));
    let follower = 1 - leader;
    let pushed = |i: usize| {
        let (_, body) = scrape(metrics[i]).expect("metrics");
        metric(&body, r#"kmsd_replication_pushes_total{outcome="ok"}"#).unwrap_or(0.0)
    };
    let served_in_b = |version: u32| {
        let mut c = b.client();
        eventually(&format!("version {version} in zone b"), Duration::from_secs(20), || {
            c.describe_key("app").is_ok_and(|k| k.active_version == version)
        });
    };
    create(&fleet.daemons[follower], "app");
    replicate(&fleet.daemons[follower], "app", "b");
    served_in_b(1);
    std::thread::sleep(Duration::from_secs(6)); // a metrics refresh
    let before = (pushed(leader), pushed(follower));
    fleet.daemons[follower].client().rotate_key("app").unwrap();
    served_in_b(2);
    let mut after = before;
    eventually("the leader's push counted", Duration::from_secs(15), || {
        after = (pushed(leader), pushed(follower));
        after.0 > before.0
    });
    assert_eq!(fleet.leaders(), [leader], "the same daemon still leads");
    assert_eq!(
        after.1, before.1,
        "the follower pushes nothing: {before:?} -> {after:?}"
    );

    fleet.daemons[leader].kill9();
    eventually(
        "the other daemon leads",
        Duration::from_secs(REPLICATION_TTL + 5),
        || {
            BlockingClient::connect(&fleet.daemons[follower].socket)
                .is_ok_and(|mut c| c.store_status().is_ok_and(|s| s.leader))
        },
    );
    fleet.daemons[follower].client().rotate_key("app").unwrap();
    served_in_b(3);
    // Zone b may also have pulled it (from daemon 0, if alive): the count
    // says the new leader pushed.
    eventually("the new leader's push counted", Duration::from_secs(15), || {
        pushed(follower) > after.1
    });
}

/// A daemon left running while its prefix is wiped and filled again (here
/// by another daemon making a new store; a restore does the same) writes
/// nothing into the new zone: its memory and root key are the old zone's.
/// Its writes compare the meta key's create revision and fail with
/// `unavailable`, saying to restart it; the new zone's daemon is unaffected.
#[test]
fn a_daemon_whose_prefix_was_replaced_writes_nothing_there() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::single();
    let mut fleet = Fleet::new(&etcd);
    fleet.add();
    fleet.daemons[0]
        .client()
        .create_key(CreateKey {
            name: Some("before".into()),
            ..Default::default()
        })
        .unwrap();
    etcd.delete_prefix("/kmsd/fleet/");
    fleet.add();
    let err = fleet.daemons[0]
        .client()
        .create_key(CreateKey {
            name: Some("stale".into()),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(err.to_string().contains("filled again"), "{err}");
    let mut new = fleet.daemons[1].client();
    assert!(
        new.describe_key("stale").is_err(),
        "the old daemon wrote into the new zone"
    );
    assert!(
        new.describe_key("before").is_err(),
        "the new zone is empty but for its own"
    );
    fleet.daemons[1]
        .client()
        .create_key(CreateKey {
            name: Some("after".into()),
            ..Default::default()
        })
        .unwrap();
}
