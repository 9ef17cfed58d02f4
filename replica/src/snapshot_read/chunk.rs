//! The wire form of a `ReadSnapshotBlocks` chunk ([`proto::SnapshotBlocks`]), both
//! ways: encoding a store's [`VersionedBlocks`] and decoding (and checking) what a
//! holder sent.
//!
//! Chunks lie on a grid: for a request starting at block `s` and ending before block
//! `e`, chunk `k` covers blocks `s + 256k .. min(s + 256(k+1), e)`, and a holder sends
//! only the chunks holding at least one written block, in order. A reader therefore
//! knows where every chunk belongs, treats a skipped chunk as never written, and
//! rejects anything off the grid, out of order, or inconsistent with itself, so a
//! confused or damaged holder cannot make a copy write blocks to the wrong place.
//!
//! A `seqs_only` request gets versions-only chunks: the same seqs and bitmaps, no data
//! (empty, with the crc32c of no bytes). The reader decodes each chunk as the kind it
//! asked for ([`ChunkKind`]); data in reply to `seqs_only`, or data blocks without
//! their bytes in reply to a data request, is a protocol error.

use crate::block_io::BLOCK_SIZE;
use crate::control_proto as proto;
use crate::store::{BlockVersion, VersionedBlocks};

/// Blocks per chunk (1 MiB of data at most, well under gRPC's 4 MiB message limit).
pub const CHUNK_BLOCKS: u64 = 256;

/// Why a received chunk was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk does not start on the request's chunk grid, or lies outside it.
    #[error("chunk at byte {offset} is not on the chunk grid of the requested range")]
    OffGrid {
        /// Offset the chunk claims.
        offset: u64,
    },
    /// The chunk does not come after the previous one.
    #[error("chunk at byte {offset} arrived after the chunk ending at byte {previous_end}")]
    OutOfOrder {
        /// Offset the chunk claims.
        offset: u64,
        /// End of the previous chunk.
        previous_end: u64,
    },
    /// The number of seqs is not the number of blocks of its grid slot.
    #[error("chunk at byte {offset} has {got} blocks, its slot has {expected}")]
    BlockCount {
        /// Offset of the chunk.
        offset: u64,
        /// Seqs sent.
        got: usize,
        /// Blocks in the slot.
        expected: usize,
    },
    /// A bitmap has the wrong length, or marks a block both trimmed and corrupt.
    #[error("chunk at byte {offset} has an invalid {which} bitmap")]
    Bitmap {
        /// Offset of the chunk.
        offset: u64,
        /// "trimmed" or "corrupt", or "trimmed and corrupt" for overlap.
        which: &'static str,
    },
    /// The data is not 4096 bytes per intact data block.
    #[error("chunk at byte {offset} carries {got} data bytes, expected {expected}")]
    DataLength {
        /// Offset of the chunk.
        offset: u64,
        /// Bytes sent.
        got: usize,
        /// Bytes its seqs and bitmaps call for.
        expected: usize,
    },
    /// A reply to a `seqs_only` request carries data.
    #[error("chunk at byte {offset} carries {got} data bytes in reply to a seqs_only request")]
    UnexpectedData {
        /// Offset of the chunk.
        offset: u64,
        /// Bytes sent.
        got: usize,
    },
    /// The data does not match its crc32c: damaged in transit.
    #[error("chunk at byte {offset} failed its data checksum")]
    Checksum {
        /// Offset of the chunk.
        offset: u64,
    },
}

/// What the chunks of a stream carry, as the request asked (`seqs_only`); a reader
/// needs it to tell a valid chunk from a confused one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Versions and the data of every intact data block.
    Data,
    /// Versions only (seqs and bitmaps, empty data).
    VersionsOnly,
}

impl ChunkKind {
    /// The kind of chunk `request` gets.
    pub fn of_request(request: &proto::ReadSnapshotBlocksRequest) -> ChunkKind {
        if request.seqs_only {
            ChunkKind::VersionsOnly
        } else {
            ChunkKind::Data
        }
    }
}

/// The chunk grid of one `ReadSnapshotBlocks` request, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkGrid {
    /// First block requested.
    pub start_block: u64,
    /// Block after the last one requested.
    pub end_block: u64,
}

impl ChunkGrid {
    /// The grid of a request for `length` bytes at `offset` (both block-aligned).
    pub fn of_request(offset: u64, length: u64) -> ChunkGrid {
        let start_block = offset / BLOCK_SIZE;
        ChunkGrid {
            start_block,
            end_block: start_block.saturating_add(length / BLOCK_SIZE),
        }
    }

    /// Number of blocks of the slot starting at `first_block`, if a slot starts there.
    pub fn slot_len(&self, first_block: u64) -> Option<usize> {
        if first_block < self.start_block
            || first_block >= self.end_block
            || !(first_block - self.start_block).is_multiple_of(CHUNK_BLOCKS)
        {
            return None;
        }
        usize::try_from(CHUNK_BLOCKS.min(self.end_block - first_block)).ok()
    }

