//! What serves an attached volume's blocks: a real [`Engine`], or (tests only) a
//! plain local file.
//!
//! The engine-host attaches whatever [`VolumeSource`] it was started with. Production
//! always uses [`VolumeSource::Engines`]. [`VolumeSource::TestFiles`] exists so the CSI
//! node logic (mkfs, mount, bind mounts, idempotency, plugin restarts) can be tested
//! on a machine without a running replica cluster; it is selected only by the hidden
//! `--file-backed-targets-for-tests` flag and keeps every volume in
//! `<dir>/<volume_id>.img`, so a re-attach finds the data written before.

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::{Engine, EngineConfig, EngineStatus, EngineTarget};
use crate::frontend::{BlockTarget, FileTarget, TargetError, TargetErrorKind, TargetOp};

use super::error::EngineHostError;

/// Where attached volumes get their data from.
#[derive(Debug, Clone)]
pub enum VolumeSource {
    /// One quorum [`Engine`] per volume, connected to the replicas named in the
    /// `publish_context`.
    Engines,
    /// Test only: a sparse local file per volume under this directory; no replicas.
    TestFiles(PathBuf),
}

impl VolumeSource {
    /// Short name reported in the engine-host API (`engine` or `file`).
    pub fn name(&self) -> &'static str {
        match self {
            VolumeSource::Engines => "engine",
            VolumeSource::TestFiles(_) => "file",
        }
    }

    /// Opens the volume described by `config`. The engine runs its tasks on the
    /// current (multi-threaded) tokio runtime.
    pub(crate) async fn open(&self, config: EngineConfig) -> Result<Opened, EngineHostError> {
        match self {
            VolumeSource::Engines => {
                let volume_id = config.volume_id.clone();
                let engine = Engine::open(config)
                    .await
                    .map_err(|source| EngineHostError::Engine { volume_id, source })?;
                let target = Arc::new(EngineTarget::new(
                    engine.clone(),
                    tokio::runtime::Handle::current(),
                ));
                Ok(Opened::Engine { engine, target })
            }
            VolumeSource::TestFiles(dir) => {
                let volume_id = config.volume_id.clone();
                let path = dir.join(format!("{volume_id}.img"));
                let size = config.expected_size.unwrap_or(0);
                let opened = tokio::task::spawn_blocking(move || {
                    let target = if path.exists() {
                        let t = FileTarget::open(&path)?;
                        if t.size() < size {
                            t.grow(size)?;
                        }
                        t
                    } else {
                        FileTarget::create(&path, size)?
                    };
                    Ok::<_, crate::frontend::FileTargetError>(target)
                })
                .await
                .map_err(|e| EngineHostError::Io {
                    volume_id: volume_id.clone(),
                    what: "open (task failed)",
                    path: dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?
                .map_err(|source| EngineHostError::FileTarget {
                    volume_id: volume_id.clone(),
                    source,
                })?;
                Ok(Opened::File(Arc::new(opened)))
            }
        }
    }
}

/// An opened volume: the [`BlockTarget`] the FUSE frontend serves, plus what the
/// engine-host needs to flush, close and report it.
#[derive(Clone)]
pub(crate) enum Opened {
    /// A quorum engine.
    Engine {
        engine: Engine,
        target: Arc<EngineTarget>,
    },
    /// A test file.
    File(Arc<FileTarget>),
}

impl Opened {
    /// What the FUSE frontend serves.
    pub(crate) fn block_target(&self) -> Arc<dyn BlockTarget> {
        match self {
            Opened::Engine { target, .. } => Arc::clone(target) as Arc<dyn BlockTarget>,
            Opened::File(f) => Arc::clone(f) as Arc<dyn BlockTarget>,
        }
    }

    /// Volume size in bytes.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Opened::Engine { engine, .. } => engine.size(),
            Opened::File(f) => f.size(),
        }
    }

    /// Grows the volume to what its replicas now hold (at least `wanted` when given);
    /// returns the new size. A test file grows to `wanted`.
    pub(crate) async fn resize(
        &self,
        volume_id: &str,
        wanted: Option<u64>,
    ) -> Result<u64, EngineHostError> {
        match self {
            Opened::Engine { engine, .. } => {
                engine
                    .resize(wanted)
                    .await
                    .map_err(|source| EngineHostError::Engine {
                        volume_id: volume_id.to_owned(),
                        source,
                    })
            }
            Opened::File(f) => {
                let Some(wanted) = wanted.filter(|w| *w > f.size()) else {
                    return Ok(f.size());
                };
                let f = Arc::clone(f);
                tokio::task::block_in_place(|| f.grow(wanted)).map_err(|source| {
                    EngineHostError::FileTarget {
                        volume_id: volume_id.to_owned(),
                        source,
                    }
                })?;
                Ok(wanted)
            }
        }
    }

    /// The engine's status; `None` for a test file.
    pub(crate) fn engine_status(&self) -> Option<EngineStatus> {
        match self {
            Opened::Engine { engine, .. } => Some(engine.status()),
            Opened::File(_) => None,
        }
    }

    /// Makes every acknowledged write durable. A fenced engine is not flushed: a newer
    /// engine owns the volume and this one can never complete I/O again.
    pub(crate) async fn flush(&self) -> Result<(), TargetError> {
        match self {
            Opened::Engine { engine, .. } => {
                if engine.status().fenced {
                    return Ok(());
                }
                engine.flush().await.map_err(|e| TargetError {
                    kind: TargetErrorKind::Io,
                    op: TargetOp::Flush,
                    offset: 0,
                    len: 0,
                    source: Some(Box::new(e)),
                })
            }
            Opened::File(f) => {
                let f = Arc::clone(f);
                match tokio::task::spawn_blocking(move || f.flush()).await {
                    Ok(r) => r,
                    Err(e) => Err(TargetError::from_io(
                        TargetOp::Flush,
                        0,
                        0,
                        std::io::Error::other(e.to_string()),
                    )),
                }
            }
        }
    }

    /// Flushes (when possible) and releases the replica connections. Failures are
    /// logged: by now the volume is no longer reachable through the kernel, so there
    /// is nobody to return them to but the log.
    pub(crate) async fn close(&self, volume_id: &str) {
        if let Opened::Engine { engine, .. } = self {
            if let Err(e) = engine.close().await {
                tracing::error!(volume = %volume_id, error = %tessera_telemetry::error_chain(&e), "closing the engine: final flush failed");
            }
        }
    }
}
