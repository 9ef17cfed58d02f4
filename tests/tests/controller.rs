//! Issue 2: volume life cycle through the real controller and replica daemons.
//!
//! Every test starts its own cluster (replica daemons + controller, no node plugin)
//! and checks the result where it lands: on each replica daemon's control API and in
//! its data directory, not only in the controller's answers.

use std::collections::BTreeSet;

use tessera_csi_proto::v1::{ControllerGetVolumeRequest, CreateVolumeRequest, Volume};
use tessera_replica_protocol::control_proto::{GetVolumeRequest, VolumeRecord};
use tessera_tests::fixtures::{
    create_request, create_request_with, delete_request, holders_of, list_all_volumes,
    publish_request, records_per_replica, unpublish_request, GIB,
};
use tessera_tests::{Cluster, ClusterBuilder};
use tonic::Code;

/// A cluster of `replicas` daemons and a controller.
async fn cluster(replicas: usize) -> Cluster {
    ClusterBuilder::new()
        .replicas(replicas)
        .node(false)
        .start()
        .await
        .expect("cluster starts")
}

async fn create(cluster: &Cluster, request: CreateVolumeRequest) -> Volume {
    let name = request.name.clone();
    cluster
        .controller()
        .await
        .expect("controller answers")
        .create_volume(request)
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name:?} failed: {s:?}"))
        .into_inner()
        .volume
        .expect("CreateVolume returns a volume")
}

async fn create_error(cluster: &Cluster, request: CreateVolumeRequest) -> tonic::Status {
    let name = request.name.clone();
    match cluster
        .controller()
        .await
        .expect("controller answers")
        .create_volume(request)
        .await
    {
        Ok(r) => panic!("CreateVolume {name:?} succeeded but must fail: {r:?}"),
        Err(status) => status,
    }
}

/// Asserts that no daemon holds a record or a volume directory.
async fn assert_no_volumes_anywhere(cluster: &Cluster, after: &str) {
    let records = records_per_replica(cluster).await.expect("replicas answer");
    for (replica, records) in cluster.replicas().iter().zip(&records) {
        assert!(
            records.is_empty(),
            "after {after}: replica {} lists records {records:?}",
            replica.node_id()
        );
        let on_disk = replica.volume_dirs_on_disk().expect("volumes dir readable");
        assert!(
            on_disk.is_empty(),
            "after {after}: replica {} has volume directories {on_disk:?}",
            replica.node_id()
        );
    }
    let mut controller = cluster.controller().await.expect("controller answers");
    let listed = list_all_volumes(&mut controller)
        .await
        .expect("ListVolumes");
    assert!(
        listed.is_empty(),
        "after {after}: controller lists {listed:?}"
    );
}

/// The record of `volume_id` on replica `index`, via GetVolume.
async fn replica_record(cluster: &Cluster, index: usize, volume_id: &str) -> VolumeRecord {
    cluster
        .replica(index)
        .client()
        .await
        .expect("replica answers")
        .get_volume(GetVolumeRequest {
            volume_id: volume_id.to_owned(),
        })
        .await
        .unwrap_or_else(|s| {
            panic!(
                "GetVolume {volume_id} on replica {}: {s:?}",
                cluster.replica(index).node_id()
            )
        })
        .into_inner()
}

