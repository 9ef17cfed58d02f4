//! The Tessera replica daemon and the client side of its protocols.
//!
//! A replica daemon owns the replicas of many volumes on one node: their volume
//! records (the cluster's source of truth), their data files, and all disk I/O.
//! The controller talks to it over the control gRPC API; engines talk to it over
//! the data-plane protocol.
//!
//! Layout:
//! * [`control_proto`]: generated control-API messages, client and server.
//! * [`block_io`]: the trait seam between the data-plane server and the block store.
//!
//! This crate must not depend on the controller or node crates: they depend on it.

/// Generated bindings of `proto/replica_control.proto` (package `tessera.replica.v1`).
#[allow(clippy::all, missing_docs)]
pub mod control_proto {
    tonic::include_proto!("tessera.replica.v1");
}

pub mod block_io;
