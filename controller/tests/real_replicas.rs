//! The `tessera-controller` binary against three real `tessera-replica` daemons, over
//! its unix socket: create, publish, restart the controller, republish, unpublish,
//! delete, and placement after a daemon dies.
//!
//! Needs `target/debug/tessera-replica` (`cargo build -p tessera-replica`, which the
//! test command runs first): without it the test fails saying so, it never passes
//! without running. The full cross-process suite lives in the `tests/` crate.
//!
//! The replica ports use mutual TLS with a CA made for each test in its temp
//! directory (`support::cluster_tls`): the daemons present the replica certificate,
//! the controller the controller certificate.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::cluster_tls_dir;
use tessera_csi_proto::v1::controller_client::ControllerClient;
use tessera_csi_proto::v1::identity_client::IdentityClient;
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use tessera_csi_proto::v1::*;
use tessera_tls::Identity;
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);

/// The replica daemon binary; panics saying how to build it when it is missing.
fn replica_binary() -> PathBuf {
    use tessera_tests::binaries;
    binaries::locate(binaries::REPLICA).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls `f` until it returns `Some` or the deadline passes.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_replica(bin: &Path, dir: &Path, node: &str) -> (Child, String) {
    let data = dir.join(node);
    let ready = dir.join(format!("{node}.ready"));
    let child = Command::new(bin)
        .args(["--data-dir", data.to_str().unwrap_or_default()])
        .arg("--tls-dir")
        .arg(cluster_tls_dir(dir, Identity::Replica))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-listen",
            "127.0.0.1:0",
            "--node-id",
            node,
            "--zone",
            "",
        ])
        .args([
            "--capacity",
            "10Gi",
            "--ready-file",
            ready.to_str().unwrap_or_default(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tessera-replica");
    let control = wait_for("replica ready file", || {
        let ready = ready.clone();
        async move {
            let text = std::fs::read_to_string(&ready).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v.get("control")?.as_str().map(str::to_string)
        }
    })
    .await;
    (child, control)
}

/// The controller on `sock`, with the controller certificate of the cluster in the
/// socket's directory.
fn start_controller(sock: &Path, replicas: &[String]) -> Child {
    let dir = sock
        .parent()
        .expect("the socket is in the test's directory");
    Command::new(env!("CARGO_BIN_EXE_tessera-controller"))
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .arg("--tls-dir")
        .arg(cluster_tls_dir(dir, Identity::Controller))
        .arg("--replicas")
        .arg(replicas.join(","))
        .args(["--extra-nodes", "compute-1", "--rpc-timeout-ms", "2000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tessera-controller")
}

async fn connect(sock: &Path) -> Channel {
    let path = sock.to_path_buf();
    wait_for("controller socket", || {
        let path = path.clone();
        async move {
            let channel = tessera_csi_proto::unix_channel::connect_unix(
                tessera_csi_proto::unix_channel::unix_endpoint(),
                &path,
            )
            .await
            .ok()?;
            let probe = IdentityClient::new(channel.clone())
                .probe(ProbeRequest {})
                .await
                .ok()?;
            (probe.into_inner().ready == Some(true)).then_some(channel)
        }
    })
    .await
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn publish(id: &str, node: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }
}

#[tokio::test]
async fn controller_binary_against_real_replicas() {
    let bin = replica_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemons = Vec::new();
    let mut addrs = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let (child, control) = start_replica(&bin, dir.path(), n).await;
        daemons.push(child);
        addrs.push(control);
    }
    let sock = dir.path().join("csi.sock");
    // A stale socket file must not stop the controller from starting.
    std::fs::write(&sock, b"stale").expect("stale socket");
    let mut controller = start_controller(&sock, &addrs);
    let mut ctl = ControllerClient::new(connect(&sock).await);

    let info = IdentityClient::new(connect(&sock).await)
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "tessera.csi.dev");

    let vol = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-real".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.capacity_bytes, 64 << 20);
    let id = vol.volume_id.clone();
    let ctx = ctl
        .controller_publish_volume(publish(&id, "compute-1"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["epoch"], "1");
    assert_eq!(ctx["replicas"].split(',').count(), 3);

    // Restart the controller: the volume and its attachment come back from the records.
    controller.kill().await.expect("kill controller");
    controller = start_controller(&sock, &addrs);
    let mut ctl = ControllerClient::new(connect(&sock).await);
    let list = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(
        list.entries[0].status.as_ref().unwrap().published_node_ids,
        vec!["compute-1".to_string()]
    );
    let again = ctl
        .controller_publish_volume(publish(&id, "compute-1"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again["epoch"], "1", "republish is idempotent");

    let del = ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(del.unwrap_err().code(), Code::FailedPrecondition);
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "compute-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let moved = ctl
        .controller_publish_volume(publish(&id, "n2"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(moved["epoch"], "2");
    ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .is_empty());

    // With one daemon dead, three replicas cannot be placed; two can.
    daemons[2].kill().await.expect("kill replica");
    let create = |name: &str, rf: &str| CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 4096,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: [("replicationFactor".to_string(), rf.to_string())].into(),
        ..Default::default()
    };
    assert_eq!(
        ctl.create_volume(create("rf3", "3"))
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    ctl.create_volume(create("rf2", "2")).await.unwrap();
    controller.kill().await.expect("kill controller");
}

/// ControllerExpandVolume against real daemons: growth reaches every replica and is
/// recorded (a restarted controller sees it), a repeat is a no-op, a shrink is
/// OUT_OF_RANGE, an unknown volume NOT_FOUND, a missing range INVALID_ARGUMENT.
#[tokio::test]
async fn expansion_codes_against_real_replicas() {
    let bin = replica_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemons = Vec::new();
    let mut addrs = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let (child, control) = start_replica(&bin, dir.path(), n).await;
        daemons.push(child);
        addrs.push(control);
    }
    let sock = dir.path().join("csi.sock");
    let mut controller = start_controller(&sock, &addrs);
    let mut ctl = ControllerClient::new(connect(&sock).await);
    let id = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-grow".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let expand = |id: &str, bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let grown = ctl
        .controller_expand_volume(expand(&id, (128 << 20) - 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        grown.capacity_bytes,
        128 << 20,
        "rounded up to whole blocks"
    );
    assert!(grown.node_expansion_required);
    let again = ctl
        .controller_expand_volume(expand(&id, 128 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.capacity_bytes, 128 << 20, "repeat is idempotent");
    assert_eq!(
        ctl.controller_expand_volume(expand(&id, 64 << 20))
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    assert_eq!(
        ctl.controller_expand_volume(expand("tv-00000000000000000000000000000000", 1 << 30))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut missing = expand(&id, 1 << 30);
    missing.capacity_range = None;
    assert_eq!(
        ctl.controller_expand_volume(missing)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        ctl.controller_expand_volume(expand("", 1 << 30))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // More than a daemon offers: RESOURCE_EXHAUSTED, and nothing changes.
    assert_eq!(
        ctl.controller_expand_volume(expand(&id, 20 << 30))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );

    // The size lives in the replicas' records: a new controller reports it.
    controller.kill().await.expect("kill controller");
    controller = start_controller(&sock, &addrs);
    let mut ctl = ControllerClient::new(connect(&sock).await);
    let got = ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.capacity_bytes, 128 << 20);

    // With one replica down a majority still expands.
    daemons[2].kill().await.expect("kill replica");
    let grown = ctl
        .controller_expand_volume(expand(&id, 256 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 256 << 20);
    controller.kill().await.expect("kill controller");
}

/// Snapshot RPCs against real daemons: codes, idempotency by name, listing filters and
/// pages, a controller restart losing nothing, and snapshots outliving their volume.
#[tokio::test]
async fn snapshots_against_real_replicas() {
    let bin = replica_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemons = Vec::new();
    let mut addrs = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let (child, control) = start_replica(&bin, dir.path(), n).await;
        daemons.push(child);
        addrs.push(control);
    }
    let sock = dir.path().join("csi.sock");
    let mut controller = start_controller(&sock, &addrs);
    let mut ctl = ControllerClient::new(connect(&sock).await);
    let create = |name: &str| CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 16 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    };
    let a = ctl
        .create_volume(create("snap-src-a"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let b = ctl
        .create_volume(create("snap-src-b"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let snap = |name: &str, source: &str| CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    let s1 = ctl
        .create_snapshot(snap("s1", &a))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s1.ready_to_use);
    assert_eq!(s1.size_bytes, 16 << 20);
    assert_eq!(s1.source_volume_id, a);
    assert!(s1.creation_time.is_some());
    let again = ctl
        .create_snapshot(snap("s1", &a))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again, s1, "idempotent by name");
    let code =
        |r: Result<tonic::Response<CreateSnapshotResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(ctl.create_snapshot(snap("s1", &b)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            ctl.create_snapshot(snap("s9", "tv-00000000000000000000000000000000"))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(ctl.create_snapshot(snap("", &a)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_snapshot(snap("s9", "")).await),
        Code::InvalidArgument
    );
    let s2 = ctl
        .create_snapshot(snap("s2", &a))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let s3 = ctl
        .create_snapshot(snap("s3", &b))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();

    // A restarted controller finds every snapshot on the replicas.
    controller.kill().await.expect("kill controller");
    controller = start_controller(&sock, &addrs);
    let mut ctl = ControllerClient::new(connect(&sock).await);
    let list = |max: i32, token: &str, id: &str, source: &str| ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        snapshot_id: id.into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    let all = ctl
        .list_snapshots(list(0, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 3);
    let of_a = ctl
        .list_snapshots(list(0, "", "", &a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_a.entries.len(), 2);
    let one = ctl
        .list_snapshots(list(0, "", &s3.snapshot_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.entries.len(), 1);
    assert!(ctl
        .list_snapshots(list(0, "", "ts-nope", ""))
        .await
        .unwrap()
        .into_inner()
        .entries
        .is_empty());
    let page1 = ctl
        .list_snapshots(list(2, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.entries.len(), 2);
    assert!(!page1.next_token.is_empty());
    let page2 = ctl
        .list_snapshots(list(2, &page1.next_token, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.entries.len(), 1);
    assert!(page2.next_token.is_empty());
    assert_eq!(
        ctl.list_snapshots(list(0, "bogus", "", ""))
            .await
            .unwrap_err()
            .code(),
        Code::Aborted
    );
    let got = ctl
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: s2.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.snapshot_id, s2.snapshot_id);
    assert_eq!(
        ctl.get_snapshot(GetSnapshotRequest {
            snapshot_id: "ts-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // Snapshots outlive their volume.
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: a.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let of_a = ctl
        .list_snapshots(list(0, "", "", &a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(of_a.entries.len(), 2, "snapshots survive DeleteVolume");
    assert!(ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .iter()
        .all(|e| e.volume.as_ref().is_some_and(|v| v.volume_id != a)));
    for s in [&s1, &s2, &s3, &s1] {
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(ctl
        .list_snapshots(list(0, "", "", ""))
        .await
        .unwrap()
        .into_inner()
        .entries
        .is_empty());
    assert_eq!(
        ctl.delete_snapshot(DeleteSnapshotRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // The deleted volume's last snapshot took its files with it: the name is free.
    ctl.create_volume(create("snap-src-a")).await.unwrap();
    controller.kill().await.expect("kill controller");
}
