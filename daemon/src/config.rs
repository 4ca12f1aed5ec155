//! kmsd's configuration: a TOML file overridden by `KMSD_*` environment
//! variables (`KMSD_ZONE`, `KMSD_METRICS__LISTEN`, ... : `__` separates
//! sections), read with the `config` crate. Unknown keys are errors.
//! Loading (I/O) and parsing/validation are separate so that the parser is
//! unit-tested on strings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kms_client::proto::{Principal, DEFAULT_MAX_FRAME};
use serde::Deserialize;

use crate::keys::store::{EtcdSettings, EtcdTls};

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/kmsd/kmsd.toml";
/// Smallest and largest accepted `max_frame`.
pub const MAX_FRAME_RANGE: std::ops::RangeInclusive<usize> = 4096..=(64 << 20);

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This daemon's zone name.
    pub zone: String,
    /// Unix socket path (ignored under socket activation).
    pub socket: PathBuf,
    /// State directory (key store).
    pub state_dir: PathBuf,
    /// Root key file; `$CREDENTIALS_DIRECTORY/root-key` wins when present.
    pub root_key: Option<PathBuf>,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `kmsd=debug`.
    pub log_level: String,
    pub access: AccessConfig,
    pub metrics: MetricsConfig,
    pub replication: ReplicationConfig,
    #[serde(rename = "mount")]
    pub mounts: Vec<MountConfig>,
    #[serde(rename = "peer")]
    pub peers: Vec<PeerConfig>,
    pub audit: AuditConfig,
    pub peering: PeeringConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub kubernetes: KubernetesConfig,
    /// Gone: the shared peering key of earlier releases. Still parsed, so
    /// that an old configuration gets an error saying what replaced it.
    pub peer_key: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            zone: "local".to_string(),
            socket: PathBuf::from("/run/kmsd/kmsd.sock"),
            state_dir: PathBuf::from("/var/lib/kmsd"),
            root_key: None,
            max_frame: DEFAULT_MAX_FRAME,
            log_level: "info".to_string(),
            access: AccessConfig::default(),
            metrics: MetricsConfig::default(),
            replication: ReplicationConfig::default(),
            mounts: Vec::new(),
            peers: Vec::new(),
            audit: AuditConfig::default(),
            peering: PeeringConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            kubernetes: KubernetesConfig::default(),
            peer_key: None,
        }
    }
}

/// `[access]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Principals (`uid:N`, `gid:N`) who administer every key.
    pub admins: Vec<String>,
    /// Gone (see `[[peer]] uid`); parsed only to explain that.
    pub peers: Vec<String>,
}

/// `[limits]`: what one local caller may cost.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections open at once, in all.
    pub max_connections: usize,
    /// Client connections open at once per uid.
    pub max_connections_per_uid: usize,
    /// Seconds from connect to a complete `Hello`.
    pub handshake_timeout_secs: u64,
    /// Seconds a connection may stay without a request.
    pub idle_timeout_secs: u64,
    /// Seconds a request may take to arrive once it has begun.
    pub frame_timeout_secs: u64,
    /// Customer keys one uid may administer in this zone (0: no limit).
    pub keys_per_uid: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_uid: 32,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 900,
            frame_timeout_secs: 10,
            keys_per_uid: 1000,
        }
    }
}

/// `[peering]`: this zone's TLS identity and listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeeringConfig {
    /// `IP:PORT` where other zones connect with mutual TLS; empty: none.
    pub listen: String,
    /// This zone's certificate chain (PEM); the credential `peer-cert` wins.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM); the credential `peer-key` wins.
    pub key: Option<PathBuf>,
    /// The CA that signs every zone's certificate; the credential `peer-ca` wins.
    pub ca: Option<PathBuf>,
    /// Most peer connections served at once.
    pub max_connections: usize,
    /// Seconds a peer has to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds a peer connection may stay idle.
    pub idle_timeout_secs: u64,
}

impl Default for PeeringConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            cert: None,
            key: None,
            ca: None,
            max_connections: 64,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 300,
        }
    }
}

