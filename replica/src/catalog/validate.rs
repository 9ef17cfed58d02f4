//! What the catalog accepts as a volume id and a volume size.

use tessera_replica_protocol::volume_id::VolumeId;

use super::{CatalogError, BLOCK_SIZE};

/// Checks a volume id against the protocol's rule ([`VolumeId`]): ids become
/// directory names, so this is also what keeps `..`, `/` and the catalog's own hidden
/// entries out.
pub fn validate_volume_id(id: &str) -> Result<(), CatalogError> {
    VolumeId::check(id).map_err(|e| CatalogError::InvalidVolumeId {
        id: e.id,
        reason: e.reason,
    })
}

/// A size must be a positive multiple of the block size.
pub(super) fn validate_size(size: u64) -> Result<(), CatalogError> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(CatalogError::InvalidSize { size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_are_validated() {
        for ok in ["a", "pvc-1234", "A.b_c-9", &"x".repeat(128)] {
            assert!(validate_volume_id(ok).is_ok(), "{ok:?} rejected");
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
            "a\0",
        ] {
            assert!(
                matches!(
                    validate_volume_id(bad),
                    Err(CatalogError::InvalidVolumeId { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn sizes_are_positive_multiples_of_the_block_size() {
        for ok in [BLOCK_SIZE, 256 * BLOCK_SIZE] {
            assert!(validate_size(ok).is_ok(), "{ok} rejected");
        }
        for bad in [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE + 1] {
            assert!(
                matches!(validate_size(bad), Err(CatalogError::InvalidSize { size }) if size == bad),
                "{bad} accepted"
            );
        }
    }
}
