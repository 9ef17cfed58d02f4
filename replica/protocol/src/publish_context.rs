//! The `publish_context` ControllerPublishVolume hands to the node: which replicas an
//! engine writes to, at which fencing epoch, and the size the controller recorded.
//! The controller writes it ([`PublishContext::to_map`]), the node reads it
//! (`TryFrom<&HashMap>`); the keys and their formats live only here.

use std::collections::HashMap;

use crate::seq::Epoch;

/// Key of the fencing epoch (decimal).
pub const KEY_EPOCH: &str = "epoch";
/// Key of the replica set: `node_id=host:port,node_id=host:port`, in record order.
pub const KEY_REPLICAS: &str = "replicas";
/// Key of the volume size in bytes (decimal).
pub const KEY_SIZE_BYTES: &str = "sizeBytes";

/// One replica of the volume: which node holds it and where its data plane listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaEndpoint {
    /// Node the replica daemon runs on.
    pub node_id: String,
    /// `host:port` of the replica daemon's data plane.
    pub data_address: String,
}

/// What an engine needs from the controller to open a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishContext {
    /// The epoch the engine writes with; the publish raised every replica to it.
    pub epoch: Epoch,
    /// The whole replica set.
    pub replicas: Vec<ReplicaEndpoint>,
    /// Size the controller recorded; replicas must report exactly this at HELLO.
    pub size_bytes: u64,
}

/// Why a `publish_context` map is unusable; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishContextError {
    /// A required key is absent.
    #[error("publish_context has no {key:?} key")]
    MissingKey {
        /// The missing key.
        key: &'static str,
    },
    /// A value does not parse.
    #[error("publish_context value {value:?} of key {key:?} is not {expected}")]
    InvalidValue {
        /// The key whose value is wrong.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What the value should look like.
        expected: &'static str,
    },
}

impl PublishContext {
    /// The map handed to the CO.
    pub fn to_map(&self) -> HashMap<String, String> {
        let list: Vec<String> = self
            .replicas
            .iter()
            .map(|r| format!("{}={}", r.node_id, r.data_address))
            .collect();
        HashMap::from([
            (KEY_EPOCH.to_string(), self.epoch.to_string()),
            (KEY_REPLICAS.to_string(), list.join(",")),
            (KEY_SIZE_BYTES.to_string(), self.size_bytes.to_string()),
        ])
    }
}

impl TryFrom<&HashMap<String, String>> for PublishContext {
    type Error = PublishContextError;

    fn try_from(ctx: &HashMap<String, String>) -> Result<Self, Self::Error> {
        let get = |key: &'static str| {
            ctx.get(key)
                .map(String::as_str)
                .ok_or(PublishContextError::MissingKey { key })
        };
        let invalid = |key, value: &str, expected| PublishContextError::InvalidValue {
            key,
            value: value.to_owned(),
            expected,
        };
        let epoch = get(KEY_EPOCH)?;
        let epoch = epoch
            .parse::<Epoch>()
            .map_err(|_| invalid(KEY_EPOCH, epoch, "an epoch (a decimal below 2^24)"))?;
        let replicas = parse_replicas(get(KEY_REPLICAS)?)?;
        let size = get(KEY_SIZE_BYTES)?;
        let size_bytes = size
            .trim()
            .parse()
            .map_err(|_| invalid(KEY_SIZE_BYTES, size, "a decimal unsigned integer"))?;
        Ok(PublishContext {
            epoch,
            replicas,
            size_bytes,
        })
    }
}

/// Parses `node_id=host:port,node_id=host:port`. The node id ends at the first `=`,
/// so addresses may contain any character but `,` (IPv6 `[::1]:7000` works).
fn parse_replicas(value: &str) -> Result<Vec<ReplicaEndpoint>, PublishContextError> {
    let invalid = || PublishContextError::InvalidValue {
        key: KEY_REPLICAS,
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
    fn the_controllers_map_reads_back_in_record_order() {
        let r = |n: &str, d: &str| ReplicaEndpoint {
            node_id: n.into(),
            data_address: d.into(),
        };
        let pc = PublishContext {
            epoch: Epoch::new(7).unwrap(),
            replicas: vec![r("n2", "10.0.0.2:9000"), r("n1", "[::1]:9000")],
            size_bytes: 4096,
        };
        let map = pc.to_map();
        assert_eq!(map[KEY_EPOCH], "7");
        assert_eq!(map[KEY_REPLICAS], "n2=10.0.0.2:9000,n1=[::1]:9000");
        assert_eq!(map[KEY_SIZE_BYTES], "4096");
        assert_eq!(PublishContext::try_from(&map), Ok(pc));
        let spaced = ctx(&[
            ("epoch", "1"),
            ("replicas", "a=h:1, b = h:2"),
            ("sizeBytes", "4096"),
        ]);
        let parsed = PublishContext::try_from(&spaced).unwrap();
        assert_eq!(parsed.replicas[1], r("b", "h:2"));
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
            let err = PublishContext::try_from(&ctx(&m)).unwrap_err();
            assert_eq!(err, PublishContextError::MissingKey { key: missing });
            assert!(err.to_string().contains(missing));
        }
        for (key, bad) in [
            ("epoch", "-1"),
            ("epoch", "16777216"),
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
            let err = PublishContext::try_from(&ctx(&m)).unwrap_err();
            assert!(
                matches!(&err, PublishContextError::InvalidValue { key: k, value, .. } if *k == key && value == bad),
                "{key}={bad}: {err:?}"
            );
        }
    }
}
