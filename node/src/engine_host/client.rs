//! Connecting to an engine-host over its unix socket.

use std::path::Path;
use std::time::Duration;

use tessera_csi_proto::unix_channel::{connect_unix_lazy, unix_endpoint};
use tonic::transport::Channel;

use super::proto::engine_host_client::EngineHostClient;

/// How long connecting to the engine-host socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for the engine-host at `socket`. The channel connects lazily (and
/// reconnects after the engine-host restarts), so a node plugin can start before
/// its engine-host; calls fail with UNAVAILABLE while nobody listens.
pub fn connect_lazy(socket: &Path) -> EngineHostClient<Channel> {
    let channel = connect_unix_lazy(unix_endpoint().connect_timeout(CONNECT_TIMEOUT), socket);
    EngineHostClient::new(channel)
}
