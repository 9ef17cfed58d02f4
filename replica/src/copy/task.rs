//! One volume's copy: attempts with backoff until the volume holds the merged snapshot.
//!
//! An attempt opens `ReadSnapshotBlocks` on every holder for `[done_bytes, size)`,
//! needs a majority of the source's replication factor to answer, then walks the
//! chunk grid: per window it waits until every answering holder has said whether it
//! has a chunk there, merges ([`SnapshotMerger`]), and writes the kept data blocks
//! into the new volume with [`COPY_SEQ`] at background priority. Windows nobody has a
//! chunk for are skipped. Every [`CopyConfig::checkpoint_bytes`] or
//! [`CopyConfig::checkpoint_interval`] the store is flushed and only then `done_bytes`
//! is recorded, so what the record claims is durable; after a crash the copy resumes
//! there and rewrites at most the blocks since (rewriting is harmless, and blocks the
//! earlier attempt wrote that the new merge leaves empty are trimmed).
//!
//! Any failure ends the attempt without writing a partial merge of the current window:
//! the error is recorded as `last_error` and the next attempt starts after an
//! exponential backoff. The task ends when the copy completes, the volume is deleted
//! or replaced, or it is cancelled.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

use super::error::CopyError;
use super::merge::{Chosen, SnapshotMerger};
use super::source::{self, HolderEvent, HolderReader};
use super::{CopyConfig, LiveProgress};
use crate::block_io::BLOCK_SIZE;
use crate::catalog::{majority, Catalog, CatalogError};
use crate::control_proto as proto;
use crate::record::{CopyProgress, CopySource};
use crate::snapshot_read::ChunkGrid;
use crate::store::{with_io_priority, IoPriority, LayeredStore};

use super::throttle::Bandwidth;

/// Seq of every block a copy writes: older than any write of an engine of the new
/// volume (seq >= 1 << 40 from its first publish on), so the copy never hides one.
pub const COPY_SEQ: u64 = 1;

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

/// An attempt's failure, and how far it got: every window before `done` was merged
/// whole and written, so it can still be recorded (after a flush).
struct Failed {
    error: CopyError,
    done: u64,
    progressed: bool,
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
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                let copied = source.size_bytes.saturating_sub(first_done);
                info!(
                    volume_id = %job.volume_id,
                    snapshot_id = %source.snapshot_id,
                    bytes = source.size_bytes,
                    copied_bytes = copied,
                    seconds = format!("{secs:.1}"),
                    mib_per_s = format!("{:.1}", copied as f64 / MIB / secs),
                    "copy complete; the volume is served from now on"
                );
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
                warn!(volume_id = %job.volume_id, error = %message, retry_in = ?backoff,
                    "copy attempt failed; retrying");
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
        let store = Arc::clone(&self.store);
        let flushed = done > 0
            && matches!(
                blocking(move || with_io_priority(IoPriority::Background, || store.flush())).await,
                Ok(Ok(()))
            );
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

    /// Flushes the store, then records `done` as durable progress.
    async fn checkpoint(&self, done: u64) -> Result<bool, CopyError> {
        let store = Arc::clone(&self.store);
        blocking(move || with_io_priority(IoPriority::Background, || store.flush())).await??;
        self.update(move |p| {
            p.done_bytes = p.done_bytes.max(done);
            p.last_error.clear();
        })
        .await
    }
}

/// Runs blocking work (store and record I/O) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CopyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CopyError::Task(e.to_string()))
}

/// One holder during an attempt.
struct Holder {
    reader: HolderReader,
    /// Its next chunk, not merged yet.
    peek: Option<crate::store::VersionedBlocks>,
    ended: bool,
    failed: Option<String>,
}

impl Holder {
    fn live(&self) -> bool {
        self.failed.is_none()
    }
}

