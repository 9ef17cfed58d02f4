//! The store's block locks, usable from blocking threads and from async tasks alike.
//!
//! * **Stripes**: block b maps to stripe b mod [`STRIPES`]; writes, trims and merge
//!   copies hold their blocks' stripes exclusively, reads shared, for the whole of their
//!   disk I/O. Several stripes are always taken in ascending index order, so two
//!   callers can never wait on each other in a cycle.
//! * **Gate**: data operations (the `data_path` module, async or parked on) hold it
//!   shared from start to end; every change of the layer chain (sealing a snapshot,
//!   dropping a merged layer, deleting or retiring the volume) takes it exclusively
//!   first. The chain's `std` lock cannot be held across an `await`, so the gate is
//!   what keeps the chain an operation looked at alive until it finishes.
//!
//! Why tokio locks: an async task holds its stripes while it awaits its disk request,
//! and `std` guards can neither cross an `await` in a task (they are not `Send`) nor be
//! waited for without blocking a runtime thread. tokio's `RwLock` is fair (a waiting
//! writer stops new readers, so nobody starves) and its guards are `Send`. Blocking
//! callers take it by parking their thread ([`crate::park::block_on`]), so blocking
//! and async callers exclude each other on the very same locks.

use std::ops::Range;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::park::block_on;

/// Number of per-block lock stripes: enough that unrelated writes rarely share one.
pub(crate) const STRIPES: usize = 1024;

/// A held stripe, shared.
pub(crate) type StripeRead<'a> = RwLockReadGuard<'a, ()>;
/// A held stripe, exclusive.
pub(crate) type StripeWrite<'a> = RwLockWriteGuard<'a, ()>;

/// Gate and stripes of one store (see the module doc).
#[derive(Debug)]
pub(crate) struct BlockLocks {
    gate: RwLock<()>,
    stripes: Box<[RwLock<()>]>,
}

impl Default for BlockLocks {
    fn default() -> Self {
        BlockLocks {
            gate: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

/// Stripe indices of blocks `first .. first + n`, ascending and without repeats: at
/// most two ranges (the run may wrap around the end of the stripe table).
fn stripe_ranges(first: u64, n: u64) -> [Range<usize>; 2] {
    if n >= STRIPES as u64 {
        return [0..STRIPES, 0..0];
    }
    // Both casts are below STRIPES.
    let start = (first % STRIPES as u64) as usize;
    let end = start + n as usize;
    if end <= STRIPES {
        [start..end, 0..0]
    } else {
        [0..end - STRIPES, start..STRIPES]
    }
}

fn stripe_indices(first: u64, n: u64) -> impl Iterator<Item = usize> {
    stripe_ranges(first, n).into_iter().flatten()
}

impl BlockLocks {
    /// Shared stripes of `n` blocks from `first`, for an async caller.
    pub(crate) async fn shared(&self, first: u64, n: u64) -> Vec<StripeRead<'_>> {
        let mut guards = Vec::with_capacity(n.min(STRIPES as u64) as usize);
        for i in stripe_indices(first, n) {
            guards.push(self.stripes[i].read().await);
        }
        guards
    }

    /// Exclusive stripes of `n` blocks from `first`, for an async caller.
    pub(crate) async fn exclusive(&self, first: u64, n: u64) -> Vec<StripeWrite<'_>> {
        let mut guards = Vec::with_capacity(n.min(STRIPES as u64) as usize);
        for i in stripe_indices(first, n) {
            guards.push(self.stripes[i].write().await);
        }
        guards
    }

    /// The gate, shared: held by a data operation for its whole duration.
    pub(crate) async fn gate_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// The gate, exclusive: taken (blocking) before the layer chain changes; returns
    /// once no data operation is running.
    pub(crate) fn gate_exclusive_blocking(&self) -> RwLockWriteGuard<'_, ()> {
        block_on(self.gate.write())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indices(first: u64, n: u64) -> Vec<usize> {
        stripe_indices(first, n).collect()
    }

    #[test]
    fn stripe_indices_are_ascending_and_unique() {
        assert_eq!(indices(5, 3), vec![5, 6, 7]);
        assert_eq!(indices(STRIPES as u64 + 5, 1), vec![5]);
        // Wrapping: the low stripes come first.
        assert_eq!(indices(STRIPES as u64 - 2, 4), vec![0, 1, 1022, 1023]);
        assert_eq!(indices(7, STRIPES as u64), (0..STRIPES).collect::<Vec<_>>());
        assert_eq!(indices(7, 5000), (0..STRIPES).collect::<Vec<_>>());
        assert!(indices(7, 0).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_and_async_callers_exclude_each_other() {
        let locks = std::sync::Arc::new(BlockLocks::default());
        let held = locks.exclusive(10, 2).await;
        let (tx, rx) = std::sync::mpsc::channel();
        let l = std::sync::Arc::clone(&locks);
        let waiter = tokio::task::spawn_blocking(move || {
            let _g = block_on(l.shared(11, 1));
            let _ = tx.send(());
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "blocked while the stripe is held");
        drop(held);
        waiter.await.expect("waiter finishes");
        assert!(rx.try_recv().is_ok());
    }
}
