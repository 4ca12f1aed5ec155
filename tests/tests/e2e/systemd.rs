//! systemd integration: the shipped units verify, and kmsd speaks the
//! `sd_notify` protocol in the right order.

use std::path::{Path, PathBuf};
use std::process::Command;

use kms_tests::{bin, stderr};

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
