//! Creating and deleting volumes.
//!
//! *Crash safety.* A volume is built inside `.creating-<id>` and renamed into place
//! only when its block store and record are durable, so a crash leaves either no
//! volume or a whole one. A delete first retires the volume's open store, then
//! renames the directory to `.deleting-<id>` (that rename is the commit point) and
//! then removes it. A volume with snapshots is not removed: its head goes, its record
//! stays (marked deleted) with the sealed layers until the last snapshot is deleted.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tessera_replica_protocol::seq::Epoch;
use tessera_telemetry::error_chain;
use tracing::{error, info, warn};

use super::error::{io_error, mutation_error, store_error};
use super::io_registration::{self, requested_qos, VolumeIo};
use super::sharing::LocalBase;
use super::validate::validate_size;
use super::{
    copy_state, now_unix_nanos, validate_volume_id, Catalog, CatalogError, Entry,
    QuarantinedVolume, CREATING_PREFIX, DELETING_PREFIX, RECORD_FILE, STORE_DIR,
};
use crate::record::{self, CopySource, ReplicaRef, VolumeRecord};
use crate::store::LayeredStore;

/// The fields of a new volume, as the controller sends them in CreateVolume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewVolume {
    /// Volume id (validated by [`validate_volume_id`]).
    pub volume_id: String,
    /// CSI name.
    pub name: String,
    /// Size in bytes, a positive multiple of [`BLOCK_SIZE`](crate::block_io::BLOCK_SIZE).
    pub size_bytes: u64,
    /// Number of replicas.
    pub replication_factor: u32,
    /// Replica set chosen by the controller.
    pub replicas: Vec<ReplicaRef>,
    /// StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// Creation time; 0 means "now".
    pub created_unix_nanos: i64,
    /// "block", "mount" or "".
    pub access_type: String,
    /// Restore, clone or rebuild: where the data is copied from in the background.
    pub copy_source: Option<CopySource>,
    /// Epoch the record starts at (a replacement replica joins at the volume's
    /// current one); 0 for a new volume. Ignored when the volume exists already: its
    /// stored epoch may have been raised since, and an epoch is never lowered.
    pub epoch: u64,
}

/// Result of [`Catalog::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOutcome {
    /// The stored record (new, or the existing one for an idempotent repeat).
    pub record: VolumeRecord,
    /// False when the volume already existed with the same parameters.
    pub created: bool,
}

