//! The engine's error type.
//!
//! Callers mostly need one decision: which errno the kernel sees. [`EngineError::kind`]
//! gives it as a small enum; the variants carry the volume, operation and range for
//! the log line, and why the replicas could not serve it.

use std::fmt;

use super::config::ConfigError;

/// The operation an [`EngineError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Opening the engine (connecting to the replicas).
    Open,
    /// [`super::Engine::read`].
    Read,
    /// [`super::Engine::write`].
    Write,
    /// [`super::Engine::flush`].
    Flush,
    /// [`super::Engine::trim`].
    Trim,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Trim => "trim",
        })
    }
}

/// What kind of failure an [`EngineError`] is; decides the errno the frontend returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineErrorKind {
    /// Not enough healthy replicas, or no intact copy: the data could not be read or
    /// written. `EIO`.
    Io,
    /// A replica's disk is full and no majority could take the write. `ENOSPC`.
    NoSpace,
    /// A newer engine took over the volume; this one will never complete I/O again.
    /// `EIO` for the kernel, but distinct so the node plugin can tell "the volume moved"
    /// from "the replicas are down".
    Fenced,
    /// The request itself is wrong (out of range, unaligned, bad configuration).
    InvalidRequest,
}

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The configuration is unusable.
    #[error("invalid engine configuration")]
    Config(#[from] ConfigError),
    /// Fewer than a majority of the replicas could be connected at open.
    #[error(
        "volume {volume_id}: connected to {connected} of {total} replicas, {needed} needed ({failures})"
    )]
    OpenQuorum {
        /// The volume.
        volume_id: String,
        /// Replicas connected.
        connected: usize,
        /// Replicas in the set.
        total: usize,
        /// Majority of the set.
        needed: usize,
        /// `node_id: reason` of each replica that failed.
        failures: String,
    },
    /// Fewer than a majority of the replicas could be brought in sync at open (read
    /// their sync state, reconciled, declared in sync); the engine does not serve.
    #[error(
        "volume {volume_id}: only {in_sync} of {total} replicas could be brought in sync, {needed} needed ({failures})"
    )]
    NotInSync {
        /// The volume.
        volume_id: String,
        /// Replicas in sync after reconciling.
        in_sync: usize,
        /// Replicas in the set.
        total: usize,
        /// Majority of the set.
        needed: usize,
        /// `node_id: reason` of each replica left out.
        failures: String,
    },
    /// The replicas report different volume sizes, or not the size the controller
    /// recorded; the engine refuses to guess which is right.
    #[error("volume {volume_id}: replicas disagree on the volume size ({sizes})")]
    SizeMismatch {
        /// The volume.
        volume_id: String,
        /// `node_id=size` of each connected replica, plus the expected size if any.
        sizes: String,
    },
    /// [`Engine::resize`](super::Engine::resize) found fewer than a majority of
    /// replicas holding the size asked for (the controller has not expanded them).
    #[error("volume {volume_id}: fewer than a majority of replicas hold {wanted} bytes ({sizes})")]
    NotExpanded {
        /// The volume.
        volume_id: String,
        /// The size asked for (the current size when none was given).
        wanted: u64,
        /// `node_id=size` or the error of each replica.
        sizes: String,
    },
    /// A replica has seen a higher epoch: the volume was published elsewhere, and this
    /// engine must stop. Every later operation fails with this too.
    #[error("volume {volume_id}: engine of epoch {epoch} was fenced by epoch {replica_epoch} (reported by node {node_id})")]
    Fenced {
        /// The volume.
        volume_id: String,
        /// This engine's epoch.
        epoch: u64,
        /// The epoch the replica holds.
        replica_epoch: u64,
        /// The replica that reported it.
        node_id: String,
    },
    /// Not enough replicas acknowledged (write, trim, flush) or none could serve the
    /// read, within the request timeout.
    #[error("volume {volume_id}: {op} of {len} bytes at {offset}: {acked} of {needed} required replicas succeeded ({failures})")]
    NoQuorum {
        /// The volume.
        volume_id: String,
        /// The operation.
        op: IoOp,
        /// Byte offset (0 for flush).
        offset: u64,
        /// Byte length (0 for flush).
        len: u64,
        /// Replicas that succeeded.
        acked: usize,
        /// Replicas needed (a majority for writes, one for reads).
        needed: usize,
        /// `node_id: reason` of the replicas that failed or were already stale.
        failures: String,
        /// Whether a replica reported a full disk, so the kernel gets `ENOSPC`.
        no_space: bool,
    },
    /// Every replica that could serve the read reported a checksum failure.
    #[error("volume {volume_id}: read of {len} bytes at {offset}: block {block} is corrupt on every replica tried ({failures})")]
    AllCopiesCorrupt {
        /// The volume.
        volume_id: String,
        /// Byte offset of the read.
        offset: u64,
        /// Byte length of the read.
        len: u64,
        /// First corrupt block index reported.
        block: u64,
        /// `node_id: reason` of each replica tried.
        failures: String,
    },
    /// The range reaches past the end of the volume.
    #[error(
        "volume {volume_id}: {op} of {len} bytes at {offset} is outside the volume of {size} bytes"
    )]
    OutOfRange {
        /// The volume.
        volume_id: String,
        /// The operation.
        op: IoOp,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// Offset or length is not a multiple of the block size, or the length is zero
    /// or above the largest single request.
    #[error("volume {volume_id}: {op} of {len} bytes at {offset} is not a valid block range")]
    Unaligned {
        /// The volume.
        volume_id: String,
        /// The operation.
        op: IoOp,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// [`super::Engine::close`] was called; the engine serves nothing any more.
    #[error("volume {volume_id}: engine is closed")]
    Closed {
        /// The volume.
        volume_id: String,
    },
}

impl EngineError {
    /// The class of the failure, for errno mapping and for callers that react to
    /// fencing.
    pub fn kind(&self) -> EngineErrorKind {
        match self {
            EngineError::Fenced { .. } => EngineErrorKind::Fenced,
            EngineError::NoQuorum { no_space: true, .. } => EngineErrorKind::NoSpace,
            EngineError::Config(_)
            | EngineError::OutOfRange { .. }
            | EngineError::Unaligned { .. } => EngineErrorKind::InvalidRequest,
            EngineError::OpenQuorum { .. }
            | EngineError::NotInSync { .. }
            | EngineError::SizeMismatch { .. }
            | EngineError::NotExpanded { .. }
            | EngineError::NoQuorum { .. }
            | EngineError::AllCopiesCorrupt { .. }
            | EngineError::Closed { .. } => EngineErrorKind::Io,
        }
    }
}
