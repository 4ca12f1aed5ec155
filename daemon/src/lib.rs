//! kmsd: a local key-management sidecar.
//!
//! [`keys`] holds the key service; the rest of the crate puts it on a Unix
//! socket and schedules its rotations. [`mount`] is the mount process
//! (`kmsd mount`), a client of kmsd that serves one encrypted filesystem;
//! [`children`] starts mount processes outside systemd and [`mounts`]
//! relays to them.

pub mod app;
pub mod audit;
pub mod changes;
pub mod children;
pub mod config;
pub mod harden;
pub mod keys;
pub mod kubernetes;
pub mod leader;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod mounts;
pub mod notify;
pub mod observe;
pub mod ops;
pub mod replication;
pub mod restore;
pub mod scheduler;
pub mod server;

/// Helpers for unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::os::unix::fs::PermissionsExt;

    /// Asserts that no error in `e`'s chain repeats the text of its source,
    /// so that rendering the chain (`error_chain`, `{:#}`) states each
    /// cause once.
    pub fn assert_states_cause_once(e: &(dyn std::error::Error + 'static)) {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(src) = err.source() {
                let (text, cause) = (err.to_string(), src.to_string());
                assert!(!text.contains(&cause), "{text:?} repeats its source {cause:?}");
            }
            cur = err.source();
        }
    }

    /// A temporary directory only its owner may enter (mode 0700), as the
    /// key store requires.
    pub fn private_dir() -> std::io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
    }
}
