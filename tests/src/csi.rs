//! gRPC clients for the daemons under test.
//!
//! CSI is served on unix sockets, which tonic does not dial by itself: the channel
//! gets a connector that opens the socket and wraps it for hyper. The replica
//! control API is gRPC over TCP through a [`Transport`]: mutual TLS with the
//! certificate of the identity the client acts as, or plain text for daemons started
//! with `--insecure-plaintext`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tessera_csi_proto::unix_channel::{self, unix_endpoint};
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

/// How long connecting to a daemon may take before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a gRPC channel to the unix socket at `path`.
///
/// The connection is made eagerly, so an error here means the socket does not
/// answer right now.
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    unix_channel::connect_unix(unix_endpoint().connect_timeout(CONNECT_TIMEOUT), path).await
}

/// Opens a gRPC channel to the replica daemon's control port at `addr` through
/// `transport` (its handshake included: an error means the daemon does not answer
/// or refused the certificate).
pub async fn connect_tcp(
    addr: SocketAddr,
    transport: &Transport,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = tessera_tls::grpc::endpoint(&addr.to_string())?.connect_timeout(CONNECT_TIMEOUT);
    tessera_tls::grpc::connect_channel(&endpoint, transport).await
}
