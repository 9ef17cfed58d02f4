//! Restore, clone and rebuild: populating a new volume from the sealed copies of a
//! snapshot that other replicas (the *holders*) keep, or, for a rebuild, a new replica
//! of a volume from the *heads* of its surviving replicas.
//!
//! A CreateVolume with a copy source creates a volume whose record carries the source
//! and `copy` progress; the data plane refuses the volume until the copy is complete.
//! The daemon runs one background task per incomplete copy, started right after the
//! create and, at daemon start, for every record whose copy is incomplete (it resumes
//! from the durable `done_bytes`). DeleteVolume stops the task.
//!
//! Why a merge and not a plain read: a snapshot is ready once a majority of the source
//! replicas sealed it, and the sealed copies differ only in writes that were in flight
//! when it was taken. Reading a majority of them sees every acknowledged write (write
//! majority ∩ read majority ≠ ∅); keeping the highest seq per block picks it. The
//! controller hands every target the same fixed majority (`holders`), so all targets
//! merge the same copies and agree.
//!
//! Two modes, chosen by the record's `copy.shared_layers`:
//!
//! * **Full copy** (the volume starts empty): stream every holder's data, merge, write
//!   every kept block.
//!
//! A **rebuild** (`CopySource.rebuild`, a replacement for a lost replica) is a full
//! copy of the holders' heads (`ReadSnapshotBlocks` without a snapshot id; the holders
//! keep writing meanwhile, and the copy does not follow them), merged the same way,
//! but it makes a replica like the others rather than a new volume: every kept block
//! keeps the seq it carries and every kept trim is written as a tombstone with its
//! seq, so engines reconcile and resync it by seq; a block an interrupted attempt
//! wrote where no holder has anything is *forgotten* (never written again), not
//! trimmed. It never shares layers, and its record starts at the volume's epoch.
//! * **Reconcile** (the volume's base is this daemon's own sealed layers of the
//!   snapshot, hard-linked at create: readable at once, nothing copied). The local
//!   copy is still only *one* sealed copy, and it may differ from the merge: it may
//!   lack an acknowledged write that landed on the other holders, or hold an
//!   unacknowledged one the merge does not keep (this daemon need not even be one of
//!   the listed holders). Serving it as is would make this replica disagree with the
//!   others. So the task streams only the holders' *versions* (`seqs_only`), compares
//!   them with the local versions, and fetches and writes data only for the blocks
//!   that differ (`compare`, `reconcile`). The comparison reads the local view
//!   head included and fixes keep the winner's seq, so a re-run after a crash only
//!   finds what is still missing. Versions are what metadata entries claim: damage
//!   an entry shows on its own (bad flags, a tombstone failing its checksum) is seen
//!   and fixed from the holders, but data rotted under an intact entry is not (that
//!   needs reading all data, which sharing exists to avoid); such a block fails its
//!   checksum when read, as a block damaged after any copy does, and the engine
//!   rewrites it from another replica.
//!
//! * [`merge`]: the pure per-block merge of the holders' chunks.
//! * `compare`: the pure comparison of the holders' versions with the local ones.
//! * `source`: one holder's `ReadSnapshotBlocks` stream, checked chunk by chunk.
//! * `holders`: all holders of a request in lockstep, window by window (quorum rule).
//! * `task`: one volume's attempts, grid walk, checkpoints and backoff (both modes).
//! * `full`, `reconcile`: what each mode does with a window; `ops`: the store
//!   operations a window ends in.
//! * [`throttle`]: `--copy-max-bandwidth`, shared by all copies.
//! * [`error`]: why an attempt failed (becomes `copy.last_error`).
//!
//! Progress is logged at start, resume, every 10 % and completion (with MiB/s, and the
//! blocks fetched: for a reconcile, how far the copies differed), and exported on
//! `/metrics` ([`CopyManager::running`]).

mod compare;
pub mod error;
mod full;
mod holders;
pub mod merge;
mod ops;
mod reconcile;
pub(crate) mod source;
mod task;
pub mod throttle;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::catalog::Catalog;
use crate::store::LayeredStore;

pub use error::CopyError;
pub use merge::{Chosen, MergeError, SnapshotMerger};
pub use ops::COPY_SEQ;
use tessera_tls::Transport;
pub use throttle::Bandwidth;

/// Tunables of the copies of one daemon.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// Bytes per second all copies together may receive; 0 = unlimited.
    pub max_bandwidth: u64,
    /// Flush and record progress at least every this many bytes copied...
    pub checkpoint_bytes: u64,
    /// ...and at least this often, so a throttled copy loses little on a crash.
    pub checkpoint_interval: Duration,
    /// Longest wait for a holder to connect and answer the request.
    pub connect_timeout: Duration,
    /// Longest wait for a holder's next chunk before it is dropped.
    pub idle_timeout: Duration,
    /// First retry delay after a failed attempt; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How holders are dialled: TLS with the daemon's replica certificate, or plain
    /// text (the default, for tests; the daemon sets what its flags chose).
    pub transport: Transport,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            max_bandwidth: 0,
            checkpoint_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            transport: Transport::plaintext(),
        }
    }
}

