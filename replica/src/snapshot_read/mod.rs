//! Reading sealed snapshots on behalf of other replicas: the `ReadSnapshotBlocks`
//! stream a restoring or cloning replica pulls (or, with no snapshot named, the
//! volume's head, which a rebuilding replica pulls), and the `SnapshotRanges` query
//! (CSI SnapshotMetadata, incremental backups).
//!
//! * [`chunk`]: the wire form of a chunk of versioned blocks, encoded by the holder and
//!   decoded and checked by the reader.
//! * [`serve`]: the holder side: the chunk stream and the range query over a store.
//! * [`pace`]: how much of the holder's time a stream may take while foreground I/O
//!   is active.

pub mod chunk;
pub mod pace;
pub mod serve;

pub use chunk::{ChunkError, ChunkGrid, ChunkKind, CHUNK_BLOCKS};
pub use pace::StreamPacing;
pub use serve::{snapshot_ranges, stream_snapshot, BlockStream};
