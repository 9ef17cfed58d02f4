//! Request builders and read-all helpers shared by the integration tests.
//!
//! They build what a well-behaved CO sends, so a test only spells out the field it
//! wants to get wrong.

use std::collections::HashMap;

use std::time::{Duration, Instant};
use tessera_csi_proto::v1::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};

use tessera_csi_proto::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use tessera_csi_proto::v1::{
    CapacityRange, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    ListSnapshotsRequest, ListVolumesRequest, Snapshot, Volume, VolumeCapability,
    VolumeContentSource,
};
use tessera_replica_protocol::control_proto::{
    ListVolumesRequest as ReplicaListRequest, VolumeRecord,
};

use crate::cluster::Cluster;
use crate::csi::ControllerClient;

/// One GiB in bytes.
pub const GIB: i64 = 1 << 30;

/// A filesystem (mount) volume, writable by one node.
pub fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// CreateVolume for `name` with `required_bytes`, no limit, default parameters.
pub fn create_request(name: &str, required_bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability()],
        ..Default::default()
    }
}

/// [`create_request`] with StorageClass parameters.
pub fn create_request_with(
    name: &str,
    required_bytes: i64,
    parameters: &[(&str, &str)],
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        parameters: parameters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        ..create_request(name, required_bytes)
    }
}

/// DeleteVolume of `volume_id`.
pub fn delete_request(volume_id: &str) -> DeleteVolumeRequest {
    DeleteVolumeRequest {
        volume_id: volume_id.to_owned(),
        ..Default::default()
    }
}

/// ControllerPublishVolume of `volume_id` to `node_id`, read-write.
pub fn publish_request(volume_id: &str, node_id: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        node_id: node_id.to_owned(),
        volume_capability: Some(mount_capability()),
        readonly: false,
        ..Default::default()
    }
}

/// ControllerUnpublishVolume of `volume_id` from `node_id`.
pub fn unpublish_request(volume_id: &str, node_id: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        node_id: node_id.to_owned(),
        ..Default::default()
    }
}

/// Every volume the controller lists, following `next_token` to the end.
pub async fn list_all_volumes(client: &mut ControllerClient) -> Result<Vec<Volume>, tonic::Status> {
    let mut volumes = Vec::new();
    let mut token = String::new();
    // Bounded so a controller that hands out the same token forever cannot hang a test.
    for _ in 0..10_000 {
        let page = client
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: token,
            })
            .await?
            .into_inner();
        volumes.extend(page.entries.into_iter().filter_map(|e| e.volume));
        if page.next_token.is_empty() {
            return Ok(volumes);
        }
        token = page.next_token;
    }
    Err(tonic::Status::internal(
        "ListVolumes kept returning a next_token",
    ))
}

/// The records every replica daemon lists, indexed like [`Cluster::replicas`].
pub async fn records_per_replica(cluster: &Cluster) -> anyhow::Result<Vec<Vec<VolumeRecord>>> {
    let mut all = Vec::new();
    for replica in cluster.replicas() {
        let records = replica
            .client()
            .await?
            .list_volumes(ReplicaListRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("ListVolumes on replica {}: {s}", replica.node_id()))?
            .into_inner()
            .volumes;
        all.push(records);
    }
    Ok(all)
}

/// Node ids of the replica daemons that hold a record of `volume_id`, sorted.
pub async fn holders_of(cluster: &Cluster, volume_id: &str) -> anyhow::Result<Vec<String>> {
    let per_replica = records_per_replica(cluster).await?;
    let mut holders: Vec<String> = cluster
        .replicas()
        .iter()
        .zip(per_replica)
        .filter(|(_, records)| records.iter().any(|r| r.volume_id == volume_id))
        .map(|(replica, _)| replica.node_id().to_owned())
        .collect();
    holders.sort();
    Ok(holders)
}

/// `request` restoring snapshot `snapshot_id` (CSI volume_content_source).
pub fn from_snapshot(request: CreateVolumeRequest, snapshot_id: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: snapshot_id.to_owned(),
            })),
        }),
        ..request
    }
}

/// `request` cloning volume `volume_id` (CSI volume_content_source).
pub fn from_volume(request: CreateVolumeRequest, volume_id: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource {
                volume_id: volume_id.to_owned(),
            })),
        }),
        ..request
    }
}

