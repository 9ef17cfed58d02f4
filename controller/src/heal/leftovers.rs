//! Copies no volume needs any more: of members replaced while away, and of volumes
//! deleted while their daemon was away (DeleteVolume succeeds without a lost
//! daemon). Each is confirmed by a quorum read of the volume's newest set, under the
//! volume's lock, before it is deleted: a copy whose daemon is not a member when a
//! majority of the set holds the volume without it, a deleted volume's copy only
//! when this controller forsook it (a member it replaced, or one its DeleteVolume
//! did not reach: [`crate::volumes::Volumes::forsake`]) and a majority lacks the
//! volume. A copy of a volume that a majority lacks and
//! this controller did not delete is reported, never deleted: two daemons that
//! came back with empty disks look exactly like a deletion, and then the copy is
//! the last one.

use tessera_replica_protocol::control_proto::VolumeRecord;

use super::{HealError, Healer};
use crate::error::ControllerError;
use crate::quorum::QuorumError;
use crate::volume_index::newer;

impl Healer {
    /// Deletes every leftover copy on every live daemon (module doc).
    pub(super) async fn collect_leftovers(&self) {
        let pool = self.volumes.pool();
        for (address, info) in pool.live() {
            let held = match pool.list_volumes(&address).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::debug!(node = %info.node_id, error = %e.message(), "listing volumes failed");
                    continue;
                }
            };
            for rec in held {
                if let Err(e) = self
                    .collect_if_leftover(&address, &info.node_id, &rec)
                    .await
                {
                    tracing::warn!(volume = %rec.volume_id, node = %info.node_id,
                        error = %tessera_telemetry::error_chain(&e), "checking a possible leftover copy failed");
                }
            }
        }
    }

    /// Deletes `held`, the copy of a volume on `node`'s daemon at `address`, if the
    /// volume is gone or `node` is not one of its members; whether it did.
    async fn collect_if_leftover(
        &self,
        address: &str,
        node: &str,
        held: &VolumeRecord,
    ) -> Result<bool, HealError> {
        let is_member = |r: &VolumeRecord| r.replicas.iter().any(|m| m.node_id == node);
        let indexed = self.volumes.index().get(&held.volume_id);
        if indexed.as_ref().is_some_and(&is_member) || (indexed.is_none() && !is_member(held)) {
            // A member by the index; or a copy whose own record never named this node
            // (nothing to compare with: left for an operator).
            return Ok(false);
        }
        let _guard = self.locks.lock(&held.volume_id).await;
        let basis = match self.volumes.index().get(&held.volume_id) {
            Some(r) if !newer(held, &r) => r,
            _ => held.clone(),
        };
        let reads = self.volumes.read(&basis).await;
        let gone = match self.volumes.current(&basis, &reads) {
            Ok(cur) if is_member(&cur) => {
                self.volumes.index().merge(cur);
                return Ok(false);
            }
            Ok(cur) => format!(
                "node {node} is no longer a member (the set is {:?})",
                cur.replicas
                    .iter()
                    .map(|r| r.node_id.as_str())
                    .collect::<Vec<_>>()
            ),
            Err(ControllerError::Quorum(QuorumError::VolumeNotFound { .. }))
                if self.volumes.is_forsaken(&held.volume_id, node) =>
            {
                "the volume was deleted, or this member replaced, while this daemon was away"
                    .to_string()
            }
            Err(ControllerError::Quorum(QuorumError::VolumeNotFound { .. })) => {
                tracing::warn!(volume = %held.volume_id, node, name = %held.name,
                    "copy of a volume a majority of its replicas lack, not deleted by this controller; \
                     left in place (delete it with DeleteVolume if the volume is gone)");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        self.volumes
            .pool()
            .delete_volume(address, &held.volume_id)
            .await
            .map_err(|e| HealError::replica("DeleteVolume", node, &e))?;
        tracing::warn!(volume = %held.volume_id, node, reason = %gone, "leftover copy deleted");
        self.metrics.count_leftover_collected();
        Ok(true)
    }
}
