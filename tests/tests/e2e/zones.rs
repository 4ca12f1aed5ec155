//! Multi-zone keys across real daemons: three `kmsd` processes (zones a, b
//! and c) on one machine, peered over TCP on 127.0.0.1 with mutual TLS
//! (certificates made here with rcgen). Replication, cross-zone unwrap,
//! propagation of rotations, catching up after downtime or a crash, and
//! the refusals: a certificate for another zone or from another CA, a
//! frame claiming another zone, a replayed frame, a Unix-socket caller
//! that is no zone's uid.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kms_client::proto::{Context, CreateKey, ErrorCode, KeyInfo, KeyRole, ReplicationFrame, Request, RotationEntry};
use kms_client::ClientError;
use kms_tests::pki::{TestCa, ZoneCert};
use kms_tests::{free_tcp_addr, metric, scrape, stderr, wait_for, DaemonOptions, TestDaemon};

/// How long replication may take to converge in these tests.
pub(crate) const CONVERGE: Duration = Duration::from_secs(20);

/// One test's zones: a CA, each zone's certificate and peering address,
/// and a folder for sockets.
pub(crate) struct Site {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) ca: TestCa,
    addrs: std::sync::Mutex<HashMap<String, SocketAddr>>,
}

impl Site {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("kmsd-zones-").tempdir().unwrap();
        Self {
            dir,
            ca: TestCa::new(),
            addrs: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn socket(&self, zone: &str) -> PathBuf {
        self.dir.path().join(format!("{zone}.sock"))
    }

    /// Zone `zone`'s peering address (fixed for the site's life).
    pub(crate) fn addr(&self, zone: &str) -> SocketAddr {
        *self
            .addrs
            .lock()
            .unwrap()
            .entry(zone.to_string())
            .or_insert_with(free_tcp_addr)
    }

    /// Zone `zone`'s certificate files (made once).
    pub(crate) fn cert(&self, zone: &str) -> ZoneCert {
        let c = ZoneCert {
            cert: self.dir.path().join(format!("{zone}.pem")),
            key: self.dir.path().join(format!("{zone}.key")),
            ca: self.dir.path().join("ca.pem"),
        };
        if c.cert.exists() {
            c
        } else {
            self.ca.issue(self.dir.path(), zone)
        }
    }

    /// Options for `zone` with identity `cert`, peered over TCP with every
    /// other zone of `all`.
    pub(crate) fn options_as(&self, zone: &str, all: &[&str], cert: &ZoneCert) -> DaemonOptions {
        let mut extra = "[replication]\npull_interval_secs = 1\nretry_max_secs = 1\n".to_string();
        extra.push_str(&cert.peering_toml(&self.addr(zone).to_string()));
        for other in all.iter().filter(|z| **z != zone) {
            extra.push_str(&format!(
                "[[peer]]\nzone = {other:?}\naddress = \"{}\"\n",
                self.addr(other)
            ));
        }
        DaemonOptions {
            zone: zone.to_string(),
            extra_config: extra,
            socket: Some(self.socket(zone)),
            ..DaemonOptions::default()
        }
    }

    pub(crate) fn options(&self, zone: &str, all: &[&str]) -> DaemonOptions {
        self.options_as(zone, all, &self.cert(zone))
    }

    pub(crate) fn start(&self, zone: &str, all: &[&str]) -> TestDaemon {
        TestDaemon::start_with(self.options(zone, all))
    }
}

const ABC: [&str; 3] = ["a", "b", "c"];

fn start_abc(site: &Site) -> [TestDaemon; 3] {
    ABC.map(|z| site.start(z, &ABC))
}

pub(crate) fn create(d: &TestDaemon, name: &str) -> KeyInfo {
    d.client()
        .create_key(CreateKey {
            name: Some(name.into()),
            ..Default::default()
        })
        .unwrap()
}

pub(crate) fn replicate(d: &TestDaemon, key: &str, zone: &str) {
    let out = d.kmsctl(&["key", "replicate", key, "--zone", zone], b"");
    assert!(
        out.status.success(),
        "replicate to {zone}: {}\n{}",
        stderr(&out),
        d.logs()
    );
}

pub(crate) fn rotations(d: &TestDaemon, key: &str) -> Vec<RotationEntry> {
    d.client().list_rotations(key).unwrap()
}

/// Waits until `d` holds exactly the rotation history `want`.
pub(crate) fn await_history(d: &TestDaemon, key: &str, want: &[RotationEntry]) {
    let got = wait_for(CONVERGE, || {
        let r = d.client().list_rotations(key).ok()?;
        (r == want).then_some(r)
    });
    assert!(
        got.is_some(),
        "zone {} did not reach {} versions; has {:?}\n{}",
        d.opts.zone,
        want.len(),
        d.client().list_rotations(key).map(|r| r.len()),
        d.logs()
    );
}

pub(crate) fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    r.unwrap_err().code().expect("a server error")
}

