//! The engine-host's gRPC service: the [`EngineHost`] behind the generated API.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use crate::engine::ReplicaState;

use super::host::{EngineHost, VolumeInfo};
use super::proto;
use super::proto::engine_host_server::EngineHost as EngineHostApi;

/// Serves an [`EngineHost`] over gRPC.
#[derive(Debug, Clone)]
pub struct EngineHostService {
    host: Arc<EngineHost>,
}

impl EngineHostService {
    /// Wraps `host`.
    pub fn new(host: Arc<EngineHost>) -> Self {
        EngineHostService { host }
    }
}

/// Converts the host's description to the wire form.
pub fn to_proto(info: &VolumeInfo) -> proto::AttachedVolume {
    proto::AttachedVolume {
        volume_id: info.volume_id.clone(),
        device_path: info.device_path.to_string_lossy().into_owned(),
        fuse_file: info.fuse_file.to_string_lossy().into_owned(),
        size_bytes: info.size_bytes,
        epoch: info.epoch,
        device_major: info.device_number.0,
        device_minor: info.device_number.1,
        backend: info.backend.to_owned(),
    }
}

#[tonic::async_trait]
impl EngineHostApi for EngineHostService {
    async fn attach(
        &self,
        request: Request<proto::AttachRequest>,
    ) -> Result<Response<proto::AttachResponse>, Status> {
        let r = request.into_inner();
        let info = self
            .host
            .attach(&r.volume_id, &r.publish_context, &r.local_node_id)
            .await
            .inspect_err(|e| {
                tracing::warn!(volume = %r.volume_id, error = %tessera_telemetry::error_chain(e), "attach failed")
            })?;
        Ok(Response::new(proto::AttachResponse {
            volume: Some(to_proto(&info)),
        }))
    }

    async fn detach(
        &self,
        request: Request<proto::DetachRequest>,
    ) -> Result<Response<proto::DetachResponse>, Status> {
        let r = request.into_inner();
        let was_attached = self.host.detach(&r.volume_id).await.inspect_err(|e| {
            tracing::warn!(volume = %r.volume_id, error = %tessera_telemetry::error_chain(e), "detach failed")
        })?;
        Ok(Response::new(proto::DetachResponse { was_attached }))
    }

    async fn resize(
        &self,
        request: Request<proto::ResizeRequest>,
    ) -> Result<Response<proto::ResizeResponse>, Status> {
        let r = request.into_inner();
        let wanted = (r.new_size > 0).then_some(r.new_size);
        let info = self.host.resize(&r.volume_id, wanted).await.inspect_err(|e| {
            tracing::warn!(volume = %r.volume_id, error = %tessera_telemetry::error_chain(e), "resize failed")
        })?;
        Ok(Response::new(proto::ResizeResponse {
            volume: Some(to_proto(&info)),
        }))
    }

    async fn list(
        &self,
        _request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        Ok(Response::new(proto::ListResponse {
            volumes: self.host.list().iter().map(to_proto).collect(),
        }))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let r = request.into_inner();
        let health = self.host.status(&r.volume_id)?;
        let st = health.engine;
        let mut out = proto::StatusResponse {
            volume: Some(to_proto(&health.info)),
            ..Default::default()
        };
        let (abnormal, message) = st.condition();
        out.abnormal = abnormal;
        out.condition_message = message;
        out.quorum = u32::try_from(st.quorum).unwrap_or(u32::MAX);
        out.in_sync = u32::try_from(st.in_sync).unwrap_or(u32::MAX);
        out.below_quorum = st.below_quorum;
        out.fenced = st.fenced;
        out.closed = st.closed;
        out.inflight_ops = st.inflight_ops as u64;
        let c = &st.counters;
        out.counters = Some(proto::Counters {
            writes: c.writes,
            reads: c.reads,
            flushes: c.flushes,
            trims: c.trims,
            bytes_written: c.bytes_written,
            bytes_read: c.bytes_read,
            repairs: c.repairs,
            repair_failures: c.repair_failures,
            failed_ops: c.failed_ops,
            resyncs: c.resyncs,
            resync_bytes: c.resync_bytes,
            resync_compared_bytes: c.resync_compared_bytes,
            full_resyncs: c.full_resyncs,
            replica_set_changes: c.replica_set_changes,
            replica_set_answers: c.replica_set_answers,
        });
        out.replicas = st
            .replicas
            .iter()
            .map(|r| {
                let millis = |t: &std::time::SystemTime| {
                    t.duration_since(UNIX_EPOCH)
                        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                        .unwrap_or(0)
                };
                let (done, total, full) = match r.state {
                    ReplicaState::Resyncing {
                        done_bytes,
                        total_bytes,
                        full,
                        ..
                    } => (done_bytes, total_bytes, full),
                    _ => (0, 0, false),
                };
                let (in_sync, stale_reason, since) = match &r.state {
                    ReplicaState::InSync => (true, String::new(), 0),
                    ReplicaState::Resyncing { since, .. } => (false, String::new(), millis(since)),
                    ReplicaState::Stale { reason, since } => (false, reason.clone(), millis(since)),
                };
                proto::ReplicaStatus {
                    node_id: r.node_id.clone(),
                    address: r.address.clone(),
                    local: r.local,
                    in_sync,
                    resyncing: matches!(r.state, ReplicaState::Resyncing { .. }),
                    resync_done_bytes: done,
                    resync_total_bytes: total,
                    resync_full: full,
                    stale_reason,
                    stale_since_unix_ms: since,
                }
            })
            .collect();
        Ok(Response::new(out))
    }
}
