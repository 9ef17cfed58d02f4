//! The seam between the data-plane server and the storage that holds blocks.
//!
//! The data-plane server (protocol, connections, epochs) and the block store
//! (checksums, layers, io_uring scheduling) are built independently; this module is
//! the only thing they share. The server is generic over [`VolumeRegistry`], so tests
//! can run it over a plain file and the daemon over the checksummed store.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::store::VersionedBlocks;
use crate::sync_state::SyncState;
use tessera_replica_protocol::data::ReplicaSet;

pub use tessera_replica_protocol::block::BLOCK_SIZE;

/// Why a block operation failed. Each kind maps to its own data-plane error code, so an
/// engine can tell "try another replica" (corrupt, I/O) from "my request is wrong"
/// (range, alignment).
#[derive(Debug, thiserror::Error)]
pub enum BlockIoError {
    /// The request reaches past the end of the volume.
    #[error("range {offset}+{len} is outside the volume of {size} bytes")]
    OutOfRange {
        /// First byte requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Current volume size.
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
    /// A stored block failed checksum verification; its bytes are never returned.
    #[error("block {block} failed checksum verification")]
    Corrupt {
        /// Index of the corrupt block (offset / BLOCK_SIZE).
        block: u64,
    },
    /// No replica of this volume lives on this daemon.
    #[error("volume {0} is not stored on this replica")]
    UnknownVolume(String),
    /// The volume is stored here but cannot serve yet (still being populated from a
    /// snapshot); the message says why. Sent as UNKNOWN_VOLUME: the replica lacks it.
    #[error("{0}")]
    NotReady(String),
    /// The backing filesystem is full.
    #[error("no space left on the backing filesystem")]
    NoSpace,
    /// Any other failure of the backing storage.
    #[error("backing storage I/O failed")]
    Io(#[source] std::io::Error),
    /// The volume's dirty-region map or in-sync record could not be made durable;
    /// the write it guarded was not applied.
    #[error("sync state of the volume")]
    SyncState(#[from] crate::sync_state::SyncStateError),
    /// The registry keeps no volume record, so it has no replica set to report
    /// (REPLICA_SET); sent as INVALID_REQUEST.
    #[error("this replica keeps no replica set for volume {0}")]
    NoReplicaSet(String),
}

impl From<std::io::Error> for BlockIoError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            BlockIoError::NoSpace
        } else {
            BlockIoError::Io(e)
        }
    }
}

/// Block I/O on one replica of one volume.
///
/// Offsets and lengths are byte values, multiples of [`BLOCK_SIZE`]. Every write and
/// trim carries the engine-assigned `seq` (`epoch << 40 | counter`) so the store can
/// record which write a block came from.
pub trait VolumeBlocks: Send + Sync + 'static {
    /// Reads `len` bytes at `offset`; unwritten blocks read as zeros.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<u8>, BlockIoError>> + Send;

    /// Writes `data` at `offset`, tagged with `seq`. Durable only after [`Self::flush`].
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl Future<Output = Result<(), BlockIoError>> + Send;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), BlockIoError>> + Send;

    /// Discards `len` bytes at `offset` (they then read as zeros), tagged with `seq`.
    fn trim(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> impl Future<Output = Result<(), BlockIoError>> + Send;

    /// Writes each block of `data` at `offset` only where the current version of that
    /// block has a lower seq than `seq` (a corrupt or never-written block counts as
    /// seq 0; an equal seq is left alone), at background priority: a resync copy that
    /// must never replace a newer live write. Returns the number of blocks written.
    fn write_if_newer(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl Future<Output = Result<u64, BlockIoError>> + Send;

    /// Trims each block of `len` bytes at `offset` only where the current version of
    /// that block has a lower seq than `seq` (the rule of [`Self::write_if_newer`]);
    /// a trimmed block keeps `seq` as its version. Returns the number of blocks
    /// trimmed.
    fn trim_if_newer(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> impl Future<Output = Result<u64, BlockIoError>> + Send;

    /// The version (seq; data, trim, unwritten or corrupt) of every block of `len`
    /// bytes at `offset` in the current view, with the verified bytes of the intact
    /// data blocks when `with_data`, read together under the blocks' locks so a
    /// version always names its own bytes. What a new engine compares between
    /// replicas to reconcile a dirty region.
    fn versions(
        &self,
        offset: u64,
        len: u64,
        with_data: bool,
    ) -> impl Future<Output = Result<VersionedBlocks, BlockIoError>> + Send;

    /// Current size of the volume in bytes.
    fn size(&self) -> u64;
}

/// A volume opened for the data plane: its blocks, its live fencing epoch and its
/// sync state.
pub struct OpenVolume<V> {
    /// Block I/O for the volume.
    pub blocks: Arc<V>,
    /// Highest epoch this replica has accepted for the volume. Shared with the control
    /// plane, which raises it on `RaiseEpoch`; the data plane checks every request
    /// against it, so a raise fences old engines immediately, even on open connections.
    pub epoch: Arc<AtomicU64>,
    /// Dirty regions (marked before every write and trim) and the in-sync record,
    /// one per volume replica, shared by all its connections.
    pub sync: Arc<SyncState>,
}

impl<V> Clone for OpenVolume<V> {
    fn clone(&self) -> Self {
        OpenVolume {
            blocks: Arc::clone(&self.blocks),
            epoch: Arc::clone(&self.epoch),
            sync: Arc::clone(&self.sync),
        }
    }
}

/// Finds the volumes a data-plane connection asks for.
pub trait VolumeRegistry: Send + Sync + 'static {
    /// The block implementation volumes use.
    type Blocks: VolumeBlocks;

    /// Opens a volume by id for a connection's handshake.
    fn open(&self, volume_id: &str) -> Result<OpenVolume<Self::Blocks>, BlockIoError>;

    /// Persists a higher epoch presented by an engine at handshake (a replica that was
    /// down when the controller raised the epoch learns it this way). Must be durable
    /// before it returns, and must never lower the stored epoch.
    fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<(), BlockIoError>;

    /// The generation and replica set of the volume's record (REPLICA_SET), through
    /// which an attached engine learns that the controller replaced a member. Called
    /// on the connection's thread, so it must not block. Registries without records
    /// (test backends) keep the default: [`BlockIoError::NoReplicaSet`].
    fn replica_set(&self, volume_id: &str) -> Result<ReplicaSet, BlockIoError> {
        Err(BlockIoError::NoReplicaSet(volume_id.to_owned()))
    }
}