#[test]
fn replicas_unwrap_rotate_from_the_primary_and_refuse_rotation() {
    let site = Site::new();
    let [a, b, c] = start_abc(&site);
    let key = create(&a, "app");
    replicate(&a, "app", "b");
    replicate(&a, "app", "c");

    let primary = a.client().describe_key("app").unwrap();
    assert_eq!(primary.role, KeyRole::Primary);
    let zones: Vec<_> = primary
        .replicas
        .iter()
        .map(|r| (r.zone.as_str(), r.confirmed_version))
        .collect();
    assert_eq!(zones, vec![("b", Some(1)), ("c", Some(1))]);
    for d in [&b, &c] {
        let r = d.client().describe_key("app").unwrap();
        assert_eq!(r.id, key.id);
        assert_eq!(
            r.role,
            KeyRole::Replica {
                primary_zone: "a".into()
            }
        );
        assert_eq!(r.zone, d.opts.zone);
    }
    let text = String::from_utf8(b.kmsctl(&["key", "describe", "app"], b"").stdout).unwrap();
    assert!(text.contains("primary zone:   a"), "{text}");

    // A blob wrapped in any zone unwraps in every zone.
    let ctx = Context::from([("tenant".to_string(), "7".to_string())]);
    for from in [&a, &b, &c] {
        let blob = from.client().wrap("app", b"dek-bytes", &ctx).unwrap();
        for to in [&a, &b, &c] {
            assert_eq!(&to.client().unwrap(&blob, &ctx).unwrap()[..], b"dek-bytes");
        }
    }

    // Rotation happens on the primary and reaches every replica.
    let old = a.client().wrap("app", b"old", &Context::new()).unwrap();
    a.client().rotate_key("app").unwrap();
    let history = rotations(&a, "app");
    assert_eq!(history.len(), 2);
    await_history(&b, "app", &history);
    await_history(&c, "app", &history);
    let new = a.client().wrap("app", b"new", &Context::new()).unwrap();
    for d in [&b, &c] {
        assert_eq!(&d.client().unwrap(&old, &Context::new()).unwrap()[..], b"old");
        assert_eq!(&d.client().unwrap(&new, &Context::new()).unwrap()[..], b"new");
    }
    let confirmed = wait_for(CONVERGE, || {
        let k = a.client().describe_key("app").ok()?;
        k.replicas.iter().all(|r| r.confirmed_version == Some(2)).then_some(k)
    });
    assert!(confirmed.is_some(), "primary never saw both replicas confirm version 2");

    // Replicas refuse rotation and its settings, naming the primary zone.
    let out = b.kmsctl(&["key", "rotate", "app"], b"");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not-primary") && stderr(&out).contains("zone a"),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(b.client().disable_rotation("app")), ErrorCode::NotPrimary);
    assert_eq!(code(c.client().enable_rotation("app", Some(30))), ErrorCode::NotPrimary);
}

#[test]
fn what_cannot_be_replicated_is_refused_clearly() {
    let site = Site::new();
    let [a, b, _c] = start_abc(&site);
    create(&a, "app");
    let mut ca = a.client();
    assert_eq!(code(ca.replicate_key("default", "b")), ErrorCode::Forbidden);
    assert_eq!(code(ca.replicate_key("app", "nowhere")), ErrorCode::InvalidArgument);
    assert_eq!(code(ca.replicate_key("app", "a")), ErrorCode::InvalidArgument);

    // A name taken in the target zone: refused there, nothing left behind here.
    create(&b, "taken");
    create(&a, "taken");
    assert_eq!(code(ca.replicate_key("taken", "b")), ErrorCode::InvalidArgument);
    let k = ca.describe_key("taken").unwrap();
    assert_eq!((k.role, k.replicas.len()), (KeyRole::SingleZone, 0));

    // A replica cannot itself be replicated.
    replicate(&a, "app", "b");
    assert_eq!(code(b.client().replicate_key("app", "c")), ErrorCode::NotPrimary);
    let out = b.kmsctl(&["key", "replicate", "app", "--zone", "c"], b"");
    assert!(stderr(&out).contains("not-primary"), "{}", stderr(&out));
}

