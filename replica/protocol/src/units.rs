//! How sizes and durations are written wherever an operator or a StorageClass gives
//! one (`10Gi`, `500M`, `1m30s`), so every process reads them the same way.

use std::time::Duration;

/// Why a size string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseSizeError {
    /// The string is empty.
    #[error("size is empty")]
    Empty,
    /// The number part is missing or not a non-negative integer.
    #[error("size {0:?} does not start with a whole number of bytes")]
    BadNumber(String),
    /// The suffix is not one of Ki, Mi, Gi, Ti, K (or k), M, G, T (or none).
    #[error("size {0:?} has an unknown suffix (use Ki, Mi, Gi, Ti, K, M, G or T)")]
    BadSuffix(String),
    /// The value does not fit in 64 bits.
    #[error("size {0:?} overflows 64 bits")]
    Overflow(String),
}

/// Digits only: no sign, no blanks, not empty.
pub fn parse_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a byte count such as `4096`, `10Gi` or `500M`.
///
/// `Ki`/`Mi`/`Gi`/`Ti` are powers of 1024 and `K` (or `k`)/`M`/`G`/`T` powers of
/// 1000, as in Kubernetes quantities, so a value copied from a manifest means the same
/// here.
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
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

/// One or more `<integer><unit>` terms (units ms, s, m, h), e.g. `500ms`, `1m30s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n = parse_uint(&rest[..digits_end])?;
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let per_unit: u64 = match &rest[..unit_end] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total_ms = total_ms.checked_add(n.checked_mul(per_unit)?)?;
    }
    Some(Duration::from_millis(total_ms))
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
        assert_eq!(parse_size("5k"), Ok(5_000));
        assert_eq!(parse_size("5M"), Ok(5_000_000));
        assert_eq!(parse_size("5G"), Ok(5_000_000_000));
        assert_eq!(parse_size("5T"), Ok(5_000_000_000_000));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        for s in ["Gi", "-1", " 1Gi"] {
            assert!(
                matches!(parse_size(s), Err(ParseSizeError::BadNumber(_))),
                "{s}"
            );
        }
        for s in ["1.5Gi", "1GB", "1 Gi", "1Gi "] {
            assert!(
                matches!(parse_size(s), Err(ParseSizeError::BadSuffix(_))),
                "{s}"
            );
        }
        for s in ["20000000Ti", "99999999999999999999999"] {
            assert!(
                matches!(parse_size(s), Err(ParseSizeError::Overflow(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn durations_add_their_terms() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0ms"), Some(Duration::ZERO));
        for bad in ["", "5", "ms", "1.5s", "1d", "-1s", "1s "] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_uint("007"), Some(7));
        assert_eq!(parse_uint("+7"), None);
    }
}
