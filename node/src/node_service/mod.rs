//! CSI Node service.
//!
//! The node plugin holds **no data-path state**. Attaching a volume (engine, FUSE file,
//! loop device) is done by the node's engine-host process ([`crate::engine_host`]),
//! reached over its unix socket; this service only formats and mounts the loop device
//! the engine-host returns, bind-mounts it for pods, and asks the engine-host to
//! detach at unstage. Everything it needs to know later is read back from the kernel
//! (mount table, device numbers) or from the engine-host's `List`, so a node plugin
//! killed at any moment is replaced by a new instance that carries on, and I/O on
//! mounted volumes never notices.
//!
//! Staging layout:
//! * mount access: the volume's filesystem is mounted at `staging_target_path` (xfs
//!   always with `nouuid`, so restores and clones, which carry their source's UUID,
//!   mount next to it: [`mkfs::implied_mount_options`]);
//! * block access: the device node is bind-mounted onto the file
//!   `<staging_target_path>/`[`BLOCK_STAGING_FILE`], so staging is visible in the mount
//!   table like a mount volume, and publishing binds that file onto the target.
//!
//! `readonly` publishes are read-only bind mounts. For a filesystem that is enforced
//! by the kernel; for a block device node it is not (Linux lets a device node on a
//! read-only mount be opened for writing), so there the container runtime's device
//! permissions, which the kubelet sets from `readOnly`, do the enforcing.
//!
//! A path belongs to the volume when its device number matches the loop device's
//! (`st_dev` of a mounted directory, `st_rdev` of a device node); paths are never
//! compared as strings.
//!
//! Error codes follow the CSI spec: missing fields are INVALID_ARGUMENT; a capability
//! the volume cannot serve (another filesystem on the device, a multi-node access
//! mode, an unsupported fs type) is FAILED_PRECONDITION, as is publishing an unstaged
//! volume; an existing publish with other `readonly`/capability is ALREADY_EXISTS;
//! stats for an unknown volume or a path the volume is not at are NOT_FOUND; a
//! concurrent operation on the same volume is ABORTED; an unreachable engine-host is
//! UNAVAILABLE.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tessera_csi_proto::v1::node_server::Node;
use tessera_csi_proto::v1::node_service_capability::{rpc, Rpc, Type as CapType};
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::AccessType;
use tessera_csi_proto::v1::volume_usage::Unit;
use tessera_csi_proto::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage,
};
use tessera_csi_proto::TOPOLOGY_NODE_KEY;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::engine_host::proto::engine_host_client::EngineHostClient;
use crate::engine_host::proto::{
    AttachRequest, AttachedVolume, DetachRequest, ListRequest, ResizeRequest, StatusRequest,
};
use crate::mkfs::{self, FsType, MkfsError, Probe};
use crate::mount::{self, MountError, MountOptions, PathState};
use tessera_replica_protocol::publish_context::{KEY_EPOCH, KEY_REPLICAS};
use tessera_replica_protocol::volume_params::KEY_FS_TYPE;
use tessera_telemetry::error_chain;

mod capability;
mod error;
mod expand;
mod publish;
mod stage;
mod stats;

use capability::{parse_capability, required, Access};
pub use error::NodeError;

/// Default for [`NodeConfig::max_volumes_per_node`].
pub const DEFAULT_MAX_VOLUMES_PER_NODE: i64 = 64;

/// Name of the file inside a block volume's staging directory that the device node
/// is bind-mounted onto.
pub const BLOCK_STAGING_FILE: &str = "block";

/// What the node plugin knows about the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node id reported to the CO; replica placement and topology use the same id.
    pub node_id: String,
    /// Most volumes the CO may publish to this node at once.
    pub max_volumes_per_node: i64,
    /// Unix socket of this node's engine-host.
    pub engine_host_socket: PathBuf,
}

/// Marks a volume busy for the life of the guard.
struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}

/// Runs blocking mount work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Task(e.to_string()))?
}

fn device_number(v: &AttachedVolume) -> (u32, u32) {
    (v.device_major, v.device_minor)
}

/// Node service for one node.
#[derive(Debug, Clone)]
pub struct NodeService {
    config: NodeConfig,
    engine_host: EngineHostClient<Channel>,
    busy: Arc<Mutex<HashSet<String>>>,
}

