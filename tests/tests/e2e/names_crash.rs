//! Encrypted names at named crash points (kms-fuse's `fault` module, in
//! the kmsd the harness builds with `test-faults`): every step of mkdir,
//! create, link, symlink, unlink, rmdir and rename of short and long names
//! kills the mount process in turn; after kmsd restarts it, every directory
//! must read, no name may be listed twice or fail to decrypt, and the
//! operation's names must be wholly old or wholly new. Then the directory-id
//! cache after a failed undo and during a racing repair, and the tamper
//! log's rate limit under a flood. Needs /dev/fuse and root; fails instead
//! of skipping when `CI` is set.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_fuse::names::{self, Kind};
use kms_tests::{fuse_available, is_mounted, wait_for, DaemonOptions, TestDaemon};

use crate::names::{check_backing, check_through_mount, long_name};

/// A daemon whose mount process reads its armed fault points from the
/// returned file.
pub(crate) fn daemon_with_faults() -> (TestDaemon, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faults");
    let opts = DaemonOptions {
        env: vec![("KMSDTEST_FAULT_POINTS".into(), file.display().to_string())],
        ..DaemonOptions::default()
    };
    (TestDaemon::start_with_mount_opts(opts), file, dir)
}

/// Waits until kmsd has started a mount process other than `victim` and
/// its mount lists the root.
pub(crate) fn wait_remounted(d: &TestDaemon, victim: nix::unistd::Pid, ctx: &str) {
    let mnt = d.mnt();
    wait_for(Duration::from_secs(30), || {
        let pids = d.mount_pids();
        let fresh = !pids.is_empty() && !pids.contains(&victim);
        (fresh && is_mounted(&mnt) && fs::read_dir(&mnt).is_ok_and(|mut d| d.next().is_some())).then_some(())
    })
    .unwrap_or_else(|| panic!("{ctx}: the mount process did not come back:\n{}", d.logs()));
}

/// SIGKILLs the mount process (its caches go with it) and waits for the
/// next one.
fn restart_mount(d: &TestDaemon, ctx: &str) {
    let victim = d.mount_pids()[0];
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_remounted(d, victim, ctx);
}

