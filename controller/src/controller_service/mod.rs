//! The CSI Controller service, split by concern:
//!
//! * `lifecycle`: CreateVolume (with restores and clones) and DeleteVolume.
//! * `publish`: ControllerPublishVolume / Unpublish, with fencing.
//! * `resize`: ControllerExpandVolume and ControllerModifyVolume.
//! * `snapshots`: CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot.
//! * `inspect`: ValidateVolumeCapabilities, ListVolumes, ControllerGetVolume,
//!   GetCapacity.
//!
//! Every mutating call takes the volume's keyed lock, then talks to the volume's
//! replicas (in parallel, each call under a deadline) and succeeds only when a
//! majority confirmed ([`crate::quorum`], through [`Volumes`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tessera_csi_proto::v1::controller_server::Controller;
use tessera_csi_proto::v1::controller_service_capability::rpc::Type as RpcType;
use tessera_csi_proto::v1::controller_service_capability::{Rpc, Type as CapType};
use tessera_csi_proto::v1::{self as csi, Topology, VolumeCondition};
use tessera_csi_proto::TOPOLOGY_NODE_KEY;
use tessera_replica_protocol::control_proto::VolumeRecord;
use tonic::{Code, Request, Response, Status};

use crate::error::ControllerError;
use crate::heal::{HealConfig, Healer};
use crate::locks::KeyedLocks;
use crate::metrics::Metrics;
use crate::quorum::majority;
use crate::replica_pool::ReplicaPool;
use crate::restore::{self, Restorer};
use crate::volume_index::VolumeIndex;
use crate::volumes::Volumes;

mod inspect;
mod lifecycle;
mod publish;
mod resize;
mod snapshots;

/// How long a CreateVolume with a content source waits for the copy by default
/// before it answers ABORTED with the progress (the CO retries).
pub const DEFAULT_COPY_WAIT: Duration = Duration::from_secs(8);

/// Settings of the controller service that do not come from the replicas.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Node ids volumes may be published to besides the replica daemons' nodes
    /// (compute-only nodes).
    pub extra_nodes: BTreeSet<String>,
    /// How long CreateVolume waits for a restore or clone to be copied on every
    /// replica before answering ABORTED with the progress (`--copy-wait`).
    pub copy_wait: Duration,
    /// When lost replicas are replaced and how often the healing pass runs
    /// (`--replacement-delay`, `--heal-interval`); DeleteVolume stops waiting for a
    /// member unreachable for longer than the delay.
    pub heal: HealConfig,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            extra_nodes: BTreeSet::new(),
            copy_wait: DEFAULT_COPY_WAIT,
            heal: HealConfig::default(),
        }
    }
}

/// Implements `csi.v1.Controller` over a pool of replica daemons.
#[derive(Debug, Clone)]
pub struct ControllerService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    volumes: Volumes,
    locks: Arc<KeyedLocks>,
    restorer: Restorer,
    cfg: ControllerConfig,
    metrics: Arc<Metrics>,
}

type Result<T, E = ControllerError> = std::result::Result<T, E>;

fn size_i64(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

impl ControllerService {
    /// A service over `pool` with an already loaded `index` (see [`crate::load_index`]).
    pub fn new(
        pool: Arc<ReplicaPool>,
        index: Arc<VolumeIndex>,
        cfg: ControllerConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let volumes = Volumes::new(pool, index);
        let locks = Arc::new(KeyedLocks::default());
        let restorer = Restorer::new(volumes.clone(), locks.clone(), cfg.copy_wait);
        Self {
            inner: Arc::new(Inner {
                volumes,
                locks,
                restorer,
                cfg,
                metrics,
            }),
        }
    }

    /// The healing pass over this service's volumes, under the same per-volume locks
    /// (run it with [`Healer::run`]).
    pub fn healer(&self) -> Healer {
        Healer::new(
            self.inner.volumes.clone(),
            self.inner.locks.clone(),
            self.inner.cfg.heal,
            self.inner.metrics.clone(),
        )
    }

    fn finish<T>(
        &self,
        method: &'static str,
        r: Result<T>,
    ) -> std::result::Result<Response<T>, Status> {
        let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|e| e.code());
        self.inner.metrics.observe_rpc(method, code);
        match r {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                // Replica trouble and lost races need an operator's eye; bad requests
                // are the caller's business.
                let operator = matches!(code, Code::Unavailable | Code::Internal | Code::Aborted)
                    && !matches!(e, ControllerError::InvalidToken(_));
                if operator {
                    tracing::warn!(method, error = %e, "CSI call failed");
                } else {
                    tracing::debug!(method, error = %e, "CSI call rejected");
                }
                Err(e.into())
            }
        }
    }

    fn volumes(&self) -> &Volumes {
        &self.inner.volumes
    }

    fn pool(&self) -> &ReplicaPool {
        self.volumes().pool()
    }

    fn index(&self) -> &VolumeIndex {
        self.volumes().index()
    }

    /// Per-volume locks; every call that changes a volume holds its key.
    fn locks(&self) -> &KeyedLocks {
        &self.inner.locks
    }

    fn restorer(&self) -> &Restorer {
        &self.inner.restorer
    }

    /// Deletes internal clone snapshots no longer needed (at start; see
    /// [`Restorer::sweep_clone_snapshots`]). Returns how many were deleted.
    pub async fn sweep_clone_snapshots(&self) -> usize {
        self.restorer().sweep_clone_snapshots().await
    }

    /// Node ids a volume may be published to.
    fn known_nodes(&self) -> BTreeSet<String> {
        let mut n = self.pool().known_node_ids();
        n.extend(self.inner.cfg.extra_nodes.iter().cloned());
        n
    }

    fn volume(&self, rec: &VolumeRecord, requisite: &[Topology]) -> csi::Volume {
        let accessible_topology = if requisite.is_empty() {
            self.known_nodes()
                .into_iter()
                .map(|n| Topology {
                    segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), n)]),
                })
                .collect()
        } else {
            requisite.to_vec()
        };
        csi::Volume {
            capacity_bytes: size_i64(rec.size_bytes),
            volume_id: rec.volume_id.clone(),
            volume_context: rec.parameters.clone(),
            content_source: rec.copy_source.as_ref().map(restore::content_source),
            accessible_topology,
        }
    }

    /// Volume condition judged from the pool's liveness view (no RPCs).
    fn condition_from_liveness(&self, rec: &VolumeRecord) -> VolumeCondition {
        let live = rec
            .replicas
            .iter()
            .filter(|r| self.pool().is_live(r))
            .count();
        condition(live, rec.replicas.len(), "reachable")
    }
}

