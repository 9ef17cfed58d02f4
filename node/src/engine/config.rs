//! What an engine needs to open a volume, built from the CSI `publish_context` the
//! controller hands out at ControllerPublishVolume (whose format is the protocol
//! crate's [`PublishContext`]).

use std::collections::HashMap;
use std::time::Duration;
use tessera_tls::Transport;

pub use tessera_replica_protocol::publish_context::ReplicaEndpoint;
use tessera_replica_protocol::publish_context::{PublishContext, PublishContextError};
use tessera_replica_protocol::seq::Epoch;

/// Largest replica set an engine accepts. Per-operation replica sets are bitmasks of
/// this width, which keeps the per-I/O bookkeeping to a few atomic words.
pub const MAX_REPLICAS: usize = 32;

/// Default bound on one replica request (and on connecting at open).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default first wait before reconnecting a replica that dropped; it doubles after
/// every failed attempt up to [`MAX_RECONNECT_INTERVAL`].
pub const DEFAULT_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between two reconnection attempts of one replica: what a daemon that
/// comes back may wait to be noticed (an attempt at a daemon that is down is one
/// refused or timed-out connect, cheap next to a replica missing for longer).
pub const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(5);
/// Default period of dirty-region cleaning while writes happen: what a new engine
/// reconciles after a crash is roughly what was written in the last two periods.
pub const DEFAULT_CLEAN_INTERVAL: Duration = Duration::from_secs(5);
/// Default period of asking the in-sync replicas for the replica set: how long an
/// attached engine may keep writing to a replica the controller already replaced
/// (and without the replacement's redundancy) before it learns the change.
pub const DEFAULT_REPLICA_SET_POLL: Duration = Duration::from_secs(10);

/// Everything [`super::Engine::open`] needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Volume id, sent to every replica at HELLO.
    pub volume_id: String,
    /// Fencing epoch this engine writes with (from ControllerPublishVolume).
    pub epoch: Epoch,
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
    /// First wait before reconnecting a replica that dropped (then doubling, up to
    /// [`MAX_RECONNECT_INTERVAL`]).
    pub reconnect_interval: Duration,
    /// How often the in-sync replicas are asked for the volume's replica set, so a
    /// member the controller replaced is replaced in the engine too.
    pub replica_set_poll: Duration,
    /// How replicas are dialled: TLS with the node's certificate, or plain text (the
    /// default of [`EngineConfig::new`], for in-process tests; the engine-host sets
    /// what its flags chose).
    pub transport: Transport,
}

impl EngineConfig {
    /// A configuration with default timeouts and no expected size.
    pub fn new(
        volume_id: impl Into<String>,
        epoch: Epoch,
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
            reconnect_interval: DEFAULT_RECONNECT_INTERVAL,
            replica_set_poll: DEFAULT_REPLICA_SET_POLL,
            transport: Transport::plaintext(),
        }
    }

    /// Builds a configuration from the `publish_context` of ControllerPublishVolume.
    /// Each malformed or missing key is reported by name.
    pub fn from_publish_context(
        volume_id: &str,
        ctx: &HashMap<String, String>,
        local_node_id: &str,
    ) -> Result<Self, ConfigError> {
        let ctx = PublishContext::try_from(ctx)?;
        let mut config = EngineConfig::new(volume_id, ctx.epoch, ctx.replicas, local_node_id);
        config.expected_size = Some(ctx.size_bytes);
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants [`super::Engine::open`] relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.volume_id.is_empty() {
            return Err(ConfigError::EmptyVolumeId);
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
        if self.request_timeout.is_zero()
            || self.clean_interval.is_zero()
            || self.reconnect_interval.is_zero()
            || self.replica_set_poll.is_zero()
        {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

/// Why an [`EngineConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The `publish_context` lacks a key or holds a malformed value.
    #[error(transparent)]
    PublishContext(#[from] PublishContextError),
    /// The volume id is empty.
    #[error("volume id is empty")]
    EmptyVolumeId,
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
    /// `request_timeout` (which would fail every request), `clean_interval`,
    /// `reconnect_interval` or `replica_set_poll` is zero.
    #[error("request timeout, clean interval, reconnect interval or replica-set poll is zero")]
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
        assert_eq!(c.epoch.get(), 7);
        assert_eq!(c.expected_size, Some(1 << 30));
        assert_eq!(c.local_node_id, "n2");
        assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        let addrs: Vec<_> = c.replicas.iter().map(|r| r.data_address.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.1:7001", "[::1]:7002", "host:7003"]);
        assert_eq!(c.replicas[1].node_id, "n2");
    }

    #[test]
    fn a_bad_publish_context_names_its_key() {
        let err =
            EngineConfig::from_publish_context("v", &ctx(&[("epoch", "1")]), "a").unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::PublishContext(PublishContextError::MissingKey { key: "replicas" })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_unusable_sets() {
        let ep = |n: &str| ReplicaEndpoint {
            node_id: n.into(),
            data_address: "h:1".into(),
        };
        let one = Epoch::new(1).unwrap();
        let mut c = EngineConfig::new("v", one, vec![ep("a"), ep("a")], "a");
        assert_eq!(
            c.validate(),
            Err(ConfigError::DuplicateReplica {
                node_id: "a".into()
            })
        );
        c.replicas = vec![];
        assert_eq!(c.validate(), Err(ConfigError::NoReplicas));
        c.replicas = vec![ep("a")];
        assert_eq!(c.validate(), Ok(()));
        c.request_timeout = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroTimeout));
        c.request_timeout = DEFAULT_REQUEST_TIMEOUT;
        c.replica_set_poll = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroTimeout));
    }
}
