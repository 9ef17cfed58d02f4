//! The CSI SnapshotMetadata service: allocated ranges of a snapshot and the ranges
//! changed between two snapshots of one volume, for incremental backup tools.
//!
//! Served on the controller's CSI socket next to Identity and Controller. The ranges
//! come from the replica daemons (`SnapshotRanges`, computed from the sealed layers'
//! per-block entries): sealed copies of one snapshot differ at most in writes that
//! were in flight while it was taken, so the answers of a majority of the holders are
//! unioned, which reports every range any copy holds. Ranges are VARIABLE_LENGTH
//! extents, sorted and merged; `starting_offset` drops the ranges ending before it
//! and clips the one straddling it; `max_results` bounds the entries per streamed
//! message.
//!
//! Access control is the external-snapshot-metadata sidecar's job (it checks the
//! Kubernetes security token before calling here); the request's `secrets` are
//! ignored.

use std::pin::Pin;
use std::sync::Arc;

use tessera_csi_proto::v1::snapshot_metadata_server::SnapshotMetadata;
use tessera_csi_proto::v1::{
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use tessera_replica_protocol::control_proto::{ReplicaRef, SnapshotRangesRequest};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::error::{required, ControllerError};
use crate::metrics::Metrics;
use crate::quorum::{self, Op, QuorumError, ReplicaFailure};
use crate::replica_pool::ReplicaPool;
use crate::snapshots::{self, FoundSnapshot};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// Entries per streamed message when the request leaves `max_results` at 0.
pub const DEFAULT_MAX_RESULTS: usize = 256;

/// A byte range: offset and length.
pub type Range = (u64, u64);

/// Implements `csi.v1.SnapshotMetadata` over the replica daemons.
#[derive(Debug, Clone)]
pub struct SnapshotMetadataService {
    pool: Arc<ReplicaPool>,
    metrics: Arc<Metrics>,
}

/// The ranges to stream: pages of block metadata and the snapshot's size.
struct Answer {
    size: u64,
    pages: Vec<Vec<BlockMetadata>>,
}

/// Sorts `ranges` and merges overlapping and adjacent ones; empty ranges vanish.
pub fn merge(ranges: impl IntoIterator<Item = Range>) -> Vec<Range> {
    let mut v: Vec<Range> = ranges.into_iter().filter(|r| r.1 > 0).collect();
    v.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for (off, len) in v {
        let end = off.saturating_add(len);
        match out.last_mut() {
            Some((o, l)) if *o + *l >= off => *l = (*l).max(end - *o),
            _ => out.push((off, end - off)),
        }
    }
    out
}

/// Drops the parts of sorted `ranges` before `start` or at or beyond `size`.
pub fn clip(ranges: &[Range], start: u64, size: u64) -> Vec<Range> {
    ranges
        .iter()
        .filter_map(|&(off, len)| {
            let from = off.max(start);
            let to = off.saturating_add(len).min(size);
            (to > from).then(|| (from, to - from))
        })
        .collect()
}

/// Splits `ranges` into messages of at most `max` entries (0: the default). Always at
/// least one message, so the stream carries the volume's capacity even when empty.
pub fn pages(ranges: &[Range], max: usize) -> Vec<Vec<BlockMetadata>> {
    let max = if max == 0 { DEFAULT_MAX_RESULTS } else { max };
    let entries: Vec<BlockMetadata> = ranges
        .iter()
        .map(|&(off, len)| BlockMetadata {
            byte_offset: i64::try_from(off).unwrap_or(i64::MAX),
            size_bytes: i64::try_from(len).unwrap_or(i64::MAX),
        })
        .collect();
    if entries.is_empty() {
        return vec![Vec::new()];
    }
    entries.chunks(max).map(<[BlockMetadata]>::to_vec).collect()
}

/// Validates `max_results` (negative is INVALID_ARGUMENT) and `starting_offset`
/// against the snapshot size (`None`: not known yet); negative or beyond the size is
/// OUT_OF_RANGE, as the spec says.
fn check_window(starting_offset: i64, max_results: i32, size: Option<u64>) -> Result<(u64, usize)> {
    let max = usize::try_from(max_results).map_err(|_| ControllerError::Negative {
        field: "max_results",
        value: i64::from(max_results),
    })?;
    let start = u64::try_from(starting_offset)
        .ok()
        .filter(|&s| size.is_none_or(|size| s <= size))
        .ok_or(ControllerError::OffsetOutsideSnapshot {
            offset: starting_offset,
            size,
        })?;
    Ok((start, max))
}

impl SnapshotMetadataService {
    /// A service asking the daemons of `pool`; `metrics` counts its calls.
    pub fn new(pool: Arc<ReplicaPool>, metrics: Arc<Metrics>) -> Self {
        Self { pool, metrics }
    }

    /// The user snapshot `id` (internal clone snapshots do not exist for CSI).
    async fn find(&self, id: &str) -> Result<FoundSnapshot> {
        if snapshots::is_internal(id) {
            return Err(ControllerError::SnapshotNotFound(id.to_string()));
        }
        snapshots::scan(&self.pool)
            .await?
            .remove(id)
            .ok_or_else(|| ControllerError::SnapshotNotFound(id.to_string()))
    }

    /// Asks `holders` for the ranges of `target` (changed since `base` if given) and
    /// unions the answers; a majority of the source's replicas must answer.
    async fn union_ranges(
        &self,
        target: &FoundSnapshot,
        base: Option<&str>,
        holders: &[ReplicaRef],
    ) -> Result<Vec<Range>> {
        let need = target.quorum();
        let id = &target.record.snapshot_id;
        if holders.len() < need {
            return Err(ControllerError::TooFewHolders {
                snapshot: id.clone(),
                base: base.map(str::to_string),
                holders: holders.len(),
                needed: need,
            });
        }
        let req = SnapshotRangesRequest {
            volume_id: target.record.source_volume_id.clone(),
            snapshot_id: id.clone(),
            base_snapshot_id: base.unwrap_or_default().to_string(),
        };
        let answers = quorum::ask(holders, |h| {
            self.pool.snapshot_ranges(&h.control_address, req.clone())
        })
        .await;
        let failures = answers.failures();
        let base_not_older = failures.find(|f| {
            matches!(f, ReplicaFailure::Other { code, .. } if *code == Code::FailedPrecondition)
        });
        if let Some(e) = base_not_older {
            let reason = match &e.failure {
                ReplicaFailure::Other { message, .. } => message.clone(),
                other => other.to_string(),
            };
            return Err(ControllerError::BaseNotOlder {
                target: id.clone(),
                reason,
            });
        }
        if answers.ok_count() >= need {
            return Ok(merge(answers.ok().flat_map(|(_, resp)| {
                resp.ranges.iter().map(|r| (r.offset, r.length))
            })));
        }
        if answers.not_found() >= need {
            return Err(ControllerError::SnapshotNotFound(id.clone()));
        }
        Err(QuorumError::NoMajority {
            op: Op::Ranges {
                snapshot: id.clone(),
            },
            shortfall: answers.shortfall(need),
        }
        .into())
    }

    async fn allocated(&self, req: &GetMetadataAllocatedRequest) -> Result<Answer> {
        required("snapshot_id", &req.snapshot_id)?;
        check_window(req.starting_offset, req.max_results, None)?;
        let target = self.find(&req.snapshot_id).await?;
        let size = target.record.size_bytes;
        let (start, max) = check_window(req.starting_offset, req.max_results, Some(size))?;
        let ranges = self.union_ranges(&target, None, &target.holders).await?;
        Ok(Answer {
            size,
            pages: pages(&clip(&ranges, start, size), max),
        })
    }

    async fn delta(&self, req: &GetMetadataDeltaRequest) -> Result<Answer> {
        required("base_snapshot_id", &req.base_snapshot_id)?;
        required("target_snapshot_id", &req.target_snapshot_id)?;
        check_window(req.starting_offset, req.max_results, None)?;
        let base = self.find(&req.base_snapshot_id).await?;
        let target = self.find(&req.target_snapshot_id).await?;
        if base.record.source_volume_id != target.record.source_volume_id {
            return Err(ControllerError::SnapshotsOfDifferentVolumes {
                base: req.base_snapshot_id.clone(),
                base_volume: base.record.source_volume_id.clone(),
                target: req.target_snapshot_id.clone(),
                target_volume: target.record.source_volume_id.clone(),
            });
        }
        // The spec asks for a target "created after the base snapshot"; anything else
        // is an invalid argument.
        if req.base_snapshot_id == req.target_snapshot_id
            || base.record.created_unix_nanos > target.record.created_unix_nanos
        {
            return Err(ControllerError::TargetNotAfterBase {
                base: req.base_snapshot_id.clone(),
                target: req.target_snapshot_id.clone(),
            });
        }
        let size = target.record.size_bytes;
        let (start, max) = check_window(req.starting_offset, req.max_results, Some(size))?;
        let both: Vec<ReplicaRef> = target
            .holders
            .iter()
            .filter(|t| {
                base.holders
                    .iter()
                    .any(|b| b.control_address == t.control_address)
            })
            .cloned()
            .collect();
        let ranges = self
            .union_ranges(&target, Some(&req.base_snapshot_id), &both)
            .await?;
        Ok(Answer {
            size,
            pages: pages(&clip(&ranges, start, size), max),
        })
    }

    fn finish<T>(&self, method: &'static str, r: Result<T>) -> std::result::Result<T, Status> {
        let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|e| e.code());
        self.metrics.observe_rpc(method, code);
        r.map_err(|e| {
            if matches!(code, Code::Unavailable | Code::Internal) {
                tracing::warn!(method, error = %e, "SnapshotMetadata call failed");
            } else {
                tracing::debug!(method, error = %e, "SnapshotMetadata call rejected");
            }
            e.into()
        })
    }
}

