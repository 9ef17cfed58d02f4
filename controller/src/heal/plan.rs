//! What one volume needs to be whole again, decided from a quorum read of its
//! replicas (pure, so every case has a unit test).

use tessera_replica_protocol::control_proto::{InSyncRecord, ReplicaRef, VolumeRecord};

use crate::quorum::{Reads, ReplicaFailure};

/// The one step a healing pass takes for a volume (the next pass takes the next).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Whole, or waiting (a copy running, a daemon down for less than the delay).
    Nothing,
    /// Member `member` holds a smaller volume than the record: it missed an expansion.
    Expand { member: usize },
    /// Member `member`'s daemon answers but holds no copy (its data was lost, or a
    /// create or replacement stopped before it reached it): make it again there.
    Recreate { member: usize },
    /// Member `member`'s node has been unreachable for longer than the replacement
    /// delay: replace it with a daemon on another node.
    Replace { member: usize },
    /// Member `member` is a rebuilt copy of a volume fenced and detached since the
    /// copy began, so it holds every write: declare it in sync at `epoch` (the fence).
    Declare { member: usize, epoch: u64 },
}

/// Which replicas the newest in-sync record its replicas hold names (the engines'
/// declarations; a volume no engine declared for counts every replica in sync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InSyncView {
    /// The newest record, if any replica reported one.
    pub newest: Option<InSyncRecord>,
}

impl InSyncView {
    /// The newest in-sync record among the replicas that answered `reads`.
    pub fn of(reads: &Reads) -> InSyncView {
        InSyncView {
            newest: reads
                .ok()
                .filter_map(|(_, r)| r.in_sync.as_ref())
                .max_by_key(|m| (m.epoch, m.version))
                .cloned(),
        }
    }

    /// Whether some engine has declared the set.
    pub fn declared(&self) -> bool {
        self.newest
            .as_ref()
            .is_some_and(|m| m.epoch != 0 || m.version != 0)
    }

    /// Whether `node` is in sync by the newest record (everyone is while undeclared).
    pub fn includes(&self, node: &str) -> bool {
        !self.declared()
            || self
                .newest
                .as_ref()
                .is_some_and(|m| m.members.iter().any(|n| n == node))
    }

    /// Whether the replica on `node`, which answered with `held`, is in sync: named
    /// by the newest record *and* by its own. A copy made again under the same node
    /// id (a replaced disk) holds no record of its own, or one without itself, until
    /// it is declared: the newest record naming its node says nothing about it.
    pub fn in_sync(&self, node: &str, held: &VolumeRecord) -> bool {
        if !self.declared() {
            return true;
        }
        let own = held
            .in_sync
            .as_ref()
            .is_some_and(|m| m.members.iter().any(|n| n == node));
        self.includes(node) && own
    }
}

/// What a read says about one member.
enum Member<'a> {
    Holds(&'a VolumeRecord),
    Missing,
    Unanswered,
}

fn members<'a>(cur: &VolumeRecord, reads: &'a Reads) -> Vec<(&'a ReplicaRef, Member<'a>)> {
    reads
        .all()
        .iter()
        .filter(|(r, _)| cur.replicas.iter().any(|m| m.node_id == r.node_id))
        .map(|(r, answer)| {
            let m = match answer {
                Ok(rec) => Member::Holds(rec),
                Err(ReplicaFailure::NotFound(_)) => Member::Missing,
                Err(_) => Member::Unanswered,
            };
            (r, m)
        })
        .collect()
}

