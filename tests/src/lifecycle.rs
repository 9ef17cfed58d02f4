//! The CSI call sequence that makes a volume usable on a node, as the
//! external-attacher and the kubelet drive it: ControllerPublishVolume, then
//! NodeStageVolume and NodePublishVolume; and the way back.
//!
//! Used by the data-path tests and by `tessera-csi-volume` (the benchmark's helper).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_csi_proto::v1::volume_capability::{access_mode, AccessMode, AccessType};
use tessera_csi_proto::v1::volume_capability::{BlockVolume, MountVolume};
use tessera_csi_proto::v1::{
    ControllerGetVolumeRequest, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, Volume, VolumeCapability,
    VolumeCondition,
};

use crate::csi::{ControllerClient, NodeClient};
use crate::fixtures::create_request_with;
use crate::Cluster;

/// A raw block volume, writable by one node.
pub fn block_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A filesystem volume of type `fs_type` (empty: the volume's `fsType`), writable by
/// one node.
pub fn filesystem_capability(fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            ..Default::default()
        })),
    }
}

/// The `epoch` a publish context carries.
pub fn epoch_of(publish_context: &HashMap<String, String>) -> Option<u64> {
    publish_context.get("epoch").and_then(|e| e.parse().ok())
}

/// A volume published to, staged on and published on one node.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The volume.
    pub volume_id: String,
    /// The node it is attached to.
    pub node_id: String,
    /// NodeStageVolume's staging path.
    pub staging: PathBuf,
    /// NodePublishVolume's target: a directory (filesystem) or a device file (block).
    pub target: PathBuf,
    /// The capability used throughout.
    pub capability: VolumeCapability,
    /// The volume's context from CreateVolume.
    pub volume_context: HashMap<String, String>,
    /// What ControllerPublishVolume returned.
    pub publish_context: HashMap<String, String>,
}

impl Attachment {
    /// The fencing epoch of this attachment.
    pub fn epoch(&self) -> u64 {
        epoch_of(&self.publish_context).unwrap_or(0)
    }

    /// Whether the target is a block device file.
    pub fn is_block(&self) -> bool {
        matches!(
            self.capability.access_type,
            Some(AccessType::Block(BlockVolume {}))
        )
    }

    /// NodeStageVolume for this attachment.
    pub fn stage_request(&self) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: self.volume_id.clone(),
            publish_context: self.publish_context.clone(),
            staging_target_path: path_string(&self.staging),
            volume_capability: Some(self.capability.clone()),
            secrets: HashMap::new(),
            volume_context: self.volume_context.clone(),
        }
    }

    /// NodePublishVolume for this attachment (read-write).
    pub fn publish_request(&self) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: self.volume_id.clone(),
            publish_context: self.publish_context.clone(),
            staging_target_path: path_string(&self.staging),
            target_path: path_string(&self.target),
            volume_capability: Some(self.capability.clone()),
            readonly: false,
            secrets: HashMap::new(),
            volume_context: self.volume_context.clone(),
        }
    }
}

fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// ControllerPublishVolume of `volume` to `node_id`, then NodeStageVolume at
/// `staging` and NodePublishVolume at `target` through `node`. The parent of
/// `target` is created (the kubelet does that); the staging directory too.
pub async fn attach(
    controller: &mut ControllerClient,
    node: &mut NodeClient,
    volume: &Volume,
    node_id: &str,
    capability: VolumeCapability,
    staging: &Path,
    target: &Path,
) -> anyhow::Result<Attachment> {
    let publish_context = controller
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: node_id.to_owned(),
            volume_capability: Some(capability.clone()),
            readonly: false,
            secrets: HashMap::new(),
            volume_context: volume.volume_context.clone(),
        })
        .await
        .with_context(|| format!("ControllerPublishVolume {} to {node_id}", volume.volume_id))?
        .into_inner()
        .publish_context;
    let attachment = Attachment {
        volume_id: volume.volume_id.clone(),
        node_id: node_id.to_owned(),
        staging: staging.to_owned(),
        target: target.to_owned(),
        capability,
        volume_context: volume.volume_context.clone(),
        publish_context,
    };
    stage_and_publish(node, &attachment).await?;
    Ok(attachment)
}

