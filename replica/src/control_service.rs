//! The control gRPC service (`tessera.replica.v1.ReplicaControl`) over a [`Catalog`].
//!
//! This layer only translates: requests into catalog calls, [`CatalogError`]s into
//! status codes (the mapping is the contract in `proto/replica_control.proto`), and it
//! counts requests for `/metrics` (rendered by [`crate::metrics`]). Catalog mutations block on fsync, so they run on
//! tokio's blocking pool; reads are in-memory and run inline.

use std::sync::Arc;

use tessera_telemetry::{error_chain, GrpcRequests};
use tonic::{Code, Request, Response, Status};
use tracing::{error, warn};

use crate::block_io::BLOCK_SIZE;
use crate::catalog::{Catalog, CatalogError, NewVolume, RecordUpdate};
use crate::control_proto as proto;
use crate::control_proto::replica_control_server::ReplicaControl;
use crate::copy::CopyManager;
use crate::snapshot_read::{self, BlockStream, StreamPacing};
use crate::store::StoreError;

/// Identity of this daemon as reported by GetInfo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node id (the Kubernetes node name, by default the hostname).
    pub node_id: String,
    /// Topology zone, "" when unknown.
    pub zone: String,
    /// Dialable host:port of the data-plane listener.
    pub data_address: String,
}

/// The control gRPC service. Cheap to clone; clones share the catalog and counters.
#[derive(Clone)]
pub struct ControlService {
    catalog: Arc<Catalog>,
    info: Arc<NodeInfo>,
    requests: GrpcRequests,
    /// Runs restore, clone and rebuild copies; `None` records copy sources without
    /// copying (tests of the catalog side).
    copies: Option<Arc<CopyManager>>,
    /// How much of this daemon's time the copy streams it serves may take while
    /// foreground I/O is active.
    pacing: StreamPacing,
}

impl ControlService {
    /// Serves `catalog`, reporting `info` from GetInfo.
    pub fn new(catalog: Arc<Catalog>, info: NodeInfo) -> Self {
        ControlService {
            catalog,
            info: Arc::new(info),
            requests: GrpcRequests::default(),
            copies: None,
            pacing: StreamPacing::default(),
        }
    }

    /// Paces the copy streams this daemon serves with `pacing` (default:
    /// [`StreamPacing::default`]).
    pub fn with_stream_pacing(mut self, pacing: StreamPacing) -> Self {
        self.pacing = pacing;
        self
    }

    /// Runs the copies of volumes created with a copy source through `copies`.
    pub fn with_copies(mut self, copies: Arc<CopyManager>) -> Self {
        self.copies = Some(copies);
        self
    }

    /// Checks a `ReadSnapshotBlocks` request and starts its stream (with data, or
    /// versions only for `seqs_only`: the checks are the same either way). An empty
    /// snapshot id reads the volume's head, for a rebuild: live volumes only.
    fn snapshot_stream(
        &self,
        req: proto::ReadSnapshotBlocksRequest,
    ) -> Result<BlockStream, Status> {
        if !req.offset.is_multiple_of(BLOCK_SIZE) || !req.length.is_multiple_of(BLOCK_SIZE) {
            return Err(Status::invalid_argument(format!(
                "range {}+{} is not aligned to {BLOCK_SIZE} bytes",
                req.offset, req.length
            )));
        }
        let (source, view) = if req.snapshot_id.is_empty() {
            let source = self.catalog.head_source(&req.volume_id)?;
            (source, format!("volume {}", req.volume_id))
        } else {
            let source = self
                .catalog
                .snapshot_source(&req.volume_id, &req.snapshot_id)?;
            (source, format!("snapshot {}", req.snapshot_id))
        };
        match req.offset.checked_add(req.length) {
            Some(end) if end <= source.size_bytes => {}
            _ => {
                return Err(Status::out_of_range(format!(
                    "range {}+{} is outside {view} of {} bytes",
                    req.offset, req.length, source.size_bytes
                )))
            }
        }
        Ok(snapshot_read::stream_snapshot(
            source.store,
            req,
            self.pacing,
        ))
    }

    /// The request counters (shared with every clone), for [`crate::metrics`].
    pub fn requests(&self) -> &GrpcRequests {
        &self.requests
    }

    /// Runs a catalog call on the blocking pool, since mutations fsync.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Catalog) -> Result<T, CatalogError> + Send + 'static,
    {
        let catalog = Arc::clone(&self.catalog);
        match tokio::task::spawn_blocking(move || f(&catalog)).await {
            Ok(result) => result.map_err(Status::from),
            Err(join) => {
                error!(error = %join, "catalog task failed");
                Err(Status::internal("catalog task failed"))
            }
        }
    }

