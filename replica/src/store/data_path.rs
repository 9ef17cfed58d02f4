//! The store's data path: read, write, trim, flush (the versioned reads in `versioned`
//! follow the same pattern). The async methods are the implementation; the blocking
//! ones park the calling thread on the very same futures ([`crate::park::block_on`]),
//! so both have one behaviour, one lock protocol and one way to pass priority (a
//! parameter).
//!
//! Why async: a data-plane request awaits its scheduled disk I/O in its own task,
//! without a blocking thread per request (which cost a hop task → blocking pool →
//! io_uring thread → back, several thread switches per 4 KiB).
//!
//! On-disk effects and ordering are those of the module doc of [`super`]: data
//! before its entry, entry before the index; tombstones before the hole; data file
//! synced before the meta file.
//!
//! * *Locks.* An operation holds the gate shared from start to end (every chain change
//!   takes it exclusively first) and its blocks' stripes, all tokio locks that blocking
//!   callers take by parking (`locks` module). The chain's `std` lock is only held for
//!   the moment it takes to look at the chain, never across an I/O.
//! * *Inline meta I/O.* Meta entries are read and written with `pread`/`pwrite` on the
//!   page cache in the calling task (their [`FileIo`](super::FileIo) is finished when
//!   returned): a short system call, not worth a thread hop. Only data-file requests
//!   (and syncs) wait.
//! * *Cancellation.* Dropping a read or flush future is harmless (a cancelled flush
//!   leaves the layer dirty); a trim writes its tombstones before it waits for
//!   anything but its locks. A write dropped between its data and its entry would
//!   leave a torn block, so [`LayeredStore::write_async`] (and
//!   [`LayeredStore::write_versions_async`]) runs in a task of its own that finishes
//!   even when the caller's future is dropped.
//! * *Where the blocking methods may run.* On threads whose own work nothing they
//!   wait for depends on: the blocking pool, plain threads. Never on a data-plane shard
//!   thread (only it reaps its ring), nor on a runtime worker whose tasks they would
//!   wait for.

use std::future::Future;
use std::io;
use std::sync::Arc;

use super::file::IoPriority;
use super::format::{Entry, Verdict, FLAG_TRIMMED};
use super::layer::Layer;
use super::locks::StripeWrite;
use super::{check_range, LayeredStore, StoreError, WriteOutcome, BS};
use crate::block_io::BLOCK_SIZE;
use crate::park::block_on;

/// The blocking API: foreground waits on the async implementation.
impl LayeredStore {
    /// Reads `len` bytes at `offset` of the volume; never-written and trimmed blocks
    /// read as zeros.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        block_on(self.read_view(IoPriority::Foreground, None, offset, len))
    }

    /// Reads `len` bytes at `offset` of a snapshot, as the volume was when it was taken.
    pub fn read_snapshot(
        &self,
        snapshot_id: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreError> {
        block_on(self.read_view(IoPriority::Foreground, Some(snapshot_id), offset, len))
    }

    /// Writes `data` at `offset` into the head, tagged with `seq`; durable after
    /// [`Self::flush`].
    pub fn write(&self, offset: u64, data: &[u8], seq: u64) -> Result<(), StoreError> {
        block_on(self.write_now(IoPriority::Foreground, offset, data, Seqs::One(seq)))
    }

    /// Writes each block of `data` only where the volume's current version of that
    /// block is older than `seq`, missing, or damaged: the primitive of resync and
    /// rebuild, which must never replace a newer write with an older copy.
    pub fn write_if_newer(
        &self,
        offset: u64,
        data: &[u8],
        seq: u64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        block_on(self.write_where_newer(IoPriority::Foreground, offset, data, seq))
    }

    /// Trims each block of `len` bytes at `offset` only where the volume's current
    /// version of that block is older than `seq`, missing, or damaged (the rule of
    /// [`Self::write_if_newer`]); a trimmed block is as after [`Self::trim`]: zeros,
    /// `seq` kept in its tombstone, its space in the head freed.
    pub fn trim_if_newer(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        block_on(self.trim_where_newer(IoPriority::Foreground, offset, len, seq))
    }

    /// Discards `len` bytes at `offset`: they read as zeros (hiding any older layer's
    /// data), keep `seq` as their version, and their space in the head is freed.
    pub fn trim(&self, offset: u64, len: u64, seq: u64) -> Result<(), StoreError> {
        block_on(self.trim_async(IoPriority::Foreground, offset, len, seq))
    }

    /// Removes the head's own version of `len` bytes at `offset` (see
    /// [`Self::forget_async`]).
    pub fn forget(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        block_on(self.forget_async(IoPriority::Foreground, offset, len))
    }

    /// Makes every write and trim completed before the call durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        block_on(self.flush_async(IoPriority::Foreground))
    }

    /// The seq of the current version of `block` (a write or a trim), `None` if it was
    /// never written; resync compares these across replicas.
    pub fn block_seq(&self, block: u64) -> Result<Option<u64>, StoreError> {
        block_on(self.block_seq_async(IoPriority::Foreground, block))
    }
}