/// CreateSnapshot named `name` of `source_volume_id`.
pub fn snapshot_request(name: &str, source_volume_id: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source_volume_id.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    }
}

/// DeleteSnapshot of `snapshot_id`.
pub fn delete_snapshot_request(snapshot_id: &str) -> DeleteSnapshotRequest {
    DeleteSnapshotRequest {
        snapshot_id: snapshot_id.to_owned(),
        ..Default::default()
    }
}

/// Every snapshot the controller lists, following `next_token` to the end.
pub async fn list_all_snapshots(
    client: &mut ControllerClient,
) -> Result<Vec<Snapshot>, tonic::Status> {
    let mut snapshots = Vec::new();
    let mut token = String::new();
    // Bounded so a controller that hands out the same token forever cannot hang a test.
    for _ in 0..10_000 {
        let page = client
            .list_snapshots(ListSnapshotsRequest {
                starting_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        snapshots.extend(page.entries.into_iter().filter_map(|e| e.snapshot));
        if page.next_token.is_empty() {
            return Ok(snapshots);
        }
        token = page.next_token;
    }
    Err(tonic::Status::internal(
        "ListSnapshots kept returning a next_token",
    ))
}

/// What [`create_volume_waiting`] saw on its way to the volume.
#[derive(Debug, Clone)]
pub struct Created {
    /// The volume of the first successful answer.
    pub volume: Volume,
    /// The message of every ABORTED answer before it, in order.
    pub aborted: Vec<String>,
    /// From the first call to the successful answer.
    pub took: Duration,
}

/// Why [`create_volume_waiting`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum CreateWaitError {
    /// An answer other than OK or ABORTED.
    #[error("CreateVolume {name} failed after {aborted} ABORTED answers: {status}")]
    Failed {
        /// The volume name.
        name: String,
        /// ABORTED answers before the failure.
        aborted: usize,
        /// The failing answer.
        status: tonic::Status,
    },
    /// Still ABORTED (or failing to answer) at the deadline.
    #[error("CreateVolume {name} still not done after {timeout:?} ({aborted} ABORTED answers, last: {last})")]
    TimedOut {
        /// The volume name.
        name: String,
        /// How long the caller was willing to wait.
        timeout: Duration,
        /// ABORTED answers seen.
        aborted: usize,
        /// The last ABORTED message.
        last: String,
    },
}

impl CreateWaitError {
    /// The gRPC status of a [`CreateWaitError::Failed`].
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            CreateWaitError::Failed { status, .. } => Some(status),
            CreateWaitError::TimedOut { .. } => None,
        }
    }
}

/// Longest pause between two CreateVolume calls of [`create_volume_waiting`].
const CREATE_RETRY_MAX_PAUSE: Duration = Duration::from_millis(500);

/// Calls CreateVolume with `request` until it succeeds, the way the
/// external-provisioner retries a restore or clone still copying (ABORTED), for at
/// most `timeout`. Any other error ends the wait.
pub async fn create_volume_waiting(
    client: &mut ControllerClient,
    request: CreateVolumeRequest,
    timeout: Duration,
) -> Result<Created, CreateWaitError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut aborted = Vec::new();
    let mut pause = Duration::from_millis(20);
    loop {
        match client.create_volume(request.clone()).await {
            Ok(response) => {
                if let Some(volume) = response.into_inner().volume {
                    return Ok(Created {
                        volume,
                        aborted,
                        took: started.elapsed(),
                    });
                }
                return Err(CreateWaitError::Failed {
                    name: request.name,
                    aborted: aborted.len(),
                    status: tonic::Status::internal("CreateVolume answered OK without a volume"),
                });
            }
            Err(status) if status.code() == tonic::Code::Aborted => {
                aborted.push(status.message().to_owned());
            }
            Err(status) => {
                return Err(CreateWaitError::Failed {
                    name: request.name,
                    aborted: aborted.len(),
                    status,
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(CreateWaitError::TimedOut {
                name: request.name,
                timeout,
                aborted: aborted.len(),
                last: aborted.last().cloned().unwrap_or_default(),
            });
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(CREATE_RETRY_MAX_PAUSE);
    }
}
