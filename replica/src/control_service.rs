//! The control gRPC service (`tessera.replica.v1.ReplicaControl`) over a [`Catalog`].
//!
//! This layer only translates: requests into catalog calls, [`CatalogError`]s into
//! status codes (the mapping is the contract in `proto/replica_control.proto`), and it
//! counts requests for `/metrics`. Catalog mutations block on fsync, so they run on
//! tokio's blocking pool; reads are in-memory and run inline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::{Code, Request, Response, Status};
use tracing::{error, warn};

use crate::block_io::BLOCK_SIZE;
use crate::catalog::{Catalog, CatalogError, NewVolume};
use crate::control_proto as proto;
use crate::control_proto::replica_control_server::ReplicaControl;
use crate::copy::CopyManager;
use crate::health::Probe;
use crate::snapshot_read::{self, BlockStream};
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

/// Request counters by method and status code, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct ControlMetrics {
    /// Keyed by method and `Code as i32` (`Code` is not `Ord`).
    requests: Mutex<BTreeMap<(&'static str, i32), u64>>,
}

impl ControlMetrics {
    fn record(&self, method: &'static str, code: Code) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((method, code as i32))
            .or_insert(0) += 1;
    }

    /// How many `method` calls ended with `code` (for tests and diagnostics).
    pub fn count(&self, method: &str, code: Code) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((m, c), _)| *m == method && *c == code as i32)
            .map(|(_, n)| *n)
            .sum()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tessera_replica_control_requests_total Control gRPC requests by method and status code.\n\
             # TYPE tessera_replica_control_requests_total counter"
        );
        let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        for ((method, code), n) in requests.iter() {
            let code = Code::from_i32(*code);
            let _ = writeln!(
                out,
                "tessera_replica_control_requests_total{{method=\"{method}\",code=\"{code:?}\"}} {n}"
            );
        }
    }
}

/// The control gRPC service. Cheap to clone; clones share the catalog and counters.
#[derive(Clone)]
pub struct ControlService {
    catalog: Arc<Catalog>,
    info: Arc<NodeInfo>,
    metrics: Arc<ControlMetrics>,
    /// Runs restore/clone copies; `None` records copy sources without copying (tests
    /// of the catalog side).
    copies: Option<Arc<CopyManager>>,
}

impl ControlService {
    /// Serves `catalog`, reporting `info` from GetInfo.
    pub fn new(catalog: Arc<Catalog>, info: NodeInfo) -> Self {
        ControlService {
            catalog,
            info: Arc::new(info),
            metrics: Arc::new(ControlMetrics::default()),
            copies: None,
        }
    }

    /// Runs the copies of volumes created with a copy source through `copies`.
    pub fn with_copies(mut self, copies: Arc<CopyManager>) -> Self {
        self.copies = Some(copies);
        self
    }

    /// Checks a `ReadSnapshotBlocks` request and starts its stream (with data, or
    /// versions only for `seqs_only`: the checks are the same either way).
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
        let source = self
            .catalog
            .snapshot_source(&req.volume_id, &req.snapshot_id)?;
        match req.offset.checked_add(req.length) {
            Some(end) if end <= source.size_bytes => {}
            _ => {
                return Err(Status::out_of_range(format!(
                    "range {}+{} is outside snapshot {} of {} bytes",
                    req.offset, req.length, req.snapshot_id, source.size_bytes
                )))
            }
        }
        Ok(snapshot_read::stream_snapshot(source.store, req))
    }

    /// The request counters (shared with every clone).
    pub fn metrics(&self) -> &Arc<ControlMetrics> {
        &self.metrics
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
        self.metrics.record(method, code);
        result.map(Response::new)
    }
}

