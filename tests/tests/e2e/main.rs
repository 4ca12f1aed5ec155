//! End-to-end tests: the real `kmsd` and `kmsctl` binaries on temporary
//! sockets. One module per area.

mod acl;
mod audit;
mod backup;
mod claims;
mod cli;
mod crash;
mod disk;
mod etcd;
mod fs;
mod hardening;
mod kubernetes;
mod lifecycle;
mod limits;
mod metrics;
mod names;
mod names_crash;
mod power;
mod privsep;
mod protocol;
mod reload;
mod schedule;
mod soak;
mod systemd;
mod upgrade;
mod workload;
mod zones;

/// The one file a test wrote at the top of an encrypted mount's backing
/// directory `dir`: the only entry with an encrypted name (no `.`).
pub fn only_encrypted_file(dir: &std::path::Path) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().as_encoded_bytes().contains(&b'.'))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.into_iter().next().unwrap()
}

/// The backing path of `rel` (a path under the mount of
/// [`TestDaemon::start_with_mount`]) in its backing directory: names are
/// encrypted there, so this asks kmsd for the name key (as the mount
/// process does) and encrypts each component.
pub fn backing(d: &kms_tests::TestDaemon, rel: &str) -> std::path::PathBuf {
    let timeout = std::time::Duration::from_secs(10);
    let keys = kmsd::mount::keys::ClientKeys::connect(&d.socket, "fs", timeout).expect("connect for the name key");
    kms_fuse::names::backing_path(&d.data(), &keys, std::path::Path::new(rel)).expect("backing path")
}