impl Catalog {
    /// Creates a volume: an empty block store of `size_bytes` and its record at
    /// `new.epoch`, durable before this returns. Repeating a create with the same
    /// name, size and replication factor returns the stored record; any difference is
    /// [`CatalogError::Conflict`]. On failure nothing is left on disk.
    pub fn create(&self, new: NewVolume) -> Result<CreateOutcome, CatalogError> {
        validate_volume_id(&new.volume_id)?;
        validate_size(new.size_bytes)?;
        // The data plane's fence starts here; an epoch no seq can carry would leave
        // the volume with none an engine could write at.
        Epoch::new(new.epoch).map_err(|_| CatalogError::EpochTooLarge { epoch: new.epoch })?;
        copy_state::validate_copy_source(&new)?;
        let qos = requested_qos(&new.volume_id, &new.parameters)?;
        let _guard = self.lock_mutations();
        let id = new.volume_id.clone();

        if let Some(q) = self.read_quarantined().get(&id) {
            return Err(self.quarantined_error(q));
        }
        let existing = self.read_volumes().get(&id).map(Entry::snapshot);
        if let Some(stored) = existing {
            if stored.deleted {
                return Err(CatalogError::HeldBySnapshots(id));
            }
            compare_existing(&stored, &new)?;
            return self
                .refresh_copy_holders(stored, &new)
                .map(|record| CreateOutcome {
                    record,
                    created: false,
                });
        }
        let free = self.capacity()?.free_bytes;
        if new.size_bytes > free {
            return Err(CatalogError::NoCapacity {
                volume_id: id,
                needed: new.size_bytes,
                free,
            });
        }

        let record = VolumeRecord {
            volume_id: id.clone(),
            name: new.name,
            size_bytes: new.size_bytes,
            replication_factor: new.replication_factor,
            replicas: new.replicas,
            parameters: new.parameters,
            epoch: new.epoch,
            generation: 1,
            created_unix_nanos: if new.created_unix_nanos == 0 {
                now_unix_nanos()
            } else {
                new.created_unix_nanos
            },
            attachments: Vec::new(),
            access_type: new.access_type,
            snapshots: Vec::new(),
            deleted: false,
            copy: new
                .copy_source
                .as_ref()
                .map(|src| copy_state::initial_progress(src, false)),
            copy_source: new.copy_source,
        };
        // A rebuild copies the replicas' heads, which no local snapshot holds.
        let base = record
            .copy_source
            .as_ref()
            .filter(|src| !src.rebuild)
            .and_then(|src| self.local_base(src));
        let io = match &self.io {
            Some(io) => Some(VolumeIo::register(io, &id, qos, None)?),
            None => None,
        };
        let mut record = record;
        let store = self.build_volume_dir(&mut record, io.as_ref(), base.as_ref())?;
        match &record.copy_source {
            Some(src) if src.rebuild => info!(volume_id = %id, size_bytes = record.size_bytes,
                epoch = record.epoch, holders = src.holders.len(),
                "volume created; it is rebuilt from its replicas"),
            Some(src) => info!(volume_id = %id, size_bytes = record.size_bytes,
                snapshot_id = %src.snapshot_id, source_volume_id = %src.source_volume_id,
                clone = src.clone,
                shared_layers = record.copy.as_ref().is_some_and(|c| c.shared_layers),
                "volume created; its data is copied from a snapshot"),
            None => info!(volume_id = %id, size_bytes = record.size_bytes, "volume created"),
        }
        self.write_volumes().insert(
            id,
            Entry {
                epoch: Arc::new(AtomicU64::new(record.epoch)),
                record: record.clone(),
                store: Arc::new(store),
                io,
            },
        );
        Ok(CreateOutcome {
            record,
            created: true,
        })
    }

    /// Writes the volume's directory under its staging name, renames it into place and
    /// opens its store there. With a `base` (a restore or clone of a snapshot this
    /// daemon holds), the store shares the snapshot's layers and `record` is marked
    /// so (see `Catalog::share_base`).
    fn build_volume_dir(
        &self,
        record: &mut VolumeRecord,
        io: Option<&VolumeIo>,
        base: Option<&LocalBase>,
    ) -> Result<LayeredStore, CatalogError> {
        let volume_id = record.volume_id.clone();
        let id = volume_id.as_str();
        let staging = self.volumes_dir.join(format!("{CREATING_PREFIX}{id}"));
        let target = self.volume_dir(id);
        if staging.exists() {
            // Only possible if an earlier cleanup in this process failed.
            fs::remove_dir_all(&staging).map_err(io_error("remove stale", &staging))?;
        }
        let staged = (|| {
            fs::create_dir(&staging).map_err(mutation_error(id, "create", &staging))?;
            // The store is durable (manifest and its directory fsynced) when create
            // returns. It is closed again at once: it remembers the staging path, and
            // is reopened below under the final one (the manifest names layers by id
            // only, and hard links do not care about paths).
            let store_dir = staging.join(STORE_DIR);
            let shared = match base {
                Some(base) => Self::share_base(record, &store_dir, base)?,
                None => false,
            };
            if !shared {
                drop(
                    LayeredStore::create(&store_dir, record.size_bytes)
                        .map_err(store_error(id, "create"))?,
                );
            }
            let rec = staging.join(RECORD_FILE);
            // write_file also fsyncs `staging`, covering the store directory's entry.
            record::write_file(&rec, record).map_err(mutation_error(id, "create", &rec))?;
            fs::rename(&staging, &target).map_err(mutation_error(id, "create", &target))
        })();
        if let Err(e) = staged {
            if let Err(cleanup) = fs::remove_dir_all(&staging) {
                if cleanup.kind() != io::ErrorKind::NotFound {
                    warn!(path = %staging.display(), error = %cleanup,
                        "cannot remove staging directory of a failed create; it is removed at next start");
                }
            }
            return Err(e);
        }
        let opened = record::sync_dir(&self.volumes_dir)
            .map_err(mutation_error(id, "create", &self.volumes_dir))
            .and_then(|()| {
                let dir = target.join(STORE_DIR);
                io_registration::open_store(io, &dir).map_err(store_error(id, "open"))
            });
        if opened.is_err() {
            // Not durable or not servable: undo rather than answer success. Should the
            // removal not happen, the next start loads (or quarantines) the volume, and
            // the controller's retried create finds it.
            if let Err(e) = fs::remove_dir_all(&target) {
                warn!(path = %target.display(), error = %e,
                    "cannot remove volume directory of a failed create");
            }
        }
        opened
    }