/// `[kubernetes]`: the Kubernetes KMS v2 plugin API on its own socket
/// (`daemon/src/kubernetes/`); off while `socket` is unset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Unix socket kube-apiserver dials (`endpoint: unix://...`).
    pub socket: Option<PathBuf>,
    /// The key (name or id) whose active version seals kube-apiserver's
    /// DEK seeds.
    pub key: String,
    /// The socket's mode (0o600 by default: only kmsd's user and root).
    pub mode: u32,
    /// The socket's group (name or number), given to it at bind; kmsd's
    /// user must be a member of it.
    pub group: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            socket: None,
            key: String::new(),
            mode: 0o600,
            group: None,
        }
    }
}

/// Where the keys are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One sealed file per key under `state_dir`, for one daemon.
    #[default]
    File,
    /// Sealed records in etcd, shared by a fleet of daemons.
    Etcd,
}

/// `[store]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: Backend,
    /// etcd members' client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Prefix of kmsd's keys in etcd; unset: `/kmsd/<zone>/`.
    pub prefix: Option<String>,
    /// The CA of etcd's certificates (needed for `https://`).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, when etcd asks for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Seconds a connection to etcd may take.
    pub connect_timeout_secs: u64,
    /// Seconds an etcd request may take before the change fails.
    pub request_timeout_secs: u64,
    /// TTL in seconds of the etcd lease behind the election of the daemon
    /// that runs the zone's scheduled work: another daemon takes over
    /// within it when the leader dies.
    pub lease_ttl_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::File,
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: None,
            ca: None,
            cert: None,
            key: None,
            connect_timeout_secs: 5,
            request_timeout_secs: 5,
            lease_ttl_secs: 10,
        }
    }
}

/// `[replication]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Seconds between a replica's pulls from its primary.
    pub pull_interval_secs: u64,
    /// Longest pause, in seconds, between retries of a failed push.
    pub retry_max_secs: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            pull_interval_secs: 30,
            retry_max_secs: 5,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint; empty turns it off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".to_string(),
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Also record successful data operations (encrypt, decrypt, wrap,
    /// unwrap, generate, re-encrypt). Their failures are always recorded.
    pub data_operations: bool,
}

/// `[[mount]]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// Backing directory holding the encrypted files.
    pub source: PathBuf,
    /// Mountpoint.
    pub target: PathBuf,
    /// Key (name or id) whose active version wraps new files' DEKs.
    pub key: String,
    /// `"encrypted"` (default: for a new, empty backing directory) or
    /// `"plain"` names (fuse/FORMAT.md, "Names").
    #[serde(default)]
    pub names: crate::mount::Names,
}

/// A zone name: 1 to 64 characters from A-Z a-z 0-9 and `-`.
pub fn zone_name_ok(z: &str) -> bool {
    !z.is_empty() && z.len() <= 64 && z.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// `[[peer]]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub zone: String,
    /// `HOST:PORT` of the zone's `[peering] listen` (mutual TLS).
    pub address: Option<String>,
    /// Or the zone's Unix socket on this host...
    pub socket: Option<PathBuf>,
    /// ...and the uid its daemon runs as, which is how it is recognised.
    pub uid: Option<u32>,
}

impl Config {
    /// Reads `path` (must exist) and the `KMSD_*` variables of `env`.
    ///
    /// # Errors
    /// Unreadable or unparsable file, unknown keys, invalid values.
    pub fn load(path: &Path, env: HashMap<String, String>) -> Result<Self, ConfigError> {
        let file = config::File::from(path).format(config::FileFormat::Toml).required(true);
        Self::build(file, env)
    }

