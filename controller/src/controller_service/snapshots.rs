//! CreateSnapshot, DeleteSnapshot, ListSnapshots and GetSnapshot: user snapshots as
//! the daemons hold them ([`crate::snapshots`]); the clones' internal snapshots never
//! show ([`crate::restore::Restorer::user_snapshots`]).

use tessera_csi_proto::v1 as csi;

use super::{ControllerService, Result};
use crate::error::{required, ControllerError};
use crate::snapshots::{self, snapshot_id_for_name, FoundSnapshot};
use crate::volumes::now_nanos;

/// Prefix of ListSnapshots tokens.
const SNAPSHOT_TOKEN_PREFIX: &str = "s1-";

impl ControllerService {
    /// CreateSnapshot: the controller seals the source's head on every replica (the
    /// same call whether the volume is attached or not); see [`snapshots::seal`] for
    /// why a majority sealed holds every acknowledged write.
    pub(super) async fn do_create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        required("name", &req.name)?;
        required("source_volume_id", &req.source_volume_id)?;
        let id = snapshot_id_for_name(&req.name);
        let _guard = self.locks().lock(&req.source_volume_id).await;
        // Same name again while a DeleteSnapshot of it runs: one after the other.
        let _snapshot_guard = self.locks().lock(&id).await;
        let existing = self.restorer().user_snapshots().await?.remove(&id);
        if let Some(found) = &existing {
            if found.record.source_volume_id != req.source_volume_id {
                return Err(ControllerError::SnapshotOfOtherVolume {
                    name: req.name.clone(),
                    volume: found.record.source_volume_id.clone(),
                    requested: req.source_volume_id.clone(),
                });
            }
            if found.ready() {
                return Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(found.to_csi()),
                });
            }
        }
        let rec = self.volumes().require(&req.source_volume_id).await?;
        self.restorer().check_copy_done(&rec).await?;
        let created = existing
            .as_ref()
            .map_or_else(now_nanos, |f| f.record.created_unix_nanos);
        let found = snapshots::seal(self.pool(), &rec, &id, &req.name, created).await?;
        tracing::info!(snapshot = %id, name = %req.name, volume = %rec.volume_id, sealed = found.holders.len(), "snapshot created");
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(found.to_csi()),
        })
    }

    /// DeleteSnapshot on every daemon holding it; unknown ids succeed. A snapshot a
    /// restore is still copying from is in use (FAILED_PRECONDITION naming the volume).
    pub(super) async fn do_delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse> {
        required("snapshot_id", &req.snapshot_id)?;
        let restorer = self.restorer();
        let Some(found) = restorer.user_snapshots().await?.remove(&req.snapshot_id) else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let volume_id = found.record.source_volume_id.clone();
        // The snapshot's lock, not the volume's: the daemons may merge for longer than
        // the call waits, and snapshots of the volume need not wait for that. A restore
        // holds this lock from its checks until its replicas exist.
        let _guard = self.locks().lock(&req.snapshot_id).await;
        if let Some(user) = restorer.restore_in_progress(&req.snapshot_id).await {
            return Err(ControllerError::SnapshotInUse {
                snapshot: req.snapshot_id.clone(),
                user,
            });
        }
        snapshots::delete(self.pool(), &found).await?;
        tracing::info!(snapshot = %req.snapshot_id, volume = %volume_id, "snapshot deleted");
        Ok(csi::DeleteSnapshotResponse {})
    }

    /// ListSnapshots: in snapshot id order, filtered by id and source volume, paged
    /// with tokens that name the id to resume at.
    pub(super) async fn do_list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let max = usize::try_from(req.max_entries).map_err(|_| ControllerError::Negative {
            field: "max_entries",
            value: i64::from(req.max_entries),
        })?;
        let start = if req.starting_token.is_empty() {
            None
        } else {
            Some(decode_token(&req.starting_token)?)
        };
        let all = self.restorer().user_snapshots().await?;
        let matching: Vec<&FoundSnapshot> = all
            .iter()
            .filter(|(id, _)| req.snapshot_id.is_empty() || **id == req.snapshot_id)
            .filter(|(_, f)| {
                req.source_volume_id.is_empty() || f.record.source_volume_id == req.source_volume_id
            })
            .filter(|(id, _)| start.as_ref().is_none_or(|s| id.as_str() >= s.as_str()))
            .map(|(_, f)| f)
            .collect();
        let limit = if max == 0 { usize::MAX } else { max };
        let next_token = matching.get(limit).map(|f| {
            format!(
                "{SNAPSHOT_TOKEN_PREFIX}{}",
                hex::encode(f.record.snapshot_id.as_bytes())
            )
        });
        let entries = matching
            .into_iter()
            .take(limit)
            .map(|f| csi::list_snapshots_response::Entry {
                snapshot: Some(f.to_csi()),
            })
            .collect();
        Ok(csi::ListSnapshotsResponse {
            entries,
            next_token: next_token.unwrap_or_default(),
        })
    }

    pub(super) async fn do_get_snapshot(
        &self,
        req: csi::GetSnapshotRequest,
    ) -> Result<csi::GetSnapshotResponse> {
        required("snapshot_id", &req.snapshot_id)?;
        let found = self
            .restorer()
            .user_snapshots()
            .await?
            .remove(&req.snapshot_id)
            .ok_or_else(|| ControllerError::SnapshotNotFound(req.snapshot_id.clone()))?;
        Ok(csi::GetSnapshotResponse {
            snapshot: Some(found.to_csi()),
        })
    }
}

/// The snapshot id a ListSnapshots token resumes at (ABORTED for a token this driver
/// did not issue).
fn decode_token(token: &str) -> Result<String> {
    let bad = || ControllerError::InvalidSnapshotToken(token.to_string());
    let hexed = token.strip_prefix(SNAPSHOT_TOKEN_PREFIX).ok_or_else(bad)?;
    let bytes = hex::decode(hexed).map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}
