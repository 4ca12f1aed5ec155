//! Start-up and shutdown of the whole daemon: resolve the configuration
//! (including `--dev`), open the key store, bind the socket, run the server
//! and the scheduler until a signal, then drain and clean up.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use kms_client::proto::CreateKey;

use crate::audit::AuditLog;
use crate::config::{self, Backend, Config, MountConfig};
use crate::keys::store::{lock_state_dir, EtcdStore};
use crate::keys::{KeyService, RootKey, StoreError, SystemClock};
use crate::mounts::Mounts;
use crate::notify;
use crate::ops::Daemon;
use crate::replication::listener::{self, Limits};
use crate::replication::tls::{PeerTls, TlsFiles};
use crate::replication::transport::{Route, ZoneTransport};
use crate::replication::{tasks, Peer, Replicator, Settings};
use crate::server::{self, Listener};

/// Name of the key that encrypts the `--dev` filesystem.
pub const DEV_KEY: &str = "dev";

/// How long a peer may take to accept a connection or answer a frame.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest pause between attempts to reach etcd at start-up.
const ETCD_RETRY_MAX: Duration = Duration::from_secs(5);

/// How often the STATUS= line is checked for changed counts.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Default `--dev` folder.
pub const DEFAULT_DEV_DIR: &str = "kmsd-dev";

const DEV_CONFIG: &str = r#"# kmsd --dev configuration. Paths for socket, state and root key are set
# by --dev itself (everything lives in this folder); see systemd/kmsd.toml
# in the source tree for every setting.
zone = "dev"
log_level = "info"

[metrics]
# "" turns the Prometheus endpoint off.
listen = "127.0.0.1:9464"
"#;

/// Prepares the `--dev` folder (mode 0700): config file, root key, and the
/// paths under it. The running user becomes a global admin.
///
/// # Errors
/// When the folder, config or root key cannot be created or read.
pub fn dev_config(dir: &Path) -> Result<(Config, PathBuf)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create dev folder {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let cfg_path = dir.join("kmsd.toml");
    if !cfg_path.exists() {
        std::fs::write(&cfg_path, DEV_CONFIG).with_context(|| format!("cannot write {}", cfg_path.display()))?;
    }
    let root_key = dir.join("root-key");
    if !root_key.exists() {
        RootKey::create(&root_key)?;
        tracing::warn!(path = %root_key.display(), "created a new root key for --dev; keep it private, it opens every key");
    }
    let mut env = config::process_env();
    env.insert("KMSD_SOCKET".into(), path_str(&dir.join("kmsd.sock"))?);
    env.insert("KMSD_STATE_DIR".into(), path_str(&dir.join("state"))?);
    env.insert("KMSD_ROOT_KEY".into(), path_str(&root_key)?);
    let mut cfg = Config::load(&cfg_path, env)?;
    let me = format!("uid:{}", nix::unistd::getuid());
    if !cfg.access.admins.contains(&me) {
        cfg.access.admins.push(me);
    }
    Ok((cfg, dir))
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// `$CREDENTIALS_DIRECTORY/NAME`, when systemd passed that credential.
fn credential(name: &str) -> Option<PathBuf> {
    let p = Path::new(&std::env::var_os("CREDENTIALS_DIRECTORY")?).join(name);
    p.exists().then_some(p)
}

/// The root key file: the systemd credential if present, else `root_key`.
///
/// # Errors
/// When neither is available.
pub fn root_key_path(cfg: &Config) -> Result<PathBuf> {
    if let Some(p) = credential("root-key") {
        return Ok(p);
    }
    match &cfg.root_key {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "no root key: set root_key in the config or pass the systemd credential root-key \
             (LoadCredential=root-key:PATH); for a local trial run kmsd --dev"
        ),
    }
}

/// This zone's TLS files: each of the credentials `peer-cert`, `peer-key`,
/// `peer-ca` if present, else `[peering] cert`, `key`, `ca`.
///
/// # Errors
/// When one of the three is missing.
pub fn peer_tls_files(cfg: &Config) -> Result<TlsFiles> {
    let pick = |cred: &str, setting: &Option<PathBuf>, key: &str| match credential(cred).or_else(|| setting.clone()) {
        Some(p) => Ok(p),
        None => Err(anyhow::anyhow!(
            "zones over TCP need this zone's certificate: set [peering] {key} or pass the systemd \
             credential {cred} (LoadCredential={cred}:PATH)"
        )),
    };
    let p = &cfg.peering;
    Ok(TlsFiles {
        cert: pick("peer-cert", &p.cert, "cert")?,
        key: pick("peer-key", &p.key, "key")?,
        ca: pick("peer-ca", &p.ca, "ca")?,
    })
}

