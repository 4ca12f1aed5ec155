//! The mount process's admin socket: `Status`, `fs versions`, `fs rewrap`
//! (with progress) and `fs-stats` for its one filesystem, in kmsd's own
//! protocol, for kmsd to relay. Access decisions are kmsd's (it checks the
//! caller against the key's policy before relaying); this socket admits
//! only kmsd's user, root and its own uid, and is mode 0600 besides.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::blocking::{read_frame, write_frame};
use kms_client::proto::codec::{decode_body, encode_body, Decoded};
use kms_client::proto::{
    ErrorCode, ErrorReply, Frame, FsStatsInfo, MountInfo, Request, Response, StatusInfo, DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
};
use kms_fuse::{FsStats, KeySource};

/// The system user kmsd runs as under systemd (`systemd/kmsd.sysusers`).
pub const KMSD_USER: &str = "kmsd";

/// How long a peer may take to send the rest of a frame.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once, one thread each; more are closed at once.
/// Only root, kmsd's user and this process's uid are admitted, but when
/// the socket could not be handed to kmsd's user it is mode 0666, and any
/// user could otherwise hold a thread per connection for `READ_TIMEOUT`.
pub const MAX_CONNECTIONS: usize = 8;

/// What the admin socket serves.
pub struct Admin {
    pub info: MountInfo,
    pub source: PathBuf,
    pub keys: Arc<dyn KeySource>,
    pub stats: Arc<FsStats>,
    pub started: Instant,
    /// Peers admitted besides root and this process's uid.
    pub kmsd_uid: Option<u32>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The uid of the user `kmsd`, when it exists.
pub fn kmsd_uid() -> Option<u32> {
    nix::unistd::User::from_name(KMSD_USER)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// The admin socket at `path`: a stale one left by a killed process is
/// replaced; mode 0600, handed to `owner` when given (kmsd's user), or
/// mode 0666 when it cannot be handed over (no `CAP_CHOWN`).
///
/// # Errors
/// The folder or socket cannot be made.
pub fn bind(path: &Path, owner: Option<u32>) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        // 0755 whatever the umask (the unit's is 0077): kmsd, another user,
        // must reach the sockets in it.
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another mount process serves this name", path.display()),
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(uid) = owner.filter(|&u| u != nix::unistd::geteuid().as_raw()) {
        if let Err(e) = nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), None) {
            // Without CAP_CHOWN: let kmsd's user in through the mode; the
            // peer check in `admitted` still turns everyone else away.
            tracing::warn!(error = %e, path = %path.display(), "cannot hand the admin socket to kmsd's user; mode 0666, peers checked by uid");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        }
    }
    Ok(listener)
}

/// Accepts connections until the process ends, one thread each, at most
/// [`MAX_CONNECTIONS`] at once; peers other than root, kmsd's user and this
/// process's uid are closed before any thread starts.
pub fn serve(listener: UnixListener, admin: Arc<Admin>) {
    let live = Arc::new(AtomicUsize::new(0));
    let warned = AtomicBool::new(false);
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let Some(uid) = admitted(&s, &admin) else {
                    // Once at warn: any user may connect when the socket is 0666.
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!("admin connection from a uid other than kmsd's or root refused (further ones at debug level)");
                    } else {
                        tracing::debug!("admin connection from a uid other than kmsd's or root refused");
                    }
                    continue;
                };
                if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    live.fetch_sub(1, Ordering::SeqCst);
                    tracing::debug!(uid, "admin connection closed: {MAX_CONNECTIONS} are being served");
                    continue;
                }
                let (admin, live) = (admin.clone(), live.clone());
                let spawned = std::thread::Builder::new().name("admin".into()).spawn(move || {
                    connection(s, uid, &admin);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start an admin connection thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn admitted(stream: &UnixStream, admin: &Admin) -> Option<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    let uid = cred.uid();
    let me = nix::unistd::geteuid().as_raw();
    (uid == 0 || uid == me || Some(uid) == admin.kmsd_uid).then_some(uid)
}

fn connection(mut stream: UnixStream, uid: u32, admin: &Admin) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    if let Err(e) = session(&mut stream, admin) {
        tracing::debug!(uid, error = %e, "admin connection ended");
    }
}

fn send(stream: &mut UnixStream, id: u64, body: Response) -> Result<(), kms_client::ClientError> {
    let bytes = encode_body(&Frame { id, body })?;
    write_frame(stream, &bytes, DEFAULT_MAX_FRAME)
}

