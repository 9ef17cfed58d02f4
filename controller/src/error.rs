//! The controller's error type and its mapping to CSI gRPC status codes.
//!
//! Every failure inside the controller is a [`ControllerError`]; the service edge turns
//! it into a `tonic::Status` with the code the CSI spec prescribes for that RPC. The
//! variants say what went wrong and where (which volume or snapshot; for replica
//! trouble, which replicas failed and how, [`crate::quorum`]); they are grouped by
//! code, and the mapping is one `match`.

use tonic::{Code, Status};

use crate::capabilities::CapabilityError;
use crate::capacity::CapacityError;
use crate::fs_type::FsType;
use crate::parameters::ParameterError;
use crate::placement::PlacementError;
use crate::quorum::{Failures, Op, QuorumError, ReplicaError, ReplicaFailure, Shortfall};
use crate::volume_index::InvalidToken;

/// An error of a CSI call.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    // --- INVALID_ARGUMENT ------------------------------------------------------------
    /// A required field is missing or empty.
    #[error("{field} is required")]
    Missing {
        /// The request field.
        field: &'static str,
    },
    /// A count that must not be negative is.
    #[error("{field} must not be negative (got {value})")]
    Negative {
        /// The request field.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// An expansion asks for no size.
    #[error("capacity_range.required_bytes must be positive (got {required_bytes})")]
    NoExpansionSize {
        /// The requested size.
        required_bytes: i64,
    },
    /// The fsType parameter and the mount capability name different filesystems.
    #[error(
        "parameter fsType={parameter} conflicts with the mount capability's fs_type {capability}"
    )]
    FsTypeConflict {
        /// The StorageClass parameter.
        parameter: FsType,
        /// The capability's fs_type.
        capability: FsType,
    },
    /// A publish asks for an access type (block or mount) the volume was not made for.
    #[error("volume {volume} was created with access type {recorded:?}; the capability asks for another")]
    AccessTypeMismatch {
        /// The volume id.
        volume: String,
        /// The access type in its record.
        recorded: String,
    },
    /// A content source naming neither a snapshot nor a volume.
    #[error("volume_content_source names neither a snapshot nor a volume")]
    EmptyContentSource,
    /// A delta's base snapshot is not older than its target (the holder said so).
    #[error("base snapshot is not older than snapshot {target}: {reason}")]
    BaseNotOlder {
        /// The target snapshot id.
        target: String,
        /// The holder's words.
        reason: String,
    },
    /// A delta between snapshots of two volumes.
    #[error("base snapshot {base} is of volume {base_volume}, target snapshot {target} of volume {target_volume}")]
    SnapshotsOfDifferentVolumes {
        /// Base snapshot id.
        base: String,
        /// Its volume.
        base_volume: String,
        /// Target snapshot id.
        target: String,
        /// Its volume.
        target_volume: String,
    },
    /// A delta whose target was not created after its base.
    #[error("target snapshot {target} must be created after base snapshot {base}")]
    TargetNotAfterBase {
        /// Base snapshot id.
        base: String,
        /// Target snapshot id.
        target: String,
    },
    /// A StorageClass parameter is unknown or invalid.
    #[error(transparent)]
    Parameter(#[from] ParameterError),
    /// A volume capability is not supported.
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    /// A capacity range is negative (INVALID_ARGUMENT) or unsatisfiable (OUT_OF_RANGE).
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// No replica set can be chosen (OUT_OF_RANGE or RESOURCE_EXHAUSTED).
    #[error(transparent)]
    Placement(#[from] PlacementError),

    // --- ABORTED ---------------------------------------------------------------------
    /// A ListVolumes token this controller did not issue.
    #[error(transparent)]
    InvalidToken(#[from] InvalidToken),
    /// A ListSnapshots token this controller did not issue.
    #[error("starting_token {0:?} was not issued by this driver")]
    InvalidSnapshotToken(String),
    /// A restore or clone still copying when `--copy-wait` ran out; the CO retries.
    #[error("volume {volume}: {progress}; CreateVolume again to keep waiting")]
    CopyPending {
        /// The new volume's id.
        volume: String,
        /// Its copy progress ("restoring from snapshot X: 43% (n/m bytes)").
        progress: String,
    },
    /// A replacement of a lost replica found the replica set changed by someone else
    /// (another controller instance's healing pass); the next pass looks again.
    #[error("volume {volume}: its replica set changed while a replacement was being made")]
    ReplicaSetChanged {
        /// The volume id.
        volume: String,
    },

    // --- NOT_FOUND -------------------------------------------------------------------
    /// The volume does not exist.
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    /// The snapshot does not exist.
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    /// The node is neither a replica daemon node nor an extra node.
    #[error("node {0:?} is not a known node (not a replica daemon node and not in --extra-nodes)")]
    NodeNotFound(String),

    // --- ALREADY_EXISTS --------------------------------------------------------------
    /// A CreateVolume repeated with another content source.
    #[error("volume {name:?} exists with another content source")]
    ExistsWithOtherSource {
        /// The CSI name.
        name: String,
    },
    /// A CreateVolume repeated with arguments the existing volume does not satisfy.
    #[error("volume {name:?} exists with {difference}")]
    ExistsIncompatible {
        /// The CSI name.
        name: String,
        /// What differs.
        difference: Difference,
    },
    /// A publish to the same node with the other readonly flag.
    #[error("volume {volume} is already published to node {node} with readonly={readonly}")]
    PublishedWithOtherReadonly {
        /// The volume id.
        volume: String,
        /// The node it is published to.
        node: String,
        /// The readonly flag of that publish.
        readonly: bool,
    },
    /// A CreateSnapshot repeated for another source volume.
    #[error("snapshot {name:?} exists of volume {volume}, not {requested}")]
    SnapshotOfOtherVolume {
        /// The CSI name.
        name: String,
        /// The existing snapshot's volume.
        volume: String,
        /// The volume asked for.
        requested: String,
    },

    // --- FAILED_PRECONDITION ---------------------------------------------------------
    /// DeleteVolume of a published volume.
    #[error("volume {volume} is published to node {node}; unpublish it first")]
    StillPublished {
        /// The volume id.
        volume: String,
        /// A node it is published to.
        node: String,
    },
    /// A publish to a second node; Tessera volumes are single-node.
    #[error("volume {volume} is published to node {node}; Tessera volumes are single-node")]
    PublishedElsewhere {
        /// The volume id.
        volume: String,
        /// The node it is published to.
        node: String,
    },
    /// DeleteSnapshot of a snapshot a restore still copies from.
    #[error("snapshot {snapshot} is in use: {user} is still being restored from it")]
    SnapshotInUse {
        /// The snapshot id.
        snapshot: String,
        /// The restoring volume and its progress.
        user: String,
    },
    /// The fencing epoch cannot grow any more.
    #[error("volume {volume}: its replicas hold epoch {epoch}, the largest a write sequence number can carry; it cannot be published again")]
    EpochExhausted {
        /// The volume id.
        volume: String,
        /// The highest epoch its replicas hold.
        epoch: u64,
    },

    // --- OUT_OF_RANGE ----------------------------------------------------------------
    /// An expansion to less than the volume holds.
    #[error("volume {volume} holds {size} bytes; volumes cannot shrink to {requested}")]
    Shrink {
        /// The volume id.
        volume: String,
        /// Its size.
        size: u64,
        /// The size asked for.
        requested: u64,
    },
    /// An expansion whose limit is below the volume's size.
    #[error("volume {volume} holds {size} bytes, more than limit_bytes {limit}")]
    LimitBelowSize {
        /// The volume id.
        volume: String,
        /// Its size.
        size: u64,
        /// The limit asked for.
        limit: u64,
    },
    /// A restore or clone asking for less than its source holds.
    #[error("requested {requested} bytes, less than the source's {source_size} bytes")]
    CopySmallerThanSource {
        /// The size asked for.
        requested: u64,
        /// The source's size.
        source_size: u64,
    },
    /// A restore or clone limited below its source's size.
    #[error("limit_bytes {limit} is less than the source's {source_size} bytes")]
    CopyLimitBelowSource {
        /// The limit asked for.
        limit: i64,
        /// The source's size.
        source_size: u64,
    },
    /// A metadata request starting outside the snapshot.
    #[error("starting_offset {offset} is outside the snapshot ({} bytes)", .size.map_or_else(|| "?".to_string(), |s| s.to_string()))]
    OffsetOutsideSnapshot {
        /// The offset asked for.
        offset: i64,
        /// The snapshot's size, once known.
        size: Option<u64>,
    },

    // --- replicas --------------------------------------------------------------------
    /// A quorum read or compare-and-set failed (NOT_FOUND, UNAVAILABLE or ABORTED).
    #[error(transparent)]
    Quorum(#[from] QuorumError),
    /// CreateVolume reached fewer than a majority of the new replicas (rolled back):
    /// RESOURCE_EXHAUSTED if a replica was out of space, ALREADY_EXISTS if one held the
    /// id with another size, else UNAVAILABLE.
    #[error("creating volume {volume}: {shortfall}")]
    CreateFailed {
        /// The volume id.
        volume: String,
        /// Who created it and who did not.
        shortfall: Shortfall,
    },
    /// A replica refused for good: out of space (RESOURCE_EXHAUSTED) or out of its
    /// range (OUT_OF_RANGE).
    #[error("{op}: {refusal}")]
    Refused {
        /// What was refused.
        op: Op,
        /// The replica and its refusal.
        refusal: Box<ReplicaError>,
    },
    /// DeleteVolume did not reach every replica; the CO retries (UNAVAILABLE).
    #[error("volume {volume} not yet deleted on every replica: {failures}")]
    NotDeletedEverywhere {
        /// The volume id.
        volume: String,
        /// The replicas still holding it.
        failures: Failures,
    },
    /// DeleteSnapshot did not reach every holder; the CO retries (UNAVAILABLE).
    #[error("snapshot {snapshot} not yet deleted everywhere: {failures}")]
    SnapshotNotDeletedEverywhere {
        /// The snapshot id.
        snapshot: String,
        /// The holders still holding it.
        failures: Failures,
    },
    /// No daemon answered a snapshot listing, which must not pass for "none" (UNAVAILABLE).
    #[error("no replica daemon answered ListSnapshots ({live} live)")]
    NoDaemonAnswered {
        /// Daemons believed live.
        live: usize,
    },
    /// A restore of a snapshot sealed on fewer than a majority of reachable replicas
    /// (UNAVAILABLE).
    #[error(
        "snapshot {snapshot} is sealed on {sealed} reachable replicas; restoring it needs {needed}"
    )]
    SnapshotNotReady {
        /// The snapshot id.
        snapshot: String,
        /// Reachable holders.
        sealed: usize,
        /// Holders needed.
        needed: usize,
    },
    /// Too few reachable daemons hold a snapshot (and a delta's base) (UNAVAILABLE).
    #[error("only {holders} reachable daemons hold snapshot {snapshot}{}, {needed} are needed", .base.as_ref().map(|b| format!(" and {b}")).unwrap_or_default())]
    TooFewHolders {
        /// The snapshot id.
        snapshot: String,
        /// A delta's base snapshot id.
        base: Option<String>,
        /// Reachable holders.
        holders: usize,
        /// Holders needed.
        needed: usize,
    },
    /// A snapshot or clone of a volume whose own copy is incomplete (UNAVAILABLE).
    #[error("volume {volume} is not populated yet ({progress}); retry once it is")]
    NotPopulated {
        /// The volume id.
        volume: String,
        /// Its copy progress.
        progress: String,
    },
    /// The id a name hashes to is held by a volume of another name (INTERNAL).
    #[error("volume id {volume} of name {name:?} is held by volume {holder:?}")]
    IdHeldByOtherName {
        /// The volume id.
        volume: String,
        /// The name asked for.
        name: String,
        /// The name of the volume holding the id.
        holder: String,
    },
}

/// How an existing volume differs from a repeated CreateVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Its size is outside the requested range.
    Size(u64),
    /// Its parameters differ.
    Parameters,
    /// Its access type (block or mount) does not fit the capabilities.
    AccessType(String),
    /// Some replica is outside the requested zones.
    Zones,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Size(size) => write!(f, "{size} bytes, outside the requested capacity range"),
            Self::Parameters => f.write_str("different parameters"),
            Self::AccessType(t) => write!(
                f,
                "access type {t:?}, incompatible with the requested capabilities"
            ),
            Self::Zones => f.write_str("replicas outside the requested zones"),
        }
    }
}

