//! Why a Node RPC failed, and the CSI status code each failure maps to.

use super::*;

/// Why a Node RPC failed; [`NodeError::code`] picks the CSI status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A required field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A field holds a value that cannot be used.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The capability asks for something this volume cannot do.
    #[error("unsupported capability: {0}")]
    Unsupported(String),
    /// The volume is not staged where the request says.
    #[error("volume {volume_id} is not staged at {path}: {reason}")]
    NotStaged {
        /// The volume.
        volume_id: String,
        /// The staging path.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// Something else occupies a path the request wants to use.
    #[error("{path} is in use by something other than volume {volume_id}: {reason}")]
    PathConflict {
        /// The volume.
        volume_id: String,
        /// The path.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
    /// The volume is already staged or published at the path with other options.
    #[error("volume {volume_id} is already at {path} with different options: {reason}")]
    Incompatible {
        /// The volume.
        volume_id: String,
        /// The path.
        path: PathBuf,
        /// How it differs.
        reason: String,
    },
    /// The device holds data of another kind than requested; it is never reformatted.
    #[error(
        "volume {volume_id}: device {device} holds {found}, not {wanted}; refusing to format it"
    )]
    WrongContent {
        /// The volume.
        volume_id: String,
        /// The device.
        device: PathBuf,
        /// What blkid found.
        found: String,
        /// The filesystem asked for.
        wanted: FsType,
    },
    /// The volume is unknown here, or not at the given path.
    #[error("volume {volume_id} not found{where_}")]
    NotFound {
        /// The volume.
        volume_id: String,
        /// ` at <path>` or empty.
        where_: String,
    },
    /// Another operation on the same volume is in progress.
    #[error("an operation on volume {0} is already in progress")]
    Busy(String),
    /// The engine-host answered with an error (its code is kept).
    #[error("engine-host: {0}")]
    EngineHost(Status),
    /// A mount operation failed.
    #[error("volume {volume_id}")]
    Mount {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: MountError,
    },
    /// Probing or formatting the device failed.
    #[error("volume {volume_id}")]
    Mkfs {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: MkfsError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl NodeError {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            NodeError::Missing(_) | NodeError::Invalid { .. } => Code::InvalidArgument,
            NodeError::Unsupported(_)
            | NodeError::NotStaged { .. }
            | NodeError::PathConflict { .. }
            | NodeError::WrongContent { .. } => Code::FailedPrecondition,
            NodeError::Incompatible { .. } => Code::AlreadyExists,
            NodeError::NotFound { .. } => Code::NotFound,
            NodeError::Busy(_) => Code::Aborted,
            NodeError::EngineHost(s) => s.code(),
            NodeError::Mount {
                source: MountError::InvalidFlag { .. },
                ..
            } => Code::InvalidArgument,
            NodeError::Mount { .. } | NodeError::Mkfs { .. } | NodeError::Task(_) => Code::Internal,
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let message = match &e {
            NodeError::EngineHost(s) => format!("engine-host: {}", s.message()),
            other => error_chain(other),
        };
        Status::new(e.code(), message)
    }
}
