//! Replica-set changes and full comparisons, against real `tessera-replica`
//! processes (`engine_support::daemons`: build the daemon first). The tests play
//! the controller where a replacement needs one: a new daemon gets a plain empty
//! volume, and the volume records on the surviving replicas get the new set through
//! UpdateVolume, each a compare-and-set on its own generation.

mod engine_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use engine_support::daemons::Daemon;
use engine_support::pattern;
use tessera_node::engine::{Engine, EngineConfig, EngineStatus, ReplicaState};
use tessera_replica::sync_state::{MEMBERSHIP_FILE, REGION_SIZE};
use tessera_replica_protocol::block::{BlockVersion, BLOCK_SIZE};
use tessera_replica_protocol::data::message::MAX_VERSIONS_LEN;
use tessera_replica_protocol::data::ReplicaDataClient;
use tessera_replica_protocol::seq::Epoch;

const BS: u64 = BLOCK_SIZE;
const VOL: &str = "vol-members";
/// Four dirty-map regions.
const SIZE: u64 = 4 * REGION_SIZE;
/// Bound for "must not hang" waits; never used to wait for an event.
const NO_HANG: Duration = Duration::from_secs(30);

fn block(stamp: u64) -> Bytes {
    Bytes::from(pattern(stamp, BS as usize))
}

/// Polls the async condition `f` every 20 ms until it holds; panics after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Daemons `node-a`, `node-b`, `node-c`, each with the volume and its replica set.
async fn three(work: &std::path::Path) -> Vec<Daemon> {
    let mut daemons = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        daemons.push(Daemon::start(work, n).await);
    }
    let set: Vec<_> = daemons.iter().map(Daemon::member).collect();
    for d in &daemons {
        d.create_volume_in(VOL, SIZE, set.clone(), 0).await;
    }
    daemons
}

/// An engine on `daemons` with fast background work: cleaning, reconnecting and
/// replica-set polling every few hundred milliseconds.
fn config(epoch: u64, daemons: &[Daemon]) -> EngineConfig {
    let mut c = EngineConfig::new(
        VOL,
        Epoch::new(epoch).expect("epoch"),
        daemons.iter().map(Daemon::endpoint).collect(),
        "node-a",
    );
    c.request_timeout = Duration::from_secs(2);
    c.expected_size = Some(SIZE);
    c.clean_interval = Duration::from_millis(100);
    c.reconnect_interval = Duration::from_millis(100);
    c.replica_set_poll = Duration::from_millis(200);
    c.transport = daemons[0].engine_transport();
    c
}

fn nodes(st: &EngineStatus) -> Vec<String> {
    st.replicas.iter().map(|r| r.node_id.clone()).collect()
}

fn in_sync(st: &EngineStatus, node: &str) -> bool {
    st.replicas
        .iter()
        .any(|r| r.node_id == node && r.state == ReplicaState::InSync)
}

async fn data_client(d: &Daemon, epoch: u64) -> ReplicaDataClient {
    d.data_client(VOL, epoch)
        .await
        .unwrap_or_else(|e| panic!("data plane of {}: {e}", d.node_id))
}

/// Every block's version and (intact) data on `d`, read over its data plane.
async fn blocks_of(d: &Daemon, epoch: u64) -> Vec<(BlockVersion, Option<Vec<u8>>)> {
    let c = data_client(d, epoch).await;
    let mut out = Vec::new();
    for offset in (0..SIZE).step_by(MAX_VERSIONS_LEN as usize) {
        let v = c
            .versions(offset, MAX_VERSIONS_LEN.min(SIZE - offset), true)
            .await
            .unwrap_or_else(|e| panic!("versions on {}: {e}", d.node_id));
        out.extend(v.iter().map(|(_, v, data)| (v, data.map(<[u8]>::to_vec))));
    }
    out
}

