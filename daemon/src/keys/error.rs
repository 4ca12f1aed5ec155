//! Errors of the key service, each mapped to one stable wire code.

use kms_client::proto::{ErrorCode, ErrorReply};

use super::store::error::StoreError;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key {0} not found")]
    NotFound(String),
    #[error("uid {uid} may not {action} key {key}")]
    PermissionDenied {
        uid: u32,
        action: &'static str,
        key: String,
    },
    #[error("key {key} is {state} and serves nothing")]
    Disabled { key: String, state: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("key {key} is a replica; rotate it in its primary zone {primary_zone}")]
    NotPrimary { key: String, primary_zone: String },
    #[error("automatic rotation is enabled every {period} days; disable it, then enable it with the new period")]
    RotationEnabled { period: u32 },
    #[error("key {key} has used all {limit} manual rotations")]
    LimitExceeded { key: String, limit: u32 },
    #[error("uid {uid} already administers {limit} keys in this zone (limits.keys_per_uid)")]
    QuotaExceeded { uid: u32, limit: usize },
    #[error("zone {zone} already has {limit} replicas here")]
    ReplicaQuota { zone: String, limit: usize },
    #[error("{0}")]
    InvalidArgument(String),
    /// An export older than what this zone holds: a replayed frame, or an
    /// answer that crossed a newer one.
    #[error("stale export of key {key}: epoch {got_epoch} serial {got_serial}, but this zone holds epoch {held_epoch} serial {held_serial}")]
    Stale {
        key: String,
        got_epoch: u32,
        got_serial: u64,
        held_epoch: u32,
        held_serial: u64,
    },
    #[error("cannot decrypt: {0}")]
    DecryptFailed(&'static str),
    #[error("key store unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            Error::Disabled { .. } => ErrorCode::Disabled,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::NotPrimary { .. } => ErrorCode::NotPrimary,
            Error::RotationEnabled { .. } => ErrorCode::RotationEnabled,
            Error::LimitExceeded { .. } | Error::QuotaExceeded { .. } | Error::ReplicaQuota { .. } => {
                ErrorCode::LimitExceeded
            }
            Error::InvalidArgument(_) | Error::Stale { .. } => ErrorCode::InvalidArgument,
            Error::DecryptFailed(_) => ErrorCode::DecryptFailed,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for ErrorReply {
    fn from(e: Error) -> Self {
        let message = match &e {
            // With the store's causes (e.g. "No space left on device").
            Error::Unavailable(_) => error_chain(&e),
            _ => e.to_string(),
        };
        ErrorReply::new(e.code(), message)
    }
}

/// Renders an error's source chain, outermost first.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Result of key operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