/// The async API, the implementation.
impl LayeredStore {
    /// [`Self::read`] for async callers, at `priority`.
    pub async fn read_async(
        &self,
        priority: IoPriority,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreError> {
        self.read_view(priority, None, offset, len).await
    }

    /// Reads the head (`None`) or a snapshot's view.
    async fn read_view(
        &self,
        priority: IoPriority,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let _gate = self.locks.gate_shared().await;
        let (layers, size) = self.view_layers(snapshot)?;
        let (first, n) = check_range(offset, len, size)?;
        let buf_len =
            usize::try_from(len).map_err(|_| StoreError::OutOfRange { offset, len, size })?;
        let mut out = vec![0u8; buf_len];
        let _stripes = self.locks.shared(first, n).await;
        let end = first + n;
        let mut b = first;
        while b < end {
            let here = owner(&layers, b);
            let mut run_end = b + 1;
            while run_end < end && owner(&layers, run_end) == here {
                run_end += 1;
            }
            if let Some(i) = here {
                let lo = ((b - first) * BLOCK_SIZE) as usize;
                let hi = ((run_end - first) * BLOCK_SIZE) as usize;
                read_verified(&layers[i], priority, b, &mut out[lo..hi]).await?;
            }
            b = run_end;
        }
        Ok(out)
    }

    /// The layers of the head's (`None`) or a snapshot's view, base first, and its
    /// size. Call with the gate held: it keeps them the view's until released.
    pub(super) fn view_layers(
        &self,
        snapshot: Option<&str>,
    ) -> Result<(Vec<Arc<Layer>>, u64), StoreError> {
        let state = self.state_read();
        let (top, size) = state.view(snapshot)?;
        let layers = state.layers[..=top]
            .iter()
            .map(|s| Arc::clone(&s.layer))
            .collect();
        Ok((layers, size))
    }

    /// [`Self::block_seq`] at `priority`.
    async fn block_seq_async(
        &self,
        priority: IoPriority,
        block: u64,
    ) -> Result<Option<u64>, StoreError> {
        let _gate = self.locks.gate_shared().await;
        let (layers, size) = self.view_layers(None)?;
        check_range(block.saturating_mul(BLOCK_SIZE), BLOCK_SIZE, size)?;
        let _stripes = self.locks.shared(block, 1).await;
        let Some(i) = owner(&layers, block) else {
            return Ok(None);
        };
        match check_block(&layers[i], priority, block).await? {
            (Verdict::Corrupt, _) => Err(StoreError::Corrupt {
                layer: layers[i].id,
                block,
            }),
            (_, seq) => Ok(Some(seq)),
        }
    }

    /// [`Self::write`] for async callers, at `priority`. The write starts at once, in a
    /// task of its own, and runs to completion even if the returned future is dropped,
    /// so a cancelled request never leaves a block with new data under its old entry
    /// (outside a runtime it runs when awaited instead).
    pub fn write_async(
        self: &Arc<Self>,
        priority: IoPriority,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        detached(self, move |store| async move {
            store
                .write_now(priority, offset, &data, Seqs::One(seq))
                .await
        })
    }

    /// [`Self::write_async`] with one seq per block (`seqs[i]` for the i-th block of
    /// `data`): what a rebuild writes, a run of blocks copied from other replicas with
    /// the versions they carry, in one I/O. Another number of seqs than blocks is
    /// [`StoreError::SeqCount`] and writes nothing.
    pub fn write_versions_async(
        self: &Arc<Self>,
        priority: IoPriority,
        offset: u64,
        data: Vec<u8>,
        seqs: Vec<u64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        detached(self, move |store| async move {
            store
                .write_now(priority, offset, &data, Seqs::PerBlock(&seqs))
                .await
        })
    }

    /// The head layer and the blocks (first, count) of `len` bytes at `offset`,
    /// checked against the volume's size.
    fn head_range(&self, offset: u64, len: u64) -> Result<(Arc<Layer>, u64, u64), StoreError> {
        let state = self.state_read();
        let head = Arc::clone(state.head()?);
        let (first, n) = check_range(offset, len, state.size)?;
        Ok((head, first, n))
    }

    /// Writes `data` at `offset` into the head, every block.
    async fn write_now(
        &self,
        priority: IoPriority,
        offset: u64,
        data: &[u8],
        seqs: Seqs<'_>,
    ) -> Result<(), StoreError> {
        let _gate = self.locks.gate_shared().await;
        let (head, first, n) = self.head_range(offset, data.len() as u64)?;
        // Checksums before the locks: they depend on nothing the locks protect.
        let entries = match seqs {
            Seqs::One(seq) => data_entries(first, data, seq),
            Seqs::PerBlock(seqs) if seqs.len() as u64 == n => data
                .chunks_exact(BS)
                .zip(seqs)
                .enumerate()
                .map(|(k, (block, &seq))| Entry::for_data(first + k as u64, seq, block))
                .collect(),
            Seqs::PerBlock(seqs) => {
                return Err(StoreError::SeqCount {
                    blocks: n,
                    seqs: seqs.len(),
                })
            }
        };
        let _stripes = self.locks.exclusive(first, n).await;
        write_run(&head, priority, first, data, &entries).await
    }

    /// Writes the blocks of `data` whose current version is older than `seq`, missing
    /// or damaged (see [`Self::write_if_newer`]).
    async fn write_where_newer(
        &self,
        priority: IoPriority,
        offset: u64,
        data: &[u8],
        seq: u64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let _gate = self.locks.gate_shared().await;
        let older = self
            .older_blocks(priority, offset, data.len() as u64, seq)
            .await?;
        for (run_first, count) in applied_runs(older.first, &older.outcomes) {
            let at = ((run_first - older.first) as usize) * BS;
            let run = &data[at..at + count as usize * BS];
            write_run(
                &older.head,
                priority,
                run_first,
                run,
                &data_entries(run_first, run, seq),
            )
            .await?;
        }
        Ok(older.outcomes)
    }

    /// The blocks of a range whose current version is older than `seq` (missing or
    /// damaged counts as older), with the range's stripes locked exclusively until
    /// the result is dropped: the conditional writes and trims apply exactly these.
    /// The caller holds the gate.
    async fn older_blocks(
        &self,
        priority: IoPriority,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> Result<OlderBlocks<'_>, StoreError> {
        let (layers, first, n) = {
            let state = self.state_read();
            state.head()?;
            let (first, n) = check_range(offset, len, state.size)?;
            let layers: Vec<Arc<Layer>> =
                state.layers.iter().map(|s| Arc::clone(&s.layer)).collect();
            (layers, first, n)
        };
        let Some(head) = layers.last().cloned() else {
            return Err(StoreError::VolumeDeleted);
        };
        let stripes = self.locks.exclusive(first, n).await;
        let mut outcomes = Vec::with_capacity(n as usize);
        for b in first..first + n {
            outcomes.push(if is_newer(&layers, priority, b, seq).await? {
                WriteOutcome::Applied
            } else {
                WriteOutcome::Skipped
            });
        }
        Ok(OlderBlocks {
            head,
            first,
            outcomes,
            _stripes: stripes,
        })
    }

    /// [`Self::write_if_newer`] for async callers, at `priority`. Like
    /// [`Self::write_async`] it runs in a task of its own and completes even if the
    /// returned future is dropped.
    pub fn write_if_newer_async(
        self: &Arc<Self>,
        priority: IoPriority,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, StoreError>> + Send + 'static {
        detached(self, move |store| async move {
            store.write_where_newer(priority, offset, &data, seq).await
        })
    }

    /// [`Self::trim_if_newer`] for async callers, at `priority`, in a task of its own
    /// like [`Self::write_if_newer_async`]: its checks come before its tombstones, so
    /// a dropped caller must not stop it between them.
    pub fn trim_if_newer_async(
        self: &Arc<Self>,
        priority: IoPriority,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, StoreError>> + Send + 'static {
        detached(self, move |store| async move {
            store.trim_where_newer(priority, offset, len, seq).await
        })
    }

    /// Trims the blocks whose current version is older than `seq`, missing or damaged
    /// (see [`Self::trim_if_newer`]). As [`Self::trim_async`]: every tombstone is
    /// written before any hole is punched, so a crash leaves each block at its old
    /// version or trimmed at `seq` (zeros, hole punched or not).
    async fn trim_where_newer(
        &self,
        priority: IoPriority,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let _gate = self.locks.gate_shared().await;
        let older = self.older_blocks(priority, offset, len, seq).await?;
        let head = &older.head;
        let runs = applied_runs(older.first, &older.outcomes);
        for (run_first, count) in &runs {
            let entries: Vec<Entry> = (*run_first..run_first + count)
                .map(|b| Entry::tombstone(b, seq))
                .collect();
            head.write_entries(priority, *run_first, &entries).await?;
            for (k, e) in entries.iter().enumerate() {
                head.mark(run_first + k as u64, e);
            }
        }
        for (run_first, count) in runs {
            head.punch(priority, run_first, count).await?;
        }
        Ok(older.outcomes)
    }

    /// [`Self::trim`] for async callers, at `priority`.
    pub async fn trim_async(
        &self,
        priority: IoPriority,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> Result<(), StoreError> {
        let _gate = self.locks.gate_shared().await;
        let (head, first, n) = self.head_range(offset, len)?;
        if n == 0 {
            return Ok(());
        }
        let entries: Vec<Entry> = (first..first + n)
            .map(|b| Entry::tombstone(b, seq))
            .collect();
        let _stripes = self.locks.exclusive(first, n).await;
        head.write_entries(priority, first, &entries).await?;
        for (k, e) in entries.iter().enumerate() {
            head.mark(first + k as u64, e);
        }
        head.punch(priority, first, n).await
    }

    /// Removes the head's own version of `len` bytes at `offset`: their entries are
    /// zeroed, then their data is deallocated, so each block reads as its version in
    /// the older layers, or as never written where none has one. Only a copy that
    /// owns a volume nobody else writes yet uses this: a rebuild clearing blocks an
    /// interrupted attempt wrote where every replica it copies from has nothing (a
    /// trim would leave a version those replicas lack). A crash in between leaves a
    /// block forgotten (entry zeroed, data still allocated) or, like a torn trim,
    /// corrupt; the copy redoes both.
    pub async fn forget_async(
        &self,
        priority: IoPriority,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let _gate = self.locks.gate_shared().await;
        let (head, first, n) = self.head_range(offset, len)?;
        if n == 0 {
            return Ok(());
        }
        let _stripes = self.locks.exclusive(first, n).await;
        head.clear_entries(priority, first, n as usize).await?;
        for b in first..first + n {
            head.unmark(b);
        }
        head.punch(priority, first, n).await
    }

    /// [`Self::flush`] for async callers, at `priority`.
    pub async fn flush_async(&self, priority: IoPriority) -> Result<(), StoreError> {
        let _gate = self.locks.gate_shared().await;
        let layers: Vec<Arc<Layer>> = {
            let state = self.state_read();
            if state.removed {
                return Err(StoreError::VolumeDeleted);
            }
            state.layers.iter().map(|s| Arc::clone(&s.layer)).collect()
        };
        for layer in &layers {
            layer.sync(priority).await?;
        }
        Ok(())
    }
}

/// Runs `op` on `store` in a task of its own that finishes even if the returned
/// future is dropped (outside a runtime it runs when awaited instead).
fn detached<T, Fut>(
    store: &Arc<LayeredStore>,
    op: impl FnOnce(Arc<LayeredStore>) -> Fut,
) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let dir = store.dir.clone();
    let op = op(Arc::clone(store));
    let task = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => Ok(runtime.spawn(op)),
        Err(_) => Err(op),
    };
    async move {
        match task {
            Ok(task) => task.await.unwrap_or_else(|e| {
                Err(StoreError::Io {
                    op: "run the store task",
                    path: dir,
                    source: io::Error::other(e),
                })
            }),
            Err(op) => op.await,
        }
    }
}