/// Every directory under the mount lists each name once.
fn no_name_twice(mnt: &Path, ctx: &str) {
    let mut stack = vec![mnt.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut seen = HashSet::new();
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            assert!(
                seen.insert(e.file_name()),
                "{ctx}: {:?} listed twice in {}",
                e.file_name(),
                dir.display()
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// Long-name parts in the backing tree whose entry is gone (allowed: they
/// are never listed, and go with their directory).
fn orphan_parts(root: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if let Some(entry) = name.as_bytes().strip_suffix(names::LONG_SUFFIX.as_bytes()) {
                let entry = std::ffi::OsStr::from_bytes(entry);
                if matches!(names::classify(entry), Kind::Long(_)) && !dir.join(entry).exists() {
                    count += 1;
                }
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    count
}

/// What is at `p` through the mount, for "wholly old or wholly new".
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Absent,
    File(Vec<u8>),
    Link(PathBuf),
    Dir(Vec<OsString>),
    Fifo,
}

fn seen(p: &Path) -> Seen {
    let Ok(md) = fs::symlink_metadata(p) else {
        return Seen::Absent;
    };
    if md.is_symlink() {
        Seen::Link(fs::read_link(p).unwrap())
    } else if std::os::unix::fs::FileTypeExt::is_fifo(&md.file_type()) {
        Seen::Fifo
    } else if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        Seen::Dir(names)
    } else {
        // A kill inside create leaves a file shorter than a header: it
        // reads EIO (FORMAT.md, "Crash behaviour"), shown as empty here.
        Seen::File(fs::read(p).unwrap_or_default())
    }
}

/// One operation and the states its names may be in after a kill.
struct Case {
    what: &'static str,
    points: &'static [&'static str],
    /// Makes the starting state under the case's directory.
    prepare: fn(&Path),
    /// The operation (its result is ignored: the kill fails it).
    op: fn(&Path) -> std::io::Result<()>,
    /// The names the operation touches, relative to the case's directory.
    names: fn() -> Vec<String>,
    /// Their states before and after the operation.
    old: fn() -> Vec<Seen>,
    new: fn() -> Vec<Seen>,
}

fn l(tag: &str) -> String {
    long_name(tag)
}

fn file(b: &[u8]) -> Seen {
    Seen::File(b.to_vec())
}

fn empty_dir() -> Seen {
    Seen::Dir(Vec::new())
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            what: "mkdir of a short name",
            points: &["mkdir.after-entry", "dirid.before-rename", "mkdir.after-id"],
            prepare: |_| {},
            op: |c| fs::create_dir(c.join("d")),
            names: || vec!["d".into()],
            old: || vec![Seen::Absent],
            new: || vec![empty_dir()],
        },
        Case {
            what: "mkdir of a long name",
            points: &[
                "part.before-rename",
                "mkdir.after-part",
                "mkdir.after-entry",
                "dirid.before-rename",
                "mkdir.after-id",
            ],
            prepare: |_| {},
            op: |c| fs::create_dir(c.join(l("D"))),
            names: || vec![l("D")],
            old: || vec![Seen::Absent],
            new: || vec![empty_dir()],
        },
        Case {
            what: "create of a long name",
            points: &["part.before-rename", "create.after-part", "create.after-entry"],
            prepare: |_| {},
            op: |c| fs::write(c.join(l("F")), b""),
            names: || vec![l("F")],
            old: || vec![Seen::Absent],
            new: || vec![file(b"")],
        },
        Case {
            what: "link to a long name",
            points: &["part.before-rename", "link.after-part"],
            prepare: |c| fs::write(c.join("a"), b"A").unwrap(),
            op: |c| fs::hard_link(c.join("a"), c.join(l("H"))),
            names: || vec!["a".into(), l("H")],
            old: || vec![file(b"A"), Seen::Absent],
            new: || vec![file(b"A"), file(b"A")],
        },
        Case {
            what: "symlink with a long name",
            points: &["part.before-rename", "symlink.after-part"],
            prepare: |_| {},
            op: |c| symlink("target/of/link", c.join(l("S"))),
            names: || vec![l("S")],
            old: || vec![Seen::Absent],
            new: || vec![Seen::Link("target/of/link".into())],
        },
        Case {
            what: "mknod of a fifo with a long name",
            points: &["part.before-rename", "mknod.after-part"],
            prepare: |_| {},
            op: |c| {
                let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
                nix::unistd::mkfifo(&c.join(l("P")), mode).map_err(std::io::Error::from)
            },
            names: || vec![l("P")],
            old: || vec![Seen::Absent],
            new: || vec![Seen::Fifo],
        },
        Case {
            what: "unlink of a long name",
            points: &["unlink.after-entry"],
            prepare: |c| fs::write(c.join(l("U")), b"U").unwrap(),
            op: |c| fs::remove_file(c.join(l("U"))),
            names: || vec![l("U")],
            old: || vec![file(b"U")],
            new: || vec![Seen::Absent],
        },
        Case {
            what: "rmdir of a short name",
            points: &["clear.before-id", "rmdir.after-clear"],
            prepare: |c| fs::create_dir(c.join("r")).unwrap(),
            op: |c| fs::remove_dir(c.join("r")),
            names: || vec!["r".into()],
            old: || vec![empty_dir()],
            new: || vec![Seen::Absent],
        },
        Case {
            what: "rmdir of a long name",
            points: &["clear.before-id", "rmdir.after-clear", "rmdir.after-entry"],
            prepare: |c| fs::create_dir(c.join(l("R"))).unwrap(),
            op: |c| fs::remove_dir(c.join(l("R"))),
            names: || vec![l("R")],
            old: || vec![empty_dir()],
            new: || vec![Seen::Absent],
        },
        Case {
            what: "rename short to long",
            points: &["part.before-rename", "rename.after-part", "rename.before-entry"],
            prepare: |c| fs::write(c.join("a"), b"A").unwrap(),
            op: |c| fs::rename(c.join("a"), c.join(l("to"))),
            names: || vec!["a".into(), l("to")],
            old: || vec![file(b"A"), Seen::Absent],
            new: || vec![Seen::Absent, file(b"A")],
        },
        Case {
            what: "rename long to short",
            points: &["rename.before-entry", "rename.after-entry"],
            prepare: |c| fs::write(c.join(l("from")), b"B").unwrap(),
            op: |c| fs::rename(c.join(l("from")), c.join("b")),
            names: || vec![l("from"), "b".into()],
            old: || vec![file(b"B"), Seen::Absent],
            new: || vec![Seen::Absent, file(b"B")],
        },
        Case {
            what: "rename long to long over a file, across directories",
            points: &[
                "part.before-rename",
                "rename.after-part",
                "rename.before-entry",
                "rename.after-entry",
            ],
            prepare: |c| {
                fs::create_dir(c.join("x")).unwrap();
                fs::create_dir(c.join("y")).unwrap();
                fs::write(c.join("x").join(l("1")), b"one").unwrap();
                fs::write(c.join("y").join(l("2")), b"two").unwrap();
            },
            op: |c| fs::rename(c.join("x").join(l("1")), c.join("y").join(l("2"))),
            names: || vec![format!("x/{}", l("1")), format!("y/{}", l("2"))],
            old: || vec![file(b"one"), file(b"two")],
            new: || vec![Seen::Absent, file(b"one")],
        },
        Case {
            what: "rename of a directory short to long, across directories",
            points: &["part.before-rename", "rename.after-part", "rename.before-entry"],
            prepare: |c| {
                fs::create_dir_all(c.join("x/d")).unwrap();
                fs::create_dir(c.join("y")).unwrap();
                fs::write(c.join("x/d/in"), b"in").unwrap();
            },
            op: |c| fs::rename(c.join("x/d"), c.join("y").join(l("dir"))),
            names: || vec!["x/d".into(), format!("y/{}", l("dir"))],
            old: || vec![Seen::Dir(vec!["in".into()]), Seen::Absent],
            new: || vec![Seen::Absent, Seen::Dir(vec!["in".into()])],
        },
        Case {
            what: "rename of a long directory over an empty one",
            points: &["clear.before-id", "rename.after-clear", "rename.after-entry"],
            prepare: |c| {
                fs::create_dir(c.join(l("full"))).unwrap();
                fs::write(c.join(l("full")).join("in"), b"in").unwrap();
                fs::create_dir(c.join("empty")).unwrap();
            },
            op: |c| fs::rename(c.join(l("full")), c.join("empty")),
            names: || vec![l("full"), "empty".into()],
            old: || vec![Seen::Dir(vec!["in".into()]), empty_dir()],
            new: || vec![Seen::Absent, Seen::Dir(vec!["in".into()])],
        },
    ]
}

