//! The audit log: which operations it records and how, that it holds no
//! secrets, that it continues across restarts, and that `kmsctl audit
//! verify` and kmsd itself notice an edited or deleted line.

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use kms_client::proto::{Context, CreateKey, ErrorCode};
use kms_tests::{kmsctl_as, stderr, stdout, TestDaemon};
use serde_json::Value;

fn audit_file(d: &TestDaemon) -> PathBuf {
    d.dir.path().join("state").join("audit.log")
}

fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn verify(d: &TestDaemon, path: &Path) -> Output {
    d.kmsctl(&["audit", "verify", "--file", path.to_str().unwrap()], b"")
}

/// The one line for `op` with `outcome`.
fn line<'a>(all: &'a [Value], op: &str, outcome: &str) -> &'a Value {
    let found: Vec<_> = all
        .iter()
        .filter(|l| l["op"] == op && l["outcome"] == outcome)
        .collect();
    assert_eq!(found.len(), 1, "{op} {outcome} in {all:#?}");
    found[0]
}

/// Writes `path` with its lines changed by `edit`.
fn rewrite(from: &Path, to: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(from)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    edit(&mut lines);
    std::fs::write(to, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[test]
fn key_operations_are_recorded_chained_and_checked() {
    let mut d = TestDaemon::start_with(kms_tests::DaemonOptions {
        env: vec![("KMSD_AUDIT__DATA_OPERATIONS".into(), "true".into())],
        ..Default::default()
    });
    let mut c = d.client();
    let me = i64::from(std::process::id());
    let ctx: Context = [("app".to_string(), "db".to_string())].into();
    let key = c
        .create_key(CreateKey {
            name: Some("audited".into()),
            ..Default::default()
        })
        .unwrap();
    let id = key.id.to_string();
    let dek: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
    let blob = c.wrap("audited", &dek, &ctx).unwrap();
    assert_eq!(&c.unwrap(&blob, &ctx).unwrap()[..], &dek[..]);
    c.rotate_key("audited").unwrap();
    let other: Context = [("app".to_string(), "web".to_string())].into();
    let err = c.unwrap(&blob, &other).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::DecryptFailed));
    let out = kmsctl_as(&d, 65534, &["wrap", "audited"], &dek);
    assert!(stderr(&out).contains("permission-denied"), "{}", stderr(&out));
    c.status().unwrap();
    drop(c);
    // Lines are written by a thread; a clean stop writes them all.
    assert!(d.terminate().success());

    let all = lines(&audit_file(&d));
    let created = line(&all, "key-create", "ok");
    assert_eq!(
        (&created["key"], &created["version"], &created["uid"]),
        (&Value::from(id.clone()), &Value::from(1), &Value::from(0))
    );
    assert_eq!(created["pid"], me);
    let wrap = line(&all, "wrap", "ok");
    assert_eq!(
        (&wrap["key"], &wrap["version"]),
        (&Value::from(id.clone()), &Value::from(1))
    );
    let unwrap = line(&all, "unwrap", "ok");
    assert_eq!(
        (&unwrap["key"], &unwrap["version"]),
        (&Value::from(id.clone()), &Value::from(1))
    );
    let rotated = line(&all, "key-rotate", "ok");
    assert_eq!(rotated["version"], 2);
    let failed = line(&all, "unwrap", "decrypt-failed");
    assert_eq!(
        (&failed["key"], &failed["version"], &failed["uid"]),
        (&Value::from(id.clone()), &Value::from(1), &Value::from(0))
    );
    let denied = line(&all, "wrap", "permission-denied");
    assert_eq!(
        (&denied["uid"], &denied["key"]),
        (&Value::from(65534), &Value::from("audited"))
    );
    assert!(denied["pid"].as_i64().is_some_and(|p| p > 0 && p != me), "{denied}");
    assert!(
        all.iter().all(|l| l["op"] != "status" && l["op"] != "hello"),
        "{all:#?}"
    );
    for (i, l) in all.iter().enumerate() {
        assert_eq!(l["seq"], i as u64 + 1);
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
    }

    let raw = std::fs::read(audit_file(&d)).unwrap();
    let text = String::from_utf8(raw.clone()).unwrap();
    let hex: String = dek.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&dek);
    let blob64 = base64::engine::general_purpose::STANDARD.encode(&blob);
    assert!(!text.contains(&hex) && !text.contains(&b64[..20]) && !text.contains(&blob64[..20]));
    assert!(!raw.windows(dek.len()).any(|w| w == dek));

    let out = verify(&d, &audit_file(&d));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("ok: {} lines, chain intact", all.len()));

    // Edited: the outcome of the permission-denied line.
    let k = all.iter().position(|l| l["outcome"] == "permission-denied").unwrap();
    let edited = d.dir.path().join("edited.log");
    rewrite(&audit_file(&d), &edited, |ls| {
        ls[k] = ls[k].replace("\"outcome\":\"permission-denied\"", "\"outcome\":\"ok\"");
    });
    let out = verify(&d, &edited);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with(&format!("broken at line {}:", k + 1)),
        "{}",
        stdout(&out)
    );
    // Deleted: the second line.
    let deleted = d.dir.path().join("deleted.log");
    rewrite(&audit_file(&d), &deleted, |ls| {
        ls.remove(1);
    });
    let out = verify(&d, &deleted);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("broken at line 2:"), "{}", stdout(&out));

    // A restart continues the chain.
    d.restart();
    d.client().wrap("audited", &dek, &ctx).unwrap();
    assert!(d.terminate().success());
    let after = lines(&audit_file(&d));
    assert_eq!(after.len(), all.len() + 1);
    let out = verify(&d, &audit_file(&d));
    assert!(out.status.success(), "{}", stdout(&out));

    // kmsd finds an edit at start, keeps serving, and records the break.
    let file = audit_file(&d);
    rewrite(&file, &file, |ls| ls[k] = ls[k].replace("\"uid\":65534", "\"uid\":0"));
    d.restart();
    d.client().wrap("audited", &dek, &ctx).unwrap();
    assert!(d.terminate().success());
    assert!(d.logs().contains("audit-chain-break"), "{}", d.logs());
    let last = lines(&file);
    assert_eq!(last[after.len()]["op"], "audit-chain-break");
    assert_eq!(last[after.len() + 1]["op"], "wrap");
    let out = verify(&d, &file);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with(&format!("broken at line {}:", k + 1)),
        "{}",
        stdout(&out)
    );
}

