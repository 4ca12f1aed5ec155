//! Backup and restore with the file store, through the real binaries:
//! `kmsctl backup` from a running daemon, the store wiped, `kmsd restore`
//! under another root key, and every blob ever made unwraps again with
//! every rotation history as it was. A tampered file, a wrong backup key
//! or a store that is not empty write nothing. (The etcd store's backup,
//! restore and migration are in `etcd.rs`.)

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kms_client::blocking::BlockingClient;
use kms_client::proto::{Context, CreateKey, KeyInfo, KeyState, RotationEntry, DEFAULT_KEY_NAME};
use kms_tests::{kmsd_offline, stderr, stdout, write_root_key, DaemonOptions, TestDaemon};

/// Keys with histories and the blobs made at each of their versions.
pub(crate) struct History {
    blobs: Vec<(Vec<u8>, [u8; 32], Context)>,
    keys: Vec<(KeyInfo, Vec<RotationEntry>)>,
}

impl History {
    /// How many keys it holds.
    pub(crate) fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// Creates keys `k0..k3` (key `ki` rotated `i` times, a blob wrapped at
/// every version), one key pending deletion, one without automatic
/// rotation, and a blob of the default key; returns what must survive.
pub(crate) fn make_history(c: &mut BlockingClient) -> History {
    let mut blobs = Vec::new();
    for i in 0..4u8 {
        let name = format!("k{i}");
        c.create_key(CreateKey {
            name: Some(name.clone()),
            ..CreateKey::default()
        })
        .unwrap();
        for v in 0..=i {
            let ctx = Context::from([("n".to_string(), format!("{i}.{v}"))]);
            let dek = [i * 16 + v; 32];
            blobs.push((c.wrap(&name, &dek, &ctx).unwrap(), dek, ctx));
            if v < i {
                c.rotate_key(&name).unwrap();
            }
        }
    }
    let ctx = Context::new();
    blobs.push((c.wrap(DEFAULT_KEY_NAME, &[0xdf; 32], &ctx).unwrap(), [0xdf; 32], ctx));
    c.create_key(CreateKey {
        name: Some("manual".into()),
        rotation: Some(None),
        ..CreateKey::default()
    })
    .unwrap();
    c.create_key(CreateKey {
        name: Some("doomed".into()),
        ..CreateKey::default()
    })
    .unwrap();
    c.schedule_deletion("doomed", Some(7)).unwrap();
    let keys = c
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| {
            let rotations = c.list_rotations(&k.id.to_string()).unwrap();
            (k, rotations)
        })
        .collect();
    History { blobs, keys }
}

/// Every blob of `h` unwraps through `c`, and every key is as it was.
pub(crate) fn check_history(c: &mut BlockingClient, h: &History) {
    for (blob, dek, ctx) in &h.blobs {
        assert_eq!(&c.unwrap(blob, ctx).expect("an old blob unwraps")[..], dek);
    }
    let now = c.list_keys().unwrap();
    assert_eq!(now.len(), h.keys.len(), "{now:?}");
    for (info, rotations) in &h.keys {
        let id = info.id.to_string();
        assert_eq!(&c.describe_key(&id).unwrap(), info, "key {:?} as it was", info.name);
        assert_eq!(&c.list_rotations(&id).unwrap(), rotations, "history of {:?}", info.name);
    }
    let doomed = now.iter().find(|k| k.name.as_deref() == Some("doomed")).unwrap();
    assert!(matches!(doomed.state, KeyState::PendingDeletion { .. }));
}

/// A fresh 32-byte backup key, mode 0600.
pub(crate) fn backup_key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    write_root_key(&p);
    p
}

