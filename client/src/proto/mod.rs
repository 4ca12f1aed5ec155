//! The kmsd wire protocol: request and response types, error codes, and the
//! frame codec.
//!
//! A connection carries frames: a u32 big-endian length followed by a
//! postcard-encoded [`Frame`]. The first request on a connection must be
//! [`Request::Hello`]. Requests may be pipelined; every response carries the
//! id of the request it answers. A request may be answered by zero or more
//! [`Response::Progress`] frames followed by exactly one final response.
//!
//! New variants are only ever appended, so that old peers keep decoding the
//! variants they know.

pub mod codec;
pub mod op;
mod secret;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use codec::{decode_frame_id, CodecError, FrameCodec};
pub use op::{AuditClass, Execution, Op, OpInfo, Target};
pub use secret::Secret;

/// The protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u16 = 1;
/// Default (and suggested) maximum frame body length: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// Largest plaintext accepted by `Encrypt`.
pub const MAX_PLAINTEXT: usize = 64 * 1024;
/// Largest DEK accepted by `Wrap`.
pub const MAX_DEK: usize = 1024;
/// Largest number of items in one batch request.
pub const MAX_BATCH: usize = 4096;
/// Manual rotations allowed per customer key.
pub const MANUAL_ROTATION_LIMIT: u32 = 10;
/// Default automatic rotation period, in days.
pub const DEFAULT_ROTATION_DAYS: u32 = 365;
/// Name of the platform-managed default organization key.
pub const DEFAULT_KEY_NAME: &str = "default";

/// Seconds since the Unix epoch (UTC).
pub type UnixTime = u64;

/// An encryption context: key/value pairs bound to a ciphertext as
/// additional authenticated data. Sorted, so it has one canonical form.
pub type Context = BTreeMap<String, String>;

/// One frame: a request or response with the id that pairs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame<B> {
    /// Chosen by the client, echoed by the server.
    pub id: u64,
    /// The request or response.
    pub body: B,
}

/// Every request a client can make. What kmsd needs to know about each
/// (its [`Op`], name, execution, audit class, target) is in [`op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Must be the first request on a connection.
    Hello {
        protocol: u16,
        client: String,
    },
    /// Daemon status.
    Status,
    /// Create a customer key.
    CreateKey(CreateKey),
    DescribeKey {
        key: String,
    },
    ListKeys,
    EnableKey {
        key: String,
    },
    DisableKey {
        key: String,
    },
    /// Schedule deletion in `days` (7..=30, default 30).
    ScheduleDeletion {
        key: String,
        days: Option<u32>,
    },
    CancelDeletion {
        key: String,
    },
    /// Make a replica of `key` in `zone`.
    ReplicateKey {
        key: String,
        zone: String,
    },
    RotateKey {
        key: String,
    },
    ListRotations {
        key: String,
    },
    /// Enable automatic rotation (period in days, default 365).
    EnableRotation {
        key: String,
        period_days: Option<u32>,
    },
    DisableRotation {
        key: String,
    },
    Encrypt {
        key: String,
        plaintext: Secret,
        context: Context,
    },
    Decrypt {
        blob: Vec<u8>,
        context: Context,
    },
    Wrap {
        key: String,
        dek: Secret,
        context: Context,
    },
    Unwrap {
        blob: Vec<u8>,
        context: Context,
    },
    GenerateDataKey {
        key: String,
        context: Context,
        with_plaintext: bool,
    },
    /// Decrypt `blob` and encrypt the result under the active version of
    /// `to` (default: the blob's own key), inside the daemon.
    ReEncrypt {
        blob: Vec<u8>,
        context: Context,
        to: Option<String>,
        to_context: Option<Context>,
    },
    WrapBatch {
        key: String,
        deks: Vec<Secret>,
        context: Context,
    },
    UnwrapBatch {
        blobs: Vec<Vec<u8>>,
        context: Context,
    },
    GenerateDataKeyBatch {
        key: String,
        count: u32,
        context: Context,
        with_plaintext: bool,
    },
    /// Count files per key version under a mount (target path).
    FsVersions {
        mount: String,
    },
    /// Re-wrap every file header under a mount to the active version.
    FsRewrap {
        mount: String,
    },
    /// Daemon to daemon: a replication message (multi-zone keys), accepted
    /// only from a configured peer zone's uid; see [`ReplicationFrame`].
    Replication(ReplicationFrame),
    /// On the primary: stop replicating `key` to `zone`, whose replica is
    /// removed (appended last: the wire order of variants is the format).
    UnreplicateKey {
        key: String,
        zone: String,
    },
    /// In a replica zone: make this zone the key's primary (failover).
    PromoteKey {
        key: String,
    },
    /// The counters of every mounted filesystem (kmsd asks its mount
    /// processes; a mount process answers for itself).
    FsStats,
    /// One data key per context, all under `key`'s active version (a mount
    /// process makes the keys of its next new files in one request, each
    /// bound to its own file id).
    GenerateDataKeys {
        key: String,
        contexts: Vec<Context>,
        with_plaintext: bool,
    },
    /// The key store's health and whether this daemon leads its zone's
    /// scheduled work (etcd fleets).
    StoreStatus,
    /// A consistent snapshot of every key of the zone, material included,
    /// for `kmsctl backup` to seal (global admins only).
    Backup,
}

