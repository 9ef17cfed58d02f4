//! Scrubbing data at rest, one layer and a bounded run of blocks at a time, and the
//! in-place repair of a damaged block (issue 15 item 5).
//!
//! A scrub reads every present block of every layer (the head and the sealed ones)
//! and checks it against its entry, at background priority and under the same
//! stripe locks a read takes, so it never sees a write half done. Steps are small
//! ([`LayeredStore::scrub_step`]) so the daemon's scrubber can pace them and a
//! chain change (a snapshot, a merge) waits for at most one step.
//!
//! A repair rewrites the damaged block *in its own layer*, sealed or not: a snapshot's
//! view must be whole as much as the head's. It is conditional: under the exclusive
//! stripe lock the block is checked again and rewritten only if it is still damaged
//! (an engine write may have replaced it meanwhile), and made durable before the call
//! returns. Layers shared with another volume by hard links are not repaired here
//! (they are that volume's; its own scrub repairs the inode both see).

use super::data_path::check_block;
use super::format::{Entry, Verdict};
use super::{IoPriority, LayerId, LayeredStore, StoreError, BS};
use crate::park::block_on;

/// Scrubs leave the disks to the application.
const PRIORITY: IoPriority = IoPriority::Background;

/// A layer of the chain, as a scrub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubLayer {
    /// The layer.
    pub id: LayerId,
    /// The snapshot it was sealed under; `None` for the head.
    pub snapshot_id: Option<String>,
    /// Another volume's layer, shared by hard links (verified, not repaired).
    pub shared: bool,
    /// Blocks the layer covers.
    pub blocks: u64,
}

/// A block that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedBlock {
    /// Where it is.
    pub layer: ScrubLayer,
    /// Block index.
    pub block: u64,
    /// The seq its entry claims, when the entry itself is intact (the data rotted);
    /// `None` when the entry is missing or damaged.
    pub seq: Option<u64>,
}

/// What one [`LayeredStore::scrub_step`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubStep {
    /// Present blocks checked.
    pub verified: u64,
    /// Those that failed.
    pub damaged: Vec<DamagedBlock>,
    /// Where the next step of this layer starts; `None` at its end.
    pub next: Option<u64>,
}

/// The version a repair writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Data written by `seq`.
    Data {
        /// Its seq.
        seq: u64,
        /// One block of data.
        data: Vec<u8>,
    },
    /// A trim by `seq`.
    Trim {
        /// Its seq.
        seq: u64,
    },
}

impl LayeredStore {
    /// The layers a scrub walks, oldest first (empty for a deleted volume).
    pub fn scrub_layers(&self) -> Vec<ScrubLayer> {
        let state = self.state_read();
        state
            .layers
            .iter()
            .map(|s| ScrubLayer {
                id: s.layer.id,
                snapshot_id: s.snapshot_id.clone(),
                shared: s.shared,
                blocks: s.size / BS as u64,
            })
            .collect()
    }

    /// Checks the present blocks of `layer` in `[from, from + count)`. A layer gone
    /// from the chain meanwhile (merged, deleted) ends with nothing checked and no
    /// next step. Background I/O; blocks the calling thread.
    pub fn scrub_step(
        &self,
        layer: &ScrubLayer,
        from: u64,
        count: u64,
    ) -> Result<ScrubStep, StoreError> {
        block_on(async {
            let _gate = self.locks.gate_shared().await;
            let Some(found) = self.layer_by_id(layer.id) else {
                return Ok(ScrubStep::default());
            };
            let end = from.saturating_add(count).min(layer.blocks);
            let mut step = ScrubStep {
                next: (end < layer.blocks).then_some(end),
                ..ScrubStep::default()
            };
            for block in from..end {
                if !found.has(block) {
                    continue;
                }
                let _stripe = self.locks.shared(block, 1).await;
                let (verdict, claimed) = check_block(&found, PRIORITY, block).await?;
                step.verified += 1;
                if verdict == Verdict::Corrupt {
                    let entry_intact = found
                        .read_entries(PRIORITY, block, 1)
                        .await?
                        .into_iter()
                        .next()
                        .flatten()
                        .is_some();
                    step.damaged.push(DamagedBlock {
                        layer: layer.clone(),
                        block,
                        seq: (entry_intact && claimed != 0).then_some(claimed),
                    });
                }
            }
            Ok(step)
        })
    }

    /// Rewrites block `block` of `layer` with `repair` if it is still damaged there;
    /// whether it did. Durable on return. Blocks the calling thread.
    pub fn repair_block(
        &self,
        layer: &ScrubLayer,
        block: u64,
        repair: &Repair,
    ) -> Result<bool, StoreError> {
        if layer.shared {
            return Ok(false);
        }
        block_on(async {
            let _gate = self.locks.gate_shared().await;
            let Some(found) = self.layer_by_id(layer.id) else {
                return Ok(false);
            };
            let _stripe = self.locks.exclusive(block, 1).await;
            if !found.has(block)
                || check_block(&found, PRIORITY, block).await?.0 != Verdict::Corrupt
            {
                return Ok(false);
            }
            let entry = match repair {
                Repair::Data { seq, data } => {
                    if data.len() != BS {
                        return Err(StoreError::Unaligned {
                            offset: block * BS as u64,
                            len: data.len() as u64,
                        });
                    }
                    found.write_data(PRIORITY, block, data).await?;
                    Entry::for_data(block, *seq, data)
                }
                Repair::Trim { seq } => Entry::tombstone(block, *seq),
            };
            found
                .write_entries(PRIORITY, block, std::slice::from_ref(&entry))
                .await?;
            found.mark(block, &entry);
            found.sync(PRIORITY).await?;
            Ok(true)
        })
    }

