//! README claims that had no test (issue 17, item 5), one test each, on
//! real daemons: enable, disable and deletion stay in their zone; a
//! replica copies its primary's policy; replication and filesystem series
//! appear only with peers and mounts; a scheduled rotation that fails is
//! audited as `auto-failed`; a failed audit write is logged and requests
//! are still answered; a hung runtime stops the watchdog pings.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use kms_client::proto::{Context, CreateKey, ErrorCode, KeyState, Principal};
use kms_tests::{free_tcp_addr, kmsctl_as, stderr, stdout, wait_for, DaemonOptions, TestDaemon};
use nix::sys::signal::{kill, Signal};
use serde_json::Value;

use crate::disk::{root_or_skip, Tmpfs};
use crate::metrics::scrape_until;
use crate::systemd::{has, NotifyListener};
use crate::zones::{await_history, code, create, replicate, rotations, Site, CONVERGE};

/// `Ok` when `d` wraps with `app`, else the error code.
fn wrap_outcome(d: &TestDaemon) -> Result<(), Option<ErrorCode>> {
    d.client()
        .wrap("app", b"probe", &Context::new())
        .map(|_| ())
        .map_err(|e| e.code())
}

fn state(d: &TestDaemon) -> KeyState {
    d.client().describe_key("app").unwrap().state
}