/// Parameters of `key create`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKey {
    pub name: Option<String>,
    pub description: String,
    /// `None`: automatic rotation every 365 days; `Some(None)`: no automatic
    /// rotation; `Some(Some(d))`: every `d` days.
    pub rotation: Option<Option<u32>>,
}

/// Every response the daemon can send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        server: String,
        protocol: u16,
        zone: String,
    },
    Status(StatusInfo),
    Key(KeyInfo),
    Keys(Vec<KeyInfo>),
    Rotations(Vec<RotationEntry>),
    /// A ciphertext blob (encrypt, wrap, re-encrypt).
    Blob(Vec<u8>),
    /// Plaintext (decrypt, unwrap).
    Plaintext(Secret),
    DataKey(DataKey),
    Blobs(Vec<Vec<u8>>),
    /// Per-item results of a batch unwrap.
    Plaintexts(Vec<Result<Secret, ErrorReply>>),
    DataKeys(Vec<DataKey>),
    /// Success with nothing to return.
    Done,
    FsVersions(FsVersionsInfo),
    FsRewrap(FsRewrapInfo),
    /// Intermediate progress of a long request; a final response follows.
    Progress {
        done: u64,
        total: u64,
    },
    Error(ErrorReply),
    /// Daemon to daemon: the answer to a [`Request::Replication`].
    Replication(ReplicationFrame),
    FsStats(Vec<FsStatsInfo>),
    StoreStatus(StoreStatusInfo),
    /// The zone's snapshot: kmsd's own format, opaque to clients, holding
    /// every key's material.
    Backup(Secret),
}

impl Response {
    /// The variant's name, for error messages. Never includes the payload,
    /// which may be plaintext.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "Hello",
            Response::Status(_) => "Status",
            Response::Key(_) => "Key",
            Response::Keys(_) => "Keys",
            Response::Rotations(_) => "Rotations",
            Response::Blob(_) => "Blob",
            Response::Plaintext(_) => "Plaintext",
            Response::DataKey(_) => "DataKey",
            Response::Blobs(_) => "Blobs",
            Response::Plaintexts(_) => "Plaintexts",
            Response::DataKeys(_) => "DataKeys",
            Response::Done => "Done",
            Response::FsVersions(_) => "FsVersions",
            Response::FsRewrap(_) => "FsRewrap",
            Response::Progress { .. } => "Progress",
            Response::Error(_) => "Error",
            Response::Replication(_) => "Replication",
            Response::FsStats(_) => "FsStats",
            Response::StoreStatus(_) => "StoreStatus",
            Response::Backup(_) => "Backup",
        }
    }
}

/// A message between the daemons of two zones. It travels only inside an
/// authenticated channel (mutual TLS, or a Unix socket whose peer uid names
/// the zone), and `from_zone` must be the zone that channel authenticated.
/// `message` is the daemon's business (it may hold key material) and is
/// never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationFrame {
    pub from_zone: String,
    pub to_zone: String,
    pub message: Vec<u8>,
}

impl fmt::Debug for ReplicationFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationFrame")
            .field("from_zone", &self.from_zone)
            .field("to_zone", &self.to_zone)
            .field("message_len", &self.message.len())
            .finish()
    }
}

/// A generated data key: the blob to store and, when asked, the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKey {
    pub blob: Vec<u8>,
    pub plaintext: Option<Secret>,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Stable error codes. Their string forms are part of the CLI and JSON
/// contract and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    Malformed,
    UnsupportedProtocol,
    NotFound,
    PermissionDenied,
    Disabled,
    Forbidden,
    NotPrimary,
    RotationEnabled,
    LimitExceeded,
    InvalidArgument,
    DecryptFailed,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedProtocol,
        ErrorCode::NotFound,
        ErrorCode::PermissionDenied,
        ErrorCode::Disabled,
        ErrorCode::Forbidden,
        ErrorCode::NotPrimary,
        ErrorCode::RotationEnabled,
        ErrorCode::LimitExceeded,
        ErrorCode::InvalidArgument,
        ErrorCode::DecryptFailed,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedProtocol => "unsupported-protocol",
            ErrorCode::NotFound => "not-found",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::Disabled => "disabled",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotPrimary => "not-primary",
            ErrorCode::RotationEnabled => "rotation-enabled",
            ErrorCode::LimitExceeded => "limit-exceeded",
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::DecryptFailed => "decrypt-failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `customer` or `default-organization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyKind {
    Customer,
    DefaultOrganization,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Customer => "customer",
            KeyKind::DefaultOrganization => "default-organization",
        })
    }
}

