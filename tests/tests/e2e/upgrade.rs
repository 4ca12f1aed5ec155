//! The real kmsd on a state directory written by the release before
//! issue 11 (store schema 1, committed in `daemon/tests/fixtures/store-v1`
//! with its root key, a mount's backing files and `expected.json`): it
//! starts, migrates the store, and serves every key, blob and file as that
//! release did. The clock is pinned by libfaketime at the fixture's "now",
//! so that no rotation or deletion falls due during the test.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kms_client::proto::{KeyInfo, KeyRole, KeyState};
use kms_tests::{fuse_available, kmsctl_as, stderr, DaemonOptions, TestDaemon};
use serde_json::{json, Value};

use crate::schedule::LIBFAKETIME;

pub(crate) fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/tests/fixtures/store-v1")
}

/// Copies a tree durably (every file and directory fsynced), giving
/// directories `dir_mode` and files `file_mode`.
pub(crate) fn copy_tree(from: &Path, to: &Path, dir_mode: u32, file_mode: u32) {
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(dir_mode)).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst, dir_mode, file_mode);
        } else {
            fs::copy(e.path(), &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(file_mode)).unwrap();
            fs::File::open(&dst).unwrap().sync_all().unwrap();
        }
    }
    fs::File::open(to).unwrap().sync_all().unwrap();
}

pub(crate) fn manifest() -> Value {
    serde_json::from_slice(&fs::read(fixture().join("expected.json")).unwrap()).unwrap()
}

/// A daemon on `state` with the fixture's zone, the root key at `root` and
/// the clock pinned at the fixture's "now".
pub(crate) fn options(m: &Value, state: &Path, root: &Path) -> DaemonOptions {
    assert!(Path::new(LIBFAKETIME).exists(), "install the Debian package faketime");
    DaemonOptions {
        zone: m["zone"].as_str().unwrap().into(),
        state_dir: Some(state.to_path_buf()),
        env: vec![
            ("KMSD_ROOT_KEY".into(), root.display().to_string()),
            ("LD_PRELOAD".into(), LIBFAKETIME.into()),
            ("FAKETIME".into(), format!("@{}", utc(m["now"].as_u64().unwrap()))),
            ("TZ".into(), "UTC".into()),
        ],
        ..DaemonOptions::default()
    }
}

/// The fixture's root key, copied to `path` with mode 0600.
pub(crate) fn copy_root_key(path: &Path) {
    fs::copy(fixture().join("root-key"), path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Every key the daemon holds, field by field as in the fixture.
pub(crate) fn check_keys(d: &TestDaemon, m: &Value) {
    let mut keys = d.client().list_keys().unwrap();
    keys.sort_by_key(|k| k.id.to_string());
    let got: Vec<Value> = keys.iter().map(shown).collect();
    let want: Vec<Value> = m["keys"].as_array().unwrap().iter().map(expected_key).collect();
    assert_eq!(got, want);
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// What `key describe` shows, in the shape of the fixture's `keys` entries
/// (the period only while automatic rotation is on: describe hides it
/// otherwise).
fn shown(k: &KeyInfo) -> Value {
    let (role, primary_zone) = match &k.role {
        KeyRole::SingleZone => ("single-zone", None),
        KeyRole::Primary => ("primary", None),
        KeyRole::Replica { primary_zone } => ("replica", Some(primary_zone.clone())),
    };
    let (state, delete_at) = match k.state {
        KeyState::Enabled => ("enabled", None),
        KeyState::Disabled => ("disabled", None),
        KeyState::PendingDeletion { delete_at } => ("pending-deletion", Some(delete_at)),
    };
    json!({
        "id": k.id.to_string(),
        "name": k.name,
        "description": k.description,
        "kind": k.kind.to_string(),
        "zone": k.zone,
        "role": role,
        "primary_zone": primary_zone,
        "state": state,
        "delete_at": delete_at,
        "created_at": k.created_at,
        "users": k.policy.users.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "admins": k.policy.admins.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "public_use": k.policy.public_use,
        "rotation_enabled": k.rotation.enabled,
        "period_days": k.rotation.period_days,
        "next_rotation_at": k.rotation.next_rotation_at,
        "manual_rotations": k.rotation.manual_used,
        "versions": k.versions.iter().map(|v| json!([v.version, v.created_at, v.origin.to_string()])).collect::<Vec<_>>(),
        "replicas": k.replicas.iter().map(|r| json!([r.zone, r.confirmed_version])).collect::<Vec<_>>(),
    })
}

fn expected_key(k: &Value) -> Value {
    let mut k = k.clone();
    if k["rotation_enabled"] == false {
        k["period_days"] = Value::Null;
    }
    k
}

#[test]
fn kmsd_serves_a_schema_1_store_with_its_keys_blobs_and_files() {
    let m = manifest();
    let work = tempfile::Builder::new().prefix("kmsd-upgrade-").tempdir().unwrap();
    let (state, data, root) = (
        work.path().join("state"),
        work.path().join("data"),
        work.path().join("root-key"),
    );
    copy_tree(&fixture().join("state"), &state, 0o700, 0o600);
    copy_tree(&fixture().join("data"), &data, 0o755, 0o644);
    copy_root_key(&root);
    let mut opts = options(&m, &state, &root);
    let fuse = fuse_available();
    let mnt = work.path().join("mnt");
    if fuse {
        opts.extra_config = format!("[[mount]]\nsource = {data:?}\ntarget = {mnt:?}\nkey = \"fs\"\n");
    }
    // Dropped after the daemon: the mount its SIGKILL leaves behind is
    // outside the daemon's own folder, so detach it here.
    let _detach = Detach(mnt.clone());
    let d = TestDaemon::start_with(opts);
    assert!(d.logs().contains("key store migrated"), "{}", d.logs());
    assert_eq!(&fs::read(state.join("store.meta")).unwrap()[..8], b"KMSDMETA");

    // Every field of every key, as `key describe` shows it.
    check_keys(&d, &m);

    // Every blob (the disabled and pending-deletion keys serve nothing).
    for b in m["blobs"].as_array().unwrap() {
        let key = b["key"].as_str().unwrap();
        let mut args = vec!["decrypt".to_string()];
        for (k, v) in b["context"].as_object().unwrap() {
            args.push("--context".into());
            args.push(format!("{k}={}", v.as_str().unwrap()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = kmsctl_as(&d, 1000, &args, &unhex(b["blob"].as_str().unwrap()));
        if key == "retired" || key == "doomed" {
            assert!(stderr(&out).contains("disabled"), "{key}: {}", stderr(&out));
            continue;
        }
        assert!(out.status.success(), "{key} v{}: {}", b["version"], stderr(&out));
        assert_eq!(
            out.stdout,
            unhex(b["plaintext"].as_str().unwrap()),
            "{key} v{}",
            b["version"]
        );
    }

    // Every file, through the daemon's own mount.
    if fuse {
        for f in m["files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            assert_eq!(
                fs::read(mnt.join(path)).unwrap(),
                unhex(f["content"].as_str().unwrap()),
                "{path}"
            );
        }
    }
}

/// Detaches a FUSE mount left at this path when dropped.
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if kms_tests::is_mounted(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// `YYYY-MM-DD hh:mm:ss` (UTC) of a Unix time, as libfaketime takes it.
fn utc(t: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%d %H:%M:%S"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
