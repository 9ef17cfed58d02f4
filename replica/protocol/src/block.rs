//! The block layout both sides of the protocols share: the block size, a block's
//! version (the seq that wrote it, a trim tombstone, damage) and a range of blocks
//! with their versions and data.
//!
//! A replica answers VERSIONS and `ReadSnapshotBlocks` with these; an engine's
//! reconcile and a restore merge copies by them (the highest seq wins, a trim with
//! a higher seq beats older data, a damaged copy gives way).

/// Bytes per block: the unit of checksums, seqs and every offset on the wire.
pub const BLOCK_SIZE: u64 = 4096;

const BS: usize = BLOCK_SIZE as usize;

/// The version of one block in a snapshot's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockVersion {
    /// No layer of the view has the block: it reads as zeros and has no seq.
    Unwritten,
    /// Intact data written at `seq`.
    Data {
        /// Seq of the write.
        seq: u64,
    },
    /// A trim tombstone at `seq`: reads as zeros, hides older data.
    Trimmed {
        /// Seq of the trim.
        seq: u64,
    },
    /// The block failed its checksum here (its data is not returned). `seq` is what
    /// its entry claims (0 when the entry itself is missing) and may be damaged too.
    Corrupt {
        /// Seq the damaged entry names.
        seq: u64,
    },
}

impl BlockVersion {
    /// Whether two versions read the same: unwritten and a trim at seq 0 (what a
    /// reconcile writes for "unwritten") are alike; a corrupt copy is like nothing.
    pub fn reads_like(&self, other: &BlockVersion) -> bool {
        let zero = |v: &BlockVersion| {
            matches!(
                v,
                BlockVersion::Unwritten | BlockVersion::Trimmed { seq: 0 }
            )
        };
        match (self, other) {
            (BlockVersion::Corrupt { .. }, _) | (_, BlockVersion::Corrupt { .. }) => false,
            (a, b) if zero(a) && zero(b) => true,
            (a, b) => a == b,
        }
    }

    /// The seq of this version; 0 for [`BlockVersion::Unwritten`].
    pub fn seq(&self) -> u64 {
        match *self {
            BlockVersion::Unwritten => 0,
            BlockVersion::Data { seq }
            | BlockVersion::Trimmed { seq }
            | BlockVersion::Corrupt { seq } => seq,
        }
    }
}

/// Why a [`VersionedBlocks`] cannot be built from its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{data_len} data bytes for {data_blocks} data blocks (expected {BLOCK_SIZE} each)")]
pub struct DataLengthMismatch {
    /// Bytes given.
    pub data_len: usize,
    /// Blocks whose version is [`BlockVersion::Data`].
    pub data_blocks: usize,
}

/// Consecutive blocks of a snapshot's view with their versions, and the bytes of the
/// intact data blocks packed in block order (4096 per [`BlockVersion::Data`] block).
/// The packing mirrors the wire chunk of `ReadSnapshotBlocks`, so a chunk is built
/// and checked without copying block by block.
///
/// A *versions-only* range ([`Self::versions_only`]) carries no data at all: its
/// [`BlockVersion::Data`] seqs are what the metadata entries claim, unchecked against
/// the bytes. It exists so a replica that already holds most of a snapshot can find
/// the blocks where copies differ without moving (or even reading) their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedBlocks {
    first_block: u64,
    versions: Vec<BlockVersion>,
    data: Vec<u8>,
    versions_only: bool,
}

impl VersionedBlocks {
    /// Builds a range from its parts; the data must hold exactly one block per
    /// [`BlockVersion::Data`] entry.
    pub fn new(
        first_block: u64,
        versions: Vec<BlockVersion>,
        data: Vec<u8>,
    ) -> Result<Self, DataLengthMismatch> {
        let data_blocks = versions
            .iter()
            .filter(|v| matches!(v, BlockVersion::Data { .. }))
            .count();
        if data.len() != data_blocks * BS {
            return Err(DataLengthMismatch {
                data_len: data.len(),
                data_blocks,
            });
        }
        Ok(VersionedBlocks {
            first_block,
            versions,
            data,
            versions_only: false,
        })
    }

    /// A range of versions without data (see the type's doc): data entries are claims
    /// nobody checked, and [`Self::iter`] yields no bytes for them.
    pub fn versions_only(first_block: u64, versions: Vec<BlockVersion>) -> Self {
        VersionedBlocks {
            first_block,
            versions,
            data: Vec::new(),
            versions_only: true,
        }
    }

    /// Whether this range carries versions only (no data even for data blocks).
    pub fn is_versions_only(&self) -> bool {
        self.versions_only
    }

    /// Index of the first block.
    pub fn first_block(&self) -> u64 {
        self.first_block
    }

    /// Number of blocks covered.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    /// Whether the range covers no block.
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// Whether no block of the range was ever written (nothing worth sending).
    pub fn is_unwritten(&self) -> bool {
        self.versions.iter().all(|v| *v == BlockVersion::Unwritten)
    }

    /// Per-block versions, in block order.
    pub fn versions(&self) -> &[BlockVersion] {
        &self.versions
    }

    /// The packed data of the intact data blocks.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Every block with its version and, for intact data, its bytes (never for a
    /// versions-only range).
    pub fn iter(&self) -> impl Iterator<Item = (u64, BlockVersion, Option<&[u8]>)> + '_ {
        let mut chunks = self.data.chunks_exact(BS);
        self.versions.iter().enumerate().map(move |(i, v)| {
            let bytes = match v {
                BlockVersion::Data { .. } if !self.versions_only => chunks.next(),
                _ => None,
            };
            (self.first_block + i as u64, *v, bytes)
        })
    }

    /// Takes the parts back (for encoding without a copy).
    pub fn into_parts(self) -> (u64, Vec<BlockVersion>, Vec<u8>) {
        (self.first_block, self.versions, self.data)
    }
}
