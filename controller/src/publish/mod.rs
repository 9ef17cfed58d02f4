//! Publishing a volume to a node, and fencing the engine that had it before.
//!
//! * [`decision`]: what ControllerPublishVolume / Unpublish must do given the current
//!   attachments, free of I/O so the rules of the CSI spec (idempotent republish,
//!   ALREADY_EXISTS, FAILED_PRECONDITION) are unit-tested on their own.
//! * [`fencing`]: the epoch raise of a publish. A publish raises the volume's epoch on
//!   a majority first and records the attachment second, so no two engines ever share
//!   an epoch and the replicas refuse the writes of the engine that held the old one.
//! * [`publish_context`]: what the node plugin is handed.

use std::collections::HashMap;

use tessera_replica_protocol::control_proto::ReplicaRef;
use tessera_replica_protocol::publish_context::{PublishContext, ReplicaEndpoint};
use tessera_replica_protocol::seq::Epoch;

pub mod decision;
pub mod fencing;

pub use decision::{after_unpublish, decide_publish, PublishDecision};
pub use fencing::raise_epoch;

/// The publish_context handed to the node plugin (its format is the protocol's
/// [`PublishContext`]).
pub fn publish_context(
    epoch: Epoch,
    replicas: &[ReplicaRef],
    size_bytes: u64,
) -> HashMap<String, String> {
    PublishContext {
        epoch,
        replicas: replicas
            .iter()
            .map(|r| ReplicaEndpoint {
                node_id: r.node_id.clone(),
                data_address: r.data_address.clone(),
            })
            .collect(),
        size_bytes,
    }
    .to_map()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_lists_replicas_in_record_order() {
        let r = |n: &str, d: &str| ReplicaRef {
            node_id: n.into(),
            data_address: d.into(),
            ..Default::default()
        };
        let ctx = publish_context(
            Epoch::new(7).unwrap(),
            &[r("n2", "10.0.0.2:9000"), r("n1", "10.0.0.1:9000")],
            4096,
        );
        let parsed = PublishContext::try_from(&ctx).unwrap();
        assert_eq!(parsed.epoch.get(), 7);
        let nodes: Vec<_> = parsed.replicas.iter().map(|r| r.node_id.as_str()).collect();
        assert_eq!(nodes, ["n2", "n1"]);
        assert_eq!(parsed.size_bytes, 4096);
    }
}