impl NodeService {
    /// Creates the service for the node described by `config`. The engine-host is
    /// connected lazily, so it may start after the plugin. Must be called within a
    /// tokio runtime.
    pub fn new(config: NodeConfig) -> Self {
        let engine_host = crate::engine_host::connect_lazy(&config.engine_host_socket);
        Self {
            config,
            engine_host,
            busy: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    fn begin(&self, volume_id: &str) -> Result<OpGuard, NodeError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(volume_id.to_owned()) {
            return Err(NodeError::Busy(volume_id.to_owned()));
        }
        Ok(OpGuard {
            busy: Arc::clone(&self.busy),
            volume_id: volume_id.to_owned(),
        })
    }

    /// The volume as the engine-host has it attached, if it is.
    async fn attached(&self, volume_id: &str) -> Result<Option<AttachedVolume>, NodeError> {
        let list = self
            .engine_host
            .clone()
            .list(ListRequest {})
            .await
            .map_err(NodeError::EngineHost)?
            .into_inner();
        Ok(list.volumes.into_iter().find(|v| v.volume_id == volume_id))
    }

    async fn detach_quietly(&self, volume_id: &str) {
        let r = self
            .engine_host
            .clone()
            .detach(DetachRequest {
                volume_id: volume_id.to_owned(),
            })
            .await;
        if let Err(s) = r {
            tracing::warn!(volume = %volume_id, error = %s.message(), "detaching after a failed stage");
        }
    }
}

fn log_failure(rpc: &str, volume_id: &str, e: &NodeError) {
    match e.code() {
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::Aborted => {
            tracing::debug!(rpc, volume = %volume_id, error = %error_chain(e), "request refused")
        }
        _ => tracing::warn!(rpc, volume = %volume_id, error = %error_chain(e), "request failed"),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.stage(r)
            .await
            .inspect_err(|e| log_failure("NodeStageVolume", &volume_id, e))?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.unstage(r)
            .await
            .inspect_err(|e| log_failure("NodeUnstageVolume", &volume_id, e))?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.publish(r)
            .await
            .inspect_err(|e| log_failure("NodePublishVolume", &volume_id, e))?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        self.unpublish(r)
            .await
            .inspect_err(|e| log_failure("NodeUnpublishVolume", &volume_id, e))?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        let out = self
            .stats(r)
            .await
            .inspect_err(|e| log_failure("NodeGetVolumeStats", &volume_id, e))?;
        Ok(Response::new(out))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = r.volume_id.clone();
        let out = self
            .expand(r)
            .await
            .inspect_err(|e| log_failure("NodeExpandVolume", &volume_id, e))?;
        Ok(Response::new(out))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let cap = |t: rpc::Type| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(rpc::Type::StageUnstageVolume),
                cap(rpc::Type::GetVolumeStats),
                cap(rpc::Type::VolumeCondition),
                cap(rpc::Type::ExpandVolume),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let segments = HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), self.config.node_id.clone())]);
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes_per_node,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_csi_proto::v1::volume_capability::{AccessMode, MountVolume};

    fn service() -> NodeService {
        NodeService::new(NodeConfig {
            node_id: "n7".to_owned(),
            max_volumes_per_node: 12,
            engine_host_socket: PathBuf::from("/nonexistent/tessera/engine-host.sock"),
        })
    }

    pub(super) fn mount_cap(mode: Mode, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.to_owned(),
                mount_flags: vec!["noatime".to_owned()],
                volume_mount_group: String::new(),
            })),
        }
    }

    #[tokio::test]
    async fn node_get_info_reports_id_limit_and_topology() {
        let info = service()
            .node_get_info(Request::new(NodeGetInfoRequest {}))
            .await
            .expect("NodeGetInfo never fails")
            .into_inner();
        assert_eq!(info.node_id, "n7");
        assert_eq!(info.max_volumes_per_node, 12);
        let topology = info.accessible_topology.expect("topology is always set");
        assert_eq!(
            topology.segments.get(TOPOLOGY_NODE_KEY).map(String::as_str),
            Some("n7")
        );
    }

    #[tokio::test]
    async fn capabilities_are_stage_stats_and_condition() {
        let caps = service()
            .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
            .await
            .expect("never fails")
            .into_inner()
            .capabilities;
        let types: Vec<i32> = caps
            .iter()
            .filter_map(|c| c.r#type.map(|CapType::Rpc(r)| r.r#type))
            .collect();
        assert_eq!(
            types,
            vec![
                rpc::Type::StageUnstageVolume as i32,
                rpc::Type::GetVolumeStats as i32,
                rpc::Type::VolumeCondition as i32,
                rpc::Type::ExpandVolume as i32
            ]
        );
    }

    #[tokio::test]
    async fn required_fields_are_invalid_argument_before_any_io() {
        let s = service();
        let cap = Some(mount_cap(Mode::SingleNodeWriter, "ext4"));
        let ctx = HashMap::from([
            (KEY_EPOCH.to_owned(), "1".to_owned()),
            (KEY_REPLICAS.to_owned(), "a=h:1".to_owned()),
        ]);
        let stage =
            |id: &str, path: &str, cap: Option<VolumeCapability>, ctx: &HashMap<String, String>| {
                NodeStageVolumeRequest {
                    volume_id: id.to_owned(),
                    staging_target_path: path.to_owned(),
                    volume_capability: cap,
                    publish_context: ctx.clone(),
                    ..Default::default()
                }
            };
        for req in [
            stage("", "/s", cap.clone(), &ctx),
            stage("v", "", cap.clone(), &ctx),
            stage("v", "/s", None, &ctx),
            stage("v", "/s", cap.clone(), &HashMap::new()),
        ] {
            let st = s
                .node_stage_volume(Request::new(req))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument, "{}", st.message());
        }
        let st = s
            .node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: "v".into(),
                target_path: "/t".into(),
                volume_capability: cap.clone(),
                ..Default::default()
            }))
            .await
            .expect_err("no staging path");
        assert_eq!(st.code(), Code::FailedPrecondition);
        for (id, path) in [("", "/t"), ("v", "")] {
            let st = s
                .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                    volume_id: id.into(),
                    target_path: path.into(),
                }))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument);
            let st = s
                .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                    volume_id: id.into(),
                    volume_path: path.into(),
                    staging_target_path: String::new(),
                }))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument);
            let st = s
                .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                    volume_id: id.into(),
                    volume_path: path.into(),
                    ..Default::default()
                }))
                .await
                .expect_err("invalid");
            assert_eq!(st.code(), Code::InvalidArgument);
        }
    }

    #[tokio::test]
    async fn unreachable_engine_host_is_unavailable() {
        let st = service()
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: "v".into(),
                volume_path: "/x".into(),
                staging_target_path: String::new(),
            }))
            .await
            .expect_err("no engine-host");
        assert_eq!(st.code(), Code::Unavailable, "{}", st.message());
    }

    #[tokio::test]
    async fn unpublish_of_a_missing_path_succeeds() {
        service()
            .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: "v".into(),
                target_path: "/nonexistent/tessera/target".into(),
            }))
            .await
            .expect("nothing to undo");
    }
}