#[test]
fn automatic_rotations_and_deletions_are_recorded_as_kmsd() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    let daily = c
        .create_key(CreateKey {
            name: Some("daily".into()),
            rotation: Some(Some(1)),
            ..Default::default()
        })
        .unwrap();
    let doomed = c
        .create_key(CreateKey {
            name: Some("doomed".into()),
            ..Default::default()
        })
        .unwrap();
    c.schedule_deletion("doomed", Some(7)).unwrap();
    drop(c);
    assert!(d.terminate().success());

    crate::schedule::restart_days_ahead(&mut d, 8);
    let kmsd = i64::from(d.pid().as_raw());
    let mut c = d.client();
    kms_tests::wait_for(std::time::Duration::from_secs(10), || {
        c.describe_key("daily").ok().filter(|k| k.active_version == 2)
    })
    .expect("daily rotated at start-up");
    drop(c);
    assert!(d.terminate().success());

    let all = lines(&audit_file(&d));
    let rotated = line(&all, "auto-rotate", "ok");
    assert_eq!(rotated["key"], daily.id.to_string());
    assert_eq!(
        (&rotated["version"], &rotated["uid"], &rotated["pid"]),
        (&Value::from(2), &Value::from(0), &Value::from(kmsd))
    );
    let deleted = line(&all, "auto-delete", "ok");
    assert_eq!(deleted["key"], doomed.id.to_string());
    assert_eq!(
        (&deleted["uid"], &deleted["pid"]),
        (&Value::from(0), &Value::from(kmsd))
    );
    let out = verify(&d, &audit_file(&d));
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn successful_data_operations_are_recorded_only_when_asked() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    c.create_key(CreateKey {
        name: Some("quiet".into()),
        ..Default::default()
    })
    .unwrap();
    let blob = c.wrap("quiet", &[1; 32], &Context::new()).unwrap();
    c.unwrap(&blob, &Context::new()).unwrap();
    let other: Context = [("a".to_string(), "b".to_string())].into();
    assert!(c.unwrap(&blob, &other).is_err());
    drop(c);
    assert!(d.terminate().success());
    let all = lines(&audit_file(&d));
    line(&all, "key-create", "ok");
    line(&all, "unwrap", "decrypt-failed");
    assert!(
        !all.iter()
            .any(|l| (l["op"] == "wrap" || l["op"] == "unwrap") && l["outcome"] == "ok"),
        "successful data operations are not recorded by default: {all:#?}"
    );
}
