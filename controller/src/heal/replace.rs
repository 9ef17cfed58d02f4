//! Making a member's copy again: on a new daemon when its node is lost, on the same
//! daemon when its copy is gone, and growing one that missed an expansion.

use std::collections::BTreeSet;

use tessera_replica_protocol::control_proto::{
    CopySource, CreateVolumeRequest, ExpandVolumeRequest, ReplicaRef, VolumeRecord,
};

use super::{HealError, Healer};
use crate::placement::{self, Candidate, PlacementRequest};
use crate::publish::fencing;
use crate::quorum::Reads;
use crate::volumes::member_create_request;

impl Healer {
    /// Replaces lost member `member` of `cur` (module doc of [`super`]).
    pub(super) async fn replace(
        &self,
        cur: &VolumeRecord,
        reads: &Reads,
        member: usize,
    ) -> Result<(), HealError> {
        let lost = &cur.replicas[member];
        let new = self.choose_replacement(cur, lost)?;
        // Anything the new daemon holds of this volume is a leftover of an earlier
        // stint in the set (a copy that may even look complete): never build on it.
        let pool = self.volumes.pool();
        pool.delete_volume(&new.control_address, &cur.volume_id)
            .await
            .map_err(|e| HealError::replica("DeleteVolume", &new.node_id, &e))?;
        let fence_epoch = self.fence_if_detached(cur).await?;
        let mut set = cur.replicas.clone();
        set[member] = new.clone();
        let updated = self.volumes.replace_replicas(cur, set).await?;
        self.volumes.forsake(&cur.volume_id, &lost.node_id);
        tracing::warn!(volume = %cur.volume_id, lost = %lost.node_id, new = %new.node_id,
            unreachable_s = pool.unreachable_for(&lost.node_id).map(|d| d.as_secs()),
            fenced_at_epoch = fence_epoch, "replacing a lost replica");
        self.metrics.count_replacement();
        self.create_rebuild(&updated, reads, &new, fence_epoch)
            .await
    }

    /// Makes member `member`'s copy again on its own daemon, which answers without it.
    pub(super) async fn recreate(
        &self,
        cur: &VolumeRecord,
        reads: &Reads,
        member: usize,
    ) -> Result<(), HealError> {
        let target = self.volumes.pool().resolve_ref(&cur.replicas[member]);
        if cur.epoch == 0 && cur.attachments.is_empty() {
            // Never published: the create that missed this daemon, sent again.
            tracing::info!(volume = %cur.volume_id, node = %target.node_id,
                "creating a replica the volume's create did not reach");
            let create = member_create_request(cur, cur.copy_source.clone(), 0);
            return self.create_on(&target, create).await;
        }
        let fence_epoch = self.fence_if_detached(cur).await?;
        tracing::warn!(volume = %cur.volume_id, node = %target.node_id, fenced_at_epoch = fence_epoch,
            "a replica's copy is gone; rebuilding it on the same daemon");
        self.create_rebuild(cur, reads, &target, fence_epoch).await
    }

    /// Grows member `member`'s copy to the volume's size (it missed an expansion).
    pub(super) async fn expand(
        &self,
        cur: &VolumeRecord,
        reads: &Reads,
        member: usize,
    ) -> Result<(), HealError> {
        let target = self.volumes.pool().resolve_ref(&cur.replicas[member]);
        let Some(held) = reads
            .ok()
            .find(|(r, _)| r.node_id == target.node_id)
            .map(|(_, rec)| rec)
        else {
            return Ok(());
        };
        tracing::info!(volume = %cur.volume_id, node = %target.node_id, from = held.size_bytes,
            to = cur.size_bytes, "expanding a replica that missed the volume's expansion");
        self.volumes
            .pool()
            .expand_volume(
                &target.control_address,
                ExpandVolumeRequest {
                    volume_id: cur.volume_id.clone(),
                    expected_generation: held.generation,
                    new_size: cur.size_bytes,
                },
            )
            .await
            .map_err(|e| HealError::replica("ExpandVolume", &target.node_id, &e))?;
        Ok(())
    }