/// Where a key's material comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyRole {
    /// Lives in one zone only.
    SingleZone,
    /// Rotates here; replicas in other zones receive its versions.
    Primary,
    /// Receives versions from the primary in `primary_zone`.
    Replica { primary_zone: String },
}

impl fmt::Display for KeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRole::SingleZone => f.write_str("single-zone"),
            KeyRole::Primary => f.write_str("primary"),
            KeyRole::Replica { primary_zone } => {
                write!(f, "replica (primary in zone {primary_zone})")
            }
        }
    }
}

/// Key lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    Enabled,
    Disabled,
    /// Deleted for good at `delete_at` unless cancelled.
    PendingDeletion {
        delete_at: UnixTime,
    },
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyState::Enabled => f.write_str("enabled"),
            KeyState::Disabled => f.write_str("disabled"),
            KeyState::PendingDeletion { delete_at } => {
                write!(f, "pending-deletion (on {})", fmt_time(*delete_at))
            }
        }
    }
}

/// How a key version came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Initial,
    Automatic,
    Manual,
    Replicated,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Initial => "initial",
            Origin::Automatic => "automatic",
            Origin::Manual => "manual",
            Origin::Replicated => "replicated",
        })
    }
}

/// Who may use or administer a key: a uid or a gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Principal {
    Uid(u32),
    Gid(u32),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Uid(u) => write!(f, "uid:{u}"),
            Principal::Gid(g) => write!(f, "gid:{g}"),
        }
    }
}

impl std::str::FromStr for Principal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid principal {s:?}: expected uid:N or gid:N");
        let (kind, num) = s.split_once(':').ok_or_else(bad)?;
        let n: u32 = num.parse().map_err(|_| bad())?;
        match kind {
            "uid" => Ok(Principal::Uid(n)),
            "gid" => Ok(Principal::Gid(n)),
            _ => Err(bad()),
        }
    }
}

/// A key's access policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// May encrypt, decrypt, wrap, unwrap, generate and re-encrypt.
    pub users: Vec<Principal>,
    /// May describe, enable, disable, rotate, change rotation, delete.
    pub admins: Vec<Principal>,
    /// Anyone who can reach the socket may use the key (default key only).
    pub public_use: bool,
}

/// One key version as shown to clients (never the material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u32,
    pub created_at: UnixTime,
    pub origin: Origin,
}

/// The rotation block of `key describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationInfo {
    pub enabled: bool,
    pub period_days: Option<u32>,
    pub next_rotation_at: Option<UnixTime>,
    pub manual_used: u32,
    pub manual_limit: u32,
}

/// A replica as seen from its primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub zone: String,
    /// Newest version the replica confirmed holding.
    pub confirmed_version: Option<u32>,
}

/// Everything `key describe` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: Option<String>,
    pub description: String,
    pub kind: KeyKind,
    pub zone: String,
    pub role: KeyRole,
    pub state: KeyState,
    pub created_at: UnixTime,
    pub active_version: u32,
    pub versions: Vec<VersionInfo>,
    pub rotation: RotationInfo,
    pub policy: Policy,
    pub replicas: Vec<ReplicaInfo>,
}

/// One line of `key rotations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationEntry {
    pub version: u32,
    pub at: UnixTime,
    pub origin: Origin,
}

/// Daemon status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub server: String,
    pub zone: String,
    pub uptime_secs: u64,
    pub keys: u64,
    pub connections: u64,
    pub mounts: Vec<MountInfo>,
}

/// The key store as `kmsctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatusInfo {
    /// `file` or `etcd`.
    pub backend: String,
    /// Why the store cannot be reached now; `None` when it can.
    pub problem: Option<String>,
    /// Whether this daemon runs the zone's scheduled rotations, deletions
    /// and replication (always, with the file store).
    pub leader: bool,
}

/// A mounted encrypted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub source: String,
    pub target: String,
    pub key: String,
}

/// Result of `fs versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsVersionsInfo {
    pub key_id: Uuid,
    pub active_version: u32,
    /// (version, number of files), ascending by version.
    pub counts: Vec<(u32, u64)>,
    /// Files whose header could not be read (tampered or foreign).
    pub unreadable: u64,
}