/// NodeStageVolume and NodePublishVolume of an attachment whose
/// ControllerPublishVolume is done.
pub async fn stage_and_publish(node: &mut NodeClient, a: &Attachment) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.staging)
        .with_context(|| format!("creating {}", a.staging.display()))?;
    if let Some(parent) = a.target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    node.node_stage_volume(a.stage_request())
        .await
        .with_context(|| format!("NodeStageVolume {} on {}", a.volume_id, a.node_id))?;
    node.node_publish_volume(a.publish_request())
        .await
        .with_context(|| format!("NodePublishVolume {} on {}", a.volume_id, a.node_id))?;
    Ok(())
}

/// NodeUnpublishVolume and NodeUnstageVolume through `node`.
pub async fn unpublish_and_unstage(node: &mut NodeClient, a: &Attachment) -> anyhow::Result<()> {
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: a.volume_id.clone(),
        target_path: path_string(&a.target),
    })
    .await
    .with_context(|| format!("NodeUnpublishVolume {} on {}", a.volume_id, a.node_id))?;
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: a.volume_id.clone(),
        staging_target_path: path_string(&a.staging),
    })
    .await
    .with_context(|| format!("NodeUnstageVolume {} on {}", a.volume_id, a.node_id))?;
    Ok(())
}

/// ControllerUnpublishVolume of the attachment.
pub async fn controller_unpublish(
    controller: &mut ControllerClient,
    a: &Attachment,
) -> anyhow::Result<()> {
    controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: a.volume_id.clone(),
            node_id: a.node_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .with_context(|| {
            format!(
                "ControllerUnpublishVolume {} from {}",
                a.volume_id, a.node_id
            )
        })?;
    Ok(())
}

/// The whole way back: node unpublish and unstage, then ControllerUnpublishVolume.
pub async fn detach(
    controller: &mut ControllerClient,
    node: &mut NodeClient,
    a: &Attachment,
) -> anyhow::Result<()> {
    unpublish_and_unstage(node, a).await?;
    controller_unpublish(controller, a).await
}

/// Kubelet-style paths for `name` on `node`: (staging dir, publish target).
pub fn kubelet_paths(cluster: &Cluster, node: &str, name: &str, block: bool) -> (PathBuf, PathBuf) {
    let base = cluster.dir().join("kubelet").join(node);
    let staging = base.join("staging").join(name);
    let pod = base.join("pods").join(name);
    let target = if block {
        pod.join("dev")
    } else {
        pod.join("mount")
    };
    (staging, target)
}

/// CreateVolume of `name` (a raw block volume if `block`, else a mount volume);
/// panics on failure.
pub async fn create_volume(
    controller: &mut ControllerClient,
    name: &str,
    size: usize,
    params: &[(&str, &str)],
    block: bool,
) -> Volume {
    let mut request =
        create_request_with(name, i64::try_from(size).expect("size fits i64"), params);
    if block {
        request.volume_capabilities = vec![block_capability()];
    }
    controller
        .create_volume(request)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
        .into_inner()
        .volume
        .expect("CreateVolume returns the volume")
}

/// The node's view of an attached volume (NodeGetVolumeStats' condition).
pub async fn node_condition(node: &mut NodeClient, a: &Attachment) -> VolumeCondition {
    node.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: a.volume_id.clone(),
        volume_path: a.target.to_string_lossy().into_owned(),
        staging_target_path: a.staging.to_string_lossy().into_owned(),
    })
    .await
    .unwrap_or_else(|s| panic!("NodeGetVolumeStats {} on {}: {s}", a.volume_id, a.node_id))
    .into_inner()
    .volume_condition
    .expect("NodeGetVolumeStats reports a volume condition")
}

/// The controller's view of a volume (ControllerGetVolume's condition).
pub async fn controller_condition(
    controller: &mut ControllerClient,
    volume_id: &str,
) -> VolumeCondition {
    controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: volume_id.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("ControllerGetVolume {volume_id}: {s}"))
        .into_inner()
        .status
        .and_then(|s| s.volume_condition)
        .expect("ControllerGetVolume reports a volume condition")
}
