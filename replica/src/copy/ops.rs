//! The store operations one window of a copy ends in, and applying them to the new
//! volume. Both copy modes plan a window as [`Ops`] first and write it in one go, so
//! a failure while planning (a holder lost, a merge refused) writes nothing of it.

use std::sync::Arc;

use crate::block_io::BLOCK_SIZE;
use crate::store::{IoPriority, LayeredStore, StoreError};

/// Seq of the blocks a full copy writes, and of the trims that clear blocks the
/// holders' merge leaves empty: older than any write of an engine of the new volume
/// (seq >= 1 << 40 from its first publish on), so the copy never hides one.
pub const COPY_SEQ: u64 = 1;

/// One store operation.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// Writes `data` (whole blocks) at `offset` with `seq`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The blocks' bytes.
        data: Vec<u8>,
        /// Seq of every block written.
        seq: u64,
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
}

/// A window's operations in block order; adjacent blocks of the same kind and seq
/// become one operation, so a window costs few store calls.
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
            seq: s,
        }) = self.ops.last_mut()
        {
            if *s == seq && *at + data.len() as u64 == offset {
                data.extend_from_slice(bytes);
                return;
            }
        }
        self.ops.push(Op::Write {
            offset,
            data: bytes.to_vec(),
            seq,
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
                Op::Trim { .. } => 0,
            })
            .sum()
    }

    /// Blocks written or trimmed.
    pub fn blocks(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Write { data, .. } => data.len() as u64,
                Op::Trim { len, .. } => *len,
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
            Op::Write { offset, data, seq } => {
                store.write_async(priority, offset, data, seq).await?;
            }
            Op::Trim { offset, len, seq } => store.trim_async(priority, offset, len, seq).await?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn adjacent_blocks_of_one_seq_coalesce() {
        let (a, b) = (vec![1u8; B as usize], vec![2u8; B as usize]);
        let mut ops = Ops::default();
        assert!(ops.is_empty());
        ops.write(3, &a, 7);
        ops.write(4, &b, 7);
        ops.write(5, &a, 8); // another seq
        ops.write(7, &a, 8); // not adjacent
        ops.trim(8, 2, 1);
        ops.trim(10, 1, 1);
        ops.trim(11, 1, 9);
        ops.trim(12, 0, 9); // nothing
        assert_eq!(
            ops.as_slice(),
            &[
                Op::Write {
                    offset: 3 * B,
                    data: [a.clone(), b].concat(),
                    seq: 7
                },
                Op::Write {
                    offset: 5 * B,
                    data: a.clone(),
                    seq: 8
                },
                Op::Write {
                    offset: 7 * B,
                    data: a,
                    seq: 8
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
            ]
        );
        assert_eq!(ops.data_bytes(), 4 * B);
        assert_eq!(ops.blocks(), 8);
    }

    #[tokio::test]
    async fn applied_blocks_keep_their_seqs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LayeredStore::create(&tmp.path().join("v"), 8 * B).expect("create"));
        store
            .write(0, &vec![9u8; 3 * B as usize], 5)
            .expect("old data");
        let mut ops = Ops::default();
        ops.write(1, &vec![4u8; B as usize], 77);
        ops.trim(2, 1, 78);
        apply(&store, ops).await.expect("apply");
        assert_eq!(store.block_seq(0).expect("seq"), Some(5));
        assert_eq!(store.block_seq(1).expect("seq"), Some(77));
        assert_eq!(store.block_seq(2).expect("seq"), Some(78));
        assert_eq!(store.read(B, B).expect("read"), vec![4u8; B as usize]);
        assert_eq!(store.read(2 * B, B).expect("read"), vec![0u8; B as usize]);
    }
}
