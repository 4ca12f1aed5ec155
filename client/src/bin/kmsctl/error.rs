//! kmsctl's error type, its exit codes and how it is printed.
//!
//! Exit codes: 1 the request failed (a server error or bad input), 2 usage
//! errors (clap's own, and checks clap cannot express), 3 the daemon cannot
//! be reached or the connection was lost.

use std::io;

use kms_client::proto::ErrorCode;
use kms_client::ClientError;

/// Hint printed when the daemon cannot be reached.
const START_HINT: &str = "is kmsd running? start it with kmsd --dev";

/// Hint printed when the socket's permissions refused us (`EACCES`): kmsd
/// may well be running, we are just not let in.
const ACCESS_HINT: &str = "you lack access to kmsd's socket: its group (kmsd under systemd) decides who may \
                           connect; ask to be added (usermod -aG kmsd USER) and log in again";

/// Whether the socket's permissions refused the connection.
fn access_refused(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
}

/// Everything a kmsctl command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The client layer (connection, protocol, or a server error reply).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Input that the daemon would refuse, caught before sending.
    #[error("{0}")]
    Input(String),
    /// Arguments clap accepted but that do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// A file named on the command line cannot be read.
    #[error("cannot read {path}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file named on the command line cannot be written.
    #[error("cannot write {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// `audit verify` found a broken chain, already reported on stdout.
    #[error("the audit log's chain is broken")]
    Broken,
    /// Reading stdin or writing stdout failed.
    #[error("cannot {what}")]
    Stdio {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Client(e) if e.is_connection_error() => 3,
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The stable code printed with the message: the server's when it gave
    /// one, else the closest code for a local failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            CliError::Client(e) if access_refused(e) => ErrorCode::PermissionDenied,
            CliError::Client(e) => e.code().unwrap_or_else(|| local_code(e)),
            CliError::Input(_) | CliError::Usage(_) => ErrorCode::InvalidArgument,
            CliError::File { source, .. } if source.kind() == io::ErrorKind::NotFound => ErrorCode::NotFound,
            CliError::File { .. } | CliError::Write { .. } | CliError::Broken | CliError::Stdio { .. } => {
                ErrorCode::Internal
            }
        }
    }

    /// The message: the server's text for error replies, otherwise the
    /// error and its causes, plus a hint when the daemon is unreachable.
    pub fn message(&self) -> String {
        match self {
            CliError::Client(ClientError::Server(reply)) => reply.message.clone(),
            CliError::Client(e) if access_refused(e) => format!("{} ({ACCESS_HINT})", chain(e)),
            CliError::Client(e @ ClientError::Connect { .. }) => {
                format!("{} ({START_HINT})", chain(e))
            }
            other => chain(other),
        }
    }

    /// The line(s) to print on stderr.
    pub fn render(&self, json: bool) -> String {
        if let CliError::Broken = self {
            return String::new();
        }
        if json {
            let value = serde_json::json!({
                "error": { "code": self.code().as_str(), "message": self.message() }
            });
            format!("{value}\n")
        } else {
            format!("kmsctl: {}: {}\n", self.code(), self.message())
        }
    }
}

fn local_code(e: &ClientError) -> ErrorCode {
    match e {
        _ if e.is_connection_error() => ErrorCode::Unavailable,
        ClientError::Codec(kms_client::proto::CodecError::Oversized { .. }) => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    }
}

/// `error: cause: cause ...`
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use kms_client::proto::ErrorReply;

    use super::*;

    fn connect_error() -> CliError {
        CliError::Client(ClientError::Connect {
            path: "/run/kmsd/kmsd.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }

    #[test]
    fn server_errors_exit_1_with_their_code() {
        let e = CliError::Client(ClientError::Server(ErrorReply::new(
            ErrorCode::LimitExceeded,
            "10 manual rotations used",
        )));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.render(false), "kmsctl: limit-exceeded: 10 manual rotations used\n");
    }

    #[test]
    fn unreachable_daemon_exits_3_with_path_and_hint() {
        let e = connect_error();
        assert_eq!(e.exit_code(), 3);
        let text = e.render(false);
        assert!(
            text.starts_with("kmsctl: unavailable: cannot connect to /run/kmsd/kmsd.sock"),
            "{text}"
        );
        assert!(text.contains("kmsd --dev"));
        let lost = CliError::Client(ClientError::Closed { cause: None });
        assert_eq!(lost.exit_code(), 3);
    }

    #[test]
    fn usage_and_input_errors() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let input = CliError::Input("plaintext too large".into());
        assert_eq!((input.exit_code(), input.code()), (1, ErrorCode::InvalidArgument));
    }

    #[test]
    fn json_errors_have_code_and_message() {
        let value: serde_json::Value = serde_json::from_str(&connect_error().render(true)).unwrap();
        assert_eq!(value["error"]["code"], "unavailable");
        assert!(value["error"]["message"].as_str().unwrap().contains("kmsd.sock"));
    }

    #[test]
    fn a_socket_refusing_us_says_we_lack_access_not_that_kmsd_is_down() {
        let e = CliError::Client(ClientError::Connect {
            path: "/run/kmsd/kmsd.sock".into(),
            source: io::Error::from_raw_os_error(13),
        });
        assert_eq!(e.exit_code(), 3);
        assert_eq!(e.code(), ErrorCode::PermissionDenied);
        let msg = e.message();
        assert!(msg.contains("lack access") && msg.contains("group"), "{msg}");
        assert!(!msg.contains("is kmsd running"), "{msg}");
    }
}
