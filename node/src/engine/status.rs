//! What the engine reports about itself: replica states and I/O counters, for the
//! node plugin (NodeGetVolumeStats' volume condition), the CLI and metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Whether the engine still sends I/O to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    /// Receives every write and may serve reads.
    InSync,
    /// Being caught up online: receives every new write while what it missed is
    /// copied to it; serves no reads and does not count toward the quorum until it
    /// is readmitted.
    Resyncing {
        /// When the catch-up started.
        since: SystemTime,
        /// Bytes of the volume compared so far.
        done_bytes: u64,
        /// Bytes the catch-up compares in all (0 until it has planned them): the
        /// dirty regions, or the whole volume for a full comparison.
        total_bytes: u64,
        /// Whether it compares the whole volume: the replica was never declared in
        /// sync, so the dirty regions do not bound what it lacks.
        full: bool,
    },
    /// Failed, timed out or could not be reached; receives nothing, so it may miss
    /// writes. The engine records it out of sync on the others and keeps trying to
    /// reconnect it (then it resyncs); the next engine brings it back too.
    Stale {
        /// What made the engine give up on it (the first failure).
        reason: String,
        /// When that happened.
        since: SystemTime,
    },
}

/// One replica as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Node the replica lives on.
    pub node_id: String,
    /// Its data-plane address.
    pub address: String,
    /// Whether it is on this engine's node (preferred for reads).
    pub local: bool,
    /// In sync or stale (and why).
    pub state: ReplicaState,
}

/// Monotonic counters since the engine opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Writes acknowledged to the caller.
    pub writes: u64,
    /// Reads answered with data.
    pub reads: u64,
    /// Flushes completed on a majority.
    pub flushes: u64,
    /// Trims acknowledged to the caller.
    pub trims: u64,
    /// Bytes written (acknowledged writes).
    pub bytes_written: u64,
    /// Bytes read (answered reads).
    pub bytes_read: u64,
    /// Corrupt copies rewritten from a good replica (self-healing reads).
    pub repairs: u64,
    /// Corrupt copies detected whose repair could not be done (no good copy, the
    /// range stayed busy, the repair write failed). The next read retries.
    pub repair_failures: u64,
    /// Reads, writes, flushes and trims that returned an error.
    pub failed_ops: u64,
    /// Replicas caught up online and readmitted.
    pub resyncs: u64,
    /// Bytes of data copied to resyncing replicas.
    pub resync_bytes: u64,
    /// Bytes of the volume compared by catch-ups (of which `resync_bytes` differed).
    pub resync_compared_bytes: u64,
    /// Catch-ups that compared the whole volume and readmitted their replica.
    pub full_resyncs: u64,
    /// Slots taken over by a new member after the controller replaced one.
    pub replica_set_changes: u64,
    /// REPLICA_SET answers received from in-sync replicas (each poll asks all).
    pub replica_set_answers: u64,
}

/// A snapshot of an engine's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStatus {
    /// The volume.
    pub volume_id: String,
    /// The engine's fencing epoch.
    pub epoch: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Every replica of the set, in configuration order.
    pub replicas: Vec<ReplicaStatus>,
    /// Replicas needed for a write (a majority of the whole set).
    pub quorum: usize,
    /// Replicas still in sync.
    pub in_sync: usize,
    /// Fewer than `quorum` replicas in sync: every I/O fails until the volume is
    /// reopened. An abnormal volume condition.
    pub below_quorum: bool,
    /// A newer engine took over; every I/O fails.
    pub fenced: bool,
    /// [`super::Engine::close`] was called.
    pub closed: bool,
    /// What reconciling the replicas at open did.
    pub reconciled_at_open: super::ReconcileReport,
    /// Writes, trims and repairs some replica has not finished yet.
    pub inflight_ops: usize,
    /// I/O counters.
    pub counters: EngineCounters,
}

