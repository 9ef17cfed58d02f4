//! CSI ControllerModifyVolume end to end: the real `tessera-controller` binary over its
//! unix socket in front of three real `tessera-replica` daemons (`support::Cluster`).
//!
//! Covered: the MODIFY_VOLUME capability; a modify reaching every replica's record
//! (normalised, other parameters kept, attachments and epoch untouched on a published
//! volume); idempotency; INVALID_ARGUMENT naming the key for immutable, unknown and
//! invalid keys and for conflicts, with nothing changed; NOT_FOUND for unknown volumes;
//! a modify with one replica down (majority); VolumeAttributesClass parameters at
//! CreateVolume. That each daemon applies the new QoS to the live volume is shown by
//! the replica crate's `daemon_qos` test.
//!
//! Needs `target/debug/tessera-replica` (`cargo build -p tessera-replica`).

mod support;

use std::collections::HashMap;

use support::{Cluster, NodeSpec, GIB};
use tessera_controller::volume_index::volume_id_for_name;
use tessera_csi_proto::v1::controller_service_capability::rpc::Type as RpcType;
use tessera_csi_proto::v1::controller_service_capability::Type as CapType;
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use tessera_csi_proto::v1::*;
use tonic::Code;

const THREE_NODES: &[NodeSpec<'static>] = &[
    ("n1", "", 10 * GIB),
    ("n2", "", 10 * GIB),
    ("n3", "", 10 * GIB),
];

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create_req(name: &str, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: map(params),
        ..Default::default()
    }
}

fn modify_req(id: &str, params: &[(&str, &str)]) -> ControllerModifyVolumeRequest {
    ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: map(params),
        ..Default::default()
    }
}

/// (generation, parameters, attachments, epoch) of the volume on every replica but
/// those of nodes in `down`.
async fn records_except(
    c: &Cluster,
    id: &str,
    down: &[&str],
) -> Vec<(u64, HashMap<String, String>, usize, u64)> {
    let mut out = Vec::new();
    for d in c.replicas.iter().filter(|d| !down.contains(&d.node_id())) {
        if let Some(r) = d.volume(id).await {
            out.push((r.generation, r.parameters, r.attachments.len(), r.epoch));
        }
    }
    out
}

async fn records(c: &Cluster, id: &str) -> Vec<(u64, HashMap<String, String>, usize, u64)> {
    records_except(c, id, &[]).await
}

#[tokio::test]
async fn modify_volume_changes_qos_on_a_majority_and_refuses_bad_input() {
    let mut c = Cluster::start(THREE_NODES, &["compute-1"]).await;
    let mut ctl = c.ctl().await;

    let caps = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner()
        .capabilities;
    assert!(caps.iter().any(|cap| matches!(
        cap.r#type,
        Some(CapType::Rpc(r)) if r.r#type == RpcType::ModifyVolume as i32
    )));

    let id = ctl
        .create_volume(create_req(
            "pvc-m",
            &[("maxIOPS", "1000"), ("fsType", "xfs")],
        ))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    ctl.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "compute-1".into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    })
    .await
    .expect("publish");
    let before = records(&c, &id).await;
    assert_eq!(before.len(), 3);

    ctl.controller_modify_volume(modify_req(
        &id,
        &[
            ("maxIOPS", "500"),
            ("maxBandwidth", "1Mi"),
            ("burstDuration", "2s"),
        ],
    ))
    .await
    .expect("modify");
    let after = records(&c, &id).await;
    for ((g0, _, att0, epoch0), (g1, p, att1, epoch1)) in before.iter().zip(&after) {
        assert_eq!(*g1, g0 + 1, "one CAS round per replica");
        assert_eq!(p.get("maxIOPS").map(String::as_str), Some("500"));
        assert_eq!(p.get("maxBandwidth").map(String::as_str), Some("1048576"));
        assert_eq!(p.get("burstDuration").map(String::as_str), Some("2000ms"));
        assert_eq!(p.get("fsType").map(String::as_str), Some("xfs"), "kept");
        assert_eq!(
            (att1, epoch1),
            (att0, epoch0),
            "still published, same epoch"
        );
    }
    // The volume context reflects the new parameters.
    let vol = ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        vol.volume_context.get("maxIOPS").map(String::as_str),
        Some("500")
    );

    // Idempotent: the same request again writes nothing.
    ctl.controller_modify_volume(modify_req(&id, &[("maxIOPS", "500")]))
        .await
        .expect("repeat");
    assert_eq!(records(&c, &id).await, after);

    // Refused requests name the key and change nothing.
    for (params, named) in [
        (&[("replicationFactor", "5")][..], "replicationFactor"),
        (&[("fsType", "ext4")][..], "fsType"),
        (&[("iops", "5")][..], "iops"),
        (&[("maxIOPS", "-1")][..], "maxIOPS"),
        (&[("maxBandwidth", "10Xi")][..], "maxBandwidth"),
        (&[("minIOPS", "600")][..], "minIOPS"),
        (&[("burstDuration", "0ms")][..], "burstDuration"),
    ] {
        let err = ctl
            .controller_modify_volume(modify_req(&id, params))
            .await
            .expect_err(named);
        assert_eq!(err.code(), Code::InvalidArgument, "{named}: {err:?}");
        assert!(err.message().contains(named), "{named}: {}", err.message());
    }
    // An empty map changes nothing and is not an error (absent keys modify nothing).
    ctl.controller_modify_volume(modify_req(&id, &[]))
        .await
        .expect("an empty modify is a no-op");
    let err = ctl
        .controller_modify_volume(modify_req("", &[("maxIOPS", "1")]))
        .await
        .expect_err("no id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(records(&c, &id).await, after);

    for ghost in [volume_id_for_name("ghost"), "not-a-volume".to_string()] {
        for params in [&[("maxIOPS", "1")][..], &[]] {
            let err = ctl
                .controller_modify_volume(modify_req(&ghost, params))
                .await
                .expect_err("unknown volume");
            assert_eq!(err.code(), Code::NotFound, "{ghost} {params:?}");
        }
    }

    // With one replica down a majority still takes the change; 0 lifts the limit.
    c.replica_mut("n3").kill();
    ctl.controller_modify_volume(modify_req(&id, &[("maxIOPS", "0")]))
        .await
        .expect("modify on a majority");
    let live = records_except(&c, &id, &["n3"]).await;
    assert_eq!(live.len(), 2);
    for (_, p, _, _) in &live {
        assert!(!p.contains_key("maxIOPS"), "limit lifted: {p:?}");
        assert_eq!(p.get("maxBandwidth").map(String::as_str), Some("1048576"));
    }
}

#[tokio::test]
async fn create_applies_volume_attributes_class_parameters() {
    let c = Cluster::start(THREE_NODES, &[]).await;
    let mut ctl = c.ctl().await;
    let mut req = create_req("pvc-vac", &[("maxIOPS", "1000")]);
    req.mutable_parameters = map(&[("maxIOPS", "300"), ("minIOPS", "100")]);
    let id = ctl
        .create_volume(req)
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    for (_, p, _, _) in records(&c, &id).await {
        assert_eq!(p.get("maxIOPS").map(String::as_str), Some("300"));
        assert_eq!(p.get("minIOPS").map(String::as_str), Some("100"));
    }
    let mut bad = create_req("pvc-vac-bad", &[]);
    bad.mutable_parameters = map(&[("replicationFactor", "1")]);
    let err = ctl.create_volume(bad).await.expect_err("immutable");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("replicationFactor"));
}
