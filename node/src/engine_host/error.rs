//! The engine-host's error type and its mapping to gRPC status codes.
//!
//! The node plugin forwards some of these codes to the CO unchanged (an invalid
//! `publish_context` is the CO's INVALID_ARGUMENT, an older epoch is its
//! FAILED_PRECONDITION), so the mapping follows the CSI spec's meaning of each code.

use std::io;
use std::path::PathBuf;

use tessera_telemetry::error_chain;
use tonic::Status;

use crate::engine::{ConfigError, EngineError, EngineErrorKind};
use crate::frontend::{FuseError, LoopError, TargetError};

/// Why an engine-host operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineHostError {
    /// The volume id is empty or cannot be used as a path component.
    #[error("invalid volume id {volume_id:?}: {reason}")]
    InvalidVolumeId {
        /// The id as given.
        volume_id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The `publish_context` lacks a key or holds a malformed value.
    #[error("volume {volume_id}: invalid publish_context")]
    PublishContext {
        /// The volume.
        volume_id: String,
        /// Which key and why.
        #[source]
        source: ConfigError,
    },
    /// The volume is attached with a newer epoch than the one asked for: the request
    /// comes from an older publish and must not replace the running engine.
    #[error(
        "volume {volume_id} is attached with epoch {attached}; refusing older epoch {requested}"
    )]
    StaleEpoch {
        /// The volume.
        volume_id: String,
        /// Epoch in the request.
        requested: u64,
        /// Epoch of the running engine.
        attached: u64,
    },
    /// Opening the engine failed.
    #[error("volume {volume_id}: cannot open the engine")]
    Engine {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: EngineError,
    },
    /// Flushing the engine before detaching failed; the volume stays attached so a
    /// retry can flush again (the loop device is already gone).
    #[error("volume {volume_id}: flushing before detach failed; retry the detach")]
    Flush {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: TargetError,
    },
    /// Mounting or unmounting the FUSE file failed.
    #[error("volume {volume_id}: FUSE frontend failed")]
    Fuse {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: FuseError,
    },
    /// Attaching or detaching the loop device failed.
    #[error("volume {volume_id}: loop device failed")]
    Loop {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: LoopError,
    },
    /// A filesystem call on the engine-host's own state directory failed.
    #[error("volume {volume_id}: cannot {what} {path}")]
    Io {
        /// The volume.
        volume_id: String,
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The loop device is still held by a mounted filesystem; detaching it would pull
    /// the volume from under its users.
    #[error("volume {volume_id}: {device} is still in use (a filesystem is mounted from it); unmount it first")]
    InUse {
        /// The volume.
        volume_id: String,
        /// The loop device.
        device: PathBuf,
    },
    /// The volume is not attached here.
    #[error("volume {volume_id} is not attached to this engine-host")]
    NotAttached {
        /// The volume.
        volume_id: String,
    },
    /// The engine-host is shutting down and takes no new work.
    #[error("the engine-host is shutting down")]
    ShuttingDown,
}

impl EngineHostError {
    /// The gRPC code that tells the caller what to do about this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            EngineHostError::InvalidVolumeId { .. } | EngineHostError::PublishContext { .. } => {
                Code::InvalidArgument
            }
            EngineHostError::StaleEpoch { .. } | EngineHostError::InUse { .. } => {
                Code::FailedPrecondition
            }
            EngineHostError::Engine { source, .. } => match source {
                EngineError::SizeMismatch { .. } | EngineError::NotExpanded { .. } => {
                    Code::FailedPrecondition
                }
                e => match e.kind() {
                    // The volume moved to a newer epoch: this publish is outdated.
                    EngineErrorKind::Fenced => Code::FailedPrecondition,
                    EngineErrorKind::InvalidRequest => Code::InvalidArgument,
                    // Not enough replicas reachable: retrying later may work.
                    _ => Code::Unavailable,
                },
            },
            EngineHostError::Flush { .. } => Code::Unavailable,
            EngineHostError::NotAttached { .. } => Code::NotFound,
            EngineHostError::ShuttingDown => Code::Unavailable,
            EngineHostError::Fuse { .. }
            | EngineHostError::Loop { .. }
            | EngineHostError::Io { .. } => Code::Internal,
        }
    }
}

impl From<EngineHostError> for Status {
    fn from(e: EngineHostError) -> Status {
        Status::new(e.code(), error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_replica_protocol::publish_context::PublishContextError;

    #[test]
    fn codes_follow_what_the_caller_must_do() {
        let stale = EngineHostError::StaleEpoch {
            volume_id: "v".into(),
            requested: 1,
            attached: 2,
        };
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
        let ctx = EngineHostError::PublishContext {
            volume_id: "v".into(),
            source: ConfigError::PublishContext(PublishContextError::MissingKey { key: "epoch" }),
        };
        assert_eq!(ctx.code(), tonic::Code::InvalidArgument);
        let status = Status::from(ctx);
        assert!(status.message().contains("epoch"), "{}", status.message());
        let fenced = EngineHostError::Engine {
            volume_id: "v".into(),
            source: EngineError::Fenced {
                volume_id: "v".into(),
                epoch: 1,
                replica_epoch: 3,
                node_id: "n".into(),
            },
        };
        assert_eq!(fenced.code(), tonic::Code::FailedPrecondition);
        let quorum = EngineHostError::Engine {
            volume_id: "v".into(),
            source: EngineError::OpenQuorum {
                volume_id: "v".into(),
                connected: 1,
                total: 3,
                needed: 2,
                failures: String::new(),
            },
        };
        assert_eq!(quorum.code(), tonic::Code::Unavailable);
    }
}
