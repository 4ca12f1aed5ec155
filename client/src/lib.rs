//! kms-client: the kmsd wire protocol ([`proto`]) and clients for it: an
//! async, pipelined [`Client`] and a one-request-at-a-time
//! [`BlockingClient`], both with the same typed methods.
#![forbid(unsafe_code)]

pub mod aead;
pub mod audit;
pub mod backup;
pub mod blob;
pub mod blocking;
pub mod client;
pub mod error;
mod ops;
pub mod proto;

pub use blocking::BlockingClient;
pub use client::Client;
pub use error::ClientError;
pub use ops::{ClientOptions, GeneratedDataKey, ServerInfo, UnwrapItem};

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "KMSD_SOCKET";
/// The socket of `kmsd --dev` started in the current directory.
pub const DEV_SOCKET: &str = "kmsd-dev/kmsd.sock";
/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/kmsd/kmsd.sock";

/// The socket to use when none was given explicitly: `$KMSD_SOCKET` if set
/// and non-empty, else `./kmsd-dev/kmsd.sock` if it exists, else
/// `/run/kmsd/kmsd.sock`.
pub fn default_socket_path() -> PathBuf {
    discover_socket(std::env::var_os(SOCKET_ENV), |p| p.exists())
}

/// [`default_socket_path`] with its inputs passed in, for testing.
fn discover_socket(env: Option<OsString>, exists: impl Fn(&Path) -> bool) -> PathBuf {
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let dev = Path::new(".").join(DEV_SOCKET);
    if exists(&dev) {
        return dev;
    }
    PathBuf::from(SYSTEM_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_wins_over_everything() {
        let path = discover_socket(Some("/tmp/k.sock".into()), |_| true);
        assert_eq!(path, Path::new("/tmp/k.sock"));
    }

    #[test]
    fn dev_socket_is_used_when_present() {
        let path = discover_socket(None, |p| p.ends_with(DEV_SOCKET));
        assert_eq!(path, Path::new("./kmsd-dev/kmsd.sock"));
        let empty_env = discover_socket(Some("".into()), |p| p.ends_with(DEV_SOCKET));
        assert_eq!(empty_env, path);
    }

    #[test]
    fn system_socket_is_the_fallback() {
        assert_eq!(discover_socket(None, |_| false), Path::new(SYSTEM_SOCKET));
    }
}