/// Live (not necessarily durable yet) progress of one copy, for `/metrics`.
#[derive(Debug, Default)]
pub struct LiveProgress {
    /// Bytes of the source merged and written so far.
    pub done: AtomicU64,
    /// Bytes to copy.
    pub total: AtomicU64,
    /// Failed attempts so far.
    pub retries: AtomicU64,
    /// Bytes of block data fetched from the holders and written: everything kept for
    /// a full copy, only the differing blocks for a reconcile (the measure of what
    /// sharing layers saved).
    pub fetched: AtomicU64,
    /// Blocks written or trimmed (for the completion log of a reconcile).
    pub fixed_blocks: AtomicU64,
}

/// A copy task the manager started.
struct Running {
    /// The store the task fills: a volume re-created under the same id is a new one.
    store: Arc<LayeredStore>,
    progress: Arc<LiveProgress>,
    cancel: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// Runs the copy tasks of one daemon: at most one per volume.
pub struct CopyManager {
    catalog: Arc<Catalog>,
    config: CopyConfig,
    bandwidth: Option<Arc<Bandwidth>>,
    tasks: Mutex<HashMap<String, Running>>,
}

impl std::fmt::Debug for CopyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyManager")
            .field("config", &self.config)
            .field("active", &self.active())
            .finish()
    }
}

impl CopyManager {
    /// A manager for the copies of `catalog`'s volumes.
    pub fn new(catalog: Arc<Catalog>, config: CopyConfig) -> Arc<CopyManager> {
        Arc::new(CopyManager {
            bandwidth: Bandwidth::limit(config.max_bandwidth),
            catalog,
            config,
            tasks: Mutex::new(HashMap::new()),
        })
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the copy of `volume_id` if its copy is incomplete and no task runs for
    /// it yet; returns whether one was started. Needs a tokio runtime.
    pub fn start(&self, volume_id: &str) -> bool {
        let Ok(target) = self.catalog.copy_target(volume_id) else {
            return false;
        };
        if target.record.pending_copy().is_none() {
            return false;
        }
        let mut tasks = self.tasks();
        if let Some(r) = tasks.get(volume_id) {
            if Arc::ptr_eq(&r.store, &target.store) && !r.handle.is_finished() {
                return false;
            }
            // A finished task, or one for a deleted incarnation of the id.
            let _ = r.cancel.send(true);
        }
        let (cancel, cancel_rx) = watch::channel(false);
        let progress = Arc::new(LiveProgress::default());
        let job = task::CopyJob {
            catalog: Arc::clone(&self.catalog),
            volume_id: volume_id.to_string(),
            store: Arc::clone(&target.store),
            config: self.config.clone(),
            bandwidth: self.bandwidth.clone(),
            live: Arc::clone(&progress),
            cancel: cancel_rx,
        };
        let handle = tokio::spawn(task::run(job));
        tasks.insert(
            volume_id.to_string(),
            Running {
                store: target.store,
                progress,
                cancel,
                handle,
            },
        );
        true
    }

    /// Starts the copy of every volume whose copy is incomplete (daemon start).
    pub fn resume_all(&self) -> usize {
        let ids = self.catalog.pending_copies();
        let started = ids.iter().filter(|id| self.start(id)).count();
        if started > 0 {
            info!(copies = started, "resuming incomplete copies");
        }
        started
    }

    /// Stops the task of `volume_id` once the volume is gone (after DeleteVolume) and
    /// waits for it, so nothing of the copy runs after the delete answered. A task for
    /// a volume that still lives in the store it fills is left running.
    pub async fn stop(&self, volume_id: &str) {
        let running = {
            let mut tasks = self.tasks();
            let live_store = self.catalog.copy_target(volume_id).ok().map(|t| t.store);
            match tasks.get(volume_id) {
                Some(r) if live_store.is_some_and(|s| Arc::ptr_eq(&s, &r.store)) => None,
                Some(_) => tasks.remove(volume_id),
                None => None,
            }
        };
        if let Some(r) = running {
            let _ = r.cancel.send(true);
            let _ = r.handle.await;
            info!(volume_id, "copy task stopped");
        }
    }

    /// Stops every task (clean shutdown) and waits for them.
    pub async fn stop_all(&self) {
        let all: Vec<Running> = self.tasks().drain().map(|(_, r)| r).collect();
        for r in &all {
            let _ = r.cancel.send(true);
        }
        for r in all {
            let _ = r.handle.await;
        }
    }

    /// Copy tasks running now.
    pub fn active(&self) -> usize {
        self.tasks()
            .values()
            .filter(|r| !r.handle.is_finished())
            .count()
    }

    /// The live progress of every running copy, ordered by volume id (for `/metrics`).
    pub fn running(&self) -> Vec<(String, Arc<LiveProgress>)> {
        let mut running: Vec<(String, Arc<LiveProgress>)> = self
            .tasks()
            .iter()
            .filter(|(_, r)| !r.handle.is_finished())
            .map(|(id, r)| (id.clone(), Arc::clone(&r.progress)))
            .collect();
        running.sort_by(|a, b| a.0.cmp(&b.0));
        running
    }
}
