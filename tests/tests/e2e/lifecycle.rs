//! Start, stop, restart, crash, --dev, and start-up refusals.

use std::process::Command;
use std::time::Duration;

use kms_client::blocking::BlockingClient;
use kms_client::proto::{Context, CreateKey, ErrorCode};
use kms_tests::{bin, stderr, TestDaemon};

#[test]
fn sigterm_drains_and_removes_the_socket() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    c.status().unwrap();
    let status = d.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!d.socket.exists(), "socket removed");
    assert!(d.logs().contains("SIGTERM"), "{}", d.logs());
}

/// Keys created, rotated and used before a stop are all there after it,
/// and every blob handed out before still unwraps.
fn keys_survive(stop: impl FnOnce(&mut TestDaemon)) {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    let ctx: Context = [("app".to_string(), "db".to_string())].into();
    let key = c
        .create_key(CreateKey {
            name: Some("survivor".into()),
            ..Default::default()
        })
        .unwrap();
    let mut blobs = Vec::new();
    for v in 0..4u8 {
        blobs.push((v, c.wrap("survivor", &[v; 32], &ctx).unwrap()));
        c.rotate_key("survivor").unwrap();
    }
    let default_blob = c.wrap("default", &[9; 32], &Context::new()).unwrap();
    let before = c.describe_key("survivor").unwrap();
    drop(c);
    stop(&mut d);
    d.restart();
    let mut c = d.client();
    let after = c.describe_key(&key.id.to_string()).unwrap();
    assert_eq!(after, before);
    assert_eq!(after.active_version, 5);
    for (v, blob) in blobs {
        assert_eq!(&c.unwrap(&blob, &ctx).unwrap()[..], &[v; 32]);
    }
    assert_eq!(&c.unwrap(&default_blob, &Context::new()).unwrap()[..], &[9; 32]);
}

#[test]
fn restart_after_sigterm_keeps_keys_and_old_blobs() {
    keys_survive(|d| assert!(d.terminate().success()));
}

#[test]
fn restart_after_sigkill_keeps_keys_and_old_blobs() {
    keys_survive(TestDaemon::kill9);
}

#[test]
fn acknowledged_rotations_survive_sigkill_under_load() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    c.create_key(CreateKey {
        name: Some("k".into()),
        ..Default::default()
    })
    .unwrap();
    let mut acked = 1;
    for _ in 0..10 {
        acked = c
            .rotate_key("k")
            .unwrap()
            .map(|k| k.active_version)
            .unwrap_or(acked + 1);
    }
    d.kill9();
    d.restart();
    assert_eq!(d.client().describe_key("k").unwrap().active_version, acked);
}

#[test]
fn dev_mode_works_from_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("kmsd"))
        .arg("--dev")
        .current_dir(dir.path())
        .env("KMSD_METRICS__LISTEN", "")
        .env_remove("KMSD_SOCKET")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dev = dir.path().join("kmsd-dev");
    let socket = dev.join("kmsd.sock");
    let mut c = kms_tests::wait_for(Duration::from_secs(10), || BlockingClient::connect(&socket).ok())
        .expect("--dev daemon answers");
    // The running user is an admin of the dev daemon, and the default key works.
    let k = c
        .create_key(CreateKey {
            name: Some("mine".into()),
            ..Default::default()
        })
        .unwrap();
    let blob = c.wrap("mine", &[1; 32], &Context::new()).unwrap();
    assert_eq!(&c.unwrap(&blob, &Context::new()).unwrap()[..], &[1; 32]);
    assert_eq!(k.zone, "dev");
    for (p, mode) in [
        (dev.clone(), 0o700),
        (dev.join("root-key"), 0o600),
        (socket.clone(), 0o660),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{}", p.display());
    }
    assert!(dev.join("kmsd.toml").exists());
    // Where FUSE works, --dev mounts DIR/mnt over DIR/data with the key "dev".
    if kms_tests::fuse_available() {
        std::fs::write(dev.join("mnt/hello.txt"), b"hello through the dev mount").unwrap();
        assert_eq!(
            std::fs::read(dev.join("mnt/hello.txt")).unwrap(),
            b"hello through the dev mount"
        );
        let stored = std::fs::read(crate::only_encrypted_file(&dev.join("data"))).unwrap();
        assert!(!stored.windows(5).any(|w| w == b"hello"), "stored encrypted");
        assert_eq!(
            c.describe_key("dev").unwrap().kind,
            kms_client::proto::KeyKind::Customer
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists());
    assert!(
        !kms_tests::is_mounted(&dev.join("mnt")),
        "the dev mount is gone after SIGINT"
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let d = TestDaemon::start();
    let out = d.command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("already listening") || err.contains("in use"), "{err}");
    d.client().status().expect("the first daemon keeps serving");
}

