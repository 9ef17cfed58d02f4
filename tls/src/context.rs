//! A certificate directory in use, reloaded when its files change.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, some time after the
//! Secret changed; `tessera certs` rewrites files in place. Either way the files are
//! read again every reload period and, when their bytes differ, parsed and checked
//! like at start. A directory caught half-written (or holding a mismatched pair) is
//! refused with a warning and the old configuration stays until a later period finds
//! a good one: a bad rotation never takes a working process down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig};

use crate::identity::Identity;
use crate::material::{Configs, Files, TlsError};

/// A loaded certificate directory; clones share it.
#[derive(Clone)]
pub struct TlsContext {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    identity: Identity,
    state: RwLock<State>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

struct State {
    files: Files,
    configs: Configs,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("dir", &self.inner.dir)
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Loads `dir`, whose certificate must be one the CA in it issued for `identity`.
    pub fn load(dir: &Path, identity: Identity) -> Result<TlsContext, TlsError> {
        let files = Files::read(dir)?;
        let configs = Configs::build(dir, &files, identity)?;
        Ok(TlsContext {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                identity,
                state: RwLock::new(State { files, configs }),
                reloads: AtomicU64::new(0),
                reload_failures: AtomicU64::new(0),
            }),
        })
    }

    /// The identity this process presents.
    pub fn identity(&self) -> Identity {
        self.inner.identity
    }

    /// The directory the certificates come from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configuration for connections accepted from now on.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.state().configs.server)
    }

    /// The configuration for connections made from now on.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.state().configs.client)
    }

    /// Reads the directory again; when its files changed and make a valid
    /// configuration, that configuration replaces the current one. Returns whether
    /// it did; on an error the current configuration stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let result = self.try_reload();
        match &result {
            Ok(true) => {
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(_) => {
                self.inner.reload_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    fn try_reload(&self) -> Result<bool, TlsError> {
        let files = Files::read(&self.inner.dir)?;
        if files == self.state().files {
            return Ok(false);
        }
        let configs = Configs::build(&self.inner.dir, &files, self.inner.identity)?;
        let mut state = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        *state = State { files, configs };
        Ok(true)
    }

    /// Times the files changed and were taken.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// Times the files changed (or vanished) and could not be used.
    pub fn reload_failures(&self) -> u64 {
        self.inner.reload_failures.load(Ordering::Relaxed)
    }

    /// Reloads every `period` on the current tokio runtime, logging what happens,
    /// for as long as any clone of this context lives.
    pub fn spawn_reloader(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        every(period, move || {
            let Some(inner) = weak.upgrade() else {
                return false;
            };
            let context = TlsContext { inner };
            match context.reload() {
                Ok(true) => tracing::info!(
                    dir = %context.dir().display(),
                    identity = %context.identity(),
                    "TLS: certificates changed, new connections use them"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "TLS: certificates changed but cannot be used; keeping the previous ones"
                ),
            }
            true
        })
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Replaced whole under the lock: a poisoned state is still a consistent one.
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `step` every `period` on the current tokio runtime (the first time one
/// period from now) until it returns false: the reload loop of [`TlsContext`] and
/// [`crate::ServingCert`].
pub(crate) fn every(
    period: Duration,
    mut step: impl FnMut() -> bool + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !step() {
                return;
            }
        }
    })
}
