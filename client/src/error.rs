//! The client layer's error type, shared by the async and blocking clients.
//!
//! A [`ClientError`] says which side failed: the socket could not be opened
//! ([`ClientError::Connect`]), the stream broke ([`ClientError::Io`],
//! [`ClientError::Codec`], [`ClientError::Closed`]), the daemon refused the
//! request with a stable code ([`ClientError::Server`]), or the two sides do
//! not agree on the protocol.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::proto::{CodecError, ErrorCode, ErrorReply};

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be opened.
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed (including a read timeout).
    #[error("i/o error on the kmsd connection")]
    Io(#[from] io::Error),
    /// A frame could not be encoded, or one was too large.
    #[error("frame error")]
    Codec(#[from] CodecError),
    /// The daemon answered with an error reply.
    #[error(transparent)]
    Server(#[from] ErrorReply),
    /// The daemon answered with a response that does not fit the request.
    #[error("unexpected response: {0}")]
    UnexpectedResponse(String),
    /// The connection ended before the request was answered. `cause` is
    /// what ended it, when known.
    #[error("connection to kmsd closed")]
    Closed {
        #[source]
        cause: Option<Arc<ClientError>>,
    },
    /// The daemon does not speak our protocol version.
    #[error("kmsd does not speak protocol version {client}: {detail}")]
    UnsupportedProtocol { client: u16, detail: String },
}

impl ClientError {
    /// The stable error code, when the error carries one (server replies
    /// and protocol refusal); `None` for local and transport errors.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(reply) => Some(reply.code),
            ClientError::UnsupportedProtocol { .. } => Some(ErrorCode::UnsupportedProtocol),
            ClientError::Closed { cause: Some(cause) } => cause.code(),
            _ => None,
        }
    }

    /// True when the daemon could not be reached or the connection was
    /// lost: retrying on a fresh connection may succeed.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed { .. }
        ) || matches!(self, ClientError::Codec(CodecError::Io(_)))
    }

    /// A `Closed` error without a known cause.
    pub(crate) fn closed() -> Self {
        ClientError::Closed { cause: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_comes_from_server_replies_only() {
        let server = ClientError::Server(ErrorReply::new(ErrorCode::NotFound, "no key x"));
        assert_eq!(server.code(), Some(ErrorCode::NotFound));
        assert_eq!(server.to_string(), "not-found: no key x");
        assert_eq!(ClientError::closed().code(), None);
        let io = ClientError::Io(io::Error::other("boom"));
        assert_eq!(io.code(), None);
        assert!(io.is_connection_error());
    }

    #[test]
    fn closed_reports_the_code_of_its_cause() {
        let cause = ClientError::Server(ErrorReply::new(ErrorCode::Malformed, "too big"));
        let closed = ClientError::Closed {
            cause: Some(Arc::new(cause)),
        };
        assert_eq!(closed.code(), Some(ErrorCode::Malformed));
        assert!(closed.is_connection_error());
    }

    #[test]
    fn unsupported_protocol_has_its_code() {
        let e = ClientError::UnsupportedProtocol {
            client: 1,
            detail: "server speaks 2".into(),
        };
        assert_eq!(e.code(), Some(ErrorCode::UnsupportedProtocol));
    }
}