#[test]
fn a_replica_that_was_down_catches_up() {
    let site = Site::new();
    let [a, b, mut c] = start_abc(&site);
    create(&a, "app");
    replicate(&a, "app", "b");
    replicate(&a, "app", "c");
    assert!(c.terminate().success());
    a.client().rotate_key("app").unwrap();
    a.client().rotate_key("app").unwrap();
    let history = rotations(&a, "app");
    assert_eq!(history.len(), 3);
    await_history(&b, "app", &history);
    c.restart();
    await_history(&c, "app", &history);
    let lagging = wait_for(CONVERGE, || {
        let k = a.client().describe_key("app").ok()?;
        k.replicas.iter().all(|r| r.confirmed_version == Some(3)).then_some(())
    });
    assert!(lagging.is_some(), "primary never saw c confirm version 3\n{}", a.logs());
}

/// Sends `frame` to `zone` at `addr` over mutual TLS with the identity
/// `cert` (which need not be `frame.from_zone`'s), as a hostile or
/// misconfigured peer would: kmsd's own client side, from this process.
fn send_as(
    cert: &ZoneCert,
    me: &str,
    zone: &str,
    addr: SocketAddr,
    frame: ReplicationFrame,
) -> Result<ReplicationFrame, String> {
    use kmsd::replication::tls::{PeerTls, TlsFiles};
    use kmsd::replication::transport::{PeerTransport, Route, ZoneTransport};
    let files = TlsFiles {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        ca: cert.ca.clone(),
    };
    let tls = PeerTls::load(&files, me).map_err(|e| e.to_string())?;
    let routes = HashMap::from([(
        zone.to_string(),
        Route::Tls {
            address: addr.to_string(),
        },
    )]);
    let t = ZoneTransport::new(routes, Some(std::sync::Arc::new(tls)), 1 << 20, Duration::from_secs(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(t.send(zone, frame)).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    })
}

fn pull_frame(from: &str, to: &str, key: uuid::Uuid) -> ReplicationFrame {
    use kmsd::replication::message::{frame, Message};
    frame(from, to, &Message::Pull { key }).unwrap()
}

fn await_log(d: &TestDaemon, needle: &str) {
    let found = wait_for(CONVERGE, || d.logs().contains(needle).then_some(()));
    assert!(
        found.is_some(),
        "zone {} did not log {needle:?}:\n{}",
        d.opts.zone,
        d.logs()
    );
}

