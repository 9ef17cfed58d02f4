//! The data plane's view of the catalog: [`CatalogRegistry`] implements
//! [`VolumeRegistry`] over the volumes a [`Catalog`] stores.
//!
//! The catalog owns the open block stores and the live epochs (it opens every store at
//! load and retires it on delete, under its mutation lock), so this type only
//! translates: a handshake gets the volume's store and the catalog's shared epoch, and
//! an engine's higher epoch is persisted through the catalog. Keeping ownership in the
//! catalog is what makes "delete while a connection is open" safe: the delete retires
//! the very store object the connection holds.

use std::io;
use std::sync::Arc;

use tessera_replica_protocol::data::ReplicaSet;
use tessera_replica_protocol::publish_context::ReplicaEndpoint;

use crate::block_io::{BlockIoError, OpenVolume, VolumeRegistry};
use crate::catalog::{Catalog, CatalogError};
use crate::store::StoreHandle;

/// Serves the volumes of a [`Catalog`] to the data-plane server.
#[derive(Clone)]
pub struct CatalogRegistry {
    catalog: Arc<Catalog>,
}

impl CatalogRegistry {
    /// Serves `catalog`'s volumes.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        CatalogRegistry { catalog }
    }

    /// The catalog behind the registry.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

/// Maps a catalog error to the data plane: every "this replica has no such usable
/// volume" case is `UnknownVolume` (the engine treats the replica as lacking it); a
/// full disk is `NoSpace`; anything else is an I/O failure of this replica.
fn to_block_io(volume_id: &str, e: CatalogError) -> BlockIoError {
    match e {
        CatalogError::NotFound(_)
        | CatalogError::Quarantined { .. }
        | CatalogError::InvalidVolumeId { .. } => {
            BlockIoError::UnknownVolume(volume_id.to_string())
        }
        e @ CatalogError::Populating { .. } => BlockIoError::NotReady(e.to_string()),
        CatalogError::DiskFull { .. } => BlockIoError::NoSpace,
        other => BlockIoError::Io(io::Error::other(other)),
    }
}

impl VolumeRegistry for CatalogRegistry {
    type Blocks = StoreHandle;

    /// A map lookup (stores are opened at catalog load), so it is fine on the async
    /// handshake path.
    fn open(&self, volume_id: &str) -> Result<OpenVolume<StoreHandle>, BlockIoError> {
        let (store, epoch) = self
            .catalog
            .open_store(volume_id)
            .map_err(|e| to_block_io(volume_id, e))?;
        Ok(OpenVolume {
            sync: Arc::clone(store.sync_state()),
            blocks: Arc::new(StoreHandle::new(store)),
            epoch,
        })
    }

    /// Durable (the record is fsynced) and never lowers, by [`Catalog::adopt_epoch`];
    /// the catalog also publishes the value on the shared epoch handle.
    fn adopt_epoch(&self, volume_id: &str, epoch: u64) -> Result<(), BlockIoError> {
        self.catalog
            .adopt_epoch(volume_id, epoch)
            .map(|_| ())
            .map_err(|e| to_block_io(volume_id, e))
    }

    /// From the in-memory record (a map lookup, like [`Self::open`]).
    fn replica_set(&self, volume_id: &str) -> Result<ReplicaSet, BlockIoError> {
        let record = self
            .catalog
            .get(volume_id)
            .map_err(|e| to_block_io(volume_id, e))?;
        Ok(ReplicaSet {
            generation: record.generation,
            members: record
                .replicas
                .into_iter()
                .map(|r| ReplicaEndpoint {
                    node_id: r.node_id,
                    data_address: r.data_address,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::block_io::VolumeBlocks;
    use crate::catalog::{CatalogConfig, NewVolume};

    const MIB: u64 = 1 << 20;

    fn registry(dir: &std::path::Path) -> CatalogRegistry {
        let catalog = Catalog::open(CatalogConfig {
            data_dir: dir.to_path_buf(),
            capacity_bytes: Some(100 * MIB),
        })
        .expect("open catalog");
        CatalogRegistry::new(Arc::new(catalog))
    }

    fn create(reg: &CatalogRegistry, id: &str) {
        reg.catalog()
            .create(NewVolume {
                volume_id: id.into(),
                name: id.into(),
                size_bytes: MIB,
                replication_factor: 3,
                ..NewVolume::default()
            })
            .expect("create");
    }

    #[tokio::test]
    async fn serves_store_and_shared_epoch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let reg = registry(tmp.path());
        create(&reg, "v1");
        let vol = reg.open("v1").expect("open");
        assert_eq!(vol.blocks.size(), MIB);
        vol.blocks
            .write(8192, vec![5u8; 4096], 1)
            .await
            .expect("write");
        vol.blocks.flush().await.expect("flush");
        assert_eq!(
            vol.blocks.read(8192, 4096).await.expect("read"),
            vec![5u8; 4096]
        );

        // A raise through the catalog is visible on the handle the connection holds.
        reg.catalog().raise_epoch("v1", 0, 4).expect("raise");
        assert_eq!(vol.epoch.load(Ordering::SeqCst), 4);
        // Adoption persists and never lowers.
        reg.adopt_epoch("v1", 2).expect("adopt lower");
        assert_eq!(reg.catalog().get("v1").expect("get").epoch, 4);
        reg.adopt_epoch("v1", 7).expect("adopt higher");
        assert_eq!(vol.epoch.load(Ordering::SeqCst), 7);
        assert_eq!(reg.catalog().get("v1").expect("get").epoch, 7);
    }

    #[tokio::test]
    async fn unknown_and_deleted_volumes_are_unknown() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let reg = registry(tmp.path());
        assert!(matches!(
            reg.open("nope"),
            Err(BlockIoError::UnknownVolume(id)) if id == "nope"
        ));
        assert!(matches!(
            reg.open("../x"),
            Err(BlockIoError::UnknownVolume(_))
        ));
        assert!(matches!(
            reg.adopt_epoch("nope", 3),
            Err(BlockIoError::UnknownVolume(_))
        ));

        create(&reg, "v1");
        let vol = reg.open("v1").expect("open");
        assert!(reg.catalog().delete("v1").expect("delete"));
        assert!(vol.blocks.write(0, vec![1u8; 4096], 1).await.is_err());
        assert!(vol.blocks.read(0, 4096).await.is_err());
        assert!(vol.blocks.flush().await.is_err());
        assert!(vol.blocks.trim(0, 4096, 2).await.is_err());
        assert!(matches!(
            reg.open("v1"),
            Err(BlockIoError::UnknownVolume(_))
        ));
        assert!(!tmp.path().join("volumes/v1").exists());
    }
}
