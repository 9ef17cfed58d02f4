//! The table of writes (and repair writes) that some replica has not finished yet.
//!
//! It answers the three ordering questions of the engine:
//!
//! * **Which replicas may serve a read** of a range? Those that are not still working
//!   on an overlapping write ([`Inflight::busy_replicas`]). A replica that finished a
//!   write either acknowledged it or was marked stale before its bit was cleared, so
//!   "not pending and in sync" means "holds the data".
//! * **What must a new write wait for** on each replica? Every overlapping op already
//!   in the table ([`Inflight::register_with`] returns them): replicas execute requests in
//!   any order, so two overlapping writes sent at once could land in different orders
//!   on different replicas and leave the copies different. The engine sends the
//!   later one to a replica only after the earlier one finished there.
//! * **What must a flush cover** on each replica? Every op in the table when the flush
//!   starts ([`Inflight::snapshot`]).
//!
//! Ops are keyed by start offset; an overlap query scans the starts in
//! `[start - longest op + 1, end)`, which for block I/O is a handful of entries.
//! The mutex is held only for those scans and inserts, never across an await.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// One write, trim or repair write, from registration until every replica it was sent
/// to has finished it (acknowledged, failed or timed out).
#[derive(Debug)]
pub(crate) struct Op {
    id: u64,
    start: u64,
    end: u64,
    /// Replicas that have not finished the op; bit i = replica i.
    pending: AtomicU32,
    /// Replicas that acknowledged while in sync.
    acked: AtomicU32,
    /// Woken on every change of `pending`.
    changed: Notify,
}

impl Op {
    /// Whether replica `r` still has to finish this op.
    pub(crate) fn pending_on(&self, r: usize) -> bool {
        self.pending.load(Ordering::SeqCst) & (1 << r) != 0
    }

    /// Replicas that have not finished the op.
    pub(crate) fn pending(&self) -> u32 {
        self.pending.load(Ordering::SeqCst)
    }

    /// Whether every replica finished the op.
    pub(crate) fn is_done(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
    }

    /// Replicas that acknowledged the op while in sync.
    #[cfg(test)]
    pub(crate) fn acked(&self) -> u32 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until replica `r` finished the op (returns at once if it never had it).
    pub(crate) async fn wait_done_on(&self, r: usize) {
        self.wait_until(|op| !op.pending_on(r)).await
    }

    /// Waits until every replica finished the op.
    pub(crate) async fn wait_done(&self) {
        self.wait_until(Op::is_done).await
    }

    /// Waits until `cond` holds; re-checked after every change of the op.
    pub(crate) async fn wait_until(&self, cond: impl Fn(&Op) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register before checking, so a change between check and await wakes us.
            notified.as_mut().enable();
            if cond(self) {
                return;
            }
            notified.await;
        }
    }

    /// Records that replica `r` finished the op. The caller marks a failed replica
    /// stale *before* calling this, so a reader that sees the bit cleared also sees
    /// the replica stale. Returns whether this was the last pending replica.
    pub(crate) fn finish(&self, r: usize, acked: bool) -> bool {
        if acked {
            self.acked.fetch_or(1 << r, Ordering::SeqCst);
        }
        let before = self.pending.fetch_and(!(1 << r), Ordering::SeqCst);
        self.changed.notify_waiters();
        before & !(1 << r) == 0 && before != 0
    }
}

#[derive(Default)]
struct Table {
    ops: BTreeMap<(u64, u64), Arc<Op>>,
    /// Lengths of the ops in the table (length → count). The longest bounds how far
    /// before a range an overlapping op can start; keeping the multiset rather than
    /// the longest ever seen means one huge trim does not slow every later query.
    lens: BTreeMap<u64, usize>,
    next_id: u64,
}

impl Table {
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Arc<Op>> {
        let max_len = self.lens.last_key_value().map_or(0, |(l, _)| *l);
        let from = start.saturating_sub(max_len.saturating_sub(1));
        self.ops
            .range((Bound::Included((from, 0)), Bound::Excluded((end, 0))))
            .map(|(_, op)| op)
            .filter(move |op| op.end > start)
    }
}

/// The in-flight table of one engine.
#[derive(Default)]
pub(crate) struct Inflight {
    table: Mutex<Table>,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section is a few map operations that cannot leave the map
        // inconsistent, so a panic elsewhere while holding it does not matter.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an op on `targets` (a replica bitmask, computed under the table's
    /// lock, so it is ordered against [`Self::snapshot_after`]) and appends every
    /// overlapping op already in the table to `preds`: on each replica the new op
    /// may be sent only after those finished there.
    pub(crate) fn register_with(
        &self,
        start: u64,
        len: u64,
        targets: impl FnOnce() -> u32,
        preds: &mut Vec<Arc<Op>>,
    ) -> Arc<Op> {
        let mut t = self.lock();
        preds.extend(t.overlapping(start, start + len).cloned());
        let targets = targets();
        Self::insert(&mut t, start, len, targets)
    }

    /// Runs `change` under the table's lock and returns every op in the table then:
    /// an op registered later (with [`Self::register_with`]) saw the change.
    pub(crate) fn snapshot_after(&self, change: impl FnOnce()) -> Vec<Arc<Op>> {
        let t = self.lock();
        change();
        t.ops.values().cloned().collect()
    }

