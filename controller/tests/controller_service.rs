//! The controller service end to end over gRPC against in-memory replica daemons
//! (`common::FakeDaemon`), covering the CSI error codes and the replica protocol use.

mod common;

use std::collections::HashMap;

use common::{Cluster, GIB};
use tessera_controller::volume_index::volume_id_for_name;
use tessera_csi_proto::v1::controller_server::Controller;
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tessera_csi_proto::v1::*;
use tessera_csi_proto::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};
use tessera_replica::control_proto::{ReplicaRef, VolumeRecord};
use tonic::{Code, Request};

fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create_req(name: &str, size: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("")],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn publish_req(id: &str, node: &str, readonly: bool) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("")),
        readonly,
        ..Default::default()
    }
}

async fn three_nodes() -> Cluster {
    Cluster::start(
        &[
            ("n1", "", 10 * GIB),
            ("n2", "", 10 * GIB),
            ("n3", "", 10 * GIB),
        ],
        &["compute-1"],
    )
    .await
}

async fn create(c: &Cluster, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
    c.controller
        .create_volume(Request::new(req))
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn create_is_idempotent_and_detects_incompatible_duplicates() {
    let c = three_nodes().await;
    let v = create(&c, create_req("pvc-a", 5000, &[("maxBandwidth", "1Mi")]))
        .await
        .unwrap();
    assert_eq!(v.volume_id, volume_id_for_name("pvc-a"));
    assert_eq!(v.capacity_bytes, 8192, "rounded up to 4 KiB");
    assert_eq!(
        v.volume_context
            .get("replicationFactor")
            .map(String::as_str),
        Some("3")
    );
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    // Every daemon holds the record, each replica on a distinct node.
    for d in &c.daemons {
        let rec = d.volume(&v.volume_id).expect("replica record");
        assert_eq!(rec.replicas.len(), 3);
    }
    // Accessible from every replica node and the extra node.
    let nodes: Vec<&str> = v
        .accessible_topology
        .iter()
        .filter_map(|t| t.segments.get(TOPOLOGY_NODE_KEY))
        .map(String::as_str)
        .collect();
    assert_eq!(nodes, vec!["compute-1", "n1", "n2", "n3"]);

    // Same request (different spelling of the same bandwidth) → same volume.
    let again = create(
        &c,
        create_req("pvc-a", 8192, &[("maxBandwidth", "1048576")]),
    )
    .await
    .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.capacity_bytes, v.capacity_bytes);
    assert_eq!(
        code(create(&c, create_req("pvc-a", 2 * GIB as i64, &[])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(create(&c, create_req("pvc-a", 5000, &[("maxBandwidth", "2Mi")])).await),
        Code::AlreadyExists
    );
    let mut block = create_req("pvc-a", 5000, &[("maxBandwidth", "1Mi")]);
    block.volume_capabilities = vec![block_cap()];
    assert_eq!(code(create(&c, block).await), Code::AlreadyExists);
}

#[tokio::test]
async fn create_validates_its_arguments() {
    let c = three_nodes().await;
    assert_eq!(
        code(create(&c, create_req("", 0, &[])).await),
        Code::InvalidArgument
    );
    let mut no_caps = create_req("x", 0, &[]);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(create(&c, no_caps).await), Code::InvalidArgument);
    let mut multi = create_req("x", 0, &[]);
    multi.volume_capabilities[0].access_mode = Some(AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    assert_eq!(code(create(&c, multi).await), Code::InvalidArgument);
    assert_eq!(
        code(create(&c, create_req("x", -1, &[])).await),
        Code::InvalidArgument
    );
    let mut small_limit = create_req("x", 5000, &[]);
    small_limit.capacity_range = Some(CapacityRange {
        required_bytes: 5000,
        limit_bytes: 6000,
    });
    assert_eq!(code(create(&c, small_limit).await), Code::OutOfRange);
    let err = create(&c, create_req("x", 0, &[("replicas", "3")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("replicas"));
    let err = create(&c, create_req("x", 0, &[("fsType", "zfs")]))
        .await
        .unwrap_err();
    assert!(err.message().contains("fsType") && err.message().contains("zfs"));
    let mut conflict = create_req("x", 0, &[("fsType", "ext4")]);
    conflict.volume_capabilities = vec![mount_cap("xfs")];
    assert_eq!(code(create(&c, conflict).await), Code::InvalidArgument);
    let mut clone = create_req("x", 0, &[]);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "tv-1".into(),
            },
        )),
    });
    assert_eq!(code(create(&c, clone).await), Code::InvalidArgument);
    // Keys of external-provisioner's extra metadata are accepted.
    let ok = create(
        &c,
        create_req(
            "x",
            0,
            &[("csi.storage.k8s.io/pvc/name", "data"), ("fsType", "xfs")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok.capacity_bytes, GIB as i64);
    assert!(!ok
        .volume_context
        .keys()
        .any(|k| k.starts_with("csi.storage.k8s.io/")));
    // Nothing was created by the rejected calls.
    assert_eq!(c.daemons[0].volume_count(), 1);
}

#[tokio::test]
async fn placement_failures_map_to_out_of_range_or_resource_exhausted() {
    let c = Cluster::start(
        &[
            ("n1", "z1", 10 * GIB),
            ("n2", "z1", 10 * GIB),
            ("n3", "z2", 10 * GIB),
        ],
        &[],
    )
    .await;
    let err = create(&c, create_req("big", 20 * GIB as i64, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("only 0 node(s)"),
        "{}",
        err.message()
    );
    assert_eq!(
        code(create(&c, create_req("rf4", 0, &[("replicationFactor", "4")])).await),
        Code::OutOfRange
    );

    let mut zoned = create_req("zoned", 0, &[]);
    zoned.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), "z1".to_string())]),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(create(&c, zoned.clone()).await),
        Code::ResourceExhausted
    );
    zoned
        .parameters
        .insert("replicationFactor".into(), "2".into());
    let v = create(&c, zoned).await.unwrap();
    assert_eq!(
        v.accessible_topology.len(),
        1,
        "requisite topology is returned as is"
    );
    assert!(c.daemon("n3").volume(&v.volume_id).is_none());
    assert!(
        c.daemon("n1").volume(&v.volume_id).is_some()
            && c.daemon("n2").volume(&v.volume_id).is_some()
    );
}

