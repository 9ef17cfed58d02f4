//! Repairing a damaged block from another replica of its volume: the peers (the
//! other members of the record's set) are asked for that one block of the same view
//! (the snapshot the layer was sealed under, or the head) with `ReadSnapshotBlocks`,
//! and an intact version is written back into the damaged layer.
//!
//! Which version: when the damaged block's entry is intact (its data rotted), the
//! peer version of exactly that seq (one write, one seq: the same bytes). Otherwise,
//! or in the head when no peer holds that seq any more, the highest intact seq a peer
//! holds, the rule every merge of Tessera's copies follows. A sealed layer whose
//! entry names a seq no peer holds is left as it is (its snapshot's copies differ in
//! a write that was in flight at the seal; another version would change the
//! snapshot).

use std::sync::Arc;

use tessera_replica_protocol::block::BlockVersion;

use super::Scrubber;
use crate::control_proto::ReadSnapshotBlocksRequest;
use crate::copy::source::{self, HolderEvent};
use crate::record::VolumeRecord;
use crate::store::{DamagedBlock, LayeredStore, Repair};
use tessera_replica_protocol::block::BLOCK_SIZE;

impl Scrubber {
    /// Repairs `damaged` of `rec`'s `store` from a peer (module doc).
    pub(super) async fn repair(
        &self,
        rec: &VolumeRecord,
        store: &Arc<LayeredStore>,
        damaged: &DamagedBlock,
    ) -> Result<(), String> {
        if damaged.layer.shared {
            return Err("the layer is another volume's, shared by hard links".into());
        }
        let candidates = self.peer_versions(rec, damaged).await;
        if candidates.is_empty() {
            return Err("no peer answered with an intact copy".into());
        }
        let exact = damaged
            .seq
            .and_then(|s| candidates.iter().find(|c| repair_seq(c) == s));
        let chosen = match (exact, damaged.seq, &damaged.layer.snapshot_id) {
            (Some(c), _, _) => c.clone(),
            (None, Some(s), Some(snapshot)) => {
                return Err(format!(
                    "no peer holds the version of seq {s} in snapshot {snapshot}"
                ))
            }
            _ => candidates
                .iter()
                .max_by_key(|c| repair_seq(c))
                .cloned()
                .ok_or("no candidate")?,
        };
        let (store, layer, block) = (Arc::clone(store), damaged.layer.clone(), damaged.block);
        let repaired =
            tokio::task::spawn_blocking(move || store.repair_block(&layer, block, &chosen))
                .await
                .map_err(|e| format!("repair task: {e}"))?
                .map_err(|e| {
                    format!("writing the repair: {}", tessera_telemetry::error_chain(&e))
                })?;
        if repaired {
            tracing::warn!(volume = %rec.volume_id, block = damaged.block,
                snapshot = damaged.layer.snapshot_id.as_deref().unwrap_or("(head)"),
                "damaged block repaired from a peer's copy");
        }
        Ok(())
    }

    /// The intact versions of the damaged block the peers hold.
    async fn peer_versions(&self, rec: &VolumeRecord, damaged: &DamagedBlock) -> Vec<Repair> {
        let request = ReadSnapshotBlocksRequest {
            volume_id: rec.volume_id.clone(),
            snapshot_id: damaged.layer.snapshot_id.clone().unwrap_or_default(),
            offset: damaged.block * BLOCK_SIZE,
            length: BLOCK_SIZE,
            seqs_only: false,
        };
        let peers = rec
            .replicas
            .iter()
            .filter(|r| r.node_id != self.cfg.node_id && !r.control_address.is_empty());
        let mut found = Vec::new();
        for peer in peers {
            let timeout = self.cfg.peer_timeout;
            let opened = source::open(
                peer.clone(),
                request.clone(),
                timeout,
                None,
                self.cfg.transport.clone(),
            );
            let mut reader = match opened.await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(volume = %rec.volume_id, error = %e, "peer not asked for a repair");
                    continue;
                }
            };
            let HolderEvent::Chunk(blocks) = reader.next(timeout).await else {
                continue;
            };
            for (block, version, data) in blocks.iter() {
                if block != damaged.block {
                    continue;
                }
                match (version, data) {
                    (BlockVersion::Data { seq }, Some(data)) => found.push(Repair::Data {
                        seq,
                        data: data.to_vec(),
                    }),
                    (BlockVersion::Trimmed { seq }, _) => found.push(Repair::Trim { seq }),
                    _ => {}
                }
            }
        }
        found
    }
}

fn repair_seq(r: &Repair) -> u64 {
    match r {
        Repair::Data { seq, .. } | Repair::Trim { seq } => *seq,
    }
}
