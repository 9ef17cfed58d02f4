//! One volume's copy: attempts with backoff until the volume holds the merged snapshot.
//!
//! An attempt opens `ReadSnapshotBlocks` on every holder for `[done_bytes, size)`
//! ([`HolderSet`]: a majority of the source's replication factor must answer), then
//! walks the chunk grid: per window it waits until every answering holder has said
//! whether it has a chunk there, plans the window's store operations by the copy's
//! mode, and applies them to the new volume at background priority:
//!
//! * a volume that starts empty gets the full copy ([`FullCopy`]): data streams,
//!   merged, every kept block written with [`COPY_SEQ`](super::COPY_SEQ), or for a
//!   rebuild (the holders' heads) with the seq it carries, trims included;
//! * a volume whose base shares this daemon's sealed layers (`copy.shared_layers`)
//!   gets the reconcile ([`Reconcile`]): versions-only streams compared with the local
//!   versions, and only the blocks that differ fixed.
//!
//! Every [`CopyConfig::checkpoint_bytes`] or [`CopyConfig::checkpoint_interval`] the
//! store is flushed and only then `done_bytes` is recorded, so what the record claims
//! is durable; after a crash the copy resumes there and redoes at most the windows
//! since (each mode makes a redone window end up the same).
//!
//! Any failure ends the attempt without writing a partial plan of the current window:
//! the error is recorded as `last_error` and the next attempt starts after an
//! exponential backoff. The task ends when the copy completes, the volume is deleted
//! or replaced, or it is cancelled.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

use super::error::CopyError;
use super::full::FullCopy;
use super::holders::{HolderSet, Quorum};
use super::ops::{self, Ops};
use super::reconcile::Reconcile;
use super::{CopyConfig, LiveProgress};
use crate::block_io::BLOCK_SIZE;
use crate::catalog::{majority, Catalog, CatalogError};
use crate::control_proto as proto;
use crate::record::{CopyProgress, CopySource};
use crate::snapshot_read::ChunkGrid;
use crate::store::{IoPriority, LayeredStore};

use super::throttle::Bandwidth;

const MIB: f64 = (1u64 << 20) as f64;

/// Everything one volume's copy task needs.
pub(super) struct CopyJob {
    pub catalog: Arc<Catalog>,
    pub volume_id: String,
    /// The store the copy fills; the task stops if the volume no longer lives in it.
    pub store: Arc<LayeredStore>,
    pub config: CopyConfig,
    pub bandwidth: Option<Arc<Bandwidth>>,
    pub live: Arc<LiveProgress>,
    pub cancel: watch::Receiver<bool>,
}

/// How an attempt ended without an error.
enum Ended {
    Complete,
    Cancelled,
}

/// An attempt's failure, and how far it got: every window before `done` was planned
/// whole and applied, so it can still be recorded (after a flush).
struct Failed {
    error: CopyError,
    done: u64,
    progressed: bool,
}

/// What an attempt does with each window (module doc).
enum Mode {
    Full(FullCopy),
    Reconcile(Reconcile),
}

/// Runs the copy until it completes, the volume goes, or the task is cancelled.
pub(super) async fn run(mut job: CopyJob) {
    let mut backoff = job.config.backoff_min;
    let started = Instant::now();
    let mut started_at: Option<u64> = None;
    loop {
        if job.cancelled() {
            return;
        }
        let Some((source, progress)) = job.pending() else {
            return;
        };
        let first_done = *started_at.get_or_insert(progress.done_bytes);
        match attempt(&mut job, &source, &progress).await {
            Ok(Ended::Cancelled) => return,
            Ok(Ended::Complete) => {
                job.log_complete(&source, &progress, first_done, started);
                return;
            }
            Err(Failed {
                error,
                done,
                progressed,
            }) => {
                if progressed {
                    backoff = job.config.backoff_min;
                }
                job.live.retries.fetch_add(1, Ordering::Relaxed);
                let message = error.to_string();
                warn!(volume_id = %job.volume_id, kind = source.kind(), error = %message,
                    retry_in = ?backoff, "{} attempt failed; retrying", what(&source));
                let keep = if progressed { done } else { 0 };
                if !job.record_error(keep, message).await {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = job.cancel.changed() => return,
                }
                backoff = (backoff * 2).min(job.config.backoff_max);
            }
        }
    }
}