#[tokio::test]
async fn data_locality_puts_a_replica_on_the_preferred_node() {
    let nodes: Vec<(String, u64)> = (1..=6).map(|i| (format!("n{i}"), 10 * GIB)).collect();
    let spec: Vec<(&str, &str, u64)> = nodes.iter().map(|(n, c)| (n.as_str(), "", *c)).collect();
    let c = Cluster::start(&spec, &[]).await;
    for i in 0..6 {
        let mut r = create_req(
            &format!("loc-{i}"),
            0,
            &[("dataLocality", "best-effort"), ("replicationFactor", "2")],
        );
        r.accessibility_requirements = Some(TopologyRequirement {
            requisite: vec![],
            preferred: vec![Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), "n5".to_string())]),
            }],
        });
        let v = create(&c, r).await.unwrap();
        assert!(
            c.daemon("n5").volume(&v.volume_id).is_some(),
            "volume {i} has no replica on n5"
        );
    }
}

#[tokio::test]
async fn publish_raises_the_epoch_once_and_follows_the_spec() {
    let c = three_nodes().await;
    let v = create(&c, create_req("pub", 0, &[])).await.unwrap();
    let id = v.volume_id.clone();
    let ctl = &c.controller;

    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish_req("", "n1", false)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish_req(&id, "", false)))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_cap = publish_req(&id, "n1", false);
    no_cap.volume_capability = None;
    assert_eq!(
        code(ctl.controller_publish_volume(Request::new(no_cap)).await),
        Code::InvalidArgument
    );
    let ghost = volume_id_for_name("ghost");
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish_req(&ghost, "n1", false)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish_req(&id, "nowhere", false)))
                .await
        ),
        Code::NotFound
    );

    let ctx = ctl
        .controller_publish_volume(Request::new(publish_req(&id, "compute-1", false)))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["epoch"], "1");
    assert_eq!(ctx["sizeBytes"], GIB.to_string());
    let mut listed: Vec<&str> = ctx["replicas"].split(',').collect();
    listed.sort();
    assert_eq!(
        listed,
        vec!["n1=data-n1:7001", "n2=data-n2:7001", "n3=data-n3:7001"]
    );
    for d in &c.daemons {
        let rec = d.volume(&id).unwrap();
        assert_eq!(rec.epoch, 1);
        assert_eq!(rec.attachments.len(), 1);
    }

    // Idempotent: same answer, no new epoch.
    let again = ctl
        .controller_publish_volume(Request::new(publish_req(&id, "compute-1", false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.publish_context, ctx);
    assert!(c.daemons.iter().all(|d| d.volume(&id).unwrap().epoch == 1));
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish_req(&id, "compute-1", true)))
                .await
        ),
        Code::AlreadyExists
    );
    let err = ctl
        .controller_publish_volume(Request::new(publish_req(&id, "n2", false)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("compute-1"));

    // Published volumes cannot be deleted; listing shows where it is published.
    let del = ctl
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(del), Code::FailedPrecondition);
    let list = ctl
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.entries[0].status.as_ref().unwrap().published_node_ids,
        vec!["compute-1".to_string()]
    );

    // Unpublish (twice: idempotent; unknown volume and node are fine too).
    for _ in 0..2 {
        ctl.controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "compute-1".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    ctl.controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
        volume_id: ghost.clone(),
        node_id: "x".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        code(
            ctl.controller_unpublish_volume(Request::new(
                ControllerUnpublishVolumeRequest::default()
            ))
            .await
        ),
        Code::InvalidArgument
    );
    assert!(c
        .daemons
        .iter()
        .all(|d| d.volume(&id).unwrap().attachments.is_empty()));

    // Moving to another node fences the old one with a higher epoch.
    let ctx2 = ctl
        .controller_publish_volume(Request::new(publish_req(&id, "n2", true)))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx2["epoch"], "2");
}

