//! Snapshots as the replicas hold them: ids, discovery across the daemons, sealing on
//! a volume's replicas and deletion from the daemons holding one.
//!
//! Snapshot records live only on the replicas, next to the sealed layers; the
//! controller keeps no snapshot state, so a restart loses nothing. Two kinds share
//! the machinery: user snapshots (`ts-`, CSI CreateSnapshot) and the internal
//! snapshots a clone is copied from (`tc-`), which no CSI call ever shows.

use std::collections::BTreeMap;

use crate::error::ControllerError;
use crate::quorum::{self, majority, Op, QuorumError};
use crate::replica_pool::{join_all, ReplicaPool};
use sha2::Digest;
use tessera_csi_proto::v1 as csi;
use tessera_replica_protocol::control_proto::{
    CreateSnapshotRequest, DeleteSnapshotRequest, ReplicaRef, SnapshotRecord, VolumeRecord,
};

/// Prefix of user snapshot ids (`ts-` + 32 hex chars of sha256(name)), so a
/// CreateSnapshot retried after a crash lands on the same id, and snapshot ids never
/// collide with volume ids.
pub const SNAPSHOT_ID_PREFIX: &str = "ts-";
/// Prefix of the internal snapshot a clone is copied from (`tc-` + 32 hex chars of
/// sha256(clone volume id)): a retried clone reseals the same id.
pub const CLONE_SNAPSHOT_PREFIX: &str = "tc-";

/// The snapshot id of a CSI snapshot name.
pub fn snapshot_id_for_name(name: &str) -> String {
    hashed_id(SNAPSHOT_ID_PREFIX, name)
}

/// The id of the internal snapshot the clone `clone_volume_id` is copied from.
pub fn clone_snapshot_id(clone_volume_id: &str) -> String {
    hashed_id(CLONE_SNAPSHOT_PREFIX, clone_volume_id)
}

/// Whether `id` names an internal clone snapshot, hidden from every CSI call.
pub fn is_internal(id: &str) -> bool {
    id.starts_with(CLONE_SNAPSHOT_PREFIX)
}

fn hashed_id(prefix: &str, key: &str) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    format!("{prefix}{}", hex::encode(&digest[..16]))
}

/// A snapshot as the replicas report it: the record and which daemons sealed it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundSnapshot {
    /// The record (from the first daemon that reported it).
    pub record: SnapshotRecord,
    /// The daemons holding a sealed copy, with their current addresses.
    pub holders: Vec<ReplicaRef>,
}

impl FoundSnapshot {
    /// Ready once a majority of the source's replicas sealed it: only then is every
    /// write acknowledged before the CreateSnapshot in some sealed copy.
    pub fn ready(&self) -> bool {
        self.holders.len() >= self.quorum()
    }

    /// Majority of the source's replication factor: how many holders a reader must
    /// consult to see every acknowledged write.
    pub fn quorum(&self) -> usize {
        majority(self.record.replication_factor.max(1) as usize)
    }

    /// The CSI view of the snapshot.
    pub fn to_csi(&self) -> csi::Snapshot {
        let nanos = self.record.created_unix_nanos;
        csi::Snapshot {
            size_bytes: i64::try_from(self.record.size_bytes).unwrap_or(i64::MAX),
            snapshot_id: self.record.snapshot_id.clone(),
            source_volume_id: self.record.source_volume_id.clone(),
            creation_time: Some(prost_types::Timestamp {
                seconds: nanos.div_euclid(1_000_000_000),
                nanos: i32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
            }),
            ready_to_use: self.ready(),
            group_snapshot_id: String::new(),
        }
    }
}

