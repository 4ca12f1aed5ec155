//! The Kubernetes KMS v2 plugin socket of the real daemon, driven by
//! `tests/kubernetes/apiserver.py`: a client of another gRPC stack
//! (Python grpcio) built from the same `.proto`, playing kube-apiserver.
//! It polls Status, seals DEK seeds, rotates the key with kmsctl, decrypts
//! what came before, sees a disabled key fail Status, and checks the size
//! limits and altered input; here the daemon is also SIGKILLed and
//! restarted, a uid outside the key's policy is refused, and the audit
//! log, the metrics and the connection limits are checked.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kms_tests::{bin, free_tcp_addr, metric, scrape, stderr, stdout, DaemonOptions, TestDaemon};

/// Debian's interpreter, for which python3-grpcio and python3-grpc-tools
/// are installed (a `python3` earlier in PATH may be another one).
const PYTHON: &str = "/usr/bin/python3";

/// A uid no key's policy names.
const STRANGER: u32 = 65534;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Whether Python's grpcio and grpc_tools are installed; under `CI` their
/// absence fails the test.
fn python_grpc() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with grpcio and grpc_tools is needed (Debian python3-grpcio, python3-grpc-tools), and CI is set"
        );
        eprintln!("skipping: python3 grpcio/grpc_tools missing (set CI to make this a failure)");
    }
    ok
}

fn root() -> bool {
    let me = nix::unistd::geteuid().is_root();
    if !me {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test runs a client as another uid: it needs root, and CI is set"
        );
        eprintln!("skipping: not root (set CI to make this a failure)");
    }
    me
}

struct Cluster {
    d: TestDaemon,
    _plugin_dir: tempfile::TempDir,
    plugin: PathBuf,
    metrics: std::net::SocketAddr,
}

impl Cluster {
    fn start(extra_env: &[(&str, &str)]) -> Self {
        let metrics = free_tcp_addr();
        let dir = tempfile::Builder::new().prefix("kmsd-k8s-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let plugin = dir.path().join("kubernetes").join("kms-v2.sock");
        let mut opts = DaemonOptions::with_metrics(metrics);
        opts.extra_config = format!("[kubernetes]\nsocket = {plugin:?}\nkey = \"cluster\"\nmode = 0o666\n");
        opts.env.push(("KMSD_AUDIT__DATA_OPERATIONS".into(), "true".into()));
        for (k, v) in extra_env {
            opts.env.push((k.to_string(), v.to_string()));
        }
        let d = TestDaemon::start_with(opts);
        Self {
            d,
            _plugin_dir: dir,
            plugin,
            metrics,
        }
    }

    fn apiserver(&self, command: &str, extra: &[&str], as_uid: Option<u32>) -> Output {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(PYTHON);
        cmd.arg(repo().join("tests/kubernetes/apiserver.py"))
            .arg("--socket")
            .arg(&self.plugin)
            .arg("--proto")
            .arg(repo().join("daemon/proto/kms_v2.proto"))
            .arg("--kmsctl")
            .arg(bin("kmsctl"))
            .arg("--kmsd-socket")
            .arg(&self.d.socket)
            .args(["--key", "cluster"])
            .args(extra)
            .arg(command)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        if let Some(uid) = as_uid {
            cmd.uid(uid).gid(uid).env("HOME", "/");
        }
        let out = cmd.output().expect("run /usr/bin/python3");
        eprintln!("apiserver.py {command}:\n{}{}", stdout(&out), stderr(&out));
        out
    }
}

/// Every series in `series` counts at least one.
fn expect_counts(addr: std::net::SocketAddr, series: &[&str]) {
    let (_, body) = scrape(addr).unwrap();
    for series in series {
        let v = metric(&body, series).unwrap_or_else(|| panic!("no {series} in\n{body}"));
        assert!(v >= 1.0, "{series} = {v}");
    }
}

#[test]
fn kube_apiserver_seals_rotates_and_reopens_through_the_plugin_socket() {
    if !python_grpc() || !root() {
        return;
    }
    let mut c = Cluster::start(&[]);
    let mode = std::fs::metadata(&c.plugin).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "[kubernetes] mode");
    let out = c.d.kmsctl(&["key", "create", "--name", "cluster"], b"");
    assert!(out.status.success(), "{}", stderr(&out));

    let saved = c.d.dir.path().join("sealed.json");
    let save = saved.to_str().unwrap();
    let out = c.apiserver("scenario", &["--save", save], None);
    assert!(out.status.success(), "the apiserver scenario failed");

    // Counted in the metrics, per operation and per plugin method.
    expect_counts(
        c.metrics,
        &[
            r#"kmsd_requests_total{op="wrap",outcome="ok"}"#,
            r#"kmsd_requests_total{op="unwrap",outcome="decrypt-failed"}"#,
            r#"kmsd_kubernetes_requests_total{method="encrypt",outcome="ok"}"#,
            r#"kmsd_kubernetes_requests_total{method="encrypt",outcome="invalid-argument"}"#,
            r#"kmsd_kubernetes_requests_total{method="encrypt",outcome="failed-precondition"}"#,
            r#"kmsd_kubernetes_requests_total{method="decrypt",outcome="ok"}"#,
            r#"kmsd_kubernetes_requests_total{method="decrypt",outcome="invalid-argument"}"#,
            r#"kmsd_kubernetes_requests_total{method="status",outcome="ok"}"#,
            r#"kmsd_kubernetes_requests_total{method="status",outcome="unhealthy"}"#,
        ],
    );

