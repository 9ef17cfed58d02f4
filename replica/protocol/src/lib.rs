//! The replica's wire contracts: everything a process needs to talk to a replica
//! daemon, and nothing of the daemon itself (no store, no scheduler, no io_uring).
//!
//! The controller and the node depend on this crate; the replica daemon implements
//! its servers. Layout:
//! * [`control_proto`]: the control gRPC API (`proto/replica_control.proto`),
//!   messages, client and server traits.
//! * [`data`]: the framed TCP data-plane protocol (its module doc is the wire
//!   specification) and its client.
//! * [`block`]: the block size and a block's version (seq, trim, damage).
//! * [`seq`]: the layout of a write's sequence number (`epoch << 40 | counter`).
//! * [`sync`]: dirty regions and in-sync records as a replica reports them.

/// Generated bindings of `proto/replica_control.proto` (package `tessera.replica.v1`).
#[allow(clippy::all, missing_docs)]
pub mod control_proto {
    tonic::include_proto!("tessera.replica.v1");
}

pub mod block;
pub mod data;
pub mod seq;
pub mod sync;
