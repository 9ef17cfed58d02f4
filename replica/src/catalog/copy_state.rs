//! The catalog's side of restore, clone and rebuild: checking a copy source at
//! create, the copy's durable progress in the record, and what other replicas read
//! from here (sealed snapshots; a live volume's head, for a rebuild).
//!
//! Progress updates do not bump `generation`: that is the controller's
//! compare-and-set token for attachments and parameters, and a copy reporting
//! progress every second must not make its UpdateVolume calls fail. A progress update
//! names the store it was made for, so a task still running for a volume that was
//! deleted (and perhaps created again under the same id) can never write into the new
//! volume's record.

use std::sync::Arc;

use tracing::info;

use super::{validate_volume_id, Catalog, CatalogError, NewVolume, BLOCK_SIZE};
use crate::record::{CopyProgress, CopySource, VolumeRecord};
use crate::store::LayeredStore;

/// Replicas that make a majority of `replication_factor` (at least one).
pub fn majority(replication_factor: u32) -> usize {
    tessera_replica_protocol::quorum::majority(replication_factor as usize)
}

/// A volume being populated from a copy source: its record and its open store.
#[derive(Debug, Clone)]
pub struct CopyTarget {
    /// The record as stored now (progress included).
    pub record: VolumeRecord,
    /// The volume's open store; its identity ties progress updates to this volume.
    pub store: Arc<LayeredStore>,
}

/// A sealed snapshot, or a live volume's head, another replica reads: the store
/// holding it and its size.
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    /// The store of the snapshot's volume (live or deleted), or of the live volume.
    pub store: Arc<LayeredStore>,
    /// Size of the snapshot (or of the volume) in bytes.
    pub size_bytes: u64,
}

/// Progress of a copy that has not started: nothing done, the source size to go.
/// `shared_layers` tells the copy task the store's base already is this daemon's
/// sealed copy of the snapshot ([`LayeredStore::create_sharing`]).
pub(super) fn initial_progress(source: &CopySource, shared_layers: bool) -> CopyProgress {
    CopyProgress {
        done_bytes: 0,
        total_bytes: source.size_bytes,
        complete: false,
        last_error: String::new(),
        shared_layers,
        epoch_floor: 0,
    }
}

/// The data plane and snapshots must wait while a copy is incomplete.
pub(super) fn refuse_while_copying(record: &VolumeRecord) -> Result<(), CatalogError> {
    match record.pending_copy() {
        Some((source, progress)) => Err(CatalogError::Populating {
            volume_id: record.volume_id.clone(),
            snapshot_id: (!source.rebuild).then(|| source.snapshot_id.clone()),
            percent: progress.percent(),
        }),
        None => Ok(()),
    }
}

