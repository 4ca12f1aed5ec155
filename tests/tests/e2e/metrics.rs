//! The Prometheus endpoint of the real daemon: a scrape after known
//! traffic has the expected series and counts and passes
//! `promtool check metrics`; `listen = ""` serves nothing; a busy address
//! stops start-up with an error naming `metrics.listen`.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use kms_client::proto::{Context, CreateKey, ErrorCode};
use kms_tests::{free_tcp_addr, metric, scrape, stderr, wait_for, DaemonOptions, TestDaemon};

fn create(d: &TestDaemon, name: &str) -> String {
    let req = CreateKey {
        name: Some(name.into()),
        ..CreateKey::default()
    };
    d.client().create_key(req).unwrap().id.to_string()
}

/// Scrapes until every line of `want` is in the body (the state series
/// are refreshed in the background); the last body otherwise.
pub(crate) fn scrape_until(addr: SocketAddr, want: &[String]) -> String {
    let mut last = String::new();
    let found = wait_for(Duration::from_secs(15), || {
        let (code, body) = scrape(addr).ok()?;
        assert_eq!(code, 200);
        let missing = want.iter().any(|w| !body.lines().any(|l| l == w));
        last = body;
        (!missing).then(|| last.clone())
    });
    found.unwrap_or_else(|| {
        let missing: Vec<_> = want.iter().filter(|w| !last.lines().any(|l| l == *w)).collect();
        panic!("missing {missing:#?} in\n{last}")
    })
}

/// `promtool check metrics` on `body`; skipped with a message when
/// promtool is absent, unless `CI` is set.
fn promtool_check(body: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping promtool check metrics: {e} (apt-get install prometheus)");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success() && text.trim().is_empty(),
        "promtool: {text}\n{body}"
    );
}

#[test]
fn a_scrape_after_traffic_has_the_expected_series_and_passes_promtool() {
    let addr = free_tcp_addr();
    let d = TestDaemon::start_with(DaemonOptions::with_metrics(addr));
    let app = create(&d, "app");
    create(&d, "gone");
    let mut c = d.client();
    c.disable_key("gone").unwrap();
    let ctx = Context::new();
    let blobs: Vec<_> = (0..5).map(|_| c.wrap("app", &[7; 32], &ctx).unwrap()).collect();
    for b in &blobs[..3] {
        assert_eq!(&c.unwrap(b, &ctx).unwrap()[..], &[7; 32]);
    }
    let blob = c.encrypt("app", b"hello", &ctx).unwrap();
    let mut bad = blob.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(
        c.decrypt(&bad, &ctx).unwrap_err().code(),
        Some(ErrorCode::DecryptFailed)
    );
    assert_eq!(c.describe_key("nope").unwrap_err().code(), Some(ErrorCode::NotFound));
    c.rotate_key("app").unwrap();
    let want = [
        r#"kmsd_requests_total{op="key-create",outcome="ok"} 2"#.to_string(),
        r#"kmsd_requests_total{op="wrap",outcome="ok"} 5"#.to_string(),
        r#"kmsd_requests_total{op="unwrap",outcome="ok"} 3"#.to_string(),
        r#"kmsd_requests_total{op="encrypt",outcome="ok"} 1"#.to_string(),
        r#"kmsd_requests_total{op="decrypt",outcome="decrypt-failed"} 1"#.to_string(),
        r#"kmsd_requests_total{op="decrypt",outcome="ok"} 0"#.to_string(),
        r#"kmsd_requests_total{op="key-describe",outcome="not-found"} 1"#.to_string(),
        r#"kmsd_requests_total{op="key-rotate",outcome="ok"} 1"#.to_string(),
        r#"kmsd_request_duration_seconds_count{op="wrap"} 5"#.to_string(),
        r#"kmsd_request_duration_seconds_bucket{op="wrap",le="+Inf"} 5"#.to_string(),
        // 5 wrapped DEKs of 32 bytes and "hello"; 3 unwrapped DEKs.
        "kmsd_bytes_encrypted_total 165".to_string(),
        "kmsd_bytes_decrypted_total 96".to_string(),
        r#"kmsd_rotations_total{kind="manual"} 1"#.to_string(),
        r#"kmsd_rotations_total{kind="automatic"} 0"#.to_string(),
        // `app` and the store's default key; `gone` is disabled.
        r#"kmsd_keys{state="enabled"} 2"#.to_string(),
        r#"kmsd_keys{state="disabled"} 1"#.to_string(),
        r#"kmsd_keys{state="pending-deletion"} 0"#.to_string(),
        format!(r#"kmsd_key_versions{{key="{app}"}} 2"#),
        "kmsd_connections_open 1".to_string(),
        format!(r#"kmsd_build_info{{version="{}"}} 1"#, env!("CARGO_PKG_VERSION")),
    ];
    let body = scrape_until(addr, &want);
    promtool_check(&body);
    // Key names never reach the endpoint (ids only).
    assert!(!body.contains("\"app\"") && !body.contains("\"gone\""), "{body}");
    drop(c);
}

/// Inodes of the TCP sockets in LISTEN state, from `/proc/net/tcp{,6}`.
fn listening_inodes() -> HashSet<String> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for fields in text.lines().skip(1).map(|l| l.split_whitespace().collect::<Vec<_>>()) {
            if fields.get(3) == Some(&"0A") {
                out.extend(fields.get(9).map(|s| s.to_string()));
            }
        }
    }
    out
}