#[test]
fn a_kill_at_every_step_of_every_name_operation_leaves_old_or_new_and_every_directory_readable() {
    if !fuse_available() {
        return;
    }
    let (d, faults, _keep) = daemon_with_faults();
    let mnt = d.mnt();
    let mut runs = 0;
    for (i, case) in cases().iter().enumerate() {
        for (j, point) in case.points.iter().enumerate() {
            let ctx = format!("{} at {point}", case.what);
            let dir = mnt.join(format!("c{i}-{j}"));
            fs::create_dir(&dir).unwrap();
            (case.prepare)(&dir);
            let names: Vec<PathBuf> = (case.names)().iter().map(|n| dir.join(n)).collect();
            assert_eq!(
                names.iter().map(|p| seen(p)).collect::<Vec<_>>(),
                (case.old)(),
                "{ctx}: before"
            );
            let victim = d.mount_pids()[0];
            fs::write(&faults, format!("kill:{point}\n")).unwrap();
            let _ = (case.op)(&dir);
            assert_eq!(
                fs::read_to_string(&faults).unwrap(),
                "",
                "{ctx}: the operation never reached the point"
            );
            wait_remounted(&d, victim, &ctx);
            let after: Vec<_> = names.iter().map(|p| seen(p)).collect();
            assert!(
                after == (case.old)() || after == (case.new)(),
                "{ctx}: neither wholly old nor wholly new: {after:?}"
            );
            no_name_twice(&mnt, &ctx);
            let listed = check_through_mount(&mnt, &ctx);
            let stored = check_backing(&d.data(), &ctx);
            assert_eq!(listed, stored, "{ctx}: entries listed vs encrypted entries stored");
            runs += 1;
        }
    }
    let logs = d.logs();
    assert!(
        !logs.contains("does not authenticate"),
        "a kill left a name that does not read:\n{logs}"
    );
    println!(
        "{runs} kills at named points; {} orphan long-name parts left (never listed)",
        orphan_parts(&d.data())
    );
}

