//! `kmsctl` as a subprocess against the real daemon: the README
//! walk-through, every error code the CLI can reach, exit codes, and a
//! second uid refused.

use kms_tests::{stderr, stdout, TestDaemon};

fn ok(d: &TestDaemon, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let out = d.kmsctl(args, stdin);
    assert!(out.status.success(), "kmsctl {args:?} failed: {}", stderr(&out));
    out.stdout
}

/// Runs kmsctl expecting a server error; returns the code it printed.
fn fails_with(d: &TestDaemon, args: &[&str], stdin: &[u8], code: &str) {
    let out = d.kmsctl(args, stdin);
    assert_eq!(out.status.code(), Some(1), "kmsctl {args:?}: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("kmsctl: {code}: ")),
        "kmsctl {args:?} printed {err:?}, expected {code}"
    );
}

#[test]
fn readme_walk_through() {
    let d = TestDaemon::start();
    // Create a key, wrap a DEK.
    let created = String::from_utf8(ok(
        &d,
        &["key", "create", "--name", "app", "--description", "demo"],
        b"",
    ))
    .unwrap();
    assert!(created.contains("manual rotations: 0 of 10"), "{created}");
    let dek = [0x5au8; 32];
    let old_blob = ok(&d, &["wrap", "app"], &dek);
    // Rotate: new blobs use version 2, the old blob still unwraps.
    ok(&d, &["key", "rotate", "app"], b"");
    let new_blob = ok(&d, &["wrap", "app"], &dek);
    assert_eq!(u32::from_be_bytes(old_blob[17..21].try_into().unwrap()), 1);
    assert_eq!(u32::from_be_bytes(new_blob[17..21].try_into().unwrap()), 2);
    assert_eq!(ok(&d, &["unwrap"], &old_blob), dek);
    assert_eq!(ok(&d, &["unwrap"], &new_blob), dek);
    // History: version, time, origin.
    let history = String::from_utf8(ok(&d, &["key", "rotations", "app"], b"")).unwrap();
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "{history}");
    assert!(lines[1].starts_with('1') && lines[1].ends_with("initial"), "{history}");
    assert!(lines[2].starts_with('2') && lines[2].ends_with("manual"), "{history}");
    // JSON for scripts.
    let json: serde_json::Value = serde_json::from_slice(&ok(&d, &["--json", "key", "describe", "app"], b"")).unwrap();
    assert_eq!(json["active_version"], 2);
    assert_eq!(json["rotation"]["manual_used"], 1);
    assert_eq!(json["kind"], "customer");
    // Encrypt/decrypt with a context, base64 wrap, data keys, re-encrypt.
    let ct = ok(&d, &["encrypt", "app", "--context", "tenant=7"], b"hello");
    assert_eq!(ok(&d, &["decrypt", "--context", "tenant=7"], &ct), b"hello");
    let b64 = ok(&d, &["wrap", "app", "--base64"], b"WlpaWlpaWlpaWlpaWlpaWg==");
    assert_eq!(
        ok(&d, &["unwrap", "--base64"], &b64).trim_ascii(),
        b"WlpaWlpaWlpaWlpaWlpaWg=="
    );
    let dk: serde_json::Value = serde_json::from_slice(&ok(&d, &["generate-data-key", "app"], b"")).unwrap();
    assert!(dk["blob"].is_string() && dk["plaintext"].is_string());
    let moved = ok(&d, &["re-encrypt"], &old_blob);
    assert_eq!(u32::from_be_bytes(moved[17..21].try_into().unwrap()), 2);
    assert_eq!(ok(&d, &["unwrap"], &moved), dek);
}

#[test]
fn every_error_code_the_cli_can_reach() {
    let d = TestDaemon::start();
    ok(&d, &["key", "create", "--name", "k"], b"");
    fails_with(&d, &["key", "describe", "nope"], b"", "not-found");
    fails_with(&d, &["key", "rotate", "default"], b"", "forbidden");
    fails_with(&d, &["key", "rotation", "disable", "default"], b"", "forbidden");
    fails_with(&d, &["key", "disable", "default"], b"", "forbidden");
    fails_with(&d, &["key", "schedule-deletion", "default"], b"", "forbidden");
    fails_with(
        &d,
        &["key", "rotation", "enable", "k", "--period", "30"],
        b"",
        "rotation-enabled",
    );
    fails_with(
        &d,
        &["key", "schedule-deletion", "k", "--days", "3"],
        b"",
        "invalid-argument",
    );
    fails_with(&d, &["key", "create", "--name", "k"], b"", "invalid-argument");
    fails_with(
        &d,
        &["unwrap"],
        b"this is not a blob at all, not even close",
        "decrypt-failed",
    );
    let blob = ok(&d, &["wrap", "k", "--context", "a=1"], &[1; 32]);
    fails_with(&d, &["unwrap", "--context", "a=2"], &blob, "decrypt-failed");
    fails_with(&d, &["fs", "versions", "/nonexistent-mount"], b"", "unavailable");
    for _ in 0..10 {
        ok(&d, &["key", "rotate", "k"], b"");
    }
    fails_with(&d, &["key", "rotate", "k"], b"", "limit-exceeded");
    ok(&d, &["key", "disable", "k"], b"");
    fails_with(&d, &["unwrap", "--context", "a=1"], &blob, "disabled");
    fails_with(&d, &["wrap", "k"], &[1; 32], "disabled");
}

#[test]
fn usage_and_connection_errors_have_their_own_exit_codes() {
    let d = TestDaemon::start();
    let out = d.kmsctl(&["key", "frobnicate"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = d.kmsctl(&["encrypt", "k", "--context", "novalue"], b"x");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = kms_tests::kmsctl_at(&d.dir.path().join("missing.sock"), &["status"], b"");
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("missing.sock"), "{}", stderr(&out));
    let out = d.kmsctl(&["--json", "key", "describe", "nope"], b"");
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["code"], "not-found");
}

#[test]
fn a_second_uid_is_refused_and_logged() {
    let d = TestDaemon::start();
    ok(&d, &["key", "create", "--name", "roots"], b"");
    let blob = ok(&d, &["wrap", "roots"], &[3; 32]);
    let as_nobody = |args: &[&str], stdin: &[u8]| kms_tests::kmsctl_as(&d, 65534, args, stdin);
    let out = as_nobody(&["unwrap"], &blob);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("kmsctl: permission-denied:"),
        "{}",
        stderr(&out)
    );
    let out = as_nobody(&["key", "rotate", "roots"], b"");
    assert!(
        stderr(&out).starts_with("kmsctl: permission-denied:"),
        "{}",
        stderr(&out)
    );
    // Their own key and the default key work for them.
    let out = as_nobody(&["key", "create", "--name", "theirs"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_nobody(&["wrap", "default"], &[4; 32]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Root (a global admin here) administers their key but cannot use it.
    ok(&d, &["key", "describe", "theirs"], b"");
    fails_with(&d, &["wrap", "theirs"], &[1; 32], "permission-denied");
    let logs = d.logs();
    assert!(
        logs.contains("permission denied") && logs.contains("uid=65534") && logs.contains("pid="),
        "{logs}"
    );
    let list = stdout(&as_nobody(&["key", "list"], b""));
    assert!(list.contains("theirs") && !list.contains("roots"), "{list}");
}
