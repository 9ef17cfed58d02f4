//! Restore, clone and SnapshotMetadata against real daemons: the real
//! `tessera-controller` over its unix socket in front of real `tessera-replica`
//! daemons (`support::Cluster`). Data goes in through the replica data plane (as an
//! engine writes it: every replica, an epoch, increasing seqs) and is read back from
//! every replica of the restored or cloned volume.
//!
//! Slow copies are made with the daemons' `--copy-max-bandwidth`, so "still
//! copying" is a state the test can rely on, not a race it hopes to win.
//!
//! Needs `target/debug/tessera-replica` (`cargo build -p tessera-replica`).

mod support;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use support::{Cluster, NodeSpec, RealReplica, GIB};
use tessera_controller::snapshots::clone_snapshot_id;
use tessera_controller::volume_index::volume_id_for_name;
use tessera_csi_proto::v1::plugin_capability::service::Type as ServiceType;
use tessera_csi_proto::v1::plugin_capability::Type as PluginCapType;
use tessera_csi_proto::v1::volume_capability::access_mode::Mode;
use tessera_csi_proto::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use tessera_csi_proto::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use tessera_csi_proto::v1::*;
use tessera_replica_protocol::control_proto::{
    CreateSnapshotRequest as ReplicaSnapshotRequest, ListSnapshotsRequest as ReplicaListSnapshots,
};
use tessera_tests::direct_io::pattern;
use tessera_tests::poll_until;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// The epoch the test writes and reads with, as an engine of the first publish would.
const EPOCH: u64 = 1;
/// Upper bound on a restore or clone in these tests.
const COPY_DEADLINE: Duration = Duration::from_secs(60);

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

/// CreateVolume of `name`, of `size` bytes (`None`: no capacity range).
fn create_req(name: &str, size: Option<u64>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: size.map(|s| CapacityRange {
            required_bytes: s as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

/// `req` restricted to the daemons of `zone`.
fn in_zone(mut req: CreateVolumeRequest, zone: &str) -> CreateVolumeRequest {
    let topology = Topology {
        segments: [(
            tessera_csi_proto::TOPOLOGY_ZONE_KEY.to_owned(),
            zone.to_owned(),
        )]
        .into(),
    };
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topology.clone()],
        preferred: vec![topology],
    });
    req
}

fn from_snapshot(mut req: CreateVolumeRequest, snapshot_id: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(snapshot_source(snapshot_id));
    req
}

fn from_volume(mut req: CreateVolumeRequest, volume_id: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(volume_source(volume_id));
    req
}

fn snapshot_source(id: &str) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })),
    }
}

fn volume_source(id: &str) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.into(),
        })),
    }
}

