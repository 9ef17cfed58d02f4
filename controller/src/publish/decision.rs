//! What ControllerPublishVolume and ControllerUnpublishVolume must do, given the
//! attachments a majority of the replicas hold.

use tessera_replica_protocol::control_proto::Attachment;

/// What ControllerPublishVolume must do, given the current attachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishDecision {
    /// Already published to this node with the same readonly flag: answer again,
    /// without raising the epoch.
    AlreadyPublished,
    /// Published to this node with the other readonly flag (ALREADY_EXISTS).
    IncompatibleRepublish,
    /// Published to another node; Tessera volumes are single-node
    /// (FAILED_PRECONDITION naming that node).
    PublishedElsewhere(String),
    /// Not published: raise the epoch and record the attachment.
    Attach,
}

/// Decides a publish of the volume to `node_id` with `readonly`.
pub fn decide_publish(
    attachments: &[Attachment],
    node_id: &str,
    readonly: bool,
) -> PublishDecision {
    if let Some(a) = attachments.iter().find(|a| a.node_id == node_id) {
        return if a.readonly == readonly {
            PublishDecision::AlreadyPublished
        } else {
            PublishDecision::IncompatibleRepublish
        };
    }
    match attachments.first() {
        Some(other) => PublishDecision::PublishedElsewhere(other.node_id.clone()),
        None => PublishDecision::Attach,
    }
}

/// Attachments after unpublishing `node_id` (`""` = from every node), or `None` when
/// nothing changes (the idempotent case).
pub fn after_unpublish(attachments: &[Attachment], node_id: &str) -> Option<Vec<Attachment>> {
    let kept: Vec<Attachment> = attachments
        .iter()
        .filter(|a| !node_id.is_empty() && a.node_id != node_id)
        .cloned()
        .collect();
    (kept.len() != attachments.len()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(node: &str, ro: bool) -> Attachment {
        Attachment {
            node_id: node.into(),
            readonly: ro,
        }
    }

    #[test]
    fn publish_decisions() {
        assert_eq!(decide_publish(&[], "n1", false), PublishDecision::Attach);
        assert_eq!(
            decide_publish(&[att("n1", false)], "n1", false),
            PublishDecision::AlreadyPublished
        );
        assert_eq!(
            decide_publish(&[att("n1", true)], "n1", true),
            PublishDecision::AlreadyPublished
        );
        assert_eq!(
            decide_publish(&[att("n1", false)], "n1", true),
            PublishDecision::IncompatibleRepublish
        );
        assert_eq!(
            decide_publish(&[att("n1", false)], "n2", false),
            PublishDecision::PublishedElsewhere("n1".into())
        );
    }

    #[test]
    fn unpublish_is_idempotent() {
        assert_eq!(after_unpublish(&[], "n1"), None);
        assert_eq!(after_unpublish(&[att("n2", false)], "n1"), None);
        assert_eq!(after_unpublish(&[att("n1", false)], "n1"), Some(vec![]));
        assert_eq!(
            after_unpublish(&[att("n1", false), att("n2", true)], "n1"),
            Some(vec![att("n2", true)])
        );
        assert_eq!(
            after_unpublish(&[att("n1", false), att("n2", true)], ""),
            Some(vec![])
        );
        assert_eq!(after_unpublish(&[], ""), None);
    }
}