impl CopyJob {
    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// The copy source and durable progress, if the copy is still this task's to do.
    fn pending(&self) -> Option<(CopySource, CopyProgress)> {
        let target = match self.catalog.copy_target(&self.volume_id) {
            Ok(t) if Arc::ptr_eq(&t.store, &self.store) => t,
            _ => {
                info!(volume_id = %self.volume_id, "copy stopped: the volume was deleted");
                return None;
            }
        };
        target
            .record
            .pending_copy()
            .map(|(s, p)| (s.clone(), p.clone()))
    }

    /// Logs the completion, with how much data this task fetched: for a copy over
    /// shared layers that is the measure of how far the sealed copies differed.
    fn log_complete(
        &self,
        source: &CopySource,
        progress: &CopyProgress,
        first_done: u64,
        started: Instant,
    ) {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let fetched = self.live.fetched.load(Ordering::Relaxed);
        let fetched_blocks = fetched / BLOCK_SIZE;
        let fixed_blocks = self.live.fixed_blocks.load(Ordering::Relaxed);
        if progress.shared_layers {
            info!(
                volume_id = %self.volume_id,
                snapshot_id = %source.snapshot_id,
                bytes = source.size_bytes,
                fetched_blocks,
                fixed_blocks,
                seconds = format!("{secs:.1}"),
                "copy complete from shared layers; fetched {fetched_blocks} blocks, fixed \
                 {fixed_blocks}; the volume is served from now on"
            );
            return;
        }
        let copied = source.size_bytes.saturating_sub(first_done);
        let served = if source.rebuild {
            "the replica is served from now on and in sync once an engine resynced it"
        } else {
            "the volume is served from now on"
        };
        info!(
            volume_id = %self.volume_id,
            kind = source.kind(),
            snapshot_id = %source.snapshot_id,
            bytes = source.size_bytes,
            copied_bytes = copied,
            fetched_blocks,
            seconds = format!("{secs:.1}"),
            mib_per_s = format!("{:.1}", copied as f64 / MIB / secs),
            "{} complete; {served}", what(source)
        );
    }

    /// Records progress durably (blocking pool); `Ok(false)` when the volume is gone.
    async fn update(
        &self,
        f: impl FnOnce(&mut CopyProgress) + Send + 'static,
    ) -> Result<bool, CopyError> {
        let catalog = Arc::clone(&self.catalog);
        let store = Arc::clone(&self.store);
        let id = self.volume_id.clone();
        match blocking(move || catalog.update_copy_progress(&id, &store, f)).await? {
            Ok(_) => Ok(true),
            Err(CatalogError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `message` as `last_error`, with the progress up to `done` when that is
    /// past the durable one and a flush makes it so; false when the volume is gone.
    async fn record_error(&self, done: u64, message: String) -> bool {
        let flushed = done > 0 && matches!(self.flush().await, Ok(()));
        let update = move |p: &mut CopyProgress| {
            if flushed {
                p.done_bytes = p.done_bytes.max(done);
            }
            p.last_error = message;
        };
        match self.update(update).await {
            Ok(alive) => alive,
            Err(e) => {
                warn!(volume_id = %self.volume_id, error = %e, "cannot record the copy error");
                true
            }
        }
    }

    /// Flushes the new volume's store (background I/O).
    async fn flush(&self) -> Result<(), CopyError> {
        self.store.flush_async(IoPriority::Background).await?;
        Ok(())
    }

    /// Flushes the store, then records `done` as durable progress.
    async fn checkpoint(&self, done: u64) -> Result<bool, CopyError> {
        self.flush().await?;
        self.update(move |p| {
            p.done_bytes = p.done_bytes.max(done);
            p.last_error.clear();
        })
        .await
    }

    /// Applies a window's operations to the new volume and counts what they hold.
    async fn apply(&self, ops: Ops) -> Result<(), CopyError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (bytes, blocks) = (ops.data_bytes(), ops.blocks());
        ops::apply(&self.store, ops).await?;
        self.live.fetched.fetch_add(bytes, Ordering::Relaxed);
        self.live.fixed_blocks.fetch_add(blocks, Ordering::Relaxed);
        Ok(())
    }
}

/// What the logs call a copy: "rebuild" for a rebuild (what an operator looks for
/// after replacing a replica), "copy" for restores and clones.
fn what(source: &CopySource) -> &'static str {
    if source.rebuild {
        "rebuild"
    } else {
        "copy"
    }
}

/// Runs blocking work (record I/O, versioned reads, range queries) off the runtime's
/// threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CopyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CopyError::Task(e.to_string()))
}