/// `d` holds exactly what `reference` holds: every block's version and data.
async fn assert_same_blocks(reference: &Daemon, d: &Daemon, epoch: u64) {
    let want = blocks_of(reference, epoch).await;
    let got = blocks_of(d, epoch).await;
    assert_eq!(want.len(), got.len());
    for (b, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            w == g,
            "block {b}: {} holds {:?}, {} holds {:?}",
            reference.node_id,
            w.0,
            d.node_id,
            g.0
        );
    }
}

async fn dirty_regions(d: &Daemon, epoch: u64) -> Vec<u64> {
    let map = data_client(d, epoch)
        .await
        .dirty_regions()
        .await
        .expect("dirty regions");
    map.dirty().collect()
}

/// Waits until the cleaner has cleared every replica's dirty map (all in sync).
async fn all_clean(daemons: &[Daemon], epoch: u64) {
    eventually("every dirty map cleaned", NO_HANG, || async {
        for d in daemons {
            if !dirty_regions(d, epoch).await.is_empty() {
                return false;
            }
        }
        true
    })
    .await;
}

/// Writes `stamp` patterns to blocks `first..first + n`; returns what was written.
async fn write_blocks(e: &Engine, first: u64, n: u64, stamp: u64) -> HashMap<u64, u64> {
    let mut written = HashMap::new();
    for b in first..first + n {
        e.write(b * BS, block(stamp + b)).await.expect("write");
        written.insert(b, stamp + b);
    }
    written
}

