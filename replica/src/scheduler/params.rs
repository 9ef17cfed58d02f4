//! A volume's [`Qos`] from the parameters stored in its record.
//!
//! The controller validates StorageClass (and VolumeAttributesClass) parameters and
//! stores them normalised: `maxIOPS`, `minIOPS` and `maxBandwidth` as plain integers
//! (bytes per second for the bandwidth), `burstDuration` as `<N>ms`, and a limit of 0
//! or an absent key meaning "unlimited". This module reads exactly that form back, and
//! for robustness also the unit-less forms an operator might write by hand into a
//! record (`burstDuration` as `<N>s`). Other keys (`fsType`, `replicationFactor`, ...)
//! are not QoS and are ignored.
//!
//! Every error names the key and the value, so a record that cannot be applied is
//! reported precisely where it is handled (the catalog).

use std::collections::BTreeMap;
use std::time::Duration;

use super::Qos;

/// Record key: IOPS limit.
pub const KEY_MAX_IOPS: &str = "maxIOPS";
/// Record key: IOPS reservation.
pub const KEY_MIN_IOPS: &str = "minIOPS";
/// Record key: bandwidth limit in bytes per second.
pub const KEY_MAX_BANDWIDTH: &str = "maxBandwidth";
/// Record key: burst allowance, `<N>ms`.
pub const KEY_BURST_DURATION: &str = "burstDuration";

/// Why a record's parameters do not give a valid [`Qos`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosParamError {
    /// A QoS key whose value does not parse.
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

/// Parses the QoS keys of a record's parameters; absent keys and zero limits mean
/// unlimited, an absent `burstDuration` keeps the default burst of [`Qos::unlimited`].
pub fn qos_from_parameters(params: &BTreeMap<String, String>) -> Result<Qos, QosParamError> {
    let mut qos = Qos::unlimited();
    if let Some(v) = params.get(KEY_MAX_IOPS) {
        qos.max_iops = nonzero(parse_uint(v).ok_or_else(|| integer(KEY_MAX_IOPS, v))?);
    }
    if let Some(v) = params.get(KEY_MIN_IOPS) {
        qos.min_iops = nonzero(parse_uint(v).ok_or_else(|| integer(KEY_MIN_IOPS, v))?);
    }
    if let Some(v) = params.get(KEY_MAX_BANDWIDTH) {
        qos.max_bandwidth = nonzero(parse_uint(v).ok_or_else(|| integer(KEY_MAX_BANDWIDTH, v))?);
    }
    if let Some(v) = params.get(KEY_BURST_DURATION) {
        let burst = parse_burst(v).ok_or_else(|| QosParamError::InvalidValue {
            key: KEY_BURST_DURATION,
            value: v.clone(),
            expected: "a duration in milliseconds such as 1500ms",
        })?;
        let limited = qos.max_iops.is_some() || qos.max_bandwidth.is_some();
        if burst.is_zero() && limited {
            return Err(QosParamError::Conflict(
                "burstDuration must be greater than zero when maxIOPS or maxBandwidth is set",
            ));
        }
        if !burst.is_zero() {
            qos.burst_duration = burst;
        }
    }
    if let (Some(min), Some(max)) = (qos.min_iops, qos.max_iops) {
        if min > max {
            return Err(QosParamError::Conflict("minIOPS must not exceed maxIOPS"));
        }
    }
    Ok(qos)
}

fn integer(key: &'static str, value: &str) -> QosParamError {
    QosParamError::InvalidValue {
        key,
        value: value.to_string(),
        expected: "a non-negative integer",
    }
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// Digits only: no sign, no blanks, not empty.
fn parse_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `<N>ms` (the stored form) or `<N>s`.
fn parse_burst(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return parse_uint(ms).map(Duration::from_millis);
    }
    s.strip_suffix('s')
        .and_then(parse_uint)
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn normalised_record_parameters_parse() {
        let q = qos_from_parameters(&map(&[
            ("maxIOPS", "1000"),
            ("minIOPS", "100"),
            ("maxBandwidth", "104857600"),
            ("burstDuration", "1500ms"),
            ("fsType", "ext4"),
            ("replicationFactor", "3"),
        ]))
        .expect("valid");
        assert_eq!(q.max_iops, Some(1000));
        assert_eq!(q.min_iops, Some(100));
        assert_eq!(q.max_bandwidth, Some(100 << 20));
        assert_eq!(q.burst_duration, Duration::from_millis(1500));
        assert!(q.validate().is_ok());
    }

    #[test]
    fn absent_and_zero_mean_unlimited() {
        assert_eq!(
            qos_from_parameters(&BTreeMap::new()).expect("empty"),
            Qos::unlimited()
        );
        let q =
            qos_from_parameters(&map(&[("maxIOPS", "0"), ("maxBandwidth", "0")])).expect("zeros");
        assert_eq!(q, Qos::unlimited());
        let q = qos_from_parameters(&map(&[("burstDuration", "2s")])).expect("seconds");
        assert_eq!(q.burst_duration, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_key_and_value() {
        for (k, v) in [
            ("maxIOPS", "-1"),
            ("maxIOPS", "1k"),
            ("minIOPS", ""),
            ("maxBandwidth", "1Mi"),
            ("burstDuration", "1.5s"),
            ("burstDuration", "soon"),
        ] {
            let err = qos_from_parameters(&map(&[(k, v)])).expect_err(k);
            let msg = err.to_string();
            assert!(msg.contains(k) && msg.contains(v), "{msg}");
        }
        assert!(matches!(
            qos_from_parameters(&map(&[("minIOPS", "10"), ("maxIOPS", "5")])),
            Err(QosParamError::Conflict(_))
        ));
        assert!(matches!(
            qos_from_parameters(&map(&[("maxIOPS", "5"), ("burstDuration", "0ms")])),
            Err(QosParamError::Conflict(_))
        ));
    }
}
