//! One descriptor per operation: everything kmsd needs to know about an
//! operation besides how to perform it, written down once.
//!
//! - [`Request::op`] says which [`Op`] a request is, and [`Request::target`]
//!   what key (or blob, which names key and version) it acts on. Both are one
//!   exhaustive `match`, so a new `Request` variant does not compile until it
//!   is described here.
//! - [`Op::info`] holds the static facts of each operation ([`OpInfo`]): its
//!   stable name (metrics label, audit `op`), how the daemon runs it, and
//!   its audit class. It too is an exhaustive `match`.
//! - [`Op::ALL`] lists every operation; it is generated with the enum, so
//!   it cannot miss one. Metrics iterate it.
//!
//! The daemon's dispatch (`daemon/src/ops.rs`, `server.rs`), metrics and
//! audit log derive from these; none of them lists operations by name.

use super::Request;

/// Declares [`Op`] and [`Op::ALL`] from one list of variants, so that the
/// list of every operation is complete by construction.
macro_rules! operations {
    ($(#[$meta:meta])* pub enum Op { $($(#[$vmeta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        pub enum Op {
            $($(#[$vmeta])* $variant,)+
        }

        impl Op {
            /// Every operation, in the order of the `Request` variants.
            pub const ALL: &'static [Op] = &[$(Op::$variant,)+];
        }
    };
}

operations! {
    /// A protocol operation: one per [`Request`] variant, in the same order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Op {
        Hello,
        Status,
        CreateKey,
        DescribeKey,
        ListKeys,
        EnableKey,
        DisableKey,
        ScheduleDeletion,
        CancelDeletion,
        ReplicateKey,
        RotateKey,
        ListRotations,
        EnableRotation,
        DisableRotation,
        Encrypt,
        Decrypt,
        Wrap,
        Unwrap,
        GenerateDataKey,
        ReEncrypt,
        WrapBatch,
        UnwrapBatch,
        GenerateDataKeyBatch,
        FsVersions,
        FsRewrap,
        Replication,
        UnreplicateKey,
        PromoteKey,
        FsStats,
        GenerateDataKeys,
        StoreStatus,
        Backup,
    }
}

/// How kmsd runs an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// In memory and short: answered on the connection's task.
    Inline,
    /// Writes the key store (write, fsync, rename), walks a filesystem or
    /// asks the mount processes: run on the blocking pool, off the async
    /// threads.
    Blocking,
    /// Blocking, and sends `Progress` frames before its final answer.
    BlockingWithProgress,
    /// Talks to the daemons of other zones: answered asynchronously by the
    /// replicator when peers are configured, else refused `unavailable`.
    Peers,
}

impl Execution {
    /// Whether it must stay off the async threads.
    pub fn blocks(self) -> bool {
        matches!(self, Execution::Blocking | Execution::BlockingWithProgress)
    }
}

/// What the audit log records of an operation. Failures of audited
/// operations are always recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditClass {
    /// Not a key operation (handshake, status, listing): never recorded.
    Unaudited,
    /// Key management: every answer recorded.
    Management,
    /// A high-volume use of a key: successes recorded only with
    /// `[audit] data_operations = true`.
    Data,
}

/// The static facts of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpInfo {
    /// Stable kebab-case name: the metrics `op` label and the audit `op`.
    /// Part of the metrics and audit contract: never changed.
    pub name: &'static str,
    /// How kmsd runs it.
    pub execution: Execution,
    /// What the audit log records of it.
    pub audit: AuditClass,
}

const fn info(name: &'static str, execution: Execution, audit: AuditClass) -> OpInfo {
    OpInfo { name, execution, audit }
}

