//! Request builders and read-all helpers shared by the integration tests.
//!
//! They build what a well-behaved CO sends, so a test only spells out the field it
//! wants to get wrong.

use std::collections::HashMap;

use tessera_csi_proto::v1::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use tessera_csi_proto::v1::{
    CapacityRange, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    CreateVolumeRequest, DeleteVolumeRequest, ListVolumesRequest, Volume, VolumeCapability,
};
use tessera_replica::control_proto::{ListVolumesRequest as ReplicaListRequest, VolumeRecord};

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