async fn attempt(
    job: &mut CopyJob,
    source: &CopySource,
    progress: &CopyProgress,
) -> Result<Ended, Failed> {
    let total = source.size_bytes;
    let mut done = progress.done_bytes.min(total);
    let start_done = done;
    job.live.done.store(done, Ordering::Relaxed);
    job.live.total.store(total, Ordering::Relaxed);
    // Start and resume are logged once per task; retries already logged their cause.
    if done < total && job.live.retries.load(Ordering::Relaxed) == 0 {
        let verb = if done == 0 { "started" } else { "resumed" };
        info!(volume_id = %job.volume_id, kind = source.kind(),
            snapshot_id = %source.snapshot_id, source_volume_id = %source.source_volume_id,
            holders = source.holders.len(), shared_layers = progress.shared_layers,
            total_bytes = total, done_bytes = done, "{} {verb}", what(source));
    }
    let walked = if done < total {
        walk(job, source, progress.shared_layers, &mut done).await
    } else {
        Ok(true)
    };
    let ended = match walked {
        Ok(true) => finish(job, total).await,
        Ok(false) => Ok(Ended::Cancelled),
        Err(e) => Err(e),
    };
    ended.map_err(|error| Failed {
        error,
        done,
        progressed: done > start_done,
    })
}

/// Walks the grid from `done` to the end, window by window, advancing `done` as
/// windows are applied; `Ok(false)` when cancelled or the volume went away.
async fn walk(
    job: &mut CopyJob,
    source: &CopySource,
    shared_layers: bool,
    done: &mut u64,
) -> Result<bool, CopyError> {
    let total = source.size_bytes;
    let quorum = Quorum {
        listed: source.holders.len(),
        needed: majority(source.source_replication_factor),
    };
    let request = proto::ReadSnapshotBlocksRequest {
        volume_id: source.source_volume_id.clone(),
        snapshot_id: source.snapshot_id.clone(),
        offset: *done,
        length: total - *done,
        seqs_only: shared_layers,
    };
    let mut holders = HolderSet::open(
        &source.holders,
        quorum,
        request,
        &job.config,
        job.bandwidth.clone(),
        &job.volume_id,
    )
    .await?;
    let mode = if shared_layers {
        Mode::Reconcile(Reconcile::new(source, quorum))
    } else {
        Mode::Full(FullCopy::prepare(&job.store, *done, total, source.rebuild).await?)
    };

    let grid = ChunkGrid::of_request(*done, total - *done);
    let mut pos = grid.start_block;
    let mut last_checkpoint = (*done, Instant::now());
    let mut decile = done.saturating_mul(10) / total.max(1);
    while pos < grid.end_block {
        if job.cancelled() {
            return Ok(false);
        }
        let idle = job.config.idle_timeout;
        let Some(window) = holders
            .next_window(pos, idle, &mut job.cancel, &job.volume_id)
            .await?
        else {
            return Ok(false);
        };
        let next = window.first() + window.len();
        let ops = match &mode {
            Mode::Full(full) => full.plan(window, holders.every_answered())?,
            Mode::Reconcile(reconcile) => match reconcile.plan(job, &holders, window).await? {
                Some(ops) => ops,
                None => return Ok(false),
            },
        };
        job.apply(ops).await?;
        pos = next;
        *done = pos * BLOCK_SIZE;
        job.live.done.store(*done, Ordering::Relaxed);

        let now_decile = done.saturating_mul(10) / total;
        if now_decile > decile && *done < total {
            decile = now_decile;
            info!(volume_id = %job.volume_id, kind = source.kind(), percent = now_decile * 10,
                done_bytes = *done, total_bytes = total, "{} progress", what(source));
        }
        if *done - last_checkpoint.0 >= job.config.checkpoint_bytes
            || last_checkpoint.1.elapsed() >= job.config.checkpoint_interval
        {
            if !job.checkpoint(*done).await? {
                return Ok(false);
            }
            last_checkpoint = (*done, Instant::now());
        }
    }
    Ok(true)
}

/// The end: everything flushed, then the record says complete.
async fn finish(job: &CopyJob, total: u64) -> Result<Ended, CopyError> {
    job.flush().await?;
    let alive = job
        .update(move |p| {
            p.done_bytes = total;
            p.complete = true;
            p.last_error.clear();
        })
        .await?;
    if !alive {
        return Ok(Ended::Cancelled);
    }
    job.live.done.store(total, Ordering::Relaxed);
    Ok(Ended::Complete)
}
