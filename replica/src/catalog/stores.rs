//! The volumes' open block stores: one per volume for its whole life in this process,
//! handed to data-plane connections (with the live epoch), flushed at shutdown.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tessera_telemetry::error_chain;
use tracing::error;

use super::{copy_state, validate_volume_id, Catalog, CatalogError, STORE_DIR};
use crate::store::{LayeredStore, StoreError};

impl Catalog {
    /// Directory of a stored volume's block store; `None` if unknown.
    pub fn store_dir(&self, volume_id: &str) -> Option<PathBuf> {
        self.read_volumes()
            .contains_key(volume_id)
            .then(|| self.volume_dir(volume_id).join(STORE_DIR))
    }

    /// The open block store and live epoch of a stored volume, for a data-plane
    /// connection. Both are looked up together so a connection never pairs one
    /// incarnation's store with another's epoch. The store stays usable until the
    /// volume is deleted (then every call on it fails).
    pub fn open_store(
        &self,
        volume_id: &str,
    ) -> Result<(Arc<LayeredStore>, Arc<AtomicU64>), CatalogError> {
        validate_volume_id(volume_id)?;
        if let Some(e) = self.read_volumes().get(volume_id) {
            if e.record.deleted {
                return Err(CatalogError::NotFound(volume_id.to_string()));
            }
            copy_state::refuse_while_copying(&e.record)?;
            return Ok((Arc::clone(&e.store), Arc::clone(&e.epoch)));
        }
        match self.read_quarantined().get(volume_id) {
            Some(q) => Err(self.quarantined_error(q)),
            None => Err(CatalogError::NotFound(volume_id.to_string())),
        }
    }

    /// Makes every write to every open store durable (clean shutdown). Tries all of
    /// them; returns the first failure after logging each.
    pub fn flush_all(&self) -> Result<(), CatalogError> {
        let stores: Vec<(String, Arc<LayeredStore>)> = self
            .read_volumes()
            .iter()
            .map(|(id, e)| (id.clone(), Arc::clone(&e.store)))
            .collect();
        let mut first = None;
        for (id, store) in stores {
            match store.flush() {
                Ok(()) => {}
                // Deleted since the list was taken: nothing left to make durable.
                Err(StoreError::VolumeDeleted) => {}
                Err(e) => {
                    error!(volume_id = %id, error = %error_chain(&e), "flushing volume failed");
                    first.get_or_insert(CatalogError::Store {
                        volume_id: id,
                        op: "flush",
                        source: e,
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The open store of a known volume (live or deleted).
    pub(super) fn store_of(&self, volume_id: &str) -> Result<Arc<LayeredStore>, CatalogError> {
        self.read_volumes()
            .get(volume_id)
            .map(|e| Arc::clone(&e.store))
            .ok_or_else(|| CatalogError::NotFound(volume_id.to_string()))
    }
}
