//! The controller's error type and its mapping to CSI gRPC status codes.
//!
//! Every failure inside the controller is a [`ControllerError`]; the service edge turns
//! it into a `tonic::Status` with the code the CSI spec prescribes for that RPC. The
//! variants are split by *code*, not by call site, so the mapping is one `match`.

use tonic::{Code, Status};

use crate::capabilities::CapabilityError;
use crate::capacity::CapacityError;
use crate::parameters::ParameterError;
use crate::placement::PlacementError;
use crate::volume_index::InvalidToken;

/// An error of a CSI call.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A required field is missing or a field is malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// A StorageClass parameter is unknown or invalid (INVALID_ARGUMENT).
    #[error(transparent)]
    Parameter(#[from] ParameterError),
    /// A volume capability is not supported (INVALID_ARGUMENT).
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    /// A capacity range is negative (INVALID_ARGUMENT) or unsatisfiable (OUT_OF_RANGE).
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// No replica set can be chosen (OUT_OF_RANGE or RESOURCE_EXHAUSTED).
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A ListVolumes token this controller did not issue (ABORTED).
    #[error(transparent)]
    InvalidToken(#[from] InvalidToken),
    /// The volume does not exist (NOT_FOUND).
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    /// The snapshot does not exist (NOT_FOUND).
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    /// The node is neither a replica daemon node nor an extra node (NOT_FOUND).
    #[error("node {0:?} is not a known node (not a replica daemon node and not in --extra-nodes)")]
    NodeNotFound(String),
    /// An incompatible object with the same name or attachment exists (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The volume is in a state that forbids the call (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size outside what the volume can become, e.g. a shrink (OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough space on the replicas (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Too few replicas answered; the CO should retry (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A compare-and-set kept losing against another writer (ABORTED).
    #[error("{0}")]
    Aborted(String),
    /// A replica answered something that breaks the protocol contract (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

impl ControllerError {
    /// The gRPC code the CSI spec prescribes for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) | Self::Parameter(_) | Self::Capability(_) => {
                Code::InvalidArgument
            }
            Self::Capacity(CapacityError::Negative { .. }) => Code::InvalidArgument,
            Self::Capacity(
                CapacityError::Unsatisfiable { .. } | CapacityError::BelowFilesystemMinimum { .. },
            ) => Code::OutOfRange,
            Self::Placement(PlacementError::NotEnoughNodes { .. }) => Code::OutOfRange,
            Self::Placement(PlacementError::TopologyExcluded { .. }) => Code::ResourceExhausted,
            Self::InvalidToken(_) | Self::Aborted(_) => Code::Aborted,
            Self::VolumeNotFound(_) | Self::NodeNotFound(_) | Self::SnapshotNotFound(_) => {
                Code::NotFound
            }
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ControllerError> for Status {
    fn from(e: ControllerError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec() {
        let unsat = ControllerError::from(CapacityError::Unsatisfiable {
            required: 2,
            limit: 1,
        });
        assert_eq!(Status::from(unsat).code(), Code::OutOfRange);
        let small = ControllerError::from(CapacityError::BelowFilesystemMinimum {
            fs: crate::fs_type::FsType::Xfs,
            minimum: 300 << 20,
            limit: 1 << 20,
        });
        assert_eq!(small.code(), Code::OutOfRange);
        let neg = ControllerError::from(CapacityError::Negative {
            field: "limit_bytes",
            value: -1,
        });
        assert_eq!(neg.code(), Code::InvalidArgument);
        let topo = ControllerError::from(PlacementError::TopologyExcluded {
            fit_in_topology: 1,
            fit: 3,
            rf: 3,
            size_bytes: 1,
        });
        assert_eq!(topo.code(), Code::ResourceExhausted);
        let nodes = ControllerError::from(PlacementError::NotEnoughNodes {
            fit: 1,
            rf: 3,
            size_bytes: 1,
        });
        assert_eq!(nodes.code(), Code::OutOfRange);
        assert_eq!(
            ControllerError::from(InvalidToken("x".into())).code(),
            Code::Aborted
        );
        let msg = Status::from(ControllerError::from(ParameterError::UnknownKey {
            key: "foo".into(),
        }));
        assert_eq!(msg.code(), Code::InvalidArgument);
        assert!(msg.message().contains("foo"));
    }
}
