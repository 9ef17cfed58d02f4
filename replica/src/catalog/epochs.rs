//! Epochs: each volume's fencing epoch lives in its record and in an
//! `Arc<AtomicU64>` that the data plane shares ([`Catalog::epoch_handle`]); a raise
//! stores it only after the record holding it is durable, and is answered only once
//! the writes admitted under older epochs are done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::info;

use tessera_replica_protocol::seq::Epoch;

use super::{validate_volume_id, Catalog, CatalogError};
use crate::record::VolumeRecord;

impl Catalog {
    /// The live epoch of a stored volume, shared with the data plane; `None` if unknown.
    /// The same `Arc` is returned for the volume's whole life in this process.
    pub fn epoch_handle(&self, volume_id: &str) -> Option<Arc<AtomicU64>> {
        self.read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.epoch))
    }

    /// Fencing compare-and-set: sets the epoch to `new_epoch` if it equals
    /// `expected_epoch` (and `new_epoch > expected_epoch`). Returns the new epoch.
    pub fn raise_epoch(
        &self,
        volume_id: &str,
        expected_epoch: u64,
        new_epoch: u64,
    ) -> Result<u64, CatalogError> {
        validate_volume_id(volume_id)?;
        if new_epoch <= expected_epoch {
            return Err(CatalogError::EpochNotIncreasing {
                expected: expected_epoch,
                new: new_epoch,
            });
        }
        Epoch::new(new_epoch).map_err(|_| CatalogError::EpochTooLarge { epoch: new_epoch })?;
        let _guard = self.lock_mutations();
        let record = self.get(volume_id)?;
        if record.epoch != expected_epoch {
            return Err(CatalogError::EpochMismatch {
                volume_id: volume_id.to_string(),
                expected: expected_epoch,
                current: record.epoch,
            });
        }
        self.set_epoch(record, new_epoch)?;
        // Writes of older epochs already admitted by the data plane finish before the
        // raise is answered; later ones see the new epoch and are refused. (An epoch
        // adopted at HELLO is drained by the data plane's handshake itself.)
        if let Ok((store, _)) = self.open_store(volume_id) {
            store.sync_state().drain_older_epochs_blocking();
        }
        info!(volume_id, epoch = new_epoch, "volume epoch raised");
        Ok(new_epoch)
    }

    /// Stores a higher epoch presented by an engine (the data plane's
    /// `VolumeRegistry::adopt_epoch`). Never lowers the epoch; returns the stored one.
    pub fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<u64, CatalogError> {
        validate_volume_id(volume_id)?;
        Epoch::new(epoch).map_err(|_| CatalogError::EpochTooLarge { epoch })?;
        let _guard = self.lock_mutations();
        let record = self.get(volume_id)?;
        if epoch <= record.epoch {
            return Ok(record.epoch);
        }
        self.set_epoch(record, epoch)?;
        info!(volume_id, epoch, "volume epoch adopted from an engine");
        Ok(epoch)
    }

    /// Persists `record` with `epoch`, then publishes it to memory and the data plane.
    /// Caller holds the mutation lock.
    fn set_epoch(&self, mut record: VolumeRecord, epoch: u64) -> Result<(), CatalogError> {
        record.epoch = epoch;
        self.persist(&record, "raise the epoch of")?;
        let mut volumes = self.write_volumes();
        if let Some(entry) = volumes.get_mut(&record.volume_id) {
            entry.epoch.store(epoch, Ordering::SeqCst);
            entry.record = record;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::RecordUpdate;
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::test_support::{new_volume, open, MIB};

    #[test]
    fn raise_epoch_is_answered_only_after_writes_admitted_under_the_old_epoch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = Arc::new(open(tmp.path(), Some(100 * MIB)));
        cat.create(new_volume("v1", MIB)).expect("create");
        let (store, _) = cat.open_store("v1").expect("store");
        // A data-plane write admitted under epoch 0 and not yet applied.
        let admitted = store.sync_state().epoch_fence.try_read().expect("fence");
        let (tx, rx) = std::sync::mpsc::channel();
        let raiser = {
            let cat = Arc::clone(&cat);
            std::thread::spawn(move || tx.send(cat.raise_epoch("v1", 0, 1)))
        };
        let handle = cat.epoch_handle("v1").expect("handle");
        while handle.load(Ordering::SeqCst) != 1 {
            std::thread::yield_now();
        }
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the raise returned while a write of the old epoch was still on its way"
        );
        drop(admitted);
        assert_eq!(rx.recv().expect("answer").expect("raise"), 1);
        raiser.join().expect("raiser").expect("answer channel");
    }

    #[test]
    fn raise_epoch_is_a_cas_shared_with_the_data_plane() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        let handle = cat.epoch_handle("v1").expect("handle");
        assert_eq!(cat.raise_epoch("v1", 0, 3).expect("raise"), 3);
        assert_eq!(handle.load(Ordering::SeqCst), 3);
        assert_eq!(cat.get("v1").expect("get").epoch, 3);

        let err = cat.raise_epoch("v1", 0, 4).expect_err("stale");
        assert!(err.to_string().contains("current epoch is 3"), "{err}");
        assert!(matches!(
            cat.raise_epoch("v1", 3, 3),
            Err(CatalogError::EpochNotIncreasing { .. })
        ));
        // Epochs a seq cannot carry are refused by both paths, and change nothing.
        assert!(matches!(
            cat.raise_epoch("v1", 3, u64::MAX),
            Err(CatalogError::EpochTooLarge { .. })
        ));
        assert!(matches!(
            cat.adopt_epoch("v1", tessera_replica_protocol::seq::MAX_EPOCH + 1),
            Err(CatalogError::EpochTooLarge { .. })
        ));
        assert_eq!(cat.get("v1").expect("get").epoch, 3);
        assert!(matches!(
            cat.raise_epoch("v1", 5, 2),
            Err(CatalogError::EpochNotIncreasing { .. })
        ));
        assert!(matches!(
            cat.raise_epoch("nope", 0, 1),
            Err(CatalogError::NotFound(_))
        ));

        // Adopting never lowers, and raises durably.
        assert_eq!(cat.adopt_epoch("v1", 2).expect("adopt lower"), 3);
        assert_eq!(cat.adopt_epoch("v1", 9).expect("adopt higher"), 9);
        assert_eq!(handle.load(Ordering::SeqCst), 9);
        // A raise does not touch the update CAS token.
        assert_eq!(cat.get("v1").expect("get").generation, 1);
        // The handle is the same Arc after an update.
        cat.update(
            "v1",
            1,
            RecordUpdate {
                attachments: Vec::new(),
                parameters: BTreeMap::new(),
                replicas: None,
            },
        )
        .expect("update");
        assert!(Arc::ptr_eq(&handle, &cat.epoch_handle("v1").expect("h")));
    }
}
