//! Reference engine: blocking `pread`/`pwrite`/`fsync`/`fallocate` on worker threads.
//!
//! It defines what every engine must do (see [`super::engine::execute_blocking`]) in
//! the plainest possible code, so the io_uring engine is tested against it; it also
//! serves where io_uring is unavailable (old kernels, seccomp profiles that forbid it).
//! Its throughput is bounded by its thread count: each thread has one request in
//! flight.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, ThreadId};

use super::engine::{execute_blocking, EngineError, EngineOp, IoEngine, Rejected};

/// A pool of threads each running one blocking request at a time.
pub struct SyncEngine {
    tx: Option<mpsc::Sender<EngineOp>>,
    threads: Vec<JoinHandle<()>>,
    thread_ids: Vec<ThreadId>,
}

impl SyncEngine {
    /// Starts `threads` workers (at least one) named after `name`.
    pub fn new(name: &str, threads: usize) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel::<EngineOp>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let handle = thread::Builder::new()
                .name(format!("sync-io-{name}-{i}"))
                .spawn(move || worker(&rx))
                .map_err(EngineError::Setup)?;
            handles.push(handle);
        }
        Ok(Self {
            tx: Some(tx),
            thread_ids: handles.iter().map(|h| h.thread().id()).collect(),
            threads: handles,
        })
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<EngineOp>>) {
    loop {
        // A poisoned lock means another worker panicked while receiving, which
        // `recv` cannot do; take the receiver anyway rather than stop serving.
        let next = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        let Ok(op) = next else { return };
        let result = execute_blocking(op.request, op.max_transfer);
        (op.done)(result);
    }
}

impl IoEngine for SyncEngine {
    fn submit(&self, op: EngineOp) -> Result<(), Rejected> {
        Rejected::send_or_stopped(self.tx.as_ref(), op)
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        // Closing the channel lets each worker finish what is queued and exit.
        drop(self.tx.take());
        let me = thread::current().id();
        if self.thread_ids.contains(&me) {
            // Dropped from a completion callback on one of our own workers: joining
            // would wait for ourselves. The workers exit on their own.
            return;
        }
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a sync I/O worker panicked");
            }
        }
    }
}