/// README "Multi-zone keys": "Enable, disable and deletion are per zone and
/// are not replicated." Each change is made in one zone, then something
/// that does travel (a rotation pushed, a rotation setting pulled) is
/// waited for in the other zone, which must keep its own state.
#[test]
fn enable_disable_and_deletion_stay_in_their_zone() {
    let site = Site::new();
    let zones = ["a", "b"];
    let mut a = site.start("a", &zones);
    let b = site.start("b", &zones);
    create(&a, "app");
    replicate(&a, "app", "b");
    let ctx = Context::new();
    let blob = a.client().wrap("app", b"dek", &ctx).unwrap();
    assert!(b.client().describe_key("app").unwrap().rotation.enabled);

    // Disabled in the primary zone: the replica takes the next export (a
    // rotation setting, pulled) but stays enabled.
    a.client().disable_key("app").unwrap();
    a.client().disable_rotation("app").unwrap();
    let pulled = wait_for(CONVERGE, || {
        (!b.client().describe_key("app").ok()?.rotation.enabled).then_some(())
    });
    assert!(pulled.is_some(), "b never pulled the rotation setting\n{}", b.logs());
    assert_eq!(wrap_outcome(&a), Err(Some(ErrorCode::Disabled)));
    assert_eq!((state(&b), wrap_outcome(&b)), (KeyState::Enabled, Ok(())));
    assert_eq!(&b.client().unwrap(&blob, &ctx).unwrap()[..], b"dek");

    // Disabled in the replica zone: a rotation pushed from the primary
    // arrives, the replica stays disabled, the primary enabled.
    a.client().enable_key("app").unwrap();
    b.client().disable_key("app").unwrap();
    a.client().rotate_key("app").unwrap();
    await_history(&b, "app", &rotations(&a, "app"));
    assert_eq!(rotations(&b, "app").len(), 2);
    assert_eq!(
        (state(&b), wrap_outcome(&b)),
        (KeyState::Disabled, Err(Some(ErrorCode::Disabled)))
    );
    assert_eq!((state(&a), wrap_outcome(&a)), (KeyState::Enabled, Ok(())));

    // Deletion scheduled in the replica zone: same.
    b.client().enable_key("app").unwrap();
    b.client().schedule_deletion("app", Some(7)).unwrap();
    a.client().rotate_key("app").unwrap();
    await_history(&b, "app", &rotations(&a, "app"));
    assert_eq!(rotations(&b, "app").len(), 3);
    assert!(matches!(state(&b), KeyState::PendingDeletion { .. }), "{:?}", state(&b));
    assert_eq!(wrap_outcome(&b), Err(Some(ErrorCode::Disabled)));
    assert_eq!((state(&a), wrap_outcome(&a)), (KeyState::Enabled, Ok(())));
    b.client().cancel_deletion("app").unwrap();
    b.client().enable_key("app").unwrap();

    // Deletion scheduled in the primary zone: the replica pulls the new
    // rotation setting and stays enabled.
    a.client().schedule_deletion("app", Some(7)).unwrap();
    a.client().enable_rotation("app", Some(30)).unwrap();
    let pulled = wait_for(CONVERGE, || {
        let r = b.client().describe_key("app").ok()?.rotation;
        (r.enabled && r.period_days == Some(30)).then_some(())
    });
    assert!(pulled.is_some(), "b never pulled the new rotation period\n{}", b.logs());
    assert!(matches!(state(&a), KeyState::PendingDeletion { .. }));
    assert_eq!((state(&b), wrap_outcome(&b)), (KeyState::Enabled, Ok(())));

    // The deletion happens in the primary zone (its clock 8 days ahead):
    // the replica keeps the key, though its pulls now find none there.
    assert!(a.terminate().success());
    a.opts
        .env
        .push(("LD_PRELOAD".into(), crate::schedule::LIBFAKETIME.into()));
    a.opts.env.push(("FAKETIME".into(), "+8d".into()));
    a.restart();
    let deleted = wait_for(CONVERGE, || {
        (a.client().describe_key("app").err()?.code() == Some(ErrorCode::NotFound)).then_some(())
    });
    assert!(deleted.is_some(), "a did not delete the key\n{}", a.logs());
    let refused = wait_for(CONVERGE, || {
        let logs = b.logs();
        logs.lines()
            .any(|l| l.contains("pull failed") && l.contains("zone a refused: not-found"))
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "b did not pull from a after the deletion\n{}",
        b.logs()
    );
    assert_eq!((state(&b), wrap_outcome(&b)), (KeyState::Enabled, Ok(())));
    assert_eq!(&b.client().unwrap(&blob, &ctx).unwrap()[..], b"dek");
    assert_eq!(rotations(&b, "app").len(), 3);
}

/// README "Multi-zone keys": "A replica copies the primary's policy." The
/// key belongs to uid 65534 in zone a; zone b receives it from kmsd a
/// (uid 0), yet only uid 65534 may use it there: root, b's global admin,
/// may read it but not use it, as in zone a.
#[test]
fn a_replica_copies_the_primarys_policy() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let zones = ["a", "b"];
    let a = site.start("a", &zones);
    let b = site.start("b", &zones);
    // Let other uids reach the sockets in the site folder.
    std::fs::set_permissions(site.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ok = |o: &std::process::Output| {
        assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
    };
    ok(&kmsctl_as(&a, 65534, &["key", "create", "--name", "app"], b""));
    ok(&kmsctl_as(&a, 65534, &["key", "replicate", "app", "--zone", "b"], b""));

    let primary = a.client().describe_key("app").unwrap().policy;
    let replica = b.client().describe_key("app").unwrap().policy;
    assert_eq!(primary.users, vec![Principal::Uid(65534)]);
    assert_eq!(replica, primary);

    let dek = [9u8; 32];
    let out = kmsctl_as(&b, 65534, &["wrap", "app"], &dek);
    ok(&out);
    let unwrapped = kmsctl_as(&a, 65534, &["unwrap"], &out.stdout);
    ok(&unwrapped);
    assert_eq!(unwrapped.stdout, dek, "wrapped in b, unwrapped in a by the owner");
    for d in [&a, &b] {
        let err = d.client().wrap("app", &dek, &Context::new()).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "zone {}", d.opts.zone);
        let other = kmsctl_as(d, 65533, &["wrap", "app"], &dek);
        assert!(
            !other.status.success() && stderr(&other).contains("permission-denied"),
            "zone {}: {}",
            d.opts.zone,
            stderr(&other)
        );
    }
}

/// Sample and comment lines of a scrape that name any of `prefixes`.
fn lines_named<'a>(body: &'a str, prefixes: &[&str]) -> Vec<&'a str> {
    body.lines()
        .filter(|l| prefixes.iter().any(|p| l.contains(p)))
        .collect()
}

const REPLICATION: [&str; 2] = ["kmsd_replication_", "kmsd_replica_"];
const FILESYSTEM: [&str; 1] = ["kmsd_fs_"];

