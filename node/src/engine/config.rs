//! What an engine needs to open a volume, and how it is read from the CSI
//! `publish_context` the controller hands out at ControllerPublishVolume.

use std::collections::HashMap;
use std::time::Duration;

/// `publish_context` key holding the fencing epoch (decimal `u64`).
pub const CTX_EPOCH: &str = "epoch";
/// `publish_context` key holding the replica set: `node_id=host:port,node_id=host:port`.
pub const CTX_REPLICAS: &str = "replicas";
/// `publish_context` key holding the volume size in bytes (decimal `u64`).
pub const CTX_SIZE_BYTES: &str = "sizeBytes";

/// Largest replica set an engine accepts. Per-operation replica sets are bitmasks of
/// this width, which keeps the per-I/O bookkeeping to a few atomic words.
pub const MAX_REPLICAS: usize = 32;

/// Default bound on one replica request (and on connecting at open).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default period of dirty-region cleaning while writes happen: what a new engine
/// reconciles after a crash is roughly what was written in the last two periods.
pub const DEFAULT_CLEAN_INTERVAL: Duration = Duration::from_secs(5);

/// One replica of the volume: which node holds it and where its data plane listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaEndpoint {
    /// Node the replica daemon runs on; compared with [`EngineConfig::local_node_id`]
    /// to prefer the local copy for reads, and shown in status.
    pub node_id: String,
    /// `host:port` of the replica daemon's data plane.
    pub data_address: String,
}

/// Everything [`super::Engine::open`] needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Volume id, sent to every replica at HELLO.
    pub volume_id: String,
    /// Fencing epoch this engine writes with (from ControllerPublishVolume). At most
    /// `tessera_replica_protocol::seq::MAX_EPOCH`, so its seqs can be encoded.
    pub epoch: u64,
    /// The whole replica set. A majority of *this* list (not of the replicas that
    /// happen to be reachable) must acknowledge every write.
    pub replicas: Vec<ReplicaEndpoint>,
    /// Node this engine runs on; the replica with the same node id is preferred for
    /// reads because it skips the network.
    pub local_node_id: String,
    /// Bound on each replica request; a replica that does not answer in time is
    /// marked stale. Also bounds connecting to each replica at open.
    pub request_timeout: Duration,
    /// Size the controller recorded for the volume, if known. When set, the replicas
    /// must report exactly this size at HELLO.
    pub expected_size: Option<u64>,
    /// How often, while writes happen and every replica is in sync, the replicas'
    /// dirty regions are cleaned (flush everywhere, then clear what every replica
    /// holds).
    pub clean_interval: Duration,
}

impl EngineConfig {
    /// A configuration with default timeouts and no expected size.
    pub fn new(
        volume_id: impl Into<String>,
        epoch: u64,
        replicas: Vec<ReplicaEndpoint>,
        local_node_id: impl Into<String>,
    ) -> Self {
        EngineConfig {
            volume_id: volume_id.into(),
            epoch,
            replicas,
            local_node_id: local_node_id.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            expected_size: None,
            clean_interval: DEFAULT_CLEAN_INTERVAL,
        }
    }

    /// Builds a configuration from the `publish_context` of ControllerPublishVolume
    /// (keys [`CTX_EPOCH`], [`CTX_REPLICAS`], [`CTX_SIZE_BYTES`]), so the node plugin
    /// does not parse the controller's format itself. Each malformed or missing key
    /// is reported by name.
    pub fn from_publish_context(
        volume_id: &str,
        ctx: &HashMap<String, String>,
        local_node_id: &str,
    ) -> Result<Self, ConfigError> {
        let get = |key: &'static str| ctx.get(key).ok_or(ConfigError::MissingKey { key });
        let epoch = parse_u64(CTX_EPOCH, get(CTX_EPOCH)?)?;
        let replicas = parse_replicas(get(CTX_REPLICAS)?)?;
        let size = parse_u64(CTX_SIZE_BYTES, get(CTX_SIZE_BYTES)?)?;
        let mut config = EngineConfig::new(volume_id, epoch, replicas, local_node_id);
        config.expected_size = Some(size);
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants [`super::Engine::open`] relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.volume_id.is_empty() {
            return Err(ConfigError::EmptyVolumeId);
        }
        if self.epoch > tessera_replica_protocol::seq::MAX_EPOCH {
            return Err(ConfigError::EpochTooLarge { epoch: self.epoch });
        }
        if self.replicas.is_empty() {
            return Err(ConfigError::NoReplicas);
        }
        if self.replicas.len() > MAX_REPLICAS {
            return Err(ConfigError::TooManyReplicas {
                count: self.replicas.len(),
            });
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if self.replicas[..i].iter().any(|o| o.node_id == r.node_id) {
                return Err(ConfigError::DuplicateReplica {
                    node_id: r.node_id.clone(),
                });
            }
        }
        if self.request_timeout.is_zero() || self.clean_interval.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

fn parse_u64(key: &'static str, value: &str) -> Result<u64, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::InvalidValue {
        key,
        value: value.to_owned(),
        expected: "a decimal unsigned integer",
    })
}

