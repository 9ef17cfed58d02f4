//! CSI `CapacityRange` rules: which size a new volume gets, and whether an existing
//! volume satisfies a range.
//!
//! Volumes are whole 4 KiB blocks, so sizes round up to [`BLOCK_SIZE`]. A range that
//! cannot hold one block-aligned size is OUT_OF_RANGE, a negative bound is
//! INVALID_ARGUMENT (the spec says the fields MUST NOT be negative).
//!
//! A volume that may be mounted is never smaller than its filesystem's minimum
//! ([`MinVolumeSize::min_volume_bytes`]): the spec lets the capacity exceed
//! `required_bytes`, so a smaller size is rounded up to the minimum when `limit_bytes`
//! allows it, and is OUT_OF_RANGE naming the minimum when it does not
//! ([`raise_to_filesystem_minimum`]).

use tessera_csi_proto::v1::CapacityRange;

use crate::fs_type::{FsType, MinVolumeSize};

/// Volume size granularity: the replicas' block size.
pub const BLOCK_SIZE: u64 = 4096;
/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// Why a capacity range was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// A bound is negative (INVALID_ARGUMENT).
    #[error("capacity_range.{field} must not be negative (got {value})")]
    Negative {
        /// `required_bytes` or `limit_bytes`.
        field: &'static str,
        /// The value as given.
        value: i64,
    },
    /// No block-aligned size lies within the range (OUT_OF_RANGE).
    #[error("no multiple of {BLOCK_SIZE} bytes lies in capacity range required={required} limit={limit}")]
    Unsatisfiable {
        /// required_bytes as given.
        required: i64,
        /// limit_bytes as given.
        limit: i64,
    },
    /// The limit is below the smallest volume the filesystem fits on (OUT_OF_RANGE).
    #[error(
        "a volume with a {fs} filesystem needs at least {minimum} bytes ({} MiB; mkfs.{fs} \
         cannot make a usable filesystem on less), but capacity_range.limit_bytes is {limit}",
        minimum >> 20
    )]
    BelowFilesystemMinimum {
        /// The filesystem the volume will be formatted with.
        fs: FsType,
        /// Its minimum volume size in bytes.
        minimum: u64,
        /// limit_bytes as given.
        limit: i64,
    },
}

/// The size, in bytes, a new volume gets for `range`.
///
/// Unset (or zero) bounds mean "no constraint"; with neither bound the volume gets
/// [`DEFAULT_VOLUME_SIZE`], capped by a limit if only the limit is set.
pub fn resolve_size(range: Option<&CapacityRange>) -> Result<u64, CapacityError> {
    let (required, limit) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    check_non_negative(required, limit)?;
    let unsatisfiable = CapacityError::Unsatisfiable { required, limit };
    // Non-negative checked above, so the casts are lossless.
    let (req, lim) = (required as u64, limit as u64);
    let size = if req == 0 {
        if lim == 0 {
            DEFAULT_VOLUME_SIZE
        } else {
            DEFAULT_VOLUME_SIZE.min(lim / BLOCK_SIZE * BLOCK_SIZE)
        }
    } else {
        req.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
    };
    if size == 0 || size > i64::MAX as u64 || (lim != 0 && size > lim) {
        return Err(unsatisfiable);
    }
    Ok(size)
}

/// [`resolve_size`], then [`raise_to_filesystem_minimum`]: the size of a new volume
/// that will hold a filesystem of type `fs` (`None`: raw block only, no minimum).
pub fn resolve_size_for(
    range: Option<&CapacityRange>,
    fs: Option<FsType>,
) -> Result<u64, CapacityError> {
    let size = resolve_size(range)?;
    raise_to_filesystem_minimum(size, range, fs)
}

/// `size` (already resolved from `range`), or the minimum volume size of `fs` if that
/// is larger and `range`'s limit allows it. A volume that will hold a filesystem must
/// be large enough for mkfs to make one; otherwise NodeStageVolume would fail on every
/// retry, long after CreateVolume said yes. `fs` is `None` for raw block volumes.
pub fn raise_to_filesystem_minimum(
    size: u64,
    range: Option<&CapacityRange>,
    fs: Option<FsType>,
) -> Result<u64, CapacityError> {
    let Some(fs) = fs else {
        return Ok(size);
    };
    let minimum = fs.min_volume_bytes();
    if size >= minimum {
        return Ok(size);
    }
    let limit = range.map(|r| r.limit_bytes).unwrap_or(0);
    check_non_negative(0, limit)?;
    // Non-negative checked above, so the cast is lossless.
    if limit == 0 || limit as u64 >= minimum {
        Ok(minimum)
    } else {
        Err(CapacityError::BelowFilesystemMinimum { fs, minimum, limit })
    }
}

/// Whether a volume of `size` bytes satisfies `range` (for idempotent CreateVolume).
pub fn satisfies(size: u64, range: Option<&CapacityRange>) -> Result<bool, CapacityError> {
    let (required, limit) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    check_non_negative(required, limit)?;
    Ok(size >= required as u64 && (limit == 0 || size <= limit as u64))
}

