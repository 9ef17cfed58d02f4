//! What serves an attached volume's blocks: a quorum [`Engine`] connected to the
//! replicas named in the volume's `publish_context`, behind the [`BlockTarget`] the
//! FUSE frontend serves.

use std::sync::Arc;

use tessera_telemetry::VolumeOpHistograms;

use crate::engine::{Engine, EngineConfig, EngineStatus, EngineTarget};
use crate::frontend::{BlockTarget, TargetError, TargetErrorKind, TargetOp};

use super::error::EngineHostError;

/// What the engine-host API reports as the backend of every volume.
pub const BACKEND: &str = "engine";

/// An opened volume: its engine and the [`BlockTarget`] over it.
#[derive(Clone)]
pub(crate) struct Opened {
    engine: Engine,
    target: Arc<EngineTarget>,
}

impl Opened {
    /// Opens the engine described by `config`. It runs its tasks on the current
    /// (multi-threaded) tokio runtime.
    pub(crate) async fn open(config: EngineConfig) -> Result<Opened, EngineHostError> {
        let volume_id = config.volume_id.clone();
        let engine = Engine::open(config)
            .await
            .map_err(|source| EngineHostError::Engine { volume_id, source })?;
        let target = Arc::new(EngineTarget::new(
            engine.clone(),
            tokio::runtime::Handle::current(),
        ));
        Ok(Opened { engine, target })
    }

    /// Records the engine's request latency in `histograms` (the engine-host's
    /// `/metrics`).
    pub(crate) fn record_latency(&self, histograms: Arc<VolumeOpHistograms>) {
        self.engine.record_latency(histograms);
    }

    /// What the FUSE frontend serves.
    pub(crate) fn block_target(&self) -> Arc<dyn BlockTarget> {
        Arc::clone(&self.target) as Arc<dyn BlockTarget>
    }

    /// Volume size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.engine.size()
    }

    /// Grows the volume to what its replicas now hold (at least `wanted` when given);
    /// returns the new size.
    pub(crate) async fn resize(
        &self,
        volume_id: &str,
        wanted: Option<u64>,
    ) -> Result<u64, EngineHostError> {
        self.engine
            .resize(wanted)
            .await
            .map_err(|source| EngineHostError::Engine {
                volume_id: volume_id.to_owned(),
                source,
            })
    }

    /// The engine's status.
    pub(crate) fn engine_status(&self) -> EngineStatus {
        self.engine.status()
    }

    /// Makes every acknowledged write durable. A fenced engine is not flushed: a newer
    /// engine owns the volume and this one can never complete I/O again.
    pub(crate) async fn flush(&self) -> Result<(), TargetError> {
        if self.engine.status().fenced {
            return Ok(());
        }
        self.engine.flush().await.map_err(|e| TargetError {
            kind: TargetErrorKind::Io,
            op: TargetOp::Flush,
            offset: 0,
            len: 0,
            source: Some(Box::new(e)),
        })
    }

    /// Flushes (when possible) and releases the replica connections. Failures are
    /// logged: by now the volume is no longer reachable through the kernel, so there
    /// is nobody to return them to but the log.
    pub(crate) async fn close(&self, volume_id: &str) {
        if let Err(e) = self.engine.close().await {
            tracing::error!(volume = %volume_id, error = %tessera_telemetry::error_chain(&e), "closing the engine: final flush failed");
        }
    }
}
