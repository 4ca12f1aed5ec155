//! Typed operations shared by the async ([`crate::Client`]) and blocking
//! ([`crate::BlockingClient`]) clients.
//!
//! Each operation is an [`Op`]: the [`Request`] to send and the function that
//! reads its final [`Response`]. The clients only move frames; what a request
//! looks like and which response answers it is decided here, once.

use std::fmt;

use zeroize::Zeroizing;

use crate::error::ClientError;
use crate::proto::{
    Context, CreateKey, DataKey, ErrorCode, ErrorReply, FsRewrapInfo, FsStatsInfo, FsVersionsInfo, KeyInfo, Request,
    Response, RotationEntry, Secret, StatusInfo, StoreStatusInfo, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

/// Connection settings common to both clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Largest frame body sent or accepted, in bytes.
    pub max_frame: usize,
    /// Sent in `Hello`; shows up in the daemon's logs.
    pub client_name: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            client_name: concat!("kms-client/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// What the daemon said about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// Server name and version.
    pub server: String,
    /// Protocol version (equal to [`PROTOCOL_VERSION`]).
    pub protocol: u16,
    /// The daemon's zone.
    pub zone: String,
}

/// A generated data key with its plaintext held in zeroizing memory.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedDataKey {
    /// The wrapped key, to store next to the data.
    pub blob: Vec<u8>,
    /// The key itself, when it was asked for.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

impl fmt::Debug for GeneratedDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedDataKey")
            .field("blob_len", &self.blob.len())
            .field("plaintext", &self.plaintext.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl From<DataKey> for GeneratedDataKey {
    fn from(dk: DataKey) -> Self {
        Self {
            blob: dk.blob,
            plaintext: dk.plaintext.map(Secret::into_zeroizing),
        }
    }
}

/// Result of one item of a batch unwrap.
pub type UnwrapItem = Result<Zeroizing<Vec<u8>>, ErrorReply>;

/// One typed operation: the request and how to read its final response.
#[derive(Debug)]
pub(crate) struct Op<T> {
    pub(crate) request: Request,
    pub(crate) parse: fn(Response) -> Result<T, ClientError>,
}

impl<T> Op<T> {
    fn new(request: Request, parse: fn(Response) -> Result<T, ClientError>) -> Self {
        Self { request, parse }
    }
}

/// Turns a final response into a result: `Error` replies become
/// [`ClientError::Server`], progress is not a final response.
pub(crate) fn final_response(resp: Response) -> Result<Response, ClientError> {
    match resp {
        Response::Error(reply) => Err(ClientError::Server(reply)),
        Response::Progress { .. } => Err(unexpected(&resp, "a final response")),
        other => Ok(other),
    }
}

fn unexpected(resp: &Response, want: &str) -> ClientError {
    ClientError::UnexpectedResponse(format!("expected {want}, got {}", resp.kind_name()))
}

/// Defines a parser taking one response variant apart.
macro_rules! parser {
    ($name:ident -> $t:ty { $($pat:pat => $out:expr),+ $(,)? }) => {
        fn $name(resp: Response) -> Result<$t, ClientError> {
            match resp {
                $($pat => Ok($out),)+
                other => Err(unexpected(&other, stringify!($name))),
            }
        }
    };
}

parser!(status_info -> StatusInfo { Response::Status(s) => s });
parser!(key_info -> KeyInfo { Response::Key(k) => k });
parser!(key_list -> Vec<KeyInfo> { Response::Keys(v) => v });
parser!(key_change -> Option<KeyInfo> { Response::Key(k) => Some(k), Response::Done => None });
parser!(rotation_list -> Vec<RotationEntry> { Response::Rotations(v) => v });
parser!(blob -> Vec<u8> { Response::Blob(b) => b });
parser!(plaintext -> Zeroizing<Vec<u8>> { Response::Plaintext(p) => p.into_zeroizing() });
parser!(data_key -> GeneratedDataKey { Response::DataKey(d) => d.into() });
parser!(blob_list -> Vec<Vec<u8>> { Response::Blobs(v) => v });
parser!(plaintext_list -> Vec<UnwrapItem> {
    Response::Plaintexts(v) => v.into_iter().map(|r| r.map(Secret::into_zeroizing)).collect()
});
parser!(data_key_list -> Vec<GeneratedDataKey> {
    Response::DataKeys(v) => v.into_iter().map(Into::into).collect()
});
parser!(fs_versions_info -> FsVersionsInfo { Response::FsVersions(i) => i });
parser!(fs_rewrap_info -> FsRewrapInfo { Response::FsRewrap(i) => i });
parser!(fs_stats_list -> Vec<FsStatsInfo> { Response::FsStats(v) => v });
parser!(store_status_info -> StoreStatusInfo { Response::StoreStatus(s) => s });
parser!(snapshot -> Zeroizing<Vec<u8>> { Response::Backup(s) => s.into_zeroizing() });
parser!(hello_reply -> ServerInfo {
    Response::Hello { server, protocol, zone } => ServerInfo { server, protocol, zone }
});

/// The handshake request.
pub(crate) fn hello(client_name: &str) -> Request {
    Request::Hello {
        protocol: PROTOCOL_VERSION,
        client: client_name.to_owned(),
    }
}

/// Reads the handshake reply: a refusal or another version is
/// [`ClientError::UnsupportedProtocol`].
pub(crate) fn check_hello(reply: Result<Response, ClientError>) -> Result<ServerInfo, ClientError> {
    let info = match reply.and_then(final_response) {
        Err(ClientError::Server(e)) if e.code == ErrorCode::UnsupportedProtocol => {
            return Err(unsupported(e.message));
        }
        other => hello_reply(other?)?,
    };
    if info.protocol != PROTOCOL_VERSION {
        return Err(unsupported(format!("server speaks {}", info.protocol)));
    }
    Ok(info)
}

fn unsupported(detail: String) -> ClientError {
    ClientError::UnsupportedProtocol {
        client: PROTOCOL_VERSION,
        detail,
    }
}

fn key(key: &str) -> String {
    key.to_owned()
}

fn owned_items(items: &[impl AsRef<[u8]>]) -> Vec<Vec<u8>> {
    items.iter().map(|i| i.as_ref().to_vec()).collect()
}

pub(crate) fn status() -> Op<StatusInfo> {
    Op::new(Request::Status, status_info)
}

pub(crate) fn create_key(params: CreateKey) -> Op<KeyInfo> {
    Op::new(Request::CreateKey(params), key_info)
}

pub(crate) fn describe_key(k: &str) -> Op<KeyInfo> {
    Op::new(Request::DescribeKey { key: key(k) }, key_info)
}

pub(crate) fn list_keys() -> Op<Vec<KeyInfo>> {
    Op::new(Request::ListKeys, key_list)
}

pub(crate) fn enable_key(k: &str) -> Op<Option<KeyInfo>> {
    Op::new(Request::EnableKey { key: key(k) }, key_change)
}

pub(crate) fn disable_key(k: &str) -> Op<Option<KeyInfo>> {
    Op::new(Request::DisableKey { key: key(k) }, key_change)
}

pub(crate) fn schedule_deletion(k: &str, days: Option<u32>) -> Op<Option<KeyInfo>> {
    Op::new(Request::ScheduleDeletion { key: key(k), days }, key_change)
}

pub(crate) fn cancel_deletion(k: &str) -> Op<Option<KeyInfo>> {
    Op::new(Request::CancelDeletion { key: key(k) }, key_change)
}

pub(crate) fn replicate_key(k: &str, zone: &str) -> Op<Option<KeyInfo>> {
    let zone = zone.to_owned();
    Op::new(Request::ReplicateKey { key: key(k), zone }, key_change)
}

pub(crate) fn unreplicate_key(k: &str, zone: &str) -> Op<Option<KeyInfo>> {
    let zone = zone.to_owned();
    Op::new(Request::UnreplicateKey { key: key(k), zone }, key_change)
}

pub(crate) fn promote_key(k: &str) -> Op<Option<KeyInfo>> {
    Op::new(Request::PromoteKey { key: key(k) }, key_change)
}

pub(crate) fn rotate_key(k: &str) -> Op<Option<KeyInfo>> {
    Op::new(Request::RotateKey { key: key(k) }, key_change)
}

pub(crate) fn list_rotations(k: &str) -> Op<Vec<RotationEntry>> {
    Op::new(Request::ListRotations { key: key(k) }, rotation_list)
}

pub(crate) fn enable_rotation(k: &str, period_days: Option<u32>) -> Op<Option<KeyInfo>> {
    let request = Request::EnableRotation {
        key: key(k),
        period_days,
    };
    Op::new(request, key_change)
}

pub(crate) fn disable_rotation(k: &str) -> Op<Option<KeyInfo>> {
    Op::new(Request::DisableRotation { key: key(k) }, key_change)
}

pub(crate) fn encrypt(k: &str, data: &[u8], context: &Context) -> Op<Vec<u8>> {
    let request = Request::Encrypt {
        key: key(k),
        plaintext: data.into(),
        context: context.clone(),
    };
    Op::new(request, blob)
}

pub(crate) fn decrypt(blob_in: &[u8], context: &Context) -> Op<Zeroizing<Vec<u8>>> {
    let request = Request::Decrypt {
        blob: blob_in.to_vec(),
        context: context.clone(),
    };
    Op::new(request, plaintext)
}

pub(crate) fn wrap(k: &str, dek: &[u8], context: &Context) -> Op<Vec<u8>> {
    let request = Request::Wrap {
        key: key(k),
        dek: dek.into(),
        context: context.clone(),
    };
    Op::new(request, blob)
}

pub(crate) fn unwrap(blob_in: &[u8], context: &Context) -> Op<Zeroizing<Vec<u8>>> {
    let request = Request::Unwrap {
        blob: blob_in.to_vec(),
        context: context.clone(),
    };
    Op::new(request, plaintext)
}

pub(crate) fn generate_data_key(k: &str, context: &Context, with_plaintext: bool) -> Op<GeneratedDataKey> {
    let request = Request::GenerateDataKey {
        key: key(k),
        context: context.clone(),
        with_plaintext,
    };
    Op::new(request, data_key)
}

pub(crate) fn re_encrypt(
    blob_in: &[u8],
    context: &Context,
    to: Option<&str>,
    to_context: Option<&Context>,
) -> Op<Vec<u8>> {
    let request = Request::ReEncrypt {
        blob: blob_in.to_vec(),
        context: context.clone(),
        to: to.map(key),
        to_context: to_context.cloned(),
    };
    Op::new(request, blob)
}

pub(crate) fn wrap_batch(k: &str, deks: &[impl AsRef<[u8]>], context: &Context) -> Op<Vec<Vec<u8>>> {
    let request = Request::WrapBatch {
        key: key(k),
        deks: deks.iter().map(|d| Secret::from(d.as_ref())).collect(),
        context: context.clone(),
    };
    Op::new(request, blob_list)
}

pub(crate) fn unwrap_batch(blobs: &[impl AsRef<[u8]>], context: &Context) -> Op<Vec<UnwrapItem>> {
    let request = Request::UnwrapBatch {
        blobs: owned_items(blobs),
        context: context.clone(),
    };
    Op::new(request, plaintext_list)
}

pub(crate) fn generate_data_key_batch(
    k: &str,
    count: u32,
    context: &Context,
    with_plaintext: bool,
) -> Op<Vec<GeneratedDataKey>> {
    let request = Request::GenerateDataKeyBatch {
        key: key(k),
        count,
        context: context.clone(),
        with_plaintext,
    };
    Op::new(request, data_key_list)
}

pub(crate) fn generate_data_keys(k: &str, contexts: &[Context], with_plaintext: bool) -> Op<Vec<GeneratedDataKey>> {
    let request = Request::GenerateDataKeys {
        key: key(k),
        contexts: contexts.to_vec(),
        with_plaintext,
    };
    Op::new(request, data_key_list)
}

pub(crate) fn fs_versions(mount: &str) -> Op<FsVersionsInfo> {
    let mount = mount.to_owned();
    Op::new(Request::FsVersions { mount }, fs_versions_info)
}

pub(crate) fn fs_stats() -> Op<Vec<FsStatsInfo>> {
    Op::new(Request::FsStats, fs_stats_list)
}

pub(crate) fn store_status() -> Op<StoreStatusInfo> {
    Op::new(Request::StoreStatus, store_status_info)
}

pub(crate) fn backup() -> Op<Zeroizing<Vec<u8>>> {
    Op::new(Request::Backup, snapshot)
}

pub(crate) fn fs_rewrap(mount: &str) -> Op<FsRewrapInfo> {
    let mount = mount.to_owned();
    Op::new(Request::FsRewrap { mount }, fs_rewrap_info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_response(protocol: u16) -> Response {
        Response::Hello {
            server: "kmsd/0.1.0".into(),
            protocol,
            zone: "z1".into(),
        }
    }

    #[test]
    fn check_hello_accepts_our_version() {
        let info = check_hello(Ok(hello_response(PROTOCOL_VERSION))).unwrap();
        assert_eq!(info.zone, "z1");
    }

    #[test]
    fn check_hello_refuses_other_versions_and_refusals() {
        let other = check_hello(Ok(hello_response(PROTOCOL_VERSION + 1)));
        assert!(matches!(other, Err(ClientError::UnsupportedProtocol { .. })));
        let refused = Response::Error(ErrorReply::new(ErrorCode::UnsupportedProtocol, "no"));
        assert!(matches!(
            check_hello(Ok(refused)),
            Err(ClientError::UnsupportedProtocol { .. })
        ));
    }

    #[test]
    fn error_replies_become_server_errors() {
        let resp = Response::Error(ErrorReply::new(ErrorCode::Disabled, "key is disabled"));
        let err = final_response(resp).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Disabled));
    }

    #[test]
    fn wrong_variant_is_unexpected_without_payload() {
        let op = describe_key("k");
        let err = (op.parse)(Response::Plaintext(b"secret".to_vec().into())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("Plaintext"), "{text}");
        assert!(!text.contains("secret"));
    }

    #[test]
    fn key_changes_accept_done_or_key() {
        let op = rotate_key("k");
        assert_eq!((op.parse)(Response::Done).unwrap(), None);
    }

    #[test]
    fn batch_unwrap_keeps_per_item_errors() {
        let op = unwrap_batch(&[b"a".as_slice()], &Context::new());
        let reply = ErrorReply::new(ErrorCode::DecryptFailed, "bad");
        let items = (op.parse)(Response::Plaintexts(vec![Ok(vec![1].into()), Err(reply)])).unwrap();
        assert_eq!(items[0].as_ref().unwrap().as_slice(), &[1]);
        assert_eq!(items[1].as_ref().unwrap_err().code, ErrorCode::DecryptFailed);
    }

    #[test]
    fn data_key_debug_redacts_plaintext() {
        let dk = GeneratedDataKey::from(DataKey {
            blob: vec![1, 2],
            plaintext: Some(vec![42; 32].into()),
        });
        let text = format!("{dk:?}");
        assert!(text.contains("[redacted]") && !text.contains("42"), "{text}");
    }
}
