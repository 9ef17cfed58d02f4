//! [`VolumeBlocks`] for the layered store, for the data-plane server.

use std::sync::Arc;

use super::{IoPriority, LayeredStore, VersionedBlocks, WriteOutcome};
use crate::block_io::{BlockIoError, VolumeBlocks};

/// A shareable handle that serves a [`LayeredStore`] to the data-plane server.
///
/// Every call takes the store's async path (the `data_path` module): the request is
/// submitted to the volume's scheduler and awaited in the calling task, so no blocking
/// thread is involved (and a data-plane shard never parks on its own ring). Reads,
/// writes, trims and flushes are foreground I/O; versioned reads and conditional
/// writes and trims (resync copies) background.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    store: Arc<LayeredStore>,
}

impl StoreHandle {
    /// Wraps an open store.
    pub fn new(store: Arc<LayeredStore>) -> Self {
        StoreHandle { store }
    }

    /// The store behind the handle, for control operations (snapshots, expansion).
    pub fn store(&self) -> &Arc<LayeredStore> {
        &self.store
    }
}

impl VolumeBlocks for StoreHandle {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        async move {
            store
                .read_async(IoPriority::Foreground, offset, u64::from(len))
                .await
                .map_err(BlockIoError::from)
        }
    }

    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), BlockIoError>> + Send {
        let write = self
            .store
            .write_async(IoPriority::Foreground, offset, data, seq);
        async move { write.await.map_err(BlockIoError::from) }
    }

    fn flush(&self) -> impl std::future::Future<Output = Result<(), BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        async move {
            store
                .flush_async(IoPriority::Foreground)
                .await
                .map_err(BlockIoError::from)
        }
    }

    fn trim(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        async move {
            store
                .trim_async(IoPriority::Foreground, offset, len, seq)
                .await
                .map_err(BlockIoError::from)
        }
    }

    fn write_if_newer(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<u64, BlockIoError>> + Send {
        let write = self
            .store
            .write_if_newer_async(IoPriority::Background, offset, data, seq);
        async move { write.await.map(applied).map_err(BlockIoError::from) }
    }

    fn trim_if_newer(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<u64, BlockIoError>> + Send {
        let trim = self
            .store
            .trim_if_newer_async(IoPriority::Background, offset, len, seq);
        async move { trim.await.map(applied).map_err(BlockIoError::from) }
    }

    fn versions(
        &self,
        offset: u64,
        len: u64,
        with_data: bool,
    ) -> impl std::future::Future<Output = Result<VersionedBlocks, BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        // Background I/O, awaited in the calling task like every other request. They
        // are rare: a new engine's reconcile of dirty regions.
        async move {
            store
                .read_versions(None, offset, len, with_data)
                .await
                .map_err(BlockIoError::from)
        }
    }

    fn size(&self) -> u64 {
        self.store.size()
    }
}

/// How many of `outcomes` were applied.
fn applied(outcomes: Vec<WriteOutcome>) -> u64 {
    outcomes
        .iter()
        .filter(|o| **o == WriteOutcome::Applied)
        .count() as u64
}