    /// A live daemon for a new member of `cur`: enough free space, not on a node of
    /// the set, in a zone the set already uses (when zones are in use).
    fn choose_replacement(
        &self,
        cur: &VolumeRecord,
        lost: &ReplicaRef,
    ) -> Result<ReplicaRef, HealError> {
        let live = self.volumes.pool().live();
        let taken: BTreeSet<&str> = cur.replicas.iter().map(|r| r.node_id.as_str()).collect();
        let candidates: Vec<Candidate> = live
            .iter()
            .map(|(addr, info)| Candidate {
                daemon_id: placement::daemon_id(&info.node_id, addr),
                node_id: info.node_id.clone(),
                zone: info.zone.clone(),
                // A node of the set never gets a second copy.
                free_bytes: if taken.contains(info.node_id.as_str()) {
                    0
                } else {
                    info.free_bytes
                },
            })
            .collect();
        let zones: BTreeSet<String> = cur
            .replicas
            .iter()
            .map(|r| r.zone.clone())
            .filter(|z| !z.is_empty())
            .collect();
        let chosen = placement::place(
            &candidates,
            &PlacementRequest {
                volume_id: &cur.volume_id,
                size_bytes: cur.size_bytes.max(1),
                replication_factor: 1,
                allowed_zones: (!zones.is_empty()).then_some(&zones),
                preferred_node: None,
                preferred_daemons: &[],
            },
        )
        .map_err(|e| HealError::Controller(e.into()))?;
        let (addr, info) = &live[chosen[0]];
        tracing::debug!(volume = %cur.volume_id, lost = %lost.node_id, chosen = %info.node_id,
            "replacement chosen");
        Ok(ReplicaRef {
            node_id: info.node_id.clone(),
            zone: info.zone.clone(),
            control_address: addr.clone(),
            data_address: info.data_address.clone(),
        })
    }

    /// Raises the epoch of a detached volume (no engine may write while a copy of it
    /// runs, so the copy can be declared in sync); 0 for an attached one.
    async fn fence_if_detached(&self, cur: &VolumeRecord) -> Result<u64, HealError> {
        if !cur.attachments.is_empty() {
            return Ok(0);
        }
        Ok(fencing::raise_epoch(&self.volumes, cur).await?)
    }

    /// Creates `target`'s copy of `rec` from the heads of the other members that
    /// answered `reads`.
    async fn create_rebuild(
        &self,
        rec: &VolumeRecord,
        reads: &Reads,
        target: &ReplicaRef,
        fence_epoch: u64,
    ) -> Result<(), HealError> {
        let holders: Vec<ReplicaRef> = reads
            .ok()
            .filter(|(r, _)| r.node_id != target.node_id)
            .filter(|(r, _)| rec.replicas.iter().any(|m| m.node_id == r.node_id))
            .map(|(r, _)| r.clone())
            .collect();
        let source = CopySource {
            snapshot_id: String::new(),
            source_volume_id: rec.volume_id.clone(),
            source_replication_factor: rec.replication_factor,
            holders,
            size_bytes: rec.size_bytes,
            clone: false,
            rebuild: true,
            fence_epoch,
        };
        let epoch = fence_epoch.max(reads.max_epoch()).max(rec.epoch);
        self.create_on(target, member_create_request(rec, Some(source), epoch))
            .await
    }

    async fn create_on(
        &self,
        target: &ReplicaRef,
        create: CreateVolumeRequest,
    ) -> Result<(), HealError> {
        let created = self
            .volumes
            .pool()
            .create_volume(&target.control_address, create)
            .await
            .map_err(|e| HealError::replica("CreateVolume", &target.node_id, &e))?;
        tracing::info!(volume = %created.volume_id, node = %target.node_id,
            rebuild = created.copy_source.as_ref().is_some_and(|c| c.rebuild),
            "replica created");
        Ok(())
    }
}
