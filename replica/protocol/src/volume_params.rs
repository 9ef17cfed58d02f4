//! A volume's parameters as they travel between processes: the StorageClass keys the
//! controller validates and normalises, the normalised form the replicas keep in the
//! volume record (and apply as QoS), and the filesystem the node formats.
//!
//! The controller parses what users write (`10Mi`, `1m30s`); everything after it
//! reads the normalised form: limits as plain integers (bytes per second for the
//! bandwidth), `burstDuration` as `<N>ms`, a limit of 0 or an absent key meaning
//! "unlimited". The rules that tie the QoS settings together live here once
//! ([`QosLimits::check`]), so a record the controller accepted is one every replica
//! can apply.

use std::fmt;
use std::time::Duration;

use crate::units::{parse_duration, parse_uint};

/// Parameter key: number of replicas (1..=7).
pub const KEY_REPLICATION_FACTOR: &str = "replicationFactor";
/// Parameter key: filesystem for mount volumes (`ext4` or `xfs`).
pub const KEY_FS_TYPE: &str = "fsType";
/// Parameter key: IOPS limit per volume (0 or absent = unlimited).
pub const KEY_MAX_IOPS: &str = "maxIOPS";
/// Parameter key: IOPS reservation honoured under contention.
pub const KEY_MIN_IOPS: &str = "minIOPS";
/// Parameter key: bandwidth limit in bytes per second.
pub const KEY_MAX_BANDWIDTH: &str = "maxBandwidth";
/// Parameter key: how long a volume may burst above its limits.
pub const KEY_BURST_DURATION: &str = "burstDuration";
/// Parameter key: block checksum algorithm (only `crc32c`).
pub const KEY_CHECKSUM: &str = "checksum";
/// Parameter key: whether to place a replica on the consuming node.
pub const KEY_DATA_LOCALITY: &str = "dataLocality";
/// Prefix of the keys external-provisioner adds with `--extra-create-metadata`;
/// accepted and not stored as parameters.
pub const CSI_METADATA_PREFIX: &str = "csi.storage.k8s.io/";

/// Filesystem created on mount volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsType {
    /// ext4, the default.
    #[default]
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// Every filesystem Tessera offers.
    pub const ALL: [FsType; 2] = [FsType::Ext4, FsType::Xfs];

    /// Parses a StorageClass `fsType` or CSI `fs_type` value (case-insensitive).
    pub fn parse(name: &str) -> Option<FsType> {
        FsType::ALL
            .into_iter()
            .find(|fs| fs.as_str().eq_ignore_ascii_case(name))
    }

    /// The name stored in records and used by `mkfs`, `mount(2)` and `blkid`.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A volume's QoS settings; `None` means unlimited (or, for the burst, the
/// scheduler's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QosLimits {
    /// IOPS limit.
    pub max_iops: Option<u64>,
    /// IOPS reservation.
    pub min_iops: Option<u64>,
    /// Bytes-per-second limit.
    pub max_bandwidth: Option<u64>,
    /// Burst allowance above the limits.
    pub burst_duration: Option<Duration>,
}

/// Why QoS parameters cannot be applied; always names the key or the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    /// A QoS key whose stored value does not parse.
    #[error("invalid value {value:?} for parameter {key}: expected {expected}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value as stored.
        value: String,
        /// What the value should look like.
        expected: &'static str,
    },
    /// Values that parse but contradict each other.
    #[error("conflicting parameters: {0}")]
    Conflict(&'static str),
}

impl QosLimits {
    /// The rules between settings: the reservation must not exceed the limit, and a
    /// limited volume needs a burst greater than zero.
    pub fn check(&self) -> Result<(), QosError> {
        if let (Some(min), Some(max)) = (self.min_iops, self.max_iops) {
            if min > max {
                return Err(QosError::Conflict("minIOPS must not exceed maxIOPS"));
            }
        }
        let limited = self.max_iops.is_some() || self.max_bandwidth.is_some();
        if limited && self.burst_duration == Some(Duration::ZERO) {
            return Err(QosError::Conflict(
                "burstDuration must be greater than zero when maxIOPS or maxBandwidth is set",
            ));
        }
        Ok(())
    }

