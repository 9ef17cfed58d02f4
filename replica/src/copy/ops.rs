//! The store operations one window of a copy ends in, and applying them to the new
//! volume. Both copy modes plan a window as [`Ops`] first and write it in one go, so
//! a failure while planning (a holder lost, a merge refused) writes nothing of it.

use std::sync::Arc;

use crate::block_io::BLOCK_SIZE;
use crate::store::{IoPriority, LayeredStore, StoreError};

/// Seq of the blocks a restore's or clone's full copy writes, and of the trims that
/// clear blocks the holders' merge leaves empty: older than any write of an engine of
/// the new volume (seq >= 1 << 40 from its first publish on), so the copy never hides
/// one. A rebuild writes each block with its own seq instead.
pub const COPY_SEQ: u64 = 1;

/// One store operation.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// Writes `data` (whole blocks) at `offset`, block i with `seqs[i]`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The blocks' bytes.
        data: Vec<u8>,
        /// Seq of each block written.
        seqs: Vec<u64>,
    },
    /// Trims `len` bytes at `offset` with `seq`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Seq of every tombstone.
        seq: u64,
    },
    /// Makes `len` bytes at `offset` never written again
    /// ([`LayeredStore::forget_async`]): a rebuild's stale blocks its sources lack.
    Forget {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// A window's operations in block order; adjacent blocks of the same kind (and, for
/// trims, the same seq) become one operation, so a window costs few store calls even
/// when a rebuild writes every block with a seq of its own.
#[derive(Debug, Default)]
pub(super) struct Ops {
    ops: Vec<Op>,
}

impl Ops {
    /// Adds a write of one block.
    pub fn write(&mut self, block: u64, bytes: &[u8], seq: u64) {
        let offset = block * BLOCK_SIZE;
        if let Some(Op::Write {
            offset: at,
            data,
            seqs,
        }) = self.ops.last_mut()
        {
            if *at + data.len() as u64 == offset {
                data.extend_from_slice(bytes);
                seqs.push(seq);
                return;
            }
        }
        self.ops.push(Op::Write {
            offset,
            data: bytes.to_vec(),
            seqs: vec![seq],
        });
    }

    /// Adds a trim of `count` blocks from `block`.
    pub fn trim(&mut self, block: u64, count: u64, seq: u64) {
        if count == 0 {
            return;
        }
        let offset = block * BLOCK_SIZE;
        if let Some(Op::Trim {
            offset: at,
            len,
            seq: s,
        }) = self.ops.last_mut()
        {
            if *s == seq && *at + *len == offset {
                *len += count * BLOCK_SIZE;
                return;
            }
        }
        self.ops.push(Op::Trim {
            offset,
            len: count * BLOCK_SIZE,
            seq,
        });
    }

    /// Adds a forget of `count` blocks from `block`.
    pub fn forget(&mut self, block: u64, count: u64) {
        if count == 0 {
            return;
        }
        let offset = block * BLOCK_SIZE;
        if let Some(Op::Forget { offset: at, len }) = self.ops.last_mut() {
            if *at + *len == offset {
                *len += count * BLOCK_SIZE;
                return;
            }
        }
        self.ops.push(Op::Forget {
            offset,
            len: count * BLOCK_SIZE,
        });
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of data written (what the copy fetched from holders and kept).
    pub fn data_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Write { data, .. } => data.len() as u64,
                Op::Trim { .. } | Op::Forget { .. } => 0,
            })
            .sum()
    }

    /// Blocks written, trimmed or forgotten.
    pub fn blocks(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Write { data, .. } => data.len() as u64,
                Op::Trim { len, .. } | Op::Forget { len, .. } => *len,
            })
            .sum::<u64>()
            / BLOCK_SIZE
    }

    /// The operations, in order.
    #[cfg(test)]
    pub fn as_slice(&self) -> &[Op] {
        &self.ops
    }
}

/// Applies a window's operations to the new volume, in order, as background I/O on
/// the store's async path.
pub(super) async fn apply(store: &Arc<LayeredStore>, ops: Ops) -> Result<(), StoreError> {
    let priority = IoPriority::Background;
    for op in ops.ops {
        match op {
            Op::Write { offset, data, seqs } => match seqs.as_slice() {
                [seq, rest @ ..] if rest.iter().all(|s| s == seq) => {
                    store.write_async(priority, offset, data, *seq).await?;
                }
                _ => {
                    store
                        .write_versions_async(priority, offset, data, seqs)
                        .await?
                }
            },
            Op::Trim { offset, len, seq } => store.trim_async(priority, offset, len, seq).await?,
            Op::Forget { offset, len } => store.forget_async(priority, offset, len).await?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn adjacent_blocks_coalesce() {
        let (a, b) = (vec![1u8; B as usize], vec![2u8; B as usize]);
        let mut ops = Ops::default();
        assert!(ops.is_empty());
        ops.write(3, &a, 7);
        ops.write(4, &b, 7);
        ops.write(5, &a, 8); // another seq: still one write
        ops.write(7, &a, 8); // not adjacent
        ops.trim(8, 2, 1);
        ops.trim(10, 1, 1);
        ops.trim(11, 1, 9); // another seq
        ops.trim(12, 0, 9); // nothing
        ops.forget(12, 1);
        ops.forget(13, 2);
        ops.forget(20, 0); // nothing
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Write {
                    offset: 3 * B,
                    data: [a.clone(), b, a.clone()].concat(),
                    seqs: vec![7, 7, 8],
                },
                Op::Write {
                    offset: 7 * B,
                    data: a,
                    seqs: vec![8],
                },
                Op::Trim {
                    offset: 8 * B,
                    len: 3 * B,
                    seq: 1
                },
                Op::Trim {
                    offset: 11 * B,
                    len: B,
                    seq: 9
                },
                Op::Forget {
                    offset: 12 * B,
                    len: 3 * B,
                },
            ]
        );
        assert_eq!(ops.data_bytes(), 4 * B);
        assert_eq!(ops.blocks(), 11);
    }

    #[tokio::test]
    async fn applied_blocks_keep_their_seqs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create"));
        store
            .write(0, &vec![9u8; 3 * B as usize], 5)
            .expect("old data");
        store.trim(5 * B, B, 6).expect("old trim");
        let mut ops = Ops::default();
        ops.write(1, &vec![4u8; B as usize], 77);
        ops.write(2, &vec![5u8; B as usize], 79);
        ops.trim(3, 1, 78);
        ops.forget(4, 2);
        apply(&store, ops).await.expect("apply");
        assert_eq!(store.block_seq(0).expect("seq"), Some(5));
        assert_eq!(store.block_seq(1).expect("seq"), Some(77));
        assert_eq!(store.block_seq(2).expect("seq"), Some(79));
        assert_eq!(store.block_seq(3).expect("seq"), Some(78));
        assert_eq!(store.read(B, B).expect("read"), vec![4u8; B as usize]);
        assert_eq!(store.read(2 * B, B).expect("read"), vec![5u8; B as usize]);
        assert_eq!(store.read(3 * B, B).expect("read"), vec![0u8; B as usize]);
        // Forgotten: never written again, data and tombstone alike.
        assert_eq!(store.block_seq(4).expect("seq"), None);
        assert_eq!(store.block_seq(5).expect("seq"), None);
        assert_eq!(store.written_ranges(None).expect("ranges"), vec![0..4 * B]);
    }
}