/// MISSING (INVALID_ARGUMENT) when the request field `field` is empty.
pub fn required(field: &'static str, value: &str) -> Result<(), ControllerError> {
    if value.is_empty() {
        return Err(ControllerError::Missing { field });
    }
    Ok(())
}

impl ControllerError {
    /// The gRPC code the CSI spec prescribes for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::Missing { .. }
            | Self::Negative { .. }
            | Self::NoExpansionSize { .. }
            | Self::FsTypeConflict { .. }
            | Self::AccessTypeMismatch { .. }
            | Self::EmptyContentSource
            | Self::BaseNotOlder { .. }
            | Self::SnapshotsOfDifferentVolumes { .. }
            | Self::TargetNotAfterBase { .. }
            | Self::Parameter(_)
            | Self::Capability(_)
            | Self::Capacity(CapacityError::Negative { .. }) => Code::InvalidArgument,
            Self::Capacity(
                CapacityError::Unsatisfiable { .. } | CapacityError::BelowFilesystemMinimum { .. },
            ) => Code::OutOfRange,
            Self::Placement(PlacementError::NotEnoughNodes { .. }) => Code::OutOfRange,
            Self::Placement(PlacementError::TopologyExcluded { .. }) => Code::ResourceExhausted,
            Self::InvalidToken(_)
            | Self::InvalidSnapshotToken(_)
            | Self::CopyPending { .. }
            | Self::ReplicaSetChanged { .. }
            | Self::Quorum(QuorumError::LostRaces { .. }) => Code::Aborted,
            Self::VolumeNotFound(_)
            | Self::NodeNotFound(_)
            | Self::SnapshotNotFound(_)
            | Self::Quorum(QuorumError::VolumeNotFound { .. }) => Code::NotFound,
            Self::ExistsWithOtherSource { .. }
            | Self::ExistsIncompatible { .. }
            | Self::PublishedWithOtherReadonly { .. }
            | Self::SnapshotOfOtherVolume { .. } => Code::AlreadyExists,
            Self::StillPublished { .. }
            | Self::PublishedElsewhere { .. }
            | Self::SnapshotInUse { .. }
            | Self::EpochExhausted { .. } => Code::FailedPrecondition,
            Self::Shrink { .. }
            | Self::LimitBelowSize { .. }
            | Self::CopySmallerThanSource { .. }
            | Self::CopyLimitBelowSource { .. }
            | Self::OffsetOutsideSnapshot { .. } => Code::OutOfRange,
            Self::CreateFailed { shortfall, .. } => {
                let failures = &shortfall.failures;
                if failures.any(|f| matches!(f, ReplicaFailure::OutOfSpace(_))) {
                    Code::ResourceExhausted
                } else if failures.any(|f| matches!(f, ReplicaFailure::AlreadyExists(_))) {
                    Code::AlreadyExists
                } else {
                    Code::Unavailable
                }
            }
            Self::Refused { refusal, .. } => match refusal.failure {
                ReplicaFailure::OutOfRange(_) => Code::OutOfRange,
                _ => Code::ResourceExhausted,
            },
            Self::Quorum(QuorumError::NoMajority { .. })
            | Self::NotDeletedEverywhere { .. }
            | Self::SnapshotNotDeletedEverywhere { .. }
            | Self::NoDaemonAnswered { .. }
            | Self::SnapshotNotReady { .. }
            | Self::TooFewHolders { .. }
            | Self::NotPopulated { .. } => Code::Unavailable,
            Self::IdHeldByOtherName { .. } => Code::Internal,
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

