//! The controller's one majority primitive: what each replica of a volume answered
//! (typed, per replica), whether a majority agrees, and the compare-and-set round every
//! record mutation goes through.
//!
//! A volume's records on a majority of its replicas are the source of truth. A
//! mutation (attachments and parameters, the fencing epoch, the size) is a round of
//! [`compare_and_set`]: read every replica, judge the majority view, send each replica
//! that needs it a write whose expected generation or epoch is the one that replica
//! holds, and count confirmations. A replica that changed in between refuses
//! ([`ReplicaFailure::Conflict`]) and the round starts again from a fresh read, at
//! most [`CAS_ATTEMPTS`] times.

use std::fmt;
use std::future::Future;

use tessera_replica_protocol::control_proto::{
    ExpandVolumeRequest, RaiseEpochRequest, ReplicaRef, UpdateVolumeRequest, VolumeRecord,
};
use tonic::{Code, Status};

use crate::replica_pool::{join_all, ReplicaPool};
use crate::volume_index::newer;

/// How often a compare-and-set round is tried before giving up (ABORTED): each retry
/// follows a lost race against another writer.
pub const CAS_ATTEMPTS: usize = 5;

pub use tessera_replica_protocol::quorum::majority;

/// Why one replica did not do what it was asked, sorted by what the caller can do
/// about it. The daemon's own words are kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaFailure {
    /// No usable answer: transport failure, missed deadline, or a daemon too busy to
    /// take the call (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// A compare-and-set lost: the replica's generation or epoch is not the expected
    /// one any more (ABORTED). Retrying from a fresh read can help.
    #[error("stale generation or epoch: {0}")]
    Conflict(String),
    /// The replica does not hold the volume or snapshot (NOT_FOUND).
    #[error("not found: {0}")]
    NotFound(String),
    /// The replica has no room (RESOURCE_EXHAUSTED).
    #[error("out of space: {0}")]
    OutOfSpace(String),
    /// The replica holds the id with other contents, e.g. another size (ALREADY_EXISTS).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request is outside what the replica's volume can become (OUT_OF_RANGE).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Anything else, with the replica's code.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC code the replica answered.
        code: Code,
        /// The replica's message.
        message: String,
    },
}

impl ReplicaFailure {
    /// Whether no retry can help: the replica lacks space, or the request is out of
    /// its range.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::OutOfSpace(_) | Self::OutOfRange(_))
    }
}

impl From<Status> for ReplicaFailure {
    fn from(s: Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                Self::Unreachable(message)
            }
            Code::Aborted => Self::Conflict(message),
            Code::NotFound => Self::NotFound(message),
            Code::ResourceExhausted => Self::OutOfSpace(message),
            Code::AlreadyExists => Self::AlreadyExists(message),
            Code::OutOfRange => Self::OutOfRange(message),
            code => Self::Other { code, message },
        }
    }
}

/// A failure and the replica it happened on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaError {
    /// The replica, with its current addresses.
    pub replica: ReplicaRef,
    /// What went wrong there.
    pub failure: ReplicaFailure,
}

impl fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.replica.node_id, self.replica.control_address, self.failure
        )
    }
}

/// The replicas that failed in one round, in record order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures(pub Vec<ReplicaError>);

impl Failures {
    /// Whether any replica failed in a way `pred` matches.
    pub fn any(&self, pred: impl Fn(&ReplicaFailure) -> bool) -> bool {
        self.0.iter().any(|e| pred(&e.failure))
    }

    /// The first failure `pred` matches.
    pub fn find(&self, pred: impl Fn(&ReplicaFailure) -> bool) -> Option<&ReplicaError> {
        self.0.iter().find(|e| pred(&e.failure))
    }

    /// Whether no replica failed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a new round may succeed: some replica lost a race, and none refused
    /// for good.
    pub fn worth_retrying(&self) -> bool {
        self.any(|f| matches!(f, ReplicaFailure::Conflict(_)))
            && !self.any(ReplicaFailure::is_final)
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Too few replicas confirmed something a majority had to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reached} of {total} replicas succeeded, {needed} are needed: {failures}")]
pub struct Shortfall {
    /// Replicas that answered or confirmed.
    pub reached: usize,
    /// Replicas asked (or that should have been).
    pub total: usize,
    /// Confirmations needed.
    pub needed: usize,
    /// What the others said.
    pub failures: Failures,
}

/// What a quorum was needed for (the subject of error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Reading a volume's record from its replicas.
    Read { volume: String },
    /// Creating a volume's replicas.
    Create { volume: String },
    /// Changing attachments or parameters.
    Update { volume: String },
    /// Raising the fencing epoch.
    RaiseEpoch { volume: String },
    /// Growing a volume.
    Expand { volume: String, size: u64 },
    /// Sealing a snapshot on a volume's replicas.
    Seal { snapshot: String, volume: String },
    /// Reading a snapshot's allocated or changed ranges from its holders.
    Ranges { snapshot: String },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { volume } => write!(f, "reading volume {volume}"),
            Self::Create { volume } => write!(f, "creating volume {volume}"),
            Self::Update { volume } => write!(f, "updating volume {volume}"),
            Self::RaiseEpoch { volume } => write!(f, "raising the epoch of volume {volume}"),
            Self::Expand { volume, size } => write!(f, "expanding volume {volume} to {size} bytes"),
            Self::Seal { snapshot, volume } => {
                write!(f, "sealing snapshot {snapshot} of volume {volume}")
            }
            Self::Ranges { snapshot } => write!(f, "reading the ranges of snapshot {snapshot}"),
        }
    }
}