/// README "Metrics": "Replication series appear only with `[[peer]]`
/// zones, filesystem series only with mounts." Three daemons: neither,
/// a peer only, a mount only; each scrape is taken after the state series
/// were refreshed at least twice.
#[test]
fn replication_and_filesystem_series_appear_only_with_peers_and_mounts() {
    // Waits for a refresh that saw a new key, so the previous refresh
    // (which sets every state series) is complete.
    fn settled(d: &TestDaemon, addr: std::net::SocketAddr, enabled: u32, want: &[String]) -> String {
        scrape_until(addr, &[format!(r#"kmsd_keys{{state="enabled"}} {enabled}"#)]);
        create(d, "settle");
        let mut want = want.to_vec();
        want.push(format!(r#"kmsd_keys{{state="enabled"}} {}"#, enabled + 1));
        scrape_until(addr, &want)
    }

    let addr = free_tcp_addr();
    let plain = TestDaemon::start_with(DaemonOptions::with_metrics(addr));
    let body = settled(&plain, addr, 1, &[]);
    assert_eq!(lines_named(&body, &REPLICATION), Vec::<&str>::new(), "{body}");
    assert_eq!(lines_named(&body, &FILESYSTEM), Vec::<&str>::new(), "{body}");
    drop(plain);

    // A peer zone that is not even running: the series are there, at 0.
    let site = Site::new();
    let addr = free_tcp_addr();
    let mut opts = site.options("a", &["a", "b"]);
    opts.env.push(("KMSD_METRICS__LISTEN".into(), addr.to_string()));
    let peered = TestDaemon::start_with(opts);
    let want = [
        r#"kmsd_replication_pushes_total{outcome="ok"} 0"#,
        r#"kmsd_replication_pushes_total{outcome="refused"} 0"#,
        r#"kmsd_replication_pushes_total{outcome="failed"} 0"#,
        r#"kmsd_replication_pulls_total{outcome="ok"} 0"#,
        r#"kmsd_replication_pulls_total{outcome="failed"} 0"#,
        "kmsd_replication_frames_rejected_total 0",
    ]
    .map(String::from);
    let body = settled(&peered, addr, 1, &want);
    assert_eq!(lines_named(&body, &FILESYSTEM), Vec::<&str>::new(), "{body}");
    drop(peered);

    if !kms_tests::fuse_available() {
        return;
    }
    let addr = free_tcp_addr();
    let mounted = TestDaemon::start_with_mount_opts(DaemonOptions::with_metrics(addr));
    let m = mounted.mnt().display().to_string();
    let want = [
        format!(r#"kmsd_fs_tamper_detections_total{{mount="{m}"}} 0"#),
        format!(r#"kmsd_fs_dek_cache_total{{mount="{m}",result="miss"}} 0"#),
        format!(r#"kmsd_fs_dek_cache_total{{mount="{m}",result="hit"}} 0"#),
        format!(r#"kmsd_fs_bytes_total{{mount="{m}",direction="written"}} 0"#),
        format!(r#"kmsd_fs_bytes_total{{mount="{m}",direction="read"}} 0"#),
    ];
    // The default key and `fs`.
    let body = settled(&mounted, addr, 2, &want);
    assert_eq!(lines_named(&body, &REPLICATION), Vec::<&str>::new(), "{body}");
}

fn audit_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Polls `path` until a line satisfies `want` (`CONVERGE` at most).
fn await_audit(path: &Path, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let found = wait_for(CONVERGE, || audit_lines(path).into_iter().find(|l| want(l)));
    found.unwrap_or_else(|| {
        let raw = std::fs::read_to_string(path).unwrap_or_default();
        panic!("no {what} in {}:\n{raw}", path.display())
    })
}

/// README "Audit log": the scheduler's `auto-failed` (uid 0, kmsd's pid).
/// A daily key is due at start-up (clock 2 days ahead) while `STATE/keys`
/// is full: the rotation fails, is audited as `auto-failed` with the error
/// code, and succeeds once there is space again.
#[test]
fn a_failed_scheduled_rotation_is_audited_as_auto_failed() {
    if !root_or_skip() {
        return;
    }
    let holder = tempfile::tempdir().unwrap();
    let state = holder.path().join("state");
    std::fs::DirBuilder::new().mode(0o700).create(&state).unwrap();
    let keys = Tmpfs::new(&state, "keys", "256k");
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![("KMSD_STATE_DIR".into(), state.display().to_string())],
        ..Default::default()
    });
    let daily = d
        .client()
        .create_key(CreateKey {
            name: Some("daily".into()),
            rotation: Some(Some(1)),
            ..Default::default()
        })
        .unwrap();
    assert!(d.terminate().success());
    // Not a key file (`*.key`), so the store ignores it.
    let filler = keys.fill();
    d.opts
        .env
        .push(("LD_PRELOAD".into(), crate::schedule::LIBFAKETIME.into()));
    d.opts.env.push(("FAKETIME".into(), "+2d".into()));
    d.restart();
    let kmsd = i64::from(d.pid().as_raw());
    let audit = state.join("audit.log");
    let id = daily.id.to_string();
    let failed = await_audit(&audit, "auto-failed line", |l| l["op"] == "auto-failed");
    assert_eq!(
        (&failed["key"], &failed["outcome"], &failed["version"]),
        (&Value::from(id.clone()), &Value::from("unavailable"), &Value::Null),
        "{failed}"
    );
    assert_eq!((&failed["uid"], &failed["pid"]), (&Value::from(0), &Value::from(kmsd)));
    assert!(d.logs().contains("scheduled work failed; will retry"), "{}", d.logs());
    assert_eq!(d.client().describe_key("daily").unwrap().active_version, 1);
    assert!(
        !audit_lines(&audit).iter().any(|l| l["op"] == "auto-rotate"),
        "nothing rotated on a full disk"
    );

    // Space again; a key change wakes the scheduler, which now rotates.
    std::fs::remove_file(filler).unwrap();
    create(&d, "nudge");
    let rotated = await_audit(&audit, "auto-rotate line", |l| l["op"] == "auto-rotate");
    assert_eq!(
        (&rotated["key"], &rotated["outcome"], &rotated["version"]),
        (&Value::from(id), &Value::from("ok"), &Value::from(2))
    );
    assert_eq!(d.client().describe_key("daily").unwrap().active_version, 2);
    assert!(d.terminate().success());
    drop(keys);
}

/// README "Audit log": "A failed write is logged and requests are still
/// answered." The state folder is a small tmpfs, filled once the daemon
/// runs: audited requests go on until a write fails, every one answered
/// correctly, the failure is logged with its cause, and later requests
/// still get answers; with space again lines are written again.
#[test]
fn a_failed_audit_write_is_logged_and_requests_are_still_answered() {
    if !root_or_skip() {
        return;
    }
    let holder = tempfile::tempdir().unwrap();
    let small = Tmpfs::new(holder.path(), "state", "256k");
    let state = small.0.join("kmsd");
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![("KMSD_STATE_DIR".into(), state.display().to_string())],
        ..Default::default()
    });
    let audit = state.join("audit.log");
    let mut c = d.client();
    let key = c
        .create_key(CreateKey {
            name: Some("k".into()),
            ..Default::default()
        })
        .unwrap();
    let ctx = Context::new();
    let blob = c.wrap("k", &[5; 32], &ctx).unwrap();
    await_audit(&audit, "key-create line", |l| l["op"] == "key-create");
    let filler = small.fill();

    // The audit file's last page may still take a few lines: keep asking
    // until a write fails.
    const FAILED: &str = "cannot write the audit log";
    let mut answered = 0;
    let logged = wait_for(CONVERGE, || {
        let info = c.describe_key("k").expect("answered while the disk is full");
        assert_eq!(info.id, key.id);
        answered += 1;
        d.logs().lines().find(|l| l.contains(FAILED)).map(str::to_string)
    });
    let logged =
        logged.unwrap_or_else(|| panic!("no failed audit write logged after {answered} requests\n{}", d.logs()));
    assert!(
        logged.contains("ERROR")
            && logged.contains("No space left on device")
            && logged.contains(&audit.display().to_string()),
        "{logged}"
    );
    // After the failure: data and key-management answers as usual.
    assert_eq!(&c.unwrap(&blob, &ctx).unwrap()[..], &[5; 32]);
    let other: Context = [("a".to_string(), "b".to_string())].into();
    assert_eq!(code(c.unwrap(&blob, &other)), ErrorCode::DecryptFailed);
    assert_eq!(code(c.describe_key("nope")), ErrorCode::NotFound);
    assert_eq!(c.describe_key("k").unwrap().id, key.id);
    // Those were audited too, and their writes failed as well.
    let more = wait_for(CONVERGE, || (d.logs().matches(FAILED).count() >= 2).then_some(()));
    assert!(more.is_some(), "one failed write only:\n{}", d.logs());

    // Space again: the next audited request is written.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(code(c.describe_key("after-space")), ErrorCode::NotFound);
    await_audit(&audit, "line written after space was freed", |l| {
        l["key"] == "after-space" && l["outcome"] == "not-found"
    });
    drop(c);
    assert!(d.terminate().success());
    // A write that failed part-way left no torn line behind: the lines
    // written form one intact chain.
    let verify = d.kmsctl(&["audit", "verify", "--file", audit.to_str().unwrap()], b"");
    assert!(verify.status.success(), "{}{}", stdout(&verify), stderr(&verify));
    drop(small);
}

/// Threads of `pid` whose name (`comm`) starts with `prefix`.
fn threads(pid: i32, prefix: &str) -> Vec<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .collect()
}

/// The scheduler state letter of thread `tid` of `pid` (`t`: ptrace stop).
fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Stops one thread with `PTRACE_SEIZE` + `PTRACE_INTERRUPT` and waits (5 s
/// at most) until it is in ptrace stop; `false` when the thread is gone
/// (an idle blocking-pool thread may exit). The rest of its process runs
/// on.
fn stop_thread(tid: i32) -> bool {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: PTRACE_SEIZE and PTRACE_INTERRUPT take a thread id and
    // ignore addr; data 0 means no options. No memory is passed.
    let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) };
    if seized != 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "PTRACE_SEIZE {tid}: {err}");
        return false;
    }
    // SAFETY: as above.
    let interrupted = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) };
    assert_eq!(
        interrupted,
        0,
        "PTRACE_INTERRUPT {tid}: {}",
        std::io::Error::last_os_error()
    );
    let stopped = wait_for(Duration::from_secs(5), || {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the local it is given.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        (r == tid && libc::WIFSTOPPED(status)).then_some(())
    });
    assert!(stopped.is_some(), "thread {tid} did not stop within 5 s");
    true
}

