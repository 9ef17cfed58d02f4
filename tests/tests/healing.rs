//! Healing end to end (issue 15 items 3 and 4), real processes: four replica daemons
//! (nodes n1..n4) for RF=3 volumes, so one spare node can take a lost replica's
//! place; the controller runs with a replacement delay of seconds.
//!
//! * A detached volume whose replica daemon is lost is rebuilt on the spare node and
//!   reported whole again; a second original daemon is then killed and every durable
//!   block still reads back current; the first daemon, back on its old data, learns it
//!   was replaced and its copy is deleted.
//! * A member whose daemon comes back with an empty disk gets its copy rebuilt in
//!   place and counts as in sync only once it is declared so (the newest in-sync
//!   record naming its node says nothing about the new copy).
//! * DeleteVolume of a volume whose daemon is lost succeeds once the daemon is
//!   declared lost, and the daemon's copy is deleted when it returns.
//!
//! Waiting is on conditions polled with deadlines; the tests run one at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_csi_proto::v1::{CapacityRange, ControllerExpandVolumeRequest, Volume};
use tessera_replica_protocol::control_proto::GetVolumeRequest;
use tessera_tests::fixtures::{delete_request, holders_of};
use tessera_tests::lifecycle::{
    self, attach, block_capability, controller_condition, create_volume, kubelet_paths,
    node_condition, Attachment,
};
use tessera_tests::privilege::privileged;
use tessera_tests::random_writer::{read_back, RandomWriter, WriterBounds};
use tessera_tests::{poll_until, Cluster, ClusterBuilder};

const MIB: usize = 1 << 20;
/// The controller's replacement delay in these tests.
const REPLACEMENT_DELAY: &str = "2s";
/// Longest a rebuild of a test volume may take to be reported whole.
const HEALED_WITHIN: Duration = Duration::from_secs(90);
const ALL_IN_SYNC: &str = "all 3 replicas reachable and in sync";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Replica daemons n1..n`replicas`, the controller healing every 300 ms with a
/// replacement delay of [`REPLACEMENT_DELAY`], and node n1.
async fn healing_cluster(replicas: usize) -> Cluster {
    ClusterBuilder::new()
        .replicas(replicas)
        .nodes(["n1"])
        .controller_args([
            "--replacement-delay",
            REPLACEMENT_DELAY,
            "--heal-interval",
            "300ms",
            "--refresh-interval-secs",
            "1",
        ])
        .start()
        .await
        .expect("cluster starts")
}

/// The replica set of `volume_id` as the daemon at `index` records it (node ids).
async fn recorded_set(cluster: &Cluster, index: usize, volume_id: &str) -> Vec<String> {
    let rec = cluster
        .replica(index)
        .client()
        .await
        .expect("replica client")
        .get_volume(GetVolumeRequest {
            volume_id: volume_id.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("GetVolume on n{}: {s}", index + 1))
        .into_inner();
    let mut set: Vec<String> = rec.replicas.into_iter().map(|r| r.node_id).collect();
    set.sort();
    set
}

/// Random writes on the block device at `device`, fdatasync every 16; the map of
/// each block's last durable write.
async fn write_randomly(
    device: std::path::PathBuf,
    seed: u64,
) -> std::collections::BTreeMap<u64, u64> {
    let writer = RandomWriter::start(
        device,
        seed,
        WriterBounds {
            time: Duration::from_secs(120),
            writes: 100_000,
            after_kill: 1_000,
            sync_every: 16,
            read_every: 8,
        },
    );
    writer.wait_for(1_000).await;
    writer.kill_done();
    writer
        .finish()
        .await
        .unwrap_or_else(|e| panic!("the random writer failed: {e}"))
        .last_durable
}

/// ControllerPublish + NodeStage + NodePublish of raw block `volume` on n1.
async fn attach_on_n1(
    cluster: &Cluster,
    volume: &Volume,
    staging: &std::path::Path,
    target: &std::path::Path,
) -> Attachment {
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    attach(
        &mut controller,
        &mut n1,
        volume,
        "n1",
        block_capability(),
        staging,
        target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach {} on n1: {e:#}", volume.volume_id))
}

/// A written, detached RF=3 raw block volume.
struct Written {
    volume: Volume,
    staging: PathBuf,
    target: PathBuf,
    /// Per block, its last durable write.
    expected: BTreeMap<u64, u64>,
}

/// Creates `name` (64 MiB, RF 3), writes it randomly on n1 and detaches it.
async fn written_volume(cluster: &Cluster, name: &str) -> Written {
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let volume = create_volume(
        &mut controller,
        name,
        64 * MIB,
        &[("replicationFactor", "3")],
        true,
    )
    .await;
    let (staging, target) = kubelet_paths(cluster, "n1", name, true);
    let a = attach_on_n1(cluster, &volume, &staging, &target).await;
    let expected = write_randomly(target.clone(), 0x5eed).await;
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));
    Written {
        volume,
        staging,
        target,
        expected,
    }
}

/// Waits until the controller reports every replica of `id` reachable and in sync.
async fn wait_whole(cluster: &Cluster, id: &str, after: &str) {
    let controller = cluster.controller().await.expect("controller");
    let healed =
        poll_until(HEALED_WITHIN, || {
            let (mut ctl, id) = (controller.clone(), id.to_owned());
            async move {
                (controller_condition(&mut ctl, &id).await.message == ALL_IN_SYNC).then_some(())
            }
        })
        .await;
    let last = controller_condition(&mut controller.clone(), id).await;
    assert!(
        healed.is_ok(),
        "the volume is not whole again {HEALED_WITHIN:?} after {after}: {last:?}"
    );
}

/// Attaches `w` on n1 and checks every durable block reads back current.
async fn assert_reads_back(cluster: &Cluster, w: &Written, when: &str) {
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let a = attach_on_n1(cluster, &w.volume, &w.staging, &w.target).await;
    let (device, expected) = (w.target.clone(), w.expected.clone());
    let read = tokio::task::spawn_blocking(move || read_back(&device, &expected))
        .await
        .expect("reader task")
        .unwrap_or_else(|e| panic!("reading back: {e}"));
    read.assert_all_current(when);
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));
}

