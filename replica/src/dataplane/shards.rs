//! Data-plane shards: threads that each run a single-threaded tokio runtime with an
//! io_uring of their own ([`LocalRing`]), so a connection's requests are read, stored
//! and answered on one thread, disk I/O included.
//!
//! Why: see the `scheduler::uring::local` module. The accept loop stays on the
//! daemon's main runtime and hands each accepted socket to the next shard in turn;
//! everything else about a connection (limits, ordering, shutdown) is the server's
//! and unchanged. A shard must never block: the data plane only uses the store's
//! async path, and blocking work (epoch adoption) goes to the shard runtime's
//! blocking pool.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::scheduler::LocalRing;

/// A job for a shard: builds the future to run there (inside the shard's runtime, so
/// it can register sockets with that runtime's reactor).
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A fixed set of shard threads. Dropping it closes their job queues: each thread then
/// stops, dropping whatever still runs on it (the server drops its last reference
/// only after every connection has ended).
pub struct Shards {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
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

    /// Runs the future `job` builds on the next shard, round robin. Returns `false`
    /// if that shard has stopped (the job is dropped unbuilt).
    pub fn spawn(
        &self,
        job: impl FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static,
    ) -> bool {
        if self.senders.is_empty() {
            return false;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        self.senders[i].send(Box::new(job)).is_ok()
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
    runtime.block_on(async move {
        let ring = match LocalRing::install(ring_depth) {
            Ok(ring) => ring,
            Err(e) => {
                let _ = ready.send(Err(io::Error::other(e)));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let reaper = ring.run();
        tokio::pin!(reaper);
        loop {
            tokio::select! {
                _ = &mut reaper => {
                    // The ring failed; submissions now go to the ring thread. Keep
                    // serving jobs.
                    while let Some(job) = jobs.recv().await {
                        tokio::spawn(job());
                    }
                    break;
                }
                job = jobs.recv() => match job {
                    Some(job) => {
                        tokio::spawn(job());
                    }
                    None => break,
                },
            }
        }
    });
    LocalRing::uninstall();
}
