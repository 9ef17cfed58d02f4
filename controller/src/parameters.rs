//! StorageClass parameters: parsing, validation and the normalised form stored in
//! volume records.
//!
//! Users write parameters by hand in a StorageClass, so every key and value is checked
//! here once, at CreateVolume / GetCapacity time, and turned into [`VolumeParameters`].
//! The normalised map ([`VolumeParameters::to_map`]) is what the volume record and the
//! volume context carry, and what an idempotent CreateVolume retry is compared against,
//! so two spellings of the same setting (`"1Mi"` and `"1048576"`) are the same volume.

use std::collections::{BTreeMap, HashMap};

use tessera_replica_protocol::units::{parse_duration, parse_size, parse_uint};
use tessera_replica_protocol::volume_params::QosError;
pub use tessera_replica_protocol::volume_params::{
    FsType, QosLimits, CSI_METADATA_PREFIX, KEY_BURST_DURATION, KEY_CHECKSUM, KEY_DATA_LOCALITY,
    KEY_FS_TYPE, KEY_MAX_BANDWIDTH, KEY_MAX_IOPS, KEY_MIN_IOPS, KEY_REPLICATION_FACTOR,
};

/// Largest replication factor accepted; more replicas than this only cost latency.
pub const MAX_REPLICATION_FACTOR: u32 = 7;
/// Replication factor used when the StorageClass does not set one.
pub const DEFAULT_REPLICATION_FACTOR: u32 = 3;

/// Why a parameter map was rejected; always names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    /// A key Tessera does not know (typo or a parameter of another driver).
    #[error("unknown parameter {key:?}")]
    UnknownKey {
        /// The key as given.
        key: String,
    },
    /// A known key with a value that does not parse or is out of range.
    #[error("invalid value {value:?} for parameter {key:?}: {reason}")]
    InvalidValue {
        /// The key as given.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What is expected instead.
        reason: &'static str,
    },
    /// Two parameters that are each valid but contradict each other.
    #[error("conflicting parameters: {0}")]
    Conflict(&'static str),
    /// A known parameter that ControllerModifyVolume (or a VolumeAttributesClass)
    /// cannot change.
    #[error("parameter {key:?} cannot be modified; mutable parameters are maxIOPS, minIOPS, maxBandwidth and burstDuration")]
    NotMutable {
        /// The key as given.
        key: String,
    },
}

/// Keys a live volume's parameters may change (ControllerModifyVolume,
/// VolumeAttributesClass): the QoS settings, which the replica daemons apply to the
/// volume's I/O scheduler without detaching it. Everything else decides where and how
/// the data is laid out.
pub const MUTABLE_KEYS: [&str; 4] = [
    KEY_MAX_IOPS,
    KEY_MIN_IOPS,
    KEY_MAX_BANDWIDTH,
    KEY_BURST_DURATION,
];

const KNOWN_KEYS: [&str; 8] = [
    KEY_REPLICATION_FACTOR,
    KEY_FS_TYPE,
    KEY_MAX_IOPS,
    KEY_MIN_IOPS,
    KEY_MAX_BANDWIDTH,
    KEY_BURST_DURATION,
    KEY_CHECKSUM,
    KEY_DATA_LOCALITY,
];

/// Checks that a set of mutable parameters names only [`MUTABLE_KEYS`] and that each
/// value parses on its own (conflicts with the volume's other settings are found by
/// [`apply_mutable`]). The first offending key in key order is named.
pub fn check_mutable(changes: &HashMap<String, String>) -> Result<(), ParameterError> {
    let sorted: BTreeMap<&String, &String> = changes.iter().collect();
    for (key, value) in sorted {
        if !MUTABLE_KEYS.contains(&key.as_str()) {
            return Err(if KNOWN_KEYS.contains(&key.as_str()) {
                ParameterError::NotMutable { key: key.clone() }
            } else {
                ParameterError::UnknownKey { key: key.clone() }
            });
        }
        VolumeParameters::parse(&HashMap::from([(key.clone(), value.clone())]))?;
    }
    Ok(())
}

