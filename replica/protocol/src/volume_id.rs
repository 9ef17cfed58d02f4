//! A volume's id, as every process names it: the controller makes it, replicas use
//! it as a directory name, engines send it at HELLO.

use std::fmt;

/// Longest volume id, keeping directory names well under NAME_MAX.
pub const MAX_VOLUME_ID_LEN: usize = 128;

/// A checked volume id: 1..=[`MAX_VOLUME_ID_LEN`] characters of `[A-Za-z0-9._-]`,
/// not starting with '.'. Ids become directory names on the replicas, so the rule is
/// also what keeps `..`, `/` and a replica's own hidden entries out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(String);

/// Why a string is not a [`VolumeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid volume id {id:?}: {reason}")]
pub struct InvalidVolumeId {
    /// The id as given.
    pub id: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

impl VolumeId {
    /// Checks `id` against the rule (see the type's doc).
    pub fn new(id: impl Into<String>) -> Result<VolumeId, InvalidVolumeId> {
        let id = id.into();
        match Self::rule_broken_by(&id) {
            None => Ok(VolumeId(id)),
            Some(reason) => Err(InvalidVolumeId { id, reason }),
        }
    }

    /// Checks `id` without taking it.
    pub fn check(id: &str) -> Result<(), InvalidVolumeId> {
        match Self::rule_broken_by(id) {
            None => Ok(()),
            Some(reason) => Err(InvalidVolumeId {
                id: id.to_owned(),
                reason,
            }),
        }
    }

    fn rule_broken_by(id: &str) -> Option<&'static str> {
        if id.is_empty() {
            Some("must not be empty")
        } else if id.len() > MAX_VOLUME_ID_LEN {
            Some("must be at most 128 characters")
        } else if id.starts_with('.') {
            Some("must not start with '.'")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            Some("may only contain A-Z, a-z, 0-9, '.', '_' and '-'")
        } else {
            None
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VolumeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<VolumeId> for String {
    fn from(id: VolumeId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        assert_eq!(
            VolumeId::new("tv-0a1b").map(String::from),
            Ok("tv-0a1b".into())
        );
        assert!(VolumeId::new("pvc_1.2").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é"] {
            assert!(VolumeId::new(bad).is_err(), "{bad:?}");
        }
        assert!(VolumeId::check(&"a".repeat(MAX_VOLUME_ID_LEN)).is_ok());
        let long = VolumeId::check(&"a".repeat(MAX_VOLUME_ID_LEN + 1)).unwrap_err();
        assert_eq!(long.reason, "must be at most 128 characters");
    }
}
