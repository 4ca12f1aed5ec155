//! systemd integration: the shipped units verify, and kmsd speaks the
//! `sd_notify` protocol in the right order.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kms_tests::{bin, stderr, DaemonOptions, TestDaemon};
use nix::sys::signal::{kill, Signal};

/// The `systemd/` folder of the source tree.
fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// The shipped `kmsd.service` with `ExecStart=` pointing at `kmsd`.
fn service_with_binary(kmsd: &Path) -> String {
    let unit = std::fs::read_to_string(units_dir().join("kmsd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/kmsd "), "{unit}");
    unit.replace(
        "ExecStart=/usr/local/bin/kmsd ",
        &format!("ExecStart={} ", kmsd.display()),
    )
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kmsd.service"), service_with_binary(&bin("kmsd"))).unwrap();
    std::fs::copy(units_dir().join("kmsd.socket"), dir.path().join("kmsd.socket")).unwrap();
    // The keys-only drop-in is checked as part of the service it changes.
    let dropins = dir.path().join("kmsd.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(units_dir().join("kmsd-no-mounts.conf"), dropins.join("no-mounts.conf")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "kmsd.service", "kmsd.socket"])
        .current_dir(dir.path())
        // Our folder first, then the system's (trailing ':').
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    // Unknown keys and bad values are only warnings: any line naming our
    // files is a failure.
    let err = stderr(&out);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("kmsd")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

/// What kmsd told a fake service manager, one datagram per entry.
struct NotifyListener {
    socket: UnixDatagram,
    path: PathBuf,
    got: Vec<String>,
}

impl NotifyListener {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Self {
            socket,
            path,
            got: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `want` (10 s at most); returns it.
    fn until(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else { continue };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.got.push(msg.clone());
            if want(&msg) {
                return msg;
            }
        }
        panic!("no {what} within 10 s; got {:#?}", self.got);
    }
}

fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn notify_socket_gets_ready_status_watchdog_reloading_stopping_in_order() {
    let notify_dir = tempfile::tempdir().unwrap();
    let mut n = NotifyListener::bind(notify_dir.path());
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![
            ("NOTIFY_SOCKET".into(), n.path.display().to_string()),
            // 0.2 s: kmsd pings every 0.1 s. No WATCHDOG_PID: meant for us.
            ("WATCHDOG_USEC".into(), "200000".into()),
        ],
        ..Default::default()
    });
    let ready = n.until("READY=1", |m| has(m, "READY=1"));
    assert_eq!(n.got.len(), 1, "READY=1 comes first: {:#?}", n.got);
    assert!(ready.contains("STATUS=1 keys, 0 mounts, 0 connections"), "{ready}");
    n.until("WATCHDOG=1", |m| has(m, "WATCHDOG=1"));
    n.until("a second WATCHDOG=1", |m| has(m, "WATCHDOG=1"));
    // The STATUS line follows the counts: a new key and an open connection.
    let mut c = d.client();
    c.create_key(kms_client::proto::CreateKey::default()).unwrap();
    n.until("STATUS with the new key and connection", |m| {
        m.contains("STATUS=2 keys, 0 mounts, 1 connections")
    });
    drop(c);
    kill(d.pid(), Signal::SIGHUP).unwrap();
    n.until("RELOADING=1", |m| has(m, "RELOADING=1"));
    let again = n.until("READY=1 after the reload", |m| has(m, "READY=1"));
    assert!(again.contains("STATUS=2 keys, 0 mounts"), "{again}");
    kill(d.pid(), Signal::SIGTERM).unwrap();
    n.until("STOPPING=1", |m| has(m, "STOPPING=1"));
    let status = d.wait_exit(Duration::from_secs(10)).expect("kmsd exits after SIGTERM");
    assert!(status.success(), "{status}");
}
