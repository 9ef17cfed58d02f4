//! The TLS server certificate of a port whose callers bring no certificate (the
//! SnapshotMetadata API: backup applications prove who they are with Kubernetes
//! tokens), reloaded when its files change, as a [`crate::TlsContext`] is: a rotated
//! Secret is taken without a restart, a half-written or mismatched pair is refused
//! with a warning while the current one stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::ServerConfig;

use crate::context::every;
use crate::material::{serving_config, ServingFiles, TlsError};

/// A loaded serving certificate directory (`tls.crt`, `tls.key`); clones share it.
#[derive(Clone)]
pub struct ServingCert {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    state: RwLock<(ServingFiles, Arc<ServerConfig>)>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Loads `dir`: its certificate and the key that matches it.
    pub fn load(dir: &Path) -> Result<ServingCert, TlsError> {
        let files = ServingFiles::read(dir)?;
        let config = serving_config(dir, &files)?;
        Ok(ServingCert {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                state: RwLock::new((files, config)),
            }),
        })
    }

    /// The configuration for connections accepted from now on.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        // Replaced whole under the lock: a poisoned state is still a consistent one.
        let state = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&state.1)
    }

    /// Reads the directory again; when its files changed and make a valid
    /// configuration, that one is used from now on. Returns whether it was; on an
    /// error the current configuration stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let dir = &self.inner.dir;
        let files = ServingFiles::read(dir)?;
        {
            let state = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
            if state.0 == files {
                return Ok(false);
            }
        }
        let config = serving_config(dir, &files)?;
        *self.inner.state.write().unwrap_or_else(|e| e.into_inner()) = (files, config);
        Ok(true)
    }

    /// Reloads every `period` on the current tokio runtime, logging what happens,
    /// for as long as any clone lives.
    pub fn spawn_reloader(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        every(period, move || {
            let Some(inner) = weak.upgrade() else {
                return false;
            };
            let serving = ServingCert { inner };
            match serving.reload() {
                Ok(true) => tracing::info!(dir = %serving.inner.dir.display(),
                    "TLS: serving certificate changed, new connections use it"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e,
                    "TLS: serving certificate changed but cannot be used; keeping the previous one"),
            }
            true
        })
    }
}