/// A quorum that was not reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    /// A majority of the volume's replicas do not hold it (NOT_FOUND).
    #[error("volume {volume} does not exist")]
    VolumeNotFound {
        /// The volume id.
        volume: String,
    },
    /// Too few replicas answered or confirmed (UNAVAILABLE).
    #[error("{op}: {shortfall}")]
    NoMajority {
        /// What the majority was needed for.
        op: Op,
        /// Who confirmed and who did not.
        shortfall: Shortfall,
    },
    /// Every compare-and-set round lost a race against another writer (ABORTED).
    #[error("{op} kept losing races against concurrent updates; retry")]
    LostRaces {
        /// The mutation.
        op: Op,
    },
}

/// What each replica answered, in the order asked.
#[derive(Debug, Clone)]
pub struct Answers<T>(pub Vec<(ReplicaRef, Result<T, ReplicaFailure>)>);

/// Asks every replica in `replicas` with `call`, in parallel.
pub async fn ask<'a, T, F, Fut>(replicas: &'a [ReplicaRef], call: F) -> Answers<T>
where
    F: Fn(&'a ReplicaRef) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let results = join_all(replicas.iter().map(call)).await;
    Answers(
        replicas
            .iter()
            .cloned()
            .zip(results.into_iter().map(|r| r.map_err(ReplicaFailure::from)))
            .collect(),
    )
}

impl<T> Answers<T> {
    /// Every replica with its answer or failure, in the order asked.
    pub fn all(&self) -> &[(ReplicaRef, Result<T, ReplicaFailure>)] {
        &self.0
    }

    /// The replicas that answered, with their answers.
    pub fn ok(&self) -> impl Iterator<Item = (&ReplicaRef, &T)> {
        self.0
            .iter()
            .filter_map(|(r, a)| a.as_ref().ok().map(|v| (r, v)))
    }

    /// How many replicas answered.
    pub fn ok_count(&self) -> usize {
        self.ok().count()
    }

    /// How many replicas were asked.
    pub fn total(&self) -> usize {
        self.0.len()
    }

    /// How many replicas do not hold what was asked for.
    pub fn not_found(&self) -> usize {
        self.0
            .iter()
            .filter(|(_, a)| matches!(a, Err(ReplicaFailure::NotFound(_))))
            .count()
    }

    /// The replicas that failed, and how.
    pub fn failures(&self) -> Failures {
        Failures(
            self.0
                .iter()
                .filter_map(|(r, a)| {
                    a.as_ref().err().map(|f| ReplicaError {
                        replica: r.clone(),
                        failure: f.clone(),
                    })
                })
                .collect(),
        )
    }

    /// This round as a shortfall against `needed` confirmations.
    pub fn shortfall(&self, needed: usize) -> Shortfall {
        Shortfall {
            reached: self.ok_count(),
            total: self.total(),
            needed,
            failures: self.failures(),
        }
    }
}

/// What the replicas of one volume answered to GetVolume.
pub type Reads = Answers<VolumeRecord>;

/// The newest of `records` (highest generation, then epoch), if any.
pub fn newest<'a>(records: impl IntoIterator<Item = &'a VolumeRecord>) -> Option<&'a VolumeRecord> {
    records.into_iter().fold(None, |best, r| match best {
        Some(b) if !newer(r, b) => Some(b),
        _ => Some(r),
    })
}

impl Reads {
    /// The newest record any replica answered.
    pub fn freshest(&self) -> Option<VolumeRecord> {
        newest(self.ok().map(|(_, r)| r)).cloned()
    }

    /// The highest epoch any replica answered.
    pub fn max_epoch(&self) -> u64 {
        self.ok().map(|(_, r)| r.epoch).max().unwrap_or(0)
    }

    /// The epoch a restore sharing its source's layers must exceed (`epoch_floor`).
    pub fn max_epoch_floor(&self) -> u64 {
        self.ok()
            .filter_map(|(_, r)| r.copy.as_ref().map(|c| c.epoch_floor))
            .max()
            .unwrap_or(0)
    }