#[test]
fn a_kill_while_the_name_key_file_is_made_leaves_a_backing_directory_that_mounts() {
    if !fuse_available() {
        return;
    }
    for point in ["root.before-rename", "root.before-dir-fsync"] {
        // The daemon with its key, stopped; its mount configured next.
        let (d, faults, _keep) = daemon_with_faults();
        let mut d = d;
        fs::write(d.mnt().join("kept"), b"k").unwrap();
        assert!(d.terminate().success());
        for e in fs::read_dir(d.data()).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                fs::remove_dir_all(p).unwrap();
            } else {
                fs::remove_file(p).unwrap();
            }
        }
        // The first mount process over the emptied directory dies making
        // kmsd.names, so this kmsd does not come up.
        fs::write(&faults, format!("kill:{point}\n")).unwrap();
        let status = d.command().status().unwrap();
        assert!(!status.success(), "{point}: kmsd started although its mount died");
        assert_eq!(fs::read_to_string(&faults).unwrap(), "", "{point}: never reached");
        // The next start mounts it, with a name key that reads.
        d.restart();
        fs::write(d.mnt().join("after"), b"a").unwrap();
        restart_mount(&d, point);
        assert_eq!(fs::read(d.mnt().join("after")).unwrap(), b"a", "{point}");
        assert!(
            !d.logs().contains("cannot use encrypted names"),
            "{point}: {}",
            d.logs()
        );
    }
}