fn is_tessera_volume_id(id: &str) -> bool {
    id.strip_prefix("tv-")
        .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name_and_lands_on_three_daemons() {
    // Four daemons, so "exactly three hold it" is a real check.
    let cluster = cluster(4).await;
    let first = create(&cluster, create_request("pvc-idempotent", GIB)).await;
    assert!(
        is_tessera_volume_id(&first.volume_id),
        "volume id {:?} is not tv-<hex>",
        first.volume_id
    );
    assert!(
        first.capacity_bytes >= GIB,
        "capacity {}",
        first.capacity_bytes
    );

    let second = create(&cluster, create_request("pvc-idempotent", GIB)).await;
    assert_eq!(second.volume_id, first.volume_id, "same name, same volume");
    assert_eq!(second.capacity_bytes, first.capacity_bytes);

    let per_replica = records_per_replica(&cluster)
        .await
        .expect("replicas answer");
    let mut holders = BTreeSet::new();
    for (replica, records) in cluster.replicas().iter().zip(&per_replica) {
        let dirs = replica.volume_dirs_on_disk().expect("volumes dir readable");
        match records.as_slice() {
            [] => assert!(
                dirs.is_empty(),
                "replica {} holds no record but has directories {dirs:?}",
                replica.node_id()
            ),
            [record] => {
                assert_eq!(record.volume_id, first.volume_id);
                assert_eq!(record.name, "pvc-idempotent");
                assert_eq!(
                    i64::try_from(record.size_bytes).expect("size fits i64"),
                    first.capacity_bytes
                );
                assert_eq!(record.replication_factor, 3);
                assert_eq!(dirs, vec![first.volume_id.clone()]);
                let dir = replica.volume_dir(&first.volume_id);
                assert!(
                    dir.join("record").is_file(),
                    "{} has no record file",
                    dir.display()
                );
                assert!(
                    dir.join("store/MANIFEST").is_file(),
                    "{} has no block store",
                    dir.display()
                );
                holders.insert(replica.node_id().to_owned());
            }
            more => panic!(
                "replica {} holds {} records for one volume: {more:?}",
                replica.node_id(),
                more.len()
            ),
        }
    }
    assert_eq!(
        holders.len(),
        3,
        "records on {holders:?}, want exactly 3 daemons"
    );

    // Every record names the same replica set: the daemons that actually hold it.
    for (replica, records) in cluster.replicas().iter().zip(&per_replica) {
        for record in records {
            let set: BTreeSet<String> = record.replicas.iter().map(|r| r.node_id.clone()).collect();
            assert_eq!(
                set,
                holders,
                "replica set in the record on {}",
                replica.node_id()
            );
            for member in &record.replicas {
                let daemon = cluster
                    .replicas()
                    .iter()
                    .find(|d| d.node_id() == member.node_id)
                    .expect("replica set names a known daemon");
                assert_eq!(member.control_address, daemon.control_addr().to_string());
                assert_eq!(member.data_address, daemon.data_addr().to_string());
            }
        }
    }

    let mut controller = cluster.controller().await.expect("controller answers");
    let listed = list_all_volumes(&mut controller)
        .await
        .expect("ListVolumes");
    assert_eq!(listed.len(), 1, "controller lists {listed:?}");
    assert_eq!(listed[0].volume_id, first.volume_id);
}

#[tokio::test]
async fn same_name_with_other_capacity_is_already_exists() {
    let cluster = cluster(3).await;
    let volume = create(&cluster, create_request("pvc-size", GIB)).await;

    let status = create_error(&cluster, create_request("pvc-size", 2 * GIB)).await;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // The first volume is untouched and no second one appeared.
    let per_replica = records_per_replica(&cluster)
        .await
        .expect("replicas answer");
    for (replica, records) in cluster.replicas().iter().zip(&per_replica) {
        assert_eq!(
            records.len(),
            1,
            "replica {}: {records:?}",
            replica.node_id()
        );
        assert_eq!(records[0].volume_id, volume.volume_id);
        assert_eq!(
            i64::try_from(records[0].size_bytes).expect("size fits i64"),
            volume.capacity_bytes
        );
        assert_eq!(
            replica.volume_dirs_on_disk().expect("volumes dir readable"),
            vec![volume.volume_id.clone()]
        );
    }
}

#[tokio::test]
async fn delete_of_unknown_volume_succeeds_and_changes_nothing() {
    let cluster = cluster(3).await;
    let kept = create(&cluster, create_request("pvc-kept", GIB)).await;
    let mut controller = cluster.controller().await.expect("controller answers");

    for unknown in [
        "tv-00000000000000000000000000000000",
        "not-a-tessera-volume",
    ] {
        controller
            .delete_volume(delete_request(unknown))
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {unknown:?} must succeed: {s:?}"));
    }
    let status = controller
        .delete_volume(delete_request(""))
        .await
        .expect_err("an empty volume id is invalid");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    assert_eq!(
        holders_of(&cluster, &kept.volume_id)
            .await
            .expect("replicas answer"),
        vec!["n1", "n2", "n3"]
    );
}

#[tokio::test]
async fn delete_removes_records_and_files_on_every_daemon() {
    let cluster = cluster(3).await;
    let doomed = create(&cluster, create_request("pvc-doomed", GIB)).await;
    let kept = create(&cluster, create_request("pvc-kept", GIB)).await;
    assert_ne!(doomed.volume_id, kept.volume_id);
    for replica in cluster.replicas() {
        assert!(replica
            .volume_dir(&doomed.volume_id)
            .join("store/MANIFEST")
            .is_file());
    }

    let mut controller = cluster.controller().await.expect("controller answers");
    controller
        .delete_volume(delete_request(&doomed.volume_id))
        .await
        .expect("DeleteVolume");

    let per_replica = records_per_replica(&cluster)
        .await
        .expect("replicas answer");
    for (replica, records) in cluster.replicas().iter().zip(&per_replica) {
        let ids: Vec<&str> = records.iter().map(|r| r.volume_id.as_str()).collect();
        assert_eq!(
            ids,
            vec![kept.volume_id.as_str()],
            "replica {}",
            replica.node_id()
        );
        assert_eq!(
            replica.volume_dirs_on_disk().expect("volumes dir readable"),
            vec![kept.volume_id.clone()],
            "replica {} still has files of the deleted volume",
            replica.node_id()
        );
        assert!(!replica.volume_dir(&doomed.volume_id).exists());
    }
    let listed = list_all_volumes(&mut controller)
        .await
        .expect("ListVolumes");
    let ids: Vec<&str> = listed.iter().map(|v| v.volume_id.as_str()).collect();
    assert_eq!(ids, vec![kept.volume_id.as_str()]);

    // Deleting again is fine, and the name can be reused afterwards.
    controller
        .delete_volume(delete_request(&doomed.volume_id))
        .await
        .expect("second DeleteVolume is idempotent");
    let again = create(&cluster, create_request("pvc-doomed", GIB)).await;
    assert_eq!(
        holders_of(&cluster, &again.volume_id)
            .await
            .expect("replicas answer"),
        vec!["n1", "n2", "n3"]
    );
}

#[tokio::test]
async fn controller_restart_loses_no_volume() {
    let mut cluster = cluster(3).await;
    let a = create(&cluster, create_request("pvc-a", GIB)).await;
    let b = create(&cluster, create_request("pvc-b", 2 * GIB)).await;

    cluster
        .restart_controller()
        .await
        .expect("controller restarts");

    let mut controller = cluster.controller().await.expect("controller answers");
    let mut listed = list_all_volumes(&mut controller)
        .await
        .expect("ListVolumes");
    listed.sort_by(|x, y| x.volume_id.cmp(&y.volume_id));
    let mut want = vec![
        (a.volume_id.clone(), a.capacity_bytes),
        (b.volume_id.clone(), b.capacity_bytes),
    ];
    want.sort();
    let got: Vec<(String, i64)> = listed
        .iter()
        .map(|v| (v.volume_id.clone(), v.capacity_bytes))
        .collect();
    assert_eq!(got, want, "ListVolumes after the restart");

    for volume in [&a, &b] {
        let fetched = controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: volume.volume_id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("ControllerGetVolume {}: {s:?}", volume.volume_id))
            .into_inner()
            .volume
            .expect("ControllerGetVolume returns the volume");
        assert_eq!(fetched.volume_id, volume.volume_id);
        assert_eq!(fetched.capacity_bytes, volume.capacity_bytes);
    }

    // The rebuilt index still knows the names: a retried create is idempotent.
    let again = create(&cluster, create_request("pvc-a", GIB)).await;
    assert_eq!(again.volume_id, a.volume_id);
    // A smaller request is satisfied by the existing 2 GiB volume; a larger one is not.
    let smaller = create(&cluster, create_request("pvc-b", GIB)).await;
    assert_eq!(smaller.volume_id, b.volume_id);
    assert_eq!(smaller.capacity_bytes, b.capacity_bytes);
    let status = create_error(&cluster, create_request("pvc-b", 3 * GIB)).await;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
}

