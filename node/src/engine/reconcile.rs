//! Making the copies of a volume equal again before a new engine serves it.
//!
//! A new engine ([`super::Engine::open`]) reconciles every region that any replica
//! it reached reports dirty (`tessera_replica::sync_state`): per block it keeps the
//! version with the highest seq and an intact checksum among the replicas the last
//! in-sync declaration names (*sources*), and copies it, with its own seq, to every
//! reached replica holding anything else (*targets*: sources that differ, and
//! replicas out of sync, whose leftovers are overwritten even when their seq is
//! higher: a write only such a replica holds was never acknowledged, and reads may
//! already have been served without it). Nothing else is read: blocks outside the
//! dirty regions are equal on every replica that was in sync.
//!
//! Why the highest seq among the sources is right: every acknowledged write reached
//! a majority of the set, all in sync at the time; the replicas reached form a
//! majority too, so at least one reached source took it, and seqs only grow, so no
//! older version can outrank it. Reconciling happens before the engine serves any
//! I/O, so the copies are written unconditionally.
//!
//! [`plan_region`] is the pure part (which block goes where); the engine's
//! `reconcile_region` runs it against the replicas.

use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::block::BLOCK_SIZE;

/// What one target replica must receive for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fix {
    /// Block index in the volume.
    pub block: u64,
    /// Replica holding the winning version (to fetch data from).
    pub source: usize,
    /// The winning version.
    pub version: BlockVersion,
    /// Replicas to copy it to (bit i = replica i).
    pub targets: u32,
}

/// The version that wins among `candidates` (replica, version): the highest seq
/// with an intact checksum; `None` when every candidate is corrupt (or there are
/// none).
pub(crate) fn winner(
    candidates: impl IntoIterator<Item = (usize, BlockVersion)>,
) -> Option<(usize, BlockVersion)> {
    candidates
        .into_iter()
        .filter(|(_, v)| !matches!(v, BlockVersion::Corrupt { .. }))
        .max_by_key(|(_, v)| v.seq())
}

/// Per-region outcome of planning.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Blocks to copy, ascending by block.
    pub fixes: Vec<Fix>,
    /// Blocks with no intact version on any source (left as they are; reads of
    /// them fail their checksum where corrupt).
    pub lost: Vec<u64>,
}

/// Plans one region. `versions[i]` is replica i's versions of the region's blocks
/// (starting at `first_block`), `None` for replicas that are not taking part;
/// `sources` is the mask of replicas whose versions may win.
pub(crate) fn plan_region(
    first_block: u64,
    versions: &[Option<Vec<BlockVersion>>],
    sources: u32,
) -> Plan {
    let blocks = versions.iter().flatten().map(Vec::len).max().unwrap_or(0);
    let mut plan = Plan::default();
    for k in 0..blocks {
        let at = |i: usize| versions[i].as_ref().and_then(|v| v.get(k)).copied();
        let candidates = (0..versions.len())
            .filter(|i| sources & (1 << i) != 0)
            .filter_map(|i| at(i).map(|v| (i, v)));
        let Some((source, version)) = winner(candidates) else {
            if (0..versions.len()).any(|i| sources & (1 << i) != 0 && at(i).is_some()) {
                plan.lost.push(first_block + k as u64);
            }
            continue;
        };
        let targets = (0..versions.len())
            .filter(|&i| at(i).is_some_and(|v| !v.reads_like(&version)))
            .fold(0u32, |m, i| m | 1 << i);
        if targets != 0 {
            plan.fixes.push(Fix {
                block: first_block + k as u64,
                source,
                version,
                targets,
            });
        }
    }
    plan
}

/// Consecutive fixes that one request per target can apply: same targets, same
/// kind (data, or zeros/trim) and same seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    /// First block.
    pub block: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Replica holding the data (for data runs).
    pub source: usize,
    /// The version every block of the run takes.
    pub version: BlockVersion,
    /// Replicas to copy to.
    pub targets: u32,
}

impl Run {
    /// Byte offset of the run.
    pub fn offset(&self) -> u64 {
        self.block * BLOCK_SIZE
    }

    /// Byte length of the run.
    pub fn len(&self) -> u64 {
        self.blocks * BLOCK_SIZE
    }
}

