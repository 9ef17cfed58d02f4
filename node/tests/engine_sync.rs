//! Replicas that missed writes never serve them: engine tests against three
//! in-process replicas over the real checksummed store (its dirty-region map and
//! in-sync record included), with the real data-plane server and client on
//! 127.0.0.1. A "killed" replica is one whose server was dropped with its
//! connections; its store and sync state stay, as a killed daemon's disk does.

mod engine_support;

use std::time::Duration;
use tessera_replica_protocol::seq::Epoch;

use bytes::Bytes;
use engine_support::holding_link::HoldingLink;
use engine_support::{pattern, wait_for, StoreReplica};
use tessera_node::engine::{Engine, EngineConfig, ReplicaState};
use tessera_replica::sync_state::REGION_SIZE;
use tessera_replica_protocol::block::BLOCK_SIZE;

const BS: u64 = BLOCK_SIZE;
const MIB: u64 = 1 << 20;
const VOL: &str = "vol-sync";
/// Bound for "must not hang" waits; never used to wait for an event.
const NO_HANG: Duration = Duration::from_secs(20);

async fn replicas(size: u64) -> Vec<StoreReplica> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(StoreReplica::start(&format!("node-{i}"), VOL, size).await);
    }
    out
}

fn config(epoch: u64, local: &str, reps: &[StoreReplica]) -> EngineConfig {
    let mut c = EngineConfig::new(
        VOL,
        Epoch::new(epoch).expect("epoch"),
        reps.iter().map(|r| r.endpoint()).collect(),
        local,
    );
    c.request_timeout = Duration::from_secs(2);
    // No background cleaning: each test decides when regions are cleaned; no
    // reconnecting unless a test asks for it.
    c.clean_interval = Duration::from_secs(3600);
    c.reconnect_interval = Duration::from_secs(3600);
    c
}

fn in_sync(engine: &Engine, node: &str) -> bool {
    engine
        .status()
        .replicas
        .iter()
        .any(|r| r.node_id == node && r.state == ReplicaState::InSync)
}

