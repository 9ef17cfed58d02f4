//! CSI Node service.
//!
//! Only the informational RPCs work so far. Staging, publishing, stats and expansion
//! need the per-volume engine and the FUSE + loop frontend, which are not built yet;
//! those RPCs answer UNIMPLEMENTED so a caller sees a precise reason instead of a
//! half-done mount. NodeUnpublishVolume is the exception: with nothing ever
//! published, undoing a publish is a no-op that succeeds (the spec requires it to be
//! idempotent, and cleanup paths call it unconditionally).

use std::collections::HashMap;

use tessera_csi_proto::v1::node_server::Node;
use tessera_csi_proto::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeStageVolumeRequest, NodeStageVolumeResponse,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest,
    NodeUnstageVolumeResponse, Topology,
};
use tessera_csi_proto::TOPOLOGY_NODE_KEY;
use tonic::{Request, Response, Status};

/// Default for [`NodeConfig::max_volumes_per_node`].
pub const DEFAULT_MAX_VOLUMES_PER_NODE: i64 = 64;

/// What the node plugin knows about the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node id reported to the CO; replica placement and topology use the same id.
    pub node_id: String,
    /// Most volumes the CO may publish to this node at once.
    pub max_volumes_per_node: i64,
}

/// Node service for one node.
#[derive(Debug, Clone)]
pub struct NodeService {
    config: NodeConfig,
}

impl NodeService {
    /// Creates the service for the node described by `config`.
    pub fn new(config: NodeConfig) -> Self {
        Self { config }
    }
}

/// The status every data-path RPC returns until the engine exists.
fn data_path_missing(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not available: the Tessera node data path (engine and block-device \
         frontend) is not built yet"
    ))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(data_path_missing("NodeStageVolume"))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(data_path_missing("NodeUnstageVolume"))
    }

    async fn node_publish_volume(
        &self,
        _request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        Err(data_path_missing("NodePublishVolume"))
    }

    /// Undoes a NodePublishVolume. This plugin cannot publish yet, so there is
    /// never anything to undo: a well-formed request succeeds, as the spec's
    /// idempotency demands for a target path that is not (or no longer) published.
    /// COs and csi-sanity call it during cleanup whatever happened before.
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        if request.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if request.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        tracing::debug!(
            volume_id = %request.volume_id,
            target_path = %request.target_path,
            "NodeUnpublishVolume: nothing is published by this node"
        );
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(data_path_missing("NodeGetVolumeStats"))
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(data_path_missing("NodeExpandVolume"))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // No STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS or EXPAND_VOLUME until they work.
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
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

    fn service() -> NodeService {
        NodeService::new(NodeConfig {
            node_id: "n7".to_owned(),
            max_volumes_per_node: 12,
        })
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
        assert_eq!(topology.segments.len(), 1);
    }

    #[tokio::test]
    async fn data_path_rpcs_are_unimplemented() {
        let status = service()
            .node_stage_volume(Request::new(NodeStageVolumeRequest::default()))
            .await
            .expect_err("staging is not built");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("NodeStageVolume"));
    }

    #[tokio::test]
    async fn unpublish_of_nothing_succeeds_but_checks_its_arguments() {
        let request = |volume_id: &str, target_path: &str| {
            Request::new(NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_owned(),
                target_path: target_path.to_owned(),
            })
        };
        service()
            .node_unpublish_volume(request("tv-1", "/var/lib/kubelet/pods/x/mount"))
            .await
            .expect("nothing published: OK");
        for (volume_id, target_path) in [("", "/t"), ("tv-1", "")] {
            let status = service()
                .node_unpublish_volume(request(volume_id, target_path))
                .await
                .expect_err("a required field is missing");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
}