/// A stream of already computed messages.
type MessageStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = MessageStream<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = MessageStream<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> std::result::Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = self.allocated(request.get_ref()).await;
        let answer = self.finish("GetMetadataAllocated", r)?;
        let capacity = i64::try_from(answer.size).unwrap_or(i64::MAX);
        let messages = answer.pages.into_iter().map(move |block_metadata| {
            Ok(GetMetadataAllocatedResponse {
                block_metadata_type: BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: capacity,
                block_metadata,
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> std::result::Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = self.delta(request.get_ref()).await;
        let answer = self.finish("GetMetadataDelta", r)?;
        let capacity = i64::try_from(answer.size).unwrap_or(i64::MAX);
        let messages = answer.pages.into_iter().map(move |block_metadata| {
            Ok(GetMetadataDeltaResponse {
                block_metadata_type: BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: capacity,
                block_metadata,
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_unions_overlapping_and_adjacent_ranges() {
        let a = [(0, 4096), (16384, 4096), (8192, 4096)];
        let b = [(4096, 4096), (20480, 0), (18432, 8192), (100_000, 10)];
        assert_eq!(
            merge(a.into_iter().chain(b)),
            vec![(0, 12288), (16384, 10240), (100_000, 10)]
        );
        assert!(merge([]).is_empty());
        assert_eq!(merge([(0, 10), (2, 3)]), vec![(0, 10)]);
    }

    #[test]
    fn clip_drops_and_cuts_at_the_start_and_the_size() {
        let r = [(0, 4096), (8192, 8192), (20480, 4096)];
        assert_eq!(clip(&r, 0, 1 << 20), r.to_vec());
        assert_eq!(clip(&r, 4096, 1 << 20), vec![(8192, 8192), (20480, 4096)]);
        assert_eq!(clip(&r, 12288, 1 << 20), vec![(12288, 4096), (20480, 4096)]);
        assert_eq!(clip(&r, 16384, 22528), vec![(20480, 2048)]);
        assert!(clip(&r, 24576, 1 << 20).is_empty());
    }

    #[test]
    fn pages_honour_max_results_and_never_vanish() {
        let r: Vec<Range> = (0..5).map(|i| (i * 8192, 4096)).collect();
        let p = pages(&r, 2);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(p[1][0].byte_offset, 16384);
        assert_eq!(pages(&r, 0).len(), 1);
        let many: Vec<Range> = (0..600).map(|i| (i * 8192, 4096)).collect();
        assert_eq!(pages(&many, 0)[0].len(), DEFAULT_MAX_RESULTS);
        assert_eq!(pages(&[], 3), vec![Vec::new()]);
    }

    #[test]
    fn window_checks_follow_the_spec() {
        let size = Some(100);
        assert_eq!(check_window(0, 0, size).unwrap(), (0, 0));
        assert_eq!(check_window(100, 7, size).unwrap(), (100, 7));
        assert_eq!(check_window(101, 0, None).unwrap(), (101, 0));
        assert_eq!(
            check_window(101, 0, size).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            check_window(-1, 0, None).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            check_window(0, -1, size).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
