//! Start-up and shutdown of the whole daemon: resolve the configuration
//! (including `--dev`), open the key store, bind the socket, run the server
//! and the scheduler until a signal, then drain and clean up. Outside
//! systemd it also starts a mount process per `[[mount]]` (and the `--dev`
//! mount) and stops them on exit (`children.rs`).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use kms_client::proto::CreateKey;

use crate::audit::{AuditError, AuditLog};
use crate::children::{self, ChildError, Children};
use crate::config::{self, Backend, Config, ConfigError, MountConfig};
use crate::keys::error::error_chain;
use crate::keys::store::{lock_state_dir, EtcdStore, StoreError};
use crate::keys::{KeyService, RootKey, SystemClock};
use crate::leader::{self, Leadership};
use crate::metrics::MetricsError;
use crate::mounts::Mounts;
use crate::notify;
use crate::ops::Daemon;
use crate::replication::listener::{self, Limits};
use crate::replication::tls::{PeerTls, TlsError, TlsFiles};
use crate::replication::transport::{Route, ZoneTransport};
use crate::replication::{tasks, Peer, Replicator, Settings};
use crate::server::{self, BindError, Listener};

/// Why kmsd could not start, or why a configuration reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path {} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error("configuration {}", path.display())]
    Config {
        path: PathBuf,
        /// Boxed: the config crate's error is large.
        #[source]
        source: Box<ConfigError>,
    },
    #[error(transparent)]
    Setting(#[from] ConfigError),
    #[error(
        "no root key: set root_key in the config or pass the systemd credential root-key \
         (LoadCredential=root-key:PATH); for a local trial run kmsd --dev"
    )]
    NoRootKey,
    #[error(
        "zones over TCP need this zone's certificate: set [peering] {setting} or pass the systemd \
         credential {credential} (LoadCredential={credential}:PATH)"
    )]
    NoPeerTls {
        setting: &'static str,
        credential: &'static str,
    },
    /// The root key file cannot be read or created (the error names it).
    #[error(transparent)]
    RootKey(StoreError),
    #[error("zone {zone}'s TLS identity")]
    PeerTls {
        zone: String,
        #[source]
        source: TlsError,
    },
    #[error("cannot listen for peers on {addr}")]
    PeerListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open key store {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Mount(#[from] ChildError),
    #[error(
        "[[mount]] in the configuration: under systemd kmsd runs unprivileged and mounts nothing; \
         move each [[mount]] to /etc/kmsd/mounts/NAME.toml and run systemctl enable --now kmsd-mount@NAME"
    )]
    MountsUnderSystemd,
    #[error("cannot start the mount processes' supervisor")]
    Supervisor(#[source] std::io::Error),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot handle {signal}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a start-up or shutdown task failed")]
    Task(#[from] tokio::task::JoinError),
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StartError + 'a {
    move |source| StartError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

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
pub fn dev_config(dir: &Path) -> Result<(Config, PathBuf), StartError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("cannot create dev folder", dir))?;
    let dir = dir.canonicalize().map_err(io_error("cannot resolve", dir))?;
    let cfg_path = dir.join("kmsd.toml");
    if !cfg_path.exists() {
        std::fs::write(&cfg_path, DEV_CONFIG).map_err(io_error("cannot write", &cfg_path))?;
    }
    let root_key = dir.join("root-key");
    if !root_key.exists() {
        RootKey::create(&root_key).map_err(StartError::RootKey)?;
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

fn path_str(p: &Path) -> Result<String, StartError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| StartError::NotUtf8(p.to_path_buf()))
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
pub fn root_key_path(cfg: &Config) -> Result<PathBuf, StartError> {
    if let Some(p) = credential("root-key") {
        return Ok(p);
    }
    cfg.root_key.clone().ok_or(StartError::NoRootKey)
}

/// This zone's TLS files: each of the credentials `peer-cert`, `peer-key`,
/// `peer-ca` if present, else `[peering] cert`, `key`, `ca`.
///
/// # Errors
/// When one of the three is missing.
pub fn peer_tls_files(cfg: &Config) -> Result<TlsFiles, StartError> {
    let pick = |credential: &'static str, path: &Option<PathBuf>, setting: &'static str| {
        self::credential(credential)
            .or_else(|| path.clone())
            .ok_or(StartError::NoPeerTls { setting, credential })
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
pub fn open_replication(cfg: &Config, keys: &Arc<KeyService>) -> Result<Option<Replication>, StartError> {
    if cfg.peers.is_empty() && cfg.peering.listen.is_empty() {
        return Ok(None);
    }
    let tls = if cfg.uses_tls() {
        let files = peer_tls_files(cfg)?;
        let tls = PeerTls::load(&files, &cfg.zone).map_err(|source| StartError::PeerTls {
            zone: cfg.zone.clone(),
            source,
        })?;
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
pub async fn open_keys(cfg: &Config) -> Result<Arc<KeyService>, StartError> {
    let path = root_key_path(cfg)?;
    let svc = match cfg.store.backend {
        Backend::File => {
            let root = RootKey::load(&path).map_err(StartError::RootKey)?;
            KeyService::open(&cfg.state_dir, root, &cfg.zone, Arc::new(SystemClock)).map_err(|source| {
                StartError::Store {
                    path: cfg.state_dir.clone(),
                    source,
                }
            })?
        }
        Backend::Etcd => open_etcd_keys(cfg, &path).await?,
    };
    svc.set_admins(cfg.admins()?);
    svc.set_keys_per_uid(cfg.limits.keys_per_uid);
    Ok(Arc::new(svc))
}

/// The key service on etcd, retrying while etcd does not answer.
async fn open_etcd_keys(cfg: &Config, root_key: &Path) -> Result<KeyService, StartError> {
    let settings = cfg.etcd_settings();
    let mut pause = Duration::from_millis(500);
    loop {
        let root = RootKey::load(root_key).map_err(StartError::RootKey)?;
        let (s, zone) = (settings.clone(), cfg.zone.clone());
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
            Err(source) => {
                return Err(StartError::Store {
                    path: PathBuf::from(format!("etcd:{}", settings.prefix)),
                    source,
                })
            }
        }
    }
}

/// The `--dev` filesystem: `DIR/mnt` over `DIR/data`, encrypted with the
/// customer key `dev` (created for the running user if absent), served by
/// a child mount process. A failure is logged; kmsd serves keys without it.
fn dev_mount(keys: &Arc<KeyService>, children: &Children, dir: &Path, socket: &Path) {
    let uid = nix::unistd::getuid().as_raw();
    let me = crate::keys::Caller::process(uid, nix::unistd::getgid().as_raw(), None);
    if keys.entry(DEV_KEY).is_err() {
        let req = CreateKey {
            name: Some(DEV_KEY.into()),
            description: "--dev filesystem key".into(),
            rotation: None,
        };
        if let Err(e) = keys.create_key(&me, &req) {
            tracing::warn!(error = %error_chain(&e), "cannot create the dev key; no dev filesystem");
            return;
        }
    }
    let spec = children::Spec {
        name: "dev".into(),
        source: dir.join("data"),
        target: dir.join("mnt"),
        key: DEV_KEY.into(),
        socket: socket.to_path_buf(),
        names: Default::default(),
    };
    match children.start(spec.clone()) {
        Ok(()) => tracing::info!(target = %spec.target.display(), "dev filesystem mounted: files written there are stored encrypted in {}", spec.source.display()),
        Err(e) => tracing::warn!(
            "dev filesystem not mounted: {}; kmsd serves keys without it (FUSE needs /dev/fuse and root or fusermount3)",
            error_chain(&e)
        ),
    }
}

/// Whether kmsd runs as a systemd service without root, where the shipped
/// unit puts it: it cannot mount there, and `[[mount]]` belongs to
/// `kmsd-mount@` units. (A root kmsd under some other unit, such as a test
/// runner's, still starts its own mount processes.)
fn unprivileged_service() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() && !nix::unistd::geteuid().is_root()
}

/// Starts a mount process per `[[mount]]` and the `--dev` mount, each
/// mounted before this returns.
///
/// # Errors
/// A `[[mount]]` whose process did not mount.
async fn start_children(
    cfg: &Config,
    keys: &Arc<KeyService>,
    dev_dir: Option<PathBuf>,
    trusted: children::ToServe,
) -> Result<Children, StartError> {
    let children = Children::new(trusted).map_err(StartError::Supervisor)?;
    let specs: Vec<children::Spec> = cfg
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| mount_spec(i, m, &cfg.socket))
        .collect();
    let (keys, socket) = (keys.clone(), cfg.socket.clone());
    let started = tokio::task::spawn_blocking(move || {
        for spec in specs {
            children.start(spec)?;
        }
        if let Some(dir) = &dev_dir {
            dev_mount(&keys, &children, dir, &socket);
        }
        Ok::<_, StartError>(children)
    });
    started.await?
}

/// The mount process of the `i`th `[[mount]]`, named `mountI`.
fn mount_spec(i: usize, m: &MountConfig, socket: &Path) -> children::Spec {
    children::Spec {
        name: format!("mount{i}"),
        source: m.source.clone(),
        target: m.target.clone(),
        key: m.key.clone(),
        socket: socket.to_path_buf(),
        names: m.names,
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns after draining,
/// unmounting and awaiting every task it started. `dev_dir` is the `--dev`
/// folder, if any.
///
/// Tasks: connections run on the server's tracker; the background work
/// (scheduler, replication, metrics, SIGHUP and signal handling) on
/// `tasks`, ended by `shutdown` (the metrics endpoint by
/// [`Endpoint::close`](crate::metrics::Endpoint::close), after the drain,
/// so that it serves until then); the systemd reporter on `watchdog`, ended
/// last so that watchdog pings go on while kmsd drains and unmounts.
///
/// # Errors
/// Start-up failures (store, socket, mounts, signals).
pub async fn run(cfg: Config, dev_dir: Option<PathBuf>, reload: Reloader) -> Result<(), StartError> {
    #[cfg(feature = "test-faults")]
    tracing::warn!("built with the test-faults feature: KMSDTEST_FAULT is honoured; not for production");
    if !cfg.mounts.is_empty() && unprivileged_service() {
        return Err(StartError::MountsUnderSystemd);
    }
    // The file store locks the state directory itself; with etcd it holds
    // only the audit log, locked here.
    let _state_lock = match cfg.store.backend {
        Backend::File => None,
        Backend::Etcd => Some(lock_state_dir(&cfg.state_dir).map_err(|source| StartError::Store {
            path: cfg.state_dir.clone(),
            source,
        })?),
    };
    let keys = open_keys(&cfg).await?;
    let replication = open_replication(&cfg, &keys)?;
    // After the store, whose lock keeps a second kmsd off this file.
    let audit = Arc::new(AuditLog::open(&cfg.state_dir)?);
    audit.set_data_operations(cfg.audit.data_operations);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let metrics = crate::metrics::install(cfg.metrics_addr()?, &tasks)?;
    let mounts = Arc::new(Mounts::new(crate::mount::admin_dir(&cfg.socket)));
    let changes = crate::changes::dir(&cfg.socket);
    // Removed at exit: while no kmsd publishes changes, mount processes
    // make no key ahead.
    let _change_file = match crate::changes::ChangeFile::create(&changes) {
        Ok(file) => {
            keys.on_change(move |generation| file.publish(generation));
            RemovedAtExit(Some(changes.join(crate::changes::FILE)))
        }
        Err(e) => {
            tracing::warn!(dir = %changes.display(), error = %e, "cannot publish key changes; mount processes will ask kmsd for each new file's data key");
            RemovedAtExit(None)
        }
    };
    let listener = match Listener::inherited()? {
        Some(l) => l,
        None => Listener::bind(&cfg.socket)?,
    };
    let _socket_file = RemovedAtExit(listener.path.clone());
    let kubernetes = match &cfg.kubernetes.socket {
        Some(path) => Some(crate::kubernetes::Listener::bind(&cfg.kubernetes, path)?),
        None => None,
    };
    let mut daemon = Daemon::new(keys.clone(), mounts.clone());
    daemon.observers.push(audit.clone());
    tasks.spawn(keys.clone().follow(shutdown.clone()));
    let leadership = elect(&cfg, &tasks, &shutdown);
    daemon.leadership = leadership.clone();
    if let Some(Replication { replicator: r, tls }) = &replication {
        daemon = daemon.with_replication(r.clone());
        let (r1, r2) = (r.clone(), r.clone());
        let (l, s) = (leadership.clone(), shutdown.clone());
        tasks.spawn(leader::while_leading(l, s, move |stop| {
            tasks::run_pushes(r1.clone(), stop)
        }));
        let (l, s) = (leadership.clone(), shutdown.clone());
        tasks.spawn(leader::while_leading(l, s, move |stop| {
            tasks::run_pulls(r2.clone(), stop)
        }));
        if let (Some(tls), false) = (tls, cfg.peering.listen.is_empty()) {
            let addr = &cfg.peering.listen;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::PeerListen {
                    addr: addr.clone(),
                    source,
                })?;
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
    tasks.spawn(handle_signals(signals()?, shutdown.clone()));
    let hup = signal(SignalKind::hangup()).map_err(|source| StartError::Signal {
        signal: "SIGHUP",
        source,
    })?;
    let reloading = Reloading {
        current: cfg.clone(),
        reload,
        daemon: daemon.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
    };
    tasks.spawn(reloading.run(hup, shutdown.clone()));
    let (k, a) = (keys.clone(), audit.clone());
    tasks.spawn(leader::while_leading(leadership, shutdown.clone(), move |stop| {
        crate::scheduler::run(k.clone(), a.clone(), stop)
    }));
    let l = &cfg.limits;
    let limits = server::Limits {
        max_frame: cfg.max_frame,
        max_connections: l.max_connections,
        max_connections_per_uid: l.max_connections_per_uid,
        handshake_timeout: Duration::from_secs(l.handshake_timeout_secs),
        idle_timeout: Duration::from_secs(l.idle_timeout_secs),
        frame_timeout: Duration::from_secs(l.frame_timeout_secs),
    };
    if let Some(k) = kubernetes {
        tracing::info!(socket = ?cfg.kubernetes.socket, key = %cfg.kubernetes.key, "serving the Kubernetes KMS v2 plugin API");
        tasks.spawn(crate::kubernetes::run(k, daemon.clone(), limits, shutdown.clone()));
    }
    tasks.close();
    // The mount processes kmsd starts are its clients over socket pairs,
    // served at once; other clients are accepted only once they have
    // mounted and kmsd has said it is ready, so that none reaches a
    // half-started daemon. A failure stops the server again and removes
    // the socket (RemovedAtExit).
    let where_ = listener
        .path
        .as_ref()
        .map_or("inherited socket".to_string(), |p| p.display().to_string());
    let (trusted, to_serve) = tokio::sync::mpsc::unbounded_channel();
    let open = CancellationToken::new();
    let serving = server::run(
        listener.listener,
        daemon.clone(),
        limits,
        shutdown.clone(),
        to_serve,
        open.clone(),
    );
    let server = tokio::spawn(serving);
    let mut children = match start_children(&cfg, &keys, dev_dir, trusted).await {
        Ok(c) => c,
        Err(e) => {
            shutdown.cancel();
            server.await?;
            metrics.close();
            tasks.wait().await;
            return Err(e);
        }
    };

    tracing::info!(zone = %cfg.zone, socket = %where_, keys = keys.key_count(), "kmsd ready");
    notify::ready(&status_line(&daemon));
    open.cancel();
    let (watchdog, stopped) = (TaskTracker::new(), CancellationToken::new());
    watchdog.spawn(report_to_systemd(daemon.clone(), shutdown.clone(), stopped.clone()));
    watchdog.close();
    server.await?;
    metrics.close();
    tasks.wait().await;
    tokio::task::spawn_blocking(move || audit.flush()).await?;
    tokio::task::spawn_blocking(move || children.stop()).await?;
    stopped.cancel();
    watchdog.wait().await;
    tracing::info!("kmsd stopped");
    Ok(())
}

/// This daemon's leadership of its zone's scheduled work (rotations,
/// deletions, replication): always with the file store; with etcd, won in
/// an election that runs on `tasks` until `shutdown`.
fn elect(cfg: &Config, tasks: &TaskTracker, shutdown: &CancellationToken) -> Leadership {
    match cfg.store.backend {
        Backend::File => Leadership::sole(),
        Backend::Etcd => {
            let ttl = Duration::from_secs(cfg.store.lease_ttl_secs);
            let (leadership, election) = leader::campaign(&cfg.etcd_settings(), ttl, shutdown.clone());
            tasks.spawn(election);
            leadership
        }
    }
}

/// The socket file kmsd bound; removed when kmsd stops or fails to start.
struct RemovedAtExit(Option<PathBuf>);

impl Drop for RemovedAtExit {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove at exit");
            }
        }
    }
}

/// Loads the configuration again (from the same file or `--dev` folder)
/// and applies what can change at run time.
pub struct Reloader {
    /// Reads and validates the configuration.
    pub load: Box<dyn Fn() -> Result<Config, StartError> + Send + Sync>,
    /// Changes the log filter.
    pub log: crate::logging::LogHandle,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// What a configuration reload changes.
struct Reloading {
    current: Config,
    reload: Reloader,
    daemon: Arc<Daemon>,
    metrics: Arc<crate::metrics::Endpoint>,
    audit: Arc<AuditLog>,
}

impl Reloading {
    /// On SIGHUP, until `shutdown`: re-read the configuration; apply
    /// admins, log level, audit and metrics settings; keep the running
    /// configuration when the new one is invalid.
    async fn run(mut self, mut hup: tokio::signal::unix::Signal, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            notify::reloading();
            self.once();
            notify::ready(&status_line(&self.daemon));
        }
    }

    fn once(&mut self) {
        // The metrics address is applied first: if it cannot be bound, the
        // whole new configuration is refused and nothing changes.
        let applied = (self.reload.load)()
            .and_then(|new| Ok((new.admins()?, new)))
            .and_then(|(admins, new)| Ok((self.metrics.listen(new.metrics_addr()?)?, admins, new)));
        match applied {
            Ok(((), admins, new)) => {
                self.daemon.keys.set_admins(admins);
                self.daemon.keys.set_keys_per_uid(new.limits.keys_per_uid);
                self.audit.set_data_operations(new.audit.data_operations);
                self.reload.log.set(&new.log_level);
                warn_restart_only(&self.current, &new);
                tracing::info!(admins = ?new.access.admins, log_level = %new.log_level, "configuration reloaded");
                self.current = new;
            }
            Err(e) => tracing::error!(
                "configuration reload refused, the running configuration stays: {}",
                error_chain(&e)
            ),
        }
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
/// for it) until `stopped`, and a new STATUS= line whenever a count changed
/// until `shutdown`. It runs on the main runtime, so a stuck runtime stops
/// the pings and systemd's watchdog restarts the service. The pings go on
/// while draining: systemd's watchdog stays armed while a service stops.
async fn report_to_systemd(daemon: Arc<Daemon>, shutdown: CancellationToken, stopped: CancellationToken) {
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut last = status_line(&daemon);
    loop {
        tokio::select! {
            _ = stopped.cancelled() => return,
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
        (
            "limits (all but keys_per_uid)",
            config::LimitsConfig {
                keys_per_uid: 0,
                ..old.limits.clone()
            } != config::LimitsConfig {
                keys_per_uid: 0,
                ..new.limits.clone()
            },
        ),
        ("store", old.store != new.store),
        ("kubernetes", old.kubernetes != new.kubernetes),
    ];
    for (name, _) in changed.iter().filter(|(_, c)| *c) {
        tracing::warn!(
            setting = name,
            "changed in the configuration; takes effect when kmsd restarts"
        );
    }
}

/// The SIGTERM and SIGINT streams, set up before kmsd reports ready.
fn signals() -> Result<[tokio::signal::unix::Signal; 2], StartError> {
    let handle = |signal_name, kind| {
        signal(kind).map_err(|source| StartError::Signal {
            signal: signal_name,
            source,
        })
    };
    Ok([
        handle("SIGTERM", SignalKind::terminate())?,
        handle("SIGINT", SignalKind::interrupt())?,
    ])
}

/// Starts the drain (`shutdown`) on the first SIGTERM or SIGINT.
async fn handle_signals([mut term, mut int]: [tokio::signal::unix::Signal; 2], shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
        _ = shutdown.cancelled() => return,
    }
    notify::stopping();
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::assert_states_cause_once;

    #[test]
    fn start_errors_state_each_cause_once() {
        let denied = || std::io::Error::from_raw_os_error(nix::libc::EACCES);
        let store = || StoreError::Io {
            op: "cannot read",
            path: "/s/keys".into(),
            source: denied(),
        };
        let errors = [
            StartError::Io {
                what: "cannot create dev folder",
                path: "/d".into(),
                source: denied(),
            },
            StartError::Config {
                path: "/etc/kmsd/kmsd.toml".into(),
                source: Box::new(ConfigError::Load(::config::ConfigError::Message(
                    "unknown field `zonee`".into(),
                ))),
            },
            StartError::Store {
                path: "/s".into(),
                source: store(),
            },
            StartError::RootKey(store()),
            StartError::Signal {
                signal: "SIGHUP",
                source: denied(),
            },
            StartError::NoRootKey,
        ];
        for e in &errors {
            assert_states_cause_once(e);
        }
        assert_eq!(
            error_chain(&errors[2]),
            "cannot open key store /s: /s/keys: cannot read: Permission denied (os error 13)"
        );
        assert_eq!(
            error_chain(&errors[1]),
            "configuration /etc/kmsd/kmsd.toml: cannot read configuration: unknown field `zonee`"
        );
    }
}
