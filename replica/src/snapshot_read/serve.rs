//! The holder side of `ReadSnapshotBlocks`: streams a sealed snapshot's versioned
//! blocks, chunk by chunk, to a replica that restores or clones it; or, with an empty
//! snapshot id, the volume's head (every layer, as a read sees it) to a replica that
//! rebuilds it. A head chunk is read under that chunk's block locks only, so writes
//! go on meanwhile: a block written during the stream is sent in its old or its new
//! version, both of which a rebuild may keep (it is resynced by seq afterwards).
//!
//! Each chunk is read on the blocking pool (store I/O parks its thread) at background
//! priority and sent through a small channel, so a slow reader holds back the reads
//! (at most [`PREFETCH`] chunks wait in memory) and a reader that goes away stops them.
//! Chunks with no written block are not sent. While the holder's disk has foreground
//! I/O, the stream pauses between chunks ([`StreamPacing`]). A `seqs_only` request is
//! served from the metadata entries alone ([`LayeredStore::read_versions_only`]): no
//! data is read or sent, so comparing versions costs a fraction of a copy.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::warn;

use super::chunk::{encode, ChunkGrid};
use super::pace::StreamPacing;
use crate::block_io::BLOCK_SIZE;
use crate::control_proto as proto;
use crate::store::{LayeredStore, StoreError};

/// Chunks read ahead of the reader.
pub const PREFETCH: usize = 4;

/// The stream type of `ReadSnapshotBlocks`.
pub type BlockStream = ReceiverStream<Result<proto::SnapshotBlocks, Status>>;

/// Streams the range of `request` (the caller has checked alignment, existence and
/// range) from `store`: versioned blocks with their data, or versions only when the
/// request says `seqs_only`, of the snapshot it names or of the head when it names
/// none. A failure mid-way ends the stream with its status (a snapshot or volume
/// deleted meanwhile is NOT_FOUND). `pacing` says how much of the holder's time the
/// stream may take while foreground I/O is active.
pub fn stream_snapshot(
    store: Arc<LayeredStore>,
    request: proto::ReadSnapshotBlocksRequest,
    pacing: StreamPacing,
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
        // `None`: the head.
        let view = (!snapshot_id.is_empty()).then_some(snapshot_id);
        for (first, n) in grid.slots() {
            let started = std::time::Instant::now();
            let store_of_chunk = Arc::clone(&store);
            let view_of_chunk = view.clone();
            let read = tokio::task::spawn_blocking(move || {
                let (at, len) = (first * BLOCK_SIZE, n * BLOCK_SIZE);
                match (seqs_only, view_of_chunk.as_deref()) {
                    (true, view) => store_of_chunk.read_versions_only(view, at, len),
                    (false, Some(id)) => store_of_chunk.read_snapshot_versions(id, at, len),
                    (false, None) => store_of_chunk.read_current_versions(at, len),
                }
            })
            .await;
            let item = match read {
                Ok(Ok(blocks)) if blocks.is_unwritten() => continue,
                Ok(Ok(blocks)) => Ok(encode(blocks)),
                Ok(Err(e)) => Err(read_status(&volume_id, view.as_deref(), &e)),
                Err(join) => Err(Status::internal(format!(
                    "snapshot read task failed: {join}"
                ))),
            };
            let failed = item.is_err();
            let pause = pacing.pause_after(started.elapsed(), store.foreground_active());
            if tx.send(item).await.is_err() || failed {
                // The reader went away, or the stream ended with an error.
                return;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The status ending a stream of `view` (a snapshot, or `None` for the head).
fn read_status(volume_id: &str, view: Option<&str>, e: &StoreError) -> Status {
    let what = match view {
        Some(id) => format!("snapshot {id}"),
        None => "the head".to_string(),
    };
    let msg = format!("reading {what} of volume {volume_id}: {e}");
    match e {
        StoreError::SnapshotNotFound(_) | StoreError::VolumeDeleted => Status::not_found(msg),
        _ => {
            warn!(volume_id, view = %what, error = %e, "snapshot read failed");
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
