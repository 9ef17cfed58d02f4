//! The engine-host: the long-lived per-node process that owns the data path of every
//! volume staged on the node.
//!
//! The CSI node plugin asks it, over a unix socket (default
//! `<state-dir>/engine-host.sock`), to attach a volume (open its quorum engine, serve
//! it as a FUSE file, bind a loop device to that file) and to detach it again. The
//! node plugin itself only formats and mounts the loop device, so it holds no
//! data-path state: killing or upgrading it never disturbs I/O, and a new instance
//! finds the attached volumes with `List` (ARCHITECTURE.md, "Data path process
//! model").
//!
//! Layout:
//! * [`proto`]: the generated API (`proto/engine_host.proto`), client and server.
//! * [`host`]: [`EngineHost`], the attach/detach state machine and volume table.
//! * [`target`]: what serves a volume's blocks: its quorum engine.
//! * [`service`]: the gRPC service over an [`EngineHost`].
//! * [`client`]: connecting to an engine-host socket.
//! * [`error`]: [`EngineHostError`] and its gRPC codes.
//! * [`metrics`]: what the engine-host's `/healthz` and `/metrics` report.
//!
//! # Lifecycle decisions
//!
//! * **Start**: leftovers of an earlier engine-host under `<state-dir>/volumes` (dead
//!   FUSE mounts, loop devices on them) are removed, except loop devices a
//!   filesystem is still mounted from; those are removed by the next detach of that
//!   volume, after the node plugin unmounted it.
//! * **SIGTERM**: every volume is torn down (engine flushed, loop detached, FUSE
//!   unmounted, engine closed) and each volume still mounted is logged at error
//!   level. Exiting leaves the FUSE files dead whatever is done, so the only choice is
//!   whether acknowledged writes are made durable and replica sessions closed first;
//!   refusing to exit would only turn SIGTERM into SIGKILL after the grace period.
//!   On Kubernetes the engine-host pod is therefore updated only on drained nodes.

pub mod client;
pub mod error;
pub mod host;
pub mod metrics;
pub mod service;
pub mod target;

/// The generated engine-host API (package `tessera.enginehost.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("tessera.enginehost.v1");
}

use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub use client::connect_lazy;
pub use error::EngineHostError;
pub use host::{EngineHost, VolumeHealth, VolumeInfo};
pub use service::EngineHostService;

/// Default socket file name inside the state directory.
pub const SOCKET_NAME: &str = "engine-host.sock";

/// Serves the engine-host API on `listener` until `shutdown` completes. The caller
/// tears the volumes down afterwards ([`EngineHost::shutdown`]).
pub async fn serve(
    listener: UnixListener,
    host: Arc<EngineHost>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(proto::engine_host_server::EngineHostServer::new(
            EngineHostService::new(host),
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
