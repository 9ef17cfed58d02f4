//! Reading one holder's sealed copy: dial its control address, call
//! `ReadSnapshotBlocks` (with data, or versions only for a reconcile), and check every
//! chunk (grid, order, kind, sizes, crc32c) before the merge sees it.
//!
//! Each holder is read by its own task that runs ahead by a few chunks, so the holders
//! stream in parallel while the merge consumes them in lockstep. Dropping a
//! [`HolderReader`] stops its task and closes the connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

use super::throttle::Bandwidth;
use crate::control_proto as proto;
use crate::control_proto::replica_control_client::ReplicaControlClient;
use crate::record::ReplicaRef;
use crate::snapshot_read::{chunk, ChunkGrid, ChunkKind};
use crate::store::VersionedBlocks;
use tessera_tls::Transport;

/// Chunks a holder's task reads ahead of the merge.
const READ_AHEAD: usize = 2;
/// HTTP/2 flow-control window of a holder's stream: with the read-ahead, what one
/// holder may have in flight towards the copy (memory, and traffic the bandwidth limit
/// sees late). Enough for line rate at LAN round trips.
const STREAM_WINDOW: u32 = 512 << 10;

/// What the merge learns from a holder next.
#[derive(Debug)]
pub enum HolderEvent {
    /// Its next chunk holding written blocks.
    Chunk(VersionedBlocks),
    /// Its stream ended: no written block after the last chunk.
    End,
    /// It stopped answering or sent something wrong; it is dropped from the copy.
    Failed(String),
}

/// A holder whose `ReadSnapshotBlocks` stream is open.
#[derive(Debug)]
pub struct HolderReader {
    /// `node_id@control_address`, for messages.
    pub label: String,
    rx: mpsc::Receiver<HolderEvent>,
    task: JoinHandle<()>,
}

impl Drop for HolderReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A label naming a holder in logs and errors.
pub fn label(holder: &ReplicaRef) -> String {
    format!("{}@{}", holder.node_id, holder.control_address)
}

fn endpoint(address: &str, connect_timeout: Duration) -> Result<Endpoint, String> {
    tessera_tls::grpc::endpoint(address)
        .map(|e| {
            e.connect_timeout(connect_timeout)
                .initial_stream_window_size(STREAM_WINDOW)
        })
        .map_err(|e| format!("invalid control address {address:?}: {e}"))
}

/// Opens the stream of `request` on `holder`; fails (with a message) if the holder
/// cannot be reached within `timeout` or refuses the request. Its chunks are checked
/// to be of the kind the request asks for (`seqs_only` or not).
pub async fn open(
    holder: ReplicaRef,
    request: proto::ReadSnapshotBlocksRequest,
    timeout: Duration,
    bandwidth: Option<Arc<Bandwidth>>,
    transport: Transport,
) -> Result<HolderReader, String> {
    let label = label(&holder);
    let grid = ChunkGrid::of_request(request.offset, request.length);
    let kind = ChunkKind::of_request(&request);
    let endpoint = endpoint(&holder.control_address, timeout)?;
    let opened = tokio::time::timeout(timeout, async {
        let channel = tessera_tls::grpc::connect_channel(&endpoint, &transport)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        ReplicaControlClient::new(channel)
            .read_snapshot_blocks(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
    .await;
    let stream = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(e)) => return Err(format!("{label}: {e}")),
        Err(_) => return Err(format!("{label}: no answer within {timeout:?}")),
    };
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let task = tokio::spawn(pump(stream, grid, kind, tx, bandwidth));
    Ok(HolderReader { label, rx, task })
}

/// Moves a holder's chunks into the channel, checked, until its stream ends.
async fn pump(
    mut stream: tonic::Streaming<proto::SnapshotBlocks>,
    grid: ChunkGrid,
    kind: ChunkKind,
    tx: mpsc::Sender<HolderEvent>,
    bandwidth: Option<Arc<Bandwidth>>,
) {
    let mut previous_end = grid.start_block;
    loop {
        let event = match stream.message().await {
            Ok(Some(msg)) => {
                let bytes = msg.data.len() as u64;
                match chunk::decode(msg, grid, previous_end, kind) {
                    Ok(blocks) => {
                        previous_end = blocks.first_block() + blocks.len() as u64;
                        if let Some(bw) = &bandwidth {
                            bw.take(bytes).await;
                        }
                        HolderEvent::Chunk(blocks)
                    }
                    Err(e) => HolderEvent::Failed(format!("sent a bad chunk: {e}")),
                }
            }
            Ok(None) => HolderEvent::End,
            Err(s) => {
                HolderEvent::Failed(format!("stream failed: {:?}: {}", s.code(), s.message()))
            }
        };
        let last = !matches!(event, HolderEvent::Chunk(_));
        if tx.send(event).await.is_err() || last {
            return;
        }
    }
}

impl HolderReader {
    /// The holder's next event; [`HolderEvent::Failed`] if nothing arrives within
    /// `idle` (a hung holder must not stall the copy for good).
    pub async fn next(&mut self, idle: Duration) -> HolderEvent {
        match tokio::time::timeout(idle, self.rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => HolderEvent::Failed("its reader stopped".into()),
            Err(_) => HolderEvent::Failed(format!("sent nothing for {idle:?}")),
        }
    }
}
