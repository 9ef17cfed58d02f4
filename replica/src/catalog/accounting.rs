//! Capacity accounting: what this replica has promised to volumes (thick,
//! [`Catalog::capacity`]), which every create and expansion must fit in, and what
//! their stores really allocate ([`Catalog::allocated_bytes`]).

use std::collections::HashSet;
use std::sync::Arc;

use super::error::io_error;
use super::{Catalog, CatalogError};
use crate::capacity;
use crate::store::{LayeredStore, StoreError};

/// Capacity figures reported by GetInfo and /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityReport {
    /// Bytes offered to volumes.
    pub capacity_bytes: u64,
    /// Sum of the sizes of all volumes (quarantined ones by their recorded size, or
    /// their store's size when the record is unreadable).
    pub used_bytes: u64,
    /// `capacity - used`, capped by the backing filesystem's free space.
    pub free_bytes: u64,
    /// Number of (healthy) volumes.
    pub volume_count: u32,
    /// Number of quarantined volumes.
    pub quarantined_count: u32,
}

/// Disk space of a store's sealed (snapshot) layers that `seen` does not hold yet; 0
/// when it cannot be measured (a retired store), so capacity reports never fail on one
/// odd volume. Every layer counted goes into `seen` (by file identity), so a layer
/// hard-linked into several stores ([`LayeredStore::create_sharing`]) counts once.
fn sealed_bytes(store: &LayeredStore, seen: &mut HashSet<(u64, u64)>) -> u64 {
    store.space_used().map_or(0, |u| {
        u.layers
            .iter()
            .filter(|l| l.snapshot_id.is_some() && seen.insert(l.file_id))
            .map(|l| l.allocated_bytes)
            .fold(0u64, u64::saturating_add)
    })
}

impl Catalog {
    /// Capacity, use and free space (free is capped by the backing filesystem).
    pub fn capacity(&self) -> Result<CapacityReport, CatalogError> {
        // Thick for the head (a volume may fill its whole size), plus the disk space
        // its sealed layers hold: a snapshot pins the blocks it references, so a volume
        // with snapshots can use up to (snapshots + 1) × its size. A deleted volume
        // kept for its snapshots counts only their layers. A sealed layer shared by
        // several volumes (a local restore's base: hard links of one file) is one
        // file on disk and counts once, whichever volumes still link it.
        let (used_bytes, volume_count) = {
            let volumes = self.read_volumes();
            let mut seen = HashSet::new();
            let used: u64 = volumes
                .values()
                .map(|e| {
                    let head = if e.record.deleted {
                        0
                    } else {
                        e.record.size_bytes
                    };
                    head.saturating_add(sealed_bytes(&e.store, &mut seen))
                })
                .fold(0u64, u64::saturating_add);
            let live = volumes.values().filter(|e| !e.record.deleted).count();
            (used, live)
        };
        let (q_bytes, quarantined_count) = {
            let q = self.read_quarantined();
            (q.values().map(|v| v.data_bytes).sum::<u64>(), q.len())
        };
        let used_bytes = used_bytes.saturating_add(q_bytes);
        let fs = capacity::fs_space(&self.data_dir)
            .map_err(io_error("measure filesystem of", &self.data_dir))?;
        Ok(CapacityReport {
            capacity_bytes: self.capacity_bytes,
            used_bytes,
            free_bytes: self
                .capacity_bytes
                .saturating_sub(used_bytes)
                .min(fs.available_bytes),
            volume_count: u32::try_from(volume_count).unwrap_or(u32::MAX),
            quarantined_count: u32::try_from(quarantined_count).unwrap_or(u32::MAX),
        })
    }

    /// Disk space the stores of all healthy volumes really allocate (sparse files, all
    /// layers), as opposed to the thick accounting of [`Catalog::capacity`]. A layer
    /// shared by several stores (hard links, same file) is counted once.
    pub fn allocated_bytes(&self) -> Result<u64, CatalogError> {
        let stores: Vec<(String, Arc<LayeredStore>)> = self
            .read_volumes()
            .iter()
            .map(|(id, e)| (id.clone(), Arc::clone(&e.store)))
            .collect();
        let mut total = 0u64;
        let mut seen = HashSet::new();
        for (id, store) in stores {
            match store.space_used() {
                Ok(u) => {
                    for l in u.layers.iter().filter(|l| seen.insert(l.file_id)) {
                        total = total.saturating_add(l.allocated_bytes);
                    }
                }
                Err(StoreError::VolumeDeleted) => {}
                Err(source) => {
                    return Err(CatalogError::Store {
                        volume_id: id,
                        op: "measure",
                        source,
                    })
                }
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::test_support::{new_volume, open, MIB};

    #[test]
    fn capacity_is_thick_accounted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(4 * MIB));
        let fs_free = capacity::fs_space(tmp.path())
            .expect("statvfs")
            .available_bytes;
        assert!(fs_free > 4 * MIB, "test needs more than 4 MiB free");

        let r = cat.capacity().expect("capacity");
        assert_eq!(
            (r.capacity_bytes, r.used_bytes, r.free_bytes, r.volume_count),
            (4 * MIB, 0, 4 * MIB, 0)
        );
        cat.create(new_volume("a", 3 * MIB)).expect("create");
        let err = cat.create(new_volume("b", 2 * MIB)).expect_err("full");
        assert!(matches!(err, CatalogError::NoCapacity { .. }));
        assert_eq!(
            err.to_string(),
            format!("volume b needs {} bytes, {} free", 2 * MIB, MIB)
        );
        assert!(!tmp.path().join("volumes/b").exists());
        // Exactly the remaining space fits; a repeat of an existing create needs none.
        cat.create(new_volume("b", MIB)).expect("fits exactly");
        cat.create(new_volume("a", 3 * MIB))
            .expect("idempotent when full");
        assert_eq!(cat.capacity().expect("capacity").free_bytes, 0);
        cat.delete("a").expect("delete");
        let r = cat.capacity().expect("capacity");
        assert_eq!(
            (r.used_bytes, r.free_bytes, r.volume_count),
            (MIB, 3 * MIB, 1)
        );
    }

    #[test]
    fn capacity_counts_snapshot_layers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), Some(100 * MIB));
        cat.create(new_volume("v", 4 * MIB)).expect("create");
        let store = cat.store_of("v").expect("store");
        store.write(0, &vec![7u8; MIB as usize], 1).expect("write");
        store.flush().expect("flush");
        cat.create_snapshot("v", "s1", "snap", 1).expect("snapshot");
        // The head is still reserved in full; the sealed layer adds its blocks.
        let used = cat.capacity().expect("capacity").used_bytes;
        assert!(
            (5 * MIB..6 * MIB).contains(&used),
            "used {used} after a snapshot of 1 MiB of data"
        );
        // Deleted, the volume keeps only its snapshot's space.
        cat.delete("v").expect("delete");
        let r = cat.capacity().expect("capacity");
        assert!((MIB..2 * MIB).contains(&r.used_bytes), "{}", r.used_bytes);
        assert_eq!(r.volume_count, 0);
        cat.delete_snapshot("v", "s1").expect("delete snapshot");
        assert_eq!(cat.capacity().expect("capacity").used_bytes, 0);
    }

    #[test]
    fn default_capacity_is_the_filesystem_size() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cat = open(tmp.path(), None);
        let fs = capacity::fs_space(tmp.path()).expect("statvfs");
        let r = cat.capacity().expect("capacity");
        assert_eq!(r.capacity_bytes, fs.total_bytes);
        assert!(r.free_bytes <= r.capacity_bytes);
    }
}