    /// Deletes a volume's record and data. Returns whether it existed; an unknown id
    /// is not an error. A quarantined volume is deleted too (the caller asked for it).
    pub fn delete(&self, volume_id: &str) -> Result<bool, CatalogError> {
        validate_volume_id(volume_id)?;
        let guard = self.lock_mutations();
        let retained = self
            .read_volumes()
            .get(volume_id)
            .map(|e| (e.record.clone(), Arc::clone(&e.store)));
        if let Some((mut record, store)) = retained {
            if record.deleted {
                return Ok(false);
            }
            if !record.snapshots.is_empty() {
                // Snapshots outlive their volume: drop the head (open data-plane
                // connections fail from now on), keep the sealed layers and the
                // record, marked deleted.
                store
                    .delete_volume()
                    .map_err(store_error(volume_id, "delete"))?;
                record.deleted = true;
                record.attachments.clear();
                record.generation += 1;
                self.persist(&record, "delete")?;
                self.replace_record(record);
                info!(volume_id, "volume deleted; its snapshots are kept");
                return Ok(true);
            }
        }
        drop(guard);
        self.remove_volume_dir(volume_id)
    }

    /// Removes a volume's directory and forgets it (the whole volume, snapshots
    /// included). Returns whether it existed.
    pub(super) fn remove_volume_dir(&self, volume_id: &str) -> Result<bool, CatalogError> {
        let _guard = self.lock_mutations();
        let store = self
            .read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.store));
        let known = store.is_some() || self.read_quarantined().contains_key(volume_id);
        if !known {
            return Ok(false);
        }
        let dir = self.volume_dir(volume_id);
        let doomed = self
            .volumes_dir
            .join(format!("{DELETING_PREFIX}{volume_id}"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed).map_err(io_error("remove stale", &doomed))?;
        }
        // Fence the data plane before the directory moves: requests in flight finish,
        // later ones on open connections fail.
        if let Some(store) = &store {
            store.retire();
        }
        if let Err(e) = fs::rename(&dir, &doomed) {
            self.reopen_after_failed_delete(volume_id);
            return Err(io_error("rename for deletion", &dir)(e));
        }
        if let Err(e) = record::sync_dir(&self.volumes_dir) {
            // Not durable: put it back so memory and disk agree, and report.
            if let Err(back) = fs::rename(&doomed, &dir) {
                error!(volume_id, error = %back,
                    "cannot restore volume directory after a failed delete; it is removed at next start");
                if let Some(io) = self.forget(volume_id) {
                    io.release();
                }
            } else {
                self.reopen_after_failed_delete(volume_id);
            }
            return Err(io_error("sync", &self.volumes_dir)(e));
        }
        // Committed: the .deleting- directory is removed at start if we crash now.
        // Forgetting the entry drops its scheduler handle; the store was retired (its
        // files are closed), so releasing the factory's handle ends the registration
        // even while a connection still holds the retired store.
        if let Some(io) = self.forget(volume_id) {
            io.release();
        }
        if let Err(e) = fs::remove_dir_all(&doomed) {
            warn!(volume_id, path = %doomed.display(), error = %e,
                "cannot remove deleted volume's files; they are removed at next start");
        }
        info!(volume_id, "volume deleted");
        Ok(true)
    }

    /// A delete retired the volume's store but did not happen: serve the volume again
    /// from a freshly opened store, or quarantine it if the store no longer opens.
    /// Caller holds the mutation lock.
    fn reopen_after_failed_delete(&self, volume_id: &str) {
        let mut volumes = self.write_volumes();
        let Some(entry) = volumes.get_mut(volume_id) else {
            return; // quarantined: there was no store to retire
        };
        let dir = self.volume_dir(volume_id).join(STORE_DIR);
        match io_registration::open_store(entry.io.as_ref(), &dir) {
            Ok(store) => entry.store = Arc::new(store),
            Err(e) => {
                let reason = format!("block store cannot be reopened: {}", error_chain(&e));
                error!(volume_id, %reason, "volume quarantined after a failed delete");
                let data_bytes = entry.record.size_bytes;
                if let Some(io) = volumes.remove(volume_id).and_then(|e| e.io) {
                    io.release();
                }
                drop(volumes);
                self.quarantine(QuarantinedVolume {
                    volume_id: volume_id.to_string(),
                    reason,
                    data_bytes,
                });
            }
        }
    }

    /// Drops a volume from memory; returns its scheduler registration, if any.
    fn forget(&self, volume_id: &str) -> Option<VolumeIo> {
        let entry = self.write_volumes().remove(volume_id);
        self.write_quarantined().remove(volume_id);
        entry.and_then(|e| e.io)
    }
}

