//! The full copy of a window (a volume that starts empty): merge the holders' data
//! chunks ([`SnapshotMerger`]) and write every kept block.
//!
//! A restore or clone writes kept data with [`COPY_SEQ`] and nothing for trims (its
//! volume starts empty, and its own engines' writes must outrank the copy). A rebuild
//! makes a replica like the others, so it writes every kept data block with the seq
//! it carries and every kept trim as a tombstone with its seq.
//!
//! An earlier attempt that crashed may have written blocks past the durable
//! `done_bytes`; they are found once per attempt (the *stale* ranges) and cleared
//! wherever the merge leaves the block empty, so what the volume ends up holding is
//! the merge whatever the earlier attempt did. "Empty" is what the volume must read
//! as there: for a restore, zeros (a [`COPY_SEQ`] trim of its stale data); for a
//! rebuild, *never written*, as on every holder (a stale block, data or tombstone, is
//! forgotten: a tombstone would be a version the other replicas lack).

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
    /// Blocks written past `done` before this attempt (by a crashed one): with data
    /// for a restore, with any version for a rebuild.
    stale: Vec<Range<u64>>,
    /// Kept blocks carry their own seqs, and stale ones are forgotten (module doc).
    rebuild: bool,
}

impl FullCopy {
    /// Prepares an attempt that copies bytes `[done, total)` into `store`.
    pub async fn prepare(
        store: &Arc<LayeredStore>,
        done: u64,
        total: u64,
        rebuild: bool,
    ) -> Result<FullCopy, CopyError> {
        let store = Arc::clone(store);
        let ranges = blocking(move || {
            if rebuild {
                store.written_ranges(None)
            } else {
                store.allocated_ranges(None)
            }
        })
        .await??;
        Ok(FullCopy {
            stale: clip(ranges, done, total),
            rebuild,
        })
    }

    /// The operations of `window`; `every` says whether every listed holder answered
    /// (the merge's rule for damaged newest versions).
    pub fn plan(&self, window: Window, every: bool) -> Result<Ops, CopyError> {
        match window {
            Window::Gap { first, len } => {
                // Nobody has anything here: only stale blocks need clearing.
                let mut ops = Ops::default();
                self.clear(&mut ops, first, first + len);
                Ok(ops)
            }
            Window::Slot { first, len, copies } => {
                let copies: Vec<_> = copies.iter().map(Option::as_ref).collect();
                let merged = SnapshotMerger::new(every).merge(first, len as usize, &copies)?;
                Ok(self.plan_merged(first, &merged))
            }
        }
    }

    /// Clears the stale blocks within blocks `[from, to)` (module doc).
    fn clear(&self, ops: &mut Ops, from: u64, to: u64) {
        for r in &self.stale {
            let start = r.start.max(from);
            let end = r.end.min(to);
            if start >= end {
                continue;
            }
            if self.rebuild {
                ops.forget(start, end - start);
            } else {
                ops.trim(start, end - start, COPY_SEQ);
            }
        }
    }

    /// The writes, trims and clears of a merged window.
    fn plan_merged(&self, first: u64, merged: &[Chosen<'_>]) -> Ops {
        let mut ops = Ops::default();
        for (i, chosen) in merged.iter().enumerate() {
            let block = first + i as u64;
            match *chosen {
                Chosen::Data { seq, bytes } if self.rebuild => ops.write(block, bytes, seq),
                Chosen::Data { bytes, .. } => ops.write(block, bytes, COPY_SEQ),
                Chosen::Trimmed { seq } if self.rebuild => ops.trim(block, 1, seq),
                Chosen::Unwritten | Chosen::Trimmed { .. } => {
                    self.clear(&mut ops, block, block + 1)
                }
            }
        }
        ops
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

#[cfg(test)]
mod tests {
    use super::super::ops::{apply, Op};
    use super::*;

    const B: u64 = BLOCK_SIZE;

    fn full(stale: Vec<Range<u64>>, rebuild: bool) -> FullCopy {
        FullCopy { stale, rebuild }
    }

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
        let ops = full(vec![12..13, 13..16], false).plan_merged(10, &merged);
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Write {
                    offset: 10 * B,
                    data: [a.clone(), b].concat(),
                    seqs: vec![COPY_SEQ; 2],
                },
                Op::Trim {
                    offset: 12 * B,
                    len: 3 * B,
                    seq: COPY_SEQ
                },
                Op::Write {
                    offset: 15 * B,
                    data: a,
                    seqs: vec![COPY_SEQ],
                },
            ]
        );
        assert!(full(vec![], false)
            .plan_merged(0, &[Chosen::Unwritten])
            .is_empty());
    }