/// The normalised parameters of a volume after `changes` (mutable keys only) are
/// applied to its stored normalised parameters `stored`. Keys absent from `changes`
/// keep their values; a limit of 0 removes it. Fails without side effects when a key
/// is not mutable, a value is invalid, or the result contradicts itself (minIOPS above
/// maxIOPS, a zero burst with a limit).
pub fn apply_mutable(
    stored: &HashMap<String, String>,
    changes: &HashMap<String, String>,
) -> Result<HashMap<String, String>, ParameterError> {
    check_mutable(changes)?;
    let mut merged = stored.clone();
    merged.extend(changes.iter().map(|(k, v)| (k.clone(), v.clone())));
    let params = VolumeParameters::parse(&merged)?;
    let fs_type = params.fs_type.unwrap_or_default();
    Ok(params.to_map(fs_type))
}

/// Whether placement tries to put a replica on the node that will use the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataLocality {
    /// Pure hash placement.
    #[default]
    Disabled,
    /// One replica on the first preferred node when a daemon there fits.
    BestEffort,
}

impl DataLocality {
    fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::BestEffort => "best-effort",
        }
    }
}

/// Validated StorageClass parameters of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParameters {
    /// Number of replicas, 1..=7.
    pub replication_factor: u32,
    /// Filesystem if the StorageClass named one; `None` lets the mount capability or
    /// the default decide.
    pub fs_type: Option<FsType>,
    /// QoS limits (unlimited when unset).
    pub qos: QosLimits,
    /// Data locality preference.
    pub data_locality: DataLocality,
}

impl Default for VolumeParameters {
    fn default() -> Self {
        Self {
            replication_factor: DEFAULT_REPLICATION_FACTOR,
            fs_type: None,
            qos: QosLimits::default(),
            data_locality: DataLocality::Disabled,
        }
    }
}

impl VolumeParameters {
    /// Parses and validates a CreateVolume / GetCapacity parameter map.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, ParameterError> {
        let mut p = Self::default();
        // Sorted so the error for a map with several bad keys is deterministic.
        let sorted: BTreeMap<&String, &String> = params.iter().collect();
        for (key, value) in sorted {
            let v = value.as_str();
            match key.as_str() {
                KEY_REPLICATION_FACTOR => {
                    let rf = parse_uint(v)
                        .filter(|rf| (1..=u64::from(MAX_REPLICATION_FACTOR)).contains(rf));
                    let rf = rf.ok_or_else(|| {
                        invalid(KEY_REPLICATION_FACTOR, v, "an integer from 1 to 7")
                    })?;
                    // In range 1..=7 checked above.
                    p.replication_factor = rf as u32;
                }
                KEY_FS_TYPE => {
                    p.fs_type = Some(
                        FsType::parse(v).ok_or_else(|| invalid(KEY_FS_TYPE, v, "ext4 or xfs"))?,
                    );
                }
                KEY_MAX_IOPS => {
                    p.qos.max_iops = nonzero(
                        parse_uint(v)
                            .ok_or_else(|| invalid(KEY_MAX_IOPS, v, "a non-negative integer"))?,
                    );
                }
                KEY_MIN_IOPS => {
                    p.qos.min_iops = nonzero(
                        parse_uint(v)
                            .ok_or_else(|| invalid(KEY_MIN_IOPS, v, "a non-negative integer"))?,
                    );
                }
                KEY_MAX_BANDWIDTH => {
                    let bw = parse_size(v).map_err(|_| {
                        invalid(KEY_MAX_BANDWIDTH, v, "bytes per second, an integer with optional K, M, G, T, Ki, Mi, Gi or Ti suffix")
                    })?;
                    p.qos.max_bandwidth = nonzero(bw);
                }
                KEY_BURST_DURATION => {
                    p.qos.burst_duration = Some(parse_duration(v).ok_or_else(|| {
                        invalid(KEY_BURST_DURATION, v, "a duration such as 500ms, 2s or 1m")
                    })?);
                }
                KEY_CHECKSUM => {
                    if v != "crc32c" {
                        return Err(invalid(KEY_CHECKSUM, v, "crc32c"));
                    }
                }
                KEY_DATA_LOCALITY => {
                    p.data_locality = match v {
                        "disabled" => DataLocality::Disabled,
                        "best-effort" => DataLocality::BestEffort,
                        _ => return Err(invalid(KEY_DATA_LOCALITY, v, "disabled or best-effort")),
                    };
                }
                k if k.starts_with(CSI_METADATA_PREFIX) => {}
                k => return Err(ParameterError::UnknownKey { key: k.to_string() }),
            }
        }
        p.qos.check().map_err(|e| match e {
            QosError::Conflict(rule) => ParameterError::Conflict(rule),
            // Values were parsed above; `check` only compares them.
            QosError::InvalidValue {
                key,
                value,
                expected,
            } => ParameterError::InvalidValue {
                key,
                value,
                reason: expected,
            },
        })?;
        Ok(p)
    }

    /// The normalised map stored in the volume record and volume context.
    ///
    /// `fs_type` is the effective filesystem (see [`VolumeParameters::fs_type`]); only
    /// set limits appear, as plain integers (bytes, milliseconds), so equal settings
    /// always produce equal maps.
    pub fn to_map(&self, fs_type: FsType) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(
            KEY_REPLICATION_FACTOR.to_string(),
            self.replication_factor.to_string(),
        );
        m.insert(KEY_FS_TYPE.to_string(), fs_type.as_str().to_string());
        m.insert(KEY_CHECKSUM.to_string(), "crc32c".to_string());
        m.insert(
            KEY_DATA_LOCALITY.to_string(),
            self.data_locality.as_str().to_string(),
        );
        m.extend(self.qos.record_entries().map(|(k, v)| (k.to_string(), v)));
        m
    }
}