/// Keeps writing distinct blocks of region 1 until stopped; every write must
/// succeed. Returns the last stamp written to each block.
fn background_writer(
    e: &Engine,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<u64, u64>> {
    let e = e.clone();
    let written = Arc::new(Mutex::new(HashMap::new()));
    tokio::spawn(async move {
        let first = REGION_SIZE / BS;
        let mut stamp = 50_000;
        while !stop.load(Ordering::SeqCst) {
            let b = first + stamp % 256;
            e.write(b * BS, block(stamp))
                .await
                .unwrap_or_else(|err| panic!("write during the replacement: {err}"));
            written.lock().unwrap().insert(b, stamp);
            stamp += 1;
        }
        let out = written.lock().unwrap().clone();
        out
    })
}

async fn assert_reads(e: &Engine, written: &HashMap<u64, u64>) {
    for (&b, &stamp) in written {
        assert_eq!(
            e.read(b * BS, BS as u32).await.expect("read"),
            pattern(stamp, BS as usize),
            "block {b}"
        );
    }
}

async fn members_on(d: &Daemon, epoch: u64) -> Vec<String> {
    data_client(d, epoch)
        .await
        .membership()
        .await
        .expect("membership")
        .members
}

/// A daemon lost for good is replaced while the volume stays attached: the engine
/// learns the new set from the replicas, brings the new, empty member in over the
/// whole volume (including blocks written before a cleaning, which no dirty map
/// covers any more) while writes go on, and declares it in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_replaced_while_attached_is_rebuilt_over_the_whole_volume() {
    let work = tempfile::tempdir().unwrap();
    let mut daemons = three(work.path()).await;
    let e = Engine::open(config(1, &daemons)).await.unwrap();
    // Written with all three in sync, then cleaned from every map.
    let mut written = write_blocks(&e, 0, 64, 1_000).await;
    written.extend(write_blocks(&e, 2 * REGION_SIZE / BS, 32, 2_000).await);
    e.flush().await.unwrap();
    all_clean(&daemons, 1).await;

    // node-c dies for good; writes go on into regions 0 and 3 without it.
    daemons[2].kill9().await;
    written.extend(write_blocks(&e, 0, 8, 3_000).await);
    written.extend(write_blocks(&e, 3 * REGION_SIZE / BS, 8, 4_000).await);
    e.flush().await.unwrap();
    assert!(!in_sync(&e.status(), "node-c"));
    assert!(
        !dirty_regions(&daemons[0], 1).await.contains(&2),
        "region 2 is in no dirty map: only a full comparison finds what node-d lacks there"
    );

    // The controller's part: node-d gets an empty copy at the current epoch, and the
    // set {a, b, d} replaces {a, b, c} on a and b while writes continue.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = background_writer(&e, Arc::clone(&stop));
    let d = Daemon::start(work.path(), "node-d").await;
    let epoch = daemons[0].record(VOL).await.epoch;
    let set = vec![daemons[0].member(), daemons[1].member(), d.member()];
    d.create_volume_in(VOL, SIZE, set.clone(), epoch).await;
    daemons[0].set_replicas(VOL, set.clone()).await;
    daemons[1].set_replicas(VOL, set).await;

    eventually("node-d in sync in node-c's place", NO_HANG, || async {
        let st = e.status();
        in_sync(&st, "node-d") && !nodes(&st).contains(&"node-c".to_owned())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    written.extend(writer.await.expect("writer"));
    e.flush().await.unwrap();
    eventually("background acks", NO_HANG, || async {
        e.status().inflight_ops == 0
    })
    .await;

    // Every block's version and data on node-d is node-a's (and node-b's).
    assert_same_blocks(&daemons[0], &d, epoch).await;
    assert_same_blocks(&daemons[0], &daemons[1], epoch).await;
    let on_d = blocks_of(&d, epoch).await;
    for (&b, &stamp) in &written {
        assert_eq!(
            on_d[b as usize].1.as_deref(),
            Some(&pattern(stamp, BS as usize)[..]),
            "block {b} on node-d"
        );
    }
    assert_reads(&e, &written).await;
    let st = e.status();
    assert_eq!(nodes(&st), ["node-a", "node-b", "node-d"]);
    assert_eq!(st.in_sync, 3);
    assert_eq!(st.counters.replica_set_changes, 1, "{:?}", st.counters);
    assert_eq!(st.counters.full_resyncs, 1, "{:?}", st.counters);
    assert!(
        st.counters.resync_compared_bytes >= SIZE,
        "the whole volume was compared: {:?}",
        st.counters
    );
    assert_eq!(st.counters.failed_ops, 0);
    eventually("node-d declared in sync, node-c gone", NO_HANG, || async {
        let m = members_on(&daemons[0], epoch).await;
        m.contains(&"node-d".to_owned()) && !m.contains(&"node-c".to_owned())
    })
    .await;
    e.close().await.unwrap();
}

/// A set only one replica holds may be half of a change: the engine keeps its
/// slots. Once a majority holds it, the engine adopts it, even over a member that
/// is alive and in sync (it is taken out first, its slot given to the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_only_one_replica_holds_is_not_adopted_until_a_majority_does() {
    let work = tempfile::tempdir().unwrap();
    let daemons = three(work.path()).await;
    let e = Engine::open(config(1, &daemons)).await.unwrap();
    let written = write_blocks(&e, 0, 32, 7_000).await;
    e.flush().await.unwrap();

    let d = Daemon::start(work.path(), "node-d").await;
    let set = vec![daemons[0].member(), daemons[1].member(), d.member()];
    d.create_volume_in(VOL, SIZE, set.clone(), 1).await;
    daemons[0].set_replicas(VOL, set.clone()).await;
    // Three more polling rounds of all three replicas after node-a changed.
    let answers = e.status().counters.replica_set_answers;
    eventually("three more polls", NO_HANG, || async {
        e.status().counters.replica_set_answers >= answers + 9
    })
    .await;
    let st = e.status();
    assert_eq!(nodes(&st), ["node-a", "node-b", "node-c"]);
    assert_eq!(st.in_sync, 3);
    assert_eq!(st.counters.replica_set_changes, 0);

    daemons[1].set_replicas(VOL, set).await;
    eventually("node-d in sync in node-c's place", NO_HANG, || async {
        let st = e.status();
        in_sync(&st, "node-d") && !nodes(&st).contains(&"node-c".to_owned())
    })
    .await;
    e.flush().await.unwrap();
    eventually("background acks", NO_HANG, || async {
        e.status().inflight_ops == 0
    })
    .await;
    assert_same_blocks(&daemons[0], &d, 1).await;
    assert_reads(&e, &written).await;
    let st = e.status();
    assert_eq!(st.counters.replica_set_changes, 1);
    assert_eq!(st.counters.full_resyncs, 1);
    assert_eq!(st.counters.failed_ops, 0);
    e.close().await.unwrap();
}

/// Copies `from` to `to` as they are (sparse files, modes).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// Leaves node-c (`daemons[2]`) with an older copy of the volume than node-a and
/// node-b, its maps clean and its in-sync file gone, while every map is clean: the
/// blocks it lacks were written by an engine of epoch 2 with all three in sync and
/// cleaned since, then node-c's copy was put back to what it held before. Returns
/// what a read must return for each block written.
async fn node_c_put_back_to_an_older_copy(
    work: &std::path::Path,
    daemons: &mut [Daemon],
) -> HashMap<u64, u64> {
    let e1 = Engine::open(config(1, daemons)).await.unwrap();
    write_blocks(&e1, 0, 32, 100).await;
    write_blocks(&e1, 2 * REGION_SIZE / BS, 32, 200).await;
    e1.close().await.unwrap();

    // node-c's volume as it is now, kept aside.
    daemons[2].kill9().await;
    let backup = work.join("backup");
    std::fs::create_dir(&backup).unwrap();
    copy_dir(&daemons[2].volume_dir(VOL), &backup);
    daemons[2].restart().await;

    // A later engine rewrites the same blocks on all three and closes cleanly:
    // every map is clean again.
    let e2 = Engine::open(config(2, daemons)).await.unwrap();
    let mut written = write_blocks(&e2, 0, 32, 300).await;
    written.extend(write_blocks(&e2, 2 * REGION_SIZE / BS, 32, 400).await);
    e2.close().await.unwrap();
    for d in daemons.iter() {
        assert!(dirty_regions(d, 2).await.is_empty(), "{}", d.node_id);
    }

    // node-c is put back to the kept copy, without its in-sync record.
    daemons[2].kill9().await;
    let dir = daemons[2].volume_dir(VOL);
    std::fs::remove_dir_all(&dir).unwrap();
    copy_dir(&backup.join(VOL), dir.parent().unwrap());
    std::fs::remove_file(dir.join("store").join(MEMBERSHIP_FILE)).unwrap();
    daemons[2].restart().await;
    assert!(dirty_regions(&daemons[2], 2).await.is_empty());
    let older = blocks_of(&daemons[2], 2).await;
    assert_ne!(
        older[0].1.as_deref(),
        Some(&pattern(300, BS as usize)[..]),
        "node-c holds the older copy"
    );
    written
}

/// `d` holds exactly what `written` says for every block written.
async fn assert_holds(d: &Daemon, epoch: u64, written: &HashMap<u64, u64>) {
    let on = blocks_of(d, epoch).await;
    for (&b, &stamp) in written {
        assert_eq!(
            on[b as usize].1.as_deref(),
            Some(&pattern(stamp, BS as usize)[..]),
            "block {b} on {}",
            d.node_id
        );
    }
}

/// A replica whose own in-sync record does not name it was never declared in sync
/// as it is. The dirty maps say nothing is missing; with the others a majority,
/// the next engine leaves it out at open and compares it over the whole volume
/// online, repairing it before it counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_its_own_record_does_not_name_is_compared_over_the_whole_volume() {
    let work = tempfile::tempdir().unwrap();
    let mut daemons = three(work.path()).await;
    let written = node_c_put_back_to_an_older_copy(work.path(), &mut daemons).await;

    let e3 = Engine::open(config(3, &daemons)).await.unwrap();
    let report = e3.status().reconciled_at_open;
    assert_eq!(report.left_for_full_resync, ["node-c"], "{report:?}");
    assert_eq!(report.regions, 0, "no dirty region: {report:?}");
    eventually(
        "node-c compared in full and back in sync",
        NO_HANG,
        || async { in_sync(&e3.status(), "node-c") },
    )
    .await;
    assert_same_blocks(&daemons[0], &daemons[2], 3).await;
    assert_holds(&daemons[2], 3, &written).await;
    let st = e3.status();
    assert_eq!(st.counters.full_resyncs, 1, "{:?}", st.counters);
    assert!(
        st.counters.resync_compared_bytes >= SIZE,
        "the whole volume was compared: {:?}",
        st.counters
    );
    assert_eq!(
        st.counters.resync_bytes,
        64 * BS,
        "exactly the blocks that differed were copied: {:?}",
        st.counters
    );
    eventually("node-c declared in sync", NO_HANG, || async {
        members_on(&daemons[2], 3).await.len() == 3
    })
    .await;
    e3.close().await.unwrap();
}

