//! Snapshots: sealing a volume's head under a snapshot id and recording it, and
//! deleting one (its layer merged away while I/O continues). Snapshots outlive their
//! volume: a deleted volume's record is kept, marked deleted, until its last
//! snapshot goes.

use tracing::info;

use super::error::store_error;
use super::{copy_state, now_unix_nanos, validate_volume_id, Catalog, CatalogError, Entry};
use crate::record::{SnapshotMeta, VolumeRecord};
use crate::store::StoreError;

impl Catalog {
    /// Every snapshot stored here with the record of its volume (live or deleted),
    /// ordered by volume id, then oldest first.
    pub fn list_snapshots(&self) -> Vec<(VolumeRecord, SnapshotMeta)> {
        self.read_volumes()
            .values()
            .flat_map(|e| {
                e.record
                    .snapshots
                    .iter()
                    .map(|s| (e.record.clone(), s.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Seals the volume's head under `snapshot_id` and records the snapshot. The
    /// store's seal is the atomic step (see [`crate::store::LayeredStore::snapshot`]); the record
    /// follows. A crash between the two leaves a sealed layer the record does not
    /// name; the retried call finds the layer (sealing is idempotent per id) and
    /// records it. Repeating a recorded id returns the stored snapshot.
    pub fn create_snapshot(
        &self,
        volume_id: &str,
        snapshot_id: &str,
        name: &str,
        created_unix_nanos: i64,
    ) -> Result<(VolumeRecord, SnapshotMeta), CatalogError> {
        validate_volume_id(volume_id)?;
        validate_volume_id(snapshot_id)?;
        let recorded = |record: &VolumeRecord| {
            record
                .snapshots
                .iter()
                .find(|s| s.snapshot_id == snapshot_id)
                .cloned()
        };
        let store = {
            let _guard = self.lock_mutations();
            let record = self.get(volume_id)?;
            if let Some(s) = recorded(&record) {
                return Ok((record, s));
            }
            // A snapshot now would seal a half-copied volume.
            copy_state::refuse_while_copying(&record)?;
            self.store_of(volume_id)?
        };
        // Sealing flushes the head and waits for the store's other control operations:
        // outside the daemon-wide lock, so other volumes' control calls never wait for
        // it. Sealing is idempotent per id and the record is re-read below.
        store
            .snapshot(snapshot_id)
            .map_err(store_error(volume_id, "snapshot"))?;
        let _guard = self.lock_mutations();
        let mut record = self.get(volume_id)?;
        if let Some(s) = recorded(&record) {
            return Ok((record, s));
        }
        // Deleted again meanwhile by a concurrent DeleteSnapshot of the same id (the
        // controller serialises those; a direct caller may not): nothing to record.
        let Some(sealed) = store.snapshots().into_iter().find(|i| i.id == snapshot_id) else {
            return Err(CatalogError::Store {
                volume_id: volume_id.to_string(),
                op: "snapshot",
                source: StoreError::SnapshotNotFound(snapshot_id.to_string()),
            });
        };
        let meta = SnapshotMeta {
            snapshot_id: snapshot_id.to_string(),
            name: name.to_string(),
            size_bytes: sealed.size_bytes,
            created_unix_nanos: if created_unix_nanos == 0 {
                now_unix_nanos()
            } else {
                created_unix_nanos
            },
        };
        record.snapshots.push(meta.clone());
        record.generation += 1;
        self.persist(&record, "snapshot")?;
        self.replace_record(record.clone());
        info!(volume_id, snapshot_id, "snapshot created");
        Ok((record, meta))
    }

    /// Deletes a snapshot: merges its layer away (I/O continues), then drops it from
    /// the record. Returns whether it existed. The last snapshot of a deleted volume
    /// removes what is left of the volume.
    pub fn delete_snapshot(
        &self,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<bool, CatalogError> {
        validate_volume_id(volume_id)?;
        validate_volume_id(snapshot_id)?;
        let (store, sealed) = {
            let _guard = self.lock_mutations();
            let Some(record) = self.read_volumes().get(volume_id).map(Entry::snapshot) else {
                return Ok(false);
            };
            let store = self.store_of(volume_id)?;
            let sealed = store.snapshots().iter().any(|s| s.id == snapshot_id);
            let recorded = record
                .snapshots
                .iter()
                .any(|s| s.snapshot_id == snapshot_id);
            if !sealed && !recorded {
                return Ok(false);
            }
            (store, sealed)
        };
        // The merge reads and rewrites the snapshot's blocks, which takes time in
        // proportion to them: it runs outside the catalog-wide mutation lock (the store
        // serialises its own snapshot operations), so other volumes' control calls
        // never wait for it. The layer is marked deleting first, so a crash mid-merge
        // resumes it at the next open; a concurrent delete of the same snapshot finds
        // it gone once this merge is done.
        if sealed {
            match store.delete_snapshot(snapshot_id) {
                Ok(()) | Err(StoreError::SnapshotNotFound(_)) => {}
                Err(e) => return Err(store_error(volume_id, "delete snapshot")(e)),
            }
        }
        let guard = self.lock_mutations();
        let Some(mut record) = self.read_volumes().get(volume_id).map(Entry::snapshot) else {
            return Ok(sealed);
        };
        if !record
            .snapshots
            .iter()
            .any(|s| s.snapshot_id == snapshot_id)
        {
            return Ok(sealed);
        }
        record.snapshots.retain(|s| s.snapshot_id != snapshot_id);
        record.generation += 1;
        if record.deleted && record.snapshots.is_empty() {
            drop(guard);
            self.remove_volume_dir(volume_id)?;
        } else {
            self.persist(&record, "delete snapshot")?;
            self.replace_record(record);
        }
        info!(volume_id, snapshot_id, "snapshot deleted");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_support::{dir_names, new_volume, open, MIB};

    #[test]
    fn snapshots_are_recorded_once_and_outlive_their_volume() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v", MIB)).expect("create");
        let (record, meta) = cat.create_snapshot("v", "s1", "snap", 0).expect("snapshot");
        assert_eq!(record.generation, 2);
        assert_eq!((meta.size_bytes, meta.name.as_str()), (MIB, "snap"));
        assert!(meta.created_unix_nanos > 0);
        let (again, same) = cat.create_snapshot("v", "s1", "snap", 0).expect("repeat");
        assert_eq!((again.generation, same), (2, meta.clone()));
        cat.create_snapshot("v", "s2", "snap2", 5)
            .expect("second snapshot");
        let listed: Vec<_> = cat
            .list_snapshots()
            .into_iter()
            .map(|(r, s)| (r.volume_id, s.snapshot_id))
            .collect();
        assert_eq!(
            listed,
            vec![("v".into(), "s1".into()), ("v".into(), "s2".into())]
        );

        // Deleted, the volume is gone from the list but its snapshots stay.
        assert!(cat.delete("v").expect("delete volume"));
        assert!(matches!(cat.get("v"), Err(CatalogError::NotFound(_))));
        assert!(matches!(
            cat.create_snapshot("v", "s3", "s3", 0),
            Err(CatalogError::NotFound(_))
        ));
        assert!(matches!(
            cat.create(new_volume("v", MIB)),
            Err(CatalogError::HeldBySnapshots(_))
        ));
        assert_eq!(cat.list_snapshots().len(), 2);
        assert!(cat.delete_snapshot("v", "s1").expect("delete s1"));
        assert!(!cat.delete_snapshot("v", "s1").expect("delete s1 again"));
        assert_eq!(dir_names(&tmp.path().join("volumes")), vec!["v"]);
        // The last snapshot takes what is left of the volume with it.
        assert!(cat.delete_snapshot("v", "s2").expect("delete s2"));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
        assert!(cat.list_snapshots().is_empty());
        cat.create(new_volume("v", MIB)).expect("id free again");
    }
}