impl Op {
    /// The operation's descriptor.
    pub const fn info(self) -> OpInfo {
        use AuditClass::{Data, Management, Unaudited};
        use Execution::{Blocking, BlockingWithProgress, Inline, Peers};
        match self {
            Op::Hello => info("hello", Inline, Unaudited),
            // Lists the mounts by asking each mount process on its socket.
            Op::Status => info("status", Blocking, Unaudited),
            Op::CreateKey => info("key-create", Blocking, Management),
            Op::DescribeKey => info("key-describe", Inline, Management),
            Op::ListKeys => info("key-list", Inline, Unaudited),
            Op::EnableKey => info("key-enable", Blocking, Management),
            Op::DisableKey => info("key-disable", Blocking, Management),
            Op::ScheduleDeletion => info("key-schedule-deletion", Blocking, Management),
            Op::CancelDeletion => info("key-cancel-deletion", Blocking, Management),
            Op::ReplicateKey => info("key-replicate", Peers, Management),
            Op::RotateKey => info("key-rotate", Blocking, Management),
            Op::ListRotations => info("key-rotations", Inline, Management),
            Op::EnableRotation => info("rotation-enable", Blocking, Management),
            Op::DisableRotation => info("rotation-disable", Blocking, Management),
            Op::Encrypt => info("encrypt", Inline, Data),
            Op::Decrypt => info("decrypt", Inline, Data),
            Op::Wrap => info("wrap", Inline, Data),
            Op::Unwrap => info("unwrap", Inline, Data),
            Op::GenerateDataKey => info("generate-data-key", Inline, Data),
            Op::ReEncrypt => info("re-encrypt", Inline, Data),
            Op::WrapBatch => info("wrap-batch", Inline, Data),
            Op::UnwrapBatch => info("unwrap-batch", Inline, Data),
            Op::GenerateDataKeyBatch => info("generate-data-key-batch", Inline, Data),
            Op::FsVersions => info("fs-versions", Blocking, Management),
            Op::FsRewrap => info("fs-rewrap", BlockingWithProgress, Management),
            Op::Replication => info("replication", Peers, Management),
            Op::UnreplicateKey => info("key-unreplicate", Peers, Management),
            Op::PromoteKey => info("key-promote", Blocking, Management),
            Op::FsStats => info("fs-stats", Blocking, Unaudited),
            Op::GenerateDataKeys => info("generate-data-keys", Inline, Data),
            Op::StoreStatus => info("store-status", Inline, Unaudited),
            // Reads the whole store (etcd: one consistent read).
            Op::Backup => info("backup", Blocking, Management),
        }
    }

    /// The stable name ([`OpInfo::name`]).
    pub const fn name(self) -> &'static str {
        self.info().name
    }

    /// Position in [`Op::ALL`], for tables indexed by operation.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a request acts on, read before it runs: the subject of metrics
/// and audit lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// No key.
    Nothing,
    /// A key as the caller named it: its id or its name.
    Key(&'a str),
    /// A blob (the first of a batch), whose header names key id and version.
    Blob(&'a [u8]),
}

impl Target<'_> {
    /// The key (as named, or the id a blob's header holds) and the version
    /// a blob names. A blob that does not parse names nothing.
    pub fn key_and_version(&self) -> (Option<String>, Option<u32>) {
        match self {
            Target::Nothing => (None, None),
            Target::Key(k) => (Some((*k).to_string()), None),
            Target::Blob(b) => match crate::blob::BlobHeader::parse(b) {
                Ok(h) => (Some(h.key_id.to_string()), Some(h.version)),
                Err(_) => (None, None),
            },
        }
    }
}

impl Request {
    /// The operation this request performs.
    pub fn op(&self) -> Op {
        self.describe().0
    }