/// Inodes of the sockets process `pid` holds.
fn socket_inodes(pid: i32) -> HashSet<String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

#[test]
fn an_empty_listen_address_serves_no_metrics() {
    let d = TestDaemon::start();
    d.client().status().unwrap();
    let pid = d.pid().as_raw();
    let listening = listening_inodes();
    let held = socket_inodes(pid);
    assert!(!held.is_empty(), "kmsd holds its Unix socket");
    assert!(held.is_disjoint(&listening), "kmsd listens on TCP with listen = \"\"");
}

#[test]
fn a_busy_metrics_address_stops_start_up_naming_the_setting() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let mut d = TestDaemon::start();
    assert!(d.terminate().success());
    let out = d
        .command()
        .env("KMSD_METRICS__LISTEN", addr.to_string())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("metrics.listen") && err.contains(&addr.to_string()),
        "{err}"
    );
    assert!(!d.socket.exists(), "no half-started daemon");
}

#[test]
fn filesystem_operations_dek_cache_and_tampering_are_counted() {
    if !kms_tests::fuse_available() {
        return;
    }
    let addr = free_tcp_addr();
    let d = TestDaemon::start_with_mount_opts(DaemonOptions::with_metrics(addr));
    let mnt = d.mnt();
    let file = mnt.join("f");
    std::fs::write(&file, [5u8; 10_000]).unwrap();
    let m = mnt.to_str().unwrap();
    let want = [format!(r#"kmsd_fs_operations_total{{mount="{m}",op="create"}} 1"#)];
    scrape_until(addr, &want);
    let get = |body: &str, s: String| metric(body, &s).unwrap_or_else(|| panic!("no {s} in\n{body}"));
    let (miss, hit) = (
        format!(r#"kmsd_fs_dek_cache_total{{mount="{m}",result="miss"}}"#),
        format!(r#"kmsd_fs_dek_cache_total{{mount="{m}",result="hit"}}"#),
    );
    // Two handles at once: the first unwraps the DEK unless the file is
    // still open from before (FUSE sends release asynchronously, so the
    // writer's handle may outlive its close for a moment), the second
    // reuses it. Open pairs until both counters move.
    let body = wait_for(Duration::from_secs(15), || {
        let (a, b) = (std::fs::File::open(&file).unwrap(), std::fs::File::open(&file).unwrap());
        drop((a, b));
        let (_, body) = scrape(addr).ok()?;
        (metric(&body, &miss)? >= 1.0 && metric(&body, &hit)? >= 1.0).then_some(body)
    })
    .expect("a DEK cache miss and a hit are counted");
    assert!(
        get(
            &body,
            format!(r#"kmsd_fs_bytes_total{{mount="{m}",direction="written"}}"#)
        ) >= 10_000.0
    );
    assert_eq!(
        get(&body, format!(r#"kmsd_fs_tamper_detections_total{{mount="{m}"}}"#)),
        0.0
    );
    // Flip a ciphertext byte in the backing file: reads now fail, counted.
    let backing = crate::backing(&d, "f");
    let mut raw = std::fs::read(&backing).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    std::fs::write(&backing, raw).unwrap();
    assert!(std::fs::read(&file).is_err());
    let tampered = format!(r#"kmsd_fs_tamper_detections_total{{mount="{m}"}}"#);
    let seen = wait_for(Duration::from_secs(15), || {
        let (_, body) = scrape(addr).ok()?;
        (metric(&body, &tampered)? >= 1.0).then_some(body)
    });
    promtool_check(&seen.expect("a tamper detection is counted"));
}

#[test]
fn scheduler_rotations_count_as_automatic() {
    const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    if !std::path::Path::new(LIBFAKETIME).exists() {
        assert!(std::env::var_os("CI").is_none(), "install the Debian package faketime");
        eprintln!("skipping: libfaketime is not installed");
        return;
    }
    let addr = free_tcp_addr();
    let mut d = TestDaemon::start_with(DaemonOptions::with_metrics(addr));
    let daily = CreateKey {
        name: Some("daily".into()),
        rotation: Some(Some(1)),
        ..CreateKey::default()
    };
    d.client().create_key(daily).unwrap();
    assert!(d.terminate().success());
    // Down for two days: the scheduler rotates once at start-up.
    d.opts.env.push(("LD_PRELOAD".into(), LIBFAKETIME.into()));
    d.opts.env.push(("FAKETIME".into(), "+2d".into()));
    d.restart();
    let want = [
        r#"kmsd_rotations_total{kind="automatic"} 1"#.to_string(),
        r#"kmsd_rotations_total{kind="manual"} 0"#.to_string(),
    ];
    scrape_until(addr, &want);
}
