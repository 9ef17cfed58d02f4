//! The volume catalog: every volume this replica stores, on disk and in memory.
//!
//! Layout under the data directory:
//!
//! ```text
//! <data-dir>/lock                         flock held by the running daemon (holds its pid)
//! <data-dir>/volumes/<volume_id>/record   volume record (see crate::record)
//! <data-dir>/volumes/<volume_id>/store/   the volume's blocks: a crate::store::LayeredStore
//! <data-dir>/volumes/.creating-<id>/      a create in progress (removed at start)
//! <data-dir>/volumes/.deleting-<id>/      a delete in progress (removed at start)
//! ```
//!
//! Every mutation is durable (fsynced, directory included) before the method returns;
//! record updates are atomic file replacements.
//!
//! *Block stores.* Every healthy volume's store is opened when the catalog loads (so a
//! damaged store is found at start, not at an engine's first I/O) and stays open until
//! the volume is deleted; the data plane gets it through [`Catalog::open_store`]. A
//! delete first *retires* the open store ([`LayeredStore::retire`]): it waits for the
//! I/O in flight, and every later request of a connection still holding it fails, so
//! nothing is written into a deleted volume and no write is acknowledged after the
//! delete committed.
//!
//! *Concurrency.* Mutations are serialised by one mutex held across their disk I/O.
//! Reads ([`Catalog::get`], [`Catalog::list`]) only take a read lock on the in-memory
//! map, which mutations hold for a pointer swap, so a slow fsync never delays them.
//!
//! One module per concern, each adding its part of [`Catalog`]'s methods:
//! * `load`: opening a data directory (scan, leftovers of interrupted operations);
//!   `lock`: the data directory's lock.
//! * `lifecycle`: create and delete, crash-safe by staging directories.
//! * `update`: the generation compare-and-set mutations (attachments and parameters,
//!   expansion); `epochs`: the fencing epoch.
//! * `snapshots`: sealing and deleting snapshots; `copy_state`: restore and clone
//!   (copy sources, progress, snapshots read by other replicas); `sharing`: a local
//!   restore on hard links of a snapshot this daemon holds.
//! * `stores`: the open block stores; `io_registration`: their scheduler registration
//!   and QoS.
//! * `accounting`: capacity; `quarantine`: volumes that cannot be loaded.
//! * `validate`: volume id and size rules; `error`: [`CatalogError`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::Flock;

use crate::block_io::BLOCK_SIZE;
use crate::record::{self, VolumeRecord};
use crate::store::LayeredStore;

mod accounting;
mod copy_state;
mod epochs;
mod error;
mod io_registration;
mod lifecycle;
mod load;
mod lock;
mod quarantine;
mod sharing;
mod snapshots;
mod stores;
#[cfg(test)]
mod test_support;
mod update;
mod validate;

pub use accounting::CapacityReport;
pub use copy_state::{majority, CopyTarget, SnapshotSource};
pub use error::CatalogError;
pub use io_registration::{CatalogIo, VolumeIoReport};
pub use lifecycle::{CreateOutcome, NewVolume};
pub use load::CatalogConfig;
pub use lock::LOCK_FILE;
pub use quarantine::QuarantinedVolume;
pub use update::RecordUpdate;
pub use validate::validate_volume_id;

use error::mutation_error;
use io_registration::VolumeIo;

/// Name of the per-volume record file.
pub const RECORD_FILE: &str = "record";
/// Name of the per-volume block-store directory.
pub const STORE_DIR: &str = "store";
/// Directory (under the data dir) holding one directory per volume.
pub const VOLUMES_DIR: &str = "volumes";
/// Prefix of a volume directory under construction.
pub const CREATING_PREFIX: &str = ".creating-";
/// Prefix of a volume directory being removed.
pub const DELETING_PREFIX: &str = ".deleting-";

/// One healthy (or deleted, snapshots kept) volume in memory.
struct Entry {
    record: VolumeRecord,
    epoch: Arc<AtomicU64>,
    /// Open for the volume's whole life in this process; shared with data-plane
    /// connections, retired on delete.
    store: Arc<LayeredStore>,
    /// The scheduler registration; `None` for a catalog with std file I/O.
    io: Option<VolumeIo>,
}

impl Entry {
    fn snapshot(&self) -> VolumeRecord {
        self.record.clone()
    }
}

/// All volumes of one data directory. Cheap to share behind an `Arc`; every method
/// takes `&self`. Blocking: mutations do synchronous disk I/O (call them from
/// `spawn_blocking` in async code); reads are in-memory.
pub struct Catalog {
    data_dir: PathBuf,
    volumes_dir: PathBuf,
    capacity_bytes: u64,
    /// Held for the catalog's lifetime; dropping it releases the directory.
    _lock: Flock<File>,
    /// Serialises mutations, held across their disk I/O.
    mutation: Mutex<()>,
    volumes: RwLock<BTreeMap<String, Entry>>,
    quarantined: RwLock<BTreeMap<String, QuarantinedVolume>>,
    io: Option<CatalogIo>,
}

/// Now, for a record created without a time.
fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Catalog {
    /// The data directory this catalog owns.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of a volume (whether or not it exists).
    pub fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.volumes_dir.join(volume_id)
    }

    /// The record of a stored volume.
    pub fn get(&self, volume_id: &str) -> Result<VolumeRecord, CatalogError> {
        validate_volume_id(volume_id)?;
        self.read_volumes()
            .get(volume_id)
            .filter(|e| !e.record.deleted)
            .map(Entry::snapshot)
            .ok_or_else(|| CatalogError::NotFound(volume_id.to_string()))
    }

    /// All stored records of live volumes, ordered by volume id.
    pub fn list(&self) -> Vec<VolumeRecord> {
        self.read_volumes()
            .values()
            .filter(|e| !e.record.deleted)
            .map(Entry::snapshot)
            .collect()
    }

    /// Writes `record` durably (an atomic replacement of the record file); memory is
    /// updated by the caller afterwards ([`Self::replace_record`]).
    fn persist(&self, record: &VolumeRecord, op: &'static str) -> Result<(), CatalogError> {
        let path = self.volume_dir(&record.volume_id).join(RECORD_FILE);
        record::write_file(&path, record).map_err(mutation_error(&record.volume_id, op, &path))
    }

    /// Makes a durable `record` the one in memory.
    fn replace_record(&self, record: VolumeRecord) {
        if let Some(entry) = self.write_volumes().get_mut(&record.volume_id) {
            entry.record = record;
        }
    }

    fn lock_mutations(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave memory inconsistent with disk:
        // memory is only updated after the disk write succeeded.
        self.mutation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_volumes(&self) -> RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.volumes.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_volumes(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.volumes.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_quarantined(&self) -> RwLockReadGuard<'_, BTreeMap<String, QuarantinedVolume>> {
        self.quarantined
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_quarantined(&self) -> RwLockWriteGuard<'_, BTreeMap<String, QuarantinedVolume>> {
        self.quarantined
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
