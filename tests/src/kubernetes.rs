//! A tonic client of kmsd's Kubernetes KMS v2 plugin socket, for
//! kms-bench (the end-to-end test uses a client of another gRPC stack,
//! tests/kubernetes/apiserver.py).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// The client stubs built from `daemon/proto/kms_v2.proto`.
#[allow(missing_docs, clippy::all)]
pub mod v2 {
    tonic::include_proto!("v2");
}

/// The plugin client over one HTTP/2 connection.
pub type PluginClient = v2::key_management_service_client::KeyManagementServiceClient<Channel>;

/// Connects to the plugin socket at `path` (one connection).
///
/// # Errors
/// The socket cannot be reached.
pub async fn connect(path: &Path) -> Result<PluginClient, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    // The URI is required and unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://kmsd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(PluginClient::new(channel))
}