async fn attempt(
    job: &mut CopyJob,
    source: &CopySource,
    progress: &CopyProgress,
) -> Result<Ended, Failed> {
    let total = source.size_bytes;
    let mut done = progress.done_bytes.min(total);
    let start_done = done;
    let fail = |error: CopyError, done: u64| Failed {
        error,
        done,
        progressed: done > start_done,
    };
    job.live.done.store(done, Ordering::Relaxed);
    job.live.total.store(total, Ordering::Relaxed);
    // Start and resume are logged once per task; retries already logged their cause.
    if done < total && job.live.retries.load(Ordering::Relaxed) == 0 {
        let verb = if done == 0 {
            "copy started"
        } else {
            "copy resumed"
        };
        info!(volume_id = %job.volume_id, snapshot_id = %source.snapshot_id,
            source_volume_id = %source.source_volume_id, clone = source.clone,
            holders = source.holders.len(), total_bytes = total, done_bytes = done, "{verb}");
    }

    let needed = majority(source.source_replication_factor);
    let request = proto::ReadSnapshotBlocksRequest {
        volume_id: source.source_volume_id.clone(),
        snapshot_id: source.snapshot_id.clone(),
        offset: done,
        length: total - done,
    };
    let mut holders = Vec::new();
    let mut errors = Vec::new();
    if done < total {
        // Dialled concurrently: one unreachable holder costs one timeout, not one each.
        let opens: Vec<_> = source
            .holders
            .iter()
            .map(|h| {
                tokio::spawn(source::open(
                    h.clone(),
                    request.clone(),
                    job.config.connect_timeout,
                    job.bandwidth.clone(),
                ))
            })
            .collect();
        for (holder, opened) in source.holders.iter().zip(opens) {
            let opened = opened.await.unwrap_or_else(|e| {
                Err(format!("{}: dialling failed: {e}", source::label(holder)))
            });
            match opened {
                Ok(reader) => holders.push(Holder {
                    reader,
                    peek: None,
                    ended: false,
                    failed: None,
                }),
                Err(e) => errors.push(e),
            }
        }
        if holders.len() < needed {
            return Err(fail(
                CopyError::TooFewHolders {
                    answered: holders.len(),
                    holders: source.holders.len(),
                    needed,
                    errors: errors.join("; "),
                },
                done,
            ));
        }
        for e in &errors {
            warn!(volume_id = %job.volume_id, error = %e, "holder unavailable; copying from the others");
        }
    }
    let all_answered = errors.is_empty();

    // Blocks an earlier (crashed) attempt may have written past `done`.
    let stale = {
        let store = Arc::clone(&job.store);
        let ranges = blocking(move || store.allocated_ranges(None))
            .await
            .map_err(|e| fail(e, done))?
            .map_err(|e| fail(e.into(), done))?;
        clip(ranges, done, total)
    };

    let grid = ChunkGrid::of_request(done, total - done);
    let end = grid.end_block;
    let mut pos = grid.start_block;
    let mut last_checkpoint = (done, Instant::now());
    let mut decile = done.saturating_mul(10) / total.max(1);
    while pos < end {
        if job.cancelled() {
            return Ok(Ended::Cancelled);
        }
        // Every live holder must say whether it has a chunk before a window is merged.
        for h in holders.iter_mut() {
            if !h.live() || h.ended || h.peek.is_some() {
                continue;
            }
            let event = tokio::select! {
                ev = h.reader.next(job.config.idle_timeout) => ev,
                _ = job.cancel.changed() => return Ok(Ended::Cancelled),
            };
            match event {
                HolderEvent::Chunk(c) => h.peek = Some(c),
                HolderEvent::End => h.ended = true,
                HolderEvent::Failed(e) => {
                    warn!(volume_id = %job.volume_id, holder = %h.reader.label, error = %e,
                        done_bytes = pos * BLOCK_SIZE, "holder dropped from the copy");
                    h.failed = Some(format!("{}: {e}", h.reader.label));
                }
            }
        }
        let live = holders.iter().filter(|h| h.live()).count();
        if live < needed {
            let lost: Vec<String> = holders
                .iter()
                .filter_map(|h| h.failed.clone())
                .chain(errors.iter().cloned())
                .collect();
            return Err(fail(
                CopyError::TooFewHolders {
                    answered: live,
                    holders: source.holders.len(),
                    needed,
                    errors: lost.join("; "),
                },
                done,
            ));
        }
        let next = holders
            .iter()
            .filter(|h| h.live())
            .filter_map(|h| h.peek.as_ref().map(|c| c.first_block()))
            .min()
            .unwrap_or(end);
        let (window, len) = if next > pos {
            // Nobody has anything in [pos, next): only stale blocks need clearing.
            (pos, next - pos)
        } else {
            (pos, grid.slot_len(pos).map_or(0, |n| n as u64))
        };
        if len == 0 {
            return Err(fail(
                CopyError::Task(format!("block {pos} is off the chunk grid")),
                done,
            ));
        }
        let ops = if next > pos {
            trims(&stale, window, window + len)
        } else {
            let taken: Vec<Option<crate::store::VersionedBlocks>> = holders
                .iter_mut()
                .filter(|h| h.live())
                .map(|h| match &h.peek {
                    Some(c) if c.first_block() == window => h.peek.take(),
                    _ => None,
                })
                .collect();
            let copies: Vec<Option<&crate::store::VersionedBlocks>> =
                taken.iter().map(Option::as_ref).collect();
            let every = all_answered && holders.iter().all(Holder::live);
            let merged = SnapshotMerger::new(every)
                .merge(window, len as usize, &copies)
                .map_err(|e| fail(e.into(), done))?;
            plan(window, &merged, &stale)
        };
        if !ops.is_empty() {
            let store = Arc::clone(&job.store);
            blocking(move || apply(&store, ops))
                .await
                .map_err(|e| fail(e, done))?
                .map_err(|e| fail(e.into(), done))?;
        }
        pos = window + len;
        done = pos * BLOCK_SIZE;
        job.live.done.store(done, Ordering::Relaxed);

        let now_decile = done.saturating_mul(10) / total;
        if now_decile > decile && done < total {
            decile = now_decile;
            info!(volume_id = %job.volume_id, percent = now_decile * 10, done_bytes = done,
                total_bytes = total, "copy progress");
        }
        if done - last_checkpoint.0 >= job.config.checkpoint_bytes
            || last_checkpoint.1.elapsed() >= job.config.checkpoint_interval
        {
            match job.checkpoint(done).await {
                Ok(true) => last_checkpoint = (done, Instant::now()),
                Ok(false) => return Ok(Ended::Cancelled),
                Err(e) => return Err(fail(e, done)),
            }
        }
    }
    drop(holders);
    // The end: everything flushed, then the record says complete.
    let store = Arc::clone(&job.store);
    blocking(move || with_io_priority(IoPriority::Background, || store.flush()))
        .await
        .map_err(|e| fail(e, done))?
        .map_err(|e| fail(e.into(), done))?;
    match job
        .update(move |p| {
            p.done_bytes = total;
            p.complete = true;
            p.last_error.clear();
        })
        .await
    {
        Ok(true) => {
            job.live.done.store(total, Ordering::Relaxed);
            Ok(Ended::Complete)
        }
        Ok(false) => Ok(Ended::Cancelled),
        Err(e) => Err(fail(e, done)),
    }
}

