//! The Tessera CSI controller: volume life cycle, placement and fencing.
//!
//! The controller owns no state of its own: each replica daemon stores the records of
//! its volumes, and this crate keeps an index of them rebuilt at start, so the process
//! can be restarted (or replaced by another leader) at any moment.
//!
//! Layout:
//! * [`controller_service`]: CSI Controller, one module per concern (life cycle,
//!   publish, resize, snapshots, read-only calls).
//! * [`quorum`]: the one majority primitive: typed per-replica failures, quorum reads
//!   and the compare-and-set round every record mutation goes through.
//! * [`volumes`]: the record index kept in step with quorum reads and writes.
//! * [`parameters`], [`capabilities`], [`capacity`]: validation of StorageClass
//!   parameters, volume capabilities and capacity ranges.
//! * [`fs_type`]: the filesystems of mount volumes and the smallest volume each fits on.
//! * [`placement`]: pure weighted rendezvous hashing of replicas over daemons.
//! * [`publish`]: publish/unpublish decisions, fencing (the epoch raise of a publish)
//!   and publish_context.
//! * [`replica_pool`]: discovery, liveness and deadline-bounded calls to daemons.
//! * [`snapshots`]: snapshot ids, discovery across daemons, sealing and deletion.
//! * [`restore`]: CreateVolume from a snapshot or a volume ([`restore::Restorer`]:
//!   copy sources, waiting for the replicas' copies, internal clone snapshots).
//! * [`snapshot_metadata`]: the CSI SnapshotMetadata service (allocated and changed
//!   ranges of snapshots).
//! * [`volume_index`]: the in-memory record index, volume ids and page tokens.
//! * [`locks`]: per-volume async locks serialising concurrent calls.
//! * [`metrics`]: Prometheus counters and the `/metrics` + `/healthz` HTTP server.
//! * [`endpoint`], [`error`]: the `--endpoint` flag and the typed errors with their
//!   CSI codes.
//!
//! Depends on `tessera-csi-proto` (CSI) and `tessera-replica` (control-API client);
//! must not depend on the node crate.

pub mod capabilities;
pub mod capacity;
pub mod controller_service;
pub use tessera_csi_proto::endpoint;
pub mod error;
pub mod fs_type;
pub mod heal;
pub mod k8s_snapshot_metadata;
pub mod kube_api;
pub mod locks;
pub mod metrics;
pub mod parameters;
pub mod placement;
pub mod publish;
pub mod quorum;
pub mod replica_pool;
pub mod restore;
pub mod snapshot_metadata;
pub mod snapshots;
pub mod volume_index;
pub mod volumes;

pub use controller_service::{ControllerConfig, ControllerService};
pub use replica_pool::{PoolConfig, ReplicaPool};
pub use snapshot_metadata::SnapshotMetadataService;
pub use tessera_csi_proto::identity::IdentityService;
pub use volumes::load_index;