    /// What the request acts on.
    pub fn target(&self) -> Target<'_> {
        self.describe().1
    }

    /// The one exhaustive match from a request to its operation and target.
    fn describe(&self) -> (Op, Target<'_>) {
        use Target::{Blob, Key, Nothing};
        match self {
            Request::Hello { .. } => (Op::Hello, Nothing),
            Request::Status => (Op::Status, Nothing),
            Request::CreateKey(c) => (Op::CreateKey, c.name.as_deref().map_or(Nothing, Key)),
            Request::DescribeKey { key } => (Op::DescribeKey, Key(key)),
            Request::ListKeys => (Op::ListKeys, Nothing),
            Request::EnableKey { key } => (Op::EnableKey, Key(key)),
            Request::DisableKey { key } => (Op::DisableKey, Key(key)),
            Request::ScheduleDeletion { key, .. } => (Op::ScheduleDeletion, Key(key)),
            Request::CancelDeletion { key } => (Op::CancelDeletion, Key(key)),
            Request::ReplicateKey { key, .. } => (Op::ReplicateKey, Key(key)),
            Request::RotateKey { key } => (Op::RotateKey, Key(key)),
            Request::ListRotations { key } => (Op::ListRotations, Key(key)),
            Request::EnableRotation { key, .. } => (Op::EnableRotation, Key(key)),
            Request::DisableRotation { key } => (Op::DisableRotation, Key(key)),
            Request::Encrypt { key, .. } => (Op::Encrypt, Key(key)),
            Request::Decrypt { blob, .. } => (Op::Decrypt, Blob(blob)),
            Request::Wrap { key, .. } => (Op::Wrap, Key(key)),
            Request::Unwrap { blob, .. } => (Op::Unwrap, Blob(blob)),
            Request::GenerateDataKey { key, .. } => (Op::GenerateDataKey, Key(key)),
            Request::ReEncrypt { blob, .. } => (Op::ReEncrypt, Blob(blob)),
            Request::WrapBatch { key, .. } => (Op::WrapBatch, Key(key)),
            Request::UnwrapBatch { blobs, .. } => (Op::UnwrapBatch, blobs.first().map_or(Nothing, |b| Blob(b))),
            Request::GenerateDataKeyBatch { key, .. } => (Op::GenerateDataKeyBatch, Key(key)),
            Request::FsVersions { .. } => (Op::FsVersions, Nothing),
            Request::FsRewrap { .. } => (Op::FsRewrap, Nothing),
            Request::Replication(_) => (Op::Replication, Nothing),
            Request::UnreplicateKey { key, .. } => (Op::UnreplicateKey, Key(key)),
            Request::PromoteKey { key } => (Op::PromoteKey, Key(key)),
            Request::FsStats => (Op::FsStats, Nothing),
            Request::GenerateDataKeys { key, .. } => (Op::GenerateDataKeys, Key(key)),
            Request::StoreStatus => (Op::StoreStatus, Nothing),
            Request::Backup => (Op::Backup, Nothing),
        }
    }

    /// Plaintext bytes the request brings to be encrypted or wrapped.
    pub fn plaintext_len(&self) -> usize {
        match self {
            Request::Encrypt { plaintext, .. } => plaintext.len(),
            Request::Wrap { dek, .. } => dek.len(),
            Request::WrapBatch { deks, .. } => deks.iter().map(|d| d.len()).sum(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobHeader;
    use crate::proto::{Context, CreateKey, ReplicationFrame};

    fn blob(version: u32) -> Vec<u8> {
        let mut b = BlobHeader {
            key_id: uuid::Uuid::nil(),
            version,
            nonce: [0; 12],
        }
        .to_bytes()
        .to_vec();
        b.extend_from_slice(&[0; 16]);
        b
    }

    /// A request of every operation. The match is exhaustive: a new `Op`
    /// does not compile until it has a sample here, and the test below then
    /// checks that some `Request` variant maps onto it.
    fn sample(op: Op) -> Request {
        let key = || "k".to_string();
        let ctx = Context::new;
        match op {
            Op::Hello => Request::Hello {
                protocol: 1,
                client: "t".into(),
            },
            Op::Status => Request::Status,
            Op::CreateKey => Request::CreateKey(CreateKey {
                name: Some(key()),
                ..CreateKey::default()
            }),
            Op::DescribeKey => Request::DescribeKey { key: key() },
            Op::ListKeys => Request::ListKeys,
            Op::EnableKey => Request::EnableKey { key: key() },
            Op::DisableKey => Request::DisableKey { key: key() },
            Op::ScheduleDeletion => Request::ScheduleDeletion { key: key(), days: None },
            Op::CancelDeletion => Request::CancelDeletion { key: key() },
            Op::ReplicateKey => Request::ReplicateKey {
                key: key(),
                zone: "b".into(),
            },
            Op::RotateKey => Request::RotateKey { key: key() },
            Op::ListRotations => Request::ListRotations { key: key() },
            Op::EnableRotation => Request::EnableRotation {
                key: key(),
                period_days: None,
            },
            Op::DisableRotation => Request::DisableRotation { key: key() },
            Op::Encrypt => Request::Encrypt {
                key: key(),
                plaintext: vec![1; 5].into(),
                context: ctx(),
            },
            Op::Decrypt => Request::Decrypt {
                blob: blob(3),
                context: ctx(),
            },
            Op::Wrap => Request::Wrap {
                key: key(),
                dek: vec![1; 32].into(),
                context: ctx(),
            },
            Op::Unwrap => Request::Unwrap {
                blob: blob(3),
                context: ctx(),
            },
            Op::GenerateDataKey => Request::GenerateDataKey {
                key: key(),
                context: ctx(),
                with_plaintext: true,
            },
            Op::ReEncrypt => Request::ReEncrypt {
                blob: blob(3),
                context: ctx(),
                to: None,
                to_context: None,
            },
            Op::WrapBatch => Request::WrapBatch {
                key: key(),
                deks: vec![vec![1; 32].into(), vec![1; 16].into()],
                context: ctx(),
            },
            Op::UnwrapBatch => Request::UnwrapBatch {
                blobs: vec![blob(3), blob(4)],
                context: ctx(),
            },
            Op::GenerateDataKeyBatch => Request::GenerateDataKeyBatch {
                key: key(),
                count: 2,
                context: ctx(),
                with_plaintext: false,
            },
            Op::FsVersions => Request::FsVersions { mount: "/m".into() },
            Op::FsRewrap => Request::FsRewrap { mount: "/m".into() },
            Op::Replication => Request::Replication(ReplicationFrame {
                from_zone: "a".into(),
                to_zone: "b".into(),
                message: vec![],
            }),
            Op::UnreplicateKey => Request::UnreplicateKey {
                key: key(),
                zone: "b".into(),
            },
            Op::PromoteKey => Request::PromoteKey { key: key() },
            Op::FsStats => Request::FsStats,
            Op::GenerateDataKeys => Request::GenerateDataKeys {
                key: key(),
                contexts: vec![ctx(), ctx()],
                with_plaintext: true,
            },
            Op::StoreStatus => Request::StoreStatus,
            Op::Backup => Request::Backup,
        }
    }

    #[test]
    fn every_op_has_a_request_variant_and_all_lists_each_once_in_order() {
        for (i, &op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "{op:?} out of order in Op::ALL");
            let req = sample(op);
            assert_eq!(req.op(), op, "{req:?}");
            // The variant index on the wire is the operation's index: Op
            // follows the append-only order of Request.
            assert_eq!(usize::from(postcard::to_allocvec(&req).unwrap()[0]), i, "{op:?}");
        }
    }

    #[test]
    fn names_are_distinct_kebab_case_and_keep_their_contract() {
        let mut seen = std::collections::HashSet::new();
        for op in Op::ALL {
            let name = op.name();
            assert!(seen.insert(name), "{name} twice");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '-'), "{name}");
        }
        // A few labels that dashboards and audit readers already use.
        assert_eq!(Op::Wrap.name(), "wrap");
        assert_eq!(Op::RotateKey.to_string(), "key-rotate");
        assert_eq!(Op::GenerateDataKeyBatch.name(), "generate-data-key-batch");
    }

    #[test]
    fn only_store_writes_and_filesystem_walks_block() {
        let blocking: Vec<_> = Op::ALL.iter().filter(|o| o.info().execution.blocks()).collect();
        assert!(blocking.contains(&&Op::RotateKey) && blocking.contains(&&Op::FsRewrap));
        assert!(!Op::Wrap.info().execution.blocks() && !Op::ListKeys.info().execution.blocks());
        assert_eq!(Op::FsRewrap.info().execution, Execution::BlockingWithProgress);
        assert_eq!(Op::Replication.info().execution, Execution::Peers);
    }

    #[test]
    fn targets_name_the_key_or_the_blob_header() {
        let (key, version) = sample(Op::Wrap).target().key_and_version();
        assert_eq!((key.as_deref(), version), (Some("k"), None));
        let nil = uuid::Uuid::nil().to_string();
        for op in [Op::Decrypt, Op::Unwrap, Op::ReEncrypt, Op::UnwrapBatch] {
            assert_eq!(
                sample(op).target().key_and_version(),
                (Some(nil.clone()), Some(3)),
                "{op:?}"
            );
        }
        assert_eq!(sample(Op::Status).target(), Target::Nothing);
        assert_eq!(Target::Blob(b"short").key_and_version(), (None, None));
        assert_eq!(sample(Op::CreateKey).target(), Target::Key("k"));
        let unnamed = Request::CreateKey(CreateKey::default());
        assert_eq!(unnamed.target(), Target::Nothing);
    }

    #[test]
    fn plaintext_len_counts_what_is_encrypted_or_wrapped() {
        assert_eq!(sample(Op::Encrypt).plaintext_len(), 5);
        assert_eq!(sample(Op::Wrap).plaintext_len(), 32);
        assert_eq!(sample(Op::WrapBatch).plaintext_len(), 48);
        assert_eq!(sample(Op::Decrypt).plaintext_len(), 0);
    }
}
