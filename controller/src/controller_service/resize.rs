//! ControllerExpandVolume and ControllerModifyVolume: the two record mutations that
//! change what a volume is (its size, its QoS parameters) rather than where it is
//! published.

use tessera_csi_proto::v1 as csi;
use tessera_replica_protocol::control_proto::ExpandVolumeRequest;

use super::{size_i64, ControllerService, Result};
use crate::capabilities;
use crate::capacity;
use crate::error::{required, ControllerError};
use crate::parameters;
use crate::quorum::{Op, Plan, QuorumError, RecordWrite, ReplicaFailure};

impl ControllerService {
    /// ControllerModifyVolume: changes the mutable QoS parameters of a volume, live.
    /// The new record reaches a majority of replicas through the same generation
    /// compare-and-set as publish; each replica daemon applies the new QoS to the
    /// volume's I/O scheduler registration when it stores the record, so an attached
    /// engine keeps its connections. Keys absent from the request keep their values
    /// (as the spec demands); `0` removes a limit.
    pub(super) async fn do_modify(
        &self,
        req: csi::ControllerModifyVolumeRequest,
    ) -> Result<csi::ControllerModifyVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        // An empty map asks for no change: the spec forbids modifying anything based on
        // absent keys, so it is a no-op on an existing volume (and NOT_FOUND otherwise),
        // which is also what the conformance suite expects.
        // Keys and values are checked before the volume is looked at, so a bad request
        // is INVALID_ARGUMENT whatever the volume's state.
        parameters::check_mutable(&req.mutable_parameters)?;
        let _guard = self.locks().lock(&req.volume_id).await;
        let rec = self.volumes().require(&req.volume_id).await?;
        let changes = req.mutable_parameters;
        if changes.is_empty() {
            return Ok(csi::ControllerModifyVolumeResponse {});
        }
        let updated = self
            .volumes()
            .update_record(&rec, |cur| {
                let target = parameters::apply_mutable(&cur.parameters, &changes)?;
                Ok((target != cur.parameters).then(|| (cur.attachments.clone(), target)))
            })
            .await?;
        if updated.parameters != rec.parameters {
            tracing::info!(volume = %rec.volume_id, changes = ?changes, "volume parameters modified");
        }
        Ok(csi::ControllerModifyVolumeResponse {})
    }

    /// ControllerExpandVolume: grows every replica of the volume to the requested size
    /// (rounded up to whole blocks) with compare-and-set on each replica's generation;
    /// done once a majority holds the new size. Attached or not makes no difference
    /// here: the replicas serve the larger store at once, and an attached engine learns
    /// the size at NodeExpandVolume (which is why node expansion is always required,
    /// for block volumes too, whose device has to grow). A size the volume already has
    /// succeeds without change (retries); a smaller one is OUT_OF_RANGE.
    pub(super) async fn do_expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or(ControllerError::Missing {
                field: "capacity_range",
            })?;
        if range.required_bytes <= 0 {
            return Err(ControllerError::NoExpansionSize {
                required_bytes: range.required_bytes,
            });
        }
        // Validates the range (negative or required > limit) the same way as create.
        let wanted = capacity::resolve_size(Some(range))?;
        if let Some(cap) = req.volume_capability.as_ref() {
            capabilities::validate_one(cap)?;
        }
        let limit = u64::try_from(range.limit_bytes).unwrap_or(0);
        let _guard = self.locks().lock(&req.volume_id).await;
        let rec = self.volumes().require(&req.volume_id).await?;
        let op = Op::Expand {
            volume: rec.volume_id.clone(),
            size: wanted,
        };
        let committed = self
            .volumes()
            .compare_and_set(&rec, op.clone(), |cur, reads| {
                if wanted < cur.size_bytes {
                    return Err(ControllerError::Shrink {
                        volume: rec.volume_id.clone(),
                        size: cur.size_bytes,
                        requested: wanted,
                    });
                }
                if limit != 0 && limit < cur.size_bytes {
                    return Err(ControllerError::LimitBelowSize {
                        volume: rec.volume_id.clone(),
                        size: cur.size_bytes,
                        limit,
                    });
                }
                let already = reads.ok().filter(|(_, r)| r.size_bytes == wanted).count();
                let writes = reads
                    .ok()
                    .filter(|(_, r)| r.size_bytes < wanted)
                    .map(|(replica, r)| {
                        let write = ExpandVolumeRequest {
                            volume_id: rec.volume_id.clone(),
                            expected_generation: r.generation,
                            new_size: wanted,
                        };
                        (replica.clone(), RecordWrite::Expand(write))
                    })
                    .collect();
                Ok(Plan::Write { writes, already })
            })
            .await
            .map_err(|e| refusal(e, &op))?;
        let newest = committed.newest();
        self.index().upsert(newest.clone());
        if newest.size_bytes != committed.current.size_bytes {
            tracing::info!(volume = %rec.volume_id, from = committed.current.size_bytes, to = wanted, "volume expanded");
        }
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: size_i64(wanted),
            node_expansion_required: true,
        })
    }
}

/// A replica out of space or range makes the whole expansion fail with that refusal
/// (RESOURCE_EXHAUSTED or OUT_OF_RANGE) rather than UNAVAILABLE.
fn refusal(e: ControllerError, op: &Op) -> ControllerError {
    let ControllerError::Quorum(QuorumError::NoMajority { shortfall, .. }) = &e else {
        return e;
    };
    match shortfall.failures.find(ReplicaFailure::is_final) {
        Some(refusal) => ControllerError::Refused {
            op: op.clone(),
            refusal: Box::new(refusal.clone()),
        },
        None => e,
    }
}