/// Lets a thread stopped by [`stop_thread`] run again.
fn resume_thread(tid: i32) {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: PTRACE_DETACH of a thread this thread traces and that is in
    // ptrace stop; data 0 means no signal is delivered.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, null, null) };
    assert_eq!(r, 0, "PTRACE_DETACH {tid}: {}", std::io::Error::last_os_error());
}

/// README "systemd": "kmsd pings the watchdog from its main loop; a hung
/// daemon is restarted" (the restart is systemd's part). kmsd's async
/// runtime threads are stopped while its other threads (main, audit
/// writer) run on: no `WATCHDOG=1` comes for 2 s (20 ping intervals), so
/// systemd would restart it; the pings come back when the runtime runs.
#[test]
fn a_hung_runtime_stops_the_watchdog_pings() {
    let notify_dir = tempfile::tempdir().unwrap();
    let mut n = NotifyListener::bind(notify_dir.path());
    let mut d = TestDaemon::start_with(DaemonOptions {
        env: vec![
            ("NOTIFY_SOCKET".into(), n.path.display().to_string()),
            // 0.2 s: kmsd pings every 0.1 s.
            ("WATCHDOG_USEC".into(), "200000".into()),
        ],
        ..Default::default()
    });
    n.until("READY=1", |m| has(m, "READY=1"));
    n.until("WATCHDOG=1", |m| has(m, "WATCHDOG=1"));
    n.until("a second WATCHDOG=1", |m| has(m, "WATCHDOG=1"));

    let pid = d.pid().as_raw();
    // Tokio names its worker and blocking threads `tokio-rt-worker`
    // (`tokio-runtime-worker`, cut to 15 bytes, before 1.44). Stop them
    // until no new one appears.
    let mut stopped: Vec<i32> = Vec::new();
    for _ in 0..10 {
        let fresh: Vec<i32> = threads(pid, "tokio-r")
            .into_iter()
            .filter(|t| !stopped.contains(t))
            .collect();
        if fresh.is_empty() {
            break;
        }
        stopped.extend(fresh.into_iter().filter(|t| stop_thread(*t)));
    }
    assert!(!stopped.is_empty(), "kmsd has no runtime threads?");
    let others: Vec<i32> = threads(pid, "").into_iter().filter(|t| !stopped.contains(t)).collect();
    assert!(!others.is_empty(), "the main thread is not a runtime worker");
    for t in &others {
        assert_ne!(thread_state(pid, *t), Some('t'), "thread {t} runs on");
    }
    // What was sent before the stop, then the silence.
    n.during(Duration::from_millis(300));
    let silent = n.during(Duration::from_secs(2));
    let pings = silent.iter().filter(|m| has(m, "WATCHDOG=1")).count();

    for tid in &stopped {
        resume_thread(*tid);
    }
    assert_eq!(pings, 0, "pings while the runtime was stopped: {silent:#?}");
    // Read what comes now, as systemd would: a notify socket nobody reads
    // fills up (10 datagrams) and blocks kmsd's sends.
    let after = n.during(Duration::from_secs(1));
    assert!(
        after.iter().any(|m| has(m, "WATCHDOG=1")),
        "no WATCHDOG=1 within 1 s of the runtime running again: {after:#?}"
    );
    d.client().status().unwrap();
    kill(d.pid(), Signal::SIGTERM).unwrap();
    n.until("STOPPING=1", |m| has(m, "STOPPING=1"));
    let status = d.wait_exit(Duration::from_secs(10)).expect("kmsd exits after SIGTERM");
    assert!(status.success(), "{status}");
}
