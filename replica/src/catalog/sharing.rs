//! Local restores: hard-link sharing of a snapshot this daemon holds.
//!
//! A restore or clone whose snapshot this daemon holds (its volume is stored here and
//! its record lists the snapshot) builds the new store on that snapshot's sealed
//! layers by hard links ([`LayeredStore::create_sharing`]): instant, no block copied,
//! `copy.shared_layers` set. Its epoch starts at 0 like any new volume's (the
//! controller reads a nonzero epoch as "published"), so its shared blocks keep seqs of
//! the source's epochs, which may be higher than its own engines' first writes:
//! nothing compares seqs across that line today (writes into the head are
//! unconditional, repairs replace damaged blocks whatever their seq); see NOTES.md.
//! Should sharing fail (another filesystem, the snapshot being deleted, ...), the
//! volume is created empty and copied over gRPC like any other. Capacity counts a
//! shared layer's space once.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tessera_telemetry::error_chain;
use tracing::warn;

use super::error::store_error;
use super::{Catalog, CatalogError};
use crate::record::{CopySource, VolumeRecord};
use crate::store::{LayeredStore, StoreError};

/// A sealed snapshot on this daemon that a new volume's store can share
/// ([`LayeredStore::create_sharing`]) instead of copying it.
pub(super) struct LocalBase {
    /// The open store of the source volume (live or deleted).
    pub store: Arc<LayeredStore>,
    /// The snapshot to share.
    pub snapshot_id: String,
    /// The highest epoch whose writes the snapshot's layers may hold: the source's
    /// epoch here (every engine that wrote this replica presented its epoch first),
    /// or its own floor if it shares layers too and was never published.
    pub epoch: u64,
}

impl Catalog {
    /// The snapshot a restore or clone copies, when this daemon holds it: its volume
    /// is stored here (live, or deleted and kept for its snapshots), the volume's
    /// record lists the snapshot (a seal the record does not name yet is not a
    /// finished snapshot), and the sealed layer has the size the source names.
    /// Caller holds the mutation lock, so the volume cannot be deleted meanwhile.
    pub(super) fn local_base(&self, source: &CopySource) -> Option<LocalBase> {
        let volumes = self.read_volumes();
        let entry = volumes.get(&source.source_volume_id)?;
        if !entry
            .record
            .snapshots
            .iter()
            .any(|s| s.snapshot_id == source.snapshot_id)
        {
            return None;
        }
        match entry.store.snapshot_size(&source.snapshot_id) {
            Ok(size) if size == source.size_bytes => Some(LocalBase {
                store: Arc::clone(&entry.store),
                snapshot_id: source.snapshot_id.clone(),
                epoch: entry
                    .record
                    .copy
                    .as_ref()
                    .map_or(0, |c| c.epoch_floor)
                    .max(entry.epoch.load(Ordering::Acquire)),
            }),
            Ok(size) => {
                warn!(source_volume_id = %source.source_volume_id,
                    snapshot_id = %source.snapshot_id, local_bytes = size,
                    source_bytes = source.size_bytes,
                    "the local snapshot's size differs from the copy source's; not sharing it");
                None
            }
            // Being deleted, or the store was retired: nothing to share.
            Err(_) => None,
        }
    }

