//! Comparing the holders' versions of a window with the local ones (pure, no I/O):
//! which blocks of a volume built on shared sealed layers differ from the merge of
//! the holders' copies, and how each is fixed.
//!
//! The merge a full copy would make keeps per block the highest seq among the holders
//! ([`super::merge`]); a holder without a chunk has every block unwritten. The local
//! block already holds that version when both read as zeros (unwritten, or trimmed at
//! any seq) or both are data of the same seq: seqs are unique per write, so the same
//! seq is the same bytes. Everything else is fixed:
//!
//! * the winner reads as zeros and the local block does not (data, or damaged):
//!   trimmed, with the winning trim's own seq (or [`COPY_SEQ`] where nobody has the
//!   block) — no data needed;
//! * the winner is data the local block lacks, or some holder's entry is damaged (its
//!   version may be the newest; only the data merge, with its rules for damage, can
//!   tell), or two holders claim the same seq for different kinds of version:
//!   fetched and merged from the holders' data.
//!
//! The local versions include whatever an earlier attempt already wrote into the
//! head, and fixes keep the winner's seq, so comparing again after a crash finds only
//! what is still missing.

use super::merge::MergeError;
use super::ops::COPY_SEQ;
use crate::store::{BlockVersion, VersionedBlocks};

/// What one local block needs to hold the holders' merged version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fix {
    /// It already holds it.
    Keep,
    /// It must read as zeros: trim it with `seq`.
    Trim {
        /// Seq of the tombstone (the winning trim's, or [`COPY_SEQ`]).
        seq: u64,
    },
    /// Its data must come from the holders (merged as a full copy merges).
    Fetch,
}

/// Whether two versions read the same: zeros either way, or data of one seq.
fn same(a: BlockVersion, b: BlockVersion) -> bool {
    use BlockVersion::{Data, Trimmed, Unwritten};
    match (a, b) {
        (Unwritten | Trimmed { .. }, Unwritten | Trimmed { .. }) => true,
        (Data { seq: x }, Data { seq: y }) => x == y,
        _ => false,
    }
}