#[tokio::test]
async fn a_minority_down_is_tolerated_a_majority_is_unavailable() {
    let c = three_nodes().await;
    let id = create(&c, create_req("deg", 0, &[]))
        .await
        .unwrap()
        .volume_id;
    let ctl = &c.controller;
    c.daemon("n3").set_down(true);
    let ctx = ctl
        .controller_publish_volume(Request::new(publish_req(&id, "n1", false)))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["epoch"], "1");
    let got = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(
        !cond.abnormal && cond.message.contains("degraded"),
        "{cond:?}"
    );

    c.daemon("n2").set_down(true);
    let got = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
    let unpub = ctl
        .controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n1".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(unpub), Code::Unavailable);
    // A new volume cannot be placed on three nodes with only one live.
    assert_eq!(
        code(create(&c, create_req("more", 0, &[])).await),
        Code::OutOfRange
    );

    c.daemon("n2").set_down(false);
    ctl.controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "n1".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    // Delete with n3 still down: UNAVAILABLE and the volume stays listed.
    let del = ctl
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(del), Code::Unavailable);
    let list = ctl
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    c.daemon("n3").set_down(false);
    ctl.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(c.daemons.iter().all(|d| d.volume(&id).is_none()));
    let list = ctl
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.is_empty());
    // Deleting again, or an id that never existed, is fine.
    ctl.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    }))
    .await
    .unwrap();
    ctl.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: "garbage".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        code(
            ctl.delete_volume(Request::new(DeleteVolumeRequest::default()))
                .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn a_restarted_controller_loses_no_volume_and_pages_through_them() {
    let mut c = three_nodes().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            create(&c, create_req(&format!("v{i}"), 4096, &[]))
                .await
                .unwrap()
                .volume_id,
        );
    }
    c.controller
        .controller_publish_volume(Request::new(publish_req(&ids[0], "n1", false)))
        .await
        .unwrap();
    c.restart_controller().await;
    let ctl = &c.controller;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(Request::new(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(
        code(
            ctl.list_volumes(Request::new(ListVolumesRequest {
                max_entries: 0,
                starting_token: "invalid-token".into()
            }))
            .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            ctl.list_volumes(Request::new(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new()
            }))
            .await
        ),
        Code::InvalidArgument
    );

    // The attachment survived the restart: republishing is idempotent, moving is refused.
    let ctx = ctl
        .controller_publish_volume(Request::new(publish_req(&ids[0], "n1", false)))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["epoch"], "1");
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish_req(&ids[0], "n2", false)))
                .await
        ),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn a_create_interrupted_after_one_replica_is_completed_by_the_retry() {
    let c = three_nodes().await;
    // A previous controller placed the volume on n1..n3 but crashed after creating it
    // on n2 only.
    let name = "half-done";
    let id = volume_id_for_name(name);
    let replicas: Vec<ReplicaRef> = c
        .daemons
        .iter()
        .map(|d| {
            let info = d.state.lock().unwrap().info.clone();
            ReplicaRef {
                node_id: info.node_id,
                zone: info.zone,
                control_address: d.address.clone(),
                data_address: info.data_address,
            }
        })
        .collect();
    let params: HashMap<String, String> = [
        ("replicationFactor", "3"),
        ("fsType", "ext4"),
        ("checksum", "crc32c"),
        ("dataLocality", "disabled"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let rec = VolumeRecord {
        volume_id: id.clone(),
        name: name.into(),
        size_bytes: GIB,
        replication_factor: 3,
        replicas,
        parameters: params,
        generation: 1,
        access_type: "mount".into(),
        ..Default::default()
    };
    c.daemon("n2")
        .state
        .lock()
        .unwrap()
        .volumes
        .insert(id.clone(), rec);

    let v = create(&c, create_req(name, GIB as i64, &[])).await.unwrap();
    assert_eq!(v.volume_id, id);
    assert!(
        c.daemons.iter().all(|d| d.volume(&id).is_some()),
        "retry completed the replica set"
    );
}

#[tokio::test]
async fn capacity_validate_and_get_volume() {
    let c = Cluster::start(
        &[
            ("n1", "z1", 10 * GIB),
            ("n2", "z1", 20 * GIB),
            ("n3", "z2", 30 * GIB),
        ],
        &[],
    )
    .await;
    let ctl = &c.controller;
    let cap = ctl
        .get_capacity(Request::new(GetCapacityRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, (60 * GIB) as i64);
    assert_eq!(cap.maximum_volume_size, Some((10 * GIB) as i64));
    let rf1 = GetCapacityRequest {
        parameters: HashMap::from([("replicationFactor".to_string(), "1".to_string())]),
        ..Default::default()
    };
    assert_eq!(
        ctl.get_capacity(Request::new(rf1))
            .await
            .unwrap()
            .into_inner()
            .maximum_volume_size,
        Some((30 * GIB) as i64)
    );
    let z1 = GetCapacityRequest {
        accessible_topology: Some(Topology {
            segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), "z1".to_string())]),
        }),
        ..Default::default()
    };
    let cap = ctl
        .get_capacity(Request::new(z1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, (30 * GIB) as i64);
    assert_eq!(
        cap.maximum_volume_size,
        Some(0),
        "two nodes in z1 cannot hold three replicas"
    );
    let bad = GetCapacityRequest {
        parameters: HashMap::from([("bogus".to_string(), "1".to_string())]),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.get_capacity(Request::new(bad)).await),
        Code::InvalidArgument
    );

    let v = create(&c, create_req("val", 0, &[])).await.unwrap();
    let cap = ctl
        .get_capacity(Request::new(GetCapacityRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, (57 * GIB) as i64);

    let validate = |caps: Vec<VolumeCapability>, id: &str| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = ctl
        .validate_volume_capabilities(Request::new(validate(
            vec![mount_cap("ext4")],
            &v.volume_id,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let xfs = ctl
        .validate_volume_capabilities(Request::new(validate(vec![mount_cap("xfs")], &v.volume_id)))
        .await
        .unwrap()
        .into_inner();
    assert!(xfs.confirmed.is_none() && !xfs.message.is_empty());
    let blk = ctl
        .validate_volume_capabilities(Request::new(validate(vec![block_cap()], &v.volume_id)))
        .await
        .unwrap()
        .into_inner();
    assert!(blk.confirmed.is_none());
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(Request::new(validate(vec![], &v.volume_id)))
                .await
        ),
        Code::InvalidArgument
    );
    let ghost = volume_id_for_name("ghost");
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(Request::new(validate(vec![mount_cap("")], &ghost)))
                .await
        ),
        Code::NotFound
    );

    let got = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().volume_id, v.volume_id);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            ctl.controller_get_volume(Request::new(ControllerGetVolumeRequest {
                volume_id: ghost
            }))
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let c = three_nodes().await;
    let calls = (0..8).map(|_| create(&c, create_req("race", 0, &[])));
    let results = tessera_controller::replica_pool::join_all(calls).await;
    let ids: std::collections::BTreeSet<String> =
        results.into_iter().map(|r| r.unwrap().volume_id).collect();
    assert_eq!(ids.len(), 1);
    assert!(c.daemons.iter().all(|d| d.volume_count() == 1));
}