async fn create(c: &Cluster, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
    c.ctl()
        .await
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

/// CreateVolume repeated while it answers ABORTED (the copy is still running), as
/// the CO retries; returns the volume and the ABORTED messages seen.
async fn create_until_copied(c: &Cluster, req: CreateVolumeRequest) -> (Volume, Vec<String>) {
    let aborted = RefCell::new(Vec::new());
    let volume = poll_until(COPY_DEADLINE, || {
        let req = req.clone();
        let aborted = &aborted;
        async move {
            match create(c, req).await {
                Ok(v) => Some(v),
                Err(s) if s.code() == Code::Aborted => {
                    aborted.borrow_mut().push(s.message().to_string());
                    None
                }
                Err(s) => panic!("CreateVolume failed: {s:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|t| {
        panic!(
            "the copy did not finish: {t}; last: {:?}",
            aborted.borrow().last()
        )
    });
    (volume, aborted.into_inner())
}

async fn snapshot(c: &Cluster, name: &str, volume_id: &str) -> Snapshot {
    c.ctl()
        .await
        .create_snapshot(CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot")
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// One write: offset and bytes (block multiples).
type Write = (u64, Vec<u8>);

/// Writes on every replica of `volume_id`, with seqs from `first_seq` on, and flushes.
async fn write_everywhere(c: &Cluster, volume_id: &str, writes: &[Write], first_seq: u64) {
    for r in replicas_of(c, volume_id).await {
        let client = r
            .data_client(volume_id, EPOCH)
            .await
            .unwrap_or_else(|e| panic!("data plane of {}: {e}", r.node_id()));
        for (i, (offset, data)) in writes.iter().enumerate() {
            let seq = (EPOCH << 40) | (first_seq + i as u64);
            client
                .write(*offset, data.clone(), seq)
                .await
                .unwrap_or_else(|e| panic!("write at {offset} on {}: {e}", r.node_id()));
        }
        client.flush().await.expect("flush");
    }
}

/// Trims `len` bytes at `offset` on every replica of `volume_id`.
async fn trim_everywhere(c: &Cluster, volume_id: &str, offset: u64, len: u64, seq: u64) {
    for r in replicas_of(c, volume_id).await {
        let client = r.data_client(volume_id, EPOCH).await.expect("data plane");
        client
            .trim(offset, len, (EPOCH << 40) | seq)
            .await
            .expect("trim");
        client.flush().await.expect("flush");
    }
}

/// The daemons holding a replica of `volume_id`.
async fn replicas_of<'a>(c: &'a Cluster, volume_id: &str) -> Vec<&'a RealReplica> {
    let mut out = Vec::new();
    for node in c.holders(volume_id).await {
        out.push(c.replica(&node));
    }
    assert!(!out.is_empty(), "no replica holds {volume_id}");
    out
}

/// The whole content of one replica of `volume_id`, read over the data plane.
async fn read_image(r: &RealReplica, volume_id: &str, size: u64) -> Vec<u8> {
    let client = r
        .data_client(volume_id, EPOCH)
        .await
        .unwrap_or_else(|e| panic!("data plane of {} for {volume_id}: {e}", r.node_id()));
    let mut image = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(4 * MIB);
        image.extend(client.read(offset, len as u32).await.expect("read"));
        offset += len;
    }
    image
}

/// `size` zero bytes with `writes` applied.
fn expected_image(size: u64, writes: &[Write]) -> Vec<u8> {
    let mut image = vec![0u8; size as usize];
    for (offset, data) in writes {
        let o = *offset as usize;
        image[o..o + data.len()].copy_from_slice(data);
    }
    image
}

/// Every replica of `volume_id` holds `expected` (compared as whole images, reported
/// by the first differing offset).
async fn assert_replicas_hold(c: &Cluster, volume_id: &str, expected: &[u8]) {
    for r in replicas_of(c, volume_id).await {
        let got = read_image(r, volume_id, expected.len() as u64).await;
        let first_diff = got.iter().zip(expected).position(|(a, b)| a != b);
        assert!(
            got.len() == expected.len() && first_diff.is_none(),
            "replica {} of {volume_id} differs at byte {first_diff:?}",
            r.node_id()
        );
    }
}

/// Snapshot ids every daemon holds (user and internal).
async fn daemon_snapshot_ids(c: &Cluster) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for r in &c.replicas {
        let list = r
            .client()
            .await
            .list_snapshots(ReplicaListSnapshots {})
            .await
            .expect("ListSnapshots on a daemon")
            .into_inner();
        ids.extend(list.snapshots.into_iter().map(|s| s.snapshot_id));
    }
    ids
}

async fn volume_counts(c: &Cluster) -> Vec<usize> {
    let mut counts = Vec::new();
    for r in &c.replicas {
        counts.push(r.volume_count().await);
    }
    counts
}

async fn list_snapshot_ids(c: &Cluster) -> BTreeSet<String> {
    c.ctl()
        .await
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot.map(|s| s.snapshot_id))
        .collect()
}

fn source_writes() -> Vec<Write> {
    vec![
        (0, pattern(1, 8192)),
        (64 * 1024, pattern(2, 4096)),
        (MIB, pattern(3, 12288)),
        (5 * MIB, pattern(4, 4096)),
        (15 * MIB, pattern(5, 256 * 1024)),
    ]
}

/// Restore end to end: the data of the snapshot on every replica of the restored
/// volume, the content source reported on every answer, idempotent repeats, and the
/// error codes (NOT_FOUND and OUT_OF_RANGE leave nothing on any daemon, another
/// source for an existing name is ALREADY_EXISTS).
#[tokio::test]
async fn restore_round_trip_repeats_and_codes() {
    let c = Cluster::start_with(THREE_NODES, &[], &["--copy-wait", "30s"]).await;
    let src = create(&c, create_req("restore-src", Some(16 * MIB)))
        .await
        .expect("source volume");
    let writes = source_writes();
    write_everywhere(&c, &src.volume_id, &writes, 1).await;
    let snap = snapshot(&c, "restore-snap", &src.volume_id).await;
    assert!(snap.ready_to_use);
    // Written after the snapshot: must not show up in the restore.
    write_everywhere(&c, &src.volume_id, &[(0, pattern(9, 4096))], 100).await;

    let before = volume_counts(&c).await;
    let missing = "ts-00000000000000000000000000000000";
    assert_eq!(
        code(
            create(
                &c,
                from_snapshot(create_req("restore-missing", None), missing)
            )
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            create(
                &c,
                from_snapshot(
                    create_req("restore-small", Some(8 * MIB)),
                    &snap.snapshot_id
                )
            )
            .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        volume_counts(&c).await,
        before,
        "failed restores leave nothing"
    );

    let req = from_snapshot(create_req("restored", None), &snap.snapshot_id);
    let restored = create(&c, req.clone()).await.expect("restore");
    assert_eq!(
        restored.capacity_bytes,
        (16 * MIB) as i64,
        "size of the snapshot"
    );
    assert_eq!(
        restored.content_source,
        Some(snapshot_source(&snap.snapshot_id))
    );
    assert_ne!(restored.volume_id, src.volume_id);
    assert_replicas_hold(&c, &restored.volume_id, &expected_image(16 * MIB, &writes)).await;

    // Repeats return the same volume, also after a controller restart.
    let again = create(&c, req.clone()).await.expect("repeat");
    assert_eq!(again, restored);
    let mut c = c;
    c.restart_controller().await;
    let again = create(&c, req.clone()).await.expect("repeat after restart");
    assert_eq!(again.volume_id, restored.volume_id);
    assert_eq!(again.content_source, restored.content_source);
    // Another source (or none) for the same name is ALREADY_EXISTS.
    assert_eq!(
        code(
            create(
                &c,
                from_volume(create_req("restored", None), &src.volume_id)
            )
            .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(create(&c, create_req("restored", Some(16 * MIB))).await),
        Code::AlreadyExists
    );
    let got = c
        .ctl()
        .await
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: restored.volume_id.clone(),
        })
        .await
        .expect("ControllerGetVolume")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(got.content_source, restored.content_source);

    // A larger restore: the snapshot's data, then zeros.
    let bigger = create(
        &c,
        from_snapshot(
            create_req("restored-big", Some(32 * MIB)),
            &snap.snapshot_id,
        ),
    )
    .await
    .expect("larger restore");
    assert_eq!(bigger.capacity_bytes, (32 * MIB) as i64);
    assert_replicas_hold(&c, &bigger.volume_id, &expected_image(32 * MIB, &writes)).await;

    // A restore whose source is smaller than the filesystem it will be mounted with
    // (xfs here; a raw block source is the real case) is sized up to that
    // filesystem's minimum, so the node's mkfs can succeed; a limit below the
    // minimum is OUT_OF_RANGE naming it, and creates nothing.
    const XFS_MIN: i64 = 300 << 20;
    let as_xfs = |name: &str, limit: i64| {
        let mut req = create_req(name, None);
        req.parameters = [("fsType".to_string(), "xfs".to_string())].into();
        req.capacity_range = Some(CapacityRange {
            required_bytes: 0,
            limit_bytes: limit,
        });
        from_snapshot(req, &snap.snapshot_id)
    };
    let before = volume_counts(&c).await;
    let err = create(&c, as_xfs("restored-xfs-capped", (100 * MIB) as i64))
        .await
        .expect_err("a limit below xfs's minimum");
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(
        err.message().contains(&XFS_MIN.to_string()),
        "{}",
        err.message()
    );
    assert_eq!(volume_counts(&c).await, before, "nothing created");
    let xfs = create(&c, as_xfs("restored-xfs", 0))
        .await
        .expect("restore rounded up to xfs's minimum");
    assert_eq!(xfs.capacity_bytes, XFS_MIN);
    for d in &c.replicas {
        let rec = d.volume(&xfs.volume_id).await.expect("replica record");
        assert_eq!(rec.size_bytes, XFS_MIN as u64, "on {}", d.node_id());
    }

    // Copies are complete, so the snapshot is no longer in use.
    c.ctl()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot after the restores completed");
}

/// Clone end to end: the source's data on every replica of the clone, the internal
/// snapshot never visible and gone once the clone is complete, codes that leave
/// nothing behind, and the sweep of leftover internal snapshots (opportunistic and
/// at controller start).
#[tokio::test]
async fn clone_copies_data_and_hides_and_drops_its_internal_snapshot() {
    let mut c = Cluster::start_with(THREE_NODES, &[], &["--copy-wait", "30s"]).await;
    let src = create(&c, create_req("clone-src", Some(16 * MIB)))
        .await
        .expect("source volume");
    let writes = source_writes();
    write_everywhere(&c, &src.volume_id, &writes, 1).await;

    let before = volume_counts(&c).await;
    assert_eq!(
        code(
            create(
                &c,
                from_volume(
                    create_req("clone-missing", None),
                    "tv-00000000000000000000000000000000"
                )
            )
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            create(
                &c,
                from_volume(create_req("clone-small", Some(4 * MIB)), &src.volume_id)
            )
            .await
        ),
        Code::OutOfRange
    );
    assert_eq!(volume_counts(&c).await, before);
    assert!(
        daemon_snapshot_ids(&c).await.is_empty(),
        "a refused clone seals nothing"
    );

    let req = from_volume(create_req("cloned", None), &src.volume_id);
    let clone = create(&c, req.clone()).await.expect("clone");
    assert_eq!(clone.capacity_bytes, (16 * MIB) as i64);
    assert_eq!(clone.content_source, Some(volume_source(&src.volume_id)));
    assert_replicas_hold(&c, &clone.volume_id, &expected_image(16 * MIB, &writes)).await;
    // The internal snapshot is deleted (in the background) once the clone is complete.
    wait_until_gone(&c, &clone_snapshot_id(&clone.volume_id)).await;
    assert_eq!(create(&c, req).await.expect("repeat"), clone);
    // The clone is independent of its source: deleting the source keeps its data.
    c.ctl()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete the source");
    assert_replicas_hold(&c, &clone.volume_id, &expected_image(16 * MIB, &writes)).await;

    // A leftover internal snapshot (a controller died mid-clone; the clone never got
    // created) is hidden from every CSI call and swept on the next opportunity.
    let leftover_clone = volume_id_for_name("never-created");
    let leftover = clone_snapshot_id(&leftover_clone);
    seal_on_daemons(&c, &clone.volume_id, &leftover, &leftover_clone).await;
    assert!(daemon_snapshot_ids(&c).await.contains(&leftover));
    let ctl_list = list_snapshot_ids(&c).await;
    assert!(!ctl_list.contains(&leftover), "hidden from ListSnapshots");
    assert_eq!(
        code(
            c.ctl()
                .await
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: leftover.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound,
        "hidden from GetSnapshot"
    );
    assert_eq!(
        code(
            create(
                &c,
                from_snapshot(create_req("from-internal", None), &leftover)
            )
            .await
        ),
        Code::NotFound,
        "not restorable by users"
    );
    wait_until_gone(&c, &leftover).await;

    // One of a clone that completed, found at controller start.
    let done = clone_snapshot_id(&clone.volume_id);
    seal_on_daemons(&c, &clone.volume_id, &done, &clone.volume_id).await;
    c.restart_controller().await;
    wait_until_gone(&c, &done).await;
}

/// Five daemons, RF 3: a restore and a clone are placed on the daemons that hold the
/// snapshot, every replica of the new volume shares its daemon's sealed layers
/// (`copy.shared_layers`) rather than copying them, and the new volumes keep their data
/// after the snapshot and the source volume are deleted.
#[tokio::test]
async fn restores_and_clones_are_placed_on_the_holders_and_share_their_layers() {
    const FIVE_NODES: &[NodeSpec<'static>] = &[
        ("n1", "", 10 * GIB),
        ("n2", "", 10 * GIB),
        ("n3", "", 10 * GIB),
        ("n4", "", 10 * GIB),
        ("n5", "", 10 * GIB),
    ];
    let c = Cluster::start_with(FIVE_NODES, &[], &["--copy-wait", "30s"]).await;
    let src = create(&c, create_req("shared-src", Some(16 * MIB)))
        .await
        .expect("source volume");
    let writes = source_writes();
    write_everywhere(&c, &src.volume_id, &writes, 1).await;
    let snap = snapshot(&c, "shared-snap", &src.volume_id).await;
    let holders: BTreeSet<String> = c.holders(&src.volume_id).await.into_iter().collect();
    assert_eq!(holders.len(), 3);
    let expected = expected_image(16 * MIB, &writes);

    let restored = create(
        &c,
        from_snapshot(create_req("shared-restore", None), &snap.snapshot_id),
    )
    .await
    .expect("restore");
    let cloned = create(
        &c,
        from_volume(create_req("shared-clone", None), &src.volume_id),
    )
    .await
    .expect("clone");
    for v in [&restored, &cloned] {
        let placed: BTreeSet<String> = c.holders(&v.volume_id).await.into_iter().collect();
        assert_eq!(placed, holders, "{} is placed on the holders", v.volume_id);
        for node in &placed {
            let rec = c
                .replica(node)
                .volume(&v.volume_id)
                .await
                .unwrap_or_else(|| panic!("{node} has no record of {}", v.volume_id));
            let copy = rec.copy.expect("copy progress");
            assert!(copy.complete, "{node}: {copy:?}");
            assert!(copy.shared_layers, "{node} shares its layers: {copy:?}");
            // The shared blocks carry seqs of the source's epoch EPOCH.
            assert_eq!(copy.epoch_floor, EPOCH, "{node}: {copy:?}");
        }
        assert_replicas_hold(&c, &v.volume_id, &expected).await;
    }

    // The shared layers outlive the snapshot and the source volume.
    c.ctl()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    c.ctl()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete the source");
    poll_until(COPY_DEADLINE, || async {
        daemon_snapshot_ids(&c).await.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|t| panic!("snapshots left on the daemons: {t}"));
    for v in [&restored, &cloned] {
        assert_replicas_hold(&c, &v.volume_id, &expected).await;
    }
    // Publishing a volume on shared layers raises its epoch above the source's, so its
    // own engines' writes outrank the shared blocks' seqs when copies are reconciled.
    let published = c
        .ctl()
        .await
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: restored.volume_id.clone(),
            node_id: "n1".into(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("publish the restore")
        .into_inner();
    let epoch: u64 = published.publish_context["epoch"].parse().expect("epoch");
    assert!(
        epoch > EPOCH,
        "restore published at epoch {epoch}, the source wrote at {EPOCH}"
    );
}

/// Seals `snapshot_id` named `name` on every replica of `volume_id` directly, as a
/// controller that died mid-clone would have left it.
async fn seal_on_daemons(c: &Cluster, volume_id: &str, snapshot_id: &str, name: &str) {
    for r in replicas_of(c, volume_id).await {
        r.client()
            .await
            .create_snapshot(ReplicaSnapshotRequest {
                volume_id: volume_id.into(),
                snapshot_id: snapshot_id.into(),
                name: name.into(),
                created_unix_nanos: 1,
            })
            .await
            .expect("CreateSnapshot on a daemon");
    }
}

async fn wait_until_gone(c: &Cluster, snapshot_id: &str) {
    poll_until(COPY_DEADLINE, || async {
        (!daemon_snapshot_ids(c).await.contains(snapshot_id)).then_some(())
    })
    .await
    .unwrap_or_else(|t| panic!("internal snapshot {snapshot_id} was not swept: {t}"));
}

/// A copy slower than `--copy-wait`: CreateVolume answers ABORTED with the progress,
/// the snapshot cannot be deleted while the restore copies from it
/// (FAILED_PRECONDITION naming the volume), and the CO's retries end with the volume.
/// The source lives in zone z1 and the copies in z2, so they cannot share layers.
#[tokio::test]
async fn slow_copies_abort_with_progress_and_hold_their_snapshot() {
    const TWO_ZONES: &[NodeSpec<'static>] = &[
        ("n1", "z1", 10 * GIB),
        ("n2", "z1", 10 * GIB),
        ("n3", "z1", 10 * GIB),
        ("n4", "z2", 10 * GIB),
        ("n5", "z2", 10 * GIB),
        ("n6", "z2", 10 * GIB),
    ];
    // 1 MiB/s per daemon; each target reads a majority (2) of the holders, so 2 MiB
    // of data takes about 4 s per target to copy.
    let c = Cluster::start_configured(
        TWO_ZONES,
        &[],
        &["--copy-wait", "300ms"],
        &["--copy-max-bandwidth", "1048576"],
    )
    .await;
    let src = create(&c, in_zone(create_req("slow-src", Some(8 * MIB)), "z1"))
        .await
        .expect("source volume");
    let writes = vec![(0, pattern(7, (2 * MIB) as usize))];
    write_everywhere(&c, &src.volume_id, &writes, 1).await;
    let snap = snapshot(&c, "slow-snap", &src.volume_id).await;

    let req = in_zone(
        from_snapshot(create_req("slow-restore", None), &snap.snapshot_id),
        "z2",
    );
    let first = create(&c, req.clone()).await.unwrap_err();
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    let prefix = format!("restoring from snapshot {}: ", snap.snapshot_id);
    assert!(
        first.message().contains(&prefix) && first.message().contains("% ("),
        "progress in {:?}",
        first.message()
    );
    let restored_id = volume_id_for_name("slow-restore");
    let in_use = c
        .ctl()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use:?}");
    assert!(
        in_use.message().contains(&restored_id),
        "names the volume: {:?}",
        in_use.message()
    );
    assert_eq!(
        code(
            create(
                &c,
                in_zone(
                    from_volume(create_req("slow-restore", None), &src.volume_id),
                    "z2"
                )
            )
            .await
        ),
        Code::AlreadyExists,
        "another source while the copy runs"
    );
    let (restored, _) = create_until_copied(&c, req).await;
    assert_eq!(restored.volume_id, restored_id);
    assert_eq!(
        restored.content_source,
        Some(snapshot_source(&snap.snapshot_id))
    );
    assert_replicas_hold(&c, &restored.volume_id, &expected_image(8 * MIB, &writes)).await;
    c.ctl()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot once the restore is complete");

    // A slow clone reports "cloning volume" and drops its internal snapshot at the end.
    let req = in_zone(
        from_volume(create_req("slow-clone", None), &src.volume_id),
        "z2",
    );
    let (clone, aborted) = create_until_copied(&c, req).await;
    let prefix = format!("cloning volume {}: ", src.volume_id);
    assert!(
        aborted.iter().any(|m| m.contains(&prefix)),
        "progress of the clone in {aborted:?}"
    );
    assert_replicas_hold(&c, &clone.volume_id, &expected_image(8 * MIB, &writes)).await;
    wait_until_gone(&c, &clone_snapshot_id(&clone.volume_id)).await;
}

/// Collects a GetMetadataAllocated stream: the entries per message, the capacity and
/// type of every message.
async fn allocated(
    c: &Cluster,
    snapshot_id: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<Vec<(i64, i64)>>, tonic::Status> {
    let mut stream = c
        .controller
        .snapshot_metadata()
        .await
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: snapshot_id.into(),
            starting_offset,
            max_results,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(msg) = stream.message().await? {
        assert_eq!(
            msg.block_metadata_type,
            BlockMetadataType::VariableLength as i32
        );
        assert_eq!(msg.volume_capacity_bytes, (16 * MIB) as i64);
        pages.push(
            msg.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes))
                .collect(),
        );
    }
    Ok(pages)
}

async fn delta(
    c: &Cluster,
    base: &str,
    target: &str,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<Vec<(i64, i64)>>, tonic::Status> {
    let mut stream = c
        .controller
        .snapshot_metadata()
        .await
        .get_metadata_delta(GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset,
            max_results,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(msg) = stream.message().await? {
        assert_eq!(
            msg.block_metadata_type,
            BlockMetadataType::VariableLength as i32
        );
        pages.push(
            msg.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes))
                .collect(),
        );
    }
    Ok(pages)
}

fn flat(pages: &[Vec<(i64, i64)>]) -> Vec<(i64, i64)> {
    pages.concat()
}

/// GetMetadataAllocated and GetMetadataDelta: exact ranges, paging by max_results,
/// starting_offset clipping, and the error codes.
#[tokio::test]
async fn snapshot_metadata_allocated_and_delta_page_and_clip() {
    let c = Cluster::start(THREE_NODES, &[]).await;
    let caps = c
        .controller
        .identity()
        .await
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner()
        .capabilities;
    assert!(caps.iter().any(|cap| matches!(
        cap.r#type,
        Some(PluginCapType::Service(s)) if s.r#type == ServiceType::SnapshotMetadataService as i32
    )));

    let vol = create(&c, create_req("meta-src", Some(16 * MIB)))
        .await
        .expect("volume");
    let other = create(&c, create_req("meta-other", Some(16 * MIB)))
        .await
        .expect("other volume");
    write_everywhere(
        &c,
        &vol.volume_id,
        &[
            (0, pattern(1, 8192)),
            (64 * 1024, pattern(2, 4096)),
            (MIB, pattern(3, 12288)),
            (5 * MIB, pattern(4, 4096)),
        ],
        1,
    )
    .await;
    let s1 = snapshot(&c, "meta-s1", &vol.volume_id).await.snapshot_id;
    write_everywhere(
        &c,
        &vol.volume_id,
        &[(64 * 1024, pattern(5, 4096)), (8 * MIB, pattern(6, 4096))],
        10,
    )
    .await;
    trim_everywhere(&c, &vol.volume_id, MIB, 4096, 20).await;
    let s2 = snapshot(&c, "meta-s2", &vol.volume_id).await.snapshot_id;
    let s_other = snapshot(&c, "meta-other-s", &other.volume_id)
        .await
        .snapshot_id;

    let m = MIB as i64;
    let all = vec![(0, 8192), (65536, 4096), (m, 12288), (5 * m, 4096)];
    let pages = allocated(&c, &s1, 0, 0).await.expect("allocated");
    assert_eq!(pages.len(), 1);
    assert_eq!(flat(&pages), all);
    let pages = allocated(&c, &s1, 0, 1).await.expect("allocated by one");
    assert_eq!(pages.len(), 4);
    assert!(pages.iter().all(|p| p.len() == 1));
    assert_eq!(flat(&pages), all);
    let pages = allocated(&c, &s1, 0, 3).await.expect("allocated by three");
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1]);
    // starting_offset: ranges ending before it dropped, the straddling one clipped.
    assert_eq!(
        flat(&allocated(&c, &s1, 4096, 0).await.expect("from 4096")),
        vec![(4096, 4096), (65536, 4096), (m, 12288), (5 * m, 4096)]
    );
    assert_eq!(
        flat(&allocated(&c, &s1, m + 4096, 0).await.expect("mid range")),
        vec![(m + 4096, 8192), (5 * m, 4096)]
    );
    let end = allocated(&c, &s1, 16 * m, 0).await.expect("at the end");
    assert!(flat(&end).is_empty(), "{end:?}");
    assert_eq!(
        code(allocated(&c, &s1, 16 * m + 1, 0).await),
        Code::OutOfRange
    );
    assert_eq!(code(allocated(&c, &s1, -1, 0).await), Code::OutOfRange);
    assert_eq!(code(allocated(&c, "", 0, 0).await), Code::InvalidArgument);
    assert_eq!(code(allocated(&c, &s1, 0, -1).await), Code::InvalidArgument);
    assert_eq!(
        code(allocated(&c, "ts-00000000000000000000000000000000", 0, 0).await),
        Code::NotFound
    );

    // Changed between s1 and s2: the rewritten block, the new one, the trimmed one.
    let changed = vec![(65536, 4096), (m, 4096), (8 * m, 4096)];
    assert_eq!(
        flat(&delta(&c, &s1, &s2, 0, 0).await.expect("delta")),
        changed
    );
    let pages = delta(&c, &s1, &s2, 0, 2).await.expect("delta by two");
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(
        flat(
            &delta(&c, &s1, &s2, 65536 + 4096, 0)
                .await
                .expect("delta from")
        ),
        vec![(m, 4096), (8 * m, 4096)]
    );
    assert_eq!(code(delta(&c, &s2, &s1, 0, 0).await), Code::InvalidArgument);
    assert_eq!(code(delta(&c, &s1, &s1, 0, 0).await), Code::InvalidArgument);
    assert_eq!(
        code(delta(&c, &s1, &s_other, 0, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(code(delta(&c, "", &s2, 0, 0).await), Code::InvalidArgument);
    assert_eq!(code(delta(&c, &s1, "", 0, 0).await), Code::InvalidArgument);
    assert_eq!(
        code(delta(&c, &s1, "ts-00000000000000000000000000000000", 0, 0).await),
        Code::NotFound
    );
    assert_eq!(
        code(delta(&c, &s1, &s2, 16 * m + 1, 0).await),
        Code::OutOfRange
    );
}
