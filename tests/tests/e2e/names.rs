//! Encrypted names through the real daemon and mount process (issue 15):
//! no plaintext name, symlink target or xattr in the backing directory;
//! tampered names read as ENOENT or EIO and are logged; a kill -9 of the
//! mount process at any instant of mkdir, rename, rmdir or a long-name
//! create leaves every directory readable. Needs /dev/fuse and root;
//! fails instead of skipping when `CI` is set.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_fuse::names::{self, Kind};
use kms_tests::{fuse_available, is_mounted, wait_for, TestDaemon};

const MARKER: &str = "MARKER-q7x";

pub(crate) fn long_name(tag: &str) -> String {
    // 255 bytes: the long-name form.
    let mut s = "é".repeat(120);
    s.push_str(tag);
    while s.len() < 255 {
        s.push('x');
    }
    s
}

fn drop_caches(d: &TestDaemon) {
    // Entries are cached for the mount's TTL (1 s); then the kernel asks
    // again.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    std::thread::sleep(Duration::from_millis(1200));
    let _ = d;
}

fn lxattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: NUL-terminated path; the buffer pointer and length describe `buf`.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let cn = CString::new(name).unwrap();
            let mut v = vec![0u8; 65536];
            // SAFETY: NUL-terminated strings; the buffer pointer and length describe `v`.
            let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
            v.truncate(len.max(0) as usize);
            (name.to_vec(), v)
        })
        .collect()
}

/// Every backing path under `root`, with what a reader of the backing
/// directory sees of it: its name, symlink target, xattr names and values.
fn backing_view(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let mut seen = e.file_name().as_bytes().to_vec();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                seen.extend_from_slice(fs::read_link(&p).unwrap().as_os_str().as_bytes());
            }
            for (n, v) in lxattrs(&p) {
                seen.extend(n);
                seen.extend(v);
            }
            if ft.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, seen));
        }
    }
    out
}