    /// Creates the store at `store_dir` on `base`'s sealed layers (hard links, no
    /// copy) and marks `record`: `copy.shared_layers` tells the copy task to reconcile
    /// instead of copying. Returns false when sharing is not possible for a reason
    /// of the source (another filesystem, the snapshot being deleted, the source busy
    /// with a merge, ...): logged, and the caller creates an empty store, which the
    /// copy fills over gRPC as for any restore. The new volume's own bad size is an
    /// error.
    pub(super) fn share_base(
        record: &mut VolumeRecord,
        store_dir: &Path,
        base: &LocalBase,
    ) -> Result<bool, CatalogError> {
        let id = record.volume_id.as_str();
        match LayeredStore::create_sharing(
            store_dir,
            &base.store,
            &base.snapshot_id,
            record.size_bytes,
        ) {
            Ok(store) => {
                drop(store);
                if let Some(copy) = record.copy.as_mut() {
                    copy.shared_layers = true;
                    copy.epoch_floor = base.epoch;
                }
                Ok(true)
            }
            Err(e @ StoreError::InvalidSize { .. }) => Err(store_error(id, "create")(e)),
            Err(e) => {
                warn!(volume_id = id, snapshot_id = %base.snapshot_id, error = %error_chain(&e),
                    "cannot share the local snapshot's layers; copying it from its holders instead");
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_support::{open, restore, source, MIB};
    use crate::catalog::NewVolume;

    /// Catalog with volume "src" (1 MiB, epoch 7): 512 KiB of data sealed as "s1",
    /// then other data written to its head. Returns the snapshot's bytes.
    fn local_source(cat: &Catalog) -> Vec<u8> {
        cat.create(NewVolume {
            volume_id: "src".into(),
            name: "src".into(),
            size_bytes: MIB,
            replication_factor: 3,
            ..NewVolume::default()
        })
        .expect("create source");
        cat.raise_epoch("src", 0, 7).expect("raise");
        let store = cat.store_of("src").expect("store");
        let data: Vec<u8> = (0..MIB / 2).map(|i| (i % 251) as u8).collect();
        store.write(0, &data, 7 << 40).expect("write");
        store.trim(MIB / 4, 4096, (7 << 40) + 1).expect("trim");
        store.flush().expect("flush");
        cat.create_snapshot("src", "s1", "s1", 0).expect("snapshot");
        store
            .write(0, &vec![0xee; 8192], (7 << 40) + 2)
            .expect("write after the snapshot");
        store.read_snapshot("s1", 0, MIB).expect("snapshot view")
    }

    #[test]
    fn a_restore_of_a_local_snapshot_shares_its_layers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let snap = local_source(&cat);
        let used_before = cat.capacity().expect("capacity").used_bytes;
        let allocated_before = cat.allocated_bytes().expect("allocated");

        let out = cat
            .create(restore("r", 2 * MIB, source("s1")))
            .expect("create");
        let copy = out.record.copy.clone().expect("copy progress");
        assert!(copy.shared_layers);
        assert_eq!((copy.done_bytes, copy.complete), (0, false));
        assert_eq!(
            out.record.epoch, 0,
            "unpublished, like any new volume (the controller reads epoch 0 so)"
        );
        assert_eq!(
            crate::record::read_file(&tmp.path().join("volumes/r/record")).expect("record"),
            out.record
        );
        // The data is there at once, through the store (the data plane still waits
        // for the copy task to mark the copy complete).
        let target = cat.copy_target("r").expect("target");
        assert_eq!(target.store.read(0, MIB).expect("read"), snap);
        assert_eq!(
            target.store.read(MIB, MIB).expect("read"),
            vec![0u8; MIB as usize]
        );
        assert!(target.store.snapshots().is_empty());

        // The shared layer counts once: the restore adds its thick head only.
        assert_eq!(
            cat.capacity().expect("capacity").used_bytes,
            used_before + 2 * MIB
        );
        let added = cat.allocated_bytes().expect("allocated") - allocated_before;
        assert!(
            added < MIB / 4,
            "shared layer counted twice: +{added} bytes"
        );
        drop(target);

        // The source and its snapshot go; the restore keeps its data, also reopened.
        cat.delete("src").expect("delete source");
        assert!(cat.delete_snapshot("src", "s1").expect("delete snapshot"));
        assert!(!tmp.path().join("volumes/src").exists());
        let target = cat.copy_target("r").expect("target");
        assert_eq!(target.store.read(0, MIB).expect("read"), snap);
        drop((cat, target));
        let cat = open(tmp.path(), Some(100 * MIB));
        let target = cat.copy_target("r").expect("target after reopen");
        assert_eq!(target.store.read(0, MIB).expect("read"), snap);
        assert!(target.store.verify().expect("verify").is_empty());
        let r = cat.get("r").expect("get");
        assert_eq!(r.epoch, 0);
        assert!(r.copy.expect("copy").shared_layers);
        // Only the restore is left: its head, and the shared layer once.
        assert_eq!(cat.capacity().expect("capacity").used_bytes, {
            let sealed: u64 = target
                .store
                .space_used()
                .expect("space")
                .layers
                .iter()
                .filter(|l| l.shared)
                .map(|l| l.allocated_bytes)
                .sum();
            assert!(sealed >= MIB / 2 - 4096, "{sealed}");
            2 * MIB + sealed
        });
    }

    #[test]
    fn a_restore_of_a_snapshot_not_held_here_is_a_plain_create() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        // No source volume here at all.
        let out = cat
            .create(restore("r1", MIB, source("s1")))
            .expect("create");
        let copy = out.record.copy.expect("copy");
        assert!(!copy.shared_layers);
        assert_eq!(out.record.epoch, 0);

        // The volume is here but its record does not list that snapshot, or the
        // snapshot's size is not the source's: copied, never shared.
        local_source(&cat);
        let out = cat
            .create(restore("r2", MIB, source("s9")))
            .expect("create");
        assert!(!out.record.copy.expect("copy").shared_layers);
        assert_eq!(out.record.epoch, 0);
        let mut other_size = source("s1");
        other_size.size_bytes = MIB / 2;
        let out = cat.create(restore("r3", MIB, other_size)).expect("create");
        assert!(!out.record.copy.expect("copy").shared_layers);
        let target = cat.copy_target("r3").expect("target");
        assert_eq!(
            target.store.read(0, MIB).expect("read"),
            vec![0u8; MIB as usize]
        );
        assert!(target
            .store
            .space_used()
            .expect("space")
            .layers
            .iter()
            .all(|l| !l.shared));
    }
}
