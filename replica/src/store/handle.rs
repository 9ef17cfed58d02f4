//! [`VolumeBlocks`] for the layered store, for the data-plane server.

use std::io;
use std::sync::Arc;

use super::{LayeredStore, StoreError};
use crate::block_io::{BlockIoError, VolumeBlocks};

/// A shareable handle that serves a [`LayeredStore`] to the data-plane server.
///
/// The store's file I/O blocks (with the scheduler, the thread parks until its request
/// completes), so every call runs on tokio's blocking pool instead of stalling the
/// runtime's worker threads, and always at foreground priority.
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

/// Runs a store call on the blocking pool and converts its error for the data plane.
async fn blocking<T, F>(f: F) -> Result<T, BlockIoError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(BlockIoError::from),
        Err(join) => Err(BlockIoError::Io(io::Error::other(join))),
    }
}

impl VolumeBlocks for StoreHandle {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        blocking(move || store.read(offset, u64::from(len)))
    }

    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        blocking(move || store.write(offset, &data, seq))
    }

    fn flush(&self) -> impl std::future::Future<Output = Result<(), BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        blocking(move || store.flush())
    }

    fn trim(
        &self,
        offset: u64,
        len: u64,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), BlockIoError>> + Send {
        let store = Arc::clone(&self.store);
        blocking(move || store.trim(offset, len, seq))
    }

    fn size(&self) -> u64 {
        self.store.size()
    }
}