    /// Registers an op only if nothing overlapping is in flight (used for repair
    /// writes, which must never be ordered after a newer write to the same blocks).
    /// Returns an op that is in the way otherwise.
    pub(crate) fn register_exclusive(
        &self,
        start: u64,
        len: u64,
        targets: u32,
    ) -> Result<Arc<Op>, Arc<Op>> {
        let mut t = self.lock();
        if let Some(op) = t.overlapping(start, start + len).next() {
            return Err(Arc::clone(op));
        }
        Ok(Self::insert(&mut t, start, len, targets))
    }

    fn insert(t: &mut Table, start: u64, len: u64, targets: u32) -> Arc<Op> {
        t.next_id += 1;
        let op = Arc::new(Op {
            id: t.next_id,
            start,
            end: start + len,
            pending: AtomicU32::new(targets),
            acked: AtomicU32::new(0),
            changed: Notify::new(),
        });
        if targets != 0 {
            t.ops.insert((start, op.id), Arc::clone(&op));
            *t.lens.entry(len).or_default() += 1;
        }
        op
    }

    /// Removes a finished op.
    pub(crate) fn remove(&self, op: &Op) {
        let mut t = self.lock();
        if t.ops.remove(&(op.start, op.id)).is_some() {
            let len = op.end - op.start;
            if let Some(n) = t.lens.get_mut(&len) {
                *n -= 1;
                if *n == 0 {
                    t.lens.remove(&len);
                }
            }
        }
    }

    /// Replicas with an unfinished op overlapping the range (bitmask), and one such op
    /// still pending on some replica of `wanted` — the replicas the caller could read
    /// from — to wait on if it finds none of them free. (An op pending only elsewhere
    /// would never change on `wanted`: waiting on it once made overlapping reads fail
    /// after the full timeout although the other op finished in microseconds.)
    pub(crate) fn busy_replicas(
        &self,
        start: u64,
        len: u64,
        wanted: u32,
    ) -> (u32, Option<Arc<Op>>) {
        let t = self.lock();
        let mut busy = 0;
        let mut blocker = None;
        for op in t.overlapping(start, start + len) {
            let p = op.pending.load(Ordering::SeqCst);
            busy |= p;
            if blocker.is_none() && p & wanted != 0 {
                blocker = Some(Arc::clone(op));
            }
        }
        (busy, blocker)
    }

    /// Every op in the table now; a flush waits for them on each replica.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Op>> {
        self.lock().ops.values().cloned().collect()
    }

    /// Number of ops in the table (for status).
    pub(crate) fn len(&self) -> usize {
        self.lock().ops.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_queries_find_exactly_the_overlapping_ops() {
        let t = Inflight::default();
        let mut preds = Vec::new();
        let a = t.register_with(0, 8192, || 0b111, &mut preds);
        assert!(preds.is_empty());
        let b = t.register_with(1 << 20, 1 << 20, || 0b011, &mut preds);
        assert!(preds.is_empty());
        // Overlaps b's tail only.
        let c = t.register_with((2 << 20) - 4096, 4096, || 0b001, &mut preds);
        assert_eq!(preds.len(), 1);
        assert!(Arc::ptr_eq(&preds[0], &b));
        preds.clear();
        // Adjacent to a, overlapping nothing.
        t.register_with(8192, 4096, || 0b001, &mut preds);
        assert!(preds.is_empty());

        let (busy, _) = t.busy_replicas(4096, 4096, 0b111);
        assert_eq!(busy, 0b111);
        a.finish(0, true);
        a.finish(1, false);
        let (busy, blocker) = t.busy_replicas(4096, 4096, 0b111);
        assert_eq!(busy, 0b100);
        assert!(blocker.is_some_and(|o| Arc::ptr_eq(&o, &a)));
        // Pending only on replica 2: nothing to wait for on replicas 0 and 1.
        let (_, blocker) = t.busy_replicas(4096, 4096, 0b011);
        assert!(blocker.is_none());
        assert!(a.finish(2, true));
        assert_eq!(a.acked(), 0b101);
        t.remove(&a);
        assert_eq!(t.busy_replicas(0, 4096, 0b111).0, 0);

        assert!(t.register_exclusive((2 << 20) - 4096, 4096, 0b100).is_err());
        assert_eq!(t.busy_replicas(1 << 20, 4096, 0b111).0, 0b011);
        c.finish(0, true);
        t.remove(&c);
        assert_eq!(t.snapshot().len(), 2);
        assert_eq!(t.len(), 2);
    }

    #[tokio::test]
    async fn waiters_wake_on_finish() {
        let t = Inflight::default();
        let op = t.register_with(0, 4096, || 0b11, &mut Vec::new());
        let waiter = {
            let op = Arc::clone(&op);
            tokio::spawn(async move { op.wait_done().await })
        };
        op.wait_done_on(2).await; // never had it
        assert!(!op.finish(0, true), "replica 1 still pending");
        assert!(!op.is_done());
        assert!(op.finish(1, true), "last replica finished");
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("waiter woke")
            .expect("waiter task");
        assert!(op.is_done());
    }
}