    fn finish<T>(
        &self,
        method: &'static str,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.requests.observe(method, code);
        result.map(Response::new)
    }
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Self {
        let code = match &e {
            CatalogError::InvalidVolumeId { .. }
            | CatalogError::InvalidSize { .. }
            | CatalogError::InvalidQos { .. }
            | CatalogError::InvalidCopySource { .. }
            | CatalogError::InvalidReplicaSet { .. }
            | CatalogError::EpochNotIncreasing { .. }
            | CatalogError::EpochTooLarge { .. } => Code::InvalidArgument,
            CatalogError::Conflict { .. } => Code::AlreadyExists,
            CatalogError::NoCapacity { .. } | CatalogError::DiskFull { .. } => {
                Code::ResourceExhausted
            }
            CatalogError::NotFound(_) => Code::NotFound,
            CatalogError::Shrink { .. } | CatalogError::CopyTooSmall { .. } => Code::OutOfRange,
            CatalogError::GenerationMismatch { .. } | CatalogError::EpochMismatch { .. } => {
                Code::Aborted
            }
            CatalogError::Quarantined { .. }
            | CatalogError::HeldBySnapshots(_)
            | CatalogError::Populating { .. } => Code::FailedPrecondition,
            CatalogError::Locked { .. } => Code::Unavailable,
            CatalogError::Store { source, .. } => store_code(source),
            CatalogError::Io { .. } | CatalogError::Scheduler { .. } => Code::Internal,
        };
        let msg = error_chain(&e);
        match code {
            // The replica's own failure: an operator has to look, so log it here,
            // where it is handled.
            Code::Internal => error!(error = %msg, "control request failed"),
            Code::ResourceExhausted | Code::FailedPrecondition => {
                warn!(error = %msg, "control request refused")
            }
            _ => {}
        }
        Status::new(code, msg)
    }
}

/// The code of a store failure: the caller's mistakes (unknown snapshot, a bad range,
/// snapshots given in the wrong order) are told apart from this replica's own faults.
fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::SnapshotNotFound(_) => Code::NotFound,
        StoreError::Unaligned { .. } | StoreError::InvalidSnapshotId { .. } => {
            Code::InvalidArgument
        }
        StoreError::OutOfRange { .. } => Code::OutOfRange,
        StoreError::SnapshotOrder { .. } => Code::FailedPrecondition,
        StoreError::MergeInProgress | StoreError::SourceBusy => Code::Unavailable,
        _ => Code::Internal,
    }
}

#[tonic::async_trait]
impl ReplicaControl for ControlService {
    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::ReplicaInfo>, Status> {
        let info = Arc::clone(&self.info);
        let result = self
            .blocking(|c| c.capacity())
            .await
            .map(|cap| proto::ReplicaInfo {
                node_id: info.node_id.clone(),
                zone: info.zone.clone(),
                data_address: info.data_address.clone(),
                capacity_bytes: cap.capacity_bytes,
                free_bytes: cap.free_bytes,
                volume_count: cap.volume_count,
                version: env!("CARGO_PKG_VERSION").to_string(),
            });
        self.finish("GetInfo", result)
    }

    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::VolumeRecord>, Status> {
        let new = new_volume(request.into_inner());
        let result = self.blocking(move |c| c.create(new)).await;
        if let (Ok(out), Some(copies)) = (&result, &self.copies) {
            if out.record.pending_copy().is_some() {
                copies.start(&out.record.volume_id);
            }
        }
        self.finish("CreateVolume", result.map(|out| out.record.into()))
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        let deleted = id.clone();
        let result = self
            .blocking(move |c| c.delete(&deleted))
            .await
            .map(|existed| proto::DeleteVolumeResponse { existed });
        if let (Ok(_), Some(copies)) = (&result, &self.copies) {
            // The store is retired already, so the task can write nothing more; wait
            // for it so no copy work outlives the answer.
            copies.stop(&id).await;
        }
        self.finish("DeleteVolume", result)
    }

    async fn get_volume(
        &self,
        request: Request<proto::GetVolumeRequest>,
    ) -> Result<Response<proto::VolumeRecord>, Status> {
        let volume_id = request.into_inner().volume_id;
        let result = self
            .catalog
            .get(&volume_id)
            .map(|record| {
                let mut out: proto::VolumeRecord = record.into();
                out.in_sync = self.catalog.open_store(&volume_id).ok().map(|(store, _)| {
                    let m = store.sync_state().membership.get();
                    proto::InSyncRecord {
                        epoch: m.epoch,
                        version: m.version,
                        members: m.members,
                    }
                });
                out
            })
            .map_err(Status::from);
        self.finish("GetVolume", result)
    }

