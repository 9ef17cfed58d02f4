//! Merging the sealed copies of a snapshot block by block (pure, no I/O).
//!
//! The sealed copies of one snapshot differ only in writes that were in flight while
//! it was taken, and every acknowledged write is in at least one copy of any majority.
//! So per block the merge keeps the version with the highest seq among the copies that
//! answered; a trim tombstone is a version like any other (a newer trim beats older
//! data and reads as zeros). A copy that sent nothing for a window has every block of
//! it unwritten (seq 0).
//!
//! Damaged copies: a block that failed its checksum on one holder is taken from
//! another. Its seq is only a claim (the entry may be damaged too), but when it
//! claims to be newer than every intact version and some holder did not answer, the
//! missing holder may hold the only intact copy of an acknowledged write, so the
//! merge refuses ([`MergeError::NewestCorrupt`]) and the copy retries rather than
//! silently keeping older data. With every holder answering nothing better exists and
//! the newest intact version is kept. No intact version at all is
//! [`MergeError::AllCorrupt`].

use crate::store::{BlockVersion, VersionedBlocks};

/// The version of one block a merge keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen<'a> {
    /// No copy has a version: nothing to write.
    Unwritten,
    /// The newest version is a trim: reads as zeros, nothing to write into an empty
    /// volume.
    Trimmed {
        /// Seq of the trim.
        seq: u64,
    },
    /// The newest version is data.
    Data {
        /// Seq of the write on the source.
        seq: u64,
        /// Its 4096 bytes.
        bytes: &'a [u8],
    },
}

impl Chosen<'_> {
    fn seq(&self) -> u64 {
        match *self {
            Chosen::Unwritten => 0,
            Chosen::Trimmed { seq } | Chosen::Data { seq, .. } => seq,
        }
    }
}

/// Why a window cannot be merged; the copy records it and retries later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// No copy was given (the caller needs a majority first).
    #[error("no holder's copy to merge")]
    NoCopies,
    /// A copy does not cover exactly the window being merged.
    #[error("a holder's chunk at block {got} does not match the window at block {expected}")]
    Misaligned {
        /// First block of the window.
        expected: u64,
        /// First block of the chunk.
        got: u64,
    },
    /// Every copy of the block that answered failed its checksum.
    #[error("block {block} is corrupt on every holder that answered")]
    AllCorrupt {
        /// The block.
        block: u64,
    },
    /// The newest version claimed is corrupt wherever it was found, and a holder that
    /// may hold it intact did not answer.
    #[error(
        "block {block}: its newest version (seq {seq}) is corrupt on the holders that \
         answered; waiting for the others"
    )]
    NewestCorrupt {
        /// The block.
        block: u64,
        /// The seq the damaged copies claim.
        seq: u64,
    },
}

/// Merges the copies of one window of blocks from several holders (module doc).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotMerger {
    every_holder_answered: bool,
}

impl SnapshotMerger {
    /// A merger for copies from all holders (`true`) or only some of them.
    pub fn new(every_holder_answered: bool) -> Self {
        SnapshotMerger {
            every_holder_answered,
        }
    }

