//! Issue 13: the key process and the mount processes are apart. kmsd holds
//! keys and never the FUSE device; a mount process is kmsd's client and
//! fails apart from it: open files survive a kmsd restart, a new open waits
//! for kmsd and then fails EIO rather than hang, and a killed mount process
//! leaves a stale mountpoint that its next start clears.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_tests::{bin, fuse_available, is_mounted, mount_children, wait_for, TestDaemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whether `pid` holds an open `/dev/fuse`.
fn holds_fuse_device(pid: Pid) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l == Path::new("/dev/fuse")))
}

/// Whether `pid` is listening on (or connected to) the socket file `path`:
/// its socket inode is among the process's descriptors.
fn holds_socket(pid: Pid, path: &Path) -> bool {
    let inode = |line: &str| -> Option<String> {
        let mut fields = line.split_whitespace();
        let ino = fields.nth(6)?.to_string();
        (fields.next() == Some(path.to_str()?)).then_some(ino)
    };
    let unix = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let Some(ino) = unix.lines().find_map(inode) else {
        return false;
    };
    let want = format!("socket:[{ino}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l == Path::new(&want)))
        })
        .unwrap_or(false)
}

/// `kmsd --dev` is one command and two processes: the socket is kmsd's, the
/// FUSE device its child's; SIGTERM to kmsd takes the mount down too.
#[test]
fn dev_mount_is_served_by_a_child_not_by_the_key_process() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::Builder::new().prefix("kmsd-dev-").tempdir().unwrap();
    let dev = dir.path().join("d");
    let log = fs::File::create(dir.path().join("log")).unwrap();
    let mut kmsd = Command::new(bin("kmsd"))
        .arg("--dev")
        .arg("--dev-dir")
        .arg(&dev)
        .env("KMSD_METRICS__LISTEN", "")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(kmsd.id() as i32);
    let logs = || fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let up = wait_for(Duration::from_secs(20), || logs().contains("kmsd ready").then_some(()));
    assert!(up.is_some(), "kmsd --dev did not start:\n{}", logs());
    let mnt = dev.join("mnt");
    assert!(is_mounted(&mnt), "{}", logs());
    fs::write(mnt.join("a.txt"), b"through the child").unwrap();
    assert_eq!(fs::read(mnt.join("a.txt")).unwrap(), b"through the child");

    let children = mount_children(pid);
    assert_eq!(children.len(), 1, "one mount process: {children:?}");
    let child = children[0];
    let socket = dev.join("kmsd.sock");
    assert!(holds_socket(pid, &socket), "kmsd serves the socket");
    assert!(
        !holds_socket(child, &socket),
        "the child does not listen on kmsd's socket"
    );
    assert!(holds_fuse_device(child), "the mount process holds /dev/fuse");
    // kmsd's channel to its child (fd 3) is close-on-exec: fusermount3 and
    // any other program the child runs do not inherit kmsd's authority.
    let flags = fs::read_to_string(format!("/proc/{child}/fdinfo/3")).unwrap();
    let flags = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "fd 3 flags {flags:o}");
    assert!(!holds_fuse_device(pid), "kmsd holds no FUSE device");

    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_for(Duration::from_secs(15), || kmsd.try_wait().unwrap());
    assert!(status.is_some_and(|s| s.success()), "{}", logs());
    assert!(!is_mounted(&mnt), "the dev mount goes with kmsd");
    assert!(
        !Path::new(&format!("/proc/{child}")).exists(),
        "the mount process is gone"
    );
}

/// A mount process started on its own (as `kmsd-mount@` runs it): a
/// settings file, kmsd's socket dialled like any client.
struct Solo {
    child: Option<Child>,
    settings: PathBuf,
    log: PathBuf,
}

