//! CSI v1.12 wire types and gRPC service traits for Tessera.
//!
//! Everything Kubernetes says to Tessera arrives through these types: the kubelet
//! and the external sidecars speak CSI over a unix socket, and `tessera-controller`
//! and `tessera-node` implement the generated service traits.
//!
//! Layout:
//! * [`v1`]: the code generated from `proto/csi.proto` (package `csi.v1`), unchanged.
//! * [`identity`]: the CSI Identity service both plugins serve (the driver's name and
//!   plugin capabilities are the same whichever process answers).
//! * [`DRIVER_NAME`], [`TOPOLOGY_NODE_KEY`]: names every component must agree on.
//!
//! This crate must stay slim: wire types and driver-wide identity only, no dependency on
//! other Tessera crates.

/// Generated CSI v1 messages, clients and servers.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

pub mod identity;

/// The CSI driver name: the CSIDriver object, StorageClass provisioner and
/// GetPluginInfo all use it, so it lives in one place.
pub const DRIVER_NAME: &str = "tessera.csi.dev";

/// Topology segment key naming the node a replica daemon or node plugin runs on.
pub const TOPOLOGY_NODE_KEY: &str = "topology.tessera.csi.dev/node";

/// Topology segment key naming the zone (failure domain above the node).
pub const TOPOLOGY_ZONE_KEY: &str = "topology.tessera.csi.dev/zone";