/// The seqs of a write's blocks.
#[derive(Clone, Copy)]
enum Seqs<'a> {
    /// Every block has this one.
    One(u64),
    /// One per block, in order.
    PerBlock(&'a [u64]),
}

/// What [`LayeredStore::older_blocks`] found, holding the range's stripes.
struct OlderBlocks<'a> {
    head: Arc<Layer>,
    first: u64,
    outcomes: Vec<WriteOutcome>,
    _stripes: Vec<StripeWrite<'a>>,
}

/// The runs of consecutive applied blocks in `outcomes` (of blocks from `first`), as
/// (first block, count).
fn applied_runs(first: u64, outcomes: &[WriteOutcome]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (k, o) in outcomes.iter().enumerate() {
        if *o != WriteOutcome::Applied {
            continue;
        }
        let b = first + k as u64;
        match runs.last_mut() {
            Some((f, count)) if *f + *count == b => *count += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

/// Index (in `layers`, base first) of the newest layer with an entry for `block`.
pub(super) fn owner(layers: &[Arc<Layer>], block: u64) -> Option<usize> {
    layers.iter().rposition(|l| l.has(block))
}

/// The entries of data blocks written at `seq` from block `first`.
fn data_entries(first: u64, data: &[u8], seq: u64) -> Vec<Entry> {
    data.chunks_exact(BS)
        .enumerate()
        .map(|(k, block)| Entry::for_data(first + k as u64, seq, block))
        .collect()
}

/// Writes consecutive blocks into `head`: data, then entries, then the index.
async fn write_run(
    head: &Layer,
    priority: IoPriority,
    first: u64,
    data: &[u8],
    entries: &[Entry],
) -> Result<(), StoreError> {
    head.write_data(priority, first, data).await?;
    head.write_entries(priority, first, entries).await?;
    for (k, e) in entries.iter().enumerate() {
        head.mark(first + k as u64, e);
    }
    Ok(())
}

/// Reads and verifies consecutive blocks of one layer into `buf`.
async fn read_verified(
    layer: &Layer,
    priority: IoPriority,
    first: u64,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let entries = layer.read_entries(priority, first, buf.len() / BS).await?;
    if needs_data(&entries) {
        layer.read_data(priority, first, buf).await?;
    }
    verify_run(layer, first, &entries, buf)
}

/// Whether a run with these entries has data to read (anything but tombstones).
fn needs_data(entries: &[Option<Entry>]) -> bool {
    entries
        .iter()
        .any(|e| !matches!(e, Some(e) if e.flags == FLAG_TRIMMED))
}

/// Checks the blocks read into `buf` against their `entries`; zeroes tombstones.
fn verify_run(
    layer: &Layer,
    first: u64,
    entries: &[Option<Entry>],
    buf: &mut [u8],
) -> Result<(), StoreError> {
    for (i, (entry, chunk)) in entries.iter().zip(buf.chunks_exact_mut(BS)).enumerate() {
        let block = first + i as u64;
        match entry.map(|e| e.verify(block, chunk)) {
            Some(Verdict::Data) => {}
            Some(Verdict::Trimmed) => chunk.fill(0),
            // The index says the layer has the block but its entry is gone: damage.
            None | Some(Verdict::Corrupt) => {
                return Err(StoreError::Corrupt {
                    layer: layer.id,
                    block,
                })
            }
        }
    }
    Ok(())
}

/// Verifies one block of one layer; returns the verdict and the entry's seq.
pub(super) async fn check_block(
    layer: &Layer,
    priority: IoPriority,
    block: u64,
) -> Result<(Verdict, u64), StoreError> {
    let entries = layer.read_entries(priority, block, 1).await?;
    let Some(entry) = entries.into_iter().next().flatten() else {
        return Ok((Verdict::Corrupt, 0));
    };
    if entry.is_valid_tombstone(block) {
        return Ok((Verdict::Trimmed, entry.seq));
    }
    let mut buf = vec![0u8; BS];
    layer.read_data(priority, block, &mut buf).await?;
    Ok((entry.verify(block, &buf), entry.seq))
}

/// Whether a write at `seq` should replace the current version of `block` in the view
/// `layers`: yes when there is none, it is older, or it is damaged (so rebuild repairs
/// bad blocks).
async fn is_newer(
    layers: &[Arc<Layer>],
    priority: IoPriority,
    block: u64,
    seq: u64,
) -> Result<bool, StoreError> {
    let Some(i) = owner(layers, block) else {
        return Ok(true);
    };
    let (verdict, current) = check_block(&layers[i], priority, block).await?;
    Ok(verdict == Verdict::Corrupt || current < seq)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::scheduler::{EngineKind, Qos, Scheduler, SchedulerConfig, VolumeHandle};
    use crate::store::{BlockFileFactory, ScheduledFileFactory, StdFileFactory};

    const MIB: u64 = 1 << 20;
    const FG: IoPriority = IoPriority::Foreground;

    fn scheduler(engine: EngineKind) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            name: "async-store".into(),
            engine,
            ..SchedulerConfig::default()
        })
        .expect("scheduler")
    }

    fn create(dir: &std::path::Path, factory: Arc<dyn BlockFileFactory>) -> Arc<LayeredStore> {
        Arc::new(LayeredStore::create_with(dir, MIB, factory).expect("create"))
    }

    fn scheduled(vol: &VolumeHandle) -> Arc<dyn BlockFileFactory> {
        Arc::new(ScheduledFileFactory::new(vol.clone(), true))
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BS]
    }

    async fn round_trip(store: Arc<LayeredStore>) {
        store
            .write_async(FG, 0, [block(1), block(2), block(3)].concat(), 5)
            .await
            .expect("write");
        store.trim_async(FG, 4096, 4096, 6).await.expect("trim");
        store.flush_async(FG).await.expect("flush");
        let want = [block(1), block(0), block(3), block(0)].concat();
        assert_eq!(store.read_async(FG, 0, 4 * 4096).await.expect("read"), want);
        // The blocking path sees the same, and versions match.
        let s = Arc::clone(&store);
        let (data, seq) = tokio::task::spawn_blocking(move || {
            (
                s.read(0, 4 * 4096).expect("read"),
                s.block_seq(1).expect("seq"),
            )
        })
        .await
        .expect("blocking read");
        assert_eq!(data, want);
        assert_eq!(seq, Some(6));
        // Range errors are the same as on the blocking path.
        assert!(matches!(
            store.read_async(FG, MIB, 4096).await,
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            store.write_async(FG, 1, block(1), 7).await,
            Err(StoreError::Unaligned { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_path_matches_the_blocking_path_on_every_file_kind() {
        for engine in [EngineKind::IoUring, EngineKind::Sync { threads: 2 }] {
            let sched = scheduler(engine);
            let vol = sched
                .register_volume("v", Qos::unlimited())
                .expect("register");
            let dir = tempfile::tempdir().expect("tempdir");
            round_trip(create(dir.path(), scheduled(&vol))).await;
            assert!(
                vol.stats().completed_ops >= 4,
                "the data file was scheduled"
            );
            // What went to disk reads back the same through plain std files.
            let reopened = LayeredStore::open(dir.path()).expect("reopen");
            assert_eq!(reopened.read(8192, 4096).expect("read"), block(3));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        round_trip(create(dir.path(), Arc::new(StdFileFactory))).await;
    }

    #[test]
    fn writes_with_a_seq_per_block_and_forgetting_the_heads_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LayeredStore::create(dir.path(), 8 * 4096).expect("create"));
        let three = [block(1), block(2), block(3)].concat();
        block_on(store.write_versions_async(FG, 4096, three.clone(), vec![10, 12, 11]))
            .expect("write");
        let seqs = |s: &LayeredStore| -> Vec<Option<u64>> {
            (0..8).map(|b| s.block_seq(b).expect("seq")).collect()
        };
        assert_eq!(
            seqs(&store),
            vec![None, Some(10), Some(12), Some(11), None, None, None, None]
        );
        assert_eq!(store.read(4096, 3 * 4096).expect("read"), three);
        assert!(matches!(
            block_on(store.write_versions_async(
                FG,
                5 * 4096,
                [block(4), block(5)].concat(),
                vec![1]
            )),
            Err(StoreError::SeqCount { blocks: 2, seqs: 1 })
        ));
        assert_eq!(store.block_seq(5).expect("seq"), None, "nothing written");

        // Forgetting the head's versions uncovers the snapshot's, or nothing.
        store.snapshot("s").expect("snapshot");
        store.write(4096, &block(9), 20).expect("write");
        store.trim(2 * 4096, 4096, 21).expect("trim");
        store.write(6 * 4096, &block(6), 22).expect("write");
        store.forget(4096, 6 * 4096).expect("forget");
        let want = vec![None, Some(10), Some(12), Some(11), None, None, None, None];
        assert_eq!(seqs(&store), want);
        assert_eq!(store.read(4096, 3 * 4096).expect("read"), three);
        assert_eq!(store.read(6 * 4096, 4096).expect("read"), block(0));
        store.flush().expect("flush");
        drop(store);
        let reopened = LayeredStore::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&reopened), want);
        assert!(reopened.verify().expect("verify").is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_write_still_completes() {
        let sched = scheduler(EngineKind::IoUring);
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = create(dir.path(), scheduled(&vol));
        drop(store.write_async(FG, 8192, block(7), 3));
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.read_async(FG, 8192, 4096).await.expect("read") != block(7) {
            assert!(Instant::now() < deadline, "the dropped write never landed");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retire_waits_for_async_writes_and_stops_later_ones() {
        let sched = scheduler(EngineKind::IoUring);
        // One token a second, a bucket of one: the second write waits in the
        // scheduler even when the first takes a while on a loaded machine (with 10
        // tokens a second, a first write slower than 100 ms left a token for the
        // second, which then never queued).
        let qos = Qos {
            max_iops: Some(1),
            burst_duration: Duration::from_secs(1),
            ..Qos::unlimited()
        };
        let vol = sched.register_volume("v", qos).expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = create(dir.path(), scheduled(&vol));
        store
            .write_async(FG, 0, block(1), 1)
            .await
            .expect("first write");
        let pending = store.write_async(FG, 4096, block(2), 2);
        // Retire only once that write holds the gate and waits for its token.
        let deadline = Instant::now() + Duration::from_secs(10);
        while vol.stats().queued == 0 {
            assert!(
                Instant::now() < deadline,
                "the write never reached the scheduler"
            );
            tokio::task::yield_now().await;
        }
        let (s, path) = (Arc::clone(&store), dir.path().to_path_buf());
        let retired = tokio::task::spawn_blocking(move || {
            s.retire();
            // Retire returned: the write that was waiting for its token is complete,
            // data and entry, as a fresh open of the files shows.
            let reopened = LayeredStore::open(&path).expect("reopen");
            reopened.read(4096, 4096).expect("read")
        });
        pending.await.expect("the write in flight finishes");
        assert_eq!(retired.await.expect("retire"), block(2), "retire waited");
        assert!(matches!(
            store.write_async(FG, 0, block(3), 3).await,
            Err(StoreError::VolumeDeleted)
        ));
        assert!(store.read_async(FG, 0, 4096).await.is_err());
        assert!(store.flush_async(FG).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_flush_leaves_the_layer_dirty() {
        let sched = scheduler(EngineKind::IoUring);
        // One token, the next a second later.
        let qos = Qos {
            max_iops: Some(1),
            burst_duration: Duration::from_secs(1),
            ..Qos::unlimited()
        };
        let vol = sched.register_volume("v", qos).expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = create(dir.path(), scheduled(&vol));
        // Uses the only token, so the flush's fdatasync waits for the next one.
        store.write_async(FG, 0, block(1), 1).await.expect("write");
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), store.flush_async(FG)).await;
        assert!(cancelled.is_err(), "the flush was still waiting");
        let before = vol.stats().completed_ops;
        store.flush_async(FG).await.expect("flush");
        assert_eq!(
            vol.stats().completed_ops - before,
            2,
            "data and meta synced again after the cancelled flush"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_seal_concurrent_async_writes_whole() {
        let sched = scheduler(EngineKind::IoUring);
        let vol = sched
            .register_volume("v", Qos::unlimited())
            .expect("register");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = create(dir.path(), scheduled(&vol));
        let blocks = 16u64;
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..4u64 {
            let store = Arc::clone(&store);
            writers.spawn(async move {
                for i in 0..200u64 {
                    let b = (w * 7 + i) % blocks;
                    let data = [block((i % 250) as u8 + 1), block(w as u8 + 1)].concat();
                    store
                        .write_async(FG, b * 4096 % (blocks * 4096 - 4096), data, w << 32 | i)
                        .await
                        .expect("write");
                }
            });
        }
        let s = Arc::clone(&store);
        let snaps = tokio::task::spawn_blocking(move || {
            (0..5)
                .map(|i| {
                    let id = format!("s{i}");
                    s.snapshot(&id).expect("snapshot");
                    id
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("snapshots");
        while let Some(r) = writers.join_next().await {
            r.expect("writer");
        }
        // Every block of every snapshot and of the head verifies: no write was split
        // between a sealed layer and its successor.
        let s = Arc::clone(&store);
        tokio::task::spawn_blocking(move || {
            for id in &snaps {
                s.read_snapshot(id, 0, blocks * 4096)
                    .expect("snapshot reads");
            }
            assert!(s.verify().expect("verify").is_empty());
        })
        .await
        .expect("checks");
        store
            .read_async(FG, 0, blocks * 4096)
            .await
            .expect("head reads");
    }
}