impl Solo {
    fn start(d: &TestDaemon, timeout_secs: u64) -> Self {
        let settings = d.dir.path().join("solo.toml");
        fs::write(
            &settings,
            format!(
                "source = {:?}\ntarget = {:?}\nkey = \"fs\"\nsocket = {:?}\nkey_timeout_secs = {timeout_secs}\n",
                d.data(),
                d.mnt(),
                d.socket
            ),
        )
        .unwrap();
        let mut solo = Self {
            child: None,
            settings,
            log: d.dir.path().join("solo.log"),
        };
        solo.spawn();
        solo
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("kmsd"))
            .args(["mount", "solo", "--settings"])
            .arg(&self.settings)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let admin = self.settings.parent().unwrap().join("mounts/solo.sock");
        let up = wait_for(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&admin).ok()
        });
        assert!(up.is_some(), "mount process did not come up:\n{}", self.logs());
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Solo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            if wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Item 3: kmsd killed and started again while a file is open on a mount
/// process of its own; the open file keeps reading, a new open fails EIO
/// within the key timeout while kmsd is down and works once it is back;
/// a SIGKILLed mount process leaves a stale mountpoint that its next start
/// clears, with nothing lost; kmsd relays `fs versions` to it.
#[test]
fn mount_process_outlives_kmsd_and_kmsd_outlives_it() {
    if !fuse_available() {
        return;
    }
    let mut d = TestDaemon::start();
    d.client()
        .create_key(kms_client::proto::CreateKey {
            name: Some("fs".into()),
            ..Default::default()
        })
        .unwrap();
    let mut solo = Solo::start(&d, 2);
    let mnt = d.mnt();
    fs::write(mnt.join("open.txt"), b"kept open across the restart").unwrap();
    fs::write(mnt.join("later.txt"), b"opened after the restart").unwrap();
    let mut open = fs::File::open(mnt.join("open.txt")).unwrap();
    assert!(!holds_fuse_device(d.pid()));
    assert!(holds_fuse_device(solo.pid()));

    d.kill9();
    let mut got = String::new();
    open.read_to_string(&mut got).unwrap();
    assert_eq!(got, "kept open across the restart");
    let started = Instant::now();
    let err = fs::read(mnt.join("later.txt")).expect_err("no kmsd to unwrap its key");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());

    d.restart();
    assert_eq!(fs::read(mnt.join("later.txt")).unwrap(), b"opened after the restart");
    let versions = d.client().fs_versions(mnt.to_str().unwrap()).unwrap();
    assert_eq!(versions.counts, vec![(1, 2)]);
    let status = d.client().status().unwrap();
    assert_eq!(status.mounts.len(), 1, "{status:?}");

    solo.kill9();
    drop(open);
    let dead = fs::metadata(mnt.join("open.txt"));
    assert!(dead.is_err(), "a dead mount answers nothing");
    let mut c = d.client();
    assert!(c.status().unwrap().mounts.is_empty(), "kmsd is unaffected");
    solo.spawn();
    assert_eq!(fs::read(mnt.join("open.txt")).unwrap(), b"kept open across the restart");
    assert_eq!(fs::read(mnt.join("later.txt")).unwrap(), b"opened after the restart");
    assert!(solo.logs().contains("detached stale FUSE mount"), "{}", solo.logs());
    drop(solo);
    assert!(!is_mounted(&mnt), "SIGTERM unmounts");
}

/// Outside systemd kmsd looks after the mount processes it started: one
/// SIGKILLed is started again (clearing the stale mountpoint), kmsd serving
/// keys all along; SIGKILL of kmsd takes its children down with it.
#[test]
fn kmsd_restarts_a_child_that_dies_and_takes_them_down_when_killed() {
    if !fuse_available() {
        return;
    }
    let mut d = TestDaemon::start_with_mount();
    fs::write(d.mnt().join("kept"), b"across the child's death").unwrap();
    let first = d.mount_pids();
    assert_eq!(first.len(), 1, "{first:?}");
    kill(first[0], Signal::SIGKILL).unwrap();
    let mut c = d.client();
    let back = wait_for(Duration::from_secs(20), || {
        let now = d.mount_pids();
        let fresh = now.len() == 1 && now != first;
        (fresh && fs::read(d.mnt().join("kept")).is_ok()).then_some(now)
    });
    let second = back.unwrap_or_else(|| panic!("no new mount process:\n{}", d.logs()));
    assert_eq!(fs::read(d.mnt().join("kept")).unwrap(), b"across the child's death");
    assert!(c.status().is_ok(), "kmsd served on");
    assert!(
        d.logs().contains("mount process died; starting it again"),
        "{}",
        d.logs()
    );
    d.kill9();
    let gone = wait_for(Duration::from_secs(10), || {
        (!Path::new(&format!("/proc/{}", second[0])).exists()).then_some(())
    });
    assert!(gone.is_some(), "the child outlived a SIGKILLed kmsd");
}

