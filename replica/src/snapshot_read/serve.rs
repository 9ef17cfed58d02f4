//! The holder side of `ReadSnapshotBlocks`: streams a sealed snapshot's versioned
//! blocks, chunk by chunk, to a replica that restores or clones it.
//!
//! Each chunk is read on the blocking pool (store I/O parks its thread) at background
//! priority and sent through a small channel, so a slow reader holds back the reads
//! (at most [`PREFETCH`] chunks wait in memory) and a reader that goes away stops them.
//! Chunks with no written block are not sent. A `seqs_only` request is served from
//! the metadata entries alone ([`LayeredStore::read_versions_only`]): no data is read
//! or sent, so comparing versions costs a fraction of a copy.

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

/// Streams the range of `request` (the caller has checked alignment, existence and
/// range) from `store`: versioned blocks with their data, or versions only when the
/// request says `seqs_only`. A failure mid-way ends the stream with its status (a
/// snapshot deleted meanwhile is NOT_FOUND).
pub fn stream_snapshot(
    store: Arc<LayeredStore>,
    request: proto::ReadSnapshotBlocksRequest,
) -> BlockStream {
    let (tx, rx) = mpsc::channel(PREFETCH);
    tokio::spawn(async move {
        let proto::ReadSnapshotBlocksRequest {
            volume_id,
            snapshot_id,
            offset,
            length,
            seqs_only,
        } = request;
        let grid = ChunkGrid::of_request(offset, length);
        for (first, n) in grid.slots() {
            let store = Arc::clone(&store);
            let id = snapshot_id.clone();
            let read = tokio::task::spawn_blocking(move || {
                let (at, len) = (first * BLOCK_SIZE, n * BLOCK_SIZE);
                if seqs_only {
                    store.read_versions_only(Some(&id), at, len)
                } else {
                    store.read_snapshot_versions(&id, at, len)
                }
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
