//! The Tessera CSI node plugin.
//!
//! The kubelet talks to the node plugin over a unix socket to learn which node it runs
//! on and to stage and publish volumes there; the engine-host (the same binary,
//! `tessera-node engine-host`) serves the volumes' data path.
//!
//! Layout:
//! * CSI Identity comes from `tessera_csi_proto::identity` (shared with the controller).
//! * [`engine`]: the per-volume quorum coordinator that replicates block I/O to the
//!   volume's replicas (reconciling, resyncing and readmitting them), and its
//!   [`frontend::BlockTarget`] adapter.
//! * [`frontend`]: the kernel side: a FUSE file per volume and the loop device over it.
//! * [`engine_host`]: the per-node process that hosts every volume's engine, FUSE
//!   file and loop device, and its API (attach, detach, list, status) on a unix socket.
//! * [`node_service`]: the CSI Node service: stages (mkfs + mount, or a block device),
//!   publishes (bind mounts), reports stats; asks the engine-host to attach and detach.
//! * [`mount`], [`mkfs`]: mount-table queries, mount/bind/unmount, statvfs, and the
//!   probe-before-format rule.
//! * [`plugin_registration`]: registers the plugin with the kubelet
//!   (`pluginregistration.v1` on a socket in its `plugins_registry` directory).
//! * [`serve`]: runs both services on an already-bound unix listener until a
//!   shutdown future completes.
//!
//! This crate depends on `tessera-csi-proto` (CSI), `tessera-replica-protocol` (the
//! data-plane client and the publish context) and `tessera-telemetry`; not on the
//! replica daemon, nor on the controller.

pub mod engine;
pub mod engine_host;
pub mod frontend;
pub mod mkfs;
pub mod mount;
pub mod node_service;
pub mod plugin_registration;

use std::future::Future;

use tessera_csi_proto::v1::identity_server::IdentityServer;
use tessera_csi_proto::v1::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub use node_service::{NodeConfig, NodeService};
pub use tessera_csi_proto::identity::IdentityService;

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
        .add_service(IdentityServer::new(IdentityService::always_ready()))
        .add_service(NodeServer::new(NodeService::new(config)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