    /// First blocks of every slot, in order.
    pub fn slots(&self) -> impl Iterator<Item = (u64, u64)> {
        let end = self.end_block;
        (self.start_block..end)
            .step_by(CHUNK_BLOCKS as usize)
            .map(move |first| (first, CHUNK_BLOCKS.min(end - first)))
    }
}

fn bit(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Encodes a range read from the store (see the module doc for the layout); a
/// versions-only range becomes a versions-only chunk.
pub fn encode(blocks: VersionedBlocks) -> proto::SnapshotBlocks {
    let (first_block, versions, data) = blocks.into_parts();
    let map_len = versions.len().div_ceil(8);
    let mut trimmed = vec![0u8; map_len];
    let mut corrupt = vec![0u8; map_len];
    let mut seqs = Vec::with_capacity(versions.len());
    for (i, v) in versions.iter().enumerate() {
        match v {
            BlockVersion::Trimmed { .. } => trimmed[i / 8] |= 1 << (i % 8),
            BlockVersion::Corrupt { .. } => corrupt[i / 8] |= 1 << (i % 8),
            BlockVersion::Unwritten | BlockVersion::Data { .. } => {}
        }
        seqs.push(v.seq());
    }
    proto::SnapshotBlocks {
        offset: first_block * BLOCK_SIZE,
        seqs,
        trimmed,
        corrupt,
        data_crc32c: crc32c::crc32c(&data),
        data,
    }
}

/// Decodes and checks one chunk of a request's stream, of the `kind` the request
/// asked for. `previous_end` is the block after the previous chunk (the grid's start
/// for the first one).
pub fn decode(
    chunk: proto::SnapshotBlocks,
    grid: ChunkGrid,
    previous_end: u64,
    kind: ChunkKind,
) -> Result<VersionedBlocks, ChunkError> {
    let offset = chunk.offset;
    let aligned = offset.is_multiple_of(BLOCK_SIZE);
    let first = offset / BLOCK_SIZE;
    let expected = grid
        .slot_len(first)
        .filter(|_| aligned)
        .ok_or(ChunkError::OffGrid { offset })?;
    if first < previous_end {
        return Err(ChunkError::OutOfOrder {
            offset,
            previous_end: previous_end.saturating_mul(BLOCK_SIZE),
        });
    }
    let n = chunk.seqs.len();
    if n != expected {
        return Err(ChunkError::BlockCount {
            offset,
            got: n,
            expected,
        });
    }
    let map_len = n.div_ceil(8);
    for (which, map) in [("trimmed", &chunk.trimmed), ("corrupt", &chunk.corrupt)] {
        if map.len() != map_len {
            return Err(ChunkError::Bitmap { offset, which });
        }
    }
    let mut versions = Vec::with_capacity(n);
    for (i, &seq) in chunk.seqs.iter().enumerate() {
        let v = match (bit(&chunk.trimmed, i), bit(&chunk.corrupt, i)) {
            (true, true) => {
                return Err(ChunkError::Bitmap {
                    offset,
                    which: "trimmed and corrupt",
                })
            }
            (true, false) => BlockVersion::Trimmed { seq },
            (false, true) => BlockVersion::Corrupt { seq },
            (false, false) if seq == 0 => BlockVersion::Unwritten,
            (false, false) => BlockVersion::Data { seq },
        };
        versions.push(v);
    }
    if crc32c::crc32c(&chunk.data) != chunk.data_crc32c {
        return Err(ChunkError::Checksum { offset });
    }
    let got = chunk.data.len();
    if kind == ChunkKind::VersionsOnly {
        if got != 0 {
            return Err(ChunkError::UnexpectedData { offset, got });
        }
        return Ok(VersionedBlocks::versions_only(first, versions));
    }
    VersionedBlocks::new(first, versions, chunk.data).map_err(|e| ChunkError::DataLength {
        offset,
        got,
        expected: e.data_blocks * BLOCK_SIZE as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = BLOCK_SIZE as usize;

    fn sample(first: u64, n: usize) -> VersionedBlocks {
        let mut versions = vec![BlockVersion::Unwritten; n];
        versions[0] = BlockVersion::Data { seq: 5 };
        versions[3] = BlockVersion::Trimmed { seq: 9 };
        versions[n - 1] = BlockVersion::Corrupt { seq: 7 };
        versions[n - 2] = BlockVersion::Data { seq: 6 };
        let data = [vec![1u8; BS], vec![2u8; BS]].concat();
        VersionedBlocks::new(first, versions, data).expect("consistent")
    }

    #[test]
    fn round_trips_on_the_grid() {
        let grid = ChunkGrid::of_request(4 * BLOCK_SIZE, 300 * BLOCK_SIZE);
        assert_eq!(grid.slots().collect::<Vec<_>>(), vec![(4, 256), (260, 44)]);
        let tail = sample(260, 44);
        let wire = encode(tail.clone());
        assert_eq!(wire.offset, 260 * BLOCK_SIZE);
        assert_eq!(wire.trimmed.len(), 6);
        assert_eq!(
            decode(wire, grid, 4, ChunkKind::Data).expect("decode"),
            tail
        );
        let head = sample(4, 256);
        assert_eq!(
            decode(encode(head.clone()), grid, 4, ChunkKind::Data).expect("decode"),
            head
        );
    }

    #[test]
    fn rejects_what_does_not_belong() {
        let grid = ChunkGrid::of_request(0, 512 * BLOCK_SIZE);
        let good = encode(sample(256, 256));
        let err = |c: proto::SnapshotBlocks, prev: u64| {
            decode(c, grid, prev, ChunkKind::Data).expect_err("bad")
        };

        let mut c = good.clone();
        c.offset = 100 * BLOCK_SIZE;
        assert!(matches!(err(c, 0), ChunkError::OffGrid { .. }));
        let mut c = good.clone();
        c.offset += 1;
        assert!(matches!(err(c, 0), ChunkError::OffGrid { .. }));
        let mut c = good.clone();
        c.offset = 512 * BLOCK_SIZE;
        assert!(matches!(err(c, 0), ChunkError::OffGrid { .. }));
        assert!(matches!(
            err(good.clone(), 300),
            ChunkError::OutOfOrder { .. }
        ));
        let mut c = good.clone();
        c.seqs.pop();
        assert!(matches!(err(c, 0), ChunkError::BlockCount { .. }));
        let mut c = good.clone();
        c.trimmed.push(0);
        assert!(matches!(err(c, 0), ChunkError::Bitmap { .. }));
        let mut c = good.clone();
        c.corrupt[0] |= 1 << 3;
        assert!(matches!(err(c, 0), ChunkError::Bitmap { .. }));
        let mut c = good.clone();
        c.data[17] ^= 1;
        assert!(matches!(err(c, 0), ChunkError::Checksum { .. }));
        let mut c = good.clone();
        c.data.truncate(BS);
        c.data_crc32c = crc32c::crc32c(&c.data);
        assert!(matches!(err(c, 0), ChunkError::DataLength { .. }));
        // A seq of 0 with no flag is "never written": its data must not be sent.
        let mut c = good.clone();
        c.seqs[0] = 0;
        assert!(matches!(err(c, 0), ChunkError::DataLength { .. }));
        // A versions-only chunk where data was asked for: data blocks without bytes.
        let claims = VersionedBlocks::versions_only(256, sample(256, 256).versions().to_vec());
        assert!(matches!(
            err(encode(claims), 0),
            ChunkError::DataLength { got: 0, .. }
        ));
        // And a data chunk in reply to seqs_only.
        assert!(matches!(
            decode(good, grid, 0, ChunkKind::VersionsOnly),
            Err(ChunkError::UnexpectedData { got, .. }) if got == 2 * BS
        ));
    }

    /// Found by the `copy_chunk` fuzz target: the error for a chunk out of order
    /// multiplied the previous end by the block size and overflowed.
    #[test]
    fn an_out_of_order_error_with_a_huge_previous_end_does_not_overflow() {
        let grid = ChunkGrid::of_request(0, 512 * BLOCK_SIZE);
        assert!(matches!(
            decode(encode(sample(256, 256)), grid, u64::MAX, ChunkKind::Data),
            Err(ChunkError::OutOfOrder {
                previous_end: u64::MAX,
                ..
            })
        ));
    }

    #[test]
    fn versions_only_chunks_round_trip_without_data() {
        let grid = ChunkGrid::of_request(0, 300 * BLOCK_SIZE);
        let claims = VersionedBlocks::versions_only(256, sample(256, 44).versions().to_vec());
        let wire = encode(claims.clone());
        assert!(wire.data.is_empty());
        assert_eq!(wire.data_crc32c, crc32c::crc32c(&[]));
        assert_eq!(wire.seqs[0], 5);
        assert_eq!(wire.trimmed[0], 1 << 3);
        let back = decode(wire.clone(), grid, 0, ChunkKind::VersionsOnly).expect("decode");
        assert!(back.is_versions_only());
        assert_eq!(back, claims);
        // A chunk with no data block is valid either way, but keeps the kind asked for.
        let trims = VersionedBlocks::versions_only(0, vec![BlockVersion::Trimmed { seq: 2 }; 256]);
        let as_data = decode(encode(trims), grid, 0, ChunkKind::Data).expect("decode");
        assert!(!as_data.is_versions_only());
        // Still checked: a damaged crc is damage whatever the kind.
        let mut c = wire;
        c.data_crc32c ^= 1;
        assert!(matches!(
            decode(c, grid, 0, ChunkKind::VersionsOnly),
            Err(ChunkError::Checksum { .. })
        ));
        let req = |seqs_only| proto::ReadSnapshotBlocksRequest {
            seqs_only,
            ..Default::default()
        };
        assert_eq!(ChunkKind::of_request(&req(true)), ChunkKind::VersionsOnly);
        assert_eq!(ChunkKind::of_request(&req(false)), ChunkKind::Data);
    }
}
