//! SIGHUP reloads the configuration: admins take effect; a bad file is
//! refused with a logged reason and the running configuration stays.

use std::time::Duration;

use kms_tests::{kmsctl_as, stderr, wait_for, TestDaemon};
use nix::sys::signal::{kill, Signal};

fn hup(d: &TestDaemon) {
    kill(d.pid(), Signal::SIGHUP).unwrap();
}

fn root_can_describe(d: &TestDaemon) -> bool {
    d.kmsctl(&["key", "describe", "theirs"], b"").status.success()
}

#[test]
fn sighup_applies_admins_and_refuses_a_bad_file() {
    let d = TestDaemon::start();
    let out = kmsctl_as(&d, 65534, &["key", "create", "--name", "theirs"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(root_can_describe(&d), "uid 0 is a global admin at start");

    // Good config without admins: root loses admin rights over their key.
    let original = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, original.replace("admins = [\"uid:0\"]", "admins = []")).unwrap();
    hup(&d);
    let applied = wait_for(Duration::from_secs(10), || (!root_can_describe(&d)).then_some(()));
    assert!(applied.is_some(), "reload applied:\n{}", d.logs());
    let err = stderr(&d.kmsctl(&["key", "describe", "theirs"], b""));
    assert!(err.starts_with("kmsctl: permission-denied"), "{err}");

    // Bad config: refused, logged, and the running one keeps serving.
    std::fs::write(
        &d.config,
        original.replace("admins = [\"uid:0\"]", "admins = [\"root\"]"),
    )
    .unwrap();
    hup(&d);
    let logged = wait_for(Duration::from_secs(10), || {
        d.logs().contains("reload refused").then_some(())
    });
    assert!(logged.is_some(), "{}", d.logs());
    assert!(
        d.logs().contains("access.admins"),
        "the reason names the setting:\n{}",
        d.logs()
    );
    assert!(!root_can_describe(&d), "the last good configuration stays in force");
    d.client().status().unwrap();

    // Fixed again: root is an admin again.
    std::fs::write(&d.config, &original).unwrap();
    hup(&d);
    assert!(wait_for(Duration::from_secs(10), || root_can_describe(&d).then_some(())).is_some());
}

#[test]
fn sighup_moves_turns_on_and_off_the_metrics_endpoint() {
    let d = TestDaemon::start();
    let original = std::fs::read_to_string(&d.config).unwrap();
    assert!(
        original.contains("listen = \"\""),
        "the harness starts with metrics off"
    );
    let set = |listen: &str| {
        std::fs::write(
            &d.config,
            original.replace("listen = \"\"", &format!("listen = \"{listen}\"")),
        )
        .unwrap();
        hup(&d);
    };
    let serves =
        |addr| kms_tests::scrape(addr).is_ok_and(|(code, body)| code == 200 && body.contains("kmsd_build_info"));
    let (a, b) = (kms_tests::free_tcp_addr(), kms_tests::free_tcp_addr());
    set(&a.to_string());
    assert!(
        wait_for(Duration::from_secs(10), || serves(a).then_some(())).is_some(),
        "turned on at {a}"
    );
    set(&b.to_string());
    assert!(
        wait_for(Duration::from_secs(10), || (serves(b) && !serves(a)).then_some(())).is_some(),
        "moved to {b}"
    );
    // A busy address refuses the whole reload; B keeps serving.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    set(&busy.local_addr().unwrap().to_string());
    let refused = wait_for(Duration::from_secs(10), || {
        d.logs()
            .contains("reload refused")
            .then_some(())
            .filter(|()| d.logs().contains("metrics.listen"))
    });
    assert!(refused.is_some(), "{}", d.logs());
    assert!(serves(b), "the running endpoint stays");
    set("");
    assert!(
        wait_for(Duration::from_secs(10), || (!serves(b)).then_some(())).is_some(),
        "turned off"
    );
    d.client().status().unwrap();
}