    fn layer_by_id(&self, id: LayerId) -> Option<std::sync::Arc<super::layer::Layer>> {
        self.state_read()
            .layers
            .iter()
            .find(|s| s.layer.id == id)
            .map(|s| std::sync::Arc::clone(&s.layer))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{layer_file, new_store, pattern, poke};
    use super::*;

    const B: u64 = BS as u64;

    fn scrub_all(s: &LayeredStore) -> (u64, Vec<DamagedBlock>) {
        let (mut verified, mut damaged) = (0, Vec::new());
        for layer in s.scrub_layers() {
            let mut at = Some(0);
            while let Some(from) = at {
                let step = s.scrub_step(&layer, from, 3).expect("scrub step");
                verified += step.verified;
                damaged.extend(step.damaged);
                at = step.next;
            }
        }
        (verified, damaged)
    }

    #[test]
    fn scrub_finds_rot_in_sealed_and_head_layers_and_repair_fixes_it_in_place() {
        let (_t, s) = new_store(8);
        for b in 0..8 {
            s.write(b * B, &pattern(b, 1), 1 << 40).expect("write");
        }
        s.trim(7 * B, B, (1 << 40) + 1).expect("trim");
        let sealed = s.snapshot("snap").expect("seal");
        s.write(2 * B, &pattern(2, 2), (1 << 40) + 2)
            .expect("write head");
        s.flush().expect("flush");
        assert_eq!(
            scrub_all(&s),
            (9, Vec::new()),
            "8 sealed blocks + 1 head block, all intact"
        );

        // Rot under intact entries: block 3 of the sealed layer, block 2 of the head.
        poke(
            &layer_file(&s, sealed, "data"),
            3 * B + 10,
            &[pattern(3, 1)[10] ^ 0x40],
        );
        let head = s.scrub_layers().last().expect("head").id;
        poke(
            &layer_file(&s, head, "data"),
            2 * B + 99,
            &[pattern(2, 2)[99] ^ 0x01],
        );
        let (_, damaged) = scrub_all(&s);
        let found: Vec<(Option<&str>, u64, Option<u64>)> = damaged
            .iter()
            .map(|d| (d.layer.snapshot_id.as_deref(), d.block, d.seq))
            .collect();
        assert_eq!(
            found,
            vec![
                (Some("snap"), 3, Some(1 << 40)),
                (None, 2, Some((1 << 40) + 2))
            ]
        );
        assert!(
            s.read_snapshot("snap", 3 * B, B).is_err(),
            "the snapshot read fails"
        );

        for d in &damaged {
            let data = pattern(d.block, if d.layer.snapshot_id.is_some() { 1 } else { 2 });
            let repair = Repair::Data {
                seq: d.seq.expect("seq"),
                data,
            };
            assert!(s.repair_block(&d.layer, d.block, &repair).expect("repair"));
            assert!(
                !s.repair_block(&d.layer, d.block, &repair).expect("again"),
                "an intact block is left alone"
            );
        }
        assert_eq!(scrub_all(&s).1, Vec::new());
        assert_eq!(
            s.read_snapshot("snap", 3 * B, B).expect("read"),
            pattern(3, 1)
        );
        assert_eq!(s.read(2 * B, B).expect("read"), pattern(2, 2));
        drop(s);
        let reopened = LayeredStore::open(&_t.path().join("vol")).expect("reopen");
        assert_eq!(scrub_all(&reopened).1, Vec::new(), "the repair is durable");
        assert_eq!(
            reopened.read_snapshot("snap", 3 * B, B).expect("read"),
            pattern(3, 1)
        );
    }

    #[test]
    fn a_damaged_tombstone_is_repaired_as_a_trim() {
        let (_t, s) = new_store(4);
        s.write(B, &pattern(1, 1), 5).expect("write");
        s.trim(B, B, 6).expect("trim");
        s.flush().expect("flush");
        let head = s.scrub_layers().last().expect("head").clone();
        // Entry of block 1: after the meta header, 16 bytes per entry.
        let meta = layer_file(&s, head.id, "meta");
        poke(&meta, 4096 + 16 + 9, &[0xff]);
        let (_, damaged) = scrub_all(&s);
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(damaged[0].block, 1);
        assert!(s
            .repair_block(&head, 1, &Repair::Trim { seq: 6 })
            .expect("repair"));
        assert_eq!(scrub_all(&s).1, Vec::new());
        assert_eq!(s.read(B, B).expect("read"), vec![0; BS]);
    }
}
