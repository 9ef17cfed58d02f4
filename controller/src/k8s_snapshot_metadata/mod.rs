//! The Kubernetes SnapshotMetadata API, served to backup applications over TLS.
//!
//! In the KEP's design the external-snapshot-metadata sidecar serves this API, checks
//! the caller's token and calls the driver's CSI SnapshotMetadata over its socket.
//! That sidecar cannot be built here, so the controller does its job itself (a
//! `--snapshot-metadata-listen` port): each call is checked by [`access`] (token for
//! this service's audience, then `get volumesnapshots` in the namespace), the named
//! VolumeSnapshots are resolved to CSI snapshot handles through their bound
//! VolumeSnapshotContents ([`lookup`]), and the answer is the CSI service's
//! ([`crate::snapshot_metadata`]), streamed in this API's message types. Checks run
//! before anything is read, so a refused call learns nothing, not even whether the
//! snapshot exists.

pub mod access;
pub mod lookup;

use std::pin::Pin;

use tessera_csi_proto::k8s_snapshot_metadata as k8s;
use tessera_csi_proto::v1 as csi;
use tessera_csi_proto::v1::snapshot_metadata_server::SnapshotMetadata as _;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::snapshot_metadata::SnapshotMetadataService;
use access::Access;

/// The audience tokens must be issued for unless `--snapshot-metadata-audience`
/// says otherwise.
pub const DEFAULT_AUDIENCE: &str = "tessera-snapshot-metadata";

/// The namespace of a request that names none (as the API defines).
const DEFAULT_NAMESPACE: &str = "default";

/// Serves [`k8s::snapshot_metadata_server::SnapshotMetadata`].
#[derive(Debug, Clone)]
pub struct KubeSnapshotMetadata {
    csi: SnapshotMetadataService,
    access: Access,
}

type MessageStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl KubeSnapshotMetadata {
    /// Answers from `csi` the calls `access` lets through.
    pub fn new(csi: SnapshotMetadataService, access: Access) -> Self {
        KubeSnapshotMetadata { csi, access }
    }
}

fn namespace_of(requested: &str) -> Result<&str, Status> {
    let ns = if requested.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        requested
    };
    lookup::check_name("namespace", ns)?;
    Ok(ns)
}

fn blocks(list: Vec<csi::BlockMetadata>) -> Vec<k8s::BlockMetadata> {
    list.into_iter()
        .map(|b| k8s::BlockMetadata {
            byte_offset: b.byte_offset,
            size_bytes: b.size_bytes,
        })
        .collect()
}

/// This API's enum value for the CSI one (the numbers are the same by design, but
/// the mapping is spelled out so a change in either is a compile error here).
fn block_type(csi_type: i32) -> i32 {
    match csi::BlockMetadataType::try_from(csi_type) {
        Ok(csi::BlockMetadataType::FixedLength) => k8s::BlockMetadataType::FixedLength as i32,
        Ok(csi::BlockMetadataType::VariableLength) => k8s::BlockMetadataType::VariableLength as i32,
        _ => k8s::BlockMetadataType::Unknown as i32,
    }
}

#[tonic::async_trait]
impl k8s::snapshot_metadata_server::SnapshotMetadata for KubeSnapshotMetadata {
    type GetMetadataAllocatedStream = MessageStream<k8s::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MessageStream<k8s::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<k8s::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = request.into_inner();
        let ns = namespace_of(&r.namespace)?;
        lookup::check_name("snapshot_name", &r.snapshot_name)?;
        self.access.check(&r.security_token, ns).await?;
        let handle = lookup::snapshot_handle(self.access.api(), ns, &r.snapshot_name).await?;
        let answer = self
            .csi
            .get_metadata_allocated(Request::new(csi::GetMetadataAllocatedRequest {
                snapshot_id: handle,
                starting_offset: r.starting_offset,
                max_results: r.max_results,
                secrets: Default::default(),
            }))
            .await?
            .into_inner();
        let out = answer.map(|m| {
            m.map(|m| k8s::GetMetadataAllocatedResponse {
                block_metadata_type: block_type(m.block_metadata_type),
                volume_capacity_bytes: m.volume_capacity_bytes,
                block_metadata: blocks(m.block_metadata),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<k8s::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = request.into_inner();
        let ns = namespace_of(&r.namespace)?;
        lookup::check_name("target_snapshot_name", &r.target_snapshot_name)?;
        if r.base_snapshot_id.is_empty() {
            return Err(Status::invalid_argument(
                "base_snapshot_id (the base snapshot's CSI handle) is required",
            ));
        }
        self.access.check(&r.security_token, ns).await?;
        let target =
            lookup::snapshot_handle(self.access.api(), ns, &r.target_snapshot_name).await?;
        let answer = self
            .csi
            .get_metadata_delta(Request::new(csi::GetMetadataDeltaRequest {
                base_snapshot_id: r.base_snapshot_id,
                target_snapshot_id: target,
                starting_offset: r.starting_offset,
                max_results: r.max_results,
                secrets: Default::default(),
            }))
            .await?
            .into_inner();
        let out = answer.map(|m| {
            m.map(|m| k8s::GetMetadataDeltaResponse {
                block_metadata_type: block_type(m.block_metadata_type),
                volume_capacity_bytes: m.volume_capacity_bytes,
                block_metadata: blocks(m.block_metadata),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}