/// The same replica when the others are no majority without it (node-b is down):
/// the engine compares the whole volume at open, before it serves, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_majority_otherwise_it_is_compared_over_the_whole_volume_at_open() {
    let work = tempfile::tempdir().unwrap();
    let mut daemons = three(work.path()).await;
    let written = node_c_put_back_to_an_older_copy(work.path(), &mut daemons).await;
    daemons[1].kill9().await;

    let e3 = Engine::open(config(3, &daemons)).await.unwrap();
    let report = e3.status().reconciled_at_open;
    assert_eq!(report.compared_in_full, ["node-c"], "{report:?}");
    assert_eq!(report.regions, SIZE / MAX_VERSIONS_LEN, "{report:?}");
    assert_eq!(report.blocks_fixed, 64, "{report:?}");
    assert!(in_sync(&e3.status(), "node-c"));
    assert_same_blocks(&daemons[0], &daemons[2], 3).await;
    assert_holds(&daemons[2], 3, &written).await;
    assert_reads(&e3, &written).await;
    e3.close().await.unwrap();
}

/// A member that drops and comes back (its own record names it) is caught up on
/// the dirty regions only, not compared over the whole volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoining_member_is_caught_up_on_its_dirty_regions_only() {
    let work = tempfile::tempdir().unwrap();
    let mut daemons = three(work.path()).await;
    let e = Engine::open(config(1, &daemons)).await.unwrap();
    for region in 0..4 {
        write_blocks(&e, region * REGION_SIZE / BS, 16, 10_000 * (region + 1)).await;
    }
    e.flush().await.unwrap();
    all_clean(&daemons, 1).await;

    daemons[2].kill9().await;
    let missed = write_blocks(&e, REGION_SIZE / BS + 100, 12, 90_000).await;
    e.flush().await.unwrap();
    assert!(!in_sync(&e.status(), "node-c"));
    daemons[2].restart().await;
    eventually("node-c back in sync", NO_HANG, || async {
        in_sync(&e.status(), "node-c")
    })
    .await;
    let st = e.status();
    assert_eq!(st.counters.resyncs, 1, "{:?}", st.counters);
    assert_eq!(st.counters.full_resyncs, 0, "{:?}", st.counters);
    // One dirty region (a retried catch-up would compare it again), never the
    // whole volume.
    assert!(
        st.counters.resync_compared_bytes >= REGION_SIZE
            && st.counters.resync_compared_bytes % REGION_SIZE == 0
            && st.counters.resync_compared_bytes < SIZE,
        "one dirty region compared, not the whole volume: {:?}",
        st.counters
    );
    assert_eq!(st.counters.resync_bytes, 12 * BS, "{:?}", st.counters);
    e.flush().await.unwrap();
    eventually("background acks", NO_HANG, || async {
        e.status().inflight_ops == 0
    })
    .await;
    assert_same_blocks(&daemons[0], &daemons[2], 1).await;
    assert_reads(&e, &missed).await;
    e.close().await.unwrap();
}