    // Nothing is lost to a SIGKILL: everything sealed opens after restart.
    c.d.kill9();
    c.d.restart();
    let out = c.apiserver("reopen", &["--load", save], None);
    assert!(out.status.success(), "ciphertexts lost across a SIGKILL");

    // The caller is who the kernel says: a uid outside the key's policy
    // gets nothing, whatever it sends.
    std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(c.d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = c.apiserver("denied", &["--load", save], Some(STRANGER));
    assert!(out.status.success(), "a uid outside the policy was not refused");

    // Audited like the socket's wrap and unwrap, with the caller's uid.
    let audit = std::fs::read_to_string(c.d.dir.path().join("state/audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |op: &str, uid: u32, outcome: &str| {
        lines
            .iter()
            .filter(|l| l["op"] == op && l["uid"] == uid && l["outcome"] == outcome)
            .count()
    };
    assert!(count("wrap", 0, "ok") >= 4, "wrap by root not audited:\n{audit}");
    assert!(count("unwrap", 0, "ok") >= 4, "unwrap by root not audited");
    assert!(count("unwrap", 0, "decrypt-failed") >= 2, "refused opens not audited");
    assert!(count("wrap", 0, "disabled") >= 1, "use of a disabled key not audited");
    assert!(
        count("wrap", STRANGER, "permission-denied") >= 1,
        "the stranger's wrap not audited"
    );
    assert!(
        count("unwrap", STRANGER, "permission-denied") >= 1,
        "the stranger's unwrap not audited"
    );
    assert!(
        !audit.contains("kubernetes-kms-v2") && !audit.contains("req-"),
        "audit lines carry no context or request ids"
    );

    // After the restart: the stranger's refusals and root's opens.
    expect_counts(
        c.metrics,
        &[
            r#"kmsd_requests_total{op="unwrap",outcome="permission-denied"}"#,
            r#"kmsd_kubernetes_requests_total{method="decrypt",outcome="ok"}"#,
            r#"kmsd_kubernetes_requests_total{method="encrypt",outcome="permission-denied"}"#,
            r#"kmsd_kubernetes_requests_total{method="decrypt",outcome="permission-denied"}"#,
            r#"kmsd_kubernetes_requests_total{method="status",outcome="unhealthy"}"#,
        ],
    );

    // SIGTERM removes the socket.
    assert!(c.d.terminate().success());
    assert!(!c.plugin.exists(), "the plugin socket outlived kmsd");
}

/// What a new connection hears first: an admitted one the server's HTTP/2
/// SETTINGS frame, a refused one the end of the stream.
fn served(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match s.read(&mut [0; 64]) {
        Ok(n) => n > 0,
        Err(e) => panic!("no answer from the plugin socket: {e}"),
    }
}

#[test]
fn plugin_connections_are_bounded_per_uid() {
    let c = Cluster::start(&[("KMSD_LIMITS__MAX_CONNECTIONS_PER_UID", "3")]);
    let mut held: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&c.plugin).unwrap()).collect();
    for s in &mut held {
        assert!(served(s), "a connection within the limit was refused");
    }
    let mut over = UnixStream::connect(&c.plugin).unwrap();
    assert!(!served(&mut over), "a fourth connection of one uid was served");
    drop(held);
    let mut again = None;
    for _ in 0..50 {
        let mut s = UnixStream::connect(&c.plugin).unwrap();
        if served(&mut s) {
            again = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(again.is_some(), "no connection served after the others closed");
    let logs = c.d.logs();
    assert!(logs.contains("connections refused"), "{logs}");
}

#[test]
fn a_silent_plugin_connection_loses_its_place() {
    let c = Cluster::start(&[("KMSD_LIMITS__HANDSHAKE_TIMEOUT_SECS", "1")]);
    let mut s = UnixStream::connect(&c.plugin).unwrap();
    assert!(served(&mut s), "the connection was not served");
    // Says nothing: closed after the handshake timeout, not kept.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    assert!(
        r.is_ok() || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a silent connection stayed open: {r:?}"
    );
}

#[test]
fn the_plugin_socket_is_off_unless_configured_and_never_kmsds_own() {
    let d = TestDaemon::start();
    let entries: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !entries.iter().any(|e| e.contains("kms-v2") || e == "kubernetes"),
        "{entries:?}"
    );
    let own = d.socket.to_str().unwrap().to_string();
    let r = TestDaemon::try_start_with(DaemonOptions {
        socket: Some(d.dir.path().join("other.sock")),
        extra_config: format!("[kubernetes]\nsocket = {own:?}\nkey = \"k\"\n"),
        ..Default::default()
    });
    // A live socket is never taken over.
    let err = r.expect_err("a plugin socket on a live kmsd socket was accepted");
    assert!(err.contains("already listening"), "{err}");
}