/// Waits until the controller no longer counts any member of `id` as lost (a daemon
/// that came back is seen; a detached volume's stale member stays out of sync until
/// the next attach, so "whole" is not what to wait for).
async fn wait_not_lost(cluster: &Cluster, id: &str) {
    let controller = cluster.controller().await.expect("controller");
    let seen = poll_until(HEALED_WITHIN, || {
        let (mut ctl, id) = (controller.clone(), id.to_owned());
        async move {
            (!controller_condition(&mut ctl, &id)
                .await
                .message
                .contains("lost"))
            .then_some(())
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "the controller still counts a member of {id} lost"
    );
}

/// The second lost daemon back first (before it too is replaced), then the replaced
/// one on its old data, whose copy must be collected as a leftover. (Started while a
/// member is lost, the replaced daemon would rightly become that member's replacement.)
async fn return_both(cluster: &mut Cluster, second: usize, replaced: usize, id: &str) {
    cluster
        .start_replica(second)
        .await
        .expect("the second daemon starts again");
    wait_not_lost(cluster, id).await;
    cluster
        .start_replica(replaced)
        .await
        .expect("the replaced daemon starts on its data");
    wait_collected(cluster, replaced, id).await;
}

/// Waits until the daemon at `index` holds nothing of `id` on disk.
async fn wait_collected(cluster: &Cluster, index: usize, id: &str) {
    let collected = poll_until(HEALED_WITHIN, || {
        let dirs = cluster.replica(index).volume_dirs_on_disk();
        std::future::ready(dirs.ok().filter(|d| !d.iter().any(|x| x == id)).map(|_| ()))
    })
    .await;
    assert!(
        collected.is_ok(),
        "n{} still holds its copy of {id}: {:?}",
        index + 1,
        cluster.replica(index).volume_dirs_on_disk()
    );
}

/// (c) of issue 15's fault suite, detached: a lost daemon's replica is rebuilt on the
/// spare node after the replacement delay, RF is 3 again (every replica in sync), and
/// a second original daemon can then be lost without losing a write. The replaced
/// daemon, started again on its old data, has its leftover copy deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_is_rebuilt_elsewhere_and_a_second_loss_loses_nothing() {
    if !privileged("healing test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = healing_cluster(4).await;
    let w = written_volume(&cluster, "rebuilt").await;
    let id = w.volume.volume_id.clone();
    let original = holders_of(&cluster, &id).await.expect("holders");
    assert_eq!(
        original.len(),
        3,
        "RF=3 volume on three daemons: {original:?}"
    );
    let spare = ["n1", "n2", "n3", "n4"]
        .iter()
        .find(|n| !original.iter().any(|o| o == *n))
        .expect("one node holds no replica")
        .to_string();
    let lost = original[0].clone();
    let lost_index = cluster.replica_index(&lost).expect("lost daemon");
    cluster.kill_replica(lost_index).expect("kill -9 a member");
    let killed = Instant::now();
    wait_whole(&cluster, &id, &format!("{lost} was killed")).await;
    eprintln!(
        "replica on {lost} lost: rebuilt on {spare}, all in sync {:?} after the kill",
        killed.elapsed()
    );
    let survivor = cluster.replica_index(&original[1]).expect("survivor");
    let mut set = original.clone();
    set.retain(|n| *n != lost);
    set.push(spare.clone());
    set.sort();
    assert_eq!(
        recorded_set(&cluster, survivor, &id).await,
        set,
        "the new set replaces {lost} by {spare}"
    );

    // A second original daemon lost: the rebuilt copy makes the majority.
    cluster
        .kill_replica(survivor)
        .expect("kill -9 a second member");
    assert_reads_back(
        &cluster,
        &w,
        &format!("with {} and {lost} down", original[1]),
    )
    .await;

    return_both(&mut cluster, survivor, lost_index, &id).await;
}

/// (c) attached: a member is lost while a writer runs; after the replacement delay the
/// spare node gets a copy, the engine learns the new set from its replicas, compares
/// the copy with the others and brings it in sync, all without an I/O error; then a
/// second original member is lost under the writer and no durable write is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_volume_gets_a_lost_replica_rebuilt_under_writes() {
    if !privileged("healing test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = healing_cluster(4).await;
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let name = "rebuilt-attached";
    let volume = create_volume(
        &mut controller,
        name,
        64 * MIB,
        &[("replicationFactor", "3")],
        true,
    )
    .await;
    let id = volume.volume_id.clone();
    let (staging, target) = kubelet_paths(&cluster, "n1", name, true);
    let a = attach_on_n1(&cluster, &volume, &staging, &target).await;
    let writer = RandomWriter::start(
        target.clone(),
        0xa77,
        WriterBounds {
            time: Duration::from_secs(300),
            writes: 2_000_000,
            after_kill: 1_000,
            sync_every: 16,
            read_every: 8,
        },
    );
    writer.wait_for(500).await;
    let original = holders_of(&cluster, &id).await.expect("holders");
    let lost = original[0].clone();
    let lost_index = cluster.replica_index(&lost).expect("lost daemon");
    cluster.kill_replica(lost_index).expect("kill -9 a member");
    let killed = (Instant::now(), writer.written());
    wait_whole(&cluster, &id, &format!("{lost} was killed under writes")).await;
    eprintln!(
        "replica on {lost} lost under writes: replaced and in sync {:?} after the kill \
         ({} writes meanwhile)",
        killed.0.elapsed(),
        writer.written() - killed.1
    );
    let mut n1_view = cluster.node_client("n1").await.expect("n1 plugin");
    let engine = node_condition(&mut n1_view, &a).await;
    assert!(
        !engine.abnormal && !engine.message.contains(&lost),
        "the engine still counts {lost}: {engine:?}"
    );

    let second = cluster.replica_index(&original[1]).expect("second member");
    cluster
        .kill_replica(second)
        .expect("kill -9 a second member");
    let now = writer.written();
    writer.wait_for(now + 500).await;
    writer.kill_done();
    let log = writer
        .finish()
        .await
        .unwrap_or_else(|e| panic!("the writer failed during the rebuild: {e}"));
    let device = target.clone();
    let read = tokio::task::spawn_blocking(move || read_back(&device, &log.last_durable))
        .await
        .expect("reader task")
        .unwrap_or_else(|e| panic!("reading back: {e}"));
    read.assert_all_current("after the rebuild and a second loss");
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));
    return_both(&mut cluster, second, lost_index, &id).await;
}

