//! Why a catalog operation failed, and how filesystem and store errors of a mutation
//! become one of those reasons (a full disk is always [`CatalogError::DiskFull`]).

use std::io;
use std::path::{Path, PathBuf};

use crate::block_io::BLOCK_SIZE;
use crate::scheduler::SchedulerError;
use crate::store::StoreError;
use tessera_replica_protocol::volume_params::QosError;

/// Why a catalog operation failed. Each variant maps to one gRPC status code in the
/// control service, so callers can tell their own mistakes from the replica's state.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The volume id is empty, too long, starts with '.', or has a character outside
    /// `[A-Za-z0-9._-]`.
    #[error("invalid volume id {id:?}: {reason}")]
    InvalidVolumeId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The QoS parameters (maxIOPS, minIOPS, maxBandwidth, burstDuration) cannot be
    /// applied.
    #[error("volume {volume_id}: invalid QoS parameters")]
    InvalidQos {
        /// The volume.
        volume_id: String,
        /// Which key and value, and why.
        #[source]
        source: QosError,
    },
    /// The I/O scheduler refused to register the volume or to change its QoS.
    #[error("volume {volume_id}: the I/O scheduler refused to {op} it")]
    Scheduler {
        /// The volume.
        volume_id: String,
        /// What was being done.
        op: &'static str,
        /// The scheduler's error.
        #[source]
        source: SchedulerError,
    },
    /// The size is zero or not a multiple of the block size.
    #[error("size_bytes {size} must be a positive multiple of {BLOCK_SIZE}")]
    InvalidSize {
        /// The size as given.
        size: u64,
    },
    /// A fencing raise that does not increase the epoch.
    #[error("new_epoch {new} must be greater than expected_epoch {expected}")]
    EpochNotIncreasing {
        /// expected_epoch of the request.
        expected: u64,
        /// new_epoch of the request.
        new: u64,
    },
    /// An epoch a seq cannot carry (`tessera_replica_protocol::seq::MAX_EPOCH`).
    #[error(
        "epoch {epoch} exceeds the largest epoch a write sequence number can carry ({})",
        tessera_replica_protocol::seq::MAX_EPOCH
    )]
    EpochTooLarge {
        /// The epoch refused.
        epoch: u64,
    },
    /// A create for an existing id whose immutable fields differ.
    #[error("volume {volume_id} already exists with {difference}")]
    Conflict {
        /// The volume.
        volume_id: String,
        /// Which fields differ, stored value first.
        difference: String,
    },
    /// Thick accounting (or the filesystem's free space) leaves too little room.
    #[error("volume {volume_id} needs {needed} bytes, {free} free")]
    NoCapacity {
        /// The volume being created.
        volume_id: String,
        /// Bytes it needs.
        needed: u64,
        /// Bytes free on this replica.
        free: u64,
    },
    /// The backing filesystem ran out of space (ENOSPC/EDQUOT) during a mutation;
    /// nothing was changed.
    #[error("backing filesystem is full while trying to {op} volume {volume_id}")]
    DiskFull {
        /// The volume.
        volume_id: String,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No volume with this id is stored here.
    #[error("volume {0} not found on this replica")]
    NotFound(String),
    /// The id belongs to a deleted volume whose snapshots still exist; it cannot be
    /// created again until they are deleted.
    #[error("volume id {0} is held by the snapshots of a deleted volume")]
    HeldBySnapshots(String),
    /// The copy source of a restore or clone is unusable (no holders, bad ids, a
    /// replication factor no holder list can reach a majority of, ...).
    #[error("volume {volume_id}: invalid copy source: {reason}")]
    InvalidCopySource {
        /// The volume being created.
        volume_id: String,
        /// What is wrong with the source.
        reason: String,
    },
    /// An UpdateVolume replica set that cannot be a volume's set (wrong size, a
    /// node twice, a member without an id or address).
    #[error("volume {volume_id}: invalid replica set: {reason}")]
    InvalidReplicaSet {
        /// The volume.
        volume_id: String,
        /// What is wrong with the set.
        reason: String,
    },
    /// A restore or clone into a volume smaller than its source.
    #[error("volume {volume_id} of {size} bytes cannot hold its source of {source_size} bytes")]
    CopyTooSmall {
        /// The volume being created.
        volume_id: String,
        /// Its requested size.
        size: u64,
        /// The source snapshot's size.
        source_size: u64,
    },
    /// The volume is still being filled from its copy source; it is not served and
    /// cannot be snapshotted until the copy completes.
    #[error("volume {volume_id} {} ({percent}%)", populating_from(snapshot_id.as_deref()))]
    Populating {
        /// The volume.
        volume_id: String,
        /// The snapshot it is copied from; `None` for a rebuild from its replicas.
        snapshot_id: Option<String>,
        /// Durable progress in whole percent.
        percent: u64,
    },
    /// ExpandVolume asked for less than the volume holds: volumes never shrink.
    #[error("volume {volume_id} holds {current} bytes; it cannot shrink to {requested}")]
    Shrink {
        /// The volume.
        volume_id: String,
        /// Its size now.
        current: u64,
        /// The size asked for.
        requested: u64,
    },
    /// UpdateVolume compare-and-set lost.
    #[error("volume {volume_id}: current generation is {current}, expected {expected}")]
    GenerationMismatch {
        /// The volume.
        volume_id: String,
        /// expected_generation of the request.
        expected: u64,
        /// Stored generation.
        current: u64,
    },
    /// RaiseEpoch compare-and-set lost.
    #[error("volume {volume_id}: current epoch is {current}, expected {expected}")]
    EpochMismatch {
        /// The volume.
        volume_id: String,
        /// expected_epoch of the request.
        expected: u64,
        /// Stored epoch.
        current: u64,
    },
    /// The volume's record was unreadable at start; it is left for an operator.
    #[error("volume {volume_id} is quarantined on this replica ({reason}); inspect {path}")]
    Quarantined {
        /// The volume.
        volume_id: String,
        /// Why it was quarantined.
        reason: String,
        /// Its directory.
        path: PathBuf,
    },
    /// The volume's block store failed (other than a full disk, which is
    /// [`CatalogError::DiskFull`]).
    #[error("cannot {op} the block store of volume {volume_id}")]
    Store {
        /// The volume.
        volume_id: String,
        /// What was being done.
        op: &'static str,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {path} is in use by another tessera-replica{holder}")]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// " (pid N)" when the holder's pid is known, else "".
        holder: String,
    },
    /// Any other filesystem failure.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What a volume being populated is filled from, for [`CatalogError::Populating`].
fn populating_from(snapshot_id: Option<&str>) -> String {
    match snapshot_id {
        Some(id) => format!("is still being populated from snapshot {id}"),
        None => "is being rebuilt from its replicas".to_string(),
    }
}

/// ENOSPC or EDQUOT: the backing filesystem (or its quota) is full.
fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps an I/O error of a mutation, turning a full disk into [`CatalogError::DiskFull`].
pub(super) fn mutation_error(
    volume_id: &str,
    op: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> CatalogError {
    let volume_id = volume_id.to_string();
    let path = path.to_path_buf();
    move |source| {
        if is_disk_full(&source) {
            CatalogError::DiskFull {
                volume_id,
                op,
                source,
            }
        } else {
            CatalogError::Io { op, path, source }
        }
    }
}

/// Maps a store error of a mutation, turning a full disk into [`CatalogError::DiskFull`]
/// so the controller sees RESOURCE_EXHAUSTED whether the record or the store hit it.
pub(super) fn store_error(
    volume_id: &str,
    op: &'static str,
) -> impl FnOnce(StoreError) -> CatalogError {
    let volume_id = volume_id.to_string();
    move |source| match source {
        StoreError::NoSpace => CatalogError::DiskFull {
            volume_id,
            op,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        },
        StoreError::Io { source, .. } if is_disk_full(&source) => CatalogError::DiskFull {
            volume_id,
            op,
            source,
        },
        source => CatalogError::Store {
            volume_id,
            op,
            source,
        },
    }
}

/// Maps an I/O error of anything but a volume mutation (opening, scanning, measuring).
pub(super) fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CatalogError {
    let path = path.to_path_buf();
    move |source| CatalogError::Io { op, path, source }
}
