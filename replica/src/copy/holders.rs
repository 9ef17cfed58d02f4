//! The holders of one attempt (or of one fetch within it), read in lockstep: every
//! listed holder is dialled at once, a majority of the source's replication factor
//! must answer, and the chunk grid is walked window by window, each window handed
//! out only once every live holder has said whether it has a chunk there.
//!
//! Both copy modes walk the grid this way (the full copy over data streams, the
//! reconcile over versions-only streams, and its fetches over short data streams),
//! so the quorum rule and the "who is still answering" bookkeeping live here once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::error::CopyError;
use super::source::{self, HolderEvent, HolderReader};
use super::throttle::Bandwidth;
use super::CopyConfig;
use crate::block_io::BLOCK_SIZE;
use crate::control_proto as proto;
use crate::record::ReplicaRef;
use crate::snapshot_read::{ChunkGrid, CHUNK_BLOCKS};
use crate::store::VersionedBlocks;

/// Longest run of blocks handed out as one [`Window::Gap`]: gaps are where a copy
/// checkpoints and the reconcile reads local versions, so neither a huge sparse
/// volume's memory nor its progress rides on one window. A multiple of the chunk
/// size, so a capped gap still ends on the grid.
pub(super) const GAP_BLOCKS: u64 = 64 * CHUNK_BLOCKS;

/// How many holders a copy needs, and out of how many listed (for messages).
#[derive(Debug, Clone, Copy)]
pub(super) struct Quorum {
    /// Holders in the copy source.
    pub listed: usize,
    /// Majority of the source's replication factor.
    pub needed: usize,
}

/// One stretch of the grid, once every live holder has spoken for it.
#[derive(Debug)]
pub(super) enum Window {
    /// No holder has a chunk in blocks `[first, first + len)`: every copy of them is
    /// unwritten.
    Gap {
        /// First block.
        first: u64,
        /// Blocks (at most [`GAP_BLOCKS`]).
        len: u64,
    },
    /// The grid slot at `first`: one entry per live holder, its chunk there or `None`
    /// when it has none (every block unwritten on that holder).
    Slot {
        /// First block of the slot.
        first: u64,
        /// Blocks of the slot.
        len: u64,
        /// The live holders' chunks.
        copies: Vec<Option<VersionedBlocks>>,
    },
}

impl Window {
    /// First block of the window.
    pub fn first(&self) -> u64 {
        match self {
            Window::Gap { first, .. } | Window::Slot { first, .. } => *first,
        }
    }

    /// Blocks of the window.
    pub fn len(&self) -> u64 {
        match self {
            Window::Gap { len, .. } | Window::Slot { len, .. } => *len,
        }
    }

    /// The live holders' chunks (`live` entries, all `None` for a gap).
    pub fn into_copies(self, live: usize) -> Vec<Option<VersionedBlocks>> {
        match self {
            Window::Gap { .. } => (0..live).map(|_| None).collect(),
            Window::Slot { copies, .. } => copies,
        }
    }
}

/// One holder's stream.
struct Holder {
    holder: ReplicaRef,
    reader: HolderReader,
    /// Its next chunk, not handed out yet.
    peek: Option<VersionedBlocks>,
    ended: bool,
    failed: Option<String>,
}

impl Holder {
    fn live(&self) -> bool {
        self.failed.is_none()
    }
}

/// The open streams of one request on the holders that answered it.
pub(super) struct HolderSet {
    holders: Vec<Holder>,
    /// Why the holders that did not open failed.
    unopened: Vec<String>,
    quorum: Quorum,
    grid: ChunkGrid,
}

