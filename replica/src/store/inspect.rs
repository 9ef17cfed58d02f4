//! What a store can tell about its blocks without reading them as data: allocated
//! and changed ranges, a full checksum verification, and the space it uses.

use super::*;

impl LayeredStore {
    /// Byte ranges holding data in the head (`None`) or a snapshot: what a backup or
    /// clone must copy. Trimmed and never-written blocks are left out; damaged blocks
    /// are included (a reader of them gets an error rather than silent zeros).
    pub fn allocated_ranges(&self, snapshot: Option<&str>) -> Result<Vec<Range<u64>>, StoreError> {
        self.view_ranges(snapshot, false)
    }

    /// Byte ranges where the head (`None`) or a snapshot has any version at all: data,
    /// trim tombstones and damaged entries; only never-written blocks are left out.
    /// What a rebuild must clear where its sources have nothing.
    pub fn written_ranges(&self, snapshot: Option<&str>) -> Result<Vec<Range<u64>>, StoreError> {
        self.view_ranges(snapshot, true)
    }

    /// The ranges of [`Self::allocated_ranges`], or with `tombstones` those of
    /// [`Self::written_ranges`].
    fn view_ranges(
        &self,
        snapshot: Option<&str>,
        tombstones: bool,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let state = self.state_read();
        let (top, size) = state.view(snapshot)?;
        let nblocks = size / BLOCK_SIZE;
        let words = nblocks.div_ceil(64) as usize;
        let mut out = Vec::with_capacity(words);
        for w in 0..words {
            let mut covered = 0u64;
            let mut kept = 0u64;
            for slot in state.layers[..=top].iter().rev() {
                let present = slot.layer.present_bits().word(w) & !covered;
                kept |= if tombstones {
                    present
                } else {
                    present & !slot.layer.trimmed_bits().word(w)
                };
                covered |= present;
            }
            out.push(kept);
        }
        Ok(ranges_from_words(&out, nblocks))
    }

    /// Byte ranges written or trimmed after snapshot `from` and up to snapshot `to`
    /// (`None`: up to now), for incremental backups and CSI SnapshotMetadata.
    pub fn changed_ranges(
        &self,
        from: &str,
        to: Option<&str>,
    ) -> Result<Vec<Range<u64>>, StoreError> {
        let state = self.state_read();
        let a = state.find_snapshot(from)?;
        let (b, size) = state.view(to)?;
        if a > b {
            return Err(StoreError::SnapshotOrder {
                from: from.to_string(),
                to: to.unwrap_or("<head>").to_string(),
            });
        }
        let nblocks = size / BLOCK_SIZE;
        let words = nblocks.div_ceil(64) as usize;
        let out: Vec<u64> = (0..words)
            .map(|w| {
                state.layers[a + 1..=b]
                    .iter()
                    .fold(0, |acc, s| acc | s.layer.present_bits().word(w))
            })
            .collect();
        Ok(ranges_from_words(&out, nblocks))
    }

    /// Scrubs every stored block of every layer and lists the damaged ones. Its reads
    /// are background I/O.
    pub fn verify(&self) -> Result<Vec<CorruptBlock>, StoreError> {
        let layers: Vec<(Arc<Layer>, Option<String>)> = self
            .state_read()
            .layers
            .iter()
            .map(|s| (Arc::clone(&s.layer), s.snapshot_id.clone()))
            .collect();
        block_on(async {
            let mut bad = Vec::new();
            for (layer, snapshot_id) in layers {
                for block in layer.present_bits().ones() {
                    let _stripe = self.locks.shared(block, 1).await;
                    let (verdict, _) = check_block(&layer, IoPriority::Background, block).await?;
                    if verdict == Verdict::Corrupt {
                        bad.push(CorruptBlock {
                            layer: layer.id,
                            snapshot_id: snapshot_id.clone(),
                            block,
                        });
                    }
                }
            }
            Ok(bad)
        })
    }

    /// Disk space of every layer, so capacity accounting can charge snapshots too.
    pub fn space_used(&self) -> Result<SpaceUsage, StoreError> {
        let state = self.state_read();
        let mut layers = Vec::with_capacity(state.layers.len());
        for s in &state.layers {
            layers.push(LayerUsage {
                layer: s.layer.id,
                snapshot_id: s.snapshot_id.clone(),
                blocks: s.layer.present_bits().count(),
                allocated_bytes: s.layer.allocated_bytes()?,
                file_id: s.layer.file_id(),
                shared: s.shared,
            });
        }
        Ok(SpaceUsage {
            allocated_bytes: layers.iter().map(|l| l.allocated_bytes).sum(),
            layers,
        })
    }
}