/// Replication for the configured peers: the replicator, and this zone's
/// TLS identity when TCP peers or a listener are configured.
#[derive(Debug)]
pub struct Replication {
    pub replicator: Arc<Replicator>,
    pub tls: Option<Arc<PeerTls>>,
}

/// The replicator for the configured peers, or `None` without peers.
///
/// # Errors
/// TCP peers or a listener without usable TLS credentials.
pub fn open_replication(cfg: &Config, keys: &Arc<KeyService>) -> Result<Option<Replication>> {
    if cfg.peers.is_empty() && cfg.peering.listen.is_empty() {
        return Ok(None);
    }
    let tls = if cfg.uses_tls() {
        let files = peer_tls_files(cfg)?;
        let tls = PeerTls::load(&files, &cfg.zone).with_context(|| format!("zone {}'s TLS identity", cfg.zone))?;
        Some(Arc::new(tls))
    } else {
        None
    };
    let routes = cfg
        .peers
        .iter()
        .map(|p| {
            let route = match (&p.address, &p.socket, p.uid) {
                (Some(address), _, _) => Route::Tls {
                    address: address.clone(),
                },
                (None, Some(socket), Some(uid)) => Route::Unix {
                    socket: socket.clone(),
                    uid,
                },
                _ => unreachable!("validated by Config::validate"),
            };
            (p.zone.clone(), route)
        })
        .collect();
    let transport = Arc::new(ZoneTransport::new(routes, tls.clone(), cfg.max_frame, PEER_TIMEOUT));
    let settings = Settings {
        pull_interval: Duration::from_secs(cfg.replication.pull_interval_secs),
        retry_max: Duration::from_secs(cfg.replication.retry_max_secs),
    };
    let peers = cfg
        .peers
        .iter()
        .map(|p| Peer {
            zone: p.zone.clone(),
            uid: p.uid,
        })
        .collect();
    let replicator = Arc::new(Replicator::new(keys.clone(), peers, transport, settings));
    Ok(Some(Replication { replicator, tls }))
}

/// Opens the key store named by the configuration; with etcd, waits (and
/// says so) until etcd answers.
///
/// # Errors
/// Missing or invalid root key, store errors (wrong key, corrupt, locked).
pub async fn open_keys(cfg: &Config) -> Result<Arc<KeyService>> {
    let path = root_key_path(cfg)?;
    let svc = match cfg.store.backend {
        Backend::File => KeyService::open(&cfg.state_dir, RootKey::load(&path)?, &cfg.zone, Arc::new(SystemClock))
            .with_context(|| format!("cannot open key store {}", cfg.state_dir.display()))?,
        Backend::Etcd => open_etcd_keys(cfg, &path).await?,
    };
    svc.set_admins(cfg.admins()?);
    Ok(Arc::new(svc))
}

/// The key service on etcd, retrying while etcd does not answer.
async fn open_etcd_keys(cfg: &Config, root_key: &Path) -> Result<KeyService> {
    let settings = cfg.etcd_settings();
    let mut pause = Duration::from_millis(500);
    loop {
        let (root, s, zone) = (RootKey::load(root_key)?, settings.clone(), cfg.zone.clone());
        let opened = tokio::task::spawn_blocking(move || {
            let store = Arc::new(EtcdStore::open(&s, root)?);
            KeyService::with_store(store, &zone, Arc::new(SystemClock))
        })
        .await?;
        match opened {
            Ok(svc) => return Ok(svc),
            Err(e @ StoreError::Etcd { .. }) => {
                tracing::warn!(error = %crate::keys::error::error_chain(&e), retry_in = ?pause, "waiting for etcd before serving");
                notify::status(&format!("waiting for etcd at {}", settings.endpoints.join(",")));
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ETCD_RETRY_MAX);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open the key store in etcd under {}", settings.prefix))
            }
        }
    }
}

