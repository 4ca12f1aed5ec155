//! Multi-zone keys across real daemons: three `kmsd` processes (zones a, b
//! and c) on one machine, peered through their Unix sockets with a shared
//! peering key. Replication, cross-zone unwrap, propagation of rotations,
//! catching up after downtime or a crash, and the refusals.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_client::proto::{Context, CreateKey, ErrorCode, KeyInfo, KeyRole, ReplicationFrame, Request, RotationEntry};
use kms_client::ClientError;
use kms_tests::{free_tcp_addr, metric, scrape, stderr, wait_for, write_root_key, DaemonOptions, TestDaemon};

/// How long replication may take to converge in these tests.
pub(crate) const CONVERGE: Duration = Duration::from_secs(20);

/// A shared folder for the sockets and the peering key of one test.
pub(crate) struct Site {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) peer_key: PathBuf,
}

impl Site {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("kmsd-zones-").tempdir().unwrap();
        let peer_key = dir.path().join("peer-key");
        write_root_key(&peer_key);
        Self { dir, peer_key }
    }

    pub(crate) fn socket(&self, zone: &str) -> PathBuf {
        self.dir.path().join(format!("{zone}.sock"))
    }

    /// Options for `zone`, peered with every other zone of `all`.
    pub(crate) fn options(&self, zone: &str, all: &[&str], peer_key: &Path) -> DaemonOptions {
        let mut extra = "[replication]\npull_interval_secs = 1\nretry_max_secs = 1\n".to_string();
        for other in all.iter().filter(|z| **z != zone) {
            extra.push_str(&format!(
                "[[peer]]\nzone = {other:?}\nsocket = {:?}\n",
                self.socket(other)
            ));
        }
        DaemonOptions {
            zone: zone.to_string(),
            extra_config: extra,
            env: vec![
                ("KMSD_PEER_KEY".into(), peer_key.display().to_string()),
                ("KMSD_ACCESS__PEERS".into(), format!("uid:{}", nix::unistd::getuid())),
            ],
            socket: Some(self.socket(zone)),
            ..DaemonOptions::default()
        }
    }

    pub(crate) fn start(&self, zone: &str, all: &[&str]) -> TestDaemon {
        TestDaemon::start_with(self.options(zone, all, &self.peer_key))
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

#[test]
fn a_peer_with_the_wrong_peering_key_is_refused_and_logged() {
    let site = Site::new();
    let a = site.start("a", &["a", "x"]);
    let other_key = site.dir.path().join("other-peer-key");
    write_root_key(&other_key);
    let x = TestDaemon::start_with(site.options("x", &["a", "x"], &other_key));
    create(&a, "app");

    let err = a.client().replicate_key("app", "x").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
    let logged = wait_for(CONVERGE, || {
        let l = x.logs();
        (l.contains("does not verify") && l.contains("claimed_zone=a")).then_some(())
    });
    assert!(logged.is_some(), "x did not log the refusal:\n{}", x.logs());
    let k = a.client().describe_key("app").unwrap();
    assert_eq!((k.role, k.replicas.len()), (KeyRole::SingleZone, 0));

    // A forged frame straight from a local process is refused as well.
    let forged = ReplicationFrame {
        from_zone: "x".into(),
        to_zone: "a".into(),
        nonce: [0; 12],
        sealed: vec![0; 64],
    };
    let err = a.client().call(Request::Replication(forged)).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
    assert!(a.logs().contains("does not verify"));
}

#[test]
fn sigkill_between_persisting_and_pushing_converges() {
    let site = Site::new();
    let mut opts = site.options("a", &ABC, &site.peer_key);
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
    let mut opts = site.options("a", &["a", "b"], &site.peer_key);
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
