//! Fencing: the epoch raise of a publish.
//!
//! Every engine writes under the epoch its publish handed out, and a replica refuses
//! a connection or write under an epoch lower than the one it holds. Raising the
//! epoch on a majority before a new publish is recorded therefore shuts out whatever
//! engine held the volume before (a node that lost its unpublish, a crashed
//! controller's half-done publish): at most one engine can reach a majority.

use tessera_replica_protocol::control_proto::{RaiseEpochRequest, VolumeRecord};

use crate::error::ControllerError;
use crate::quorum::{Op, Plan, Reads, RecordWrite};
use crate::volumes::Volumes;

/// The epoch that fences every engine the replicas in `reads` may have seen: above
/// the highest epoch any of them holds, and above any epoch whose seqs a shared base
/// layer holds (`epoch_floor` of a restore that shares its source's layers), so this
/// volume's writes outrank them when its copies are reconciled.
pub fn next_epoch(volume: &str, reads: &Reads) -> Result<u64, ControllerError> {
    let highest = reads.max_epoch();
    tessera_replica_protocol::seq::next_epoch(highest.max(reads.max_epoch_floor())).ok_or_else(
        || ControllerError::EpochExhausted {
            volume: volume.to_string(),
            epoch: highest,
        },
    )
}

/// Raises the fencing epoch of `rec` to [`next_epoch`] on a majority of its replicas
/// (compare-and-set on each replica's epoch) and returns it.
pub async fn raise_epoch(volumes: &Volumes, rec: &VolumeRecord) -> Result<u64, ControllerError> {
    let mut raised = 0;
    let op = Op::RaiseEpoch {
        volume: rec.volume_id.clone(),
    };
    volumes
        .compare_and_set(rec, op, |_, reads| {
            let new_epoch = next_epoch(&rec.volume_id, reads)?;
            raised = new_epoch;
            let writes = reads
                .ok()
                .map(|(replica, r)| {
                    let write = RaiseEpochRequest {
                        volume_id: rec.volume_id.clone(),
                        expected_epoch: r.epoch,
                        new_epoch,
                    };
                    (replica.clone(), RecordWrite::RaiseEpoch(write))
                })
                .collect();
            Ok(Plan::Write { writes, already: 0 })
        })
        .await?;
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::{Answers, ReplicaFailure};
    use tessera_replica_protocol::control_proto::{CopyProgress, ReplicaRef};

    fn at(epoch: u64, floor: Option<u64>) -> (ReplicaRef, Result<VolumeRecord, ReplicaFailure>) {
        let rec = VolumeRecord {
            epoch,
            copy: floor.map(|epoch_floor| CopyProgress {
                epoch_floor,
                ..Default::default()
            }),
            ..Default::default()
        };
        (ReplicaRef::default(), Ok(rec))
    }

    #[test]
    fn next_epoch_is_above_every_epoch_and_floor_seen() {
        let reads = Answers(vec![at(3, None), at(5, None), at(4, None)]);
        assert_eq!(next_epoch("tv-1", &reads).unwrap(), 6);
        let shared = Answers(vec![at(0, Some(9)), at(2, None)]);
        assert_eq!(next_epoch("tv-1", &shared).unwrap(), 10);
        let down = Answers(vec![
            at(7, None),
            (
                ReplicaRef::default(),
                Err(ReplicaFailure::Unreachable("down".into())),
            ),
        ]);
        assert_eq!(next_epoch("tv-1", &down).unwrap(), 8);
    }

    #[test]
    fn an_exhausted_epoch_space_is_a_failed_precondition() {
        let max = tessera_replica_protocol::seq::MAX_EPOCH;
        let err = next_epoch("tv-1", &Answers(vec![at(max, None)])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("tv-1"), "{err}");
    }
}