/// The `--dev` filesystem: `DIR/mnt` over `DIR/data`, encrypted with the
/// customer key `dev` (created for the running user if absent).
fn dev_mount(keys: &Arc<KeyService>, mounts: &Mounts, dir: &Path) {
    let uid = nix::unistd::getuid().as_raw();
    let me = crate::keys::Caller::process(uid, nix::unistd::getgid().as_raw(), None);
    if keys.entry(DEV_KEY).is_err() {
        let req = CreateKey {
            name: Some(DEV_KEY.into()),
            description: "--dev filesystem key".into(),
            rotation: None,
        };
        if let Err(e) = keys.create_key(&me, &req) {
            tracing::warn!(error = %e, "cannot create the dev key; no dev filesystem");
            return;
        }
    }
    let cfg = MountConfig {
        source: dir.join("data"),
        target: dir.join("mnt"),
        key: DEV_KEY.into(),
    };
    match mounts.mount_one(keys, &cfg) {
        Ok(()) => tracing::info!(target = %cfg.target.display(), "dev filesystem mounted: files written there are stored encrypted in {}", cfg.source.display()),
        Err(e) => tracing::warn!(
            "dev filesystem not mounted: {}; kmsd serves keys without it (FUSE needs /dev/fuse and root or fusermount3)",
            crate::keys::error::error_chain(&e)
        ),
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns after draining and
/// unmounting. `dev_dir` is the `--dev` folder, if any.
///
/// # Errors
/// Start-up failures (store, socket, mounts, signals).
pub async fn run(cfg: Config, dev_dir: Option<PathBuf>, reload: Reloader) -> Result<()> {
    // The file store locks the state directory itself; with etcd it holds
    // only the audit log, locked here.
    let _state_lock = match cfg.store.backend {
        Backend::File => None,
        Backend::Etcd => Some(lock_state_dir(&cfg.state_dir)?),
    };
    let keys = open_keys(&cfg).await?;
    let replication = open_replication(&cfg, &keys)?;
    // After the store, whose lock keeps a second kmsd off this file.
    let audit = Arc::new(AuditLog::open(&cfg.state_dir)?);
    audit.set_data_operations(cfg.audit.data_operations);
    let metrics = crate::metrics::install(cfg.metrics_addr()?)?;
    // Mount before binding, so that no client reaches a half-started
    // daemon; a failure after this point unmounts (Mounts' handles unmount
    // on drop) and removes the socket (SocketFile).
    let mounts = {
        let keys = keys.clone();
        let configs = cfg.mounts.clone();
        tokio::task::spawn_blocking(move || Mounts::mount_all(&keys, &configs)).await??
    };
    let mounts = Arc::new(mounts);
    if let Some(dir) = &dev_dir {
        dev_mount(&keys, &mounts, dir);
    }
    let listener = match Listener::inherited()? {
        Some(l) => l,
        None => Listener::bind(&cfg.socket)?,
    };
    let _socket_file = SocketFile(listener.path.clone());
    let shutdown = CancellationToken::new();
    let mut daemon = Daemon::new(keys.clone(), mounts.clone());
    daemon.observers.push(audit.clone());
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(keys.clone().follow(shutdown.clone()));
    if let Some(Replication { replicator: r, tls }) = &replication {
        daemon = daemon.with_replication(r.clone());
        tasks.spawn(tasks::run_pushes(r.clone(), shutdown.clone()));
        tasks.spawn(tasks::run_pulls(r.clone(), shutdown.clone()));
        if let (Some(tls), false) = (tls, cfg.peering.listen.is_empty()) {
            let addr = &cfg.peering.listen;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for peers on {addr}"))?;
            tracing::info!(%addr, "accepting peer zones (mutual TLS)");
            let limits = Limits {
                max_connections: cfg.peering.max_connections,
                handshake_timeout: Duration::from_secs(cfg.peering.handshake_timeout_secs),
                idle_timeout: Duration::from_secs(cfg.peering.idle_timeout_secs),
                max_frame: cfg.max_frame,
            };
            tasks.spawn(listener::run(tcp, tls.clone(), r.clone(), limits, shutdown.clone()));
        }
    }
    daemon.observers.push(Arc::new(crate::metrics::RequestMetrics::new()));
    let daemon = Arc::new(daemon);
    tasks.spawn(crate::metrics::run_state(daemon.clone(), shutdown.clone()));
    tasks.close();
    spawn_signal_handler(shutdown.clone())?;
    let hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(reload_on_sighup(
        hup,
        cfg.clone(),
        reload,
        daemon.clone(),
        metrics,
        audit.clone(),
    ));
    let scheduler = tokio::spawn(crate::scheduler::run(keys.clone(), audit.clone(), shutdown.clone()));
    let where_ = listener
        .path
        .as_ref()
        .map_or("inherited socket".to_string(), |p| p.display().to_string());
    tracing::info!(zone = %cfg.zone, socket = %where_, keys = keys.key_count(), "kmsd ready");
    notify::ready(&status_line(&daemon));
    let reporter = tokio::spawn(report_to_systemd(daemon.clone(), shutdown.clone()));
    server::run(listener.listener, daemon, cfg.max_frame, shutdown.clone()).await;
    let _ = scheduler.await;
    tasks.wait().await;
    tokio::task::spawn_blocking(move || audit.flush()).await?;
    tokio::task::spawn_blocking(move || mounts.unmount_all()).await?;
    reporter.abort();
    tracing::info!("kmsd stopped");
    Ok(())
}

/// The socket file kmsd bound; removed when kmsd stops or fails to start.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove socket");
            }
        }
    }
}

