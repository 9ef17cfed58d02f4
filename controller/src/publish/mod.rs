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

use tessera_replica::control_proto::ReplicaRef;

pub mod decision;
pub mod fencing;

pub use decision::{after_unpublish, decide_publish, PublishDecision};
pub use fencing::raise_epoch;

/// publish_context key: the fencing epoch the engine must use.
pub const CTX_EPOCH: &str = "epoch";
/// publish_context key: `node_id=data_address,...` of the volume's replicas.
pub const CTX_REPLICAS: &str = "replicas";
/// publish_context key: volume size in bytes.
pub const CTX_SIZE_BYTES: &str = "sizeBytes";

/// The publish_context handed to the node plugin.
pub fn publish_context(
    epoch: u64,
    replicas: &[ReplicaRef],
    size_bytes: u64,
) -> HashMap<String, String> {
    let list: Vec<String> = replicas
        .iter()
        .map(|r| format!("{}={}", r.node_id, r.data_address))
        .collect();
    HashMap::from([
        (CTX_EPOCH.to_string(), epoch.to_string()),
        (CTX_REPLICAS.to_string(), list.join(",")),
        (CTX_SIZE_BYTES.to_string(), size_bytes.to_string()),
    ])
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
            7,
            &[r("n2", "10.0.0.2:9000"), r("n1", "10.0.0.1:9000")],
            4096,
        );
        assert_eq!(ctx[CTX_EPOCH], "7");
        assert_eq!(ctx[CTX_REPLICAS], "n2=10.0.0.2:9000,n1=10.0.0.1:9000");
        assert_eq!(ctx[CTX_SIZE_BYTES], "4096");
    }
}
