//! A volume's [`Qos`] from the parameters stored in its record.
//!
//! The normalised form and its rules are the protocol's
//! ([`tessera_replica_protocol::volume_params`]): the controller writes it, this reads
//! it back. Other keys (`fsType`, `replicationFactor`, ...) are not QoS and are
//! ignored. Every error names the key and the value, so a record that cannot be
//! applied is reported precisely where it is handled (the catalog).

use std::collections::BTreeMap;

pub use tessera_replica_protocol::volume_params::QosError;
use tessera_replica_protocol::volume_params::QosLimits;

use super::Qos;

/// Parses the QoS keys of a record's parameters; absent keys and zero limits mean
/// unlimited, an absent or zero `burstDuration` keeps the default burst of
/// [`Qos::unlimited`].
pub fn qos_from_parameters(params: &BTreeMap<String, String>) -> Result<Qos, QosError> {
    let limits = QosLimits::from_record(|k| params.get(k).map(String::as_str))?;
    let mut qos = Qos::unlimited();
    qos.max_iops = limits.max_iops;
    qos.min_iops = limits.min_iops;
    qos.max_bandwidth = limits.max_bandwidth;
    if let Some(burst) = limits.burst_duration.filter(|b| !b.is_zero()) {
        qos.burst_duration = burst;
    }
    Ok(qos)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        let q = qos_from_parameters(&map(&[("burstDuration", "0ms")])).expect("zero burst");
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
            Err(QosError::Conflict(_))
        ));
        assert!(matches!(
            qos_from_parameters(&map(&[("maxIOPS", "5"), ("burstDuration", "0ms")])),
            Err(QosError::Conflict(_))
        ));
    }
}