/// Loads the configuration again (from the same file or `--dev` folder)
/// and applies what can change at run time.
pub struct Reloader {
    /// Reads and validates the configuration.
    pub load: Box<dyn Fn() -> Result<Config> + Send + Sync>,
    /// Changes the log filter.
    pub log: crate::logging::LogHandle,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// On SIGHUP: re-read the configuration; apply admins and log level; keep
/// the running configuration when the new one is invalid.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    mut current: Config,
    reload: Reloader,
    daemon: Arc<Daemon>,
    metrics: Arc<crate::metrics::Endpoint>,
    audit: Arc<AuditLog>,
) {
    let keys = &daemon.keys;
    while hup.recv().await.is_some() {
        notify::reloading();
        // The metrics address is applied first: if it cannot be bound, the
        // whole new configuration is refused and nothing changes.
        let applied = (reload.load)()
            .and_then(|new| Ok((new.admins()?, new)))
            .and_then(|(admins, new)| Ok((metrics.listen(new.metrics_addr()?)?, admins, new)));
        match applied {
            Ok(((), admins, new)) => {
                keys.set_admins(admins);
                audit.set_data_operations(new.audit.data_operations);
                reload.log.set(&new.log_level);
                warn_restart_only(&current, &new);
                tracing::info!(admins = ?new.access.admins, log_level = %new.log_level, "configuration reloaded");
                current = new;
            }
            Err(e) => tracing::error!("configuration reload refused, the running configuration stays: {e:#}"),
        }
        notify::ready(&status_line(&daemon));
    }
}

/// The STATUS= line `systemctl status` shows.
fn status_line(daemon: &Daemon) -> String {
    format!(
        "{} keys, {} mounts, {} connections",
        daemon.keys.key_count(),
        daemon.mounts.count(),
        daemon.connections.load(std::sync::atomic::Ordering::Relaxed)
    )
}

/// `WATCHDOG=1` every [`notify::watchdog_interval`] (when systemd asked
/// for it) until aborted, and a new STATUS= line whenever a count changed
/// until `shutdown`. It runs on the main runtime, so a stuck runtime stops
/// the pings and systemd's watchdog restarts the service. The pings go on
/// while draining: systemd's watchdog stays armed while a service stops.
async fn report_to_systemd(daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut last = status_line(&daemon);
    loop {
        tokio::select! {
            _ = tick(watchdog.as_mut()) => notify::watchdog(),
            _ = status.tick(), if !shutdown.is_cancelled() => {
                let now = status_line(&daemon);
                if now != last {
                    notify::status(&now);
                    last = now;
                }
            }
        }
    }
}

/// The next tick of `interval`, or never without one.
async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Names the settings that changed but only take effect on restart.
fn warn_restart_only(old: &Config, new: &Config) {
    let changed = [
        ("zone", old.zone != new.zone),
        ("socket", old.socket != new.socket),
        ("state_dir", old.state_dir != new.state_dir),
        ("root_key", old.root_key != new.root_key),
        ("max_frame", old.max_frame != new.max_frame),
        ("mount", old.mounts != new.mounts),
        ("peer", old.peers != new.peers),
        ("peering", old.peering != new.peering),
        ("store", old.store != new.store),
    ];
    for (name, _) in changed.iter().filter(|(_, c)| *c) {
        tracing::warn!(
            setting = name,
            "changed in the configuration; takes effect when kmsd restarts"
        );
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        notify::stopping();
        shutdown.cancel();
    });
    Ok(())
}