/// The next step for the volume whose current (majority) record is `cur`, from the
/// read of its members `reads`; `lost` says whether a member is to be given up: its
/// node past the replacement delay, or its copy failing to be made again and again. Indexes are into `cur.replicas`.
pub fn decide(cur: &VolumeRecord, reads: &Reads, lost: impl Fn(&ReplicaRef) -> bool) -> Action {
    let index = |r: &ReplicaRef| cur.replicas.iter().position(|m| m.node_id == r.node_id);
    let members = members(cur, reads);
    let first = |pred: &dyn Fn(&ReplicaRef, &Member) -> bool| {
        members
            .iter()
            .find(|(r, m)| pred(r, m))
            .and_then(|(r, _)| index(r))
    };
    if let Some(member) =
        first(&|_, m| matches!(m, Member::Holds(rec) if rec.size_bytes < cur.size_bytes))
    {
        return Action::Expand { member };
    }
    if let Some(member) = first(&|r, m| matches!(m, Member::Missing) && lost(r)) {
        return Action::Replace { member };
    }
    if let Some(member) = first(&|_, m| matches!(m, Member::Missing)) {
        return Action::Recreate { member };
    }
    if let Some(member) = first(&|r, m| matches!(m, Member::Unanswered) && lost(r)) {
        return Action::Replace { member };
    }
    let in_sync = InSyncView::of(reads);
    let epoch = reads.max_epoch();
    let declarable = |r: &ReplicaRef, m: &Member| {
        let Member::Holds(rec) = m else { return false };
        let (Some(source), Some(copy)) = (&rec.copy_source, &rec.copy) else {
            return false;
        };
        source.rebuild
            && copy.complete
            && source.fence_epoch != 0
            && source.fence_epoch == epoch
            && cur.attachments.is_empty()
            && in_sync.declared()
            && !in_sync.in_sync(&r.node_id, rec)
    };
    if let Some(member) = first(&declarable) {
        return Action::Declare { member, epoch };
    }
    Action::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::Answers;
    use tessera_replica_protocol::control_proto::{Attachment, CopyProgress, CopySource};

    fn node(n: &str) -> ReplicaRef {
        ReplicaRef {
            node_id: n.into(),
            control_address: format!("{n}:7000"),
            data_address: format!("{n}:7001"),
            ..Default::default()
        }
    }

    fn record(epoch: u64, members: &[&str]) -> VolumeRecord {
        VolumeRecord {
            volume_id: "tv-1".into(),
            size_bytes: 1 << 20,
            replication_factor: 3,
            replicas: ["a", "b", "c"].map(node).to_vec(),
            epoch,
            generation: 2,
            in_sync: Some(InSyncRecord {
                epoch,
                version: 1,
                members: members.iter().map(|m| m.to_string()).collect(),
            }),
            ..Default::default()
        }
    }

    fn rebuilt(mut rec: VolumeRecord, fence_epoch: u64, complete: bool) -> VolumeRecord {
        rec.copy_source = Some(CopySource {
            source_volume_id: "tv-1".into(),
            rebuild: true,
            fence_epoch,
            ..Default::default()
        });
        rec.copy = Some(CopyProgress {
            complete,
            ..Default::default()
        });
        rec.in_sync = Some(InSyncRecord::default());
        rec
    }

    type Answer = Result<VolumeRecord, ReplicaFailure>;

    fn reads(answers: [Answer; 3]) -> Reads {
        Answers(["a", "b", "c"].map(node).into_iter().zip(answers).collect())
    }

    fn down() -> Answer {
        Err(ReplicaFailure::Unreachable("connection refused".into()))
    }

    #[test]
    fn a_whole_volume_needs_nothing() {
        let r = record(4, &["a", "b", "c"]);
        let reads = reads([Ok(r.clone()), Ok(r.clone()), Ok(r.clone())]);
        assert_eq!(decide(&r, &reads, |_| true), Action::Nothing);
    }

    #[test]
    fn a_member_down_is_replaced_only_once_it_is_lost() {
        let r = record(4, &["a", "b"]);
        let reads = reads([Ok(r.clone()), Ok(r.clone()), down()]);
        assert_eq!(decide(&r, &reads, |_| false), Action::Nothing);
        assert_eq!(
            decide(&r, &reads, |m| m.node_id == "c"),
            Action::Replace { member: 2 }
        );
    }

    #[test]
    fn a_member_without_its_copy_is_made_again_and_a_small_one_expanded_first() {
        let r = record(4, &["a", "b", "c"]);
        let missing = reads([
            Ok(r.clone()),
            Err(ReplicaFailure::NotFound("gone".into())),
            Ok(r.clone()),
        ]);
        assert_eq!(
            decide(&r, &missing, |_| false),
            Action::Recreate { member: 1 }
        );
        let mut small = r.clone();
        small.size_bytes /= 2;
        let reads = reads([Ok(r.clone()), Ok(r.clone()), Ok(small)]);
        assert_eq!(decide(&r, &reads, |_| false), Action::Expand { member: 2 });
    }

    #[test]
    fn a_rebuilt_copy_is_declared_only_if_fenced_detached_and_complete() {
        let r = record(7, &["a", "b"]);
        let d = rebuilt(r.clone(), 7, true);
        let ok = reads([Ok(r.clone()), Ok(r.clone()), Ok(d.clone())]);
        assert_eq!(
            decide(&r, &ok, |_| false),
            Action::Declare {
                member: 2,
                epoch: 7
            }
        );

        // Copy still running.
        let running = reads([
            Ok(r.clone()),
            Ok(r.clone()),
            Ok(rebuilt(r.clone(), 7, false)),
        ]);
        assert_eq!(decide(&r, &running, |_| false), Action::Nothing);
        // Published since the fence: the epoch moved; the engine resyncs it.
        let mut later = r.clone();
        later.epoch = 8;
        let moved = reads([Ok(later.clone()), Ok(later), Ok(d.clone())]);
        assert_eq!(decide(&r, &moved, |_| false), Action::Nothing);
        // Attached: the engine's job.
        let mut attached = r.clone();
        attached.attachments = vec![Attachment {
            node_id: "n1".into(),
            readonly: false,
        }];
        assert_eq!(decide(&attached, &ok, |_| false), Action::Nothing);
        // Rebuilt while attached (no fence).
        let unfenced = reads([
            Ok(r.clone()),
            Ok(r.clone()),
            Ok(rebuilt(r.clone(), 0, true)),
        ]);
        assert_eq!(decide(&r, &unfenced, |_| false), Action::Nothing);
        // Already declared in sync.
        let r3 = record(7, &["a", "b", "c"]);
        let mut declared = rebuilt(r3.clone(), 7, true);
        declared.in_sync = r3.in_sync.clone();
        let done = reads([Ok(r3.clone()), Ok(r3.clone()), Ok(declared)]);
        assert_eq!(decide(&r3, &done, |_| false), Action::Nothing);
    }

    #[test]
    fn a_copy_made_again_under_a_listed_node_is_not_in_sync_until_declared() {
        let r = record(7, &["a", "b", "c"]);
        // c's disk was replaced: its copy was rebuilt, its own record is empty.
        let c = rebuilt(r.clone(), 7, true);
        let reads = reads([Ok(r.clone()), Ok(r.clone()), Ok(c.clone())]);
        let view = InSyncView::of(&reads);
        assert!(view.includes("c"), "the newest record names c");
        assert!(
            !view.in_sync("c", &c),
            "but c's copy is not the one it named"
        );
        assert!(view.in_sync("a", &r));
        assert_eq!(
            decide(&r, &reads, |_| false),
            Action::Declare {
                member: 2,
                epoch: 7
            }
        );
    }

    #[test]
    fn the_in_sync_view_is_the_newest_record() {
        let mut old = record(3, &["a", "b", "c"]);
        old.in_sync.as_mut().unwrap().version = 9;
        let new = record(4, &["a", "b"]);
        let view = InSyncView::of(&reads([Ok(old), Ok(new), down()]));
        assert!(view.declared());
        assert!(view.includes("a") && !view.includes("c"));
        let none = InSyncView::of(&reads([down(), down(), down()]));
        assert!(!none.declared() && none.includes("c"));
    }
}