    /// Merges the window of `len` blocks at `first_block`. `copies` has one entry per
    /// holder that answered: its chunk for the window, or `None` when it sent none
    /// (every block unwritten there). Returns the kept version of each block.
    pub fn merge<'a>(
        &self,
        first_block: u64,
        len: usize,
        copies: &[Option<&'a VersionedBlocks>],
    ) -> Result<Vec<Chosen<'a>>, MergeError> {
        if copies.is_empty() {
            return Err(MergeError::NoCopies);
        }
        for c in copies.iter().flatten() {
            if c.first_block() != first_block || c.len() != len {
                return Err(MergeError::Misaligned {
                    expected: first_block,
                    got: c.first_block(),
                });
            }
        }
        let absent = copies.iter().filter(|c| c.is_none()).count();
        let mut present: Vec<_> = copies.iter().flatten().map(|c| c.iter()).collect();
        let mut out = Vec::with_capacity(len);
        for i in 0..len {
            let block = first_block + i as u64;
            let mut best = (absent > 0).then_some(Chosen::Unwritten);
            let mut corrupt_max: Option<u64> = None;
            for it in present.iter_mut() {
                let Some((_, version, bytes)) = it.next() else {
                    continue;
                };
                let candidate = match (version, bytes) {
                    (BlockVersion::Unwritten, _) => Chosen::Unwritten,
                    (BlockVersion::Trimmed { seq }, _) => Chosen::Trimmed { seq },
                    (BlockVersion::Data { seq }, Some(bytes)) => Chosen::Data { seq, bytes },
                    // Data without bytes only exists in versions-only chunks, which are
                    // never merged; treat it like damage rather than trusting it.
                    (BlockVersion::Data { seq }, None) | (BlockVersion::Corrupt { seq }, _) => {
                        corrupt_max = Some(corrupt_max.map_or(seq, |m| m.max(seq)));
                        continue;
                    }
                };
                if best.is_none_or(|b| candidate.seq() > b.seq()) {
                    best = Some(candidate);
                }
            }
            let Some(best) = best else {
                return Err(MergeError::AllCorrupt { block });
            };
            if let Some(seq) = corrupt_max.filter(|&s| s > best.seq()) {
                if !self.every_holder_answered {
                    return Err(MergeError::NewestCorrupt { block, seq });
                }
            }
            out.push(best);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4096;

    /// A chunk of `versions` at `first`, data blocks filled with their seq's low byte.
    fn chunk(first: u64, versions: &[BlockVersion]) -> VersionedBlocks {
        let data: Vec<u8> = versions
            .iter()
            .filter_map(|v| match v {
                BlockVersion::Data { seq } => Some(vec![*seq as u8; BS]),
                _ => None,
            })
            .flatten()
            .collect();
        VersionedBlocks::new(first, versions.to_vec(), data).expect("consistent chunk")
    }

    use BlockVersion::{Corrupt as C, Data as D, Trimmed as T, Unwritten as U};

    fn kept(chosen: &[Chosen<'_>]) -> Vec<(u8, u64, Option<u8>)> {
        chosen
            .iter()
            .map(|c| match c {
                Chosen::Unwritten => (b'u', 0, None),
                Chosen::Trimmed { seq } => (b't', *seq, None),
                Chosen::Data { seq, bytes } => (b'd', *seq, Some(bytes[0])),
            })
            .collect()
    }

    #[test]
    fn highest_seq_wins_and_newer_trims_beat_data() {
        let a = chunk(
            10,
            &[D { seq: 5 }, D { seq: 7 }, T { seq: 9 }, U, D { seq: 3 }],
        );
        let b = chunk(
            10,
            &[D { seq: 6 }, D { seq: 7 }, D { seq: 8 }, U, T { seq: 2 }],
        );
        let c = chunk(10, &[D { seq: 5 }, U, D { seq: 8 }, D { seq: 4 }, U]);
        let m = SnapshotMerger::new(true)
            .merge(10, 5, &[Some(&a), Some(&b), Some(&c)])
            .expect("merge");
        assert_eq!(
            kept(&m),
            vec![
                (b'd', 6, Some(6)),
                (b'd', 7, Some(7)),
                (b't', 9, None),
                (b'd', 4, Some(4)),
                (b'd', 3, Some(3)),
            ]
        );
    }

    #[test]
    fn a_holder_without_a_chunk_has_nothing_there() {
        let a = chunk(0, &[U, D { seq: 2 }]);
        let m = SnapshotMerger::new(false)
            .merge(0, 2, &[None, Some(&a)])
            .expect("merge");
        assert_eq!(kept(&m), vec![(b'u', 0, None), (b'd', 2, Some(2))]);
        let m = SnapshotMerger::new(true)
            .merge(0, 2, &[None, None])
            .expect("merge");
        assert_eq!(kept(&m), vec![(b'u', 0, None), (b'u', 0, None)]);
    }

    #[test]
    fn corrupt_copies_are_taken_from_elsewhere() {
        let a = chunk(0, &[C { seq: 5 }, C { seq: 9 }, C { seq: 0 }]);
        let b = chunk(0, &[D { seq: 5 }, D { seq: 8 }, U]);
        // Same version intact elsewhere: no doubt, whoever answered.
        let (bad, good) = (chunk(0, &[C { seq: 5 }]), chunk(0, &[D { seq: 5 }]));
        let m = SnapshotMerger::new(false)
            .merge(0, 1, &[Some(&bad), Some(&good)])
            .expect("merge");
        assert_eq!(kept(&m), vec![(b'd', 5, Some(5))]);
        // Every holder answered: the newest intact version is the best there is.
        let m = SnapshotMerger::new(true)
            .merge(0, 3, &[Some(&a), Some(&b)])
            .expect("merge");
        assert_eq!(
            kept(&m),
            vec![(b'd', 5, Some(5)), (b'd', 8, Some(8)), (b'u', 0, None)]
        );
        // A holder is missing and may hold seq 9 intact: refuse.
        assert_eq!(
            SnapshotMerger::new(false).merge(0, 3, &[Some(&a), Some(&b)]),
            Err(MergeError::NewestCorrupt { block: 1, seq: 9 })
        );
    }

    #[test]
    fn all_corrupt_misaligned_and_empty_are_errors() {
        let a = chunk(0, &[D { seq: 1 }, C { seq: 4 }]);
        let b = chunk(0, &[D { seq: 1 }, C { seq: 4 }]);
        assert_eq!(
            SnapshotMerger::new(true).merge(0, 2, &[Some(&a), Some(&b)]),
            Err(MergeError::AllCorrupt { block: 1 })
        );
        // An absent chunk is an intact "never written" copy, not a missing one.
        let m = SnapshotMerger::new(true)
            .merge(0, 2, &[Some(&a), None])
            .expect("merge");
        assert_eq!(kept(&m), vec![(b'd', 1, Some(1)), (b'u', 0, None)]);
        assert_eq!(
            SnapshotMerger::new(true).merge(256, 2, &[Some(&a)]),
            Err(MergeError::Misaligned {
                expected: 256,
                got: 0
            })
        );
        assert_eq!(
            SnapshotMerger::new(true).merge(0, 3, &[Some(&a)]),
            Err(MergeError::Misaligned {
                expected: 0,
                got: 0
            })
        );
        assert_eq!(
            SnapshotMerger::new(true).merge(0, 2, &[]),
            Err(MergeError::NoCopies)
        );
    }
}