/// A member whose disk was replaced (its daemon back with an empty data directory,
/// same node) gets its copy made again there, and the volume reports every replica in
/// sync; then another member is lost and nothing is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_without_its_copy_gets_it_rebuilt_in_place() {
    if !privileged("healing test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = healing_cluster(3).await;
    let w = written_volume(&cluster, "wiped").await;
    let id = w.volume.volume_id.clone();
    cluster.kill_replica(1).expect("kill -9 n2");
    let data_dir = cluster.replica(1).data_dir().to_path_buf();
    std::fs::remove_dir_all(&data_dir).expect("n2's disk is gone");
    std::fs::create_dir_all(&data_dir).expect("a new, empty disk");
    cluster
        .start_replica(1)
        .await
        .expect("n2 starts on an empty disk");
    wait_whole(&cluster, &id, "n2 came back empty").await;
    assert!(
        cluster
            .replica(1)
            .volume_dirs_on_disk()
            .expect("n2 data dir")
            .contains(&id),
        "n2 holds a copy again"
    );
    cluster.kill_replica(2).expect("kill -9 n3");
    assert_reads_back(&cluster, &w, "with n3 down after n2's rebuild").await;
}

/// The size of `id` as the daemon at `index` records it (0 if it does not answer).
async fn size_on(cluster: &Cluster, index: usize, id: &str) -> u64 {
    let Ok(mut client) = cluster.replica(index).client().await else {
        return 0;
    };
    client
        .get_volume(GetVolumeRequest {
            volume_id: id.to_owned(),
        })
        .await
        .map(|r| r.into_inner().size_bytes)
        .unwrap_or(0)
}