    /// The current record of `volume` as a majority of its replicas see it: the
    /// newest answer once a majority answered; NOT_FOUND once a majority lacks it.
    pub fn current(&self, volume: &str) -> Result<VolumeRecord, QuorumError> {
        let needed = majority(self.total());
        if self.not_found() >= needed {
            return Err(QuorumError::VolumeNotFound {
                volume: volume.to_string(),
            });
        }
        match self.freshest() {
            Some(cur) if self.ok_count() >= needed => Ok(cur),
            _ => Err(QuorumError::NoMajority {
                op: Op::Read {
                    volume: volume.to_string(),
                },
                shortfall: self.shortfall(needed),
            }),
        }
    }
}

/// GetVolume of `volume` on each of `replicas` (current addresses), in parallel.
pub async fn read(pool: &ReplicaPool, volume: &str, replicas: &[ReplicaRef]) -> Reads {
    ask(replicas, |r| pool.get_volume(&r.control_address, volume)).await
}

/// One replica's compare-and-set write, made from what that replica holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordWrite {
    /// Attachments and parameters, expected generation.
    Update(UpdateVolumeRequest),
    /// The fencing epoch, expected epoch.
    RaiseEpoch(RaiseEpochRequest),
    /// The size, expected generation.
    Expand(ExpandVolumeRequest),
}

impl RecordWrite {
    /// Sends the write; the record the replica stored, if the call returns one.
    async fn send(
        &self,
        pool: &ReplicaPool,
        address: &str,
    ) -> Result<Option<VolumeRecord>, Status> {
        match self {
            Self::Update(w) => pool.update_volume(address, w.clone()).await.map(Some),
            Self::Expand(w) => pool.expand_volume(address, w.clone()).await.map(Some),
            Self::RaiseEpoch(w) => {
                let epoch = pool.raise_epoch(address, w.clone()).await?;
                if epoch == w.new_epoch {
                    Ok(None)
                } else {
                    Err(Status::internal(format!(
                        "raised to epoch {epoch}, not the requested {}",
                        w.new_epoch
                    )))
                }
            }
        }
    }
}

/// What a round does, decided from the majority view.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to write: a majority already holds the target.
    Done,
    /// Write to these replicas; `already` more hold the target and count as confirmed.
    Write {
        /// Replica and the write it gets.
        writes: Vec<(ReplicaRef, RecordWrite)>,
        /// Replicas already holding the target.
        already: usize,
    },
}

/// A compare-and-set a majority confirmed.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The majority view the round started from.
    pub current: VolumeRecord,
    /// The records the written replicas stored (none for an epoch raise).
    pub written: Vec<VolumeRecord>,
}

impl Committed {
    /// The newest record of the round: what a majority holds now.
    pub fn newest(&self) -> VolumeRecord {
        newest([&self.current].into_iter().chain(&self.written))
            .unwrap_or(&self.current)
            .clone()
    }
}