    /// Parses TOML text plus `KMSD_*` variables (tests and `--dev`).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn parse(toml: &str, env: HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::build(config::File::from_str(toml, config::FileFormat::Toml), env)
    }

    fn build<S>(file: S, env: HashMap<String, String>) -> Result<Self, ConfigError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        let env = config::Environment::with_prefix("KMSD")
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("access.admins")
            .with_list_parse_key("store.endpoints")
            .try_parsing(true)
            .source(Some(env.into_iter().collect()));
        let cfg: Config = config::Config::builder()
            .add_source(file)
            .add_source(env)
            .build()?
            .try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; names the first bad setting.
    ///
    /// # Errors
    /// `Invalid` naming the key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !zone_name_ok(&self.zone) {
            return Err(invalid("zone", "use 1 to 64 characters from A-Z a-z 0-9 -"));
        }
        require_absolute("socket", &self.socket)?;
        require_absolute("state_dir", &self.state_dir)?;
        if let Some(p) = &self.root_key {
            require_absolute("root_key", p)?;
        }
        if !MAX_FRAME_RANGE.contains(&self.max_frame) {
            return Err(invalid(
                "max_frame",
                format!("must be within {MAX_FRAME_RANGE:?} bytes"),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("log_level", format!("{e} (try \"info\" or \"kmsd=debug\")")))?;
        self.admins()?;
        self.metrics_addr()?;
        self.validate_mounts()?;
        self.validate_store()?;
        self.validate_kubernetes()?;
        self.validate_peers()
    }

    fn validate_kubernetes(&self) -> Result<(), ConfigError> {
        let k = &self.kubernetes;
        let Some(socket) = &k.socket else {
            return Ok(());
        };
        require_absolute("kubernetes.socket", socket)?;
        if *socket == self.socket {
            return Err(invalid(
                "kubernetes.socket",
                "is kmsd's own socket; give the plugin its own",
            ));
        }
        if k.key.is_empty() {
            return Err(invalid(
                "kubernetes.key",
                "must name the key that seals the cluster's secrets",
            ));
        }
        if k.mode & !0o777 != 0 || k.mode & 0o600 != 0o600 {
            return Err(invalid(
                "kubernetes.mode",
                "must be permission bits (0o600 ..= 0o777) that let kmsd's own user read and write",
            ));
        }
        if k.group.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("kubernetes.group", "must name a group or be left out"));
        }
        Ok(())
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        for (k, v) in [("store.ca", &s.ca), ("store.cert", &s.cert), ("store.key", &s.key)] {
            if let Some(path) = v {
                require_absolute(k, path)?;
            }
        }
        if s.cert.is_some() != s.key.is_some() {
            return Err(invalid("store.cert", "give both cert and key, or neither"));
        }
        for (k, v) in [
            ("store.connect_timeout_secs", s.connect_timeout_secs),
            ("store.request_timeout_secs", s.request_timeout_secs),
        ] {
            if !(1..=600).contains(&v) {
                return Err(invalid(k, "must be within 1..=600"));
            }
        }
        // etcd grants no lease shorter than about 2 s (1.5 election timeouts).
        if !(2..=600).contains(&s.lease_ttl_secs) {
            return Err(invalid("store.lease_ttl_secs", "must be within 2..=600"));
        }
        if let Some(p) = &s.prefix {
            if !p.starts_with('/') || !p.ends_with('/') {
                return Err(invalid(
                    "store.prefix",
                    "must start and end with / (e.g. \"/kmsd/zone-a/\")",
                ));
            }
        }
        if s.backend == Backend::Etcd && s.endpoints.is_empty() {
            return Err(invalid("store.endpoints", "the etcd store needs at least one endpoint"));
        }
        for e in &s.endpoints {
            let tls = e.starts_with("https://");
            if !tls && !e.starts_with("http://") {
                return Err(invalid(
                    "store.endpoints",
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
            if tls && s.ca.is_none() {
                return Err(invalid(
                    "store.ca",
                    format!("{e} is https: give the CA of etcd's certificates"),
                ));
            }
        }
        Ok(())
    }

    /// How to reach etcd, for `[store] backend = "etcd"`.
    pub fn etcd_settings(&self) -> EtcdSettings {
        let s = &self.store;
        EtcdSettings {
            endpoints: s.endpoints.clone(),
            prefix: s.prefix.clone().unwrap_or_else(|| format!("/kmsd/{}/", self.zone)),
            tls: s.ca.clone().map(|ca| EtcdTls {
                ca,
                identity: s.cert.clone().zip(s.key.clone()),
            }),
            connect_timeout: std::time::Duration::from_secs(s.connect_timeout_secs),
            request_timeout: std::time::Duration::from_secs(s.request_timeout_secs),
        }
    }

    fn validate_mounts(&self) -> Result<(), ConfigError> {
        for (i, m) in self.mounts.iter().enumerate() {
            require_absolute(&format!("mount[{i}].source"), &m.source)?;
            require_absolute(&format!("mount[{i}].target"), &m.target)?;
            if m.key.is_empty() {
                return Err(invalid(&format!("mount[{i}].key"), "must name a key"));
            }
            if m.source.starts_with(&m.target) || m.target.starts_with(&m.source) {
                return Err(invalid(
                    &format!("mount[{i}]"),
                    "source and target must not contain each other",
                ));
            }
            let dup = self.mounts[..i].iter().any(|o| o.target == m.target);
            if dup {
                return Err(invalid(&format!("mount[{i}].target"), "mounted twice"));
            }
        }
        Ok(())
    }

    fn validate_peers(&self) -> Result<(), ConfigError> {
        if self.peer_key.is_some() {
            return Err(invalid(
                "peer_key",
                "the shared peering key is gone: each zone now has a TLS certificate \
                 ([peering] cert, key, ca) or, on one host, is recognised by its uid ([[peer]] uid); \
                 see the README's \"Multi-zone keys\"",
            ));
        }
        if !self.access.peers.is_empty() {
            return Err(invalid(
                "access.peers",
                "is gone: give each Unix-socket peer its daemon's uid in [[peer]] uid",
            ));
        }
        let mut tls = false;
        for (i, p) in self.peers.iter().enumerate() {
            let at = |k: &str| format!("peer[{i}].{k}");
            if !zone_name_ok(&p.zone) {
                return Err(invalid(&at("zone"), "use 1 to 64 characters from A-Z a-z 0-9 -"));
            }
            if p.zone == self.zone {
                return Err(invalid(&at("zone"), "is this daemon's own zone"));
            }
            if self.peers[..i].iter().any(|o| o.zone == p.zone) {
                return Err(invalid(&at("zone"), "listed twice"));
            }
            match (&p.address, &p.socket, p.uid) {
                (Some(a), None, None) => {
                    if a.rsplit_once(':')
                        .and_then(|(_, port)| port.parse::<u16>().ok())
                        .is_none()
                    {
                        return Err(invalid(&at("address"), "use HOST:PORT"));
                    }
                    tls = true;
                }
                (None, Some(s), Some(uid)) => {
                    require_absolute(&at("socket"), s)?;
                    if self.peers[..i].iter().any(|o| o.uid == Some(uid)) {
                        return Err(invalid(
                            &at("uid"),
                            "shared with another peer zone: each zone's daemon needs its own uid",
                        ));
                    }
                }
                (None, Some(_), None) => {
                    return Err(invalid(
                        &at("uid"),
                        "a Unix-socket peer needs the uid its daemon runs as",
                    ))
                }
                _ => {
                    return Err(invalid(
                        &format!("peer[{i}]"),
                        "give either address (mutual TLS) or socket and uid (same host)",
                    ))
                }
            }
        }
        let p = &self.peering;
        if !p.listen.is_empty() {
            p.listen
                .parse::<SocketAddr>()
                .map_err(|e| invalid("peering.listen", format!("{e} (use IP:PORT)")))?;
            tls = true;
        }
        for (k, v) in [
            ("peering.cert", &p.cert),
            ("peering.key", &p.key),
            ("peering.ca", &p.ca),
        ] {
            if let Some(path) = v {
                require_absolute(k, path)?;
            }
        }
        if tls && p.max_connections == 0 {
            return Err(invalid("peering.max_connections", "must be at least 1"));
        }
        if !(1..=600).contains(&p.handshake_timeout_secs) {
            return Err(invalid("peering.handshake_timeout_secs", "must be within 1..=600"));
        }
        if !(1..=86_400).contains(&p.idle_timeout_secs) {
            return Err(invalid("peering.idle_timeout_secs", "must be within 1..=86400"));
        }
        let l = &self.limits;
        if l.max_connections == 0 || l.max_connections_per_uid == 0 {
            return Err(invalid(
                "limits.max_connections",
                "connections limits must be at least 1",
            ));
        }
        for (k, v) in [
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.frame_timeout_secs", l.frame_timeout_secs),
        ] {
            if !(1..=86_400).contains(&v) {
                return Err(invalid(k, "must be within 1..=86400"));
            }
        }
        let r = &self.replication;
        if !(1..=86_400).contains(&r.pull_interval_secs) {
            return Err(invalid("replication.pull_interval_secs", "must be within 1..=86400"));
        }
        if !(1..=3_600).contains(&r.retry_max_secs) {
            return Err(invalid("replication.retry_max_secs", "must be within 1..=3600"));
        }
        Ok(())
    }

    /// Whether any peer or the listener uses TLS (and so needs the
    /// `[peering]` credentials).
    pub fn uses_tls(&self) -> bool {
        !self.peering.listen.is_empty() || self.peers.iter().any(|p| p.address.is_some())
    }

    /// The global admins.
    ///
    /// # Errors
    /// `Invalid` for a malformed principal.
    pub fn admins(&self) -> Result<Vec<Principal>, ConfigError> {
        self.access
            .admins
            .iter()
            .map(|s| s.trim().parse::<Principal>().map_err(|e| invalid("access.admins", e)))
            .collect()
    }

    /// The metrics address, or `None` when metrics are off.
    ///
    /// # Errors
    /// `Invalid` when not an `IP:PORT`.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics.listen.is_empty() {
            return Ok(None);
        }
        self.metrics.listen.parse().map(Some).map_err(|_| {
            invalid(
                "metrics.listen",
                "expected IP:PORT such as 127.0.0.1:9464, or \"\" to disable",
            )
        })
    }
}

