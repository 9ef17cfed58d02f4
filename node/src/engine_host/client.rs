//! Connecting to an engine-host over its unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use super::proto::engine_host_client::EngineHostClient;

/// How long connecting to the engine-host socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for the engine-host at `socket`. The channel connects lazily (and
/// reconnects after the engine-host restarts), so a node plugin can start before
/// its engine-host; calls fail with UNAVAILABLE while nobody listens.
pub fn connect_lazy(socket: &Path) -> EngineHostClient<Channel> {
    let path: PathBuf = socket.to_owned();
    // The URI only satisfies the HTTP layer; the connector ignores it.
    let channel = Endpoint::from_static("http://engine-host.tessera.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }));
    EngineHostClient::new(channel)
}
