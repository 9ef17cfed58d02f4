//! The holder side of `ReadSnapshotBlocks`: streams a sealed snapshot's versioned
//! blocks, chunk by chunk, to a replica that restores or clones it.
//!
//! Each chunk is read on the blocking pool (store I/O parks its thread) at background
//! priority and sent through a small channel, so a slow reader holds back the reads
//! (at most [`PREFETCH`] chunks wait in memory) and a reader that goes away stops them.
//! Chunks with no written block are not sent.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::warn;

use super::chunk::{encode, ChunkGrid};
use crate::block_io::BLOCK_SIZE;
use crate::control_proto as proto;
use crate::store::{LayeredStore, StoreError};

/// Chunks read ahead of the reader.
pub const PREFETCH: usize = 4;

/// The stream type of `ReadSnapshotBlocks`.
pub type BlockStream = ReceiverStream<Result<proto::SnapshotBlocks, Status>>;

/// Streams `length` bytes at `offset` of `snapshot_id` in `store` (the caller has
/// checked alignment, existence and range). A failure mid-way ends the stream with
/// its status (a snapshot deleted meanwhile is NOT_FOUND).
pub fn stream_snapshot(
    store: Arc<LayeredStore>,
    volume_id: String,
    snapshot_id: String,
    offset: u64,
    length: u64,
) -> BlockStream {
    let (tx, rx) = mpsc::channel(PREFETCH);
    tokio::spawn(async move {
        let grid = ChunkGrid::of_request(offset, length);
        for (first, n) in grid.slots() {
            let store = Arc::clone(&store);
            let id = snapshot_id.clone();
            let read = tokio::task::spawn_blocking(move || {
                store.read_snapshot_versions(&id, first * BLOCK_SIZE, n * BLOCK_SIZE)
            })
            .await;
            let item = match read {
                Ok(Ok(blocks)) if blocks.is_unwritten() => continue,
                Ok(Ok(blocks)) => Ok(encode(blocks)),
                Ok(Err(e)) => Err(read_status(&volume_id, &snapshot_id, &e)),
                Err(join) => Err(Status::internal(format!(
                    "snapshot read task failed: {join}"
                ))),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                // The reader went away, or the stream ended with an error.
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn read_status(volume_id: &str, snapshot_id: &str, e: &StoreError) -> Status {
    let msg = format!("reading snapshot {snapshot_id} of volume {volume_id}: {e}");
    match e {
        StoreError::SnapshotNotFound(_) | StoreError::VolumeDeleted => Status::not_found(msg),
        _ => {
            warn!(volume_id, snapshot_id, error = %e, "snapshot read failed");
            Status::internal(msg)
        }
    }
}

/// `SnapshotRanges`: the allocated ranges of `snapshot_id`, or those written or
/// trimmed after `base_snapshot_id` up to it, as merged wire ranges.
pub fn snapshot_ranges(
    store: &LayeredStore,
    snapshot_id: &str,
    base_snapshot_id: &str,
) -> Result<Vec<proto::ByteRange>, StoreError> {
    let ranges = if base_snapshot_id.is_empty() {
        store.allocated_ranges(Some(snapshot_id))?
    } else {
        store.changed_ranges(base_snapshot_id, Some(snapshot_id))?
    };
    Ok(ranges
        .into_iter()
        .map(|r| proto::ByteRange {
            offset: r.start,
            length: r.end - r.start,
        })
        .collect())
}