/// `umount` of a mount from outside (an operator, a stray script) ends its
/// FUSE session: the mount process must not linger serving nothing, but
/// exit, so that kmsd (here) or systemd (kmsd-mount@.service) mounts the
/// filesystem again.
#[test]
fn a_mount_unmounted_from_outside_comes_back() {
    if !fuse_available() {
        return;
    }
    let d = TestDaemon::start_with_mount();
    fs::write(d.mnt().join("kept"), b"across an outside umount").unwrap();
    let first = d.mount_pids();
    assert_eq!(first.len(), 1, "{first:?}");
    nix::mount::umount2(&d.mnt(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let back = wait_for(Duration::from_secs(20), || {
        let now = d.mount_pids();
        let fresh = now.len() == 1 && now != first;
        (fresh && fs::read(d.mnt().join("kept")).is_ok()).then_some(now)
    });
    assert!(back.is_some(), "the mount did not come back:\n{}", d.logs());
    assert_eq!(fs::read(d.mnt().join("kept")).unwrap(), b"across an outside umount");
    assert!(d.logs().contains("unmounted from outside"), "{}", d.logs());
}

/// Every mount process under systemd is root to kmsd, which allows one uid
/// `limits.max_connections_per_uid` connections. A busy mount holds at most
/// four (more opens at once wait for one), so it leaves root's other
/// clients, and other mounts, their share: with 6 allowed, 24 cold opens at
/// once all succeed and root's kmsctl still gets in.
#[test]
fn a_busy_mount_process_leaves_its_uid_connections_to_spare() {
    if !fuse_available() {
        return;
    }
    let d = TestDaemon::start_with(kms_tests::DaemonOptions {
        env: vec![("KMSD_LIMITS__MAX_CONNECTIONS_PER_UID".into(), "6".into())],
        ..Default::default()
    });
    d.client()
        .create_key(kms_client::proto::CreateKey {
            name: Some("fs".into()),
            ..Default::default()
        })
        .unwrap();
    let solo = Solo::start(&d, 10);
    let mnt = d.mnt();
    for i in 0..24 {
        fs::write(mnt.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    // Cold opens: a fresh mount process knows no file and holds no key.
    drop(solo);
    let _solo = Solo::start(&d, 10);
    let readers: Vec<_> = (0..24)
        .map(|i| {
            let p = mnt.join(format!("f{i}"));
            std::thread::spawn(move || fs::read(&p).map(|b| (i, b)))
        })
        .collect();
    for r in readers {
        let (i, body) = r.join().unwrap().expect("a cold open failed");
        assert_eq!(body, format!("file {i}").into_bytes());
    }
    // The mount keeps its idle connections for the next opens; root's
    // kmsctl must still fit beside them.
    let status = d.kmsctl(&["status"], b"");
    assert!(status.status.success(), "{}", kms_tests::stderr(&status));
    let mut c = d.client();
    assert!(c.status().is_ok());
}

/// The value of the counter `kmsd_requests_total{op,outcome="ok"}`.
fn ok_requests(metrics: &str, op: &str) -> u64 {
    let want = format!("kmsd_requests_total{{op=\"{op}\",outcome=\"ok\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A mount process makes new files' data keys ahead, in batches (one
/// request for many creates), yet a file created after `key rotate` has
/// returned is wrapped by the new version, and one created after `key
/// disable` has returned fails: kmsd's change file tells the mount process
/// to drop what it made ahead.
#[test]
fn keys_made_ahead_never_outlive_a_change_of_the_key() {
    if !fuse_available() {
        return;
    }
    let addr = kms_tests::free_tcp_addr();
    let d = TestDaemon::start_with(kms_tests::DaemonOptions::with_metrics(addr));
    d.client()
        .create_key(kms_client::proto::CreateKey {
            name: Some("fs".into()),
            ..Default::default()
        })
        .unwrap();
    let _solo = Solo::start(&d, 5);
    let mnt = d.mnt();
    let target = mnt.to_str().unwrap().to_string();
    let mut created = 0;
    for round in 1..=3u32 {
        // Enough creates that keys are left over, made under this version.
        for i in 0..40 {
            fs::write(mnt.join(format!("r{round}-{i}")), b"x").unwrap();
            created += 1;
        }
        let v = d.client().rotate_key("fs").unwrap().expect("rotated").active_version;
        assert_eq!(v, round + 1);
        fs::write(mnt.join(format!("after-{round}")), b"y").unwrap();
        created += 1;
        let counts = d.client().fs_versions(&target).unwrap().counts;
        assert_eq!(
            counts.iter().find(|(ver, _)| *ver == v).map(|c| c.1),
            Some(1),
            "the file created after rotating to version {v} is not at {v}: {counts:?}"
        );
    }
    let (_, metrics) = kms_tests::scrape(addr).unwrap();
    let batches = ok_requests(&metrics, "generate-data-keys");
    let singles = ok_requests(&metrics, "generate-data-key");
    assert!(
        batches * 4 <= created && batches > 0,
        "{created} creates took {batches} batch requests ({singles} single; the probe is one)"
    );
    // Disabled: the next create fails although keys made ahead are left.
    fs::write(mnt.join("fill"), b"z").unwrap();
    let out = d.kmsctl(&["key", "disable", "fs"], b"");
    assert!(out.status.success(), "{}", kms_tests::stderr(&out));
    let err = fs::write(mnt.join("after-disable"), b"n").expect_err("created with a disabled key");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}