#[tokio::test]
async fn replica_restart_keeps_its_records() {
    let mut cluster = cluster(3).await;
    let volume = create(&cluster, create_request("pvc-durable", GIB)).await;
    let before = records_per_replica(&cluster)
        .await
        .expect("replicas answer");
    assert_eq!(
        before[0].len(),
        1,
        "replica n1 holds the volume: {:?}",
        before[0]
    );

    cluster
        .restart_replica(0)
        .await
        .expect("replica n1 restarts");

    let after = records_per_replica(&cluster)
        .await
        .expect("replicas answer");
    assert_eq!(after[0], before[0], "records of n1 across a kill -9");
    assert_eq!(
        cluster
            .replica(0)
            .volume_dirs_on_disk()
            .expect("volumes dir readable"),
        vec![volume.volume_id.clone()]
    );

    // The controller can still see and manage the volume.
    let mut controller = cluster.controller().await.expect("controller answers");
    let fetched = controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        })
        .await
        .expect("ControllerGetVolume")
        .into_inner()
        .volume
        .expect("volume returned");
    assert_eq!(fetched.capacity_bytes, volume.capacity_bytes);
}

#[tokio::test]
async fn malformed_create_requests_fail_and_create_nothing() {
    let cluster = cluster(3).await;

    let mut negative_required = create_request("pvc-neg", GIB);
    if let Some(range) = negative_required.capacity_range.as_mut() {
        range.required_bytes = -1;
    }
    let mut negative_limit = create_request("pvc-neg-limit", GIB);
    if let Some(range) = negative_limit.capacity_range.as_mut() {
        range.limit_bytes = -GIB;
    }
    let mut limit_below_required = create_request("pvc-limit", 2 * GIB);
    if let Some(range) = limit_below_required.capacity_range.as_mut() {
        range.limit_bytes = GIB;
    }
    let mut no_capabilities = create_request("pvc-nocap", GIB);
    no_capabilities.volume_capabilities.clear();

    // (case, request, expected code, text the message must contain)
    let cases: Vec<(&str, CreateVolumeRequest, Code, &str)> = vec![
        (
            "empty name",
            create_request("", GIB),
            Code::InvalidArgument,
            "",
        ),
        (
            "negative required_bytes",
            negative_required,
            Code::InvalidArgument,
            "",
        ),
        (
            "negative limit_bytes",
            negative_limit,
            Code::InvalidArgument,
            "",
        ),
        (
            "limit below required",
            limit_below_required,
            Code::OutOfRange,
            "",
        ),
        (
            "no volume capabilities",
            no_capabilities,
            Code::InvalidArgument,
            "",
        ),
        (
            "unknown parameter",
            create_request_with("pvc-typo", GIB, &[("replicationFactr", "3")]),
            Code::InvalidArgument,
            "replicationFactr",
        ),
        (
            "unparsable replicationFactor",
            create_request_with("pvc-bad-rf", GIB, &[("replicationFactor", "three")]),
            Code::InvalidArgument,
            "replicationFactor",
        ),
        (
            "replicationFactor above the number of daemons",
            create_request_with("pvc-rf4", GIB, &[("replicationFactor", "4")]),
            Code::OutOfRange,
            "",
        ),
    ];

    for (case, request, code, needle) in cases {
        let status = create_error(&cluster, request).await;
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{case}: message {:?} does not name {needle:?}",
            status.message()
        );
        assert_no_volumes_anywhere(&cluster, case).await;
    }
}