impl HolderSet {
    /// Sends `request` to every holder of `listed` concurrently (one unreachable
    /// holder costs one timeout, not one each) and keeps those that answer; fewer
    /// than `quorum.needed` is [`CopyError::TooFewHolders`].
    pub async fn open(
        listed: &[ReplicaRef],
        quorum: Quorum,
        request: proto::ReadSnapshotBlocksRequest,
        config: &CopyConfig,
        bandwidth: Option<Arc<Bandwidth>>,
        volume_id: &str,
    ) -> Result<HolderSet, CopyError> {
        let grid = ChunkGrid::of_request(request.offset, request.length);
        let opens: Vec<_> = listed
            .iter()
            .map(|h| {
                tokio::spawn(source::open(
                    h.clone(),
                    request.clone(),
                    config.connect_timeout,
                    bandwidth.clone(),
                    config.transport.clone(),
                ))
            })
            .collect();
        let mut holders = Vec::new();
        let mut unopened = Vec::new();
        for (holder, opened) in listed.iter().zip(opens) {
            let opened = opened.await.unwrap_or_else(|e| {
                Err(format!("{}: dialling failed: {e}", source::label(holder)))
            });
            match opened {
                Ok(reader) => holders.push(Holder {
                    holder: holder.clone(),
                    reader,
                    peek: None,
                    ended: false,
                    failed: None,
                }),
                Err(e) => unopened.push(e),
            }
        }
        if holders.len() < quorum.needed {
            return Err(CopyError::TooFewHolders {
                answered: holders.len(),
                holders: quorum.listed,
                needed: quorum.needed,
                errors: unopened.join("; "),
            });
        }
        for e in &unopened {
            warn!(volume_id, error = %e, "holder unavailable; copying from the others");
        }
        Ok(HolderSet {
            holders,
            unopened,
            quorum,
            grid,
        })
    }

    /// Holders still answering.
    pub fn live_count(&self) -> usize {
        self.holders.iter().filter(|h| h.live()).count()
    }

    /// Whether every listed holder opened and still answers: only then may a merge
    /// settle for the newest intact version when a newer one is damaged.
    pub fn every_answered(&self) -> bool {
        self.unopened.is_empty()
            && self.holders.len() == self.quorum.listed
            && self.holders.iter().all(Holder::live)
    }

    /// The holders still answering, to ask them something else.
    pub fn live_holders(&self) -> Vec<ReplicaRef> {
        self.holders
            .iter()
            .filter(|h| h.live())
            .map(|h| h.holder.clone())
            .collect()
    }

    /// The window at block `pos` (on the grid), once every live holder has said
    /// whether it has a chunk there: a [`Window::Gap`] up to the next chunk anyone
    /// has, or the slot at `pos` with each live holder's chunk. Holders that fail or
    /// fall silent for `idle` are dropped; fewer than a majority left is an error.
    /// `None` when `cancel` fires.
    pub async fn next_window(
        &mut self,
        pos: u64,
        idle: Duration,
        cancel: &mut watch::Receiver<bool>,
        volume_id: &str,
    ) -> Result<Option<Window>, CopyError> {
        for h in self.holders.iter_mut() {
            if !h.live() || h.ended || h.peek.is_some() {
                continue;
            }
            let event = tokio::select! {
                ev = h.reader.next(idle) => ev,
                _ = cancel.changed() => return Ok(None),
            };
            match event {
                HolderEvent::Chunk(c) => h.peek = Some(c),
                HolderEvent::End => h.ended = true,
                HolderEvent::Failed(e) => {
                    warn!(volume_id, holder = %h.reader.label, error = %e,
                        done_bytes = pos * BLOCK_SIZE, "holder dropped from the copy");
                    h.failed = Some(format!("{}: {e}", h.reader.label));
                }
            }
        }
        let live = self.live_count();
        if live < self.quorum.needed {
            let lost: Vec<String> = self
                .holders
                .iter()
                .filter_map(|h| h.failed.clone())
                .chain(self.unopened.iter().cloned())
                .collect();
            return Err(CopyError::TooFewHolders {
                answered: live,
                holders: self.quorum.listed,
                needed: self.quorum.needed,
                errors: lost.join("; "),
            });
        }
        let next = self
            .holders
            .iter()
            .filter(|h| h.live())
            .filter_map(|h| h.peek.as_ref().map(VersionedBlocks::first_block))
            .min()
            .unwrap_or(self.grid.end_block);
        if next > pos {
            return Ok(Some(Window::Gap {
                first: pos,
                len: (next - pos).min(GAP_BLOCKS),
            }));
        }
        let len = match self.grid.slot_len(pos) {
            Some(n) if n > 0 => n as u64,
            _ => {
                return Err(CopyError::Task(format!(
                    "block {pos} is off the chunk grid"
                )))
            }
        };
        let copies = self
            .holders
            .iter_mut()
            .filter(|h| h.live())
            .map(|h| match &h.peek {
                Some(c) if c.first_block() == pos => h.peek.take(),
                _ => None,
            })
            .collect();
        Ok(Some(Window::Slot {
            first: pos,
            len,
            copies,
        }))
    }
}