#[test]
fn a_peer_is_who_its_certificate_says_and_nothing_else() {
    let site = Site::new();
    let [a, b, _c] = start_abc(&site);
    let key = create(&a, "app");
    replicate(&a, "app", "b");
    let addr = site.addr("a");

    // b, as itself, pulls the key it holds a replica of.
    assert!(send_as(&site.cert("b"), "b", "a", addr, pull_frame("b", "a", key.id)).is_ok());

    // c's genuine certificate, claiming to be b: refused and logged.
    let e = send_as(&site.cert("c"), "c", "a", addr, pull_frame("b", "a", key.id)).unwrap_err();
    assert!(
        e.contains("permission-denied") && e.contains("comes from zone c"),
        "{e}"
    );
    await_log(&a, "claims another zone");

    // c as itself: the key has no replica in c, so it does not exist for c.
    let e = send_as(&site.cert("c"), "c", "a", addr, pull_frame("c", "a", key.id)).unwrap_err();
    assert!(e.contains("not-found"), "{e}");

    // A certificate for b from another CA: the handshake fails (the dialler
    // trusts our CA, so only a can refuse it).
    let other = tempfile::tempdir().unwrap();
    let mut forged = TestCa::new().issue(other.path(), "b");
    forged.ca = site.cert("b").ca;
    let e = send_as(&forged, "b", "a", addr, pull_frame("b", "a", key.id)).unwrap_err();
    assert!(!e.contains("not-found"), "{e}");
    await_log(&a, "peering TLS handshake failed");

    // A valid certificate for a zone a does not know.
    let z = site.ca.issue(site.dir.path(), "z");
    let e = send_as(&z, "z", "a", addr, pull_frame("z", "a", key.id)).unwrap_err();
    assert!(e.contains("not a configured peer"), "{e}");

    // a server that is not the zone dialled: b's address answers for "a".
    let e = send_as(&site.cert("c"), "c", "a", site.addr("b"), pull_frame("c", "a", key.id)).unwrap_err();
    assert!(e.contains("certificate for zone b"), "{e}");

    // c, with its own valid certificate, pushes a's key to b (which holds
    // a replica of it): only the key's primary zone may; refused.
    let answer = send_as(&site.cert("b"), "b", "a", addr, pull_frame("b", "a", key.id)).unwrap();
    let export = match kmsd::replication::message::read(&answer).unwrap() {
        kmsd::replication::message::Message::Export(e) => e,
        other => panic!("{other:?}"),
    };
    let push = kmsd::replication::message::frame("c", "b", &kmsd::replication::message::Message::Push(export)).unwrap();
    let e = send_as(&site.cert("c"), "c", "b", site.addr("b"), push).unwrap_err();
    assert!(
        e.contains("invalid-argument") && e.contains("primary is in zone a"),
        "{e}"
    );
    await_log(&b, "replication request refused");

    // Nothing of this reached b's replica.
    assert_eq!(rotations(&b, "app").len(), 1);

    // On the Unix socket, a local process whose uid is no peer zone's.
    let forged = pull_frame("b", "a", key.id);
    let err = a.client().call(Request::Replication(forged)).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
    await_log(&a, "no peer zone's");
}

#[test]
fn a_daemon_refuses_a_certificate_that_is_not_its_zones() {
    let site = Site::new();
    let opts = site.options_as("a", &["a", "b"], &site.cert("b"));
    let Err(logs) = TestDaemon::try_start_with(opts) else {
        panic!("kmsd started with zone b's certificate as zone a");
    };
    assert!(logs.contains("is for zone b, but this daemon is zone a"), "{logs}");
}

#[test]
fn sigkill_between_persisting_and_pushing_converges() {
    let site = Site::new();
    let mut opts = site.options("a", &ABC);
    opts.env.push(("KMSDTEST_FAULT".into(), "kill-before-push".into()));
    let mut a = TestDaemon::start_with(opts);
    assert!(
        a.logs().contains("built with the test-faults feature"),
        "the harness's kmsd must have its fault points\n{}",
        a.logs()
    );
    let [b, c] = ["b", "c"].map(|z| site.start(z, &ABC));
    create(&a, "app");
    replicate(&a, "app", "b");
    replicate(&a, "app", "c");

    // The rotation is persisted; the push kills the daemon before sending.
    let _ = a.client().rotate_key("app");
    let status = a.wait_exit(CONVERGE);
    assert!(status.is_some(), "the fault point did not fire\n{}", a.logs());

    a.opts.env.retain(|(k, _)| k != "KMSDTEST_FAULT");
    a.restart();
    let history = rotations(&a, "app");
    assert_eq!(history.len(), 2, "the rotation was persisted before the kill");
    await_history(&b, "app", &history);
    await_history(&c, "app", &history);
}