    #[test]
    fn a_rebuild_keeps_every_seq_and_forgets_stale_empty_blocks() {
        let a = vec![1u8; B as usize];
        let b = vec![2u8; B as usize];
        let merged = [
            Chosen::Data { seq: 3, bytes: &a },
            Chosen::Data { seq: 4, bytes: &b },
            Chosen::Unwritten,
            Chosen::Trimmed { seq: 9 },
            Chosen::Unwritten,
            Chosen::Unwritten,
        ];
        // Stale 12 and 13 (13 gets its tombstone), and 15; 14 was never written.
        let ops = full(vec![12..14, 15..16], true).plan_merged(10, &merged);
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Write {
                    offset: 10 * B,
                    data: [a, b].concat(),
                    seqs: vec![3, 4],
                },
                Op::Forget {
                    offset: 12 * B,
                    len: B
                },
                Op::Trim {
                    offset: 13 * B,
                    len: B,
                    seq: 9
                },
                Op::Forget {
                    offset: 15 * B,
                    len: B
                },
            ]
        );
        let ops = full(vec![2..4, 100..110], true)
            .plan(Window::Gap { first: 3, len: 100 }, true)
            .expect("plan");
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Forget {
                    offset: 3 * B,
                    len: B
                },
                Op::Forget {
                    offset: 100 * B,
                    len: 3 * B
                },
            ]
        );
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
        let ops = full(vec![2..4, 100..110], false)
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
        let copy = FullCopy::prepare(&store, 0, 8 * B, false)
            .await
            .expect("prepare");
        let kept = vec![5u8; B as usize];
        let merged = [
            Chosen::Unwritten,
            Chosen::Unwritten,
            Chosen::Data {
                seq: 9,
                bytes: &kept,
            },
        ];
        apply(&store, copy.plan_merged(1, &merged))
            .await
            .expect("apply");
        assert_eq!(store.read(2 * B, B).expect("read"), vec![0u8; B as usize]);
        assert_eq!(store.read(3 * B, B).expect("read"), kept);
        assert_eq!(store.block_seq(3).expect("seq"), Some(COPY_SEQ));
    }

    #[tokio::test]
    async fn a_rebuild_leaves_stale_blocks_never_written_as_on_its_sources() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create"));
        // An interrupted attempt wrote 2 (data) and 3 (a tombstone), and 1 before
        // `done` (untouched by this attempt).
        store.write(B, &vec![6u8; B as usize], 40).expect("write");
        store
            .write(2 * B, &vec![7u8; B as usize], 50)
            .expect("write");
        store.trim(3 * B, B, 51).expect("trim");
        let copy = FullCopy::prepare(&store, 2 * B, 8 * B, true)
            .await
            .expect("prepare");
        let kept = vec![5u8; B as usize];
        let merged = [
            Chosen::Unwritten,
            Chosen::Unwritten,
            Chosen::Data {
                seq: 90,
                bytes: &kept,
            },
            Chosen::Trimmed { seq: 91 },
        ];
        apply(&store, copy.plan_merged(2, &merged))
            .await
            .expect("apply");
        let versions: Vec<Option<u64>> = (0..6).map(|b| store.block_seq(b).expect("seq")).collect();
        assert_eq!(
            versions,
            vec![None, Some(40), None, None, Some(90), Some(91)]
        );
        assert_eq!(store.read(4 * B, B).expect("read"), kept);
        assert_eq!(store.read(2 * B, B).expect("read"), vec![0u8; B as usize]);
    }
}