#[test]
fn no_plaintext_name_target_or_xattr_in_the_backing_directory() {
    if !fuse_available() {
        return;
    }
    let d = TestDaemon::start_with_mount();
    let mnt = d.mnt();
    let dir = mnt.join(format!("{MARKER}-dir"));
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join(format!("{MARKER}-file")), b"contents").unwrap();
    fs::write(dir.join(long_name(MARKER)), b"long").unwrap();
    let link = mnt.join(format!("{MARKER}-link"));
    std::os::unix::fs::symlink(format!("/{MARKER}/target"), &link).unwrap();
    assert_eq!(
        fs::symlink_metadata(&link).unwrap().len(),
        format!("/{MARKER}/target").len() as u64,
        "st_size of a symlink is its plaintext target's length"
    );
    assert_eq!(fs::read_link(&link).unwrap(), Path::new(&format!("/{MARKER}/target")));
    let file = dir.join(format!("{MARKER}-file"));
    let c = CString::new(file.as_os_str().as_bytes()).unwrap();
    let (name, value) = (
        CString::new(format!("user.{MARKER}")).unwrap(),
        format!("{MARKER}-value"),
    );
    // SAFETY: NUL-terminated strings; pointer and length describe `value`.
    let ret = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    let through = lxattrs(&file);
    assert_eq!(through, [(name.as_bytes().to_vec(), value.as_bytes().to_vec())]);

    let view = backing_view(&d.data());
    assert!(view.len() >= 6, "{view:?}");
    for (p, seen) in &view {
        assert!(
            !seen.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "plaintext in the backing directory at {}",
            p.display()
        );
        assert!(!seen.windows(2).any(|w| w == "é".as_bytes()), "{}", p.display());
    }
    // The names and the rest survive a restart of kmsd and the mount.
    let mut d = d;
    assert!(d.terminate().success());
    d.restart();
    let mnt = d.mnt();
    wait_for(Duration::from_secs(20), || {
        (is_mounted(&mnt) && fs::read_dir(&mnt).is_ok()).then_some(())
    })
    .expect("remounted");
    assert_eq!(fs::read(dir.join(long_name(MARKER))).unwrap(), b"long");
    assert_eq!(fs::read_link(&link).unwrap(), Path::new(&format!("/{MARKER}/target")));
    assert_eq!(lxattrs(&file), through);
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn tampered_names_read_as_enoent_or_eio_and_are_logged() {
    if !fuse_available() {
        return;
    }
    let d = TestDaemon::start_with_mount();
    let mnt = d.mnt();
    for dir in ["a", "b"] {
        fs::create_dir(mnt.join(dir)).unwrap();
    }
    fs::write(mnt.join("a/moved"), b"1").unwrap();
    fs::write(mnt.join("a/altered"), b"2").unwrap();
    let (l1, l2) = (long_name("one"), long_name("two"));
    fs::write(mnt.join("a").join(&l1), b"3").unwrap();
    fs::write(mnt.join("a").join(&l2), b"4").unwrap();
    fs::write(mnt.join("a/kept"), b"5").unwrap();

    // A name moved to another directory.
    let moved = crate::backing(&d, "a/moved");
    let into_b = crate::backing(&d, "b").join(moved.file_name().unwrap());
    fs::rename(&moved, &into_b).unwrap();
    // A name altered by one character.
    let altered = crate::backing(&d, "a/altered");
    let mut name = altered.file_name().unwrap().as_bytes().to_vec();
    name[4] = if name[4] == b'A' { b'B' } else { b'A' };
    let altered_to = altered.with_file_name(OsStr::from_bytes(&name));
    fs::rename(&altered, &altered_to).unwrap();
    // Two long-name parts swapped.
    let (e1, e2) = (
        crate::backing(&d, &format!("a/{l1}")),
        crate::backing(&d, &format!("a/{l2}")),
    );
    let (p1, p2) = (
        names::part_of(e1.file_name().unwrap()),
        names::part_of(e2.file_name().unwrap()),
    );
    let (c1, c2) = (
        fs::read(e1.with_file_name(&p1)).unwrap(),
        fs::read(e2.with_file_name(&p2)).unwrap(),
    );
    fs::write(e1.with_file_name(&p1), &c2).unwrap();
    fs::write(e2.with_file_name(&p2), &c1).unwrap();
    drop_caches(&d);

    assert_eq!(errno(fs::metadata(mnt.join("b/moved"))), Some(libc::ENOENT));
    assert_eq!(errno(fs::metadata(mnt.join("a/moved"))), Some(libc::ENOENT));
    assert_eq!(errno(fs::metadata(mnt.join("a/altered"))), Some(libc::ENOENT));
    let listed = |dir: &str| -> Vec<OsString> {
        let mut v: Vec<_> = fs::read_dir(mnt.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        listed("b"),
        Vec::<OsString>::new(),
        "a moved name is never another file"
    );
    assert_eq!(
        listed("a"),
        [OsString::from("kept")],
        "swapped long-name parts are left out"
    );
    assert_eq!(fs::read(mnt.join("a/kept")).unwrap(), b"5");
    let logs = d.logs();
    for what in [&into_b, &altered_to, &e1, &e2] {
        let name = what.file_name().unwrap().to_str().unwrap();
        assert!(
            logs.lines()
                .any(|l| l.contains(name) && l.contains("does not authenticate")),
            "{name} logged:\n{logs}"
        );
    }
}

/// Through the mount: every directory lists, every entry stats, and a
/// file can be made (and removed) in every directory; returns the number
/// of entries seen.
pub(crate) fn check_through_mount(mnt: &Path, ctx: &str) -> usize {
    let mut count = 0;
    let mut stack = vec![mnt.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{ctx}: list {}: {e}", dir.display()));
        for e in entries {
            let e = e.unwrap_or_else(|e| panic!("{ctx}: entry of {}: {e}", dir.display()));
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{ctx}: stat {}: {e}", p.display()));
            count += 1;
            if md.is_dir() {
                stack.push(p);
            }
        }
        let probe = dir.join("probe-after-restart");
        fs::write(&probe, b"p").unwrap_or_else(|e| panic!("{ctx}: create in {}: {e}", dir.display()));
        fs::remove_file(&probe).unwrap();
    }
    count
}

/// In the backing directory: every directory holding encrypted entries has
/// a 16-byte id; returns the number of encrypted entries.
pub(crate) fn check_backing(root: &Path, ctx: &str) -> usize {
    let mut count = 0;
    let mut stack = vec![(root.to_path_buf(), true)];
    while let Some((dir, is_root)) = stack.pop() {
        let mut encrypted = 0;
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            match names::classify(&e.file_name()) {
                Kind::Reserved => continue,
                Kind::Short(_) | Kind::Long(_) => encrypted += 1,
            }
            if e.file_type().unwrap().is_dir() {
                stack.push((e.path(), false));
            }
        }
        if encrypted > 0 && !is_root {
            let id = fs::read(dir.join(names::DIR_ID_FILE));
            assert!(
                id.as_ref().is_ok_and(|id| id.len() == 16),
                "{ctx}: {} holds {encrypted} entries but its id is {id:?}",
                dir.display()
            );
        }
        count += encrypted;
    }
    count
}

