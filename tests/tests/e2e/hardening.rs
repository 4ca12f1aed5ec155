//! Key material out of core dumps and swap (issue 12, item 5): the real
//! daemon, as root and as an unprivileged uid, seen through /proc.

use kms_tests::{DaemonOptions, TestDaemon};

fn status_field(pid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn core_limit(pid: i32) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = s.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    line.split_whitespace().skip(4).take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn core_dumps_are_off_and_memory_is_locked_when_allowed() {
    // As root (CAP_IPC_LOCK): everything is locked.
    let d = TestDaemon::start();
    let pid = d.pid().as_raw();
    assert_eq!(core_limit(pid), "0 0", "RLIMIT_CORE soft and hard");
    let locked: u64 = status_field(pid, "VmLck:")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    assert!(locked > 0, "VmLck is 0 kB:\n{}", d.logs());
    assert!(d.logs().contains("memory locked"), "{}", d.logs());

    // As another uid: /proc/PID belongs to root, the mark of a process
    // that is not dumpable (no core, no ptrace or /proc/PID/mem by that
    // uid); with a finite lock limit memory stays unlocked, and says so.
    use std::os::unix::fs::MetadataExt;
    const UID: u32 = 2110;
    let u = TestDaemon::start_with(DaemonOptions {
        run_as: Some(UID),
        ..DaemonOptions::default()
    });
    let pid = u.pid().as_raw();
    let owner = std::fs::metadata(format!("/proc/{pid}/status")).unwrap().uid();
    assert_eq!(owner, 0, "a dumpable process's /proc files belong to its uid ({UID})");
    assert_eq!(core_limit(pid), "0 0");
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        .unwrap()
        .0;
    if limit != nix::sys::resource::RLIM_INFINITY {
        assert!(u.logs().contains("memory not locked"), "{}", u.logs());
        assert_eq!(status_field(pid, "VmLck:"), "0 kB");
    }
}

/// `kmsctl` as `uid` with the supplementary groups `groups`.
fn kmsctl_with_groups(d: &TestDaemon, uid: u32, groups: &[u32], args: &[&str]) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = std::process::Command::new(kms_tests::bin("kmsctl"));
    cmd.arg("--socket").arg(&d.socket).args(args).env_remove("KMSD_SOCKET");
    // SAFETY: runs in the child between fork and exec and only calls
    // setgroups, setgid and setuid (async-signal-safe), in the order that
    // keeps the right to call the next, on values the closure owns. (std's
    // own uid switch runs first and would drop the right to setgroups.)
    unsafe {
        cmd.pre_exec(move || {
            let ok =
                libc::setgroups(groups.len(), groups.as_ptr()) == 0 && libc::setgid(uid) == 0 && libc::setuid(uid) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.output().unwrap()
}

/// Supplementary groups come from the connection (`SO_PEERGROUPS`): a
/// global admin named by group is one exactly when the connecting process
/// is in that group.
#[test]
fn supplementary_groups_come_from_the_connection() {
    const OWNER: u32 = 2120;
    const MEMBER: u32 = 2121;
    const ADMINS: u32 = 2129;
    let mut opts = DaemonOptions::default();
    opts.env.push(("KMSD_ACCESS__ADMINS".into(), format!("gid:{ADMINS}")));
    let d = TestDaemon::start_with(opts);
    let out = kms_tests::kmsctl_as(&d, OWNER, &["key", "create", "--name", "app"], b"");
    assert!(out.status.success(), "{}", kms_tests::stderr(&out));
    let with = kmsctl_with_groups(&d, MEMBER, &[ADMINS], &["key", "disable", "app"]);
    assert!(
        with.status.success(),
        "a member of gid {ADMINS} administers: {}",
        kms_tests::stderr(&with)
    );
    let without = kmsctl_with_groups(&d, MEMBER, &[], &["key", "enable", "app"]);
    assert!(!without.status.success());
    assert!(
        kms_tests::stderr(&without).contains("permission-denied"),
        "{}",
        kms_tests::stderr(&without)
    );
}