/// Every block's (seq, data) on a replica's store, for comparing copies. The
/// store's blocking API parks its thread, so it runs on the blocking pool.
async fn versions_of(r: &StoreReplica, blocks: u64) -> Vec<(Option<u64>, Vec<u8>)> {
    let store = std::sync::Arc::clone(&r.store);
    tokio::task::spawn_blocking(move || {
        (0..blocks)
            .map(|b| (store.block_seq(b).unwrap(), store.read(b * BS, BS).unwrap()))
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_writes_is_reconciled_before_it_serves_on_its_own_node() {
    let mut reps = replicas(16 * MIB).await;
    let blocks = 64;
    let e1 = Engine::open(config(1, "node-0", &reps)).await.unwrap();
    for b in 0..blocks {
        e1.write(b * BS, Bytes::from(pattern(b, BS as usize)))
            .await
            .unwrap();
    }
    e1.flush().await.unwrap();

    // node-2's daemon dies; writes and trims go on without it and are flushed.
    reps[2].stop().await;
    let mut expect: Vec<Vec<u8>> = (0..blocks).map(|b| pattern(b, BS as usize)).collect();
    for b in 0..32 {
        let data = pattern(1000 + b, BS as usize);
        e1.write(b * BS, Bytes::from(data.clone())).await.unwrap();
        expect[b as usize] = data;
    }
    e1.trim(40 * BS, 8 * BS).await.unwrap();
    for e in &mut expect[40..48] {
        *e = vec![0; BS as usize];
    }
    // Far away in another region: only that region is dirty besides the first.
    e1.write(12 * MIB, Bytes::from(pattern(7, BS as usize)))
        .await
        .unwrap();
    e1.flush().await.unwrap();
    assert!(!in_sync(&e1, "node-2"));
    // The engine records node-2 out of sync on the other two in the background.
    wait_for("node-2 declared out of sync", NO_HANG, || {
        reps[..2].iter().all(|r| {
            let m = r.store.sync_state().membership.get();
            m.epoch == 1 && !m.includes("node-2") && m.includes("node-0")
        })
    })
    .await;

    // The engine dies without closing; node-2 comes back with its old data, and the
    // volume moves to node-2's node, where node-2 is the preferred (local) replica.
    drop(e1);
    reps[2].restart().await;
    let e2 = Engine::open(config(2, "node-2", &reps)).await.unwrap();
    let report = e2.status().reconciled_at_open;
    assert_eq!(report.readmitted, vec!["node-2".to_string()]);
    assert_eq!(report.blocks_fixed, 41, "{report:?}"); // 32 written + 8 trimmed + 1
    assert_eq!(report.bytes_copied, 33 * BS, "{report:?}");
    assert!(in_sync(&e2, "node-2"));
    for b in 0..blocks {
        assert_eq!(
            e2.read(b * BS, BS as u32).await.unwrap(),
            expect[b as usize],
            "block {b}"
        );
    }
    assert_eq!(
        e2.read(12 * MIB, BS as u32).await.unwrap(),
        pattern(7, BS as usize)
    );
    // The copies are identical, seqs included, and declared so.
    let reference = versions_of(&reps[0], blocks).await;
    for r in &reps[1..] {
        assert_eq!(versions_of(r, blocks).await, reference, "{}", r.node_id);
    }
    for r in &reps {
        let m = r.store.sync_state().membership.get();
        assert_eq!((m.epoch, m.members.len()), (2, 3), "{}: {m:?}", r.node_id);
        // Everything was reconciled with all three in sync: nothing left dirty.
        assert_eq!(
            r.store.sync_state().dirty.snapshot().count(),
            0,
            "{}",
            r.node_id
        );
    }
    e2.close().await.unwrap();
}

/// Engine 1 writes block 0 (pattern 1) on all three, node-2 stops, it writes block 0
/// again (pattern 2) on the other two, flushes, records node-2 out of sync, and dies.
async fn block_0_rewritten_while_node_2_was_down(reps: &mut [StoreReplica]) {
    let e1 = Engine::open(config(1, "node-0", reps)).await.unwrap();
    e1.write(0, Bytes::from(pattern(1, BS as usize)))
        .await
        .unwrap();
    reps[2].stop().await;
    e1.write(0, Bytes::from(pattern(2, BS as usize)))
        .await
        .unwrap();
    e1.flush().await.unwrap();
    wait_for("node-2 declared out of sync", NO_HANG, || {
        reps[..2]
            .iter()
            .all(|r| !r.store.sync_state().membership.get().includes("node-2"))
    })
    .await;
    drop(e1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_sync_replica_the_next_engine_cannot_reach_stays_out() {
    let mut reps = replicas(8 * MIB).await;
    block_0_rewritten_while_node_2_was_down(&mut reps).await;

    // node-2 is back, node-1 is down: node-0 is the only source, node-2 a target.
    reps[2].restart().await;
    reps[1].stop().await;
    let e2 = Engine::open(config(2, "node-2", &reps)).await.unwrap();
    assert_eq!(
        e2.read(0, BS as u32).await.unwrap(),
        pattern(2, BS as usize)
    );
    assert!(in_sync(&e2, "node-2") && !in_sync(&e2, "node-1"));
    drop(e2);

    // Now node-0 is down and node-1 back: node-1 was left out by e2's record and
    // node-2 is the one source; node-1 is brought back from it.
    reps[1].restart().await;
    reps[0].stop().await;
    let e3 = Engine::open(config(3, "node-1", &reps)).await.unwrap();
    assert_eq!(
        e3.status().reconciled_at_open.readmitted,
        vec!["node-1".to_string()]
    );
    assert_eq!(
        e3.read(0, BS as u32).await.unwrap(),
        pattern(2, BS as usize)
    );
    drop(e3);

    // One replica reachable is never enough, whatever its record says.
    reps[0].restart().await;
    reps[1].stop().await;
    reps[2].stop().await;
    let e = Engine::open(config(4, "node-0", &reps)).await.unwrap_err();
    assert!(e.to_string().contains("connected to 1 of 3"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_only_the_regions_written_since_the_last_cleaning_are_reconciled() {
    let reps = replicas(64 * MIB).await;
    let e1 = Engine::open(config(1, "node-0", &reps)).await.unwrap();
    // Writes all over the volume, then a clean close: nothing is left dirty.
    for i in 0..16 {
        e1.write(i * REGION_SIZE, Bytes::from(pattern(i, BS as usize)))
            .await
            .unwrap();
    }
    e1.close().await.unwrap();
    for r in &reps {
        assert_eq!(
            r.store.sync_state().dirty.snapshot().count(),
            0,
            "{}",
            r.node_id
        );
    }

    // The next engine writes into two regions and dies without closing.
    let e2 = Engine::open(config(2, "node-0", &reps)).await.unwrap();
    assert_eq!(e2.status().reconciled_at_open.regions, 0);
    e2.write(3 * REGION_SIZE, Bytes::from(pattern(30, BS as usize)))
        .await
        .unwrap();
    e2.write(
        9 * REGION_SIZE + BS,
        Bytes::from(pattern(90, 2 * BS as usize)),
    )
    .await
    .unwrap();
    wait_for("acks", NO_HANG, || e2.status().inflight_ops == 0).await;
    for r in &reps {
        let dirty: Vec<u64> = r.store.sync_state().dirty.snapshot().dirty().collect();
        assert_eq!(dirty, vec![3, 9], "{}", r.node_id);
    }
    drop(e2);
    let e3 = Engine::open(config(3, "node-1", &reps)).await.unwrap();
    let report = e3.status().reconciled_at_open;
    assert_eq!(report.regions, 2, "{report:?}");
    assert_eq!(report.blocks_fixed, 0, "{report:?}");
    assert_eq!(
        e3.read(9 * REGION_SIZE + BS, 2 * BS as u32).await.unwrap(),
        pattern(90, 2 * BS as usize)
    );
    e3.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winner_whose_data_is_rotten_gives_way_to_another_intact_copy() {
    let mut reps = replicas(8 * MIB).await;
    block_0_rewritten_while_node_2_was_down(&mut reps).await;
    // node-1's copy of the newest version rots on disk; its entry still claims it.
    reps[1].corrupt_on_disk(0);
    reps[2].restart().await;
    let e2 = Engine::open(config(2, "node-2", &reps)).await.unwrap();
    let report = e2.status().reconciled_at_open;
    assert_eq!(
        (report.blocks_fixed, report.blocks_lost),
        (1, 0),
        "{report:?}"
    );
    assert_eq!(
        e2.read(0, BS as u32).await.unwrap(),
        pattern(2, BS as usize)
    );
    for r in &reps {
        let store = std::sync::Arc::clone(&r.store);
        let data = tokio::task::spawn_blocking(move || store.read(0, BS))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: {e}", r.node_id));
        assert_eq!(data, pattern(2, BS as usize), "{}", r.node_id);
    }
    e2.close().await.unwrap();
}

/// Every block's (seq, data) on all three replicas is the same.
async fn assert_copies_equal(reps: &[StoreReplica], blocks: u64) {
    let reference = versions_of(&reps[0], blocks).await;
    for r in &reps[1..] {
        assert_eq!(versions_of(r, blocks).await, reference, "{}", r.node_id);
    }
}

fn resyncing_config(reps: &[StoreReplica]) -> EngineConfig {
    let mut c = config(1, "node-0", reps);
    c.reconnect_interval = Duration::from_millis(50);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_back_online_is_resynced_and_counts_again_without_reopening() {
    let mut reps = replicas(16 * MIB).await;
    let blocks = 64;
    let e = Engine::open(resyncing_config(&reps)).await.unwrap();
    for b in 0..blocks {
        e.write(b * BS, Bytes::from(pattern(b, BS as usize)))
            .await
            .unwrap();
    }
    e.flush().await.unwrap();

    // node-2's daemon dies; what it misses: 32 blocks rewritten, 8 trimmed, one far
    // away in another region.
    reps[2].stop().await;
    for b in 0..32 {
        e.write(b * BS, Bytes::from(pattern(1000 + b, BS as usize)))
            .await
            .unwrap();
    }
    e.trim(40 * BS, 8 * BS).await.unwrap();
    e.write(12 * MIB, Bytes::from(pattern(7, BS as usize)))
        .await
        .unwrap();
    e.flush().await.unwrap();
    assert!(!in_sync(&e, "node-2"));

    // It comes back on its address: the engine reconnects, copies what it missed
    // (and nothing else) and readmits it, while still open.
    reps[2].resume().await;
    wait_for("node-2 resynced", NO_HANG, || in_sync(&e, "node-2")).await;
    let st = e.status();
    assert_eq!(st.counters.resyncs, 1);
    assert_eq!(st.counters.resync_bytes, 33 * BS, "{:?}", st.counters);
    // A member that missed writes is compared on the dirty regions (0 and 3) only.
    assert_eq!(st.counters.full_resyncs, 0, "{:?}", st.counters);
    assert_eq!(
        st.counters.resync_compared_bytes,
        2 * REGION_SIZE,
        "{:?}",
        st.counters
    );
    assert!(!st.condition().0, "{:?}", st.condition());
    e.flush().await.unwrap();
    assert_copies_equal(&reps, blocks).await;
    assert_eq!(
        versions_of(&reps[2], 12 * MIB / BS + 1).await.last(),
        versions_of(&reps[0], 12 * MIB / BS + 1).await.last()
    );
    wait_for("node-2 declared in sync", NO_HANG, || {
        reps.iter()
            .all(|r| r.store.sync_state().membership.get().members.len() == 3)
    })
    .await;

    // node-2 counts again: with node-0 gone too, node-1 and node-2 are a majority.
    reps[0].stop().await;
    e.write(0, Bytes::from(pattern(5000, BS as usize)))
        .await
        .unwrap();
    e.flush().await.unwrap();
    assert_eq!(
        e.read(0, BS as u32).await.unwrap(),
        pattern(5000, BS as usize)
    );
    assert!(in_sync(&e, "node-2") && !in_sync(&e, "node-0"));
}

/// Two of three replicas gone at once (a rolling update faster than the engine
/// noticed the first restart): I/O fails below quorum, and once both are back the
/// engine catches them up from the one replica still in sync, one after the other,
/// and serves again without being reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_quorum_the_engine_comes_back_by_resyncing_from_the_one_in_sync_replica() {
    let mut reps = replicas(8 * MIB).await;
    let blocks = 32;
    let e = Engine::open(resyncing_config(&reps)).await.unwrap();
    for b in 0..blocks {
        e.write(b * BS, Bytes::from(pattern(b, BS as usize)))
            .await
            .unwrap();
    }
    e.flush().await.unwrap();
    reps[1].stop().await;
    reps[2].stop().await;
    assert!(
        e.write(0, Bytes::from(pattern(99, BS as usize)))
            .await
            .is_err(),
        "a write below quorum fails"
    );
    wait_for("node-1 and node-2 stale", NO_HANG, || {
        !in_sync(&e, "node-1") && !in_sync(&e, "node-2")
    })
    .await;

    reps[1].resume().await;
    reps[2].resume().await;
    wait_for("both resynced from node-0", NO_HANG, || {
        in_sync(&e, "node-1") && in_sync(&e, "node-2")
    })
    .await;
    e.write(0, Bytes::from(pattern(100, BS as usize)))
        .await
        .unwrap();
    e.flush().await.unwrap();
    assert_eq!(
        e.read(0, BS as u32).await.unwrap(),
        pattern(100, BS as usize)
    );
    assert_copies_equal(&reps, blocks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_resync_reach_the_returning_replica_and_are_never_undone() {
    let mut reps = replicas(8 * MIB).await;
    let blocks: u64 = 512;
    let e = Engine::open(resyncing_config(&reps)).await.unwrap();
    reps[2].stop().await;
    let mut expect: Vec<Vec<u8>> = Vec::new();
    for b in 0..blocks {
        let data = pattern(b, BS as usize);
        e.write(b * BS, Bytes::from(data.clone())).await.unwrap();
        expect.push(data);
    }
    e.flush().await.unwrap();
    reps[2].resume().await;
    // Overwrites of the same blocks race with the catch-up copying older versions.
    let mut round = 0u64;
    let deadline = tokio::time::Instant::now() + NO_HANG;
    while !in_sync(&e, "node-2") || round < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-2 never came back in sync"
        );
        for b in (round % 7..blocks).step_by(7) {
            let data = pattern(10_000 * (round + 1) + b, BS as usize);
            e.write(b * BS, Bytes::from(data.clone())).await.unwrap();
            expect[b as usize] = data;
        }
        round += 1;
    }
    e.flush().await.unwrap();
    wait_for("acks", NO_HANG, || e.status().inflight_ops == 0).await;
    assert_copies_equal(&reps, blocks).await;
    let on_2 = versions_of(&reps[2], blocks).await;
    for (b, want) in expect.iter().enumerate() {
        assert_eq!(&on_2[b].1, want, "block {b} on node-2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_only_the_returning_replica_holds_is_replaced_by_the_in_sync_version() {
    let mut reps = replicas(8 * MIB).await;
    let e = Engine::open(resyncing_config(&reps)).await.unwrap();
    for b in 0..8 {
        e.write(b * BS, Bytes::from(pattern(b, BS as usize)))
            .await
            .unwrap();
    }
    e.flush().await.unwrap();
    reps[2].stop().await;
    // While node-2 is out, block 5 there gets a write no other replica took, with a
    // seq above every acknowledged one (a write that never reached a majority).
    let store = std::sync::Arc::clone(&reps[2].store);
    tokio::task::spawn_blocking(move || {
        store
            .write(5 * BS, &pattern(99, BS as usize), (1 << 40) | 1_000_000)
            .unwrap()
    })
    .await
    .unwrap();
    e.write(0, Bytes::from(pattern(100, BS as usize)))
        .await
        .unwrap();
    e.flush().await.unwrap();
    reps[2].resume().await;
    wait_for("node-2 resynced", NO_HANG, || in_sync(&e, "node-2")).await;
    e.flush().await.unwrap();
    assert_copies_equal(&reps, 8).await;
    let on_2 = versions_of(&reps[2], 8).await;
    assert_eq!(on_2[5].1, pattern(5, BS as usize));
    assert_eq!(on_2[0].1, pattern(100, BS as usize));
}

/// The fault of the first long soak with release binaries: the engine gives up a
/// connection to node-2 (no answer: a partition) while a write to block 3 is still
/// on its way; the block is written again, node-2 is reconnected and caught up; only
/// then does the old connection deliver that first write (a healed partition's TCP
/// retransmission). It carries the engine's own epoch, so no fence stops it: the new
/// connection's CLAIM must, or node-2 goes back to the older version of block 3
/// while the engine counts it in sync. The late delivery is a fake link
/// (`HoldingLink`): loopback cannot delay bytes on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_an_abandoned_connection_delivers_late_never_undoes_a_resync() {
    let reps = replicas(8 * MIB).await;
    let blocks = 16;
    let link = HoldingLink::start(reps[2].addr).await;
    let mut c = resyncing_config(&reps);
    c.replicas[2].data_address = link.addr().to_string();
    let e = Engine::open(c).await.unwrap();
    for b in 0..blocks {
        e.write(b * BS, Bytes::from(pattern(b, BS as usize)))
            .await
            .unwrap();
    }
    e.flush().await.unwrap();

    link.cut();
    // Acknowledged by node-0 and node-1; node-2's copy is held in the link.
    e.write(3 * BS, Bytes::from(pattern(100, BS as usize)))
        .await
        .unwrap();
    wait_for("node-2 dropped", NO_HANG, || !in_sync(&e, "node-2")).await;
    assert!(link.held_bytes() > BS as usize, "the write is held");
    e.write(3 * BS, Bytes::from(pattern(200, BS as usize)))
        .await
        .unwrap();
    e.flush().await.unwrap();
    wait_for("node-2 resynced", NO_HANG, || in_sync(&e, "node-2")).await;

    let late = link.deliver().await;
    assert!(late >= 1, "the held write reached node-2");
    e.flush().await.unwrap();
    let (on_0, on_2) = (
        versions_of(&reps[0], blocks).await,
        versions_of(&reps[2], blocks).await,
    );
    assert_eq!(on_2[3].0, on_0[3].0, "seq of block 3 on node-2 and node-0");
    assert!(
        on_2[3].1 == pattern(200, BS as usize),
        "node-2 does not hold the last write of block 3"
    );
    assert_copies_equal(&reps, blocks).await;
    assert!(in_sync(&e, "node-2"));
}
