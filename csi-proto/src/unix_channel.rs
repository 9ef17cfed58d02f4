//! gRPC channels over unix sockets.
//!
//! CSI plugins, the engine-host and the kubelet's registration API all serve on unix
//! sockets, which tonic cannot dial by itself: the channel gets a connector that opens
//! the socket path and ignores the URI, which only satisfies the HTTP layer. Every
//! client in the project (CLI, node plugin, tests) dials through here.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Error, Uri};
use tower::service_fn;

/// An endpoint to pass to [`connect_unix`] or [`connect_unix_lazy`] after setting its
/// timeouts; its URI is a placeholder nobody resolves.
pub fn unix_endpoint() -> Endpoint {
    Endpoint::from_static("http://unix-socket.tessera.invalid")
}

/// Connects `endpoint` (timeouts and all) to the unix socket at `path` now, so an error
/// means nobody answers there at the moment.
pub async fn connect_unix(endpoint: Endpoint, path: &Path) -> Result<Channel, Error> {
    let path: PathBuf = path.to_path_buf();
    endpoint
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// A channel to the unix socket at `path` that connects on first use and reconnects
/// after the server restarts: calls fail with UNAVAILABLE while nobody listens.
pub fn connect_unix_lazy(endpoint: Endpoint, path: &Path) -> Channel {
    let path: PathBuf = path.to_path_buf();
    endpoint.connect_with_connector_lazy(service_fn(move |_: Uri| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    }))
}
