//! The scheduler in the real daemon, with its wall clock moved by
//! libfaketime (Debian package `faketime`): rotations and deletions that fell
//! due while kmsd was down happen once at start-up, and a change that makes
//! work due is picked up at once.

use std::time::Duration;

use kms_client::proto::{CreateKey, ErrorCode, KeyState, Origin};
use kms_tests::{wait_for, TestDaemon};

pub(crate) const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Restarts `d` with its clock `days` ahead of the real one.
pub(crate) fn restart_days_ahead(d: &mut TestDaemon, days: u32) {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "install the Debian package faketime"
    );
    d.opts.env = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), format!("+{days}d")),
    ];
    d.restart();
}

#[test]
fn missed_rotations_and_deletions_happen_once_at_start_up() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    let daily = CreateKey {
        name: Some("daily".into()),
        rotation: Some(Some(1)),
        ..Default::default()
    };
    c.create_key(daily).unwrap();
    c.create_key(CreateKey {
        name: Some("doomed".into()),
        ..Default::default()
    })
    .unwrap();
    c.schedule_deletion("doomed", Some(7)).unwrap();
    c.create_key(CreateKey {
        name: Some("manual-only".into()),
        rotation: Some(None),
        ..Default::default()
    })
    .unwrap();
    drop(c);
    assert!(d.terminate().success());

    // Down for 5 days: one rotation, not five; deletion not yet due.
    restart_days_ahead(&mut d, 5);
    let mut c = d.client();
    let info = wait_for(Duration::from_secs(10), || {
        c.describe_key("daily").ok().filter(|k| k.active_version == 2)
    })
    .expect("daily rotated at start-up");
    assert_eq!(info.versions[1].origin, Origin::Automatic);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.describe_key("daily").unwrap().active_version,
        2,
        "missed periods rotate once"
    );
    assert!(matches!(
        c.describe_key("doomed").unwrap().state,
        KeyState::PendingDeletion { .. }
    ));
    assert_eq!(c.describe_key("manual-only").unwrap().active_version, 1);
    drop(c);
    assert!(d.terminate().success());

    // Down until day 10: the deletion is due and happens.
    restart_days_ahead(&mut d, 10);
    let mut c = d.client();
    let gone = wait_for(Duration::from_secs(10), || {
        (c.describe_key("doomed").err()?.code() == Some(ErrorCode::NotFound)).then_some(())
    });
    assert!(gone.is_some(), "doomed deleted after its waiting period");
    // The rotation due at start-up may land after the deletion is seen.
    let daily = wait_for(Duration::from_secs(10), || {
        c.describe_key("daily").ok().filter(|k| k.active_version >= 3)
    })
    .expect("daily rotated again after day 5");
    assert_eq!(daily.active_version, 3, "missed periods rotate once");
}

#[test]
fn enabling_an_overdue_key_rotates_it_at_once() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    c.create_key(CreateKey {
        name: Some("k".into()),
        rotation: Some(Some(1)),
        ..Default::default()
    })
    .unwrap();
    c.disable_key("k").unwrap();
    drop(c);
    assert!(d.terminate().success());
    restart_days_ahead(&mut d, 3);
    let mut c = d.client();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.describe_key("k").unwrap().active_version,
        1,
        "disabled keys do not rotate"
    );
    c.enable_key("k").unwrap();
    let rotated = wait_for(Duration::from_secs(10), || {
        c.describe_key("k").ok().filter(|k| k.active_version == 2)
    });
    assert!(rotated.is_some(), "the scheduler re-planned after the key was enabled");
}
