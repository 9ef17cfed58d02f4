//! Healing end to end (issue 15 items 3 and 4), real processes: four replica daemons
//! (nodes n1..n4) for RF=3 volumes, so one spare node can take a lost replica's
//! place; the controller runs with a replacement delay of seconds.
//!
//! * A detached volume whose replica daemon is lost is rebuilt on the spare node and
//!   reported whole again; a second original daemon is then killed and every durable
//!   block still reads back current; the first daemon, back on its old data, learns it
//!   was replaced and its copy is deleted.
//! * DeleteVolume of a volume whose daemon is lost succeeds once the daemon is
//!   declared lost, and the daemon's copy is deleted when it returns.
//!
//! Waiting is on conditions polled with deadlines; the tests run one at a time.

use std::time::{Duration, Instant};

use tessera_replica_protocol::control_proto::GetVolumeRequest;
use tessera_tests::fixtures::{delete_request, holders_of};
use tessera_tests::lifecycle::{
    self, attach, block_capability, controller_condition, create_volume, kubelet_paths,
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
    let mut controller = cluster.controller().await.expect("controller");
    let mut n1 = cluster.node_client("n1").await.expect("n1 plugin");
    let name = "rebuilt";
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
    let a = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1: {e:#}"));
    let expected = write_randomly(target.clone(), 0x5eed).await;
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));

    let all = ["n1", "n2", "n3", "n4"];
    let original = holders_of(&cluster, &id).await.expect("holders");
    assert_eq!(
        original.len(),
        3,
        "RF=3 volume on three daemons: {original:?}"
    );
    let spare = all
        .iter()
        .find(|n| !original.iter().any(|o| o == *n))
        .expect("one node holds no replica")
        .to_string();
    let lost = original[0].clone();
    let lost_index = cluster.replica_index(&lost).expect("lost daemon");
    cluster.kill_replica(lost_index).expect("kill -9 a member");
    let killed = Instant::now();

    let healed =
        poll_until(HEALED_WITHIN, || {
            let (mut ctl, id) = (controller.clone(), id.clone());
            async move {
                (controller_condition(&mut ctl, &id).await.message == ALL_IN_SYNC).then_some(())
            }
        })
        .await;
    let last = controller_condition(&mut controller, &id).await;
    assert!(
        healed.is_ok(),
        "the volume is not whole again {HEALED_WITHIN:?} after {lost} was killed: {last:?}"
    );
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
    let second = cluster.replica_index(&original[1]).expect("second daemon");
    cluster
        .kill_replica(second)
        .expect("kill -9 a second member");
    let a = attach(
        &mut controller,
        &mut n1,
        &volume,
        "n1",
        block_capability(),
        &staging,
        &target,
    )
    .await
    .unwrap_or_else(|e| panic!("attach on n1 with {} and {lost} down: {e:#}", original[1]));
    let device = target.clone();
    let read = tokio::task::spawn_blocking(move || read_back(&device, &expected))
        .await
        .expect("reader task")
        .unwrap_or_else(|e| panic!("reading back: {e}"));
    assert!(
        read.all_current(),
        "after the rebuild and a second loss: {} intact, zeros {:?}, older {:?}, other {:?}",
        read.intact,
        &read.zeros[..read.zeros.len().min(8)],
        &read.older[..read.older.len().min(8)],
        &read.other[..read.other.len().min(8)],
    );
    lifecycle::detach(&mut controller, &mut n1, &a)
        .await
        .unwrap_or_else(|e| panic!("detach: {e:#}"));

    // The replaced daemon comes back on its data: its copy is a leftover.
    cluster
        .start_replica(lost_index)
        .await
        .expect("the replaced daemon starts on its data");
    let collected = poll_until(HEALED_WITHIN, || {
        let dirs = cluster.replica(lost_index).volume_dirs_on_disk();
        let id = id.clone();
        std::future::ready(dirs.ok().filter(|d| !d.contains(&id)).map(|_| ()))
    })
    .await;
    assert!(
        collected.is_ok(),
        "the replaced daemon {lost} still holds its copy: {:?}",
        cluster.replica(lost_index).volume_dirs_on_disk()
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