impl EngineStatus {
    /// Whether the volume needs attention (below quorum, fenced, or a replica stale),
    /// with a one-line message for CSI `VolumeCondition`.
    pub fn condition(&self) -> (bool, String) {
        if self.fenced {
            return (true, "engine was fenced by a newer epoch".to_owned());
        }
        let out: Vec<String> = self
            .replicas
            .iter()
            .filter_map(|r| match r.state {
                ReplicaState::InSync => None,
                ReplicaState::Resyncing {
                    done_bytes,
                    total_bytes,
                    ..
                } if total_bytes > 0 => Some(format!(
                    "{} resyncing {} %",
                    r.node_id,
                    percent(done_bytes, total_bytes)
                )),
                ReplicaState::Resyncing { .. } => Some(format!("{} resyncing", r.node_id)),
                ReplicaState::Stale { .. } => Some(format!("{} stale", r.node_id)),
            })
            .collect();
        if self.below_quorum {
            return (
                true,
                format!(
                    "below quorum: {} of {} replicas in sync, {} needed ({})",
                    self.in_sync,
                    self.replicas.len(),
                    self.quorum,
                    out.join(", ")
                ),
            );
        }
        if !out.is_empty() {
            return (
                true,
                format!(
                    "degraded: {} of {} replicas in sync; {}",
                    self.in_sync,
                    self.replicas.len(),
                    out.join(", ")
                ),
            );
        }
        (false, "all replicas in sync".to_owned())
    }
}

/// `done` of `total` in whole percent, rounded down (so 100 only when done).
fn percent(done: u64, total: u64) -> u64 {
    (u128::from(done.min(total)) * 100 / u128::from(total.max(1))) as u64
}

/// The live counters behind [`EngineCounters`]; relaxed atomics, one add per I/O.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) writes: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) trims: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) repairs: AtomicU64,
    pub(crate) repair_failures: AtomicU64,
    pub(crate) failed_ops: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    pub(crate) resync_bytes: AtomicU64,
    pub(crate) resync_compared_bytes: AtomicU64,
    pub(crate) full_resyncs: AtomicU64,
    pub(crate) replica_set_changes: AtomicU64,
    pub(crate) replica_set_answers: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> EngineCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineCounters {
            writes: g(&self.writes),
            reads: g(&self.reads),
            flushes: g(&self.flushes),
            trims: g(&self.trims),
            bytes_written: g(&self.bytes_written),
            bytes_read: g(&self.bytes_read),
            repairs: g(&self.repairs),
            repair_failures: g(&self.repair_failures),
            failed_ops: g(&self.failed_ops),
            resyncs: g(&self.resyncs),
            resync_bytes: g(&self.resync_bytes),
            resync_compared_bytes: g(&self.resync_compared_bytes),
            full_resyncs: g(&self.full_resyncs),
            replica_set_changes: g(&self.replica_set_changes),
            replica_set_answers: g(&self.replica_set_answers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            node_id: node.to_owned(),
            address: format!("{node}:7401"),
            local: false,
            state,
        }
    }

    fn status(replicas: Vec<ReplicaStatus>) -> EngineStatus {
        let in_sync = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .count();
        EngineStatus {
            volume_id: "v".to_owned(),
            epoch: 1,
            size: 1 << 30,
            quorum: 2,
            in_sync,
            below_quorum: in_sync < 2,
            fenced: false,
            closed: false,
            reconciled_at_open: Default::default(),
            inflight_ops: 0,
            counters: EngineCounters::default(),
            replicas,
        }
    }

    #[test]
    fn the_condition_says_how_far_a_resync_got() {
        let resyncing = |done_bytes, total_bytes| ReplicaState::Resyncing {
            since: SystemTime::UNIX_EPOCH,
            done_bytes,
            total_bytes,
            full: true,
        };
        let st = status(vec![
            replica("node-a", ReplicaState::InSync),
            replica("node-b", ReplicaState::InSync),
            replica("node-c", resyncing(43 << 20, 100 << 20)),
        ]);
        assert_eq!(
            st.condition(),
            (
                true,
                "degraded: 2 of 3 replicas in sync; node-c resyncing 43 %".to_owned()
            )
        );
        // Not planned yet: no percentage; all of it compared is 100 %.
        let st = status(vec![
            replica("node-a", ReplicaState::InSync),
            replica("node-b", resyncing(0, 0)),
            replica("node-c", resyncing(7, 7)),
        ]);
        assert_eq!(
            st.condition().1,
            "below quorum: 1 of 3 replicas in sync, 2 needed (node-b resyncing, node-c resyncing 100 %)"
        );
    }
}