/// One store operation of a window.
#[derive(Debug, PartialEq, Eq)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Trim { offset: u64, len: u64 },
}

/// Block ranges of `ranges` (bytes) within `[from, to)` bytes.
fn clip(ranges: Vec<Range<u64>>, from: u64, to: u64) -> Vec<Range<u64>> {
    ranges
        .into_iter()
        .filter_map(|r| {
            let start = r.start.max(from);
            let end = r.end.min(to);
            (start < end).then_some(start / BLOCK_SIZE..end / BLOCK_SIZE)
        })
        .collect()
}

/// Trims of the stale blocks within blocks `[from, to)`.
fn trims(stale: &[Range<u64>], from: u64, to: u64) -> Vec<Op> {
    stale
        .iter()
        .filter_map(|r| {
            let start = r.start.max(from);
            let end = r.end.min(to);
            (start < end).then(|| Op::Trim {
                offset: start * BLOCK_SIZE,
                len: (end - start) * BLOCK_SIZE,
            })
        })
        .collect()
}

/// The writes (runs of kept data) and trims (stale blocks the merge leaves empty) of a
/// merged window.
fn plan(first: u64, merged: &[Chosen<'_>], stale: &[Range<u64>]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut i = 0;
    while i < merged.len() {
        let is_data = matches!(merged[i], Chosen::Data { .. });
        let mut j = i + 1;
        while j < merged.len() && matches!(merged[j], Chosen::Data { .. }) == is_data {
            j += 1;
        }
        let (from, to) = (first + i as u64, first + j as u64);
        if is_data {
            let mut data = Vec::with_capacity((j - i) * BLOCK_SIZE as usize);
            for c in &merged[i..j] {
                if let Chosen::Data { bytes, .. } = c {
                    data.extend_from_slice(bytes);
                }
            }
            ops.push(Op::Write {
                offset: from * BLOCK_SIZE,
                data,
            });
        } else {
            ops.extend(trims(stale, from, to));
        }
        i = j;
    }
    ops
}

/// Applies a window's operations to the new volume, as background I/O.
fn apply(store: &LayeredStore, ops: Vec<Op>) -> Result<(), crate::store::StoreError> {
    with_io_priority(IoPriority::Background, || {
        for op in ops {
            match op {
                Op::Write { offset, data } => store.write(offset, &data, COPY_SEQ)?,
                Op::Trim { offset, len } => store.trim(offset, len, COPY_SEQ)?,
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn plans_data_runs_and_trims_only_stale_empty_blocks() {
        let a = vec![1u8; B as usize];
        let b = vec![2u8; B as usize];
        let merged = [
            Chosen::Data { seq: 3, bytes: &a },
            Chosen::Data { seq: 4, bytes: &b },
            Chosen::Unwritten,
            Chosen::Trimmed { seq: 9 },
            Chosen::Unwritten,
            Chosen::Data { seq: 1, bytes: &a },
        ];
        // Stale blocks 12..14 (block 14 is empty in the merge too; 15 gets data).
        let ops = plan(10, &merged, &[12..13, 13..16]);
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    offset: 10 * B,
                    data: [a.clone(), b].concat()
                },
                Op::Trim {
                    offset: 12 * B,
                    len: B
                },
                Op::Trim {
                    offset: 13 * B,
                    len: 2 * B
                },
                Op::Write {
                    offset: 15 * B,
                    data: a
                },
            ]
        );
        assert!(plan(0, &[Chosen::Unwritten], &[]).is_empty());
    }

    #[test]
    fn clip_keeps_the_part_still_to_copy() {
        assert_eq!(
            clip(
                vec![0..8 * B, 10 * B..12 * B, 20 * B..30 * B],
                4 * B,
                25 * B
            ),
            vec![4..8, 10..12, 20..25]
        );
    }

    #[test]
    fn stale_writes_past_done_are_cleared_when_the_merge_leaves_them_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create");
        store
            .write(2 * B, &vec![7u8; 2 * B as usize], COPY_SEQ)
            .expect("write");
        let stale = clip(store.allocated_ranges(None).expect("ranges"), 0, 8 * B);
        let kept = vec![5u8; B as usize];
        let merged = [
            Chosen::Unwritten,
            Chosen::Unwritten,
            Chosen::Data {
                seq: 9,
                bytes: &kept,
            },
        ];
        apply(&store, plan(1, &merged, &stale)).expect("apply");
        assert_eq!(store.read(2 * B, B).expect("read"), vec![0u8; B as usize]);
        assert_eq!(store.read(3 * B, B).expect("read"), kept);
        assert_eq!(store.block_seq(3).expect("seq"), Some(COPY_SEQ));
    }
}