/// `kmsctl backup` from `d` into `out`; asserts success and mode 0600.
pub(crate) fn backup(d: &TestDaemon, out: &Path, key: &Path) {
    let o = d.kmsctl(
        &[
            "backup",
            "--out",
            out.to_str().unwrap(),
            "--backup-key",
            key.to_str().unwrap(),
        ],
        b"",
    );
    assert!(o.status.success(), "backup: {}", stderr(&o));
    let mode = std::fs::metadata(out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds every key: owner only");
}

/// `kmsd restore --config CONFIG --from FILE --backup-key KEY`.
pub(crate) fn restore(config: &Path, from: &Path, key: &Path) -> std::process::Output {
    kmsd_offline(&[
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("restore"),
        OsStr::new("--from"),
        from.as_os_str(),
        OsStr::new("--backup-key"),
        key.as_os_str(),
    ])
}

fn key_files(state: &Path) -> usize {
    std::fs::read_dir(state.join("keys")).map_or(0, |d| d.count())
}

#[test]
fn backup_wipe_restore_under_another_root_key_on_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let (root, state) = (dir.path().join("root-key"), dir.path().join("state"));
    write_root_key(&root);
    let mut d = TestDaemon::start_with(DaemonOptions {
        root_key: Some(root.clone()),
        state_dir: Some(state.clone()),
        ..DaemonOptions::default()
    });
    let history = make_history(&mut d.client());
    let (file, key) = (dir.path().join("zone.kmsbak"), backup_key(dir.path(), "backup-key"));
    backup(&d, &file, &key);
    let o = d.kmsctl(
        &[
            "backup",
            "--out",
            file.to_str().unwrap(),
            "--backup-key",
            key.to_str().unwrap(),
        ],
        b"",
    );
    assert!(!o.status.success(), "never over an existing file");
    let loose = dir.path().join("loose-key");
    std::fs::copy(&key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other = dir.path().join("other.kmsbak");
    let o = d.kmsctl(
        &[
            "backup",
            "--out",
            other.to_str().unwrap(),
            "--backup-key",
            loose.to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        !o.status.success() && stderr(&o).contains("chmod 600"),
        "{}",
        stderr(&o)
    );
    assert!(!other.exists());

    // Restoring over the live store is refused and changes nothing.
    assert!(d.terminate().success());
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let backups: Vec<serde_json::Value> = (audit.lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["op"] == "backup")
        .collect();
    assert_eq!(backups.len(), 1, "each backup is audited: {backups:?}");
    assert_eq!(backups[0]["outcome"], "ok");
    let o = restore(&d.config, &file, &key);
    assert!(
        !o.status.success() && stderr(&o).contains("already holds"),
        "{}",
        stderr(&o)
    );

    // Wipe: the store and the root key are gone; a new root key.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::remove_file(&root).unwrap();
    write_root_key(&root);

    // A tampered file or a wrong backup key: a clear error, nothing written.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let tampered = dir.path().join("tampered.kmsbak");
    std::fs::write(&tampered, &bytes).unwrap();
    let o = restore(&d.config, &tampered, &key);
    assert!(
        !o.status.success() && stderr(&o).contains("does not authenticate"),
        "{}",
        stderr(&o)
    );
    let wrong = backup_key(dir.path(), "wrong-key");
    let o = restore(&d.config, &file, &wrong);
    assert!(
        !o.status.success() && stderr(&o).contains("does not authenticate"),
        "{}",
        stderr(&o)
    );
    assert_eq!(key_files(&state), 0, "nothing written");

    let o = restore(&d.config, &file, &key);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    assert!(stdout(&o).contains("keys written"), "{}", stdout(&o));
    d.restart();
    check_history(&mut d.client(), &history);
    // And it goes on: the restored keys rotate.
    let info = d.client().rotate_key("k3").unwrap().unwrap();
    assert_eq!(info.active_version, 5);
}

/// `kmsd restore` with `KMSDTEST_FAULT=kill-mid-restore` (SIGKILLed when
/// half of the records are written), and with `--resume` if asked.
pub(crate) fn restore_with(config: &Path, from: &Path, key: &Path, fault: bool, resume: bool) -> std::process::Output {
    let mut args = vec![
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("restore"),
        OsStr::new("--from"),
        from.as_os_str(),
        OsStr::new("--backup-key"),
        key.as_os_str(),
    ];
    if resume {
        args.push(OsStr::new("--resume"));
    }
    let env: &[(&str, &str)] = if fault {
        &[("KMSDTEST_FAULT", "kill-mid-restore")]
    } else {
        &[]
    };
    kms_tests::kmsd_offline_with(&args, env)
}

/// Whether `o` ended by SIGKILL.
pub(crate) fn killed(o: &std::process::Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    o.status.signal() == Some(libc::SIGKILL)
}

/// A restore into a state directory a daemon holds is refused. A restore
/// SIGKILLed half-way leaves `state_dir/restoring`: the daemon refuses to
/// start and says to resume, a plain second run is refused too, and
/// `--resume` completes it: every old blob unwraps.
#[test]
fn a_restore_cut_off_half_way_resumes_and_no_daemon_serves_it_before_on_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let (root, state) = (dir.path().join("root-key"), dir.path().join("state"));
    write_root_key(&root);
    let opts = DaemonOptions {
        root_key: Some(root.clone()),
        state_dir: Some(state.clone()),
        ..DaemonOptions::default()
    };
    let mut d = TestDaemon::start_with(opts.clone());
    let history = make_history(&mut d.client());
    let (file, key) = (dir.path().join("zone.kmsbak"), backup_key(dir.path(), "backup-key"));
    backup(&d, &file, &key);
    let o = restore(&d.config, &file, &key);
    assert!(
        !o.status.success() && stderr(&o).contains("in use by another kmsd"),
        "not while a daemon runs: {}",
        stderr(&o)
    );
    assert!(d.terminate().success());
    std::fs::remove_dir_all(&state).unwrap();
    let marker = state.join("restoring");

    let o = restore_with(&d.config, &file, &key, true, false);
    assert!(killed(&o), "the fault point killed it: {}", stderr(&o));
    assert!(marker.exists(), "a cut-off restore leaves its marker");
    let written = key_files(&state);
    assert!(
        written > 0 && written < history.key_count(),
        "half-way: {written} key files"
    );
    let refused = TestDaemon::try_start_with(opts.clone()).expect_err("no daemon on a half restore");
    assert!(
        refused.contains("being restored") && refused.contains("--resume"),
        "{refused}"
    );
    let o = restore(&d.config, &file, &key);
    assert!(!o.status.success() && stderr(&o).contains("--resume"), "{}", stderr(&o));
    let o = restore_with(&d.config, &file, &key, false, true);
    assert!(o.status.success(), "resume: {}", stderr(&o));
    assert!(!marker.exists(), "removed once whole");
    d.restart();
    check_history(&mut d.client(), &history);
}

/// `kmsctl backup` killed while it writes (SIGXFSZ: the file size limit
/// is below the backup's size) leaves no file under the backup's name, only
/// its temporary file; a backup never replaces an existing file.
#[test]
fn a_backup_cut_off_while_writing_leaves_nothing_under_its_name() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let d = TestDaemon::start();
    make_history(&mut d.client());
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = (dir.path().join("zone.kmsbak"), backup_key(dir.path(), "backup-key"));
    let mut cmd = std::process::Command::new(kms_tests::bin("kmsctl"));
    cmd.arg("--socket")
        .arg(&d.socket)
        .args(["backup", "--out"])
        .arg(&file)
        .arg("--backup-key")
        .arg(&key);
    let small = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setrlimit, which is async-signal-safe, on rlimits it owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_FSIZE, &small) == 0 && libc::setrlimit(libc::RLIMIT_CORE, &none) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let o = cmd.output().unwrap();
    assert_eq!(o.status.signal(), Some(libc::SIGXFSZ), "cut off while writing: {o:?}");
    assert!(!file.exists(), "no half backup under the final name");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert_eq!(left.len(), 1, "the temporary file of the killed run: {left:?}");
    assert!(left[0].starts_with(".zone.kmsbak."), "{left:?}");

    backup(&d, &file, &key);
    let first = std::fs::read(&file).unwrap();
    let o = d.kmsctl(
        &[
            "backup",
            "--out",
            file.to_str().unwrap(),
            "--backup-key",
            key.to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        !o.status.success() && stderr(&o).contains("never replaces"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&file).unwrap(), first, "the existing backup untouched");
}

/// A snapshot larger than the daemon's frame limit is refused with a
/// message naming `max_frame`, and no file is left behind; with the limit
/// raised the backup is taken.
#[test]
fn a_snapshot_over_the_frame_limit_says_to_raise_max_frame() {
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![("KMSD_MAX_FRAME".into(), "4096".into())],
        ..DaemonOptions::default()
    });
    let mut c = d.client();
    for i in 0..40 {
        c.create_key(CreateKey {
            name: Some(format!("key-{i}")),
            ..CreateKey::default()
        })
        .unwrap();
    }
    drop(c);
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = (dir.path().join("zone.kmsbak"), backup_key(dir.path(), "backup-key"));
    let args = [
        "backup",
        "--out",
        file.to_str().unwrap(),
        "--backup-key",
        key.to_str().unwrap(),
    ];
    let o = d.kmsctl(&args, b"");
    assert!(
        !o.status.success() && stderr(&o).contains("raise max_frame"),
        "{}",
        stderr(&o)
    );
    assert!(!file.exists(), "no file left behind");
    assert!(d.terminate().success());
    d.opts.env = vec![("KMSD_MAX_FRAME".into(), "1048576".into())];
    d.restart();
    backup(&d, &file, &key);
}
