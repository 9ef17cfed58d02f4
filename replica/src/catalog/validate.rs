//! What the catalog accepts as a volume id and a volume size.

use super::{CatalogError, BLOCK_SIZE};

/// Longest accepted volume id, keeping directory names well under NAME_MAX.
pub const MAX_VOLUME_ID_LEN: usize = 128;

/// Checks a volume id against the rules in the control API: 1..=128 characters of
/// `[A-Za-z0-9._-]`, not starting with '.'. Ids become directory names, so this is
/// also what keeps `..`, `/` and the catalog's own hidden entries out.
pub fn validate_volume_id(id: &str) -> Result<(), CatalogError> {
    let bad = |reason| {
        Err(CatalogError::InvalidVolumeId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("must not be empty");
    }
    if id.len() > MAX_VOLUME_ID_LEN {
        return bad("must be at most 128 characters");
    }
    if id.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may only contain A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
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
