//! gRPC channels to the Tessera daemons.
//!
//! CSI plugins serve on unix sockets (dialled through
//! `tessera_csi_proto::unix_channel`); the replica control API is gRPC over TCP,
//! mutual TLS unless the operator asked for plain text (see [`crate::replica_tls`]).
//!
//! Every channel carries a per-RPC deadline, so a wedged daemon turns into an error
//! the CLI can report instead of a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tessera_csi_proto::unix_channel::{self, unix_endpoint};
use tessera_csi_proto::v1::ProbeRequest;
use tessera_tls::Transport;
use tonic::transport::Channel;

/// CSI Identity client.
pub type IdentityClient = tessera_csi_proto::v1::identity_client::IdentityClient<Channel>;
/// CSI Controller client.
pub type ControllerClient = tessera_csi_proto::v1::controller_client::ControllerClient<Channel>;
/// CSI Node client.
pub type NodeClient = tessera_csi_proto::v1::node_client::NodeClient<Channel>;
/// Replica daemon control-API client.
pub type ReplicaClient =
    tessera_replica_protocol::control_proto::replica_control_client::ReplicaControlClient<Channel>;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket path of a CSI endpoint: `unix:///path` or a plain path.
pub fn socket_of(endpoint: &str) -> anyhow::Result<PathBuf> {
    Ok(tessera_csi_proto::endpoint::unix_socket_path(endpoint)?)
}

/// The `unix://` endpoint URL of a socket path, as the daemons' `--endpoint` expects.
pub fn endpoint_of(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// Connects to the unix socket at `path`; every RPC on the channel fails after
/// `rpc_timeout`.
pub async fn connect_unix(path: &Path, rpc_timeout: Duration) -> anyhow::Result<Channel> {
    let endpoint = unix_endpoint()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(rpc_timeout);
    unix_channel::connect_unix(endpoint, path)
        .await
        .with_context(|| format!("connecting to {}", path.display()))
}

/// Replica control client for `addr` (`host:port`) through `transport` (TLS as the
/// CLI's identity, or plain text), with the given per-RPC deadline.
pub async fn replica(
    addr: &str,
    transport: &Transport,
    rpc_timeout: Duration,
) -> anyhow::Result<ReplicaClient> {
    let endpoint = tessera_tls::grpc::endpoint(addr)
        .with_context(|| format!("invalid address {addr:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(rpc_timeout);
    let channel = tessera_tls::grpc::connect_channel(&endpoint, transport)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(ReplicaClient::new(channel))
}

/// Whether the CSI plugin on `socket` answers Probe with ready (an unset `ready` means
/// ready, per the CSI spec). Any error counts as not ready: callers poll.
pub async fn probe_ready(socket: &Path) -> bool {
    let Ok(channel) = connect_unix(socket, Duration::from_secs(2)).await else {
        return false;
    };
    match IdentityClient::new(channel).probe(ProbeRequest {}).await {
        Ok(resp) => resp.into_inner().ready.unwrap_or(true),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_of("unix:///run/x.sock").expect("valid"),
            PathBuf::from("/run/x.sock")
        );
        assert_eq!(
            socket_of("/tmp/y.sock").expect("valid"),
            PathBuf::from("/tmp/y.sock")
        );
        assert!(socket_of("tcp://127.0.0.1:1").is_err());
        assert!(socket_of("unix://").is_err());
        assert_eq!(endpoint_of(Path::new("/a/b.sock")), "unix:///a/b.sock");
    }
}
