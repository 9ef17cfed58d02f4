//! Turning SIGINT/SIGTERM into an orderly stop.
//!
//! `tessera up` must tear down what it started whenever it is asked to stop, also in
//! the middle of starting or of the demo. The handlers are installed first thing, so
//! from then on a signal never kills `tessera` outright: it sets a flag that long
//! steps check (the blocking file I/O of the demo polls it) and wakes every async
//! wait racing against [`Stop::interruptible`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// The error a step returns when it was cut short by a stop request.
#[derive(Debug, Clone, Copy)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by a stop signal")
    }
}

impl std::error::Error for Interrupted {}

/// Whether `err` (or its cause chain) is an [`Interrupted`].
pub fn is_interrupted(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<Interrupted>())
}

/// A stop request, shared by everything that waits.
#[derive(Debug, Clone)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    rx: watch::Receiver<bool>,
}

impl Stop {
    /// Installs the SIGINT and SIGTERM handlers.
    pub fn install() -> anyhow::Result<Self> {
        let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(false);
        let set = Arc::clone(&flag);
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                if set.swap(true, Ordering::SeqCst) {
                    println!("tessera: {name} again; still tearing down, please wait");
                } else {
                    println!("\ntessera: {name} received, tearing down");
                }
                let _ = tx.send(true);
            }
        });
        Ok(Self { flag, rx })
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The flag itself, for blocking code running on another thread.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }

    /// Completes once a stop was requested.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the signal task is gone, which only happens at exit.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Runs `fut` unless a stop is requested first, in which case it is dropped and
    /// [`Interrupted`] returned.
    pub async fn interruptible<F: Future>(&self, fut: F) -> Result<F::Output, Interrupted> {
        if self.requested() {
            return Err(Interrupted);
        }
        tokio::select! {
            out = fut => Ok(out),
            () = self.wait() => Err(Interrupted),
        }
    }
}
