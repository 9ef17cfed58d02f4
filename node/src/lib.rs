//! The Tessera CSI node plugin.
//!
//! The kubelet talks to this process over a unix socket to learn which node it runs
//! on and, once the data path exists, to stage and publish volumes there.
//!
//! Layout:
//! * [`identity`]: the CSI Identity service (plugin name, capabilities, readiness).
//! * [`node_service`]: the CSI Node service. Today it answers NodeGetInfo and
//!   NodeGetCapabilities; the staging and publishing RPCs return UNIMPLEMENTED until
//!   the engine and the FUSE/loop frontend are built.
//! * [`serve`]: runs both services on an already-bound unix listener until a
//!   shutdown future completes.
//!
//! This crate depends on `tessera-csi-proto` for the wire types and will depend on
//! `tessera-replica` for the data-plane client; it must not depend on the controller.

pub mod frontend;
pub mod identity;
pub mod node_service;

use std::future::Future;

use tessera_csi_proto::v1::identity_server::IdentityServer;
use tessera_csi_proto::v1::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub use identity::IdentityService;
pub use node_service::{NodeConfig, NodeService};

/// Serves CSI Identity and Node on `listener` until `shutdown` completes.
///
/// The listener is bound by the caller so that tests and the binary decide where the
/// socket lives and what happens to a stale one.
pub async fn serve(
    listener: UnixListener,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService))
        .add_service(NodeServer::new(NodeService::new(config)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
