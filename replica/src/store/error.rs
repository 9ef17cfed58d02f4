//! The store's error type.

use std::io;
use std::path::{Path, PathBuf};

use super::LayerId;
use crate::block_io::{BlockIoError, BLOCK_SIZE};

/// Why a store operation failed.
///
/// Callers tell apart "the request is wrong" (range, alignment, unknown snapshot),
/// "this copy is bad, use another replica" ([`StoreError::Corrupt`]) and "the disk
/// failed" ([`StoreError::Io`], [`StoreError::NoSpace`]); each maps to its own
/// data-plane or gRPC error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The range reaches past the end of the volume (or of the snapshot read).
    #[error("range {offset}+{len} is outside the view of {size} bytes")]
    OutOfRange {
        /// First byte requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Size of the volume or snapshot.
        size: u64,
    },
    /// Offset or length is not a multiple of [`BLOCK_SIZE`].
    #[error("range {offset}+{len} is not aligned to {BLOCK_SIZE} bytes")]
    Unaligned {
        /// First byte requested.
        offset: u64,
        /// Length requested.
        len: u64,
    },
    /// A write with one seq per block was given another number of seqs than blocks.
    #[error("{seqs} seqs given for a write of {blocks} blocks")]
    SeqCount {
        /// Blocks of the write.
        blocks: u64,
        /// Seqs given.
        seqs: usize,
    },
    /// A stored block failed verification (torn write, bit rot, damaged entry); its
    /// bytes are never returned.
    #[error("block {block} in layer {layer} failed checksum verification")]
    Corrupt {
        /// Layer holding the bad copy.
        layer: LayerId,
        /// Block index (offset / BLOCK_SIZE).
        block: u64,
    },
    /// The backing filesystem is full.
    #[error("no space left on the backing filesystem")]
    NoSpace,
    /// A file operation failed.
    #[error("{op} failed on {}", path.display())]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// File or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The manifest is missing, damaged or of an unknown version.
    #[error("manifest {} is unusable: {reason}", path.display())]
    BadManifest {
        /// Manifest path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer's meta file header is damaged or names another layer.
    #[error("layer file {} is unusable: {reason}", path.display())]
    BadLayer {
        /// Meta file path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `create` found a volume already in the directory.
    #[error("{} already holds a volume", .0.display())]
    AlreadyExists(PathBuf),
    /// No snapshot with this id exists (or it is being deleted).
    #[error("snapshot {0:?} does not exist")]
    SnapshotNotFound(String),
    /// The snapshot exists but is being deleted (its layer is being merged away), so
    /// no new volume can be built on it.
    #[error("snapshot {0:?} is being deleted")]
    SnapshotDeleting(String),
    /// `create_sharing` did not get the source volume's control lock in time: another
    /// control operation (a snapshot deletion's merge can take minutes) holds it, and
    /// a create must not stall its caller that long. Copying instead is always correct.
    #[error("the source volume is busy with another control operation")]
    SourceBusy,
    /// Another snapshot deletion of this volume is still merging its layer. Answered at
    /// once rather than queued: a merge can take minutes, and callers (the controller,
    /// a CO's retries) would otherwise pile up blocked threads behind it.
    #[error("another snapshot deletion of this volume is still merging; retry later")]
    MergeInProgress,
    /// The snapshot id cannot be stored.
    #[error("snapshot id {id:?} is invalid: {reason}")]
    InvalidSnapshotId {
        /// The rejected id.
        id: String,
        /// Why.
        reason: &'static str,
    },
    /// `changed_ranges` was given a `from` snapshot newer than `to`.
    #[error("snapshot {from:?} is newer than {to:?}")]
    SnapshotOrder {
        /// The older end requested.
        from: String,
        /// The newer end requested.
        to: String,
    },
    /// The requested size is not a valid new size.
    #[error("cannot resize from {current} to {requested} bytes: {reason}")]
    InvalidSize {
        /// Current size.
        current: u64,
        /// Requested size.
        requested: u64,
        /// Why.
        reason: &'static str,
    },
    /// The volume was deleted; only its snapshots can still be read or deleted.
    #[error("the volume was deleted; only its snapshots remain")]
    VolumeDeleted,
}

/// Builds the error for a failed file operation, classifying a full disk.
pub(crate) fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl Fn(io::Error) -> StoreError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace
        } else {
            StoreError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

impl From<StoreError> for BlockIoError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::OutOfRange { offset, len, size } => {
                BlockIoError::OutOfRange { offset, len, size }
            }
            StoreError::Unaligned { offset, len } => BlockIoError::Unaligned { offset, len },
            StoreError::Corrupt { block, .. } => BlockIoError::Corrupt { block },
            StoreError::NoSpace => BlockIoError::NoSpace,
            StoreError::Io { source, .. } => BlockIoError::Io(source),
            other => BlockIoError::Io(io::Error::other(other.to_string())),
        }
    }
}