    fn failure(node: &str, failure: ReplicaFailure) -> ReplicaError {
        ReplicaError {
            replica: crate::quorum::tests_support::replica(node),
            failure,
        }
    }

    #[test]
    fn a_failed_create_names_the_worst_replica_failure() {
        let create = |failures: Vec<ReplicaError>| ControllerError::CreateFailed {
            volume: "tv-1".into(),
            shortfall: Shortfall {
                reached: 1,
                total: 3,
                needed: 2,
                failures: Failures(failures),
            },
        };
        let down = failure("n2", ReplicaFailure::Unreachable("down".into()));
        let full = failure("n3", ReplicaFailure::OutOfSpace("full".into()));
        let other_size = failure("n3", ReplicaFailure::AlreadyExists("4096 bytes".into()));
        assert_eq!(create(vec![down.clone()]).code(), Code::Unavailable);
        assert_eq!(
            create(vec![down.clone(), other_size.clone()]).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            create(vec![other_size, full.clone()]).code(),
            Code::ResourceExhausted
        );
        let msg = create(vec![down, full]).to_string();
        assert!(
            msg.starts_with("creating volume tv-1: 1 of 3 replicas succeeded, 2 are needed: n2"),
            "{msg}"
        );
        assert!(msg.contains("n3 (n3:7000): out of space: full"), "{msg}");
    }