/// The counters of one mounted filesystem, for kmsd's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStatsInfo {
    /// The mount's target.
    pub mount: String,
    /// Operations by kind (`lookup`, `read`, ...).
    pub ops: Vec<(String, u64)>,
    pub dek_cache_hits: u64,
    pub dek_cache_misses: u64,
    pub tamper_detections: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Result of `fs rewrap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRewrapInfo {
    pub rewrapped: u64,
    pub already_current: u64,
    pub failed: u64,
}

/// Formats a Unix time as RFC 3339 (UTC, seconds).
pub fn fmt_time(t: UnixTime) -> String {
    let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
    humantime::format_rfc3339_seconds(st).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_strings_are_distinct_and_kebab() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()));
            assert!(c.as_str().chars().all(|ch| ch.is_ascii_lowercase() || ch == '-'));
        }
    }

    #[test]
    fn json_uses_the_cli_spelling_and_postcard_the_variant_index() {
        assert_eq!(serde_json::to_string(&ErrorCode::NotFound).unwrap(), "\"not-found\"");
        assert_eq!(
            serde_json::to_string(&KeyKind::DefaultOrganization).unwrap(),
            "\"default-organization\""
        );
        assert_eq!(postcard::to_allocvec(&ErrorCode::NotFound).unwrap(), vec![2]);
    }

    #[test]
    fn replication_variants_are_appended() {
        let frame = ReplicationFrame {
            from_zone: "a".into(),
            to_zone: "b".into(),
            message: vec![1, 2, 3],
        };
        let req = postcard::to_allocvec(&Request::Replication(frame.clone())).unwrap();
        assert_eq!(req[0], 25);
        let resp = postcard::to_allocvec(&Response::Replication(frame.clone())).unwrap();
        assert_eq!(resp[0], 16);
        assert!(!format!("{frame:?}").contains("[1, 2, 3]"));
    }

    /// A secret byte that no other field of the values below contains, in
    /// the decimal form `Debug` of a `Vec<u8>` would print it.
    const SECRET_BYTE: u8 = 0xa7;
    const SHOWN: &str = "167";

    fn secret() -> Secret {
        vec![SECRET_BYTE; 32].into()
    }

    fn assert_redacted(value: &impl fmt::Debug) {
        let text = format!("{value:?}");
        assert!(!text.contains(SHOWN), "secret bytes in {text}");
        assert!(text.contains("redacted"), "{text}");
        let pretty = format!("{value:#?}");
        assert!(!pretty.contains(SHOWN), "secret bytes in {pretty}");
    }

    #[test]
    fn debug_of_requests_carrying_plaintext_shows_no_secret_bytes() {
        let ctx = Context::from([("tenant".to_string(), "7".to_string())]);
        assert_redacted(&Request::Encrypt {
            key: "app".into(),
            plaintext: secret(),
            context: ctx.clone(),
        });
        assert_redacted(&Request::Wrap {
            key: "app".into(),
            dek: secret(),
            context: ctx.clone(),
        });
        assert_redacted(&Frame {
            id: 9,
            body: Request::WrapBatch {
                key: "app".into(),
                deks: vec![secret(), secret()],
                context: ctx,
            },
        });
    }

    #[test]
    fn debug_of_responses_and_data_keys_shows_no_key_bytes() {
        let dk = DataKey {
            blob: vec![1, 2, 3],
            plaintext: Some(secret()),
        };
        assert_redacted(&dk);
        assert_redacted(&Response::DataKey(dk.clone()));
        assert_redacted(&Response::DataKeys(vec![dk]));
        assert_redacted(&Response::Plaintext(secret()));
        let items = vec![Ok(secret()), Err(ErrorReply::new(ErrorCode::DecryptFailed, "x"))];
        assert_redacted(&Response::Plaintexts(items));
    }

    #[test]
    fn secrets_keep_the_wire_format() {
        let plain = vec![SECRET_BYTE; 4];
        let req = Request::Wrap {
            key: "k".into(),
            dek: plain.clone().into(),
            context: Context::new(),
        };
        let bytes = postcard::to_allocvec(&req).unwrap();
        // Variant 16, "k", the DEK as length and bytes, an empty context.
        let mut want = vec![16, 1, b'k', 4];
        want.extend_from_slice(&plain);
        want.push(0);
        assert_eq!(bytes, want);
        assert_eq!(postcard::from_bytes::<Request>(&bytes).unwrap(), req);
    }

    #[test]
    fn principal_parses_and_prints() {
        assert_eq!("uid:1000".parse::<Principal>().unwrap(), Principal::Uid(1000));
        assert_eq!("gid:5".parse::<Principal>().unwrap().to_string(), "gid:5");
        assert!("user:1".parse::<Principal>().is_err());
        assert!("uid:x".parse::<Principal>().is_err());
    }
}