fn require_absolute(key: &str, p: &Path) -> Result<(), ConfigError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(invalid(key, format!("{} is not an absolute path", p.display())))
    }
}

/// The `KMSD_*` variables of the process environment.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().filter(|(k, _)| k.starts_with("KMSD_")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        Config::parse(toml, HashMap::new())
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_example_parses() {
        let cfg = parse(
            r#"
            zone = "zone-a"
            socket = "/run/kmsd/kmsd.sock"
            state_dir = "/var/lib/kmsd"
            root_key = "/etc/kmsd/root-key"
            max_frame = 65536
            log_level = "kmsd=debug"
            [access]
            admins = ["uid:0", "gid:27"]
            [replication]
            pull_interval_secs = 10
            retry_max_secs = 2
            [metrics]
            listen = ""
            [[mount]]
            source = "/srv/enc"
            target = "/srv/plain"
            key = "data"
            [[peer]]
            zone = "zone-b"
            socket = "/run/kmsd-b/kmsd.sock"
            uid = 990
            [[peer]]
            zone = "zone-c"
            address = "kms-c.example.net:7443"
            [peering]
            listen = "0.0.0.0:7443"
            cert = "/etc/kmsd/zone.pem"
            key = "/etc/kmsd/zone.key"
            ca = "/etc/kmsd/ca.pem"
            [store]
            backend = "etcd"
            endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
            ca = "/etc/kmsd/etcd-ca.pem"
            cert = "/etc/kmsd/etcd.pem"
            key = "/etc/kmsd/etcd.key"
            request_timeout_secs = 3
            [kubernetes]
            socket = "/run/kmsd/kubernetes/kms-v2.sock"
            key = "cluster"
            mode = 0o660
            group = "kube"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.store.backend, Backend::Etcd);
        let etcd = cfg.etcd_settings();
        assert_eq!(etcd.prefix, "/kmsd/zone-a/", "the default prefix names the zone");
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.request_timeout, std::time::Duration::from_secs(3));
        let tls = etcd.tls.unwrap();
        assert_eq!(tls.identity.unwrap().1, PathBuf::from("/etc/kmsd/etcd.key"));
        assert_eq!(cfg.admins().unwrap(), vec![Principal::Uid(0), Principal::Gid(27)]);
        assert_eq!(cfg.metrics_addr().unwrap(), None);
        assert_eq!(cfg.mounts[0].key, "data");
        assert_eq!(cfg.peers[0].zone, "zone-b");
        assert_eq!(cfg.peers[0].uid, Some(990));
        assert_eq!(cfg.peers[1].address.as_deref(), Some("kms-c.example.net:7443"));
        assert!(cfg.uses_tls());
        assert_eq!(cfg.replication.pull_interval_secs, 10);
        assert_eq!(cfg.kubernetes.key, "cluster");
        assert_eq!(cfg.kubernetes.mode, 0o660);
        assert_eq!(cfg.kubernetes.group.as_deref(), Some("kube"));
    }

    #[test]
    fn the_example_config_shows_the_defaults() {
        assert_eq!(
            parse(include_str!("../../systemd/kmsd.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse("zonee = \"x\"").unwrap_err();
        crate::testutil::assert_states_cause_once(&err);
        let err = crate::keys::error::error_chain(&err);
        assert!(err.contains("zonee"), "{err}");
        assert_eq!(err.matches("zonee").count(), 1, "{err}");
        assert!(parse("[access]\nadmin = []").is_err());
        assert!(parse("[[mount]]\nsource=\"/a\"\ntarget=\"/b\"\nkey=\"k\"\nextra=1").is_err());
        assert!(Config::parse("", env(&[("KMSD_NOPE", "1")])).is_err());
    }

    #[test]
    fn environment_overrides_file() {
        let e = env(&[
            ("KMSD_ZONE", "zone-e"),
            ("KMSD_METRICS__LISTEN", "127.0.0.1:9999"),
            ("KMSD_ACCESS__ADMINS", "uid:1,uid:2"),
            ("KMSD_MAX_FRAME", "8192"),
        ]);
        let cfg = Config::parse("zone = \"zone-f\"", e).unwrap();
        assert_eq!(cfg.zone, "zone-e");
        assert_eq!(cfg.metrics_addr().unwrap(), Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(cfg.admins().unwrap(), vec![Principal::Uid(1), Principal::Uid(2)]);
        assert_eq!(cfg.max_frame, 8192);
        let e = env(&[
            ("KMSD_STORE__BACKEND", "etcd"),
            ("KMSD_STORE__ENDPOINTS", "http://a:2379,http://b:2379"),
        ]);
        let cfg = Config::parse("", e).unwrap();
        assert_eq!(cfg.store.backend, Backend::Etcd);
        assert_eq!(cfg.store.endpoints, ["http://a:2379", "http://b:2379"]);
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let cases = [
            ("zone = \"\"", "zone"),
            ("zone = \"a b\"", "zone"),
            ("socket = \"relative.sock\"", "socket"),
            ("state_dir = \"state\"", "state_dir"),
            ("max_frame = 10", "max_frame"),
            ("log_level = \"info,[\"", "log_level"),
            ("[access]\nadmins = [\"root\"]", "access.admins"),
            ("[metrics]\nlisten = \"nowhere\"", "metrics.listen"),
            ("[[mount]]\nsource=\"/a\"\ntarget=\"/a/b\"\nkey=\"k\"", "mount[0]"),
            ("[[mount]]\nsource=\"a\"\ntarget=\"/b\"\nkey=\"k\"", "mount[0].source"),
            ("zone=\"z\"\n[[peer]]\nzone=\"z\"\nsocket=\"/s\"\nuid=1", "peer[0].zone"),
            (
                "[[peer]]\nzone=\"y\"\nsocket=\"/s\"\nuid=1\n[[peer]]\nzone=\"y\"\nsocket=\"/t\"\nuid=1",
                "peer[1].zone",
            ),
            ("[[peer]]\nzone=\"y\"\nsocket=\"/s\"", "peer[0].uid"),
            ("[[peer]]\nzone=\"y\"\naddress=\"h:1\"\nsocket=\"/s\"\nuid=1", "peer[0]"),
            ("[[peer]]\nzone=\"y\"", "peer[0]"),
            ("[[peer]]\nzone=\"y\"\naddress=\"nohost\"", "peer[0].address"),
            ("[[peer]]\nzone=\"y/x\"\naddress=\"h:1\"", "peer[0].zone"),
            ("[peering]\nlisten = \"nowhere\"", "peering.listen"),
            ("[peering]\ncert = \"zone.pem\"", "peering.cert"),
            (
                "[peering]\nhandshake_timeout_secs = 0",
                "peering.handshake_timeout_secs",
            ),
            ("[access]\npeers = [\"uid:990\"]", "access.peers"),
            ("peer_key = \"/etc/kmsd/peer-key\"", "peer_key"),
            (
                "[[peer]]\nzone=\"y\"\nsocket=\"/s\"\nuid=7\n[[peer]]\nzone=\"x\"\nsocket=\"/t\"\nuid=7",
                "peer[1].uid",
            ),
            ("[limits]\nmax_connections_per_uid = 0", "limits.max_connections"),
            ("[limits]\nframe_timeout_secs = 0", "limits.frame_timeout_secs"),
            (
                "[replication]\npull_interval_secs = 0",
                "replication.pull_interval_secs",
            ),
            ("[replication]\nretry_max_secs = 0", "replication.retry_max_secs"),
            ("[store]\nbackend = \"zookeeper\"", "backend"),
            ("[store]\nbackend = \"etcd\"\nendpoints = []", "store.endpoints"),
            ("[store]\nendpoints = [\"127.0.0.1:2379\"]", "store.endpoints"),
            ("[store]\nendpoints = [\"https://h:2379\"]", "store.ca"),
            ("[store]\ncert = \"/c.pem\"", "store.cert"),
            ("[store]\nca = \"ca.pem\"", "store.ca"),
            ("[store]\nprefix = \"kmsd\"", "store.prefix"),
            ("[store]\nrequest_timeout_secs = 0", "store.request_timeout_secs"),
            ("[kubernetes]\nsocket = \"k.sock\"\nkey = \"k\"", "kubernetes.socket"),
            (
                "[kubernetes]\nsocket = \"/run/kmsd/kmsd.sock\"\nkey = \"k\"",
                "kubernetes.socket",
            ),
            ("[kubernetes]\nsocket = \"/k.sock\"", "kubernetes.key"),
            (
                "[kubernetes]\nsocket = \"/k.sock\"\nkey = \"k\"\nmode = 0o4777",
                "kubernetes.mode",
            ),
            (
                "[kubernetes]\nsocket = \"/k.sock\"\nkey = \"k\"\nmode = 0o066",
                "kubernetes.mode",
            ),
            (
                "[kubernetes]\nsocket = \"/k.sock\"\nkey = \"k\"\ngroup = \"\"",
                "kubernetes.group",
            ),
            ("[store]\nlease_ttl_secs = 1", "store.lease_ttl_secs"),
        ];
        for (toml, key) in cases {
            let err = crate::keys::error::error_chain(&parse(toml).unwrap_err());
            assert!(err.contains(key), "{toml:?} gave {err}");
        }
    }

    #[test]
    fn wrong_types_are_errors() {
        assert!(parse("max_frame = \"big\"").is_err());
        assert!(parse("zone = 5\n[access]\nadmins = \"uid:0\"").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]
        /// Arbitrary text is a config or an error naming why, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        /// Arbitrary values for known keys are accepted or refused, never a panic.
        #[test]
        fn arbitrary_values_never_panic(
            key in proptest::sample::select(vec!["zone", "socket", "state_dir", "root_key", "max_frame", "log_level"]),
            value in "\\PC{0,40}",
        ) {
            let _ = parse(&format!("{key} = {value:?}"));
            let _ = parse(&format!("{key} = {}", value.len()));
        }
    }
}