    #[test]
    fn quorum_and_refusal_codes() {
        let op = Op::Expand {
            volume: "tv-1".into(),
            size: 8192,
        };
        let refused = |f| ControllerError::Refused {
            op: op.clone(),
            refusal: Box::new(failure("n1", f)),
        };
        assert_eq!(
            refused(ReplicaFailure::OutOfSpace("full".into())).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            refused(ReplicaFailure::OutOfRange("shrink".into())).code(),
            Code::OutOfRange
        );
        let quorum = |e: QuorumError| ControllerError::from(e).code();
        assert_eq!(
            quorum(QuorumError::VolumeNotFound {
                volume: "tv-1".into()
            }),
            Code::NotFound
        );
        assert_eq!(
            quorum(QuorumError::LostRaces { op: op.clone() }),
            Code::Aborted
        );
        assert_eq!(
            quorum(QuorumError::NoMajority {
                op,
                shortfall: Shortfall {
                    reached: 1,
                    total: 3,
                    needed: 2,
                    failures: Failures::default(),
                },
            }),
            Code::Unavailable
        );
        let missing = ControllerError::Missing { field: "volume_id" };
        assert_eq!(missing.code(), Code::InvalidArgument);
        assert_eq!(missing.to_string(), "volume_id is required");
    }
}