fn invalid(key: &'static str, value: &str, reason: &'static str) -> ParameterError {
    ParameterError::InvalidValue {
        key,
        value: value.to_string(),
        reason,
    }
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_map_gives_defaults() {
        let p = VolumeParameters::parse(&HashMap::new()).unwrap();
        assert_eq!(p, VolumeParameters::default());
        assert_eq!(p.replication_factor, 3);
        let m = p.to_map(FsType::Ext4);
        assert_eq!(m.get("fsType").map(String::as_str), Some("ext4"));
        assert_eq!(m.get("replicationFactor").map(String::as_str), Some("3"));
        assert!(!m.contains_key("maxIOPS"));
    }

    #[test]
    fn all_keys_parse() {
        let p = VolumeParameters::parse(&map(&[
            ("replicationFactor", "5"),
            ("fsType", "xfs"),
            ("maxIOPS", "1000"),
            ("minIOPS", "100"),
            ("maxBandwidth", "100Mi"),
            ("burstDuration", "1s500ms"),
            ("checksum", "crc32c"),
            ("dataLocality", "best-effort"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.replication_factor, 5);
        assert_eq!(p.fs_type, Some(FsType::Xfs));
        assert_eq!(p.qos.max_iops, Some(1000));
        assert_eq!(p.qos.min_iops, Some(100));
        assert_eq!(p.qos.max_bandwidth, Some(100 << 20));
        assert_eq!(p.qos.burst_duration, Some(Duration::from_millis(1500)));
        assert_eq!(p.data_locality, DataLocality::BestEffort);
        let m = p.to_map(FsType::Xfs);
        assert_eq!(m.get("maxBandwidth").map(String::as_str), Some("104857600"));
        assert_eq!(m.get("burstDuration").map(String::as_str), Some("1500ms"));
        assert!(m.keys().all(|k| !k.starts_with(CSI_METADATA_PREFIX)));
    }

    #[test]
    fn equal_settings_normalise_equal() {
        let a = VolumeParameters::parse(&map(&[
            ("maxBandwidth", "1Mi"),
            ("burstDuration", "1s"),
            ("maxIOPS", "0"),
        ]))
        .unwrap();
        let b = VolumeParameters::parse(&map(&[
            ("maxBandwidth", "1048576"),
            ("burstDuration", "1000ms"),
        ]))
        .unwrap();
        assert_eq!(a.to_map(FsType::Ext4), b.to_map(FsType::Ext4));
    }

    #[test]
    fn replication_factor_bounds() {
        for bad in [
            "0",
            "8",
            "-1",
            "+3",
            "three",
            "",
            " 3",
            "99999999999999999999999",
        ] {
            let err = VolumeParameters::parse(&map(&[("replicationFactor", bad)])).unwrap_err();
            assert!(
                matches!(
                    err,
                    ParameterError::InvalidValue {
                        key: "replicationFactor",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("replicationFactor"));
        }
        for good in 1..=7 {
            let p =
                VolumeParameters::parse(&map(&[("replicationFactor", &good.to_string())])).unwrap();
            assert_eq!(p.replication_factor, good);
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = VolumeParameters::parse(&map(&[("replicas", "3")])).unwrap_err();
        assert_eq!(
            err,
            ParameterError::UnknownKey {
                key: "replicas".into()
            }
        );
        assert!(err.to_string().contains("replicas"));
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        let cases = [
            ("fsType", "btrfs"),
            ("maxIOPS", "-5"),
            ("minIOPS", "1.5"),
            ("maxBandwidth", "10Xi"),
            ("maxBandwidth", "Mi"),
            ("maxBandwidth", "99999999999Ti"),
            ("burstDuration", "5"),
            ("burstDuration", "1.5s"),
            ("burstDuration", "ms"),
            ("checksum", "md5"),
            ("dataLocality", "strict"),
        ];
        for (k, v) in cases {
            let err = VolumeParameters::parse(&map(&[(k, v)])).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(k) && msg.contains(v), "{k}={v}: {msg}");
        }
    }

    #[test]
    fn min_iops_above_max_is_rejected() {
        let err =
            VolumeParameters::parse(&map(&[("minIOPS", "200"), ("maxIOPS", "100")])).unwrap_err();
        assert!(matches!(err, ParameterError::Conflict(_)));
        // Unlimited max (0) does not bound min.
        assert!(VolumeParameters::parse(&map(&[("minIOPS", "200"), ("maxIOPS", "0")])).is_ok());
        assert!(VolumeParameters::parse(&map(&[("minIOPS", "100"), ("maxIOPS", "100")])).is_ok());
    }

    #[test]
    fn zero_burst_with_limit_is_rejected() {
        assert!(
            VolumeParameters::parse(&map(&[("burstDuration", "0s"), ("maxIOPS", "10")])).is_err()
        );
        assert!(
            VolumeParameters::parse(&map(&[("burstDuration", "0ms"), ("maxBandwidth", "1M")]))
                .is_err()
        );
        assert!(VolumeParameters::parse(&map(&[("burstDuration", "0s")])).is_ok());
        assert!(
            VolumeParameters::parse(&map(&[("burstDuration", "2m"), ("maxIOPS", "10")])).is_ok()
        );
    }

    #[test]
    fn mutable_parameters_merge_and_normalise() {
        let stored = VolumeParameters::parse(&map(&[("maxIOPS", "100"), ("fsType", "xfs")]))
            .unwrap()
            .to_map(FsType::Xfs);
        let out = apply_mutable(
            &stored,
            &map(&[("maxBandwidth", "1Mi"), ("burstDuration", "2s")]),
        )
        .unwrap();
        assert_eq!(out.get("maxIOPS").map(String::as_str), Some("100"), "kept");
        assert_eq!(out.get("maxBandwidth").map(String::as_str), Some("1048576"));
        assert_eq!(out.get("burstDuration").map(String::as_str), Some("2000ms"));
        assert_eq!(out.get("fsType").map(String::as_str), Some("xfs"));
        let unlimited = apply_mutable(&out, &map(&[("maxIOPS", "0")])).unwrap();
        assert!(!unlimited.contains_key("maxIOPS"), "0 removes the limit");
        // Idempotent: applying the same change again gives the same map.
        assert_eq!(
            apply_mutable(&unlimited, &map(&[("maxIOPS", "0")])).unwrap(),
            unlimited
        );
    }

    #[test]
    fn immutable_unknown_and_invalid_mutable_parameters_are_named() {
        let stored = VolumeParameters::default().to_map(FsType::Ext4);
        let err = apply_mutable(&stored, &map(&[("replicationFactor", "5")])).unwrap_err();
        assert_eq!(
            err,
            ParameterError::NotMutable {
                key: "replicationFactor".into()
            }
        );
        assert!(err.to_string().contains("replicationFactor"));
        let err = apply_mutable(&stored, &map(&[("iops", "5")])).unwrap_err();
        assert!(matches!(err, ParameterError::UnknownKey { .. }));
        assert!(err.to_string().contains("iops"));
        let err = apply_mutable(&stored, &map(&[("maxIOPS", "-5")])).unwrap_err();
        assert!(err.to_string().contains("maxIOPS") && err.to_string().contains("-5"));
        // Valid alone, conflicting with what is stored.
        let capped = apply_mutable(&stored, &map(&[("maxIOPS", "100")])).unwrap();
        assert!(matches!(
            apply_mutable(&capped, &map(&[("minIOPS", "200")])),
            Err(ParameterError::Conflict(_))
        ));
        assert!(matches!(
            apply_mutable(&capped, &map(&[("burstDuration", "0ms")])),
            Err(ParameterError::Conflict(_))
        ));
    }
}
