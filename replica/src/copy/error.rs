//! Why one attempt of a copy failed. Every variant is retried (with backoff) and its
//! text becomes the record's `copy.last_error`, so it says what an operator can check.

use crate::catalog::CatalogError;
use crate::store::StoreError;

use super::merge::MergeError;

/// Why a copy attempt stopped before completing.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Fewer holders than a majority of the source's replication factor answered (at
    /// the start, or left after some failed mid-way).
    #[error(
        "{answered} of {holders} holders answered, a majority of {needed} is needed: {errors}"
    )]
    TooFewHolders {
        /// Holders still answering.
        answered: usize,
        /// Holders listed in the copy source.
        holders: usize,
        /// Majority of the source replication factor.
        needed: usize,
        /// What the others said, `; `-separated.
        errors: String,
    },
    /// The holders' copies cannot be merged (damage, or a confused holder).
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// Writing or flushing the new volume's store failed.
    #[error("writing the new volume failed: {0}")]
    Store(#[from] StoreError),
    /// Recording progress failed.
    #[error("recording progress failed: {0}")]
    Catalog(#[from] CatalogError),
    /// A blocking task died.
    #[error("internal task failed: {0}")]
    Task(String),
}