#[test]
fn the_primary_exports_push_counts_and_replica_lag() {
    let site = Site::new();
    let addr = free_tcp_addr();
    let mut opts = site.options("a", &["a", "b"]);
    opts.env.push(("KMSD_METRICS__LISTEN".into(), addr.to_string()));
    let a = TestDaemon::start_with(opts);
    let _b = site.start("b", &["a", "b"]);
    let key = create(&a, "app");
    replicate(&a, "app", "b");
    a.client().rotate_key("app").unwrap();
    let lag = format!(r#"kmsd_replica_lag_versions{{key="{}",zone="b"}}"#, key.id);
    let pushes = r#"kmsd_replication_pushes_total{outcome="ok"}"#;
    let body = wait_for(CONVERGE, || {
        let (_, body) = scrape(addr).ok()?;
        let caught_up = metric(&body, &lag)? == 0.0 && metric(&body, pushes)? >= 1.0;
        caught_up.then_some(body)
    });
    let body = body.unwrap_or_else(|| scrape(addr).map(|r| r.1).unwrap_or_default());
    assert_eq!(metric(&body, &lag), Some(0.0), "{body}");
    assert!(metric(&body, pushes) >= Some(1.0), "the rotation was pushed: {body}");
    assert_eq!(
        metric(&body, r#"kmsd_replication_pushes_total{outcome="failed"}"#),
        Some(0.0)
    );
    assert_eq!(metric(&body, "kmsd_replication_frames_rejected_total"), Some(0.0));
}

/// Zones on one host over their Unix sockets: each is recognised by the
/// uid its daemon runs as, in both directions.
#[test]
fn unix_socket_peers_are_told_apart_by_uid() {
    use std::os::unix::fs::PermissionsExt;
    const B_UID: u32 = 2101;
    let site = Site::new();
    std::fs::set_permissions(site.dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let unix = |zone: &str, other: &str, uid: u32| {
        DaemonOptions {
        zone: zone.into(),
        extra_config: format!(
            "[replication]\npull_interval_secs = 1\nretry_max_secs = 1\n[[peer]]\nzone = {other:?}\nsocket = {:?}\nuid = {uid}\n",
            site.socket(other)
        ),
        socket: Some(site.socket(zone)),
        ..DaemonOptions::default()
    }
    };
    let a = TestDaemon::start_with(unix("a", "b", B_UID));
    let b = TestDaemon::start_with(DaemonOptions {
        run_as: Some(B_UID),
        ..unix("b", "a", 0)
    });
    // b's daemon must reach a's socket (as membership of its group would).
    std::fs::set_permissions(site.socket("a"), std::fs::Permissions::from_mode(0o666)).unwrap();
    create(&a, "app");
    replicate(&a, "app", "b");
    a.client().rotate_key("app").unwrap();
    await_history(&b, "app", &rotations(&a, "app"));

    // Zone c is configured with a uid its daemon does not run as: a
    // refuses to talk to it, and says why.
    let wrong = TestDaemon::start_with(DaemonOptions {
        extra_config: format!("[[peer]]\nzone = \"c\"\nsocket = {:?}\nuid = 2102\n", site.socket("b")),
        ..DaemonOptions::default()
    });
    create(&wrong, "k");
    let err = wrong.client().replicate_key("k", "c").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(
        err.to_string()
            .contains("runs as uid 2101, not the configured uid 2102"),
        "{err}"
    );
}

/// A genuine old frame sent again, by a holder of the primary's
/// certificate, cannot revert a replica: exports carry the primary's
/// serial and a replica refuses one older than it holds.
#[test]
fn a_replayed_push_is_refused_and_changes_nothing() {
    use kmsd::replication::message::{self, Message};
    let site = Site::new();
    let [a, b, _c] = start_abc(&site);
    let key = create(&a, "app");
    replicate(&a, "app", "b");
    // Capture the export as it is now, as zone b would receive it.
    let answer = send_as(&site.cert("b"), "b", "a", site.addr("a"), pull_frame("b", "a", key.id)).unwrap();
    let Message::Export(old) = message::read(&answer).unwrap() else {
        panic!("no export")
    };
    // The primary changes the schedule and rotates; b follows.
    a.client().disable_rotation("app").unwrap();
    a.client().rotate_key("app").unwrap();
    let history = rotations(&a, "app");
    await_history(&b, "app", &history);
    let caught_up = wait_for(CONVERGE, || {
        let k = b.client().describe_key("app").ok()?;
        (!k.rotation.enabled).then_some(k)
    });
    let before = caught_up.expect("b took the new schedule");
    // Replaying the old export as zone a, with a's own certificate.
    let replay = message::frame("a", "b", &Message::Push(old)).unwrap();
    let e = send_as(&site.cert("a"), "a", "b", site.addr("b"), replay).unwrap_err();
    assert!(e.contains("stale export"), "{e}");
    await_log(&b, "stale export");
    assert_eq!(
        b.client().describe_key("app").unwrap(),
        before,
        "the replay changed the replica"
    );
    assert_eq!(rotations(&b, "app"), history);
}

/// `key unreplicate` on the primary: the zone forgets its replica, the
/// primary forgets the zone, and later versions go only to the others.
/// (A replica deleted in its own zone, whose waiting period needs a moved
/// clock, is tested in `daemon/src/replication/mod.rs`.)
#[test]
fn unreplicate_removes_the_zones_replica() {
    let site = Site::new();
    let [a, b, c] = start_abc(&site);
    let key = create(&a, "app");
    replicate(&a, "app", "b");
    replicate(&a, "app", "c");
    // Unreplicate c: c forgets the key, the primary forgets c.
    let out = a.kmsctl(&["key", "unreplicate", "app", "--zone", "c"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(code(c.client().describe_key("app")), ErrorCode::NotFound);
    let k = a.client().describe_key("app").unwrap();
    let zones: Vec<_> = k.replicas.iter().map(|r| r.zone.as_str()).collect();
    assert_eq!(zones, ["b"]);
    a.client().rotate_key("app").unwrap();
    await_history(&b, "app", &rotations(&a, "app"));
    assert_eq!(code(c.client().describe_key(&key.id.to_string())), ErrorCode::NotFound);
    // From a replica zone it is not-primary; for a zone without one,
    // invalid-argument.
    assert_eq!(code(b.client().unreplicate_key("app", "c")), ErrorCode::NotPrimary);
    assert_eq!(code(a.client().unreplicate_key("app", "c")), ErrorCode::InvalidArgument);
}

/// Failover (`key promote`), with the primary's daemon killed: the promoted
/// zone rotates, the other replica follows it, and the old primary, when
/// restarted, becomes a replica of the new one with the same history.
#[test]
fn promote_a_replica_when_the_primary_is_killed() {
    let site = Site::new();
    let [mut a, b, c] = start_abc(&site);
    create(&a, "app");
    replicate(&a, "app", "b");
    replicate(&a, "app", "c");
    let ctx = Context::new();
    let before = a.client().wrap("app", b"before", &ctx).unwrap();
    a.kill9();

    let out = b.kmsctl(&["key", "promote", "app"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let k = b.client().describe_key("app").unwrap();
    assert_eq!(k.role, KeyRole::Primary);
    let rotated = b.client().rotate_key("app").unwrap().unwrap().active_version;
    assert!(
        rotated > 1 << 24,
        "the promoted zone numbers its versions in its own epoch: {rotated}"
    );
    let history = rotations(&b, "app");
    await_history(&c, "app", &history);
    let after = b.client().wrap("app", b"after", &ctx).unwrap();

    a.restart();
    let demoted = wait_for(CONVERGE, || {
        let k = a.client().describe_key("app").ok()?;
        (k.role
            == KeyRole::Replica {
                primary_zone: "b".into(),
            })
        .then_some(k)
    });
    assert!(demoted.is_some(), "the old primary did not follow zone b\n{}", a.logs());
    await_history(&a, "app", &history);
    assert_eq!(code(a.client().rotate_key("app")), ErrorCode::NotPrimary);
    for d in [&a, &b, &c] {
        assert_eq!(&d.client().unwrap(&before, &ctx).unwrap()[..], b"before");
        assert_eq!(&d.client().unwrap(&after, &ctx).unwrap()[..], b"after");
    }
}

/// Silent TCP connections to a zone's peering port, all from one address,
/// take at most four handshake places and no peer slot: a real zone (from
/// another address) still replicates while they hang.
#[test]
fn silent_connections_from_one_address_do_not_keep_zones_out() {
    let site = Site::new();
    let [a, b, _c] = start_abc(&site);
    create(&a, "app");
    let from = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let attacker: Vec<std::net::TcpStream> = (0..20).filter_map(|_| connect_from(from, site.addr("b"))).collect();
    assert_eq!(attacker.len(), 20, "could not connect from {from}");
    // All but four are closed at once.
    let open = attacker.iter().filter(|s| !closed(s)).count();
    assert!(open <= 4, "{open} handshakes from one address stayed open");
    // Zone a (from 127.0.0.1) still replicates to b meanwhile.
    replicate(&a, "app", "b");
    assert_eq!(b.client().describe_key("app").unwrap().name.as_deref(), Some("app"));
    drop(attacker);
}

/// Whether the other end closed `s` (EOF or reset) within 300 ms.
fn closed(mut s: &std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// A TCP connection to `to` from the local address `from`.
fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> Option<std::net::TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else { return None };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).ok()?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0))).ok()?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).ok()?;
    Some(std::net::TcpStream::from(fd))
}