/// The fix of every block of the window of `len` blocks at `first`. `claims` has one
/// entry per holder that answered: its (versions-only) chunk there, or `None` when it
/// has none; `local` holds the local versions of the same window.
pub(super) fn fixes(
    first: u64,
    len: usize,
    claims: &[Option<&VersionedBlocks>],
    local: &VersionedBlocks,
) -> Result<Vec<Fix>, MergeError> {
    if claims.is_empty() {
        return Err(MergeError::NoCopies);
    }
    for c in claims.iter().flatten().chain([&local]) {
        if c.first_block() != first || c.len() != len {
            return Err(MergeError::Misaligned {
                expected: first,
                got: c.first_block(),
            });
        }
    }
    let absent = claims.iter().any(Option::is_none);
    let present: Vec<&[BlockVersion]> = claims.iter().flatten().map(|c| c.versions()).collect();
    let fixes = local
        .versions()
        .iter()
        .enumerate()
        .map(|(i, &mine)| {
            let mut winner = absent.then_some(BlockVersion::Unwritten);
            for versions in &present {
                let v = versions[i];
                match (v, winner) {
                    (BlockVersion::Corrupt { .. }, _) => return Fix::Fetch,
                    (_, None) => winner = Some(v),
                    (_, Some(w)) if v.seq() > w.seq() => winner = Some(v),
                    // One seq, two kinds of version: let the data merge decide.
                    (_, Some(w)) if v.seq() == w.seq() && !same(v, w) => return Fix::Fetch,
                    _ => {}
                }
            }
            match winner {
                Some(w) if same(w, mine) => Fix::Keep,
                Some(BlockVersion::Unwritten) => Fix::Trim { seq: COPY_SEQ },
                Some(BlockVersion::Trimmed { seq }) => Fix::Trim { seq },
                _ => Fix::Fetch,
            }
        })
        .collect();
    Ok(fixes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockVersion::{Corrupt as C, Data as D, Trimmed as T, Unwritten as U};

    fn claims(first: u64, versions: &[BlockVersion]) -> VersionedBlocks {
        VersionedBlocks::versions_only(first, versions.to_vec())
    }

    #[test]
    fn equal_versions_are_kept_and_zeros_equal_zeros() {
        let a = claims(8, &[D { seq: 5 }, T { seq: 3 }, U, T { seq: 9 }, U]);
        let b = claims(8, &[D { seq: 5 }, T { seq: 3 }, U, U, U]);
        let local = claims(8, &[D { seq: 5 }, U, T { seq: 1 }, T { seq: 2 }, U]);
        let f = fixes(8, 5, &[Some(&a), Some(&b)], &local).expect("fixes");
        assert_eq!(f, vec![Fix::Keep; 5]);
    }

    #[test]
    fn the_highest_seq_wins_as_in_the_merge() {
        let a = claims(
            0,
            &[D { seq: 5 }, D { seq: 7 }, T { seq: 9 }, U, D { seq: 3 }],
        );
        let b = claims(
            0,
            &[D { seq: 6 }, D { seq: 7 }, D { seq: 8 }, U, T { seq: 2 }],
        );
        // Local: an older write, the winner, a write the holders trimmed later, an
        // unacknowledged write nobody listed has, and a write newer than the trim.
        let local = claims(
            0,
            &[
                D { seq: 5 },
                D { seq: 7 },
                D { seq: 8 },
                D { seq: 4 },
                D { seq: 3 },
            ],
        );
        let f = fixes(0, 5, &[Some(&a), Some(&b)], &local).expect("fixes");
        assert_eq!(
            f,
            vec![
                Fix::Fetch,
                Fix::Keep,
                Fix::Trim { seq: 9 },
                Fix::Trim { seq: COPY_SEQ },
                Fix::Keep,
            ]
        );
        // A data winner the local copy lacks, over zeros: fetched.
        let local = claims(0, &[U, T { seq: 1 }, U, U, U]);
        let f = fixes(0, 5, &[Some(&a), Some(&b)], &local).expect("fixes");
        assert_eq!(f[..2], [Fix::Fetch, Fix::Fetch]);
    }

    #[test]
    fn a_holder_without_a_chunk_has_nothing_there() {
        let a = claims(0, &[D { seq: 2 }, U]);
        let local = claims(0, &[D { seq: 2 }, D { seq: 9 }]);
        let f = fixes(0, 2, &[None, Some(&a)], &local).expect("fixes");
        assert_eq!(f, vec![Fix::Keep, Fix::Trim { seq: COPY_SEQ }]);
        // Nobody has a chunk (a gap): only local data and damage need fixing.
        let local = claims(0, &[C { seq: 4 }, D { seq: 9 }, T { seq: 3 }]);
        let f = fixes(0, 3, &[None, None], &local).expect("fixes");
        assert_eq!(
            f,
            vec![
                Fix::Trim { seq: COPY_SEQ },
                Fix::Trim { seq: COPY_SEQ },
                Fix::Keep
            ]
        );
    }

    #[test]
    fn damage_anywhere_is_fixed_from_the_holders() {
        let a = claims(0, &[C { seq: 5 }, D { seq: 5 }, T { seq: 6 }, D { seq: 2 }]);
        let b = claims(0, &[D { seq: 5 }, D { seq: 5 }, T { seq: 6 }, T { seq: 2 }]);
        // Local damage where the winner is data, and where it is a trim.
        let local = claims(0, &[D { seq: 5 }, C { seq: 5 }, C { seq: 6 }, D { seq: 2 }]);
        let f = fixes(0, 4, &[Some(&a), Some(&b)], &local).expect("fixes");
        assert_eq!(
            f,
            vec![
                // A holder's damaged copy may hide a newer version: merge the data.
                Fix::Fetch,
                Fix::Fetch,
                Fix::Trim { seq: 6 },
                // Same seq, data on one holder and a trim on the other.
                Fix::Fetch,
            ]
        );
    }

    #[test]
    fn misaligned_and_empty_are_errors() {
        let a = claims(0, &[U, U]);
        let local = claims(0, &[U, U]);
        assert_eq!(
            fixes(256, 2, &[Some(&a)], &claims(256, &[U, U])),
            Err(MergeError::Misaligned {
                expected: 256,
                got: 0
            })
        );
        assert_eq!(
            fixes(0, 2, &[Some(&a)], &claims(0, &[U])),
            Err(MergeError::Misaligned {
                expected: 0,
                got: 0
            })
        );
        assert_eq!(fixes(0, 2, &[], &local), Err(MergeError::NoCopies));
    }
}