#[test]
fn a_failed_rmdir_whose_undo_fails_leaves_no_stale_directory_id_in_memory() {
    if !fuse_available() {
        return;
    }
    let (d, faults, _keep) = daemon_with_faults();
    let mnt = d.mnt();
    fs::create_dir(mnt.join("d")).unwrap();
    fs::write(mnt.join("d/before"), b"x").unwrap();
    fs::remove_file(mnt.join("d/before")).unwrap();
    // The backing rmdir fails after the id was removed, and so does
    // putting the id back: the directory is left without one.
    fs::write(&faults, "fail:rmdir.after-clear\nfail:dirid.restore.before-rename\n").unwrap();
    let e = fs::remove_dir(mnt.join("d")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(fs::read_to_string(&faults).unwrap(), "", "both points were reached");
    assert!(!crate::backing(&d, "d").join(names::DIR_ID_FILE).exists());
    // A name made now must be under the id the disk will have.
    fs::write(mnt.join("d/after"), b"kept").unwrap();
    restart_mount(&d, "after the failed rmdir");
    assert_eq!(fs::read(mnt.join("d/after")).unwrap(), b"kept", "{}", d.logs());
    assert!(!d.logs().contains("does not authenticate"), "{}", d.logs());
}

#[test]
fn two_repairs_of_one_damaged_directory_id_agree() {
    if !fuse_available() {
        return;
    }
    let (d, faults, _keep) = daemon_with_faults();
    let mnt = d.mnt();
    fs::create_dir(mnt.join("e")).unwrap();
    fs::write(crate::backing(&d, "e").join(names::DIR_ID_FILE), b"torn").unwrap();
    restart_mount(&d, "after damaging the id");
    // The first repair (a listing) stops for 2 s before it replaces the
    // damaged id; meanwhile a create in the directory needs its id too.
    fs::write(&faults, "pause:dirid.repair\n").unwrap();
    let lister = {
        let e = mnt.join("e");
        std::thread::spawn(move || fs::read_dir(e).map(|d| d.count()))
    };
    std::thread::sleep(Duration::from_millis(500));
    fs::write(mnt.join("e/made-meanwhile"), b"F").unwrap();
    assert!(lister.join().unwrap().is_ok());
    assert_eq!(fs::read_to_string(&faults).unwrap(), "", "the repair paused");
    restart_mount(&d, "after the repairs");
    assert_eq!(fs::read(mnt.join("e/made-meanwhile")).unwrap(), b"F", "{}", d.logs());
}

#[test]
fn a_flood_of_tampered_names_cannot_silence_a_later_tamper_warning() {
    if !fuse_available() {
        return;
    }
    let d = TestDaemon::start_with_mount();
    let mnt = d.mnt();
    fs::create_dir(mnt.join("flood")).unwrap();
    fs::create_dir(mnt.join("a")).unwrap();
    fs::write(mnt.join("a/real"), b"r").unwrap();
    // More distinct tampered names than the old 10,000-path budget.
    let flood = crate::backing(&d, "flood");
    for i in 0..10_050 {
        fs::write(flood.join(format!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA{i}")), b"").unwrap();
    }
    assert_eq!(fs::read_dir(mnt.join("flood")).unwrap().count(), 0);
    // Real tampering a little later.
    std::thread::sleep(Duration::from_secs(2));
    let real = crate::backing(&d, "a/real");
    let mut name = real.file_name().unwrap().as_bytes().to_vec();
    name[4] = if name[4] == b'A' { b'B' } else { b'A' };
    let tampered = real.with_file_name(std::ffi::OsStr::from_bytes(&name));
    fs::rename(&real, &tampered).unwrap();
    assert_eq!(fs::read_dir(mnt.join("a")).unwrap().count(), 0);
    let logs = d.logs();
    let shown = tampered.file_name().unwrap().to_str().unwrap();
    assert!(
        logs.lines()
            .any(|l| l.contains(shown) && l.contains("does not authenticate")),
        "the later tampering was not logged:\n{}",
        logs.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(logs.contains("more tamper warnings were suppressed by the rate limit"));
    let flood_lines = logs.lines().filter(|l| l.contains("does not authenticate")).count();
    assert!(flood_lines <= 70, "{flood_lines} tamper lines: not rate limited");
}

/// An rmdir has removed the emptied directory's id file and not yet the
/// directory (held there by the fault point `pause:rmdir.after-clear`):
/// a listing of that directory meanwhile must not give it a new id, which
/// would make the rmdir fail with ENOTEMPTY (review finding).
#[test]
fn a_listing_during_an_rmdir_does_not_make_it_fail() {
    if !fuse_available() {
        return;
    }
    let (d, faults, _dir) = daemon_with_faults();
    let dir = d.mnt().join("going");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    fs::remove_file(dir.join("f")).unwrap();
    fs::write(&faults, "pause:rmdir.after-clear\n").unwrap();
    let victim = dir.clone();
    let rmdir = std::thread::spawn(move || fs::remove_dir(&victim));
    wait_for(Duration::from_secs(10), || {
        fs::read_to_string(&faults).is_ok_and(|s| s.is_empty()).then_some(())
    })
    .expect("the rmdir reached its pause");
    // The listing may fail (the directory is going); it must not repair it.
    let _ = fs::read_dir(&dir).map(Iterator::count);
    let removed = rmdir.join().unwrap();
    assert!(removed.is_ok(), "rmdir: {removed:?}\n{}", d.logs());
    assert!(!dir.exists());
    assert!(
        !d.logs().contains("given a new one"),
        "the directory being removed got a new id:\n{}",
        d.logs()
    );
}