/// Runs compare-and-set rounds on `replicas` (current addresses of `volume`'s
/// replicas) until a majority confirms what `plan` asks for. `plan` sees the current
/// majority view and every answer of the round's read; its error ends the loop before
/// anything is written. A round short of a majority is retried only when some replica
/// lost a race and none refused for good; otherwise it is UNAVAILABLE naming each
/// failure.
pub async fn compare_and_set<E, P>(
    pool: &ReplicaPool,
    volume: &str,
    replicas: &[ReplicaRef],
    op: Op,
    mut plan: P,
) -> Result<Committed, E>
where
    E: From<QuorumError>,
    P: FnMut(&VolumeRecord, &Reads) -> Result<Plan, E>,
{
    let needed = majority(replicas.len());
    for _ in 0..CAS_ATTEMPTS {
        let reads = read(pool, volume, replicas).await;
        let current = reads.current(volume)?;
        let (writes, already) = match plan(&current, &reads)? {
            Plan::Done => {
                return Ok(Committed {
                    current,
                    written: Vec::new(),
                })
            }
            Plan::Write { writes, already } => (writes, already),
        };
        let results = join_all(writes.iter().map(|(r, w)| w.send(pool, &r.control_address))).await;
        let answers = Answers(
            writes
                .into_iter()
                .zip(results)
                .map(|((r, _), res)| (r, res.map_err(ReplicaFailure::from)))
                .collect(),
        );
        let confirmed = already + answers.ok_count();
        if confirmed >= needed {
            return Ok(Committed {
                current,
                written: answers.ok().filter_map(|(_, r)| r.clone()).collect(),
            });
        }
        let failures = answers.failures();
        if !failures.worth_retrying() {
            return Err(QuorumError::NoMajority {
                op,
                shortfall: Shortfall {
                    reached: confirmed,
                    total: replicas.len(),
                    needed,
                    failures,
                },
            }
            .into());
        }
    }
    Err(QuorumError::LostRaces { op }.into())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use tessera_replica_protocol::control_proto::ReplicaRef;

    /// A replica on node `n` with control address `n:7000`.
    pub(crate) fn replica(n: &str) -> ReplicaRef {
        ReplicaRef {
            node_id: n.into(),
            control_address: format!("{n}:7000"),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::replica as node;
    use super::*;

    fn rec(generation: u64, epoch: u64) -> VolumeRecord {
        VolumeRecord {
            volume_id: "tv-1".into(),
            generation,
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn statuses_become_typed_failures() {
        let f = |s: Status| ReplicaFailure::from(s);
        assert_eq!(
            f(Status::unavailable("down")),
            ReplicaFailure::Unreachable("down".into())
        );
        assert_eq!(
            f(Status::deadline_exceeded("slow")),
            ReplicaFailure::Unreachable("slow".into())
        );
        assert_eq!(
            f(Status::aborted("gen 3")),
            ReplicaFailure::Conflict("gen 3".into())
        );
        assert_eq!(
            f(Status::not_found("x")),
            ReplicaFailure::NotFound("x".into())
        );
        assert_eq!(
            f(Status::resource_exhausted("full")),
            ReplicaFailure::OutOfSpace("full".into())
        );
        assert_eq!(
            f(Status::already_exists("size")),
            ReplicaFailure::AlreadyExists("size".into())
        );
        assert_eq!(
            f(Status::out_of_range("big")),
            ReplicaFailure::OutOfRange("big".into())
        );
        assert_eq!(
            f(Status::internal("io")),
            ReplicaFailure::Other {
                code: Code::Internal,
                message: "io".into()
            }
        );
    }

    #[test]
    fn retry_only_after_a_lost_race_and_no_final_refusal() {
        let err = |n: &str, failure| ReplicaError {
            replica: node(n),
            failure,
        };
        let conflict = err("n1", ReplicaFailure::Conflict("gen".into()));
        let down = err("n2", ReplicaFailure::Unreachable("down".into()));
        let full = err("n3", ReplicaFailure::OutOfSpace("full".into()));
        assert!(Failures(vec![conflict.clone(), down.clone()]).worth_retrying());
        assert!(!Failures(vec![down.clone()]).worth_retrying());
        assert!(!Failures(vec![conflict.clone(), full.clone()]).worth_retrying());
        assert!(!Failures::default().worth_retrying());
        let text = Failures(vec![down, full]).to_string();
        assert_eq!(
            text,
            "n2 (n2:7000): unreachable: down; n3 (n3:7000): out of space: full"
        );
    }

    #[test]
    fn current_needs_a_majority_and_takes_the_newest() {
        let reads = Answers(vec![
            (node("n1"), Ok(rec(3, 1))),
            (node("n2"), Ok(rec(4, 1))),
            (node("n3"), Err(ReplicaFailure::Unreachable("down".into()))),
        ]);
        assert_eq!(reads.current("tv-1").unwrap().generation, 4);
        assert_eq!(reads.max_epoch(), 1);

        let few = Answers(vec![
            (node("n1"), Ok(rec(3, 1))),
            (node("n2"), Err(ReplicaFailure::Unreachable("down".into()))),
            (node("n3"), Err(ReplicaFailure::NotFound("gone".into()))),
        ]);
        match few.current("tv-1") {
            Err(QuorumError::NoMajority { op, shortfall }) => {
                assert_eq!(
                    op,
                    Op::Read {
                        volume: "tv-1".into()
                    }
                );
                assert_eq!(
                    (shortfall.reached, shortfall.total, shortfall.needed),
                    (1, 3, 2)
                );
                assert_eq!(shortfall.failures.0.len(), 2);
                assert_eq!(shortfall.failures.0[0].replica.node_id, "n2");
            }
            other => panic!("expected no majority, got {other:?}"),
        }

        let gone = Answers::<VolumeRecord>(vec![
            (node("n1"), Err(ReplicaFailure::NotFound("gone".into()))),
            (node("n2"), Err(ReplicaFailure::NotFound("gone".into()))),
            (node("n3"), Ok(rec(1, 0))),
        ]);
        assert_eq!(
            gone.current("tv-1").unwrap_err(),
            QuorumError::VolumeNotFound {
                volume: "tv-1".into()
            }
        );
    }

    #[test]
    fn committed_is_the_newest_of_the_round() {
        let c = Committed {
            current: rec(4, 2),
            written: vec![rec(5, 2), rec(3, 2)],
        };
        assert_eq!(c.newest().generation, 5);
        let none = Committed {
            current: rec(4, 2),
            written: vec![],
        };
        assert_eq!(none.newest().generation, 4);
    }
}