fn check_non_negative(required: i64, limit: i64) -> Result<(), CapacityError> {
    if required < 0 {
        return Err(CapacityError::Negative {
            field: "required_bytes",
            value: required,
        });
    }
    if limit < 0 {
        return Err(CapacityError::Negative {
            field: "limit_bytes",
            value: limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn unset_gives_default() {
        assert_eq!(resolve_size(None), Ok(DEFAULT_VOLUME_SIZE));
        assert_eq!(resolve_size(Some(&range(0, 0))), Ok(DEFAULT_VOLUME_SIZE));
    }

    #[test]
    fn rounds_up_to_block() {
        assert_eq!(resolve_size(Some(&range(1, 0))), Ok(4096));
        assert_eq!(resolve_size(Some(&range(4096, 0))), Ok(4096));
        assert_eq!(resolve_size(Some(&range(4097, 0))), Ok(8192));
        assert_eq!(resolve_size(Some(&range(4097, 8192))), Ok(8192));
    }

    #[test]
    fn limit_below_rounded_required_is_out_of_range() {
        assert!(matches!(
            resolve_size(Some(&range(4097, 5000))),
            Err(CapacityError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            resolve_size(Some(&range(0, 100))),
            Err(CapacityError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            resolve_size(Some(&range(i64::MAX, 0))),
            Err(CapacityError::Unsatisfiable { .. })
        ));
    }

    #[test]
    fn limit_only_caps_default() {
        assert_eq!(resolve_size(Some(&range(0, 1 << 20))), Ok(1 << 20));
        assert_eq!(resolve_size(Some(&range(0, (1 << 20) + 5))), Ok(1 << 20));
        assert_eq!(
            resolve_size(Some(&range(0, 10 << 30))),
            Ok(DEFAULT_VOLUME_SIZE)
        );
    }

    #[test]
    fn negative_is_invalid() {
        assert!(matches!(
            resolve_size(Some(&range(-1, 0))),
            Err(CapacityError::Negative {
                field: "required_bytes",
                ..
            })
        ));
        assert!(matches!(
            resolve_size(Some(&range(0, -1))),
            Err(CapacityError::Negative {
                field: "limit_bytes",
                ..
            })
        ));
        assert!(satisfies(4096, Some(&range(-1, 0))).is_err());
    }

    #[test]
    fn filesystem_volumes_round_up_to_the_minimum_within_the_limit() {
        let xfs = Some(FsType::Xfs);
        let min = FsType::Xfs.min_volume_bytes();
        let mib = |n: i64| n << 20;
        // The case: 64 MiB asked for, no limit.
        assert_eq!(resolve_size_for(Some(&range(mib(64), 0)), xfs), Ok(min));
        // A limit at or above the minimum allows the rounding.
        assert_eq!(
            resolve_size_for(Some(&range(mib(64), min as i64)), xfs),
            Ok(min)
        );
        assert_eq!(
            resolve_size_for(Some(&range(mib(64), mib(400))), xfs),
            Ok(min)
        );
        // Only a limit below the minimum: as small as allowed is still too small.
        let err = resolve_size_for(Some(&range(0, mib(100))), xfs).unwrap_err();
        assert_eq!(
            err,
            CapacityError::BelowFilesystemMinimum {
                fs: FsType::Xfs,
                minimum: min,
                limit: mib(100)
            }
        );
        assert!(err.to_string().contains(&min.to_string()), "{err}");
        assert!(err.to_string().contains("300 MiB"), "{err}");
        assert!(matches!(
            resolve_size_for(Some(&range(mib(64), min as i64 - 1)), xfs),
            Err(CapacityError::BelowFilesystemMinimum { .. })
        ));
        // Larger requests are untouched; so are block volumes.
        assert_eq!(
            resolve_size_for(Some(&range(mib(512), 0)), xfs),
            Ok(mib(512) as u64)
        );
        assert_eq!(resolve_size_for(None, xfs), Ok(DEFAULT_VOLUME_SIZE));
        assert_eq!(
            resolve_size_for(Some(&range(mib(64), mib(100))), None),
            Ok(mib(64) as u64)
        );
        assert_eq!(resolve_size_for(Some(&range(5000, 0)), None), Ok(8192));
        assert_eq!(
            resolve_size_for(Some(&range(5000, 0)), Some(FsType::Ext4)),
            Ok(FsType::Ext4.min_volume_bytes())
        );
        // Range errors come first, as for any volume.
        assert!(matches!(
            resolve_size_for(Some(&range(-1, 0)), xfs),
            Err(CapacityError::Negative { .. })
        ));
    }

    #[test]
    fn satisfies_checks_both_bounds() {
        assert_eq!(satisfies(8192, Some(&range(4097, 0))), Ok(true));
        assert_eq!(satisfies(8192, Some(&range(8193, 0))), Ok(false));
        assert_eq!(satisfies(8192, Some(&range(0, 8191))), Ok(false));
        assert_eq!(satisfies(8192, None), Ok(true));
    }
}