/// One worker: mkdir, long-name create, renames within and across
/// directories, rmdir, until told to stop or the mount dies.
fn churn(mnt: PathBuf, t: usize, stop: Arc<AtomicBool>) {
    let (own, other) = (mnt.join(format!("w{t}")), mnt.join(format!("w{}", 1 - t)));
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let dir = own.join(format!("d{i}"));
        let long = dir.join(long_name(&format!("{t}-{i}")));
        let results = [
            fs::create_dir(&dir),
            fs::write(dir.join("f"), b"x"),
            fs::write(&long, b"long"),
            fs::rename(&long, dir.join("short")),
            fs::rename(dir.join("short"), dir.join(long_name(&format!("back{i}")))),
            fs::create_dir(dir.join(long_name("sub"))),
            fs::rename(&dir, other.join(format!("from{t}-{i}"))),
            fs::rename(
                other.join(format!("from{t}-{i}")),
                own.join(long_name(&format!("dir{i}"))),
            ),
        ];
        if results
            .iter()
            .any(|r| matches!(r, Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)))
        {
            return;
        }
        // Empty an older directory and remove it.
        let old = own.join(long_name(&format!("dir{}", i.saturating_sub(2))));
        if let Ok(entries) = fs::read_dir(&old) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
            let _ = fs::remove_dir(&old);
        }
        // An empty directory replaced by a rename over it.
        let (x, y) = (own.join(format!("x{i}")), own.join(format!("y{i}")));
        let _ = fs::create_dir(&x).and_then(|()| fs::create_dir(&y));
        let _ = fs::rename(&x, &y);
        let _ = fs::remove_dir(&y);
    }
}

