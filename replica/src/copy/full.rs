//! The full copy of a window (a volume that starts empty): merge the holders' data
//! chunks ([`SnapshotMerger`]) and write every kept data block with [`COPY_SEQ`].
//!
//! An earlier attempt that crashed may have written blocks past the durable
//! `done_bytes`; they are found once per attempt (the *stale* ranges) and trimmed
//! wherever the merge leaves the block empty, so what the volume ends up holding is
//! the merge whatever the earlier attempt did.

use std::ops::Range;
use std::sync::Arc;

use super::error::CopyError;
use super::holders::Window;
use super::merge::{Chosen, SnapshotMerger};
use super::ops::{Ops, COPY_SEQ};
use super::task::blocking;
use crate::block_io::BLOCK_SIZE;
use crate::store::LayeredStore;

/// An attempt's full-copy state.
pub(super) struct FullCopy {
    /// Blocks written past `done` before this attempt (by a crashed one).
    stale: Vec<Range<u64>>,
}

impl FullCopy {
    /// Prepares an attempt that copies bytes `[done, total)` into `store`.
    pub async fn prepare(
        store: &Arc<LayeredStore>,
        done: u64,
        total: u64,
    ) -> Result<FullCopy, CopyError> {
        let store = Arc::clone(store);
        let ranges = blocking(move || store.allocated_ranges(None)).await??;
        Ok(FullCopy {
            stale: clip(ranges, done, total),
        })
    }

    /// The operations of `window`; `every` says whether every listed holder answered
    /// (the merge's rule for damaged newest versions).
    pub fn plan(&self, window: Window, every: bool) -> Result<Ops, CopyError> {
        match window {
            Window::Gap { first, len } => {
                // Nobody has anything here: only stale blocks need clearing.
                let mut ops = Ops::default();
                trims(&mut ops, &self.stale, first, first + len);
                Ok(ops)
            }
            Window::Slot { first, len, copies } => {
                let copies: Vec<_> = copies.iter().map(Option::as_ref).collect();
                let merged = SnapshotMerger::new(every).merge(first, len as usize, &copies)?;
                Ok(plan(first, &merged, &self.stale))
            }
        }
    }
}

/// Block ranges of `ranges` (bytes) within `[from, to)` bytes.
fn clip(ranges: Vec<Range<u64>>, from: u64, to: u64) -> Vec<Range<u64>> {
    ranges
        .into_iter()
        .filter_map(|r| {
            let start = r.start.max(from);
            let end = r.end.min(to);
            (start < end).then_some(start / BLOCK_SIZE..end / BLOCK_SIZE)
        })
        .collect()
}

/// Trims of the stale blocks within blocks `[from, to)`.
fn trims(ops: &mut Ops, stale: &[Range<u64>], from: u64, to: u64) {
    for r in stale {
        let start = r.start.max(from);
        let end = r.end.min(to);
        if start < end {
            ops.trim(start, end - start, COPY_SEQ);
        }
    }
}

/// The writes (kept data) and trims (stale blocks the merge leaves empty) of a
/// merged window.
fn plan(first: u64, merged: &[Chosen<'_>], stale: &[Range<u64>]) -> Ops {
    let mut ops = Ops::default();
    for (i, chosen) in merged.iter().enumerate() {
        let block = first + i as u64;
        match chosen {
            Chosen::Data { bytes, .. } => ops.write(block, bytes, COPY_SEQ),
            Chosen::Unwritten | Chosen::Trimmed { .. } => trims(&mut ops, stale, block, block + 1),
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::super::ops::{apply, Op};
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn plans_data_runs_and_trims_only_stale_empty_blocks() {
        let a = vec![1u8; B as usize];
        let b = vec![2u8; B as usize];
        let merged = [
            Chosen::Data { seq: 3, bytes: &a },
            Chosen::Data { seq: 4, bytes: &b },
            Chosen::Unwritten,
            Chosen::Trimmed { seq: 9 },
            Chosen::Unwritten,
            Chosen::Data { seq: 1, bytes: &a },
            Chosen::Unwritten,
        ];
        // Stale blocks 12..14 (block 14 is empty in the merge too; 15 gets data).
        let ops = plan(10, &merged, &[12..13, 13..16]);
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Write {
                    offset: 10 * B,
                    data: [a.clone(), b].concat(),
                    seq: COPY_SEQ
                },
                Op::Trim {
                    offset: 12 * B,
                    len: 3 * B,
                    seq: COPY_SEQ
                },
                Op::Write {
                    offset: 15 * B,
                    data: a,
                    seq: COPY_SEQ
                },
            ]
        );
        assert!(plan(0, &[Chosen::Unwritten], &[]).is_empty());
    }

    #[test]
    fn clip_keeps_the_part_still_to_copy() {
        assert_eq!(
            clip(
                vec![0..8 * B, 10 * B..12 * B, 20 * B..30 * B],
                4 * B,
                25 * B
            ),
            vec![4..8, 10..12, 20..25]
        );
    }

    #[test]
    fn gaps_clear_only_stale_blocks() {
        let full = FullCopy {
            stale: vec![2..4, 100..110],
        };
        let ops = full
            .plan(Window::Gap { first: 3, len: 100 }, true)
            .expect("plan");
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Trim {
                    offset: 3 * B,
                    len: B,
                    seq: COPY_SEQ
                },
                Op::Trim {
                    offset: 100 * B,
                    len: 3 * B,
                    seq: COPY_SEQ
                },
            ]
        );
    }

    #[tokio::test]
    async fn stale_writes_past_done_are_cleared_when_the_merge_leaves_them_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create"));
        store
            .write(2 * B, &vec![7u8; 2 * B as usize], COPY_SEQ)
            .expect("write");
        let stale = clip(store.allocated_ranges(None).expect("ranges"), 0, 8 * B);
        let kept = vec![5u8; B as usize];
        let merged = [
            Chosen::Unwritten,
            Chosen::Unwritten,
            Chosen::Data {
                seq: 9,
                bytes: &kept,
            },
        ];
        apply(&store, plan(1, &merged, &stale))
            .await
            .expect("apply");
        assert_eq!(store.read(2 * B, B).expect("read"), vec![0u8; B as usize]);
        assert_eq!(store.read(3 * B, B).expect("read"), kept);
        assert_eq!(store.block_seq(3).expect("seq"), Some(COPY_SEQ));
    }
}
