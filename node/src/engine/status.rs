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
        }
    }
}