/// Checks the copy source of a create before anything touches disk.
pub(super) fn validate_copy_source(new: &NewVolume) -> Result<(), CatalogError> {
    let Some(src) = &new.copy_source else {
        return Ok(());
    };
    let invalid = |reason: String| CatalogError::InvalidCopySource {
        volume_id: new.volume_id.clone(),
        reason,
    };
    if src.rebuild {
        // A rebuild copies this very volume's heads: anything else named would be
        // another volume's data under this one's id.
        if !src.snapshot_id.is_empty() {
            return Err(invalid(format!(
                "a rebuild copies the replicas' heads, not snapshot {:?}",
                src.snapshot_id
            )));
        }
        if src.source_volume_id != new.volume_id {
            return Err(invalid(format!(
                "a rebuild copies the volume itself, not volume {:?}",
                src.source_volume_id
            )));
        }
        if src.size_bytes != new.size_bytes {
            return Err(invalid(format!(
                "a rebuild's size_bytes {} differs from the volume's {}",
                src.size_bytes, new.size_bytes
            )));
        }
        if src.clone {
            return Err(invalid("a rebuild is not a clone".into()));
        }
    } else {
        validate_volume_id(&src.snapshot_id).map_err(|e| invalid(format!("snapshot_id: {e}")))?;
        if src.fence_epoch != 0 {
            return Err(invalid(format!(
                "fence_epoch {} is only for rebuilds",
                src.fence_epoch
            )));
        }
    }
    validate_volume_id(&src.source_volume_id)
        .map_err(|e| invalid(format!("source_volume_id: {e}")))?;
    if src.holders.is_empty() {
        return Err(invalid("it names no holders".into()));
    }
    if let Some(h) = src.holders.iter().find(|h| h.control_address.is_empty()) {
        return Err(invalid(format!(
            "holder {:?} has no control_address",
            h.node_id
        )));
    }
    if src.source_replication_factor == 0 {
        return Err(invalid("source_replication_factor is 0".into()));
    }
    let needed = majority(src.source_replication_factor);
    if src.holders.len() < needed {
        return Err(invalid(format!(
            "{} holder(s) can never make a majority ({needed}) of replication factor {}",
            src.holders.len(),
            src.source_replication_factor
        )));
    }
    if src.size_bytes == 0 || !src.size_bytes.is_multiple_of(BLOCK_SIZE) {
        return Err(invalid(format!(
            "size_bytes {} is not a positive multiple of {BLOCK_SIZE}",
            src.size_bytes
        )));
    }
    if new.size_bytes < src.size_bytes {
        return Err(CatalogError::CopyTooSmall {
            volume_id: new.volume_id.clone(),
            size: new.size_bytes,
            source_size: src.size_bytes,
        });
    }
    Ok(())
}

/// How a repeated create's copy source differs from the stored one, if it does.
pub(super) fn copy_source_difference(
    stored: &Option<CopySource>,
    requested: &Option<CopySource>,
) -> Option<String> {
    let describe = |c: &Option<CopySource>| match c {
        None => "none".to_string(),
        Some(c) if c.rebuild => format!(
            "rebuild of volume {} ({} bytes)",
            c.source_volume_id, c.size_bytes
        ),
        Some(c) => format!(
            "snapshot {} of volume {} ({} bytes{})",
            c.snapshot_id,
            c.source_volume_id,
            c.size_bytes,
            if c.clone { ", clone" } else { "" }
        ),
    };
    match (stored, requested) {
        (None, None) => None,
        (Some(a), Some(b)) if a.same_data(b) => None,
        _ => Some(format!(
            "copy source {} (requested {})",
            describe(stored),
            describe(requested)
        )),
    }
}

impl Catalog {
    /// The record and open store of a live volume, for the task copying into it.
    pub fn copy_target(&self, volume_id: &str) -> Result<CopyTarget, CatalogError> {
        self.read_volumes()
            .get(volume_id)
            .filter(|e| !e.record.deleted)
            .map(|e| CopyTarget {
                record: e.record.clone(),
                store: Arc::clone(&e.store),
            })
            .ok_or_else(|| CatalogError::NotFound(volume_id.to_string()))
    }

    /// Ids of the live volumes whose copy is incomplete (to resume at start).
    pub fn pending_copies(&self) -> Vec<String> {
        self.read_volumes()
            .values()
            .filter(|e| !e.record.deleted && e.record.pending_copy().is_some())
            .map(|e| e.record.volume_id.clone())
            .collect()
    }

    /// Applies `update` to the copy progress of `volume_id` and makes it durable,
    /// provided the volume still lives in `store` (else NOT_FOUND: it was deleted or
    /// replaced, and the caller's task is stale). Returns the new record.
    pub fn update_copy_progress(
        &self,
        volume_id: &str,
        store: &Arc<LayeredStore>,
        update: impl FnOnce(&mut CopyProgress),
    ) -> Result<VolumeRecord, CatalogError> {
        let _guard = self.lock_mutations();
        let current = self
            .read_volumes()
            .get(volume_id)
            .filter(|e| !e.record.deleted && Arc::ptr_eq(&e.store, store))
            .map(|e| e.record.clone());
        let Some(mut record) = current else {
            return Err(CatalogError::NotFound(volume_id.to_string()));
        };
        let Some(progress) = record.copy.as_mut() else {
            return Err(CatalogError::NotFound(volume_id.to_string()));
        };
        let before = progress.clone();
        update(progress);
        if *progress == before {
            return Ok(record);
        }
        self.persist(&record, "record copy progress of")?;
        self.replace_record(record.clone());
        Ok(record)
    }