use crate::error_chain as chain;

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Self {
        let code = match &e {
            CatalogError::InvalidVolumeId { .. }
            | CatalogError::InvalidSize { .. }
            | CatalogError::InvalidQos { .. }
            | CatalogError::InvalidCopySource { .. }
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
        let msg = chain(&e);
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
        let result = self
            .catalog
            .get(&request.into_inner().volume_id)
            .map(Into::into)
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
        let result = self
            .blocking(move |c| {
                c.update(
                    &req.volume_id,
                    req.expected_generation,
                    attachments,
                    parameters,
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

impl Probe for ControlService {
    fn healthy(&self) -> Result<(), String> {
        // statvfs on the data directory: fails when the backing disk is gone.
        self.catalog.capacity().map(|_| ()).map_err(|e| chain(&e))
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tessera_replica_build_info Build version and node of this replica daemon.\n\
             # TYPE tessera_replica_build_info gauge\n\
             tessera_replica_build_info{{version=\"{}\",node_id=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            escape_label(&self.info.node_id)
        );
        if let Ok(cap) = self.catalog.capacity() {
            let gauges: [(&str, &str, u64); 5] = [
                (
                    "tessera_replica_capacity_bytes",
                    "Bytes this daemon offers to volumes.",
                    cap.capacity_bytes,
                ),
                (
                    "tessera_replica_used_bytes",
                    "Sum of the sizes of the volumes stored here (thick accounting).",
                    cap.used_bytes,
                ),
                (
                    "tessera_replica_free_bytes",
                    "Bytes still available to new volumes.",
                    cap.free_bytes,
                ),
                (
                    "tessera_replica_volumes",
                    "Volumes stored on this daemon.",
                    u64::from(cap.volume_count),
                ),
                (
                    "tessera_replica_quarantined_volumes",
                    "Volumes skipped at start because their record is unreadable.",
                    u64::from(cap.quarantined_count),
                ),
            ];
            for (name, help, value) in gauges {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
                );
            }
        }
        // Real use of the backing disk (thin), next to the thick figure above; it
        // stats every layer file, so it is computed per scrape, not kept.
        if let Ok(bytes) = self.catalog.allocated_bytes() {
            let name = "tessera_replica_allocated_bytes";
            let _ = writeln!(
                out,
                "# HELP {name} Disk space the volumes' block stores allocate (all layers).\n\
                 # TYPE {name} gauge\n{name} {bytes}"
            );
        }
        render_volume_io(&self.catalog, &mut out);
        if let Some(copies) = &self.copies {
            copies.render_metrics(&mut out, escape_label);
        }
        self.metrics.render(&mut out);
        out
    }
}

/// Per-volume QoS and I/O scheduler counters (only when the catalog schedules I/O).
/// Why these: queued and in-flight show load, throttled time shows a volume's own
/// limits at work, deadline misses show the device (or its neighbours) failing it, and
/// the QoS gauges show what the scheduler enforces right now (0 = unlimited), which is
/// how a ControllerModifyVolume can be seen to have reached this replica.
fn render_volume_io(catalog: &Catalog, out: &mut String) {
    let Some(io) = catalog.io() else {
        return;
    };
    let scheduler = &io.scheduler;
    let _ = writeln!(
        out,
        "# HELP tessera_replica_io_in_flight Requests in the I/O engine across all volumes.\n\
         # TYPE tessera_replica_io_in_flight gauge\n\
         tessera_replica_io_in_flight{{engine=\"{}\"}} {}",
        scheduler.engine_name(),
        scheduler.in_flight()
    );
    let reports = catalog.io_reports();
    type Getter = fn(&crate::catalog::VolumeIoReport) -> String;
    let series: [(&str, &str, &str, Getter); 13] = [
        (
            "tessera_replica_volume_io_queued",
            "gauge",
            "Requests waiting in the volume's scheduler queues.",
            |r| r.stats.queued.to_string(),
        ),
        (
            "tessera_replica_volume_io_in_flight",
            "gauge",
            "Requests of the volume in the I/O engine.",
            |r| r.stats.in_flight.to_string(),
        ),
        (
            "tessera_replica_volume_io_throttled_seconds_total",
            "counter",
            "Time the volume had queued requests its token buckets did not admit.",
            |r| format!("{:.6}", r.stats.throttled.as_secs_f64()),
        ),
        (
            "tessera_replica_volume_io_deadline_misses_total",
            "counter",
            "Requests of the volume that completed after their class deadline.",
            |r| r.stats.deadline_misses.to_string(),
        ),
        (
            "tessera_replica_volume_io_completed_total",
            "counter",
            "Requests of the volume completed successfully.",
            |r| r.stats.completed_ops.to_string(),
        ),
        (
            "tessera_replica_volume_io_completed_bytes_total",
            "counter",
            "Bytes read or written by the volume's completed requests.",
            |r| r.stats.completed_bytes.to_string(),
        ),
        (
            "tessera_replica_volume_io_failed_total",
            "counter",
            "Requests of the volume that failed.",
            |r| r.stats.failed_ops.to_string(),
        ),
        (
            "tessera_replica_volume_io_cancelled_total",
            "counter",
            "Queued requests of the volume dropped before dispatch.",
            |r| r.stats.cancelled_ops.to_string(),
        ),
        (
            "tessera_replica_volume_qos_max_iops",
            "gauge",
            "IOPS limit in force (0 = unlimited).",
            |r| r.qos.max_iops.unwrap_or(0).to_string(),
        ),
        (
            "tessera_replica_volume_qos_min_iops",
            "gauge",
            "IOPS reservation in force (0 = none).",
            |r| r.qos.min_iops.unwrap_or(0).to_string(),
        ),
        (
            "tessera_replica_volume_qos_max_bandwidth_bytes",
            "gauge",
            "Bandwidth limit in force in bytes per second (0 = unlimited).",
            |r| r.qos.max_bandwidth.unwrap_or(0).to_string(),
        ),
        (
            "tessera_replica_volume_qos_burst_seconds",
            "gauge",
            "Burst allowance in force.",
            |r| format!("{:.3}", r.qos.burst_duration.as_secs_f64()),
        ),
        (
            "tessera_replica_volume_qos_invalid",
            "gauge",
            "1 when the record's QoS parameters are invalid and the volume runs unlimited.",
            |r| u8::from(r.qos_error.is_some()).to_string(),
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for r in &reports {
            let _ = writeln!(
                out,
                "{name}{{volume_id=\"{}\"}} {}",
                escape_label(&r.volume_id),
                get(r)
            );
        }
    }
}

/// Escapes a Prometheus label value.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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

        assert_eq!(svc.metrics().count("CreateVolume", Code::Ok), 2);
        assert_eq!(svc.metrics().count("RaiseEpoch", Code::Aborted), 1);
        let text = svc.metrics();
        assert!(text.count("CreateVolume", Code::AlreadyExists) == 1);
        let rendered = Probe::metrics(&svc);
        assert!(rendered.contains("tessera_replica_volumes 1"), "{rendered}");
        assert!(
            rendered.contains(
                "# TYPE tessera_replica_allocated_bytes gauge\ntessera_replica_allocated_bytes "
            ),
            "{rendered}"
        );
        assert!(rendered.contains(
            "tessera_replica_control_requests_total{method=\"CreateVolume\",code=\"Ok\"} 2"
        ));
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
