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
//! * [`volume_id`]: the volume id every process names a volume by.
//! * [`volume_params`]: StorageClass keys, the normalised parameters in a volume
//!   record (QoS limits and their rules) and the filesystem types.
//! * [`publish_context`]: what the controller's publish hands the node's engine.
//! * [`quorum`]: what a majority of a replica set is.
//! * [`units`]: how sizes (`10Gi`) and durations (`1m30s`) are written.
//!
//! The last four are contracts between the controller, the replicas and the node
//! that travel with the wire messages (record parameters, publish contexts); they
//! live here so that each has one owner.

/// Generated bindings of `proto/replica_control.proto` (package `tessera.replica.v1`).
#[allow(clippy::all, missing_docs)]
pub mod control_proto {
    tonic::include_proto!("tessera.replica.v1");
}

pub mod block;
pub mod data;
pub mod publish_context;
pub mod quorum;
pub mod seq;
pub mod sync;
pub mod units;
pub mod volume_id;
pub mod volume_params;