/// A member down while the volume is expanded gets the expansion when it returns,
/// before anything else (its copy would otherwise stay smaller than the volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_missed_an_expansion_is_expanded_when_it_returns() {
    if !privileged("healing test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = healing_cluster(3).await;
    let mut controller = cluster.controller().await.expect("controller");
    let volume = create_volume(&mut controller, "grown", 16 * MIB, &[], true).await;
    let id = volume.volume_id.clone();
    cluster.kill_replica(2).expect("kill -9 n3");
    let grown = 32 * MIB as u64;
    controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: grown as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("ControllerExpandVolume with n3 down: {s}"));
    assert_eq!(
        size_on(&cluster, 0, &id).await,
        grown,
        "n1 holds the new size"
    );
    cluster.start_replica(2).await.expect("n3 starts again");
    let expanded = poll_until(HEALED_WITHIN, || {
        let size = size_on(&cluster, 2, &id);
        async move { (size.await == grown).then_some(()) }
    })
    .await;
    assert!(
        expanded.is_ok(),
        "n3 still holds {} bytes, the volume {grown}",
        size_on(&cluster, 2, &id).await
    );
}

/// Item 4: DeleteVolume of a volume whose daemon is down fails while the daemon may
/// come back; once the daemon is declared lost (past the replacement delay) it
/// succeeds at the first call, and the copy the daemon still holds is deleted when it
/// returns, for both volumes. Three daemons only, so nothing can replace it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_volume_with_a_lost_daemon_succeeds_and_its_copy_is_collected() {
    if !privileged("healing test") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = healing_cluster(3).await;
    let mut controller = cluster.controller().await.expect("controller");
    let early = create_volume(&mut controller, "deleted-early", 16 * MIB, &[], true).await;
    let late = create_volume(&mut controller, "deleted-lost", 16 * MIB, &[], true).await;
    let ids = [early.volume_id.clone(), late.volume_id.clone()];
    cluster.kill_replica(2).expect("kill -9 n3");
    let status = controller
        .delete_volume(delete_request(&ids[0]))
        .await
        .expect_err("DeleteVolume must not succeed while n3 may come back");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("n3"), "{status:?}");

    let declared = poll_until(HEALED_WITHIN, || {
        let (mut ctl, id) = (controller.clone(), ids[1].clone());
        async move {
            let c = controller_condition(&mut ctl, &id).await;
            c.message.contains("lost, unreachable").then_some(c)
        }
    })
    .await;
    let cond = declared.unwrap_or_else(|_| panic!("n3 never reported lost"));
    assert!(cond.message.contains("n3"), "{cond:?}");
    controller
        .delete_volume(delete_request(&ids[1]))
        .await
        .unwrap_or_else(|s| panic!("DeleteVolume with n3 lost: {s}"));
    controller
        .delete_volume(delete_request(&ids[0]))
        .await
        .unwrap_or_else(|s| panic!("DeleteVolume retried with n3 lost: {s}"));
    let on_n3 = cluster
        .replica(2)
        .volume_dirs_on_disk()
        .expect("n3 data dir");
    assert!(
        ids.iter().all(|id| on_n3.contains(id)),
        "n3 was down: its copies are still on disk: {on_n3:?}"
    );

    cluster.start_replica(2).await.expect("n3 starts again");
    let collected = poll_until(HEALED_WITHIN, || {
        let dirs = cluster.replica(2).volume_dirs_on_disk();
        let ids = ids.clone();
        std::future::ready(
            dirs.ok()
                .filter(|d| ids.iter().all(|id| !d.contains(id)))
                .map(|_| ()),
        )
    })
    .await;
    assert!(
        collected.is_ok(),
        "n3's copies of the deleted volumes are still there: {:?}",
        cluster.replica(2).volume_dirs_on_disk()
    );
    let listed = tessera_tests::fixtures::list_all_volumes(&mut controller)
        .await
        .expect("ListVolumes");
    assert!(
        listed.iter().all(|v| !ids.contains(&v.volume_id)),
        "a deleted volume is listed again: {listed:?}"
    );
}
