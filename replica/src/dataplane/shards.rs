//! Data-plane shards: threads that each run a single-threaded tokio runtime with an
//! io_uring of their own ([`scheduler::run_with_local_ring`]), so a connection's requests are read, stored
//! and answered on one thread, disk I/O included.
//!
//! Why: see the `scheduler::uring::local` module. The accept loop stays on the
//! daemon's main runtime and hands each accepted socket to the shard serving the
//! fewest connections (an engine that opens several connections to one volume gets
//! them on different threads);
//! everything else about a connection (limits, ordering, shutdown) is the server's
//! and unchanged. A shard must never block: the data plane only uses the store's
//! async path, and blocking work (epoch adoption) goes to the shard runtime's
//! blocking pool.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::scheduler;

/// A job for a shard: builds the future to run there (inside the shard's runtime, so
/// it can register sockets with that runtime's reactor).
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A fixed set of shard threads. Dropping it closes their job queues: each thread then
/// stops, dropping whatever still runs on it (the server drops its last reference
/// only after every connection has ended).
pub struct Shards {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    /// Jobs each shard is running or about to run.
    load: Vec<Arc<AtomicUsize>>,
    /// Where the search for the least-loaded shard starts, rotated so that equally
    /// loaded shards take turns.
    next: AtomicUsize,
}

/// Counts one job against its shard until the job's future ends or is dropped.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("count", &self.senders.len())
            .finish()
    }
}

impl Shards {
    /// Starts `count` shard threads, each with a ring of `ring_depth` operations.
    /// Fails if a thread, runtime or ring cannot be created (no io_uring, say), so the
    /// daemon can refuse to start rather than run slower than configured.
    pub fn start(count: usize, ring_depth: u32) -> io::Result<Shards> {
        let mut senders = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("data-shard-{i}"))
                .spawn(move || run_shard(rx, ring_depth, ready_tx))?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = thread.join();
                    return Err(e);
                }
                Err(_) => {
                    let _ = thread.join();
                    return Err(io::Error::other("a data-plane shard exited during setup"));
                }
            }
            senders.push(tx);
        }
        Ok(Shards {
            load: (0..senders.len()).map(|_| Arc::default()).collect(),
            senders,
            next: AtomicUsize::new(0),
        })
    }

    /// Number of shard threads.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Whether there are no shards (never true for a started set).
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// Runs the future `job` builds on the shard with the fewest jobs (connections)
    /// running. Returns `false` if that shard has stopped (the job is dropped unbuilt).
    pub fn spawn(
        &self,
        job: impl FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static,
    ) -> bool {
        let n = self.senders.len();
        if n == 0 {
            return false;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let i = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.load[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.load[i].fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard(Arc::clone(&self.load[i]));
        let job: Job = Box::new(move || {
            let run = job();
            Box::pin(async move {
                let _counted = guard;
                run.await
            })
        });
        self.senders[i].send(job).is_ok()
    }

    /// Jobs (connections) each shard is running, by shard index.
    #[cfg(test)]
    fn load(&self) -> Vec<usize> {
        self.load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect()
    }
}

fn run_shard(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ring_depth: u32,
    ready: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let failed = ready.clone();
    let served = runtime.block_on(scheduler::run_with_local_ring(ring_depth, async move {
        let _ = ready.send(Ok(()));
        while let Some(job) = jobs.recv().await {
            tokio::spawn(job());
        }
    }));
    if let Err(e) = served {
        let _ = failed.send(Err(io::Error::other(e)));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::sync::oneshot;

    use super::*;

    /// Spawns a job that reports the name of the thread it runs on, then runs until
    /// the returned sender fires (or is dropped).
    fn park_job(shards: &Shards) -> (String, oneshot::Sender<()>) {
        let (release, released) = oneshot::channel::<()>();
        let (where_tx, where_rx) = std::sync::mpsc::channel();
        assert!(shards.spawn(move || {
            Box::pin(async move {
                let name = std::thread::current().name().unwrap_or("?").to_string();
                let _ = where_tx.send(name);
                let _ = released.await;
            })
        }));
        let name = where_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the job ran");
        (name, release)
    }

    /// Waits until `load` reports `total` jobs; the count drops on the shard thread
    /// just after a job's future ends.
    fn wait_for_total(shards: &Shards, total: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while shards.load().iter().sum::<usize>() != total {
            assert!(
                Instant::now() < deadline,
                "load stuck at {:?}",
                shards.load()
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn connections_go_to_the_least_loaded_shard() {
        let shards = Shards::start(2, 8).expect("io_uring available");
        let (a, release_a) = park_job(&shards);
        let (b, release_b) = park_job(&shards);
        // Two connections of one engine must not share a thread while one is idle.
        assert_ne!(a, b);
        assert_eq!(shards.load(), vec![1, 1]);
        release_b.send(()).expect("job b waits");
        wait_for_total(&shards, 1);
        // The shard that lost its connection is the least loaded: it gets the next
        // (round robin would have picked a's again).
        let (c, release_c) = park_job(&shards);
        assert_eq!(c, b);
        drop((release_a, release_c));
        wait_for_total(&shards, 0);
    }
}
