//! ControllerPublishVolume and ControllerUnpublishVolume: the decision
//! ([`crate::publish::decide_publish`]), the epoch raise that fences the previous
//! engine ([`crate::publish::fencing`]) and the attachment, in that order.

use tessera_csi_proto::v1 as csi;
use tessera_replica_protocol::control_proto::Attachment;
use tessera_replica_protocol::seq::Epoch;

use super::{ControllerService, Result};
use crate::capabilities;
use crate::error::{required, ControllerError};
use crate::publish::{self, PublishDecision};

impl ControllerService {
    pub(super) async fn do_publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        required("node_id", &req.node_id)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or(ControllerError::Missing {
                field: "volume_capability",
            })?;
        let access = capabilities::validate_one(cap)?;
        let _guard = self.locks().lock(&req.volume_id).await;
        let volumes = self.volumes();
        let rec = volumes.require(&req.volume_id).await?;
        if !access.compatible_with(&rec.access_type) {
            return Err(ControllerError::AccessTypeMismatch {
                volume: rec.volume_id.clone(),
                recorded: rec.access_type.clone(),
            });
        }
        if !self.known_nodes().contains(&req.node_id) {
            return Err(ControllerError::NodeNotFound(req.node_id.clone()));
        }
        let reads = volumes.read(&rec).await;
        let cur = volumes.current(&rec, &reads)?;
        let (epoch, rec) = match publish::decide_publish(
            &cur.attachments,
            &req.node_id,
            req.readonly,
        ) {
            PublishDecision::AlreadyPublished => {
                let epoch = reads.max_epoch();
                // Make sure the attachment is on a majority (a previous attempt may have
                // recorded it on fewer).
                let rec = volumes.update_attachments(&rec, |_| None).await?;
                (epoch.max(rec.epoch), rec)
            }
            PublishDecision::IncompatibleRepublish => {
                return Err(ControllerError::PublishedWithOtherReadonly {
                    volume: rec.volume_id.clone(),
                    node: req.node_id.clone(),
                    readonly: !req.readonly,
                })
            }
            PublishDecision::PublishedElsewhere(node) => {
                return Err(ControllerError::PublishedElsewhere {
                    volume: rec.volume_id.clone(),
                    node,
                })
            }
            PublishDecision::Attach => {
                // Epoch first, attachment second: a crash in between leaves no
                // attachment, so the retry raises again and no two engines ever share
                // an epoch.
                let epoch = publish::raise_epoch(volumes, &rec).await?;
                let node = req.node_id.clone();
                let readonly = req.readonly;
                let rec = volumes
                    .update_attachments(&rec, move |att| {
                        let mut v = att.to_vec();
                        v.push(Attachment {
                            node_id: node.clone(),
                            readonly,
                        });
                        Some(v)
                    })
                    .await?;
                tracing::info!(volume = %rec.volume_id, node = %req.node_id, epoch, readonly, "volume published");
                (epoch, rec)
            }
        };
        // Replicas refuse epochs beyond the seq layout, so every one they hold fits.
        let epoch = Epoch::new(epoch).map_err(|e| ControllerError::EpochExhausted {
            volume: rec.volume_id.clone(),
            epoch: e.0,
        })?;
        let replicas = volumes.replicas(&rec);
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: publish::publish_context(epoch, &replicas, rec.size_bytes),
        })
    }

    pub(super) async fn do_unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        required("volume_id", &req.volume_id)?;
        let _guard = self.locks().lock(&req.volume_id).await;
        let Some(rec) = self.volumes().lookup(&req.volume_id).await else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        let node = req.node_id.clone();
        let updated = self
            .volumes()
            .update_attachments(&rec, move |att| publish::after_unpublish(att, &node))
            .await?;
        if rec.attachments != updated.attachments {
            tracing::info!(volume = %rec.volume_id, node = %req.node_id, "volume unpublished");
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }
}