    async fn list_volumes(
        &self,
        _request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let volumes = self.catalog.list().into_iter().map(Into::into).collect();
        self.finish("ListVolumes", Ok(proto::ListVolumesResponse { volumes }))
    }

    async fn update_volume(
        &self,
        request: Request<proto::UpdateVolumeRequest>,
    ) -> Result<Response<proto::VolumeRecord>, Status> {
        let req = request.into_inner();
        let attachments = req.attachments.into_iter().map(Into::into).collect();
        let parameters = req.parameters.into_iter().collect();
        let replicas =
            (!req.replicas.is_empty()).then(|| req.replicas.into_iter().map(Into::into).collect());
        let result = self
            .blocking(move |c| {
                c.update(
                    &req.volume_id,
                    req.expected_generation,
                    RecordUpdate {
                        attachments,
                        parameters,
                        replicas,
                    },
                )
            })
            .await
            .map(Into::into);
        self.finish("UpdateVolume", result)
    }

    async fn raise_epoch(
        &self,
        request: Request<proto::RaiseEpochRequest>,
    ) -> Result<Response<proto::RaiseEpochResponse>, Status> {
        let req = request.into_inner();
        let result = self
            .blocking(move |c| c.raise_epoch(&req.volume_id, req.expected_epoch, req.new_epoch))
            .await
            .map(|epoch| proto::RaiseEpochResponse { epoch });
        self.finish("RaiseEpoch", result)
    }

    async fn expand_volume(
        &self,
        request: Request<proto::ExpandVolumeRequest>,
    ) -> Result<Response<proto::VolumeRecord>, Status> {
        let req = request.into_inner();
        let result = self
            .blocking(move |c| c.expand(&req.volume_id, req.expected_generation, req.new_size))
            .await
            .map(Into::into);
        self.finish("ExpandVolume", result)
    }

    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::SnapshotRecord>, Status> {
        let req = request.into_inner();
        let result = self
            .blocking(move |c| {
                c.create_snapshot(
                    &req.volume_id,
                    &req.snapshot_id,
                    &req.name,
                    req.created_unix_nanos,
                )
            })
            .await
            .map(|(rec, meta)| snapshot_record(&rec, meta));
        self.finish("CreateSnapshot", result)
    }

    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let result = self
            .blocking(move |c| c.delete_snapshot(&req.volume_id, &req.snapshot_id))
            .await
            .map(|existed| proto::DeleteSnapshotResponse { existed });
        self.finish("DeleteSnapshot", result)
    }

    async fn list_snapshots(
        &self,
        _request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let snapshots = self
            .catalog
            .list_snapshots()
            .into_iter()
            .map(|(rec, meta)| snapshot_record(&rec, meta))
            .collect();
        self.finish(
            "ListSnapshots",
            Ok(proto::ListSnapshotsResponse { snapshots }),
        )
    }

    type ReadSnapshotBlocksStream = BlockStream;

    async fn read_snapshot_blocks(
        &self,
        request: Request<proto::ReadSnapshotBlocksRequest>,
    ) -> Result<Response<Self::ReadSnapshotBlocksStream>, Status> {
        let result = self.snapshot_stream(request.into_inner());
        self.finish("ReadSnapshotBlocks", result)
    }

    async fn snapshot_ranges(
        &self,
        request: Request<proto::SnapshotRangesRequest>,
    ) -> Result<Response<proto::SnapshotRangesResponse>, Status> {
        let req = request.into_inner();
        let result = self
            .blocking(move |c| {
                let source = c.snapshot_source(&req.volume_id, &req.snapshot_id)?;
                let store_err = |source| CatalogError::Store {
                    volume_id: req.volume_id.clone(),
                    op: "list the ranges of",
                    source,
                };
                let ranges = snapshot_read::snapshot_ranges(
                    &source.store,
                    &req.snapshot_id,
                    &req.base_snapshot_id,
                )
                .map_err(store_err)?;
                Ok(proto::SnapshotRangesResponse {
                    ranges,
                    size_bytes: source.size_bytes,
                })
            })
            .await;
        self.finish("SnapshotRanges", result)
    }
}