#[test]
fn a_wrong_root_key_is_refused_at_start() {
    let mut d = TestDaemon::start();
    d.client().create_key(CreateKey::default()).unwrap();
    assert!(d.terminate().success());
    let root = d.dir.path().join("root-key");
    std::fs::remove_file(&root).unwrap();
    kms_tests::write_root_key(&root);
    let out = d.command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("root key does not open"), "{}", stderr(&out));
    assert!(!d.socket.exists(), "no half-started daemon");
}

#[test]
fn bad_config_is_a_clear_error() {
    let d = TestDaemon::start();
    let bad = d.dir.path().join("bad.toml");
    for (toml, needle) in [
        ("zonee = \"x\"", "zonee"),
        ("max_frame = 1", "max_frame"),
        ("socket = \"rel.sock\"", "socket"),
        ("[access]\nadmins = [\"bob\"]", "access.admins"),
    ] {
        std::fs::write(&bad, toml).unwrap();
        let out = Command::new(bin("kmsd"))
            .arg("--config")
            .arg(&bad)
            .env_remove("KMSD_SOCKET")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(needle), "{toml}: {}", stderr(&out));
    }
    let out = Command::new(bin("kmsd"))
        .arg("--config")
        .arg("/nonexistent/kmsd.toml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/kmsd.toml"), "{}", stderr(&out));
    // A missing key is still the right error over the socket.
    let err = d.client().describe_key("nope").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
}

#[test]
fn socket_activation_serves_on_the_inherited_socket() {
    // A normal daemon gives us a config and state; stop it and let
    // systemd-socket-activate own the socket instead.
    let mut d = TestDaemon::start();
    d.client()
        .create_key(CreateKey {
            name: Some("activated".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(d.terminate().success());
    let activated = d.dir.path().join("activated.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&activated)
        .arg(bin("kmsd"))
        .arg("--config")
        .arg(&d.config)
        .env_remove("KMSD_SOCKET")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    let mut c = kms_tests::wait_for(Duration::from_secs(10), || BlockingClient::connect(&activated).ok())
        .expect("kmsd started by the first connection");
    assert_eq!(c.describe_key("activated").unwrap().active_version, 1);
    assert!(!d.socket.exists(), "kmsd did not bind its configured socket");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = child.wait();
}

#[test]
fn a_state_dir_open_to_others_or_a_loose_root_key_stops_start_up_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = TestDaemon::start();
    assert!(d.terminate().success());
    let state = d.dir.path().join("state");
    let root_key = d.dir.path().join("root-key");
    let start = |d: &TestDaemon| d.command().stderr(std::process::Stdio::piped()).output().unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = start(&d);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("chmod 700 {}", state.display())),
        "{}",
        stderr(&out)
    );
    assert!(!d.socket.exists(), "no half-started daemon");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&root_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = start(&d);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("chmod 600 {}", root_key.display())),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&root_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.restart();
}

#[test]
fn a_socket_path_taken_by_a_file_stops_start_up_clearly() {
    let mut d = TestDaemon::start();
    assert!(d.terminate().success());
    std::fs::write(&d.socket, b"not a socket").unwrap();
    let out = d.command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("exists and is not a socket"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&d.socket).unwrap(),
        b"not a socket",
        "kmsd never deletes what is not its socket"
    );
    std::fs::remove_file(&d.socket).unwrap();
    d.restart();
}

#[test]
fn a_missing_root_key_stops_start_up_naming_it() {
    let mut d = TestDaemon::start();
    assert!(d.terminate().success());
    let root_key = d.dir.path().join("root-key");
    std::fs::remove_file(&root_key).unwrap();
    let out = d.command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&root_key.display().to_string()),
        "{}",
        stderr(&out)
    );
    // And with no root key configured at all, the message says how to give one.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let without: String = cfg
        .lines()
        .filter(|l| !l.starts_with("root_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&d.config, without).unwrap();
    let out = d.command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("LoadCredential=root-key"), "{}", stderr(&out));
}