/// Every snapshot the live daemons hold (user and internal), by id. The listing is
/// in-memory on each daemon. Fails when no daemon answers at all.
pub async fn scan(pool: &ReplicaPool) -> Result<BTreeMap<String, FoundSnapshot>, ControllerError> {
    let live = pool.live();
    let lists = join_all(live.iter().map(|(addr, _)| pool.list_snapshots(addr))).await;
    let mut found: BTreeMap<String, FoundSnapshot> = BTreeMap::new();
    let mut answered = 0;
    for ((addr, info), list) in live.iter().zip(lists) {
        let Ok(list) = list else { continue };
        answered += 1;
        let holder = ReplicaRef {
            node_id: info.node_id.clone(),
            zone: info.zone.clone(),
            control_address: addr.clone(),
            data_address: info.data_address.clone(),
        };
        for rec in list {
            let entry = found
                .entry(rec.snapshot_id.clone())
                .or_insert_with(|| FoundSnapshot {
                    record: rec.clone(),
                    holders: Vec::new(),
                });
            entry.record.source_deleted &= rec.source_deleted;
            entry.holders.push(holder.clone());
        }
    }
    // No answer is not "no snapshots": with daemons known but none answering (or none
    // live), an empty listing would let DeleteSnapshot report an existing snapshot
    // deleted and a restore report it missing.
    if answered == 0 && !pool.known_node_ids().is_empty() {
        return Err(ControllerError::NoDaemonAnswered { live: live.len() });
    }
    Ok(found)
}

/// Seals the head of every replica of `volume` under `id` (in parallel) and returns
/// the snapshot once a majority sealed it. Each replica seals atomically with respect
/// to writes and acknowledged writes are on a majority, so every acknowledged write
/// is in at least one sealed copy; copies differ at most in writes in flight during
/// the call, and a copy keeps the highest seq per block. Idempotent per id.
pub async fn seal(
    pool: &ReplicaPool,
    volume: &VolumeRecord,
    id: &str,
    name: &str,
    created_unix_nanos: i64,
) -> Result<FoundSnapshot, ControllerError> {
    let refs: Vec<ReplicaRef> = volume
        .replicas
        .iter()
        .map(|r| pool.resolve_ref(r))
        .collect();
    let request = CreateSnapshotRequest {
        volume_id: volume.volume_id.clone(),
        snapshot_id: id.to_string(),
        name: name.to_string(),
        created_unix_nanos,
    };
    let answers = quorum::ask(&refs, |r| {
        pool.create_snapshot(&r.control_address, request.clone())
    })
    .await;
    let need = majority(refs.len());
    let holders: Vec<ReplicaRef> = answers.ok().map(|(r, _)| r.clone()).collect();
    let record = answers.ok().next().map(|(_, record)| record.clone());
    match record {
        Some(record) if holders.len() >= need => Ok(FoundSnapshot { record, holders }),
        _ if answers.not_found() >= need => {
            Err(ControllerError::VolumeNotFound(volume.volume_id.clone()))
        }
        _ => Err(QuorumError::NoMajority {
            op: Op::Seal {
                snapshot: id.to_string(),
                volume: volume.volume_id.clone(),
            },
            shortfall: answers.shortfall(need),
        }
        .into()),
    }
}

/// DeleteSnapshot on every daemon holding `found`; fails (UNAVAILABLE) unless every
/// holder confirmed, so the caller's retry finishes the job.
pub async fn delete(pool: &ReplicaPool, found: &FoundSnapshot) -> Result<(), ControllerError> {
    let volume_id = &found.record.source_volume_id;
    let snapshot_id = &found.record.snapshot_id;
    let request = DeleteSnapshotRequest {
        volume_id: volume_id.clone(),
        snapshot_id: snapshot_id.clone(),
    };
    let answers = quorum::ask(&found.holders, |h| {
        pool.delete_snapshot(&h.control_address, request.clone())
    })
    .await;
    let failures = answers.failures();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ControllerError::SnapshotNotDeletedEverywhere {
            snapshot: snapshot_id.clone(),
            failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_prefixed_and_distinct() {
        let s = snapshot_id_for_name("snap");
        assert_eq!(s, snapshot_id_for_name("snap"));
        assert!(s.starts_with(SNAPSHOT_ID_PREFIX) && s.len() == 35);
        let c = clone_snapshot_id("tv-0123");
        assert!(c.starts_with(CLONE_SNAPSHOT_PREFIX) && c.len() == 35);
        assert!(is_internal(&c) && !is_internal(&s));
        assert_ne!(clone_snapshot_id("tv-a"), clone_snapshot_id("tv-b"));
    }

    #[test]
    fn ready_needs_a_majority_of_the_source() {
        let holder = ReplicaRef::default();
        let mut f = FoundSnapshot {
            record: SnapshotRecord {
                replication_factor: 3,
                ..Default::default()
            },
            holders: vec![holder.clone()],
        };
        assert!(!f.ready());
        f.holders.push(holder);
        assert!(f.ready());
        assert_eq!(f.quorum(), 2);
    }
}
