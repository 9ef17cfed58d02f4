//! Harness for tests that start real Tessera processes.
//!
//! Tests in `tests/tests/` run the real `tessera-replica`, `tessera-controller` and
//! `tessera-node` binaries and talk to them over their public APIs (CSI on unix
//! sockets, the replica control gRPC on TCP), the way Kubernetes and the sidecars do.
//!
//! Layout:
//! * [`cluster`]: [`ClusterBuilder`] / [`Cluster`]: a directory of its own, N replica
//!   daemons, a controller and one or more nodes (engine-host + node plugin); kill -9
//!   and restart any of them; nothing (processes, mounts, loop devices) outlives it.
//!   Mutual TLS with a CA of the cluster's own ([`cluster::tls`]), or plain text.
//! * [`mounts`]: mounts and loop devices below a directory, and the safety net that
//!   removes them.
//! * [`process`]: [`Daemon`], one child process in its own process group, logging to
//!   a file, killed (group-wide) on drop.
//! * [`csi`]: gRPC clients over unix sockets and TCP (through a
//!   [`tessera_tls::Transport`]).
//! * [`metrics`]: a replica daemon's or an engine-host's `/metrics` page, scraped and
//!   parsed.
//! * [`direct_io`]: O_DIRECT reads/writes and reproducible data for byte checks.
//! * [`fixtures`]: CSI request builders and list-everything helpers for tests.
//! * [`lifecycle`]: ControllerPublish + NodeStage + NodePublish of a volume on a node,
//!   and the way back, as the attacher and the kubelet call them.
//! * [`random_writer`]: stamped random O_DIRECT writes that record what was durable,
//!   and the read-back that finds lost or stale blocks (fault tests).
//! * [`privilege`]: whether the mount/loop/FUSE tests may run here, or skip loudly.
//! * [`binaries`]: where the binaries under test are found (`TESSERA_BIN_DIR`).
//! * [`wait`]: [`wait_until`] / [`poll_until`]: poll a condition with a timeout;
//!   tests never sleep to synchronise.
//!
//! The harness depends only on the public protocol crates (`tessera-csi-proto`,
//! `tessera-replica`'s generated client, `tessera-tls`), never on daemon internals,
//! so what it tests is what a real client sees.

pub mod binaries;
pub mod cluster;
pub mod csi;
pub mod direct_io;
pub mod faults;
pub mod fixtures;
pub mod lifecycle;
pub mod metrics;
pub mod mounts;
pub mod network;
pub mod privilege;
pub mod process;
pub mod random_writer;
pub mod wait;

pub use cluster::{Cluster, ClusterBuilder, NodeHost, Replica};
pub use process::Daemon;
pub use wait::{poll_until, wait_until, TimedOut};
