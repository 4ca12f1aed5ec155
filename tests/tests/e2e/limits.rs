//! What one local caller may cost (issue 12, item 4), against the real
//! daemon: connections in all and per uid, half-sent frames, silent
//! connections, huge key references, keys per uid. Bounds are generous;
//! what is asserted is that the cost stops growing and that another
//! caller is still served while the abuse goes on.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kms_client::proto::ErrorCode;
use kms_tests::{kmsctl_as, peak_rss_kib, stderr, DaemonOptions, TestDaemon};

fn with_limits(limits: &str) -> TestDaemon {
    TestDaemon::start_with(DaemonOptions {
        extra_config: format!("[limits]\n{limits}"),
        ..DaemonOptions::default()
    })
}

/// Whether the daemon closed `s` (EOF or reset) within `wait`.
fn closed_within(mut s: &UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A connection that sends the length of a frame of `max_frame` bytes and
/// then only half of it.
fn half_frame(d: &TestDaemon) -> Option<UnixStream> {
    const MAX_FRAME: usize = 1 << 20;
    let mut s = UnixStream::connect(&d.socket).ok()?;
    let mut msg = (MAX_FRAME as u32).to_be_bytes().to_vec();
    msg.resize(4 + MAX_FRAME / 2, 0x55);
    s.write_all(&msg).ok()?;
    Some(s)
}

#[test]
fn half_sent_frames_and_connection_floods_cost_a_bounded_amount() {
    const PER_UID: usize = 8;
    const FLOOD: usize = 300;
    let d = with_limits(&format!(
        "max_connections_per_uid = {PER_UID}\nmax_connections = 64\nframe_timeout_secs = 3\n"
    ));
    let pid = d.pid().as_raw();
    let before = peak_rss_kib(pid).unwrap();
    // Root floods: 300 connections each parking half a 1 MiB frame (150 MiB
    // if every one were buffered).
    let started = Instant::now();
    let flood: Vec<UnixStream> = (0..FLOOD).filter_map(|_| half_frame(&d)).collect();
    // Meanwhile another uid is served.
    let out = kmsctl_as(&d, 3002, &["key", "create", "--name", "other"], b"");
    assert!(
        out.status.success(),
        "another uid's request during the flood: {}",
        stderr(&out)
    );
    // All but PER_UID were closed at accept, before any frame timeout.
    let open_after_accept = flood
        .iter()
        .filter(|s| !closed_within(s, Duration::from_millis(50)))
        .count();
    assert!(
        open_after_accept <= PER_UID,
        "{open_after_accept} of {FLOOD} connections of one uid stayed open (limit {PER_UID})"
    );
    let grown = peak_rss_kib(pid).unwrap().saturating_sub(before);
    assert!(grown < 64 * 1024, "kmsd grew by {grown} KiB holding half-sent frames");
    // The admitted ones are closed once their frame is overdue.
    for s in &flood {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "a half-sent frame was held past the frame timeout"
        );
    }
    println!(
        "flood of {FLOOD} half frames: rss +{grown} KiB, all closed after {:?}",
        started.elapsed()
    );
    // Refusals are logged in a few lines, not one per connection.
    let lines = d.logs().lines().filter(|l| l.contains("connections refused")).count();
    assert!((1..=30).contains(&lines), "{lines} log lines for {FLOOD} refusals");
}

#[test]
fn silent_and_idle_connections_are_closed() {
    let d = with_limits("handshake_timeout_secs = 1\nidle_timeout_secs = 2\n");
    let silent = UnixStream::connect(&d.socket).unwrap();
    assert!(
        closed_within(&silent, Duration::from_secs(10)),
        "no Hello, yet still open"
    );
    // A greeted connection is kept while it works, and closed once idle.
    let mut c = d.client();
    c.list_keys().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    c.list_keys().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(c.list_keys().is_err(), "an idle connection outlived idle_timeout_secs");
    assert!(d.logs().contains("connection closed: idle"), "{}", d.logs());
}

#[test]
fn a_huge_key_reference_costs_little_and_is_not_echoed() {
    let d = TestDaemon::start();
    let pid = d.pid().as_raw();
    let audit = d.dir.path().join("state").join("audit.log");
    let audit_before = std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
    let log_before = d.logs().len();
    let rss_before = peak_rss_kib(pid).unwrap();
    // 100 requests naming a key with 512 KiB of control characters.
    let name: String = std::iter::repeat_n('\u{7}', 512 * 1024).collect();
    let mut c = d.client();
    for _ in 0..100 {
        let e = c.describe_key(&name).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
        assert!(
            e.to_string().len() < 512,
            "the reply echoes the reference: {} bytes",
            e.to_string().len()
        );
    }
    // Another caller is served.
    assert!(c.list_keys().is_ok());
    let audit_grown = std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0) - audit_before;
    let log_grown = d.logs().len() - log_before;
    let rss_grown = peak_rss_kib(pid).unwrap().saturating_sub(rss_before);
    println!("100 huge references: audit +{audit_grown} B, log +{log_grown} B, rss +{rss_grown} KiB");
    assert!(audit_grown < 100 * 1024, "audit.log grew by {audit_grown} bytes");
    assert!(log_grown < 100 * 1024, "kmsd's log grew by {log_grown} bytes");
    assert!(rss_grown < 64 * 1024, "kmsd grew by {rss_grown} KiB");
    // Nor can a zone name be used the same way.
    let long_zone = "z".repeat(100_000);
    c.create_key(kms_client::proto::CreateKey {
        name: Some("app".into()),
        ..Default::default()
    })
    .unwrap();
    let e = c.replicate_key("app", &long_zone).unwrap_err();
    assert!(e.to_string().len() < 512, "{} bytes", e.to_string().len());
}

#[test]
fn one_uid_administers_at_most_keys_per_uid_keys() {
    let d = with_limits("keys_per_uid = 3\n");
    for i in 0..3 {
        let out = kmsctl_as(&d, 3003, &["key", "create", "--name", &format!("k{i}")], b"");
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = kmsctl_as(&d, 3003, &["key", "create", "--name", "k3"], b"");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("limit-exceeded"), "{}", stderr(&out));
    // Another uid has its own allowance.
    let out = kmsctl_as(&d, 3004, &["key", "create", "--name", "mine"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_bare_length_prefix_is_held_no_longer_than_the_frame_timeout() {
    // The codec takes the prefix out of its buffer and reserves the body:
    // the server must still see a frame in progress.
    let d = with_limits("frame_timeout_secs = 2\nhandshake_timeout_secs = 600\nidle_timeout_secs = 600\n");
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
    assert!(
        closed_within(&s, Duration::from_secs(8)),
        "a bare length prefix parked a buffer"
    );
}