    /// A sealed snapshot of a stored volume, live or deleted (snapshots outlive their
    /// volume), for another replica to read.
    pub fn snapshot_source(
        &self,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotSource, CatalogError> {
        validate_volume_id(volume_id)?;
        let store = self.store_of(volume_id)?;
        let size_bytes =
            store
                .snapshot_size(snapshot_id)
                .map_err(|source| CatalogError::Store {
                    volume_id: volume_id.to_string(),
                    op: "find the snapshot in",
                    source,
                })?;
        Ok(SnapshotSource { store, size_bytes })
    }

    /// The head of a live volume whose own copy (if any) is complete, for a replica
    /// rebuilding it to read: a deleted volume is NOT_FOUND (only its snapshots are
    /// left), one still being populated [`CatalogError::Populating`] (its head is not
    /// a replica's yet), a quarantined one [`CatalogError::Quarantined`].
    pub fn head_source(&self, volume_id: &str) -> Result<SnapshotSource, CatalogError> {
        let (store, _) = self.open_store(volume_id)?;
        Ok(SnapshotSource {
            size_bytes: store.size(),
            store,
        })
    }

    /// A repeated create of a copying volume may name other holders (daemons moved):
    /// the copy dials the new ones from its next attempt. Caller holds the mutation
    /// lock and has checked that the source names the same data.
    pub(super) fn refresh_copy_holders(
        &self,
        mut record: VolumeRecord,
        new: &NewVolume,
    ) -> Result<VolumeRecord, CatalogError> {
        let pending = record.pending_copy().is_some();
        let (Some(stored), Some(requested)) = (record.copy_source.as_mut(), &new.copy_source)
        else {
            return Ok(record);
        };
        if !pending
            || (stored.holders == requested.holders
                && stored.source_replication_factor == requested.source_replication_factor)
        {
            return Ok(record);
        }
        stored.holders = requested.holders.clone();
        stored.source_replication_factor = requested.source_replication_factor;
        self.persist(&record, "update copy holders of")?;
        self.replace_record(record.clone());
        info!(volume_id = %record.volume_id, "copy source holders updated");
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::catalog::test_support::{self, restore, source, MIB};

    fn open(dir: &Path) -> Catalog {
        test_support::open(dir, Some(100 * MIB))
    }

    fn volume_dirs(dir: &Path) -> usize {
        fs::read_dir(dir.join("volumes")).expect("read_dir").count()
    }

    #[test]
    fn create_records_the_source_and_repeats_idempotently() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path());
        let out = cat
            .create(restore("r", 2 * MIB, source("s1")))
            .expect("create");
        assert!(out.created);
        assert_eq!(out.record.copy_source, Some(source("s1")));
        assert_eq!(
            out.record.copy,
            Some(CopyProgress {
                done_bytes: 0,
                total_bytes: MIB,
                complete: false,
                last_error: String::new(),
                shared_layers: false,
                epoch_floor: 0,
            })
        );
        assert_eq!(cat.pending_copies(), vec!["r".to_string()]);
        let again = cat
            .create(restore("r", 2 * MIB, source("s1")))
            .expect("repeat");
        assert!(!again.created);
        assert_eq!(again.record, out.record);

        let err = cat
            .create(restore("r", 2 * MIB, source("s2")))
            .expect_err("another source");
        assert!(matches!(err, CatalogError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("copy source"), "{err}");
        let mut plain = restore("r", 2 * MIB, source("s1"));
        plain.copy_source = None;
        assert!(matches!(
            cat.create(plain),
            Err(CatalogError::Conflict { .. })
        ));

        // Moved holders are taken over by a repeat; the data named stays the same.
        let mut moved = source("s1");
        moved.holders[0].control_address = "a2:7400".into();
        let rec = cat
            .create(restore("r", 2 * MIB, moved.clone()))
            .expect("repeat with moved holders")
            .record;
        assert_eq!(rec.copy_source, Some(moved.clone()));
        drop(cat);
        let cat = open(tmp.path());
        assert_eq!(cat.get("r").expect("get").copy_source, Some(moved));
    }

    #[test]
    fn bad_sources_are_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path());
        let mut no_holders = source("s");
        no_holders.holders.clear();
        let mut minority = source("s");
        minority.holders.truncate(1);
        let mut no_address = source("s");
        no_address.holders[1].control_address.clear();
        let mut bad_id = source("s");
        bad_id.snapshot_id = "../x".into();
        let mut unaligned = source("s");
        unaligned.size_bytes = 1000;
        for bad in [no_holders, minority, no_address, bad_id, unaligned] {
            let what = format!("{bad:?}");
            assert!(
                matches!(
                    cat.create(restore("r", MIB, bad)),
                    Err(CatalogError::InvalidCopySource { .. })
                ),
                "{what}"
            );
        }
        assert!(matches!(
            cat.create(restore("r", MIB / 2, source("s"))),
            Err(CatalogError::CopyTooSmall { .. })
        ));
        assert_eq!(volume_dirs(tmp.path()), 0);
    }

    #[test]
    fn an_incomplete_copy_is_not_served_and_progress_is_tied_to_its_store() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path());
        cat.create(restore("r", MIB, source("s"))).expect("create");
        let err = cat.open_store("r").expect_err("refused");
        assert_eq!(
            err.to_string(),
            "volume r is still being populated from snapshot s (0%)"
        );
        assert!(matches!(
            cat.create_snapshot("r", "snap", "snap", 0),
            Err(CatalogError::Populating { .. })
        ));

        let target = cat.copy_target("r").expect("target");
        let rec = cat
            .update_copy_progress("r", &target.store, |p| p.done_bytes = MIB / 4)
            .expect("progress");
        assert_eq!(rec.generation, 1, "progress is not a CAS-visible update");
        assert!(cat
            .open_store("r")
            .expect_err("still refused")
            .to_string()
            .contains("(25%)"));
        // Durable: a reopen finds it.
        drop((cat, target));
        let cat = open(tmp.path());
        assert_eq!(
            cat.get("r").expect("get").copy.expect("copy").done_bytes,
            MIB / 4
        );
        let target = cat.copy_target("r").expect("target");
        cat.update_copy_progress("r", &target.store, |p| {
            p.done_bytes = MIB;
            p.complete = true;
        })
        .expect("complete");
        assert!(cat.open_store("r").is_ok());
        assert!(cat.pending_copies().is_empty());

        // A task of a deleted incarnation cannot touch the new volume's record.
        cat.delete("r").expect("delete");
        cat.create(restore("r", MIB, source("s")))
            .expect("recreate");
        assert!(matches!(
            cat.update_copy_progress("r", &target.store, |p| p.done_bytes = 7),
            Err(CatalogError::NotFound(_))
        ));
        assert_eq!(cat.get("r").expect("get").copy.expect("copy").done_bytes, 0);
    }

    #[test]
    fn snapshot_sources_outlive_their_volume() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path());
        cat.create(NewVolume {
            volume_id: "v".into(),
            size_bytes: MIB,
            replication_factor: 1,
            ..NewVolume::default()
        })
        .expect("create");
        cat.create_snapshot("v", "s", "s", 0).expect("snapshot");
        cat.delete("v").expect("delete volume");
        let src = cat.snapshot_source("v", "s").expect("still readable");
        assert_eq!(src.size_bytes, MIB);
        assert!(matches!(
            cat.snapshot_source("v", "nope"),
            Err(CatalogError::Store { .. })
        ));
        assert!(matches!(
            cat.snapshot_source("gone", "s"),
            Err(CatalogError::NotFound(_))
        ));
        assert_eq!(majority(0), 1);
        assert_eq!(majority(3), 2);
    }

    /// A rebuild of volume "v" (1 MiB) at `epoch` from holders a, b, c.
    fn rebuild(epoch: u64) -> NewVolume {
        let mut src = source("");
        src.source_volume_id = "v".into();
        src.rebuild = true;
        src.fence_epoch = 4;
        NewVolume {
            epoch,
            ..restore("v", MIB, src)
        }
    }

    #[test]
    fn rebuild_sources_name_the_volume_itself_or_nothing_is_created() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path());
        let with = |f: fn(&mut CopySource)| {
            let mut new = rebuild(3);
            f(new.copy_source.as_mut().expect("source"));
            new
        };
        for (what, bad) in [
            ("a snapshot", with(|s| s.snapshot_id = "s1".into())),
            ("another volume", with(|s| s.source_volume_id = "w".into())),
            ("another size", with(|s| s.size_bytes = MIB / 2)),
            ("a clone", with(|s| s.clone = true)),
            ("no holders", with(|s| s.holders.clear())),
            ("a minority", with(|s| s.holders.truncate(1))),
            ("no address", with(|s| s.holders[2].control_address.clear())),
        ] {
            let err = cat.create(bad).expect_err(what);
            assert!(
                matches!(err, CatalogError::InvalidCopySource { .. }),
                "{what}: {err}"
            );
        }
        // A restore still needs its snapshot, and has no fence.
        let mut no_snapshot = restore("r", MIB, source(""));
        assert!(matches!(
            cat.create(no_snapshot.clone()),
            Err(CatalogError::InvalidCopySource { .. })
        ));
        no_snapshot.copy_source = Some(CopySource {
            fence_epoch: 2,
            ..source("s")
        });
        let err = cat.create(no_snapshot).expect_err("fenced restore");
        assert!(err.to_string().contains("only for rebuilds"), "{err}");
        let too_late = NewVolume {
            epoch: tessera_replica_protocol::seq::MAX_EPOCH + 1,
            ..rebuild(0)
        };
        assert!(matches!(
            cat.create(too_late),
            Err(CatalogError::EpochTooLarge { .. })
        ));
        assert_eq!(volume_dirs(tmp.path()), 0);
    }

    #[test]
    fn a_rebuild_starts_at_its_epoch_unserved_and_repeats_whatever_the_epoch_became() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path());
        let out = cat.create(rebuild(7)).expect("create");
        assert!(out.created);
        assert_eq!(out.record.epoch, 7);
        assert_eq!(out.record.copy_source, rebuild(7).copy_source);
        assert_eq!(
            cat.epoch_handle("v")
                .expect("handle")
                .load(std::sync::atomic::Ordering::SeqCst),
            7
        );
        assert!(!out.record.copy.as_ref().expect("progress").shared_layers);
        let refused = cat.open_store("v").expect_err("not served yet");
        assert_eq!(
            refused.to_string(),
            "volume v is being rebuilt from its replicas (0%)"
        );
        assert!(matches!(
            cat.head_source("v"),
            Err(CatalogError::Populating { .. })
        ));

        // An engine raised the epoch meanwhile: the same request still returns the
        // record, which keeps its epoch.
        cat.raise_epoch("v", 7, 9).expect("raise");
        let again = cat.create(rebuild(7)).expect("repeat");
        assert!(!again.created);
        assert_eq!(again.record.epoch, 9);
        let mut restored = rebuild(7);
        restored.copy_source = Some(source("s1"));
        let err = cat.create(restored).expect_err("another source");
        assert!(matches!(err, CatalogError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("rebuild of volume v"), "{err}");

        // Durable, and served once complete.
        drop(cat);
        let cat = open(tmp.path());
        assert_eq!(cat.get("v").expect("get").epoch, 9);
        let target = cat.copy_target("v").expect("target");
        cat.update_copy_progress("v", &target.store, |p| {
            p.done_bytes = MIB;
            p.complete = true;
        })
        .expect("complete");
        let head = cat.head_source("v").expect("head");
        assert_eq!(head.size_bytes, MIB);
        assert!(Arc::ptr_eq(&head.store, &target.store));
        cat.delete("v").expect("delete");
        assert!(matches!(
            cat.head_source("v"),
            Err(CatalogError::NotFound(_))
        ));
    }
}