/// Returns `Ok(())` if a repeated create matches the stored volume, else the conflict.
fn compare_existing(stored: &VolumeRecord, new: &NewVolume) -> Result<(), CatalogError> {
    let mut diffs = Vec::new();
    if stored.size_bytes != new.size_bytes {
        diffs.push(format!(
            "size_bytes {} (requested {})",
            stored.size_bytes, new.size_bytes
        ));
    }
    if stored.name != new.name {
        diffs.push(format!("name {:?} (requested {:?})", stored.name, new.name));
    }
    if stored.replication_factor != new.replication_factor {
        diffs.push(format!(
            "replication_factor {} (requested {})",
            stored.replication_factor, new.replication_factor
        ));
    }
    if let Some(diff) = copy_state::copy_source_difference(&stored.copy_source, &new.copy_source) {
        diffs.push(diff);
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Conflict {
            volume_id: stored.volume_id.clone(),
            difference: diffs.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_support::{dir_names, new_volume, open, MIB};
    use crate::store::StoreError;

    #[test]
    fn create_makes_an_empty_store_and_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let out = cat.create(new_volume("v1", 8 * MIB)).expect("create");
        assert!(out.created);
        assert_eq!(out.record.generation, 1);
        assert_eq!(out.record.epoch, 0);
        assert!(out.record.created_unix_nanos > 0);
        let dir = tmp.path().join("volumes/v1");
        assert_eq!(dir_names(&dir), vec!["record", "store"]);
        assert_eq!(
            record::read_file(&dir.join("record")).expect("record"),
            out.record
        );
        assert_eq!(dir_names(&tmp.path().join("volumes")), vec!["v1"]);
        assert_eq!(cat.store_dir("v1"), Some(dir.join("store")));

        let (store, epoch) = cat.open_store("v1").expect("store");
        assert_eq!(store.size(), 8 * MIB);
        assert_eq!(store.dir(), dir.join("store"));
        assert!(Arc::ptr_eq(&epoch, &cat.epoch_handle("v1").expect("epoch")));
        assert!(
            cat.allocated_bytes().expect("allocated") < MIB,
            "a new store must be sparse"
        );
        // The store is the one a reopen finds.
        store.write(4096, &[7u8; 4096], 1).expect("write");
        cat.flush_all().expect("flush");
        drop((store, epoch));
        drop(cat);
        let cat = open(tmp.path(), Some(100 * MIB));
        let (store, _) = cat.open_store("v1").expect("store");
        assert_eq!(store.read(4096, 4096).expect("read"), vec![7u8; 4096]);
        assert!(matches!(
            cat.open_store("nope"),
            Err(CatalogError::NotFound(_))
        ));
    }

    #[test]
    fn delete_retires_the_open_store() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        let (store, _) = cat.open_store("v1").expect("store");
        store.write(0, &[1u8; 4096], 1).expect("write");
        assert!(cat.delete("v1").expect("delete"));
        assert!(matches!(
            store.write(0, &[2u8; 4096], 2),
            Err(StoreError::VolumeDeleted)
        ));
        assert!(matches!(
            store.read(0, 4096),
            Err(StoreError::VolumeDeleted)
        ));
        assert!(matches!(store.flush(), Err(StoreError::VolumeDeleted)));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
        assert!(matches!(
            cat.open_store("v1"),
            Err(CatalogError::NotFound(_))
        ));
        // A new volume under the same id gets a new store; the old handle stays dead.
        cat.create(new_volume("v1", MIB)).expect("recreate");
        let (fresh, _) = cat.open_store("v1").expect("store");
        assert_eq!(fresh.read(0, 4096).expect("read"), vec![0u8; 4096]);
        assert!(store.read(0, 4096).is_err());
        cat.flush_all().expect("flush");
    }

    #[test]
    fn create_rejects_bad_sizes_and_ids() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        for size in [0, 1, 4095, 4097] {
            assert!(matches!(
                cat.create(new_volume("v", size)),
                Err(CatalogError::InvalidSize { .. })
            ));
        }
        assert!(matches!(
            cat.create(new_volume(".creating-x", 4096)),
            Err(CatalogError::InvalidVolumeId { .. })
        ));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
    }

    #[test]
    fn create_is_idempotent_and_conflicts_name_the_difference() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        let first = cat.create(new_volume("v1", MIB)).expect("create");
        let again = cat.create(new_volume("v1", MIB)).expect("repeat");
        assert!(!again.created);
        assert_eq!(again.record, first.record);

        let err = cat.create(new_volume("v1", 2 * MIB)).expect_err("conflict");
        assert!(matches!(err, CatalogError::Conflict { .. }));
        assert!(err.to_string().contains("size_bytes 1048576"), "{err}");

        let mut other = new_volume("v1", MIB);
        other.name = "someone-else".into();
        other.replication_factor = 2;
        let msg = cat.create(other).expect_err("conflict").to_string();
        assert!(
            msg.contains("name") && msg.contains("replication_factor"),
            "{msg}"
        );
        assert_eq!(cat.list().len(), 1);
    }

    #[test]
    fn delete_removes_everything_and_is_idempotent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v1", MIB)).expect("create");
        assert!(cat.delete("v1").expect("delete"));
        assert!(!cat.delete("v1").expect("delete again"));
        assert!(!cat.delete("never").expect("delete unknown"));
        assert!(matches!(cat.get("v1"), Err(CatalogError::NotFound(_))));
        assert!(dir_names(&tmp.path().join("volumes")).is_empty());
        // The id can be reused.
        cat.create(new_volume("v1", 2 * MIB)).expect("recreate");
    }

    #[test]
    fn concurrent_creates_of_one_id_create_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = Arc::new(open(tmp.path(), Some(100 * MIB)));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let cat = Arc::clone(&cat);
                std::thread::spawn(move || cat.create(new_volume("same", MIB)))
            })
            .collect();
        let created = handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("create"))
            .filter(|o| o.created)
            .count();
        assert_eq!(created, 1);
        assert_eq!(cat.capacity().expect("capacity").used_bytes, MIB);
    }
}