#[tokio::test]
async fn publish_is_idempotent_single_node_and_fences_with_epochs() {
    let cluster = cluster(3).await;
    let volume = create(&cluster, create_request("pvc-attach", GIB)).await;
    let id = volume.volume_id.clone();
    let mut controller = cluster.controller().await.expect("controller answers");

    let first = controller
        .controller_publish_volume(publish_request(&id, "n1"))
        .await
        .expect("publish to n1")
        .into_inner()
        .publish_context;
    let again = controller
        .controller_publish_volume(publish_request(&id, "n1"))
        .await
        .expect("publish to n1 again is idempotent")
        .into_inner()
        .publish_context;
    assert_eq!(again, first, "a repeated publish returns the same context");
    let first_epoch: u64 = first
        .get("epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("publish_context has no numeric epoch: {first:?}"));

    // The epoch is on (at least) a majority of the replicas, and nowhere higher.
    let epochs = replica_epochs(&cluster, &id).await;
    assert!(
        epochs.iter().filter(|&&e| e == first_epoch).count() >= 2,
        "epoch {first_epoch} not on a majority: {epochs:?}"
    );
    assert!(epochs.iter().all(|&e| e <= first_epoch), "{epochs:?}");

    let status = controller
        .controller_publish_volume(publish_request(&id, "n2"))
        .await
        .expect_err("the volume is attached to n1");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        replica_epochs(&cluster, &id).await,
        epochs,
        "a refused publish fences nothing"
    );

    let status = controller
        .controller_publish_volume(publish_request(&id, "no-such-node"))
        .await
        .expect_err("unknown node");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = controller
        .controller_publish_volume(publish_request("tv-00000000000000000000000000000000", "n1"))
        .await
        .expect_err("unknown volume");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    controller
        .controller_unpublish_volume(unpublish_request(&id, "n1"))
        .await
        .expect("unpublish from n1");
    controller
        .controller_unpublish_volume(unpublish_request(&id, "n1"))
        .await
        .expect("unpublish is idempotent");

    let moved = controller
        .controller_publish_volume(publish_request(&id, "n2"))
        .await
        .expect("publish to n2 after unpublish")
        .into_inner()
        .publish_context;
    let moved_epoch: u64 = moved
        .get("epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("publish_context has no numeric epoch: {moved:?}"));
    assert!(
        moved_epoch > first_epoch,
        "epoch {moved_epoch} after move, was {first_epoch}"
    );
    let epochs = replica_epochs(&cluster, &id).await;
    assert!(
        epochs.iter().filter(|&&e| e == moved_epoch).count() >= 2,
        "new epoch {moved_epoch} not on a majority of replicas: {epochs:?}"
    );
}

/// The epoch each replica daemon stores for `volume_id`, in daemon order.
async fn replica_epochs(cluster: &Cluster, volume_id: &str) -> Vec<u64> {
    let mut epochs = Vec::new();
    for index in 0..cluster.replicas().len() {
        epochs.push(replica_record(cluster, index, volume_id).await.epoch);
    }
    epochs
}
