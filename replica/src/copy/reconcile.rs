//! The reconcile of a window (a volume whose base shares this daemon's sealed layers
//! of the snapshot): compare the holders' versions with the local ones and fix only
//! the blocks that differ (the `compare` module).
//!
//! The holders' versions come from the attempt's versions-only streams; the local
//! ones from the metadata entries of the new volume's current view (shared base and
//! whatever an earlier attempt wrote into the head). Blocks that must read as zeros
//! are trimmed straight away. Blocks that need data are fetched: one short data
//! stream per live holder over just the span of those blocks, merged exactly as a
//! full copy merges ([`SnapshotMerger`], same every-holder-answered rule), and each
//! written with the winner's own seq, so a repeated comparison finds it in place.

use std::sync::Arc;

use super::compare::{self, Fix};
use super::error::CopyError;
use super::holders::{HolderSet, Quorum, Window};
use super::merge::{Chosen, SnapshotMerger};
use super::ops::{Ops, COPY_SEQ};
use super::task::{blocking, CopyJob};
use crate::block_io::BLOCK_SIZE;
use crate::control_proto as proto;
use crate::record::CopySource;
use crate::store::{BlockVersion, VersionedBlocks};

/// An attempt's reconcile state: where to fetch from.
pub(super) struct Reconcile {
    source_volume_id: String,
    snapshot_id: String,
    quorum: Quorum,
}

impl Reconcile {
    /// A reconcile of `source`'s snapshot, needing `quorum` for every fetch too.
    pub fn new(source: &CopySource, quorum: Quorum) -> Reconcile {
        Reconcile {
            source_volume_id: source.source_volume_id.clone(),
            snapshot_id: source.snapshot_id.clone(),
            quorum,
        }
    }

    /// The operations that make `window` of the local volume hold the merge of the
    /// holders' copies; `None` when the task was cancelled during a fetch.
    pub async fn plan(
        &self,
        job: &mut CopyJob,
        holders: &HolderSet,
        window: Window,
    ) -> Result<Option<Ops>, CopyError> {
        let (first, len) = (window.first(), window.len());
        let store = Arc::clone(&job.store);
        let local =
            blocking(move || store.read_versions_only(None, first * BLOCK_SIZE, len * BLOCK_SIZE))
                .await??;
        let claims = window.into_copies(holders.live_count());
        let claims: Vec<Option<&VersionedBlocks>> = claims.iter().map(Option::as_ref).collect();
        let fixes = compare::fixes(first, len as usize, &claims, &local)?;

        // The span from the first to the last block whose data must be fetched.
        let to_fetch = fixes.iter().position(|f| *f == Fix::Fetch).and_then(|lo| {
            let hi = fixes.iter().rposition(|f| *f == Fix::Fetch)?;
            Some((lo, hi + 1 - lo))
        });
        let fetched = match to_fetch {
            None => None,
            Some((lo, span)) => {
                let at = first + lo as u64;
                match self.fetch(job, holders, at, span as u64).await? {
                    Some((copies, every)) => Some((lo, span, copies, every)),
                    None => return Ok(None),
                }
            }
        };
        let merged = match &fetched {
            None => None,
            Some((lo, span, copies, every)) => {
                let copies: Vec<_> = copies.iter().map(Option::as_ref).collect();
                let at = first + *lo as u64;
                Some((*lo, SnapshotMerger::new(*every).merge(at, *span, &copies)?))
            }
        };
        let mut ops = Ops::default();
        for (i, (fix, mine)) in fixes.iter().zip(local.versions()).enumerate() {
            let block = first + i as u64;
            match (fix, &merged) {
                (Fix::Keep, _) => {}
                (Fix::Trim { seq }, _) => ops.trim(block, 1, *seq),
                (Fix::Fetch, Some((lo, merged))) => match merged[i - lo] {
                    Chosen::Data { seq, bytes } => ops.write(block, bytes, seq),
                    Chosen::Trimmed { seq } => ops.trim(block, 1, seq),
                    Chosen::Unwritten => {
                        if matches!(
                            mine,
                            BlockVersion::Data { .. } | BlockVersion::Corrupt { .. }
                        ) {
                            ops.trim(block, 1, COPY_SEQ);
                        }
                    }
                },
                // Every fetch-block lies in the fetched span.
                (Fix::Fetch, None) => {}
            }
        }
        Ok(Some(ops))
    }

    /// Reads the data of `len` blocks at `first` from the holders still answering:
    /// their chunks (one per holder that answered, `None` where it has no data) and
    /// whether every listed holder answered. `None` when cancelled.
    async fn fetch(
        &self,
        job: &mut CopyJob,
        holders: &HolderSet,
        first: u64,
        len: u64,
    ) -> Result<Option<(Vec<Option<VersionedBlocks>>, bool)>, CopyError> {
        let request = proto::ReadSnapshotBlocksRequest {
            volume_id: self.source_volume_id.clone(),
            snapshot_id: self.snapshot_id.clone(),
            offset: first * BLOCK_SIZE,
            length: len * BLOCK_SIZE,
            seqs_only: false,
        };
        let mut set = HolderSet::open(
            &holders.live_holders(),
            self.quorum,
            request,
            &job.config,
            job.bandwidth.clone(),
            &job.volume_id,
        )
        .await?;
        let Some(window) = set
            .next_window(
                first,
                job.config.idle_timeout,
                &mut job.cancel,
                &job.volume_id,
            )
            .await?
        else {
            return Ok(None);
        };
        if window.first() != first || window.len() != len {
            return Err(CopyError::Task(format!(
                "fetching blocks {first}+{len} got a window at {}+{}",
                window.first(),
                window.len()
            )));
        }
        let every = set.every_answered();
        Ok(Some((window.into_copies(set.live_count()), every)))
    }
}