/// The catalog's form of a CreateVolume request.
fn new_volume(r: proto::CreateVolumeRequest) -> NewVolume {
    NewVolume {
        volume_id: r.volume_id,
        name: r.name,
        size_bytes: r.size_bytes,
        replication_factor: r.replication_factor,
        replicas: r.replicas.into_iter().map(Into::into).collect(),
        parameters: r.parameters.into_iter().collect(),
        created_unix_nanos: r.created_unix_nanos,
        access_type: r.access_type,
        copy_source: r.copy_source.map(Into::into),
        epoch: r.epoch,
    }
}

/// The wire form of a snapshot of the volume `rec`.
fn snapshot_record(
    rec: &crate::record::VolumeRecord,
    meta: crate::record::SnapshotMeta,
) -> proto::SnapshotRecord {
    proto::SnapshotRecord {
        snapshot_id: meta.snapshot_id,
        name: meta.name,
        source_volume_id: rec.volume_id.clone(),
        size_bytes: meta.size_bytes,
        created_unix_nanos: meta.created_unix_nanos,
        replication_factor: rec.replication_factor,
        source_deleted: rec.deleted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogConfig;

    fn service(dir: &std::path::Path) -> ControlService {
        let catalog = Catalog::open(CatalogConfig {
            data_dir: dir.to_path_buf(),
            capacity_bytes: Some(1 << 30),
        })
        .expect("open");
        ControlService::new(
            Arc::new(catalog),
            NodeInfo {
                node_id: "n1".into(),
                zone: "z".into(),
                data_address: "127.0.0.1:7401".into(),
            },
        )
    }

    fn create(id: &str, size: u64) -> Request<proto::CreateVolumeRequest> {
        Request::new(proto::CreateVolumeRequest {
            volume_id: id.into(),
            name: id.into(),
            size_bytes: size,
            replication_factor: 3,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn errors_map_to_the_contracted_codes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let svc = service(tmp.path());
        let code = |r: Result<Response<proto::VolumeRecord>, Status>| {
            r.err().map(|s| s.code()).unwrap_or(Code::Ok)
        };
        assert_eq!(code(svc.create_volume(create("a", 4096)).await), Code::Ok);
        assert_eq!(code(svc.create_volume(create("a", 4096)).await), Code::Ok);
        assert_eq!(
            code(svc.create_volume(create("a", 8192)).await),
            Code::AlreadyExists
        );
        assert_eq!(
            code(svc.create_volume(create("a", 100)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(svc.create_volume(create(".a", 4096)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(svc.create_volume(create("big", 2 << 30)).await),
            Code::ResourceExhausted
        );
        let get = |id: &str| {
            Request::new(proto::GetVolumeRequest {
                volume_id: id.into(),
            })
        };
        assert_eq!(code(svc.get_volume(get("nope")).await), Code::NotFound);
        let upd = Request::new(proto::UpdateVolumeRequest {
            volume_id: "a".into(),
            expected_generation: 7,
            ..Default::default()
        });
        let err = svc.update_volume(upd).await.expect_err("stale generation");
        assert_eq!(err.code(), Code::Aborted);
        assert!(err.message().contains("current generation is 1"));

        let raise = |expected, new| {
            Request::new(proto::RaiseEpochRequest {
                volume_id: "a".into(),
                expected_epoch: expected,
                new_epoch: new,
            })
        };
        assert_eq!(
            svc.raise_epoch(raise(0, 2))
                .await
                .expect("raise")
                .get_ref()
                .epoch,
            2
        );
        let err = svc.raise_epoch(raise(0, 3)).await.expect_err("stale epoch");
        assert_eq!(err.code(), Code::Aborted);
        assert!(
            err.message().contains("current epoch is 2"),
            "{}",
            err.message()
        );
        let err = svc.raise_epoch(raise(2, 2)).await.expect_err("not raised");
        assert_eq!(err.code(), Code::InvalidArgument);

        assert_eq!(svc.requests().count("CreateVolume", Code::Ok), 2);
        assert_eq!(svc.requests().count("RaiseEpoch", Code::Aborted), 1);
        assert_eq!(svc.requests().count("CreateVolume", Code::AlreadyExists), 1);
    }

    #[tokio::test]
    async fn get_info_reports_identity_and_capacity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let svc = service(tmp.path());
        svc.create_volume(create("a", 1 << 20))
            .await
            .expect("create");
        let info = svc
            .get_info(Request::new(proto::GetInfoRequest {}))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.node_id, "n1");
        assert_eq!(info.zone, "z");
        assert_eq!(info.data_address, "127.0.0.1:7401");
        assert_eq!(info.capacity_bytes, 1 << 30);
        assert!(info.free_bytes <= (1 << 30) - (1 << 20));
        assert_eq!(info.volume_count, 1);
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    }
}