/// Abnormal when fewer than a majority of `total` replicas are `good`.
fn condition(good: usize, total: usize, what: &str) -> VolumeCondition {
    let need = majority(total);
    if good < need {
        VolumeCondition {
            abnormal: true,
            message: format!(
                "only {good} of {total} replicas {what}; a majority ({need}) is needed for I/O"
            ),
        }
    } else if good < total {
        VolumeCondition {
            abnormal: false,
            message: format!("degraded: {good} of {total} replicas {what}"),
        }
    } else {
        VolumeCondition {
            abnormal: false,
            message: format!("all {total} replicas {what}"),
        }
    }
}

/// The controller capabilities Tessera implements.
pub fn controller_capabilities() -> Vec<csi::ControllerServiceCapability> {
    [
        RpcType::CreateDeleteVolume,
        RpcType::PublishUnpublishVolume,
        RpcType::ListVolumes,
        RpcType::GetCapacity,
        RpcType::ListVolumesPublishedNodes,
        RpcType::PublishReadonly,
        RpcType::GetVolume,
        RpcType::VolumeCondition,
        RpcType::SingleNodeMultiWriter,
        RpcType::ModifyVolume,
        RpcType::ExpandVolume,
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::GetSnapshot,
        RpcType::CloneVolume,
    ]
    .into_iter()
    .map(|t| csi::ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    })
    .collect()
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = self.do_create(request.into_inner()).await;
        self.finish("CreateVolume", r)
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = self.do_delete(request.into_inner()).await;
        self.finish("DeleteVolume", r)
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = self.do_publish(request.into_inner()).await;
        self.finish("ControllerPublishVolume", r)
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = self.do_unpublish(request.into_inner()).await;
        self.finish("ControllerUnpublishVolume", r)
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = self.do_validate(request.into_inner()).await;
        self.finish("ValidateVolumeCapabilities", r)
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> std::result::Result<Response<csi::ListVolumesResponse>, Status> {
        let r = self.do_list(request.into_inner()).await;
        self.finish("ListVolumes", r)
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> std::result::Result<Response<csi::GetCapacityResponse>, Status> {
        let r = self.do_get_capacity(request.into_inner()).await;
        self.finish("GetCapacity", r)
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        self.finish(
            "ControllerGetCapabilities",
            Ok(csi::ControllerGetCapabilitiesResponse {
                capabilities: controller_capabilities(),
            }),
        )
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = self.do_create_snapshot(request.into_inner()).await;
        self.finish("CreateSnapshot", r)
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = self.do_delete_snapshot(request.into_inner()).await;
        self.finish("DeleteSnapshot", r)
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = self.do_list_snapshots(request.into_inner()).await;
        self.finish("ListSnapshots", r)
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> std::result::Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = self.do_get_snapshot(request.into_inner()).await;
        self.finish("GetSnapshot", r)
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = self.do_expand(request.into_inner()).await;
        self.finish("ControllerExpandVolume", r)
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = self.do_get_volume(request.into_inner()).await;
        self.finish("ControllerGetVolume", r)
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = self.do_modify(request.into_inner()).await;
        self.finish("ControllerModifyVolume", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_thresholds() {
        assert!(condition(1, 3, "x").abnormal);
        assert!(!condition(2, 3, "x").abnormal);
        assert!(condition(2, 3, "x").message.contains("degraded"));
        assert!(!condition(3, 3, "x").abnormal);
        assert!(condition(0, 1, "x").abnormal);
    }

    #[test]
    fn capabilities_advertise_modify_expand_snapshots_and_clone() {
        let caps = controller_capabilities();
        let types: Vec<i32> = caps
            .iter()
            .filter_map(|c| c.r#type.map(|CapType::Rpc(r)| r.r#type))
            .collect();
        for t in [
            RpcType::CreateDeleteVolume,
            RpcType::ModifyVolume,
            RpcType::ExpandVolume,
            RpcType::CreateDeleteSnapshot,
            RpcType::ListSnapshots,
            RpcType::GetSnapshot,
            RpcType::CloneVolume,
        ] {
            assert!(types.contains(&(t as i32)), "{t:?} is advertised");
        }
    }
}