/// Groups a region's fixes into runs (see [`Run`]).
pub(crate) fn runs(fixes: &[Fix]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for f in fixes {
        if let Some(last) = out.last_mut() {
            let contiguous = last.block + last.blocks == f.block;
            let same_kind = std::mem::discriminant(&last.version)
                == std::mem::discriminant(&f.version)
                && last.version.seq() == f.version.seq();
            let same_source =
                last.source == f.source || !matches!(f.version, BlockVersion::Data { .. });
            if contiguous && same_kind && same_source && last.targets == f.targets {
                last.blocks += 1;
                continue;
            }
        }
        out.push(Run {
            block: f.block,
            blocks: 1,
            source: f.source,
            version: f.version,
            targets: f.targets,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockVersion::{Corrupt, Data, Trimmed, Unwritten};

    #[test]
    fn the_highest_intact_source_version_wins_and_goes_to_every_differing_replica() {
        // Replicas 0 and 1 are sources, 2 is out of sync (its higher seq never wins).
        let versions = vec![
            Some(vec![
                Data { seq: 5 },
                Data { seq: 9 },
                Corrupt { seq: 8 },
                Unwritten,
            ]),
            Some(vec![
                Data { seq: 7 },
                Data { seq: 9 },
                Data { seq: 6 },
                Trimmed { seq: 0 },
            ]),
            Some(vec![
                Data { seq: 99 },
                Data { seq: 9 },
                Data { seq: 6 },
                Data { seq: 3 },
            ]),
        ];
        let plan = plan_region(100, &versions, 0b011);
        assert_eq!(
            plan.fixes,
            vec![
                Fix {
                    block: 100,
                    source: 1,
                    version: Data { seq: 7 },
                    targets: 0b101
                },
                Fix {
                    block: 102,
                    source: 1,
                    version: Data { seq: 6 },
                    targets: 0b001
                },
                // Unwritten and a trim at seq 0 read alike; either may win the tie.
                Fix {
                    block: 103,
                    source: 1,
                    version: Trimmed { seq: 0 },
                    targets: 0b100
                },
            ]
        );
        assert!(plan.lost.is_empty());
    }

    #[test]
    fn a_block_corrupt_on_every_source_is_reported_lost_not_copied() {
        let versions = vec![
            Some(vec![Corrupt { seq: 4 }]),
            None,
            Some(vec![Data { seq: 4 }]),
        ];
        let plan = plan_region(7, &versions, 0b001);
        assert!(plan.fixes.is_empty());
        assert_eq!(plan.lost, vec![7]);
    }

    #[test]
    fn a_newer_trim_beats_older_data() {
        let versions = vec![Some(vec![Trimmed { seq: 10 }]), Some(vec![Data { seq: 4 }])];
        let plan = plan_region(0, &versions, 0b11);
        assert_eq!(
            plan.fixes,
            vec![Fix {
                block: 0,
                source: 0,
                version: Trimmed { seq: 10 },
                targets: 0b10
            }]
        );
    }

    #[test]
    fn runs_join_only_contiguous_fixes_of_one_version_source_and_target_set() {
        let f = |block, source, version, targets| Fix {
            block,
            source,
            version,
            targets,
        };
        let fixes = vec![
            f(0, 0, Data { seq: 3 }, 0b10),
            f(1, 0, Data { seq: 3 }, 0b10),
            f(2, 0, Data { seq: 4 }, 0b10), // other seq
            f(4, 0, Data { seq: 4 }, 0b10), // gap
            f(5, 1, Data { seq: 4 }, 0b10), // other source
            f(6, 1, Data { seq: 4 }, 0b01), // other targets
            f(7, 0, Trimmed { seq: 2 }, 0b01),
            f(8, 1, Trimmed { seq: 2 }, 0b01), // a trim needs no source: joins
        ];
        let r = runs(&fixes);
        let shape: Vec<(u64, u64)> = r.iter().map(|r| (r.block, r.blocks)).collect();
        assert_eq!(shape, vec![(0, 2), (2, 1), (4, 1), (5, 1), (6, 1), (7, 2)]);
        assert_eq!(r[0].offset(), 0);
        assert_eq!(r[5].len(), 2 * BLOCK_SIZE);
    }
}