/// Parses `node_id=host:port,node_id=host:port`. The node id ends at the first `=`,
/// so addresses may contain any character but `,` (IPv6 `[::1]:7000` works).
fn parse_replicas(value: &str) -> Result<Vec<ReplicaEndpoint>, ConfigError> {
    let invalid = || ConfigError::InvalidValue {
        key: CTX_REPLICAS,
        value: value.to_owned(),
        expected: "a comma-separated list of node_id=host:port",
    };
    let mut out = Vec::new();
    for entry in value.split(',') {
        let (node_id, addr) = entry.trim().split_once('=').ok_or_else(invalid)?;
        let (node_id, addr) = (node_id.trim(), addr.trim());
        // The port must be the part after the last colon and parse as a u16.
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if node_id.is_empty() || !port_ok {
            return Err(invalid());
        }
        out.push(ReplicaEndpoint {
            node_id: node_id.to_owned(),
            data_address: addr.to_owned(),
        });
    }
    Ok(out)
}

/// Why an [`EngineConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required `publish_context` key is absent.
    #[error("publish_context has no {key:?} key")]
    MissingKey {
        /// The missing key.
        key: &'static str,
    },
    /// A `publish_context` value does not parse.
    #[error("publish_context value {value:?} of key {key:?} is not {expected}")]
    InvalidValue {
        /// The key whose value is wrong.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What the value should look like.
        expected: &'static str,
    },
    /// The volume id is empty.
    #[error("volume id is empty")]
    EmptyVolumeId,
    /// The epoch does not fit the 24 bits left above the 40-bit write counter.
    #[error("epoch {epoch} does not fit in 24 bits")]
    EpochTooLarge {
        /// The epoch given.
        epoch: u64,
    },
    /// The replica list is empty.
    #[error("replica list is empty")]
    NoReplicas,
    /// More replicas than [`MAX_REPLICAS`].
    #[error("{count} replicas given, at most {MAX_REPLICAS} supported")]
    TooManyReplicas {
        /// How many were given.
        count: usize,
    },
    /// Two replicas share a node id, which would make the majority meaningless.
    #[error("node {node_id:?} appears twice in the replica list")]
    DuplicateReplica {
        /// The repeated node id.
        node_id: String,
    },
    /// `request_timeout` (which would fail every request) or `clean_interval` is zero.
    #[error("request timeout or clean interval is zero")]
    ZeroTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_controllers_publish_context() {
        let c = EngineConfig::from_publish_context(
            "vol-1",
            &ctx(&[
                ("epoch", "7"),
                ("replicas", "n1=10.0.0.1:7001, n2=[::1]:7002,n3=host:7003"),
                ("sizeBytes", "1073741824"),
            ]),
            "n2",
        )
        .unwrap();
        assert_eq!(c.epoch, 7);
        assert_eq!(c.expected_size, Some(1 << 30));
        assert_eq!(c.local_node_id, "n2");
        assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        let addrs: Vec<_> = c.replicas.iter().map(|r| r.data_address.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.1:7001", "[::1]:7002", "host:7003"]);
        assert_eq!(c.replicas[1].node_id, "n2");
    }

    #[test]
    fn names_the_bad_key() {
        let base = [("epoch", "1"), ("replicas", "a=h:1"), ("sizeBytes", "4096")];
        for missing in ["epoch", "replicas", "sizeBytes"] {
            let m: Vec<_> = base
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = EngineConfig::from_publish_context("v", &ctx(&m), "a").unwrap_err();
            assert_eq!(err, ConfigError::MissingKey { key: missing }, "{missing}");
            assert!(err.to_string().contains(missing));
        }
        for (key, bad) in [
            ("epoch", "-1"),
            ("sizeBytes", "1Gi"),
            ("replicas", "a"),
            ("replicas", "=h:1"),
            ("replicas", "a=h"),
            ("replicas", "a=h:99999"),
            ("replicas", "a=:1"),
            ("replicas", "a=h:1,,b=h:2"),
        ] {
            let m: Vec<_> = base
                .iter()
                .map(|&(k, v)| if k == key { (k, bad) } else { (k, v) })
                .collect();
            let err = EngineConfig::from_publish_context("v", &ctx(&m), "a").unwrap_err();
            assert!(
                matches!(&err, ConfigError::InvalidValue { key: k, value, .. } if *k == key && value == bad),
                "{key}={bad}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_unusable_sets() {
        let ep = |n: &str| ReplicaEndpoint {
            node_id: n.into(),
            data_address: "h:1".into(),
        };
        let mut c = EngineConfig::new("v", 1, vec![ep("a"), ep("a")], "a");
        assert_eq!(
            c.validate(),
            Err(ConfigError::DuplicateReplica {
                node_id: "a".into()
            })
        );
        c.replicas = vec![];
        assert_eq!(c.validate(), Err(ConfigError::NoReplicas));
        c.replicas = vec![ep("a")];
        let max = tessera_replica_protocol::seq::MAX_EPOCH;
        c.epoch = max + 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::EpochTooLarge { epoch: max + 1 })
        );
        c.epoch = max;
        assert_eq!(c.validate(), Ok(()));
        c.request_timeout = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroTimeout));
    }
}
