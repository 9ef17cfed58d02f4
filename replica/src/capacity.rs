//! Capacity: parsing operator-given sizes and measuring the backing filesystem.
//!
//! The daemon accounts capacity thickly (every volume counts its full size even though
//! its data file is sparse), so a node never promises more than it has; the backing
//! filesystem's free space is a second bound, because other files can fill it.

use std::io;
use std::path::Path;

/// Why a size string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseSizeError {
    /// The string is empty.
    #[error("size is empty")]
    Empty,
    /// The number part is missing or not a non-negative integer.
    #[error("size {0:?} does not start with a whole number of bytes")]
    BadNumber(String),
    /// The suffix is not one of Ki, Mi, Gi, Ti, K, M, G, T (or none).
    #[error("size {0:?} has an unknown suffix (use Ki, Mi, Gi, Ti, K, M, G or T)")]
    BadSuffix(String),
    /// The value does not fit in 64 bits.
    #[error("size {0:?} overflows 64 bits")]
    Overflow(String),
}

/// Parses a byte count such as `4096`, `10Gi` or `500M`.
///
/// `Ki`/`Mi`/`Gi`/`Ti` are powers of 1024 and `K`/`M`/`G`/`T` powers of 1000, as in
/// Kubernetes quantities, so a value copied from a manifest means the same here.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(ParseSizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(ParseSizeError::BadNumber(s.to_string()));
    }
    let multiplier: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(ParseSizeError::BadSuffix(s.to_string())),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| ParseSizeError::Overflow(s.to_string()))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| ParseSizeError::Overflow(s.to_string()))
}

/// Size and free space of a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Total size of the filesystem.
    pub total_bytes: u64,
    /// Space an unprivileged writer can still use (statvfs `f_bavail`), which is what
    /// volume data files will get.
    pub available_bytes: u64,
}

/// Measures the filesystem holding `path` (statvfs).
// The statvfs field types are u64 on 64-bit Linux but narrower elsewhere; the casts
// only ever widen.
#[allow(clippy::unnecessary_cast)]
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let frag = st.fragment_size() as u64;
    Ok(FsSpace {
        total_bytes: (st.blocks() as u64).saturating_mul(frag),
        available_bytes: (st.blocks_available() as u64).saturating_mul(frag),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1Ki"), Ok(1024));
        assert_eq!(parse_size("3Mi"), Ok(3 << 20));
        assert_eq!(parse_size("10Gi"), Ok(10 << 30));
        assert_eq!(parse_size("2Ti"), Ok(2 << 40));
        assert_eq!(parse_size("5K"), Ok(5_000));
        assert_eq!(parse_size("5M"), Ok(5_000_000));
        assert_eq!(parse_size("5G"), Ok(5_000_000_000));
        assert_eq!(parse_size("5T"), Ok(5_000_000_000_000));
        assert_eq!(parse_size(" 1Gi "), Ok(1 << 30));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        assert!(matches!(
            parse_size("Gi"),
            Err(ParseSizeError::BadNumber(_))
        ));
        assert!(matches!(
            parse_size("-1"),
            Err(ParseSizeError::BadNumber(_))
        ));
        assert!(matches!(
            parse_size("1.5Gi"),
            Err(ParseSizeError::BadSuffix(_))
        ));
        assert!(matches!(
            parse_size("1GB"),
            Err(ParseSizeError::BadSuffix(_))
        ));
        assert!(matches!(
            parse_size("1 Gi"),
            Err(ParseSizeError::BadSuffix(_))
        ));
        assert!(matches!(
            parse_size("20000000Ti"),
            Err(ParseSizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn measures_a_real_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = fs_space(dir.path()).expect("statvfs");
        assert!(space.total_bytes > 0);
        assert!(space.available_bytes <= space.total_bytes);
        assert!(fs_space(&dir.path().join("missing")).is_err());
    }
}