    /// Reads the normalised form from a record's parameters (`get` looks a key up),
    /// then [`Self::check`]s it. Other keys are ignored.
    pub fn from_record<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, QosError> {
        let count = |key: &'static str| -> Result<Option<u64>, QosError> {
            let Some(v) = get(key) else { return Ok(None) };
            let n = parse_uint(v).ok_or_else(|| QosError::InvalidValue {
                key,
                value: v.to_owned(),
                expected: "a non-negative integer",
            })?;
            Ok((n != 0).then_some(n))
        };
        let burst_duration = match get(KEY_BURST_DURATION) {
            None => None,
            Some(v) => Some(parse_duration(v).ok_or_else(|| QosError::InvalidValue {
                key: KEY_BURST_DURATION,
                value: v.to_owned(),
                expected: "a duration in milliseconds such as 1500ms",
            })?),
        };
        let qos = QosLimits {
            max_iops: count(KEY_MAX_IOPS)?,
            min_iops: count(KEY_MIN_IOPS)?,
            max_bandwidth: count(KEY_MAX_BANDWIDTH)?,
            burst_duration,
        };
        qos.check()?;
        Ok(qos)
    }

    /// The normalised form's entries: only set limits, as plain integers (bytes,
    /// milliseconds), so equal settings always produce equal records.
    pub fn record_entries(&self) -> impl Iterator<Item = (&'static str, String)> {
        [
            (KEY_MAX_IOPS, self.max_iops.map(|v| v.to_string())),
            (KEY_MIN_IOPS, self.min_iops.map(|v| v.to_string())),
            (KEY_MAX_BANDWIDTH, self.max_bandwidth.map(|v| v.to_string())),
            (
                KEY_BURST_DURATION,
                self.burst_duration.map(|d| format!("{}ms", d.as_millis())),
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(kv: &[(&str, &str)]) -> Result<QosLimits, QosError> {
        let m: BTreeMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        QosLimits::from_record(|k| m.get(k).map(String::as_str))
    }

    #[test]
    fn fs_names_round_trip() {
        for fs in FsType::ALL {
            assert_eq!(FsType::parse(fs.as_str()), Some(fs));
            assert_eq!(fs.to_string(), fs.as_str());
        }
        assert_eq!(FsType::parse("XFS"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("btrfs"), None);
        assert_eq!(FsType::default(), FsType::Ext4);
    }

    #[test]
    fn records_round_trip_and_zero_means_unlimited() {
        let q = QosLimits {
            max_iops: Some(100),
            min_iops: Some(10),
            max_bandwidth: Some(1 << 20),
            burst_duration: Some(Duration::from_millis(1500)),
        };
        let entries: Vec<(&str, String)> = q.record_entries().collect();
        let pairs: Vec<(&str, &str)> = entries.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(record(&pairs), Ok(q));
        assert_eq!(QosLimits::default().record_entries().count(), 0);
        assert_eq!(record(&[("maxIOPS", "0")]), Ok(QosLimits::default()));
        assert_eq!(
            record(&[("burstDuration", "2s")]).map(|q| q.burst_duration),
            Ok(Some(Duration::from_secs(2)))
        );
    }

    #[test]
    fn bad_records_name_the_key_or_the_rule() {
        let e = record(&[("maxIOPS", "-1")]).unwrap_err();
        assert!(e.to_string().contains("maxIOPS") && e.to_string().contains("-1"));
        assert!(matches!(
            record(&[("maxIOPS", "10"), ("minIOPS", "20")]),
            Err(QosError::Conflict("minIOPS must not exceed maxIOPS"))
        ));
        assert!(matches!(
            record(&[("maxBandwidth", "10"), ("burstDuration", "0ms")]),
            Err(QosError::Conflict(_))
        ));
        assert_eq!(
            record(&[("burstDuration", "0ms")]).map(|q| q.burst_duration),
            Ok(Some(Duration::ZERO))
        );
    }
}
