//! The Tessera replica daemon.
//!
//! A replica daemon owns the replicas of many volumes on one node: their volume
//! records (the cluster's source of truth), their block stores, and all disk I/O.
//! The controller talks to it over the control gRPC API; engines talk to it over
//! the data-plane protocol.
//!
//! Layout:
//! * [`block_io`]: the trait seam between the data-plane server and the block store.
//! * [`dataplane`]: the data-plane server (the protocol and its client are
//!   `tessera_replica_protocol`'s).
//! * [`record`]: the volume record and its checksummed on-disk format.
//! * [`capacity`]: size parsing (`10Gi`) and backing-filesystem space.
//! * [`catalog`]: the volumes of a data directory, crash-safe on disk, with CAS updates.
//! * [`copy`]: restore and clone — populating a new volume by merging the sealed
//!   copies of a snapshot that other replicas hold.
//! * [`control_service`]: the control gRPC service over the catalog.
//! * [`metrics`]: what `/metrics` and `/healthz` report (served by `tessera_telemetry`).
//! * [`scheduler`]: the per-device I/O scheduler (EDF deadlines, per-volume token
//!   buckets, io_uring engine with a sync reference engine).
//! * [`snapshot_read`]: serving sealed snapshots to other replicas (`ReadSnapshotBlocks`
//!   chunks, `SnapshotRanges`).
//! * [`store`]: the checksummed, layered (snapshot-capable) block store of one replica.
//! * [`sync_state`]: per volume replica, the dirty regions (activity log) and the
//!   in-sync set an engine declared: what a new engine reconciles from.
//! * [`volume_registry`]: the catalog's volumes (their stores and epochs) served to the
//!   data plane.
//!
//! The wire contracts (control API, data-plane protocol and client, block and seq
//! layouts) are the `tessera_replica_protocol` crate's, which is all the controller
//! and the node depend on.

// The wire contracts are the protocol crate's; the daemon's modules name them by
// this short path.
pub(crate) use tessera_replica_protocol::control_proto;

pub mod block_io;
pub mod capacity;
pub mod catalog;
pub mod control_auth;
pub mod control_service;
pub mod copy;
pub mod dataplane;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
mod park;
pub mod record;
pub mod scheduler;
pub mod scrub;
pub mod snapshot_read;
pub mod store;
pub mod sync_state;
pub mod volume_registry;