#[test]
fn kill9_of_the_mount_process_during_mkdir_rename_rmdir_leaves_every_directory_readable() {
    if !fuse_available() {
        return;
    }
    let rounds: u64 = std::env::var("KMS_NAMES_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let d = TestDaemon::start_with_mount();
    let mnt = d.mnt();
    for t in 0..2 {
        fs::create_dir(mnt.join(format!("w{t}"))).unwrap();
    }
    let start = Instant::now();
    let mut seed = u64::from(std::process::id()) | 1;
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let (mnt, stop) = (mnt.clone(), stop.clone());
                std::thread::spawn(move || churn(mnt, t, stop))
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(100 + seed % 400));
        let victim = d.mount_pids()[0];
        nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        wait_for(Duration::from_secs(30), || {
            let pids = d.mount_pids();
            let fresh = !pids.is_empty() && !pids.contains(&victim);
            // The dead mount's entry goes before the new one comes: until
            // then the bare mountpoint would list as empty.
            (fresh && is_mounted(&mnt) && fs::read_dir(&mnt).is_ok_and(|mut d| d.next().is_some())).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: the mount process did not come back:\n{}", d.logs()));
        let ctx = format!("round {round}");
        let seen = check_through_mount(&mnt, &ctx);
        let stored = check_backing(&d.data(), &ctx);
        assert_eq!(
            seen, stored,
            "{ctx}: entries listed through the mount vs encrypted entries stored"
        );
    }
    let logs = d.logs();
    assert!(
        !logs.contains("does not authenticate"),
        "a kill left a name that does not read:\n{logs}"
    );
    println!(
        "{rounds} kills of the mount process in {:?}; every directory readable after each",
        start.elapsed()
    );
}

#[test]
fn names_plain_keeps_names_in_clear_and_a_plain_directory_stays_plain() {
    if !fuse_available() {
        return;
    }
    let mut d = TestDaemon::start_with_mount_names(kms_tests::DaemonOptions::default(), "plain");
    fs::write(d.mnt().join("visible.txt"), b"x").unwrap();
    assert!(
        d.data().join("visible.txt").is_file(),
        "plain names are stored as they are"
    );
    assert!(!d.data().join(names::ROOT_FILE).exists());
    // The same (plain, not empty) directory with names unset (a
    // configuration from before encrypted names) stays plain: its files keep
    // their names. (`names = "encrypted"` refuses it: fuse unit tests.)
    assert!(d.terminate().success());
    let cfg = fs::read_to_string(&d.config).unwrap().replace("names = \"plain\"", "");
    fs::write(&d.config, cfg).unwrap();
    d.restart();
    let mnt = d.mnt();
    wait_for(Duration::from_secs(20), || {
        (is_mounted(&mnt) && fs::read_dir(&mnt).is_ok()).then_some(())
    })
    .expect("remounted");
    assert_eq!(fs::read(mnt.join("visible.txt")).unwrap(), b"x");
    fs::write(mnt.join("second.txt"), b"y").unwrap();
    assert!(d.data().join("second.txt").is_file());
    assert!(d.logs().contains("names stay plain"), "{}", d.logs());
}

#[test]
fn a_backing_filesystem_with_short_names_moves_the_long_form_threshold_and_too_short_ones_are_refused() {
    if !fuse_available() {
        return;
    }
    // Names of at most 100 bytes: the short form holds 59 (75 - 16).
    let data = kms_tests::lazyfs::LazyFs::in_temp_with_name_max(100).expect("harness");
    let opts = kms_tests::DaemonOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    };
    let d = TestDaemon::start_with_mount_opts(opts);
    let mnt = d.mnt();
    assert_eq!(
        nix::sys::statvfs::statvfs(&mnt).unwrap().name_max(),
        255,
        "the mount takes every name up to 255 bytes"
    );
    let made: Vec<String> = [1usize, 59, 60, 176, 254]
        .iter()
        .map(|&n| "n".repeat(n))
        .chain([long_name("u")])
        .collect();
    for (i, n) in made.iter().enumerate() {
        fs::write(mnt.join(n), i.to_string()).unwrap();
    }
    fs::rename(mnt.join(&made[1]), mnt.join("s".repeat(60))).unwrap();
    fs::rename(mnt.join("s".repeat(60)), mnt.join(&made[1])).unwrap();
    fs::create_dir(mnt.join(&made[2]).with_extension("d")).unwrap();
    let mut listed: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want = made.clone();
    want.push(format!("{}.d", made[2]));
    want.sort();
    assert_eq!(listed, want);
    for (i, n) in made.iter().enumerate() {
        assert_eq!(fs::read_to_string(mnt.join(n)).unwrap(), i.to_string());
    }
    // In the backing directory: no name over 100 bytes; names of 60 bytes
    // and more took the long form.
    let backing: Vec<OsString> = fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(backing.iter().all(|n| n.len() <= 100), "{backing:?}");
    let parts = backing
        .iter()
        .filter(|n| n.as_bytes().ends_with(names::LONG_SUFFIX.as_bytes()))
        .count();
    assert_eq!(parts, 5, "60, 176, 254, 255 and the 62-byte directory: {backing:?}");
    drop(d);

    // Names of at most 54 bytes cannot hold the long form: refused.
    let tiny = kms_tests::lazyfs::LazyFs::in_temp_with_name_max(54).expect("harness");
    let mut d = TestDaemon::start();
    d.client()
        .create_key(kms_client::proto::CreateKey {
            name: Some("fs".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(d.terminate().success());
    let mount = format!(
        "\n[[mount]]\nsource = {:?}\ntarget = {:?}\nkey = \"fs\"\nnames = \"encrypted\"\n",
        tiny.path(),
        d.mnt()
    );
    fs::OpenOptions::new()
        .append(true)
        .open(&d.config)
        .and_then(|mut f| std::io::Write::write_all(&mut f, mount.as_bytes()))
        .unwrap();
    fs::create_dir_all(d.mnt()).unwrap();
    assert!(!d.command().status().unwrap().success(), "kmsd started with the mount");
    assert!(
        d.logs()
            .contains("the backing filesystem allows names of at most 54 bytes; encrypted names need at least 55"),
        "{}",
        d.logs()
    );
    assert_eq!(fs::read_dir(tiny.path()).unwrap().count(), 0, "nothing written");
}