fn session(stream: &mut UnixStream, admin: &Admin) -> Result<(), kms_client::ClientError> {
    let mut greeted = false;
    loop {
        let body = match read_frame(stream, DEFAULT_MAX_FRAME) {
            Err(kms_client::ClientError::Closed { .. }) => return Ok(()),
            other => other?,
        };
        let Frame { id, body } = match decode_body::<Request>(&body) {
            Decoded::Frame(f) => f,
            Decoded::Malformed { id, reason } => {
                send(
                    stream,
                    id,
                    error(ErrorCode::Malformed, format!("request does not decode: {reason}")),
                )?;
                continue;
            }
        };
        let reply = match body {
            Request::Hello { protocol, .. } if protocol == PROTOCOL_VERSION => {
                greeted = true;
                Response::Hello {
                    server: server_name(),
                    protocol: PROTOCOL_VERSION,
                    zone: String::new(),
                }
            }
            _ if !greeted => error(ErrorCode::Malformed, "the first request must be Hello"),
            Request::FsRewrap { .. } => rewrap(stream, id, admin)?,
            other => answer(admin, other),
        };
        send(stream, id, reply)?;
    }
}

fn server_name() -> String {
    format!("kmsd-mount/{}", env!("CARGO_PKG_VERSION"))
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}

fn fs_error(e: &kms_fuse::Error) -> Response {
    error(ErrorCode::Unavailable, kms_fuse::fs::describe(e))
}

/// Every request but `Hello` and `fs rewrap`.
fn answer(admin: &Admin, req: Request) -> Response {
    match req {
        Request::Status => Response::Status(StatusInfo {
            server: server_name(),
            zone: String::new(),
            uptime_secs: admin.started.elapsed().as_secs(),
            keys: 0,
            connections: 0,
            mounts: vec![admin.info.clone()],
        }),
        Request::FsVersions { .. } => match kms_fuse::admin::versions(&admin.source, admin.keys.as_ref()) {
            Ok(v) => Response::FsVersions(v),
            Err(e) => fs_error(&e),
        },
        Request::FsStats => Response::FsStats(vec![stats_info(&admin.info.target, &admin.stats)]),
        other => error(
            ErrorCode::Unavailable,
            format!(
                "{} is not served here: this is a mount process's admin socket (status, fs versions, fs rewrap, \
                 fs stats); ask kmsd",
                other.op()
            ),
        ),
    }
}

/// `fs rewrap`, with a `Progress` frame at most five times a second.
fn rewrap(stream: &mut UnixStream, id: u64, admin: &Admin) -> Result<Response, kms_client::ClientError> {
    let mut out = stream.try_clone()?;
    let mut last: Option<Instant> = None;
    let mut failed = None;
    let walked = kms_fuse::admin::rewrap(&admin.source, admin.keys.as_ref(), |done, total| {
        if failed.is_none() && (done == total || last.is_none_or(|t| t.elapsed() >= Duration::from_millis(200))) {
            last = Some(Instant::now());
            if let Err(e) = send(&mut out, id, Response::Progress { done, total }) {
                failed = Some(e);
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(match walked {
        Ok(r) => Response::FsRewrap(r),
        Err(e) => fs_error(&e),
    })
}

/// The counters of the filesystem at `target`.
pub fn stats_info(target: &str, stats: &FsStats) -> FsStatsInfo {
    let s = stats.snapshot();
    FsStatsInfo {
        mount: target.to_string(),
        ops: s.ops.iter().map(|(op, n)| ((*op).to_string(), *n)).collect(),
        dek_cache_hits: s.dek_cache_hits,
        dek_cache_misses: s.dek_cache_misses,
        tamper_detections: s.tamper_detections,
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Idle connections hold at most `MAX_CONNECTIONS` threads; one more is
    /// closed at once, and a slot freed by a peer that leaves is reused.
    #[test]
    fn connections_beyond_the_cap_are_closed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let listener = bind(&path, None).unwrap();
        let admin = Arc::new(Admin {
            info: MountInfo {
                source: "s".into(),
                target: "t".into(),
                key: "k".into(),
            },
            source: dir.path().to_path_buf(),
            keys: Arc::new(kms_fuse::MemoryKeySource::default()),
            stats: Arc::default(),
            started: Instant::now(),
            kmsd_uid: None,
        });
        std::thread::spawn(move || serve(listener, admin));
        let open = || {
            let s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            s
        };
        // Served: a read waits for an answer that does not come.
        let served = |s: &mut UnixStream| {
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                other => panic!("{other:?}"),
            }
        };
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| open()).collect();
        for s in &mut held {
            assert!(served(s));
        }
        let mut extra = open();
        assert!(!served(&mut extra), "connection {} is closed", MAX_CONNECTIONS + 1);
        held.pop();
        let again = wait_for(|| {
            let mut s = open();
            served(&mut s).then_some(s)
        });
        assert!(again.is_some(), "a freed slot is served again");
    }

    fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Some(v) = f() {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}
